"""Re-running is repair (issue 11) and today's Qubes vif behaviour (issue 12),
with the real ip, iptables and conntrack in network namespaces.

Failures are real where they can be: failing binaries first on PATH
(``ip6tables-restore``, ``iptables-restore``, ``ip``), a XenStore daemon that
refuses the final write, tools hidden in a mount namespace. After each
failed re-run of ``online`` the guest's own source still passes and a forged
one is still dropped, checked with real packets.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from tests.rigs.netns import _script, comparable

SCRIPT = _script("vif-route-qubes")
PY = sys.executable
PORT = 5999
GATEWAY = "10.137.0.1"

# Guest side: one UDP datagram to upstream from the given source, forged with
# IP_TRANSPARENT when the guest does not own it.
_SEND = r"""
import socket, sys
src, dst, port, msg = sys.argv[1:5]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
s.bind((src, 0))
for _ in range(3):
    s.sendto(msg.encode(), (dst, int(port)))
"""

_SINK = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
try:
    while True:
        data, peer = s.recvfrom(2048)
        print(peer[0], data.decode(), flush=True)
except socket.timeout:
    pass
"""


def _chains_sorted(ruleset):
    """``nft list ruleset`` with each table's chains in name order: nft lists
    chains in creation order, which says when a chain was made, not what it
    does (a refilled chain and a re-created one are the same state)."""
    out = []
    for table in re.split(r"(?m)^(?=table )", ruleset):
        head, _, body = table.partition("\n")
        body = body.rstrip()
        if body.endswith("\n}"):
            body = body[:-2]  # the table's own closing brace
        chains = sorted(c.strip("\n") for c in re.split(r"(?m)^(?=\tchain )", body) if c.strip())
        out.append(head + "\n" + "\n".join(chains))
    return "\n".join(out)


def snap(world):
    """world.snapshot() plus proxy_ndp, with the qdisc difference taken out."""
    s = comparable(world.snapshot())
    s["nft"] = _chains_sorted(s["nft"])
    s["proxy_ndp"] = world.netvm.exec(["sh", "-c", "grep -H . /proc/sys/net/ipv6/conf/*/proxy_ndp"]).stdout
    return s


def assert_same(after, before, what=""):
    for key in before:
        assert after[key] == before[key], (what, key, before[key], after[key])


