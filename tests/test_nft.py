"""The nft firewall backend: golden payloads (pure), then the real nft in
network namespaces with real packets: coexistence with a Qubes-loaded
table, IPv6 with neighbour discovery, stale elements, moving a vif between
backends, status, and which backend acted and why."""

import json
import os
from ipaddress import ip_address

import pytest

from vif_route_qubes.firewall import xtables as X
from vif_route_qubes.firewall import nft as N
from tests.rigs.netns import UdpSink, _script, udp_send

A = ip_address
SCRIPT = _script("vif-route-qubes")
PORT = 5353
BOTH = pytest.mark.parametrize("world", ["iptables", "nft"], indirect=True)
NFT = pytest.mark.parametrize("world", ["nft"], indirect=True)


# ----------------------------------------------------------------------------
# Pure: payloads


def test_fresh_vif_payload_golden():
    # no record: one transaction whose creates fail if we hold elements
    # for this name already, or another vif has the address (then the
    # kernel is read)
    ad = (A("10.137.0.12"), A("fd09:24ef:4179::a89:c"))
    assert N.transaction("vif3.0", ad, guard="create", fresh=ad) == (
        'create element ip qubes vrq-guarded { "vif3.0" }\n'
        'create element ip qubes downstream { 10.137.0.12 }\n'
        'create element ip6 qubes downstream { fd09:24ef:4179::a89:c }\n'
        'add element ip qubes allowed { "vif3.0" . 10.137.0.12 }\n'
        'add element ip6 qubes allowed { "vif3.0" . fd09:24ef:4179::a89:c }\n'
        'add element ip6 qubes vrq-nd-mld { "vif3.0" }\n'
    )


def test_replacing_elements_payload_golden():
    # previous 10.137.0.12 + an IPv6 address, now 10.137.0.12 + .13: the
    # kept address stays; the dropped one must not be shared with another
    # vif (create + delete in vrq-shared fails if it is); removals are
    # add + delete so an element already gone cannot fail the transaction
    text = N.transaction("vif3.0", (A("10.137.0.12"), A("10.137.0.13")),
                         (A("10.137.0.12"), A("fd09:24ef:4179::a89:c")), drop_nd=True,
                         fresh=[A("10.137.0.13")], unshared=[A("fd09:24ef:4179::a89:c")])
    assert text == (
        'add element ip qubes vrq-guarded { "vif3.0" }\n'
        'create element ip qubes downstream { 10.137.0.13 }\n'
        'create element ip6 qubes vrq-shared { fd09:24ef:4179::a89:c }\n'
        'delete element ip6 qubes vrq-shared { fd09:24ef:4179::a89:c }\n'
        'add element ip6 qubes allowed { "vif3.0" . fd09:24ef:4179::a89:c }\n'
        'add element ip6 qubes downstream { fd09:24ef:4179::a89:c }\n'
        'add element ip6 qubes vrq-nd-mld { "vif3.0" }\n'
        'delete element ip6 qubes allowed { "vif3.0" . fd09:24ef:4179::a89:c }\n'
        'delete element ip6 qubes downstream { fd09:24ef:4179::a89:c }\n'
        'delete element ip6 qubes vrq-nd-mld { "vif3.0" }\n'
        'add element ip qubes allowed { "vif3.0" . 10.137.0.12, "vif3.0" . 10.137.0.13 }\n'
        'add element ip qubes downstream { 10.137.0.12 }\n'
    )


def test_removal_payload_golden():
    assert N.transaction("vif3.0", (), (A("10.137.0.12"),), drop_nd=True, guard="drop",
                         unshared=[A("10.137.0.12")]) == (
        'add element ip qubes vrq-guarded { "vif3.0" }\n'
        'delete element ip qubes vrq-guarded { "vif3.0" }\n'
        'create element ip qubes vrq-shared { 10.137.0.12 }\n'
        'delete element ip qubes vrq-shared { 10.137.0.12 }\n'
        'add element ip qubes allowed { "vif3.0" . 10.137.0.12 }\n'
        'add element ip qubes downstream { 10.137.0.12 }\n'
        'add element ip6 qubes vrq-nd-mld { "vif3.0" }\n'
        'delete element ip qubes allowed { "vif3.0" . 10.137.0.12 }\n'
        'delete element ip qubes downstream { 10.137.0.12 }\n'
        'delete element ip6 qubes vrq-nd-mld { "vif3.0" }\n'
    )


def test_a_shared_address_keeps_its_downstream_element():
    # the kernel read says vif9.0 has the address too: removing vif3.0's
    # keeps downstream (vif9.0 still needs it) and the shared mark (two
    # holders before, one after: the mark goes)
    text = N.transaction("vif3.0", (), (A("10.137.0.12"),), drop_nd=True, guard="drop",
                         keep_downstream=[A("10.137.0.12")], unshare=[A("10.137.0.12")])
    assert "delete element ip qubes downstream" not in text
    assert 'delete element ip qubes allowed { "vif3.0" . 10.137.0.12 }' in text
    assert "delete element ip qubes vrq-shared { 10.137.0.12 }" in text


