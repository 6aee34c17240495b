"""`microcot ca fetch`: the CA a board needs, read from a live TLS server (the emulator's broker),
saved only when the server's certificate verifies against it for the name the board uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from microcot_host.cafetch import CaFetchError, choose_ca, split_host_port
from microcot_host.cli import main
from microcot_host.emulator import Emulator

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    with Emulator(tmp_path_factory.mktemp("ca") / "emu") as e:
        yield e


def _ca(emu) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(emu.connection["ca_cert"]).read_bytes())


def _fetch(*args: str):
    return CliRunner().invoke(main, ["ca", "fetch", *args])


def test_saves_the_brokers_ca_after_verifying_the_chain_for_the_host(emu, tmp_path):
    out = tmp_path / "ca.pem"
    r = _fetch(f"localhost:{emu.connection['mqtt_port']}", "-o", str(out))
    assert r.exit_code == 0, r.output
    ca = _ca(emu)
    assert x509.load_pem_x509_certificate(out.read_bytes()) == ca
    # what the user must check, shown: the fingerprint, the subject, the validity
    assert ca.fingerprint(hashes.SHA256()).hex(":").upper() in r.stdout
    assert "microcot emulator CA" in r.stdout and "Check this fingerprint" in r.stdout
    assert f"{ca.not_valid_after_utc:%Y-%m-%d}" in r.stdout


def test_without_out_the_pem_goes_to_stdout_and_json_describes_the_chain(emu):
    r = _fetch(f"127.0.0.1:{emu.connection['mqtt_port']}")
    assert r.exit_code == 0, r.output
    assert x509.load_pem_x509_certificate(r.stdout.encode()) == _ca(emu)
    assert "SHA-256" in r.stderr
    r = _fetch(f"127.0.0.1:{emu.connection['mqtt_port']}", "--json")
    info = json.loads(r.stdout)
    assert [c["subject"] for c in info["chain"]][0] == "CN=localhost"
    assert info["ca"]["source"] == "server" and info["ca"]["self_signed"] is True
    assert x509.load_pem_x509_certificate(info["pem"].encode()) == _ca(emu)


def test_refuses_a_certificate_for_another_name_and_writes_nothing(emu, tmp_path):
    out = tmp_path / "ca.pem"
    r = _fetch(f"127.0.0.1:{emu.connection['mqtt_port']}", "--server-name", "other-name.test",
               "-o", str(out))
    assert r.exit_code == 1
    assert "refused" in r.stderr and "other-name.test" in r.stderr
    assert not out.exists()


def test_refuses_a_server_that_sends_no_ca_and_a_port_without_tls(emu):
    # the REST API over TLS sends only its own certificate; the emulator's CA is in no trust store
    https_port = emu.connection["https_url"].rsplit(":", 1)[1]
    r = _fetch(f"localhost:{https_port}")
    assert r.exit_code == 1 and "only its own certificate" in r.stderr
    http_port = emu.connection["http_url"].rsplit(":", 1)[1]
    r = _fetch(f"localhost:{http_port}", "--timeout", "5")
    assert r.exit_code == 1 and "no TLS handshake" in r.stderr


def test_a_leaf_alone_takes_its_root_from_the_trust_store(emu):
    ca = _ca(emu)
    server = Path(emu.connection["ca_cert"]).with_name("server.pem")
    leaf = x509.load_pem_x509_certificate(server.read_bytes())
    choice = choose_ca([leaf], anchors=[leaf, ca])
    assert choice.ca == ca and choice.source == "trust store" and not choice.partial
    with pytest.raises(CaFetchError, match="only its own certificate"):
        choose_ca([leaf], anchors=[])
    # an unrelated certificate appended by a server is not mistaken for the CA
    assert choose_ca([leaf, ca, leaf], anchors=[]).ca == ca


@pytest.mark.parametrize("target, expected", [
    ("nb-iot.ram.m2m.telekom.com", ("nb-iot.ram.m2m.telekom.com", 8883)),
    ("broker:1883", ("broker", 1883)),
    ("[::1]:8884", ("::1", 8884)),
    ("[::1]", ("::1", 8883)),
    ("::1", ("::1", 8883)),
])
def test_host_and_port(target, expected):
    assert split_host_port(target) == expected


@pytest.mark.parametrize("target", ["", ":8883", "host:x", "host:70000"])
def test_bad_targets(target):
    with pytest.raises(CaFetchError):
        split_host_port(target)
