# ICCID rules (ITU-T E.118, seed 002): the Luhn check digit and reading an ICCID from what a
# modem prints. A module of its own so that both identity.py (which drives the modem) and
# atmodem.py (which asks the SIM) use them without importing each other.


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
