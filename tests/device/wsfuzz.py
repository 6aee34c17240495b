# Seeds and mutations shared by the fuzz modules: the mutations and input streams (mutate,
# inputs) of every test_fuzz_*.py, and the WebSocket/SignalR/KICS seeds (test_fuzz_ws.py for the
# decoders, test_fuzz_wsclient.py for the drivers): plain byte and JSON-text mutations over the
# RFC 6455, SignalR specification and seed 001 examples, with no microcot import of their own.
import gc
import json
import sys

_MP = sys.implementation.name == "micropython"
# the longest digit string: 5000 on CPython (beyond its 4300-digit int limit); 1000 on a board,
# whose heap must also hold the copies the mutations make
_DIGITS = 1000 if _MP else 5000
# the suite's counts are divided by this on the RP2040 (real firmware, emulated: ~50x slower than
# the i386 models), to keep its run within seconds per test
SLOW = 10 if sys.platform == "rp2" else 1

H = bytes.fromhex
RS = b"\x1e"


def _pick(rng, seq):
    return seq[rng.below(len(seq))]


def mutate(rng, data, seeds, tokens):
    """data changed 1 to 4 times: bit flip, byte set, truncation, cut, repeat, splice of another
    seed, an inserted token (special and huge byte strings), random tail."""
    b = bytes(data)
    for _ in range(1 + rng.below(4)):
        n = len(b)
        op = rng.below(8)
        i = rng.below(n + 1)
        if op == 0 and n:
            i %= n
            b = b[:i] + bytes((b[i] ^ (1 << rng.below(8)),)) + b[i + 1:]
        elif op == 1 and n:
            i %= n
            b = b[:i] + bytes((rng.below(256),)) + b[i + 1:]
        elif op == 2:
            b = b[:i]
        elif op == 3:
            b = b[:i] + b[i + 1 + rng.below(8):]
        elif op == 4:
            b = b[:i] + b[i:i + 1 + rng.below(16)] + b[i:]
        elif op == 5:
            s = _pick(rng, seeds)
            b = b[:i] + s[rng.below(len(s) + 1):]
        elif op == 6:
            b = b[:i] + _pick(rng, tokens) + b[i:]
        else:
            b = b + rng.bytes(rng.below(8))
    return b


def inputs(rng, n, seeds, tokens):
    """n inputs: mostly mutated seeds, some random bytes, some soups of tokens. On a board the
    garbage of the last input is collected first: a fragmented small heap fails large
    allocations that the decoders themselves would not."""
    for _ in range(n):
        if _MP:
            gc.collect()
        k = rng.below(10)
        if k == 0:
            yield rng.bytes(rng.below(48))
        elif k == 1:
            yield b"".join([_pick(rng, tokens) for _ in range(1 + rng.below(6))])
        else:
            yield mutate(rng, _pick(rng, seeds), seeds, tokens)


def text_of(b):
    """b as str, invalid UTF-8 made '?' (MicroPython's decode has no errors="replace")."""
    try:
        return b.decode()
    except UnicodeError:
        return bytes(c if c < 128 else 63 for c in b).decode()


def _count(n, accepted):
    return {"inputs": n, "accepted": accepted, "rejected": n - accepted}


# -- wsframe ---------------------------------------------------------------------------------------

def _frame_seeds():
    # RFC 6455 5.7 examples, a 256-byte binary (16-bit length), fragmented UTF-8, closes
    euro = "€".encode()
    return [
        H("810548656c6c6f"), H("010348656c") + H("80026c6f"), H("890548656c6c6f"),
        H("8a0548656c6c6f"), H("827e0100") + bytes(256), H("880203e8"), H("8800"),
        bytes((0x01, 1)) + euro[:1] + H("8900") + bytes((0x80, 2)) + euro[1:],
        H("c107f248cdc9c90700"), H("880503e8627965"),
    ]


_FRAME_TOKENS = [
    H("827f0000000000010000"), H("827e8000"), H("827f7fffffffffffffff"), H("827fffffffff"),
    H("017f00000000ffffffff"), H("8a7e"), H("88027fff"), H("81"), H("00"), b"\xc0\xaf", b"\xed\xa0",
    H("f48fbfbf"), bytes(16),
]


# -- signalr ---------------------------------------------------------------------------------------

