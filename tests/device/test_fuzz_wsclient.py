# Seeded fuzz of the WebSocket driver (issue 14): microcot.ws.WebSocketClient fed hostile bytes
# through a fake socket (wsfake.py) must end in a documented state, execute() never raising.
# fuzz_ws_client(rng, n) returns {"inputs", "accepted", "rejected"} (accepted: the connection
# goes on or ends cleanly); tools/fuzz.py runs the big counts. Also the cases at the driver
# level: protocol errors, handler exceptions, a hostile header, tls={}. The KICS client's are in
# test_fuzz_kicsclient.py.
import gc
import sys

import wsfake
from dt import Rng, free

from microcot import ws as W
from microcot import wsframe as F

H = bytes.fromhex
SLOW = 10 if sys.platform == "rp2" else 1  # as wsfuzz.SLOW (not imported here: heap)

# -- the drivers through a fake socket --------------------------------------------------------

# where a connection fed hostile bytes may end (the module docstring of microcot.ws)
WS_END_STATES = (F.WS_STATUS_SOCK_NOMEM, F.WS_STATUS_SUCCESS, F.WS_STATUS_SOCK_NO_CONN,
                 F.WS_STATUS_SOCK_CONN_LOST,
                 F.WS_STATUS_FINALIZE_DISCONNECT, F.WS_STATUS_PROTOCOL_ERROR,
                 F.WS_STATUS_INVALID_MSG_SIZE, F.WS_STATUS_DECOMPRESS_ERROR,
                 F.WS_STATUS_NOMEMORY, F.WS_STATUS_INTERNAL_ERROR)


class _Client(W.WebSocketClient):
    raise_on = -1

    def on_message(self, content, content_type):
        self.got += 1
        if self.got == self.raise_on:
            raise ValueError("handler bug")
        return W.S_OK


def run_ws(chunks, raise_on=-1, cycles=60, **kw):
    """A client through wsfake: connect, execute until it ends; the client."""
    sock = wsfake.Sock(chunks)
    kw.setdefault("keep_alive", False)
    c = _Client("fuzz.invalid", 80, "/", **kw)
    c.got = 0
    c.raise_on = raise_on
    _collect()
    with wsfake.Patched(sock):
        if not c.connect():  # only a heap too small may refuse (the documented SOCK_NOMEM)
            assert c.state == F.WS_STATUS_SOCK_NOMEM, (c.state, c.error_msg)
        for _ in range(cycles):
            c.execute(0)
            if not c.active:
                break
    c.sock = sock
    return c


def fuzz_ws_client(rng, n, deflate=True):
    # deflate: offer permessage-deflate every third connection (its module and inflate window
    # are more than the esp32-generic model's heap leaves beside the test modules)
    from wsfuzz import _FRAME_TOKENS, _count, _frame_seeds, _pick, mutate

    pmd = False
    if deflate:
        from microcot import wspmd

        pmd = wspmd.inflate_available()
    seeds = _frame_seeds()
    accepted = 0
    F.mask_variant()  # the viper loops compiled before the heap is cut up by the inputs
    F.utf8_variant()
    for i in range(n):
        _collect()
        data = b"".join(mutate(rng, _pick(rng, seeds), seeds, _FRAME_TOKENS)
                        for _ in range(1 + rng.below(4)))
        cuts = []
        j = 0
        while j < len(data):
            k = 1 + rng.below(len(data) - j)
            cuts.append(data[j:j + k])
            j += k
        c = run_ws(cuts, raise_on=1 if i % 9 == 4 else -1,
                   max_recv_frame_size=_pick(rng, (125, 4096)), max_recv_msg_size=8192,
                   per_message_deflate=bool(i % 3 == 0) and pmd)
        assert c.state in WS_END_STATES, (c.state, c.error_msg)
        assert "internal error" not in c.error_msg, c.error_msg  # an undocumented exception
        assert not c.active or c.state == F.WS_STATUS_SUCCESS
        if c.state == F.WS_STATUS_SOCK_NOMEM:  # a heap too small to connect: documented too
            pass
        elif c.error and c.state != F.WS_STATUS_SOCK_CONN_LOST:  # EOF after the script: fine
            assert c.close_reason in (1002, 1007, 1009, 1011), c.close_reason
        else:
            accepted += 1
        c = None  # one client at a time on a small heap
    return _count(n, accepted)


