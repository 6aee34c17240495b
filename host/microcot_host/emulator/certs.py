"""A local certificate authority and a TLS server certificate for the emulator's broker.

Devices verify the broker's certificate (DESIGN.md, principle 7), so the emulator needs a CA they
can be given as a PEM file and a server certificate that names the address they connect to. Both
are kept under the data directory and reused on restart: a device that stored the CA keeps working.
The server certificate is reissued whenever it no longer fits (expiring, other names, other CA,
other key); the CA only when it expires, because replacing it strands every configured device.

RSA 2048 rather than EC: verifying an RSA signature with e=65537 is the cheapest check for a
microcontroller's mbedTLS, and every MicroPython port's TLS stack supports it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..files import private_dir, write_private

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime clients such as Apple's accept for a server certificate
RENEW_BEFORE = dt.timedelta(days=30)
# devices often boot with a clock that lags; a certificate "not yet valid" would fail their handshake
BACKDATE = dt.timedelta(days=1)
KEY_BITS = 2048

DEFAULT_HOSTNAMES = ("localhost",)
DEFAULT_IPS = ("127.0.0.1", "::1")


class CertError(RuntimeError):
    """The TLS material under the data directory could not be created or read."""


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def ensure_ca_and_server(data_dir: Path, hostnames: Iterable[str] = DEFAULT_HOSTNAMES,
                         ips: Iterable[str] = DEFAULT_IPS) -> TlsFiles:
    """Create (or reuse) `<data_dir>/tls/{ca,server}.{pem,key}` and return their paths.

    Idempotent: a second call with the same names changes nothing on disk.
    """
    tls_dir = Path(data_dir) / "tls"
    private_dir(tls_dir)
    files = TlsFiles(tls_dir / "ca.pem", tls_dir / "server.pem", tls_dir / "server.key")
    ca_key_path = tls_dir / "ca.key"
    hostnames = tuple(hostnames)
    names = _names(hostnames, ips)
    now = _now()

    ca = _load_pair(files.ca_cert, ca_key_path)
    if ca is None or ca[0].not_valid_after_utc - now < RENEW_BEFORE:
        ca = _new_ca(now)
        _write_key(ca_key_path, ca[1])
        write_private(files.ca_cert, ca[0].public_bytes(serialization.Encoding.PEM), 0o644)
    ca_cert, ca_key = ca

    server = _load_pair(files.server_cert, files.server_key)
    if server is None or not _server_fits(server[0], ca_cert, names, now):
        key = _new_key()
        cn = hostnames[0] if hostnames else str(next(iter(names)).value)
        cert = _new_server(ca_cert, ca_key, key, cn, names, now)
        _write_key(files.server_key, key)
        write_private(files.server_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def client_ssl_context(ca_cert: Path | str) -> ssl.SSLContext:
    """A client context that trusts only the emulator's CA and checks the host name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca_cert))
    return ctx


def server_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """A server context presenting the server certificate (TLS 1.2+), e.g. for the REST API."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(files.server_cert), str(files.server_key))
    return ctx


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _names(hostnames: Iterable[str], ips: Iterable[str]) -> frozenset[x509.GeneralName]:
    out: set[x509.GeneralName] = {x509.DNSName(h) for h in hostnames}
    out |= {x509.IPAddress(ipaddress.ip_address(a)) for a in ips}
    if not out:
        raise CertError("the server certificate needs at least one host name or IP address")
    return frozenset(out)


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def _new_ca(now: dt.datetime) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _new_key()
    # a random serial in the subject keeps two emulators' CAs apart in a trust store
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "microcot emulator"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"microcot emulator CA {os.urandom(4).hex()}"),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _new_server(ca_cert: x509.Certificate, ca_key: rsa.RSAPrivateKey, key: rsa.RSAPrivateKey,
                cn: str, names: frozenset[x509.GeneralName], now: dt.datetime) -> x509.Certificate:
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=SERVER_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sorted(names, key=str)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=True,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _server_fits(cert: x509.Certificate, ca_cert: x509.Certificate,
                 names: frozenset[x509.GeneralName], now: dt.datetime) -> bool:
    if cert.not_valid_after_utc - now < RENEW_BEFORE or cert.not_valid_before_utc > now:
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if frozenset(san) != names or cert.issuer != ca_cert.subject:
        return False
    ca_pub = ca_cert.public_key()
    assert isinstance(ca_pub, rsa.RSAPublicKey)
    try:
        ca_pub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                      cert.signature_hash_algorithm or hashes.SHA256())
    except InvalidSignature:
        return False  # a CA regenerated since: the old server certificate no longer chains
    return True


def _load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, rsa.RSAPrivateKey] | None:
    """The certificate and key if both exist, parse and belong together; None means "make new"."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        return None
    except ValueError:
        # a truncated or foreign file: replacing it is the only way forward for a local emulator
        return None
    if not isinstance(key, rsa.RSAPrivateKey) or key.public_key() != cert.public_key():
        return None
    return cert, key


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_private(path, pem, 0o600)