_SIGNALR = [
    b'{"type":1,"invocationId":"123","target":"Send","arguments":[42,"Test Message"]}',
    b'{"type":1,"target":"Send","arguments":[42,"Test Message"]}',
    b'{"type":4,"invocationId":"123","target":"Send","arguments":[42]}',
    b'{"type":1,"invocationId":"123","target":"Send","arguments":[],"streamIds":["1"]}',
    b'{"type":2,"invocationId":"123","item":42}', b'{"type":3,"invocationId":"123","result":42}',
    b'{"type":3,"invocationId":"123","error":"It didn\'t work!"}', b'{"type":5,"invocationId":"1"}',
    b'{"type":6}', b'{"type":7,"error":"Connection closed because of an error!",'
    b'"allowReconnect":true}', b"{}", b'{"error":"no"}',
]
_BIG = []


def _tokens():
    if not _BIG:
        _BIG.extend([b"9" * _DIGITS, b"-" + b"1" * 400, b"[" * 200, b"{" * 100, b'{"a":' * 60,
                     b"]" * 50, b"1e999", b'"\\u0000"', b'"\xc2\xb2"', b"\xff", RS, b"\\",
                     b'"', b"null", b"true", b"18446744073709551616", b"NaN", b"-Infinity"])
    return _BIG


def _deep_json(rng):
    # thousands of levels reach CPython's recursion limit; a board's heap takes hundreds
    d = 20 + rng.below(100 if _MP else 300) if rng.below(8) or _MP else 1000 + rng.below(3000)
    kind = rng.below(3)
    if kind == 0:
        return "[" * d + "]" * d
    if kind == 1:
        return '{"a":' * d + "1" + "}" * d
    return '{"t":"st","v":{"a":' * d + '{"t":"u","v":1}' + "}}" * d


# -- kics ------------------------------------------------------------------------------------------

_TAG_VALUE = {"n": "TagStructure1", "ts": 18446744073709551616, "dn": "r", "mp": 1, "d": {
    "value": {"t": "d", "v": 3.1415, "x": 1}, "quality": {"t": "s", "v": "good", "m": "q"},
    "mask": {"t": "u", "v": 18446744073709551615},
    "enumfield": {"t": "e", "n": "SwitchState", "v": 0, "s": "Off"},
    "strucfield": {"t": "st", "v": {"v1": {"t": "d", "v": 3.1415},
                                    "q2": {"t": "s", "v": "good", "m": "q"}}},
    "unionfield": {"t": "un", "v": {"_": {"t": "u", "v": 42}, "low4bits": {"t": "u", "v": 10}}},
    "ts2": {"t": "t", "v": "1700000000000000"}, "b": {"t": "b", "v": 1}}}
_CONFIRMATION = {"confirmation": {"result": "ok", "tagIdentifier": {
    "tagName": "Asdu_1_object_1001", "assetName": "Asset 079"}, "tagId": 102}}
_REPLACEMENTS = (None, True, 0, -1, 1.5, 1e308, "x", "²", "9" * 43,
                 [], {}, [1, [2]], {"t": "st", "v": {}}, {"t": "e", "v": "On"}, "NaN", "-Infinity")
_PLACE = "@@HUGE@@"


def _fields(node, out):
    for f in node.values():
        if isinstance(f, dict):
            out.append(f)
            if f.get("t") in ("st", "un") and isinstance(f.get("v"), dict):
                _fields(f["v"], out)
    return out


def _mutated_value(rng):
    """The seed's tag value with one node replaced (a hostile scalar, a 5000-digit integer, deep
    nesting), mostly a field's value or type, as JSON text, sometimes byte-mutated as well."""
    tv = json.loads(json.dumps(_TAG_VALUE))
    if rng.below(4):
        parent = _pick(rng, _fields(tv["d"], []))
        key = _pick(rng, ("v", "v", "v", "t", "n", "s", "m", "x"))
    else:
        parent = tv
        key = _pick(rng, ("n", "ts", "dn", "mp", "d"))
    k = rng.below(len(_REPLACEMENTS) + 2)
    parent[key] = _REPLACEMENTS[k] if k < len(_REPLACEMENTS) else _PLACE
    text = json.dumps(tv)
    if k == len(_REPLACEMENTS):
        text = text.replace('"%s"' % _PLACE, "9" * (20 + rng.below(_DIGITS)))
    elif k > len(_REPLACEMENTS):
        text = text.replace('"%s"' % _PLACE, _deep_json(rng))
    if rng.below(4) == 0:
        text = text_of(mutate(rng, text.encode(), [text.encode()], _tokens()))
    return text


def _item_record(text, tag_id=102, iid="0"):
    """A SignalR stream item record carrying a tag value (JSON text)."""
    return ('{"type":2,"invocationId":"%s","item":{"value":{"tagId":%d,"tagValue":%s}}}'
            % (iid, tag_id, text)).encode() + RS
