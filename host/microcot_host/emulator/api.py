"""The emulator's REST API at function level: `Api.handle(method, target, body)`.

The HTTP layer (webapp.py on Starlette, served by http.py), the SmartREST engine and the MQTT
connector all call `handle`, so a SmartREST template runs exactly what the same request over HTTP
would, and its failures carry the same HTTP status and reason (`50,<line>,404,Not Found`). Bodies
are Cumulocity's JSON shapes, `self` links are built from `base_url`.

Resources
---------
| resource                                                   | methods                  |
| ---------------------------------------------------------- | ------------------------ |
| /inventory/managedObjects                                  | GET, POST                |
| /inventory/managedObjects/{id}                             | GET, PUT, DELETE         |
| /inventory/managedObjects/{id}/childDevices                | GET, POST                |
| /inventory/managedObjects/{id}/childDevices/{childId}      | GET, DELETE              |
| /inventory/binaries, /inventory/binaries/{id}              | GET, POST / GET, PUT, DELETE |
| /identity/externalIds/{type}/{value}                       | GET, DELETE              |
| /identity/globalIds/{id}/externalIds                       | GET, POST                |
| /measurement/measurements, /measurement/measurements/{id}  | GET, POST / GET, DELETE  |
| /event/events, /event/events/{id}                          | GET, POST / GET, PUT, DELETE |
| /event/events/{id}/binaries                                | GET, POST, PUT, DELETE   |
| /alarm/alarms, /alarm/alarms/{id}                          | GET, POST / GET, PUT     |
| /devicecontrol/operations, /devicecontrol/operations/{id}  | GET, POST / GET, PUT     |
| /devicecontrol/newDeviceRequests, .../{id}                 | GET, POST / GET, PUT, DELETE |
| /devicecontrol/bulkNewDeviceRequests                       | POST (multipart or CSV)  |
| /devicecontrol/deviceCredentials/{id}                      | GET, DELETE (extension)  |
| /tenant/currentTenant                                      | GET                      |
| /s (SmartREST 1.0, header X-Id)                            | POST, served by webapp.py |

`GET /openapi.json` (any authenticated user) describes these resources as OpenAPI 3, generated
from this module's route table and authz.RULES (who may call what; openapi.py); the HTTP layer
validates request bodies against the same description before `handle` sees them. Empty path
segments are dropped, as Cumulocity does (`/alarm/alarms//{id}` is `/alarm/alarms/{id}`).

Collections page with `pageSize` (default 5, at most 2000: larger values are capped) and
`currentPage` (from 1), `withTotalPages=true` adds `statistics.totalPages`; `next` is present when
a further page has items, `prev` from page 2 on. Filters: managed objects by `type`,
`fragmentType`, `text` (in name or type), `ids` (comma list), `owner`; measurements by `source`,
`type`, `valueFragmentType`, `valueFragmentSeries`, `dateFrom`, `dateTo` (ISO times, half-open
interval), `revert`; events by `source`, `type`, `fragmentType`, dates; alarms by `source`,
`status` (comma list), `severity`, `type`, `resolved`, dates; operations by `deviceId`, `status`
(comma list), `agentId` (the device and its child devices), `fragmentType`, dates (creation);
new device requests by `status`. Measurements come oldest first, events and alarms newest first,
operations in creation order (`revert=true` turns each around). Unknown parameters are ignored.

Errors are `{"error": "<domain>/<code>", "message": ..., "info": ...}`: 400 unreadable JSON or a
field of the wrong JSON type or a malformed query parameter (the message names it; `pageSize`
and `currentPage` take ASCII digits, the offset must fit 64 bits), 404 unknown resource or
object, 403 `security/Forbidden` "Access is denied" (a device user outside its own objects, see
below), 405 method (with `Allow`), 409 duplicate, 413 a body (webapp.py) or a binary too large,
415 a body that is not JSON, 422 valid JSON with unacceptable data (missing mandatory field,
unknown source, bad status transition; message "Following mandatory fields should be included:
..." as Cumulocity; and jsonsafe.py's limits: nesting deeper than 64, NaN or Infinity, integers
beyond 64 bits, lone surrogates), 500 an internal failure (logged; `handle` itself never
raises).

Who may call what (authz.py, docs/reference/emulator-access.md): `user` None is the emulator
itself, `admin_user` (set by http.py's RestServer) the administrator, a user with device
credentials a device user. A device user reaches only its own managed objects (owner, or an
external ID named after it, and their child devices at any depth) and their data, reads template
collections and binaries besides, and never calls the new-device-request, bulk-registration or
credential endpoints; its lists hold its own items only; the owner of what it creates is itself
(a body's `owner` is ignored for it).

Emulator behaviour worth knowing
--------------------------------
- Alarms: a POST for a source and type that has an alarm not CLEARED increments that alarm's
  `count` and takes the new `time` and `text` (201 with that alarm). A POST with status CLEARED
  clears that open alarm. A CLEARED alarm cannot be reopened by PUT (422).
- Operations: created PENDING; PENDING -> EXECUTING, SUCCESSFUL or FAILED; EXECUTING ->
  SUCCESSFUL or FAILED; setting the current status again is accepted (a re-delivered QoS 1
  update); other changes 422. `on_operation_created(cb)` callbacks get the new operation (with
  `self`) after it is stored, on the caller's thread.
- New device requests: POST `{"id": ...}` -> WAITING_FOR_CONNECTION; the bootstrap connector calls
  `bootstrap_request(id)` when a device publishes its secret (-> PENDING_ACCEPTANCE, creating the
  request if needed); PUT `{"status": "ACCEPTED"}` only from PENDING_ACCEPTANCE, then the
  `on_request_accepted(cb)` callbacks get the request; the connector issues the password with
  `issue_credentials(id, password)`.
- Bulk registration (seed 002's CSV, see fleetcsv.py) answers 201 with Cumulocity's
  `numberOfAll`, `numberOfCreated`, `numberOfFailed`, `numberOfSuccessful`,
  `credentialUpdatedList` and `failedCreationList` (entries carry `bulkNewDeviceStatus` as
  Cumulocity and the same value as `creationStatus`; `line` is the 1-based line number, not the
  line's text, which holds a password; `failureReason` names the columns). Each valid row gives
  its ICCID column (the device's MQTT user) the row's password through the CredentialSink,
  records the credentials and an ACCEPTED new device request whose `microcot_BulkRegistration`
  fragment keeps ID (external ID), NAME, TYPE and SHELL. A row whose ICCID has credentials already
  updates them (`credentialUpdatedList`). No managed object is created: the device creates itself
  after connecting (seed 002, "Selbsterstellen des Gerätes"). The accepted hook is not called:
  these devices have their password and do not bootstrap. An unusable header is a 422.
- `/devicecontrol/deviceCredentials/{id}` (an emulator extension): GET says whether the device
  has credentials (`id`, `username`, `created`, `source`; never a password); DELETE removes them
  from the broker (its next connect fails with CONNACK 5), the record, and an ACCEPTED new device
  request of that id, so a re-bootstrap must be accepted again (seed 002, "Löschen eines
  Gerätes").
- Binaries (`/inventory/binaries`, Cumulocity's): POST takes multipart/form-data with the parts
  `object` (JSON: `name`, `type`, further fragments) and `file` (the content; its Content-Type
  becomes `contentType`, default application/octet-stream) and answers 201 with a managed object
  holding `c8y_IsBinary`, `name`, `type`, `length`, `contentType` and `c8y_Checksum: {"sha256":
  <hex>}` (its `self` is the binary's URL); the bytes go to binaries.py's store (a file under the
  data directory). GET /{id} answers with `content` set (ApiResult): webapp.py streams the file
  with `ETag` (the SHA-256), `Accept-Ranges: bytes` and Range/If-Range support. PUT /{id}
  replaces the content (the raw body with its Content-Type, or a multipart `file` part) and
  answers 201 as Cumulocity; DELETE removes object and file (as does DELETE of the managed
  object). GET lists them (filters `type`, `owner`, `text`). A file over the store's `max_size`
  is a 413. Reading is open to every authenticated user (devices download firmware with their own
  credentials); creating, replacing and deleting is refused to device users (403), through
  /inventory/managedObjects/{id} too. A body may be
  given as bytes, as the Path of a spooled file, or as a parsed `forms.Form` whose file part is
  spooled in the store already (webapp.py streams uploads to disk; multipart bodies are parsed
  by python-multipart, forms.py, here too when given as bytes).
- Event binaries (`/event/events/{id}/binaries`, Cumulocity's attachments, one per event): POST
  takes multipart/form-data (a `file` part, optionally an `object` part with `name` and `type`)
  or the raw content with its Content-Type; the event gets `c8y_IsBinary: {"name", "length",
  "type"}` and the answer is 201 `{"self", "id", "source", "name", "type", "length"}`; a second
  POST is 409 (PUT replaces). GET streams the bytes with that type (as a binary's GET, ETag from
  the file's version), DELETE removes file and fragment, deleting the event removes both too.
  The bytes live in the binaries' store under the event's id. Admin: every event; a device user:
  only events of its own objects, else 403, for reading too.
- Availability (availability.py): every managed object with `c8y_RequiredAvailability` is
  returned with a computed `c8y_Availability`; `record_message(mo_id)` notes a device's message,
  `check_availability()` raises `c8y_UnavailabilityAlarm` for devices that became unavailable.
- `/tenant/currentTenant`: `name` is the tenant given to Api, `domainName` the host:port of
  `base_url` (where a device reaches this platform over HTTP).
- `POST /s`: SmartREST 1.0 over HTTP (body `15,<X-ID>` rows, or header `X-Id`). webapp.py hands it
  to the SmartREST engine's callable; `handle` itself answers 501 for it.

SmartREST template collections (the representation the engine uses, through this API only)
------------------------------------------------------------------------------------------
As on Cumulocity (and as Telekom's Java SDK reads them): a managed object with
- `name` = the X-ID, `type` = `com_cumulocity_model_smartrest_SmartRestTemplate`,
- the fragment `com_cumulocity_model_smartrest_SmartRestTemplate` =
  `{"requestTemplates": [{"msgId", "method", "resourceUri", "contentType", "accept",
  "placeholder", "values": [types], "templateString"}], "responseTemplates": [{"msgId", "base",
  "condition", "pattern": [paths]}], "registration": "<the 10,/11, rows as registered>"}`
  (the engine decides the content; `registration` lets it rebuild a collection with templates.py),
- the external ID type `c8y_SmartRestDeviceIdentifier`, value = the X-ID.
Find one with GET /identity/externalIds/c8y_SmartRestDeviceIdentifier/{xid}, then GET the managed
object; delete it with DELETE /inventory/managedObjects/{id} (its external ID goes with it).
`find_template_collection` and `create_template_collection` below do exactly that; the latter is
race-safe (of two concurrent registrations of one X-ID, the second gets 409 and leaves nothing).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from .. import fleetcsv
from . import authz, jsonsafe
from . import availability as avail
from .authz import ACCESS_DENIED
from .binaries import CHUNK, BinaryStore, Buffer, Stored, mapped
from .forms import Form, FormError, FormPart, FormReader, FormTooLarge, parse_form
from .model import (
    BadField,
    Conflict,
    Invalid,
    Model,
    ModelError,
    NotFound,
    Page,
    parse_id,
    parse_time,
)

log = logging.getLogger(__name__)

SMARTREST_XID_TYPE = "c8y_SmartRestDeviceIdentifier"
SMARTREST_FRAGMENT = "com_cumulocity_model_smartrest_SmartRestTemplate"
SMARTREST_MO_TYPE = SMARTREST_FRAGMENT
BULK_FRAGMENT = "microcot_BulkRegistration"
BINARY_FRAGMENT = "c8y_IsBinary"
CHECKSUM_FRAGMENT = "c8y_Checksum"
EVENT_BINARY_FRAGMENT = "c8y_IsBinary"  # on an event: its attachment's name, length, type
MAX_OBJECT_PART = 64 << 10

DEFAULT_PAGE_SIZE = 5
MAX_PAGE_SIZE = 2000
MAX_PARAM_DIGITS = 18  # a 64-bit integer, whatever the digits
MAX_OFFSET = jsonsafe.INT64_MAX
ERROR_INFO = "https://cumulocity.com/guides/reference/rest-implementation/#error-reporting"

JSON = dict[str, Any]


@dataclass(frozen=True)
class BinaryContent:
    """The content of a binary, for the HTTP layer to stream (GET /inventory/binaries/{id})."""

    path: Path
    length: int
    content_type: str
    etag: str
    name: str | None

    def read(self) -> bytes:
        return self.path.read_bytes()


class ApiResult(NamedTuple):
    status: int
    body: dict[str, Any] | list[Any] | None
    reason: str
    headers: dict[str, str] = {}  # never mutated: every result builds its own
    content: BinaryContent | None = None


class CredentialSink(Protocol):
    """Where device passwords go (the Broker); None in unit tests. A sink that also has
    `add_devices(pairs)` gets many devices at once through it (issue_credentials_many)."""

    def add_device(self, device_id: str, password: str) -> None: ...

    def remove_device(self, device_id: str) -> bool: ...


class ApiError(Exception):
    """An error answer: status, `<domain>/<code>` and message."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass
