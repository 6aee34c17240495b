#!/usr/bin/env bash
# `make test`: the CPython suite, then the device suite ON each board model.
# The run on the real RP2040 firmware (rp2040js in node: about 3 minutes of one core) starts in
# the background at once and is waited for at the end: the CPython suite spends much of its time
# waiting on brokers, boards and subprocesses, and CI has 2 cores and a 15-minute budget. Its
# output is shown when it ends, whatever happened before; every run's exit code counts.
set -uo pipefail
PY=${PY:-.venv/bin/python}
device=("$PY" -m pytest --port virtual tests/device -q -rs -p no:cacheprovider)
rp2log=$(mktemp)
"${device[@]}" --board rp2-pico-w --runtime rp2040 >"$rp2log" 2>&1 &
rp2=$!
# an interrupted run must not leave the emulated board behind
trap 'kill "$rp2" 2>/dev/null; rm -f "$rp2log"' EXIT
trap 'exit 130' INT TERM

failed=()
"$PY" -m pytest tests -q -p no:cacheprovider || failed+=("CPython suite")
echo "== device tests ON boards: ESP32 model (i386-esp32), Pico W model (i386-rp2), the 64-bit developer board"
for board in esp32-generic rp2-pico-w virtual; do
  "${device[@]}" --board "$board" || failed+=("device tests on $board")
done
echo "== device tests ON the real RP2040 firmware (emulated; started first, in the background)"
wait "$rp2" || failed+=("device tests on the emulated RP2040")
cat "$rp2log"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
