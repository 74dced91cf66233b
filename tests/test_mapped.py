"""Mapped addresses (a disposable's "fake IP", vif-qubes-nat.sh): golden
plans (pure), then the real namespace, veth pair and netdev NAT in network
namespaces with real packets: the guest talks with its visible address and
the upstream sees the real one, a forged source is dropped, IPv6 maps and
passes through, and teardown leaves the netvm as it was."""

import json
import os
from ipaddress import ip_address

import pytest

from tests.rigs.netns import PY, UdpSink, comparable, run, udp_send
from vif_route_qubes import mapped as M
from vif_route_qubes.errors import Failure
from vif_route_qubes.plan import Vif

A = ip_address
NFT = pytest.mark.parametrize("world", ["nft"], indirect=True)
PORT = 5454

REAL, VISIBLE, VGW = A("10.138.0.9"), A("192.168.77.5"), A("192.168.77.1")
REAL6, VISIBLE6 = A("fd09:24ef:4179::a8a:9"), A("fd09:24ef:4179::a89:99")
GW, GW6 = A("10.137.0.1"), A("fd09:24ef:4179::a89:1")


def vif(addresses=(REAL,), name="vif12.0", gateway6=None):
    return Vif(name=name, domid=12, mac="00:16:3E:5E:6C:00", addresses=tuple(addresses),
               gateway=GW, gateway6=gateway6)


# ----------------------------------------------------------------------------
# Pure


def test_no_mapping_or_the_same_address_is_no_nat():
    assert M.mapping_for(vif(), {}) is None
    # Qubes writes visible-ip for every qube: equal to the real one, no NAT
    assert M.mapping_for(vif(), {REAL: (REAL, GW)}) is None
    # half a mapping (visible-gateway not written yet) is none either
    assert M.mapping_for(vif(), {REAL: (VISIBLE, None)}) is None


def test_mapping_plan_and_payloads_golden():
    m = M.mapping_for(vif((REAL, REAL6), gateway6=GW6), {REAL: (VISIBLE, VGW)})
    assert m == M.MappedVif("vif12.0", "00:16:3e:5e:6c:00", (M.Mapping(REAL, VISIBLE, VGW),), (REAL6,), (GW, GW6))
    assert M.outer_batch(m) == [
        "netns add vif12.0-nat",
        "link set dev vif12.0 netns vif12.0-nat",
        "link add name vif12.0-p address 00:16:3e:5e:6c:00 netns vif12.0-nat type veth "
        "peer name vif12.0 address fe:ff:ff:ff:ff:ff",
    ]
    assert M.nft_payload(m) == (
        "add table netdev antispoof\n"
        "delete table netdev antispoof\n"
        "table netdev antispoof {\n"
        "\tchain antispoof {\n"
        '\t\ttype filter hook ingress device "vif12.0" priority filter; policy drop;\n'
        '\t\tip saddr 192.168.77.5 ip saddr set 10.138.0.9 fwd to "vif12.0-p"\n'
        '\t\tip6 saddr fd09:24ef:4179::a8a:9 fwd to "vif12.0-p"\n'
        "\t\tarp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ether 00:16:3e:5e:6c:00 "
        "arp saddr ip { 192.168.77.5 } accept\n"
        "\t\tip6 saddr { fe80::/10, :: } icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, "
        "nd-router-solicit } accept\n"
        "\t\tcounter\n"
        "\t}\n"
        "\tchain reverse {\n"
        '\t\ttype filter hook ingress device "vif12.0-p" priority filter; policy drop;\n'
        '\t\tip daddr 10.138.0.9 ip daddr set 192.168.77.5 fwd to "vif12.0"\n'
        '\t\tip6 daddr fd09:24ef:4179::a8a:9 fwd to "vif12.0"\n'
        "\t\ticmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept\n"
        "\t\tether type arp accept\n"
        "\t\tcounter\n"
        "\t}\n"
        "}\n"
    )
    assert M.inner_batch(m) == [
        "link set dev vif12.0 addrgenmode none", "addr flush dev vif12.0", "neigh flush dev vif12.0 nud permanent",
        "link set dev vif12.0-p addrgenmode none", "addr flush dev vif12.0-p",
        "neigh flush dev vif12.0-p nud permanent",
        "addr add 192.168.77.1/32 dev vif12.0",
        "addr add fd09:24ef:4179::a89:1/128 dev vif12.0 nodad",
        "addr add 10.138.0.9/32 dev vif12.0-p",
        "addr add fd09:24ef:4179::a8a:9/128 dev vif12.0-p nodad",
        "neigh replace 192.168.77.5 lladdr 00:16:3e:5e:6c:00 dev vif12.0 nud permanent",
        "neigh replace fd09:24ef:4179::a8a:9 lladdr 00:16:3e:5e:6c:00 dev vif12.0 nud permanent",
        "neigh replace 10.137.0.1 lladdr fe:ff:ff:ff:ff:ff dev vif12.0-p nud permanent",
        "neigh replace fd09:24ef:4179::a89:1 lladdr fe:ff:ff:ff:ff:ff dev vif12.0-p nud permanent",
        "link set dev vif12.0-p up", "link set dev vif12.0 up",
    ]
    assert M.teardown_batch("vif12.0", 4242) == ["link del dev vif12.0-p", "link set dev vif12.0 netns 4242"]


