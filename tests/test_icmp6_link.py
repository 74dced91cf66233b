"""IPv6 from a vif's link-local and unspecified sources: neighbour discovery
and MLD get through, nothing else does (issue 17 §4), with real packets in
both firewall backends.

The guest sends hand-made frames out of its eth0 (AF_PACKET: any source,
any ICMPv6 type, hop limit 255, to the all-nodes group ff02::1), and a raw
ICMPv6 socket on the netvm's vif records what the netvm's stack received:
the anti-spoofing hooks at prerouting, so a dropped packet never reaches
it. A real neighbour discovery exchange (the netvm resolving the guest's
link-local address) shows ND working end to end.
"""

import subprocess
import sys
import time

import pytest

from tests.rigs.netns import PY, UdpSink, udp_send

ADDRESSES = ["10.137.0.12", "fd09:24ef:4179::a89:c"]
GUEST_LL = "fe80::5e:1"
BOTH = pytest.mark.parametrize("world", ["iptables", "nft"], indirect=True)

# One frame per argv word "SRC,TYPE": Ethernet to 33:33:00:00:00:01, IPv6 to
# ff02::1 with hop limit 255, an ICMPv6 message of TYPE (code 0, 4 zero bytes
# of body and 16 of the target address, as ND messages have: the raw socket
# on the other side gets it before the kernel's ICMPv6 handler judges it).
_SEND = r"""
import socket, struct, sys
dev, mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", ""))
dst = socket.inet_pton(socket.AF_INET6, "ff02::1")

def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff

s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((dev, 0))
for word in sys.argv[3:]:
    src_text, typ = word.split(",")
    src = socket.inet_pton(socket.AF_INET6, src_text)
    body = struct.pack("!BBH", int(typ), 0, 0) + b"\0" * 4 + src
    pseudo = src + dst + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(body), 58, 255) + src + dst
    s.send(b"\x33\x33\x00\x00\x00\x01" + mac + b"\x86\xdd" + ip6 + body)
"""

# Prints "SRC TYPE" for every ICMPv6 message the netvm receives on DEV.
_LISTEN = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[1].encode())
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(2048)
    print(addr[0].split("%")[0], data[0], flush=True)
