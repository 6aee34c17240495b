"""`microcot ca fetch HOST[:PORT]`: save the CA a board needs to verify a broker.

A board verifies the broker against the one PEM in `/microcot.json` "ca" (`microcot config new
--ca`, `microcot deploy --ca`). This reads the chain the server presents, picks its CA (the
self-signed root when the server sends it, else the root in this machine's trust store that
issued the topmost certificate, else the topmost issuer the server sent), checks that the
server's certificate verifies against exactly that CA for HOST, and shows what it saved.

Fetching a CA over the network is trust on first use: an attacker between this machine and the
broker could present a chain of their own that verifies perfectly against their own CA. Nothing
here can rule that out, so the command prints the CA's SHA-256 fingerprint for the user to
compare with one obtained another way (the operator's documentation, another network) before
boards are given the file.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import warnings
from dataclasses import dataclass
from pathlib import Path

import click
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from .cliopts import HELP

DEFAULT_PORT = 8883  # MQTT over TLS; the Cloud of Things broker is nb-iot.ram.m2m.telekom.com
DEFAULT_TIMEOUT = 10.0


class CaFetchError(RuntimeError):
    """The chain could not be read, no CA could be chosen, or the chain does not verify."""


@dataclass(frozen=True)
class CaChoice:
    ca: x509.Certificate
    source: str  # "server" (sent by the server) or "trust store" (this machine's)
    partial: bool  # the CA is not self-signed: a board trusts an intermediate as its anchor


def split_host_port(target: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """HOST, HOST:PORT, [IPv6] or [IPv6]:PORT."""
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif target.count(":") == 1:
        host, _, port_text = target.partition(":")
    else:  # a bare name, or a bare IPv6 address
        host, port_text = target, ""
    if not host:
        raise CaFetchError(f"{target!r}: no host")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise CaFetchError(f"{target!r}: the port must be a number") from None
    if not 0 < port < 65536:
        raise CaFetchError(f"{target!r}: port out of range")
    return host, port


def fetch_chain(host: str, port: int, server_name: str, timeout: float) -> list[x509.Certificate]:
    """The certificates the server sends, leaf first, read WITHOUT verifying them.

    Verification needs a CA, which is what we are fetching; verify_chain() checks the result.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=server_name) as tls:
            raw = _unverified_chain(tls)
    except ssl.SSLError as exc:
        raise CaFetchError(f"{host}:{port}: no TLS handshake ({exc.reason or exc}); is this a "
                           f"TLS port?") from None
    except OSError as exc:
        raise CaFetchError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    if not raw:
        raise CaFetchError(f"{host}:{port} sent no certificate")
    return [x509.load_der_x509_certificate(der) for der in raw]


def _unverified_chain(tls: ssl.SSLSocket) -> list[bytes]:
    public = getattr(tls, "get_unverified_chain", None)  # Python 3.13+: DER bytes
    if public is not None:
        return list(public())
    # 3.10-3.12 have it only on the underlying object (certificate objects, not bytes); without
    # it the server's own certificate is all there is
    sslobj = getattr(tls, "_sslobj", None)
    private = getattr(sslobj, "get_unverified_chain", None)
    if private is not None:
        return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in private() or []]  # type: ignore[attr-defined]
    leaf = tls.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer and _issued_by(cert, cert)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):  # a wrong key, other names, odd key types
        return False
    return True


def system_anchors() -> list[x509.Certificate]:
    """The CA certificates of this machine's OpenSSL bundle file (empty when there is none)."""
    paths = ssl.get_default_verify_paths()
    for name in (paths.cafile, paths.openssl_cafile):
        if name and Path(name).is_file():
            try:
                # some distributions' bundles hold an old root with a non-positive serial
                # number, which cryptography only warns about: not the user's concern here
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return x509.load_pem_x509_certificates(Path(name).read_bytes())
            except ValueError:
                continue
    return []


def choose_ca(chain: list[x509.Certificate], anchors: list[x509.Certificate]) -> CaChoice:
    """The CA a board should hold for this chain (see the module's docstring for the order)."""
    # the path the server sent: from the leaf up while each next certificate issued the one below;
    # servers may append unrelated certificates, which must not be mistaken for the CA
    path = [chain[0]]
    for cert in chain[1:]:
        if _self_signed(path[-1]) or not _issued_by(path[-1], cert):
            break
        path.append(cert)
    top = path[-1]
    if len(path) > 1 and _self_signed(top):
        return CaChoice(top, "server", partial=False)
    for anchor in anchors:
        if anchor.subject == top.issuer and _issued_by(top, anchor):
            return CaChoice(anchor, "trust store", partial=False)
    if len(path) > 1:
        return CaChoice(top, "server", partial=True)
    raise CaFetchError(
        f"the server sent only its own certificate (issued by {top.issuer.rfc4514_string()}), "
        "and no CA in this machine's trust store issued it: ask the broker's operator for the "
        "CA certificate")


