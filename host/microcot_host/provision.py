"""`microcot provision`: give every connected board its device credentials (seed 002's mass
registration: "the device's credentials must be stored on it when it is produced").

For each board, in parallel:
  1. open it (raw REPL); deploy microcot when it is missing;
  2. ask the board who it is, as its agent's session.identify will: the ID the agent stored, else
     `identity.detect()` (ICCID from the modem, else the MAC, else the configured ID);
     `machine.unique_id()`; and a hash of
     the credentials it already holds: SHA-256 over a fresh random nonce and the password, so
     neither the password nor a reusable hash of it ever comes back over the wire;
  3. take the password: a fresh one with --rotate, else the input CSV's row (matched by ICCID,
     else by ID), else the one the vault holds from an earlier run, else a new random one;
  4. if the board holds exactly these credentials and the ledger says verified: "unchanged";
  5. otherwise: vault and ledger first (status pending), then the store document "cred" =
     {"id", "password", "source": "provisioned", "ok": false} written atomically by the board's
     own store.py (status written), then read back as a nonce hash and compared (verified).

Storing the password (vault) and the intent (ledger, pending) before touching the board is what
makes a run resumable: after a crash or an unplugged board the next run finds the same password
and either sees it on the board already (the write made it) or writes it again.

One device ID, one board: between steps 2 and 3 the ID is claimed in the ledger (held by another
station sharing a PostgreSQL ledger: this board fails, "being provisioned by another station"),
and a device the ledger records on another board (its serial) is not given to this one unless
--reassign says the old board is gone. A CSV row's ID goes to one device only (the ledger
refuses a second). These are what keep several stations with overlapping CSVs from handing out
one device twice; within one run the boards are also checked against each other.

The CSV for the bulk registration holds one row per board that ended up verified or unchanged:
ID (the CSV's, or the device ID), CREDENTIALS, TYPE mqtt, NAME (the CSV's, else the template,
else what the ledger recorded), ICCID = the device ID (the MQTT user the device connects with),
SHELL (the CSV's, else --shell, else the ledger's).
Rows are sorted by device ID, so an unchanged re-run writes the same file.

Passwords are never printed, logged or put into an error message: a board's error text is
masked (`***`) before it goes anywhere.
"""

from __future__ import annotations

import ast
import os
import secrets
import string
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import fleetcsv, ports, transport
from .fleetcsv import FleetCsv, FleetRow
from .provision_ledger import FAILED, PENDING, VERIFIED, WRITTEN, Books, Claim, DeviceRecord

MASK = "***"
CRED_DOC = "cred"
# letters, digits and punctuation that needs no quoting in a CSV, JSON, a shell or a URL form
ALPHABET = string.ascii_letters + string.digits + "-_.!@%*+=?~"
PASSWORD_LEN = 24  # ~148 bits
DEFAULT_NAME = "microcot {id}"  # the agent's own default name (agent.py DEFAULTS)

# results of one board in one run
WRITTEN_R = "written"  # new credentials written and verified
CONFIRMED = "confirmed"  # the board held them already (an interrupted run): ledger completed
UNCHANGED = "unchanged"
UPDATED = "updated"  # the board is unchanged, only ID/NAME/SHELL of the CSV row changed
FAILED_R = "failed"

Progress = Callable[[str, str], None]  # (port, what is happening)


class ProvisionError(RuntimeError):
    """One board could not be provisioned; the message never holds a password."""


def generate_password(length: int = PASSWORD_LEN) -> str:
    """A random password from ALPHABET (os.urandom through `secrets`) that fleetcsv's weak check
    accepts: lower case, upper case, digits and punctuation all present."""
    if length < fleetcsv.MIN_CREDENTIALS:
        raise ValueError(f"password length {length} < {fleetcsv.MIN_CREDENTIALS}")
    while True:
        pw = "".join(secrets.choice(ALPHABET) for _ in range(length))
        if (any(c.islower() for c in pw) and any(c.isupper() for c in pw)
                and any(c.isdigit() for c in pw) and any(not c.isalnum() for c in pw)):
            return pw


def mask(text: str, secret_values: Iterable[str | None]) -> str:
    for s in secret_values:
        if s:
            text = text.replace(s, MASK)
    return text


def check_template(template: str) -> None:
    """ValueError naming the problem when --name-template cannot be filled in."""
    try:
        out = template.format_map({"id": "8949000000000000000", "serial": "0", "source": "iccid"})
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"name template {template!r}: {exc!r}; use {{id}}, {{serial}} or "
                         "{source}") from None
    if not out.strip():
        raise ValueError(f"name template {template!r} gives an empty name")


