# Device identity and the AT driver: runs on CPython (pytest) and on a board / the unix port.
from dt import Rng, raises

from microcot import atmodem, identity

# Luhn-valid ICCIDs: 19 and 20 digits (89014103211118510720 is a published example ICCID)
ICCID20 = "89490200001234567892"
ICCID19 = "8949020000123456788"
ICCID_ATT = "89014103211118510720"


def swapped(iccid):
    """EF_ICCID as AT+CRSM prints it: F padded to 20 nibbles, nibbles of each byte swapped."""
    s = iccid + "F" * (20 - len(iccid))
    return "".join(s[i + 1] + s[i] for i in range(0, 20, 2))


# -- Luhn ------------------------------------------------------------------------------------------


def test_luhn_vectors():
    assert identity.luhn_ok(ICCID20)
    assert identity.luhn_ok(ICCID19)
    assert identity.luhn_ok(ICCID_ATT)
    assert identity.luhn_ok("79927398713")  # the classic Luhn example
    assert not identity.luhn_ok("79927398710")
    assert not identity.luhn_ok("89490200001234567890")
    assert not identity.luhn_ok("")
    assert not identity.luhn_ok("8949x")
    assert not identity.luhn_ok(None)


def test_luhn_check_digit():
    assert identity.luhn_check_digit("7992739871") == "3"
    assert identity.luhn_check_digit(ICCID20[:-1]) == ICCID20[-1]
    assert identity.luhn_check_digit(ICCID19[:-1]) == ICCID19[-1]
    raises(ValueError, identity.luhn_check_digit, "12a")


def test_any_single_digit_change_breaks_luhn():
    for iccid in (ICCID20, ICCID19):
        for pos in range(len(iccid)):
            for d in "0123456789":
                if d != iccid[pos]:
                    assert not identity.luhn_ok(iccid[:pos] + d + iccid[pos + 1:]), (pos, d)


def test_random_payloads_with_check_digit_pass():
    rng = Rng(7)
    for _ in range(50):
        n = 18 + rng.below(2)
        payload = "89" + "".join(str(rng.below(10)) for _ in range(n - 2))
        iccid = payload + identity.luhn_check_digit(payload)
        assert identity.luhn_ok(iccid)
        assert identity.normalize_iccid("+CRSM: 144,0,\"%s\"" % swapped(iccid)) == iccid


# -- normalize_iccid -------------------------------------------------------------------------------


def test_normalize_printed_forms():
    for raw in (
        ICCID20,
        "+CCID: " + ICCID20,
        "+CCID:" + ICCID20,
        "+QCCID: " + ICCID20,
        "+ICCID: " + ICCID20,
        "^ICCID: " + ICCID20,
        "#CCID: " + ICCID20,
        '+CCID: "%s"' % ICCID20,
        '  "%s"\r\n' % ICCID20,
        "+ccid: " + ICCID20,
    ):
        assert identity.normalize_iccid(raw) == ICCID20, raw
    assert identity.normalize_iccid(ICCID20.encode()) == ICCID20


def test_normalize_19_digits_with_padding():
    assert identity.normalize_iccid(ICCID19) == ICCID19
    assert identity.normalize_iccid(ICCID19 + "F") == ICCID19
    assert identity.normalize_iccid("+QCCID: " + ICCID19 + "f") == ICCID19
    assert identity.normalize_iccid('^ICCID: "%sF"' % ICCID19) == ICCID19


def test_normalize_crsm():
    assert swapped(ICCID20) == "98942000002143658729"
    assert identity.normalize_iccid('+CRSM: 144,0,"98942000002143658729"') == ICCID20
    assert identity.normalize_iccid('+CRSM: 144,0,"%s"' % swapped(ICCID19)) == ICCID19
    assert swapped(ICCID19).endswith("F8")
    assert identity.normalize_iccid('+CRSM: 144,0,"%s"' % swapped(ICCID19).lower()) == ICCID19
    assert identity.normalize_iccid("+CRSM: 145,2,%s" % swapped(ICCID_ATT)) == ICCID_ATT


