// runner.mjs - microcot's emulated RP2040: MicroPython's rp2 firmware in rp2040js (npm, 1.4.1).
//
// Channels: the USB CDC serial is this process's stdin (host -> board) and stdout (board -> host),
// raw bytes; UART0 is the stream socket on the file descriptor --uart-fd (optional); notes for
// people go to stderr, one line each, prefixed "rp2emu:".
//
// What rp2040js does not do by itself and this runner adds (see shared/fidelity/README.md):
//   flash erase/program    the boot ROM's flash functions start with BKPT hooks handled here
//   UART TX interrupt      raised once per byte written instead of on every interrupt check
//   USB CDC reads          wait for host data; an idle chip runs 1:1 with wall time
//   BOOTSEL                reset_usb_boot makes <drive-dir>/RPI-RP2 appear; a complete RP2040 UF2
//                          copied there is written to flash and the chip reboots
//   resets, identity       a watchdog reset reboots keeping flash; the flash unique ID (0x4B)
//                          answers --uid
//
// node runner.mjs --rp2040js DIR --bootrom FILE [--firmware UF2] [--flash FILE] [--uid HEX16]
//                 [--drive-dir DIR] [--uart-fd N]
// DIR holds node_modules/rp2040js (default: $MICROCOT_RP2040JS). Exit: SIGTERM, SIGINT or the end
// of stdin; flash is saved first.

import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const FLASH_SIZE = 2 << 20; // Pico and Pico W: 2 MiB
const XIP_BASE = 0x10000000;
const RP2040_FAMILY = 0xe48bff56;
const NS_PER_CYCLE = 8; // 125 MHz
const SAVE_DELAY_MS = 300; // flash is saved this long after its first unsaved change
const SLICE_MS = 4; // run this long between looks at the host
const IDLE_MIN_MS = 2; // idle time owed to the wall clock is slept off in steps of this or more
const IDLE_MAX_MS = 50;

// ---- options ------------------------------------------------------------------------------------

function parseArgs(argv) {
  const opts = {};
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i];
    if (!key.startsWith('--') || i + 1 >= argv.length) fail(`bad argument ${key}`);
    opts[key.slice(2)] = argv[i + 1];
  }
  return opts;
}

function fail(text) {
  process.stderr.write(`rp2emu: error: ${text}\n`);
  process.exit(2);
}

const note = (text) => process.stderr.write(`rp2emu: ${text}\n`);
const opts = parseArgs(process.argv.slice(2));
const libDir = opts.rp2040js || process.env.MICROCOT_RP2040JS;
if (!libDir) fail('no --rp2040js DIR (a folder with node_modules/rp2040js)');
if (!opts.bootrom) fail('no --bootrom FILE');
const uid = Buffer.from(opts.uid || '0000000000000000', 'hex');
if (uid.length !== 8) fail(`--uid ${opts.uid}: expected 16 hex digits`);

async function loadRp2040js(dir) {
  const pkgDir = path.join(dir, 'node_modules', 'rp2040js');
  let entry;
  try {
    const pkg = JSON.parse(fs.readFileSync(path.join(pkgDir, 'package.json'), 'utf8'));
    entry = pkg.module || 'dist/esm/index.js';
  } catch (err) {
    fail(`rp2040js not found in ${pkgDir} (${err.code || err.message}); run \`make setup\``);
  }
  return import(pathToFileURL(path.join(pkgDir, entry)).href);
}
const { Simulator, USBCDC } = await loadRp2040js(libDir);

// ---- UF2 ----------------------------------------------------------------------------------------

