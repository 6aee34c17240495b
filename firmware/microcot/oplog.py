# c8y_LogfileRequest (agent.py _MANAGED, template 211: logFile, dateFrom, dateTo, searchText,
# maximumLines): the agent's log ring (logring.py) as a file attached to a c8y_Logfile event.
#
# The one log is "agent" (the device reports c8y_SupportedLogs ["agent"]); another name fails
# the operation naming it. Lines are chosen from the ring as it is when the operation starts:
# time within dateFrom..dateTo (ISO 8601 as the platform sends it, e.g. 2024-01-01T00:00:00.000Z
# or with an offset +01:00; both ends included; empty: open), text containing searchText (a
# case-sensitive substring, no pattern: nothing the platform sends is run), the latest
# maximumLines of them (empty: DEFAULT_LINES), each written "YYYY-mm-ddTHH:MM:SSZ text".
# Secrets are masked when a line is kept and again when it is read (logring.Ring.clean).
#
# Then, stepped (a generator, MQTT keeps alive in between): 115 creates the event, whose id
# comes back as 212 (within cfg "timeout"); the file goes to <rest_url>/event/events/<id>/
# binaries as multipart/form-data (parts "object" and "file", Cumulocity's event binary API),
# Basic auth with the device's user (cfg "http_user") and password, TLS verified with the
# agent's context (session.tls); then 134 reports SUCCESSFUL with the request and the file's
# URL. Memory: the lines are counted first (Content-Length), then sent one by one through
# upload()'s 512-byte buffer: no copy of the log, whatever its size.
from . import hal, smartrest, tpl

# loaded with this module, right after agent.py made room for it, while the heap is in one piece
from .httpget import Download, Head, HTTPGetError, HTTPStatusError, _basic, open_socket, parse_url
from .ops import Failed
from .state import iso, js, now

LOGS = ("agent",)
DEFAULT_LINES = 1000
NAME = "agent.log"


def handle(s, op):
    v = op.values + [""] * 5
    name, dfrom, dto, text, most = v[0], v[1], v[2], v[3], v[4]
    if name not in LOGS:
        raise Failed("no log file %r: this device has %s" % (name, ", ".join(LOGS)))
    lo = parse_time(dfrom, "dateFrom")
    hi = parse_time(dto, "dateTo")
    n = DEFAULT_LINES
    if most:
        if not most.isdigit() or len(most) > 9:
            raise Failed("maximumLines: not a whole number: %r" % most[:20])
        n = int(most)
    if s.ring is None:
        raise Failed("no log kept: cfg log_ring is 0")
    items = s.ring.lines()  # the lines as they are now: later ones do not change the size
    return _run(s, op, (items, lo, hi, text, n, s.ring), (name, dfrom, dto, text, n))


def _run(s, op, sel, req):
    count = size = 0
    for line in select(*sel):
        count += 1
        size += len(line.encode())
    eid = yield from _event(s, op, count)
    url = rest_url(s) + "/event/events/%s/binaries" % eid
    b = "mcb" + "".join("%02x" % x for x in hal.random_bytes(8))
    pre = ('--%s\r\nContent-Disposition: form-data; name="object"\r\n\r\n'
           '{"name":"%s","type":"text/plain"}\r\n--%s\r\nContent-Disposition: form-data; '
           'name="file"; filename="%s"\r\nContent-Type: text/plain\r\n\r\n' % (b, NAME, b, NAME))
    post = "\r\n--%s--\r\n" % b
    s.room()  # the TLS handshake wants a few KiB in one piece where TLS is in the heap
    ctx = s.ctx
    try:
        yield from upload(url, len(pre) + size + len(post), _parts(pre, select(*sel), post),
                          "multipart/form-data; boundary=" + b, user=s.http_user(),
                          password=s.cred["password"], ssl_context=ctx or None,
                          ca=None if ctx else s.cfg["ca"], timeout=s.cfg["timeout"])
    except HTTPGetError as e:
        raise Failed("upload of the log to event %s: %s" % (eid, e))
    s.log("c8y_LogfileRequest %s: %d lines, %d bytes, event %s" % (op.id, count, size, eid))
    name, dfrom, dto, text, n = req
    return (tpl.LOG_DONE, js(name), js(dfrom), js(dto), js(text), n, js(url))


def _parts(pre, lines, post):
    yield pre
    yield from lines
    yield post


def _event(s, op, count):
    """The c8y_Logfile event (115) of this operation; its id from the answer (212)."""
    body = s.body(smartrest.row((tpl.LOGFILE, int(s.mo), js("agent log: %d lines" % count),
                                 iso(now()), op.id)))
    ms = int(s.cfg["timeout"] * 1000)
    err = None
    s.ans = []  # agent.py's callback puts the rows of answers here (create.ask)
    try:
        s.c.publish("ms/" + s.id, body, qos=1)
        body = None
        t0 = hal.ticks_ms()
        while True:
            for r in s.ans or ():
                if r.code == tpl.R_LOGFILE_EVENT and len(r.values) > 1 and r.values[1] == op.id:
                    return r.values[0]
                if 40 <= r.code <= 50:
                    # maybe an answer to queued data sent meanwhile: noted, and waited on
                    err = "%d %s" % (r.code, ",".join(r.values))
            s.ans = []
            if hal.ticks_diff(hal.ticks_ms(), t0) >= ms:
                raise Failed("no c8y_Logfile event within %d ms%s" % (
                    ms, " (the platform answered %s)" % err if err else ""))
            yield
    finally:
        s.ans = None


def rest_url(s):
    u = s.cfg["rest_url"] or "https://" + s.cfg["host"]
    return u.rstrip("/")


