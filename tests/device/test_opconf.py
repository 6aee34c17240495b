# c8y_SendConfiguration and c8y_Configuration on both runtimes (opconf.py, settings.py, and
# agent.load_config's recovery): the rules of /microcot.json, masking, the operations' rows and
# the atomic replacement of the file under a power cut at every point, on a filesystem whose
# rename replaces a file and on one where it cannot (FAT).
import json
import os

from dt import free, raises, rmtree, scratch_dir

XID = "microcotT"
PW = "Bootstrap-Pw-9x"
WPW = "wlan-Pw-77"
CA = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n"
BASE = {"host": "cot.example", "port": 8883, "ca": CA, "bootstrap_user": "devicebootstrap",
        "bootstrap_password": PW, "interval": 5, "log": False,
        "wlan": {"ssid": "shop", "password": WPW}}


def _exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False


def _put(path, cfg):
    with open(path, "w") as f:
        f.write(json.dumps(cfg))


def _get(path):
    with open(path) as f:
        return f.read()


def _clean(d):
    # scratch dirs are flat; the agent's store is a subfolder of its own
    st = d + "/store"
    if _exists(st):
        rmtree(st)
    rmtree(d)


# -- the rules ----------------------------------------------------------------------------------

def test_every_setting_has_a_rule_and_the_defaults_pass():
    from microcot import agent, settings

    assert sorted(settings.KINDS) == sorted(list(agent.DEFAULTS) + ["wlan"])
    assert settings.check(dict(agent.DEFAULTS)) is None
    for m in agent._MANAGED:  # every built-in operation can be named in "manage"
        assert m[0] in settings.MANAGE
    free("settings")


def test_bad_settings_name_the_key_and_never_the_value():
    from microcot.settings import check, why

    bad = [
        ({"hots": "x"}, "hots: unknown setting"),
        ({"port": 0}, "port: expected a whole number from 1 to 65535"),
        ({"port": 65536}, "port: expected"),
        ({"port": "8883"}, "port: expected"),
        ({"port": True}, "port: expected"),
        ({"keepalive": 0}, "keepalive: expected"),
        ({"timeout": 0}, "timeout: expected a number > 0"),
        ({"interval": -1}, "interval: expected"),
        ({"tls": "yes"}, 'tls: expected true, false or "noverify"'),
        ({"backoff": [5, 1]}, "backoff: expected [a, b]"),
        ({"backoff": [1, 2, 3]}, "backoff: expected"),
        ({"bootstrap_delay": [-1, 2]}, "bootstrap_delay: expected"),
        ({"queue": [0, 10]}, "queue: expected"),
        ({"queue": [4.5, 10]}, "queue: expected"),
        ({"log": 1}, "log: expected true or false"),
        ({"host": ""}, "host: expected a non-empty string"),
        ({"bootstrap_password": 12345}, "bootstrap_password: expected a string or null"),
        ({"wlan": {"ssid": "x", "pass": "y"}}, "wlan: expected"),
        ({"wlan": {"password": "y"}}, "wlan: expected"),
        ({"manage": ["firmware", "coffee"]}, "manage: expected a list of"),
        ({"reserve": -1}, "reserve: expected a whole number >= 0"),
        ({"tls": True, "ca": ""}, "ca: TLS is verified"),
    ]
    for cfg, want in bad:
        got = check(cfg)
        assert got is not None and got.startswith(want), (cfg, got)
        assert "12345" not in got
    assert check([1]) == "the configuration must be a JSON object"
    # the rules between keys see the settings being updated
    assert check({"ca": ""}, {"tls": False}) is None
    assert check({"tls": True}, {"tls": False, "ca": ""}).startswith("ca: TLS is verified")
    # keys already there are not checked again: an old oddity must not block every change
    assert check({"interval": 3}, {"legacy": 1}) is None
    ok = {"port": 1, "keepalive": 65535, "tls": "noverify", "backoff": [0.5, 0.5],
          "queue": [1, 0], "bootstrap_delay": [0, 0.2], "ca": None, "manage": [],
          "wlan": {"ssid": "x"}, "interval": 0.5}
    assert check(ok) is None
    assert why("port", 443) is None and why("nope", 1) == "unknown setting"
    free("settings")