def test_vif_without_addresses_gets_only_its_marker():
    # default deny does the rest: nothing of it is in allowed
    assert N.transaction("vif3.0", (), guard="create") == 'create element ip qubes vrq-guarded { "vif3.0" }\n'


def test_skeleton_on_an_empty_kernel_golden():
    text = N.transaction("vif3.0", (A("10.137.0.12"),), ruleset=N.Ruleset())
    assert text.splitlines()[:10] == [
        "add table ip qubes",
        "add set ip qubes downstream { type ipv4_addr; }",
        "add set ip qubes allowed { type ifname . ipv4_addr; }",
        "add set ip qubes vrq-guarded { type ifname; }",
        "add set ip qubes vrq-shared { type ipv4_addr; }",
        "add chain ip qubes antispoof",
        "add rule ip qubes antispoof iifname . ip saddr @allowed accept",
        "add rule ip qubes antispoof counter drop",
        "add chain ip qubes prerouting { type filter hook prerouting priority raw; policy accept; }",
        "add rule ip qubes prerouting iifgroup 2 goto antispoof",
    ]
    assert ("add rule ip6 qubes antispoof iifname @vrq-nd-mld ip6 saddr { fe80::/10, :: } icmpv6 type { "
            "mld-listener-query, mld-listener-report, mld-listener-done, nd-router-solicit, nd-router-advert, "
            "nd-neighbor-solicit, nd-neighbor-advert, mld2-listener-report } accept") in text.splitlines()
    # every element-independent rule exactly once
    rules = [line for line in text.splitlines() if line.startswith("add rule")]
    assert len(rules) == len(set(rules)) == 9  # 4 per family, and the ND rule


QUBES_JSON = {"nftables": [
    {"metainfo": {"version": "1.0.6"}},
    {"table": {"family": "ip", "name": "qubes", "handle": 1}},
    {"set": {"family": "ip", "name": "downstream", "table": "qubes", "type": "ipv4_addr", "elem": ["10.137.0.99"]}},
    {"set": {"family": "ip", "name": "allowed", "table": "qubes", "type": ["ifname", "ipv4_addr"],
             "elem": [{"concat": ["vif9.0", "10.137.0.99"]}]}},
    {"chain": {"family": "ip", "table": "qubes", "name": "prerouting", "hook": "prerouting"}},
    {"chain": {"family": "ip", "table": "qubes", "name": "antispoof"}},
    {"table": {"family": "ip6", "name": "qubes", "handle": 2}},
    {"set": {"family": "ip6", "name": "downstream", "table": "qubes", "type": "ipv6_addr"}},
    {"set": {"family": "ip6", "name": "allowed", "table": "qubes", "type": ["ifname", "ipv6_addr"]}},
    {"chain": {"family": "ip6", "table": "qubes", "name": "prerouting"}},
    {"chain": {"family": "ip6", "table": "qubes", "name": "antispoof"}},
    {"chain": {"family": "ip", "table": "raw", "name": "vrq-in-vif9.0"}},
]}


def test_a_qubes_table_is_reused_as_it_is():
    have = N.Ruleset.parse(json.dumps(QUBES_JSON))
    assert have.allowed("vif9.0") == ["10.137.0.99"] and have.owners() == {"vif9.0"}
    assert have.raw_chains == {("ip", "vrq-in-vif9.0")}
    text = N.transaction("vif3.0", (A("10.137.0.12"),), ruleset=have)
    # only sets of ours are added: no table, chain or rule of Qubes' is
    # created again, flushed or redefined
    assert text.splitlines()[:4] == ["add set ip qubes vrq-guarded { type ifname; }",
                                     "add set ip qubes vrq-shared { type ipv4_addr; }",
                                     "add set ip6 qubes vrq-nd-mld { type ifname; }",
                                     "add set ip6 qubes vrq-shared { type ipv6_addr; }"]
    assert not any(w in text for w in ("add table", "add chain", "add rule", "flush", "delete table"))