# -- what runs on the board (MicroPython) --------------------------------------------------------

# Who the board is and what it holds, as a dict literal. Both IDs the agent's session.identify
# knows: the stored one (document "dev", which the agent uses when it exists) and the hardware's
# (identity.detect: the SIM's ICCID, else the MAC, else /microcot.json's or /board.json's
# device_id), which the agent reads when nothing is stored.
_PROBE = r"""
def _p(nonce, modem_ms):
    r = {'microcot': None}
    try:
        import microcot
        from microcot import identity, store
    except ImportError as e:
        r['why'] = str(e)
        return r
    r['microcot'] = getattr(microcot, '__version__', '?')
    import json, binascii, hashlib
    conf = {}
    try:
        f = open('/microcot.json')
        conf = json.load(f)
        f.close()
    except Exception:
        pass
    if not isinstance(conf, dict):
        conf = {}
    root = conf.get('store') or '/store'
    store.root(root)
    r['store'] = root
    try:
        r['hw_id'], r['hw_source'] = identity.detect(conf.get('device_id') or None, modem_ms)
    except Exception as e:
        r['id_error'] = str(e)
    dev = store.load('dev')
    if isinstance(dev, dict) and dev.get('id'):
        r['stored_id'] = dev['id']
        r['stored_source'] = dev.get('src')
    try:
        import machine
        r['serial'] = binascii.hexlify(machine.unique_id()).decode()
    except Exception:
        r['serial'] = None
    c = store.load(%(doc)r)
    if isinstance(c, dict):
        pw = c.get('password')
        h = None
        if isinstance(pw, str) and pw:
            h = binascii.hexlify(hashlib.sha256(binascii.unhexlify(nonce) + pw.encode())
                                 .digest()).decode()
        r['cred'] = {'id': c.get('id'), 'source': c.get('source'), 'ok': c.get('ok'), 'hash': h}
    pw = c = None
    r['cred_status'] = store.status(%(doc)r)
    return r
print(repr(_p(%(nonce)r, %(modem_ms)d)))
del _p
"""

_WRITE = r"""
def _w(root, did, pw):
    from microcot import store
    store.root(root)
    store.save(%(doc)r, {'id': did, 'password': pw, 'source': 'provisioned', 'ok': False})
_w(%(root)r, %(did)r, %(pw)r)
del _w
"""


def device_id(facts: dict) -> tuple[str, str | None, str]:
    """(ID, its source, a note) as the agent will use it: the stored ID when there is one (the
    agent keeps it even when the hardware says otherwise), else the hardware's."""
    hw, stored = facts.get("hw_id"), facts.get("stored_id")
    if stored:
        note = ""
        if hw and hw != stored:
            note = (f"the board's stored ID {stored} is not its hardware's {hw} (a new SIM?): "
                    f"provisioned for {stored}, the ID its agent uses")
        elif not hw:
            note = f"hardware ID unreadable ({facts.get('id_error')}): the stored ID is used"
        return stored, facts.get("stored_source"), note
    if hw:
        return hw, facts.get("hw_source"), ""
    raise ProvisionError(f"no device ID: {facts.get('id_error') or 'none reported'}")


def nonce_hash(nonce: str, password: str) -> str:
    import hashlib

    return hashlib.sha256(bytes.fromhex(nonce) + password.encode()).hexdigest()


def probe(t, modem_ms: int = 2000, nonce: str | None = None) -> tuple[dict, str]:
    """(facts, nonce): what _PROBE reports about the board."""
    nonce = nonce or secrets.token_hex(16)
    out = transport.run(t, _PROBE % {"nonce": nonce, "modem_ms": modem_ms, "doc": CRED_DOC},
                        timeout=20 + 6 * modem_ms / 1000)
    text = out.decode(errors="replace").strip().splitlines()
    try:
        facts = ast.literal_eval(text[-1])
    except (ValueError, SyntaxError, IndexError):
        raise ProvisionError(f"unexpected answer from the board: {text[-1:]!r}") from None
    if not isinstance(facts, dict):
        raise ProvisionError("unexpected answer from the board")
    return facts, nonce


def write_credentials(t, root: str, device_id: str, password: str) -> None:
    try:
        transport.run(t, _WRITE % {"doc": CRED_DOC, "root": root, "did": device_id,
                                   "pw": password}, timeout=30)
    except transport.ExecError as exc:
        raise ProvisionError("writing the credentials failed on the board: "
                             + mask(_last_line(exc.error_output), [password])) from None


