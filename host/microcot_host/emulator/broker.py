"""The emulator's MQTT broker: a real Mosquitto (2.0+) with the access control of seed 002.

Topics (seed 002, "MQTT Topics" and "Grundlegende MQTT Sicherheitseinstellungen"):

| user                 | may publish                  | may subscribe (and receive)   |
| -------------------- | ---------------------------- | ----------------------------- |
| a device `<ID>`      | `ms/<ID>`, `bs/<ID>`         | `mr/<ID>`, `br/<ID>`          |
| the connector        | `mr/+`, `br/+`, `sr/+`       | `ms/+`, `bs/+`, `ss/+`        |
| the bootstrap relay  | `ss/+`                       | `sr/+`                        |

Everything else is refused: a refused SUBSCRIBE is answered with SUBACK 0x80, a refused PUBLISH
is acknowledged and dropped (MQTT 3.1.1 has no way to say no). Retained messages are not available
(`retain_available false`: Mosquitto closes the connection of a client that publishes with the
retain flag, and stores nothing).

Sessions are bound to identities: a device user may connect only with its own ID as client id
(the plugin's per-client `clientid`; any other client id is CONNACK 5), so no device can take over
another device's session (Mosquitto itself lets a new connection take over a session across user
names: eclipse-mosquitto/mosquitto issue 3553).

The shared bootstrap user is not a Mosquitto user at all. Its rights depend on the client id
(`ss/<client id>`, `sr/<client id>`), which the plugin of Mosquitto 2.0 cannot express (it does
not substitute `%c`/`%u`; verified with 2.0.11), and the `acl_file` fallback that can checks only
delivery, not SUBSCRIBE, and shares the devices' session namespace, so a bootstrap login with a
device's ID as client id would kick that device off. The emulator's MQTT front (front.py) serves
the bootstrap sessions itself and relays `ss/<ID>` and `sr/<ID>` through one client of its own,
the bootstrap relay, whose rights are the table's last row.

Why the dynamic-security plugin
-------------------------------
Credentials change while the broker runs (bootstrap, deletion, mass registration). The plugin takes
`createClient`/`deleteClient` over MQTT (`$CONTROL/dynamic-security/v1`), applies them at once,
saves them itself, and kicks the live connection of a deleted client, which is what a deleted device
must experience; a password file needs a SIGHUP per change and a rewrite of the whole file. It is
also the only built-in mechanism of Mosquitto 2.0 that checks SUBSCRIBE packets. Devices get one
literal role each (`device:<ID>`), created and deleted with them; the default access is "deny".

Adding many devices
-------------------
Mosquitto 2.0's plugin writes its whole file (every user and role) after each command, also
after each of several commands in one message (verified with 2.0.11: 200 commands in one message
made 200 writes of the file; a profile of Mosquitto then shows cJSON building and printing it), so
a command costs the broker time in proportion to the users it has: about 10 us per user and
command here, two commands (role, user) per device, i.e. ~20 ms per new device at 1,000 devices
and ~100 ms at 5,000; setting up N devices one by one costs ~10 us x N^2 of Mosquitto's CPU
(40 s for 2,000 devices, 4 minutes for 5,000). `add_devices` sends the commands of DEVICE_BATCH
devices in one message (one round trip instead of one per command, but the same work for the
plugin) while Mosquitto runs; while it is stopped it writes the users straight into the plugin's
file in the plugin's own format, read at the next start, which costs nothing per existing user.
`Emulator.add_devices` uses the latter for a batch when no device is connected (service.py).

Authentication failures are answered by Mosquitto 2.0 with CONNACK 5 ("not authorized") for an
unknown user, a wrong password and a foreign client id alike; seed 002 names 4 and 5 for a deleted
device.

Listener: `Broker(tls=True)` (the default) serves MQTT over TLS 1.2+ with the certificate of
certs.py. The emulator runs it with `tls=False` on 127.0.0.1 only, behind its front, which
terminates the devices' TLS: one TLS session per device instead of two, and the loopback listener
is what the connector, the relay and the admin client use directly.

State under `data_dir`: `tls/` (see certs.py), `dynamic-security.json` (users, written by the
plugin), `mosquitto.conf` (regenerated on every start), `mosquitto.db` (sessions and queued QoS 1
messages of persistent sessions, saved every few seconds and on stop), `mosquitto.log`, and
`broker-secrets.json` (mode 0600: the admin's, connector's and relay's passwords). The log never
holds a password: the plugin logs each command with the password masked as `*****` (checked by the
tests). A data directory made by an earlier version is brought up to date at start: its bootstrap
user, its `acl_file` role and its catch-all deny role are removed, and every device is bound to its
client id.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import glob
import hashlib
import itertools
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..childproc import die_with_parent, free_port, log_since, stop
from ..files import private_dir, secrets_file, write_private
from .certs import DEFAULT_IPS, TlsFiles, client_ssl_context, ensure_ca_and_server

ADMIN_USER = "microcot-admin"
CONNECTOR_USER = "microcot-connector"
RELAY_USER = "microcot-bootstrap-relay"
RESERVED_USERS = (ADMIN_USER, CONNECTOR_USER, RELAY_USER)
DEFAULT_MAX_PACKET = 256 * 1024
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
DRAIN_TOPICS = "microcot/drain/+"
DEVICE_BATCH = 50          # devices per dynamic-security message of add_devices (2 commands each)
COMMAND_ALLOWANCE = 0.25   # seconds of waiting per further command of one message
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"

_ROLE_ADMIN = "microcot-admin"
_ROLE_CONNECTOR = "microcot-connector"
_ROLE_RELAY = "microcot-bootstrap-relay"
# roles of earlier versions, removed from a data directory at start
_OLD_ROLE_BOOTSTRAP = "microcot-bootstrap"
_OLD_ROLE_DENY = "microcot-deny-rest"
_DEVICE_ROLE_PREFIX = "device:"

# a device ID is an ICCID (digits) or a MAC (hex, maybe with separators): nothing that could be an
# MQTT wildcard, a level separator or an ACL pattern, and not too long for a topic on a small device
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

_PLUGIN_GLOBS = (
    "/usr/lib/*/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/lib64/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/*/mosquitto_dynamic_security.so",
    "/opt/homebrew/lib/mosquitto_dynamic_security.so",
)
_INSTALL_HINT = "run `make setup`, or `apt-get install mosquitto` (Debian/Ubuntu)"


class BrokerError(RuntimeError):
    """The broker could not be started, reached or configured."""


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)


def find_mosquitto() -> str:
    """Path of the mosquitto binary (MICROCOT_MOSQUITTO overrides), or a BrokerError saying so."""
    env = os.environ.get("MICROCOT_MOSQUITTO")
    candidates = [env] if env else [shutil.which("mosquitto"), "/usr/sbin/mosquitto",
                                    "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    where = env if env else "PATH or /usr/sbin"
    raise BrokerError(f"the `mosquitto` binary was not found in {where}: {_INSTALL_HINT}")


def find_dynsec_plugin() -> str:
    """Path of mosquitto_dynamic_security.so (MICROCOT_DYNSEC_PLUGIN overrides)."""
    env = os.environ.get("MICROCOT_DYNSEC_PLUGIN")
    if env:
        if os.path.isfile(env):
            return env
        raise BrokerError(f"MICROCOT_DYNSEC_PLUGIN={env}: no such file")
    for pattern in _PLUGIN_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    raise BrokerError("Mosquitto's dynamic security plugin (mosquitto_dynamic_security.so, "
                      f"Mosquitto 2.0+) was not found: {_INSTALL_HINT}")


class Broker:
    """A Mosquitto process with a generated configuration, owned by this object.

    `port=0` picks a free port on the first start; restart() keeps it. Use as a context manager.
    """

    def __init__(self, data_dir: Path | str, port: int = 0, tls: bool = True,
                 host: str = "127.0.0.1", hostnames: tuple[str, ...] = ("localhost",),
                 max_packet_size: int = DEFAULT_MAX_PACKET, start_timeout: float = 10.0,
                 command_timeout: float = 5.0, ips: tuple[str, ...] = DEFAULT_IPS,
                 reserved: tuple[str, ...] = ()) -> None:
        """reserved: user names no device may get besides the emulator's own (the bootstrap
        user's, which the front owns)."""
        self.data_dir = Path(data_dir).resolve()
        if re.search(r"\s", str(self.data_dir)):
            # mosquitto.conf has no quoting: a path with a blank would be cut at the blank
            raise BrokerError(f"{self.data_dir}: the broker's data directory must not contain "
                              "white space")
        self.host = host
        self.tls = tls
        self.hostnames = tuple(hostnames)
        self.ips = tuple(ips)
        self.max_packet_size = max_packet_size
        self.start_timeout = start_timeout
        self.command_timeout = command_timeout
        self.reserved = frozenset(RESERVED_USERS) | frozenset(reserved)
        self._requested_port = port
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._tls_files: TlsFiles | None = None
        self._secrets: dict[str, Any] = {}
        self._lock_fd: int | None = None
        self._admin: Any = None  # paho client, imported lazily: only the emulator needs it
        self._pending: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._corr = itertools.count(1)
        # dynamic-security changes, one at a time: Emulator.add_devices holds it across a
        # stop/merge/start so that a change from elsewhere waits instead of failing
        self.changes = threading.RLock()
        self.start_seconds: float | None = None
        self.owner: threading.Thread | None = None  # the thread whose end stops Mosquitto

    # -- properties ---------------------------------------------------------------------------

    @property
    def local_host(self) -> str:
        """Where this machine's own clients (the connector, the checks) reach the broker: the
        listener's address, or loopback when it listens on every address."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    @property
    def port(self) -> int:
        if not self._port:
            raise BrokerError("the broker has no port yet: start() it first")
        return self._port

    @property
    def ca_cert(self) -> Path | None:
        """PEM file of the CA that devices must trust (None without TLS)."""
        if not self.tls:
            return None
        return self._tls().ca_cert

    @property
    def log_file(self) -> Path:
        return self.data_dir / "mosquitto.log"

    @property
    def conf_file(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """A client context trusting this broker's CA (None without TLS)."""
        return client_ssl_context(self._tls().ca_cert) if self.tls else None

    def connector_credentials(self) -> Credentials:
        self._load_secrets()
        return Credentials(CONNECTOR_USER, self._secrets["connector_password"])

    def relay_credentials(self) -> Credentials:
        """The bootstrap relay's login (front.py): publish `ss/+`, receive `sr/+`."""
        self._load_secrets()
        return Credentials(RELAY_USER, self._secrets["relay_password"])

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start Mosquitto and return once it accepts TLS connections and takes admin commands.

        Mosquitto gets SIGTERM when the thread that called start() ends (Linux PR_SET_PDEATHSIG),
        so no broker outlives a killed test run; call it from a thread that lives as long as the
        broker should, normally the main thread.

        A port chosen free on the first start is tried first on every later start, so clients
        that reconnect on their own (the connector, the relay) find the broker again after a
        stop() and start(); only when it is taken by then is another one chosen.
        """
        if self.running:
            return
        t0 = time.monotonic()
        binary = find_mosquitto()
        plugin = find_dynsec_plugin()
        private_dir(self.data_dir)
        self._take_lock()
        try:
            if self.tls:
                self._tls_files = ensure_ca_and_server(self.data_dir, self.hostnames, self.ips)
            self._load_secrets()
            self._prepare_dynsec()
            with contextlib.suppress(FileNotFoundError):  # an earlier version's bootstrap rights
                (self.data_dir / "bootstrap.acl").unlink()
            attempts = 5 if not self._requested_port else 1
            for attempt in range(attempts):
                if not self._requested_port and not (attempt == 0 and self._port):
                    self._port = free_port(self.host)
                self._write_conf(plugin)
                try:
                    self._spawn(binary)
                    break
                except _PortTaken:
                    if attempt == attempts - 1:
                        raise BrokerError(f"port {self._port} on {self.host} is already in use; "
                                          f"see {self.log_file}") from None
            self._connect_admin()
            self.owner = threading.current_thread()
        except BaseException:
            self._kill()
            self._release_lock()
            raise
        self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Stop Mosquitto (it saves its sessions on the way out) and wait for it to end."""
        self._disconnect_admin()
        self._kill()
        self._release_lock()

    def restart(self) -> None:
        """Stop and start again on the same port with the same data (for durability tests)."""
        port = self._port
        self.stop()
        saved = self._requested_port
        self._requested_port = port or saved
        try:
            self.start()
        finally:
            self._requested_port = saved

    # -- credentials --------------------------------------------------------------------------

    def add_device(self, device_id: str, password: str) -> None:
        """Create the device's user with its topics, or give an existing one this password.

        A new password closes the device's open connection (the plugin kicks the user), as a
        re-bootstrap should.
        """
        self._check_new_device(device_id)
        _check_password(password)
        role = _DEVICE_ROLE_PREFIX + device_id
        created = self._command({"command": "createRole", "rolename": role,
                                 "acls": _device_acls(device_id)})
        _ok(created, "Role already exists")
        # `clientid`: the user may connect with its own ID only, so it can never take over
        # another device's session (Mosquitto allows takeovers across user names)
        resp = self._command({"command": "createClient", "username": device_id,
                              "password": password, "clientid": device_id,
                              "roles": _client_roles(role)})
        if resp.get("error") == "Client already exists":
            _ok(self._command({"command": "setClientPassword", "username": device_id,
                               "password": password}))
            _ok(self._command({"command": "setClientId", "username": device_id,
                               "clientid": device_id}))
            self._ensure_roles(device_id, _client_roles(role))
        else:
            _ok(resp)

    def check_new_device(self, device_id: str) -> None:
        """BrokerError if `device_id` cannot become a device user (add_device's check)."""
        self._check_new_device(device_id)

    def add_devices(self, devices: Iterable[tuple[str, str]]) -> None:
        """add_device for many (ID, password) pairs at once; see "Adding many devices".

        Running: the commands of DEVICE_BATCH devices go in one message (an existing user takes
        add_device's way). Stopped: the users are written into the plugin's file, which Mosquitto
        reads at its next start; no command at all.
        """
        pairs = list(devices)
        for device_id, password in pairs:
            self._check_new_device(device_id)
            _check_password(password)
        if not self.running:
            self._merge_devices(pairs)
            return
        for k in range(0, len(pairs), DEVICE_BATCH):
            chunk = pairs[k:k + DEVICE_BATCH]
            commands: list[dict[str, Any]] = []
            for device_id, password in chunk:
                role = _DEVICE_ROLE_PREFIX + device_id
                commands += [{"command": "createRole", "rolename": role,
                              "acls": _device_acls(device_id)},
                             {"command": "createClient", "username": device_id,
                              "password": password, "clientid": device_id,
                              "roles": _client_roles(role)}]
            answers = self._commands(commands)
            made = zip(chunk, answers[0::2], answers[1::2], strict=True)
            for (device_id, password), role_made, client_made in made:
                _ok(role_made, "Role already exists")
                if client_made.get("error") == "Client already exists":
                    self.add_device(device_id, password)  # a new password: add_device's way
                else:
                    _ok(client_made)

    def _merge_devices(self, pairs: list[tuple[str, str]]) -> None:
        """Write device users into the plugin's file while Mosquitto is stopped, in the form the
        plugin itself stores (`_dynsec_client`); start() adds the fixed users as always."""
        private_dir(self.data_dir)
        self._take_lock()
        try:
            path = self.data_dir / "dynamic-security.json"
            cfg = self._read_dynsec(path)
            clients = {c.get("username"): c for c in cfg.get("clients", [])}
            roles = {r.get("rolename"): r for r in cfg.get("roles", [])}
            for device_id, password in pairs:
                role = _DEVICE_ROLE_PREFIX + device_id
                roles[role] = {"rolename": role, "acls": _device_acls(device_id)}
                client = _dynsec_client(device_id, password, role)
                client["clientid"] = device_id
                old = clients.get(device_id)
                if old is not None:  # a known user keeps any other role it was given
                    client["roles"] += [r for r in old.get("roles", [])
                                        if r.get("rolename") != role]
                clients[device_id] = client
            cfg["clients"] = list(clients.values())
            cfg["roles"] = list(roles.values())
            self._write_file(path, json.dumps(cfg, indent=1) + "\n", 0o600)
        finally:
            self._release_lock()

    def _check_new_device(self, device_id: str) -> None:
        _check_device_id(device_id)
        if device_id in self.reserved:
            raise BrokerError(f"{device_id!r} is reserved for the emulator (the bootstrap user "
                              "or one of its own users); it cannot be a device")

    def remove_device(self, device_id: str) -> bool:
        """Delete the device's user; its live connection is closed. False if it did not exist."""
        _check_device_id(device_id)
        resp = self._command({"command": "deleteClient", "username": device_id})
        existed = resp.get("error") != "Client not found"
        if existed:
            _ok(resp)
        _ok(self._command({"command": "deleteRole", "rolename": _DEVICE_ROLE_PREFIX + device_id}),
            "Role not found")
        return existed

    def has_device(self, device_id: str) -> bool:
        _check_device_id(device_id)
        resp = self._command({"command": "getClient", "username": device_id})
        if resp.get("error") == "Client not found":
            return False
        _ok(resp)
        roles = {r.get("rolename") for r in resp.get("data", {}).get("client", {}).get("roles", [])}
        return _DEVICE_ROLE_PREFIX + device_id in roles

    def device_ids(self) -> list[str]:
        """Every device user (a client with its own `device:<ID>` role)."""
        resp = self._command({"command": "listClients", "verbose": True, "count": -1,
                              "offset": 0})
        _ok(resp)
        out = []
        for c in resp.get("data", {}).get("clients", []):
            user = c.get("username") if isinstance(c, dict) else None
            roles = {r.get("rolename") for r in c.get("roles", [])} if user else set()
            if user and _DEVICE_ROLE_PREFIX + user in roles:
                out.append(str(user))
        return out

    # -- internals: files ---------------------------------------------------------------------

    def _tls(self) -> TlsFiles:
        if self._tls_files is None:
            private_dir(self.data_dir)
            self._tls_files = ensure_ca_and_server(self.data_dir, self.hostnames, self.ips)
        return self._tls_files

    def _take_lock(self) -> None:
        # two brokers on one data directory would overwrite each other's users and sessions
        fd = os.open(self.data_dir / "broker.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BrokerError(f"{self.data_dir} is in use by another broker") from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _load_secrets(self) -> None:
        if not self._secrets:
            self._secrets = secrets_file(self.data_dir / "broker-secrets.json",
                                         ("admin_password", "connector_password",
                                          "relay_password"))

    def _save_secrets(self) -> None:
        self._write_file(self.data_dir / "broker-secrets.json",
                         json.dumps(self._secrets, indent=1) + "\n", 0o600)

    def _prepare_dynsec(self) -> None:
        """Merge our fixed users and roles into the plugin's file while Mosquitto is stopped.

        Devices are kept (and bound to their client id); the admin, the connector, the relay and
        the fixed roles are rewritten from code, so a data directory made by an older version
        gets today's ACLs; what earlier versions had for the bootstrap user goes.
        """
        path = self.data_dir / "dynamic-security.json"
        cfg = self._read_dynsec(path)
        fixed_roles = {_ROLE_ADMIN, _ROLE_CONNECTOR, _ROLE_RELAY, _OLD_ROLE_BOOTSTRAP,
                       _OLD_ROLE_DENY}
        clients = [_upgraded_client(c) for c in cfg.get("clients", [])
                   if c.get("username") not in RESERVED_USERS and not _was_bootstrap_user(c)]
        clients += [
            _dynsec_client(ADMIN_USER, self._secrets["admin_password"], _ROLE_ADMIN),
            _dynsec_client(CONNECTOR_USER, self._secrets["connector_password"], _ROLE_CONNECTOR),
            _dynsec_client(RELAY_USER, self._secrets["relay_password"], _ROLE_RELAY),
        ]
        roles = [r for r in cfg.get("roles", []) if r.get("rolename") not in fixed_roles]
        roles += [
            {"rolename": _ROLE_ADMIN, "acls": _admin_acls()},
            {"rolename": _ROLE_CONNECTOR, "acls": _connector_acls()},
            {"rolename": _ROLE_RELAY, "acls": _relay_acls()},
        ]
        cfg.update({
            "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                                 "subscribe": False, "unsubscribe": True},
            "clients": clients,
            "groups": cfg.get("groups", []),
            "roles": roles,
        })
        self._write_file(path, json.dumps(cfg, indent=1) + "\n", 0o600)
        if self._secrets.pop("bootstrap_user", None) is not None:
            self._save_secrets()

    @staticmethod
    def _read_dynsec(path: Path) -> dict[str, Any]:
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise BrokerError(f"{path}: not valid JSON ({exc}); it holds the broker's users, "
                              "repair or delete it") from None
        if not isinstance(cfg, dict):
            raise BrokerError(f"{path}: not a JSON object; it holds the broker's users, repair "
                              "or delete it")
        return cfg

    def _write_conf(self, plugin: str) -> None:
        d = self.data_dir
        lines = [
            "# generated by microcot_host.emulator.broker on every start: edits are lost",
            "per_listener_settings false",
            "allow_anonymous false",
            # only used when started as root: keep running as root, or the files below (0600,
            # owned by root) become unreadable after Mosquitto drops to the `mosquitto` user
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "persistence true",
            f"persistence_location {d}/",
            "persistence_file mosquitto.db",
            "autosave_interval 5",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "retain_available false",
            f"max_packet_size {self.max_packet_size}",
            # the one connector drains every device: a burst from many devices must queue for it,
            # not be dropped (1000, Mosquitto's default, lost rows at 20 devices x 100 rows)
            "max_queued_messages 200000",
            "max_inflight_messages 100",
            "set_tcp_nodelay true",
            f"plugin {plugin}",
            f"plugin_opt_config_file {d / 'dynamic-security.json'}",
            f"listener {self._port} {self.host}",
            "protocol mqtt",
        ]
        if self.tls:
            files = self._tls()
            lines += [
                f"cafile {files.ca_cert}",
                f"certfile {files.server_cert}",
                f"keyfile {files.server_key}",
                "tls_version tlsv1.2",
                "require_certificate false",
            ]
        self._write_file(self.conf_file, "\n".join(lines) + "\n", 0o600)

    @staticmethod
    def _write_file(path: Path, text: str, mode: int) -> None:
        write_private(path, text, mode)

    # -- internals: process -------------------------------------------------------------------

    def _spawn(self, binary: str) -> None:
        log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        # created 0600 like everything else here; the child appends its start-up errors to it
        out = os.fdopen(os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
        try:
            self._proc = subprocess.Popen(
                [binary, "-c", str(self.conf_file)], stdin=subprocess.DEVNULL, stdout=out,
                stderr=out, start_new_session=True, preexec_fn=_child_setup(os.getpid()))
        except OSError as exc:
            raise BrokerError(f"could not run {binary}: {exc}; {_INSTALL_HINT}") from None
        finally:
            out.close()
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                tail = self._log_since(log_offset)
                self._proc = None
                if "Address already in use" in tail:
                    raise _PortTaken()
                raise BrokerError(f"mosquitto exited at start: {tail.strip()[-800:] or 'no log'}"
                                  f" (log: {self.log_file})")
            if self._accepts():
                return
            if time.monotonic() > deadline:
                self._kill()
                raise BrokerError(f"mosquitto did not accept connections on {self.host}:"
                                  f"{self._port} within {self.start_timeout:.0f} s "
                                  f"(log: {self.log_file})")
            time.sleep(0.02)

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.local_host, self._port), timeout=1.0) as sock:
                if self.tls:
                    ctx = client_ssl_context(self._tls().ca_cert)
                    with ctx.wrap_socket(sock, server_hostname=self.local_host):
                        pass
            return True
        except (OSError, ssl.SSLError):
            return False

    def _log_since(self, offset: int) -> str:
        return log_since(self.log_file, offset)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop(proc, signal.SIGTERM, 10)  # SIGTERM: Mosquitto writes mosquitto.db before it exits

    # -- internals: admin client --------------------------------------------------------------

    def _connect_admin(self) -> None:
        import paho.mqtt.client as mqtt

        ready = threading.Event()
        result: list[Any] = []

        def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
            result.append(rc)
            if rc.is_failure:
                ready.set()
            else:
                client.subscribe(RESPONSE_TOPIC, qos=1)

        def on_subscribe(client: Any, userdata: Any, mid: Any, rcs: Any, props: Any = None) -> None:
            result.append(rcs[0])
            ready.set()

        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                             client_id=f"microcot-admin-{os.getpid()}-{secrets.token_hex(3)}",
                             protocol=mqtt.MQTTv311)
        client.username_pw_set(ADMIN_USER, self._secrets["admin_password"])
        if self.tls:
            client.tls_set_context(client_ssl_context(self._tls().ca_cert))
        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = self._on_admin_message
        try:
            client.connect(self.local_host, self._port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(f"the admin client could not connect: {exc}") from None
        client.loop_start()
        # answers come only on the response topic: commands wait until the SUBACK says it is ours
        if not ready.wait(self.command_timeout) or any(rc.is_failure for rc in result):
            client.loop_stop()
            with contextlib.suppress(Exception):
                client.disconnect()
            reason = ", ".join(str(rc) for rc in result) or "no answer"
            raise BrokerError(f"the broker refused its own admin client ({reason}); "
                              f"see {self.log_file}")
        self._admin = client

    def _disconnect_admin(self) -> None:
        client, self._admin = self._admin, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.disconnect()
            client.loop_stop()

    def _on_admin_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            responses = json.loads(msg.payload).get("responses", [])
        except ValueError:
            return
        for resp in responses:
            waiter = self._pending.get(str(resp.get("correlationData")))
            if waiter:
                waiter[1].append(resp)
                waiter[0].set()

    def _command(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send one dynamic-security command and return its response ({"error": ...} on failure)."""
        return self._commands([command])[0]

    def _commands(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send dynamic-security commands in one message; their responses, in the same order."""
        with self.changes:
            if self._admin is None or not self.running:
                raise BrokerError("the broker is not running: start() it first")
            corrs = [f"c{next(self._corr)}" for _ in commands]
            waiters: list[tuple[threading.Event, list[dict[str, Any]]]] = [
                (threading.Event(), []) for _ in commands]
            self._pending.update(zip(corrs, waiters, strict=True))
            try:
                tagged = [dict(cmd, correlationData=corr)
                          for cmd, corr in zip(commands, corrs, strict=True)]
                payload = json.dumps({"commands": tagged})
                self._admin.publish(CONTROL_TOPIC, payload, qos=1)  # paho's publish is thread-safe
                # the plugin answers a message's commands together after the last one, and each
                # takes it longer the more users it has ("Adding many devices"): an allowance each
                deadline = (time.monotonic() + self.command_timeout
                            + COMMAND_ALLOWANCE * (len(commands) - 1))
                for (event, _), cmd in zip(waiters, commands, strict=True):
                    if not event.wait(max(0.0, deadline - time.monotonic())):
                        raise BrokerError(f"no answer from the broker to {cmd['command']} within "
                                          f"{self.command_timeout:.0f} s (log: {self.log_file})")
                return [box[0] for _, box in waiters]
            finally:
                for corr in corrs:
                    self._pending.pop(corr, None)

    def _ensure_roles(self, user: str, roles: list[dict[str, Any]]) -> None:
        # 2.0.11 answers "Internal error" to addClientRole for a role the client already has
        resp = self._command({"command": "getClient", "username": user})
        _ok(resp)
        have = {r.get("rolename") for r in resp.get("data", {}).get("client", {}).get("roles", [])}
        for r in roles:
            if r["rolename"] not in have:
                _ok(self._command({"command": "addClientRole", "username": user, **r}))


class _PortTaken(Exception):
    pass


# -- ACLs -------------------------------------------------------------------------------------

def _acl(kind: str, topic: str, allow: bool = True, priority: int = 0) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "allow": allow, "priority": priority}


def _device_acls(device_id: str) -> list[dict[str, Any]]:
    acls = [_acl("publishClientSend", f"{p}/{device_id}") for p in ("ms", "bs")]
    for p in ("mr", "br"):
        acls += [_acl("subscribeLiteral", f"{p}/{device_id}"),
                 _acl("publishClientReceive", f"{p}/{device_id}")]
    return acls


def _connector_acls() -> list[dict[str, Any]]:
    acls = [_acl("publishClientSend", f"{p}/+") for p in ("mr", "br", "sr")]
    for p in ("ms", "bs", "ss"):
        # a pattern ACL with `+` also admits the literal subscriptions `ms/<ID>`
        acls += [_acl("subscribePattern", f"{p}/+"), _acl("publishClientReceive", f"{p}/+")]
    # the marker that ends a session's queue when it is drained (connector.py, workers.py)
    acls += [_acl(kind, DRAIN_TOPICS) for kind in ("publishClientSend", "subscribePattern",
                                                   "publishClientReceive")]
    return acls


def _admin_acls() -> list[dict[str, Any]]:
    return [_acl("publishClientSend", CONTROL_TOPIC), _acl("subscribeLiteral", RESPONSE_TOPIC),
            _acl("publishClientReceive", RESPONSE_TOPIC)]


def _relay_acls() -> list[dict[str, Any]]:
    # the front decides which device a bootstrap message belongs to; the relay only carries it
    return [_acl("publishClientSend", "ss/+"), _acl("subscribePattern", "sr/+"),
            _acl("publishClientReceive", "sr/+")]


def _client_roles(role: str) -> list[dict[str, Any]]:
    return [{"rolename": role, "priority": 10}]


def _was_bootstrap_user(client: dict[str, Any]) -> bool:
    return any(r.get("rolename") == _OLD_ROLE_BOOTSTRAP for r in client.get("roles", []))


def _upgraded_client(client: dict[str, Any]) -> dict[str, Any]:
    """A stored client as this version wants it: no catch-all deny role (it existed for the
    `acl_file` fallback), and a device bound to its own ID as client id."""
    out = dict(client)
    out["roles"] = [r for r in client.get("roles", []) if r.get("rolename") != _OLD_ROLE_DENY]
    user = client.get("username")
    if any(r.get("rolename") == _DEVICE_ROLE_PREFIX + str(user) for r in out["roles"]):
        out["clientid"] = user
    return out


def _dynsec_client(user: str, password: str, role: str) -> dict[str, Any]:
    # the plugin's own format: PBKDF2-HMAC-SHA512, 12-byte salt, base64; 101 iterations is the
    # plugin's default for the clients it creates itself
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    return {"username": user, "textName": "microcot", "password": base64.b64encode(digest).decode(),
            "salt": base64.b64encode(salt).decode(), "iterations": 101,
            "roles": _client_roles(role)}


def _ok(resp: dict[str, Any], *accepted: str) -> None:
    err = resp.get("error")
    if err and err not in accepted:
        raise BrokerError(f"broker refused {resp.get('command')}: {err}")


def _check_device_id(device_id: str) -> None:
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise BrokerError(f"bad device ID {device_id!r}: expected letters, digits, '.', '_', "
                          "':' or '-' (an ICCID or a MAC address)")
    if device_id in RESERVED_USERS:
        raise BrokerError(f"{device_id!r} is reserved for the emulator")


def valid_device_id(device_id: str) -> bool:
    """True for a name that can be a device user (and so a device's client id)."""
    return bool(_DEVICE_ID.fullmatch(device_id)) and device_id not in RESERVED_USERS


def _check_password(password: str) -> None:
    if not isinstance(password, str) or not password or len(password.encode()) > 65535:
        raise BrokerError("a password must be a non-empty string of at most 65535 bytes")


# -- process helpers --------------------------------------------------------------------------

def _child_setup(parent_pid: int):  # type: ignore[no-untyped-def]
    """Runs in the child before exec: private files, and die with the parent process."""
    def setup() -> None:
        os.umask(0o077)
        # SIGTERM, not SIGKILL: Mosquitto still saves its sessions when orphaned
        die_with_parent(parent_pid, signal.SIGTERM)
    return setup
