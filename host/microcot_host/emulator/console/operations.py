"""The operations a person can send from a device's page, as simple forms.

One `Kind` per operation the microcot agent serves (firmware/templates.csv's response templates
202-211): its fragment, a description as Cumulocity's UI writes one, and its form fields. `body()`
turns a submitted form into the REST body of `POST /devicecontrol/operations`; the API checks it
like any other (the console adds no rules of its own beyond the fields a kind needs).
`summary()` is the one line an operation's row shows: what was asked, and what came back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

JSON = dict[str, Any]

MAX_FIELD = 4096  # a form field's length; larger is refused before the API sees it


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    required: bool = False
    multiline: bool = False
    placeholder: str = ""
    default: str = ""


@dataclass(frozen=True)
class Kind:
    fragment: str
    title: str
    fields: tuple[Field, ...] = ()

    def description(self, values: Mapping[str, str]) -> str:
        if self.fragment == "c8y_Command":
            return f"Execute shell command: {values.get('text', '')}"
        if self.fragment in ("c8y_Firmware", "c8y_SoftwareUpdate"):
            return f"{self.title}: {values.get('name', '')} {values.get('version', '')}".rstrip()
        return self.title


KINDS: tuple[Kind, ...] = (
    Kind("c8y_Command", "Execute shell command",
         (Field("text", "Command", True, placeholder="e.g. uptime"),)),
    Kind("c8y_Restart", "Restart device"),
    Kind("c8y_Firmware", "Update firmware",
         (Field("name", "Name", True), Field("version", "Version", True),
          Field("url", "URL", True, placeholder="https://…/inventory/binaries/<id>"),
          Field("sha256", "SHA-256 (optional)"))),
    Kind("c8y_SoftwareUpdate", "Install application",
         (Field("name", "Name", True), Field("version", "Version", True),
          Field("url", "URL", True, placeholder="https://…/inventory/binaries/<id>"),
          Field("sha256", "SHA-256 (optional)"))),
    Kind("c8y_Configuration", "Send configuration",
         (Field("config", "Configuration (a JSON object of settings)", True, multiline=True,
                placeholder='{"interval": 60}'),)),
    Kind("c8y_SendConfiguration", "Request configuration"),
    Kind("c8y_LogfileRequest", "Request log file",
         (Field("logFile", "Log", True, default="agent"), Field("dateFrom", "From (ISO time)"),
          Field("dateTo", "To (ISO time)"), Field("searchText", "Containing"),
          Field("maximumLines", "Lines at most", default="200"))),
)
BY_FRAGMENT = {k.fragment: k for k in KINDS}


class FormError(ValueError):
    """A submitted form the console cannot turn into an operation; the message says why."""


def body(device_id: str, form: Mapping[str, str]) -> JSON:
    """The REST body for the operation the form describes (field `kind` names the fragment)."""
    kind = BY_FRAGMENT.get(form.get("kind", ""))
    if kind is None:
        raise FormError("unknown operation")
    values: dict[str, str] = {}
    for f in kind.fields:
        v = form.get(f.name, "")
        if len(v) > MAX_FIELD:
            raise FormError(f"{f.label}: at most {MAX_FIELD} characters")
        v = v if f.multiline else v.strip()
        if f.required and not v.strip():
            raise FormError(f"{f.label} is needed")
        if v:
            values[f.name] = v
    frag: JSON | list[JSON]
    if kind.fragment == "c8y_SoftwareUpdate":
        frag = [{**values, "action": "install"}]
    elif kind.fragment == "c8y_Configuration":
        try:
            parsed = json.loads(values["config"])
        except ValueError as e:
            raise FormError(f"the configuration is not JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise FormError("the configuration must be a JSON object of settings")
        # the agent reads the text of `config` (template 209) and parses it itself
        frag = {"config": json.dumps(parsed, separators=(",", ":"))}
    elif kind.fragment == "c8y_LogfileRequest" and "maximumLines" in values:
        if not values["maximumLines"].isdigit():
            raise FormError("Lines at most: a whole number")
        frag = {**values, "maximumLines": int(values["maximumLines"])}
    else:
        frag = dict(values)
    return {"deviceId": device_id, "description": kind.description(values), kind.fragment: frag}


def fragment_of(op: JSON) -> str:
    """The operation's kind: the first of ours it holds, else any other fragment."""
    for k in KINDS:
        if k.fragment in op:
            return k.fragment
    for key, v in op.items():
        if isinstance(v, dict | list) and key not in ("self", "deviceExternalIDs"):
            return key
    return "operation"


def summary(op: JSON) -> str:
    """What the operation asked and what came back, on one line."""
    frag = fragment_of(op)
    content = op.get(frag)
    parts: list[str] = []
    if frag == "c8y_Command" and isinstance(content, dict):
        parts.append(f"$ {content.get('text', '')}")
    elif isinstance(content, dict):
        shown = {k: v for k, v in content.items() if k not in ("result", "file")}
        if shown:
            parts.append(", ".join(f"{k}={v}" for k, v in shown.items()))
    elif isinstance(content, list) and content and isinstance(content[0], dict):
        first = content[0]
        parts.append(" ".join(str(first.get(k, "")) for k in ("action", "name", "version")))
    if isinstance(content, dict) and content.get("result"):
        parts.append(f"→ {content['result']}")
    if op.get("failureReason"):
        parts.append(f"failed: {op['failureReason']}")
    return "  ".join(p for p in parts if p.strip())