def test_secrets_are_masked_and_a_masked_one_keeps_the_device_s():
    from microcot.settings import MASK, PEM, masked, unmask

    cfg = dict(BASE, api_secret="s3", ca=CA, bootstrap_user="bu")
    m = masked(cfg)
    assert m["bootstrap_password"] == MASK and m["wlan"] == {"ssid": "shop", "password": MASK}
    assert m["ca"] == PEM  # not a secret, but too long for the heap (opconf.py)
    assert masked({"ca": "/ca.pem"}) == {"ca": "/ca.pem"}
    assert m["api_secret"] == MASK and m["bootstrap_user"] == "bu" and m["host"] == "cot.example"
    assert PW not in json.dumps(m) and WPW not in json.dumps(m)
    assert cfg["bootstrap_password"] == PW  # a copy
    assert masked({"bootstrap_password": None, "wlan": {"ssid": "x", "password": ""}}) == {
        "bootstrap_password": None, "wlan": {"ssid": "x", "password": ""}}  # nothing to hide
    back = unmask(dict(m, interval=9), cfg)
    assert back["bootstrap_password"] == PW and back["wlan"]["password"] == WPW
    assert back["ca"] == CA
    assert back["interval"] == 9
    assert unmask({"bootstrap_password": "new"}, cfg) == {"bootstrap_password": "new"}
    assert unmask({"name": MASK}, cfg) == {"name": MASK}  # not a secret: taken as it is
    assert unmask({"bootstrap_password": MASK}, {}) == {"bootstrap_password": None}
    free("settings")


# -- atomic replacement and the recovery at load time ---------------------------------------------

class Cut(Exception):
    """The power goes: nothing after it happens."""


class Fs:
    """os's rename and remove, cut after `cut` calls; fat: rename refuses an existing target."""

    def __init__(self, fat, cut=-1):
        self.fat = fat
        self.cut = cut
        self.n = 0

    def _step(self):
        if self.n == self.cut:
            raise Cut()
        self.n += 1

    def rename(self, a, b):
        self._step()
        if self.fat and _exists(b):
            raise OSError(17)  # EEXIST
        os.rename(a, b)

    def remove(self, p):
        self._step()
        os.remove(p)


def test_write_replaces_the_file_on_either_filesystem():
    from microcot.opconf import write

    d = scratch_dir("cwrite")
    try:
        p = d + "/microcot.json"
        for fat, calls in ((False, 1), (True, 5)):
            _put(p, {"interval": 1})
            fs = Fs(fat)
            write(p, {"interval": 2}, fs)
            assert _get(p) == '{"interval":2}' and fs.n == calls, (fat, fs.n)
            assert sorted(os.listdir(d)) == ["microcot.json"]  # nothing left beside it
        os.remove(p)
        write(p, {"interval": 3}, Fs(True))  # no file yet
        assert _get(p) == '{"interval":3}'
    finally:
        rmtree(d)


