"""The OpenAPI 3 description of the Cumulocity subset the emulator serves, from its route tables.

Every route of api.py's `_ROUTES` with each method is one operation; who may call it comes from
authz.RULES (the access level and the note for devices, also as `x-microcot-access`); the body
an operation takes from `body_of`, which the HTTP layer (webapp.py) uses to validate requests
before Api sees them, so the description and the validation cannot drift apart. The collection
filters are the ones api.py's docstring lists. Served at `GET /openapi.json`; checked by
tests/host/test_emulator_openapi.py with openapi-spec-validator.
"""

from __future__ import annotations

import enum
from typing import Any

from . import authz
from .api import _ROUTES, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

OPENAPI_VERSION = "3.0.3"
JSON = dict[str, Any]


class Body(enum.Enum):
    """What an operation takes as its request body."""

    NONE = "none"
    JSON = "json"          # application/json or Cumulocity's vendor types (...+json)
    UPLOAD = "upload"      # multipart/form-data (object, file) or the raw content; streamed
    CSV = "csv"            # the bulk registration: multipart/form-data (file) or text/csv
    SMARTREST = "smartrest"  # SmartREST 1.0 text rows


_UPLOADS = {
    (("inventory", "binaries"), "POST"),
    (("inventory", "binaries", "*"), "PUT"),
    (("event", "events", "*", "binaries"), "POST"),
    (("event", "events", "*", "binaries"), "PUT"),
}


def body_of(pattern: tuple[str, ...], method: str) -> Body:
    """The body kind of a route (api.py's pattern, `*` for a path parameter) and method."""
    if (pattern, method) in _UPLOADS:
        return Body.UPLOAD
    if pattern == ("devicecontrol", "bulkNewDeviceRequests"):
        return Body.CSV
    if pattern == ("s",):
        return Body.SMARTREST
    if method in ("POST", "PUT", "PATCH"):
        return Body.JSON
    return Body.NONE


_DATES = ("dateFrom", "dateTo", "revert")
# the filters of each collection (api.py's docstring); all take strings
_FILTERS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("inventory", "managedObjects"): ("type", "fragmentType", "text", "ids", "owner"),
    ("inventory", "binaries"): ("type", "owner", "text"),
    ("measurement", "measurements"): ("source", "type", "valueFragmentType",
                                      "valueFragmentSeries", *_DATES),
    ("event", "events"): ("source", "type", "fragmentType", *_DATES),
    ("alarm", "alarms"): ("source", "status", "severity", "type", "resolved", *_DATES),
    ("devicecontrol", "operations"): ("deviceId", "status", "agentId", "fragmentType", *_DATES),
    ("devicecontrol", "newDeviceRequests"): ("status",),
}
_PAGED = (*_FILTERS, ("inventory", "managedObjects", "*", "childDevices"),
          ("identity", "globalIds", "*", "externalIds"))
_BINARY_GETS = {("inventory", "binaries", "*"), ("event", "events", "*", "binaries")}

_ERROR = {"$ref": "#/components/responses/Error"}
_OBJECT = {"type": "object", "additionalProperties": True}
_JSON_TYPES = ("application/json", "application/vnd.com.nsn.cumulocity.managedObject+json")


def _success(pattern: tuple[str, ...], method: str) -> tuple[str, JSON]:
    """The success status and response of an operation."""
    if pattern == ("s",):
        return "200", {"description": "SmartREST response rows (also for failed requests: "
                                      "their rows say why)",
                       "content": {"text/plain": {"schema": {"type": "string"}}}}
    if method == "DELETE":
        return "204", {"description": "deleted"}
    if method == "GET" and pattern in _BINARY_GETS:
        return "200", {"description": "the content (206 with one Range; ETag, Accept-Ranges)",
                       "content": {"application/octet-stream": {
                           "schema": {"type": "string", "format": "binary"}}}}
    ok = "201" if method == "POST" or (pattern, method) in _UPLOADS else "200"
    return ok, {"description": "Cumulocity's JSON representation",
                "content": {"application/json": {"schema": _OBJECT}}}


def _request_body(kind: Body) -> JSON | None:
    if kind is Body.JSON:
        return {"required": True, "content": {t: {"schema": _OBJECT} for t in _JSON_TYPES}}
    if kind is Body.UPLOAD:
        return {"required": True, "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "object": {"type": "string", "description": "JSON: name, type, fragments"},
                "file": {"type": "string", "format": "binary"}}, "required": ["file"]}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    if kind is Body.CSV:
        return {"required": True, "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "string", "format": "binary"}}, "required": ["file"]}},
            "text/csv": {"schema": {"type": "string"}}}}
    if kind is Body.SMARTREST:
        return {"required": True, "content": {"text/plain": {"schema": {"type": "string"}}}}
    return None


