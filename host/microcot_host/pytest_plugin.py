"""pytest plugin: run tests/device ON a board (`pytest --port PORT|virtual tests/device`).

The options have the names `microcot` gives the same things (microcot_host/cliopts.py): `--port`
where the board is, `--board` its board file, `--heap`, `--runtime`, `--no-deploy`; only the
per-test limit is `--board-timeout`, because pytest-timeout owns `--timeout`. The old spellings
(`--board PORT`, `--board-name`, `--board-heap`, `--board-runtime`, `--board-no-deploy`) still
work for one release, with a deprecation warning.

Without --port the device test modules are ordinary pytest modules and run under CPython
in-process; with --port each `test_*` function of each module runs on the board as its own pytest
item: the firmware is deployed first (hash-skip), the module and its helper modules are copied to
/tests on the board (compiled to .mpy where the board allows, to spare its heap), the board is soft
reset before each module, and each test runs under an overall timeout with the board's traceback
and output in the report.

Board requirements: a device module may declare, as module globals read by AST (decorators cannot
be evaluated here, the module runs on MicroPython), `BOARD_FAMILIES = ("esp32", "rp2")` (the
board's family, chip or board-file name must be one of them) and `BOARD_REQUIRES = ("modem",)`
(every capability must be present; see CAPABILITIES). Its tests get the `family`/`needs` markers
and are skipped with the reason on a board that does not qualify. Ordinary test functions can
carry `@pytest.mark.family(...)` / `@pytest.mark.needs(...)` to the same effect under --port.
Without --port (CPython in-process) all of this is ignored.
"""

from __future__ import annotations

import argparse
import ast
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

BOARD_TESTS = "/tests"
DEFAULT_TIMEOUT = 60.0
SKIP_MARK = "SkipTest: "
# what BOARD_REQUIRES / @pytest.mark.needs may name, and how the board is asked (CAPS_CODE)
CAPABILITIES = {
    "modem": "a cellular modem answers AT on the board's modem UART (hal.modem_uart())",
    "wlan": "network.WLAN exists",
    "ssl": "the ssl (or tls) module imports",
    "socket": "the socket module imports",
}
FAMILY_GLOBAL = "BOARD_FAMILIES"
REQUIRES_GLOBAL = "BOARD_REQUIRES"

# Runs on the board: (tags, capabilities). Tags are the family (hal.family(), else from
# sys.platform) and the deployed board file's name and chip. A modem counts only when it answers.
CAPS_CODE = r"""
import sys
def _caps():
    tags = []
    caps = []
    cfg = {}
    hal = None
    try:
        from microcot import hal
        tags.append(hal.family())
        cfg = hal.config()
    except Exception:
        p = sys.platform
        tags.append('esp32' if p[:5] == 'esp32' else 'rp2' if p == 'rp2' else 'unix')
    for k in ('name', 'chip'):
        if cfg.get(k):
            tags.append(str(cfg[k]))
    try:
        import network
        if hasattr(network, 'WLAN'):
            caps.append('wlan')
    except ImportError:
        pass
    for m in (('ssl', 'tls'), ('socket',)):
        for n in m:
            try:
                __import__(n)
                caps.append(m[0])
                break
            except ImportError:
                pass
    s = None
    try:
        s = hal.modem_uart() if hal else None
        if s is not None:
            from microcot.atmodem import AtModem
            a = AtModem(s, timeout_ms=1000)
            if a.ping(1000):
                caps.append('modem')
            a.close()
    except Exception:
        pass
    if s is not None and hasattr(s, 'close'):
        try:
            s.close()
        except Exception:
            pass
    return tags, caps
print(repr(_caps()))
del _caps
"""


