"""The platform side of seed 002's self-registration (bootstrap), used by the MQTT connector.

The conversation
----------------
1. A device connects as the shared bootstrap user with client id = its ID, subscribes `sr/<ID>`
   and publishes its temporary secret (16 bytes, DESIGN.md: 16 letters A-Z) on `ss/<ID>`.
   The emulator's MQTT front serves that session itself (front_bootstrap.py: a namespace apart
   from the devices' Mosquitto sessions, so it never disturbs a connected device with that ID)
   and relays only `ss/<client id>` to Mosquitto, so the topic names the device; the connector
   takes it from `ss/+`. `on_secret` keeps the secret and calls `Api.bootstrap_request(ID)`: the
   new device request becomes PENDING_ACCEPTANCE.
2. Someone accepts it: REST `PUT /devicecontrol/newDeviceRequests/<ID> {"status": "ACCEPTED"}`,
   `microcot emulator accept ID`, `Emulator.accept(ID)` (all three the same PUT, which fires
   `Api.on_request_accepted`), or at once with `auto_accept`.
3. `issue` draws a fresh password (20 letters and digits from `secrets`), gives it to the device
   through `Api.issue_credentials` (the broker user `<ID>` with its topics; an existing user gets
   the new password and its open connection is closed) and publishes
   `xtea.encrypt_ecb(secret, xtea.pad(password))` on `sr/<ID>`, QoS 1, not retained; the front's
   relay hands it to the bootstrap session `<ID>` alone. Then the secret is forgotten.

Decisions
---------
- A secret that is not exactly 16 bytes is ignored with a warning (no request is created): the
  device cannot decrypt anything with a key XTEA cannot take, so a request would only leave a
  PENDING entry that can never succeed. The secret itself is never logged.
- The secret lives in memory and, encrypted (Fernet, i.e. AES-128-CBC + HMAC, with a key in an
  owner-only file `key_file` next to the database), in the model's settings table under
  `bootstrap.secret.<ID>`: an emulator restarted between the device's publish and the acceptance
  still answers, and a copy of the database alone does not reveal secrets. Without `key_file` the
  key is per process (tests without a data directory).
- Re-bootstrap: a device that has credentials may bootstrap again at any time (seed 002: "Der
  Bootstrapvorgang kann jederzeit wiederholt werden", e.g. after losing its credentials), so the
  front admits the bootstrap user with the ID of a device that has credentials, even while that
  device is connected (its session is another one). Such a device needs a new acceptance
  (its request goes back to PENDING_ACCEPTANCE). Seed 002 wants the old credentials deleted
  before a re-registration; deleting them through REST deletes the ACCEPTED request too (api.py),
  so either way the next bootstrap waits for someone to accept it, and anyone who merely knows
  the shared bootstrap password cannot take over a known device. A device whose request is
  ACCEPTED but which has no credentials (accepted before it sent its secret, or the emulator
  stopped between the acceptance and the answer) gets them at once.
- Accepting a request whose device has sent no secret yet only records the acceptance (logged);
  the credentials follow when the secret arrives.
- `sr/<ID>` is only delivered to a session that is subscribed to it: the device must subscribe
  before it publishes its secret (seed 002's order) and should use clean_session=False, so the
  front keeps the answer while it reconnects (and across restarts). A device that missed the answer bootstraps again
  (and, having credentials now, waits for another acceptance).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import string
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from cryptography.fernet import Fernet, InvalidToken

from microcot import xtea

from ..files import private_dir

log = logging.getLogger(__name__)

SECRET_BYTES = 16
PASSWORD_LENGTH = 20
PASSWORD_ALPHABET = string.ascii_letters + string.digits  # 20 of them: ~119 bits
SECRET_KEY = "bootstrap.secret."

# the broker's rule for a device user name (broker.py): an ID that cannot become a broker user
# is refused at once rather than after someone accepted it
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class Settings(Protocol):
    def get_setting(self, key: str) -> str | None: ...
    def set_setting(self, key: str, value: str) -> None: ...


def new_password() -> str:
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_LENGTH))


def encrypt_password(secret: bytes, password: str) -> bytes:
    """The `sr/<ID>` payload: raw XTEA-ECB ciphertext of the PKCS#7-padded password."""
    return xtea.encrypt_ecb(secret, xtea.pad(password.encode()))


def _load_key(key_file: Path | None) -> bytes:
    if key_file is None:
        return Fernet.generate_key()
    try:
        return key_file.read_bytes().strip()
    except FileNotFoundError:
        pass
    key = Fernet.generate_key()
    private_dir(key_file.parent)
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return key_file.read_bytes().strip()
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    return key