def test_a_power_cut_at_any_point_of_the_switch_leaves_the_old_or_the_new_file():
    from microcot.agent import load_config
    from microcot.opconf import write

    d = scratch_dir("ccut")
    try:
        p = d + "/microcot.json"
        old = {"interval": 1, "host": "old.example"}
        new = {"interval": 2, "host": "new.example"}
        for fat in (False, True):
            seen = []
            for cut in range(6):
                for n in os.listdir(d):
                    os.remove(d + "/" + n)
                _put(p, old)
                try:
                    write(p, new, Fs(fat, cut))
                    done = True
                except Cut:
                    done = False
                cfg = load_config(p)  # the next boot
                got = {"interval": cfg["interval"], "host": cfg["host"]}
                assert got in (old, new), (fat, cut, got)
                assert cfg["file"] == [p, got]  # the file's own keys (opconf.py)
                # recovered: the file is there again, valid, as loaded
                assert json.loads(_get(p)) == got, (fat, cut)
                seen.append(got == new)
                write(p, old)  # and the next change works
                assert json.loads(_get(p)) == old
                if done:
                    break
            # the switch happened at its point: new from the cut after it on, old before
            assert seen == ([False, True] if not fat else [False, False, False, True, True, True]), \
                (fat, seen)
        # the new text cut short while being written: the old file stays
        _put(p, old)
        with open(p + ".new", "w") as f:
            f.write('{"interval": 2, "ho')
        assert load_config(p)["host"] == "old.example"
        # a switch cut short after the old file stepped aside, the new one cut short too
        # (cannot happen: the new one is closed before), or no file at all: the defaults
        os.rename(p, p + ".old")
        assert load_config(p)["host"] == "old.example" and _exists(p)
        for n in os.listdir(d):
            os.remove(d + "/" + n)
        assert load_config(p)["interval"] == 60 and not _exists(p)
        _put(p, [1])
        assert "not a JSON object" in str(raises(ValueError, load_config, p))
    finally:
        rmtree(d)


# -- the operations -------------------------------------------------------------------------------

def _agent(d, cfg=None):
    """An agent with the settings file cfg (BASE; None: the file as it is), as after a boot."""
    from microcot.agent import Agent

    p = d + "/microcot.json"
    if cfg is not None:
        _put(p, cfg)
    a = Agent(path=p, store=d + "/store", xid=XID, log=False, queue=[8, 0], reserve=0,
              log_ring=0)
    a.s.id = "TESTDEV1"
    a.s.mo = "10"
    a.s.ready = True  # but without a client: the rows wait in a.s.st
    return a, p


def _config_of(row):
    """The configuration a 108 row carries, as the platform stores it: the value goes into the
    template's JSON string as it is."""
    from microcot.smartrest import parse_rows

    v = parse_rows(row.split(b"\n", 1)[1])[0]
    assert v[0] == "108" and v[1] == "10", v
    return json.loads(json.loads('"' + v[2] + '"'))


def _op(a, row):
    from microcot import link

    a._on_msg(b"mr/TESTDEV1", row)
    link.handle_ops(a.s)


def test_send_configuration_reports_the_file_s_keys_with_secrets_masked():
    d = scratch_dir("csend")
    try:
        from microcot import settings, smartrest
        from microcot.state import js

        a, p = _agent(d, BASE)
        _op(a, b"210,1,21,10")
        st = a.s.st
        pre = b"15," + XID.encode() + b"\n"
        assert st[0] == pre + b"130,21" and st[2] == pre + b"131,21" and len(st) == 3, st
        assert PW.encode() not in st[1] and WPW.encode() not in st[1]
        # escaped as the agent's other rows are (state.js, smartrest.row), built with less heap
        text = json.dumps(settings.masked(a.cfg["file"][1]), separators=(",", ":"))
        assert st[1] == a.s.body(smartrest.row((108, 10, js(text))))
        got = _config_of(st[1])
        assert got == dict(BASE, bootstrap_password="********", ca="<PEM text>",
                           wlan={"ssid": "shop", "password": "********"})  # no defaults added
        assert a.s.db().load("op") is None
    finally:
        _clean(d)
    free("opconf", "settings")


def test_a_bad_configuration_fails_naming_the_key_and_changes_nothing():
    d = scratch_dir("cbad")
    try:
        a, p = _agent(d, BASE)
        before = _get(p)
        pre = b"15," + XID.encode() + b"\n"
        for n, text, why in ((31, '{"port": 70000}', b"port: expected a whole number"),
                             (32, '{"intervall": 3}', b"intervall: unknown setting"),
                             (33, '{"interval": 3, "keepalive": "60"}', b"keepalive: expected"),
                             (34, "[1, 2]", b"must be a JSON object"),
                             (35, '{"interval": 3', b"not valid JSON"),
                             (36, '{"store": "/elsewhere"}', b"store: not changed remotely")):
            a.s.st = []
            from microcot import smartrest

            _op(a, smartrest.row([209, 1, n, 10, text]).encode())
            assert a.s.st[0] == pre + b"130,%d" % n, a.s.st
            assert a.s.st[-1].startswith(pre + b"132,%d," % n) and why in a.s.st[-1], a.s.st
            assert len(a.s.st) == 2  # no configuration sent: nothing changed
        assert _get(p) == before and sorted(os.listdir(d)) == ["microcot.json", "store"]
        assert a.cfg["log"] is False
    finally:
        _clean(d)
    free("opconf", "settings")


