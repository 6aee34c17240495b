"""Provisioning throughput and deploy time on virtual boards.

1. Devices provisioned per minute with 1, 2, 4 and 8 virtual boards in parallel (provision.py's
   Provisioner in this process, as `microcot provision` runs it, without the CLI's start-up):
     first      fresh boards: microcot deployed (it is missing), then credentials written;
     new        boards that have microcot and old credentials, a fresh ledger each round: the
                path of a new device (probe, vault, ledger, write, verify), `--rounds` rounds;
     unchanged  the same again with the same ledger: the check a re-run makes.
   Scaling = rate(N) / (N x rate(1)).
2. Deploy time of the firmware package onto a fresh virtual board, first and unchanged
   re-deploy, against `mpremote fs cp -r` of the same .py files in the same run (mpremote also
   skips files whose SHA-256 matches). Every measurement is a fresh process (`microcot deploy`
   vs `mpremote`), median of `--repeat`. Like with like: `microcot deploy --no-compile` copies the
   same .py sources; `microcot deploy` (.mpy, compiled by mpy-cross) is reported beside it. Our
   deploy also writes each file under a temporary name and renames it, removes stale files and
   imports every module in a fresh interpreter at the end; mpremote does none of these.

    python bench/provision.py [--rounds 5] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))
sys.path.insert(0, str(ROOT / "firmware"))

from microcot import identity  # noqa: E402
from microcot_host import deploy  # noqa: E402
from microcot_host.provision import Options, Provisioner  # noqa: E402
from microcot_host.provision_ledger import Books  # noqa: E402
from microcot_host.vboard import VirtualBoard  # noqa: E402

BIN = Path(sys.executable).parent
SIZES = (1, 2, 4, 8)


def iccid(n: int) -> str:
    payload = "8949030%012d" % n
    return payload + identity.luhn_check_digit(payload)


def start_boards(root: Path, n: int, tag: str, base: int) -> list[VirtualBoard]:
    def one(i: int) -> VirtualBoard:
        return VirtualBoard(f"bench-{tag}-{i}", iccid=iccid(base + i),
                            flash_dir=root / f"{tag}-{i}").start()

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def provision_round(boards: list[VirtualBoard], ledger: Path) -> tuple[float, list[str]]:
    with Books(ledger) as books:
        t0 = time.perf_counter()
        outcomes = Provisioner(books, options=Options()).run([vb.port for vb in boards])
        took = time.perf_counter() - t0
    bad = [f"{o.port}: {o.detail}" for o in outcomes if not o.ok]
    if bad:
        raise SystemExit("provisioning failed: " + "; ".join(bad))
    return took, [o.result for o in outcomes]


def bench_scaling(root: Path, rounds: int) -> list[dict]:
    rows = []
    for n in SIZES:
        boards = start_boards(root, n, f"s{n}", 100 * n)
        try:
            t_first, res = provision_round(boards, root / f"ledger-s{n}-0" / "p.db")
            assert set(res) == {"written"}, res
            t_new = 0.0
            for r in range(1, rounds + 1):
                took, res = provision_round(boards, root / f"ledger-s{n}-{r}" / "p.db")
                assert set(res) == {"written"}, res
                t_new += took
            t_same = 0.0
            for _ in range(rounds):
                took, res = provision_round(boards, root / f"ledger-s{n}-{rounds}" / "p.db")
                assert set(res) == {"unchanged"}, res
                t_same += took
        finally:
            for vb in boards:
                vb.stop()
        rows.append({"boards": n, "first_s": t_first, "first_per_min": 60 * n / t_first,
                     "new_s": t_new / rounds, "new_per_min": 60 * n * rounds / t_new,
                     "unchanged_s": t_same / rounds,
                     "unchanged_per_min": 60 * n * rounds / t_same})
    base = rows[0]["new_per_min"]
    for r in rows:
        r["scaling"] = r["new_per_min"] / (r["boards"] * base)
    return rows


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    took = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout}{p.stderr}")
    return took


def bench_deploy(root: Path, repeat: int, env: dict[str, str]) -> dict[str, dict[str, float]]:
    # the sources as mpremote would copy them: only the .py files (no CPython __pycache__)
    src = root / "src" / "microcot"
    src.mkdir(parents=True)
    for f in sorted((ROOT / "firmware" / "microcot").glob("*.py")):
        shutil.copy2(f, src / f.name)
    ways = {
        "mpremote fs cp -r (.py)": lambda port: [
            [str(BIN / "mpremote"), "connect", port, "fs", "cp", "-r", str(src), ":/lib/"]],
        "microcot deploy --no-compile (.py)": lambda port: [
            [str(BIN / "microcot"), "deploy", "--port", port, "--no-compile"]],
        "microcot deploy (.mpy)": lambda port: [
            [str(BIN / "microcot"), "deploy", "--port", port]],
    }
    times: dict[str, dict[str, list[float]]] = {w: {"first": [], "unchanged": []} for w in ways}
    for k in range(repeat):
        for i, (way, cmds) in enumerate(ways.items()):
            vb = VirtualBoard(f"bench-d{k}-{i}", flash_dir=root / f"d{k}-{i}").start()
            try:
                if way.startswith("mpremote"):  # cp -r needs /lib to exist; not timed
                    (vb.flash_dir / "lib").mkdir()
                (cmd,) = cmds(vb.port)
                times[way]["first"].append(timed(cmd, env))
                times[way]["unchanged"].append(timed(cmd, env))
            finally:
                vb.stop()
            files = sorted(p.name for p in (vb.flash_dir / "lib" / "microcot").iterdir())
            if len(files) != len(list(src.iterdir())):
                raise SystemExit(f"{way}: {len(files)} files on the board")
    return {w: {k: statistics.median(v) for k, v in t.items()} for w, t in times.items()}


def report(scaling: list[dict], dep: dict[str, dict[str, float]], args) -> None:
    print(f"provisioning virtual boards ({os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}); {args.rounds} rounds of new and unchanged devices")
    print()
    head = (f"{'boards':>6} | {'first (deploy+write)':>22} | {'new device':>19} | "
            f"{'scaling':>7} | {'unchanged check':>19}")
    print(head)
    print(f"{'':>6} | {'s/round':>9} {'dev/min':>12} | {'s/round':>7} {'dev/min':>11} | "
          f"{'':>7} | {'s/round':>7} {'dev/min':>11}")
    print("-" * len(head))
    for r in scaling:
        print(f"{r['boards']:>6} | {r['first_s']:9.2f} {r['first_per_min']:12.0f} | "
              f"{r['new_s']:7.2f} {r['new_per_min']:11.0f} | {r['scaling']:7.2f} | "
              f"{r['unchanged_s']:7.2f} {r['unchanged_per_min']:11.0f}")
    print()
    ref = dep["mpremote fs cp -r (.py)"]
    print(f"deploy of firmware/microcot ({len(list((ROOT / 'firmware' / 'microcot').glob('*.py')))}"
          f" modules) onto a fresh virtual board, median of {args.repeat}, seconds incl. process "
          "start; ratio = time / mpremote's")
    head = f"{'':<36} {'first':>7} {'ratio':>6} | {'unchanged':>9} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for way, t in dep.items():
        print(f"{way:<36} {t['first']:7.2f} {t['first'] / ref['first']:6.2f} | "
              f"{t['unchanged']:9.2f} {t['unchanged'] / ref['unchanged']:6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds per board count")
    ap.add_argument("--repeat", type=int, default=3, help="deploy measurements per way")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="microcot-bench-prov-") as tmp:
        root = Path(tmp)
        # boards, ledgers and caches of this run only; the subprocesses see the same
        os.environ["MICROCOT_HOME"] = str(root / "home")
        env = dict(os.environ)
        deploy.mpy_cross_version()  # warm the tool's cache before anything is timed
        scaling = bench_scaling(root, args.rounds)
        dep = bench_deploy(root, args.repeat, env)
    report(scaling, dep, args)
    if args.json:
        print(json.dumps({"scaling": scaling, "deploy": dep}, indent=2))


if __name__ == "__main__":
    main()