// The RP2040 blocks of a UF2: [{addr (flash offset), data (256 bytes), number, count}].
function uf2Blocks(buf) {
  const blocks = [];
  for (let off = 0; off + 512 <= buf.length; off += 512) {
    const b = buf.subarray(off, off + 512);
    if (b.readUInt32LE(0) !== 0x0a324655 || b.readUInt32LE(4) !== 0x9e5d5157) continue;
    if (b.readUInt32LE(508) !== 0x0ab16f30) continue;
    const flags = b.readUInt32LE(8);
    if (flags & 1) continue; // not main flash
    if (!(flags & 0x2000) || b.readUInt32LE(28) !== RP2040_FAMILY) continue;
    const addr = b.readUInt32LE(12) - XIP_BASE;
    const size = b.readUInt32LE(16);
    if (size !== 256 || addr < 0 || addr + size > FLASH_SIZE) continue;
    blocks.push({ addr, data: b.subarray(32, 32 + size), number: b.readUInt32LE(20),
      count: b.readUInt32LE(24) });
  }
  return blocks;
}

function complete(blocks) {
  if (!blocks.length) return false;
  const count = blocks[0].count;
  const seen = new Set(blocks.filter((b) => b.count === count).map((b) => b.number));
  return seen.size === count;
}

// Write blocks the way the boot ROM does: erase each 4 KiB sector before its first block.
function writeBlocks(flash, blocks) {
  const erased = new Set();
  for (const { addr, data } of blocks) {
    const sector = addr & ~0xfff;
    if (!erased.has(sector)) {
      flash.fill(0xff, sector, sector + 4096);
      erased.add(sector);
    }
    flash.set(data, addr);
  }
}

// ---- flash persistence --------------------------------------------------------------------------

const flashFile = opts.flash || null;
let image = new Uint8Array(FLASH_SIZE).fill(0xff); // flash contents between chips (reboots)
if (flashFile && fs.existsSync(flashFile)) {
  image.set(fs.readFileSync(flashFile).subarray(0, FLASH_SIZE));
}
if (opts.firmware) {
  const blocks = uf2Blocks(fs.readFileSync(opts.firmware));
  if (!complete(blocks)) fail(`${opts.firmware}: not a complete RP2040 UF2`);
  writeBlocks(image, blocks);
  note(`firmware ${path.basename(opts.firmware)}: ${blocks.length} blocks`);
}

let chip = null; // { sim, mcu, cdc }
let saveTimer = null;

function saveFlash() {
  if (saveTimer) clearTimeout(saveTimer);
  saveTimer = null;
  if (chip) image = chip.mcu.flash.slice(0, FLASH_SIZE);
  if (!flashFile) return;
  const tmp = `${flashFile}.${process.pid}.tmp`;
  const fd = fs.openSync(tmp, 'w');
  try {
    fs.writeSync(fd, image);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, flashFile);
}

function flashChanged() {
  if (flashFile && !saveTimer) saveTimer = setTimeout(saveFlash, SAVE_DELAY_MS);
}

// ---- boot ROM with hooks ------------------------------------------------------------------------

const HOOK_RETURN = 0xf0; // a no-op: return to the caller
const HOOK_ERASE = 0xf1;
const HOOK_PROGRAM = 0xf2;
const HOOK_USB_BOOT = 0xf3;

function patchedBootrom(file) {
  const raw = fs.readFileSync(file);
  if (raw.length !== 16384) fail(`${file}: ${raw.length} bytes, a boot ROM has 16384`);
  const rom = new Uint8Array(raw);
  const half = (a) => rom[a] | (rom[a + 1] << 8);
  // the ROM's function table (pointer at 0x14): pairs of (two-letter code, address), ended by 0
  const table = {};
  for (let p = half(0x14); half(p); p += 4) {
    const code = half(p);
    table[String.fromCharCode(code & 0xff, code >> 8)] = half(p + 2) & ~1;
  }
  const hooks = { IF: HOOK_RETURN, EX: HOOK_RETURN, FC: HOOK_RETURN, RE: HOOK_ERASE,
    RP: HOOK_PROGRAM, UB: HOOK_USB_BOOT };
  for (const [code, hook] of Object.entries(hooks)) {
    const at = table[code];
    if (at === undefined) fail(`${file}: no ROM function ${code}`);
    rom[at] = hook;
    rom[at + 1] = 0xbe; // BKPT #hook
  }
  return new Uint32Array(rom.buffer, rom.byteOffset, 4096);
}
const bootrom = patchedBootrom(opts.bootrom);

