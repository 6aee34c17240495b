"""The web console in a real headless browser: Debian's Chromium driven by Playwright.

A running `Emulator` (real Mosquitto, TLS) serves the console at /apps/console of its REST
API's server (webapp.py), where `GET /` of that server leads. One scenario, as a person would do
it: log in; a device bootstraps (paho, seed 002) and its request appears on the
devices page by itself, where the Accept button lets it in; the device creates itself and
measures, and the chart of its page gets the new point without a reload (Server-Sent Events);
a c8y_Command sent from the page goes PENDING -> EXECUTING -> SUCCESSFUL as the device answers.
A screenshot per step goes to build/screenshots/ (kept by CI as artifacts).

Playwright launches the system's Chromium (`executable_path`): nothing is downloaded. Without
Chromium or Playwright the test is skipped saying so (a failure under MICROCOT_REQUIRE_FIDELITY).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from emulator_fixtures import REGISTRATION, WAIT, XID, device, new_iccid, rest, wait_for
from fidelity_fixtures import unavailable
from starlette.applications import Starlette
from test_emulator_e2e import bootstrap, self_create

from microcot_host.emulator import Emulator

pytestmark = pytest.mark.timeout(120)

SHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
MS = WAIT * 1000  # Playwright counts milliseconds


def chromium_path() -> str:
    """The system's Chromium (MICROCOT_CHROMIUM names another)."""
    for name in (os.environ.get("MICROCOT_CHROMIUM"), "chromium", "chromium-browser"):
        found = shutil.which(name) if name else None
        if found:
            return found
    unavailable("no Chromium for the console's browser test: tools/setup-system.sh installs "
                "Debian's chromium package (as root)")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        unavailable("Playwright is not installed: `make setup` installs the test extra")
    exe = chromium_path()
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, headless=True)
        except Error as e:
            unavailable(f"Chromium at {exe} does not start: {str(e).splitlines()[0]}")
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> Iterator[Emulator]:
    with Emulator(tmp_path_factory.mktemp("emu")) as e:
        yield e


@dataclass
class Mounted:
    url: str  # where a person starts: the REST server's root, which leads to the console
    console: Starlette


@pytest.fixture(scope="module")
def console(emu) -> Mounted:
    app = emu.rest.app
    assert app is not None and app.state.console is not None, "the emulator mounts no console"
    return Mounted(emu.connection["http_url"] + "/", app.state.console)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_log_in_accept_a_device_watch_its_chart_and_run_a_command(browser, emu, console):
    conn = emu.connection
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(MS)

    def shot(name: str) -> None:
        page.screenshot(path=str(SHOTS / f"console-{name}.png"), full_page=True)

    def stays(marker: int) -> None:
        """The page was not reloaded since `mark(marker)`: what changed came live."""
        assert page.evaluate("window.microcotMarker") == marker

    def mark(marker: int) -> None:
        page.evaluate(f"window.microcotMarker = {marker}")

    # -- log in ---------------------------------------------------------------------------------
    page.goto(console.url)
    page.wait_for_selector("input[name=password]")
    shot("01-login")
    page.fill("input[name=user]", conn["admin_user"])
    page.fill("input[name=password]", conn["admin_password"])
    page.click("button.primary")
    page.wait_for_url("**/apps/console/devices")
    assert conn["admin_password"] not in page.content() + page.url
    page.wait_for_selector("#live-state.on")  # the live stream is open
    mark(1)
    shot("02-devices")

    # -- a device bootstraps: its request shows up by itself, the Accept button lets it in -----
    iccid = new_iccid()
    got: dict[str, Any] = {}

    def accepted() -> bool:
        return rest(conn, "GET", "/devicecontrol/newDeviceRequests/" + iccid)[1].get(
            "status") == "ACCEPTED"

    def boot() -> None:
        try:
            got["password"] = bootstrap(conn, iccid, accept=lambda: wait_for(accepted, 3 * WAIT))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            got["error"] = e

    booting = threading.Thread(target=boot, daemon=True)
    booting.start()
    request_row = page.locator(f'#pending-requests tr[data-request="{iccid}"]')
    request_row.wait_for()
    stays(1)
    shot("03-pending-request")
    request_row.get_by_role("button", name="Accept").click()
    page.wait_for_selector(".flash.ok")
    booting.join(3 * WAIT)
    assert "error" not in got, got.get("error")
    assert "password" in got, "the device got no credentials"
    shot("04-accepted")
    mark(2)

    # -- the device creates itself and measures: the device list and the chart update live -----
    d = device(conn, iccid, got["password"])
    try:
        if d.request("15," + XID).startswith("40"):
            assert d.request(REGISTRATION).startswith("20,")
        mo = self_create(d, "console board")
        d.ask(f"103,{mo},{iccid},262011234567890,1.0.0,esp32-s3")
        d.ask(f"104,{mo}")
        d.ask(f"105,c8y_Temperature,0,21.5,C,{now_iso()},{mo},c8y_Temperature")
        link = page.locator(f'#devices-table a[href$="/devices/{mo}"]')
        link.wait_for()
        stays(2)
        link.click()
        chart = 'figure[data-series="c8y_Temperature.0"]'
        page.wait_for_selector(f'{chart}[data-points="1"]')
        page.wait_for_selector("#live-state.on")
        mark(3)
        shot("05-device")
        d.ask(f"105,c8y_Temperature,0,23.25,C,{now_iso()},{mo},c8y_Temperature")
        page.wait_for_selector(f'{chart}[data-points="2"]')
        stays(3)
        assert page.get_attribute(chart, "data-last") == "23.25 C"
        shot("06-chart-live")

        # -- a command from the page: PENDING -> EXECUTING -> SUCCESSFUL, shown live -----------
        form = 'form[data-kind="c8y_Command"]'
        page.fill(f"{form} input[name=text]", "uptime")
        page.click(f"{form} button[type=submit]")
        op_id = d.get("mr/" + iccid).decode().split("\n")[1].split(",")[2]
        row = f'#operations-table tr[data-op="{op_id}"]'
        page.wait_for_selector(f'{row}[data-status="PENDING"]')
        page.wait_for_selector("#live-state.on")
        mark(4)
        shot("07-operation-pending")
        d.ask(f"110,{op_id}", "113")
        page.wait_for_selector(f'{row}[data-status="EXECUTING"]')
        shot("08-operation-executing")
        d.ask(f'111,{op_id},SUCCESSFUL,"up 3 days, load 0.01",uptime', "113")
        page.wait_for_selector(f'{row}[data-status="SUCCESSFUL"]')
        stays(4)
        assert "up 3 days, load 0.01" in page.inner_text(row)
        shot("09-operation-successful")
    finally:
        d.close()
        page.close()
    # the page's stream ends with the page
    wait_for(lambda: console.console.state.streams.count == 0)
