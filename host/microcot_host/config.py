"""`/microcot.json`, the agent's settings on a board: the reference of its keys, validation, and
`microcot config` to write one. Defaults are the firmware's own (microcot.agent.DEFAULTS), and so
are the rules: what each key takes and which values are secrets come from microcot.settings, the
module the device checks a c8y_Configuration with, so a file the host accepts is one the device
accepts. This module adds the documentation and what only a person at a terminal needs (a
suggestion for a typo, the value shown unless it is a secret). A test checks this table covers
every key.

Secrets (bootstrap_password, wlan.password) never come from a plain command-line argument and
are never printed: they are prompted for, or read from a file or an environment variable, and
the file written is owner-only.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from microcot import settings

from .cliopts import HELP

SECRET_MASK = settings.MASK

# settings.KINDS' codes as the reference names them
_LABELS = {"s": "str", "n": "str-or-null", "b": "bool", "t": "tls", "i": "int",
           "I": "int-or-null", "p": "int",
           "F": "number", "r": "pair", "q": "pair", "m": "list", "w": "object"}


@dataclass(frozen=True)
class Key:
    name: str
    doc: str

    @property
    def kind(self) -> str:
        return _LABELS[settings.KINDS[self.name]]

    @property
    def secret(self) -> bool:
        return settings.secret(self.name)


KEYS: tuple[Key, ...] = (
    Key("host", "the broker (seed 002: nb-iot.ram.m2m.telekom.com), also for the bootstrap"),
    Key("port", "the broker's port (8883: MQTT over TLS)"),
    Key("tls", "true: TLS verified against `ca`; false: plain MQTT; \"noverify\": TLS without "
               "checking the broker (a warning on every connect)"),
    Key("ca", "the broker's CA: a path on the board (PEM or DER) or the PEM text"),
    Key("bootstrap_user", "the tenant's bootstrap user (seed 002)"),
    Key("bootstrap_password", "its password"),
    Key("bootstrap_delay", "seconds [min, max]: the random wait before a bootstrap"),
    Key("bootstrap_repeat", "seconds without an answer before the secret is sent again"),
    Key("device_id", "the ID when neither the modem (ICCID) nor the MAC give one"),
    Key("xid", "the template collection's X-ID (default: the 15 line of the templates file)"),
    Key("templates", "path of the template collection on the board"),
    Key("name", "the device's name in the platform; {id} is replaced by the device ID"),
    Key("interval", "seconds between measurements (the example application)"),
    Key("binary", "send data as binary SmartREST (bs/) instead of text (ms/)"),
    Key("keepalive", "MQTT keep-alive in seconds"),
    Key("timeout", "seconds: connect, and each answer during the setup"),
    Key("backoff", "seconds [first, largest] between reconnect attempts"),
    Key("queue", "offline queue: [rows in memory, rows on flash (0: none)]"),
    Key("durable", "every row on flash before measure() returns: a power cut loses nothing "
                   "accepted; costs a flash write per row (the queue's second number bounds it; "
                   "see the application API page)"),
    Key("store", "folder of the agent's documents on the board"),
    Key("reserve", "bytes held for the few large allocations (0: none)"),
    Key("restarts", "boots of their own after reading the ID and after a bootstrap"),
    Key("unload", "drop the phase modules a state does not use"),
    Key("log", "print the agent's log lines (the one key a c8y_Configuration changes without "
               "restarting the board)"),
    Key("manage", "the built-in device-management operations the device supports: firmware, "
                  "software, configuration, logs"),
    Key("availability", "minutes without a message before the platform marks the device "
                        "unavailable (0: not monitored)"),
    Key("log_ring", "bytes of log lines kept for c8y_LogfileRequest (0: none; null: 2048 when "
                    "the heap has over 100 KB free at start, else none)"),
    Key("rest_url", "the platform's HTTPS REST API for uploads (null: https://<host>)"),
    Key("http_user", "the device's user for HTTPS downloads and uploads ({tenant}, {id})"),
    Key("app_trial", "seconds a new application gets to connect before it is rolled back"),
    Key("wlan", "{\"ssid\", \"password\"}: the WLAN the example application joins on boards "
                "with one"),
)


class ConfigError(ValueError):
    """A setting is unknown or has the wrong type; the message names it."""


def defaults() -> dict[str, Any]:
    from microcot.agent import DEFAULTS

    return dict(DEFAULTS)


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings, checked with the device's rules (microcot.settings): unknown keys (a typo
    must not be ignored) and wrong values raise ConfigError naming the key; never the value of a
    secret."""
    if not isinstance(cfg, dict):
        raise ConfigError("the settings must be a JSON object")
    for name, value in cfg.items():
        if name not in settings.KINDS:
            close = difflib.get_close_matches(name, list(settings.KINDS), n=2)
            raise ConfigError(f"unknown setting {name!r}" +
                              (f" (did you mean {', '.join(close)}?)" if close else ""))
        why = settings.why(name, value)
        if why is not None:  # wlan whole: a misspelt "pass" may hold the password
            shown = SECRET_MASK if settings.secret(name) or name == "wlan" else \
                json.dumps(value)[:60]
            raise ConfigError(f"{name}: {why}, got {shown}")
    why = settings.check(cfg)
    if why is not None:
        hint = " (for the emulator: microcot emulator board-config)" if why.startswith("ca:") \
            else ""
        raise ConfigError(why + hint)
    return cfg


