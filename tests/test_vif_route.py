"""vif-route-qubes against the real ip, iptables, ip6tables and conntrack in
network namespaces, checked with real packets, XenStore served over the
real wire protocol."""

import json
import os

import pytest

from tests.rigs import routes
from tests.rigs.netns import UdpSink, udp_send

PORT = 5353

# Tests about behaviour with packets run with both firewall backends; the
# ones that read iptables rules keep the world fixture's default (iptables).
BOTH = pytest.mark.parametrize("world", ["iptables", "nft"], indirect=True)


def drops(world, vif, version=4):
    """Packets the firewall dropped from ``vif`` so far (its DROP counter)."""
    if world.firewall == "nft":
        fam = "ip" if version == 4 else "ip6"
        out = world.netvm.exec(["nft", "list", "chain", fam, "qubes", "antispoof"]).stdout
        line = [ln for ln in out.splitlines() if ln.strip().startswith("counter") and "drop" in ln][0]
        return int(line.split("packets")[1].split()[0])
    tool = "iptables" if version == 4 else "ip6tables"
    counters = world.netvm.exec([tool, "-t", "raw", "-L", f"vrq-in-{vif}", "-v", "-x", "-n"]).stdout
    return int([line for line in counters.splitlines() if "DROP" in line][0].split()[0])


def online(world, guest, *words, env=None):
    res = world.hotplug(guest, "online", *words, env=env)
    assert res.returncode == 0, res.stderr
    return res


def status(world, guest):
    value = world.xs.read(f"/local/domain/0/{guest.xenbus_path}/hotplug-status")
    return value.decode() if value is not None else None


def error_text(world, guest):
    value = world.xs.read(f"/local/domain/0/{guest.xenbus_path}/hotplug-error")
    return value.decode() if value is not None else None


def reaches_upstream(world, guest, src, tag):
    with UdpSink(world.upstream, world.UPLINK_UPSTREAM, PORT) as sink:
        udp_send(guest.ns, world.UPLINK_UPSTREAM, PORT, tag, src=src)
        ok = sink.got(tag, wait=1.5)
        seen = [s for s, d in sink.collect(0.05) if d == tag]
    return ok, seen


def test_online_configures_the_netvm_and_reports_connected(world):
    g = world.add_guest(3, ["10.137.0.12"])
    online(world, g)
    assert status(world, g) == "connected"
    routes = world.netvm.ip("route", "show", "dev", "vif3.0").stdout
    assert "10.137.0.12 scope link metric 32749" in routes
    assert "10.137.0.1/32" in world.netvm.ip("addr", "show", "dev", "vif3.0").stdout
    neigh = world.netvm.ip("neigh", "show", "dev", "vif3.0").stdout
    assert "10.137.0.12 lladdr 00:16:3e:5e:03:00 PERMANENT" in neigh
    link = world.netvm.ip("-d", "link", "show", "dev", "vif3.0").stdout
    assert "group 2" in link and ",UP" in link
    assert world.netvm.read("/proc/sys/net/ipv4/conf/vif3.0/proxy_arp").strip() == "1"
    raw = world.netvm.exec(["iptables-save", "-t", "raw"]).stdout
    assert "-A vrq-guard -i vif3.0 -g vrq-in-vif3.0" in raw
    assert "-A PREROUTING -m devgroup --src-group 0x2 -m comment --comment vrq-guard -j vrq-guard" in raw
    assert [line for line in raw.splitlines() if line.startswith("-A vrq-guard ")][-1] == "-A vrq-guard -j DROP"
    assert "-A vrq-in-vif3.0 -s 10.137.0.12/32 -j RETURN" in raw
    record = json.load(open(os.path.join(world.env["VIF_ROUTE_QUBES_STATE_DIR"], "vif3.0.json")))
    assert record["addresses"] == ["10.137.0.12"] and record["mac"] == "00:16:3e:5e:03:00"


