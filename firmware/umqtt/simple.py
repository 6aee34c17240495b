# umqtt.simple's API (micropython-lib) on microcot's MQTT client (microcot/mqtt.py): a program
# written for umqtt.simple runs unchanged, `from umqtt.simple import MQTTClient, MQTTException`.
# `microcot deploy` puts this package at /umqtt, ahead of a firmware's frozen umqtt ('' comes
# before '.frozen' and '/lib' in sys.path; the stock ESP32 firmware freezes micropython-lib's).
#
# As umqtt.simple does it:
# - MQTTClient(client_id, server, port=0, user=None, password=None, keepalive=0, ssl=None,
#   ssl_params={}); set_callback, set_last_will, connect(clean_session=True, timeout=None) ->
#   session present, disconnect, ping, publish, subscribe, unsubscribe, wait_msg, check_msg.
# - publish(qos=1) returns once the PUBACK came. If the link fails first, or no PUBACK comes
#   within `timeout` (10 s; umqtt would wait for ever; the connection is closed: ETIMEDOUT), the
#   message is the caller's again (a later connect() does not send it): a retry, as umqtt.robust
#   makes, sends it once more, not twice.
# - A refusal raises MQTTException with the return code as args[0] (and .code): CONNACK 1..5
#   from connect() (5: not authorized; a broker that refuses a will answers so), SUBACK 0x80
#   from subscribe(). str() says what it means.
# - A link that fails raises OSError, as umqtt's socket does: ETIMEDOUT for a timeout, ENOMEM
#   for a packet the heap had no room for, ECONNABORTED for TLS (the handshake failed, or no CA
#   to verify the broker with), else ECONNRESET; the text names the cause and .error
#   is the client's own exception. A broker that sends a malformed or oversized packet, or
#   garbage for a CONNACK, has broken the link: the connection is closed and OSError raised.
#   Other errors (ValueError for a bad argument, the callback's own) pass unchanged.
# Better than umqtt.simple: TLS is verified (ssl=True takes ssl_params' CA or the board's, see
# microcot/mqtt.py), wait_msg/check_msg send the keep-alive pings, timeouts bound every wait,
# and a broker's packet is bounded by max_packet (16 KiB) before anything is allocated for it.
from errno import ECONNABORTED, ECONNRESET, ENOMEM, ETIMEDOUT

from microcot.mqtt import MQTTClient as _Client
from microcot.mqttpkt import (
    MQTTConnectError,
    MQTTException,
    MQTTMemoryError,
    MQTTSubscribeError,
    MQTTTimeout,
    MQTTTLSError,
)

__all__ = ("MQTTClient", "MQTTException", "MQTTRefused", "MQTTLinkError")


class MQTTRefused(MQTTException):
    """A refusal by the broker: args[0] is its return code, as umqtt's MQTTException has it."""

    def __init__(self, code, text):
        super().__init__(code)
        self.code = code
        self.text = text

    def __str__(self):
        return self.text


class MQTTLinkError(OSError):
    """The connection failed and is closed; .error is the MQTT client's exception."""

    def __init__(self, errno, error):
        super().__init__(errno, str(error))
        self.error = error


class MQTTClient(_Client):
    def __init__(self, client_id, server, port=0, user=None, password=None, keepalive=0,
                 ssl=None, ssl_params=None, **kw):
        super().__init__(client_id, server, port, user, password, keepalive, ssl, ssl_params,
                         **kw)

    def _umqtt(self, e):
        """The exception umqtt.simple would raise for the client's `e`."""
        if isinstance(e, (MQTTConnectError, MQTTSubscribeError)):
            return MQTTRefused(e.code, str(e))
        if self.sock is not None:  # the link is up: an error of the call, not of the link
            return e
        if isinstance(e, MQTTMemoryError):
            return MQTTLinkError(ENOMEM, e)
        if isinstance(e, MQTTTimeout):
            return MQTTLinkError(ETIMEDOUT, e)
        if isinstance(e, MQTTTLSError):  # a handshake refused, or no CA to verify with
            return MQTTLinkError(ECONNABORTED, e)
        if isinstance(e, MQTTException):
            return MQTTLinkError(ECONNRESET, e)
        return e

    def _forget(self, pid):
        i = -1 if pid is None else self._find(pid)
        if i >= 0:
            self._out.pop(i)

    def connect(self, clean_session=True, timeout=None):
        try:
            return _Client.connect(self, clean_session, timeout)
        except (MQTTException, MemoryError) as e:
            raise self._umqtt(e)

    def publish(self, topic, msg, retain=False, qos=0):
        pid = None
        try:
            pid = _Client.publish(self, topic, msg, retain, qos)
            if pid is not None and not self.wait_puback(pid):
                self._fail(MQTTTimeout("no PUBACK for packet id %d within %d s"
                                       % (pid, self.timeout)))
        except Exception as e:
            self._forget(getattr(e, "pid", None) if pid is None else pid)
            raise self._umqtt(e)

    def subscribe(self, topic, qos=0):
        try:
            return _Client.subscribe(self, topic, qos)
        except (MQTTException, MemoryError) as e:
            raise self._umqtt(e)

    def unsubscribe(self, topic):
        try:
            _Client.unsubscribe(self, topic)
        except (MQTTException, MemoryError) as e:
            raise self._umqtt(e)

    def ping(self):
        try:
            _Client.ping(self)
        except (MQTTException, MemoryError) as e:
            raise self._umqtt(e)

    def wait_msg(self, timeout_ms=None):
        try:
            return _Client.wait_msg(self, timeout_ms)
        except (MQTTException, MemoryError) as e:
            raise self._umqtt(e)

    def check_msg(self):
        try:
            return _Client.poll(self, 0)
        except (MQTTException, MemoryError) as e:
            raise self._umqtt(e)