def test_normalize_errors_name_the_problem():
    e = raises(ValueError, identity.normalize_iccid, "8949020000123X567892")
    assert "non-digit" in str(e) and "'X'" in str(e) and "13" in str(e)
    e = raises(ValueError, identity.normalize_iccid, "894902000012345678")
    assert "19 or 20" in str(e) and "18" in str(e)
    e = raises(ValueError, identity.normalize_iccid, "894902000012345678921")
    assert "21" in str(e)
    e = raises(ValueError, identity.normalize_iccid, "89490200001234567890")
    assert "Luhn" in str(e) and "should be 2" in str(e)
    e = raises(ValueError, identity.normalize_iccid, "")
    assert "empty" in str(e)
    e = raises(ValueError, identity.normalize_iccid, "+CIMI: " + ICCID20)
    assert "prefix" in str(e)
    e = raises(ValueError, identity.normalize_iccid, "+CRSM: 148,4")
    assert "148,4" in str(e)
    e = raises(ValueError, identity.normalize_iccid, '+CRSM: 144,0,"9894200"')
    assert "odd" in str(e)
    e = raises(ValueError, identity.normalize_iccid, '+CRSM: 144,0,"98942000002143658G29"')
    assert "non-hex" in str(e)
    raises(ValueError, identity.normalize_iccid, "+CRSM: x,0,\"00\"")
    raises(ValueError, identity.normalize_iccid, None)
    raises(ValueError, identity.normalize_iccid, b"\xff\xfe")


def test_normalize_garbage_only_raises_value_error():
    rng = Rng(99)
    alphabet = '0123456789Ff+:^"CRSMID, \r\n'
    for _ in range(300):
        s = "".join(alphabet[rng.below(len(alphabet))] for _ in range(rng.below(40)))
        try:
            identity.normalize_iccid(s)
        except ValueError:
            pass


# -- MAC -------------------------------------------------------------------------------------------


def test_mac_id():
    assert identity.mac_id(b"\x0a\x1b\x2c\x3d\x4e\x5f") == "0A1B2C3D4E5F"
    assert identity.mac_id(bytearray(b"\xde\xad\xbe\xef\x00\x01")) == "DEADBEEF0001"
    e = raises(ValueError, identity.mac_id, b"\x01\x02\x03\x04\x05")
    assert "6 bytes" in str(e) and "5" in str(e)
    raises(ValueError, identity.mac_id, b"\x01" * 7)
    raises(ValueError, identity.mac_id, "0A1B2C3D4E5F")
    raises(ValueError, identity.mac_id, bytes(6))
    raises(ValueError, identity.mac_id, b"\xff" * 6)


# -- device_id -------------------------------------------------------------------------------------

MAC = b"\x24\x0a\xc4\x12\x34\x56"


class _Modem:
    def __init__(self, result):
        self.result = result

    def iccid(self):
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_device_id_order():
    assert identity.device_id_source(_Modem(ICCID20), MAC, "cfg") == (ICCID20, "iccid")
    assert identity.device_id("+CCID: " + ICCID19, MAC, "cfg") == ICCID19
    err = atmodem.ModemError("AT+CCID", "+CME ERROR: 10 (SIM not inserted)", 10)
    assert identity.device_id_source(_Modem(err), MAC, "cfg") == ("240AC4123456", "mac")
    assert identity.device_id_source(_Modem("89490200001234567890"), MAC) == ("240AC4123456", "mac")
    assert identity.device_id_source(None, None, "plant-7") == ("plant-7", "configured")
    assert identity.device_id_source(None, bytes(6), "plant-7") == ("plant-7", "configured")
    assert identity.device_id(None, MAC) == "240AC4123456"


def test_device_id_none_available():
    e = raises(identity.IdentityError, identity.device_id)
    assert isinstance(e, ValueError)
    assert "no modem" in str(e) and "mac" in str(e) and "configured" in str(e)
    err = atmodem.ModemError("AT+CCID", "+CME ERROR: 10 (SIM not inserted)", 10)
    e = raises(identity.IdentityError, identity.device_id, _Modem(err), bytes(6), "a/b")
    assert "SIM not inserted" in str(e) and "zeros" in str(e) and "'/'" in str(e)