@BOTH
def test_own_source_is_routed_and_spoofed_source_is_dropped(world):
    g = world.add_guest(3, ["10.137.0.12"])
    online(world, g)
    g.configure()
    ok, seen = reaches_upstream(world, g, "10.137.0.12", "good")
    assert ok and seen == ["10.137.0.12"] * len(seen)
    g.ns.ip("addr", "add", "10.137.0.99/32", "dev", "eth0")
    before = drops(world, "vif3.0")
    ok, _ = reaches_upstream(world, g, "10.137.0.99", "spoofed")
    assert not ok, "a packet with a forged source address got through"
    assert drops(world, "vif3.0") - before >= 3


@BOTH
def test_default_deny_a_hand_made_group_2_interface_forwards_nothing(world):
    """Issue 14 point 3: no rules or elements for a vif means nothing from
    it gets through, with either backend, while a configured vif next to it
    keeps working."""
    g = world.add_guest(3, ["10.137.0.12"])
    hand = world.add_guest(4, ["10.137.0.14"], write_xenstore=False)
    # vif4.0 is set up by hand as a routed vif, but no run of ours sees it
    world.netvm.ip("addr", "add", "10.137.0.1/32", "dev", "vif4.0")
    world.netvm.ip("link", "set", "vif4.0", "up")
    world.netvm.ip("route", "add", "10.137.0.14/32", "dev", "vif4.0")
    world.netvm.ip("neigh", "replace", "10.137.0.14", "lladdr", hand.mac, "dev", "vif4.0", "nud", "permanent")
    hand.configure()
    online(world, g)  # the guard (iptables) or the tables (nft) exist from here on
    g.configure()
    # the path works while vif4.0 is outside group 2: what stops it below
    # is the default deny, not a broken set-up
    ok, _ = reaches_upstream(world, hand, "10.137.0.14", "control")
    assert ok, "the hand-made vif should forward while it is not in group 2"
    world.netvm.ip("link", "set", "vif4.0", "group", "2")
    ok, _ = reaches_upstream(world, hand, "10.137.0.14", "denied")
    assert not ok, "a group 2 interface without rules of ours got a datagram through"
    # the configured vif beside it: own source passes, forged is dropped
    ok, seen = reaches_upstream(world, g, "10.137.0.12", "own")
    assert ok and seen == ["10.137.0.12"] * len(seen)
    g.ns.ip("addr", "add", "10.137.0.99/32", "dev", "eth0")
    ok, _ = reaches_upstream(world, g, "10.137.0.99", "forged")
    assert not ok, "a packet with a forged source address got through"
    # the last configured vif going offline does not lift the default deny
    assert world.hotplug(g, "offline").returncode == 0
    ok, _ = reaches_upstream(world, hand, "10.137.0.14", "still denied")
    assert not ok, "the default deny went away with the last vif"


@BOTH
def test_packet_bearing_guest_address_from_upstream_is_dropped(world):
    g = world.add_guest(3, ["10.137.0.12"])
    online(world, g)
    world.upstream.ip("addr", "add", "10.137.0.12/32", "dev", "eth0")
    world.upstream.ip("addr", "add", "10.137.0.77/32", "dev", "eth0")
    with UdpSink(world.netvm, world.UPLINK_NETVM, PORT) as sink:
        udp_send(world.upstream, world.UPLINK_NETVM, PORT, "forged", src="10.137.0.12")
        udp_send(world.upstream, world.UPLINK_NETVM, PORT, "control", src="10.137.0.77")
        assert sink.got("control"), "the control packet should arrive"
        assert not any(d == "forged" for _, d in sink.collect(0.3))


@BOTH
def test_ipv6_from_a_guest_without_ipv6_is_dropped(world):
    g = world.add_guest(3, ["10.137.0.12"])
    online(world, g)
    g.configure()
    world.netvm.ip("-6", "addr", "add", "fd00:77::1/64", "dev", "vif3.0", "nodad")
    g.ns.ip("-6", "addr", "add", "fd00:77::2/64", "dev", "eth0", "nodad")
    world.netvm.ip("-6", "neigh", "replace", "fd00:77::2", "lladdr", g.mac, "dev", "vif3.0")
    with UdpSink(world.netvm, "fd00:77::1", PORT) as sink:
        udp_send(g.ns, "fd00:77::1", PORT, "v6")
        assert not any(d == "v6" for _, d in sink.collect(0.6))
    assert drops(world, "vif3.0", 6) > 0


