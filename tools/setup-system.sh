#!/usr/bin/env bash
# System packages the tests need. Installs only what is missing, and only when we may (root).
set -euo pipefail
need=()
# the platform emulator runs a real Mosquitto broker
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
# bench/emulator.py's peer: Mosquitto relaying between C clients (mosquitto_pub, mosquitto_sub)
command -v mosquitto_pub >/dev/null 2>&1 && command -v mosquitto_sub >/dev/null 2>&1 \
  || need+=(mosquitto-clients)
# the faithful 32-bit boards (i386 builds of the unix port) need the 32-bit C library; Debian has it
# for amd64 hosts only (elsewhere those boards are skipped, saying why)
if [ "$(dpkg --print-architecture 2>/dev/null)" = amd64 ] && [ ! -e /lib/ld-linux.so.2 ] \
    && [ ! -e /lib32/ld-linux.so.2 ]; then
  need+=(libc6-i386)
fi
# the shared provisioning ledger's and the emulator's PostgreSQL tests run a throwaway
# PostgreSQL server (initdb, postgres)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null 2>&1 \
  || need+=(postgresql)
# the emulated RP2040 (microcot board rp2) runs rp2040js under node
command -v node >/dev/null 2>&1 || need+=(nodejs npm)
# wanted, not needed: the emulator's web console is tested in a real headless browser, Debian's
# Chromium driven by Playwright (a distribution without the package, such as Ubuntu with its snap
# stub, still gets the rest; the browser test then says what is missing)
want=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
  || want+=(chromium)
updated=
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing system packages: ${need[*]} (install them with apt-get as root)" >&2
    exit 1
  fi
  apt-get update -qq >/dev/null
  updated=1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  echo "installed: ${need[*]}"
fi
if [ ${#want[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "warning: missing system packages: ${want[*]} (the console's browser test needs them)" >&2
  else
    [ -n "$updated" ] || apt-get update -qq >/dev/null
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}" >/dev/null; then
      echo "installed: ${want[*]}"
    else
      echo "warning: could not install ${want[*]}; the console's browser test will say so" >&2
    fi
  fi
fi
# rp2040js, pinned by host/microcot_host/rp2emu/js/package-lock.json, installed with `npm ci`
# into <state dir>/rp2040js/<hash of the lock> (MICROCOT_RP2040JS names another folder)
PY=${PY:-"$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"}
if ! "$PY" -c "from microcot_host.rp2emu import ensure_rp2040js; print('rp2040js:', ensure_rp2040js())"; then
  echo "warning: rp2040js could not be installed; microcot board rp2 and its tests need it" >&2
fi