// ---- host channels ------------------------------------------------------------------------------

const hostIn = []; // chunks from the host for the CDC, not yet in its FIFO
const uartIn = []; // bytes for UART0's receiver
let uartOut = []; // bytes UART0 sent, flushed once per slice
let uartSock = null;
let wake = null; // ends an idle sleep early

function poke() {
  if (wake) wake();
}

process.stdin.on('data', (chunk) => {
  hostIn.push(chunk);
  feedCdc();
  poke();
});
process.stdin.on('end', () => shutdown('stdin closed'));
for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP']) process.on(sig, () => shutdown(sig));

if (opts['uart-fd']) {
  uartSock = new net.Socket({ fd: Number(opts['uart-fd']), readable: true, writable: true });
  uartSock.on('data', (chunk) => {
    for (const b of chunk) uartIn.push(b);
    poke();
  });
  uartSock.on('error', (err) => note(`UART0 channel: ${err.message}`));
  uartSock.on('close', () => { uartSock = null; });
}

function shutdown(why) {
  try {
    saveFlash();
  } finally {
    note(`stopped (${why})`);
    process.exit(0);
  }
}

// ---- the chip -----------------------------------------------------------------------------------

let pendingRead = null; // the CDC OUT endpoint asked for data that has not come yet
let state = 'run'; // 'run', 'bootsel', 'reboot'
let rebootWhy = '';
let bootAt = performance.now();

// Move host bytes into the CDC's FIFO and answer a waiting endpoint read.
function feedCdc() {
  if (!chip) return;
  const fifo = chip.cdc.txFIFO;
  while (hostIn.length && !fifo.full) {
    const chunk = hostIn[0];
    const n = Math.min(chunk.length, fifo.size - fifo.itemCount);
    for (let i = 0; i < n; i++) fifo.push(chunk[i]);
    if (n === chunk.length) hostIn.shift();
    else hostIn[0] = chunk.subarray(n);
  }
  if (pendingRead && !fifo.empty) {
    const { endpoint, size } = pendingRead;
    pendingRead = null;
    chip.cdcRead(endpoint, size);
  }
}

// UART0/1: a TX interrupt per byte written (rp2040js raises it on every check, which keeps
// MicroPython's machine.UART in its interrupt handler for ever); ICR clears it as on a PL011.
function fixUart(uart) {
  const TX_INTERRUPT = 1 << 5;
  uart.checkInterrupts = function checkInterrupts() {
    this.rp2040.setInterrupt(this.irq, !!(this.interruptStatus & this.interruptMask));
  };
  const write = uart.writeUint32.bind(uart);
  uart.writeUint32 = (offset, value) => {
    write(offset, value);
    if (offset === 0) { // UARTDR
      uart.interruptStatus |= TX_INTERRUPT;
      uart.checkInterrupts();
    }
  };
}

// The flash's "read unique ID" command (0x4B, 4 dummy bytes, 8 ID bytes), as pico-sdk's
// flash_get_unique_id() runs it through the SSI data register: one byte out, one byte in.
function answerUniqueId(ssi) {
  const DR0 = 0x60;
  let index = -1; // position in the command's reply, -1 outside it
  const read = ssi.readUint32.bind(ssi);
  const write = ssi.writeUint32.bind(ssi);
  ssi.writeUint32 = (offset, value) => {
    if (offset === DR0 && index < 0 && value === 0x4b) index = 0;
    write(offset, value);
  };
  ssi.readUint32 = (offset) => {
    if (offset !== DR0 || index < 0) return read(offset);
    const value = index >= 5 ? uid[index - 5] : 0;
    index = index + 1 >= 13 ? -1 : index + 1;
    return value;
  };
}