@BOTH
def test_two_addresses_on_one_vif_both_work(world):
    g = world.add_guest(3, ["10.137.0.12", "10.137.0.13"])
    online(world, g)
    g.configure()
    for src in ("10.137.0.12", "10.137.0.13"):
        ok, seen = reaches_upstream(world, g, src, f"from-{src}")
        assert ok and set(seen) == {src}


def test_ipv6_address_routed_when_given(world):
    g = world.add_guest(4, ["10.137.0.14", "fd09:24ef:4179::a89:e"])
    online(world, g)
    routes6 = world.netvm.ip("-6", "route", "show", "dev", "vif4.0").stdout
    assert "fd09:24ef:4179::a89:e metric 32748" in routes6
    raw6 = world.netvm.exec(["ip6tables-save", "-t", "raw"]).stdout
    assert "-A vrq-in-vif4.0 -s fd09:24ef:4179::a89:e/128 -j RETURN" in raw6


@BOTH
def test_offline_leaves_nothing_behind(world):
    before = world.snapshot()
    g = world.add_guest(3, ["10.137.0.12", "10.137.0.13"])
    vif_before = world.netvm.ip("-o", "link", "show", "dev", "vif3.0").stdout
    online(world, g)
    res = world.hotplug(g, "offline")
    assert res.returncode == 0, res.stderr
    after = world.snapshot()
    for key in ("routes", "routes6", "neigh", "iptables-save", "ip6tables-save", "nft", "nft-elements", "records"):
        assert after[key] == before[key], key
    assert "vif3.0" not in after["addrs"].replace(vif_before, "")
    assert "10.137.0.1/32" not in after["addrs"]


@BOTH
def test_online_twice_equals_once_and_offline_twice_is_fine(world):
    g = world.add_guest(3, ["10.137.0.12"])
    online(world, g)
    once = world.snapshot()
    online(world, g)
    assert world.snapshot() == once
    assert world.hotplug(g, "offline").returncode == 0
    gone = world.snapshot()
    assert world.hotplug(g, "offline").returncode == 0
    assert world.snapshot() == gone


@BOTH
def test_repeated_online_offline_cycles(world):
    g = world.add_guest(3, ["10.137.0.12"])
    before = world.snapshot()
    for _ in range(5):
        online(world, g)
        assert world.hotplug(g, "offline").returncode == 0
    after = world.snapshot()
    for key in ("routes", "neigh", "iptables-save", "ip6tables-save", "nft", "nft-elements", "records"):
        assert after[key] == before[key], key


@BOTH
def test_offline_after_the_interface_vanished(world):
    g = world.add_guest(3, ["10.137.0.12"])
    online(world, g)
    world.netvm.ip("link", "del", "vif3.0")
    res = world.hotplug(g, "offline")
    assert res.returncode == 0, res.stderr
    snap = world.snapshot()
    assert "vrq" not in snap["iptables-save"] and "vrq" not in snap["ip6tables-save"]
    assert snap["nft-elements"] == ""
    assert snap["records"] == []


@BOTH
def test_online_for_a_missing_interface_fails_and_changes_nothing(world):
    g = world.add_guest(3, ["10.137.0.12"])
    world.netvm.ip("link", "del", "vif3.0")
    before = world.snapshot()
    res = world.hotplug(g, "online")
    assert res.returncode == 1
    assert "vif3.0 does not exist" in res.stderr
    assert status(world, g) == "error"
    assert "vif3.0 does not exist" in error_text(world, g)
    assert world.snapshot() == before


@BOTH
def test_rerun_after_lost_record_does_not_duplicate_rules(world):
    g = world.add_guest(3, ["10.137.0.12"])
    online(world, g)
    once = world.snapshot()
    os.unlink(os.path.join(world.env["VIF_ROUTE_QUBES_STATE_DIR"], "vif3.0.json"))
    online(world, g)
    assert world.snapshot() == once


