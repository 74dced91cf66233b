"""Logging of hotplug runs: syslog (facility daemon, tag vif-route-qubes)
captured on a real AF_UNIX datagram socket, the hotplug log file, stderr;
errors naming the failing command and its stderr."""

import os
import re
import socket
import threading

import pytest

DAEMON = 3
LINE = re.compile(r"<(\d+)>vif-route-qubes\[(\d+)\]: (.*)", re.S)


class Syslog:
    """A syslog stand-in: a bound datagram socket drained by a thread (a
    full queue would block the sender)."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.raw, self._stop = [], False
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self):
        while not self._stop:
            try:
                self.raw.append(self.sock.recv(65536).decode())
            except socket.timeout:
                continue
            except OSError:
                return

    def lines(self):
        """[(facility, severity, pid, message)]"""
        out = []
        for datagram in list(self.raw):
            m = LINE.fullmatch(datagram)
            assert m, f"not a syslog line of ours: {datagram!r}"
            pri = int(m.group(1))
            out.append((pri >> 3, pri & 7, int(m.group(2)), m.group(3)))
        return out

    def take(self):
        got = self.lines()
        self.raw.clear()
        return got

    def close(self):
        self._stop = True
        self.thread.join()
        self.sock.close()


@pytest.fixture
def syslog(world, tmp_path):
    log = Syslog(str(tmp_path / "syslog.sock"))
    world.env["VIF_ROUTE_QUBES_SYSLOG"] = log.path
    os.makedirs(os.path.dirname(world.env["VIF_ROUTE_QUBES_HOTPLUG_LOG"]), exist_ok=True)
    try:
        yield log
    finally:
        log.close()


def settle(syslog, res):
    # the process has exited; its datagrams are queued: let the thread read them
    import time

    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        n = len(syslog.raw)
        time.sleep(0.05)
        if len(syslog.raw) == n:
            break
    return syslog.take()


def test_each_run_logs_actions_at_debug_and_one_info_summary(world, syslog):
    g = world.add_guest(3, ["10.137.0.12"])
    res = world.hotplug(g, "online")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # quiet on stderr unless asked
    lines = settle(syslog, res)
    assert lines and {fac for fac, _, _, _ in lines} == {DAEMON}
    assert len({pid for _, _, pid, _ in lines}) == 1
    info = [msg for _, sev, _, msg in lines if sev == 6]
    assert info == ["online vif3.0: 10.137.0.12 mac 00:16:3e:5e:03:00 metric 32749 gateway 10.137.0.1 firewall iptables config xenstore"]
    debug = [msg for _, sev, _, msg in lines if sev == 7]
    for wanted in ("run: iptables-restore --noflush --wait 20 <<", "run: ip6tables-restore --noflush --wait 20 <<",
                   "run: ip -batch - <<", "write /proc/sys/net/ipv4/conf/vif3.0/proxy_arp = 1",
                   "xenstore-write backend/vif/3/0/hotplug-status connected",
                   "  | route replace 10.137.0.12/32 dev vif3.0 metric 32749"):
        assert any(m.startswith(wanted) for m in debug), (wanted, debug)
    assert not [sev for _, sev, _, _ in lines if sev < 6]

    res = world.hotplug(g, "offline")
    assert res.returncode == 0
    lines = settle(syslog, res)
    offline_lines = lines
    info = [msg for _, sev, _, msg in lines if sev == 6]
    assert info == ["offline vif3.0: removed route 10.137.0.12/32, neighbour entry 10.137.0.12, "
                    "address 10.137.0.1/32, link up, group 2, proxy_arp 1, "
                    "iptables chains vrq-in-vif3.0 vrq-src-vif3.0, ip6tables chains vrq-in-vif3.0 vrq-src-vif3.0 "
                    "(firewall iptables)"]
    # a second offline finds nothing, and says so
    res = world.hotplug(g, "offline")
    assert res.returncode == 0
    info = [msg for _, sev, _, msg in settle(syslog, res) if sev == 6]
    assert info == ["offline vif3.0: nothing of ours was there (firewall iptables)"]
    assert any(m.startswith("run: ip -force -batch -") for _, sev, _, m in offline_lines if sev == 7)

    # the hotplug log got the summaries (and no debug lines)
    text = open(world.env["VIF_ROUTE_QUBES_HOTPLUG_LOG"]).read().splitlines()
    assert len(text) == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d vif-route-qubes\[\d+\] info: online vif3\.0: 10\.137\.0\.12 .*",
                        text[0])
    assert "info: offline vif3.0: removed route 10.137.0.12/32" in text[1]
    assert text[2].endswith("info: offline vif3.0: nothing of ours was there (firewall iptables)")


def test_no_hotplug_log_without_its_directory(world):
    g = world.add_guest(3, ["10.137.0.12"])
    assert world.hotplug(g, "online").returncode == 0
    assert not os.path.exists(os.path.dirname(world.env["VIF_ROUTE_QUBES_HOTPLUG_LOG"]))


@pytest.mark.parametrize("how", ["VIF_ROUTE_QUBES_DEBUG=1", "-v"])
def test_debug_raises_the_level_on_stderr(world, syslog, how):
    g = world.add_guest(3, ["10.137.0.12"])
    if how == "-v":
        res = world.netvm.exec([_script(), "online", "-v", "type_if=vif"], check=False, env=g.env())
    else:
        res = world.hotplug(g, "online", env=g.env(VIF_ROUTE_QUBES_DEBUG="1"))
    assert res.returncode == 0
    err = res.stderr.splitlines()
    assert "vif-route-qubes: debug: run: ip -batch - <<5 lines" in err
    assert "vif-route-qubes: info: online vif3.0: 10.137.0.12 mac 00:16:3e:5e:03:00 metric 32749 gateway 10.137.0.1 firewall iptables config xenstore" in err
    lines = settle(syslog, res)
    assert sum(1 for _, sev, _, _ in lines if sev == 6) == 1
    # debugging also puts the debug lines in the hotplug log
    assert "debug: run: ip -batch - <<5 lines" in open(world.env["VIF_ROUTE_QUBES_HOTPLUG_LOG"]).read()


def test_injected_failure_names_the_command_and_its_stderr(world, syslog):
    # the guard chain exists (the steady state: only a host's first online
    # makes it, with restores of its own)
    other = world.add_guest(4, ["10.137.0.14"])
    assert world.hotplug(other, "online").returncode == 0
    assert world.hotplug(other, "offline").returncode == 0
    g = world.add_guest(3, ["10.137.0.12"])
    before = world.snapshot()
    res = world.hotplug(g, "online", env=g.env(VIF_ROUTE_QUBES_FAIL_AT="3"))
    assert res.returncode == 1
    # the third change is the proxy_arp write (after the two restores)
    msg = "write /proc/sys/net/ipv4/conf/vif3.0/proxy_arp exited 99: injected fault (VIF_ROUTE_QUBES_FAIL_AT=3)"
    assert res.stderr.strip() == f"vif-route-qubes: {msg}"
    errors = [(fac, m) for fac, sev, _, m in settle(syslog, res) if sev == 3]
    assert errors == [(DAEMON, msg)]
    assert world.xs.read(f"/local/domain/0/{g.xenbus_path}/hotplug-error").decode() == msg
    assert f"error: {msg}" in open(world.env["VIF_ROUTE_QUBES_HOTPLUG_LOG"]).read()
    assert world.snapshot() == before


def test_real_failing_command_is_named_with_its_stderr(world, syslog, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    hook = hooks / "50-broken"
    hook.write_text("#!/bin/sh\necho 'cannot reach the policy daemon' >&2\nexit 3\n")
    hook.chmod(0o755)
    g = world.add_guest(3, ["10.137.0.12"])
    res = world.hotplug(g, "online")
    assert res.returncode == 0  # hooks are best effort
    warnings = [(fac, m) for fac, sev, _, m in settle(syslog, res) if sev == 4]
    assert warnings == [(DAEMON, f"hook {hook} failed (ignored): {hook} online vif3.0 vif 10.137.0.12 exited 3: "
                                 "cannot reach the policy daemon")]


def test_missing_program_is_named_with_its_package(world, syslog, tmp_path):
    """A short PATH (libxl's) does not hide a tool installed in sbin; a tool
    that is really not installed (sbin hidden under an empty tmpfs, in a
    mount namespace of its own) is named with the PATH searched and its
    package, and nothing is left behind."""
    g = world.add_guest(3, ["10.137.0.12"])
    before = world.snapshot()
    short = "/usr/bin:/bin"
    hide = "mount -t tmpfs none /usr/sbin && { [ -L /sbin ] || mount -t tmpfs none /sbin; }"
    res = world.netvm.exec(["unshare", "-m", "sh", "-c", f'{hide} && exec env PATH={short} "$0" online type_if=vif',
                            _script()], check=False, env=g.env())
    assert res.returncode == 1
    assert res.stderr.strip().endswith(
        f"iptables-restore: command not found in PATH={short} or /usr/sbin:/sbin:/usr/local/sbin (install iptables)"), \
        res.stderr
    assert world.snapshot() == before
    res = world.netvm.exec(["env", f"PATH={short}", _script(), "online", "type_if=vif"], check=False, env=g.env())
    assert res.returncode == 0, res.stderr
    assert "vrq-in-vif3.0" in world.netvm.exec(["iptables-save", "-t", "raw"]).stdout


def _script():
    from tests.rigs.netns import _script as s

    return s("vif-route-qubes")
