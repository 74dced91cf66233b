"""A netvm of Qubes R4.2 in network namespaces, end to end (issue 18 §6):
the suite as a drop-in where only Qubes' own scheme exists.

* the netvm loads Qubes' ``qubes-antispoof.nft`` verbatim, as at boot
  (tests/fixtures/qubes/), and has its own QubesDB seeded as Qubes' dom0
  writes it for sys-net (gateway, virtual nameservers, and the
  ``/mapped-ip`` keys Qubes writes for every qube, here equal to the real
  address: no NAT); XenStore holds only libxl's backend directories,
  nothing of Qubes;
* two guests, each with its own QubesDB (the real daemon) seeded as dom0
  writes it: an AppVM, and a disposable whose real address (10.138.x) is
  hidden from it behind a mapped one (``/mapped-ip/REAL/visible-ip``, as
  dom0 writes it in sys-net's QubesDB); ``qubes-setup-ip`` configures them
  from their own QubesDB;
* ``vif-route-qubes online`` (nft backend) for both, ``qubes-setup-dnat-to-ns``
  with the virtual nameservers from QubesDB and real upstream DNS servers;

then with real packets: each guest reaches upstream with its own address
(the disposable's seen as its real one), a forgery (the other guest's
address) is dropped, from either, DNS to DNS1/DNS2 is
answered by the upstreams over UDP and TCP; and ``offline`` leaves Qubes'
tables exactly as it found them.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.rigs.netns import World, UdpSink, udp_send
from tests.rigs.qubesdb import Daemon
from tests.rigs.xenstored import XenStored
from tests.test_dnat_netns import ANSWER, CMD as DNAT, DNS_CLIENT, MOUNT_AND_RUN, PY, DnsServers

BIN = os.path.dirname(sys.executable)
ANTISPOOF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "qubes", "qubes-antispoof.nft")
GATEWAY, DNS1, DNS2 = "10.137.0.1", "10.139.1.1", "10.139.1.2"
UP1, UP2 = "192.168.0.53", "192.168.0.54"
GUESTS = {12: "10.137.0.12", 13: "10.138.0.13"}  # real addresses; 13 is the disposable
# what the disposable sees as its own address: Qubes gives a disposable the
# address of the qube it was made from, and hides its real one
VISIBLE = {12: "10.137.0.12", 13: "10.137.0.99"}
PORT = 5757


def write(daemon, keys):
    for path, value in keys.items():
        res = daemon.cli("qubesdb-write", path, value)
        assert res.returncode == 0, res.stderr


def qubes_tables(netvm):
    """Qubes' two tables as nft lists them, elements included, counters not
    (``-s``: the forgery's drops are counted by Qubes' own rule)."""
    return {fam: netvm.exec(["nft", "-s", "list", "table", fam, "qubes"]).stdout for fam in ("ip", "ip6")}


def blocks(text):
    """{"set NAME" / "chain NAME": [its lines]} of one table listing."""
    out, name = {}, None
    for line in text.splitlines():
        words = line.split()
        if line.startswith("\t") and not line.startswith("\t\t") and words[:1] in (["set"], ["chain"]):
            name = " ".join(words[:2])
            out[name] = []
        elif line == "\t}":
            name = None
        elif name and line.strip():
            out[name].append(line.strip())
    return out


@pytest.fixture
def netvm():
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces, QubesDB in a mount namespace)")
    tmp = tempfile.mkdtemp(prefix="vrqr42", dir="/tmp")  # short: AF_UNIX path limit
    xs = XenStored(os.path.join(tmp, "xs.sock")).start()
    daemons, world, servers = [], None, None
    try:
        # nothing of Qubes in XenStore: no gateway, no DNS keys
        world = World(xs, tmp, gateway=None, dns=None, firewall="nft")
        world.netvm.exec(["nft", "-f", ANTISPOOF])
        sysnet = Daemon()
        daemons.append(sysnet)
        write(sysnet, {"/qubes-netvm-gateway": GATEWAY, "/qubes-netvm-netmask": "255.255.255.0",
                       "/qubes-netvm-network": "10.137.0.0",
                       "/qubes-netvm-primary-dns": DNS1, "/qubes-netvm-secondary-dns": DNS2})
        world.upstream.ip("route", "add", "10.138.0.0/16", "via", world.UPLINK_NETVM)  # disposables' space
        for addr in (UP1, UP2):
            world.upstream.ip("addr", "add", f"{addr}/24", "dev", "eth0")
        for addr in (DNS1, DNS2):  # a query that leaks untranslated lands here
            world.upstream.ip("addr", "add", f"{addr}/32", "dev", "lo")
        servers = DnsServers(world.upstream, [f"{a}={ANSWER[a]}" for a in (UP1, UP2, DNS1, DNS2)])
        guests = {}
        for domid, ip in GUESTS.items():
            g = world.add_guest(domid, [ip])
            # what Qubes' dom0 writes for every qube behind sys-net
            write(sysnet, {f"/mapped-ip/{ip}/visible-ip": VISIBLE[domid],
                           f"/mapped-ip/{ip}/visible-gateway": GATEWAY})
            own = Daemon()
            daemons.append(own)
            write(own, {"/qubes-ip": VISIBLE[domid], "/qubes-netmask": "255.255.255.255", "/qubes-gateway": GATEWAY,
                        "/qubes-primary-dns": DNS1, "/qubes-secondary-dns": DNS2,
                        "/qubes-service/qubes-update-check": "1"})
            guests[domid] = (g, own)
        yield world, sysnet, guests, servers, tmp
    finally:
        # the disposable's NAT namespace is bound in /run/netns: it outlives
        # the netvm's namespace if a failing test left it
        subprocess.run(["ip", "netns", "del", "vif13.0-nat"], capture_output=True)
        if servers:
            servers.close()
        if world:
            world.close()
        for d in daemons:
            d.stop()
        xs.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_qubes_r42_netvm_end_to_end(netvm):
    world, sysnet, guests, servers, tmp = netvm
    found = qubes_tables(world.netvm)
    assert "vrq" not in found["ip"] and "allowed" in found["ip"]

    # the DNAT, as NetworkManager's hook runs it: upstreams from resolv.conf,
    # the virtual nameservers from QubesDB
    resolv = os.path.join(tmp, "resolv.conf")
    with open(resolv, "w") as f:
        f.write(f"nameserver {UP1}\nnameserver {UP2}\n")
    denv = sysnet.env(world.env)
    res = world.netvm.exec(["unshare", "-m", "sh", "-c", MOUNT_AND_RUN, "sh", resolv, "", DNAT, "-v"],
                           check=False, env=denv)
    assert res.returncode == 0, res.stderr
    assert f"configuration: qubesdb (auto: QubesDB answers on {sysnet.socket})" in res.stderr

    for domid, (g, own) in guests.items():
        res = world.hotplug(g, "online", env=sysnet.env(g.env()), shared=True)
        assert res.returncode == 0, res.stderr
        genv = own.env({"PATH": world.env["PATH"], "QUBES_SETUP_IP_HOOK": "",
                        "VIF_ROUTE_QUBES_SYSLOG": world.env["VIF_ROUTE_QUBES_SYSLOG"],
                        "VIF_ROUTE_QUBES_HOTPLUG_LOG": world.env["VIF_ROUTE_QUBES_HOTPLUG_LOG"]})
        res = g.ns.exec([os.path.join(BIN, "qubes-setup-ip"), "--resolv-conf", os.path.join(tmp, f"r{domid}"),
                         "add", "eth0"], check=False, env=genv)
        assert res.returncode == 0, res.stderr
        with open(os.path.join(tmp, f"r{domid}")) as f:
            assert f.read().splitlines()[1:] == [f"nameserver {DNS1}", f"nameserver {DNS2}"]

    # Qubes' own set holds the guests' elements; its chains are untouched
    during = qubes_tables(world.netvm)["ip"]
    for domid, ip in GUESTS.items():
        assert f'"vif{domid}.0" . {ip}' in during

    # the disposable's real address lives behind its NAT namespace
    assert os.path.exists("/run/netns/vif13.0-nat") and not os.path.exists("/run/netns/vif12.0-nat")
    g12, g13 = guests[12][0], guests[13][0]
    with UdpSink(world.upstream, world.UPLINK_UPSTREAM, PORT) as sink:
        assert udp_send(g12.ns, world.UPLINK_UPSTREAM, PORT, "own12").returncode == 0
        assert udp_send(g13.ns, world.UPLINK_UPSTREAM, PORT, "own13").returncode == 0
        assert sink.got("own12", 3) and sink.got("own13", 3)
        # each forging the other's address (the disposable's real one, the
        # AppVM's): dropped in the netvm, and in the disposable's namespace
        for g, other in ((g12, GUESTS[13]), (g13, GUESTS[12])):
            g.ns.ip("addr", "add", f"{other}/32", "dev", "eth0")
            udp_send(g.ns, world.UPLINK_UPSTREAM, PORT, f"forged{g.domid}", src=other)
        seen = sink.collect(0.5)
        for g, other in ((g12, GUESTS[13]), (g13, GUESTS[12])):
            g.ns.ip("addr", "del", f"{other}/32", "dev", "eth0")
    sources = {data: src for src, data in seen}
    # the upstream sees real addresses only: the disposable's mapped one never
    assert sources["own12"].startswith(GUESTS[12]) and sources["own13"].startswith(GUESTS[13])
    assert not [d for d in sources if d.startswith("forged")]

    # DNS: both virtual nameservers answered by the upstreams, UDP and TCP
    targets = [f"{d}/{p}" for d in (DNS1, DNS2) for p in ("udp", "tcp")]
    for g in (g12, g13):
        out = g.ns.exec([PY, "-c", DNS_CLIENT, "2.0", "0", *targets]).stdout.split("\n")
        got = {f"{w[0]}/{w[1]}": w[2] for w in (line.split() for line in out) if len(w) == 3}
        assert got == {f"{DNS1}/udp": ANSWER[UP1], f"{DNS1}/tcp": ANSWER[UP1],
                       f"{DNS2}/udp": ANSWER[UP2], f"{DNS2}/tcp": ANSWER[UP2]}, got
    assert not [q for q in servers.queries() if q[1] in (DNS1, DNS2)]  # nothing leaked untranslated

    # offline: Qubes' sets and chains exactly as they were: no element, no
    # rule of ours, and our helper sets gone with the last vif
    # (docs/firewall.md). What stays of ours: the DNAT's chains, which
    # Qubes' own qubes-setup-dnat-to-ns makes in the same table too
    for domid, (g, _) in guests.items():
        res = world.hotplug(g, "offline", env=sysnet.env(g.env()), shared=True)
        assert res.returncode == 0, res.stderr
    assert not os.path.exists("/run/netns/vif13.0-nat")
    after = qubes_tables(world.netvm)
    for fam in ("ip", "ip6"):
        was, now = blocks(found[fam]), blocks(after[fam])
        ours = {n: lines for n, lines in now.items() if n not in was}
        assert {n: lines for n, lines in now.items() if n in was} == was, after[fam]
        # (no IPv6 virtual nameservers here: no IPv6 DNAT chains)
        assert sorted(ours) == (["chain dnat-dns", "chain dnat-dns-guard"] if fam == "ip" else []), after[fam]
