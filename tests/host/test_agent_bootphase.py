"""An operation's boot of its own (ident.own_boot, before the MQTT code loads), on CPython: the
module's boot() runs with the stored record, the board restarts after it either way, and a boot
that ran out of memory is tried again in a fresh boot at most ident._BOOT_TRIES times, then
reported as it failed. (On CPython the agent's restart is a SystemExit.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from microcot import agent as agent_mod
from microcot import ident, store, tpl

DEVICE = "TESTDEV1"


class OutOfMemory(agent_mod._Mod):
    """c8y_Firmware's module, as if its download always ran out of memory."""

    calls = 0

    def boot(self, rec):
        OutOfMemory.calls += 1
        rec["stage"] = "failed"
        rec["data"]["why"] = "MemoryError: memory allocation failed, allocating 865 bytes"
        self.s.db().save("op", rec)  # as opfw.boot does


def boot_once(tmp_path: Path) -> dict:
    a = agent_mod.Agent({"store": str(tmp_path / "store"), "log": False, "reserve": 0,
                         "templates": str(tmp_path / "t.csv"), "xid": "x1"})
    h = OutOfMemory(a.s, "opfw")
    a.operation(tpl.R_FIRMWARE, "c8y_Firmware", h, h.resume)
    with pytest.raises(SystemExit, match="its boot is over"):
        a.start(DEVICE)
    store.root(str(tmp_path / "store"))
    return store.load("op")


def test_a_boot_that_ran_out_of_memory_is_tried_again_then_reported(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("15,x1\n")
    store.root(str(tmp_path / "store"))
    (tmp_path / "store").mkdir()
    store.save("dev", {"id": DEVICE, "src": "configured"})
    store.save("cred", {"id": DEVICE, "password": "pw-0123456789", "source": "provisioned"})
    store.save("op", {"id": "7", "kind": "c8y_Firmware", "rtid": tpl.R_FIRMWARE,
                      "stage": "boot", "started": 0, "child": None,
                      "data": {"url": "https://x/fw.bin"}})
    OutOfMemory.calls = 0
    assert ident._BOOT_TRIES >= 1
    for n in range(1, ident._BOOT_TRIES + 1):
        rec = boot_once(tmp_path)
        assert rec["stage"] == "boot" and rec["data"]["tries"] == n  # again, in a fresh boot
    rec = boot_once(tmp_path)
    assert rec["stage"] == "failed" and "MemoryError" in rec["data"]["why"]
    assert OutOfMemory.calls == ident._BOOT_TRIES + 1
    # the next boot connects: no boot of its own any more, the failure is reported (resume)
    a = agent_mod.Agent({"store": str(tmp_path / "store"), "log": False, "reserve": 0,
                         "templates": str(tmp_path / "t.csv"), "xid": "x1"})
    ident.identify(a.s, DEVICE)
    assert a.s.oprec["stage"] == "failed"
