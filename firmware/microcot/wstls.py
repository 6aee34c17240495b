"""TLS settings of the seed's ST_IotSocketTls mapped onto ssl.SSLContext, for microcot.ws.

Imported only when a connection uses TLS. What the runtime's ssl cannot honour raises
wsframe.ConnectError(WS_STATUS_TLS_*, message) when the context is built, never silently:
MicroPython: CRL, PSK, key_pwd (an encrypted key), cipher lists (no set_ciphers), versions other
than TLS 1.2, verification without a CA (there is no system store). CPython < 3.13: PSK.
The version is the lowest one accepted. PEM text is converted to DER for MicroPython, whose
mbedtls build here parses DER only; a path, PEM text or DER bytes are accepted everywhere.
"""

import sys

from microcot import wsframe as F

try:
    import ssl
except ImportError:
    ssl = None

_MP = sys.implementation.name == "micropython"


_SEED_TLS = {"sCA": "ca", "sCert": "cert", "sKeyFile": "key_file", "sKeyPwd": "key_pwd",
             "sCrl": "crl", "sCiphers": "ciphers", "sVersion": "version",
             "bNoServerCertCheck": "no_server_cert_check", "sPskIdentity": "psk_identity",
             "aPskKey": "psk_key"}
_VERSIONS = ("tlsv1", "tlsv1.1", "tlsv1.2", "tlsv1.3")


class Tls:
    """The seed's ST_IotSocketTls."""

    def __init__(self, ca=None, cert=None, key_file=None, key_pwd=None, crl=None, ciphers=None,
                 version="tlsv1.2", no_server_cert_check=False, psk_identity=None, psk_key=None):
        self.ca = ca
        self.cert = cert
        self.key_file = key_file
        self.key_pwd = key_pwd
        self.crl = crl
        self.ciphers = ciphers
        self.version = version
        self.no_server_cert_check = no_server_cert_check
        self.psk_identity = psk_identity
        self.psk_key = psk_key


def tls_of(t):
    """The Tls for a `tls` setting: None for None and False (no TLS); anything else means TLS
    with verification unless it says otherwise (True and {} give the defaults)."""
    if t is None or t is False:
        return None
    if t is True:
        return Tls()
    if isinstance(t, Tls):
        return t
    if isinstance(t, dict):
        d = {}
        for k, v in t.items():
            d[_SEED_TLS.get(k, k)] = v
        d.pop("nPskKeyLen", None)
        return Tls(**d)
    o = Tls()
    for k in ("ca", "cert", "key_file", "key_pwd", "crl", "ciphers", "version",
              "no_server_cert_check", "psk_identity", "psk_key"):
        if hasattr(t, k):
            setattr(o, k, getattr(t, k))
    return o


def _read_file(v, what, nf):
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if v.startswith("-----BEGIN"):
        return v.encode()
    try:
        with open(v, "rb") as f:
            return f.read()
    except OSError:
        raise F.ConnectError(nf, "%s file %r not found" % (what, v))


def _ders(data, what, inv):
    """DER blocks of PEM data (MicroPython's mbedtls here parses DER only); DER passes."""
    if not data.startswith(b"-----BEGIN"):
        return [data]
    from binascii import a2b_base64

    out = []
    for blk in data.split(b"-----BEGIN ")[1:]:
        lines = blk.split(b"\n")
        if b"ENCRYPTED" in lines[0] or b"ENCRYPTED" in blk[:200]:
            raise F.ConnectError(inv, "%s is encrypted; this port cannot use key_pwd" % what)
        body = b"".join(ln.strip() for ln in lines[1:] if ln and not ln.startswith(b"-----")
                        and b":" not in ln)
        try:
            out.append(a2b_base64(body))
        except ValueError:
            raise F.ConnectError(inv, "%s PEM is not valid base64" % what)
    if not out:
        raise F.ConnectError(inv, "%s holds no PEM block" % what)
    return out


def context(t):
    """An ssl.SSLContext for the Tls settings; F.ConnectError(F.WS_STATUS_TLS_*) for what cannot be done."""
    if ssl is None:
        raise F.ConnectError(F.WS_STATUS_SOCK_NOT_SUPPORTED, "this runtime has no ssl module")
    if t.psk_identity or t.psk_key:
        raise F.ConnectError(F.WS_STATUS_TLS_PSK_INVALID, "TLS-PSK is not supported by this runtime's ssl")
    v = (t.version or "tlsv1.2").lower()
    if v not in _VERSIONS:
        raise F.ConnectError(F.WS_STATUS_TLS_VERSION_INVALID, "unknown TLS version %r" % t.version)
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    except Exception as e:
        raise F.ConnectError(F.WS_STATUS_TLS_SETUP, "SSLContext: %r" % (e,))
    if _MP:
        return _mp_context(ctx, t, v)
    return _cpy_context(ctx, t, v)


