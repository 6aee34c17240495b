# A small AT command driver for the cellular modem, over any UART-like stream: machine.UART on a
# board, a pty file on the unix port, an in-memory fake in tests. It only needs write(bytes) and
# readinto(buf) or read(n); streams that select.poll accepts are waited on with poll, any other
# stream must return None/empty at once when it has nothing (then the driver sleeps briefly).
#
# What a response looks like: the echo of the command (if echo is on), info lines, then one final
# result code (OK, ERROR, +CME ERROR: n, +CMS ERROR: n, NO CARRIER, BUSY, NO ANSWER, NO DIALTONE).
# Lines end in CR and/or LF; empty lines are skipped. An unsolicited result code (URC) cannot be
# told apart from an answer by framing, so the driver attributes by prefix: a line that starts
# with + ^ # $ or % belongs to the command only if its prefix (up to ':') names the command
# (AT+CSQ -> +CSQ:) or is one the caller accepts; any other prefixed line (+CREG: 1, ^SYSSTART),
# and the well-known bare URCs (RING, RDY, Call Ready, ...), are dropped. Other bare lines (the
# digits of AT+CIMI, ATI's text) are kept. Input waiting before a command is sent is discarded.
from . import hal

LINE_MAX = 256
_FINAL_ERRORS = ("ERROR", "NO CARRIER", "BUSY", "NO ANSWER", "NO DIALTONE")
_BARE_URCS = ("RING", "RDY", "APP RDY", "Call Ready", "SMS Ready", "PB DONE")
_URC_MARKS = "+^#$%"
# modems answer the ICCID query with one of these, whichever of the commands they implement
_ICCID_PREFIXES = ("+CCID", "+QCCID", "+ICCID", "^ICCID", "#CCID")
_CME = {3: "operation not allowed", 4: "operation not supported", 10: "SIM not inserted",
        13: "SIM failure", 14: "SIM busy", 15: "SIM wrong"}
# at most this many bytes of stale input are thrown away before a command, so a modem that
# chatters without pause cannot hold the driver forever
_DRAIN_MAX = 1024


class ModemError(Exception):
    """The modem refused a command or answered something unusable: .cmd, .answer, .code."""

    def __init__(self, cmd, answer, code=None):
        super().__init__("modem: %s -> %s" % (cmd, answer))
        self.cmd = cmd
        self.answer = answer
        self.code = code


class ModemTimeout(ModemError):
    """No final result code within the timeout."""


def _name(cmd):
    # "AT+CRSM=176,..." -> "+CRSM"; "ATI" -> "I"; the prefix of the command's own info lines
    c = cmd.upper()
    if c.startswith("AT"):
        c = c[2:]
    for i in range(len(c)):
        if c[i] in "=?":
            return c[:i]
    return c


def _text(buf, n):
    try:
        return bytes(buf[:n]).decode()
    except UnicodeError:
        # line noise (wrong baud rate) must not crash the driver; keep it readable in messages
        return "".join(chr(b) if 32 <= b < 127 else "?" for b in buf[:n])


