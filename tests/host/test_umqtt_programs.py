"""Programs written for micropython-lib's umqtt.simple and umqtt.robust run unchanged on a virtual
board (the MicroPython unix port, as `microcot deploy` lays out the firmware: /lib/microcot and
/umqtt) against the platform emulator's MQTT port: its front and the Mosquitto behind it, with a
device's credentials, over TLS verified with the emulator's CA, as a device would.

The emulator's Mosquitto, not one the test starts: the programs meet the broker a device meets
(the front refuses a last will with CONNACK 5, as the platform may; device users may only use
their own topics) and the SmartREST engine answers their requests on mr/<ID>. The robust program's
connection is dropped by the broker itself: a second connection with the device's client id takes
the session over (MQTT 3.1.1 3.1.4-2), and Mosquitto closes the first.

The programs below are the user's code, their settings filled in (%(...)s); only the RESULT line
at the end is the test's. umqtt.simple's form of TLS is its example's, `ssl=True` with
ssl_params={"server_hostname": ...} and no CA: ours verifies against the CA the board's settings
name (/microcot.json "ca", what `microcot deploy --ca` writes), where umqtt would not verify.
umqtt.robust's is an SSLContext with the CA in DER.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
from pathlib import Path

import pytest
from agent_fixtures import _free_port, run_script
from emulator_fixtures import new_iccid

from microcot import mqttpkt as P
from microcot_host import deploy
from microcot_host.emulator import Emulator
from microcot_host.emulator.certs import client_ssl_context
from microcot_host.vboard.models import make_board

pytestmark = pytest.mark.timeout(120)

WAIT = 10.0
XID = "umqttX1"  # no collection: the engine answers "40,Template not found."

SIMPLE = r"""
import json, time
from umqtt.simple import MQTTClient, MQTTException

SERVER = %(server)r
PORT = %(port)d
CLIENT_ID = %(id)r
PASSWORD = %(password)r
TOPIC_OUT = b"ms/" + CLIENT_ID.encode()
TOPIC_IN = b"mr/" + CLIENT_ID.encode()
REQUEST = %(request)r

got = []


def sub_cb(topic, msg):
    got.append(msg)


def client():
    return MQTTClient(CLIENT_ID, SERVER, port=PORT, user=CLIENT_ID, password=PASSWORD,
                      keepalive=60, ssl=True, ssl_params={"server_hostname": SERVER})


c = client()
c.set_last_will(TOPIC_OUT, b"gone")
try:
    c.connect()
    will = "accepted"
except MQTTException as e:
    will = e.args[0]

c = client()
c.set_callback(sub_cb)
session = c.connect()
c.subscribe(TOPIC_IN, 1)
c.publish(TOPIC_OUT, REQUEST)
t0 = time.ticks_ms()
while not got and time.ticks_diff(time.ticks_ms(), t0) < 10000:
    c.check_msg()
    time.sleep_ms(20)
c.publish(TOPIC_OUT, REQUEST, qos=1)
while len(got) < 2:
    c.wait_msg()
c.disconnect()
print("RESULT", json.dumps({"will": will, "session": session,
                            "got": [m.decode() for m in got]}))
"""

ROBUST = r"""
import json, ssl, time
from umqtt.robust import MQTTClient

SERVER = %(server)r
PORT = %(port)d
CLIENT_ID = %(id)r
PASSWORD = %(password)r
TOPIC_OUT = b"ms/" + CLIENT_ID.encode()
TOPIC_IN = b"mr/" + CLIENT_ID.encode()
REQUEST = %(request)r


class Client(MQTTClient):
    DELAY = 0.2
    DEBUG = True
    drops = 0

    def log(self, in_reconnect, e):
        if not in_reconnect:
            self.drops += 1
        super().log(in_reconnect, e)


got = []


def sub_cb(topic, msg):
    got.append(msg)


ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.verify_mode = ssl.CERT_REQUIRED
with open("/ca.der", "rb") as f:
    ctx.load_verify_locations(cadata=f.read())
c = Client(CLIENT_ID, SERVER, port=PORT, user=CLIENT_ID, password=PASSWORD, keepalive=30,
           ssl=ctx)