def verify_chain(host: str, port: int, server_name: str, choice: CaChoice,
                 timeout: float) -> None:
    """A verified handshake that trusts nothing but the chosen CA, for server_name.

    This is what a board does with the file: if it fails here, it fails there.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.load_verify_locations(cadata=choice.ca.public_bytes(serialization.Encoding.PEM).decode())
    if choice.partial:
        # mbedTLS (on the boards) accepts an intermediate as the anchor; OpenSSL needs this flag
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=server_name):
            pass
    except ssl.SSLCertVerificationError as exc:
        raise CaFetchError(f"refused: the server's certificate does not verify against the CA "
                           f"for {server_name!r}: {exc.verify_message or exc}") from None
    except (ssl.SSLError, OSError) as exc:
        raise CaFetchError(f"{host}:{port}: the verifying handshake failed: {exc}") from None


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def describe(cert: x509.Certificate) -> dict[str, str]:
    return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "sha256": fingerprint(cert)}


def _validity_problem(cert: x509.Certificate, now: dt.datetime) -> str | None:
    if now < cert.not_valid_before_utc:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
    if now > cert.not_valid_after_utc:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    return None


@click.group("ca", context_settings=HELP)
def ca() -> None:
    """The CA certificate a board needs to verify its broker."""


@ca.command("fetch")
@click.argument("target", metavar="HOST[:PORT]")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the CA's PEM here (default: print it on stdout)")
@click.option("--server-name", default=None, metavar="NAME",
              help="the name the certificate must carry (default: HOST); for a broker reached "
                   "by address whose certificate names it otherwise")
@click.option("--timeout", default=DEFAULT_TIMEOUT, show_default=True, metavar="SECONDS",
              help="how long to wait for the server")
@click.option("--json", "as_json", is_flag=True,
              help="print the chain and the chosen CA as JSON (with the PEM when there is no -o)")
def fetch(target: str, out: Path | None, server_name: str | None, timeout: float,
          as_json: bool) -> None:
    """Save the CA of the TLS server at HOST[:PORT] (default port 8883) as PEM.

    The server's certificate must verify against the CA for HOST (or --server-name), else
    nothing is written. Fetching over the network cannot tell the real broker from an
    impostor: compare the printed SHA-256 fingerprint with one obtained another way before
    giving the file to boards. The Cloud of Things broker is nb-iot.ram.m2m.telekom.com:8883.
    """
    try:
        host, port = split_host_port(target)
        name = server_name or host
        chain = fetch_chain(host, port, name, timeout)
        choice = choose_ca(chain, system_anchors())
        verify_chain(host, port, name, choice, timeout)
    except CaFetchError as exc:
        raise click.ClickException(str(exc)) from None
    pem = choice.ca.public_bytes(serialization.Encoding.PEM).decode()
    now = dt.datetime.now(dt.UTC)
    problem = _validity_problem(choice.ca, now)
    if problem:
        raise click.ClickException(f"the CA {choice.ca.subject.rfc4514_string()} is {problem}: "
                                   f"not saved")
    if out is not None:
        out.write_text(pem)
    info = {"server": f"{host}:{port}", "server_name": name,
            "chain": [describe(c) for c in chain],
            "ca": {**describe(choice.ca), "source": choice.source,
                   "self_signed": not choice.partial},
            "file": str(out) if out else None}
    if as_json:
        click.echo(json.dumps(info if out else {**info, "pem": pem}, indent=2))
        return
    # with no -o the PEM owns stdout (for a pipe); the summary goes to stderr
    err = out is None

    def echo(text: str = "") -> None:
        click.echo(text, err=err)

    echo(f"{host}:{port} sent {len(chain)} certificate(s); verified for {name!r}:")
    for i, c in enumerate(chain):
        echo(f"  [{i}] {c.subject.rfc4514_string()}")
        echo(f"      issuer {c.issuer.rfc4514_string()}")
        echo(f"      valid {c.not_valid_before_utc:%Y-%m-%d} .. {c.not_valid_after_utc:%Y-%m-%d}")
    where = {"server": "sent by the server", "trust store": "from this machine's trust store"}
    echo(f"CA ({where[choice.source]}"
         + (", an intermediate: boards trust it as their anchor" if choice.partial else "")
         + "):")
    echo(f"  subject {choice.ca.subject.rfc4514_string()}")
    echo(f"  valid   {choice.ca.not_valid_before_utc:%Y-%m-%d} .. "
         f"{choice.ca.not_valid_after_utc:%Y-%m-%d}")
    echo(f"  SHA-256 {fingerprint(choice.ca)}")
    echo("Check this fingerprint against one from the operator before giving the file to boards.")
    if out is not None:
        echo(f"written to {out}")
    else:
        click.echo(pem, nl=False)
