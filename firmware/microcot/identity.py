# Device identity (DESIGN.md "identity.py", seed 002): the ID is the SIM's ICCID read from the
# modem, else the MAC of the network interface (12 upper-case hex digits), else a configured value.
# The ID becomes the MQTT user name and part of every topic (ms/<ID>, sr/<ID>), so whatever is
# returned here must be validated: a mis-read ICCID would register a device nobody can find.

from .iccid import luhn_check_digit, luhn_ok, normalize_iccid, swap_nibbles  # noqa: F401 (its API)


class IdentityError(ValueError):
    """No usable device ID: the message lists why each source was rejected."""


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