def probe(world, guest, own, forged="10.137.0.99", wait=0.6):
    """-> (own source reached upstream, forged source reached upstream)."""
    sink = world.upstream.popen([PY, "-c", _SINK, world.UPLINK_UPSTREAM, str(PORT), str(wait)],
                                stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "ready"
    for src, tag in ((own, "own"), (forged, "forged")):
        guest.ns.exec([PY, "-c", _SEND, src, world.UPLINK_UPSTREAM, str(PORT), tag], check=False)
    out, _ = sink.communicate(timeout=10)
    got = [line.split() for line in out.splitlines()]
    return (["own"] in [g[1:] for g in got if g[0] == own], any(g[1:] == ["forged"] for g in got))


def xs_value(world, guest, key):
    value = world.xs.read(f"/local/domain/0/{guest.xenbus_path}/{key}")
    return value.decode() if value is not None else None


def set_ip(world, guest, ip):
    world.xs.write(f"/local/domain/0/{guest.xenbus_path}/ip", ip)


def record_path(world, guest):
    return os.path.join(world.env["VIF_ROUTE_QUBES_STATE_DIR"], f"{guest.vif}.json")


def online(world, guest, env=None, ok=True):
    res = world.hotplug(guest, "online", env=env)
    if ok:
        assert res.returncode == 0, res.stderr
    return res


def failing_bin(tmp_path, name, when="always"):
    """A directory holding a ``name`` that fails (exit 1, a reason on
    stderr) before the real one is reached: ``always``, or ``once`` (only
    the first call that changes something; ``ip -j`` reads pass)."""
    real = shutil.which(name)
    d = tmp_path / f"fail-{name}-{when}"
    d.mkdir()
    marker = d / "failed-once"
    script = "#!/bin/sh\n"
    if name == "ip":
        script += f'case "$1" in -j) exec {real} "$@";; esac\n'
    if when == "once":
        script += f'if [ -e {marker} ]; then exec {real} "$@"; fi\ntouch {marker}\n'
    script += f'cat >/dev/null; echo "{name}: simulated failure" >&2\nexit 1\n'
    (d / name).write_text(script)
    (d / name).chmod(0o755)
    return str(d)


@pytest.fixture
def guest(world):
    g = world.add_guest(3, ["10.137.0.12"])
    g.configure(GATEWAY)
    return g


# ----------------------------------------------------------------------------
# 1. A failed re-run of online never opens the door


def test_the_probe_sees_a_forged_source_without_the_rules(world, guest):
    """Negative control: the packet probe does detect spoofing."""
    online(world, guest)
    assert probe(world, guest, "10.137.0.12") == (True, False)
    world.netvm.exec(["iptables", "-t", "raw", "-F", "vrq-in-vif3.0"])
    assert probe(world, guest, "10.137.0.12") == (True, True)


FAILURES = {
    # a real failing binary first on PATH, or the XenStore daemon refusing
    "ip6tables-restore": ("bin", "ip6tables-restore", "always"),
    "iptables-restore": ("bin", "iptables-restore", "always"),
    "ip-batch": ("bin", "ip", "once"),
    "ip-always": ("bin", "ip", "always"),
    "xenstore-write": ("xs", None, None),
}


@pytest.mark.parametrize("changed", [False, True], ids=["same-inputs", "changed-inputs"])
@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failed_rerun_leaves_the_previous_working_config(world, guest, tmp_path, failure, changed):
    online(world, guest)
    guest.ns.ip("addr", "add", "10.137.0.13/32", "dev", "eth0")
    before = snap(world)
    record = open(record_path(world, guest)).read()
    if changed:
        set_ip(world, guest, "10.137.0.13")
        world.xs.write("/local/domain/0/qubes_netvm_gateway", "10.137.0.254")
    kind, name, when = FAILURES[failure]
    env = guest.env()
    if kind == "bin":
        env["PATH"] = failing_bin(tmp_path, name, when) + ":" + env["PATH"]
    else:
        world.xs.deny = [f"/local/domain/0/{guest.xenbus_path}/hotplug-status"]
    try:
        res = online(world, guest, env=env, ok=False)
    finally:
        world.xs.deny = []
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert_same(snap(world), before, failure)
    assert open(record_path(world, guest)).read() == record
    # the guest that worked still works, and is still guarded
    assert probe(world, guest, "10.137.0.12") == (True, False)
    # and the repair is: fix the cause, run online again
    online(world, guest)
    own = "10.137.0.13" if changed else "10.137.0.12"
    assert probe(world, guest, own) == (True, False)


@pytest.mark.parametrize("changed", [False, True], ids=["same-inputs", "changed-inputs"])
def test_a_failure_at_every_step_of_a_rerun(world, guest, changed):
    """VIF_ROUTE_QUBES_FAIL_AT at every step of a re-run of online on a
    working vif (with the same inputs, or new addresses and gateways): the
    previous config each time, still passing the guest's own source and
    dropping a forged one."""
    world.xs.write("/local/domain/0/qubes_netvm_gateway6", "fd09:24ef:4179::1")
    set_ip(world, guest, "10.137.0.12 fd09:24ef:4179::a89:c")
    online(world, guest)
    before = snap(world)
    if changed:
        set_ip(world, guest, "10.137.0.13 fd09:24ef:4179::a89:d")
        world.xs.write("/local/domain/0/qubes_netvm_gateway", "10.137.0.254")
        world.xs.rm("/local/domain/0/qubes_netvm_gateway6")
    for n in range(1, 30):
        res = online(world, guest, env=guest.env(VIF_ROUTE_QUBES_FAIL_AT=str(n)), ok=False)
        if res.returncode == 0:
            break
        assert f"VIF_ROUTE_QUBES_FAIL_AT={n}" in res.stderr
        assert_same(snap(world), before, f"step {n}")
        if n in (1, 2):  # the firewall steps: real packets too
            assert probe(world, guest, "10.137.0.12") == (True, False), n
    else:
        pytest.fail("online never succeeded")
    assert n > (5 if changed else 3)
    if changed:
        assert probe(world, guest, "10.137.0.12") == (False, False)  # the new inputs are in force
        guest.ns.ip("addr", "add", "10.137.0.13/32", "dev", "eth0")
        assert probe(world, guest, "10.137.0.13", forged="10.137.0.12") == (True, False)
    else:
        assert_same(snap(world), before, "the successful re-run changed nothing")
        assert probe(world, guest, "10.137.0.12") == (True, False)


def test_a_failed_first_online_leaves_nothing_of_ours(world, guest, tmp_path):
    before = snap(world)
    for name, when in (("ip6tables-restore", "always"), ("iptables-restore", "always"), ("ip", "once")):
        env = guest.env(PATH=failing_bin(tmp_path, name, when) + ":" + guest.env()["PATH"])
        res = online(world, guest, env=env, ok=False)
        assert res.returncode == 1
        assert_same(snap(world), before, name)
    assert probe(world, guest, "10.137.0.12") == (False, False)


# ----------------------------------------------------------------------------
# 2. Online converges to exactly the inputs; offline removes what is there


def clean_reference(world, guest):
    """What a single clean online of the current inputs produces."""
    assert world.hotplug(guest, "offline").returncode == 0
    online(world, guest)
    return snap(world)


def test_changed_inputs_leave_nothing_of_the_old_ones(world, guest):
    vif_only = snap(world)
    world.xs.write("/local/domain/0/qubes_netvm_gateway6", "fd09:24ef:4179::1")
    set_ip(world, guest, "10.137.0.12 fd09:24ef:4179::a89:c")
    online(world, guest)
    set_ip(world, guest, "10.137.0.13")
    world.xs.write("/local/domain/0/qubes_netvm_gateway", "10.137.0.254")
    world.xs.rm("/local/domain/0/qubes_netvm_gateway6")
    online(world, guest)
    after = snap(world)
    for old in ("10.137.0.12", "fd09:24ef:4179::a89:c", "10.137.0.1/32", "fd09:24ef:4179::1"):
        for key in ("routes", "routes6", "neigh", "addrs", "iptables-save", "ip6tables-save"):
            assert old not in after[key], (old, key)
    assert "vif3.0:1" not in after["proxy_ndp"].replace(" ", "")
    assert_same(after, clean_reference(world, guest))
    assert world.hotplug(guest, "offline").returncode == 0
    assert_same(snap(world), vif_only)


def test_online_removes_hand_made_leftovers_of_ours(world, guest):
    online(world, guest)
    reference = snap(world)
    n = world.netvm
    n.ip("route", "add", "10.137.0.77/32", "dev", guest.vif, "metric", "5")
    n.ip("-6", "route", "add", "fd09::77/128", "dev", guest.vif)
    n.ip("neigh", "add", "10.137.0.78", "lladdr", "00:16:3e:00:00:78", "dev", guest.vif, "nud", "permanent")
    n.ip("addr", "add", "10.137.0.250/32", "dev", guest.vif)
    n.ip("route", "del", "10.137.0.12/32", "dev", guest.vif)  # and something missing
    online(world, guest)
    assert_same(snap(world), reference)


def test_online_finishes_a_half_finished_run(world, guest):
    """A run killed half-way (here: its link step never ran, its record was
    never written) is completed by the next online."""
    online(world, guest)
    reference = snap(world)
    os.unlink(record_path(world, guest))
    world.netvm.ip("link", "set", guest.vif, "down")
    world.netvm.ip("link", "set", guest.vif, "group", "0")
    online(world, guest)
    assert_same(snap(world), reference)


def test_offline_removes_what_the_kernel_shows_whatever_the_record_says(world, guest):
    vif_only = snap(world)
    online(world, guest)
    path = record_path(world, guest)
    record = json.load(open(path))
    record.update(addresses=["10.137.0.99"], gateway=None)
    json.dump(record, open(path, "w"))
    world.netvm.ip("addr", "add", "10.137.0.251/32", "dev", guest.vif)
    res = world.hotplug(guest, "offline")
    assert res.returncode == 0, res.stderr
    assert_same(snap(world), vif_only)


def test_offline_with_a_tool_missing_removes_what_it_can_and_keeps_the_record(world, guest, tmp_path):
    vif_only = snap(world)
    online(world, guest)
    bindir = tmp_path / "only-ip"
    bindir.mkdir()
    shutil.copy(shutil.which("ip"), bindir / "ip")
    # /usr/sbin (where the iptables commands live) hidden in a mount
    # namespace of this run's own; ip comes from the short PATH
    hide = "mount -t tmpfs none /usr/sbin && { [ -L /sbin ] || mount -t tmpfs none /sbin; }"
    res = world.netvm.exec(["unshare", "-m", "sh", "-c", f'{hide} && exec env PATH={bindir}:/bin "$0" offline',
                            SCRIPT], check=False, env=guest.env())
    assert res.returncode == 0, res.stderr
    assert "could not remove its firewall rules; state record kept" in res.stderr
    after = snap(world)
    for key in ("routes", "neigh", "addrs"):
        assert after[key] == vif_only[key], key
    assert "vrq-in-vif3.0" in after["iptables-save"]
    assert os.path.exists(record_path(world, guest)), "the record is what lets a later offline finish"
    res = world.hotplug(guest, "offline")
    assert res.returncode == 0, res.stderr
    assert_same(snap(world), vif_only)


# ----------------------------------------------------------------------------
# issue 12: the interface is not there yet; a vif without ip


def test_online_waits_for_the_interface_to_appear(world, xenstored):
    g = world.add_guest(5, ["10.137.0.15"])
    world.netvm.ip("link", "set", g.vif, "name", "later")

    def appear():
        time.sleep(1.0)
        world.netvm.ip("link", "set", "later", "name", g.vif)

    t = threading.Thread(target=appear)
    t.start()
    try:
        res = world.hotplug(g, "online")
    finally:
        t.join()
    assert res.returncode == 0, res.stderr
    assert "10.137.0.15" in world.netvm.ip("route", "show", "dev", g.vif).stdout


def test_online_for_an_interface_that_never_appears_says_how_long_it_waited(world):
    g = world.add_guest(5, ["10.137.0.15"])
    world.netvm.ip("link", "del", g.vif)
    before = snap(world)
    t0 = time.monotonic()
    res = world.hotplug(g, "online", env=g.env(VIF_ROUTE_QUBES_IFACE_WAIT="0.5"))
    took = time.monotonic() - t0
    assert res.returncode == 1
    assert res.stderr.strip() == "vif-route-qubes: interface vif5.0 does not exist (waited 0.5 s for it to appear)"
    assert 0.5 <= took < 5
    assert xs_value(world, g, "hotplug-status") == "error"
    assert_same(snap(world), before)


@pytest.mark.parametrize("world", ["iptables", "nft"], indirect=True)
def test_a_vif_without_ip_comes_up_dropping_everything(world, guest, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    seen = tmp_path / "hook-calls"
    hook = hooks / "10-record"
    hook.write_text(f'#!/bin/sh\necho "$@" >> {seen}\n')
    hook.chmod(0o755)
    world.xs.rm(f"/local/domain/0/{guest.xenbus_path}/ip")
    res = online(world, guest)
    assert xs_value(world, guest, "hotplug-status") == "connected"
    link = world.netvm.ip("-d", "link", "show", guest.vif).stdout
    assert "state UP" in link or ",UP" in link, link
    assert "group 2" in world.netvm.ip("link", "show", guest.vif).stdout
    assert seen.read_text() == f"online {guest.vif} vif\n"
    assert probe(world, guest, "10.137.0.12") == (False, False)
    assert res.returncode == 0
    assert world.hotplug(guest, "offline").returncode == 0


NFT_FAILURES = {"nft": ("bin", "nft", "always"), "ip-batch": ("bin", "ip", "once"),
                "xenstore-write": ("xs", None, None)}


@pytest.mark.parametrize("world", ["nft"], indirect=True)
@pytest.mark.parametrize("failure", sorted(NFT_FAILURES))
def test_a_failed_changing_rerun_with_the_nft_backend(world, tmp_path, failure):
    """The same promise with the nft backend: its one ``nft -f -`` failing
    (a real failing binary), the link step or the final XenStore write."""
    g = world.add_guest(3, ["10.137.0.12"])
    g.configure(GATEWAY)
    online(world, g)
    g.ns.ip("addr", "add", "10.137.0.13/32", "dev", "eth0")
    before = snap(world)
    set_ip(world, g, "10.137.0.13")
    kind, name, when = NFT_FAILURES[failure]
    env = g.env()
    if kind == "bin":
        env["PATH"] = failing_bin(tmp_path, name, when) + ":" + env["PATH"]
    else:
        world.xs.deny = [f"/local/domain/0/{g.xenbus_path}/hotplug-status"]
    try:
        res = online(world, g, env=env, ok=False)
    finally:
        world.xs.deny = []
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert_same(snap(world), before, failure)
    assert probe(world, g, "10.137.0.12", forged="10.137.0.13") == (True, False)
    online(world, g)
    assert probe(world, g, "10.137.0.13", forged="10.137.0.12") == (True, False)


# ----------------------------------------------------------------------------
# The property: whatever happened, the state of the last successful inputs

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

INPUTS = [
    dict(ip="10.137.0.12", gw="10.137.0.1", gw6=None),
    dict(ip="10.137.0.13 fd09:24ef:4179::a89:d", gw="10.137.0.254", gw6="fd09:24ef:4179::1"),
    dict(ip=None, gw="10.137.0.1", gw6=None),  # a vif without ip
    dict(ip="10.137.0.12 10.137.0.14", gw=None, gw6="fd09:24ef:4179::1"),
]
OPS = st.one_of(
    st.tuples(st.just("online"), st.integers(0, len(INPUTS) - 1), st.none() | st.integers(1, 12)),
    st.tuples(st.just("offline"), st.just(0), st.none()),
)


def set_inputs(world, guest, inputs):
    base = f"/local/domain/0/{guest.xenbus_path}"
    for path, value in ((f"{base}/ip", inputs["ip"]), ("/local/domain/0/qubes_netvm_gateway", inputs["gw"]),
                        ("/local/domain/0/qubes_netvm_gateway6", inputs["gw6"])):
        if value is None:
            world.xs.rm(path)
        else:
            world.xs.write(path, value)


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=1, max_size=4))
def test_any_sequence_ends_in_the_state_of_the_last_successful_inputs(world, ops):
    if not world.guests:
        world.add_guest(3, ["10.137.0.12"])
        world.vif_only = snap(world)
    g = world.guests[0]
    assert world.hotplug(g, "offline").returncode == 0
    assert_same(snap(world), world.vif_only, "reset")
    last = None
    for command, which, fail_at in ops:
        env = g.env(**({"VIF_ROUTE_QUBES_FAIL_AT": str(fail_at)} if fail_at else {}))
        if command == "online":
            set_inputs(world, g, INPUTS[which])
            res = world.hotplug(g, "online", env=env)
            if res.returncode == 0:
                last = which
            else:
                assert fail_at and f"VIF_ROUTE_QUBES_FAIL_AT={fail_at}" in res.stderr, res.stderr
        else:
            res = world.hotplug(g, "offline", env=env)
            assert res.returncode == 0, res.stderr
            last = None
    end = snap(world)
    if last is None:
        assert_same(end, world.vif_only, ops)
        return
    # what a single clean online of the last successful inputs produces
    assert world.hotplug(g, "offline").returncode == 0
    set_inputs(world, g, INPUTS[last])
    assert world.hotplug(g, "online").returncode == 0
    assert_same(end, snap(world), ops)


