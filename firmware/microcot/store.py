# Atomic, checksummed storage of small JSON documents (credentials, bootstrap state, settings) on
# the board's filesystem (DESIGN.md principle 5: nothing lost, a power cut at any moment leaves the
# old or the new document readable, never a torn one).
#
# On flash, document <name> lives in two generation slots under the root directory:
#     <name>.a  <name>.b      each: b"MCS1 <crc32:8 hex> <seq> <len>\n" + <len> bytes of JSON
# The CRC-32 covers "<seq> <len>\n" and the JSON, so a torn, truncated or bit-flipped slot is
# detected. The valid slot with the highest seq is the current document; the other valid slot is
# the previous generation.
#
# save() never touches the current slot: it writes "<name>.tmp" completely (flush, fsync where
# the port has it), then removes the older slot and renames the temporary file into its place
# (removing first because FAT cannot rename onto an existing file). Whatever step a power cut
# interrupts, the current slot is intact, and the renamed slot is complete; load() ignores .tmp.
# delete() removes the older slot before the current one, so an interrupted delete never brings
# back an older generation.
import os

MAX_SIZE = 4096  # bytes of JSON per document; documents are configuration, not logs
_MAGIC = b"MCS1 "
_HDR_MAX = 48  # "MCS1 " + 8 + " " + seq + " " + len + "\n", with room for large seq
_SLOTS = ("a", "b")
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"

_MISSING = 0
_CORRUPT = 1
_VALID = 2

try:
    from binascii import crc32 as _crc32
except ImportError:  # a port built without binascii.crc32: the same CRC in software

    def _crc32(data, crc=0):
        crc ^= 0xFFFFFFFF
        for b in data:
            crc ^= b
            for _ in range(8):
                crc = (crc >> 1) ^ (0xEDB88320 & -(crc & 1))
        return crc ^ 0xFFFFFFFF


class _OsFs:
    """The filesystem as the store uses it; tests swap in a fault-injecting fake (fs())."""

    def open(self, path, mode):
        return open(path, mode)

    def remove(self, path):
        os.remove(path)

    def rename(self, old, new):
        os.rename(old, new)

    def mkdir(self, path):
        os.mkdir(path)

    def sync(self, f):
        # flush to the OS, then to the medium where the port can (CPython, not MicroPython)
        f.flush()
        fsync = getattr(os, "fsync", None)
        if fsync is not None and hasattr(f, "fileno"):
            fsync(f.fileno())

    def sync_all(self):
        s = getattr(os, "sync", None)
        if s is not None:
            s()


_fs = _OsFs()
_root = "/store"


def root(path=None):
    """The directory holding the documents (default /store); with a path, set it first."""
    global _root
    if path is not None:
        if not isinstance(path, str) or not path:
            raise ValueError("store: root must be a non-empty path")
        _root = path.rstrip("/") or "/"
    return _root


def fs(layer=None):
    """The filesystem layer (open/remove/rename/mkdir/sync/sync_all); with a layer, set it first.
    fs(False) restores the real filesystem."""
    global _fs
    if layer is False:
        _fs = _OsFs()
    elif layer is not None:
        _fs = layer
    return _fs


def _check_name(name):
    if not isinstance(name, str) or not 1 <= len(name) <= 32:
        raise ValueError("store: name must be a string of 1 to 32 characters, got %r" % (name,))
    for i in range(len(name)):
        if name[i] not in _NAME_CHARS:
            raise ValueError("store: name %r: character %r at position %d is not one of A-Z a-z 0-9 _ -"
                             % (name, name[i], i))


def _path(name, suffix):
    r = _root
    return (r if r.endswith("/") else r + "/") + name + "." + suffix


def _digits(b):
    if not b:
        return False
    return all(48 <= c <= 57 for c in b)


def _parse(data):
    """(seq, json bytes) of a slot's contents, or None when they are not a complete document."""
    if not data.startswith(_MAGIC):
        return None
    nl = data.find(b"\n", 0, _HDR_MAX)
    if nl < 0:
        return None
    hdr = data[5:nl].split(b" ")
    if len(hdr) != 3 or len(hdr[0]) != 8 or not _digits(hdr[1]) or not _digits(hdr[2]):
        return None
    try:
        crc = int(hdr[0], 16)
    except ValueError:
        return None
    n = int(hdr[2])
    if n > MAX_SIZE or len(data) != nl + 1 + n:
        return None
    mv = memoryview(data)
    if _crc32(mv[nl + 1:], _crc32(mv[14:nl + 1])) != crc:
        return None
    return int(hdr[1]), mv[nl + 1:]


