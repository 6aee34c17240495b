# Device identity (DESIGN.md "identity.py", seed 002): the ID is the SIM's ICCID read from the
# modem, else the MAC of the network interface (12 upper-case hex digits), else a configured value.
# The ID becomes the MQTT user name and part of every topic (ms/<ID>, sr/<ID>), so whatever is
# returned here must be validated: a mis-read ICCID would register a device nobody can find.


class IdentityError(ValueError):
    """No usable device ID: the message lists why each source was rejected."""


def luhn_ok(digits):
    """True when the string of decimal digits passes the Luhn check (last digit = check digit)."""
    if not _ascii_digits(digits):
        return False
    return _luhn_sum(digits, False) % 10 == 0


def luhn_check_digit(payload):
    """The Luhn check digit (a str of one digit) to append to the digit string `payload`."""
    if not _ascii_digits(payload):
        raise ValueError("Luhn payload must be decimal digits, got %r" % (payload,))
    return str((10 - _luhn_sum(payload, True) % 10) % 10)


def _ascii_digits(s):
    # str.isdigit() also accepts other scripts' digits on CPython; an ICCID is ASCII only
    if not isinstance(s, str) or not s:
        return False
    return all("0" <= c <= "9" for c in s)


def _luhn_sum(digits, double_last):
    # From the right, every second digit is doubled; the check digit itself is not, so when the
    # payload is given without it the doubling starts at its last digit.
    total = 0
    dbl = double_last
    for i in range(len(digits) - 1, -1, -1):
        d = ord(digits[i]) - 48
        if dbl:
            d *= 2
            if d > 9:
                d -= 9
        total += d
        dbl = not dbl
    return total


def swap_nibbles(hexstr):
    """EF_ICCID is BCD with the nibbles of every byte swapped: '98940200...' -> '89492000...'."""
    out = []
    for i in range(0, len(hexstr) - 1, 2):
        out.append(hexstr[i + 1])
        out.append(hexstr[i])
    return "".join(out)


# Success status words of a SIM command: 0x90 (normal), 0x91/0x92 (normal with extra information).
_SW1_OK = (144, 145, 146)


def _from_crsm(body):
    # body is what follows "+CRSM:", e.g. ' 144,0,"98940200001234567894"'
    parts = body.split(",")
    if len(parts) < 2:
        raise ValueError("ICCID: +CRSM answer %r lacks the status words" % body.strip())
    try:
        sw1 = int(parts[0])
        sw2 = int(parts[1])
    except ValueError:
        raise ValueError("ICCID: +CRSM status words %r are not numbers" % ",".join(parts[:2]).strip())
    if sw1 not in _SW1_OK:
        raise ValueError("ICCID: SIM refused to read EF_ICCID (+CRSM status %d,%d)" % (sw1, sw2))
    if len(parts) < 3:
        raise ValueError("ICCID: +CRSM answer has no data")
    data = parts[2].strip().strip('"').strip()
    if len(data) % 2:
        raise ValueError("ICCID: +CRSM data %r has an odd number of hex digits" % data)
    for i in range(len(data)):
        if data[i] not in "0123456789abcdefABCDEF":
            raise ValueError("ICCID: +CRSM data has a non-hex character %r at position %d" % (data[i], i))
    return swap_nibbles(data)


def normalize_iccid(raw):
    """The ICCID digits from what a modem prints; ValueError naming the problem otherwise.

    Accepts '+CCID: 8949...', '+QCCID: ...', '+ICCID: ...', '^ICCID: ...', '#CCID: ...', bare
    digits, quotes and surrounding whitespace, a trailing F padding nibble, and the answer to
    AT+CRSM=176,12258,0,0,10 ('+CRSM: 144,0,"98...F"', nibble-swapped EF_ICCID).
    """
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode()
        except UnicodeError:
            raise ValueError("ICCID: modem output is not text")
    if not isinstance(raw, str):
        raise ValueError("ICCID: expected a string, got %s" % type(raw).__name__)
    s = raw.strip()
    colon = s.find(":")
    if colon >= 0:
        prefix = s[:colon].strip().upper()
        s = s[colon + 1:]
        if prefix == "+CRSM":
            s = _from_crsm(s)
        elif not (prefix[:1] in "+^#$%" and prefix.endswith("CCID") and prefix[1:].isalpha()):
            raise ValueError("ICCID: unexpected prefix %r" % raw.strip()[:colon])
    s = s.strip().strip('"').strip()
    # a 19-digit ICCID fills its 10-byte EF with one F nibble; some modems print it
    while s and s[-1] in "Ff":
        s = s[:-1]
    if not s:
        raise ValueError("ICCID: empty")
    for i in range(len(s)):
        if not ("0" <= s[i] <= "9"):
            raise ValueError("ICCID: non-digit %r at position %d" % (s[i], i))
    if not 19 <= len(s) <= 20:
        raise ValueError("ICCID: must have 19 or 20 digits, got %d" % len(s))
    if not luhn_ok(s):
        raise ValueError(
            "ICCID: Luhn check failed, last digit is %s but should be %s"
            % (s[-1], luhn_check_digit(s[:-1]))
        )
    return s


