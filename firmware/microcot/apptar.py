# Application bundles (c8y_SoftwareUpdate, opapp.py): their name rules and a streaming reader.
#
# A bundle is an uncompressed ustar tar of the application's files (`microcot app bundle` makes
# one with Python's tarfile; the host checks names with check_name, this very code). The rules:
# flat names of 1 to 64 characters from A-Z a-z 0-9 _ . -, not starting with a dot, ending in
# .py .mpy .csv .json .txt; never boot.py, microcot.json or board.json (the firmware's: boot.py
# must stay able to roll back, the settings carry the device's context); flat names keep
# everything out of /store and /lib. At most MAX_FILES files of at most MAX_FILE bytes each, no
# duplicates.
#
# Untar is httpget.Download's sink: it parses the tar while it downloads (one 512-byte header
# buffer, nothing sized by what the bundle says) and writes each file into a staging directory
# (/app.new, appswitch.py); the whole bundle is never in RAM. Refused with a reason
# (BundleError): a bad header checksum, anything but ustar regular files (directories, links,
# pax headers: long or non-ASCII names), a name prefix, a size field that is not plain octal or
# over MAX_FILE, a header after an end-of-archive block, an archive that ends before its two
# end-of-archive blocks (truncated). Bytes after the end-of-archive are ignored (tar pads its
# records with zeros). A module of its own, loaded only during a download: with httpget it is
# what a download needs on a small heap, the switch (appswitch.py) is not.
MAX_FILES = 16
MAX_NAME = 64
MAX_FILE = 256 * 1024
MAX_BUNDLE = 1024 * 1024  # bytes a download may announce (httpget max_size)
SUFFIXES = (".py", ".mpy", ".csv", ".json", ".txt")
RESERVED = ("boot.py", "microcot.json", "board.json")
_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"

_open = open  # tests put a file opener that fails at a chosen step here
_remove = None  # the same for removing (None: os.remove)


class BundleError(Exception):
    pass


def check_name(name):
    """None when `name` (str or bytes) may name a file of a bundle, else why not."""
    b = name.encode() if isinstance(name, str) else bytes(name)
    shown = repr(b[:MAX_NAME])[1:]
    if not 0 < len(b) <= MAX_NAME:
        return "file %s: a name has 1 to %d characters" % (shown, MAX_NAME)
    for c in b:
        if c not in _CHARS:
            return ("file %s: names are flat (no directories: /lib and /store are the "
                    "firmware's) and only of A-Z a-z 0-9 _ . -" % shown)
    if b[0] == 46:
        return "file %s: a name must not start with a dot" % shown
    n = str(b, "ascii")
    if n in RESERVED:
        return "file %s: belongs to the firmware, not to the application" % n
    for suf in SUFFIXES:
        if n.endswith(suf) and len(n) > len(suf):
            return None
    return "file %s: the allowed suffixes are %s" % (n, " ".join(SUFFIXES))


def _octal(b, what, limit):
    # a ustar number: optional spaces, octal digits, then NUL or spaces; base-256 (the high bit,
    # GNU's large numbers) and values over limit are refused before they can grow
    if b[0] & 0x80:
        raise BundleError("%s in base-256 refused" % what)
    i = 0
    n = len(b)
    while i < n and b[i] == 32:
        i += 1
    v = 0
    j = i
    while j < n and 48 <= b[j] <= 55:
        v = v * 8 + b[j] - 48
        if v > limit:
            raise BundleError("%s over %d" % (what, limit))
        j += 1
    if j == i:
        raise BundleError("%s is not an octal number" % what)
    while j < n:
        if b[j] not in (0, 32):
            raise BundleError("%s is not an octal number" % what)
        j += 1
    return v


class Untar:
    """A download sink (write, seek(0)) that unpacks a bundle into directory `d` as it
    arrives."""

    def __init__(self, d):
        self.dir = d
        self.hdr = bytearray(512)
        self.f = None
        self.files = []
        self.reset()

    def reset(self):
        self.close()
        self.n = 0  # header bytes collected
        self.left = 0  # bytes of the current file still to come
        self.pad = 0  # padding to the next 512-byte block
        self.end = 0  # zero blocks seen (two end the archive)
        self.files = []
        self.size = 0  # bytes of all files

    def close(self):
        f, self.f = self.f, None
        if f is not None:
            f.close()

    def seek(self, pos):
        # the server ignored a Range request: the download starts over, and so does the parse
        if pos:
            raise OSError("Untar can only start over")
        self.close()
        rm = _remove
        if rm is None:
            import os

            rm = os.remove
        for n in self.files:
            rm(self.dir + "/" + n)
        self.reset()

    def write(self, buf):
        mv = memoryview(buf)
        n = len(mv)
        i = 0
        while i < n:
            if self.left:
                k = min(self.left, n - i)
                self.f.write(mv[i:i + k])
                self.left -= k
                i += k
                if not self.left:
                    self.close()
            elif self.pad:
                k = min(self.pad, n - i)
                self.pad -= k
                i += k
            elif self.end >= 2:
                break  # after the end-of-archive: tar's record padding
            else:
                k = min(512 - self.n, n - i)
                self.hdr[self.n:self.n + k] = mv[i:i + k]
                self.n += k
                i += k
                if self.n == 512:
                    self.n = 0
                    self._header()
        return n

    def _header(self):
        h = self.hdr
        total = 0
        for c in h:
            total += c
        if not total:
            self.end += 1
            return
        if self.end:
            raise BundleError("bundle: a header after an end-of-archive block")
        for c in h[148:156]:
            total += 32 - c  # the checksum counts its own field as spaces
        if _octal(h[148:156], "header checksum", 1 << 20) != total:
            raise BundleError("bundle: bad header checksum (not a tar, or damaged) at file %d"
                              % (len(self.files) + 1))
        if h[257:262] != b"ustar":
            raise BundleError("bundle: not a ustar archive (make it with microcot app bundle)")
        t = h[156]
        if t not in (0, 48):
            raise BundleError("bundle: only regular files, not entry type %r (directories, "
                              "links and pax headers are refused)" % chr(t))
        for c in h[345:500]:
            if c:
                raise BundleError("bundle: names with a directory prefix are refused")
        k = 0
        while k < 100 and h[k]:
            k += 1
        name = bytes(h[:k])
        why = check_name(name)
        if why is not None:
            raise BundleError("bundle: " + why)
        name = str(name, "ascii")
        if name in self.files:
            raise BundleError("bundle: file %s twice" % name)
        if len(self.files) >= MAX_FILES:
            raise BundleError("bundle: more than %d files" % MAX_FILES)
        size = _octal(h[124:136], "size of " + name, MAX_FILE)
        self.files.append(name)
        self.size += size
        self.f = _open(self.dir + "/" + name, "wb")
        self.left = size
        self.pad = -size & 511
        if not size:
            self.close()

    def finish(self):
        """The names of the files once the archive is complete; BundleError when it is not."""
        if self.left or self.pad or self.n or self.end < 2:
            self.close()
            raise BundleError("bundle: truncated (it ends before its end-of-archive blocks)")
        if not self.files:
            raise BundleError("bundle: no file in it")
        return self.files