c.set_callback(sub_cb)
if not c.connect(clean_session=False):
    c.subscribe(TOPIC_IN, 1)
c.publish(TOPIC_OUT, REQUEST, qos=1)
while not got:
    c.wait_msg()
print("DROP ME")
t0 = time.ticks_ms()
while c.drops == 0 and time.ticks_diff(time.ticks_ms(), t0) < 10000:
    c.check_msg()
    time.sleep_ms(50)
c.publish(TOPIC_OUT, REQUEST, qos=1)
while len(got) < 2:
    c.wait_msg()
c.disconnect()
print("RESULT", json.dumps({"drops": c.drops, "got": [m.decode() for m in got]}))
"""


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    with Emulator(tmp_path_factory.mktemp("emu"), mqtt_port=_free_port()) as e:
        yield e


@pytest.fixture(scope="module")
def board(emu, tmp_path_factory):
    """A virtual board with the firmware where `microcot deploy` puts it (written straight into
    its flash folder: the deploy itself is test_deploy.py's), the broker's CA as /ca.pem and
    /ca.der, and /microcot.json naming the CA."""
    flash = tmp_path_factory.mktemp("umqtt-board") / "flash"
    files, _ = deploy.firmware_files(None, False, None)
    pem = Path(emu.connection["ca_cert"]).read_text()
    files += [deploy.FileSpec("/ca.pem", pem.encode()),
              deploy.FileSpec("/ca.der", ssl.PEM_cert_to_DER_cert(pem)),
              deploy.FileSpec("/microcot.json", json.dumps({"ca": "/ca.pem"}).encode())]
    for f in files:
        p = flash / f.dest.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f.data)
    assert (flash / "umqtt" / "robust.py").exists()
    vb = make_board("virtual", name="umqtt-programs", flash_dir=flash).start()
    yield vb
    vb.stop()


def program(text: str, emu: Emulator, device: str, password: str) -> str:
    return text % {"server": "localhost", "port": emu.connection["mqtt_port"], "id": device,
                   "password": password, "request": ("15," + XID).encode()}


def take_over(emu: Emulator, device: str, password: str) -> None:
    """Connect as the device (same client id, persistent session) and leave: the broker drops
    the device's own connection on the way."""
    c = emu.connection
    ctx = client_ssl_context(c["ca_cert"])
    with socket.create_connection((c["mqtt_host"], c["mqtt_port"]), timeout=WAIT) as raw, \
            ctx.wrap_socket(raw, server_hostname=c["mqtt_host"]) as tls:
        tls.sendall(bytes(P.connect(device, device, password, 30, clean=False)))
        ack = b""
        while len(ack) < 4:
            chunk = tls.recv(4 - len(ack))
            assert chunk, "no CONNACK for the take-over"
            ack += chunk
        assert ack == b"\x20\x02\x01\x00", ack  # accepted, the session present
        tls.sendall(bytes((P.DISCONNECT, 0)))


def test_an_umqtt_simple_program_runs_unchanged(emu, board):
    device = new_iccid()
    password = emu.add_device(device)
    res = run_script(board, program(SIMPLE, emu, device, password), timeout=60)
    assert res["will"] == 5, res  # the front refuses a will: umqtt's MQTTException, args[0] 5
    assert res["session"] is False
    assert res["got"] == ["40,Template not found."] * 2, res


def test_an_umqtt_robust_program_reconnects_after_the_broker_drops_it(emu, board):
    device = new_iccid()
    password = emu.add_device(device)
    dropped = []

    def on_line(line: str) -> None:
        if line == "DROP ME":
            take_over(emu, device, password)
            dropped.append(True)

    res = run_script(board, program(ROBUST, emu, device, password), timeout=60, on_line=on_line)
    assert dropped and res["drops"] == 1, res["log"]
    # DEBUG: umqtt.robust's own line for the lost link, then none for the reconnect (it worked
    # at the first try)
    assert re.search(r"^mqtt: MQTTLinkError\(104, .*closed by the broker", res["log"], re.M), \
        res["log"]
    assert "mqtt reconnect:" not in res["log"]
    # the answer after the reconnect came on the session's subscription: no SUBSCRIBE again
    assert res["got"] == ["40,Template not found."] * 2, res