"""


def received(world, guest, frames):
    """Send ``frames`` [(source, type)] from the guest; -> the set of
    (source, type) the netvm's stack received on the vif."""
    listener = world.netvm.popen([PY, "-c", _LISTEN, guest.vif], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "ready", listener.stderr.read()
        words = [f"{src},{typ}" for src, typ in frames]
        guest.ns.exec([PY, "-c", _SEND, "eth0", guest.mac, *words])
        # the last frame: an echo request from the guest's own address,
        # which always passes; once it is in, everything before it is
        marker = (ADDRESSES[1], 128)
        guest.ns.exec([PY, "-c", _SEND, "eth0", guest.mac, f"{marker[0]},{marker[1]}"])
        got = set()
        deadline = time.monotonic() + 5
        while marker not in got and time.monotonic() < deadline:
            line = listener.stdout.readline()
            if line:
                src, typ = line.split()
                got.add((src, int(typ)))
        assert marker in got, "the guest's own echo request never arrived: the rig is broken"
        got.discard(marker)
        return got
    finally:
        listener.kill()
        listener.wait()


@pytest.fixture
def guest(world):
    g = world.add_guest(3, ADDRESSES)
    res = world.hotplug(g, "online")
    assert res.returncode == 0, res.stderr
    # no router solicitation: its source link-layer option would make the
    # netvm learn the guest's neighbour entry without the exchange under test
    g.ns.sysctl("net.ipv6.conf.eth0.router_solicitations", 0)
    g.configure()
    g.ns.ip("-6", "addr", "add", f"{GUEST_LL}/64", "dev", "eth0", "nodad")
    return g


ND_MLD = [130, 131, 132, 133, 134, 135, 136, 143]
OTHERS = [1, 2, 3, 4, 128, 129, 137, 138, 139, 140, 141, 142, 144, 145, 146, 147, 151, 152, 153, 200]


@BOTH
def test_only_nd_and_mld_from_link_local_and_unspecified_sources(world, guest):
    frames = [(src, t) for src in (GUEST_LL, "::") for t in ND_MLD + OTHERS]
    got = received(world, guest, frames)
    assert got == {(src, t) for src in (GUEST_LL, "::") for t in ND_MLD}, sorted(got)


@BOTH
def test_an_echo_request_and_a_redirect_from_fe80_are_dropped_but_not_from_the_guests_address(world, guest):
    got = received(world, guest, [(GUEST_LL, 128), (GUEST_LL, 137), (ADDRESSES[1], 137), ("fe80::1", 135)])
    # a redirect from the guest's own address is the guest's business (the
    # netvm ignores it: accept_redirects 0); from fe80:: it is not let in
    assert got == {(ADDRESSES[1], 137), ("fe80::1", 135)}, sorted(got)


@BOTH
def test_neighbour_discovery_with_the_guests_link_local_address_works(world, guest):
    """The netvm sends to the guest's link-local address: its solicitation
    goes out, the guest's advertisement (from fe80::) must come back in for
    the datagram to leave. What the guest sends back from fe80:: is not ND:
    dropped; from its own address it arrives."""
    # the netvm's link-local address on the vif can be a source once its
    # duplicate address detection is over
    deadline = time.monotonic() + 10
    while "tentative" in world.netvm.ip("-6", "addr", "show", "dev", guest.vif).stdout:
        assert time.monotonic() < deadline, "the vif's link-local address stayed tentative"
        time.sleep(0.1)
    world.netvm.ip("-6", "neigh", "flush", "dev", guest.vif)
    netvm_ll = "fe80::fcff:ffff:feff:ffff"  # netback's MAC, as EUI-64
    with UdpSink(guest.ns, "::", 5353) as to_guest, UdpSink(world.netvm, "::", 5354) as to_netvm:
        udp_send(world.netvm, f"{GUEST_LL}%{guest.vif}", 5353, "hello-guest")
        assert to_guest.got("hello-guest"), to_guest.collect()
        neigh = world.netvm.ip("-6", "neigh", "show", "dev", guest.vif, GUEST_LL).stdout
        assert guest.mac in neigh and "REACHABLE" in neigh, neigh
        udp_send(guest.ns, f"{netvm_ll}%eth0", 5354, "from-link-local", src=f"{GUEST_LL}%eth0")
        udp_send(guest.ns, f"{netvm_ll}%eth0", 5354, "from-own", src=ADDRESSES[1])
        assert to_netvm.got("from-own"), to_netvm.collect()
        assert "from-link-local" not in [d for _, d in to_netvm.collect(0.3)]


@BOTH
def test_status_names_a_lax_link_local_rule(world, guest):
    """What the release before left (any ICMPv6 from fe80::) is a problem
    status names, and a re-online repairs."""
    from tests.rigs.netns import _script

    status = lambda: world.netvm.exec([_script("vif-route-qubes"), "status", "--problems", guest.vif],  # noqa: E731
                                      check=False, env=guest.env())
    assert status().returncode == 0
    if world.firewall == "nft":
        world.netvm.exec(["nft", "insert", "rule", "ip6", "qubes", "antispoof",
                          "ip6", "saddr", "fe80::/10", "meta", "l4proto", "ipv6-icmp", "accept"])
    else:
        world.netvm.exec(["ip6tables", "-t", "raw", "-I", f"vrq-in-{guest.vif}", "-s", "fe80::/10",
                          "-p", "ipv6-icmp", "-j", "RETURN"])
    res = status()
    assert res.returncode != 0
    assert ("ICMPv6 from fe80::/10 and :: accepted only for ND and MLD" if world.firewall == "nft"
            else "-s fe80::/10 -p ipv6-icmp -j RETURN") in res.stdout, res.stdout
    assert (GUEST_LL, 128) in received(world, guest, [(GUEST_LL, 128)])
    if world.firewall == "iptables":
        # the vif's chains are ours: a re-online refills them
        assert world.hotplug(guest, "online").returncode == 0
        assert status().returncode == 0, status().stdout
        assert received(world, guest, [(GUEST_LL, 128)]) == set()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))


@pytest.mark.parametrize("world", ["nft"], indirect=True)
def test_the_old_releases_lax_rule_is_upgraded_for_every_vif_by_the_next_run(world):
    """Release 0.1 left ``vrq-nd`` and a rule accepting any ICMPv6 from
    fe80::/10 and ::. The first run that names the new set (here the online
    of another vif with IPv6) replaces the rule in place, moves the old
    set's elements (vif7.0 keeps ND) and deletes the old set."""
    import json
    import pathlib

    old = pathlib.Path(__file__).resolve().parent / "fixtures" / "release-0.1.0" / "nft" / "ruleset.nft"
    world.netvm.exec(["nft", "-f", str(old)])
    g = world.add_guest(3, ADDRESSES)
    assert world.hotplug(g, "online").returncode == 0
    listing = json.loads(world.netvm.exec(["nft", "-j", "list", "table", "ip6", "qubes"]).stdout)["nftables"]
    sets = {i["set"]["name"]: i["set"].get("elem", []) for i in listing if "set" in i}
    assert "vrq-nd" not in sets and sorted(sets["vrq-nd-mld"]) == ["vif3.0", "vif7.0"], sets
    rules = [i["rule"] for i in listing if "rule" in i and i["rule"]["chain"] == "antispoof"]
    text = world.netvm.exec(["nft", "list", "chain", "ip6", "qubes", "antispoof"]).stdout
    assert len(rules) == 3 and "icmpv6 type {" in text and "meta l4proto ipv6-icmp accept" not in text, text
    # in its place: between the allowed set's accept and the final drop
    assert "@allowed" in json.dumps(rules[0]) and "drop" in rules[2]["expr"][-1], rules
    g.ns.sysctl("net.ipv6.conf.eth0.router_solicitations", 0)
    g.configure()
    assert received(world, g, [(GUEST_LL, 128), (GUEST_LL, 135)]) == {(GUEST_LL, 135)}
