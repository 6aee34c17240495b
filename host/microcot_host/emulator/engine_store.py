"""Where the SmartREST engine keeps what must survive a restart.

Two kinds of record:
- template collections: X-ID -> (collection managed object id, Collection);
- device sessions: device user -> the X-ID it used first (whose template 500 fetches its
  operations) and its own managed object id once known.

`ApiStore` keeps collections as api.py defines them (a managed object of type
`com_cumulocity_model_smartrest_SmartRestTemplate` with that fragment, found through the external
ID `c8y_SmartRestDeviceIdentifier`/<X-ID>, via api.find_template_collection and
api.create_template_collection); the fragment holds the templates in Cumulocity's shape
(`requestTemplates`, `responseTemplates`) and, in `registration`, the `10,`/`11,` rows, from which
the engine rebuilds the collection with templates.py. Deleting the managed object deletes the
collection (seed 002: "mittels Delete auf die Templatesammlung-MO-ID"), its external ID with it.

Sessions go to the model's settings table (`Model.get_setting`/`set_setting`, key
`smartrest.session.<user>`, a JSON object `{"xid": ..., "deviceId": ...}`): a device's first
request (checking its external ID) comes before its managed object exists, so no fragment of that
object can hold it, and the inventory stays free of bookkeeping objects.

`MemoryStore` keeps both in dicts, for tools and tests that need no persistence.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from microcot import smartrest
from microcot.templates import Collection, Request

from .api import (
    SMARTREST_FRAGMENT,
    SMARTREST_MO_TYPE,
    create_template_collection,
    find_template_collection,
)

log = logging.getLogger(__name__)

SESSION_KEY = "smartrest.session."


class ApiLike(Protocol):
    def handle(
        self,
        method: str,
        target: str,
        body: bytes | str | dict | list | None = None,
        content_type: str | None = None,
        user: str | None = None,
    ) -> Any: ...


class Settings(Protocol):
    def get_setting(self, key: str) -> str | None: ...
    def set_setting(self, key: str, value: str) -> None: ...


@dataclass
class Session:
    user: str
    xid: str | None = None
    device_id: str | None = None


class StoreError(RuntimeError):
    """The platform refused to store engine state (the status and reason of the REST call)."""


class Store(Protocol):
    def find_collection(self, xid: str) -> tuple[str, Collection] | None: ...
    def add_collection(self, coll: Collection, user: str | None) -> str | None: ...
    def session(self, user: str) -> Session | None: ...
    def save_session(self, s: Session) -> None: ...


class MemoryStore:
    def __init__(self) -> None:
        self._collections: dict[str, tuple[str, Collection]] = {}
        self._sessions: dict[str, Session] = {}
        self._next = 1

    def find_collection(self, xid: str) -> tuple[str, Collection] | None:
        return self._collections.get(xid)

    def add_collection(self, coll: Collection, user: str | None) -> str | None:
        if coll.xid in self._collections:
            return None
        mo = str(self._next)
        self._next += 1
        self._collections[coll.xid] = (mo, coll)
        return mo

    def delete_collection(self, xid: str) -> None:
        self._collections.pop(xid, None)

    def session(self, user: str) -> Session | None:
        s = self._sessions.get(user)
        return Session(s.user, s.xid, s.device_id) if s else None

    def save_session(self, s: Session) -> None:
        self._sessions[s.user] = Session(s.user, s.xid, s.device_id)


def fragment(coll: Collection) -> dict[str, Any]:
    """The collection in the fragment shape of api.py's docstring (Cumulocity's field names)."""
    req, resp = [], []
    for t in coll:
        if isinstance(t, Request):
            req.append(
                {
                    "msgId": str(t.tid),
                    "method": t.method,
                    "resourceUri": t.uri,
                    "contentType": t.content_type,
                    "accept": t.accept,
                    "placeholder": t.placeholder,
                    "values": list(t.params),
                    "templateString": t.template,
                }
            )
        else:
            resp.append(
                {
                    "msgId": str(t.tid),
                    "base": t.base,
                    "condition": t.condition,
                    "pattern": list(t.values),
                }
            )
    rows = "\n".join(smartrest.row(r) for r in coll.rows())
    return {"requestTemplates": req, "responseTemplates": resp, "registration": rows}


class ApiStore:
    """Engine state in the platform model (see above). `settings` defaults to `api.model`.

    Finding a collection is engine bookkeeping, made with user None (every device may use every
    X-ID, as on Cumulocity) and limited to what it needs: the external ID
    `c8y_SmartRestDeviceIdentifier`/<X-ID> and the managed object it names, used only when that
    object is a template collection (type and fragment), so an X-ID pointing at anything else
    reads as not registered. Registering one is made as the registering user, who owns it."""

    def __init__(self, api: ApiLike, settings: Settings | None = None) -> None:
        self.api = api
        self.settings: Settings = settings if settings is not None else api.model

    def find_collection(self, xid: str) -> tuple[str, Collection] | None:
        found = find_template_collection(self.api, xid)
        if found is None:
            return None
        mo, doc = found
        frag = doc.get(SMARTREST_FRAGMENT)
        if doc.get("type") != SMARTREST_MO_TYPE or not isinstance(frag, dict):
            log.warning(
                "X-ID %s names managed object %s, which is no template collection: ignored", xid, mo
            )
            return None
        rows = frag.get("registration")
        try:
            if not isinstance(rows, str):
                raise ValueError("no registration rows")
            return str(mo), Collection.from_rows(smartrest.parse_rows(rows), xid)
        except ValueError as e:  # written by something else than this engine
            log.error("template collection %s (managed object %s) is unusable: %s", xid, mo, e)
            return None

    def add_collection(self, coll: Collection, user: str | None) -> str | None:
        r = create_template_collection(self.api, coll.xid, fragment(coll), user)
        if r.status == 409:
            return None
        if r.status >= 400:
            raise StoreError(
                "storing template collection %s: %d %s" % (coll.xid, r.status, r.reason)
            )
        return str(r.body["id"])

    def session(self, user: str) -> Session | None:
        raw = self.settings.get_setting(SESSION_KEY + user)
        if raw is None:
            return None
        try:
            d = json.loads(raw)
            return Session(user, d.get("xid"), d.get("deviceId"))
        except (ValueError, AttributeError):
            log.error("session of %s is unreadable: %r", user, raw[:100])
            return None

    def save_session(self, s: Session) -> None:
        self.settings.set_setting(
            SESSION_KEY + s.user, json.dumps({"xid": s.xid, "deviceId": s.device_id})
        )
