"""XTEA ECB throughput: microcot.xtea on the MicroPython unix port and on CPython, against the
PyPI `xtea` package, all measured in the same run on the same data.

Each variant encrypts and then decrypts SIZE KiB in 8-byte blocks (one ECB call each way), best of
REPEAT runs. KB/s = 1024 bytes per second of data through one direction, averaged over both
(2 * size / (t_encrypt + t_decrypt)). Every variant's ciphertext is checked against the others.

    python bench/xtea.py [--size 64] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIRMWARE = ROOT / "firmware"
# this script is itself named xtea.py: drop its directory so `import xtea` finds the PyPI package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(FIRMWARE))

from microcot import xtea as our_xtea  # noqa: E402

MICROPYTHON = shutil.which("micropython", path=str(Path(sys.executable).parent)) or shutil.which(
    "micropython"
)
KEY = bytes(range(16))

# Runs on the unix port; prints one JSON object. Timing by ticks_us, data built in place so that
# both runtimes encrypt the same bytes.
MP_SCRIPT = """
import sys, time, gc, json
sys.path.insert(0, %(fw)r)
from microcot import xtea
import hashlib, binascii
key = bytes(range(16))
data = bytes((i * 7 + 3) & 0xFF for i in range(%(n)d))
def run(enc, dec):
    best = None
    for _ in range(%(repeat)d):
        gc.collect()
        t0 = time.ticks_us()
        c = enc(key, data)
        t1 = time.ticks_us()
        p = dec(key, c)
        t2 = time.ticks_us()
        assert p == data
        r = (time.ticks_diff(t1, t0) / 1e6, time.ticks_diff(t2, t1) / 1e6)
        if best is None or sum(r) < sum(best):
            best = r
    return {"enc": best[0], "dec": best[1],
            "digest": binascii.hexlify(hashlib.sha256(c).digest()).decode()}
out = {"variant": xtea.variant(), "version": "%%d.%%d.%%d" %% sys.implementation.version[:3]}
out["python"] = run(xtea.encrypt_ecb_py, xtea.decrypt_ecb_py)
if xtea.variant() == "viper":
    out["viper"] = run(xtea.encrypt_ecb_viper, xtea.decrypt_ecb_viper)
print("JSON" + json.dumps(out))
"""


def data_of(n: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(n))


def timed(enc, dec, data: bytes, repeat: int) -> dict:
    best = None
    c = b""
    for _ in range(repeat):
        t0 = time.perf_counter()
        c = enc(KEY, data)
        t1 = time.perf_counter()
        p = dec(KEY, c)
        t2 = time.perf_counter()
        if p != data:
            raise SystemExit("decryption did not give the plaintext back")
        r = (t1 - t0, t2 - t1)
        if best is None or sum(r) < sum(best):
            best = r
    return {"enc": best[0], "dec": best[1], "digest": hashlib.sha256(c).hexdigest()}


def micropython_runs(n: int, repeat: int) -> dict | None:
    if not MICROPYTHON:
        return None
    code = MP_SCRIPT % {"fw": str(FIRMWARE), "n": n, "repeat": repeat}
    res = subprocess.run([MICROPYTHON, "-c", code], capture_output=True, text=True, timeout=600)
    for line in res.stdout.splitlines():
        if line.startswith("JSON"):
            return json.loads(line[4:])
    raise SystemExit("micropython run failed:\n" + res.stdout + res.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="KiB of data (default 64)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per variant, best taken")
    ap.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = ap.parse_args()
    n = args.size * 1024
    data = data_of(n)

    rows: list[tuple[str, dict]] = []
    mp = micropython_runs(n, args.repeat)
    if mp:
        ver = mp["version"]
        if "viper" in mp:
            rows.append(("MicroPython %s unix, microcot viper" % ver, mp["viper"]))
        rows.append(("MicroPython %s unix, microcot pure Python" % ver, mp["python"]))

    cpy = "CPython %d.%d" % sys.version_info[:2]
    rows.append((cpy + ", microcot pure Python", timed(our_xtea.encrypt_ecb_py,
                                                       our_xtea.decrypt_ecb_py, data, args.repeat)))
    try:
        import xtea as ref_xtea
    except ImportError:
        ref_xtea = None
    if ref_xtea is not None:
        try:
            import _xtea  # noqa: F401

            kind = "C extension"
        except ImportError:
            kind = "pure Python"
        warnings.simplefilter("ignore")

        def ref_enc(k, d):
            return ref_xtea.new(k, mode=ref_xtea.MODE_ECB).encrypt(d)

        def ref_dec(k, d):
            return ref_xtea.new(k, mode=ref_xtea.MODE_ECB).decrypt(d)

        rows.append(("%s, PyPI xtea %s (%s)" % (cpy, ref_xtea.__version__, kind),
                     timed(ref_enc, ref_dec, data, args.repeat)))

    digests = {r["digest"] for _, r in rows}
    if len(digests) != 1:
        raise SystemExit("ciphertexts differ between variants: %r" % [(k, r["digest"]) for k, r in rows])

    for _, r in rows:
        r["kbps"] = 2 * n / 1024 / (r["enc"] + r["dec"])
    if args.json:
        print(json.dumps({"size": n, "rows": {k: r for k, r in rows}}, indent=2))
        return 0

    best = rows[0]
    print("XTEA ECB, %d KiB encrypted then decrypted, best of %d (all ciphertexts identical)\n"
          % (args.size, args.repeat))
    w = max(len(k) for k, _ in rows)
    print("%-*s  %9s  %9s  %10s  %s" % (w, "variant", "enc s", "dec s", "KB/s", "best/this"))
    for k, r in rows:
        print("%-*s  %9.4f  %9.4f  %10.1f  %7.2fx" % (w, k, r["enc"], r["dec"], r["kbps"],
                                                     best[1]["kbps"] / r["kbps"]))
    print("\nbest/this: how many times faster the first row (%s) is" % best[0])
    if mp is None:
        print("(no micropython binary next to %s: MicroPython rows skipped)" % sys.executable)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
