"""`microcot config` and `microcot deploy --app --config --templates --ca`: a board configured
the way a user does it, with no secret on the command line or in the output."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from emulator_fixtures import new_iccid, wait_for

from microcot_host import config
from microcot_host.demo import BoardLog
from microcot_host.emulator import Emulator
from microcot_host.vboard.models import make_board

pytestmark = pytest.mark.timeout(180)
SECRET = "Bootstrap-Pw-9x"


def microcot(*args: str, env: dict[str, str] | None = None,
             stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microcot_host", *args], capture_output=True,
                          text=True, timeout=120, env=env, input=stdin)


def test_the_reference_covers_every_setting_of_the_firmware():
    assert set(config.defaults()) | {"wlan"} == {k.name for k in config.KEYS}
    config.validate(config.defaults())  # the firmware's defaults pass their own checks


@pytest.mark.parametrize(("cfg", "why"), [
    ({"hots": "x"}, "unknown setting 'hots' (did you mean host?)"),
    ({"port": "8883"}, "port: expected a whole number"),
    ({"tls": "yes"}, 'tls: expected true, false or "noverify"'),
    ({"backoff": [5, 1]}, "backoff: expected [a, b]"),
    ({"bootstrap_password": 12345}, "bootstrap_password: expected a string or null, got ****"),
    ({"wlan": {"ssid": "x", "pass": "y"}}, "wlan: expected"),
    ({"tls": True, "ca": ""}, "ca: TLS is verified"),
])
def test_bad_settings_name_the_key_never_a_secret(cfg, why):
    with pytest.raises(config.ConfigError) as err:
        config.validate(cfg)
    assert why in str(err.value) and "12345" not in str(err.value)


def test_config_new_takes_secrets_from_a_file_or_the_environment_never_argv(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nAAEC\n-----END CERTIFICATE-----\n")
    pw = tmp_path / "pw"
    pw.write_text(SECRET + "\n")
    out = tmp_path / "microcot.json"
    r = microcot("config", "new", "--out", str(out), "--host", "cot.example", "--ca", str(ca),
                 "--bootstrap-user", "devicebootstrap", "--bootstrap-password-file", str(pw),
                 "--set", "interval=30", "--set", "binary=true", "--wlan-ssid", "shop-floor",
                 env={**os.environ, "MICROCOT_WLAN_PASSWORD": "wlan-Pw-77"})
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout + r.stderr and "wlan-Pw-77" not in r.stdout + r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    cfg = json.loads(out.read_text())
    assert cfg["bootstrap_password"] == SECRET and cfg["wlan"]["password"] == "wlan-Pw-77"
    assert cfg["interval"] == 30 and cfg["binary"] is True and cfg["ca"].startswith("-----BEGIN")
    assert microcot("config", "check", str(out)).returncode == 0
    # a secret on the command line is refused
    r = microcot("config", "new", "--out", str(tmp_path / "x.json"), "--set",
                 f"bootstrap_password={SECRET}")
    assert r.returncode == 1 and "a secret" in r.stderr and SECRET not in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"intervall": 3}')
    r = microcot("config", "check", str(bad))
    assert r.returncode == 1 and "unknown setting 'intervall'" in r.stderr


# the board's network resolves these names (VirtualBoard hosts=, a DNS entry of its WLAN): the
# emulator on 127.0.0.2 is reached by a name, as a real board reaches a laptop, without /etc/hosts
NAME, OTHER = "cot-emulator.test", "other-name.test"
DNS = {NAME: "127.0.0.2", OTHER: "127.0.0.2"}


def test_a_board_configured_with_config_and_deploy_bootstraps_and_measures(tmp_path):
    """The user's way: emulator on a second loopback address under a host name, its
    board-config, microcot config new, microcot deploy --app --config --templates --ca; the board
    connects by the name, bootstraps and measures; told a name the certificate lacks, it
    refuses."""
    iccid = new_iccid()
    with Emulator(tmp_path / "emu", host="127.0.0.2", names=(NAME,), auto_accept=True) as emu:
        assert emu.connection["mqtt_host"] == NAME
        base = tmp_path / "from-emulator.json"
        r = microcot("emulator", "--data-dir", str(tmp_path / "emu"), "board-config", "--out",
                     str(base))
        assert r.returncode == 0, r.stderr
        settings = tmp_path / "microcot.json"
        r = microcot("config", "new", "--out", str(settings), "--from", str(base), "--set",
                     "bootstrap_delay=[0,0.2]", "--set", "interval=1", "--set", "backoff=[0.5,2]",
                     "--set", "ca=null")
        assert r.returncode == 0, r.stderr
        assert emu.connection["bootstrap_password"] not in r.stdout + r.stderr
        templates = tmp_path / "my-templates.csv"
        from microcot_host.paths import firmware_dir

        templates.write_text((firmware_dir() / "templates.csv").read_text())
        flash = tmp_path / "flash"
        vb = make_board("virtual", name="cfg-deploy", heap="1m", flash_dir=flash).start()
        try:
            r = microcot("deploy", "--port", vb.port, "--app", "--config", str(settings),
                         "--templates", str(templates), "--ca", emu.connection["ca_cert"])
        finally:
            vb.stop()
        assert r.returncode == 0, r.stdout + r.stderr
        on_board = json.loads((flash / "microcot.json").read_text())
        assert on_board["ca"] == "/ca.pem" and (flash / "ca.pem").read_bytes() == \
            Path(emu.connection["ca_cert"]).read_bytes()
        assert (flash / "templates.csv").read_text() == templates.read_text()
        main = flash / "main.py"
        main.rename(flash / "main.later")
        assert on_board["host"] == NAME
        vb = make_board("virtual", name="cfg-run", iccid=iccid, flash_dir=flash,
                        hosts=DNS).start()
        log = BoardLog(vb.port)
        try:
            (flash / "main.later").rename(main)
            log.write(b"\x04")

            def mo() -> str | None:
                r = emu.api.handle("GET", f"/identity/externalIds/c8y_Serial/{iccid}")
                return r.body["managedObject"]["id"] if r.status == 200 else None
            try:
                wait_for(mo, 60)
                wait_for(lambda: emu.api.handle(
                    "GET", f"/measurement/measurements?source={mo()}").body["measurements"], 30)
            except AssertionError:
                raise AssertionError("\n".join(log.lines)) from None
            text = "\n".join(log.lines)
            assert f"connected to {NAME}:" in text
            assert emu.connection["bootstrap_password"] not in text
        finally:
            log.close()
            vb.stop()
        # the same board told a name that resolves to the emulator but is not in its certificate
        on_board["host"] = OTHER
        (flash / "microcot.json").write_text(json.dumps(on_board))
        vb = make_board("virtual", name="cfg-other", iccid=iccid, flash_dir=flash,
                        hosts=DNS).start()
        log = BoardLog(vb.port)
        try:
            log.write(b"\x04")
            try:
                wait_for(lambda: any("connection:" in line for line in log.lines), 30)
            except AssertionError:
                raise AssertionError("\n".join(log.lines)) from None
            text = "\n".join(log.lines)
            assert f"connected to {OTHER}" not in text
            # the first attempt already says why, naming the host it was told
            refused = next(line for line in log.lines if "connection:" in line)
            assert f"TLS handshake with {OTHER}:" in refused and "does not match" in refused, \
                refused
        finally:
            log.close()
            vb.stop()

