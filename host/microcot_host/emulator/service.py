"""The whole platform emulator in one object: `with Emulator(data_dir) as emu: ...`.

Start order: the broker (Mosquitto, broker.py, plain MQTT on a free port of 127.0.0.1), the
platform model (SQLite) and its REST API with the broker as credential sink, the SmartREST engine,
the HTTP server (REST + `POST /s`), the MQTT front (front.py: the public MQTT port with TLS, which
serves the bootstrap user's sessions itself and joins every device's connection to Mosquitto), the
MQTT connector; stop() goes the other way. Devices see one host and port for bootstrap and data,
as the real platform's single broker URL. Everything that must survive a restart lives in
`data_dir`:

    connection.json        where to connect, with the passwords (0600, rewritten on every start)
    emulator-secrets.json  the admin's and the bootstrap user's passwords (0600, made once)
    platform.sqlite        the platform's data (model.py), engine and connector state included
                           (not made with `database_url`: the data is in PostgreSQL then)
    binaries/              the content of /inventory/binaries, one file per managed object id
    connector.key          the key that encrypts stored bootstrap secrets (0600, bootstrap.py)
    bootstrap-sessions.json  the bootstrap user's persistent sessions (0600, front_bootstrap.py)
    broker/                Mosquitto's files: TLS CA and server certificate, users, sessions, log

`emu.broker.stop()` and `start()` (tests do, to cut devices off) stop Mosquitto alone: the front
keeps its port, closes the connections joined to Mosquitto and answers CONNACK 3 ("server
unavailable") until Mosquitto is back on the same loopback port.

`data_dir=None` uses a new temporary directory, removed when the `with` block ends. Ports given
as 0 are chosen free on the first start and reused on later starts when they are still free, so
devices configured with them keep working after a restart.

The REST API is served twice over the same Api: plain HTTP (`http_url`) and, unless `https=False`,
HTTPS (`https_url`) with the broker's server certificate, so a device verifies it with the same CA
file (`ca_cert`) as the broker. A thread runs the availability check (availability.py) every
`availability_interval` seconds; `clock` (Unix seconds) drives the model, the SmartREST engine's
NOW and availability, so tests can move time.

The broker is a child process that gets SIGTERM when the thread that started it ends (broker.py):
start the emulator from a thread that lives as long as it should, normally the main thread.

`database_url="postgresql://..."` keeps the platform's data in PostgreSQL instead of
platform.sqlite (model_pg.py): for many worker processes, and for several emulators sharing one
database (docs/guides/emulator-scaling.md says what that does and does not share). The URL's
password is never logged; `database` is the URL without it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import shutil
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..files import private_dir, secrets_file, write_private
from .api import Api
from .binaries import DEFAULT_MAX_SIZE, BinaryStore
from .broker import Broker
from .certs import TlsFiles, ensure_ca_and_server, server_ssl_context
from .connector import TOPICS, Connector
from .engine import Engine
from .front import Front, server_context
from .front_bootstrap import BootstrapHub
from .http import RestServer
from .model import Model, is_database_url, open_model
from .model_pg import StoreError, display
from .sessions import delete_session, layout, settle
from .workers import BrokerAccess, SubscribingSink, WorkerConfig, Workers

log = logging.getLogger(__name__)

# devices of one add_devices call from which a restart of an idle broker beats commands: the
# restart took 0.3-0.5 s here, the commands of 100 devices 0.6 s into an empty broker and more
# the more users it has (broker.py, "Adding many devices")
QUIET_RESTART_AT = 100

CONNECTION_KEYS = ("mqtt_host", "mqtt_port", "ca_cert", "http_url", "https_url", "admin_user",
                   "admin_password", "bootstrap_user", "bootstrap_password")


class EmulatorError(RuntimeError):
    """The emulator could not start, or a convenience call was refused."""


class Emulator:
    """A Cloud of Things on this machine; see the module docstring.

    Attributes once started: `api` (api.Api), `engine` (engine.Engine), `broker`
    (broker.Broker), `front` (front.Front), `rest` (http.RestServer), `connector`
    (connector.Connector), `model`, `connection` (the dict written to connection.json).
    """

    def __init__(self, data_dir: Path | str | None = None, mqtt_port: int = 0,
                 http_port: int = 0, auto_accept: bool = False,
                 bootstrap_user: str = "devicebootstrap", admin_user: str = "admin",
                 host: str = "127.0.0.1", tenant: str = "t-emulator", workers: int = 4,
                 max_message: int = 64 * 1024, https: bool = True, https_port: int = 0,
                 max_binary: int = DEFAULT_MAX_SIZE, clock: Callable[[], float] = time.time,
                 availability_interval: float = 10.0, names: tuple[str, ...] = (),
                 worker_processes: int = 1, database_url: str | None = None) -> None:
        """host: the address to listen on (0.0.0.0 for every IPv4 address); names: the host
        names and addresses real boards use to reach this machine. The server certificate
        carries them all (with localhost, 127.0.0.1 and ::1); the first is what connection.json
        tells devices. workers: threads per connector; worker_processes: connector processes
        (workers.py; 1 is the single connector in this process). database_url: a
        postgresql:// URL for the platform's data instead of platform.sqlite in data_dir."""
        self._temp = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="microcot-emulator-") if data_dir is None
                             else data_dir).resolve()
        self.mqtt_port = mqtt_port
        self.http_port = http_port
        self.auto_accept = auto_accept
        self.bootstrap_user = bootstrap_user
        self.admin_user = admin_user
        self.host = host
        self.names = tuple(names)
        if not names and host in ("0.0.0.0", "::", ""):
            raise EmulatorError(f"listening on every address ({host}): name the host boards use "
                                "to reach this machine (--host NAME), for the certificate")
        self.tenant = tenant
        self.workers = workers
        if worker_processes < 1:
            raise EmulatorError("at least one worker process")
        if worker_processes > 1 and clock is not time.time:
            # worker processes keep their own time; a moved clock would differ between them
            raise EmulatorError("a clock of its own needs worker_processes=1")
        self.worker_processes = worker_processes
        if database_url is not None and not is_database_url(database_url):
            raise EmulatorError("database_url: a postgresql:// URL (SQLite is the default, in "
                                "the data directory)")
        self._database_url = database_url
        self.max_message = max_message
        self.https = https
        self.https_port = https_port
        self.max_binary = max_binary
        self.clock = clock
        self.availability_interval = availability_interval
        self.broker: Broker | None = None
        self.front: Front | None = None
        self.model: Model | None = None
        self.api: Api | None = None
        self.engine: Engine | None = None
        self.rest: RestServer | None = None
        self.rest_tls: RestServer | None = None
        self._monitor: threading.Thread | None = None
        self._monitor_stop = threading.Event()
        self.connector: Connector | None = None
        self.pool: Workers | None = None           # worker processes (worker_processes > 1)
        self.connection: dict[str, Any] = {}

    # -- paths --------------------------------------------------------------------------------

    @property
    def public_host(self) -> str:
        """The name devices are told to connect to: the first of `names`, else the listener's."""
        return self.names[0] if self.names else self.host

    def _cert_names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(DNS names, IP addresses) for the server certificate."""
        dns, ips = ["localhost"], ["127.0.0.1", "::1"]
        for name in (*self.names, self.host):
            try:
                ip = str(ipaddress.ip_address(name))
            except ValueError:
                if name and name not in dns:
                    dns.append(name)
                continue
            if not ipaddress.ip_address(ip).is_unspecified and ip not in ips:
                ips.append(ip)
        return tuple(dns), tuple(ips)

    def cert_names(self) -> list[str]:
        """The names and addresses the server certificate carries."""
        dns, ips = self._cert_names()
        return [*dns, *ips]

    @property
    def database(self) -> str:
        """Where the platform's data is: the SQLite file, or the URL without its password."""
        if self._database_url is not None:
            return display(self._database_url)
        return str(self._sqlite_file)

    @property
    def _sqlite_file(self) -> Path:
        return self.data_dir / "platform.sqlite"

    def _store(self) -> str:
        """What open_model and the worker processes open (the URL with its password)."""
        return self._database_url or str(self._sqlite_file)

    @property
    def connection_file(self) -> Path:
        return self.data_dir / "connection.json"

    @property
    def ca_cert(self) -> Path:
        return self.data_dir / "broker" / "tls" / "ca.pem"

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Emulator:
        try:
            self.start()
        except BaseException:
            if self._temp:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._temp:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.connector is not None

    def start(self) -> None:
        if self.running:
            return
        private_dir(self.data_dir)
        passwords = self._passwords()
        previous = self._previous_ports()
        try:
            self.broker = self._start_broker()
            tls = self._tls_files()
            try:
                self.model = open_model(self._store(), clock=self.clock,
                                        shared=self.worker_processes > 1)
            except StoreError as exc:
                raise EmulatorError(str(exc)) from None
            # before anything can reach the broker: sessions of another layout are served and
            # deleted (sessions.py)
            self._settle_sessions()
            several = self.worker_processes > 1
            sink: Any = self.broker
            if several:
                self.pool = self._start_workers()
                sink = SubscribingSink(self.broker, self.pool)
            self.api = Api(self.model, credentials=sink, tenant=self.tenant,
                           binaries=BinaryStore(self.data_dir / "binaries", self.max_binary))
            self.engine = Engine(self.api, max_body=self.max_message, clock=self.clock,
                                 shared=several)
            self.rest = self._start_rest(passwords["admin_password"], previous.get("http_port"),
                                         self.http_port)
            if self.https:
                self.rest_tls = self._start_rest(passwords["admin_password"],
                                                 previous.get("https_port"), self.https_port,
                                                 server_ssl_context(tls))
            # before the connector: the relay must hold sr/+ before anything is answered on it
            self.front = self._start_front(passwords["bootstrap_password"],
                                           previous.get("mqtt_port"), tls)
            pool = self.pool
            connector = Connector(self.broker, self.api, self.engine,
                                  auto_accept=self.auto_accept,
                                  key_file=self.data_dir / "connector.key",
                                  max_message=self.max_message, workers=self.workers,
                                  # with workers: bootstrap here, device messages there
                                  topics=TOPICS if pool is None else ("ss/+",),
                                  owns=None if pool is None else (lambda user: False),
                                  route_operation=None if pool is None else pool.operation)
            if pool is not None:
                connector.bootstrap.on_issued = pool.issued
            connector.on_device_message = self._device_active
            connector.start()
            self.connector = connector
            self._start_monitor()
        except BaseException:
            self._stop_parts()
            raise
        self.connection = {
            "mqtt_host": self.public_host,
            "mqtt_port": self.front.port,
            "ca_cert": str(tls.ca_cert),
            "http_url": self.rest.url,
            **({"https_url": self.rest_tls.url} if self.rest_tls is not None else {}),
            "admin_user": self.admin_user,
            "admin_password": passwords["admin_password"],
            "bootstrap_user": self.bootstrap_user,
            "bootstrap_password": passwords["bootstrap_password"],
        }
        write_private(self.connection_file, json.dumps(self.connection, indent=2) + "\n")
        log.info("emulator running: MQTT %s:%d, REST %s, data %s, database %s",
                 self.public_host, self.front.port, self.rest.url, self.data_dir, self.database)

    def stop(self) -> None:
        self._stop_parts()

    def restart(self) -> None:
        """Stop and start again on the same data (and, when free, the same ports)."""
        self.stop()
        self.start()

    def _stop_parts(self) -> None:
        front, self.front = self.front, None
        if front is not None:
            front.stop()
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            self._monitor_stop.set()
            monitor.join(5)
        connector, self.connector = self.connector, None
        if connector is not None:
            try:
                connector.stop()
            except Exception:
                log.exception("stopping the connector failed")
        pool, self.pool = self.pool, None
        if pool is not None:
            try:
                pool.stop()
            except Exception:
                log.exception("stopping the worker processes failed")
        for rest in (self.rest, self.rest_tls):
            if rest is not None:
                rest.stop()
        self.rest = self.rest_tls = None
        model, self.model = self.model, None
        if model is not None:
            model.close()
        broker, self.broker = self.broker, None
        if broker is not None:
            broker.stop()

    def _start_broker(self) -> Broker:
        # loopback only, no TLS: devices reach it through the front, which holds the TLS
        broker = Broker(self.data_dir / "broker", port=0, host="127.0.0.1", tls=False,
                        reserved=(self.bootstrap_user,))
        broker.start()
        if broker.has_device(self.bootstrap_user):
            raise EmulatorError(f"{self.bootstrap_user!r} is a device; it cannot be the "
                                "bootstrap user")
        return broker

    def _settle_sessions(self) -> None:
        """Serve and delete the connector sessions of an earlier layout (sessions.py), with an
        Api and Engine of their own whose hooks nobody else fires."""
        assert self.broker is not None and self.model is not None
        broker = self.broker
        api = Api(self.model, credentials=broker, tenant=self.tenant,
                  binaries=BinaryStore(self.data_dir / "binaries", self.max_binary),
                  admin_user=self.admin_user)
        engine = Engine(api, max_body=self.max_message, clock=self.clock)

        def active(user: str) -> None:
            mo = engine.device_mo_id(user)
            if mo is not None:
                api.record_message(mo)

        def make(client_id: str) -> Connector:
            c = Connector(broker, api, engine, client_id=client_id, topics=(),
                          owns=lambda user: False, auto_accept=self.auto_accept,
                          key_file=self.data_dir / "connector.key",
                          max_message=self.max_message, workers=self.workers)
            c.on_device_message = active
            return c

        settle(self.model, layout(self.worker_processes), make,
               lambda client_id: delete_session(broker, client_id))

    def _start_workers(self) -> Workers:
        assert self.broker is not None and self.model is not None
        broker = self.broker
        access = BrokerAccess.of(broker)
        n = self.worker_processes
        level = logging.getLogger().getEffectiveLevel()

        def config(k: int, devices: tuple[str, ...]) -> WorkerConfig:
            # no key file: a worker never keeps bootstrap secrets (the main process does), and
            # two processes must not both create the one key
            return WorkerConfig(k, n, self._store(),
                                str(self.data_dir / "binaries"), self.max_binary, self.tenant,
                                self.admin_user, self.max_message, self.workers, "", access,
                                devices, level)

        pool = Workers(n, config, lambda: sorted(broker.device_ids()),
                       on_active=self._device_active, on_forget=self._forget_collection)
        pool.start()
        return pool

    def _forget_collection(self, xid: str) -> None:
        if self.engine is not None:
            self.engine.forget(xid)

    def _tls_files(self) -> TlsFiles:
        dns, ips = self._cert_names()
        return ensure_ca_and_server(self.data_dir / "broker", dns, ips)

    def _start_front(self, bootstrap_password: str, previous: int | None,
                     tls: TlsFiles) -> Front:
        broker = self.broker
        assert broker is not None
        port = self.mqtt_port or previous or 0
        for attempt in (port, 0):
            hub = BootstrapHub(broker, self.bootstrap_user, bootstrap_password,
                               self.data_dir / "bootstrap-sessions.json")
            front = Front(self.host, attempt, server_context(tls),
                          lambda: (broker.local_host, broker.port), bootstrap=hub,
                          reserved=broker.reserved - {self.bootstrap_user})
            try:
                front.start()
                return front
            except OSError:
                if attempt == 0 or self.mqtt_port:
                    raise
                log.info("MQTT port %s of the last run is taken: choosing another", attempt)
        raise AssertionError("unreachable")

    def _start_rest(self, admin_password: str, previous: int | None, fixed: int,
                    tls: ssl.SSLContext | None = None) -> RestServer:
        assert self.api is not None and self.engine is not None
        port = fixed or previous or 0
        for attempt in (port, 0):
            rest = RestServer(self.api, self.admin_user, admin_password, port=attempt,
                              host=self.host, smartrest=self.engine.serve_http,
                              tls=tls, set_base_url=tls is None, on_device=self._device_active,
                              public_host=self.public_host)
            try:
                rest.start()
                return rest
            except OSError:
                if attempt == 0 or fixed:
                    raise
                log.info("%s port %s of the last run is taken: choosing another",
                         "HTTPS" if tls else "HTTP", attempt)
        raise AssertionError("unreachable")

    # -- availability ---------------------------------------------------------------------------

    def _device_active(self, user: str) -> None:
        """A device user sent something (MQTT message or REST request): note it for
        availability, once its managed object is known."""
        if self.engine is None or self.api is None:
            return
        mo = self.engine.device_mo_id(user)
        if mo is not None:
            self.api.record_message(mo)

    def _start_monitor(self) -> None:
        if self.availability_interval <= 0:
            return
        self._monitor_stop.clear()
        t = threading.Thread(target=self._monitor_loop, name="emulator-availability",
                             daemon=True)
        self._monitor = t
        t.start()

    def _monitor_loop(self) -> None:
        while not self._monitor_stop.wait(self.availability_interval):
            api = self.api
            if api is None:
                return
            try:
                api.check_availability()
            except Exception:
                log.exception("the availability check failed")

    def check_availability(self) -> list[str]:
        """Run the availability check now (tests that move the clock); the ids alarmed now."""
        return self._need_api().check_availability()

    # -- persisted settings -------------------------------------------------------------------

    def _passwords(self) -> dict[str, str]:
        return secrets_file(self.data_dir / "emulator-secrets.json",
                            ("admin_password", "bootstrap_password"), nbytes=18)

    def _previous_ports(self) -> dict[str, int]:
        try:
            old = json.loads(self.connection_file.read_text())
            out = {"mqtt_port": int(old["mqtt_port"])}
            for key in ("http", "https"):
                url = str(old.get(key + "_url", "")).split("//", 1)[-1]
                out[key + "_port"] = int(url.rsplit(":", 1)[1]) if ":" in url else 0
            return out
        except (FileNotFoundError, ValueError, KeyError, TypeError, IndexError):
            return {}

    # -- conveniences for tests and tools ---------------------------------------------------

    def _need_api(self) -> Api:
        if self.api is None:
            raise EmulatorError("the emulator is not running: start() it first")
        return self.api

    def accept(self, device_id: str) -> dict[str, Any]:
        """Accept the device's new device request (as REST PUT does); returns the request."""
        r = self._need_api().handle("PUT", "/devicecontrol/newDeviceRequests/"
                                    + quote(device_id, safe=""), {"status": "ACCEPTED"})
        if r.status != 200 or not isinstance(r.body, dict):
            message = r.body.get("message") if isinstance(r.body, dict) else r.reason
            raise EmulatorError(f"accepting {device_id} failed: {r.status} {message}")
        return r.body

    def create_operation(self, device_mo_id: str, fragment: dict[str, Any]) -> dict[str, Any]:
        """Create an operation for a managed object (as REST POST does); returns it."""
        r = self._need_api().handle("POST", "/devicecontrol/operations",
                                    {"deviceId": str(device_mo_id), **fragment})
        if r.status != 201 or not isinstance(r.body, dict):
            message = r.body.get("message") if isinstance(r.body, dict) else r.reason
            raise EmulatorError(f"creating the operation failed: {r.status} {message}")
        return r.body

    def upload_binary(self, name: str, data: bytes, type: str = "application/octet-stream",
                      content_type: str | None = None, **fragments: Any) -> dict[str, Any]:
        """Store a binary as the admin would (POST /inventory/binaries, multipart with `object`
        and `file`); returns its managed object. `content_type` defaults to `type`."""
        boundary = "microcot-" + uuid.uuid4().hex
        obj = json.dumps({"name": name, "type": type, **fragments}).encode()
        body = b"".join([
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"object\"\r\n"
            "Content-Type: application/json\r\n\r\n".encode(), obj,
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{quote(name)}\"\r\nContent-Type: {content_type or type}\r\n\r\n"
            .encode(), data, f"\r\n--{boundary}--\r\n".encode()])
        r = self._need_api().handle("POST", "/inventory/binaries", body,
                                    f"multipart/form-data; boundary={boundary}")
        if r.status != 201 or not isinstance(r.body, dict):
            message = r.body.get("message") if isinstance(r.body, dict) else r.reason
            raise EmulatorError(f"uploading {name} failed: {r.status} {message}")
        return r.body

    def add_device(self, device_id: str, password: str | None = None) -> str:
        """Give a device broker credentials directly (no bootstrap); returns the password."""
        password = password or secrets.token_urlsafe(15)
        self._need_api().issue_credentials(device_id, password, source="emulator")
        return password

    def add_devices(self, devices: Iterable[tuple[str, str]]) -> None:
        """add_device for many (ID, password) pairs at once.

        Mosquitto's plugin rewrites its whole user file after every change (broker.py, "Adding
        many devices"), so commands cost more the larger the fleet. When the batch has at least
        QUIET_RESTART_AT devices, no connection is open on the front (no device to cut off) and
        this is the thread that started the broker (whose end stops it), the broker is stopped,
        the users are written into its file and it is started again on the same port: well under
        a second plus 0.5 ms per device (2.6 s for 5,000 devices, against minutes of commands),
        while the connector and the bootstrap relay reconnect on their own. Otherwise the
        running broker gets them in batched commands. A change made meanwhile from another
        thread (a bootstrap, a REST call) waits for the broker.
        """
        pairs = list(devices)
        api = self._need_api()
        broker, front = self.broker, self.front
        quiet = (broker is not None and front is not None and len(pairs) >= QUIET_RESTART_AT
                 and broker.running and front.connections == 0
                 and broker.owner is threading.current_thread())
        if not quiet or broker is None:
            api.issue_credentials_many(pairs, source="emulator")
            return
        log.info("adding %d devices: Mosquitto restarts with them in its file", len(pairs))
        sink = api.credentials
        if isinstance(sink, SubscribingSink):  # workers subscribe while the broker is up
            sink.subscribe([device_id for device_id, _ in pairs])
        with broker.changes:
            broker.stop()
            try:
                api.issue_credentials_many(pairs, source="emulator")
            finally:
                broker.start()


