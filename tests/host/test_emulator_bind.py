"""Real boards on the emulator: it listens where asked, its certificate names what boards use,
and board-config tells a board what it needs without printing a password."""

from __future__ import annotations

import json
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from emulator_fixtures import Device

from microcot_host.emulator import Emulator
from microcot_host.emulator.certs import client_ssl_context
from microcot_host.emulator.service import EmulatorError

pytestmark = pytest.mark.timeout(120)


def _handshake(host: str, port: int, name: str, ca: str) -> None:
    with socket.create_connection((host, port), timeout=5) as sock, \
            client_ssl_context(ca).wrap_socket(sock, server_hostname=name):
        pass


def test_a_second_loopback_address_and_a_host_name_the_certificate_must_match(tmp_path):
    with Emulator(tmp_path / "emu", host="127.0.0.2", names=("cot-emulator.test",)) as emu:
        c = emu.connection
        assert c["mqtt_host"] == "cot-emulator.test"
        assert c["http_url"].startswith("http://cot-emulator.test:")
        assert c["https_url"].startswith("https://cot-emulator.test:")
        # MQTT/TLS on 127.0.0.2, verified for the name boards use ...
        _handshake("127.0.0.2", c["mqtt_port"], "cot-emulator.test", c["ca_cert"])
        https_port = int(c["https_url"].rsplit(":", 1)[1])
        _handshake("127.0.0.2", https_port, "cot-emulator.test", c["ca_cert"])
        # ... refused for another name, with the reason
        with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
            _handshake("127.0.0.2", c["mqtt_port"], "other-name.test", c["ca_cert"])
        # and nothing listens on 127.0.0.1
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", c["mqtt_port"]),
                                                               timeout=2):
            pass
        # the emulator's own connector serves a device that came in on 127.0.0.2 (by address:
        # the certificate names it too)
        dev_id = "89490200001234567892"
        password = emu.add_device(dev_id)
        d = Device({**c, "mqtt_host": "127.0.0.2"}, dev_id, dev_id, password).connect()
        try:
            assert d.subscribe("mr/" + dev_id) == 1
            assert d.request("15,nosuchxid\n100,x").startswith("4")  # an answer: 40/41
        finally:
            d.client.disconnect()
            d.client.loop_stop()
        assert set(emu.cert_names()) >= {"cot-emulator.test", "localhost", "127.0.0.1",
                                         "127.0.0.2"}


def test_every_address_needs_a_name(tmp_path):
    with pytest.raises(EmulatorError, match="--host"):
        Emulator(tmp_path / "emu", host="0.0.0.0")


def test_board_config_masks_the_password_and_writes_it_owner_only(tmp_path):
    with Emulator(tmp_path / "emu", host="127.0.0.2", names=("cot-emulator.test",)) as emu:
        password = emu.connection["bootstrap_password"]
        cmd = [sys.executable, "-m", "microcot_host", "emulator", "--data-dir", str(tmp_path / "emu"),
               "board-config"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "cot-emulator.test" in r.stdout and password not in r.stdout
        out = tmp_path / "board.json"
        r = subprocess.run([*cmd, "--json", "--out", str(out)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and password not in r.stdout + r.stderr
        shown = json.loads(r.stdout)
        assert shown["host"] == "cot-emulator.test" and shown["bootstrap_password"] == "********"
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        full = json.loads(out.read_text())
        assert full["bootstrap_password"] == password and full["port"] == shown["port"]
        assert full["ca"].startswith("-----BEGIN CERTIFICATE-----")
        assert full["ca"] == Path(emu.connection["ca_cert"]).read_text()