# -- the cases at the driver level ---------------------------------------------------

def _collect():
    # a board's heap is small and fragments; CPython's collector would only cost time here
    if sys.implementation.name == "micropython":
        gc.collect()


def test_ws_protocol_errors_close_with_their_code_and_status():
    for data, code, st in (
            (H("818548656c6c6f00000000"), 1002, F.WS_STATUS_PROTOCOL_ERROR),  # masked
            (H("8102c0af"), 1007, F.WS_STATUS_PROTOCOL_ERROR),  # invalid UTF-8
            (H("827f0000000000100000"), 1009, F.WS_STATUS_INVALID_MSG_SIZE),  # 1 MiB frame
            (H("c103ffffff"), 1002, F.WS_STATUS_PROTOCOL_ERROR)):  # RSV1 without deflate
        c = run_ws([data])
        assert (c.close_reason, c.state, c.error) == (code, st, True), (data, c.error_msg)
        out = bytearray(c.sock.out[-8:])  # our masked Close frame went out last
        assert out[0] == 0x88 and out[1] == 0x82, bytes(out)
        F.mask(out, 6, 8, out[2:6])
        assert out[6:] == F.close_payload(code)


def test_ws_handler_exception_closes_1011_and_execute_goes_on():
    # issue 14: ws.execute re-raised handler exceptions, so one record could end the app's loop
    c = run_ws(wsfake.frames([b"one", b"two"]), raise_on=1)
    assert c.state == F.WS_STATUS_INTERNAL_ERROR and c.close_reason == 1011 and c.error
    assert isinstance(c.handler_error, ValueError) and "handler bug" in c.error_msg
    assert c.got == 1 and not c.active


def test_check_protocol_raising_fails_the_connect_without_an_exception():
    class Picky(W.WebSocketClient):
        def check_protocol(self, protocol):
            raise KeyError("handler bug")

    c = Picky("fuzz.invalid", 80, "/", keep_alive=False)
    with wsfake.Patched(wsfake.Sock([])):  # the answer is there at once: checked in connect()
        ok = c.connect()
        c.execute(0)
    assert not ok and not c.active and c.state == F.WS_STATUS_INTERNAL_ERROR, (ok, c.state)
    assert isinstance(c.handler_error, KeyError) and "handler bug" in c.error_msg


def test_ws_hostile_header_then_silence_costs_little():
    # a server declaring 64 KiB (within the default limit) and sending 4 bytes of it
    c = run_ws([H("827f0000000000010000") + b"abcd"], cycles=5)
    assert len(c._reader.buf) <= 256


def test_tls_empty_dict_never_sends_plaintext():
    # issue 14: WebSocketClient(tls={}) spoke plaintext, Authorization header included
    sock = wsfake.Sock([])
    c = W.WebSocketClient("fuzz.invalid", 8080, "/", tls={},
                          headers={"Authorization": "Bearer secret"})
    with wsfake.Patched(sock):
        c.connect()
        for _ in range(5):
            c.execute(0)
    assert b"secret" not in sock.out and b"GET " not in sock.out, bytes(sock.out[:60])
    assert c._c is None or c._c.tls is not None
    free("wstls")


# -- the suite's seeded subset ---------------------------------------------------------------------

def _drop(*names):
    # the fuzz helpers and deflate go before the next test: the esp32 budget is tight
    for n in ("wsfuzz",) + names:
        sys.modules.pop(n, None)
    free("wspmd", *names)
    _collect()


def test_fuzz_ws_client():
    _collect()
    small = hasattr(gc, "mem_free") and gc.mem_free() < 60000
    r = fuzz_ws_client(Rng(14005), 40 // SLOW, not small)
    _drop()
    assert SLOW > 1 or (r["accepted"] and r["rejected"]), r
