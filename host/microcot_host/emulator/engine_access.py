"""The device API: the REST requests a SmartREST request template may make.

SmartREST 1.0 templates are written for devices, so they may only make the requests a device
may make on Cumulocity as a device user: on its inventory (managed objects, child devices),
identity, measurements, events (with their attachments), alarms, operations, binaries (reading)
and its own tenant (seed 002, "Eigenen Tenant abfragen"). The rest is the administrator's:
device credentials, new-device and bulk registrations, writing binaries, users, other tenants,
and `/s` itself; a template naming one of those is refused.

    resource                                          methods
    /inventory/managedObjects                         GET, POST
    /inventory/managedObjects/{id}                    GET, PUT, DELETE (seed 002: a collection's
                                                      own delete template)
    /inventory/managedObjects/{id}/childDevices       GET, POST
    /inventory/managedObjects/{id}/childDevices/{id}  GET, DELETE
    /inventory/binaries, /inventory/binaries/{id}     GET (a binary's content is no JSON: its
                                                      response templates match nothing)
    /identity/externalIds/{type}/{value}              GET, DELETE
    /identity/globalIds/{id}/externalIds              GET, POST
    /measurement/measurements                         GET, POST
    /measurement/measurements/{id}                    GET, DELETE
    /event/events                                     GET, POST
    /event/events/{id}                                GET, PUT, DELETE
    /event/events/{id}/binaries                       GET, POST, PUT, DELETE
    /alarm/alarms                                     GET, POST
    /alarm/alarms/{id}                                GET, PUT
    /devicecontrol/operations                         GET, POST
    /devicecontrol/operations/{id}                    GET, PUT
    /tenant/currentTenant                             GET

These are the routes api.py opens to a device user (authz.py's RULES, minus `POST /s`; a test
keeps the two equal); which objects of them a device may touch is the REST API's rule, applied
because the engine calls it as the device's user. Templates get a table of their own because
their check must not depend on who registers them (an administrator's collection is used by
devices too) and must stay closed if api.py ever opens a route to devices by mistake.

The path is read as api.py routes it: `urlsplit`, the path stripped of its outer slashes, split
on `/`, each segment percent-decoded; the query does not choose the resource. A template URI
must be a path (`/...`); engine_values.fill percent-encodes every URI value, so a value stays
inside its segment and can only fill an `{id}` slot: a placeholder where the table has a fixed
name (`/devicecontrol/%%`) is refused, whatever the device might send.

`refusal(method, uri, placeholder)` checks a template at registration, `allowed(method, target)`
a filled-in request before it is made (collections stored before these rules, or written into
the database by other means, are checked there).
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

ANY = "*"
# a placeholder's stand-in while a template URI is read: NUL never survives into a real target
_HOLE = "\0"

ROUTES: tuple[tuple[tuple[str, ...], frozenset[str]], ...] = tuple(
    (tuple(path.split("/")), frozenset(methods.split()))
    for path, methods in (
        ("inventory/managedObjects", "GET POST"),
        ("inventory/managedObjects/*", "GET PUT DELETE"),
        ("inventory/managedObjects/*/childDevices", "GET POST"),
        ("inventory/managedObjects/*/childDevices/*", "GET DELETE"),
        ("inventory/binaries", "GET"),
        ("inventory/binaries/*", "GET"),
        ("identity/externalIds/*/*", "GET DELETE"),
        ("identity/globalIds/*/externalIds", "GET POST"),
        ("measurement/measurements", "GET POST"),
        ("measurement/measurements/*", "GET DELETE"),
        ("event/events", "GET POST"),
        ("event/events/*", "GET PUT DELETE"),
        ("event/events/*/binaries", "GET POST PUT DELETE"),
        ("alarm/alarms", "GET POST"),
        ("alarm/alarms/*", "GET PUT"),
        ("devicecontrol/operations", "GET POST"),
        ("devicecontrol/operations/*", "GET PUT"),
        ("tenant/currentTenant", "GET"),
    )
)


def _segments(target: str) -> list[str] | None:
    """The path segments api.py routes on, or None when target is not a plain path."""
    if not target.startswith("/") or target.startswith("//"):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    path = parts.path.strip("/")
    return [unquote(s) for s in path.split("/")] if path else []


def _methods(segs: list[str]) -> frozenset[str]:
    for pattern, methods in ROUTES:
        if len(pattern) != len(segs):
            continue
        # a segment holding a placeholder can only fill an {id} slot
        if all(p == ANY or (p == s and _HOLE not in s) for p, s in zip(pattern, segs, strict=True)):
            return methods
    return frozenset()


def allowed(method: str, target: str) -> bool:
    """True when a filled-in request (method, target) stays inside the device API."""
    segs = _segments(target)
    return segs is not None and method.upper() in _methods(segs)


def refusal(method: str, uri: str, placeholder: str) -> str | None:
    """None when every request of a template (method, uri with placeholder) stays inside the
    device API, else why not (for the log; the 41 row names the template)."""
    holed = uri.replace(placeholder, _HOLE) if placeholder else uri
    segs = _segments(holed)
    if segs is None:
        return "the URI is not a path on this platform"
    methods = _methods(segs)
    if not methods:
        return "no device resource"
    if method.upper() not in methods:
        return "devices may only use %s there" % "/".join(sorted(methods))
    return None
