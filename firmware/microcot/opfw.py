# c8y_Firmware (agent.py _MANAGED, template 207: name, version, url, sha256): the image is
# downloaded over HTTPS (httpget.py: the device's own credentials, TLS verified with the agent's
# CA, resumed with Range after a broken connection, SHA-256 checked when the operation has one)
# straight into the inactive OTA partition (ota.py), activated, and the board is reset into it.
#
# The download runs in a boot of its own (link.py): a connected agent on the ESP32 leaves about
# 7 KB of heap (plus its 12 KB reserve), and the download's code alone (httpget, ota, this
# module) takes 17 KB (measured on the ESP32 model, tests/host/test_agent_firmware.py). So the
# handler checks the operation, stores stage "boot" with what the download needs, and restarts
# the board; boot() then runs before the agent loads its MQTT code: stage "fetching" first (a
# reboot during the download is reported FAILED, never downloads again), then "reboot" and a
# hard reset into the new image, or "failed" with the reason and the boot goes on to report it.
# The MQTT session (clean_session=False) keeps what the platform sends meanwhile; EXECUTING
# was acknowledged before the restart.
#
# After the reset the new firmware runs on trial: the ESP-IDF bootloader rolls back at the next
# reset unless the app confirms it. The agent confirms it only once it has connected to the
# platform again (resume(), called by create.finish): then the operation is SUCCESSFUL and the
# device's c8y_Firmware (103) names the new firmware. If the new firmware does not connect
# within cfg "app_trial" seconds, the agent resets the board (the record's data says "trial":
# agent.step), the bootloader boots the previous firmware, and that one reports FAILED: it
# finds itself running in the other partition. An image that crashes at boot is rolled back by
# the bootloader at once, with the same report. Boards without OTA partitions (rp2, an ESP32
# build without ota_0/ota_1) fail the operation at once, saying so.
from . import hal, ota, tpl
from .ops import Failed, reason, sha256
from .state import Restart, js


def handle(s, op):
    v = op.values + [""] * 4
    name, version, url = v[0], v[1], v[2]
    sha = sha256(v[3], "c8y_Firmware")
    if not url.startswith("https://") and not url.startswith("http://"):
        raise Failed("c8y_Firmware: the url must be https:// (got %r)" % url[:80])
    try:
        ota.status()  # OTAUnsupported: rp2, the unix port, a build without OTA partitions
    except ota.OTAError as e:
        raise Failed(str(e))
    from .link import settle

    settle(s)  # EXECUTING acknowledged before the restart
    op.stage("boot", {"name": name, "version": version, "url": url, "sha256": sha})
    raise Restart("c8y_Firmware %s: downloading in a boot of its own" % op.id)


def boot(s, rec):
    """The download, before the agent connects (agent.start): the image into the next OTA
    partition, activated, a hard reset into it; or the record says why not."""
    db = s.db()
    d = rec["data"]
    rec["stage"] = "fetching"
    db.save("op", rec)
    try:
        from .httpget import Download
        from .tlsctx import for_config

        url = d["url"]
        sha = d.get("sha256") or None
        w = ota.Writer()
        s.log("c8y_Firmware %s: downloading %s into %s" % (rec["id"], url, w.label))
        dl = Download(url, w, sha256=sha, user=s.http_user(), password=s.cred["password"],
                      ssl_context=for_config(s.cfg) if url.startswith("https:") else None,
                      timeout=s.cfg["timeout"], max_size=w.capacity)
        while not dl.step():
            pass
        desc = w.finish(sha256=sha)
        s.log("c8y_Firmware %s: %d bytes in %s, image %s %s" % (
            rec["id"], w.written, w.label, desc["project"], desc["version"]))
        w.activate()
    except Exception as e:
        rec["stage"] = "failed"
        d["why"] = reason(e)
        db.save("op", rec)
        s.log("c8y_Firmware %s: failed: %s" % (rec["id"], d["why"]))
        return
    rec["stage"] = "reboot"
    d["label"] = w.label
    d["trial"] = True
    db.save("op", rec)
    s.q.flush()
    s.log("c8y_Firmware %s: resetting into %s" % (rec["id"], w.label))
    ota.reboot()
    while True:  # the virtual board's host may take a moment to restart the interpreter
        hal.sleep_ms(100)


def resume(s, rec):
    """After a reboot that came during the update (create.finish, connected): True when the new
    firmware runs (it is confirmed now), else why not."""
    stage = rec.get("stage")
    d = rec.get("data")
    if stage == "failed" and isinstance(d, dict):
        return d.get("why") or "download failed"
    if stage != "reboot" or not isinstance(d, dict):
        return "interrupted by a reboot during the %s" % ("download" if stage == "fetching"
                                                          else stage)
    try:
        r = ota.running()
    except ota.OTAError as e:
        return str(e)
    if r["label"] != d.get("label"):
        return ("the new firmware did not come up: the bootloader rolled back to %s (version %s)"
                % (r["label"], r["version"]))
    if not ota.mark_valid():
        s.log("c8y_Firmware: this build has no rollback support (nothing to confirm)")
    dev = s.dev
    dev["fw"] = {"name": d.get("name") or "firmware", "version": d.get("version") or "",
                 "url": d.get("url") or ""}
    m = int(s.mo)
    model = hal.config().get("name") or hal.family()
    # the inventory's c8y_Firmware now names it; the fingerprint follows at the next boot
    from .smartrest import row  # here: the download's boot (boot()) can do without it

    s.st.append(s.body(row((tpl.HARDWARE, m, js(s.id), js(model), js(dev["fw"]["name"]),
                            js(dev["fw"]["version"]), js(dev["fw"]["url"])))))
    dev["info"] = None
    s.db().save("dev", dev)
    return True
