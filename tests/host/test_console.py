"""The emulator's web console without a browser: Starlette's TestClient over an Api in memory.

Login (only the admin, never a device user; the password never in a page or URL), the session
cookie's flags, logout ending the session on the server, CSRF and cross-origin refusals, every
page rendering what the REST API holds, and the actions (accept a request, create each kind of
operation, acknowledge and clear alarms, bulk registration with the validator's line numbers)
doing what the REST API does. The live stream's logic is tested on its generator.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from console_fixtures import csrf_of, mounted
from starlette.testclient import TestClient

from microcot import identity
from microcot_host.emulator.api import Api
from microcot_host.emulator.console import charts, create_app, live, operations
from microcot_host.emulator.model import Model

ADMIN, PASSWORD = "admin", "Adm1n-pa55word-for-tests"
BASE = "/apps/console"


@pytest.fixture
def api():
    model = Model()
    yield Api(model, admin_user=ADMIN)
    model.close()


@pytest.fixture
def app(api):
    return mounted(api, ADMIN, PASSWORD)


@pytest.fixture
def client(app):
    with TestClient(app[0], base_url="http://testserver") as c:
        yield c


def login(c: TestClient, user: str = ADMIN, password: str = PASSWORD):
    page = c.get(BASE + "/login")
    return c.post(BASE + "/login", data={"user": user, "password": password,
                                         "csrf": csrf_of(page.text)}, follow_redirects=False)


@pytest.fixture
def admin(client):
    r = login(client)
    assert r.status_code == 303 and r.headers["location"] == BASE + "/devices"
    return client


def call(api: Api, method: str, target: str, body: Any = None) -> dict[str, Any]:
    r = api.handle(method, target, body, "application/json" if body is not None else None,
                   user=ADMIN)
    assert r.status < 300, r
    return r.body if isinstance(r.body, dict) else {}


def device(api: Api, name: str = "dev", **fragments: Any) -> str:
    mo = call(api, "POST", "/inventory/managedObjects",
              {"name": name, "c8y_IsDevice": {}, **fragments})
    return mo["id"]


def post_form(c: TestClient, page: str, action: str, data: dict[str, str], **kw: Any):
    token = csrf_of(c.get(page).text)
    return c.post(action, data={**data, "csrf": token}, follow_redirects=False, **kw)


def iccid(n: int) -> str:
    payload = "894902%013d" % n
    return payload + str(identity.luhn_check_digit(payload))


# -- login ----------------------------------------------------------------------------------------

def test_every_page_and_action_needs_the_login(client, api):
    for path in ("/devices", "/devices/10001", "/requests", "/bulk"):
        r = client.get(BASE + path, follow_redirects=False)
        assert (r.status_code, r.headers["location"]) == (303, BASE + "/login"), path
    assert client.get(BASE + "/live/devices").status_code == 401
    api.bootstrap_request("dev-1")
    # a form with a valid token of a visitor who never logged in changes nothing
    r = post_form(client, BASE + "/login", BASE + "/requests/dev-1/accept", {})
    assert (r.status_code, r.headers["location"]) == (303, BASE + "/login")
    assert call(api, "GET", "/devicecontrol/newDeviceRequests/dev-1")["status"] == (
        "PENDING_ACCEPTANCE")
    # the root sends a visitor to the login, the admin to the devices
    assert client.get(BASE + "/", follow_redirects=False).headers["location"] == BASE + "/login"


def test_the_console_acts_as_the_apis_admin():
    model = Model()
    try:
        api = Api(model)
        create_app(api, "boss", "Pw-for-the-boss-1")
        assert api.admin_user == "boss"  # its REST calls are the admin's, not a fenced user's
        with pytest.raises(ValueError, match="boss"):
            create_app(api, "other", "Pw-for-the-other-1")
        with pytest.raises(ValueError):
            create_app(Api(model), "admin", "")
    finally:
        model.close()


def test_login_cookie_is_signed_httponly_strict_and_logout_ends_the_session(client):
    r = login(client)
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("microcot_console=")
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert "path=/apps/console" in cookie
    assert PASSWORD not in cookie and PASSWORD not in r.headers["location"]
    page = client.get(BASE + "/devices")
    assert page.status_code == 200 and PASSWORD not in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert page.headers["cache-control"] == "no-store"
    stolen = client.cookies.get("microcot_console")
    r = client.post(BASE + "/logout", data={"csrf": csrf_of(page.text)}, follow_redirects=False)
    assert r.headers["location"] == BASE + "/login"
    # the cookie from before the logout is signed and well formed, but dead on the server
    client.cookies.set("microcot_console", stolen, path=BASE)
    assert client.get(BASE + "/devices", follow_redirects=False).status_code == 303
    # a cookie signed with another key (another process) is nobody
    client.cookies.set("microcot_console", stolen[:-3] + "abc", path=BASE)
    assert client.get(BASE + "/devices", follow_redirects=False).status_code == 303


def test_login_goes_back_to_the_page_asked_for(client, api):
    mo = device(api)
    client.get(f"{BASE}/devices/{mo}", follow_redirects=False)
    r = login(client)
    assert r.headers["location"] == f"{BASE}/devices/{mo}"


def test_wrong_password_is_refused_and_never_shown(client):
    wrong = "Wr0ng-but-close-" + PASSWORD
    r = login(client, password=wrong)
    assert r.status_code == 401
    assert "Wrong user name or password" in r.text
    assert wrong not in r.text and PASSWORD not in r.text
    assert 'value="admin"' in r.text  # the user name is kept, the password field empty
    assert client.get(BASE + "/devices", follow_redirects=False).status_code == 303
    assert login(client, user="root").status_code == 401


def test_device_credentials_do_not_open_the_console(client, api):
    api.issue_credentials("dev-user-1", "Dev1ce-password-x")
    assert login(client, "dev-user-1", "Dev1ce-password-x").status_code == 401
    assert client.get(BASE + "/devices", follow_redirects=False).status_code == 303


def test_csrf_token_and_origin_are_checked(admin, api):
    api.bootstrap_request("dev-2")
    page = BASE + "/requests"
    action = BASE + "/requests/dev-2/accept"
    assert admin.post(action, data={}).status_code == 403
    assert admin.post(action, data={"csrf": "forged"}).status_code == 403
    r = post_form(admin, page, action, {}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    r = post_form(admin, page, action, {}, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    assert call(api, "GET", "/devicecontrol/newDeviceRequests/dev-2")["status"] == (
        "PENDING_ACCEPTANCE")
    # the login form needs its token too
    assert admin.post(BASE + "/login", data={"user": ADMIN, "password": PASSWORD}
                      ).status_code == 403


# -- pages ----------------------------------------------------------------------------------------

def test_devices_page_shows_ids_availability_last_message_and_children(admin, api):
    parent = device(api, "Boiler room", c8y_RequiredAvailability={"responseInterval": 10})
    child = device(api, "Valve <3>")
    call(api, "POST", f"/inventory/managedObjects/{parent}/childDevices",
         {"managedObject": {"id": child}})
    call(api, "POST", f"/identity/globalIds/{parent}/externalIds",
         {"type": "c8y_Serial", "externalId": "89490200001"})
    api.record_message(parent)
    html = admin.get(BASE + "/devices").text
    row = re.search(rf'<tr data-device="{parent}">.*?</tr>', html, re.S).group(0)
    assert "Boiler room" in row and "89490200001" in row and "c8y_Serial" in row
    assert 'class="chip available"' in row
    assert f'href="{BASE}/devices/{child}"' in row
    assert "Valve &lt;3&gt;" in html and "Valve <3>" not in html  # escaped
    # the last message as the platform computed it (c8y_Availability.lastMessage)
    last = call(api, "GET", f"/inventory/managedObjects/{parent}")["c8y_Availability"]
    assert last["lastMessage"][:10] in row
    assert 'class="chip not_monitored"' in html  # the child has no required interval
    assert "No devices matching" in admin.get(BASE + "/devices?text=nothing-like-it").text


def test_device_page_shows_charts_events_alarms_operations_identities(admin, api):
    mo = device(api, "Sensor", c8y_SupportedOperations=["c8y_Command", "c8y_Restart"])
    call(api, "POST", f"/identity/globalIds/{mo}/externalIds",
         {"type": "c8y_Serial", "externalId": "SN-77"})
    for i, v in enumerate((20.5, 21.0, 19.75)):
        call(api, "POST", "/measurement/measurements",
             {"source": {"id": mo}, "type": "c8y_T", "time": f"2024-05-01T10:00:0{i}Z",
              "c8y_Temperature": {"T": {"value": v, "unit": "C"}},
              "c8y_Battery": {"level": {"value": 90 - i, "unit": "%"}}})
    call(api, "POST", "/event/events", {"source": {"id": mo}, "type": "c8y_Boot",
                                        "text": "booted", "time": "2024-05-01T10:00:00Z"})
    call(api, "POST", "/alarm/alarms", {"source": {"id": mo}, "type": "c8y_Heat", "text": "hot",
                                        "severity": "MAJOR", "time": "2024-05-01T10:00:00Z"})
    call(api, "POST", "/devicecontrol/operations",
         {"deviceId": mo, "c8y_Command": {"text": "uptime"}})
    html = admin.get(f"{BASE}/devices/{mo}").text
    assert 'data-series="c8y_Temperature.T" data-points="3" data-last="19.75 C"' in html
    assert 'data-series="c8y_Battery.level" data-points="3"' in html
    assert "<svg" in html and 'class="line"' in html
    assert "booted" in html and "c8y_Boot" in html
    assert "hot" in html and "Acknowledge" in html and "Clear" in html
    assert "$ uptime" in html and 'class="chip op pending"' in html
    assert "SN-77" in html
    # a form per operation the agent serves
    for k in operations.KINDS:
        assert f'data-kind="{k.fragment}"' in html
    r = admin.get(BASE + "/devices/99999")
    assert r.status_code == 404 and "99999" in r.text  # the API's message


def test_static_files_are_served_and_pages_load_nothing_from_elsewhere(admin, api):
    mo = device(api)
    html = admin.get(f"{BASE}/devices/{mo}").text
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert ref.startswith(BASE + "/"), ref  # no CDN, no absolute URL of another host
    assert "<script>" not in html  # the CSP allows no inline script
    assert admin.get(BASE + "/static/console.css").status_code == 200
    js = admin.get(BASE + "/static/console.js")
    assert js.status_code == 200 and "EventSource" in js.text


# -- actions --------------------------------------------------------------------------------------

def test_accept_button_accepts_the_pending_request(admin, api):
    accepted: list[dict[str, Any]] = []
    api.on_request_accepted(accepted.append)
    api.bootstrap_request("dev-3")
    page = admin.get(BASE + "/requests").text
    assert f'action="{BASE}/requests/dev-3/accept"' in page
    assert f'action="{BASE}/requests/dev-3/accept"' in admin.get(BASE + "/devices").text
    r = post_form(admin, BASE + "/requests", BASE + "/requests/dev-3/accept", {})
    assert r.headers["location"] == BASE + "/requests"
    assert call(api, "GET", "/devicecontrol/newDeviceRequests/dev-3")["status"] == "ACCEPTED"
    assert [a["id"] for a in accepted] == ["dev-3"]
    assert "Device dev-3 accepted" in admin.get(BASE + "/requests").text
    # the API's refusal is shown: an accepted request cannot be accepted from WAITING...
    call(api, "POST", "/devicecontrol/newDeviceRequests", {"id": "dev-4"})
    post_form(admin, BASE + "/requests", BASE + "/requests/dev-4/accept", {})
    text = admin.get(BASE + "/requests").text
    assert "Device dev-4 not accepted" in text
    assert call(api, "GET", "/devicecontrol/newDeviceRequests/dev-4")["status"] == (
        "WAITING_FOR_CONNECTION")
    # expect a device, delete a request
    post_form(admin, BASE + "/requests", BASE + "/requests", {"id": "dev-5"})
    assert call(api, "GET", "/devicecontrol/newDeviceRequests/dev-5")["status"] == (
        "WAITING_FOR_CONNECTION")
    post_form(admin, BASE + "/requests", BASE + "/requests/dev-5/delete", {})
    assert api.handle("GET", "/devicecontrol/newDeviceRequests/dev-5", user=ADMIN).status == 404
    # an id with characters that mean something in a URL is quoted in the links
    api.bootstrap_request("odd?id%1 x")
    assert f'action="{BASE}/requests/odd%3Fid%251%20x/accept"' in admin.get(BASE + "/requests").text
    post_form(admin, BASE + "/requests", BASE + "/requests/odd%3Fid%251%20x/accept", {})
    assert call(api, "GET", "/devicecontrol/newDeviceRequests/odd%3Fid%251%20x")["status"] == (
        "ACCEPTED")


def test_operation_forms_create_operations(admin, api):
    mo = device(api)
    page = f"{BASE}/devices/{mo}"
    action = f"{BASE}/devices/{mo}/operations"
    r = post_form(admin, page, action, {"kind": "c8y_Command", "text": "  ls -l  "})
    assert r.headers["location"] == page + "#operations"
    forms = {
        "c8y_Restart": {},
        "c8y_Firmware": {"name": "microcot", "version": "1.2", "url": "https://h/b/1",
                         "sha256": ""},
        "c8y_SoftwareUpdate": {"name": "app", "version": "3", "url": "https://h/b/2"},
        "c8y_Configuration": {"config": '{"interval": 30}'},
        "c8y_SendConfiguration": {},
        "c8y_LogfileRequest": {"logFile": "agent", "searchText": "error",
                               "maximumLines": "50"},
    }
    for kind, fields in forms.items():
        post_form(admin, page, action, {"kind": kind, **fields})
    ops = call(api, "GET", f"/devicecontrol/operations?deviceId={mo}&pageSize=20")["operations"]
    by = {operations.fragment_of(o): o for o in ops}
    assert by["c8y_Command"]["c8y_Command"] == {"text": "ls -l"}
    assert by["c8y_Command"]["description"] == "Execute shell command: ls -l"
    assert by["c8y_Restart"]["c8y_Restart"] == {}
    assert by["c8y_Firmware"]["c8y_Firmware"] == {"name": "microcot", "version": "1.2",
                                                  "url": "https://h/b/1"}
    assert by["c8y_SoftwareUpdate"]["c8y_SoftwareUpdate"] == [
        {"name": "app", "version": "3", "url": "https://h/b/2", "action": "install"}]
    assert json.loads(by["c8y_Configuration"]["c8y_Configuration"]["config"]) == {"interval": 30}
    assert by["c8y_LogfileRequest"]["c8y_LogfileRequest"] == {
        "logFile": "agent", "searchText": "error", "maximumLines": 50}
    assert {o["status"] for o in ops} == {"PENDING"} and len(ops) == 7
    # refused forms create nothing and say why
    for form, why in (({"kind": "c8y_Command", "text": " "}, "Command is needed"),
                      ({"kind": "c8y_Configuration", "config": "[1, 2]"}, "must be a JSON object"),
                      ({"kind": "c8y_Nonsense"}, "unknown operation")):
        post_form(admin, page, action, form)
        assert why in admin.get(page).text  # the message comes with the next page
    ops = call(api, "GET", f"/devicecontrol/operations?deviceId={mo}&pageSize=20")["operations"]
    assert len(ops) == 7
    # the API's own refusal (no such device) is shown as its message
    post_form(admin, page, f"{BASE}/devices/99999/operations",
              {"kind": "c8y_Command", "text": "x"})
    assert "Operation not created" in admin.get(page).text


def test_alarms_are_acknowledged_and_cleared(admin, api):
    mo = device(api)
    a = call(api, "POST", "/alarm/alarms", {"source": {"id": mo}, "type": "t", "text": "x",
                                            "severity": "MINOR",
                                            "time": "2024-05-01T10:00:00Z"})
    page = f"{BASE}/devices/{mo}"
    action = f"{BASE}/alarms/{a['id']}"
    r = post_form(admin, page, action, {"status": "ACKNOWLEDGED", "device": mo})
    assert r.headers["location"] == page + "#alarms"
    assert call(api, "GET", f"/alarm/alarms/{a['id']}")["status"] == "ACKNOWLEDGED"
    post_form(admin, page, action, {"status": "CLEARED", "device": mo})
    assert call(api, "GET", f"/alarm/alarms/{a['id']}")["status"] == "CLEARED"
    assert post_form(admin, page, action, {"status": "ACTIVE"}).status_code == 400
    html = admin.get(page).text
    assert "Acknowledge" not in html and 'class="chip alarm cleared"' in html


def test_bulk_registration_shows_line_precise_errors_and_never_a_password(admin, api):
    good_pw, bad_pw = "Str0ng-Passw0rd", "Xy-9-pass-word"
    csv = (f"ID;CREDENTIALS;TYPE;NAME;ICCID;SHELL\n"
           f"dev-a;{good_pw};mqtt;Device A;{iccid(1)};1\n"
           f"dev-b;{bad_pw};http;Device B;{iccid(2)};1\n"
           f"dev-c;Qz7%k;mqtt;Device C;12345;0\n").encode()
    files = {"file": ("fleet.csv", csv, "text/csv")}
    page = BASE + "/bulk"
    r = post_form(admin, page, page, {"action": "check"}, files=files)
    assert r.status_code == 200 and 'id="check-result"' in r.text
    assert "3 rows, 1 without errors" in r.text
    assert good_pw not in r.text and bad_pw not in r.text
    # lines as in the file, the header being line 1
    assert re.search(r'<td class="num">4</td><td>ICCID</td>', r.text)
    assert re.search(r'<td class="num">4</td><td>CREDENTIALS</td>', r.text)
    assert re.search(r'<td class="num">3</td><td>TYPE</td>', r.text)
    assert api.handle("GET", "/devicecontrol/newDeviceRequests", user=ADMIN).body[
        "newDeviceRequests"] == []  # a check registers nothing
    r = post_form(admin, page, page, {"action": "register"}, files=files)
    assert r.status_code == 200 and 'id="bulk-result"' in r.text
    assert re.search(r"<b>1</b> created", r.text) and re.search(r"<b>2</b> failed", r.text)
    assert re.search(r'<td class="num">3</td><td class="mono">dev-b</td><td>TYPE', r.text)
    assert re.search(r'<td class="num">4</td><td class="mono">dev-c</td>', r.text)
    for pw in (good_pw, bad_pw, "Qz7%k"):
        assert pw not in r.text
    assert call(api, "GET", f"/devicecontrol/newDeviceRequests/{iccid(1)}")["status"] == (
        "ACCEPTED")
    # a file the API cannot use at all says so
    files = {"file": ("x.csv", b"what;ever\n1;2\n", "text/csv")}
    r = post_form(admin, page, page, {"action": "register"}, files=files)
    assert r.status_code == 422 and "422" in r.text


def test_bodies_are_bounded(admin):
    page = BASE + "/bulk"
    big = {"file": ("big.csv", b"x" * ((1 << 20) + 100), "text/csv")}
    r = post_form(admin, page, page, {"action": "check"}, files=big)
    assert r.status_code == 413


# -- live stream ----------------------------------------------------------------------------------

def test_the_stream_of_a_page_pushes_its_regions(admin, api, app):
    mo = device(api)
    call(api, "POST", "/measurement/measurements",
         {"source": {"id": mo}, "type": "c8y_T", "time": "2024-05-01T10:00:00Z",
          "c8y_Temperature": {"T": {"value": 1.25, "unit": "C"}}})
    app[1].state.streams.lifetime = 0.2  # the stream ends by itself: TestClient reads it whole
    app[1].state.streams.poll = 0.05
    r = admin.get(f"{BASE}/live/devices/{mo}")
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    targets = [e["target"] for e in events]
    assert targets == ["device-head", "charts", "operations-table", "alarms", "events",
                       "pending-badge"]
    assert 'data-points="1"' in events[1]["html"]
    assert r.text.startswith("retry: ")
    for page in ("/live/devices", "/live/requests"):
        assert "event: region" in admin.get(BASE + page).text


class FakeRequest:
    """What live.Streams needs of a request: a session and whether the client went away."""

    def __init__(self) -> None:
        self.session: dict[str, Any] = {}
        self.gone = False

    async def is_disconnected(self) -> bool:
        return self.gone


def test_stream_sends_a_region_only_when_its_probe_changes_and_ends(admin):
    auth_user: list[str | None] = ["admin"]

    class Auth:
        def user(self, request: object) -> str | None:
            return auth_user[0]

    streams = live.Streams(Auth(), max_streams=1, poll=0)  # type: ignore[arg-type]
    state = {"n": 1}
    renders: list[object] = []

    async def probe() -> object:
        return state["n"]

    async def render(v: object) -> str:
        renders.append(v)
        return f"<b>{v}</b>"

    async def run() -> list[str]:
        req = FakeRequest()
        gen = streams._events(req, [live.Region("r", probe, render)])  # type: ignore[arg-type]
        out = [await gen.__anext__(), await gen.__anext__()]  # retry, the first render
        assert streams.count == 1
        # a second stream beyond the bound is refused
        assert streams.response(req, []).status_code == 503  # type: ignore[arg-type]
        state["n"] = 2
        out.append(await gen.__anext__())  # only the change comes, after quiet polls
        auth_user[0] = None  # logged out: the stream says bye and ends
        out.append(await gen.__anext__())
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()
        assert streams.count == 0
        return out

    out = asyncio.run(run())
    assert out[0].startswith("retry:")
    assert json.loads(out[1].split("data: ")[1]) == {"target": "r", "html": "<b>1</b>"}
    assert json.loads(out[2].split("data: ")[1])["html"] == "<b>2</b>"
    assert out[3].startswith("event: bye")
    assert renders == [1, 2]


# -- charts ---------------------------------------------------------------------------------------

def test_chart_geometry():
    ms = [{"time": f"2024-05-01T10:00:0{i}Z", "c8y_T": {"T": {"value": v, "unit": "C"}},
           "c8y_S": {"s": {"value": "text"}, "b": {"value": True}}}
          for i, v in enumerate((10.0, 20.0, 15.0))]
    [c] = charts.charts(ms)  # strings and booleans are no series
    assert c.series.key == "c8y_T.T" and c.last == "15 C"
    xs = [d.x for d in c.dots]
    ys = [d.y for d in c.dots]
    x0, y0, x1, y1 = c.plot
    assert xs == sorted(xs) and xs[0] == x0 and xs[-1] == x1
    assert ys[1] < ys[2] < ys[0]  # higher values are higher up
    assert all(y0 <= y <= y1 for y in ys)
    assert [t.label for t in c.y_ticks] == ["10", "12.5", "15", "17.5", "20"]
    # one point, or all equal: a flat line in the middle, no division by zero
    [one] = charts.charts(ms[:1])
    assert one.dots[0].x == (x0 + x1) / 2
    # out of order times are sorted; bounded
    many = [{"time": "2024-05-01T10:00:00Z", "f": {"s": {"value": i}}} for i in range(800)]
    assert len(charts.series_of(many)[0].points) == charts.MAX_POINTS
