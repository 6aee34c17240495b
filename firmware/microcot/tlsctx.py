# A TLS client context that verifies the server against the configured CA, for the MQTT client
# (mqtt.py) and HTTPS (httpget.py, oplog.py). A module of its own: a download in a boot of its own
# (opfw.py) needs the context without the MQTT client's 17 KB of code on an ESP32's heap.
from . import hal

_MP = hal.family() != "cpython"


def _text(e):
    s = str(e).strip()
    return s or type(e).__name__


def _der_certs(data):
    # MicroPython's mbedTLS (unix port 1.29) accepts only DER in load_verify_locations(cadata=):
    # every PEM certificate of the data is decoded here; data without a PEM header is DER.
    if isinstance(data, str):
        data = data.encode()
    begin = b"-----BEGIN CERTIFICATE-----"
    end = b"-----END CERTIFICATE-----"
    i = data.find(begin)
    if i < 0:
        return [bytes(data)]
    from binascii import a2b_base64

    out = []
    while i >= 0:
        j = data.find(end, i)
        if j < 0:
            raise ValueError("PEM certificate without its END line")
        out.append(a2b_base64(b"".join(data[i + len(begin):j].split())))
        i = data.find(begin, j)
    return out


def tls_context(cafile=None, cadata=None, verify=True):
    """An ssl.SSLContext for a TLS client that verifies the server against the given CA.

    cafile: path of a PEM or DER file (on the board's filesystem); cadata: its bytes (PEM or DER,
    or PEM as str). verify=False disables verification and prints a warning. Without a CA,
    CPython uses its default trust store; MicroPython has none and raises ValueError.
    """
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if not verify:
        if hasattr(ctx, "check_hostname"):
            ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        print("tls: WARNING: TLS certificate verification disabled: the server is not "
              "authenticated")
        return ctx
    ctx.verify_mode = ssl.CERT_REQUIRED  # explicit: MicroPython's SSLContext defaults to CERT_NONE
    if cafile is None and cadata is None:
        if _MP:
            raise ValueError("tls_context: give the broker's CA (cafile= or cadata=), or verify=False")
        ctx.load_default_certs()
        return ctx
    cas = []
    if cafile is not None:
        with open(cafile, "rb") as f:
            cas.append((cafile, f.read()))
    if cadata is not None:
        cas.append(("cadata", cadata))
    for where, data in cas:
        try:
            if _MP:
                for der in _der_certs(data):
                    hal.tls_ca(ctx, der)
            else:
                if isinstance(data, (bytes, bytearray)) and data.lstrip()[:5] == b"-----":
                    data = bytes(data).decode()
                ctx.load_verify_locations(cadata=data)
        except (ValueError, OSError) as e:  # CPython: ssl.SSLError
            raise ValueError("%s: not a valid CA certificate (PEM or DER): %s" % (where, _text(e)))
    return ctx


def for_config(cfg):
    """The context the agent's settings ask for (cfg "tls", "ca": a path, or the PEM text);
    None for plain connections."""
    on = cfg["tls"]
    if not on:
        return None
    ca = cfg["ca"]
    if ca and ca.startswith("-----"):
        return tls_context(cadata=ca, verify=on != "noverify")
    return tls_context(cafile=ca, verify=on != "noverify")
