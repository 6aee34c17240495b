#!/usr/bin/env bash
# Freeze the firmware (firmware/manifest.py: the board's manifest, then the microcot package) into a
# 32-bit (i386) MicroPython unix port, then check that the agent imports from the frozen package.
#   MICROCOT_FIDELITY_DIR=../shared/fidelity tools/freeze-build.sh esp32|rp2 OUT_DIR
# Writes OUT_DIR/micropython-i386-<kind>-frozen (run it as a board model through
# MICROCOT_MICROPYTHON_I386_ESP32 / _RP2). Builds with MICROCOT_FIDELITY_DIR/src/build-i386.sh
# (Debian's gcc-multilib; about a minute on 2 cores). Too slow for the test suite: run it by hand.
#
# Why a board folder: firmware/manifest.py starts with include("$(BOARD_DIR)/manifest.py"), right
# for the esp32 and rp2 ports, whose build sets BOARD_DIR to the board's folder. The unix port has
# no boards and never sets BOARD_DIR, so py/mkrules.mk passes `-v BOARD_DIR=` to makemanifest.py
# and the build stops at frozen_content.c with
#   Error in manifest file: /manifest.py: [Errno 2] No such file or directory: '/manifest.py'
# Here BOARD_DIR (taken by make from the environment: nothing in the unix port assigns it) names a
# temporary folder whose manifest.py includes the standard variant's, what the stock build freezes
# (asyncio, mip, requests, ssl...), so "the board's modules plus microcot" holds on unix too.
#
set -euo pipefail

usage() { echo "usage: MICROCOT_FIDELITY_DIR=DIR $0 esp32|rp2 OUT_DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
kind=$1
out=$2
case "$kind" in esp32|rp2) ;; *) usage ;; esac
fid=${MICROCOT_FIDELITY_DIR:-}
[ -n "$fid" ] || { echo "MICROCOT_FIDELITY_DIR is not set (the folder with src/build-i386.sh)" >&2; exit 2; }
build=$fid/src/build-i386.sh
[ -f "$build" ] || { echo "$build not found" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
manifest=$root/firmware/manifest.py
[ -f "$manifest" ] || { echo "$manifest not found" >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# build-i386.sh unpacks into its own mktemp -d and removes it only on success: keep that under ours
mkdir -p "$tmp/t" "$tmp/board" "$tmp/out" "$tmp/run"
cat >"$tmp/board/manifest.py" <<'EOF'
# The unix port has no board: its standard variant's manifest stands in for the board's.
include("$(PORT_DIR)/variants/standard/manifest.py")
EOF

echo "building micropython-i386-$kind with $manifest frozen (a minute or two)..."
TMPDIR="$tmp/t" BOARD_DIR="$tmp/board" bash "$build" "$kind" "$tmp/out" "$manifest"

mkdir -p "$out"
bin=$(cd "$out" && pwd)/micropython-i386-$kind-frozen
cp "$tmp/out/micropython-i386-$kind" "$bin"

# The check: from an empty folder, with only the frozen modules on the path, at the board's budget
# (the heaps the project's board models use: ESP32 86,000 B, Pico W 169,000 B).
heap=86000
[ "$kind" = rp2 ] && heap=169000
cd "$tmp/run"
MICROPYPATH=.frozen "$bin" -X heapsize=$heap -c '
import gc, sys
gc.collect()
f0 = gc.mem_free()
import microcot, microcot.agent, microcot.session, microcot.link
gc.collect()
f1 = gc.mem_free()
import os
# nothing to import from but the frozen modules: "" is this empty folder, ".frozen" no folder
assert os.listdir() == [] and [p for p in sys.path if p] == [".frozen"], sys.path
assert microcot.agent.__file__ == "microcot/agent.py", microcot.agent.__file__  # frozen: no prefix
print("frozen import ok:", microcot.agent.__file__, "- import agent, session, link: %d B of heap" % (f0 - f1))
'
echo "$bin"
