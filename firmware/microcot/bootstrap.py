# Seed 002's self-registration (bootstrap), as DESIGN.md "Bootstrap (decisions)" fixes it.
#
#   1. The secret: 16 characters A-Z from os.urandom (hal.random_bytes), each letter equally
#      likely (bytes >= 234 = 9 * 26 are drawn again). Its 16 ASCII bytes are the XTEA key.
#   2. The agent waits a random delay_ms(lo, hi) (0-60 s by default) before it connects.
#   3. Connect to the broker as the bootstrap user with client id = the device ID and
#      clean_session=False, subscribe sr/<ID> with QoS 1.
#   4. Store {"state": "ONGOING", "id": ID, "secret": ...} (document "boot", store.py) BEFORE
#      publishing the secret on ss/<ID> with QoS 1. A reboot, or a lost connection, finds the
#      ONGOING state and resumes: it subscribes again and waits, with the same secret (the answer
#      may wait in the persistent session). Only when nothing came for `repeat_ms` is the SAME
#      secret published again, so a secret lost before it reached the platform does not leave the
#      device waiting forever.
#   5. The answer on sr/<ID> is raw XTEA-ECB ciphertext of the PKCS#7-padded password: decrypt,
#      unpad; a bad padding or length raises BootstrapError (the state stays ONGOING: the agent
#      retries after its back-off).
#   6. The password is stored atomically (document "cred": {"id", "password", "source":
#      "bootstrap", "ok": false}); with the first CONNACK that accepts it "ok" turns true and the
#      "boot" document is deleted. From then on the device connects with user = its ID.
#
# step(s, ms) drives it for the agent (agent.py) with its State `s`: `s.boot` 1 = needed, 2 = the
# delay is running or over; `s.bobj` the Bootstrap under way. With the credentials stored, the
# agent restarts the board (its session starts in a heap without this code).
#
# Neither the secret nor the password is ever printed or put into an exception message.
from . import hal

DOC = "boot"
CRED = "cred"
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SECRET_LEN = 16
_LIMIT = 234  # the largest multiple of 26 that fits a byte: 9 * 26


class BootstrapError(Exception):
    pass


def new_secret(rand=None):
    """16 random letters A-Z, unbiased (rejection sampling over os.urandom bytes)."""
    rand = rand or hal.random_bytes
    out = []
    while len(out) < SECRET_LEN:
        for b in rand(SECRET_LEN + 4):
            if b < _LIMIT:
                out.append(ALPHABET[b % 26])
                if len(out) == SECRET_LEN:
                    break
    return "".join(out)


def valid_secret(s):
    if not isinstance(s, str) or len(s) != SECRET_LEN:
        return False
    return all("A" <= c <= "Z" for c in s)


def delay_ms(lo_s, hi_s):
    """A random delay in milliseconds, uniform in [lo_s, hi_s] seconds (os.urandom)."""
    from .outq import uniform

    lo = int(lo_s * 1000)
    hi = int(hi_s * 1000)
    if hi < lo:
        raise ValueError("bootstrap delay: %r > %r" % (lo_s, hi_s))
    return lo + uniform(hi - lo + 1)


def password(secret, cipher):
    """The password from the bootstrap answer: XTEA-ECB decrypt with the secret, unpad."""
    from . import xtea

    cipher = bytes(cipher)
    if not cipher or len(cipher) % 8:
        raise BootstrapError("bootstrap answer of %d bytes is not a whole number of XTEA blocks"
                             % len(cipher))
    try:
        # the pure-Python loop: a password is a few blocks, and the viper one compiles itself
        # from source at first use, which a small heap cannot afford
        plain = xtea.unpad(xtea.decrypt_ecb_py(secret.encode(), cipher))
    except ValueError as e:  # the message names the padding defect, never the data
        raise BootstrapError("bootstrap answer does not decrypt with our secret (%s)" % e)
    try:
        pw = plain.decode()
    except UnicodeError:
        raise BootstrapError("bootstrap answer decrypts to a password that is not UTF-8")
    if not pw or len(pw) > 128:
        raise BootstrapError("bootstrap answer decrypts to a password of %d characters" % len(pw))
    return pw


