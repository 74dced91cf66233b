"""qvm-dom0-network-via-netvm with the real ``ip`` in network namespaces:
"dom0" and "netvm" namespaces joined by a veth that stands in for dom0's
netfront and the netvm's vif0.N. ``xl`` is the recorded stand-in
tests/xl_standin.py (these tests only): its network-attach makes that veth
and the XenStore keys Xen would. Real packets prove dom0's configuration;
snapshots prove its exact undo, also after a failure at every step of up."""

import json
import os
import uuid

import pytest

from tests.rigs.netns import Netns

from tests.dom0_rig import Rig


def snapshot(ns):
    addrs = json.loads(ns.ip("-j", "addr", "show").stdout)
    routes = ns.ip("-4", "route", "show", "table", "all").stdout
    return ({a["ifname"]: sorted((i["local"], i["prefixlen"]) for i in a.get("addr_info", []) if i.get("family") == "inet")
             for a in addrs}, sorted(line.strip() for line in routes.splitlines()))


@pytest.fixture
def nets(xenstored, tmp_path):
    if os.geteuid() != 0:
        pytest.fail("namespace tests need root")
    tag = uuid.uuid4().hex[:6]
    dom0, netvm = Netns(f"vrqd0-{tag}"), Netns(f"vrqnv-{tag}")
    try:
        rig = Rig(xenstored, tmp_path, netvm_ns=netvm.name)
        yield rig, dom0, netvm
    finally:
        dom0.delete()
        netvm.delete()


def ping(ns, dst):
    # busybox (busybox-static, installed for the e2e too): no iputils ping needed
    return ns.exec(["busybox", "ping", "-c", "1", "-W", "2", dst], check=False).returncode == 0


def test_up_configures_like_a_guest_and_down_undoes_it_exactly(nets):
    rig, dom0, netvm = nets
    before = snapshot(dom0)
    assert not ping(dom0, "10.137.0.1")  # dom0 has no network
    r = rig.d0("up", ns=dom0.name)
    assert r.returncode == 0, r.stderr
    assert "attached to netvm via vrqfe0 (10.137.0.2" in r.stdout and "paused: a1 (2)" in r.stdout
    # exactly the running guest was paused, then the attach, argv as Qubes' old tool
    calls = rig.xl_calls()
    assert ["pause", "2"] in calls and not any(c[:1] == ["pause"] and c[1] != "2" for c in calls)
    assert ["network-attach", "0", "backend=netvm", "ip=10.137.0.2", "script=vif-route-qubes"] in calls
    assert rig.domains()["a1"] == "-bp---"
    # dom0's interface: /32, route to the gateway, default via it; real packets
    addrs, routes = snapshot(dom0)
    assert addrs["vrqfe0"] == [("10.137.0.2", 32)]
    assert "10.137.0.1 dev vrqfe0 scope link" in routes
    assert "default via 10.137.0.1 dev vrqfe0 onlink" in routes
    assert ping(dom0, "10.137.0.1")
    assert rig.resolv.read_text().splitlines()[1:] == ["nameserver 10.139.1.1", "nameserver 10.139.1.2"]
    st = rig.d0("status", ns=dom0.name).stdout
    assert "via vrqfe0 (device/vif/0), 10.137.0.2/32" in st and "paused because of it: a1 (2)" in st
    # up twice: harmless, says so, changes nothing
    n = len(rig.xl_calls())
    r = rig.d0("up", ns=dom0.name)
    assert r.returncode == 0 and "already attached" in r.stdout
    assert len(rig.xl_calls()) == n
    # down --dry-run: the exact undo, printed, nothing done
    snap_up, calls_up = snapshot(dom0), len(rig.xl_calls())
    r = rig.d0("down", "--dry-run", ns=dom0.name)
    assert r.returncode == 0, r.stderr
    assert "route del default via 10.137.0.1 dev vrqfe0\n" in r.stdout
    assert "addr del 10.137.0.2/32 dev vrqfe0\n" in r.stdout
    assert "$ xl network-detach 0 0\n" in r.stdout
    assert "$ xl unpause 2\n" in r.stdout
    assert snapshot(dom0) == snap_up and rig.domains()["a1"] == "-bp---"
    assert [c[0] for c in rig.xl_calls()[calls_up:]] == ["list"]
    assert (rig.state_dir / "dom0-network.json").exists()
    r = rig.d0("down", ns=dom0.name)
    assert r.returncode == 0, r.stderr
    assert "unpaused: a1 (2)" in r.stdout
    assert snapshot(dom0) == before
    assert rig.resolv.read_text() == "nameserver 192.0.2.99\n"
    assert rig.domains() == {"Domain-0": "r-----", "netvm": "-b----", "a1": "-b----", "a2": "--p---"}
    assert rig.xl_calls()[-2:] == [["list"], ["unpause", "2"]]
    assert rig.xs.ls("/local/domain/0/device/vif") in (None, [])
    assert not (rig.state_dir / "dom0-network.json").exists()
    r = rig.d0("down", ns=dom0.name)
    assert r.returncode == 0 and "nothing to do" in r.stdout