class _Req:
    method: str
    path: str
    params: dict[str, str]
    raw_params: list[tuple[str, str]]
    body: Any
    content_type: str | None
    user: str | None
    domain: str
    args: list[str] = field(default_factory=list)
    principal: authz.Principal = authz.INTERNAL


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _result(status: int, body: Any = None, headers: dict[str, str] | None = None) -> ApiResult:
    return ApiResult(status, body, _reason(status), dict(headers or {}))


Handler = Callable[["Api", _Req], ApiResult]
# a collection query for one page, the second argument overriding its object filter
Query = Callable[[Page, "int | None"], tuple[list[dict[str, Any]], int]]


class Api:
    """Cumulocity's REST resources over a Model; see the module docstring for the list."""

    def __init__(self, model: Model, credentials: CredentialSink | None = None,
                 tenant: str = "t-emulator", base_url: str = "http://127.0.0.1",
                 binaries: BinaryStore | None = None, admin_user: str | None = None) -> None:
        self.model = model
        # the REST server's admin (http.py sets it); None: see authz.principal_of
        self.admin_user = admin_user
        self.fence = authz.Fence(model)
        if binaries is None:
            folder = model.folder
            binaries = BinaryStore(None if folder is None else folder / "binaries")
        self.binaries = binaries
        self.availability = avail.Availability(model)
        self.credentials = credentials
        self.tenant = tenant
        self.base_url = base_url.rstrip("/")
        self._op_hooks: list[Callable[[JSON], None]] = []
        self._accept_hooks: list[Callable[[JSON], None]] = []

    # -- hooks --------------------------------------------------------------------------------

    def on_operation_created(self, callback: Callable[[JSON], None]) -> None:
        """Call `callback(operation)` for every new operation, after it is stored."""
        self._op_hooks.append(callback)

    def on_request_accepted(self, callback: Callable[[JSON], None]) -> None:
        """Call `callback(request)` when a new device request becomes ACCEPTED by PUT."""
        self._accept_hooks.append(callback)

    @staticmethod
    def _fire(hooks: list[Callable[[JSON], None]], arg: JSON) -> None:
        for cb in list(hooks):
            try:
                cb(arg)
            except Exception:  # a broken listener must not turn a stored object into an error
                log.exception("emulator API hook %r failed", cb)

    # -- entry point --------------------------------------------------------------------------

    def handle(self, method: str, target: str, body: bytes | str | dict[str, Any] | list[Any]
               | Path | Form | None = None, content_type: str | None = None,
               user: str | None = None) -> ApiResult:
        """Answer one request; never raises for bad input (errors are results)."""
        method = method.upper()
        parts = urlsplit(target)
        raw_params = parse_qsl(parts.query, keep_blank_values=True)
        segs = path_segments(parts.path)
        domain = segs[0] if segs else "general"
        req = _Req(method, parts.path, dict(raw_params), raw_params, body, content_type, user,
                   domain)
        try:
            req.principal = self.principal(user)
            handler, req.args, allowed, pattern = self._route(segs, method)
            if handler is None:
                if allowed:
                    raise ApiError(405, f"{domain}/Method Not Allowed",
                                   f"{method} is not supported on {parts.path}; use "
                                   + ", ".join(allowed), {"Allow": ", ".join(allowed)})
                raise ApiError(404, f"{domain}/Not Found", f"no resource {parts.path}")
            authz.check_route(req.principal, pattern, method)
            return handler(self, req)
        except ApiError as e:
            return self._error(e.status, e.code, e.message, e.headers)
        except authz.Forbidden as e:
            return self._error(403, "security/Forbidden", e.message)
        except jsonsafe.Refused as e:
            return self._error(422, f"{domain}/validationError", str(e))
        except NotFound as e:
            return self._error(404, f"{domain}/Not Found", e.message)
        except Conflict as e:
            return self._error(409, f"{domain}/Duplicate", e.message)
        except BadField as e:
            return self._error(400, f"{domain}/badRequest", e.message)
        except Invalid as e:
            return self._error(422, f"{domain}/validationError", e.message)
        except ModelError as e:
            return self._error(422, f"{domain}/validationError", e.message)
        except Exception:
            # a bug or a database failure: the caller (HTTP client, SmartREST row) gets a 500
            # like any other error instead of a dropped connection; the body is not logged
            # since a bulk registration's holds passwords
            log.exception("emulator API: %s %s failed", method, parts.path)
            return self._error(500, f"{domain}/Internal Server Error",
                               "the emulator failed on this request; see its log")

    @staticmethod
    def _error(status: int, code: str, message: str,
               headers: dict[str, str] | None = None) -> ApiResult:
        return _result(status, {"error": code, "message": message, "info": ERROR_INFO}, headers)

    def principal(self, user: str | None) -> authz.Principal:
        """Who `user` is for this Api (authz.principal_of)."""
        return authz.principal_of(user, self.admin_user,
                                  user is not None and self.model.has_credentials(user))

    def _route(self, segs: list[str], method: str
               ) -> tuple[Handler | None, list[str], list[str], tuple[str, ...]]:
        found = match_route(segs)
        if found is None:
            return None, [], [], ()
        pattern, methods, args = found
        return methods.get(method), args, sorted(methods), pattern

    # -- request helpers ----------------------------------------------------------------------

    def _json(self, req: _Req) -> Any:
        ct = (req.content_type or "").split(";")[0].strip().lower()
        if ct and "json" not in ct:
            raise ApiError(415, f"{req.domain}/Unsupported Media Type",
                           f"the body must be JSON (application/json), not {ct}")
        b = req.body
        if isinstance(b, dict | list):
            jsonsafe.check(b)
            return b
        if isinstance(b, Path):
            raise ApiError(415, f"{req.domain}/Unsupported Media Type",
                           "this resource takes a JSON body")
        if b is None or b in (b"", ""):
            raise ApiError(400, f"{req.domain}/badRequest", f"{req.method} {req.path} needs a "
                                                              "JSON body")
        if isinstance(b, bytes | bytearray):
            try:
                b = bytes(b).decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise ApiError(400, f"{req.domain}/badRequest",
                               f"the body is not UTF-8 (byte {e.start})") from None
        try:
            return jsonsafe.loads(b)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"{req.domain}/badRequest",
                           f"Invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None

    def _param_id(self, req: _Req, name: str) -> int | None:
        v = req.params.get(name)
        if v is None or v == "":
            return None
        try:
            return parse_id(v, name)
        except ModelError as e:
            raise ApiError(400, f"{req.domain}/badRequest", e.message) from None

    def _param_time(self, req: _Req, name: str) -> int | None:
        v = req.params.get(name)
        if v is None or v == "":
            return None
        try:
            return parse_time(v, name)[1]
        except ModelError as e:
            raise ApiError(400, f"{req.domain}/badRequest", e.message) from None

    def _param_bool(self, req: _Req, name: str) -> bool | None:
        v = req.params.get(name)
        if v is None or v == "":
            return None
        if v.lower() in ("true", "false"):
            return v.lower() == "true"
        raise ApiError(400, f"{req.domain}/badRequest", f"{name} must be true or false, "
                                                        f"got {v!r}")

    def _param_int(self, req: _Req, name: str, default: int) -> int:
        v = req.params.get(name)
        if v is None or v == "":
            return default
        # ASCII digits only: int() would take "1_000", " 5" and other scripts' digits, and
        # raises beyond 4300 digits
        digits = v.lstrip("0")
        if not (v.isascii() and v.isdigit()) or not digits:
            raise ApiError(400, f"{req.domain}/badRequest", f"{name} must be a positive whole "
                                                            f"number, got {v[:40]!r}")
        if len(digits) > MAX_PARAM_DIGITS:
            raise ApiError(400, f"{req.domain}/badRequest", f"{name} is too large: {v[:40]}"
                                                            f"{'...' if len(v) > 40 else ''}")
        return int(digits)

    def _paging(self, req: _Req) -> tuple[Page, int, int]:
        size = min(self._param_int(req, "pageSize", DEFAULT_PAGE_SIZE), MAX_PAGE_SIZE)
        current = self._param_int(req, "currentPage", 1)
        if current > MAX_OFFSET // size:  # the offset must fit SQLite's 64-bit integers
            raise ApiError(400, f"{req.domain}/badRequest",
                           f"currentPage {current} is too large for pageSize {size} (at most "
                           f"{MAX_OFFSET // size})")
        return Page((current - 1) * size, size), current, size

    def _collection(self, req: _Req, key: str, items: list[JSON], total: int, current: int,
                    size: int) -> ApiResult:
        stats: JSON = {"currentPage": current, "pageSize": size}
        if self._param_bool(req, "withTotalPages"):
            stats["totalPages"] = math.ceil(total / size)
        body: JSON = {key: items, "statistics": stats,
                      "self": self._page_url(req, current, size)}
        if current * size < total:
            body["next"] = self._page_url(req, current + 1, size)
        if current > 1:
            body["prev"] = self._page_url(req, current - 1, size)
        return _result(200, body)

    def _page_url(self, req: _Req, page: int, size: int) -> str:
        q = [(k, v) for k, v in req.raw_params if k not in ("currentPage", "pageSize")]
        q += [("pageSize", str(size)), ("currentPage", str(page))]
        return self.base_url + req.path + "?" + urlencode(q)

    def _url(self, *segs: str) -> str:
        return self.base_url + "/" + "/".join(quote(s, safe="") for s in segs)

    # -- links --------------------------------------------------------------------------------

    def _link_mo(self, mo: JSON) -> JSON:
        mo = dict(mo)
        mo["self"] = self._url("inventory", "managedObjects", mo["id"])
        frag = self.availability.fragment(mo)
        if frag is not None:
            mo[avail.FRAGMENT] = frag
        for key in ("childDevices", "deviceParents"):
            refs = mo.get(key)
            if isinstance(refs, dict):
                mo[key] = self._link_refs(mo["id"], refs["references"], key == "childDevices")
        return mo

    def _link_refs(self, mo_id: str, refs: list[JSON], children: bool) -> JSON:
        out = []
        for r in refs:
            m = dict(r["managedObject"])
            m["self"] = self._url("inventory", "managedObjects", m["id"])
            ref: JSON = {"managedObject": m}
            if children:
                ref["self"] = self._url("inventory", "managedObjects", mo_id, "childDevices",
                                        m["id"])
            out.append(ref)
        res: JSON = {"references": out}
        if children:
            res["self"] = self._url("inventory", "managedObjects", mo_id, "childDevices")
        return res

    def _link_xid(self, x: JSON) -> JSON:
        return {"externalId": x["externalId"], "type": x["type"],
                "self": self._url("identity", "externalIds", x["type"], x["externalId"]),
                "managedObject": {"id": x["managedObject"]["id"],
                                  "self": self._url("inventory", "managedObjects",
                                                    x["managedObject"]["id"])}}

    def _link_sourced(self, d: JSON, *path: str) -> JSON:
        d = dict(d)
        d["self"] = self._url(*path, d["id"])
        src = d["source"]["id"]
        d["source"] = {"id": src, "self": self._url("inventory", "managedObjects", src)}
        return d

    def _link_op(self, op: JSON) -> JSON:
        return {**op, "self": self._url("devicecontrol", "operations", op["id"])}

    def _link_request(self, r: JSON) -> JSON:
        return {**r, "self": self._url("devicecontrol", "newDeviceRequests", r["id"])}

    def _created(self, body: JSON) -> ApiResult:
        return _result(201, body, {"Location": body["self"]})

    # -- inventory ----------------------------------------------------------------------------

    def _mos_get(self, req: _Req) -> ApiResult:
        page, current, size = self._paging(req)
        ids = None
        if req.params.get("ids"):
            try:
                ids = [parse_id(x.strip(), "ids") for x in req.params["ids"].split(",")
                       if x.strip()]
            except ModelError as e:
                raise ApiError(400, "inventory/badRequest", e.message) from None
        if req.principal.is_device:
            ids = authz.only_owned(ids, self.fence.tree(req.principal))
        items, total = self.model.query_managed_objects(
            page, type=req.params.get("type") or None,
            fragment_type=req.params.get("fragmentType") or None,
            text=req.params.get("text") or None, ids=ids, owner=req.params.get("owner") or None)
        return self._collection(req, "managedObjects", [self._link_mo(m) for m in items], total,
                                current, size)

    def _mos_post(self, req: _Req) -> ApiResult:
        data = self._device_body(req, self._json(req))
        mo = self.model.create_managed_object(data, owner=req.user)
        return self._created(self._link_mo(mo))

    @staticmethod
    def _device_body(req: _Req, data: Any) -> Any:
        """A managed object's body without `owner` when a device sends it: what a device
        creates is its own, and what it owns stays so (the model would take the body's)."""
        if req.principal.is_device and isinstance(data, dict) and "owner" in data:
            return {k: v for k, v in data.items() if k != "owner"}
        return data

    def _mo_get(self, req: _Req) -> ApiResult:
        mo = self.model.get_managed_object(req.args[0])
        self.fence.need(req.principal, mo["id"], read=True)
        return _result(200, self._link_mo(mo))

    def _mo_put(self, req: _Req) -> ApiResult:
        mo = self._writable_mo(req, req.args[0])
        if req.principal.is_device and mo.get("type") == SMARTREST_MO_TYPE:
            # other devices use it, and a registered collection does not change (seed 002): its
            # owner may only delete it
            raise authz.Forbidden()
        data = self._device_body(req, self._json(req))
        return _result(200, self._link_mo(self.model.update_managed_object(mo["id"], data)))

    def _mo_delete(self, req: _Req) -> ApiResult:
        mo = self._writable_mo(req, req.args[0])
        mo_id = mo["id"]
        binary = BINARY_FRAGMENT in mo
        self.model.delete_managed_object(mo_id)
        if binary:
            self.binaries.remove(str(mo_id))
        return _result(204)

    def _writable_mo(self, req: _Req, ident: str) -> JSON:
        """The managed object `ident` (404 if none) if this user may change it: a device its
        own objects, but no binary (only the admin writes those)."""
        mo = self.model.get_managed_object(self._existing_mo(ident))
        self.fence.need(req.principal, mo["id"])
        if BINARY_FRAGMENT in mo:
            self._need_writer(req)
        return mo

    def _existing_mo(self, ident: str) -> int:
        # a malformed id in a path is "no such object", not a validation error
        try:
            return parse_id(ident)
        except ModelError:
            raise NotFound(f"Finding device data from database failed : No managedObject for "
                           f"id '{ident}'!") from None

    def _children_get(self, req: _Req) -> ApiResult:
        mo = self.model.get_managed_object(self._existing_mo(req.args[0]))
        self.fence.need(req.principal, mo["id"])
        page, current, size = self._paging(req)
        refs = mo["childDevices"]["references"]
        linked = self._link_refs(mo["id"], refs[page.offset:page.offset + page.limit], True)
        res = self._collection(req, "references", linked["references"], len(refs), current,
                               size)
        return res

    def _children_post(self, req: _Req) -> ApiResult:
        parent = self._writable_mo(req, req.args[0])["id"]
        data = self._json(req)
        ref = data.get("managedObject") if isinstance(data, dict) else None
        if not isinstance(ref, dict) or ref.get("id") in (None, ""):
            raise Invalid("Following mandatory fields should be included: managedObject.id",
                          "managedObject.id")
        # a device adopting another's object would own it through the parent link
        self.fence.need_existing(req.principal, ref["id"])
        self.model.add_child_device(parent, ref["id"])
        return self._child_ref(parent, parse_id(ref["id"], "managedObject.id"), 201)

    def _child_ref(self, parent: int, child: int, status: int) -> ApiResult:
        mo = self.model.get_managed_object(parent)
        for r in mo["childDevices"]["references"]:
            if r["managedObject"]["id"] == str(child):
                ref = self._link_refs(str(parent), [r], True)["references"][0]
                return _result(status, ref, {"Location": ref["self"]} if status == 201 else None)
        raise NotFound(f"Managed object {child} is not a child device of {parent}")

    def _child_get(self, req: _Req) -> ApiResult:
        parent = self._existing_mo(req.args[0])
        self.fence.need_existing(req.principal, parent)
        return self._child_ref(parent, self._existing_mo(req.args[1]), 200)

    def _child_delete(self, req: _Req) -> ApiResult:
        parent = self._writable_mo(req, req.args[0])["id"]
        self.model.remove_child_device(parent, self._existing_mo(req.args[1]))
        return _result(204)

    # -- binaries -----------------------------------------------------------------------------

    def _need_writer(self, req: _Req) -> None:
        if req.principal.is_device:
            raise authz.Forbidden(ACCESS_DENIED + ": devices may download binaries; only the "
                                                  "admin creates, replaces or deletes them")

    def _link_binary(self, mo: JSON) -> JSON:
        return {**self._link_mo(mo), "self": self._url("inventory", "binaries", mo["id"])}

    def _binary_mo(self, ident: str) -> JSON:
        mo_id = self._existing_mo(ident)
        mo = self.model.get_managed_object(mo_id)
        if BINARY_FRAGMENT not in mo:
            raise NotFound(f"Binary {mo_id} not found: managed object {mo_id} is no binary")
        return mo

    @contextlib.contextmanager
    def _upload(self, req: _Req) -> Iterator[Buffer]:
        b = req.body
        if isinstance(b, Path):
            with mapped(b) as m:
                yield m
            return
        if isinstance(b, dict | list):
            raise ApiError(415, f"{req.domain}/Unsupported Media Type",
                           "a binary is uploaded as multipart/form-data or as the raw content, "
                           "not as JSON")
        yield b.encode("utf-8") if isinstance(b, str) else bytes(b or b"")

    def _store_raw(self, req: _Req, domain: str) -> Stored:
        """A raw body (bytes, or the Path of a spooled request body) as a file of the store."""
        with self._upload(req) as buf:
            self._too_large(len(buf), domain)
            return self.binaries.write(buf)

    def _too_large(self, n: int, domain: str = "inventory") -> None:
        if n > self.binaries.max_size:
            raise ApiError(413, f"{domain}/Request Entity Too Large",
                           f"the file has {n} bytes; this emulator accepts binaries of at most "
                           f"{self.binaries.max_size} bytes (its max_binary setting)")

    @staticmethod
    def _is_multipart(req: _Req) -> bool:
        if isinstance(req.body, Form):
            return True
        return (req.content_type or "").split(";")[0].strip().lower().startswith("multipart/")

    def _form(self, req: _Req) -> Form:
        """The multipart body: a Form the HTTP layer parsed, or parsed here (python-multipart,
        forms.py) from bytes, or from a spooled file with its file part spooled again."""
        b = req.body
        if isinstance(b, Form):
            return b
        if isinstance(b, dict | list):
            raise ApiError(415, f"{req.domain}/Unsupported Media Type",
                           "a multipart body was expected, not JSON")
        try:
            if isinstance(b, Path):
                reader = FormReader(req.content_type, self.binaries,
                                    max_file=self.binaries.max_size)
                try:
                    with open(b, "rb") as f:
                        while chunk := f.read(CHUNK):
                            reader.feed(chunk)
                    return reader.finish()
                except BaseException:
                    reader.abort()
                    raise
            raw = b.encode("utf-8") if isinstance(b, str) else bytes(b or b"")
            return parse_form(raw, req.content_type)
        except FormTooLarge as e:
            raise ApiError(413, f"{req.domain}/Request Entity Too Large",
                           f"{e}; this emulator accepts binaries of at most "
                           f"{self.binaries.max_size} bytes (its max_binary setting)") from None
        except FormError as e:
            raise ApiError(400, f"{req.domain}/badRequest", str(e)) from None

    def _store_part(self, part: FormPart, domain: str) -> Stored:
        """A form's file part as a file of the store (spooled already, or written now)."""
        self._too_large(part.length, domain)
        if isinstance(part.content, Stored):
            return part.content
        return self.binaries.write(part.content)

    def _object_part(self, part: FormPart, req: _Req) -> Any:
        """The JSON of a form's `object` part."""
        if part.length > MAX_OBJECT_PART:
            raise ApiError(400, f"{req.domain}/badRequest",
                           f"the object part has {part.length} bytes; at most "
                           f"{MAX_OBJECT_PART}")
        return self._json(_Req(req.method, req.path, {}, [], part.data(), "application/json",
                               req.user, req.domain))

    def _binaries_get(self, req: _Req) -> ApiResult:
        page, current, size = self._paging(req)
        items, total = self.model.query_managed_objects(
            page, type=req.params.get("type") or None, fragment_type=BINARY_FRAGMENT,
            text=req.params.get("text") or None, owner=req.params.get("owner") or None)
        return self._collection(req, "managedObjects", [self._link_binary(m) for m in items],
                                total, current, size)

    def _binaries_post(self, req: _Req) -> ApiResult:
        self._need_writer(req)
        if not self._is_multipart(req):
            raise ApiError(400, "inventory/badRequest",
                           "POST /inventory/binaries takes multipart/form-data with the parts "
                           "object (JSON with name and type) and file (the content)")
        form = self._form(req)
        try:
            obj_part = form.named("object")
            file_part = form.file()
            missing = [n for n, p in (("object", obj_part), ("file", file_part)) if p is None]
            if missing or obj_part is None or file_part is None:
                raise Invalid("Following mandatory fields should be included: "
                              + ",".join(missing), missing[0])
            obj = self._object_part(obj_part, req)
            if not isinstance(obj, dict):
                raise BadField("the object part must be a JSON object with name and type")
            if obj.get("name") in (None, ""):
                raise Invalid("Following mandatory fields should be included: name", "name")
            stored = self._store_part(file_part, "inventory")
        except BaseException:
            form.discard()
            raise
        ctype = file_part.content_type or "application/octet-stream"
        data = {**obj, "type": obj.get("type") or ctype, BINARY_FRAGMENT: "",
                "length": stored.length, "contentType": ctype,
                CHECKSUM_FRAGMENT: {"sha256": stored.sha256}}
        try:
            mo = self.model.create_managed_object(data, owner=req.user)
            self.binaries.commit(stored, mo["id"])
        except BaseException:
            self.binaries.discard(stored)
            raise
        return self._created(self._link_binary(mo))

    def _binary_get(self, req: _Req) -> ApiResult:
        mo = self._binary_mo(req.args[0])
        path = self.binaries.path(mo["id"])
        if not path.is_file():
            raise NotFound(f"Binary {mo['id']} has no content (its file is missing)")
        checksum = mo.get(CHECKSUM_FRAGMENT)
        sha = checksum.get("sha256") if isinstance(checksum, dict) else None
        etag = f'"{sha}"' if isinstance(sha, str) else f'"{mo["id"]}-{mo["lastUpdated"]}"'
        ctype = mo.get("contentType")
        content = BinaryContent(path, path.stat().st_size,
                                ctype if isinstance(ctype, str) and ctype else
                                "application/octet-stream", etag, mo.get("name"))
        return ApiResult(200, None, _reason(200), {}, content)

    def _binary_put(self, req: _Req) -> ApiResult:
        self._need_writer(req)
        mo = self._binary_mo(req.args[0])
        if self._is_multipart(req):
            form = self._form(req)
            try:
                part = form.file()
                if part is None:
                    raise Invalid("Following mandatory fields should be included: file", "file")
                ctype = part.content_type or "application/octet-stream"
                stored = self._store_part(part, "inventory")
            except BaseException:
                form.discard()
                raise
        else:
            ctype = (req.content_type or "").strip() or "application/octet-stream"
            stored = self._store_raw(req, "inventory")
        try:
            self.binaries.commit(stored, mo["id"])
        except BaseException:
            self.binaries.discard(stored)
            raise
        mo = self.model.update_managed_object(mo["id"], {
            "length": stored.length, "contentType": ctype,
            CHECKSUM_FRAGMENT: {"sha256": stored.sha256}})
        return _result(201, self._link_binary(mo))

    def _binary_delete(self, req: _Req) -> ApiResult:
        self._need_writer(req)
        mo = self._binary_mo(req.args[0])
        self.model.delete_managed_object(mo["id"])
        self.binaries.remove(mo["id"])
        return _result(204)

    # -- identity -----------------------------------------------------------------------------

    def _xid_get(self, req: _Req) -> ApiResult:
        x = self.model.get_external_id(*req.args)
        self.fence.need(req.principal, x["managedObject"]["id"], read=True)
        return _result(200, self._link_xid(x))

    def _xid_delete(self, req: _Req) -> ApiResult:
        x = self.model.get_external_id(*req.args)
        self.fence.need(req.principal, x["managedObject"]["id"])
        self.model.delete_external_id(*req.args)
        return _result(204)

    def _global_xids_get(self, req: _Req) -> ApiResult:
        mo_id = self._existing_mo(req.args[0])
        if self.model.managed_object_exists(mo_id):
            self.fence.need(req.principal, mo_id, read=True)
        items = [self._link_xid(x) for x in self.model.external_ids_of(mo_id)]
        return _result(200, {"externalIds": items,
                             "self": self._url("identity", "globalIds", str(mo_id),
                                               "externalIds")})

    def _global_xids_post(self, req: _Req) -> ApiResult:
        mo_id = self._existing_mo(req.args[0])
        p = req.principal
        self.fence.need_existing(p, mo_id)
        data = self._json(req)
        value = data.get("externalId") if isinstance(data, dict) else None
        if isinstance(value, str) and self.fence.claims_other_device(p, value):
            raise authz.Forbidden()
        try:
            x = self.model.add_external_id(mo_id, data)
        except Conflict as e:
            if not p.is_device:
                raise
            # the model's message names the other object: not for a device's eyes
            raise Conflict(f"External id [type={data.get('type')}, value={value}] is already "
                           "assigned", e.field) from None
        return self._created(self._link_xid(x))

    # -- measurements, events, alarms ---------------------------------------------------------

    def _measurements_get(self, req: _Req) -> ApiResult:
        page, current, size = self._paging(req)
        source = self._param_id(req, "source")
        mtype = req.params.get("type") or None
        vtype = req.params.get("valueFragmentType") or None
        series = req.params.get("valueFragmentSeries") or None
        date_from, date_to = self._param_time(req, "dateFrom"), self._param_time(req, "dateTo")
        revert = bool(self._param_bool(req, "revert"))

        def query(pg: Page, src: int | None) -> tuple[list[JSON], int]:
            return self.model.query_measurements(
                pg, source=src or source, type=mtype, value_fragment_type=vtype,
                value_fragment_series=series, date_from=date_from, date_to=date_to,
                revert=revert)

        items, total = self._scoped(req, page, query, [source], "time", revert)
        return self._collection(req, "measurements",
                                [self._link_sourced(m, "measurement", "measurements")
                                 for m in items], total, current, size)

    def _measurements_post(self, req: _Req) -> ApiResult:
        data = self._json(req)
        self._need_source(req, data)
        m = self.model.create_measurement(data)
        return self._created(self._link_sourced(m, "measurement", "measurements"))

    def _measurement_get(self, req: _Req) -> ApiResult:
        m = self.model.get_measurement(self._existing(req, "measurement"))
        self.fence.need(req.principal, m["source"]["id"])
        return _result(200, self._link_sourced(m, "measurement", "measurements"))

    def _measurement_delete(self, req: _Req) -> ApiResult:
        mid = self._existing(req, "measurement")
        self.fence.need(req.principal, self.model.get_measurement(mid)["source"]["id"])
        self.model.delete_measurement(mid)
        return _result(204)

    # -- a device's view of the data ----------------------------------------------------------

    def _need_source(self, req: _Req, data: Any) -> None:
        """Forbidden if a device posts data for an object that is not its own."""
        src = data.get("source") if isinstance(data, dict) else None
        sid = src.get("id") if isinstance(src, dict) else None
        if isinstance(sid, str | int) and not isinstance(sid, bool):
            self.fence.need_existing(req.principal, sid)

    def _scoped(self, req: _Req, page: Page, query: Query, given: list[int | None],
                time_key: str, descending: bool) -> tuple[list[JSON], int]:
        """A collection query as this user may see it: an id filter naming another device's
        object is refused; a device's unfiltered query covers its own objects only (one query
        per object, merged in the query's order: `time_key` then id, `descending` or not)."""
        p = req.principal
        if not p.is_device or any(g is not None for g in given):
            for g in given:
                self.fence.need_existing(p, g)
            return query(page, None)
        upto = Page(0, page.offset + page.limit)
        items: list[JSON] = []
        total = 0
        for mo_id in self.fence.tree(p):
            got, n = query(upto, mo_id)
            items += got
            total += n
        items.sort(key=lambda d: (_ms_of(d.get(time_key)), int(d["id"])), reverse=descending)
        return items[page.offset:page.offset + page.limit], total

    def _existing(self, req: _Req, what: str) -> int:
        try:
            return parse_id(req.args[0])
        except ModelError:
            raise NotFound(f"Finding {what} from database failed : No {what} for id "
                           f"'{req.args[0]}'!") from None

    def _events_get(self, req: _Req) -> ApiResult:
        page, current, size = self._paging(req)
        source = self._param_id(req, "source")
        etype = req.params.get("type") or None
        frag = req.params.get("fragmentType") or None
        date_from, date_to = self._param_time(req, "dateFrom"), self._param_time(req, "dateTo")
        revert = bool(self._param_bool(req, "revert"))

        def query(pg: Page, src: int | None) -> tuple[list[JSON], int]:
            return self.model.query_events(pg, source=src or source, type=etype,
                                           fragment_type=frag, date_from=date_from,
                                           date_to=date_to, revert=revert)

        items, total = self._scoped(req, page, query, [source], "time", not revert)
        return self._collection(req, "events", [self._link_sourced(e, "event", "events")
                                                for e in items], total, current, size)

    def _events_post(self, req: _Req) -> ApiResult:
        data = self._json(req)
        self._need_source(req, data)
        return self._created(self._link_sourced(self.model.create_event(data),
                                                "event", "events"))

    def _own_event(self, req: _Req) -> JSON:
        """The event of the path, if this user may use it."""
        e = self.model.get_event(self._existing(req, "event"))
        self.fence.need(req.principal, e["source"]["id"])
        return e

    def _event_get(self, req: _Req) -> ApiResult:
        return _result(200, self._link_sourced(self._own_event(req), "event", "events"))

    def _event_put(self, req: _Req) -> ApiResult:
        e = self.model.update_event(self._own_event(req)["id"], self._json(req))
        return _result(200, self._link_sourced(e, "event", "events"))

    def _event_delete(self, req: _Req) -> ApiResult:
        eid = self._own_event(req)["id"]
        self.model.delete_event(eid)
        self.binaries.remove(str(eid))  # its attachment (ids are unique across all objects)
        return _result(204)

    # -- event binaries (attachments) ---------------------------------------------------------

    def _attachable(self, req: _Req) -> JSON:
        """The event of /event/events/{id}/binaries, if this user may use its attachment."""
        return self._own_event(req)

    def _event_binary_url(self, eid: str) -> str:
        return self._url("event", "events", eid, "binaries")

    def _event_binary_post(self, req: _Req) -> ApiResult:
        e = self._attachable(req)
        if EVENT_BINARY_FRAGMENT in e:
            raise ApiError(409, "event/Duplicate",
                           f"event {e['id']} has an attachment already (PUT replaces it)")
        return self._event_binary_store(req, e)

    def _event_binary_put(self, req: _Req) -> ApiResult:
        return self._event_binary_store(req, self._attachable(req))

    def _event_binary_store(self, req: _Req, e: JSON) -> ApiResult:
        name: str | None = None
        if self._is_multipart(req):
            form = self._form(req)
            try:
                part = form.file()
                if part is None:
                    raise Invalid("Following mandatory fields should be included: file", "file")
                ctype = part.content_type
                obj_part = form.named("object")
                if obj_part is not None:
                    obj = self._object_part(obj_part, req)
                    if not isinstance(obj, dict):
                        raise BadField("the object part must be a JSON object (name, type)")
                    if isinstance(obj.get("name"), str) and obj["name"]:
                        name = obj["name"]
                    if isinstance(obj.get("type"), str) and obj["type"]:
                        ctype = obj["type"]
                name = name or part.filename
                stored = self._store_part(part, "event")
            except BaseException:
                form.discard()
                raise
        else:
            ctype = (req.content_type or "").strip()
            stored = self._store_raw(req, "event")
        info = {"name": name or f"event-{e['id']}", "length": stored.length,
                "type": ctype or "application/octet-stream"}
        try:
            self.binaries.commit(stored, e["id"])
        except BaseException:
            self.binaries.discard(stored)
            raise
        self.model.update_event(e["id"], {EVENT_BINARY_FRAGMENT: info})
        return _result(201, {"self": self._event_binary_url(e["id"]), "id": e["id"],
                             "source": e["id"], **info})

    def _event_binary_get(self, req: _Req) -> ApiResult:
        e = self._attachable(req)
        info = e.get(EVENT_BINARY_FRAGMENT)
        path = self.binaries.path(e["id"])
        if not isinstance(info, dict) or not path.is_file():
            raise NotFound(f"event {e['id']} has no attachment")
        st = path.stat()
        # the file is replaced as a whole (rename): its mtime and size tell versions apart
        etag = f'"{e["id"]}-{st.st_mtime_ns}-{st.st_size}"'
        ctype = info.get("type")
        name = info.get("name")
        return ApiResult(200, None, _reason(200), {}, BinaryContent(
            path, st.st_size, ctype if isinstance(ctype, str) and ctype else
            "application/octet-stream", etag, name if isinstance(name, str) else None))

    def _event_binary_delete(self, req: _Req) -> ApiResult:
        e = self._attachable(req)
        if EVENT_BINARY_FRAGMENT not in e and not self.binaries.path(e["id"]).is_file():
            raise NotFound(f"event {e['id']} has no attachment")
        self.binaries.remove(e["id"])
        self.model.update_event(e["id"], {EVENT_BINARY_FRAGMENT: None})
        return _result(204)

    def _alarms_get(self, req: _Req) -> ApiResult:
        page, current, size = self._paging(req)
        status = _list_param(req, "status")
        source = self._param_id(req, "source")
        atype = req.params.get("type") or None
        severity = req.params.get("severity") or None
        resolved = self._param_bool(req, "resolved")
        date_from, date_to = self._param_time(req, "dateFrom"), self._param_time(req, "dateTo")
        revert = bool(self._param_bool(req, "revert"))

        def query(pg: Page, src: int | None) -> tuple[list[JSON], int]:
            return self.model.query_alarms(pg, source=src or source, type=atype,
                                           status=status or None, severity=severity,
                                           resolved=resolved, date_from=date_from,
                                           date_to=date_to, revert=revert)

        items, total = self._scoped(req, page, query, [source], "time", not revert)
        return self._collection(req, "alarms", [self._link_sourced(a, "alarm", "alarms")
                                                for a in items], total, current, size)

    def _alarms_post(self, req: _Req) -> ApiResult:
        data = self._json(req)
        self._need_source(req, data)
        alarm, _new = self.model.create_alarm(data)
        return self._created(self._link_sourced(alarm, "alarm", "alarms"))

    def _own_alarm(self, req: _Req) -> JSON:
        a = self.model.get_alarm(self._existing(req, "alarm"))
        self.fence.need(req.principal, a["source"]["id"])
        return a

    def _alarm_get(self, req: _Req) -> ApiResult:
        return _result(200, self._link_sourced(self._own_alarm(req), "alarm", "alarms"))

    def _alarm_put(self, req: _Req) -> ApiResult:
        a = self.model.update_alarm(self._own_alarm(req)["id"], self._json(req))
        return _result(200, self._link_sourced(a, "alarm", "alarms"))

    # -- operations ---------------------------------------------------------------------------

    def _operations_get(self, req: _Req) -> ApiResult:
        page, current, size = self._paging(req)
        status = _list_param(req, "status")
        device, agent = self._param_id(req, "deviceId"), self._param_id(req, "agentId")
        frag = req.params.get("fragmentType") or None
        date_from, date_to = self._param_time(req, "dateFrom"), self._param_time(req, "dateTo")
        revert = bool(self._param_bool(req, "revert"))

        def query(pg: Page, mo: int | None) -> tuple[list[JSON], int]:
            return self.model.query_operations(pg, device=mo or device, status=status or None,
                                               agent=agent, fragment_type=frag,
                                               date_from=date_from, date_to=date_to,
                                               revert=revert)

        items, total = self._scoped(req, page, query, [device, agent], "creationTime", revert)
        return self._collection(req, "operations", [self._link_op(o) for o in items], total,
                                current, size)

    def _operations_post(self, req: _Req) -> ApiResult:
        data = self._json(req)
        dev = data.get("deviceId") if isinstance(data, dict) else None
        if isinstance(dev, str | int) and not isinstance(dev, bool):
            self.fence.need_existing(req.principal, dev)
        op = self.model.create_operation(data)
        user = self.device_user(str(op["deviceId"]))
        if user is not None and self.shell_off(user):
            op = self.refuse_operation(op["id"], user)
        op = self._link_op(op)
        self._fire(self._op_hooks, op)
        return self._created(op)

    def _own_operation(self, req: _Req) -> JSON:
        op = self.model.get_operation(self._existing(req, "operation"))
        self.fence.need(req.principal, op["deviceId"])
        return op

    def _operation_get(self, req: _Req) -> ApiResult:
        return _result(200, self._link_op(self._own_operation(req)))

    def _operation_put(self, req: _Req) -> ApiResult:
        op = self.model.update_operation(self._own_operation(req)["id"], self._json(req))
        return _result(200, self._link_op(op))

    # -- new device requests ------------------------------------------------------------------

    def _requests_get(self, req: _Req) -> ApiResult:
        page, current, size = self._paging(req)
        items, total = self.model.query_device_requests(page,
                                                        status=req.params.get("status") or None)
        return self._collection(req, "newDeviceRequests", [self._link_request(r) for r in items],
                                total, current, size)

    def _requests_post(self, req: _Req) -> ApiResult:
        data = self._json(req)
        if not isinstance(data, dict):
            raise BadField("the body must be a JSON object {\"id\": ...}")
        if data.get("id") in (None, ""):
            raise Invalid("Following mandatory fields should be included: id", "id")
        r = self.model.create_device_request(data["id"])
        return self._created(self._link_request(r))

    def _request_get(self, req: _Req) -> ApiResult:
        return _result(200, self._link_request(self.model.get_device_request(req.args[0])))

    def _request_put(self, req: _Req) -> ApiResult:
        data = self._json(req)
        if not isinstance(data, dict):
            raise BadField("the body must be a JSON object {\"status\": ...}")
        status = data.get("status")
        if status in (None, ""):
            raise Invalid("Following mandatory fields should be included: status", "status")
        if not isinstance(status, str):
            raise BadField("status must be a string", "status")
        before = self.model.get_device_request(req.args[0])
        r = self._link_request(self.model.set_device_request_status(req.args[0], status))
        if r["status"] == "ACCEPTED" and before["status"] != "ACCEPTED":
            self._fire(self._accept_hooks, r)
        return _result(200, r)

    def _request_delete(self, req: _Req) -> ApiResult:
        self.model.delete_device_request(req.args[0])
        return _result(204)

    # -- bulk registration --------------------------------------------------------------------

    def _bulk_post(self, req: _Req) -> ApiResult:
        text = _csv_payload(req)
        parsed = fleetcsv.parse(text)
        if not parsed.header_ok:
            raise Invalid("; ".join(parsed.messages()))
        by_line: dict[int, list[fleetcsv.Problem]] = {}
        for p in parsed.problems:
            if p.code != "weak-credentials":
                by_line.setdefault(p.line, []).append(p)
        rows = {r.line: r for r in parsed.rows}
        failed: list[JSON] = []
        updated: list[JSON] = []
        created = 0
        for line in sorted(set(rows) | set(by_line)):
            row = rows.get(line)
            device_id = (row.id or row.iccid) if row else ""
            problems = by_line.get(line)
            if not problems and row is not None:
                try:
                    new = self._register_row(row)
                except Exception as e:  # the sink (broker) said no: this row fails, not the file
                    log.warning("bulk registration of line %d failed: %s", line, e)
                    failed.append(_failed(device_id, f"ICCID: the broker refused the device: "
                                                     f"{e}", line))
                    continue
                if new:
                    created += 1
                else:
                    updated.append({"bulkNewDeviceStatus": "CREDENTIAL_UPDATED",
                                    "creationStatus": "CREDENTIAL_UPDATED",
                                    "deviceId": device_id})
                continue
            reason = "; ".join((f"{p.column}: " if p.column else "") + p.message
                               for p in problems or [])
            failed.append(_failed(device_id, reason, line))
        body = {"numberOfAll": len(parsed.rows), "numberOfCreated": created,
                "numberOfFailed": len(failed), "numberOfSuccessful": created + len(updated),
                "credentialUpdatedList": updated, "failedCreationList": failed}
        return _result(201, body)

    def _register_row(self, row: fleetcsv.FleetRow) -> bool:
        """Credentials for the row's ICCID and an ACCEPTED request; True if new."""
        existed = self.model.has_credentials(row.iccid)
        self.issue_credentials(row.iccid, row.credentials, source="bulk")
        extra = {BULK_FRAGMENT: {"externalId": row.id, "name": row.name, "type": row.type,
                                 "shell": row.shell_enabled}}
        if self.model.find_device_request(row.iccid) is None:
            try:
                self.model.create_device_request(row.iccid, "ACCEPTED", extra)
            except Conflict:
                self.model.set_device_request_status(row.iccid, "ACCEPTED", True, extra)
        else:
            self.model.set_device_request_status(row.iccid, "ACCEPTED", True, extra)
        return not existed

    # -- device credentials -------------------------------------------------------------------

    def _credentials_get(self, req: _Req) -> ApiResult:
        c = self.model.get_credentials(req.args[0])
        return _result(200, {**c, "self": self._url("devicecontrol", "deviceCredentials",
                                                    c["id"])})

    def _credentials_delete(self, req: _Req) -> ApiResult:
        device_id = req.args[0]
        removed = False
        if self.credentials is not None:
            removed = bool(self.credentials.remove_device(device_id))
        recorded = self.model.delete_credentials(device_id)
        r = self.model.find_device_request(device_id)
        if r is not None and r["status"] == "ACCEPTED":
            with contextlib.suppress(NotFound):  # deleted concurrently: as good
                self.model.delete_device_request(device_id)
        if not (removed or recorded):
            raise NotFound(f"No device credentials for {device_id}")
        return _result(204)

    # -- tenant, SmartREST --------------------------------------------------------------------

    def _tenant_get(self, req: _Req) -> ApiResult:
        return _result(200, {"name": self.tenant, "domainName": urlsplit(self.base_url).netloc,
                             "allowCreateTenants": False, "customProperties": {},
                             "self": self._url("tenant", "currentTenant")})

    def _smartrest_post(self, req: _Req) -> ApiResult:
        raise ApiError(501, "smartrest/Not Implemented",
                       "POST /s is served by the HTTP layer's SmartREST engine, not by the REST "
                       "model")

    # -- for the connectors (Python, not REST) ------------------------------------------------

    def bootstrap_request(self, device_id: str) -> JSON:
        """A device published its secret: its request becomes PENDING_ACCEPTANCE (created if
        there is none; an ACCEPTED request stays ACCEPTED, so the caller may issue credentials
        at once). Returns the request."""
        for _ in range(2):
            r = self.model.find_device_request(device_id)
            if r is None:
                try:
                    return self._link_request(self.model.create_device_request(
                        device_id, "PENDING_ACCEPTANCE"))
                except Conflict:
                    continue  # created concurrently: look again
            if r["status"] == "WAITING_FOR_CONNECTION":
                r = self.model.set_device_request_status(device_id, "PENDING_ACCEPTANCE")
            return self._link_request(r)
        return self._link_request(self.model.get_device_request(device_id))

    def record_message(self, mo_id: str) -> None:
        """The device `mo_id` sent a message now (availability.py)."""
        self.availability.record(mo_id)

    def check_availability(self) -> list[str]:
        """Raise the unavailability alarms that are due; the ids of the devices alarmed now."""
        return self.availability.check()

    def issue_credentials(self, device_id: str, password: str, source: str = "bootstrap"
                          ) -> None:
        """Give `device_id` this broker password (CredentialSink) and record its hash."""
        if self.admin_user is not None and device_id == self.admin_user:
            # a device of the admin's name would be fenced in, and the admin with it
            raise Invalid(f"{device_id!r} is the platform's admin user, not a device", "id")
        if self.credentials is not None:
            self.credentials.add_device(device_id, password)
        self.model.record_credentials(device_id, password, source)

    def issue_credentials_many(self, pairs: list[tuple[str, str]], source: str = "emulator"
                               ) -> None:
        """issue_credentials for many (ID, password) pairs: the sink's `add_devices` when it has
        one (broker.py: batched, or written while it is stopped), one model transaction."""
        for device_id, _ in pairs:
            if self.admin_user is not None and device_id == self.admin_user:
                raise Invalid(f"{device_id!r} is the platform's admin user, not a device", "id")
        sink = self.credentials
        if sink is not None:
            many = getattr(sink, "add_devices", None)
            if many is not None:
                many(pairs)
            else:
                for device_id, password in pairs:
                    sink.add_device(device_id, password)
        self.model.record_credentials_many(pairs, source)

    def shell_off(self, user: str) -> bool:
        """Whether the device was bulk-registered with SHELL 0 (seed 002: the flag says whether
        operations are sent to it)."""
        r = self.model.find_device_request(user)
        frag = r.get(BULK_FRAGMENT) if r else None
        return isinstance(frag, dict) and frag.get("shell") is False

    def refuse_operation(self, op_id: str, user: str) -> JSON:
        """Set an operation of a SHELL 0 device FAILED, saying why; the updated operation."""
        reason = (f"device {user} was registered with SHELL=0 (bulk registration): it receives "
                  f"no operations")
        op = self.model.update_operation(op_id, {"status": "FAILED", "failureReason": reason})
        log.info("operation %s FAILED at once: %s", op_id, reason)
        return op

    def device_user(self, mo_id: str) -> str | None:
        """The MQTT user that serves managed object `mo_id`: the first object on the way up its
        device parents that has an external ID or an owner with device credentials (the user
        whose `mr/` topic gets the object's operations), else None."""
        try:
            todo = [str(parse_id(mo_id))]
        except ModelError:
            return None
        seen: set[str] = set()
        while todo:
            cur = todo.pop(0)
            if cur in seen:
                continue
            seen.add(cur)
            try:
                mo = self.model.get_managed_object(cur)
                xids = self.model.external_ids_of(cur)
            except NotFound:
                continue
            for x in xids:
                if self.model.has_credentials(x["externalId"]):
                    return str(x["externalId"])
            owner = mo.get("owner")
            if owner and self.model.has_credentials(owner):
                return str(owner)
            todo += [r["managedObject"]["id"] for r in mo["deviceParents"]["references"]]
        return None