def pending(dev_id, st):
    """The ONGOING secret of dev_id in the "boot" document `st` (as read), or None."""
    if isinstance(st, dict) and st.get("state") == "ONGOING" and st.get("id") == dev_id \
            and valid_secret(st.get("secret")):
        return st["secret"]
    return None


def step(s, ms):
    """The agent's bootstrap phase, one step at a time (s: the agent's State; store.py only when
    writing: s.db()). Returns once the credentials are stored: then Restart, or in place (cfg
    "restarts" false) the agent connects with them at its next step."""
    cfg = s.cfg
    if s.boot == 1:  # seed 002: a random delay before connecting
        d = delay_ms(*cfg["bootstrap_delay"])
        s.boot = 2
        s.next = hal.ticks_add(hal.ticks_ms(), d)
        s.log("no credentials: bootstrap in %d ms" % d)
        return
    b = s.bobj
    if b is None:
        if not cfg["bootstrap_user"] or not cfg["bootstrap_password"]:
            raise BootstrapError("no credentials and no bootstrap user configured")
        from .session import client

        c = client(s, cfg["bootstrap_user"], cfg["bootstrap_password"], cfg["host"], cfg["port"])
        doc = s.bdoc  # read at start-up (session.identify), else now
        s.bdoc = 0
        b = s.bobj = Bootstrap(s.id, c, int(cfg["bootstrap_repeat"] * 1000), s.log,
                               s.db().load(DOC) if doc == 0 else doc)
        s.state = 1  # bootstrap (state.BOOT)
        s.room()  # for the TLS handshake
        b.connect(s.db())
        return
    pw = b.step(ms)
    if pw is not None:
        s.secret(pw)
        b.finish(s.db(), pw)
        if cfg["restarts"]:
            from .state import Restart

            raise Restart("bootstrap done")
        # in place: connect with the new credentials at the next step, with the room for the
        # template registration that a boot with stored credentials keeps (agent.py)
        b.close()
        s.bobj = None
        s.boot = 0
        s.cred = s.db().load("cred")
        if cfg["reserve"]:
            b = None
            s.keep_room()
        s.state = 0
        s.next = hal.ticks_ms()


class Bootstrap:
    """One bootstrap on its own MQTT client (user/password of the bootstrap user, client id =
    the device ID). connect(db), then step(ms) until it returns the password, then
    finish(db, password); db is store.py. doc: the "boot" document as read (None: none)."""

    def __init__(self, dev_id, client, repeat_ms=300000, log=None, doc=None):
        self.id = dev_id
        self.c = client
        self.repeat = repeat_ms
        self.log = log or (lambda m: None)
        self.secret = pending(dev_id, doc)
        self.resumed = self.secret is not None
        self.published = 0
        self._ans = None
        self._last = 0

    def connect(self, db):
        c = self.c
        c.set_callback(self._cb)
        c.connect(clean_session=False)
        c.subscribe("sr/" + self.id, 1)
        if self.secret is None:
            self.secret = new_secret()
            db.save(DOC, {"state": "ONGOING", "id": self.id, "secret": self.secret})
            self._publish()
        else:
            # resuming: the answer may already wait in the session; publish again only later
            self._last = hal.ticks_ms()
            self.log("bootstrap: resuming with the stored secret, waiting for the answer")

    def _publish(self):
        self.c.publish("ss/" + self.id, self.secret.encode(), qos=1)
        self._last = hal.ticks_ms()
        self.published += 1
        self.log("bootstrap: request sent on ss/%s, waiting for the acceptance" % self.id)

    def _cb(self, topic, msg):
        if topic == b"sr/" + self.id.encode():
            self._ans = msg

    def step(self, ms):
        """Wait up to ms for the answer; the password once it came, else None."""
        self.c.poll(ms)
        cipher = self._ans
        if cipher is not None:
            self._ans = None
            return password(self.secret, cipher)
        if hal.ticks_diff(hal.ticks_ms(), self._last) >= self.repeat:
            self._publish()
        return None

    def finish(self, db, pw):
        """Store the password (atomically: store.py `db`). The secret is deleted with the first
        connect that the broker accepts (session.py): one flash write less in this heap."""
        db.save(CRED, {"id": self.id, "password": pw, "source": "bootstrap", "ok": False})
        self.log("bootstrap: credentials received and stored")

    def close(self):
        try:
            self.c.disconnect()
        except Exception:
            pass