def test_which_default_deny_drops_a_vif_of_the_other_backend():
    # status asks the backend not in use: is its default deny in force,
    # and does it let nothing of this vif through?
    from vif_route_qubes.firewall import iptables as I

    save = ("*raw\n:PREROUTING ACCEPT [0:0]\n:vrq-guard - [0:0]\n"
            "-A PREROUTING -m devgroup --src-group 0x2 -m comment --comment vrq-guard -j vrq-guard\n"
            "-A vrq-guard -i vif4.0 -g vrq-in-vif4.0\n-A vrq-guard -j DROP\nCOMMIT\n")
    assert I.guard_denies(X.table(save), "vif3.0") and not I.guard_denies(X.table(save), "vif4.0")
    no_jump = "\n".join(line for line in save.splitlines() if not line.startswith("-A PREROUTING"))
    no_drop = save.replace("-A vrq-guard -j DROP\n", "")
    assert not I.guard_denies(X.table(no_jump), "vif3.0") and not I.guard_denies(X.table(no_drop), "vif3.0")
    # a Qubes table as listed without its rules denies nothing; with them it does
    assert not N.Ruleset.parse(json.dumps(QUBES_JSON)).denies(4)
    match = {"match": {"op": "==", "left": {"meta": {"key": "iifgroup"}}, "right": 2}}
    have = N.Ruleset(tables={"ip"}, hooks={("ip", "prerouting"): ("prerouting", -300)},
                     rules={("ip", "prerouting"): [[match, {"goto": {"target": "antispoof"}}]],
                            ("ip", "antispoof"): [[{"counter": None}, {"drop": None}]]})
    assert have.denies(4) and not have.denies(6)
    have.rules[("ip", "antispoof")].append([{"accept": None}])
    assert not have.denies(4)


def test_the_last_vif_retires_only_unnamed_sets_of_ours_and_only_when_alone():
    nd_rule = [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": f"@{N.ND_SET}"}},
               {"accept": None}]
    sets = {("ip", "allowed"): [("vif3.0", "10.137.0.12")], ("ip", N.GUARDED): ["vif3.0"],
            ("ip", N.SHARED): [], ("ip6", N.SHARED): [], ("ip6", N.ND_SET): ["vif3.0"]}
    qubes = N.Ruleset(tables={"ip", "ip6"}, sets=sets)
    everything = [("ip", N.GUARDED), ("ip", N.SHARED), ("ip6", N.SHARED), ("ip6", N.ND_SET)]
    assert N.retirement(qubes, "vif3.0", True) == everything
    # tables we made: our antispoof rule names the ND set, which stays
    ours = N.Ruleset(tables={"ip", "ip6"}, sets=sets, rules={("ip6", "antispoof"): [nd_rule]})
    assert N.retirement(ours, "vif3.0", True) == everything[:3]
    # another interface still has elements (ours or another writer's): nothing
    for extra in ({("ip", "allowed"): [("vif3.0", "10.137.0.12"), ("vif9.0", "10.137.0.99")]},
                  {("ip", N.GUARDED): ["vif3.0", "vif4.0"]}, {("ip6", N.ND_SET): ["vif4.0"]}):
        assert N.retirement(N.Ruleset(tables={"ip", "ip6"}, sets={**sets, **extra}), "vif3.0", True) == []
    # release 0.1's ND set waits for its upgrade
    assert N.retirement(N.Ruleset(tables={"ip", "ip6"}, sets={**sets, ("ip6", N.OLD_ND_SET): []}),
                        "vif3.0", True) == []
    # sets already gone are not deleted again, unless the removal creates them
    bare = N.Ruleset(tables={"ip", "ip6"}, sets={("ip", "allowed"): []})
    assert N.retirement(bare, "vif3.0", False) == [] and N.retirement(bare, "vif3.0", True) == everything
    assert N.retirement(N.Ruleset(tables={"ip"}), "vif3.0", True) == everything[:2]


# ----------------------------------------------------------------------------
# Namespaces: helpers


def online(world, guest, *words, env=None):
    res = world.hotplug(guest, "online", *words, env=env)
    assert res.returncode == 0, res.stderr
    return res


def reaches(world, guest, src, dst, tag, sink_ns=None):
    with UdpSink(sink_ns or world.netvm, dst, PORT) as sink:
        udp_send(guest.ns, dst, PORT, tag, src=src)
        return sink.got(tag, wait=1.5)


def status(world, guest, *args, env=None):
    return world.netvm.exec([SCRIPT, "status", *args], check=False, env=env or guest.env())


def rows(text):
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("ok", "missing", "unexpected"):
            found.append((parts[0], parts[1], line.split("  # ")[0].split(None, 2)[2].strip()))
    return found


GW6 = "fd09:24ef:4179::1"


def configure6(world, guest, addr):
    """The guest's IPv6 side by hand, with no static neighbour entry for
    the gateway: the guest must find it by neighbour discovery."""
    guest.ns.sysctl("net.ipv6.conf.all.accept_dad", 0)
    guest.ns.sysctl("net.ipv6.conf.default.accept_dad", 0)
    guest.configure()
    guest.ns.sysctl("net.ipv6.conf.eth0.accept_dad", 0)
    assert addr in guest.ns.ip("-6", "addr", "show", "dev", "eth0").stdout
    guest.ns.ip("-6", "route", "add", GW6, "dev", "eth0")


# ----------------------------------------------------------------------------
# IPv6, both backends