def test_ipv6_mapping_golden():
    m = M.mapping_for(vif((REAL, REAL6), gateway6=GW6), {REAL: (VISIBLE, VGW), REAL6: (VISIBLE6, GW6)})
    text = M.nft_payload(m)
    assert '\t\tip6 saddr fd09:24ef:4179::a89:99 ip6 saddr set fd09:24ef:4179::a8a:9 fwd to "vif12.0-p"\n' in text
    assert '\t\tip6 daddr fd09:24ef:4179::a8a:9 ip6 daddr set fd09:24ef:4179::a89:99 fwd to "vif12.0"\n' in text
    assert M.guest_addresses(m) == [VISIBLE, VISIBLE6]
    assert M.record_of(m) == {"maps": [["10.138.0.9", "192.168.77.5", "192.168.77.1"],
                                       ["fd09:24ef:4179::a8a:9", "fd09:24ef:4179::a89:99", "fd09:24ef:4179::a89:1"]],
                              "passthrough": []}


@pytest.mark.parametrize("found, words", [
    ({REAL: (VISIBLE6, VGW)}, "is not an IPv4 address"),
    ({REAL: (VISIBLE, GW6)}, "is not an IPv4 address"),
    ({REAL: (A("10.138.0.10"), VGW)}, "is also a real address"),
])
def test_a_mapping_that_cannot_work_is_refused(found, words):
    with pytest.raises(Failure, match=words):
        M.mapping_for(vif((REAL, A("10.138.0.10"))), found)


def test_an_emulated_nic_name_is_too_long_for_its_peer():
    with pytest.raises(Failure, match="name too long"):
        M.mapping_for(vif(name="vif32752.15-emu"), {REAL: (VISIBLE, VGW)})


# ----------------------------------------------------------------------------
# Real namespaces, real packets

DRIVER = r"""
import json, sys
from ipaddress import ip_address as A
from vif_route_qubes import mapped, plan
from vif_route_qubes.system import System
a = json.loads(sys.argv[1])
s = System()
if a["op"] == "up":
    v = plan.Vif(name=a["name"], domid=a["domid"], mac=a["mac"], addresses=tuple(map(A, a["addresses"])),
                 gateway=A(a["gateway"]), gateway6=A(a["gateway6"]) if a.get("gateway6") else None)
    m = mapped.mapping_for(v, {A(r): (A(x), A(g)) for r, x, g in a["maps"]})
    mapped.apply(s, m)
    print("processes", s.spawned)
else:
    print(json.dumps(mapped.teardown(s, a["name"])))
"""


def drive(world, guest, op, maps=(), gateway6=None):
    args = {"op": op, "name": guest.vif, "domid": guest.domid, "mac": guest.mac,
            "addresses": guest.addresses, "gateway": world.gateway, "gateway6": gateway6,
            "maps": [list(map(str, x)) for x in maps]}
    return world.netvm.exec_shared([PY, "-c", DRIVER, json.dumps(args)], env=dict(os.environ))


def nat_names(world):
    return [n for n in os.listdir("/run/netns") if n.endswith("-nat")]


@pytest.fixture
def nat_cleanup():
    """A NAT namespace outlives the netvm's (it is bound in /run/netns):
    whatever a failing test left is deleted."""
    made = []
    yield made
    for name in made:
        run(["ip", "netns", "del", M.netns_name(name)], check=False)


def ipv6_uplink(world):
    world.netvm.ip("-6", "addr", "add", "fd00:1::2/64", "dev", "eth0", "nodad")
    world.upstream.ip("-6", "addr", "add", "fd00:1::1/64", "dev", "eth0", "nodad")
    world.netvm.ip("-6", "route", "add", "default", "via", "fd00:1::1")
    world.upstream.ip("-6", "route", "add", "fd09::/16", "via", "fd00:1::2")
    world.xs.write("/local/domain/0/qubes_netvm_gateway6", str(GW6))


def guest_side(guest, addresses, gateways):
    """The guest's own configuration (qubes-setup-ip's job): the visible
    addresses, the gateway pinned to netback's MAC as Qubes pins it."""
    for a in addresses:
        args = ["-6", "addr", "add", f"{a}/128", "dev", "eth0", "nodad"] if a.version == 6 else \
            ["addr", "add", f"{a}/32", "dev", "eth0"]
        guest.ns.ip(*args)
    guest.ns.ip("link", "set", "eth0", "up")
    for g in gateways:
        fam = ["-6"] if g.version == 6 else []
        guest.ns.ip(*fam, "route", "add", str(g), "dev", "eth0")
        guest.ns.ip(*fam, "route", "add", "default", "via", str(g), "dev", "eth0", "onlink")


