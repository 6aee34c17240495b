"""The console's pages and form actions (Starlette endpoints).

Pages: devices (`/devices`), a device (`/devices/{id}`), new device requests (`/requests`), bulk
registration (`/bulk`), login. Actions are POSTed forms (CSRF-checked by auth.Auth.form) that
make one REST call and redirect back with a message (POST/redirect/GET): accept or delete a
request, expect a new device, create an operation, acknowledge or clear an alarm, register a
CSV. A refusal of the API is shown as its message; the API decides, not the console.
"""

from __future__ import annotations

from urllib.parse import quote

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ... import fleetcsv
from . import operations, views
from .auth import Auth
from .platform import JSON, Platform, PlatformError, path
from .ui import Ui

MAX_CSV = 1 << 20  # the REST server's body limit
MAX_CSV_FORM = MAX_CSV + (16 << 10)  # room for the multipart framing and the other fields
LOGIN_FORM = 8 << 10
ACTION_FORM = 64 << 10


class LoginRequired(Exception):
    """No logged-in admin: pages redirect to the login form, streams answer 401."""


class Pages:
    def __init__(self, platform: Platform, auth: Auth, ui: Ui) -> None:
        self.p = platform
        self.auth = auth
        self.ui = ui

    def need_user(self, request: Request) -> str:
        user = self.auth.user(request)
        if user is None:
            raise LoginRequired()
        return user

    # -- login --------------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        name = "devices" if self.auth.user(request) else "login"
        return self.ui.redirect(request, name)

    async def login(self, request: Request) -> Response:
        if self.auth.user(request):
            return self.ui.redirect(request, "devices")
        return self.ui.page(request, "login.html", {"title": "Log in", "login_user": ""})

    async def login_post(self, request: Request) -> Response:
        form = await self.auth.form(request, LOGIN_FORM)
        user = str(form.get("user") or "")
        password = str(form.get("password") or "")
        if not self.auth.check_password(user, password):
            await self.auth.refuse_slowly()
            # the user name is shown again, the password never
            return self.ui.page(request, "login.html",
                                {"title": "Log in", "login_user": user[:200],
                                 "login_error": "Wrong user name or password."}, 401)
        target = request.session.get("next")
        self.auth.log_in(request)
        if isinstance(target, str) and self._inside(request, target):
            return RedirectResponse(target, status_code=303)
        return self.ui.redirect(request, "devices")

    @staticmethod
    def _inside(request: Request, target: str) -> bool:
        """A path of this console (never another site: no open redirect)."""
        root = request.scope.get("root_path", "")
        return (target.startswith(root + "/") and not target.startswith("//")
                and "\\" not in target and "://" not in target)

    async def logout(self, request: Request) -> Response:
        await self.auth.form(request, ACTION_FORM)
        self.auth.log_out(request)
        return self.ui.redirect(request, "login")

    # -- devices ------------------------------------------------------------------------------

    async def devices(self, request: Request) -> Response:
        self.need_user(request)
        page = request.query_params.get("page", "1")
        page_no = int(page) if page.isdigit() and 0 < int(page) < 100_000 else 1
        text = request.query_params.get("text", "")[:200]
        listing = await views.devices(self.p, page_no, text)
        pending = await views.pending_requests(self.p)
        live = self.ui.url(request, "live_devices") + f"?page={page_no}"
        if text:
            live += "&text=" + quote(text, safe="")
        return self.ui.page(request, "devices.html", {
            "title": "Devices", "nav": "devices", "listing": listing, "pending": pending,
            "live": live, "pending_count": len(pending)})

    async def device(self, request: Request) -> Response:
        self.need_user(request)
        mo_id = request.path_params["mo_id"]
        try:
            head = await views.device_head(self.p, mo_id)
        except PlatformError as e:
            return self.ui.error(request, e.status, e.message)
        return self.ui.page(request, "device.html", {
            "title": head.name, "nav": "devices", "head": head,
            "charts": await views.device_charts(self.p, mo_id),
            "operations": await views.device_operations(self.p, mo_id),
            "alarms": await views.device_alarms(self.p, mo_id),
            "events": await views.device_events(self.p, mo_id),
            "kinds": operations.KINDS, "pending_count": await views.pending_count(self.p),
            "live": self.ui.url(request, "live_device", mo_id=mo_id)})

    async def operation_create(self, request: Request) -> Response:
        self.need_user(request)
        mo_id = request.path_params["mo_id"]
        form = await self.auth.form(request, ACTION_FORM)
        values = {k: v for k, v in form.items() if isinstance(v, str)}
        try:
            op = await self.p.ok("POST", path("devicecontrol", "operations"),
                                 operations.body(mo_id, values))
            self.ui.flash(request, "ok", f"Operation {op.get('id')} "
                                         f"({operations.fragment_of(op)}) created: "
                                         f"{op.get('status')}")
        except (operations.FormError, PlatformError) as e:
            self.ui.flash(request, "error", f"Operation not created: {_message(e)}")
        return self.ui.redirect(request, "device", "#operations", mo_id=mo_id)

    async def alarm_update(self, request: Request) -> Response:
        self.need_user(request)
        form = await self.auth.form(request, ACTION_FORM)
        status = form.get("status")
        back = str(form.get("device") or "")
        if status not in ("ACKNOWLEDGED", "CLEARED"):
            raise HTTPException(400, "an alarm is acknowledged or cleared here")
        alarm_id = request.path_params["alarm_id"]
        await self._act(request, "PUT", path("alarm", "alarms", alarm_id), {"status": status},
                        f"Alarm {alarm_id} {str(status).lower()}.", "Alarm not changed")
        if back.isdigit():
            return self.ui.redirect(request, "device", "#alarms", mo_id=back)
        return self.ui.redirect(request, "devices")

    # -- registration -------------------------------------------------------------------------

    async def requests(self, request: Request) -> Response:
        self.need_user(request)
        rows = await views.requests(self.p)
        return self.ui.page(request, "requests.html", {
            "title": "Device registration", "nav": "requests", "requests": rows,
            "pending_count": sum(r.get("status") == "PENDING_ACCEPTANCE" for r in rows),
            "live": self.ui.url(request, "live_requests")})

    async def _act(self, request: Request, method: str, target: str, body: JSON | None,
                   done: str, failed: str) -> None:
        """One API call for a button, its outcome flashed on the next page."""
        try:
            await self.p.ok(method, target, body)
            self.ui.flash(request, "ok", done)
        except PlatformError as e:
            self.ui.flash(request, "error", f"{failed}: {e.message}")

    def _back(self, request: Request, form_back: object) -> Response:
        name = "devices" if form_back == "devices" else "requests"
        return self.ui.redirect(request, name)

    async def request_accept(self, request: Request) -> Response:
        self.need_user(request)
        form = await self.auth.form(request, ACTION_FORM)
        rid = request.path_params["request_id"]
        await self._act(request, "PUT", path("devicecontrol", "newDeviceRequests", rid),
                        {"status": "ACCEPTED"},
                        f"Device {rid} accepted: it gets its credentials now.",
                        f"Device {rid} not accepted")
        return self._back(request, form.get("back"))

    async def request_delete(self, request: Request) -> Response:
        self.need_user(request)
        form = await self.auth.form(request, ACTION_FORM)
        rid = request.path_params["request_id"]
        await self._act(request, "DELETE", path("devicecontrol", "newDeviceRequests", rid), None,
                        f"Request {rid} deleted.", f"Request {rid} not deleted")
        return self._back(request, form.get("back"))

    async def request_create(self, request: Request) -> Response:
        self.need_user(request)
        form = await self.auth.form(request, ACTION_FORM)
        rid = str(form.get("id") or "").strip()
        try:
            if not rid:
                raise PlatformError(422, "the device's ID (its ICCID or MAC) is needed")
            await self.p.ok("POST", path("devicecontrol", "newDeviceRequests"), {"id": rid})
            self.ui.flash(request, "ok", f"Device {rid} registered: waiting for it to connect.")
        except PlatformError as e:
            self.ui.flash(request, "error", f"Not registered: {e.message}")
        return self.ui.redirect(request, "requests")

    async def bulk(self, request: Request) -> Response:
        self.need_user(request)
        return self.ui.page(request, "bulk.html", {
            "title": "Bulk registration", "nav": "bulk", "result": None, "checked": None,
            "filename": None, "pending_count": await views.pending_count(self.p)})

    async def bulk_post(self, request: Request) -> Response:
        self.need_user(request)
        form = await self.auth.form(request, MAX_CSV_FORM)
        upload = form.get("file")
        ctx: dict[str, object] = {"title": "Bulk registration", "nav": "bulk", "result": None,
                                  "checked": None, "filename": None}
        if not isinstance(upload, UploadFile) or not upload.filename:
            self.ui.flash(request, "error", "Choose a CSV file first.")
            return self.ui.redirect(request, "bulk")
        data = await upload.read(MAX_CSV + 1)
        await upload.close()
        if len(data) > MAX_CSV:
            raise HTTPException(413, f"a CSV of at most {MAX_CSV} bytes")
        ctx["filename"] = upload.filename[:200]
        status = 200
        if form.get("action") == "check":
            # the validator alone (fleetcsv, as `microcot provision csv validate`): nothing is
            # registered; weak credentials are reported too
            parsed = fleetcsv.parse(data, check_weak=True)
            ctx["checked"] = {"rows": len(parsed.rows), "valid": len(parsed.valid_rows()),
                              "problems": parsed.problems}
        else:
            r = await self.p.call("POST", path("devicecontrol", "bulkNewDeviceRequests"), data,
                                  "text/csv")
            if r.status >= 300 or not isinstance(r.body, dict):
                msg = r.body.get("message") if isinstance(r.body, dict) else r.reason
                ctx["error"] = f"{r.status} {r.reason}: {msg}"
                status = 422 if r.status == 422 else 400
            else:
                ctx["result"] = r.body
        ctx["pending_count"] = await views.pending_count(self.p)
        return self.ui.page(request, "bulk.html", ctx, status)


def _message(e: Exception) -> str:
    return e.message if isinstance(e, PlatformError) else str(e)
