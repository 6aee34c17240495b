"""The SmartREST 1.0 engine of the platform emulator: request bodies in, platform calls, rows out.

It serves the MQTT connector (`ms/<ID>` text, `bs/<ID>` binary, operations on `mr/<ID>`) and
`POST /s`, and calls the platform through `Api.handle` (api.py) rather than HTTP. The protocol
cores are the device's own: `microcot.smartrest` (CSV), `microcot.binrest` (binary),
`microcot.templates` (collections and their 41 checks).

Text requests, `process(body, user)`
------------------------------------
The body starts with `15,<X-ID>`. Line numbers count from 1 over the rows of the body, the `15`
row included (`15,X\\n600,ICCID` is answered on line 2); like the device cores they count CSV rows,
so blank lines and line breaks inside quoted values do not count.

    15,<X-ID> alone                 20,<collection id>  or  40,Template not found.
    15,<X-ID> + 10/11 rows          registration: 20,<collection id>, or one 41 row:
                                    41,Cannot create templates for already existing template object
                                    41,<line>,<message of templates.py>   (e.g. Bad pattern)
                                    41,<line>,Invalid JsonPath            (engine_paths.invalid)
                                    41,<line>,Template <id> is outside the device API: <method>
                                       <URI> (<why>)                      (engine_access.py)
    15,<X-ID> + request rows        each row executed in order, see below
    a later 15,<X-ID> row           switches the collection for the rows after it

A request row `<template id>,<values...>` (NOW parameters take no value) is answered with
    42,<line>,Malformed request line: <what>          CSV defect, bad UTF-8, a bad 15 row
    43,<line>,Invalid message identifier: <what>      unknown X-ID or template, non-numeric id
    45,<line>,Invalid message arguments: <what>       value count, a value of the wrong type
                                                       ("parameter at position '2': expected type
                                                       'NUMBER' but got 'abc'"), a value that is
                                                       no JSON where the template wants JSON
                                                       (engine_values.py)
    50,<line>,<HTTP status>,<reason phrase>           the REST call failed (50,2,404,Not Found),
                                                       or the engine refused to make it (below)
or, when the call succeeds, with the rows of every response template of the collection that
matches the JSON answer (engine_paths.py): `<response id>,<line>,<values...>`.

A body not starting with a valid `15,<X-ID>` row, an empty body, or one over `max_body` bytes is
answered `42,1,Malformed request line: <what>`. `POST /s` with the `X-Id` header passes
`xid=<X-Id>`: the body has no 15 row then and its first row is line 1 (`serve_http` is the
callable http.py wants for `POST /s`). Our own message texts
avoid commas, so they mostly travel unquoted (CSV quotes when a quoted-back value needs them).

Template and X-ID ids are bounded before they are converted: a template id has at most 10
significant digits (0..4294967295, a longer one is 43 "not a template ID", or 41 "Not a valid
message identifier for template creation" in a registration), an X-ID at most 256 characters
(42); values are bounded by their type (engine_values.py). No device input reaches int() or the
JSONPath evaluator unbounded, so none is answered 500.

The device API
--------------
Every request a row makes is made as the user whose message it is (`Api.handle(..., user)`), so
api.py's device-user rules apply: another device's managed object, data or operation is answered
`50,<line>,403,Forbidden` as over REST. Templates stay inside the device API (engine_access.py):
a registration holding a template outside it is refused whole with the 41 row above. A collection
in the database from before this rule (or written there by other means) is still used, but a
template of it outside the device API is answered `50,<line>,403,Forbidden` each time it is used,
without a call (logged as a warning when the collection is loaded and when it is used); that is
the answer the REST API gives a device for such a request, and what a device already handles,
while 41 is a registration's answer. A request whose body would write a template collection or
its X-ID (the SmartREST fragment or type, the `c8y_SmartRestDeviceIdentifier` type) is refused
the same way: seed 002 lets a collection be deleted, never changed, and a new one goes through
registration. A template inside the device API whose last URI value is empty names no resource
(the path loses its last segment): `50,<line>,404,Not Found`. Values never change the structure
of a request: they are percent-encoded in the URI and JSON-escaped in a JSON body
(engine_values.py).

The engine's own look-ups run as the platform itself (user None), each limited to one thing: a
collection by the external ID `c8y_SmartRestDeviceIdentifier`/<X-ID> and the managed object it
names, used only if that is a template collection (engine_store.py); a device's own managed
object by the external ID `<id type>/<its user name>` (`device_mo_id`). Storing a collection is
done as the registering user.

A successful DELETE of a cached collection's managed object (the collection's own delete
template, seed 002) drops it at once; after a deletion through the REST API call `forget(xid)`,
or requests keep using the cached copy (registration always asks the platform, so re-registering
works either way).

The answer
----------
Rows keep the order of the request lines. Each run of consecutive response-template rows of one
X-ID is headed by `87,<number of rows in the run>,<X-ID>`; the built-in rows (20, 40, 41, 42,
43, 45, 50) stand alone, outside any 87 group, as seed 002 shows `50,2,404,Not Found` alone and
`87,1,X-ID\\nRTID,2,MO-ID` for template rows. A body whose every row succeeded thus gets one 87
group; an error between two answered rows splits them into two groups. Rows are joined by `\\n`
without a trailing one; a body that yields no row at all (a measurement with no matching response
template) gets b"" and the connector publishes nothing.

Binary requests, `process_binary(payload, user)`
------------------------------------------------
Decoded as a whole with `binrest.decode` and the registered collections first; any defect
refuses the whole payload (nothing of it is executed) with one row in the text format above,
`<code>,<message index>,<message>`, the message being seed 002's text:

    42,1,Malformed Request: no X-Id found in binary message '1' around byte '0'
    43,2,Invalid template identifier: template with X-ID 'X' and Template ID '9' not found in cache
    45,1,Invalid parameter at position '1': Expected type 'STRING' in binary message '1' around byte '7'

(the index doubles as line number because smartrest.parse, on the device, wants one for 42-45).
Otherwise each message is executed exactly like a text row of its values (DATE -> ISO 8601 UTC,
NUMBER -> its shortest binary32 decimal), its line number being its index in the payload (from
1), and the answer is the same text as above, published on `br/<ID>`.

Devices, their collection and operations
----------------------------------------
A device user's first body with request rows binds the user to that X-ID (seed 002: template 500
must be in the collection the device uses first). A first collection without a GET template 500
is refused: every row gets `43,<line>,Invalid message identifier: ...template 500...` and is not
executed, and nothing is bound, so the device can fix its templates. Pass `bind=False` for
callers that are not devices (an administrator's `POST /s`). The binding is kept in the store.

The device's managed object id is learnt from the platform's answers to the device's own requests:
any answer holding an external ID whose value is the user name (checking or registering its
ICCID) names it; before that `device_mo_id` looks the user up as an external ID of the types in
`id_types` (`c8y_Serial` by default). Without it operations cannot be fetched, as seed 002 warns.

`pending_operations(user)` runs the bound collection's template 500 with the device's managed
object id for each of its parameters (NOW gets the time), follows the answer's `next` pages (seed
002: all pending operations are sent at the next connection) and renders them with the
collection's response templates, line number 1 (the connector's own one-row request).
`render_operation(op, user=... or xid=...)` renders one new operation as if template 500 had
returned just it: `{"operations": [op]}`. The connector finds the user for a new operation with
`Api.device_user(op["deviceId"])` (which walks up to the parent of a child device) and publishes
the result on that user's `mr/` topic (b"": nothing to publish).

Nothing escapes `process`, `process_binary`, `pending_operations` or `render_operation`: an
unexpected failure is logged and answered `50,<line>,500,Internal Server Error` (or b"" for the
operation calls).

Two steps: `process_later` and `process_binary_later` make the requests and return a callable
that renders and formats the answer. The MQTT connector calls it after the commit of the
message's transaction, so the response templates' JSONPaths do not run while other threads and
processes wait for the database (docs/guides/emulator-scaling.md). With `shared=True` (worker
processes, workers.py) device sessions are read again while incomplete, and `on_forget` hears of
collections deleted by their own templates.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, urlsplit

from microcot import binrest, smartrest
from microcot.templates import E_ID, OPERATIONS_ID, Collection, Request, Response, TemplateError

from . import engine_access, engine_paths, engine_values
from .api import SMARTREST_FRAGMENT, SMARTREST_MO_TYPE, SMARTREST_XID_TYPE
from .engine_store import ApiLike, ApiStore, Session, Store

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
MAX_PAGES = 100  # of pending operations fetched for one delivery
MAX_XID = 256  # characters of an X-ID (it is quoted back in messages)
TID_DIGITS = 10  # template ids are 0..4294967295
SHOWN = 40  # characters of a refused field quoted back

E40 = "Template not found."
E41_EXISTS = "Cannot create templates for already existing template object"
E42 = "Malformed request line"
E43 = "Invalid message identifier"
E45 = "Invalid message arguments"
E41_API = "Template %d is outside the device API: %s %s (%s)"

# one answer item: (X-ID of a response-template row, or None for a built-in row, fields)
Item = tuple[str | None, list[Any]]


class _Later:
    """A successful request's answer rows, rendered only when the answer is formatted: the
    connector formats after its transaction's commit, so the response templates' JSONPaths do
    not run while other processes wait for the database (process_later)."""

    __slots__ = ("body", "coll", "line", "xid")

    def __init__(self, xid: str, coll: Collection, body: Any, line: int) -> None:
        self.xid, self.coll, self.body, self.line = xid, coll, body, line


Piece = Item | _Later


def _phrase(status: int, reason: str) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return reason or "Error"


def _records(data: bytes) -> list[tuple[int, bytes]]:
    """Split a body into CSV rows, numbered from 1, blank ones skipped (as smartrest does).

    The cores parse a body all or nothing; splitting first lets one bad row be answered 42 while
    the others run. Only `"` and `\\n` matter here and both are ASCII, so bytes will do; each
    row is then parsed by smartrest.parse_rows, which has the last word on its syntax."""
    out = []
    n = len(data)
    pos = 0
    while pos <= n:
        j = pos
        while True:
            nl = data.find(b"\n", j)
            q = data.find(b'"', j, nl if nl >= 0 else n)
            if q < 0:
                end = nl if nl >= 0 else n
                break
            close = data.find(b'"', q + 1)
            if close < 0:  # unterminated: the rest is this row, and parse_rows says why
                end = n
                break
            j = close + 1
        rec = data[pos:end]
        if rec not in (b"", b"\r"):
            out.append((len(out) + 1, rec))
        pos = end + 1
    return out


def _shown(text: str) -> str:
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


def _uint(text: str, digits: int) -> int | None:
    """text as an unsigned integer of at most `digits` significant digits, else None; counted
    before int() sees it (CPython refuses over 4300 digits with a ValueError)."""
    if not text or not all("0" <= c <= "9" for c in text):
        return None
    if len(text.lstrip("0")) > digits:
        return None
    return int(text)


def _bad_path(t: Request | Response) -> tuple[str, str] | None:
    """(path, why) for the first JsonPath of a response template the engine cannot evaluate."""
    if isinstance(t, Request):
        return None
    for p in [t.base, t.condition, *t.values]:
        why = engine_paths.invalid(p) if p else None
        if why:
            return p, why
    return None


def _outside(t: Request | Response) -> str | None:
    """The 41 message for a request template outside the device API (engine_access.py)."""
    if not isinstance(t, Request):
        return None
    why = engine_access.refusal(t.method, t.uri, t.placeholder)
    return None if why is None else E41_API % (t.tid, t.method, t.uri, why)


def _touches_collections(body: str | None) -> bool:
    """True when a request body would write a template collection or its X-ID (seed 002: a
    collection cannot be changed, only deleted; new ones are registered with 10/11 rows, where
    the engine checks them)."""
    if not body:
        return False
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return False  # not JSON: the REST API refuses it, or it is an attachment's text
    if not isinstance(doc, dict):
        return False
    return SMARTREST_FRAGMENT in doc or doc.get("type") in (SMARTREST_MO_TYPE, SMARTREST_XID_TYPE)


def _err(code: int, line: int, text: str) -> Item:
    return (None, [code, line, text])


def _fields(rec: bytes) -> tuple[list[str], str | None]:
    try:
        rows = smartrest.parse_rows(rec)
    except ValueError as e:
        why = str(e)
        return [], why[7:] if why.startswith("line 1 ") else why
    if len(rows) != 1:
        return [], "one request line holds %d rows" % len(rows)
    return rows[0], None


class Engine:
    """See the module docstring. `api` is api.Api (or anything with its `handle`); `store`
    defaults to ApiStore(api); `clock` gives Unix seconds (NOW values)."""

    def __init__(
        self,
        api: ApiLike,
        store: Store | None = None,
        *,
        max_body: int = MAX_BODY,
        id_types: tuple[str, ...] = ("c8y_Serial",),
        clock: Callable[[], float] = time.time,
        shared: bool = False,
    ) -> None:
        """`shared`: other processes serve devices from the same store (workers.py); a device
        session that lacks its X-ID or managed object id is then read again from the store
        before it is used, since another process may have learnt it."""
        self.api = api
        self.shared = shared
        # called with the X-ID of a collection this engine saw deleted (workers.py tells the
        # other processes, whose caches hold it too)
        self.on_forget: Callable[[str], None] | None = None
        self.store: Store = store if store is not None else ApiStore(api)
        self.max_body = max_body
        self.id_types = id_types
        self.clock = clock
        self._collections: dict[str, tuple[str, Collection]] = {}
        self._sessions: dict[str, Session] = {}
        self._lock = threading.RLock()

    @property
    def lock(self) -> threading.RLock:
        """Held while the engine writes its own records (sessions) to the store: a caller that
        holds the model's lock across a message (the connector's transaction) takes this one
        first, in the engine's order, or the two could wait for each other."""
        return self._lock

    # -- collections ---------------------------------------------------------------------------

    def collection(self, xid: str) -> tuple[str, Collection] | None:
        """(collection managed object id, Collection) of a registered X-ID, or None."""
        hit = self._collections.get(xid)
        if hit is not None:
            return hit
        found = self.store.find_collection(xid)
        if found is None or not self._usable(xid, *found):
            return None
        with self._lock:
            self._collections[xid] = found
        return found

    @staticmethod
    def _usable(xid: str, mo: str, coll: Collection) -> bool:
        # a collection stored before the engine checked what it checks now, or written into the
        # database by other means: paths it cannot evaluate make it unusable; requests outside
        # the device API are refused when they are used (_execute)
        for t in coll:
            bad = _bad_path(t)
            if bad:
                log.error(
                    "template collection %s (managed object %s) is unusable: template %d has "
                    "the JsonPath %r: %s",
                    xid,
                    mo,
                    t.tid,
                    _shown(bad[0]),
                    bad[1],
                )
                return False
        outside = [t.tid for t in coll if _outside(t)]
        if outside:
            log.warning(
                "template collection %s (managed object %s): templates %s are outside the device "
                "API and are answered 50,<line>,403 when used",
                xid,
                mo,
                ", ".join(map(str, outside)),
            )
        return True

    def forget(self, xid: str | None = None) -> None:
        """Drop cached collections (one or all): after a collection's managed object is deleted
        elsewhere, so requests stop using it. Registration always asks the store anyway."""
        with self._lock:
            if xid is None:
                self._collections.clear()
            else:
                self._collections.pop(xid, None)

    def _deleted(self, target: str) -> None:
        # a collection deleted through one of its own templates (seed 002) stops answering at once
        path = urlsplit(target).path.rstrip("/")
        gone = []
        with self._lock:
            for xid, (mo, _) in list(self._collections.items()):
                if path == "/inventory/managedObjects/" + mo:
                    del self._collections[xid]
                    gone.append(xid)
        hook = self.on_forget
        for xid in gone if hook is not None else ():
            try:
                hook(xid)
            except Exception:
                log.exception("telling others that collection %s is gone failed", xid)

    def _lookup(self, xid: str, tid: int) -> list[str] | None:
        hit = self.collection(xid)
        return None if hit is None else hit[1].lookup(xid, tid)

    def _register(self, xid: str, rows: list[tuple[int, bytes]], user: str | None) -> list[Item]:
        parsed = [["15", xid]]
        lines = []
        for line, rec in rows:
            fields, why = _fields(rec)
            if why:
                return [_err(42, line, "%s: %s" % (E42, why))]
            tid = fields[1].strip() if len(fields) > 1 else ""
            if tid.isascii() and tid.isdigit() and _uint(tid, TID_DIGITS) is None:
                # templates.py would hand thousands of digits to int()
                return [_err(41, line, E_ID)]
            parsed.append(fields)
            lines.append(line)
        with self._lock:
            self._collections.pop(xid, None)
            if self.store.find_collection(xid) is not None:
                return [(None, [41, E41_EXISTS])]
            try:
                coll = Collection.from_rows(parsed)
            except TemplateError as e:
                # templates numbers the rows from 2 (after the 15 row), blank rows skipped like
                # here; map back to our numbering, which differs with an X-Id header
                if e.line is None or not 2 <= e.line < len(lines) + 2:
                    return [(None, [41, e.message])]
                return [_err(41, lines[e.line - 2], e.message)]
            for line, t in zip(lines, coll, strict=True):
                bad = _bad_path(t)
                if bad:
                    log.info(
                        "41 for %s line %d: JSONPath %r: %s", xid, line, _shown(bad[0]), bad[1]
                    )
                    return [_err(41, line, "Invalid JsonPath")]
            # after the paths, so a collection's first defect in templates.py's order comes first
            for line, t in zip(lines, coll, strict=True):
                outside = _outside(t)
                if outside:
                    log.warning("41 for %s line %d from %s: %s", xid, line, user, outside)
                    return [_err(41, line, outside)]
            mo = self.store.add_collection(coll, user)
            if mo is None:  # registered concurrently elsewhere
                return [(None, [41, E41_EXISTS])]
            self._collections[xid] = (mo, coll)
        log.info(
            "template collection %s registered as %s by %s (%d templates)", xid, mo, user, len(coll)
        )
        return [(None, [20, mo])]

    # -- device sessions ----------------------------------------------------------------------

    def _session(self, user: str) -> Session:
        s = self._sessions.get(user)
        if s is not None and self.shared and not (s.xid and s.device_id):
            # another process may have bound it or learnt its object since: take what it
            # stored, keeping what this one knows (it stored that too)
            stored = self.store.session(user)
            if stored is not None:
                with self._lock:
                    s.xid = s.xid or stored.xid
                    s.device_id = s.device_id or stored.device_id
        if s is None:
            s = self.store.session(user) or Session(user)
            with self._lock:
                s = self._sessions.setdefault(user, s)
        return s

    def _save(self, s: Session) -> None:
        self.store.save_session(Session(s.user, s.xid, s.device_id))

    def collection_for_device(self, user: str) -> Collection | None:
        """The collection the device used first (where its template 500 is), or None."""
        xid = self._session(user).xid
        hit = self.collection(xid) if xid else None
        return None if hit is None else hit[1]

    def device_mo_id(self, user: str) -> str | None:
        """The device's own managed object id: learnt, or found as external ID (id_types)."""
        s = self._session(user)
        if s.device_id:
            return s.device_id
        for t in self.id_types:
            target = "/identity/externalIds/%s/%s" % (quote(t, safe=""), quote(user, safe=""))
            r = self.api.handle("GET", target, None, None, None)
            ok = r.status < 300 and isinstance(r.body, dict)
            mo = r.body.get("managedObject") if ok else None
            if isinstance(mo, dict) and mo.get("id") is not None:
                self._learn_device(user, str(mo["id"]))
                return s.device_id
        return None

    def _learn_device(self, user: str, mo: str) -> None:
        with self._lock:
            s = self._session(user)
            if s.device_id == mo:
                return
            s.device_id = mo
            self._save(s)
        log.info("device %s is managed object %s", user, mo)

    def _learn(self, user: str | None, body: Any) -> None:
        # seed 002's self-creation: the device checks, then registers, its ID as external ID
        if user and isinstance(body, dict) and body.get("externalId") == user:
            mo = body.get("managedObject")
            if isinstance(mo, dict) and mo.get("id") is not None:
                self._learn_device(user, str(mo["id"]))

    def _bind(self, user: str, xid: str, coll: Collection) -> str | None:
        """None when the user may go on with this collection, else the 43 message."""
        s = self._session(user)
        if s.xid:
            return None
        if not coll.has_operations_template():
            log.warning(
                "device %s used X-ID %s first, which has no GET template 500: refused "
                "(seed 002: the collection used first must hold the operations template)",
                user,
                xid,
            )
            return (
                "%s: the first collection a device uses must hold the GET template 500 "
                "(pending operations); X-ID '%s' has none" % (E43, xid)
            )
        with self._lock:
            if not s.xid:
                s.xid = xid
                self._save(s)
        log.info("device %s bound to X-ID %s", user, xid)
        return None

    # -- executing ----------------------------------------------------------------------------

    def _now(self) -> str:
        return engine_values.iso_time(self.clock())

    def _render(self, xid: str, coll: Collection, doc: Any, line: int) -> list[Item]:
        out: list[Item] = []
        if doc is None:
            return out
        for t in coll:
            if isinstance(t, Request):
                continue
            for values in engine_paths.extract(t, doc):
                out.append((xid, [t.tid, line, *values]))
        return out

    def _call(
        self, method: str, target: str, body: str | None, ctype: str | None, user: str | None
    ):
        try:
            return self.api.handle(method, target, body, ctype, user)
        except Exception:
            log.exception("platform call %s %s failed", method, target)
            return None

    def _execute(
        self,
        xid: str,
        coll: Collection,
        req: Request,
        values: list[str],
        line: int,
        user: str | None,
    ) -> list[Piece]:
        full, why = engine_values.complete(req, values, self._now())
        if why:
            return [_err(45, line, "%s: %s" % (E45, why))]
        try:
            method, target, body = engine_values.fill(req, full)
        except engine_values.BadValue as e:
            return [_err(45, line, "%s: %s" % (E45, e))]
        refused = self._refused(xid, req, method, target, body, user)
        if refused:
            return [(None, [50, line, *refused])]
        # the device's own user: api.py applies the device-user rules to every template
        r = self._call(method, target, body, req.content_type or None, user)
        if r is None:
            return [(None, [50, line, 500, "Internal Server Error"])]
        if r.status >= 400:
            return [(None, [50, line, r.status, _phrase(r.status, r.reason)])]
        if method == "DELETE":
            self._deleted(target)
        self._learn(user, r.body)
        return [_Later(xid, coll, r.body, line)]

    @staticmethod
    def _refused(
        xid: str, req: Request, method: str, target: str, body: str | None, user: str | None
    ) -> tuple[int, str] | None:
        """(status, reason) when a filled-in request must not be made, else None."""
        if _touches_collections(body):
            why = "writes a template collection"
        elif engine_access.allowed(method, target):
            return None
        elif _outside(req) is None:
            # a template inside the device API whose last URI value is empty: the path lost its
            # last segment (api.py strips it) and names no resource of a device
            log.info(
                "template %d of X-ID %s: %s %s is no resource", req.tid, xid, method, _shown(target)
            )
            return 404, "Not Found"
        else:  # a collection stored before templates were checked (see collection())
            why = "is outside the device API"
        log.warning(
            "template %d of X-ID %s (%s %s) used by %s %s: answered 403",
            req.tid,
            xid,
            req.method,
            _shown(req.uri),
            user,
            why,
        )
        return 403, "Forbidden"

    def _unknown(self, xid: str, coll: Collection | None, tid: int) -> str:
        if coll is not None and coll.response(tid) is not None:
            return "%s: template %d of X-ID '%s' is a response template" % (E43, tid, xid)
        return "%s: template with X-ID '%s' and Template ID '%d' not found" % (E43, xid, tid)

    def _rows(
        self, xid: str, rows: list[tuple[int, bytes]], user: str | None, bind: bool
    ) -> list[Piece]:
        hit = self.collection(xid)
        coll = hit[1] if hit else None
        refused = None
        if bind and user and coll is not None:
            refused = self._bind(user, xid, coll)
        out: list[Piece] = []
        for line, rec in rows:
            fields, why = _fields(rec)
            if why:
                out.append(_err(42, line, "%s: %s" % (E42, why)))
                continue
            head = fields[0]
            if head == "15":
                bad = self._xid_problem(fields)
                if bad:
                    out.append(_err(42, line, "%s: %s" % (E42, bad)))
                    continue
                xid = fields[1]
                hit = self.collection(xid)
                coll = hit[1] if hit else None
                continue
            tid = _uint(head, TID_DIGITS)
            if tid is None:
                out.append(_err(43, line, "%s: '%s' is not a template ID" % (E43, _shown(head))))
                continue
            if refused:
                out.append(_err(43, line, refused))
                continue
            req = coll.request(tid) if coll is not None else None
            if req is None:
                out.append(_err(43, line, self._unknown(xid, coll, tid)))
                continue
            out.extend(self._execute(xid, coll, req, fields[1:], line, user))
        return out

    @staticmethod
    def _xid_problem(fields: list[str]) -> str | None:
        if len(fields) != 2:
            return "the 15 row takes the X-ID alone; got %d values" % (len(fields) - 1)
        xid = fields[1]
        if len(xid) > MAX_XID:
            return "X-ID '%s' has %d characters; at most %d" % (_shown(xid), len(xid), MAX_XID)
        try:
            smartrest.check_xid(fields[1])
        except ValueError as e:
            return str(e)
        return None

    def _text(self, data: bytes, user: str | None, bind: bool, xid: str | None) -> list[Piece]:
        if len(data) > self.max_body:
            why = "request of %d bytes exceeds the limit of %d bytes" % (len(data), self.max_body)
            return [_err(42, 1, "%s: %s" % (E42, why))]
        rest = _records(data)
        why = None
        if xid is not None:  # HTTP's X-Id header: every row of the body is a request row
            why = self._xid_problem(["15", xid])
        elif not rest:
            why = "empty request; a request starts with a 15 row naming the X-ID"
        else:
            fields, why = _fields(rest[0][1])
            if not why and fields[0] != "15":
                why = "a request starts with a 15 row naming the X-ID"
            why = why or self._xid_problem(fields)
            xid = fields[1] if not why else None
            rest = rest[1:]
        if why or xid is None:
            return [_err(42, 1, "%s: %s" % (E42, why))]
        if not rest:
            hit = self.collection(xid)
            return [(None, [20, hit[0]] if hit else [40, E40])]
        first, _ = _fields(rest[0][1])
        if first and first[0] in ("10", "11"):
            return self._register(xid, rest, user)
        return self._rows(xid, rest, user, bind)

    def _binary(self, data: bytes, user: str | None, bind: bool) -> list[Piece]:
        if len(data) > self.max_body:
            why = "payload of %d bytes exceeds the limit of %d bytes" % (len(data), self.max_body)
            return [_err(42, 1, "Malformed Request: " + why)]
        try:
            msgs = binrest.decode(data, self._lookup)
        except binrest.Error as e:
            return [_err(e.code, e.index or 1, e.message)]
        out: list[Piece] = []
        refused = None
        for line, (xid, tid, values) in enumerate(msgs, 1):
            mo, coll = self.collection(xid)  # decode found it, so it is cached
            req = coll.request(tid)
            if line == 1 and bind and user:
                refused = self._bind(user, xid, coll)
            if refused:
                out.append(_err(43, line, refused))
                continue
            text = engine_values.binary_text(req.binary_types(), values)
            out.extend(self._execute(xid, coll, req, text, line, user))
        return out

    # -- answers ------------------------------------------------------------------------------

    def _expand(self, pieces: list[Piece]) -> list[Item]:
        out: list[Item] = []
        for p in pieces:
            if isinstance(p, _Later):
                out.extend(self._render(p.xid, p.coll, p.body, p.line))
            else:
                out.append(p)
        return out

    def _answer(self, pieces: list[Piece], user: str | None, what: str) -> bytes:
        try:
            return self._format(self._expand(pieces))
        except Exception:
            log.exception("rendering the answer to a %s request of %s failed", what, user)
            return b"50,1,500,Internal Server Error"

    @staticmethod
    def _format(items: list[Item]) -> bytes:
        lines: list[str] = []
        i = 0
        while i < len(items):
            xid, fields = items[i]
            if xid is None:
                lines.append(smartrest.row(fields))
                i += 1
                continue
            j = i
            while j < len(items) and items[j][0] == xid:
                j += 1
            lines.append(smartrest.row([87, j - i, xid]))
            lines.extend(smartrest.row(f) for _, f in items[i:j])
            i = j
        return "\n".join(lines).encode()

    def process(
        self,
        body: bytes | str,
        user: str | None = None,
        *,
        bind: bool = True,
        xid: str | None = None,
    ) -> bytes:
        """Answer a SmartREST text request body (see the module docstring). `xid` is the X-Id
        header of `POST /s`: the body then holds no 15 row and its first row is line 1."""
        return self.process_later(body, user, bind=bind, xid=xid)()

    def process_later(
        self,
        body: bytes | str,
        user: str | None = None,
        *,
        bind: bool = True,
        xid: str | None = None,
    ) -> Callable[[], bytes]:
        """process() in two steps: the requests now, the answer (response templates rendered,
        rows formatted) when the returned callable is called. The MQTT connector calls it after
        its transaction's commit, which keeps the transaction short."""
        try:
            data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)
            pieces = self._text(data, user, bind, xid)
        except Exception:
            log.exception("SmartREST request of %s failed", user)
            return lambda: b"50,1,500,Internal Server Error"
        return lambda: self._answer(pieces, user, "SmartREST")

    def serve_http(self, body: bytes, x_id: str | None, user: str | None) -> tuple[int, bytes]:
        """http.py's SmartREST callable for `POST /s`: always 200, as Cumulocity answers SmartREST
        over HTTP. A body that starts with its own 15 row names its X-ID itself, else the X-Id
        header does. No device binding: the first-use rule is about MQTT operations."""
        own = body.lstrip(b"\r\n").startswith(b"15,") or not x_id
        return 200, self.process(body, user, bind=False, xid=None if own else x_id)

    def process_binary(
        self, payload: bytes, user: str | None = None, *, bind: bool = True
    ) -> bytes:
        """Answer a binary SmartREST payload with text rows (see the module docstring)."""
        return self.process_binary_later(payload, user, bind=bind)()

    def process_binary_later(
        self, payload: bytes, user: str | None = None, *, bind: bool = True
    ) -> Callable[[], bytes]:
        """process_binary() in two steps, as process_later()."""
        try:
            pieces = self._binary(bytes(payload), user, bind)
        except Exception:
            log.exception("binary SmartREST request of %s failed", user)
            return lambda: b"50,1,500,Internal Server Error"
        return lambda: self._answer(pieces, user, "binary SmartREST")

    # -- operations ---------------------------------------------------------------------------

    def _operations_collection(
        self, user: str | None, xid: str | None
    ) -> tuple[str, Collection] | None:
        if xid is None and user is not None:
            xid = self._session(user).xid
        hit = self.collection(xid) if xid else None
        if hit is None:
            log.warning("no template collection for the operations of %s (X-ID %s)", user, xid)
        return None if hit is None else (xid, hit[1])

    def pending_operations(self, user: str, xid: str | None = None) -> bytes:
        """The device's pending operations (template 500 of its first collection, or of xid) as
        rows of its response templates, for mr/<ID>; b"" when there are none or it cannot be
        fetched (the reason is logged)."""
        try:
            found = self._operations_collection(user, xid)
            if found is None:
                return b""
            xid, coll = found
            req = coll.request(OPERATIONS_ID)
            if req is None or req.method != "GET":
                log.warning("X-ID %s has no GET template 500; %s gets no operations", xid, user)
                return b""
            mo = self.device_mo_id(user)
            if mo is None:
                log.warning(
                    "device %s has no managed object known yet (no external ID %s): no operations",
                    user,
                    "/".join(self.id_types),
                )
                return b""
            now = self._now()
            method, target, body = engine_values.fill(
                req, [now if t == "NOW" else mo for t in req.params]
            )
            items: list[Item] = []
            # seed 002: every pending operation goes out at the next connection, so all pages
            for _ in range(MAX_PAGES):
                if not engine_access.allowed(method, target):
                    log.warning(
                        "template 500 of %s (%s %s) is outside the device API: %s gets no "
                        "operations",
                        xid,
                        method,
                        _shown(target),
                        user,
                    )
                    break
                # as the device: it gets only operations it may read (api.py)
                r = self._call(method, target, body, req.content_type or None, user)
                if r is None or r.status >= 400:
                    log.warning(
                        "template 500 of %s for %s: %s", xid, user, r and (r.status, r.reason)
                    )
                    break
                items += self._render(xid, coll, r.body, 1)
                nxt = r.body.get("next") if isinstance(r.body, dict) else None
                if not isinstance(nxt, str) or not (r.body.get("operations") or []):
                    break
                parts = urlsplit(nxt)
                target = parts.path + ("?" + parts.query if parts.query else "")
            return self._format(items)
        except Exception:
            log.exception("pending operations of %s failed", user)
            return b""

    def render_operation(self, op: dict, xid: str | None = None, user: str | None = None) -> bytes:
        """One operation (the platform's JSON) as rows of the response templates of xid, or of
        the collection user used first, rendered as template 500's answer holding just it."""
        try:
            found = self._operations_collection(user, xid)
            if found is None:
                return b""
            xid, coll = found
            return self._format(self._render(xid, coll, {"operations": [op]}, 1))
        except Exception:
            log.exception(
                "rendering operation %r failed", op.get("id") if isinstance(op, dict) else op
            )
            return b""