# ----------------------------------------------------------------------------
# 6. status reports every leftover of ours; --problems


def status(world, guest, *args):
    return world.netvm.exec([SCRIPT, "status", *args], check=False, env=guest.env())


def test_status_without_record_or_xenstore_lists_every_leftover(world, guest):
    world.xs.write("/local/domain/0/qubes_netvm_gateway6", "fd09:24ef:4179::1")
    set_ip(world, guest, "10.137.0.12 fd09:24ef:4179::a89:c")
    online(world, guest)
    other = world.add_guest(4, ["10.137.0.14"])
    online(world, other)
    os.unlink(record_path(world, guest))
    world.xs.rm(f"/local/domain/0/{guest.xenbus_path}")
    # the firewall too is gone (by hand): the link side alone must name it
    world.netvm.exec(["sh", "-c", "iptables-save -t raw | grep -v vif3.0 | iptables-restore -T raw; "
                      "ip6tables-save -t raw | grep -v vif3.0 | ip6tables-restore -T raw"])
    world.netvm.ip("link", "set", guest.vif, "group", "0")
    res = status(world, guest)
    assert res.returncode == 1
    lines = [line.split("  #")[0].split() for line in res.stdout.splitlines()]
    rows = {" ".join(x[1:]) for x in lines if x and x[0] == "unexpected"}
    for item in ("link vif3.0 up", "route 10.137.0.12/32 metric 32749",
                 "route fd09:24ef:4179::a89:c/128 metric 32749", "address 10.137.0.1/32",
                 "address fd09:24ef:4179::1/128", "neigh 10.137.0.12 lladdr 00:16:3e:5e:03:00 permanent",
                 "neigh fd09:24ef:4179::a89:c lladdr 00:16:3e:5e:03:00 permanent",
                 "sysctl proxy_arp 1", "sysctl proxy_ndp 1"):
        assert item in rows, (item, res.stdout)
    assert "vif4.0: ok" in res.stdout
    # --problems: only what is wrong
    res = status(world, guest, "--problems")
    assert res.returncode == 1
    assert "vif4.0" not in res.stdout and " ok " not in res.stdout, res.stdout
    assert "10.137.0.12/32 metric 32749" in res.stdout
    js = json.loads(status(world, guest, "--problems", "--json").stdout)
    assert [v["name"] for v in js["vifs"]] == ["vif3.0"]
    assert all(c["verdict"] != "ok" for c in js["vifs"][0]["checks"])
    # offline cleans it all up, whatever it knows; then status is clean
    assert world.hotplug(guest, "offline").returncode == 0
    res = status(world, guest, "--problems")
    assert res.returncode == 0, res.stdout
    assert res.stdout.startswith("no problems: 1 vif(s), every line ok"), res.stdout


def test_hooks_hear_of_a_rollback(world, guest, tmp_path):
    """A failure after the hooks ran (the final XenStore write): they are
    told the new configuration went, and the previous one is back."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    seen = tmp_path / "hook-calls"
    hook = hooks / "10-record"
    hook.write_text(f'#!/bin/sh\necho "$@" >> {seen}\n')
    hook.chmod(0o755)
    online(world, guest)
    set_ip(world, guest, "10.137.0.13")
    world.xs.deny = [f"/local/domain/0/{guest.xenbus_path}/hotplug-status"]
    try:
        assert online(world, guest, ok=False).returncode == 1
    finally:
        world.xs.deny = []
    assert seen.read_text().splitlines() == [
        "online vif3.0 vif 10.137.0.12",  # the first, successful online
        "online vif3.0 vif 10.137.0.13",  # the failed re-run's
        "offline vif3.0 vif 10.137.0.13",  # its rollback
        "online vif3.0 vif 10.137.0.12",  # the previous configuration is back
    ]
