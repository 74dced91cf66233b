"""Mapped addresses (a disposable's "fake IP", vif-qubes-nat.sh): golden
plans (pure), then ``vif-route-qubes`` with its values in the real QubesDB
daemon, in network namespaces with real packets: the guest talks with its
visible address and the upstream sees the real one, a forged source is
dropped, IPv6 maps and passes through, a re-run rebuilds in place or removes
a NAT whose keys went, a failed online at any step leaves the netvm as it
was, keys that arrive after online still map the vif (Qubes issue 9318),
and offline leaves nothing."""

import json
import os
import time
from ipaddress import ip_address

import pytest

from tests.rigs.netns import UdpSink, _script, comparable, run, udp_send
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
# Through the hotplug script, values in the real QubesDB, real packets

SCRIPT = _script("vif-route-qubes")


def qwrite(qdb, keys):
    for path, value in keys.items():
        res = qdb.cli("qubesdb-write", path, value)
        assert res.returncode == 0, res.stderr


def qrm(qdb, *paths):
    for path in paths:
        assert qdb.cli("qubesdb-rm", path).returncode == 0


def maps(qdb, real, visible, gateway):
    qwrite(qdb, {f"/mapped-ip/{real}/visible-ip": str(visible), f"/mapped-ip/{real}/visible-gateway": str(gateway)})


def qenv(world, qdb, guest, **extra):
    """libxl's environment for ``guest``, with the netvm's values in QubesDB
    (VIF_ROUTE_QUBES_MAPPED_WAIT=0: no late-keys watch unless a test asks)."""
    return qdb.env(guest.env(**dict({"VIF_ROUTE_QUBES_CONFIG": "qubesdb", "VIF_ROUTE_QUBES_MAPPED_WAIT": "0"},
                                    **extra)))


def hotplug(world, qdb, guest, command, **extra):
    return world.hotplug(guest, command, env=qenv(world, qdb, guest, **extra), shared=True)


def nat_names(world):
    return [n for n in os.listdir("/run/netns") if n.endswith("-nat")]


def as_before(world, guest, before):
    """No NAT namespace of the guest's, and the netvm exactly as it was."""
    assert M.netns_name(guest.vif) not in nat_names(world)
    assert comparable(world.snapshot()) == before


def record(world, guest):
    path = os.path.join(world.env["VIF_ROUTE_QUBES_STATE_DIR"], f"{guest.vif}.json")
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def mworld(world, qdb):
    """The nft world with the netvm's gateway in QubesDB; every NAT
    namespace a test makes is deleted, whatever happens (it is bound in
    /run/netns and outlives the netvm's namespace)."""
    qwrite(qdb, {"/qubes-netvm-gateway": world.gateway})
    world.upstream.ip("route", "add", "10.138.0.0/16", "via", world.UPLINK_NETVM)
    made = []
    yield world, qdb, made
    for name in made:
        run(["ip", "netns", "del", M.netns_name(name)], check=False)


def new_guest(world, made, n, addresses=(str(REAL),)):
    guest = world.add_guest(n + os.getpid() % 20000, list(addresses))
    made.append(guest.vif)
    return guest


def ipv6_uplink(world, qdb):
    world.netvm.ip("-6", "addr", "add", "fd00:1::2/64", "dev", "eth0", "nodad")
    world.upstream.ip("-6", "addr", "add", "fd00:1::1/64", "dev", "eth0", "nodad")
    world.netvm.ip("-6", "route", "add", "default", "via", "fd00:1::1")
    world.upstream.ip("-6", "route", "add", "fd09::/16", "via", "fd00:1::2")
    qwrite(qdb, {"/qubes-netvm-gateway6": str(GW6)})


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


def talks_as(world, guest, visible, real, tag):
    """A datagram from the guest's visible address reaches upstream from
    the real one, and one to the real address reaches the guest."""
    with UdpSink(world.upstream, "0.0.0.0", PORT) as up, UdpSink(guest.ns, str(visible), PORT) as down:
        udp_send(guest.ns, world.UPLINK_UPSTREAM, PORT, f"up-{tag}", src=str(visible))
        assert up.got(f"up-{tag}", wait=3), up.collect()
        assert {s for s, d in up.collect() if d == f"up-{tag}"} == {str(real)}
        udp_send(world.upstream, str(real), PORT, f"down-{tag}")
        assert down.got(f"down-{tag}"), down.collect()