def _ms_of(text: Any) -> int:
    """Epoch milliseconds of a stored time, for merging; 0 if unreadable."""
    try:
        return parse_time(text)[1]
    except ModelError:
        return 0


def _list_param(req: _Req, name: str) -> list[str]:
    """A comma list parameter (status=ACTIVE,ACKNOWLEDGED), each value once."""
    values = [s.strip() for s in req.params.get(name, "").split(",") if s.strip()]
    return list(dict.fromkeys(values))


def match_route(segs: list[str]) -> tuple[tuple[str, ...], dict[str, Handler], list[str]] | None:
    """(pattern, its handlers by method, the `*` segments' values) of the route that the path
    segments name (unquoted, as Api splits them), or None. The HTTP layer asks this too, to
    validate a body before Api sees it (webapp.py)."""
    for pattern, methods in _ROUTES:
        if len(pattern) != len(segs):
            continue
        args = []
        for p, s in zip(pattern, segs, strict=True):
            if p == "*":
                args.append(s)
            elif p != s:
                break
        else:
            return pattern, methods, args
    return None


def path_segments(path: str) -> list[str]:
    """A request path's segments, unquoted, as Api routes them. Empty segments are dropped:
    Cumulocity takes `/alarm/alarms//{id}` for `/alarm/alarms/{id}` (its Python SDK sends
    that), as servlet containers normalise such paths."""
    return [unquote(s) for s in path.split("/") if s]