def test_configured_id_checks():
    assert identity.check_configured("dev_01-A.b") == "dev_01-A.b"
    for bad in ("", "x" * 65, "a b", "a+b", "a#b", "a,b", 'a"b', "ä", 5):
        raises(ValueError, identity.check_configured, bad)


# -- AT driver -------------------------------------------------------------------------------------


class FakeUart:
    """A scripted modem behind a non-pollable stream: answers[cmd] is the framed answer (bytes),
    None for silence; unknown commands get ERROR. chunk limits how much one read returns."""

    def __init__(self, answers, echo=True, chunk=64, pending=b""):
        self.answers = answers
        self.echo = echo
        self.chunk = chunk
        self.rx = bytes(pending)
        self.tx = b""
        self.sent = []

    def write(self, data):
        self.tx += bytes(data)
        while b"\r" in self.tx:
            i = self.tx.find(b"\r")
            line = self.tx[:i].decode()
            self.tx = self.tx[i + 1:]
            self.sent.append(line)
            if self.echo:
                self.rx += line.encode() + b"\r"
            ans = self.answers.get(line, b"\r\nERROR\r\n")
            if ans is not None:
                self.rx += ans
        return len(data)

    def read(self, n):
        if not self.rx:
            return None
        k = min(n, self.chunk, len(self.rx))
        out = self.rx[:k]
        self.rx = self.rx[k:]
        return out


def ok(*lines):
    return b"".join(b"\r\n" + ln.encode() + b"\r\n" for ln in lines) + b"\r\nOK\r\n"


def test_command_returns_info_lines_without_echo():
    u = FakeUart({"ATI": ok("Quectel", "EC21", "Revision: EC21EFAR06A01M4G")})
    m = atmodem.AtModem(u)
    assert m.command("ATI") == ["Quectel", "EC21", "Revision: EC21EFAR06A01M4G"]
    assert u.sent == ["ATI"]
    u.echo = False
    assert m.command("ATI") == ["Quectel", "EC21", "Revision: EC21EFAR06A01M4G"]


def test_command_byte_at_a_time():
    u = FakeUart({"AT+CIMI": ok("262011234567890")}, chunk=1)
    assert atmodem.AtModem(u).command("AT+CIMI") == ["262011234567890"]


def test_command_skips_urcs_and_stale_input():
    ans = (b"\r\n+CREG: 1\r\nRING\r\n+PBREADY\r\n\r\n+CCID: " + ICCID20.encode()
           + b"\r\n^SYSSTART\r\n^SYSSTART: x\r\nCall Ready\r\n\r\nOK\r\n")
    u = FakeUart({"AT+CCID": ans}, pending=b"\r\nOK\r\n+CPIN: READY\r\n")
    assert atmodem.AtModem(u).command("AT+CCID") == ["+CCID: " + ICCID20]


def test_command_errors():
    u = FakeUart({"AT+CCID": b"\r\n+CME ERROR: 10\r\n", "AT+X": b"\r\n+CMS ERROR: 500\r\n"})
    m = atmodem.AtModem(u)
    e = raises(atmodem.ModemError, m.command, "AT+FOO")
    assert e.cmd == "AT+FOO" and e.answer == "ERROR" and "AT+FOO" in str(e)
    e = raises(atmodem.ModemError, m.command, "AT+CCID")
    assert e.code == 10 and "SIM not inserted" in str(e) and "AT+CCID" in str(e)
    e = raises(atmodem.ModemError, m.command, "AT+X")
    assert e.code == 500
    raises(ValueError, m.command, "AT\rAT")


def test_command_timeout():
    u = FakeUart({"AT": None})
    m = atmodem.AtModem(u, timeout_ms=40)
    e = raises(atmodem.ModemTimeout, m.command, "AT")
    assert isinstance(e, atmodem.ModemError) and "40 ms" in str(e) and e.cmd == "AT"
    # an answer that never finishes is a timeout too, not an endless wait
    u.answers["AT+CCID"] = b"\r\n+CCID: 8949"
    raises(atmodem.ModemTimeout, m.command, "AT+CCID", 30)


