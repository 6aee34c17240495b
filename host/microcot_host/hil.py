"""`microcot test`: the device tests on many boards at once, one pytest process per board.

Each board gets `python -m pytest --port PORT --junitxml=OUT/<board>.xml tests/device ...` (the
HIL plugin deploys first and runs every test on the board). The processes run in parallel because
a board is slow and they share nothing but the host; pytest's own cache is turned off so they do
not race on it. What a process prints passes through a redaction filter before it reaches the
board's log file (and the JUnit XML is redacted after the run): test output is the place where a
password printed by a debugging line would otherwise end up in CI artefacts.

Virtual boards (`--virtual N`, `--port virtual:N`) are started here, each with its own ICCID and
flash, so the run also proves that boards do not share state.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from . import cliopts, ports

MASK = "***"

# -- redaction ---------------------------------------------------------------------------------
# Names whose values are secrets, in key=value, key: value, "key": "value" and key='value' forms
# (Python reprs of dicts and kwargs are what board output and pytest diffs show).
_SECRET_KEY = r"[\w.-]*(?:passw(?:or)?d|passwd|pwd|secret|token|api[_-]?key|credentials?|" \
              r"private[_-]?key|xtea[_-]?key)[\w.-]*"
_KV = re.compile(
    r"(?P<key>(?P<q>[\"']?)" + _SECRET_KEY + r"(?P=q))(?P<sep>[ \t]*(?:=|:(?!:))[ \t]*)"
    r"(?P<val>b?\"(?:[^\"\\]|\\.)*\"|b?'(?:[^'\\]|\\.)*'|[^\s,;&)}\]]+)",
    re.IGNORECASE)
_AUTH = re.compile(r"(?P<key>(?:proxy-)?authorization[\"']?[ \t]*[:=][ \t]*[\"']?)"
                   r"(?P<scheme>(?:basic|bearer|digest|token)\s+)?(?P<val>[^\s\"',;]+)",
                   re.IGNORECASE)
_BEARER = re.compile(r"\b(?P<scheme>Bearer|Basic)\s+(?P<val>[A-Za-z0-9._~+/=-]{8,})")
_URL_CRED = re.compile(r"(?P<pre>\b[a-z][a-z0-9+.-]*://[^\s:/@]+:)(?P<val>[^\s@/]+)(?=@)",
                       re.IGNORECASE)
# the bootstrap secret: 16 letters A-Z drawn at random (DESIGN.md "Bootstrap")
_BOOT_SECRET = re.compile(r"(?<![A-Za-z0-9_])[A-Z]{16}(?![A-Za-z0-9_])")
# a mass-registration CSV row ID;CREDENTIALS;TYPE;... (seed format): the second field
_CSV_ROW = re.compile(r"(?P<pre>(?:^|\s)[^;\s]+;)(?P<val>[^;\r\n]+)(?P<post>;mqtt;)",
                      re.IGNORECASE)
_PEM_BEGIN = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
_PEM_END = re.compile(r"-----END [A-Z ]*PRIVATE KEY-----")


def _mask_kv(m: re.Match) -> str:
    val = m.group("val")
    prefix = "b" if val[:1] == "b" and val[1:2] in "\"'" else ""
    quote = val[len(prefix)] if val[len(prefix):len(prefix) + 1] in "\"'" else ""
    return f"{m.group('key')}{m.group('sep')}{prefix}{quote}{MASK}{quote}"


def redact(text: str) -> str:
    """The line(s) with every secret this module knows how to spot replaced by ***."""
    text = _AUTH.sub(lambda m: f"{m.group('key')}{m.group('scheme') or ''}{MASK}", text)
    text = _BEARER.sub(lambda m: f"{m.group('scheme')} {MASK}", text)
    text = _KV.sub(_mask_kv, text)
    text = _URL_CRED.sub(lambda m: f"{m.group('pre')}{MASK}", text)
    text = _CSV_ROW.sub(lambda m: f"{m.group('pre')}{MASK}{m.group('post')}", text)
    return _BOOT_SECRET.sub(MASK, text)


class Redactor:
    """Line-wise redaction of a stream, with private-key blocks dropped as a whole."""

    def __init__(self) -> None:
        self._in_key = False

    def line(self, text: str) -> str:
        if self._in_key:
            if _PEM_END.search(text):
                self._in_key = False
                return text[_PEM_END.search(text).start():]
            return ""
        begin = _PEM_BEGIN.search(text)
        if begin and not _PEM_END.search(text, begin.end()):
            self._in_key = True
            return redact(text[:begin.end()]) + f" {MASK}\n"
        if begin:
            end = _PEM_END.search(text, begin.end())
            text = text[:begin.end()] + MASK + text[end.start():]
        return redact(text)


def redact_junit(path: Path) -> None:
    """Redact the text and attributes of a JUnit XML file in place."""
    tree = ET.parse(path)
    for el in tree.iter():
        red = Redactor()
        if el.text:
            el.text = "".join(red.line(ln) for ln in el.text.splitlines(keepends=True))
        if el.tail:
            el.tail = redact(el.tail)
        for k, v in el.attrib.items():
            el.attrib[k] = redact(v)
    tree.write(path, encoding="utf-8", xml_declaration=True)


# -- one board ---------------------------------------------------------------------------------

@dataclass
class Target:
    label: str
    port: str
    board: str | None = None
    virtual: bool = False
    problem: str = ""  # set when the board cannot be tested (not MicroPython, busy)


@dataclass
class Result:
    label: str
    port: str
    board: str | None
    status: str = "error"  # passed | failed | no tests | error | unavailable | interrupted
    returncode: int | None = None
    tests: int = 0
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    junit: str = ""
    log: str = ""
    failures: list[str] = field(default_factory=list)
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "board"


def read_junit(path: Path, res: Result) -> None:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    for s in suites:
        res.tests += int(s.get("tests", 0))
        res.failed += int(s.get("failures", 0))
        res.errors += int(s.get("errors", 0))
        res.skipped += int(s.get("skipped", 0))
        for case in s.iter("testcase"):
            bad = case.find("failure")
            bad = bad if bad is not None else case.find("error")
            if bad is not None:
                res.failures.append(f"{case.get('classname', '')}::{case.get('name', '')}")
                if not res.reason:
                    # the first failure's cause: often all of them (a board that cannot deploy)
                    first = (bad.get("message") or bad.text or "").strip().splitlines()
                    res.reason = first[0][:160] if first else ""
    res.passed = res.tests - res.failed - res.errors - res.skipped


class Runner:
    """Runs the pytest processes and keeps them, so an interrupt can stop them all."""

    def __init__(self, out: Path, device_dir: Path, pytest_args: list[str], live: bool) -> None:
        self.out = out
        self.device_dir = device_dir
        self.pytest_args = pytest_args
        self.live = live
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = False

    def command(self, t: Target, junit: Path) -> list[str]:
        cmd = [sys.executable, "-m", "pytest", "--port", t.port, f"--junitxml={junit}",
               "-o", f"junit_suite_name={t.label}", "-o", f"microcot_device_dir={self.device_dir}",
               "-p", "no:cacheprovider",
               # the log is for reading later: every test's name and the board's output of
               # passing tests too (the user's own -q/-r after these still win)
               "-v", "-rA"]
        if t.board:
            cmd += ["--board", t.board]
        cmd += self.pytest_args
        if not _names_tests(self.pytest_args):
            cmd.append(str(self.device_dir))
        return cmd

    def run(self, t: Target) -> Result:
        junit = self.out / f"{t.label}.xml"
        log = self.out / f"{t.label}.log"
        res = Result(t.label, t.port, t.board, junit=str(junit), log=str(log))
        for stale in (junit, log):
            stale.unlink(missing_ok=True)
        if t.problem:
            res.status, res.reason = "unavailable", t.problem
            log.write_text(redact(f"{t.port}: {t.problem}\n"))
            res.junit = ""
            return res
        cmd = self.command(t, junit)
        start = time.monotonic()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "w", encoding="utf-8") as f:
            f.write(redact("$ " + " ".join(cmd)) + "\n")
            with self.lock:
                if self.stopping:
                    res.status = "interrupted"
                    return res
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env)
                self.procs[t.label] = proc
            red = Redactor()
            assert proc.stdout is not None
            tail: list[str] = []
            for raw in proc.stdout:
                line = red.line(raw.decode("utf-8", errors="replace"))
                f.write(line)
                f.flush()
                if line.strip():
                    tail = (tail + [line.rstrip()])[-5:]
                if self.live and line:
                    click.echo(f"[{t.label}] {line}", nl=not line.endswith("\n"))
            res.returncode = proc.wait()
        res.seconds = round(time.monotonic() - start, 2)
        with self.lock:
            self.procs.pop(t.label, None)
        if junit.exists():
            try:
                redact_junit(junit)
                read_junit(junit, res)
            except (ET.ParseError, ValueError) as exc:
                res.reason = f"unreadable JUnit XML: {exc}"
        else:
            res.junit = ""
        rc = res.returncode
        if self.stopping and rc != 0:
            res.status = "interrupted"
        elif rc == 0:
            res.status = "passed"
        elif rc == 1:
            res.status = "failed"
        elif rc == 5:
            res.status, res.reason = "no tests", res.reason or "pytest collected no tests"
        else:
            res.status = "error"
            res.reason = res.reason or (tail[-1] if tail else f"pytest exited with {rc}")
        return res

    def stop(self) -> None:
        """Ctrl-C every pytest (they close their boards), then kill what does not exit."""
        with self.lock:
            self.stopping = True
            procs = list(self.procs.values())
        for p in procs:
            with contextlib.suppress(OSError):
                p.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()


def _names_tests(args: list[str]) -> bool:
    """True when the pytest arguments already name test files or directories."""
    skip_next = False
    for a in args:
        if skip_next:
            skip_next = False
            continue
        if a in ("-k", "-m", "-p", "-o", "-c", "--rootdir", "--deselect", "--ignore"):
            skip_next = True
            continue
        if a.startswith("-"):
            continue
        if os.path.exists(a.split("::", 1)[0]):
            return True
    return False


# -- boards ------------------------------------------------------------------------------------

def _iccid(i: int) -> str:
    """A Luhn-valid test ICCID per virtual board, so every board has its own device ID."""
    from microcot.identity import luhn_check_digit

    payload = f"8949020000{i:09d}"
    return payload + luhn_check_digit(payload)


def split_virtual(specs: Iterable[str]) -> tuple[int, list[str]]:
    """(virtual boards to start, other port specs): 'virtual' is one, 'virtual:N' is N."""
    n = 0
    rest = []
    for item in ports.split_specs(specs):
        if item == "virtual":
            n += 1
        elif re.fullmatch(r"virtual:\d+", item):
            n += int(item.split(":")[1])
        else:
            rest.append(item)
    return n, rest


def real_targets(port_list: list[str], board: str | None, timeout: float) -> list[Target]:
    """Probe each port (in parallel): its board file, or why it cannot be tested."""
    from . import boards_cli

    def one(port: str) -> Target:
        rep = boards_cli.probe(port, timeout=timeout)
        name = board or rep.board
        if rep.status != "micropython":
            problem = f"{rep.status}: {rep.reason}"
        elif rep.reason.startswith("probe failed"):
            problem = rep.reason
        else:
            problem = ""
        return Target("", port, name, problem=problem)

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(port_list)))) \
            as pool:
        found = list(pool.map(one, port_list))
    for t in found:
        # /dev/ttyACM0 -> esp32-s3-ttyACM0, /dev/pts/3 -> virtual-pts-3
        t.label = _safe(f"{t.board or 'board'}-{t.port.removeprefix('/dev/')}")
    return found


def unique_labels(targets: list[Target]) -> None:
    """Labels name the report files: two boards must never share one."""
    used: set[str] = set()
    for t in targets:
        label, k = t.label, 2
        while label in used:
            label, k = f"{t.label}-{k}", k + 1
        used.add(label)
        t.label = label


def _device_dir(given: Path | None) -> Path:
    if given is not None:
        path = given
    elif Path("tests/device").is_dir():
        path = Path("tests/device")
    else:
        from .paths import device_tests_dir

        path = device_tests_dir()
    if not path.is_dir():
        raise click.ClickException(f"no device tests at {path} (use --device-dir)")
    return path.resolve()


def _summary(results: list[Result]):
    from rich.table import Table

    table = Table(title="microcot test")
    for col in ("Board", "Board file", "Port", "Passed", "Failed", "Skipped", "Time", "Result"):
        table.add_column(col, overflow="fold",
                         justify="right" if col in ("Passed", "Failed", "Skipped", "Time")
                         else "left")
    for r in results:
        colour = {"passed": "green", "failed": "red"}.get(r.status, "yellow")
        table.add_row(r.label, r.board or "-", r.port, str(r.passed), str(r.failed + r.errors),
                      str(r.skipped), f"{r.seconds:.1f} s",
                      f"[{colour}]{r.status}[/]" + (f": {r.reason}" if r.reason else ""))
    return table


@click.command("test", context_settings={**cliopts.HELP, "ignore_unknown_options": True})
@ports.port_option()
@click.option("--virtual", "n_virtual", type=click.IntRange(0, 64), default=0,
              help="also start N virtual boards for this run (like --port virtual:N)")
@click.option("--board", "board_name", default=None, metavar="NAME",
              help="board file for every port (default: matched per board, like microcot boards)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("build/hil"), show_default=True,
              help="directory of the JUnit XML reports, logs and summary.json")
@click.option("--device-dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              default=None, help="device tests (default: tests/device)")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=None,
              help="boards tested at once (default: all of them)")
@click.option("--heap", default=None, metavar="SIZE",
              help="the whole heap of the virtual boards started here, e.g. 100k (default: the "
                   "size leaving the board file's heap_budget free, as pytest --port virtual)")
@click.option("--runtime", default=None, metavar="RUNTIME",
              help="model of the virtual boards started here: unix64, i386-esp32, i386-rp2 or "
                   "rp2040 (the real rp2 firmware, emulated); default: the board file's")
@cliopts.timeout_option(help="how long to wait for each real board's raw REPL before the run",
                        old=("--probe-timeout",), dest="probe_timeout")
@click.option("--live", is_flag=True, help="also print every board's output (redacted), "
                                           "each line prefixed with the board")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.argument("pytest_args", nargs=-1, type=click.UNPROCESSED)
def test_command(port_specs: tuple[str, ...], n_virtual: int, board_name: str | None, out: Path,
                 device_dir: Path | None, jobs: int | None, heap: str | None,
                 runtime: str | None, probe_timeout: float, live: bool, as_json: bool,
                 pytest_args: tuple[str, ...]) -> None:
    """Run the device tests on every given board in parallel (real or virtual).

    Boards come from --port (repeatable; a path, auto, a glob, virtual:N) or $MICROCOT_PORT.
    Arguments after -- go to pytest, e.g. `-- -k xtea -x`. Writes OUT/<board>.xml (JUnit),
    OUT/<board>.log (output with secrets masked) and OUT/summary.json; exits non-zero when any
    board failed.
    """
    specs = port_specs or ((os.environ.get(ports.ENV, ""),) if not n_virtual else ())
    more_virtual, rest = split_virtual(specs)
    n_virtual += more_virtual
    try:
        port_list = ports.resolve(rest, env={}, allow_empty=True) if rest else []
    except ports.PortError as exc:
        raise click.ClickException(str(exc)) from None
    if not port_list and not n_virtual:
        raise click.ClickException(f"no boards: use --port PATH|auto|GLOB, --virtual N or set "
                                   f"{ports.ENV}")
    ddir = _device_dir(device_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = real_targets(port_list, board_name, probe_timeout) if port_list else []
    vboards = []
    tmp = tempfile.TemporaryDirectory(prefix="microcot-test-")
    runner = Runner(out.resolve(), ddir, list(pytest_args), live)
    try:
        if n_virtual:
            vboards = _start_virtual(n_virtual, heap, Path(tmp.name), board_name, runtime)
            targets += [Target(vb.name, vb.port, board_name or "virtual", virtual=True)
                        for vb in vboards]
        unique_labels(targets)
        if not as_json:
            click.echo(f"testing {len(targets)} board(s): "
                       + ", ".join(f"{t.label} ({t.port})" for t in targets), err=True)
        with ThreadPoolExecutor(max_workers=jobs or len(targets)) as pool:
            futures = [pool.submit(runner.run, t) for t in targets]
            try:
                results = [f.result() for f in futures]
            except KeyboardInterrupt:
                runner.stop()
                results = [f.result() for f in futures]
    finally:
        for vb in vboards:
            vb.stop()
        tmp.cleanup()
    summary = {"boards": [r.as_dict() for r in results],
               "ok": all(r.status == "passed" for r in results)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(results, out)
    if not summary["ok"]:
        sys.exit(1)


def _start_virtual(n: int, heap: str | None, flash_root: Path, board: str | None,
                   runtime: str | None = None) -> list:
    from . import boards
    from .fidelity import FidelityMissing
    from .vboard import BoardStartError
    from .vboard.models import make_board

    started = []
    try:
        for i in range(1, n + 1):
            name = f"virtual-{i}"
            # like `pytest --port virtual`: the board file's model and the RAM it budgets
            vb = make_board(board or "virtual", name=name, heap=heap, iccid=_iccid(i),
                            flash_dir=flash_root / name, runtime=runtime)
            started.append(vb.start())
    except (BoardStartError, FidelityMissing, boards.BoardError, ValueError, OSError) as exc:
        for vb in started:
            vb.stop()
        raise click.ClickException(f"cannot start virtual boards: {exc}") from None
    return started


def _print_summary(results: list[Result], out: Path) -> None:
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 140, highlight=False)
    console.print(_summary(results))
    for r in results:
        if r.status == "passed":
            continue
        console.print(f"[bold]{r.label}[/] ({r.port}) {r.status}: log {r.log}")
        for name in r.failures[:10]:
            console.print(f"  failed: {name}")
        if len(r.failures) > 10:
            console.print(f"  ... and {len(r.failures) - 10} more")
    console.print(f"reports in {out}/ (<board>.xml, <board>.log, summary.json)")