def _last_line(tb: str) -> str:
    lines = [ln.strip() for ln in tb.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "error"


# -- one run ------------------------------------------------------------------------------------

@dataclass
class Options:
    # None: a device the ledger knows keeps its recorded NAME/SHELL, a new one gets the default
    name_template: str | None = None
    shell: str | None = None
    rotate: bool = False
    deploy: bool = True  # deploy microcot first where it is missing
    board: str | None = None  # boards/*.toml for that deploy (default: guessed from the board)
    timeout: float = 10.0  # seconds for a board's raw REPL
    modem_ms: int = 2000  # per AT command while reading the ICCID
    workers: int = 16
    reassign: bool = False  # a device ID recorded on another board may go to this one


@dataclass
class Outcome:
    port: str
    result: str = FAILED_R  # written | confirmed | unchanged | updated | failed
    device_id: str | None = None
    id_source: str | None = None
    serial: str | None = None
    origin: str | None = None  # csv | generated (where the password came from first)
    deployed: bool = False
    accepted: bool | None = None  # the board's "ok": the broker has accepted the credentials
    detail: str = ""
    seconds: float = 0.0
    row: FleetRow | None = field(default=None, repr=False)
    begun: bool = field(default=False, repr=False)  # the ledger has this run's pending record
    # this run holds the device ID (claimed, and not another board's): its ledger record is ours
    # to mark failed; otherwise a failure is only an event
    owner: bool = field(default=False, repr=False)
    claim: Claim | None = field(default=None, repr=False)
    note: str = field(default="", repr=False)  # a warning for the detail

    @property
    def ok(self) -> bool:
        return self.result != FAILED_R

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("port", "result", "device_id", "id_source", "serial",
                                           "origin", "deployed", "accepted", "detail")}
        d["seconds"] = round(self.seconds, 2)
        d["credentials"] = MASK if self.row is not None else None
        return d