def _mp_context(ctx, t, v):
    if t.crl:
        raise F.ConnectError(F.WS_STATUS_TLS_CRL_INVALID, "CRL checking is not supported by this port's ssl")
    if t.key_pwd:
        raise F.ConnectError(F.WS_STATUS_TLS_KEY_INVALID, "encrypted private keys (key_pwd) are not "
                    "supported by this port's ssl")
    if v != "tlsv1.2":
        raise F.ConnectError(F.WS_STATUS_TLS_VERSION_INVALID, "this port's ssl cannot select %s" % v)
    if t.ciphers:
        if not hasattr(ctx, "set_ciphers"):
            raise F.ConnectError(F.WS_STATUS_TLS_CIPHER_INVALID, "this port's ssl cannot select ciphers")
        try:
            ctx.set_ciphers(t.ciphers.split(":") if isinstance(t.ciphers, str) else t.ciphers)
        except Exception as e:
            raise F.ConnectError(F.WS_STATUS_TLS_CIPHER_INVALID, "ciphers %r: %r" % (t.ciphers, e))
    if t.no_server_cert_check:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        if not t.ca:
            raise F.ConnectError(F.WS_STATUS_TLS_CA_NOTFOUND, "no CA given: MicroPython has no system "
                        "store; set tls ca, or no_server_cert_check")
        ctx.verify_mode = ssl.CERT_REQUIRED
    if t.ca:
        for der in _ders(_read_file(t.ca, "CA", F.WS_STATUS_TLS_CA_NOTFOUND), "CA",
                         F.WS_STATUS_TLS_CA_INVALID):
            try:
                from microcot import hal

                hal.tls_ca(ctx, der)  # notes whether mbedTLS allocates from the GC heap
            except Exception as e:
                raise F.ConnectError(F.WS_STATUS_TLS_CA_INVALID, "CA not loadable: %r" % (e,))
    if t.cert or t.key_file:
        if not (t.cert and t.key_file):
            raise F.ConnectError(F.WS_STATUS_TLS_KEY_NOTFOUND if t.cert else F.WS_STATUS_TLS_CERT_NOTFOUND,
                        "a client certificate needs both cert and key_file")
        c = _ders(_read_file(t.cert, "certificate", F.WS_STATUS_TLS_CERT_NOTFOUND),
                  "certificate", F.WS_STATUS_TLS_CERT_INVALID)[0]
        k = _ders(_read_file(t.key_file, "key", F.WS_STATUS_TLS_KEY_NOTFOUND), "key",
                  F.WS_STATUS_TLS_KEY_INVALID)[0]
        try:
            ctx.load_cert_chain(c, k)
        except Exception as e:
            st = F.WS_STATUS_TLS_KEY_INVALID if "key" in str(e) else F.WS_STATUS_TLS_CERT_INVALID
            raise F.ConnectError(st, "client certificate/key not loadable: %r" % (e,))
    return ctx


def _tmp(data):
    import tempfile

    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
    return f.name


def _cpy_context(ctx, t, v):
    import os

    ctx.minimum_version = {"tlsv1": ssl.TLSVersion.TLSv1, "tlsv1.1": ssl.TLSVersion.TLSv1_1,
                           "tlsv1.2": ssl.TLSVersion.TLSv1_2,
                           "tlsv1.3": ssl.TLSVersion.TLSv1_3}[v]
    if t.ciphers:
        try:
            ctx.set_ciphers(t.ciphers)
        except ssl.SSLError as e:
            raise F.ConnectError(F.WS_STATUS_TLS_CIPHER_INVALID, "ciphers %r: %s" % (t.ciphers, e))
    if t.ca:
        data = _read_file(t.ca, "CA", F.WS_STATUS_TLS_CA_NOTFOUND)
        try:
            if data.startswith(b"-----BEGIN"):
                ctx.load_verify_locations(cadata=data.decode())
            else:
                ctx.load_verify_locations(cadata=data)
        except (ssl.SSLError, ValueError) as e:
            raise F.ConnectError(F.WS_STATUS_TLS_CA_INVALID, "CA not loadable: %s" % e)
    elif not t.no_server_cert_check:
        ctx.load_default_certs()
    if t.crl:
        data = _read_file(t.crl, "CRL", F.WS_STATUS_TLS_CRL_NOTFOUND)
        path = _tmp(data)
        try:
            ctx.load_verify_locations(cafile=path)
        except ssl.SSLError as e:
            raise F.ConnectError(F.WS_STATUS_TLS_CRL_INVALID, "CRL not loadable: %s" % e)
        finally:
            os.unlink(path)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if t.cert or t.key_file:
        if not (t.cert and t.key_file):
            raise F.ConnectError(F.WS_STATUS_TLS_KEY_NOTFOUND if t.cert else F.WS_STATUS_TLS_CERT_NOTFOUND,
                        "a client certificate needs both cert and key_file")
        cp = _tmp(_read_file(t.cert, "certificate", F.WS_STATUS_TLS_CERT_NOTFOUND))
        kp = _tmp(_read_file(t.key_file, "key", F.WS_STATUS_TLS_KEY_NOTFOUND))
        try:
            try:  # the certificate alone first, so that a failure below is the key's
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cp)
            except ssl.SSLError as e:
                raise F.ConnectError(F.WS_STATUS_TLS_CERT_INVALID, "client certificate not "
                                     "loadable: %s" % e)
            try:
                ctx.load_cert_chain(cp, kp, t.key_pwd or None)
            except (ssl.SSLError, ValueError, TypeError) as e:
                raise F.ConnectError(F.WS_STATUS_TLS_KEY_INVALID, "client key not loadable (or "
                                     "wrong key_pwd, or not the certificate's key): %s" % e)
        finally:
            os.unlink(cp)
            os.unlink(kp)
    if t.no_server_cert_check:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def handshake_error(e):
    """The F.WS_STATUS_TLS_* of a failed TLS handshake."""
    code = getattr(e, "verify_code", None)  # CPython SSLCertVerificationError
    m = str(e)
    if code in (62, 64) or "CN" in m or "mismatch" in m or "Common Name" in m:
        st = F.WS_STATUS_TLS_CN_MISMATCH
    elif code in (9, 10) or "expired" in m or "future" in m:
        st = F.WS_STATUS_TLS_CERT_EXPIRED
    elif code is not None or "verif" in m.lower() or "certificate" in m.lower():
        st = F.WS_STATUS_TLS_VERIFY_FAIL
    else:
        st = F.WS_STATUS_TLS_HANDSHAKE_FAIL
    return F.ConnectError(st, "TLS handshake failed: %s" % (m.strip() or repr(e)))