def mac_id(mac_bytes):
    """The MAC as 12 upper-case hex digits (seed 002: the ID of devices without a SIM)."""
    if not isinstance(mac_bytes, (bytes, bytearray, memoryview)):
        raise ValueError("MAC: expected 6 bytes, got %s" % type(mac_bytes).__name__)
    if len(mac_bytes) != 6:
        raise ValueError("MAC: expected 6 bytes, got %d" % len(mac_bytes))
    b = bytes(mac_bytes)
    # an interface that is not initialised reports zeros; neither value identifies a device
    if b == b"\x00\x00\x00\x00\x00\x00" or b == b"\xff\xff\xff\xff\xff\xff":
        raise ValueError("MAC: %s is not a device address" % ("all zeros" if b[0] == 0 else "broadcast"))
    return "%02X%02X%02X%02X%02X%02X" % (b[0], b[1], b[2], b[3], b[4], b[5])


# characters that would break an MQTT topic level, a SmartREST CSV field or the user name
_BAD_ID_CHARS = '/+#,"\\'


def check_configured(value):
    """A configured ID, validated for use as MQTT user name and topic level; ValueError if not."""
    if not isinstance(value, str):
        raise ValueError("configured ID: expected a string, got %s" % type(value).__name__)
    if not 1 <= len(value) <= 64:
        raise ValueError("configured ID: must have 1 to 64 characters, got %d" % len(value))
    for i in range(len(value)):
        c = value[i]
        if c <= " " or c > "~" or c in _BAD_ID_CHARS:
            raise ValueError("configured ID: character %r at position %d is not allowed" % (c, i))
    return value


def device_id_source(modem=None, mac=None, configured=None):
    """(ID, source) with source 'iccid', 'mac' or 'configured', tried in that order.

    modem: an object with iccid() (atmodem.AtModem) or the modem's printed ICCID as a string.
    mac: the 6 MAC bytes. configured: a string from the configuration.
    A source that is present but unusable (no SIM, bad Luhn, zero MAC) is skipped; when none is
    usable, IdentityError lists the reason for each.
    """
    why = []
    if modem is None:
        why.append("iccid: no modem")
    else:
        try:
            raw = modem if isinstance(modem, (str, bytes)) else modem.iccid()
            return normalize_iccid(raw), "iccid"
        except Exception as exc:  # a modem fault must not stop the fallback to the MAC
            why.append("iccid: %s" % (exc,))
    if mac is None:
        why.append("mac: none")
    else:
        try:
            return mac_id(mac), "mac"
        except ValueError as exc:
            why.append(str(exc))
    if configured is None:
        why.append("configured: none")
    else:
        try:
            return check_configured(configured), "configured"
        except ValueError as exc:
            why.append(str(exc))
    raise IdentityError("no device ID (%s)" % "; ".join(why))


def device_id(modem=None, mac=None, configured=None):
    """The device ID string; see device_id_source for the order and the errors."""
    return device_id_source(modem, mac, configured)[0]


def detect(configured=None, timeout_ms=2000):
    """(ID, source) from this board's hardware via hal: its modem, its MAC, then `configured`
    (default: "device_id" from /board.json)."""
    from . import hal

    if configured is None:
        configured = hal.config().get("device_id")
    modem = None
    stream = None
    try:
        stream = hal.modem_uart()
    except Exception:  # an absent or busy UART means "no modem" here, not a crash at boot
        stream = None
    if stream is not None:
        from .atmodem import AtModem

        modem = AtModem(stream, timeout_ms=timeout_ms)
    try:
        try:
            mac = hal.mac()
        except Exception:
            mac = None
        return device_id_source(modem, mac, configured)
    finally:
        if stream is not None and hasattr(stream, "close"):
            try:
                stream.close()
            except OSError:
                pass