def test_a_change_that_applies_live_needs_no_restart():
    from microcot import opconf, smartrest

    d = scratch_dir("clive")
    try:
        a, p = _agent(d, BASE)
        sent = dict(BASE, bootstrap_password="********", ca="<PEM text>",
                    wlan={"ssid": "shop", "password": "********"}, log=True)
        _op(a, smartrest.row([209, 1, 41, 10, json.dumps(sent)]).encode())
        st = a.s.st
        pre = b"15," + XID.encode() + b"\n"
        assert len(st) == 3 and st[2] == pre + b"131,41", st
        assert _config_of(st[1])["log"] is True
        assert a.cfg["log"] is True  # agent.log reads it at every line
        on_flash = json.loads(_get(p))
        assert on_flash == dict(BASE, log=True)  # the secrets and the CA kept, not the mask
        assert a.cfg["file"][1] == on_flash
        # the same configuration again: nothing to change, nothing written
        os.remove(p)
        a.s.st = []
        _op(a, smartrest.row([209, 1, 42, 10, json.dumps(sent)]).encode())
        assert a.s.st == [pre + b"130,42", pre + b"131,42"] and not _exists(p)
        assert opconf.LIVE == ("log",)
    finally:
        _clean(d)
    free("opconf", "settings")


def test_a_change_that_needs_a_restart_writes_restarts_and_resumes():
    from microcot import opconf, ops

    class Reset(Exception):
        pass

    def reset(s):
        raise Reset()

    d = scratch_dir("crst")
    try:
        a, p = _agent(d, BASE)
        s = a.s
        real = opconf._reset
        opconf._reset = reset
        stages = []
        op = ops.Op("51", 209, "10", ['{"interval": 2, "wlan": {"ssid": "hall", '
                                       '"password": "********"}}'])
        op.save = lambda name, data=None: stages.append(name)
        try:
            raises(Reset, opconf.handle, s, op)
        finally:
            opconf._reset = real
        assert stages == ["restart"]
        on_flash = json.loads(_get(p))
        assert on_flash == dict(BASE, interval=2, wlan={"ssid": "hall", "password": WPW})
        assert a.cfg["interval"] == 5  # read at start-up: the restart applies it
        # after the reboot: SUCCESSFUL, and the platform gets the configuration the board has
        a.close()
        s = _agent(d)[0].s
        assert s.cfg["interval"] == 2
        assert opconf.resume(s, {"id": "51", "stage": "restart"}) is True
        got = _config_of(s.st[-1])
        assert got["interval"] == 2 and got["wlan"] == {"ssid": "hall", "password": "********"}
        why = opconf.resume(s, {"id": "51", "stage": "run"})
        assert why == "interrupted by a reboot (stage run)"
        assert _config_of(s.st[-1])["interval"] == 2  # it may have applied: say what is
    finally:
        _clean(d)
    free("opconf", "settings")


def test_settings_given_by_the_application_cannot_be_configured():
    from microcot import opconf
    from microcot.agent import Agent
    from microcot.ops import Failed, Op

    d = scratch_dir("capp")
    try:
        a = Agent({"store": d + "/store", "log": False, "reserve": 0, "queue": [4, 0],
                   "log_ring": 0})
        assert "not a file" in str(raises(Failed, opconf.handle, a.s, Op("61", 210, "10", [])))
    finally:
        _clean(d)
    free("opconf", "settings")