def select(items, lo, hi, text, most, ring=None):
    """The lines of items [(Unix seconds, text)] with lo <= time <= hi (None: open) that
    contain `text`, the latest `most` of them, oldest first, each "ISO-time text\\n" (a
    generator; ring: its secrets are masked again)."""
    n = 0
    for it in items:
        if _ok(it, lo, hi, text):
            n += 1
    skip = n - most if n > most else 0
    for it in items:
        if _ok(it, lo, hi, text):
            if skip:
                skip -= 1
                continue
            line = it[1] if ring is None else ring.clean(it[1])
            yield "%s %s\n" % (iso(it[0]), line)


def _ok(it, lo, hi, text):
    t = it[0]
    return (lo is None or t >= lo) and (hi is None or t <= hi) and (not text or text in it[1])


def parse_time(v, what="time"):
    """ISO 8601 date and time -> Unix seconds; "" -> None. YYYY-MM-DD[Thh:mm[:ss[.fff]]] then
    Z, +hh:mm, +hhmm, +hh (or - those), or nothing (UTC); fractions are dropped."""
    if not v:
        return None
    try:
        if len(v) < 10 or v[4] != "-" or v[7] != "-":
            raise ValueError
        y, mo, d = _num(v, 0, 4), _num(v, 5, 2), _num(v, 8, 2)
        h = mi = sec = 0
        i = 10
        if i < len(v) and v[i] in "Tt ":
            h, mi = _num(v, 11, 2), _num(v, 14, 2)
            if v[13] != ":":
                raise ValueError
            i = 16
            if i < len(v) and v[i] == ":":
                sec = _num(v, 17, 2)
                i = 19
                if i < len(v) and v[i] in ".,":
                    i += 1
                    while i < len(v) and "0" <= v[i] <= "9":
                        i += 1
        off = 0
        z = v[i:]
        if z in ("Z", "z"):
            pass
        elif z:
            if z[0] not in "+-" or len(z) not in (3, 5, 6) or (len(z) == 6 and z[3] != ":"):
                raise ValueError
            off = _num(z, 1, 2) * 3600 + (_num(z, len(z) - 2, 2) * 60 if len(z) > 3 else 0)
            if z[0] == "-":
                off = -off
        if not (1 <= mo <= 12 and 1 <= d <= 31 and h < 24 and mi < 60 and sec < 61):
            raise ValueError
    except (ValueError, IndexError):
        raise Failed("%s: not an ISO 8601 time: %r" % (what, v[:40]))
    return _days(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec - off


def _num(v, i, n):
    p = v[i:i + n]
    if len(p) != n or not p.isdigit():
        raise ValueError
    return int(p)


def _days(y, m, d):
    # days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil)
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


class _Up(Download):
    # a request of ours on Download's connection code (TLS context, sending, reading), which
    # needs only these fields of it
    def __init__(self, url, ssl_context, ca, chunk):
        self.tls, self.host, self.port, self.path = parse_url(url)
        self._ctx = ssl_context
        self._ca = ca
        self._buf = bytearray(chunk)
        self._s = None


def upload(url, size, body, content_type, user=None, password=None, ca=None, ssl_context=None,
           timeout=30, chunk=512, opener=None):
    """POST a body of `size` bytes that the iterable `body` yields in pieces (str or bytes, e.g.
    one log line each), with Content-Length, over httpget.Download's connection code: a
    generator that yields after connecting and after every `chunk` bytes sent (the caller keeps
    MQTT alive in between) and returns the answer's status (2xx; another raises
    HTTPStatusError with the start of the answer's body). The pieces are gathered in one
    `chunk`-byte buffer, which then takes the answer's head (the body is not read). A body that
    is not `size` bytes long is a ValueError before the request ends. Credentials only over
    https://, TLS verified as Download's."""
    u = _Up(url, ssl_context, ca, chunk)
    if user is not None and not u.tls:
        raise ValueError("credentials over plain http:// refused (use https://)")
    host = u.host if u.port == (443 if u.tls else 80) else "%s:%d" % (u.host, u.port)
    u._s = s = (opener or open_socket)(u.host, u.port, u._context() if u.tls else None, timeout)
    try:
        req = b"POST %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: microcot\r\nConnection: close\r\n" \
              b"Content-Type: %s\r\nContent-Length: %d\r\n" % (u.path.encode(), host.encode(),
                                                              content_type.encode(), size)
        if user is not None:
            req += b"Authorization: " + _basic(user, password) + b"\r\n"
        u._send(s, req + b"\r\n")
        req = None
        yield
        buf = u._buf
        n = sent = 0
        for piece in body:
            if isinstance(piece, str):
                piece = piece.encode()
            k = len(piece)
            sent += k
            if sent > size:
                raise ValueError("upload: the body is longer than its %d bytes" % size)
            if n + k > chunk:
                u._send(s, memoryview(buf)[:n])
                n = 0
                yield
            if k > chunk:
                u._send(s, piece)
            else:
                buf[n:n + k] = piece
                n += k
        if sent != size:
            raise ValueError("upload: the body has %d bytes, not %d" % (sent, size))
        if n:
            u._send(s, memoryview(buf)[:n])
        yield
        h = Head()
        used = n = 0
        while not h.done:
            n = u._recv(chunk)
            used = h.feed(buf, n)
        if not 200 <= h.status < 300:
            text = bytes(buf[used:min(n, used + 200)])
            try:
                text = str(text, "utf-8")
            except UnicodeError:  # cut inside a character, or not text
                text = repr(text)
            raise HTTPStatusError(h.status, ("%s %s" % (h.reason, text)).strip())
        return h.status
    finally:
        u._drop()