def _read(path, decode=True):
    """(state, seq, obj) of one slot; obj None unless `decode` (save() needs only the seq, and
    a nearly full heap has no room for decoding both slots to write a third)."""
    try:
        f = _fs.open(path, "rb")
    except OSError:
        return _MISSING, 0, None
    try:
        data = f.read(_HDR_MAX + MAX_SIZE + 1)
    except OSError:
        return _CORRUPT, 0, None
    finally:
        f.close()
    got = _parse(data or b"")
    if got is None:
        return _CORRUPT, 0, None
    if not decode:
        return _VALID, got[0], None
    import json

    try:
        return _VALID, got[0], json.loads(bytes(got[1]))
    except ValueError:
        return _CORRUPT, 0, None


def _scan(name, decode=True):
    _check_name(name)
    return [_read(_path(name, s), decode) for s in _SLOTS]


def _current(slots):
    """Index of the valid slot with the highest seq, or -1."""
    best = -1
    for i in range(len(slots)):
        if slots[i][0] == _VALID and (best < 0 or slots[i][1] > slots[best][1]):
            best = i
    return best


def load(name, default=None):
    """The stored document, the previous generation if the current one is damaged, else default.
    Never returns data that fails its checksum; status(name) tells which case happened."""
    slots = _scan(name)
    i = _current(slots)
    return slots[i][2] if i >= 0 else default


def status(name):
    """'ok' (a valid document, nothing damaged), 'fallback' (a valid document, but a damaged slot
    was skipped), 'corrupt' (files exist, none valid: load returns the default) or 'missing'."""
    slots = _scan(name)
    states = [s[0] for s in slots]
    if _current(slots) >= 0:
        return "fallback" if _CORRUPT in states else "ok"
    return "corrupt" if _CORRUPT in states else "missing"


def _makedirs(path):
    # one component at a time: MicroPython has no os.makedirs
    parts = path.split("/")
    cur = ""
    for i in range(len(parts)):
        if not parts[i]:
            if i == 0:
                cur = "/"
            continue
        cur = cur + parts[i] if cur.endswith("/") or not cur else cur + "/" + parts[i]
        try:
            _fs.mkdir(cur)
        except OSError:
            pass  # exists already; a real failure shows up when the file is opened


def save(name, obj):
    """Store obj (JSON-serialisable, at most MAX_SIZE bytes encoded) as document `name`."""
    import json

    try:
        body = json.dumps(obj).encode()
        json.loads(body)  # MicroPython writes "<object>" for what it cannot encode
    except (TypeError, ValueError) as exc:
        raise ValueError("store: document %r is not JSON-serialisable (%s)" % (name, exc))
    if len(body) > MAX_SIZE:
        raise ValueError("store: document %r is %d bytes, the limit is %d" % (name, len(body), MAX_SIZE))
    slots = _scan(name, False)
    cur = _current(slots)
    seq = slots[cur][1] + 1 if cur >= 0 else 1
    # the slot to replace is the one that is not current (a missing or damaged one, or the older)
    target = _path(name, _SLOTS[1 - cur if cur >= 0 else 0])
    tmp = _path(name, "tmp")
    meta = b"%d %d\n" % (seq, len(body))
    crc = _crc32(body, _crc32(meta))
    _makedirs(_root)
    f = _fs.open(tmp, "wb")
    try:
        f.write(b"%s%08x %s" % (_MAGIC, crc, meta))
        f.write(body)
        _fs.sync(f)
    finally:
        f.close()
    try:
        _fs.remove(target)
    except OSError:
        pass  # not there
    _fs.rename(tmp, target)
    _fs.sync_all()


def delete(name):
    """Remove document `name` (no error when it does not exist)."""
    slots = _scan(name)
    cur = _current(slots)
    order = ["tmp"]
    for i in range(len(_SLOTS)):
        if i != cur:
            order.append(_SLOTS[i])
    if cur >= 0:
        order.append(_SLOTS[cur])
    for s in order:
        try:
            _fs.remove(_path(name, s))
        except OSError:
            pass
    _fs.sync_all()