def test_hand_deleted_jump_is_repaired_without_duplicates(world):
    g = world.add_guest(3, ["10.137.0.12"])
    online(world, g)
    once = world.snapshot()
    world.netvm.exec(["iptables", "-t", "raw", "-D", "vrq-guard", "-i", "vif3.0", "-g", "vrq-in-vif3.0"])
    online(world, g)
    assert world.snapshot()["iptables-save"] == once["iptables-save"]


@pytest.mark.parametrize("damage", [
    ["-D", "PREROUTING", "-m", "devgroup", "--src-group", "2", "-m", "comment", "--comment", "vrq-guard",
     "-j", "vrq-guard"],
    ["-D", "vrq-guard", "-j", "DROP"],
    ["-A", "vrq-guard", "-i", "eth9", "-j", "RETURN"],
])
def test_a_damaged_guard_is_made_whole_by_the_next_online(world, damage):
    g = world.add_guest(3, ["10.137.0.12"])
    online(world, g)
    once = world.netvm.exec(["iptables-save", "-t", "raw"]).stdout
    world.netvm.exec(["iptables", "-t", "raw", *damage])
    online(world, g)
    again = world.netvm.exec(["iptables-save", "-t", "raw"]).stdout
    ours = lambda text: sorted(line for line in text.splitlines() if "vrq" in line and "eth9" not in line)  # noqa: E731
    assert ours(again) == ours(once)
    assert [line for line in again.splitlines() if line.startswith("-A vrq-guard ")][-1] == "-A vrq-guard -j DROP"


@BOTH
def test_vifname_renames_the_interface_first(world):
    g = world.add_guest(5, ["10.137.0.15"], vifname="guest-web")
    online(world, g)
    assert "guest-web" in world.netvm.ip("-o", "link", "show").stdout
    assert "10.137.0.15 scope link metric 32747" in world.netvm.ip("route", "show", "dev", "guest-web").stdout
    g.configure()
    ok, _ = reaches_upstream(world, g, "10.137.0.15", "renamed")
    assert ok
    assert world.hotplug(g, "offline").returncode == 0
    snap = world.snapshot()  # the iptables guard stays, idle: left out
    assert "vrq" not in snap["iptables-save"] and snap["nft-elements"] == ""


def test_vifname_taken_is_refused(world):
    g = world.add_guest(5, ["10.137.0.15"], vifname="taken0")
    world.netvm.ip("link", "add", "taken0", "type", "veth", "peer", "name", "taken1")
    before = world.snapshot()
    res = world.hotplug(g, "online")
    assert res.returncode == 1 and "already exists" in res.stderr
    assert world.snapshot() == before