@NFT
def test_mapped_ipv4_through_hotplug_forged_dropped_offline_leaves_nothing(mworld):
    world, qdb, made = mworld
    guest = new_guest(world, made, 12)
    maps(qdb, REAL, VISIBLE, VGW)
    before = comparable(world.snapshot())
    guest_side(guest, [VISIBLE], [VGW])

    res = hotplug(world, qdb, guest, "online", VIF_ROUTE_QUBES_VERBOSE="1")
    assert res.returncode == 0, res.stderr
    assert M.netns_name(guest.vif) in nat_names(world)
    assert record(world, guest)["mapped"] == {"maps": [[str(REAL), str(VISIBLE), str(VGW)]], "passthrough": []}
    talks_as(world, guest, VISIBLE, REAL, "first")

    # forged sources: the real address itself (the guest must not use it)
    # and another guest's address
    with UdpSink(world.upstream, "0.0.0.0", PORT) as up:
        for forged in (REAL, A("10.137.0.77")):
            guest.ns.ip("addr", "add", f"{forged}/32", "dev", "eth0")
            udp_send(guest.ns, world.UPLINK_UPSTREAM, PORT, f"forged-{forged}", src=str(forged))
        assert not [d for _, d in up.collect(0.5) if d.startswith("forged")], up.collect()
    for forged in (REAL, A("10.137.0.77")):
        guest.ns.ip("addr", "del", f"{forged}/32", "dev", "eth0")

    # status shows the NAT
    st = world.netvm.exec_shared([SCRIPT, "status"], check=False, env=qenv(world, qdb, guest))
    assert any(line.split()[:3] == ["ok", "nat", M.netns_name(guest.vif)] for line in st.stdout.splitlines()), \
        st.stdout

    # a re-run rebuilds in place: the same namespace, packets still flow
    ino = os.stat(f"/run/netns/{M.netns_name(guest.vif)}").st_ino
    assert hotplug(world, qdb, guest, "online").returncode == 0
    assert os.stat(f"/run/netns/{M.netns_name(guest.vif)}").st_ino == ino
    talks_as(world, guest, VISIBLE, REAL, "rerun")

    res = hotplug(world, qdb, guest, "offline")
    assert res.returncode == 0, res.stderr
    # the real vif is back under its own name, nothing of ours anywhere
    as_before(world, guest, before)


@NFT
def test_keys_gone_a_rerun_removes_the_nat_and_the_real_address_works(mworld):
    world, qdb, made = mworld
    guest = new_guest(world, made, 14)
    maps(qdb, REAL, VISIBLE, VGW)
    guest_side(guest, [VISIBLE], [VGW])
    assert hotplug(world, qdb, guest, "online").returncode == 0
    talks_as(world, guest, VISIBLE, REAL, "mapped")

    # dom0 stops hiding the address (Qubes writes visible-ip = the real one)
    maps(qdb, REAL, REAL, GW)
    res = hotplug(world, qdb, guest, "online")
    assert res.returncode == 0, res.stderr
    assert M.netns_name(guest.vif) not in nat_names(world)
    assert record(world, guest)["mapped"] is None
    guest.ns.ip("addr", "flush", "dev", "eth0")
    guest_side(guest, [REAL], [GW])
    talks_as(world, guest, REAL, REAL, "unmapped")
    assert hotplug(world, qdb, guest, "offline").returncode == 0


@NFT
def test_ipv6_maps_and_passes_through(mworld):
    world, qdb, made = mworld
    ipv6_uplink(world, qdb)
    other6 = A("fd09:24ef:4179::a8a:10")
    guest = new_guest(world, made, 13, [str(REAL), str(REAL6), str(other6)])
    maps(qdb, REAL, VISIBLE, VGW)
    maps(qdb, REAL6, VISIBLE6, GW6)
    guest_side(guest, [VISIBLE, VISIBLE6, other6], [VGW, GW6])
    res = hotplug(world, qdb, guest, "online")
    assert res.returncode == 0, res.stderr

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

    assert hotplug(world, qdb, guest, "offline").returncode == 0
    assert M.netns_name(guest.vif) not in nat_names(world)


@NFT
def test_a_failed_online_at_any_step_leaves_the_netvm_as_it_was(mworld):
    """VIF_ROUTE_QUBES_FAIL_AT=N for every change of a first online with a
    mapped address: each failure leaves no namespace and the netvm exactly
    as before; then the run without a fault works."""
    world, qdb, made = mworld
    guest = new_guest(world, made, 15)
    maps(qdb, REAL, VISIBLE, VGW)
    before = comparable(world.snapshot())
    for n in range(1, 40):
        res = hotplug(world, qdb, guest, "online", VIF_ROUTE_QUBES_FAIL_AT=str(n))
        if res.returncode == 0:
            break
        assert f"VIF_ROUTE_QUBES_FAIL_AT={n}" in res.stderr, res.stderr
        as_before(world, guest, before)
    else:
        pytest.fail("online never got through")
    assert n > 5  # the NAT's own steps were among those failed
    assert hotplug(world, qdb, guest, "offline").returncode == 0
    assert comparable(world.snapshot()) == before


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = open(f"/proc/{pid}/stat").read()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def watch_pid(world, guest):
    path = os.path.join(world.env["VIF_ROUTE_QUBES_STATE_DIR"], f"{guest.vif}.watch")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return int(open(path).read().split()[0])
        time.sleep(0.02)
    return None


