# Seeded fuzz of kics.TagValueClient (issue 14) over microcot.ws through a fake socket (wsfake.py):
# hostile SignalR records and frames must end in a documented state (SUBSCRIBING/SUBSCRIBED with
# the stream going on, WAITING to reconnect, FAILED only for what the server refused), execute()
# never raising; and the KICS cases at the driver level. Separate from
# test_fuzz_wsclient.py so that each module fits a small board's heap on its own.
# fuzz_tagvalue_client(rng, n) returns {"inputs", "accepted", "rejected"}.
import gc
import sys

import wsfake
from dt import Rng, free, skip

from microcot import wsframe as F

SLOW = 10 if sys.platform == "rp2" else 1  # as wsfuzz.SLOW


def _collect():
    # a board's heap is small and fragments; CPython's collector would only cost time here
    if sys.implementation.name == "micropython":
        gc.collect()


def _room_for_kics():
    # kics + signalr loaded as .mpy take about 30 KB beside ws and wsframe, and a connection
    # some 12 KB more: on the esp32-generic model (86 KB for everything, nothing frozen) that is
    # more than the test modules leave; a firmware that freezes them has the room
    _collect()
    if hasattr(gc, "mem_free") and gc.mem_free() < 60000:
        skip("TagValueClient with ws, kics and the test modules unfrozen needs 60 KB free, "
             "%d left" % gc.mem_free())


def _kics_chunks(rng):
    from wsfuzz import (
        _CONFIRMATION,
        _FRAME_TOKENS,
        _SIGNALR,
        RS,
        _frame_seeds,
        _item_record,
        _mutated_value,
        _pick,
        _tokens,
        mutate,
    )

    from microcot import signalr as S

    recs = [b"{}" + RS, S.stream_item("0", _CONFIRMATION)]
    for _ in range(1 + rng.below(3)):
        recs.append(_item_record(_mutated_value(rng)))
    if rng.below(3) == 0:
        recs.append(mutate(rng, _pick(rng, _SIGNALR), _SIGNALR, _tokens()) + RS)
    frames = []
    for r in recs:
        if rng.below(6) == 0:  # a record split over two messages
            k = rng.below(len(r))
            frames.append(F.encode(F.OP_TEXT, r[:k]))
            frames.append(F.encode(F.OP_TEXT, r[k:]))
        else:
            frames.append(F.encode(F.OP_TEXT, r))
    if rng.below(4) == 0:
        frames.append(mutate(rng, _pick(rng, _frame_seeds()), _frame_seeds(), _FRAME_TOKENS))
    return frames


def fuzz_tagvalue_client(rng, n):
    from wsfuzz import _count

    from microcot import kics as K

    accepted = 0
    for _ in range(n):
        errors = []
        c = K.TagValueClient("fuzz.invalid", "token", [("Asset 079", "Asdu_1_object_1001")],
                             port=80, tls=None, on_error=errors.append, reconnect_interval=60)
        sock = wsfake.Sock(_kics_chunks(rng), after_client=True, eof=False)
        with wsfake.Patched(sock):
            c.connect()
            for _ in range(40):
                c.execute(0)
                if c.state in (K.WAITING, K.FAILED):
                    break
        assert c.state in (K.SUBSCRIBING, K.SUBSCRIBED, K.WAITING, K.FAILED), c.state_name
        assert all(isinstance(e, K.KicsError) for e in errors), errors
        assert "internal error" not in c.ws.error_msg, c.ws.error_msg
        if c.state == K.FAILED:  # not retried: what the server said (Session's docstring)
            assert isinstance(c.error, K.KicsSubscriptionError) or \
                "handshake refused" in str(c.error) or "server closed" in str(c.error), c.error
        if c.state in (K.SUBSCRIBING, K.SUBSCRIBED):  # the stream goes on
            accepted += 1
        c = None
    return _count(n, accepted)


def test_tagvalue_client_deep_record_reconnects():
    # issue 14: the 3 KB record of 100 nested st levels escaped as RuntimeError on MicroPython
    _room_for_kics()
    from wsfuzz import RS, _item_record

    from microcot import kics as K

    deep = '{"d":{"f":%s}}' % ('{"t":"st","v":{"a":' * 100 + '{"t":"u","v":1}' + "}}" * 100)
    errors = []
    c = K.TagValueClient("fuzz.invalid", "token", [("Asset 079", "Asdu_1_object_1001")],
                         port=80, tls=None, on_error=errors.append, reconnect_interval=60)
    frames = [F.encode(F.OP_TEXT, b"{}" + RS), F.encode(F.OP_TEXT, _item_record(deep))]
    with wsfake.Patched(wsfake.Sock(frames, after_client=True)):
        c.connect()
        for _ in range(20):
            c.execute(0)
    free("kics", "signalr")
    sys.modules.pop("wsfuzz", None)
    assert c.state == K.WAITING and isinstance(c.error, K.KicsConnectionError), c.state_name
    assert "deeper than" in str(c.error) and errors


def test_tagvalue_client_resubscribes_after_a_bad_record():
    # the KICS error state is not the end: the next connection subscribes again
    _room_for_kics()
    from wsfuzz import _CONFIRMATION, RS, _item_record

    from microcot import kics as K
    from microcot import signalr as S

    def script(iid, extra):  # the invocation ids go on counting over connections
        recs = [b"{}" + RS, S.stream_item(iid, _CONFIRMATION)] + extra
        return wsfake.Sock([F.encode(F.OP_TEXT, r) for r in recs], after_client=True, eof=False)

    first = script("0", [b'{"type":2,"invocationId":"0","item":' + b"[" * 40 + RS])
    # and a value nested as deep as accepted (kics.MAX_DEPTH levels) decodes inside the whole
    # driver's call stack (ws.execute, the handler, the session), on a board's recursion limit
    deep = '{"t": "st", "v": {"a": ' * (K.MAX_DEPTH - 1) + '{"t": "u", "v": 7, "x": 1}' + \
        "}}" * (K.MAX_DEPTH - 1)
    second = script("1", [_item_record('{"d": {"f": %s}}' % deep, 102, "1")])
    c = K.TagValueClient("fuzz.invalid", "token", [("Asset 079", "Asdu_1_object_1001")],
                         port=80, tls=None, reconnect_interval=0)
    states = []
    with wsfake.Patched(first, second):
        c.connect()
        for _ in range(60):
            c.execute(0)
            if not states or states[-1] != c.state:
                states.append(c.state)
            if c.state == K.SUBSCRIBED and c.attempts == 2 and c.values:
                break
    free("kics", "signalr")
    sys.modules.pop("wsfuzz", None)
    assert K.WAITING in states and c.state == K.SUBSCRIBED and c.attempts == 2, states
    assert first.closed and len(second.out) > second.req  # subscribed over the new socket
    assert c.tag_status[("Asset 079", "Asdu_1_object_1001")] == "ok"
    assert c.values[("Asset 079", "Asdu_1_object_1001")].x == 7 and c.error is None


# -- the suite's seeded subset ---------------------------------------------------------------------

def _drop(*names):
    # the fuzz helpers and deflate go before the next test: the esp32 budget is tight
    for n in ("wsfuzz",) + names:
        sys.modules.pop(n, None)
    free("wspmd", *names)
    _collect()


def test_fuzz_tagvalue_client():
    _drop()
    _room_for_kics()
    r = fuzz_tagvalue_client(Rng(14006), 20 // SLOW)
    _drop("kics", "signalr")
    assert SLOW > 1 or (r["accepted"] and r["rejected"]), r