def _failed(device_id: str, reason: str, line: int) -> JSON:
    d: JSON = {"bulkNewDeviceStatus": "FAILED", "creationStatus": "FAILED"}
    if device_id:
        d["deviceId"] = device_id
    d["failureReason"] = reason
    d["line"] = line
    return d


def _csv_payload(req: _Req) -> str:
    """The CSV of a bulk registration: the `file` part of multipart/form-data, or the body."""
    body = req.body
    if body is None or body in (b"", ""):
        raise ApiError(400, "devicecontrol/badRequest", "the request needs a CSV file (a "
                                                          "multipart/form-data part named file)")
    if isinstance(body, dict | list):
        raise ApiError(415, "devicecontrol/Unsupported Media Type",
                       "bulk registration takes a CSV file, not JSON")
    ct = req.content_type or ""
    if isinstance(body, Form) or ct.split(";")[0].strip().lower().startswith("multipart/"):
        raw = _multipart_file(body, ct)
    elif isinstance(body, Path):
        raise ApiError(400, "devicecontrol/badRequest", "bulk registration takes the CSV in "
                                                          "the request body")
    else:
        if ct and "json" in ct.lower():
            raise ApiError(415, "devicecontrol/Unsupported Media Type",
                           "bulk registration takes a CSV file (multipart/form-data or text/csv)")
        raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ApiError(400, "devicecontrol/badRequest",
                       f"the CSV is not UTF-8 text (byte {e.start})") from None


