"""Who may do what in the emulator's REST API: the administrator, and devices fenced in as
Cumulocity's device users.

Every call of `Api.handle` runs for a principal:
- internal (`user=None`): the emulator's own code (connectors, the SmartREST engine's
  bookkeeping, the CLI through the service); trusted, never checked;
- admin: the REST server's admin user (`Api.admin_user`, set by http.py's RestServer);
- device: a user with device credentials (bootstrap or bulk registration); the SmartREST engine
  passes the MQTT user of the device whose message it runs.
A user with device credentials is a device even if it is named like the admin. A named user with
neither is fenced like a device once the Api knows its admin; an Api that was never told its
admin (unit tests without a REST server) takes such a user for the admin, as before this module.

A device owns a managed object when the object's owner is the device user or one of its external
IDs has the user name as its value, and it owns every child device below an owned object
(recursively). It reads and writes only owned objects and their measurements, events (and their
attachments), alarms, operations and external IDs; it also reads SmartREST template collections
and binaries (shared: every device needs them). Binaries are written by the admin only; a
template collection, used by other devices and unchangeable once registered, is only deleted by
its owner device (seed 002's delete template). Whatever a device creates is its own: the owner
of a new managed object is the authenticated user, as on Cumulocity; an `owner` in a device's
body is ignored (on PUT too: what it owns stays its own). It may not give an external ID the
name of another device (a user with credentials or a new device request): that would hand the
other device's identity lookup (seed 002's first step) to an object of its choosing. New device
requests, bulk registration, device credentials: the admin's.

A refusal is `Forbidden`, which Api answers `403 {"error": "security/Forbidden", "message":
"Access is denied", ...}` as Cumulocity does; the message never says whose object it is. An
object that does not exist is still a 404 (or Cumulocity's 422 for an unknown source), as for
the admin: ids come from one counter, their existence is no secret worth a different answer.

`RULES` is the table of every route with its access level; docs/reference/emulator-access.md
holds `markdown_table()` verbatim and a test keeps both and api.py's routes in step.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from .model import Model, ModelError, NotFound, Page, parse_id

log = logging.getLogger(__name__)

ACCESS_DENIED = "Access is denied"
SMARTREST_MO_TYPE = "com_cumulocity_model_smartrest_SmartRestTemplate"
BINARY_FRAGMENT = "c8y_IsBinary"
# a device's objects are listed as an id list (SQLite's variable limit, and a walk that ends)
MAX_TREE = 10_000


class Role(enum.Enum):
    INTERNAL = "internal"
    ADMIN = "admin"
    DEVICE = "device"


@dataclass(frozen=True)
class Principal:
    role: Role
    user: str | None = None

    @property
    def is_device(self) -> bool:
        return self.role is Role.DEVICE


INTERNAL = Principal(Role.INTERNAL)


class Forbidden(Exception):
    """A refusal (403 security/Forbidden); the message says nothing about other devices."""

    def __init__(self, message: str = ACCESS_DENIED) -> None:
        super().__init__(message)
        self.message = message


def principal_of(user: str | None, admin_user: str | None, is_device_user: bool) -> Principal:
    """The principal of a request by `user` (see the module docstring)."""
    if user is None:
        return INTERNAL
    if is_device_user:
        return Principal(Role.DEVICE, user)
    if admin_user is None or user == admin_user:
        return Principal(Role.ADMIN, user)
    return Principal(Role.DEVICE, user)


# -- the route table --------------------------------------------------------------------------

class Access(enum.Enum):
    ALL = "admin, every device"
    OWN = "admin; device: its own objects"
    ADMIN = "admin only"


@dataclass(frozen=True)
class Rule:
    path: str      # as documented: /inventory/managedObjects/{id}
    method: str
    access: Access
    note: str = ""

    @property
    def pattern(self) -> tuple[str, ...]:
        """The route as api.py's `_ROUTES` spells it ({name} segments are "*")."""
        return tuple("*" if s.startswith("{") else s for s in self.path.strip("/").split("/"))


_MO = "/inventory/managedObjects"
_OWN_MO = "its own objects and their child devices"
_SOURCE = "source: its own object"
_EVENT = "an event of its own objects"
_OP = "operations of its own objects"