@BOTH
def test_ipv6_own_source_passes_with_neighbour_discovery_and_forged_is_dropped(world):
    world.xs.write("/local/domain/0/qubes_netvm_gateway6", GW6)
    g = world.add_guest(3, ["10.137.0.12", "fd09:24ef:4179::a89:c"])
    online(world, g)
    configure6(world, g, "fd09:24ef:4179::a89:c")
    assert reaches(world, g, "fd09:24ef:4179::a89:c", GW6, "own6"), "own IPv6 source dropped"
    # the guest learnt the gateway's MAC by neighbour discovery (no static entry)
    assert "lladdr" in g.ns.ip("-6", "neigh", "show", GW6).stdout
    g.ns.ip("-6", "addr", "add", "fd09:24ef:4179::99/128", "dev", "eth0", "nodad")
    assert not reaches(world, g, "fd09:24ef:4179::99", GW6, "forged6"), "forged IPv6 source got through"
    # the guest's IPv6 address arriving from elsewhere (the uplink) is dropped
    world.netvm.ip("-6", "addr", "add", "fd00:1::2/64", "dev", "eth0", "nodad")
    world.upstream.ip("-6", "addr", "add", "fd00:1::1/64", "dev", "eth0", "nodad")
    world.upstream.ip("-6", "addr", "add", "fd09:24ef:4179::a89:c/128", "dev", "eth0", "nodad")
    world.upstream.ip("-6", "addr", "add", "fd09:24ef:4179::77/128", "dev", "eth0", "nodad")
    with UdpSink(world.netvm, "fd00:1::2", PORT) as sink:
        # resolve the netvm first from a plain source: Linux sends a neighbour
        # solicitation from the source of the packet that waits for it, and
        # one from the forged source is dropped like the packet, so the
        # control would wait for the retransmission (1 s, the sink's limit)
        udp_send(world.upstream, "fd00:1::2", PORT, "hello", src="fd00:1::1")
        assert sink.got("hello"), "the uplink should work"
        udp_send(world.upstream, "fd00:1::2", PORT, "forged", src="fd09:24ef:4179::a89:c")
        udp_send(world.upstream, "fd00:1::2", PORT, "control", src="fd09:24ef:4179::77")
        assert sink.got("control"), "the control packet should arrive"
        assert not any(d == "forged" for _, d in sink.collect(0.3))


# ----------------------------------------------------------------------------
# nft only


@NFT
def test_default_deny_a_group_2_interface_without_elements_gets_nothing_through(world):
    g = world.add_guest(3, ["10.137.0.12"])
    other = world.add_guest(4, ["10.137.0.14"])
    online(world, g)  # the tables exist from here on
    # vif4.0 is put in group 2 by hand, no online ran for it
    world.netvm.ip("link", "set", "vif4.0", "group", "2", "up")
    world.netvm.ip("route", "add", "10.137.0.14/32", "dev", "vif4.0")
    other.configure()
    g.configure()
    assert reaches(world, g, "10.137.0.12", world.UPLINK_UPSTREAM, "ok", world.upstream)
    assert not reaches(world, other, "10.137.0.14", world.UPLINK_UPSTREAM, "deny", world.upstream)


QUBES_RULESET = """
table ip qubes {
    set downstream { type ipv4_addr; elements = { 10.137.0.99 } }
    set allowed { type ifname . ipv4_addr; elements = { "vif9.0" . 10.137.0.99 } }
    chain prerouting {
        type filter hook prerouting priority raw; policy accept;
        iifgroup 2 goto antispoof
        ip saddr @downstream counter drop
    }
    chain antispoof {
        iifname . ip saddr @allowed accept
        counter drop
    }
}
table ip6 qubes {
    set downstream { type ipv6_addr; }
    set allowed { type ifname . ipv6_addr; }
    chain antispoof {
        iifname . ip6 saddr @allowed accept
        counter drop
    }
    chain prerouting {
        type filter hook prerouting priority raw; policy accept;
        iifgroup 2 goto antispoof
        ip6 saddr @downstream counter drop
    }
}
"""


def qubes_tables(world):
    """Both qubes tables as text, without counters and set elements."""
    out = []
    for fam in ("ip", "ip6"):
        text = world.netvm.exec(["nft", "-s", "list", "table", fam, "qubes"]).stdout
        out += [line for line in text.splitlines() if "elements =" not in line and not line.startswith("\t\t\t")]
    return out


