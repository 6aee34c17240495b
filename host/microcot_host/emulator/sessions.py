"""The connector's MQTT sessions at the broker, per layout, and the draining of those that a new
layout no longer has.

A layout is the number of connector processes (`--workers N`, workers.py):

    N = 1   microcot-connector            ms/+ bs/+ ss/+
    N >= 2  microcot-connector            ss/+
            microcot-connector-<k>-of-<N> ms/<ID> bs/<ID> of the devices of worker k

Every one is a persistent session: Mosquitto keeps its subscriptions and queues the messages they
match while nobody is connected. A session of an earlier layout left alone would queue a copy of
every message of its devices for ever, and its queue holds messages nobody has served yet. So at
start, before the MQTT front opens (no device is connected, nothing new can arrive), `settle`
drains each recorded session that the new layout does not have with the same topics: a
connector connects under its client id, serves everything that was queued for it, in order,
until the marker it published after connecting comes back (Connector.drain), and the session is
then deleted (MQTT 5 clean start with a session expiry of 0), its applied records with it.

The sessions that may hold subscriptions are recorded in the settings table (`SETTING`: client id
-> topic filters). A data directory without the record was run with the single connector. The
record is written before a new layout's sessions subscribe anything, and a drained session leaves
it only once it is deleted, so a crash at any point leaves every session that may still hold
subscriptions recorded, and the next start drains it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from .connector import CLIENT_ID, TOPICS, Connector, ConnectorError

log = logging.getLogger(__name__)

SETTING = "connector.sessions"
DRAIN_TIMEOUT = 120.0


def layout(n: int) -> dict[str, list[str]]:
    """The sessions of n connector processes: client id -> topic filters (by name)."""
    from .workers import worker_client_id  # workers imports this module's neighbours

    if n <= 1:
        return {CLIENT_ID: list(TOPICS)}
    out = {CLIENT_ID: ["ss/+"]}
    for k in range(n):
        out[worker_client_id(k, n)] = [f"ms/<devices {k + 1} of {n}>",
                                       f"bs/<devices {k + 1} of {n}>"]
    return out


def recorded(settings: Any) -> dict[str, list[str]]:
    """The recorded sessions (the single connector's when nothing is recorded)."""
    raw = settings.get_setting(SETTING)
    if raw is None:
        return layout(1)
    try:
        value = json.loads(raw)
    except ValueError:
        log.error("setting %s is not JSON: taken as the single connector's", SETTING)
        return layout(1)
    return {str(k): [str(t) for t in v] for k, v in value.items()} if isinstance(value, dict) \
        else layout(1)


def settle(model: Any, target: dict[str, list[str]],
           make_connector: Callable[[str], Connector], delete_session: Callable[[str], None],
           timeout: float = DRAIN_TIMEOUT) -> list[str]:
    """Drain and delete every recorded session that `target` does not have with the same
    topics; record `target` (in `model`'s settings). The client ids drained. ConnectorError if one could not be
    drained (it stays recorded: the next start tries again)."""
    stored = recorded(model)
    stale = [cid for cid, topics in stored.items() if target.get(cid) != topics]
    record = dict(stored)
    for cid, topics in target.items():
        record.setdefault(cid, topics)
    _save(model, record)
    for cid in stale:
        log.info("session %s (%s) is not in this layout: serving what it holds, then deleting "
                 "it", cid, " ".join(stored[cid]))
        c = make_connector(cid)
        c.start()
        try:
            if not c.drain(timeout):
                raise ConnectorError(f"session {cid} could not be drained within "
                                     f"{timeout:.0f} s; it stays, and the next start tries "
                                     "again")
        finally:
            c.stop()
        delete_session(cid)
        model.forget_session(cid)
        if cid in target:
            record[cid] = target[cid]
        else:
            del record[cid]
        _save(model, record)
    if stale:
        log.info("sessions of the earlier layout drained and deleted: %s", ", ".join(stale))
    return stale


def _save(settings: Any, record: dict[str, list[str]]) -> None:
    settings.set_setting(SETTING, json.dumps(record, sort_keys=True))


def delete_session(broker: Any, client_id: str, timeout: float = 10.0) -> None:
    """End the broker's session `client_id` (subscriptions and queue): connect with a clean
    start and a session expiry of 0, then disconnect."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    creds = broker.connector_credentials()
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(creds.user, creds.password)
    ctx = broker.client_ssl_context()
    if ctx is not None:
        c.tls_set_context(ctx)
    done = threading.Event()
    result: list[str] = []

    def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        result.append(str(rc) if rc.is_failure else "")
        done.set()

    c.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    c.connect(broker.local_host, broker.port, keepalive=30, clean_start=True, properties=props)
    c.loop_start()
    try:
        if not done.wait(timeout) or result[0]:
            raise ConnectorError(f"deleting session {client_id}: "
                                 f"{result[0] if result else 'no answer from the broker'}")
    finally:
        with contextlib.suppress(Exception):
            c.disconnect()
        c.loop_stop()