def test_a_default_route_dom0_had_comes_back(nets):
    rig, dom0, netvm = nets
    dom0.ip("link", "add", "up0", "type", "veth", "peer", "name", "up1")
    dom0.ip("addr", "add", "192.0.2.5/24", "dev", "up0")
    dom0.ip("link", "set", "up0", "up")
    dom0.ip("route", "add", "default", "via", "192.0.2.1", "dev", "up0", "metric", "50")
    before = snapshot(dom0)
    r = rig.d0("up", ns=dom0.name)
    assert r.returncode == 0, r.stderr
    _, routes = snapshot(dom0)
    assert [x for x in routes if x.startswith("default")] == ["default via 10.137.0.1 dev vrqfe0 onlink"]
    r = rig.d0("down", ns=dom0.name)
    assert r.returncode == 0, r.stderr
    assert snapshot(dom0) == before


def test_resolv_conf_symlink_or_absent_is_restored(nets):
    rig, dom0, netvm = nets
    rig.resolv.unlink()
    os.symlink("../run/somewhere/resolv.conf", rig.resolv)
    assert rig.d0("up", ns=dom0.name).returncode == 0
    assert not rig.resolv.is_symlink() and "10.139.1.1" in rig.resolv.read_text()
    assert rig.d0("down", ns=dom0.name).returncode == 0
    assert os.readlink(rig.resolv) == "../run/somewhere/resolv.conf"
    rig.resolv.unlink()
    assert rig.d0("up", ns=dom0.name).returncode == 0
    assert rig.d0("down", ns=dom0.name).returncode == 0
    assert not os.path.lexists(rig.resolv)


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_failure_at_every_step_of_up_rolls_back(nets, fail_at):
    """Changes of up: pause a1, attach, ip batch, resolv.conf. Each one
    failed once; dom0, the domains and resolv.conf end as they began."""
    rig, dom0, netvm = nets
    before = snapshot(dom0)
    r = rig.d0("up", ns=dom0.name, VIF_ROUTE_QUBES_FAIL_AT=str(fail_at))
    assert r.returncode == 1
    assert "injected fault" in r.stderr and "rolling back" in r.stderr
    assert snapshot(dom0) == before
    assert rig.resolv.read_text() == "nameserver 192.0.2.99\n"
    assert rig.domains() == {"Domain-0": "r-----", "netvm": "-b----", "a1": "-b----", "a2": "--p---"}
    assert rig.xs.ls("/local/domain/0/device/vif") in (None, [])
    assert not (rig.state_dir / "dom0-network.json").exists()
    assert not netvm.ip("link", "show", "vif0.0", check=False).returncode == 0