@NFT
def test_coexistence_with_a_qubes_loaded_table(world):
    world.netvm.exec(["nft", "-f", "-"], input=QUBES_RULESET)
    before = qubes_tables(world)
    g = world.add_guest(3, ["10.137.0.12"])
    online(world, g)
    during = qubes_tables(world)
    # Qubes' chains are untouched; our two sets are the only additions
    added = [line for line in during if line not in before]
    assert all("vrq-" in line or line.strip() in ("type ifname", "type ipv4_addr", "type ipv6_addr", "}", "")
               for line in added), added
    for chain in ("prerouting", "antispoof"):
        for fam in ("ip", "ip6"):
            listing = world.netvm.exec(["nft", "-s", "list", "chain", fam, "qubes", chain]).stdout
            assert "vrq" not in listing and listing.count("\n") < 10
    elements = world.snapshot()["nft-elements"]
    assert '["vif3.0", "10.137.0.12"]' in elements and '["vif9.0", "10.137.0.99"]' in elements
    # status finds Qubes' own rules as good as ours
    res = status(world, g, "vif3.0")
    assert res.returncode == 0, res.stdout
    # packets: own source passes, forged is dropped, by Qubes' own rules
    g.configure()
    assert reaches(world, g, "10.137.0.12", world.UPLINK_UPSTREAM, "own", world.upstream)
    g.ns.ip("addr", "add", "10.137.0.99/32", "dev", "eth0")
    assert not reaches(world, g, "10.137.0.99", world.UPLINK_UPSTREAM, "forged", world.upstream)
    assert world.hotplug(g, "offline").returncode == 0
    # only set elements changed: Qubes' own element stays, ours are gone
    elements = world.snapshot()["nft-elements"]
    assert "vif3.0" not in elements and '["vif9.0", "10.137.0.99"]' in elements
    assert qubes_tables(world) == during


def full_tables(world):
    """Both qubes tables as nft lists them, elements included, counters not."""
    return [world.netvm.exec(["nft", "-s", "list", "table", fam, "qubes"]).stdout for fam in ("ip", "ip6")]


@NFT
def test_the_last_offline_leaves_a_qubes_table_exactly_as_it_found_it(world):
    world.xs.write("/local/domain/0/qubes_netvm_gateway6", GW6)
    bare = QUBES_RULESET.replace("elements = { 10.137.0.99 } ", "").replace(
        'elements = { "vif9.0" . 10.137.0.99 } ', "")
    world.netvm.exec(["nft", "-f", "-"], input=bare)
    loaded = full_tables(world)
    g = world.add_guest(3, ["10.137.0.12", "fd09:24ef:4179::a89:c"])
    h = world.add_guest(4, ["10.137.0.14"])
    for round in range(2):  # and again: the next first vif finds the sets absent
        online(world, g)
        online(world, h)
        assert all(n in "".join(full_tables(world)) for n in (N.GUARDED, N.SHARED, N.ND_SET))
        assert world.hotplug(g, "offline").returncode == 0
        # one vif left: our sets stay, and it stays guarded
        assert "".join(full_tables(world)).count(N.SHARED) == 2
        if round == 0:
            h.configure()
        assert reaches(world, h, "10.137.0.14", world.UPLINK_UPSTREAM, "own", world.upstream)
        h.ns.ip("addr", "add", "10.137.0.99/32", "dev", "eth0")
        assert not reaches(world, h, "10.137.0.99", world.UPLINK_UPSTREAM, "forged", world.upstream)
        h.ns.ip("addr", "del", "10.137.0.99/32", "dev", "eth0")
        res = world.hotplug(h, "offline", env=h.env(VIF_ROUTE_QUBES_DEBUG="1"))
        assert res.returncode == 0, res.stderr
        assert "our nft sets ip vrq-guarded, ip vrq-shared, ip6 vrq-shared, ip6 vrq-nd-mld" in res.stderr
        assert full_tables(world) == loaded


@NFT
def test_the_last_offline_in_tables_we_made_keeps_what_guards(world):
    world.xs.write("/local/domain/0/qubes_netvm_gateway6", GW6)
    g = world.add_guest(3, ["10.137.0.12", "fd09:24ef:4179::a89:c"])
    other = world.add_guest(4, ["10.137.0.14"])
    online(world, g)
    assert world.hotplug(g, "offline").returncode == 0
    ip, ip6 = full_tables(world)
    # the tables, their chains and sets, and the ND set our rule names stay
    assert N.GUARDED not in ip and N.SHARED not in ip + ip6 and f"set {N.ND_SET}" in ip6
    for name in ("chain prerouting", "chain antispoof", "set allowed", "set downstream"):
        assert name in ip and name in ip6
    # the default deny outlives the guests: a group 2 interface made by
    # hand gets nothing through
    world.netvm.ip("link", "set", "vif4.0", "group", "2", "up")
    world.netvm.ip("route", "add", "10.137.0.14/32", "dev", "vif4.0")
    other.configure()
    assert not reaches(world, other, "10.137.0.14", world.UPLINK_UPSTREAM, "deny", world.upstream)
    # the next first vif makes the sets again and is guarded
    online(world, g)
    assert full_tables(world)[0].count(N.GUARDED) == 1
    g.configure()
    assert reaches(world, g, "10.137.0.12", world.UPLINK_UPSTREAM, "back", world.upstream)
    g.ns.ip("addr", "add", "10.137.0.99/32", "dev", "eth0")
    assert not reaches(world, g, "10.137.0.99", world.UPLINK_UPSTREAM, "forged", world.upstream)