# old spelling -> (new spelling, destination); accepted for one release with a warning
_RENAMED = {
    "--board-name": ("--board", "microcot_board"),
    "--board-heap": ("--heap", "microcot_heap"),
    "--board-runtime": ("--runtime", "microcot_runtime"),
    "--board-no-deploy": ("--no-deploy", "microcot_no_deploy"),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("microcot", "microcot hardware-in-the-loop")
    group.addoption("--port", dest="microcot_port", metavar="PORT|virtual", default=None,
                    help="run device tests on the board at PORT, or on a fresh virtual board")
    group.addoption("--board", dest="microcot_board", default=None, metavar="NAME",
                    help="board file from boards/ (default: guessed from the board; for a "
                         "virtual board: virtual)")
    group.addoption("--heap", dest="microcot_heap", metavar="SIZE", default=None,
                    help="the virtual board interpreter's whole heap (e.g. 100k); default: the "
                         "size that leaves the board file's heap_budget free after boot")
    group.addoption("--runtime", dest="microcot_runtime", metavar="RUNTIME", default=None,
                    help="board model of the virtual board: unix64, i386-esp32, i386-rp2 or "
                         "rp2040 (default: the board file's runtime)")
    group.addoption("--board-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                    help="time limit of one device test on the board (default %(default)s; "
                         "--timeout is pytest-timeout's)")
    group.addoption("--no-deploy", dest="microcot_no_deploy", action="store_true",
                    help="do not deploy the firmware before the tests")
    for old, (_new, dest) in _RENAMED.items():
        flag = dest == "microcot_no_deploy"
        group.addoption(old, dest=f"{dest}_old", help=argparse.SUPPRESS,
                        **({"action": "store_true"} if flag else {"default": None}))
    parser.addini("microcot_device_dir", "folder of the device test modules",
                  default="tests/device")


def _deprecated(config: pytest.Config, old: str, new: str) -> None:
    config.issue_config_time_warning(pytest.PytestDeprecationWarning(
        f"microcot: {old} is deprecated and will be removed; use {new}"), stacklevel=2)


def _normalise_options(config: pytest.Config) -> None:
    """Old spellings onto the new ones; `--board PORT` alone is the old meaning of --board."""
    opt = config.option
    for old, (new, dest) in _RENAMED.items():
        value = getattr(opt, f"{dest}_old", None)
        if value:
            _deprecated(config, old, new)
            if not getattr(opt, dest, None):
                setattr(opt, dest, value)
    if opt.microcot_port is None and opt.microcot_board is not None:
        value = getattr(opt, "microcot_board_old", None)
        if value is None and opt.microcot_board != "virtual" and _is_board_file(
                opt.microcot_board):
            raise pytest.UsageError(f"--board {opt.microcot_board} names the board file: say "
                                    "where the board is with --port PORT|virtual")
        # before --port existed, --board was where (the board file was --board-name)
        _deprecated(config, f"--board {opt.microcot_board} (a port)",
                    f"--port {opt.microcot_board}")
        opt.microcot_port = opt.microcot_board
        opt.microcot_board = value


def _is_board_file(name: str) -> bool:
    from . import boards

    try:
        boards.load(name)
    except boards.BoardError:
        return False
    return True


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "family(*names): with --port, run only on a board of one of these families, "
        "chips or board files (esp32, rp2, unix, esp32s3, rp2-pico-w, ...)")
    config.addinivalue_line(
        "markers", "needs(*capabilities): with --port, run only on a board that has all of "
        f"them ({', '.join(CAPABILITIES)})")
    _normalise_options(config)
    if config.option.microcot_port:
        config.pluginmanager.register(BoardSession(config), "microcot-board-session")


class DeviceTestFailure(Exception):
    def __init__(self, summary: str, output: str = "", traceback: str = "") -> None:
        super().__init__(summary)
        self.summary = summary
        self.output = output
        self.traceback = traceback


class BoardSession:
    """Owns the board for the pytest session: started (virtual) and opened on first use."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.spec: str = config.option.microcot_port
        self.device_dir = (config.rootpath / config.getini("microcot_device_dir")).resolve()
        self._vb: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.t: Any = None
        self.info: Any = None
        self.port: str | None = None
        self.uploaded: dict[str, str] = {}
        self._failed: str | None = None
        self._skipped: str | None = None
        self.board_name: str | None = None
        self._caps: tuple[list[str], list[str]] | None = None

    # -- collection ---------------------------------------------------------------------------
    def is_device_module(self, path: Path) -> bool:
        try:
            path.resolve().relative_to(self.device_dir)
        except ValueError:
            return False
        return path.name.startswith("test_") and path.suffix == ".py"

    @pytest.hookimpl(tryfirst=True)
    def pytest_pycollect_makemodule(self, module_path: Path, parent: pytest.Collector):
        if self.is_device_module(module_path):
            return DeviceModule.from_parent(parent, path=module_path)
        return None

    def pytest_report_header(self, config: pytest.Config) -> str:
        board = self.config.option.microcot_board
        return (f"microcot board: {self.spec}" + (f", board file {board}" if board else "")
                + " (device tests run on the board)")

    def pytest_terminal_summary(self, terminalreporter) -> None:
        # one line that says which board these results are from, for logs of many boards
        if self.info is not None:
            tags, caps = self._caps or ([], [])
            terminalreporter.write_line(
                f"microcot board: {self.port} MicroPython {self.info.version} on "
                f"{self.info.platform}, board file {self.board_name or 'none'}"
                + (f", tags {','.join(tags)}" if tags else "")
                + (f", capabilities {','.join(caps) or 'none'}" if self._caps else ""))

    # -- requirements -------------------------------------------------------------------------
    def capabilities(self) -> tuple[list[str], list[str]]:
        """(tags, capabilities) of the board, asked once."""
        from . import transport

        if self._caps is None:
            t = self.board()
            try:
                out = transport.run(t, CAPS_CODE, timeout=30)
                tags, caps = ast.literal_eval(out.decode(errors="replace").strip())
            except transport.TransportExecError as exc:
                raise DeviceTestFailure("cannot ask the board for its capabilities: "
                                        f"{_last_line(exc.error_output)}") from None
            except (transport.BoardError, ValueError, SyntaxError) as exc:
                raise DeviceTestFailure(f"cannot ask the board for its capabilities: {exc}") \
                    from None
            # family and chip are often the same word (unix/unix): once is enough
            self._caps = (list(dict.fromkeys(tags)), list(dict.fromkeys(caps)))
            self._record("microcot.capabilities", ",".join(caps))
            self._record("microcot.tags", ",".join(tags))
        return self._caps

    def unmet(self, families: tuple[str, ...], needs: tuple[str, ...]) -> str | None:
        """Why the board cannot run a test with these requirements, or None when it can."""
        if not families and not needs:
            return None
        tags, caps = self.capabilities()
        if families and not set(families) & set(tags):
            return (f"board is {'/'.join(tags) or 'of no known family'}, "
                    f"test needs {' or '.join(families)}")
        missing = [n for n in needs if n not in caps]
        if missing:
            return f"board lacks {', '.join(missing)} (has {', '.join(caps) or 'none'})"
        return None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if isinstance(item, DeviceItem):
            return  # checked once per module in DeviceModule.setup
        families, needs = _marker_requirements(item)
        if families or needs:
            try:
                reason = self.unmet(families, needs)
            except DeviceTestFailure as exc:
                pytest.fail(str(exc), pytrace=False)
            if reason:
                pytest.skip(reason)

    def _record(self, name: str, value: str) -> None:
        """A property of the whole run in the JUnit XML (which board it ran on)."""
        try:
            from _pytest.junitxml import xml_key
        except ImportError:  # pytest moved it; the report loses a property, nothing else
            return
        xml = self.config.stash.get(xml_key, None)
        if xml is not None:
            xml.add_global_property(name, value)

    # -- the board ----------------------------------------------------------------------------
    def board(self):
        if self._skipped:
            pytest.skip(self._skipped)
        if self._failed:
            raise DeviceTestFailure(f"board unavailable: {self._failed}")
        if self.t is None:
            from .fidelity import FidelityMissing, required

            try:
                self._open()
            except FidelityMissing as exc:
                if required():
                    self._failed = f"MICROCOT_REQUIRE_FIDELITY is set and {exc}"
                    raise DeviceTestFailure(f"board unavailable: {self._failed}") from None
                self._skipped = f"board model unavailable: {exc}"
                pytest.skip(self._skipped)
            except Exception as exc:
                self._failed = f"{type(exc).__name__}: {exc}"
                raise DeviceTestFailure(f"board unavailable: {self._failed}") from None
        return self.t

    def _open(self) -> None:
        from . import boards, deploy, transport

        opt = self.config.option
        board_name = opt.microcot_board
        if self.spec == "virtual":
            from .vboard.models import make_board

            self._tmp = tempfile.TemporaryDirectory(prefix="microcot-hil-")
            board_name = board_name or "virtual"
            # the board file's model at the RAM it budgets, so CI holds the firmware to it
            self._vb = make_board(
                board_name, name=f"pytest-{os.getpid()}",
                runtime=opt.microcot_runtime,
                heap=opt.microcot_heap,
                flash_dir=Path(self._tmp.name) / "flash",
                iccid="89490200001234567892",
            ).start()
            self.port = self._vb.port
            self._record("microcot.runtime", opt.microcot_runtime
                         or boards.load(board_name).runtime)
        else:
            self.port = self.spec
        self.t = transport.open_board(self.port)
        self.info = transport.board_info(self.t)
        self.board_name = board_name
        for key, value in (("port", self.port), ("micropython", self.info.version),
                           ("platform", self.info.platform), ("machine", self.info.machine),
                           ("board", board_name or "")):
            self._record(f"microcot.{key}", value)
        if not opt.microcot_no_deploy:
            bdef = boards.load(board_name) if board_name else None
            deploy.deploy_transport(self.t, bdef)

    def upload(self, path: Path) -> str:
        """Copy a test or helper module to /tests on the board (compiled when possible)."""
        from . import deploy

        t = self.board()
        src = path.read_bytes()
        if self.info is not None and self.info.mpy_version is not None and \
                deploy.mpy_cross_version() == (self.info.mpy_version, self.info.mpy_sub):
            with tempfile.TemporaryDirectory() as tmp:
                data = deploy.compile_module(path, path.name, self.info.arch, Path(tmp))
            spec = deploy.FileSpec(f"{BOARD_TESTS}/{path.stem}.mpy", data)
            other = f"{BOARD_TESTS}/{path.name}"
        else:
            spec = deploy.FileSpec(f"{BOARD_TESTS}/{path.name}", src)
            other = f"{BOARD_TESTS}/{path.stem}.mpy"
        if self.uploaded.get(spec.dest) != spec.sha256:
            if deploy.remote_hashes(t, [spec.dest])[spec.dest] != spec.sha256:
                deploy.write_file(t, spec)
            # a stale twin (x.py beside x.mpy) would be imported instead
            from . import transport

            transport.run(t, f"import os\ntry:\n os.remove({other!r})\nexcept OSError:\n pass")
            self.uploaded[spec.dest] = spec.sha256
        return spec.dest

    def prepare_module(self, path: Path) -> None:
        """Fresh interpreter, this module and the helpers on the board, fresh interpreter again.

        Resetting first gives the upload an unfragmented heap; resetting after an upload gives
        the tests the whole heap, as a board that boots into them would have.
        """
        from . import transport

        t = self.board()
        transport.soft_reset(t)
        helpers = [h for h in sorted(self.device_dir.glob("*.py"))
                   if not h.name.startswith(("test_", "conftest"))]
        before = dict(self.uploaded)
        try:
            for module in [*helpers, path]:
                self.upload(module)
        except transport.ExecError as exc:
            raise DeviceTestFailure(f"copying {path.name} to the board failed: "
                                    f"{_last_line(exc.error_output)}",
                                    traceback=exc.error_output) from None
        if self.uploaded != before:
            transport.soft_reset(t)

    def pytest_sessionfinish(self) -> None:
        from . import transport

        if self.t is not None:
            transport.close(self.t)
            self.t = None
        if self._vb is not None:
            self._vb.stop()
            self._vb = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _session(config: pytest.Config) -> BoardSession:
    return config.pluginmanager.get_plugin("microcot-board-session")


class DeviceModule(pytest.File):
    """A tests/device module whose test functions run on the board."""

    families: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()

    def collect(self):
        tree = ast.parse(self.path.read_text(), filename=str(self.path))
        timeout = None
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                    isinstance(tg, ast.Name) and tg.id == "BOARD_TIMEOUT" for tg in node.targets):
                timeout = ast.literal_eval(node.value)
        self.families = _module_names(self.path, tree, FAMILY_GLOBAL)
        self.needs = _module_names(self.path, tree, REQUIRES_GLOBAL)
        unknown = [n for n in self.needs if n not in CAPABILITIES]
        if unknown:
            raise self.CollectError(
                f"{self.path.name}: {REQUIRES_GLOBAL} names unknown capabilities "
                f"{', '.join(unknown)} (known: {', '.join(CAPABILITIES)})")
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                item = DeviceItem.from_parent(self, name=node.name, lineno=node.lineno,
                                              timeout=timeout)
                if self.families:
                    item.add_marker(pytest.mark.family(*self.families))
                if self.needs:
                    item.add_marker(pytest.mark.needs(*self.needs))
                yield item

    def setup(self) -> None:
        # pytest shows setup errors with its own traceback; a board's failure reads better plain
        session = _session(self.config)
        try:
            # before the upload: a board that does not qualify is not worth the copy
            reason = session.unmet(self.families, self.needs)
            if reason is None:
                session.prepare_module(self.path)
                return
        except DeviceTestFailure as exc:
            failure = exc
        else:
            pytest.skip(f"{self.path.name}: {reason}")
        pytest.fail(_describe(f"{self.path.name}: cannot run on the board", failure), pytrace=False)


class DeviceItem(pytest.Item):
    def __init__(self, *, lineno: int, timeout: float | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lineno = lineno
        self.timeout = timeout

    def runtest(self) -> None:
        from . import transport

        session = _session(self.config)
        t = session.board()
        limit = self.timeout or self.config.getoption("--board-timeout")
        module = self.path.stem
        code = (f"import sys\nif {BOARD_TESTS!r} not in sys.path:\n sys.path.append({BOARD_TESTS!r})\n"
                f"import {module} as _t\n_t.{self.name}()\n")
        try:
            out = transport.run(t, code, timeout=limit)
        except transport.ExecTimeout as exc:
            raise DeviceTestFailure(f"timed out on the board: {exc}") from None
        except transport.ExecError as exc:
            output = exc.output.decode(errors="replace")
            tb = exc.error_output
            if SKIP_MARK in tb:
                pytest.skip(tb.split(SKIP_MARK, 1)[1].strip().splitlines()[0])
            raise DeviceTestFailure(_last_line(tb), output, tb) from None
        except transport.BoardError as exc:
            raise DeviceTestFailure(f"board error: {exc}") from None
        text = out.decode(errors="replace")
        if text:
            self.add_report_section("call", "board output", text)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, DeviceTestFailure):
            return _describe(f"{self.name} failed on the board", excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, self.lineno - 1, f"{self.name} [on board]"


def _module_names(path: Path, tree: ast.Module, name: str) -> tuple[str, ...]:
    """A module global like BOARD_REQUIRES = ("modem",) as a tuple of names ("x" alone is one)."""
    value: object = ()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(tg, ast.Name) and tg.id == name for tg in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                raise pytest.Collector.CollectError(
                    f"{path.name}:{node.lineno}: {name} must be a literal tuple of strings"
                ) from None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, tuple | list) or not all(isinstance(v, str) for v in value):
        raise pytest.Collector.CollectError(
            f"{path.name}: {name} must be a tuple of strings, got {value!r}")
    return tuple(value)


def _marker_requirements(item: pytest.Item) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(families, needs) from an item's family/needs markers (several markers add up)."""
    families = tuple(a for m in item.iter_markers("family") for a in m.args)
    needs = tuple(a for m in item.iter_markers("needs") for a in m.args)
    unknown = [n for n in needs if n not in CAPABILITIES]
    if unknown:
        pytest.fail(f"@pytest.mark.needs: unknown capabilities {', '.join(unknown)} "
                    f"(known: {', '.join(CAPABILITIES)})", pytrace=False)
    return families, needs


def _describe(title: str, f: DeviceTestFailure) -> str:
    parts = [f"{title}: {f.summary}"]
    if f.traceback:
        parts += ["", "board traceback:", f.traceback.rstrip()]
    if f.output:
        parts += ["", "board output:", f.output.rstrip()]
    return "\n".join(parts)


def _last_line(tb: str) -> str:
    lines = [ln for ln in tb.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "error"
