# Firmware update target: the ESP32's OTA app partitions (esp32.Partition), for MicroPython.
#
#   w = ota.Writer(size)                  # the partition get_next_update() names
#   httpget.download(url, w, sha256=...)  # or step by step with httpget.Download
#   desc = w.finish(sha256=...)           # last block, header check, read-back SHA-256
#   w.activate()                          # set_boot: the next hard reset boots it
#   ota.reboot()
#   ... after the reboot, once the platform is reached:
#   ota.mark_valid()                      # else the bootloader rolls back at the next reset
#   ota.running()["version"]              # for c8y_Firmware
#
# Writes go straight from the caller's buffer (e.g. httpget's 1 KiB) into flash with the
# offset form Partition.writeblocks(block, buf, offset), which does not erase: each 4 KiB block
# is erased with ioctl(6, block) (BLOCK_ERASE) when the write reaches it. A Writer holds no
# buffer of its own: a connected agent on the ESP32's heap may not find 4 KiB in one piece
# (measured: tests/host/test_agent_firmware.py), and flash needs no block-sized writes.
#
# With the ESP-IDF app rollback enabled (MicroPython's OTA builds), the bootloader boots a new
# image once as "pending verify"; if the app does not call mark_valid() before the next reset,
# the bootloader marks it aborted and boots the previous one. Without rollback support
# mark_valid() returns False (esp32 raises OSError -261 there).
#
# Boards without OTA partitions (rp2, the unix port without the virtual board's emulation, an
# ESP32 build whose partition table has no ota_0/ota_1) raise OTAUnsupported. The virtual board
# emulates the pair (host/microcot_host/vboard: board.py's bootloader, repl.py's esp32 module).
import sys

BLOCK = 4096
IMAGE_MAGIC = 0xE9
APP_DESC_MAGIC = 0xABCD5432
_DESC = 32  # esp_app_desc_t follows the image header (24 B) and the first segment header (8 B)
HEAD = 256  # enough of an image for app_desc()
_READ = 512  # bytes read back at a time for the SHA-256


class OTAError(Exception):
    pass


class OTAUnsupported(OTAError):
    pass


def _esp32():
    try:
        import esp32
    except ImportError:
        raise OTAUnsupported("this board has no OTA partitions: no esp32 module on %s"
                             % sys.platform)
    if not hasattr(esp32, "Partition"):
        raise OTAUnsupported("this board has no OTA partitions: esp32.Partition missing")
    return esp32


def _cstr(b):
    i = b.find(b"\0")
    return str(bytes(b if i < 0 else b[:i]), "utf-8")


def app_desc(head):
    """{'version', 'project'} from the first HEAD bytes of an ESP32 app image, or None when they
    are not one (no image magic, no app description)."""
    if len(head) < HEAD or head[0] != IMAGE_MAGIC:
        return None
    m = head[_DESC] | head[_DESC + 1] << 8 | head[_DESC + 2] << 16 | head[_DESC + 3] << 24
    if m != APP_DESC_MAGIC:
        return None
    return {"version": _cstr(head[_DESC + 16:_DESC + 48]),
            "project": _cstr(head[_DESC + 48:_DESC + 80])}


def _label(p):
    return p.info()[4]


def _next(esp32):
    try:
        return esp32.Partition(esp32.Partition.RUNNING).get_next_update()
    except OSError as e:
        raise OTAUnsupported("this board has no OTA partitions: the partition table has no "
                             "ota_0/ota_1 (a build without OTA? %s)" % e)


def running():
    """The running app: {'label', 'version', 'project'} (version None when the partition does
    not start with an app description)."""
    esp32 = _esp32()
    p = esp32.Partition(esp32.Partition.RUNNING)
    head = bytearray(HEAD)
    p.readblocks(0, head)
    d = app_desc(head) or {"version": None, "project": None}
    d["label"] = _label(p)
    return d


def status():
    """{'running', 'boot', 'next'}: partition labels; boot != running means an update waits for
    the next reset."""
    esp32 = _esp32()
    P = esp32.Partition
    return {"running": _label(P(P.RUNNING)), "boot": _label(P(P.BOOT)),
            "next": _label(_next(esp32))}


