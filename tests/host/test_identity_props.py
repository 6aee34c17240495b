"""Properties of device identity (firmware/microcot/identity.py) and of the AT driver reading the
ICCID from the emulated modem, checked with hypothesis on CPython."""

from __future__ import annotations

import contextlib
import string

from hypothesis import assume, given
from hypothesis import strategies as st

from microcot import atmodem, identity
from microcot_host.vboard.modem import ModemEmulator, ef_iccid_hex


def reference_check_digit(payload: str) -> str:
    # written independently of the firmware: double every second digit from the right of the
    # full number (check digit included), via the digit-sum table
    table = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]
    for check in "0123456789":
        number = payload + check
        total = sum(
            table[int(d)] if i % 2 else int(d) for i, d in enumerate(reversed(number))
        )
        if total % 10 == 0:
            return check
    raise AssertionError("unreachable")


payloads = st.integers(min_value=18, max_value=19).flatmap(
    lambda n: st.text(alphabet="0123456789", min_size=n, max_size=n)
)


@st.composite
def iccids(draw: st.DrawFn) -> str:
    payload = draw(payloads)
    return payload + reference_check_digit(payload)


spaces = st.text(alphabet=" \t\r\n", max_size=3)


@st.composite
def printed(draw: st.DrawFn, iccid: str) -> str:
    """One of the ways a modem prints the ICCID."""
    form = draw(st.sampled_from(["bare", "+CCID", "+QCCID", "+ICCID", "^ICCID", "#CCID", "crsm"]))
    if form == "crsm":
        data = ef_iccid_hex(iccid)
        data = draw(st.sampled_from([data, data.lower()]))
        sw = draw(st.sampled_from(["144,0", "145,2", "146,0"]))
        quote = draw(st.sampled_from(['"', ""]))
        return f"{draw(spaces)}+CRSM: {sw},{quote}{data}{quote}{draw(spaces)}"
    digits = iccid
    if len(iccid) == 19:
        digits += draw(st.sampled_from(["", "F", "f"]))
    if draw(st.booleans()):
        digits = f'"{digits}"'
    prefix = "" if form == "bare" else draw(st.sampled_from([form, form.lower()])) + ":"
    sep = draw(st.sampled_from(["", " ", "  "]))
    return f"{draw(spaces)}{prefix}{sep}{digits}{draw(spaces)}"


@given(payloads)
def test_check_digit_matches_reference(payload: str):
    assert identity.luhn_check_digit(payload) == reference_check_digit(payload)
    assert identity.luhn_ok(payload + reference_check_digit(payload))


@given(st.data())
def test_normalize_accepts_every_printed_form(data: st.DataObject):
    iccid = data.draw(iccids())
    raw = data.draw(printed(iccid))
    assert identity.normalize_iccid(raw) == iccid
    assert identity.normalize_iccid(raw.encode()) == iccid


@given(iccids(), st.data())
def test_any_single_digit_change_breaks_luhn(iccid: str, data: st.DataObject):
    pos = data.draw(st.integers(0, len(iccid) - 1))
    digit = data.draw(st.sampled_from("0123456789").filter(lambda d: d != iccid[pos]))
    changed = iccid[:pos] + digit + iccid[pos + 1:]
    assert not identity.luhn_ok(changed)
    try:
        identity.normalize_iccid(changed)
    except ValueError as exc:
        assert "Luhn" in str(exc) and f"should be {identity.luhn_check_digit(changed[:-1])}" in str(exc)
    else:
        raise AssertionError(f"{changed} accepted")


@given(st.one_of(st.text(), st.text(alphabet=string.digits + "Ff+:^#\",CRSMQIDcrsm \r\n", max_size=60)))
def test_garbage_only_raises_value_error(raw: str):
    try:
        out = identity.normalize_iccid(raw)
    except ValueError as exc:
        assert str(exc).startswith("ICCID")
    else:
        assert 19 <= len(out) <= 20 and out.isascii() and identity.luhn_ok(out)


@given(st.binary(max_size=60))
def test_garbage_bytes_only_raise_value_error(raw: bytes):
    with contextlib.suppress(ValueError):
        identity.normalize_iccid(raw)


@given(st.binary(min_size=6, max_size=6))
def test_mac_id_roundtrip(mac: bytes):
    assume(mac not in (bytes(6), b"\xff" * 6))
    text = identity.mac_id(mac)
    assert len(text) == 12 and text == text.upper() and bytes.fromhex(text) == mac


@given(st.binary(max_size=10).filter(lambda b: len(b) != 6))
def test_mac_id_wrong_length(mac: bytes):
    try:
        identity.mac_id(mac)
    except ValueError as exc:
        assert "6 bytes" in str(exc)
    else:
        raise AssertionError("accepted")


class EmulatedStream:
    """The emulated modem as a non-pollable in-memory stream that hands out its answer in the
    chunk sizes hypothesis picks, with unsolicited result codes mixed in between lines."""

    def __init__(self, emu: ModemEmulator, chunks: list[int], urcs: list[str]) -> None:
        self.emu = emu
        self.chunks = chunks or [64]
        self.urcs = urcs
        self.rx = b""
        self.i = 0

    def write(self, data: bytes) -> int:
        out = self.emu.feed(bytes(data))
        if self.urcs and out:
            # a URC lands between the echo and the answer
            cut = out.find(b"\r\n")
            urc = self.emu.unsolicited(self.urcs[len(self.emu.commands) % len(self.urcs)])
            out = out[:cut] + urc + out[cut:] if cut >= 0 else out + urc
        self.rx += out
        return len(data)

    def read(self, n: int) -> bytes | None:
        if not self.rx:
            return None
        k = min(n, self.chunks[self.i % len(self.chunks)])
        self.i += 1
        out, self.rx = self.rx[:k], self.rx[k:]
        return out


urc_lines = st.lists(st.sampled_from(["+CREG: 1", "RING", "+CEREG: 5,\"1A2B\"", "^SYSSTART", "RDY"]),
                     max_size=3)


@given(
    iccids(),
    st.sampled_from(["+CCID", "+QCCID", "+ICCID", "+CRSM"]),
    st.booleans(),
    st.lists(st.integers(1, 17), max_size=5),
    urc_lines,
)
def test_driver_reads_iccid_from_emulator(iccid, supported, echo, chunks, urcs):
    emu = ModemEmulator(iccid, echo=echo, supported={supported})
    modem = atmodem.AtModem(EmulatedStream(emu, chunks, urcs), timeout_ms=500)
    assert modem.iccid() == iccid
    cmd = "AT+CRSM=176,12258,0,0,10" if supported == "+CRSM" else "AT" + supported
    assert len(modem.command(cmd)) == 1  # the URCs are not taken for info lines
    assert identity.device_id(modem, b"\x02\x00\x00\x00\x00\x01") == iccid