@NFT
def test_mapped_ipv4_real_packets_forged_dropped_teardown_leaves_nothing(world, nat_cleanup):
    world.upstream.ip("route", "add", "10.138.0.0/16", "via", world.UPLINK_NETVM)
    guest = world.add_guest(12 + os.getpid() % 20000, [str(REAL)])
    nat_cleanup.append(guest.vif)
    before = comparable(world.snapshot())
    guest_side(guest, [VISIBLE], [VGW])

    res = drive(world, guest, "up", [(REAL, VISIBLE, VGW)])
    assert res.stdout.split() == ["processes", "3"], res.stdout + res.stderr
    assert M.netns_name(guest.vif) in nat_names(world)
    res = world.hotplug(guest, "online")
    assert res.returncode == 0, res.stderr

    with UdpSink(world.upstream, "0.0.0.0", PORT) as up, UdpSink(guest.ns, str(VISIBLE), PORT) as down:
        udp_send(guest.ns, world.UPLINK_UPSTREAM, PORT, "from-visible", src=str(VISIBLE))
        assert up.got("from-visible"), up.collect()
        # the outside sees the real address only
        assert {s for s, d in up.collect() if d == "from-visible"} == {str(REAL)}
        udp_send(world.upstream, str(REAL), PORT, "to-real")
        assert down.got("to-real"), down.collect()
        assert {s for s, d in down.collect() if d == "to-real"} == {world.UPLINK_UPSTREAM}

        # forged sources: the real address itself (the guest must not use
        # it) and another guest's address
        for forged in (REAL, A("10.137.0.77")):
            guest.ns.ip("addr", "add", f"{forged}/32", "dev", "eth0")
            udp_send(guest.ns, world.UPLINK_UPSTREAM, PORT, f"forged-{forged}", src=str(forged))
        assert not [d for _, d in up.collect(0.5) if d.startswith("forged")], up.collect()
        # nothing in the namespace passes IPv4 it was not told of
        counters = world.netvm.exec(["ip", "netns", "exec", M.netns_name(guest.vif), "nft", "list", "ruleset"]).stdout
        assert "policy drop" in counters

    # a re-run rebuilds in place: same namespace, packets still flow
    res = drive(world, guest, "up", [(REAL, VISIBLE, VGW)])
    assert res.returncode == 0, res.stderr
    with UdpSink(world.upstream, "0.0.0.0", PORT) as up:
        udp_send(guest.ns, world.UPLINK_UPSTREAM, PORT, "after-rerun", src=str(VISIBLE))
        assert up.got("after-rerun"), up.collect()

    assert world.hotplug(guest, "offline").returncode == 0
    res = drive(world, guest, "down")
    assert json.loads(res.stdout) == [f"NAT namespace {M.netns_name(guest.vif)}"], res.stderr
    assert M.netns_name(guest.vif) not in nat_names(world)
    # the real vif is back under its own name, nothing of ours on it
    assert comparable(world.snapshot()) == before
    # and a second teardown finds nothing
    assert json.loads(drive(world, guest, "down").stdout) == []


@NFT
def test_ipv6_maps_and_passes_through(world, nat_cleanup):
    world.upstream.ip("route", "add", "10.138.0.0/16", "via", world.UPLINK_NETVM)
    ipv6_uplink(world)
    other6 = A("fd09:24ef:4179::a8a:10")
    guest = world.add_guest(13 + os.getpid() % 20000, [str(REAL), str(REAL6), str(other6)])
    nat_cleanup.append(guest.vif)
    guest_side(guest, [VISIBLE, VISIBLE6, other6], [VGW, GW6])
    res = drive(world, guest, "up", [(REAL, VISIBLE, VGW), (REAL6, VISIBLE6, GW6)], gateway6=str(GW6))
    assert res.returncode == 0, res.stderr
    assert world.hotplug(guest, "online").returncode == 0

    with UdpSink(world.upstream, "::", PORT) as up:
        udp_send(guest.ns, "fd00:1::1", PORT, "mapped6", src=str(VISIBLE6))
        udp_send(guest.ns, "fd00:1::1", PORT, "through6", src=str(other6))
        assert up.got("mapped6", wait=3) and up.got("through6"), up.collect()
        seen = {d: s for s, d in up.collect()}
        assert seen["mapped6"] == str(REAL6) and seen["through6"] == str(other6)
        guest.ns.ip("-6", "addr", "add", f"{REAL6}/128", "dev", "eth0", "nodad")
        udp_send(guest.ns, "fd00:1::1", PORT, "forged6", src=str(REAL6))
        assert not [d for _, d in up.collect(0.5) if d == "forged6"]
    with UdpSink(guest.ns, "::", PORT) as down:
        udp_send(world.upstream, str(REAL6), PORT, "to-real6")
        udp_send(world.upstream, str(other6), PORT, "to-other6")
        assert down.got("to-real6") and down.got("to-other6"), down.collect()

    assert world.hotplug(guest, "offline").returncode == 0
    assert json.loads(drive(world, guest, "down").stdout)
    assert M.netns_name(guest.vif) not in nat_names(world)
