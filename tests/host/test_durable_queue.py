"""The agent's durable queue (setting "durable", firmware/microcot/outlog.py) under real power cuts:
a virtual board runs the agent against the emulator, measuring a numbered row every 20 ms and
printing it once measure() has returned (the unix port's stdout is unbuffered, so a line the
host sees was printed after the row was accepted). The host cuts the power (SIGKILL of the
interpreter, VirtualBoard's supervisor boots it again into main.py) PowerCuts times at seeded
moments: while the agent connects, sets up, sends, or measures offline. Then it lets the board
drain its queue and asks the emulator's REST API for every row: each accepted row must have
arrived. A row sent again after a cut (at least once) is counted as a duplicate, not a failure.

MICROCOT_DURABLE_MODE=ram runs the same with the RAM queue (the default mode), which loses the
rows accepted but not yet on flash: the test then fails, naming them.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from agent_fixtures import Console, api, device_mo, emulator_config, power_cycle
from emulator_fixtures import new_iccid, wait_for

from microcot import store as host_store
from microcot_host import deploy
from microcot_host.emulator import Emulator
from microcot_host.vboard.models import make_board

pytestmark = pytest.mark.timeout(240)

CUTS = int(os.environ.get("MICROCOT_DURABLE_CUTS", "50"))
MODE = os.environ.get("MICROCOT_DURABLE_MODE", "durable")
BOARD = os.environ.get("MICROCOT_DURABLE_BOARD", "virtual")

# /main.py for the test: a random boot id as the unit, the row number as the value; /stop (put
# into the board's flash folder by the host) ends the measuring and waits for the queue to drain
MAIN = """
from microcot import hal
from microcot.agent import Agent

boot = "b%%08x" %% int.from_bytes(hal.random_bytes(4), "big")
print("BOOT", boot)
a = Agent()
a.start(%(id)r)
k = [0]


def stopped():
    try:
        open("/stop").close()
        return True
    except OSError:
        return False


def tick():
    if not stopped():
        k[0] += 1
        a.measure("mc_Cut", "n", k[0], boot, type="mc_Cut")
        print("A", boot, k[0])


a.every(0.02, tick)
a.run(until=lambda: stopped() and a.ready and not len(a.q) and not a._c.pending())
a.close()
print("DRAINED", boot)
"""


def rows(emu, mo: str) -> list[tuple[str, int]]:
    """(unit: the boot, value: the row number) of every mc_Cut measurement, duplicates kept."""
    out, page = [], 1
    while True:
        status, body = api(emu, "GET", f"/measurement/measurements?source={mo}&type=mc_Cut"
                                       f"&pageSize=2000&currentPage={page}")
        assert status == 200, body
        out += [(m["mc_Cut"]["n"]["unit"], int(m["mc_Cut"]["n"]["value"]))
                for m in body["measurements"]]
        if len(body["measurements"]) < 2000:
            return out
        page += 1


def test_power_cuts_lose_no_accepted_row(tmp_path: Path) -> None:
    device_id = new_iccid()
    flash = tmp_path / "flash"
    with Emulator(tmp_path / "emu") as emu:
        password = emu.add_device(device_id)
        cfg = emulator_config(emu, backoff=[0.1, 0.5], timeout=5, keepalive=10,
                              durable=MODE == "durable", queue=[16, 2000])
        vb = make_board(BOARD, name="t-durable-deploy", heap="1m", flash_dir=flash).start()
        try:
            deploy.deploy(vb.port, board=BOARD, app=True, config=cfg)
        finally:
            vb.stop()
        old = host_store.root(str(flash / "store"))
        try:
            host_store.save("cred", {"id": device_id, "password": password,
                                     "source": "provisioned", "ok": False})
        finally:
            host_store.root(old)
        (flash / "main.py").unlink()  # its first boot must be one the console sees
        vb = make_board(BOARD, name="t-durable", flash_dir=flash).start()
        con = Console(vb.port).start()
        try:
            (flash / "main.py").write_text(MAIN % {"id": device_id})
            power_cycle(vb)  # main.py runs, with the console listening
            rng = random.Random(14)
            t0 = time.monotonic()
            at = 0
            for _ in range(CUTS):
                boot = con.wait(r"BOOT (b[0-9a-f]{8})\n", at)
                # the cut comes after a seeded number of rows of this boot: early ones fall
                # into the connect, later ones into the setup and the sending
                n = rng.choice((1, 3, 6, 12, 24))
                b, start = boot.group(1), boot.end()
                wait_for(lambda b=b, start=start, n=n: len(
                    re.findall(rf"A {b} \d+\n", con.text[start:])) >= n, 30)
                time.sleep(rng.uniform(0, 0.02))
                at = len(con.text)  # what the next boot prints comes after this
                power_cycle(vb)
            took = time.monotonic() - t0
            con.wait(r"BOOT (b[0-9a-f]{8})\n", at)
            (flash / "stop").write_text("")
            con.wait(r"DRAINED", 0, 60)
            accepted = set((b, int(k)) for b, k in re.findall(r"(?m)^A (b[0-9a-f]{8}) (\d+)$",
                                                              con.text))
            mo = device_mo(emu, device_id)
            assert mo
            got = wait_for(lambda: (lambda r: r if set(r) >= accepted else None)(rows(emu, mo)),
                           10) if MODE == "durable" else rows(emu, mo)
        except AssertionError:
            lines = con.text.splitlines()
            print("\n".join([x for x in lines if not x.startswith("A ")][-60:]))
            print("-- the console's last lines:\n" + "\n".join(lines[-15:]))
            raise
        finally:
            con.stop()
            vb.stop()
    count = Counter(got)
    lost = sorted(accepted - set(count))
    last = {}
    for b, k in accepted:
        last[b] = max(last.get(b, 0), k)
    # nothing that was never measured: a row of a boot at most one past the last one printed
    made_up = [r for r in count if r[1] > last.get(r[0], 0) + 1]
    dups = sum(v - 1 for v in count.values())
    # where the cuts fell: the agent's log of each boot that was cut
    phases = Counter("sending" if "ready:" in b else "setting up" if "connected to" in b
                     else "connecting" for b in con.text.split("BOOT ")[1:-1])
    print(f"\n{CUTS} power cuts in {took:.1f} s ({MODE} queue): {len(accepted)} rows accepted, "
          f"{len(count)} arrived ({dups} duplicates), {len(lost)} lost; cut while "
          + ", ".join(f"{k} {v}" for k, v in phases.most_common()))
    assert "timer:" not in con.text, "measure() raised"
    assert not made_up, made_up
    assert not lost, f"{len(lost)} of {len(accepted)} accepted rows lost: {lost[:10]}"