RULES: tuple[Rule, ...] = (
    Rule(_MO, "GET", Access.OWN, "lists only " + _OWN_MO),
    Rule(_MO, "POST", Access.OWN, "the new object is the device's: owner = the device user "
                                  "(a body's owner is ignored)"),
    Rule(_MO + "/{id}", "GET", Access.OWN, _OWN_MO + "; also template collections and "
                                           "binaries (shared)"),
    Rule(_MO + "/{id}", "PUT", Access.OWN, _OWN_MO + ", not binaries or template "
                                           "collections; the owner stays (a body's owner is "
                                           "ignored)"),
    Rule(_MO + "/{id}", "DELETE", Access.OWN, _OWN_MO + ", not binaries"),
    Rule(_MO + "/{id}/childDevices", "GET", Access.OWN, "of its own objects"),
    Rule(_MO + "/{id}/childDevices", "POST", Access.OWN, "parent and child both its own"),
    Rule(_MO + "/{id}/childDevices/{childId}", "GET", Access.OWN, "of its own objects"),
    Rule(_MO + "/{id}/childDevices/{childId}", "DELETE", Access.OWN, "of its own objects"),
    Rule("/inventory/binaries", "GET", Access.ALL, "firmware and software downloads"),
    Rule("/inventory/binaries", "POST", Access.ADMIN),
    Rule("/inventory/binaries/{id}", "GET", Access.ALL, "firmware and software downloads"),
    Rule("/inventory/binaries/{id}", "PUT", Access.ADMIN),
    Rule("/inventory/binaries/{id}", "DELETE", Access.ADMIN),
    Rule("/identity/externalIds/{type}/{value}", "GET", Access.OWN,
         "external IDs of its own objects and of template collections; unknown: 404"),
    Rule("/identity/externalIds/{type}/{value}", "DELETE", Access.OWN,
         "external IDs of its own objects"),
    Rule("/identity/globalIds/{id}/externalIds", "GET", Access.OWN,
         "of its own objects and template collections"),
    Rule("/identity/globalIds/{id}/externalIds", "POST", Access.OWN,
         "to its own objects; the value may not be another device's user name"),
    Rule("/measurement/measurements", "GET", Access.OWN,
         "lists only its own objects' measurements; a foreign source is refused"),
    Rule("/measurement/measurements", "POST", Access.OWN, _SOURCE),
    Rule("/measurement/measurements/{id}", "GET", Access.OWN, _SOURCE),
    Rule("/measurement/measurements/{id}", "DELETE", Access.OWN, _SOURCE),
    Rule("/event/events", "GET", Access.OWN,
         "lists only its own objects' events; a foreign source is refused"),
    Rule("/event/events", "POST", Access.OWN, _SOURCE),
    Rule("/event/events/{id}", "GET", Access.OWN, _SOURCE),
    Rule("/event/events/{id}", "PUT", Access.OWN, _SOURCE),
    Rule("/event/events/{id}", "DELETE", Access.OWN, _SOURCE),
    Rule("/event/events/{id}/binaries", "GET", Access.OWN, _EVENT),
    Rule("/event/events/{id}/binaries", "POST", Access.OWN, _EVENT),
    Rule("/event/events/{id}/binaries", "PUT", Access.OWN, _EVENT),
    Rule("/event/events/{id}/binaries", "DELETE", Access.OWN, _EVENT),
    Rule("/alarm/alarms", "GET", Access.OWN,
         "lists only its own objects' alarms; a foreign source is refused"),
    Rule("/alarm/alarms", "POST", Access.OWN, _SOURCE),
    Rule("/alarm/alarms/{id}", "GET", Access.OWN, _SOURCE),
    Rule("/alarm/alarms/{id}", "PUT", Access.OWN, _SOURCE),
    Rule("/devicecontrol/operations", "GET", Access.OWN,
         "lists only " + _OP + "; a foreign deviceId or agentId is refused"),
    Rule("/devicecontrol/operations", "POST", Access.OWN, "for its own objects only"),
    Rule("/devicecontrol/operations/{id}", "GET", Access.OWN, _OP),
    Rule("/devicecontrol/operations/{id}", "PUT", Access.OWN, _OP + " (status updates)"),
    Rule("/devicecontrol/newDeviceRequests", "GET", Access.ADMIN),
    Rule("/devicecontrol/newDeviceRequests", "POST", Access.ADMIN),
    Rule("/devicecontrol/newDeviceRequests/{id}", "GET", Access.ADMIN),
    Rule("/devicecontrol/newDeviceRequests/{id}", "PUT", Access.ADMIN),
    Rule("/devicecontrol/newDeviceRequests/{id}", "DELETE", Access.ADMIN),
    Rule("/devicecontrol/bulkNewDeviceRequests", "POST", Access.ADMIN),
    Rule("/devicecontrol/deviceCredentials/{id}", "GET", Access.ADMIN, "its own record too"),
    Rule("/devicecontrol/deviceCredentials/{id}", "DELETE", Access.ADMIN),
    Rule("/tenant/currentTenant", "GET", Access.ALL, "seed 002: a device asks for its tenant"),
    Rule("/s", "POST", Access.ALL, "SmartREST over HTTP: each template request as the same "
                                   "REST call by this user"),
)