def test_line_buffer_is_bounded():
    u = FakeUart({"ATI": ok("x" * 300), "AT": ok()})
    m = atmodem.AtModem(u, timeout_ms=200)
    e = raises(atmodem.ModemError, m.command, "ATI")
    assert "longer than 256" in str(e)
    assert m.command("AT") == []  # the rest of the long answer does not confuse the next command
    assert len(m._line) == 256


def test_garbage_bytes_do_not_crash():
    u = FakeUart({"ATI": b"\r\n\xff\xfeabc\r\n\r\nOK\r\n"})
    assert atmodem.AtModem(u).command("ATI") == ["??abc"]


ICCID_CMDS = ("AT+CCID", "AT+QCCID", "AT+ICCID", "AT+CRSM=176,12258,0,0,10")


def sim_answers(iccid, only):
    a = {
        "AT+CCID": ok("+CCID: " + iccid),
        "AT+QCCID": ok("+QCCID: " + iccid),
        "AT+ICCID": ok("+ICCID: " + iccid),
        "AT+CRSM=176,12258,0,0,10": ok('+CRSM: 144,0,"%s"' % swapped(iccid)),
    }
    return {k: v for k, v in a.items() if k in only}


def test_iccid_each_command():
    for i in range(4):
        for iccid in (ICCID20, ICCID19):
            u = FakeUart(sim_answers(iccid, ICCID_CMDS[i:i + 1]))
            assert atmodem.AtModem(u).iccid() == iccid
            assert u.sent == list(ICCID_CMDS[: i + 1])


def test_iccid_bare_digits_and_bad_luhn_fallback():
    u = FakeUart({"AT+CCID": ok(ICCID20)})
    assert atmodem.AtModem(u).iccid() == ICCID20
    u = FakeUart({"AT+CCID": ok("+CCID: 89490200001234567890"),
                  "AT+CRSM=176,12258,0,0,10": ok('+CRSM: 144,0,"%s"' % swapped(ICCID19))})
    assert atmodem.AtModem(u).iccid() == ICCID19


def test_iccid_failures():
    u = FakeUart({"AT+CCID": b"\r\n+CME ERROR: 10\r\n"})
    e = raises(atmodem.ModemError, atmodem.AtModem(u).iccid)
    assert e.code == 10 and u.sent == ["AT+CCID"]
    u = FakeUart({"AT+CCID": ok("+CCID: 1234"), "AT+CRSM=176,12258,0,0,10": ok("+CRSM: 106,130")})
    e = raises(atmodem.ModemError, atmodem.AtModem(u).iccid)
    msg = str(e)
    assert "AT+CCID" in msg and "19 or 20" in msg and "AT+QCCID" in msg and "106,130" in msg
    u = FakeUart({"AT+CCID": None})
    raises(atmodem.ModemTimeout, atmodem.AtModem(u, timeout_ms=30).iccid)
    assert u.sent == ["AT+CCID"]


def test_imsi():
    assert atmodem.AtModem(FakeUart({"AT+CIMI": ok("262011234567890")})).imsi() == "262011234567890"
    assert atmodem.AtModem(FakeUart({"AT+CIMI": b"\r\n+CME ERROR: 10\r\n"})).imsi() is None
    assert atmodem.AtModem(FakeUart({"AT+CIMI": ok("")})).imsi() is None


def test_ping():
    assert atmodem.AtModem(FakeUart({"AT": ok()})).ping()
    assert not atmodem.AtModem(FakeUart({"AT": None}), timeout_ms=20).ping(20)


def test_detect_uses_hal():
    from microcot import hal

    saved = (hal.modem_uart, hal.mac, hal.config)
    try:
        hal.modem_uart = lambda: FakeUart(sim_answers(ICCID20, ("AT+QCCID",)))
        hal.mac = lambda: MAC
        hal.config = lambda reload=False: {}
        assert identity.detect() == (ICCID20, "iccid")
        hal.modem_uart = lambda: FakeUart({"AT+CCID": b"\r\n+CME ERROR: 10\r\n"})
        assert identity.detect() == ("240AC4123456", "mac")
        hal.modem_uart = lambda: None
        hal.mac = lambda: None
        hal.config = lambda reload=False: {"device_id": "cfg-1"}
        assert identity.detect() == ("cfg-1", "configured")
    finally:
        hal.modem_uart, hal.mac, hal.config = saved
