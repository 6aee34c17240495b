"""What the host's server and board processes share: a free port, their log read from an offset,
a child that dies with the thread that started it, and a stop that escalates to SIGKILL."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import sys
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_prctl = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        # loaded here, not between fork and exec, where loading a library is not safe
        _prctl = ctypes.CDLL(None, use_errno=True).prctl


def free_port(host: str) -> int:
    """A TCP port free on `host` now (the caller binds it soon after, or retries)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def log_since(path: Path, offset: int) -> str:
    """What `path` holds from byte `offset` on ("" if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def die_with_parent(parent: int, sig: int) -> None:
    """Between fork and exec: the child gets `sig` when the thread that forked it ends (Linux;
    elsewhere nothing). Call it after any change of user: that clears the parent-death signal."""
    if _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def stop(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Send `sig`, wait `timeout` seconds for the process to end, then kill it."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