_BY_ROUTE = {(r.pattern, r.method): r for r in RULES}


def rule_for(pattern: tuple[str, ...], method: str) -> Rule | None:
    return _BY_ROUTE.get((pattern, method))


def check_route(p: Principal, pattern: tuple[str, ...], method: str) -> None:
    """Refuse a device a route that is the admin's (or missing from RULES: closed)."""
    if not p.is_device:
        return
    rule = rule_for(pattern, method)
    if rule is None or rule.access is Access.ADMIN:
        raise Forbidden()


def markdown_table() -> str:
    """The RULES as the table of docs/reference/emulator-access.md."""
    out = ["| resource | method | who may call it | for a device |",
           "| --- | --- | --- | --- |"]
    for r in RULES:
        out.append(f"| `{r.path}` | {r.method} | {r.access.value} | {r.note} |")
    return "\n".join(out) + "\n"


# -- objects ----------------------------------------------------------------------------------

class Fence:
    """Which managed objects a device may reach, decided from the model on every call (no
    cache: ownership, external IDs and child links change under it)."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def owns(self, p: Principal, mo_id: int | str) -> bool:
        """True if `p` may read and write object `mo_id` and its data: not a device, or the
        object or one of its device parents is the device's. False for a missing object."""
        if not p.is_device:
            return True
        assert p.user is not None
        try:
            todo = [str(parse_id(mo_id))]
        except ModelError:
            return False
        seen: set[str] = set()
        while todo:
            cur = todo.pop()
            if cur in seen:
                continue
            seen.add(cur)
            try:
                mo = self.model.get_managed_object(cur)
            except NotFound:
                continue
            if mo.get("owner") == p.user or self._named(cur, p.user):
                return True
            todo += [r["managedObject"]["id"] for r in mo["deviceParents"]["references"]]
        return False

    def _named(self, mo_id: str, user: str) -> bool:
        try:
            return any(x["externalId"] == user for x in self.model.external_ids_of(mo_id))
        except NotFound:
            return False

    def may_read(self, p: Principal, mo_id: int | str) -> bool:
        """owns, or a shared object (a template collection or a binary)."""
        if self.owns(p, mo_id):
            return True
        try:
            return shared(self.model.get_managed_object(mo_id))
        except (NotFound, ModelError):
            return False

    def need(self, p: Principal, mo_id: int | str, read: bool = False) -> None:
        """Forbidden unless `p` owns `mo_id` (or, with `read`, may read it)."""
        if not (self.may_read(p, mo_id) if read else self.owns(p, mo_id)):
            raise Forbidden()

    def need_existing(self, p: Principal, mo_id: int | str | None) -> None:
        """Forbidden if `mo_id` exists and is not `p`'s; a missing or malformed one is left to
        the model (404/422 as for the admin)."""
        if not p.is_device or mo_id is None:
            return
        if self.model.managed_object_exists(mo_id) and not self.owns(p, mo_id):
            raise Forbidden()

    def tree(self, p: Principal) -> list[int]:
        """The ids of every object the device owns (at most MAX_TREE), ascending."""
        assert p.user is not None
        todo = self._roots(p.user)
        seen: set[int] = set()
        while todo and len(seen) < MAX_TREE:
            cur = todo.pop()
            if cur in seen:
                continue
            seen.add(cur)
            try:
                refs = self.model.child_devices(cur)
            except NotFound:
                continue
            todo += [int(r["managedObject"]["id"]) for r in refs]
        if todo:
            log.warning("device %s owns more than %d objects: its lists are cut", p.user,
                        MAX_TREE)
        return sorted(seen)

    def _roots(self, user: str) -> list[int]:
        owned, _ = self.model.query_managed_objects(Page(0, MAX_TREE), owner=user)
        return [int(m["id"]) for m in owned] + self.model.objects_named(user)

    def claims_other_device(self, p: Principal, value: str) -> bool:
        """True if a device would name an external ID after another device."""
        if not p.is_device or value == p.user:
            return False
        return (self.model.has_credentials(value)
                or self.model.find_device_request(value) is not None)


def shared(mo: dict[str, object]) -> bool:
    """Objects every device reads: SmartREST template collections and binaries."""
    return mo.get("type") == SMARTREST_MO_TYPE or BINARY_FRAGMENT in mo


def only_owned(ids: Iterable[int] | None, tree: list[int]) -> list[int]:
    """The requested ids that are in the device's tree (all of it when none were asked)."""
    if ids is None:
        return tree
    mine = set(tree)
    return [i for i in ids if i in mine]
