"""pytest plugin: run tests/device ON a board (`pytest --board PORT|virtual tests/device`).

Without --board the device test modules are ordinary pytest modules and run under CPython
in-process; with --board each `test_*` function of each module runs on the board as its own pytest
item: the firmware is deployed first (hash-skip), the module and its helper modules are copied to
/tests on the board (compiled to .mpy where the board allows, to spare its heap), the board is soft
reset before each module, and each test runs under an overall timeout with the board's traceback
and output in the report.
"""

from __future__ import annotations

import ast
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

BOARD_TESTS = "/tests"
DEFAULT_TIMEOUT = 60.0
SKIP_MARK = "SkipTest: "


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("microcot", "microcot hardware-in-the-loop")
    group.addoption("--board", metavar="PORT|virtual", default=None,
                    help="run device tests on the board at PORT, or on a fresh virtual board")
    group.addoption("--board-heap", metavar="SIZE", default=None,
                    help="heap of the virtual board (e.g. 100k); default: the board file's "
                         "heap_budget")
    group.addoption("--board-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                    help="time limit of one device test on the board (default %(default)s)")
    group.addoption("--board-no-deploy", action="store_true",
                    help="do not deploy the firmware before the tests")
    group.addoption("--board-name", default=None, metavar="NAME",
                    help="board definition from boards/ (default: guessed from the board)")
    parser.addini("microcot_device_dir", "folder of the device test modules",
                  default="tests/device")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--board"):
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
        self.spec: str = config.getoption("--board")
        self.device_dir = (config.rootpath / config.getini("microcot_device_dir")).resolve()
        self._vb: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.t: Any = None
        self.info: Any = None
        self.port: str | None = None
        self.uploaded: dict[str, str] = {}
        self._failed: str | None = None

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
        return f"microcot board: {self.spec} (device tests run on the board)"

    # -- the board ----------------------------------------------------------------------------
    def board(self):
        if self._failed:
            raise DeviceTestFailure(f"board unavailable: {self._failed}")
        if self.t is None:
            try:
                self._open()
            except Exception as exc:
                self._failed = f"{type(exc).__name__}: {exc}"
                raise DeviceTestFailure(f"board unavailable: {self._failed}") from None
        return self.t

    def _open(self) -> None:
        from . import boards, deploy, transport

        board_name = self.config.getoption("--board-name")
        if self.spec == "virtual":
            from .vboard import VirtualBoard

            self._tmp = tempfile.TemporaryDirectory(prefix="microcot-hil-")
            # a virtual board gets the RAM its board file budgets, so CI holds the firmware to it
            heap = self.config.getoption("--board-heap") or \
                boards.load(board_name or "virtual").heap_budget
            self._vb = VirtualBoard(
                name=f"pytest-{os.getpid()}",
                heap=heap,
                flash_dir=Path(self._tmp.name) / "flash",
                iccid="89490200001234567892",
            ).start()
            self.port = self._vb.port
            board_name = board_name or "virtual"
        else:
            self.port = self.spec
        self.t = transport.open_board(self.port)
        self.info = transport.board_info(self.t)
        if not self.config.getoption("--board-no-deploy"):
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

    def collect(self):
        tree = ast.parse(self.path.read_text(), filename=str(self.path))
        timeout = None
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                    isinstance(tg, ast.Name) and tg.id == "BOARD_TIMEOUT" for tg in node.targets):
                timeout = ast.literal_eval(node.value)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                yield DeviceItem.from_parent(self, name=node.name, lineno=node.lineno,
                                             timeout=timeout)

    def setup(self) -> None:
        # pytest shows setup errors with its own traceback; a board's failure reads better plain
        try:
            _session(self.config).prepare_module(self.path)
            return
        except DeviceTestFailure as exc:
            failure = exc
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
