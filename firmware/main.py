# microcot example application: a Cloud of Things device that measures its temperature.
# Settings: /microcot.json (see microcot/agent.py DEFAULTS); the templates: /templates.csv.
# Runs forever; Ctrl-C (mpremote, a terminal) stops it like any main.py.
from microcot import hal
from microcot.agent import Agent

_n = [0]


def temperature():
    """The MCU's temperature in degrees Celsius; a synthetic value on the virtual board."""
    fam = hal.family()
    if fam == "esp32":
        import esp32

        if hasattr(esp32, "mcu_temperature"):
            return float(esp32.mcu_temperature())
        return (esp32.raw_temperature() - 32) / 1.8
    if fam == "rp2":
        from machine import ADC

        volts = ADC(4).read_u16() * 3.3 / 65535
        return 27 - (volts - 0.706) / 0.001721
    _n[0] += 1  # a slow saw tooth between 20 and 25
    return 20 + (_n[0] % 50) / 10


def network(cfg):
    """Join the WLAN of /microcot.json "wlan" {"ssid", "password"} on boards that have one, and
    set the clock (measurements carry the device's time)."""
    w = cfg.get("wlan")
    if not w or hal.family() not in ("esp32", "rp2"):
        return
    import time

    import network

    nic = network.WLAN(network.STA_IF)
    nic.active(True)
    if not nic.isconnected():
        nic.connect(w["ssid"], w["password"])
        for _ in range(200):
            if nic.isconnected():
                break
            time.sleep_ms(100)
    try:
        import ntptime

        ntptime.settime()
    except Exception as e:
        print("main: no NTP time:", e)


def main():
    a = Agent()
    network(a.cfg)
    # not ticks_ms() // 1000: that restarts at 0 when ticks_ms wraps (12.4 days on a 32-bit
    # board); Uptime counts on, updated by a timer well within the wrap
    up = hal.Uptime()
    a.every(3600, up.update)
    a.command("uptime", lambda args: "%d s" % up.seconds())
    a.command("echo", lambda args: args)
    a.command("mem", lambda args: "%d bytes free" % hal.mem_free())
    a.command("temperature", lambda args: "%.1f C" % temperature())

    def measure():
        a.measure("c8y_Temperature", "T", round(temperature(), 2), "C")

    a.every(a.cfg["interval"], measure, at_once=True)
    a.run()


main()