def _parameters(rule: authz.Rule, method: str) -> list[JSON]:
    params: list[JSON] = [
        {"name": seg[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
        for seg in rule.path.strip("/").split("/") if seg.startswith("{")]
    if rule.pattern == ("s",):
        params.append({"name": "X-Id", "in": "header", "required": False,
                       "schema": {"type": "string"},
                       "description": "the template collection (else a `15,<X-ID>` row)"})
    if method != "GET":
        return params
    if rule.pattern in _PAGED:
        params += [
            {"name": "pageSize", "in": "query", "schema": {
                "type": "integer", "minimum": 1, "default": DEFAULT_PAGE_SIZE},
             "description": f"larger than {MAX_PAGE_SIZE} is capped"},
            {"name": "currentPage", "in": "query",
             "schema": {"type": "integer", "minimum": 1, "default": 1}},
            {"name": "withTotalPages", "in": "query", "schema": {"type": "boolean"}}]
    params += [{"name": f, "in": "query", "schema": {"type": "string"}}
               for f in _FILTERS.get(rule.pattern, ())]
    if rule.pattern in _BINARY_GETS:
        params += [{"name": "Range", "in": "header", "schema": {"type": "string"}},
                   {"name": "If-Range", "in": "header", "schema": {"type": "string"}}]
    return params


def _operation_id(rule: authz.Rule) -> str:
    words = [s[1:-1].capitalize() if s.startswith("{") else s[:1].upper() + s[1:]
             for s in rule.path.strip("/").split("/")]
    return rule.method.lower() + "".join(words)


def _operation(rule: authz.Rule) -> JSON:
    kind = body_of(rule.pattern, rule.method)
    status, success = _success(rule.pattern, rule.method)
    responses: JSON = {status: success, "401": _ERROR, "403": _ERROR, "404": _ERROR}
    if rule.method == "GET" and rule.pattern in _BINARY_GETS:
        responses["206"] = {"description": "the requested range"}
        responses["416"] = _ERROR
    if kind is not Body.NONE:
        responses.update({"400": _ERROR, "413": _ERROR, "415": _ERROR, "422": _ERROR})
    note = f" For a device: {rule.note}." if rule.note else ""
    op: JSON = {
        "operationId": _operation_id(rule),
        "summary": f"{rule.method} {rule.path}",
        "description": f"Who may call it: {rule.access.value}.{note}",
        "tags": [rule.path.strip("/").split("/")[0]],
        "x-microcot-access": rule.access.name.lower(),
        "responses": responses,
    }
    params = _parameters(rule, rule.method)
    if params:
        op["parameters"] = params
    body = _request_body(kind)
    if body is not None:
        op["requestBody"] = body
    return op


def served_routes() -> set[tuple[tuple[str, ...], str]]:
    """(pattern, method) of every operation Api serves."""
    return {(pattern, m) for pattern, methods in _ROUTES for m in methods}


def spec(tenant: str = "t-emulator") -> JSON:
    """The OpenAPI document (a dict, ready for JSON)."""
    served = served_routes()
    paths: dict[str, JSON] = {}
    for rule in authz.RULES:
        if (rule.pattern, rule.method) not in served:
            continue  # a rule without a route serves nothing (tests keep both in step)
        paths.setdefault(rule.path, {})[rule.method.lower()] = _operation(rule)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "microcot platform emulator: the Cumulocity REST subset it serves",
            "version": "1",
            "description": (f"Tenant {tenant}. Errors are Cumulocity's JSON "
                            "({error, message, info}). Device users reach their own objects "
                            "only (docs/reference/emulator-access.md)."),
        },
        "servers": [{"url": "/"}],
        "security": [{"basic": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"basic": {
                "type": "http", "scheme": "basic",
                "description": "the admin (also as <tenant>/<user>) or a device user with "
                               "issued credentials"}},
            "schemas": {"Error": {
                "type": "object", "required": ["error", "message", "info"], "properties": {
                    "error": {"type": "string", "example": "inventory/Not Found"},
                    "message": {"type": "string"}, "info": {"type": "string"}}}},
            "responses": {"Error": {
                "description": "Cumulocity-shaped error",
                "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}}},
        },
    }
