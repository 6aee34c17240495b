# Helpers for device tests. They run on MicroPython (on a board) and on CPython (in-process),
# so only builtins and the features both share.


def raises(exc_type, fn, *args, **kwargs):
    """Call fn and return the exception of exc_type it raised; fail if it raised none."""
    try:
        fn(*args, **kwargs)
    except exc_type as exc:
        return exc
    raise AssertionError("%s not raised by %s%r" % (exc_type.__name__, getattr(fn, "__name__", fn), args))


class Rng:
    """A small deterministic PRNG (xorshift32) so both runtimes draw the same 'random' cases."""

    def __init__(self, seed=2463534242):
        self.s = seed & 0xFFFFFFFF or 1

    def u32(self):
        s = self.s
        s ^= (s << 13) & 0xFFFFFFFF
        s ^= s >> 17
        s ^= (s << 5) & 0xFFFFFFFF
        self.s = s
        return s

    def below(self, n):
        return self.u32() % n

    def bytes(self, n):
        return bytes(self.u32() & 0xFF for _ in range(n))


class SkipTest(Exception):
    pass


def skip(reason):
    """Skip this test: for a board that lacks what it needs (no modem, no native emitter)."""
    try:
        import pytest  # under CPython the test runs in pytest itself
    except ImportError:
        raise SkipTest(reason)
    pytest.skip(reason)


def scratch_dir(name):
    """An empty scratch directory: a temp dir on CPython, `name` under the board's cwd on a board."""
    try:
        import tempfile

        return tempfile.mkdtemp()
    except ImportError:
        import os

        try:
            os.mkdir(name)
        except OSError:
            pass
        return name


def rmtree(d):
    """Remove a flat scratch directory."""
    import os

    for name in os.listdir(d):
        os.remove(d + "/" + name)
    os.rmdir(d)


def free(*names):
    """Let go of microcot modules: the tests run one after the other in one interpreter on the
    board (under CPython other test modules share sys.modules, so nothing is dropped there)."""
    import sys

    if sys.implementation.name != "micropython":
        return
    for n in names:
        sys.modules.pop("microcot." + n, None)
        pkg = sys.modules.get("microcot")
        if pkg is not None and n in pkg.__dict__:
            delattr(pkg, n)