class Provisioner:
    """Provisions boards against one ledger/vault (`Books`) and an optional input CSV."""

    def __init__(self, books: Books, source: FleetCsv | None = None,
                 options: Options | None = None, progress: Progress | None = None) -> None:
        self.books = books
        self.opts = options or Options()
        check_template(self.opts.name_template or DEFAULT_NAME)
        if self.opts.shell not in (None, "0", "1"):
            raise ValueError(f"shell must be 0 or 1, got {self.opts.shell!r}")
        self.progress = progress or (lambda port, what: None)
        self._by_iccid: dict[str, FleetRow] = {}
        self._by_id: dict[str, FleetRow] = {}
        for r in (source.rows if source else []):
            self._by_iccid.setdefault(r.iccid, r)
            self._by_id.setdefault(r.id, r)
        self._claims: dict[str, str] = {}  # device ID -> port, so two boards never share one
        self._lock = threading.Lock()
        self._usb_serials: dict[str, str] = {}

    # -- many boards ---------------------------------------------------------------------------

    def run(self, port_list: list[str]) -> list[Outcome]:
        """Every port in parallel; outcomes in the order of `port_list`. Never raises for a
        board's fault: a failed board is an outcome."""
        self._usb_serials = _usb_serials()
        if not port_list:
            return []
        workers = max(1, min(self.opts.workers, len(port_list)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="provision") as pool:
            return list(pool.map(self.one, port_list))

    # -- one board -----------------------------------------------------------------------------

    def one(self, port: str) -> Outcome:
        out = Outcome(port=port)
        start = time.monotonic()
        t = None
        try:
            self.progress(port, "opening")
            t = transport.open_board(port, timeout=self.opts.timeout)
            self._provision(t, out)
            out.detail = "; ".join(x for x in (out.detail, out.note) if x)
        except Exception as exc:  # one board's failure is its outcome, never the run's
            out.result = FAILED_R
            out.detail = mask(_reason(exc), [out.row.credentials if out.row else None])
            out.row = None
            self._record_failure(out)
        finally:
            if out.claim is not None:  # after the failure is recorded: it is still ours then
                out.claim.release()
                out.claim = None
            if t is not None:
                transport.close(t)
            out.seconds = time.monotonic() - start
            self.progress(port, out.result + (f": {out.detail}" if out.detail else ""))
        return out

    def _provision(self, t, out: Outcome) -> None:
        """Steps 2-5 of the module docstring, filling in `out`."""
        port = out.port
        books = self.books
        self.progress(port, "reading ID")
        facts, nonce = probe(t, self.opts.modem_ms)
        if facts.get("microcot") is None:
            if not self.opts.deploy:
                raise ProvisionError("microcot is not deployed on this board (microcot deploy, "
                                     "or leave out --no-deploy)")
            self.progress(port, "deploying microcot")
            self._deploy(t)
            out.deployed = True
            self.progress(port, "reading ID")
            facts, nonce = probe(t, self.opts.modem_ms)
            if facts.get("microcot") is None:
                raise ProvisionError(f"microcot does not import after the deploy: "
                                     f"{facts.get('why')}")
        out.serial = facts.get("serial") or self._usb_serials.get(os.path.realpath(port))
        did, out.id_source, out.note = device_id(facts)
        out.device_id = did
        self._claim(did, port)
        out.claim = books.ledger.claim(did)  # LedgerBusy: another station has it right now
        rec = books.ledger.get(did)
        self._check_board(did, rec, facts.get("serial"))
        out.owner = True

        row = self._row_for(did)
        stored = books.vault.get(did)
        if self.opts.rotate:
            password, origin = generate_password(), "generated"
        elif row is not None:
            password, origin = row.credentials, "csv"
        elif stored is not None:
            password = stored
            origin = rec.cred_origin if rec and rec.cred_origin else "generated"
        else:
            password, origin = generate_password(), "generated"
        out.origin = origin
        external_id, name, shell = self._columns(did, row, rec, out)
        out.row = FleetRow(0, external_id, password, fleetcsv.DEVICE_TYPE, name, did, shell,
                           row.extra if row else ())

        cred = facts.get("cred") if isinstance(facts.get("cred"), dict) else {}
        on_board = (cred.get("id") == did and cred.get("hash") == nonce_hash(nonce, password)
                    and facts.get("cred_status") == "ok")
        out.accepted = bool(cred.get("ok")) if on_board else None
        if (on_board and rec is not None and rec.status == VERIFIED
                and books.keys.matches(rec.cred_hash, did, password)):
            use = "accepted by the broker" if out.accepted else "not used yet"
            if (rec.external_id, rec.name, rec.shell) == (external_id, name, shell):
                out.result = UNCHANGED
                out.detail = "in place, " + use
                books.ledger.note(did, port, out.serial, UNCHANGED)
            else:  # only the CSV columns changed: nothing to do on the board
                books.ledger.describe(did, external_id=external_id, name=name, shell=shell)
                out.result = UPDATED
                out.detail = "ID/NAME/SHELL changed; credentials in place, " + use
            return

        # a CSV ID that is another device's fails here, before the vault has this password
        books.ledger.check_external_id(did, external_id)
        # vault and ledger before the board: a crash from here on is resumed with this password
        books.vault.put(did, password)
        out.claim.check()
        new = rec is None or not books.keys.matches(rec.cred_hash, did, password)
        books.ledger.begin(did, external_id=external_id, name=name, shell=shell,
                           id_source=out.id_source, board_serial=out.serial, port=port,
                           cred_hash=books.keys.cred_hash(did, password), cred_origin=origin,
                           new_password=new)
        out.begun = True
        if on_board:
            out.result = CONFIRMED
            out.detail = "the board held these credentials already"
        else:
            replaced = cred.get("source") if cred.get("id") else None
            self.progress(port, "writing credentials")
            write_credentials(t, facts.get("store") or "/store", did, password)
            books.ledger.set_status(did, WRITTEN, port=port)
            out.result = WRITTEN_R
            out.detail = f"replaced {replaced} credentials" if replaced else ""
        self.progress(port, "verifying")
        self._verify(t, did, password)
        out.accepted = False if out.result == WRITTEN_R else out.accepted
        out.claim.check()
        books.ledger.set_status(did, VERIFIED, port=port)

    def _columns(self, did: str, row: FleetRow | None, rec, out: Outcome
                 ) -> tuple[str, str, str]:
        """ID, NAME and SHELL of the device's CSV row: the input CSV's, else what the options
        say, else what the ledger recorded, else the defaults."""
        if row is not None:
            return row.id, row.name, row.shell
        o = self.opts
        if o.name_template is not None or rec is None:
            name = (o.name_template or DEFAULT_NAME).format_map(
                {"id": did, "serial": out.serial or "", "source": out.id_source or ""})
        else:
            name = rec.name
        shell = o.shell if o.shell is not None else rec.shell if rec is not None else "0"
        return (rec.external_id if rec is not None else did), name, shell

    def _verify(self, t, did: str, password: str) -> None:
        facts, nonce = probe(t, self.opts.modem_ms)
        cred = facts.get("cred") if isinstance(facts.get("cred"), dict) else {}
        if facts.get("cred_status") != "ok":
            raise ProvisionError(f"read-back: the credentials document is "
                                 f"{facts.get('cred_status')}")
        if cred.get("id") != did or cred.get("source") != "provisioned":
            raise ProvisionError(f"read-back: the board holds credentials of "
                                 f"{cred.get('id')!r} ({cred.get('source')}), not of {did}")
        if cred.get("hash") != nonce_hash(nonce, password):
            raise ProvisionError("read-back: the password on the board differs from the one "
                                 "written")

    def _deploy(self, t) -> None:
        from . import boards, deploy

        name = self.opts.board or deploy._guess_board(transport.board_info(t))
        bdef = boards.load(name) if name else None
        deploy.deploy_transport(t, bdef)

    def _check_board(self, did: str, rec: DeviceRecord | None, serial: str | None) -> None:
        """A device the ledger gave to another board is not given to this one as well (a twin:
        a cloned configured ID, a SIM moved to a new board while the old one keeps its stored
        ID). Only the board's own serial (machine.unique_id) counts: a USB adapter's serial
        number changes with the cable."""
        if (rec is None or self.opts.reassign or not serial or not rec.board_serial
                or rec.board_serial == serial):
            return
        raise ProvisionError(f"device ID {did} belongs to board {rec.board_serial} (ledger: "
                             f"{rec.status} on {rec.port} at {rec.updated_at}), not to this "
                             f"board {serial}: two boards would share one identity (--reassign "
                             "gives it to this board; the other must not connect any more)")

    def _claim(self, did: str, port: str) -> None:
        with self._lock:
            other = self._claims.setdefault(did, port)
        if other != port:
            raise ProvisionError(f"device ID {did} is also the ID of the board on {other}: "
                                 "two boards would share one identity")

    def _row_for(self, did: str) -> FleetRow | None:
        row = self._by_iccid.get(did)
        if row is not None:
            return row
        row = self._by_id.get(did)
        if row is not None and row.iccid != did:
            raise ProvisionError(f"CSV line {row.line}: ID {did} has ICCID {row.iccid}, but the "
                                 f"board connects as {did}: fix the ICCID column")
        return row

    def _record_failure(self, out: Outcome) -> None:
        try:
            rec = self.books.ledger.get(out.device_id) if out.device_id else None
            if rec is not None and (out.begun or (out.owner and rec.status in (PENDING,
                                                                                WRITTEN))):
                self.books.ledger.set_status(out.device_id, FAILED, port=out.port,
                                             error=out.detail)
            else:
                self.books.ledger.note(out.device_id, out.port, out.serial, FAILED, out.detail)
        except Exception:  # the ledger itself failing must not hide the board's reason
            pass


def _reason(exc: BaseException) -> str:
    if isinstance(exc, transport.ExecError):
        return "error on the board: " + _last_line(exc.error_output)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError | EOFError) or type(exc).__module__.startswith(("serial",
                                                                                "mpremote")):
        return f"lost the board ({text}): unplugged?"
    return text