class SecretStore:
    """Bootstrap secrets between `ss/<ID>` and the acceptance (see the module docstring)."""

    def __init__(self, settings: Settings, key_file: Path | None = None) -> None:
        self._settings = settings
        self._fernet = Fernet(_load_key(key_file))
        self._mem: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, device_id: str, secret: bytes) -> None:
        with self._lock:
            self._mem[device_id] = secret
        self._settings.set_setting(SECRET_KEY + device_id,
                                   self._fernet.encrypt(secret).decode("ascii"))

    def get(self, device_id: str) -> bytes | None:
        with self._lock:
            hit = self._mem.get(device_id)
        if hit is not None:
            return hit
        token = self._settings.get_setting(SECRET_KEY + device_id)
        if not token:
            return None
        try:
            secret = self._fernet.decrypt(token.encode("ascii"))
        except (InvalidToken, ValueError):
            log.error("the stored bootstrap secret of %s cannot be decrypted (was the key file "
                      "replaced?); the device must bootstrap again", device_id)
            return None
        with self._lock:
            self._mem[device_id] = secret
        return secret

    def drop(self, device_id: str) -> None:
        with self._lock:
            self._mem.pop(device_id, None)
        if self._settings.get_setting(SECRET_KEY + device_id):
            self._settings.set_setting(SECRET_KEY + device_id, "")


class Bootstrap:
    """Secrets in, encrypted passwords out. `publish(topic, payload)` sends QoS 1, not retained;
    `schedule(device_id, task)` runs a task in that device's order (the connector's lanes), so a
    secret and the acceptance of the same device never race."""

    def __init__(self, api: Any, publish: Callable[[str, bytes], None],
                 schedule: Callable[[str, Callable[[], None]], None],
                 store: SecretStore | None = None, auto_accept: bool = False) -> None:
        self.api = api
        self.publish = publish
        self.schedule = schedule
        self.store = store if store is not None else SecretStore(api.model)
        self.auto_accept = auto_accept
        # called with the device ID after its credentials were issued (the connector re-sends
        # pending operations to a device that bootstrapped again)
        self.on_issued: Callable[[str], None] | None = None
        api.on_request_accepted(self._accepted)

    # -- step 1: the secret ---------------------------------------------------------------------

    def on_secret(self, device_id: str, payload: bytes) -> None:
        """A message on ss/<device_id> (run in the device's order)."""
        if len(payload) != SECRET_BYTES:
            log.warning("ss/%s: a bootstrap secret must be %d bytes (the XTEA key), got %d: "
                        "ignored, no request created", device_id, SECRET_BYTES, len(payload))
            return
        if not _DEVICE_ID.fullmatch(device_id):
            log.warning("ss/%s: %r cannot be a device user (letters, digits, '.', '_', ':', '-'; "
                        "at most 128): ignored", device_id[:60], device_id[:60])
            return
        self.store.put(device_id, bytes(payload))
        request = self.api.bootstrap_request(device_id)
        status = request.get("status")
        if status == "ACCEPTED" and self.api.model.has_credentials(device_id):
            # a known device bootstraps again: that needs a new acceptance
            request = self.api.model.set_device_request_status(device_id, "PENDING_ACCEPTANCE",
                                                               True)
            status = request["status"]
            log.info("device %s bootstraps again while it has credentials: its request is "
                     "PENDING_ACCEPTANCE again", device_id)
        if status == "ACCEPTED":
            log.info("device %s sent its secret; its request was accepted already", device_id)
            self.issue(device_id)
        elif self.auto_accept:
            self.accept(device_id)
        else:
            log.info("device %s asks for credentials: its request is PENDING_ACCEPTANCE "
                     "(accept it with `microcot emulator accept %s`)", device_id, device_id)

    def accept(self, device_id: str) -> Any:
        """Accept the request through the REST API (so the accept hook fires as for a PUT)."""
        return self.api.handle("PUT", "/devicecontrol/newDeviceRequests/"
                               + quote(device_id, safe=""), {"status": "ACCEPTED"})

    # -- step 2 and 3: acceptance, credentials ----------------------------------------------------

    def _accepted(self, request: dict[str, Any]) -> None:
        device_id = str(request.get("id"))
        self.schedule(device_id, lambda: self.issue(device_id))

    def issue(self, device_id: str) -> bool:
        """Issue a new password and publish it on sr/<ID>; False when there is no secret yet."""
        secret = self.store.get(device_id)
        if secret is None:
            log.info("the request of %s is accepted, but the device has sent no secret yet: its "
                     "credentials follow when it does", device_id)
            return False
        password = new_password()
        try:
            self.api.issue_credentials(device_id, password)
        except Exception as e:  # the broker said no: the request stays, nothing is published
            log.error("could not issue credentials to %s: %s", device_id, e)
            return False
        self.publish("sr/" + device_id, encrypt_password(secret, password))
        self.store.drop(device_id)
        log.info("device %s: credentials issued, password sent encrypted on sr/%s", device_id,
                 device_id)
        if self.on_issued is not None:
            self.on_issued(device_id)
        return True
