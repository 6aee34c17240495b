# umqtt.robust's API (micropython-lib) on microcot's MQTT client, through umqtt/simple.py: a
# program written for umqtt.robust runs unchanged, `from umqtt.robust import MQTTClient`.
#
# As umqtt.robust does it: publish(), wait_msg() and check_msg(attempts=2) catch OSError (a
# lost or broken link, see simple.py), call log(False, e) and reconnect() and try again;
# publish and wait_msg until they succeed, check_msg `attempts` times, then it returns None.
# reconnect() calls connect(False) until it succeeds, after each failure log(True, e) and
# delay(i) (i = 1, 2, ...: sleeps DELAY seconds); subclasses override delay and log. Messages
# print only with DEBUG. A refusal (MQTTException with the CONNACK code) is not retried: it
# leaves reconnect(). connect() itself is not retried, as in umqtt.robust.
# A QoS 1 message whose link failed before its PUBACK is published again by the retry, once.
import time

from . import simple


class MQTTClient(simple.MQTTClient):
    DELAY = 2
    DEBUG = False

    def delay(self, i):
        time.sleep(self.DELAY)

    def log(self, in_reconnect, e):
        if self.DEBUG:
            print(("mqtt reconnect: %r" if in_reconnect else "mqtt: %r") % (e,))

    def reconnect(self):
        i = 0
        while True:
            try:
                return self.connect(False)
            except OSError as e:
                i += 1
                self.log(True, e)
                self.delay(i)

    def _retry(self, call, tries=None):
        # call() until it returns; a broken link in between is logged and reconnected
        while tries is None or tries > 0:
            try:
                return call()
            except OSError as e:
                self.log(False, e)
            self.reconnect()
            if tries is not None:
                tries -= 1
        return None

    def publish(self, topic, msg, retain=False, qos=0):
        return self._retry(lambda: simple.MQTTClient.publish(self, topic, msg, retain, qos))

    def wait_msg(self, timeout_ms=None):
        return self._retry(lambda: simple.MQTTClient.wait_msg(self, timeout_ms))

    def check_msg(self, attempts=2):
        return self._retry(lambda: simple.MQTTClient.check_msg(self), attempts)