def _multipart_file(body: Form | bytes | str | Path, content_type: str) -> bytes:
    """The content of the file part of a bulk registration's multipart body."""
    try:
        if isinstance(body, Form):
            form = body
        elif isinstance(body, Path):
            form = parse_form(body.read_bytes(), content_type)
        else:
            form = parse_form(body.encode("utf-8") if isinstance(body, str) else bytes(body),
                              content_type)
    except FormError as e:
        raise ApiError(400, "devicecontrol/badRequest", str(e)) from None
    try:
        chosen = form.file() or (form.parts[0] if len(form.parts) == 1 else None)
        if chosen is None:
            raise ApiError(400, "devicecontrol/badRequest",
                           "no part named \"file\" in the multipart body")
        return chosen.data()
    finally:
        form.discard()


# -- SmartREST template collections (see the module docstring) ------------------------------

def find_template_collection(api: Api, xid: str) -> tuple[str, JSON] | None:
    """(managed object id, the collection's managed object) for `xid`, or None."""
    r = api.handle("GET", "/identity/externalIds/" + quote(SMARTREST_XID_TYPE, safe="") + "/"
                   + quote(xid, safe=""))
    if r.status != 200 or not isinstance(r.body, dict):
        return None
    mo_id = r.body["managedObject"]["id"]
    mo = api.handle("GET", f"/inventory/managedObjects/{mo_id}")
    if mo.status != 200 or not isinstance(mo.body, dict):
        return None
    return mo_id, mo.body


