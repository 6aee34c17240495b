"""Tests that need a faithful board model: skipped with the reason when its build is missing,
failed instead when MICROCOT_REQUIRE_FIDELITY=1 (CI), so CI always runs them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest

from microcot_host import fidelity

T = TypeVar("T")


def unavailable(reason: str) -> None:
    """Skip (or, when CI requires the faithful boards, fail) naming what is missing and how to get
    it."""
    if fidelity.required():
        pytest.fail(f"MICROCOT_REQUIRE_FIDELITY is set: {reason}", pytrace=False)
    pytest.skip(reason)


def need(get: Callable[[], T]) -> T:
    """`get()`, e.g. `lambda: fidelity.i386_binary("i386-rp2")`; FidelityMissing -> unavailable."""
    try:
        return get()
    except fidelity.FidelityMissing as exc:
        unavailable(str(exc))
        raise  # unreachable: unavailable() raises


def need_runtime(runtime: str) -> None:
    reason = fidelity.missing(runtime)
    if reason is not None:
        unavailable(reason)
