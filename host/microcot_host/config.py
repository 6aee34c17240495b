"""`/microcot.json`, the agent's settings on a board: the reference of its keys, validation, and
`microcot config` to write one. Defaults are the firmware's own (microcot.agent.DEFAULTS): the
host imports them rather than repeating them; a test checks this table covers every key.

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

SECRET_MASK = "********"


@dataclass(frozen=True)
class Key:
    name: str
    kind: str  # str, int, number, bool, pair, list, object, str-or-false
    doc: str
    restart: bool = True  # the agent reads it at start-up
    secret: bool = False


KEYS: tuple[Key, ...] = (
    Key("host", "str", "the broker (seed 002: nb-iot.ram.m2m.telekom.com), also for the bootstrap"),
    Key("port", "int", "the broker's port (8883: MQTT over TLS)"),
    Key("tls", "tls", "true: TLS verified against `ca`; false: plain MQTT; \"noverify\": TLS "
                      "without checking the broker (a warning on every connect)"),
    Key("ca", "str-or-null", "the broker's CA: a path on the board (PEM or DER) or the PEM text"),
    Key("bootstrap_user", "str-or-null", "the tenant's bootstrap user (seed 002)"),
    Key("bootstrap_password", "str-or-null", "its password", secret=True),
    Key("bootstrap_delay", "pair", "seconds [min, max]: the random wait before a bootstrap"),
    Key("bootstrap_repeat", "number", "seconds without an answer before the secret is sent again"),
    Key("device_id", "str-or-null", "the ID when neither the modem (ICCID) nor the MAC give one"),
    Key("xid", "str-or-null", "the template collection's X-ID (default: the 15 line of the "
                              "templates file)"),
    Key("templates", "str", "path of the template collection on the board"),
    Key("name", "str", "the device's name in the platform; {id} is replaced by the device ID"),
    Key("interval", "number", "seconds between measurements (the example application)"),
    Key("binary", "bool", "send data as binary SmartREST (bs/) instead of text (ms/)"),
    Key("keepalive", "int", "MQTT keep-alive in seconds"),
    Key("timeout", "number", "seconds: connect, and each answer during the setup"),
    Key("backoff", "pair", "seconds [first, largest] between reconnect attempts"),
    Key("queue", "pair", "offline queue: [rows in memory, rows on flash (0: none)]"),
    Key("store", "str", "folder of the agent's documents on the board"),
    Key("reserve", "int", "bytes held for the few large allocations (0: none)"),
    Key("restarts", "bool", "boots of their own after reading the ID and after a bootstrap"),
    Key("unload", "bool", "drop the phase modules a state does not use"),
    Key("log", "bool", "print the agent's log lines"),
    Key("wlan", "object", "{\"ssid\", \"password\"}: the WLAN the example application joins on "
                          "boards with one"),
)
_BY_NAME = {k.name: k for k in KEYS}


class ConfigError(ValueError):
    """A setting is unknown or has the wrong type; the message names it."""


def defaults() -> dict[str, Any]:
    from microcot.agent import DEFAULTS

    return dict(DEFAULTS)


def _check(key: Key, value: Any) -> str | None:
    k = key.kind
    if k == "str":
        return None if isinstance(value, str) and value else "a non-empty string"
    if k == "str-or-null":
        return None if value is None or isinstance(value, str) else "a string or null"
    if k == "int":
        return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
            else "a whole number >= 0"
    if k == "number":
        return None if isinstance(value, int | float) and not isinstance(value, bool) \
            and value >= 0 else "a number >= 0"
    if k == "bool":
        return None if isinstance(value, bool) else "true or false"
    if k == "tls":
        return None if value in (True, False, "noverify") else 'true, false or "noverify"'
    if k == "pair":
        ok = isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in value)
        # a range [min, max], except queue: [rows in memory, rows on flash]
        ordered = key.name == "queue" or (ok and value[0] <= value[1])
        return None if ok and ordered else "[a, b], two numbers >= 0 with a <= b"
    if k == "object":
        ok = isinstance(value, dict) and set(value) <= {"ssid", "password"} and all(
            isinstance(v, str) for v in value.values()) and value.get("ssid")
        return None if ok else '{"ssid": "...", "password": "..."}'
    raise AssertionError(k)


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings, checked: unknown keys (a typo must not be ignored) and wrong types raise
    ConfigError naming the key; never the value of a secret."""
    if not isinstance(cfg, dict):
        raise ConfigError("the settings must be a JSON object")
    for name, value in cfg.items():
        key = _BY_NAME.get(name)
        if key is None:
            close = difflib.get_close_matches(name, list(_BY_NAME), n=2)
            raise ConfigError(f"unknown setting {name!r}" +
                              (f" (did you mean {', '.join(close)}?)" if close else ""))
        why = _check(key, value)
        if why is not None:
            shown = SECRET_MASK if key.secret or name == "wlan" else json.dumps(value)[:60]
            raise ConfigError(f"{name}: expected {why}, got {shown}")
    if cfg.get("tls", True) is True and cfg.get("ca") == "":
        raise ConfigError("ca: TLS is verified: give the broker's CA (for the emulator: "
                          "microcot emulator board-config)")
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
    out = dict(cfg)
    for key in KEYS:
        if key.secret and out.get(key.name):
            out[key.name] = SECRET_MASK
    if isinstance(out.get("wlan"), dict) and out["wlan"].get("password"):
        out["wlan"] = dict(out["wlan"], password=SECRET_MASK)
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

@click.group("config")
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
            if _BY_NAME.get(name, Key(name, "str", "")).secret or name == "wlan":
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