@NFT
def test_stale_elements_of_an_earlier_vif_are_replaced(world):
    g = world.add_guest(3, ["10.137.0.12"])
    online(world, g)
    # the record is lost and the guest's address changes: the next online
    # must not keep the old address allowed
    os.unlink(os.path.join(world.env["VIF_ROUTE_QUBES_STATE_DIR"], "vif3.0.json"))
    world.xs.write(f"/local/domain/0/{g.xenbus_path}/ip", "10.137.0.40")
    online(world, g)
    elements = world.snapshot()["nft-elements"]
    assert "10.137.0.12" not in elements and '["vif3.0", "10.137.0.40"]' in elements
    assert world.hotplug(g, "offline").returncode == 0
    assert world.snapshot()["nft-elements"] == ""


@NFT
def test_offline_from_the_kernels_sets_alone(world):
    g = world.add_guest(3, ["10.137.0.12", "fd09:24ef:4179::a89:c"])
    online(world, g)
    os.unlink(os.path.join(world.env["VIF_ROUTE_QUBES_STATE_DIR"], "vif3.0.json"))
    assert world.xs.rm(f"/local/domain/0/{g.xenbus_path}")
    res = world.hotplug(g, "offline")
    assert res.returncode == 0, res.stderr
    assert world.snapshot()["nft-elements"] == ""
    routes = world.netvm.ip("route", "show").stdout + world.netvm.ip("-6", "route", "show").stdout
    assert "10.137.0.12" not in routes and "a89:c" not in routes


@pytest.mark.parametrize("first,then", [("iptables", "nft"), ("nft", "iptables")])
def test_moving_a_running_vif_between_backends(world, first, then):
    g = world.add_guest(3, ["10.137.0.12", "fd09:24ef:4179::a89:c"])
    before = world.snapshot()
    online(world, g, env=g.env(VIF_ROUTE_QUBES_FIREWALL=first))
    res = online(world, g, env=g.env(VIF_ROUTE_QUBES_FIREWALL=then, VIF_ROUTE_QUBES_DEBUG="1"))
    assert f"moved from the {first} to the {then} firewall backend" in res.stderr
    snap = world.snapshot()
    has_ipt = "vrq-in-vif3.0" in snap["iptables-save"] and "vrq-in-vif3.0" in snap["ip6tables-save"]
    has_nft = "vif3.0" in snap["nft-elements"]
    assert (has_ipt, has_nft) == (then == "iptables", then == "nft"), "both backends' rules, or none"
    g.configure()
    # the old backend's default deny outlives the move (the nft tables may
    # be Qubes', the iptables guard other vifs'): the log says so, and
    # deleting it is the documented step
    assert "default deny drops everything" in res.stderr
    assert not reaches(world, g, "10.137.0.12", world.UPLINK_UPSTREAM, "denied", world.upstream)
    if then == "iptables":
        world.netvm.exec(["nft", "delete", "table", "ip", "qubes"])
        world.netvm.exec(["nft", "delete", "table", "ip6", "qubes"])
    else:
        for tool in ("iptables", "ip6tables"):
            world.netvm.exec([tool, "-t", "raw", "-D", "PREROUTING", "-m", "devgroup", "--src-group", "2",
                              "-m", "comment", "--comment", "vrq-guard", "-j", "vrq-guard"])
            world.netvm.exec([tool, "-t", "raw", "-F", "vrq-guard"])
            world.netvm.exec([tool, "-t", "raw", "-X", "vrq-guard"])
    assert reaches(world, g, "10.137.0.12", world.UPLINK_UPSTREAM, "moved", world.upstream)
    # status sees no mix either
    env = g.env(VIF_ROUTE_QUBES_FIREWALL=then)
    assert status(world, g, env=env).returncode == 0, status(world, g, env=env).stdout
    assert world.hotplug(g, "offline", env=g.env(VIF_ROUTE_QUBES_FIREWALL=then)).returncode == 0
    after = world.snapshot()
    for key in ("iptables-save", "ip6tables-save", "nft-elements", "routes", "neigh", "records"):
        assert after[key] == before[key], key


GUARD_JUMP = ["PREROUTING", "-m", "devgroup", "--src-group", "2", "-m", "comment", "--comment", "vrq-guard",
              "-j", "vrq-guard"]


