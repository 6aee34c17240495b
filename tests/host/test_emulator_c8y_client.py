"""The independent `c8y-api` client (Cumulocity's Python SDK, from PyPI) against the emulator's
REST API: inventory, measurements, alarms and operations, as an admin and as a device user.
Api, Model and RestServer in-process: no broker. Skipped (failing under
MICROCOT_REQUIRE_FIDELITY=1) when c8y-api is not installed (the `test` extra brings it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fidelity_fixtures import unavailable

from microcot_host.emulator.api import Api
from microcot_host.emulator.binaries import BinaryStore
from microcot_host.emulator.http import RestServer
from microcot_host.emulator.model import Model

try:
    from c8y_api import AccessDeniedError, CumulocityApi
    from c8y_api.model import Alarm, Device, ManagedObject, Measurement, Operation
except ImportError:  # pragma: no cover - the test extra installs it
    CumulocityApi = None  # type: ignore[assignment,misc]

pytestmark = pytest.mark.timeout(60)

TENANT = "t-emulator"
ADMIN, ADMIN_PW = "admin", "Admin-Pass-1"
DEV, DEV_PW = "89490200000000000077", "Device-Pass-77"
T0 = "2024-05-01T10:00:00.000Z"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RestServer]:
    if CumulocityApi is None:
        unavailable("the c8y-api package (pip install -e '.[test]')")
    api = Api(Model(), tenant=TENANT, binaries=BinaryStore(tmp_path / "binaries"))
    api.issue_credentials(DEV, DEV_PW)
    with RestServer(api, ADMIN, ADMIN_PW) as srv:
        yield srv


def client(srv: RestServer, user: str = ADMIN, password: str = ADMIN_PW) -> CumulocityApi:
    # the SDK sends <tenant>/<user> as the Basic user, as Cumulocity allows
    return CumulocityApi(srv.url, TENANT, user, password)


def test_inventory_measurements_alarms_operations(server: RestServer) -> None:
    c8y = client(server)

    # inventory: a device with a child, a plain managed object, queries and an update
    dev = Device(c8y, type="c8y_Board", name="board-1", c8y_Hardware={"model": "esp32"}).create()
    assert dev.id and dev.name == "board-1" and dev.type == "c8y_Board"
    assert dev.is_device  # c8y_IsDevice
    child = Device(c8y, type="c8y_Sensor", name="sensor-1").create()
    dev.add_child_device(child)
    thing = ManagedObject(c8y, type="c8y_Thing", name="thing").create()
    got = c8y.inventory.get(dev.id)
    assert got.name == "board-1" and got.c8y_Hardware.model == "esp32"
    assert [r.id for r in c8y.inventory.get(dev.id).child_devices] == [child.id]
    assert [m.id for m in c8y.inventory.select(type="c8y_Thing")] == [thing.id]
    assert {m.id for m in c8y.device_inventory.select()} == {dev.id, child.id}
    got.name = "board-1b"
    got.update()
    assert c8y.inventory.get(dev.id).name == "board-1b"
    thing.delete()
    assert [m.id for m in c8y.inventory.select(type="c8y_Thing")] == []

    # measurements: several, then selected by source, type and time, oldest first
    for i in range(7):
        Measurement(c8y, type="c8y_Temperature", source=dev.id,
                    time=f"2024-05-01T10:0{i}:00.000Z",
                    c8y_Temperature={"T": {"value": 20 + i, "unit": "C"}}).create()
    Measurement(c8y, type="c8y_Humidity", source=dev.id, time=T0,
                c8y_Humidity={"H": {"value": 40, "unit": "%"}}).create()
    temps = list(c8y.measurements.select(source=dev.id, type="c8y_Temperature", page_size=3))
    assert [m.c8y_Temperature.T.value for m in temps] == [20, 21, 22, 23, 24, 25, 26]
    window = c8y.measurements.get_all(source=dev.id, type="c8y_Temperature",
                                      date_from="2024-05-01T10:02:00Z",
                                      date_to="2024-05-01T10:04:00Z")
    assert [m.c8y_Temperature.T.value for m in window] == [22, 23]
    assert c8y.measurements.get(temps[0].id).source == dev.id

    # alarms: raised, raised again (count), acknowledged, cleared
    a = Alarm(c8y, type="c8y_HighTemp", source=dev.id, time=T0, text="too hot",
              severity=Alarm.Severity.MAJOR).create()
    assert a.status == Alarm.Status.ACTIVE
    Alarm(c8y, type="c8y_HighTemp", source=dev.id, time=T0, text="still too hot",
          severity=Alarm.Severity.MAJOR).create()
    again = c8y.alarms.get(a.id)
    assert again.count == 2 and again.text == "still too hot"
    again.status = Alarm.Status.ACKNOWLEDGED
    again.update()
    assert [x.id for x in c8y.alarms.select(source=dev.id,
                                            status=Alarm.Status.ACKNOWLEDGED)] == [a.id]
    cleared = c8y.alarms.get(a.id)
    cleared.status = Alarm.Status.CLEARED
    cleared.update()
    assert c8y.alarms.get(a.id).status == Alarm.Status.CLEARED
    assert list(c8y.alarms.select(source=dev.id, status=Alarm.Status.ACTIVE)) == []

    # operations: created PENDING for the device, then EXECUTING and SUCCESSFUL
    op = Operation(c8y, device_id=dev.id, description="restart", c8y_Restart={}).create()
    assert op.status == Operation.Status.PENDING
    assert [o.id for o in c8y.operations.select(device_id=dev.id,
                                                status=Operation.Status.PENDING)] == [op.id]
    for status in (Operation.Status.EXECUTING, Operation.Status.SUCCESSFUL):
        cur = c8y.operations.get(op.id)
        cur.status = status
        cur.update()
    assert c8y.operations.get(op.id).status == Operation.Status.SUCCESSFUL
    assert list(c8y.operations.select(device_id=dev.id, status=Operation.Status.PENDING)) == []


def test_a_device_user_through_the_sdk(server: RestServer) -> None:
    """A device with issued credentials creates itself and its data, and sees only its own."""
    admin = client(server)
    other = Device(admin, type="c8y_Board", name="not-mine").create()
    me = client(server, DEV, DEV_PW)
    dev = Device(me, type="c8y_Board", name="me").create()
    assert dev.owner == DEV
    Measurement(me, type="c8y_T", source=dev.id, time=T0, c8y_T={"T": {"value": 1}}).create()
    assert [m.source for m in me.measurements.select()] == [dev.id]
    assert [d.id for d in me.device_inventory.select()] == [dev.id]
    with pytest.raises(AccessDeniedError):
        me.inventory.get(other.id)
    op = Operation(admin, device_id=dev.id, c8y_Restart={}).create()
    mine = me.operations.get(op.id)
    mine.status = Operation.Status.EXECUTING
    mine.update()
    assert admin.operations.get(op.id).status == Operation.Status.EXECUTING