function onBreak(code) {
  const { mcu } = chip;
  const r = mcu.core.registers;
  const flash = mcu.flash;
  if (code === HOOK_ERASE) { // flash_range_erase(offset, count, block_size, block_cmd)
    const [offset, count] = [r[0], r[1]];
    flash.fill(0xff, offset, Math.min(offset + count, FLASH_SIZE));
    flashChanged();
  } else if (code === HOOK_PROGRAM) { // flash_range_program(offset, data, count)
    const [offset, data, count] = [r[0], r[1], r[2]];
    for (let i = 0; i < count && offset + i < FLASH_SIZE; i++) {
      flash[offset + i] &= mcu.readUint8(data + i); // programming only clears bits
    }
    flashChanged();
  } else if (code === HOOK_USB_BOOT) {
    enterBootsel();
    return;
  } else if (code !== HOOK_RETURN) {
    note(`BKPT #${code} at 0x${(mcu.core.PC >>> 0).toString(16)}: the chip halts`);
    state = 'halted';
    return;
  }
  mcu.core.PC = mcu.core.LR & ~1; // return from the ROM function
}

// rp2040js's own notes: errors only (it reports every unimplemented register it touches)
const logger = {
  debug() {},
  info() {},
  warn() {},
  error(component, text) { note(`${component}: ${text}`); },
};

function boot(why) {
  const sim = new Simulator();
  const mcu = sim.rp2040;
  mcu.logger = logger;
  mcu.loadBootrom(bootrom); // resets the chip, flash included: set flash afterwards
  mcu.flash.set(image);
  mcu.onBreak = onBreak;
  fixUart(mcu.uart[0]);
  fixUart(mcu.uart[1]);
  answerUniqueId(mcu.peripherals[0x18000]);
  mcu.uart[0].onByte = (b) => uartOut.push(b);
  mcu.peripherals[0x40058].onWatchdogTrigger = () => reboot('watchdog reset');
  const cdc = new USBCDC(mcu.usbCtrl);
  const cdcRead = mcu.usbCtrl.onEndpointRead;
  mcu.usbCtrl.onEndpointRead = (endpoint, size) => {
    if (endpoint === cdc.outEndpoint && cdc.txFIFO.empty) {
      pendingRead = { endpoint, size }; // NAK until the host sends something
      feedCdc();
      return;
    }
    cdcRead(endpoint, size);
  };
  cdc.onSerialData = (data) => process.stdout.write(data);
  cdc.onDeviceConnected = () => {
    note(`USB CDC up ${((performance.now() - bootAt) / 1000).toFixed(2)} s after ${why}`);
  };
  mcu.core.PC = XIP_BASE; // boot2 at the start of flash
  pendingRead = null;
  chip = { sim, mcu, cdc, cdcRead };
  bootAt = performance.now();
  state = 'run';
}

function reboot(why) {
  rebootWhy = why;
  state = 'reboot';
}

// ---- BOOTSEL drive ------------------------------------------------------------------------------

let drive = null; // { dir, sizes: Map(name -> size at the last look) }

function enterBootsel() {
  saveFlash();
  state = 'bootsel';
  if (!opts['drive-dir']) {
    note('reset_usb_boot: no --drive-dir, the chip stays in BOOTSEL');
    return;
  }
  const dir = path.join(opts['drive-dir'], 'RPI-RP2');
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'INFO_UF2.TXT'),
    'UF2 Bootloader v3.0\nModel: Raspberry Pi RP2\nBoard-ID: RPI-RP2\n');
  drive = { dir, sizes: new Map() };
  note(`BOOTSEL: drive ${dir}`);
}