@pytest.mark.parametrize("first,then", [("iptables", "nft"), ("nft", "iptables")])
def test_status_flags_the_other_backends_default_deny_left_on_the_host(world, first, then):
    """A netvm moved between backends, each vif offline with the old one
    and online with the new: the old default deny stays on the host and
    drops the guest's traffic, and status (under the new backend) says so,
    with the hand removal; after it, traffic passes and status is ok."""
    g = world.add_guest(3, ["10.137.0.12", "fd09:24ef:4179::a89:c"])
    online(world, g, env=g.env(VIF_ROUTE_QUBES_FIREWALL=first))
    assert world.hotplug(g, "offline", env=g.env(VIF_ROUTE_QUBES_FIREWALL=first)).returncode == 0
    env = g.env(VIF_ROUTE_QUBES_FIREWALL=then)
    online(world, g, env=env)
    g.configure()
    assert not reaches(world, g, "10.137.0.12", world.UPLINK_UPSTREAM, "denied", world.upstream)
    res = status(world, g, env=env)
    assert res.returncode == 1, res.stdout
    if then == "nft":
        want = [("unexpected", "iptables", "-A vrq-guard -j DROP"), ("unexpected", "ip6tables", "-A vrq-guard -j DROP")]
        how = ["iptables -t raw -D " + " ".join(GUARD_JUMP) + "; iptables -t raw -F vrq-guard; "
               "iptables -t raw -X vrq-guard",
               "ip6tables -t raw -D " + " ".join(GUARD_JUMP).replace("iptables", "ip6tables")
               + "; ip6tables -t raw -F vrq-guard; ip6tables -t raw -X vrq-guard",
               "(no -g vrq-in-vif3.0 in vrq-guard)"]
    else:
        want = [("unexpected", "nft", f"rule {fam} qubes antispoof: ends in drop (default deny)") for fam in ("ip", "ip6")]
        how = ["nft delete table ip qubes (unless", "nft delete table ip6 qubes (unless",
               '(no "vif3.0" . 10.137.0.12 in ip qubes allowed)',
               '(no "vif3.0" . fd09:24ef:4179::a89:c in ip6 qubes allowed)']
    # the deny lines are the only findings: the new backend's rules are all ok
    assert [r for r in rows(res.stdout) if r[0] != "ok"] == want, res.stdout
    assert res.stdout.count(f"{first} backend's, but {then} is in use; its default deny drops vif3.0's traffic") == 2
    for text in how:
        assert text in res.stdout, (text, res.stdout)
    data = json.loads(status(world, g, "--json", env=env).stdout)
    assert [(c["verdict"], c["kind"], c["item"]) for c in data["vifs"][0]["checks"] if c["verdict"] != "ok"] == want
    # the hand removal, as the detail gives it: then traffic passes, all ok
    if first == "iptables":
        for tool in ("iptables", "ip6tables"):
            world.netvm.exec([tool, "-t", "raw", "-D", *GUARD_JUMP])
            world.netvm.exec([tool, "-t", "raw", "-F", "vrq-guard"])
            world.netvm.exec([tool, "-t", "raw", "-X", "vrq-guard"])
    else:
        world.netvm.exec(["nft", "delete", "table", "ip", "qubes"])
        world.netvm.exec(["nft", "delete", "table", "ip6", "qubes"])
    assert reaches(world, g, "10.137.0.12", world.UPLINK_UPSTREAM, "passes", world.upstream)
    res = status(world, g, env=env)
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("world", ["nft"], indirect=True)
def test_status_with_nft_reports_elements_and_the_other_backends_leftovers(world):
    g = world.add_guest(3, ["10.137.0.12"])
    online(world, g)
    res = status(world, g)
    assert res.returncode == 0, res.stdout
    found = rows(res.stdout)
    assert ("ok", "nft", 'element ip qubes allowed "vif3.0" . 10.137.0.12') in found
    assert ("ok", "nft", "element ip qubes downstream 10.137.0.12") in found
    assert "# firewall: nft backend (VIF_ROUTE_QUBES_FIREWALL=nft)" in res.stdout.splitlines()[-2:]
    # an element removed by hand: missing; one added by hand: unexpected
    world.netvm.exec(["nft", "delete", "element", "ip", "qubes", "allowed", '{ "vif3.0" . 10.137.0.12 }'])
    world.netvm.exec(["nft", "add", "element", "ip", "qubes", "allowed", '{ "vif3.0" . 10.137.0.66 }'])
    found = rows(status(world, g).stdout)
    assert ("missing", "nft", 'element ip qubes allowed "vif3.0" . 10.137.0.12') in found
    assert ("unexpected", "nft", 'element ip qubes allowed "vif3.0" . 10.137.0.66') in found
    online(world, g)  # repairs the missing one (the stray stays: not in the record)
    # the other backend's rules for the same vif show as unexpected
    online(world, world.add_guest(4, ["10.137.0.14"]), env=g.env(VIF_ROUTE_QUBES_FIREWALL="iptables", vif="vif4.0",
                                                                  XENBUS_PATH="backend/vif/4/0"))
    world.netvm.exec(["iptables", "-t", "raw", "-N", "vrq-in-vif3.0"])
    res = status(world, g, "vif3.0")
    assert ("unexpected", "iptables", "chain vrq-in-vif3.0") in rows(res.stdout)
    assert "iptables backend's, but nft is in use" in res.stdout