def load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    try:
        return validate(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def masked(cfg: dict[str, Any]) -> dict[str, Any]:
    """For display: secrets masked (settings.masked), a CA's PEM text shortened."""
    out = settings.masked(cfg)
    if isinstance(out.get("ca"), str) and "-----BEGIN" in out["ca"]:
        out["ca"] = "<PEM text>"
    return out


def _secret(what: str, file: Path | None, env: str, prompt: bool) -> str | None:
    if file is not None:
        return file.read_text().strip()
    value = os.environ.get(env)
    if value:
        return value
    if prompt:
        return click.prompt(what, hide_input=True)
    return None


# -- CLI ------------------------------------------------------------------------------------------

@click.group("config", context_settings=HELP)
def config() -> None:
    """The agent's settings, /microcot.json: write one, check one, list the keys."""


@config.command("keys")
@click.option("--json", "as_json", is_flag=True, help="print the reference as JSON")
def keys(as_json: bool) -> None:
    """Every key of /microcot.json with its type and default."""
    d = defaults()
    rows = [{"key": k.name, "type": k.kind, "default": d.get(k.name), "doc": k.doc,
             "secret": k.secret} for k in KEYS]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['key']:<20} {r['type']:<12} {json.dumps(r['default']):<30} {r['doc']}")


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def check(file: Path) -> None:
    """Check FILE: unknown keys and wrong types are errors (exit code 1)."""
    try:
        cfg = load(file)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{file}: {len(cfg)} setting(s), valid")


@config.command("new")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="the file to write (owner-only), e.g. microcot.json")
@click.option("--from", "base", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="start from these settings (e.g. from microcot emulator board-config --out)")
@click.option("--host", help="the broker (default: the Cloud of Things, "
                             "nb-iot.ram.m2m.telekom.com)")
@click.option("--port", type=click.IntRange(1, 65535), help="the broker's port (default 8883)")
@click.option("--ca", "ca_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="the broker's CA (PEM): its text goes into the settings")
@click.option("--bootstrap-user", help="the tenant's bootstrap user")
@click.option("--bootstrap-password-file", type=click.Path(dir_okay=False, exists=True,
              path_type=Path), help="read the bootstrap password from this file (else "
              "$MICROCOT_BOOTSTRAP_PASSWORD, else a prompt)")
@click.option("--wlan-ssid", help="the WLAN to join (ESP32, Pico W)")
@click.option("--wlan-password-file", type=click.Path(dir_okay=False, exists=True,
              path_type=Path), help="the WLAN password from this file (else "
              "$MICROCOT_WLAN_PASSWORD, else a prompt)")
@click.option("--set", "sets", multiple=True, metavar="KEY=JSON",
              help='any other setting, e.g. --set interval=30 --set binary=true')
def new(out: Path, base: Path | None, host: str | None, port: int | None, ca_file: Path | None,
        bootstrap_user: str | None, bootstrap_password_file: Path | None, wlan_ssid: str | None,
        wlan_password_file: Path | None, sets: tuple[str, ...]) -> None:
    """Write validated settings for a board. Secrets are never taken from the command line and
    never printed."""
    from .files import write_private

    try:
        cfg: dict[str, Any] = load(base) if base else {}
        for item in sets:
            name, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r}: expected KEY=JSON")
            if settings.secret(name) or name == "wlan":
                raise ConfigError(f"--set {name}: a secret; use its file option or variable")
            try:
                cfg[name] = json.loads(raw)
            except ValueError:
                cfg[name] = raw  # a plain string
        for name, value in (("host", host), ("port", port), ("bootstrap_user", bootstrap_user)):
            if value is not None:
                cfg[name] = value
        if ca_file is not None:
            text = ca_file.read_text()
            if "-----BEGIN CERTIFICATE-----" not in text:
                raise ConfigError(f"--ca {ca_file}: not a PEM certificate")
            cfg["ca"] = text
        if cfg.get("bootstrap_user"):
            pw = _secret("bootstrap password", bootstrap_password_file,
                         "MICROCOT_BOOTSTRAP_PASSWORD", not cfg.get("bootstrap_password"))
            if pw:
                cfg["bootstrap_password"] = pw
        if wlan_ssid:
            pw = _secret(f"password of WLAN {wlan_ssid!r}", wlan_password_file,
                         "MICROCOT_WLAN_PASSWORD", True)
            cfg["wlan"] = {"ssid": wlan_ssid, "password": pw or ""}
        validate(cfg)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    write_private(out, json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    click.echo(json.dumps(masked(cfg), indent=1, sort_keys=True))
    click.echo(f"written to {out} (owner-only); put it on a board with "
               f"microcot deploy --app --config {out}", err=True)
