# The rules of /microcot.json, the agent's settings (agent.DEFAULTS' keys and "wlan", which main.py
# reads): what each key takes and which values are secrets. Pure, on both runtimes, so that one set
# of rules checks a configuration on the device (c8y_Configuration, opconf.py) and on the host
# (`microcot config check|new`, microcot_host/config.py) - a file the host accepts is one the
# device accepts. The messages never hold a value: it may be a secret.
MASK = "********"  # a secret as reported; sent back, it keeps the secret the device has
# PEM text (a CA) as reported, likewise: the ESP32's heap has no room for copies of it
PEM = "<PEM text>"

# kind of each key:
#   s a non-empty string   n a string or null   b true/false   t tls: true, false, "noverify"
#   i a whole number >= 0  I a whole number >= 0 or null  p a whole number 1..65535 (a port; MQTT's 16-bit keep-alive)
#   F a number > 0 (a period, a timeout: 0 would spin or never wait)
#   r a range [a, b] of numbers, 0 <= a <= b   q the queue [rows in memory >= 1, rows on flash]
#   m a list of built-in operations (agent._MANAGED)   w {"ssid", "password"}
KINDS = {
    "host": "s", "port": "p", "tls": "t", "ca": "n", "bootstrap_user": "n",
    "bootstrap_password": "n", "bootstrap_delay": "r", "bootstrap_repeat": "F", "device_id": "n",
    "xid": "n", "templates": "s", "name": "s", "interval": "F", "binary": "b", "keepalive": "p",
    "timeout": "F", "backoff": "r", "queue": "q", "durable": "b", "store": "s", "reserve": "i", "restarts": "b",
    "unload": "b", "log": "b", "manage": "m", "availability": "i", "log_ring": "I",
    "rest_url": "n", "http_user": "s", "app_trial": "F", "wlan": "w",
}
MANAGE = ("firmware", "software", "configuration", "logs")
_WHY = {
    "s": "a non-empty string", "n": "a string or null", "b": "true or false",
    "t": 'true, false or "noverify"', "i": "a whole number >= 0",
    "I": "a whole number >= 0 or null",
    "p": "a whole number from 1 to 65535", "F": "a number > 0",
    "r": "[a, b], two numbers >= 0 with a <= b",
    "q": "[rows in memory, rows on flash], whole numbers, the first >= 1",
    "m": "a list of: " + ", ".join(MANAGE), "w": '{"ssid": "...", "password": "..."}',
}


def _num(v):
    return type(v) is int or type(v) is float  # not bool (type(True) is bool)


def _ok(k, v):
    if k == "s":
        return type(v) is str and v != ""
    if k == "n":
        return v is None or type(v) is str
    if k == "b":
        return v is True or v is False
    if k == "t":
        return v is True or v is False or v == "noverify"
    if k == "i":
        return type(v) is int and v >= 0
    if k == "I":
        return v is None or type(v) is int and v >= 0
    if k == "p":
        return type(v) is int and 0 < v < 65536
    if k == "F":
        return _num(v) and v > 0
    if k == "m":
        return type(v) is list and all(x in MANAGE for x in v)
    if k == "w":
        return (type(v) is dict and all(x in ("ssid", "password") and type(v[x]) is str
                                        for x in v) and bool(v.get("ssid")))
    if type(v) is not list or len(v) != 2:
        return False
    a, b = v
    if k == "q":
        return type(a) is int and type(b) is int and a >= 1 and b >= 0
    return _num(a) and _num(b) and 0 <= a <= b  # r


def why(name, value):
    """None when the key takes this value, else what it expects: "expected ..." (or "unknown
    setting")."""
    k = KINDS.get(name)
    if k is None:
        return "unknown setting"
    return None if _ok(k, value) else "expected " + _WHY[k]


def check(cfg, cur=None):
    """The first problem of a configuration (a dict of keys) as "key: why", or None. cur: the
    settings that cfg updates (their own keys are not checked again: a key a device already has
    must not block every change), for the rules between keys."""
    if type(cfg) is not dict:
        return "the configuration must be a JSON object"
    for name in cfg:
        w = why(name, cfg[name])
        if w is not None:
            return "%s: %s" % (name, w)
    if cur:
        cur = dict(cur)
        cur.update(cfg)
        cfg = cur
    if cfg.get("tls", True) is True and cfg.get("ca") == "":
        return "ca: TLS is verified: give the broker's CA"
    if cfg.get("durable") is True and cfg.get("queue", [1, 1])[1] < 1:
        return "durable: the durable queue needs rows on flash (queue's second number >= 1)"
    return None


def secret(name):
    return "password" in name or "secret" in name


def masked(cfg):
    """A copy with every secret (a key naming a password or secret, also inside an object like
    wlan) replaced by MASK (an empty one stays empty, there is nothing to hide) and PEM text by
    PEM."""
    out = {}
    for k in cfg:
        v = cfg[k]
        if type(v) is dict:
            v = masked(v)
        elif v and secret(k):
            v = MASK
        elif type(v) is str and "-----BEGIN" in v:
            v = PEM
        out[k] = v
    return out


def unmask(new, cur):
    """new with each secret given as MASK and each PEM placeholder replaced by its value in cur
    (None when cur has none)."""
    out = {}
    for k in new:
        v = new[k]
        c = cur.get(k) if type(cur) is dict else None
        if v == PEM or v == MASK and secret(k):
            v = c
        elif type(v) is dict:
            v = unmask(v, c)
        out[k] = v
    return out