@pytest.mark.parametrize("how", ["option", "environment"])
def test_dry_run_and_log_name_the_backend_and_why(world, how):
    g = world.add_guest(3, ["10.137.0.12"])
    env = g.env()
    env.pop("VIF_ROUTE_QUBES_FIREWALL", None)
    args = ["online", "-n"]
    if how == "option":
        args.append("--firewall=nft")
        why = "option --firewall=nft"
    else:
        env["VIF_ROUTE_QUBES_FIREWALL"] = "nft"
        why = "VIF_ROUTE_QUBES_FIREWALL=nft"
    res = world.netvm.exec([SCRIPT, *args], check=False, env=env)
    assert res.returncode == 0, res.stderr
    assert f"# firewall: nft backend ({why})" in res.stdout
    assert "$ nft -f - <<'EOF'" in res.stdout and "iptables-restore" not in res.stdout
    assert 'add element ip qubes allowed { "vif3.0" . 10.137.0.12 }' in res.stdout
    env.pop("VIF_ROUTE_QUBES_FIREWALL", None)
    res = world.netvm.exec([SCRIPT, "online", "-n", "-v"], check=False, env=env)
    assert "# firewall: nft backend (default auto: the nft command is installed" in res.stdout
    assert "firewall: nft backend (default auto" in res.stderr  # the debug log says it too
    res = world.netvm.exec([SCRIPT, "online", "-n", "--firewall=iptables"], check=False, env=env)
    assert "# firewall: iptables backend (option --firewall=iptables)" in res.stdout
    assert "$ iptables-restore" in res.stdout and "nft -f" not in res.stdout
    bad = world.netvm.exec([SCRIPT, "online", "-n", "--firewall=pf"], check=False, env=env)
    assert bad.returncode == 2 and "--firewall" in bad.stderr


@BOTH
def test_an_address_two_vifs_have_stays_guarded_until_the_last_goes(world):
    """A dying domain's vif and a new one with the same address (the newer
    route wins by metric): offline of the old one must not unguard the
    address for the new one."""
    old = world.add_guest(3, ["10.137.0.12"])
    new = world.add_guest(4, ["10.137.0.12"])
    online(world, old)
    online(world, new)
    assert world.hotplug(old, "offline").returncode == 0
    new.configure()
    assert reaches(world, new, "10.137.0.12", world.UPLINK_UPSTREAM, "new", world.upstream)
    # the address arriving from the uplink is still dropped
    world.upstream.ip("addr", "add", "10.137.0.12/32", "dev", "eth0")
    world.upstream.ip("addr", "add", "10.137.0.77/32", "dev", "eth0")
    with UdpSink(world.netvm, world.UPLINK_NETVM, PORT) as sink:
        udp_send(world.upstream, world.UPLINK_NETVM, PORT, "forged", src="10.137.0.12")
        udp_send(world.upstream, world.UPLINK_NETVM, PORT, "control", src="10.137.0.77")
        assert sink.got("control"), "the control packet should arrive"
        assert not any(d == "forged" for _, d in sink.collect(0.3))
    assert world.hotplug(new, "offline").returncode == 0
    snap = world.snapshot()
    assert snap["nft-elements"] == "" and "vrq" not in snap["iptables-save"] + snap["ip6tables-save"]


@NFT
def test_status_sees_a_flushed_antispoof_chain(world):
    """The elements guard nothing without the rules that look them up: a
    flushed chain (everything passes) is not ok."""
    g = world.add_guest(3, ["10.137.0.12"])
    online(world, g)
    found = rows(status(world, g).stdout)
    assert ("ok", "nft", "rule ip qubes antispoof: ends in drop (default deny)") in found
    assert ("ok", "nft", "rule ip6 qubes prerouting: iifgroup 2 goto antispoof") in found
    world.netvm.exec(["nft", "flush", "chain", "ip", "qubes", "antispoof"])
    res = status(world, g)
    assert res.returncode == 1
    found = rows(res.stdout)
    assert ("missing", "nft", "rule ip qubes antispoof: ends in drop (default deny)") in found
    assert ("missing", "nft", "rule ip qubes antispoof: iifname . ip saddr @allowed accept") in found


def test_the_json_listing_is_shown_as_nft_prints_it():
    from vif_route_qubes.firewall import nftjson

    assert [nftjson._priority(p) for p in (-300, -100, -90, 0, 5, -400)] == \
        ["raw", "dstnat", "dstnat + 10", "filter", "filter + 5", "-400"]
    rule = [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
                       "right": {"set": ["::", {"prefix": {"addr": "fe80::", "len": 10}}]}}},
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "ipv6-icmp"}}, {"accept": None}]
    assert nftjson.rule_text(rule) == "ip6 saddr { ::, fe80::/10 } meta l4proto ipv6-icmp accept"
    # a statement it does not know is shown as its JSON: never equal to a rule of ours
    odd = [{"masquerade": None}]
    assert nftjson.rule_text(odd) == '{"masquerade": null}'
