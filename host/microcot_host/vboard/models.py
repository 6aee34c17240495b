"""One way to make the board a board file describes, for every tool that starts one.

`pytest --port virtual`, `microcot test --virtual N`, `microcot board virtual --board NAME` and
the tests all call `make_board`, so the same board file gives the same runtime and the same heap
everywhere (they once differed, and two device tests failed in one and passed in the other).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .. import boards, fidelity
from ..files import private_dir
from .board import VirtualBoard, find_micropython, parse_heap
from .heapcal import heapsize_for_free
from .serve import Served


def micropython_for(runtime: str) -> str:
    """The interpreter binary of a unix-port runtime (raises FidelityMissing for i386 builds)."""
    fidelity.check_runtime(runtime)
    if runtime == "unix64":
        return find_micropython()
    if runtime == "rp2040":
        raise ValueError("runtime 'rp2040' is a firmware, not a unix port binary")
    return str(fidelity.i386_binary(runtime))


def resolve(board: str | boards.Board | None, runtime: str | None = None
            ) -> tuple[boards.Board, str]:
    bdef = board if isinstance(board, boards.Board) else boards.load(board or "virtual")
    return bdef, fidelity.check_runtime(runtime or bdef.runtime)


def heap_for(board: boards.Board, runtime: str, heap: str | int | None = None) -> int | None:
    """`-X heapsize` for a unix-port board: `heap` if given (the interpreter's whole heap), else
    the size at which the REPL leaves the board file's budget free after boot."""
    if heap is not None and heap != "":
        return parse_heap(heap)
    if board.heap_budget is None:
        return None
    return heapsize_for_free(micropython_for(runtime), int(board.heap_budget))


def make_board(board: str | boards.Board | None = None, *, name: str,
               flash_dir: str | os.PathLike | None = None, runtime: str | None = None,
               heap: str | int | None = None, iccid: str | None = None,
               mac: str | bytes | None = None, link: str | os.PathLike | None = None,
               imsi: str | None = None, hosts: Mapping[str, str] | None = None) -> Served:
    """The (not yet started) board model for a board file: a unix-port VirtualBoard at the board's
    heap budget, or the real rp2 firmware in an emulated RP2040 when the runtime is `rp2040`."""
    bdef, rt = resolve(board, runtime)
    if rt == "rp2040":
        if hosts:
            raise ValueError("the emulated RP2040 has no network: hosts does not apply")
        if heap is not None:
            raise ValueError("the emulated RP2040 has the real chip's RAM: --heap does not apply")
        from ..rp2emu import EmulatedRP2040

        flash = Path(flash_dir) / "rp2-flash.bin" if flash_dir is not None else None
        if flash is not None:
            private_dir(flash.parent)  # the image holds the board's passwords
        firmware = fidelity.rp2_firmware(str(bdef.raw.get("firmware", "RPI_PICO_W")))
        return EmulatedRP2040(name=name, firmware=firmware, flash=flash, iccid=iccid, link=link)
    mp = micropython_for(rt)
    return VirtualBoard(name, heap=heap_for(bdef, rt, heap), iccid=iccid, imsi=imsi, mac=mac,
                        flash_dir=flash_dir, link=link, micropython=mp, hosts=hosts)