@NFT
def test_keys_that_arrive_after_online_map_the_vif_without_a_detach(mworld):
    """Two IPv4 addresses, keys written late for the first only (dom0
    writes them for a qube's first address): the first maps, the second
    passes through."""
    world, qdb, made = mworld
    second = "10.138.0.10"
    guest = new_guest(world, made, 16, [str(REAL), second])
    before = comparable(world.snapshot())
    t0 = time.monotonic()
    res = hotplug(world, qdb, guest, "online", VIF_ROUTE_QUBES_MAPPED_WAIT="30")
    assert res.returncode == 0, res.stderr
    # online did not wait for the keys (the watch is detached)
    assert time.monotonic() - t0 < 10
    assert M.netns_name(guest.vif) not in nat_names(world)
    pid = watch_pid(world, guest)
    assert pid and _alive(pid)

    # dom0 writes the keys late, visible-ip first (an address without its
    # gateway is no mapping yet)
    qwrite(qdb, {f"/mapped-ip/{REAL}/visible-ip": str(VISIBLE)})
    time.sleep(0.3)
    assert M.netns_name(guest.vif) not in nat_names(world)
    qwrite(qdb, {f"/mapped-ip/{REAL}/visible-gateway": str(VGW)})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (record(world, guest).get("mapped") is None or _alive(pid)):
        time.sleep(0.05)
    assert record(world, guest)["mapped"] == {"maps": [[str(REAL), str(VISIBLE), str(VGW)]],
                                              "passthrough": [second]}
    assert not _alive(pid)
    assert not os.path.exists(os.path.join(world.env["VIF_ROUTE_QUBES_STATE_DIR"], f"{guest.vif}.watch"))
    guest_side(guest, [VISIBLE], [VGW])
    talks_as(world, guest, VISIBLE, REAL, "late")

    assert hotplug(world, qdb, guest, "offline").returncode == 0
    as_before(world, guest, before)


@NFT
def test_offline_ends_a_watch_whose_keys_never_came(mworld):
    world, qdb, made = mworld
    guest = new_guest(world, made, 17)
    before = comparable(world.snapshot())
    assert hotplug(world, qdb, guest, "online", VIF_ROUTE_QUBES_MAPPED_WAIT="30").returncode == 0
    pid = watch_pid(world, guest)
    assert pid and _alive(pid)
    assert hotplug(world, qdb, guest, "offline").returncode == 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.02)
    assert not _alive(pid)
    # keys written now change nothing: the vif is gone
    maps(qdb, REAL, VISIBLE, VGW)
    time.sleep(0.3)
    as_before(world, guest, before)


@NFT
def test_dry_run_prints_the_nat_and_changes_nothing(mworld):
    world, qdb, made = mworld
    guest = new_guest(world, made, 18)
    maps(qdb, REAL, VISIBLE, VGW)
    before = comparable(world.snapshot())
    res = run(world.netvm.shared([SCRIPT, "online", "--dry-run", "type_if=vif"]), check=False,
              env=qenv(world, qdb, guest))
    assert res.returncode == 0, res.stderr
    assert f"# mapped addresses (NAT namespace {M.netns_name(guest.vif)}): {REAL} seen by the guest as " \
           f"{VISIBLE} (gateway {VGW})" in res.stdout
    assert f"netns add {M.netns_name(guest.vif)}" in res.stdout
    assert f"$ ip netns exec {M.netns_name(guest.vif)} nft -f -" in res.stdout
    as_before(world, guest, before)


@NFT
def test_a_namespace_that_only_shares_a_vifname_is_left_alone(mworld):
    """vifname=NAME and a namespace NAME-nat that no online of ours made:
    neither online (no mapped address) nor offline touches it."""
    world, qdb, made = mworld
    name = f"vrqx{os.getpid() % 100000}"
    guest = world.add_guest(19 + os.getpid() % 20000, [str(REAL)], vifname=name)
    foreign = f"{name}-nat"
    run(["ip", "netns", "add", foreign])
    try:
        run(["ip", "-n", foreign, "link", "add", name, "type", "veth", "peer", "name", "q" + name])
        assert hotplug(world, qdb, guest, "online").returncode == 0
        assert hotplug(world, qdb, guest, "offline").returncode == 0
        assert foreign in nat_names(world)
        assert name in run(["ip", "-n", foreign, "-o", "link", "show"]).stdout
    finally:
        run(["ip", "netns", "del", foreign], check=False)