// A UF2 on the drive is taken once all its RP2040 blocks are there; a file that has stopped
// growing without any is dropped (the ROM ignores foreign blocks and stays in BOOTSEL).
function lookAtDrive() {
  let names;
  try {
    names = fs.readdirSync(drive.dir);
  } catch {
    return;
  }
  for (const name of names) {
    if (!name.toLowerCase().endsWith('.uf2')) continue;
    const file = path.join(drive.dir, name);
    let data;
    try {
      data = fs.readFileSync(file);
    } catch {
      continue;
    }
    const blocks = uf2Blocks(data);
    const before = drive.sizes.get(name);
    drive.sizes.set(name, data.length);
    if (complete(blocks)) {
      writeBlocks(chip.mcu.flash, blocks);
      note(`BOOTSEL: ${name}: ${blocks.length} blocks written, rebooting`);
      fs.rmSync(drive.dir, { recursive: true, force: true });
      drive = null;
      saveFlash();
      reboot('UF2 flashed');
      return;
    }
    if (before === data.length && !blocks.length) {
      note(`BOOTSEL: ${name}: no RP2040 blocks, ignored`);
      fs.rmSync(file, { force: true });
      drive.sizes.delete(name);
    }
  }
}

// ---- run loop -----------------------------------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => {
  const timer = setTimeout(() => { wake = null; resolve(); }, ms);
  wake = () => { clearTimeout(timer); wake = null; resolve(); };
});

function flushUart() {
  if (!uartOut.length) return;
  if (uartSock) uartSock.write(Buffer.from(uartOut));
  uartOut = [];
}

function feedUart() {
  const rx = chip.mcu.uart[0];
  while (uartIn.length && !rx.rxFIFO.full) rx.feedByte(uartIn.shift());
}

// Run the chip for up to SLICE_MS of wall time. Short waits for an interrupt are run through at
// once and counted in `owed` (ns the chip is ahead of the wall clock); a longer one ends the slice
// with `wait`, the ns until its next alarm (capped), to be slept before the clock moves on.
function runSlice() {
  const { mcu, sim } = chip;
  const { core } = mcu;
  const clock = sim.clock;
  const end = performance.now() + SLICE_MS;
  let owed = 0;
  while (state === 'run') {
    for (let i = 0; i < 2000 && state === 'run'; i++) {
      if (!core.waiting) {
        clock.tick(core.executeInstruction() * NS_PER_CYCLE);
        continue;
      }
      const next = clock.nextAlarm ? clock.nanosToNextAlarm : Infinity;
      if (owed + next > IDLE_MIN_MS * 1e6) return { owed, wait: Math.min(next, IDLE_MAX_MS * 1e6) };
      clock.tick(next);
      owed += next;
    }
    if (performance.now() >= end) break;
  }
  return { owed, wait: 0 };
}

async function main() {
  boot('power-on');
  for (;;) {
    if (state === 'reboot') {
      saveFlash();
      note(`reboot (${rebootWhy})`);
      boot(rebootWhy);
    }
    if (state === 'bootsel') {
      if (drive) lookAtDrive();
      await sleep(200);
      continue;
    }
    if (state === 'halted') {
      await sleep(1000);
      continue;
    }
    feedUart();
    const { owed, wait } = runSlice();
    flushUart();
    const idleMs = (owed + wait) / 1e6;
    if (idleMs < IDLE_MIN_MS) {
      await new Promise((resolve) => setImmediate(resolve));
      continue;
    }
    const start = performance.now();
    await sleep(Math.min(idleMs, IDLE_MAX_MS));
    // host data may end the sleep early: the clock moves on by the wall time slept, at most
    if (wait && state === 'run') {
      const slept = (performance.now() - start) * 1e6 - owed;
      if (slept > 0) chip.sim.clock.tick(Math.min(slept, wait));
    }
  }
}

main().catch((err) => {
  note(`crashed: ${err.stack || err}`);
  try { saveFlash(); } catch { /* nothing more to do */ }
  process.exit(1);
});
