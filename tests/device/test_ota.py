# microcot.ota: the Writer against an in-memory partition (both runtimes), app descriptions, and
# on a board with OTA partitions (the ESP32 model's emulation, an ESP32) a write into the next
# update partition and back, without set_boot (the board keeps booting what it runs). Elsewhere
# every call says the board has no OTA partitions.
import hashlib

from dt import Rng, raises

from microcot import ota


def image(version, project="microcot", size=256, seed=1):
    h = bytearray(256)
    h[0] = 0xE9
    h[32:36] = b"\x32\x54\xcd\xab"
    v = version.encode()
    h[48:48 + len(v)] = v
    p = project.encode()
    h[80:80 + len(p)] = p
    return bytes(h) + Rng(seed).bytes(size - 256)


class MemPart:
    def __init__(self, size=12 * 1024, label="ota_1"):
        self.flash = bytearray(size)
        for i in range(size):
            self.flash[i] = 0xFF
        self.label = label
        self.writes = []
        self.booted = False

    def info(self):
        return (0, 0x11, 0x190000, len(self.flash), self.label, False)

    def readblocks(self, b, buf, off=0):
        a = b * 4096 + off
        buf[:] = self.flash[a:a + len(buf)]

    def ioctl(self, op, arg):
        assert op == 6  # BLOCK_ERASE
        self.writes.append(arg)
        for i in range(arg * 4096, arg * 4096 + 4096):
            self.flash[i] = 0xFF
        return 0

    def writeblocks(self, b, buf, off):
        # NOR flash: a write only clears bits, so writing unerased flash corrupts it
        a = b * 4096 + off
        for i in range(len(buf)):
            self.flash[a + i] &= buf[i]

    def set_boot(self):
        self.booted = True


def test_app_desc():
    d = ota.app_desc(image("1.2.3", "demo"))
    assert d == {"version": "1.2.3", "project": "demo"}
    assert ota.app_desc(b"\xff" * 256) is None
    assert ota.app_desc(image("1")[:100]) is None
    bad = bytearray(image("1"))
    bad[33] = 0
    assert ota.app_desc(bad) is None


def test_writer_erases_each_block_once_and_reads_back():
    p = MemPart()
    for i in range(len(p.flash)):
        p.flash[i] = 0x5A  # what an earlier image left: must be erased before it is written
    img = image("2.0.0", size=10000, seed=5)
    w = ota.Writer(len(img), partition=p)
    for i in range(0, 8500, 700):  # pieces that straddle block boundaries
        w.write(memoryview(img)[i:min(i + 700, 8500)])
    assert p.writes == [0, 1, 2] and w.durable == 8500
    w.write(memoryview(img)[8500:])
    d = w.finish(sha256=hashlib.sha256(img).digest())
    assert d["version"] == "2.0.0" and p.writes == [0, 1, 2]
    assert bytes(p.flash[:10000]) == img and p.flash[10000:12288] == b"\xff" * 2288
    w.activate()
    assert p.booted
    p = w = None
    # a wrong checksum, an incomplete image, too big, not an image
    w = ota.Writer(len(img), partition=MemPart())
    w.write(img)
    e = raises(ota.OTAError, w.finish, sha256="00" * 32)
    assert "SHA-256" in str(e)
    w = ota.Writer(len(img), partition=MemPart())
    w.write(memoryview(img)[:5000])
    assert "incomplete" in str(raises(ota.OTAError, w.finish))
    raises(ota.OTAError, ota.Writer, 12289, partition=MemPart())
    w = ota.Writer(partition=MemPart(8192))
    raises(ota.OTAError, w.write, bytes(9000))
    w = ota.Writer(partition=MemPart())
    w.write(b"\x00" * 300)
    assert "app image" in str(raises(ota.OTAError, w.finish))


def test_writer_resume_and_start_over():
    p = MemPart()
    img = image("3.0", size=9000, seed=8)
    w = ota.Writer(len(img), partition=p)
    w.write(img[:8500])
    assert w.durable == 8500
    # a reboot later: resume at what is in flash (inside block 2, erased already), hashing it
    w2 = ota.Writer(len(img), offset=w.durable, partition=p)
    h = hashlib.sha256()
    w2.sha256_prefix(h, 8500)
    w2.write(img[8500:])
    h.update(img[8500:])
    assert p.writes == [0, 1, 2]
    got = h.digest()
    assert got == hashlib.sha256(img).digest()
    assert w2.finish(sha256=got)["version"] == "3.0"
    raises(ValueError, ota.Writer, offset=-1, partition=p)
    w2.seek(0)
    assert w2.written == 0 and w2.durable == 0
    raises(ValueError, w2.seek, 10)


def _has_ota():
    try:
        import esp32

        esp32.Partition(esp32.Partition.RUNNING).get_next_update()
        return True
    except (ImportError, OSError, AttributeError):
        return False


def test_on_this_board():
    if not _has_ota():
        for f in (ota.running, ota.status, ota.mark_valid, ota.Writer):
            e = raises(ota.OTAUnsupported, f)
            assert "this board has no OTA partitions" in str(e)
        return
    st = ota.status()
    assert st["running"] != st["next"]
    r = ota.running()
    assert r["label"] == st["running"]
    assert isinstance(r["version"], str)
    img = image("device-test", size=5000, seed=9)
    w = ota.Writer(len(img))
    assert w.label == st["next"]
    w.write(img)
    assert w.finish(sha256=hashlib.sha256(img).digest())["version"] == "device-test"
    assert ota.status() == st  # nothing activated