class AtModem:
    def __init__(self, stream, timeout_ms=2000, line_max=LINE_MAX):
        self._s = stream
        self.timeout_ms = timeout_ms
        self._timeout = timeout_ms
        self._cmd = ""  # the command being answered, for error messages
        self._line = bytearray(line_max)
        self._n = 0
        self._skip = False  # inside an over-long line: discard up to its end
        self._rx = bytearray(64)
        self._rxi = 0
        self._rxn = 0
        self._one = bytearray(1)
        self._any = getattr(stream, "any", None)
        self._poll = None
        try:
            import select

            p = select.poll()
            p.register(stream, select.POLLIN)
            p.poll(0)
            self._poll = p
        except Exception:  # not pollable (a test fake): fall back to short sleeps
            self._poll = None

    def close(self):
        """Stop polling the stream (it stays open: the caller owns it)."""
        if self._poll is not None:
            try:
                self._poll.unregister(self._s)
            except Exception:
                pass
            self._poll = None

    # -- reading ---------------------------------------------------------------------------------

    def _readinto(self, buf):
        s = self._s
        if hasattr(s, "readinto"):
            return s.readinto(buf)
        data = s.read(len(buf))
        if not data:
            return data
        buf[: len(data)] = data
        return len(data)

    def _fill(self, wait_ms):
        """Read what has arrived into _rx, waiting up to wait_ms for the first byte; returns the
        number of bytes read."""
        self._rxi = self._rxn = 0
        rx = self._rx
        if self._poll is None:
            r = self._readinto(rx)
            if not r:
                if wait_ms > 0:
                    hal.sleep_ms(min(wait_ms, 5))
                return 0
            self._rxn = r
            return r
        ev = self._poll.poll(max(0, wait_ms))
        if not ev:
            return 0
        if self._any is not None:  # machine.UART: read exactly what is buffered
            k = min(self._any(), len(rx))
            if k <= 0:
                return 0
            r = self._readinto(memoryview(rx)[:k]) or 0
            self._rxn = r
            return r
        # A pty or file: a blocking read would wait until its buffer is full, so read a byte at
        # a time while poll says more is there.
        n = 0
        one = self._one
        while n < len(rx):
            try:
                r = self._readinto(one)
            except OSError as exc:
                raise ModemError(self._cmd, "stream error %s" % (exc,))
            if r is None:
                break
            if not r:  # poll said readable but there is nothing: end of file or hang-up
                if n == 0:
                    raise ModemError(self._cmd, "stream closed")
                break
            rx[n] = one[0]
            n += 1
            ev = self._poll.poll(0)
            if not ev or not ev[0][1] & 1:  # POLLIN is 1 on every port
                break
        self._rxn = n
        return n

    def _next_line(self, deadline, cmd):
        line = self._line
        while True:
            rx = self._rx
            while self._rxi < self._rxn:
                c = rx[self._rxi]
                self._rxi += 1
                if c == 13 or c == 10:
                    if self._skip:
                        self._skip = False
                    elif self._n:
                        n = self._n
                        self._n = 0
                        return _text(line, n)
                elif self._skip:
                    pass
                elif self._n < len(line):
                    line[self._n] = c
                    self._n += 1
                else:
                    self._n = 0
                    self._skip = True
                    raise ModemError(cmd, "a line longer than %d bytes" % len(line))
            left = hal.ticks_diff(deadline, hal.ticks_ms())
            if left <= 0:
                raise ModemTimeout(cmd, "no answer within %d ms" % self._timeout)
            self._fill(left)

    def _drain(self):
        self._n = 0
        self._skip = False
        self._rxi = self._rxn = 0
        dropped = 0
        while dropped < _DRAIN_MAX:
            got = self._fill(0)
            if not got:
                break
            dropped += got
        self._rxi = self._rxn = 0

    # -- commands --------------------------------------------------------------------------------

    def _write(self, data, deadline, cmd):
        mv = memoryview(data)
        while len(mv):
            try:
                n = self._s.write(mv)
            except OSError as exc:
                raise ModemError(cmd, "stream error %s" % (exc,))
            if n is None or n == 0:  # a non-blocking stream that is full
                if hal.ticks_diff(deadline, hal.ticks_ms()) <= 0:
                    raise ModemTimeout(cmd, "could not send within %d ms" % self._timeout)
                hal.sleep_ms(2)
                continue
            mv = mv[n:]

    def command(self, cmd, timeout_ms=None, prefix=None):
        """Send `cmd` (without CR) and return its info lines (list of str, without the echo,
        blank lines, URCs and the final OK). prefix: a str or tuple of info-line prefixes to accept
        besides the command's own name. Raises ModemError (refusal) or ModemTimeout."""
        if isinstance(cmd, (bytes, bytearray)):
            cmd = bytes(cmd).decode()
        if "\r" in cmd or "\n" in cmd:
            raise ValueError("AT command must be one line: %r" % cmd)
        self._timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        self._cmd = cmd
        accept = (_name(cmd),)
        if prefix:
            accept = accept + ((prefix,) if isinstance(prefix, str) else tuple(prefix))
        self._drain()
        deadline = hal.ticks_add(hal.ticks_ms(), self._timeout)
        self._write(cmd.encode() + b"\r", deadline, cmd)
        info = []
        while True:
            line = self._next_line(deadline, cmd).strip()
            if not line or line.upper() == cmd.upper():
                continue
            if line == "OK":
                return info
            if line in _FINAL_ERRORS:
                raise ModemError(cmd, line)
            if line.startswith("+CME ERROR") or line.startswith("+CMS ERROR"):
                raise self._cm_error(cmd, line)
            if line in _BARE_URCS:
                continue
            if line[0] in _URC_MARKS:
                colon = line.find(":")
                if (line[:colon] if colon > 0 else line).strip().upper() not in accept:
                    continue
            info.append(line)

    def _cm_error(self, cmd, line):
        arg = line[line.find(":") + 1:].strip() if ":" in line else ""
        code = None
        try:
            code = int(arg)
        except ValueError:
            pass
        meaning = _CME.get(code) if line.startswith("+CME") else None
        return ModemError(cmd, "%s (%s)" % (line, meaning) if meaning else line, code)

    def ping(self, timeout_ms=500):
        """True when the modem answers AT with OK."""
        try:
            self.command("AT", timeout_ms)
            return True
        except ModemError:
            return False

    def iccid(self, timeout_ms=None):
        """The SIM's ICCID, validated: AT+CCID, then AT+QCCID, AT+ICCID, then reading EF_ICCID
        with AT+CRSM. A modem that does not answer at all (ModemTimeout) or reports no SIM
        (+CME ERROR: 10) ends the search at once; otherwise ModemError lists every attempt."""
        from .iccid import normalize_iccid

        why = []
        for cmd in ("AT+CCID", "AT+QCCID", "AT+ICCID", "AT+CRSM=176,12258,0,0,10"):
            try:
                lines = self.command(cmd, timeout_ms, _ICCID_PREFIXES)
            except ModemTimeout:
                raise
            except ModemError as exc:
                if exc.code == 10:
                    raise
                why.append("%s: %s" % (cmd, exc.answer))
                continue
            if not lines:
                why.append("%s: no ICCID in the answer" % cmd)
            for line in lines:
                try:
                    return normalize_iccid(line)
                except ValueError as exc:
                    why.append("%s: %s" % (cmd, exc))
        raise ModemError("ICCID", "; ".join(why))

    def imsi(self, timeout_ms=None):
        """The IMSI (AT+CIMI) as a string of 6-15 digits, or None when the modem cannot tell."""
        try:
            lines = self.command("AT+CIMI", timeout_ms)
        except ModemError:
            return None
        for line in lines:
            v = line
            if ":" in v:
                v = v[v.find(":") + 1:]
            v = v.strip().strip('"')
            if 6 <= len(v) <= 15 and all("0" <= c <= "9" for c in v):
                return v
        return None
