# The rarely used parts of mqtt.MQTTClient's umqtt parity, imported only when used: the last
# will (set_last_will) and umqtt's legacy TLS form ssl=True with ssl_params (mqtt.py's header
# describes both). A device agent uses neither, so this code costs its heap nothing.
from .mqttpkt import MQTTTLSError
from .tlsctx import _text, tls_context

_SSL_KEYS = ("cadata", "cafile", "ca_certs", "cert_reqs", "verify", "server_hostname", "cert",
             "key", "do_handshake")


def last_will(c, topic, msg, retain, qos):
    """MQTTClient.set_last_will: checked here, sent by every connect() of client c."""
    if qos not in (0, 1, 2):
        raise ValueError("will qos %r: expected 0, 1 or 2" % (qos,))
    t = topic.encode() if isinstance(topic, str) else topic
    if not t or b"+" in t or b"#" in t:
        raise ValueError("will topic %r: empty or with a wildcard" % (topic,))
    c.lw_topic = t
    c.lw_msg = msg.encode() if isinstance(msg, str) else msg
    c.lw_qos = qos
    c.lw_retain = retain


def board_ca(path):
    """The CA the board's settings at `path` name ("ca": a path or PEM text), or None."""
    try:
        import json

        with open(path) as f:
            ca = json.load(f).get("ca")
    except (OSError, ValueError, AttributeError):  # no file, not JSON, not an object
        return None
    return ca if isinstance(ca, str) and ca else None


def ssl_params_context(c, config):
    """The SSLContext of client c's ssl_params; config: the board's settings file (its CA)."""
    from .hal import family

    p = c.ssl_params
    for k in p:
        if k not in _SSL_KEYS:
            raise ValueError("ssl_params: unknown key %r (known: %s)"
                             % (k, ", ".join(_SSL_KEYS)))
    verify = p.get("verify", True) and p.get("cert_reqs", 2) != 0  # 0: CERT_NONE
    cafile = p.get("cafile", p.get("ca_certs"))
    cadata = p.get("cadata")
    if verify and cafile is None and cadata is None:
        ca = board_ca(config)
        if ca is not None:
            if ca.startswith("-----"):
                cadata = ca
            else:
                cafile = ca
        elif family() != "cpython":  # MicroPython has no default trust store
            raise MQTTTLSError(
                "TLS to %s:%d: no CA certificate to verify the broker with: give "
                "ssl_params={'cadata': ...} or {'cafile': ...}, an SSLContext as ssl=, or "
                "the board's CA (\"ca\" in %s)" % (c.server, c.port, config))
    ctx = tls_context(cafile, cadata, verify)
    if "cert" in p or "key" in p:
        try:
            ctx.load_cert_chain(p.get("cert"), p.get("key"))
        except (OSError, ValueError) as e:  # CPython: ssl.SSLError
            raise ValueError("ssl_params cert/key: not a usable client certificate: %s"
                             % _text(e))
    return ctx