def mark_valid():
    """Confirm the running app (cancel the rollback). False when the firmware has no rollback
    support; True otherwise (also when there was nothing to confirm)."""
    esp32 = _esp32()
    try:
        esp32.Partition.mark_app_valid_cancel_rollback()
    except OSError:
        return False
    return True


def reboot():
    from . import hal

    hal.reset()


class Writer:
    """A sink (write(buf)) that fills the next OTA partition, straight from the caller's buffer.

    size: the image size, checked against the partition when given. offset: resume a write
    that reached `offset` before (e.g. .durable saved before a reboot)."""

    def __init__(self, size=None, offset=0, partition=None):
        p = partition or _next(_esp32())
        info = p.info()
        self.part = p
        self.label = info[4]
        self.capacity = info[3]
        if size is not None and size > self.capacity:
            raise OTAError("an image of %d bytes does not fit %s (%d bytes)"
                           % (size, self.label, self.capacity))
        if not 0 <= offset <= self.capacity:
            raise ValueError("offset %d: outside %s" % (offset, self.label))
        self.size = size
        self.written = offset  # bytes in flash
        self._erased = (offset + BLOCK - 1) // BLOCK * BLOCK  # flash below this is erased

    @property
    def durable(self):
        """Bytes already in flash: where a write can resume after a reset."""
        return self.written

    def write(self, data):
        mv = memoryview(data)
        n = len(mv)
        a = self.written
        if a + n > self.capacity:
            raise OTAError("image larger than %s (%d bytes)" % (self.label, self.capacity))
        i = 0
        try:
            while i < n:
                if a == self._erased:
                    self.part.ioctl(6, a // BLOCK)  # BLOCK_ERASE: flash is written erased
                    self._erased += BLOCK
                k = min(n - i, self._erased - a)
                self.part.writeblocks(a // BLOCK, mv[i:i + k], a % BLOCK)
                i += k
                a += k
        except OSError as e:
            raise OTAError("writing %s at byte %d failed: %s" % (self.label, a, e))
        finally:
            self.written = a
        return n

    def seek(self, pos):
        """Only seek(0): start over (a server that ignored a range request)."""
        if pos != 0:
            raise ValueError("Writer.seek: only 0")
        self.written = 0
        self._erased = 0

    def sha256_prefix(self, h, n):
        """Feed the first n bytes of the partition into the hash h (n <= durable)."""
        if n > self.written:
            raise ValueError("sha256_prefix: %d bytes asked, %d in flash" % (n, self.written))
        self._hash(h, n)

    def _hash(self, h, n):
        buf = bytearray(_READ)
        mv = memoryview(buf)
        a = 0
        while a < n:
            self.part.readblocks(a // BLOCK, buf, a % BLOCK)
            k = min(n - a, _READ)
            h.update(mv[:k])
            a += k

    def finish(self, sha256=None):
        """Write the last (padded) block, check that an app image starts the partition and, with
        sha256 (hex or 32 bytes), that the partition holds it: read back and hashed. Returns the
        image's app description."""
        if self.size is not None and self.written != self.size:
            raise OTAError("image incomplete: %d of %d bytes" % (self.written, self.size))
        head = bytearray(HEAD)
        self.part.readblocks(0, head)
        desc = app_desc(head)
        if desc is None:
            raise OTAError("%s does not hold an ESP32 app image (magic 0x%02x)"
                           % (self.label, head[0]))
        if sha256 is not None:
            import hashlib
            from binascii import hexlify, unhexlify

            want = unhexlify(sha256) if isinstance(sha256, str) else bytes(sha256)
            h = hashlib.sha256()
            self._hash(h, self.written)
            got = h.digest()
            if got != want:
                raise OTAError("%s read back: SHA-256 %s over %d bytes, expected %s" % (
                    self.label, str(hexlify(got), "ascii"), self.written,
                    str(hexlify(want), "ascii")))
        return desc

    def activate(self):
        """Make the written partition the one the next hard reset boots."""
        try:
            self.part.set_boot()
        except OSError as e:
            raise OTAError("set_boot(%s) refused the image: %s" % (self.label, e))
