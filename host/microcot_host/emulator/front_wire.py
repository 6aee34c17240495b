"""The MQTT 3.1.1 packets the emulator's front reads and writes, without I/O (DESIGN.md principle 1).

The front (front.py) reads every connection's CONNECT, and the whole conversation of a bootstrap
session; what a device's own client encodes (PUBLISH, PUBACK) comes from the firmware's packet
core `microcot.mqttpkt`, which this module completes with the server's side: CONNECT, SUBSCRIBE
and UNSUBSCRIBE in, CONNACK, SUBACK and PINGRESP out. Any violation of the protocol raises
WireError: the connection is then closed without an answer, as MQTT 3.1.1 wants (and Mosquitto
does).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from microcot import mqttpkt

# CONNACK return codes of MQTT 3.1.1
ACCEPTED = 0
BAD_PROTOCOL = 1
ID_REJECTED = 2
UNAVAILABLE = 3
NOT_AUTHORIZED = 5

PINGRESP = b"\xd0\x00"

_PROTOCOLS = {b"MQTT": 4, b"MQIsdp": 3}  # 3.1.1 and 3.1 share the CONNECT layout


class WireError(ValueError):
    """The peer broke MQTT 3.1.1 (or sent more than we take): close the connection."""


class UnsupportedLevel(WireError):
    """A protocol level other than 3.1 or 3.1.1: answered with CONNACK 1, then closed."""


@dataclass(frozen=True)
class Connect:
    level: int
    clean: bool
    keepalive: int
    client_id: str
    will: bool
    user: str | None
    password: bytes | None = field(repr=False)


class _Cursor:
    """Reads the fields of one packet body; every read is checked against its end."""

    def __init__(self, body: bytes, what: str) -> None:
        self.body = body
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.body):
            raise WireError(f"{self.what}: ends inside a field (byte {self.pos} of "
                            f"{len(self.body)})")
        out = self.body[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        b = self.take(2)
        return b[0] << 8 | b[1]

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        return utf8(self.binary(), self.what)

    def done(self) -> bool:
        return self.pos == len(self.body)


def utf8(raw: bytes, what: str) -> str:
    """An MQTT UTF-8 string: well-formed, without U+0000 (3.1.1 section 1.5.3)."""
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"{what}: a string is not UTF-8") from None
    if "\x00" in s:
        raise WireError(f"{what}: a string holds U+0000")
    return s


def parse_connect(body: bytes) -> Connect:
    """The body of a CONNECT (the bytes after its fixed header)."""
    c = _Cursor(body, "CONNECT")
    name = c.binary()
    level = c.u8()
    if name not in _PROTOCOLS:
        raise WireError(f"CONNECT: protocol name {name[:16]!r}")
    if level != _PROTOCOLS[name]:
        raise UnsupportedLevel(f"CONNECT: protocol level {level}")
    flags = c.u8()
    keepalive = c.u16()
    if flags & 0x01:
        raise WireError("CONNECT: reserved flag set")
    will = bool(flags & 0x04)
    will_qos = (flags >> 3) & 3
    if will_qos == 3 or (not will and flags & 0x38):
        raise WireError("CONNECT: will QoS or retain without a will, or will QoS 3")
    has_user, has_password = bool(flags & 0x80), bool(flags & 0x40)
    if has_password and not has_user:
        raise WireError("CONNECT: a password without a user name")
    client_id = c.text()
    if will:
        c.text()    # will topic
        c.binary()  # will message
    user = c.text() if has_user else None
    password = c.binary() if has_password else None
    if not c.done():
        raise WireError(f"CONNECT: {len(body) - c.pos} bytes after the payload")
    return Connect(level, bool(flags & 0x02), keepalive, client_id, will, user, password)


def parse_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    """(packet id, [(topic filter, requested QoS)]) of a SUBSCRIBE body."""
    c = _Cursor(body, "SUBSCRIBE")
    pid = c.u16()
    subs = []
    while not c.done():
        topic = c.text()
        qos = c.u8()
        if qos > 2:  # reserved bits or QoS 3
            raise WireError(f"SUBSCRIBE: requested QoS byte 0x{qos:02x}")
        subs.append((topic, qos))
    if not pid or not subs:
        raise WireError("SUBSCRIBE without a packet id or a topic filter")
    return pid, subs


def parse_unsubscribe(body: bytes) -> tuple[int, list[str]]:
    c = _Cursor(body, "UNSUBSCRIBE")
    pid = c.u16()
    topics = []
    while not c.done():
        topics.append(c.text())
    if not pid or not topics:
        raise WireError("UNSUBSCRIBE without a packet id or a topic filter")
    return pid, topics


def parse_publish(first: int, body: bytes) -> tuple[str, int, int, bytes]:
    """(topic, QoS, packet id, message) of a PUBLISH; a wildcard in its topic is an error."""
    try:
        qos, pid, end, start = mqttpkt.parse_publish(first, body)
    except mqttpkt.MQTTProtocolError as e:
        raise WireError(str(e)) from None
    topic = utf8(bytes(body[2:end]), "PUBLISH")
    if "+" in topic or "#" in topic:
        raise WireError("PUBLISH: a wildcard in the topic name")
    return topic, qos, pid, bytes(body[start:])


def parse_pid(name: str, body: bytes) -> int:
    try:
        return int(mqttpkt.parse_pid(name, body))
    except mqttpkt.MQTTProtocolError as e:
        raise WireError(str(e)) from None


def connack(code: int, session_present: bool = False) -> bytes:
    return bytes([mqttpkt.CONNACK, 2, 1 if session_present and code == ACCEPTED else 0, code])


def suback(pid: int, codes: list[int]) -> bytes:
    return _with_pid(mqttpkt.SUBACK, pid, bytes(codes))


def unsuback(pid: int) -> bytes:
    return bytes(mqttpkt.ack(mqttpkt.UNSUBACK, pid))


def ack(first: int, pid: int) -> bytes:
    """PUBACK, PUBREC or PUBCOMP (`first` from mqttpkt)."""
    return bytes(mqttpkt.ack(first, pid))


def publish(topic: str, message: bytes, qos: int, pid: int = 0, dup: bool = False) -> bytes:
    return bytes(mqttpkt.publish(topic, message, qos=qos, pid=pid, dup=dup))


def _with_pid(first: int, pid: int, rest: bytes) -> bytes:
    n = 2 + len(rest)
    head = bytearray(1 + mqttpkt.rl_size(n))
    head[0] = first
    mqttpkt.put_rl(head, 1, n)
    return bytes(head) + bytes([pid >> 8, pid & 0xFF]) + rest


def take_packet(buf: bytearray, limit: int) -> tuple[int, bytes, bytes] | None:
    """The first whole packet at the start of `buf` as (first byte, body, packet as received),
    removed from `buf`; None while it is not whole. Same checks as read_packet."""
    if len(buf) < 2:
        return None
    kind = buf[0] >> 4
    if kind in (0, 15):
        raise WireError(f"reserved packet type {kind}")
    rl, n = 0, 1
    while True:
        if n == 5:
            raise WireError("a remaining length longer than 4 bytes")
        if n >= len(buf):
            return None
        b = buf[n]
        rl |= (b & 0x7F) << (7 * (n - 1))
        n += 1
        if not b & 0x80:
            break
    if rl > limit:
        raise WireError(f"a packet of {rl} bytes (the limit is {limit})")
    if len(buf) < n + rl:
        return None
    raw = bytes(buf[:n + rl])
    del buf[:n + rl]
    return raw[0], raw[n:], raw


async def read_packet(reader: asyncio.StreamReader, limit: int) -> tuple[int, bytes, bytes]:
    """(first byte, body, the whole packet as received) of the next packet.

    A remaining length over `limit` is refused as soon as it is known, before its bytes are
    read; a reserved packet type or a remaining length longer than 4 bytes is a WireError.
    asyncio.IncompleteReadError means the peer closed the connection.
    """
    head = bytearray(await reader.readexactly(2))
    kind = head[0] >> 4
    if kind in (0, 15):
        raise WireError(f"reserved packet type {kind}")
    while head[-1] & 0x80:
        if len(head) == 5:
            raise WireError("a remaining length longer than 4 bytes")
        head += await reader.readexactly(1)
    rl = 0
    for b in reversed(head[1:]):
        rl = rl << 7 | (b & 0x7F)
    if rl > limit:
        raise WireError(f"a packet of {rl} bytes (the limit is {limit})")
    body = await reader.readexactly(rl) if rl else b""
    return head[0], body, bytes(head) + body