def test_hooks_run_with_command_vif_type_and_address(world, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    out = tmp_path / "hook.out"
    hook = hooks / "10-record"
    hook.write_text(f"#!/bin/sh\necho \"$@\" >> {out}\n")
    hook.chmod(0o755)
    (hooks / "20-failing").write_text("#!/bin/sh\nexit 3\n")
    (hooks / "20-failing").chmod(0o755)
    (hooks / "30-not-executable").write_text("#!/bin/sh\necho nope >> /dev/null\n")
    g = world.add_guest(3, ["10.137.0.12", "10.137.0.13"])
    online(world, g)
    assert world.hotplug(g, "offline").returncode == 0
    assert out.read_text().splitlines() == [
        "online vif3.0 vif 10.137.0.12", "online vif3.0 vif 10.137.0.13",
        "offline vif3.0 vif 10.137.0.12", "offline vif3.0 vif 10.137.0.13",
    ]


@BOTH
def test_gateway_optional_proxy_arp_answers(world):
    world.xs.rm("/local/domain/0/qubes_netvm_gateway")
    g = world.add_guest(3, ["10.137.0.12"])
    online(world, g)
    assert "inet " not in world.netvm.ip("addr", "show", "dev", "vif3.0").stdout
    assert world.netvm.read("/proc/sys/net/ipv4/conf/vif3.0/proxy_arp").strip() == "1"
    g.configure()
    ok, _ = reaches_upstream(world, g, "10.137.0.12", "via-proxy-arp")
    assert ok


def test_type_if_pairing_does_nothing(world):
    g = world.add_guest(3, ["10.137.0.12"])
    before = world.snapshot()
    for argv in (["online", "type_if=tap"], ["add", "type_if=vif"], ["remove"]):
        res = world.netvm.exec([world_script(), *argv], check=False, env=g.env())
        assert res.returncode == 0, (argv, res.stderr)
    assert world.snapshot() == before
    assert status(world, g) is None


def world_script():
    from tests.rigs.netns import _script

    return _script("vif-route-qubes")


def test_key_value_words_override_xenstore(world):
    g = world.add_guest(3, ["10.137.0.12"])
    online(world, g, "ip=10.137.0.40")
    assert "10.137.0.40 scope link" in world.netvm.ip("route", "show", "dev", "vif3.0").stdout
    assert "10.137.0.12" not in world.netvm.ip("route", "show", "dev", "vif3.0").stdout


def test_seed_netvm_routing_table(world):
    """The seed document's netvm table: five vifs, the uplink, the default route."""
    seed = {4: "10.2.0.16", 10: "10.2.0.7", 9: "10.2.0.9", 8: "10.2.0.8", 3: "10.2.0.12"}
    world.netvm.ip("route", "replace", "192.168.0.0/24", "dev", "eth0", "metric", "1", "proto", "kernel",
                   "scope", "link", "src", world.UPLINK_NETVM)
    world.netvm.ip("route", "del", "192.168.0.0/24", "dev", "eth0", "metric", "0", check=False)
    for domid, addr in seed.items():
        online(world, world.add_guest(domid, [addr]))
    table = routes.table(world.netvm)
    print("\n" + routes.format_table(table))
    rows = {(r[0], r[2], r[7]) for r in table}
    for domid, addr in seed.items():
        assert (addr, "255.255.255.255", f"vif{domid}.0") in rows
    assert ("192.168.0.0", "255.255.255.0", "eth0") in rows
    assert ("0.0.0.0", "0.0.0.0", "eth0") in rows
    flags = {r[0]: r[3] for r in table}
    assert flags["10.2.0.16"] == "UH" and flags["0.0.0.0"] == "UG"


def _sysctl(world, version, conf, key):
    return world.netvm.read(f"/proc/sys/net/ipv{version}/conf/{conf}/{key}").strip()


def test_harden_network_interfaces_applies_qubes_hardening(world):
    """issue 18 §5: dom0's service switch (Qubes' QubesDB path, here under
    the netvm's XenStore home) applies the sysctls of Qubes'
    81-qubes.conf.optional to the vif and to ``all``, in-process."""
    plain = world.add_guest(4, ["10.137.0.14"])
    online(world, plain)
    assert _sysctl(world, 6, "vif4.0", "accept_ra") == "1"  # the kernel's default: untouched
    world.xs.write("/local/domain/0/qubes-service/harden-network-interfaces", "1")
    g = world.add_guest(3, ["10.137.0.12", "fd09:24ef:4179::a89:c"])
    online(world, g)
    for conf in ("vif3.0", "all"):
        for key, value in [("accept_redirects", "0"), ("send_redirects", "0"), ("secure_redirects", "0"),
                           ("accept_source_route", "0"), ("drop_unicast_in_l2_multicast", "1")]:
            assert _sysctl(world, 4, conf, key) == value, (conf, key)
        for key, value in [("accept_ra", "0"), ("autoconf", "0"), ("accept_dad", "0"),
                           ("accept_redirects", "0"), ("accept_source_route", "-1")]:
            assert _sysctl(world, 6, conf, key) == value, (conf, key)
    assert _sysctl(world, 6, "vif4.0", "accept_ra") == "1"  # another vif is not touched
    g.configure()
    ok, _ = reaches_upstream(world, g, "10.137.0.12", "hardened")
    assert ok


def test_harden_switch_with_garbage_is_refused(world):
    world.xs.write("/local/domain/0/qubes-service/harden-network-interfaces", "maybe")
    g = world.add_guest(3, ["10.137.0.12"])
    before = world.snapshot()
    res = world.hotplug(g, "online")
    assert res.returncode == 1 and "harden-network-interfaces" in res.stderr and "not a switch" in res.stderr
    assert world.snapshot() == before