def _usb_serials() -> dict[str, str]:
    """realpath(port) -> USB serial number, for boards without machine.unique_id()."""
    try:
        return {os.path.realpath(p.device): p.serial_number for p in ports.list_serial()
                if p.serial_number}
    except Exception:
        return {}


def csv_rows(outcomes: Iterable[Outcome]) -> list[FleetRow]:
    """The bulk-registration rows of the boards that hold verified credentials, by device ID."""
    rows = [o.row for o in outcomes if o.ok and o.row is not None]
    return sorted(rows, key=lambda r: r.iccid)


def ledger_rows(books: Books) -> list[FleetRow]:
    """Rows for every verified device of the ledger, passwords from the vault (export)."""
    rows = []
    for rec in books.ledger.all():
        if rec.status != VERIFIED:
            continue
        pw = books.vault.get(rec.device_id)
        if pw is None or not books.keys.matches(rec.cred_hash, rec.device_id, pw):
            continue
        rows.append(FleetRow(0, rec.external_id, pw, fleetcsv.DEVICE_TYPE, rec.name,
                             rec.device_id, rec.shell))
    return rows


def write_csv(rows: list[FleetRow], path, check_weak: bool = True) -> None:
    """Write the upload CSV owner-only, after checking it parses as it must (a row that the bulk
    registration would refuse is a bug here, not something to find at upload)."""
    text = fleetcsv.dumps(rows)
    parsed = fleetcsv.parse(text, check_weak=check_weak)
    if parsed.problems:
        raise ProvisionError("the CSV to write is not valid: " + "; ".join(parsed.messages()))
    fleetcsv.write(rows, path)