def create_template_collection(api: Api, xid: str, fragment: JSON,
                               user: str | None = None) -> ApiResult:
    """Store a collection for `xid`: 201 with the managed object, or 409 (the X-ID is taken;
    nothing is left behind) or another error result."""
    if find_template_collection(api, xid) is not None:
        return Api._error(409, "identity/Duplicate",
                          f"a template collection for X-ID {xid} exists already")
    made = api.handle("POST", "/inventory/managedObjects",
                      {"name": xid, "type": SMARTREST_MO_TYPE, SMARTREST_FRAGMENT: fragment},
                      user=user)
    if made.status != 201 or not isinstance(made.body, dict):
        return made
    mo_id = made.body["id"]
    linked = api.handle("POST", f"/identity/globalIds/{mo_id}/externalIds",
                        {"type": SMARTREST_XID_TYPE, "externalId": xid}, user=user)
    if linked.status != 201:
        api.handle("DELETE", f"/inventory/managedObjects/{mo_id}")
        return linked
    return made


_ROUTES: list[tuple[tuple[str, ...], dict[str, Handler]]] = [
    (("inventory", "managedObjects"), {"GET": Api._mos_get, "POST": Api._mos_post}),
    (("inventory", "managedObjects", "*"),
     {"GET": Api._mo_get, "PUT": Api._mo_put, "DELETE": Api._mo_delete}),
    (("inventory", "managedObjects", "*", "childDevices"),
     {"GET": Api._children_get, "POST": Api._children_post}),
    (("inventory", "managedObjects", "*", "childDevices", "*"),
     {"GET": Api._child_get, "DELETE": Api._child_delete}),
    (("inventory", "binaries"), {"GET": Api._binaries_get, "POST": Api._binaries_post}),
    (("inventory", "binaries", "*"),
     {"GET": Api._binary_get, "PUT": Api._binary_put, "DELETE": Api._binary_delete}),
    (("identity", "externalIds", "*", "*"), {"GET": Api._xid_get, "DELETE": Api._xid_delete}),
    (("identity", "globalIds", "*", "externalIds"),
     {"GET": Api._global_xids_get, "POST": Api._global_xids_post}),
    (("measurement", "measurements"),
     {"GET": Api._measurements_get, "POST": Api._measurements_post}),
    (("measurement", "measurements", "*"),
     {"GET": Api._measurement_get, "DELETE": Api._measurement_delete}),
    (("event", "events"), {"GET": Api._events_get, "POST": Api._events_post}),
    (("event", "events", "*"),
     {"GET": Api._event_get, "PUT": Api._event_put, "DELETE": Api._event_delete}),
    (("event", "events", "*", "binaries"),
     {"GET": Api._event_binary_get, "POST": Api._event_binary_post,
      "PUT": Api._event_binary_put, "DELETE": Api._event_binary_delete}),
    (("alarm", "alarms"), {"GET": Api._alarms_get, "POST": Api._alarms_post}),
    (("alarm", "alarms", "*"), {"GET": Api._alarm_get, "PUT": Api._alarm_put}),
    (("devicecontrol", "operations"),
     {"GET": Api._operations_get, "POST": Api._operations_post}),
    (("devicecontrol", "operations", "*"),
     {"GET": Api._operation_get, "PUT": Api._operation_put}),
    (("devicecontrol", "newDeviceRequests"),
     {"GET": Api._requests_get, "POST": Api._requests_post}),
    (("devicecontrol", "newDeviceRequests", "*"),
     {"GET": Api._request_get, "PUT": Api._request_put, "DELETE": Api._request_delete}),
    (("devicecontrol", "bulkNewDeviceRequests"), {"POST": Api._bulk_post}),
    (("devicecontrol", "deviceCredentials", "*"),
     {"GET": Api._credentials_get, "DELETE": Api._credentials_delete}),
    (("tenant", "currentTenant"), {"GET": Api._tenant_get}),
    (("s",), {"POST": Api._smartrest_post}),
]
