"""End to end: the seed document's world, built in network namespaces and
configured only by the project's own commands.

* upstream (``PREFIX-up``, 192.168.0.1): a tiny DNS server (UDP 53, answers
  every A query) and a UDP echo service (port 7), both logging the source
  address of what they get;
* the netvm: ``vif-route-qubes online`` for every vif (as libxl runs it) and
  ``qubes-setup-dnat-to-ns`` (DNS1/DNS2 from its XenStore home, the upstream
  from a resolv.conf in tmp_path);
* three guests, each configured only by ``qubes-setup-ip`` run inside its
  namespace against its own XenStore server (``domid`` = the guest's, so the
  relative ``qubes_*`` keys resolve to its home) and writing its resolv.conf
  in tmp_path.

Then real packets: every guest is answered by upstream (which sees the
guest's own address) and resolves a name through DNS1 (and DNS2); a forged
source address is dropped; one guest goes offline and leaves nothing behind
while the others keep working. Both routing tables are printed in the seed's
``route -n`` format (``pytest -s`` shows them; failures carry them too).
"""

import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tests.rigs.netns import PY, World
from tests.rigs.xenstored import XenStored

BIN = os.path.dirname(sys.executable)
GATEWAY = "10.137.0.1"
DNS = ("10.139.1.1", "10.139.1.2")
# domid -> address: the seed's vif3.0, vif4.0 and vif8.0 (in Qubes' 10.137 space)
GUESTS = {3: "10.137.0.12", 4: "10.137.0.16", 8: "10.137.0.8"}
ANSWER = "192.0.2.123"
ECHO_PORT = 7

# Upstream: DNS on 53 and a UDP echo, one line of log per datagram.
_UPSTREAM = r"""
import select, socket, struct, sys
addr, answer = sys.argv[1], socket.inet_aton(sys.argv[2])
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.bind((addr, 53))
echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
echo.bind((addr, int(sys.argv[3])))
print("ready", flush=True)
while True:
    for s in select.select([dns, echo], [], [])[0]:
        data, peer = s.recvfrom(2048)
        if s is echo:
            print("udp", peer[0], data.decode(errors="replace"), flush=True)
            s.sendto(b"echo " + data, peer)
            continue
        if len(data) < 17:
            continue
        qid = data[:2]
        i, labels = 12, []
        while i < len(data) and data[i]:
            labels.append(data[i + 1:i + 1 + data[i]].decode(errors="replace"))
            i += data[i] + 1
        qtype = struct.unpack(">H", data[i + 1:i + 3])[0]
        question = data[12:i + 5]
        print("dns", peer[0], ".".join(labels), qtype, flush=True)
        if qtype == 1:
            rr = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + answer
            s.sendto(qid + struct.pack(">HHHHH", 0x8180, 1, 1, 0, 0) + question + rr, peer)
        else:
            s.sendto(qid + struct.pack(">HHHHH", 0x8180, 1, 0, 0, 0) + question, peer)
"""

# Guest side: ask (UDP echo or DNS A query) and print the answer; exit 2 on
# no answer. A source other than "-" is forged with IP_TRANSPARENT (the
# kernel then lets the socket send from an address the host does not own).
_ASK = r"""
import os, socket, struct, sys
mode, dst, port, what, src, timeout = sys.argv[1:7]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if src != "-":
    s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
    s.bind((src, 0))
s.settimeout(float(timeout))
qid = os.urandom(2)
if mode == "dns":
    name = b"".join(bytes([len(l)]) + l.encode() for l in what.split(".")) + b"\0"
    msg = qid + struct.pack(">HHHHH", 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1)
else:
    msg = what.encode()
for attempt in range(3):
    s.sendto(msg, (dst, int(port)))
    try:
        data, peer = s.recvfrom(2048)
    except socket.timeout:
        continue
    if mode == "dns":
        if data[:2] != qid or struct.unpack(">H", data[6:8])[0] < 1:
            print("bad-answer", peer[0], data.hex())
            sys.exit(3)
        print(peer[0], socket.inet_ntoa(data[-4:]))
    else:
        print(peer[0], data.decode(errors="replace"))
    sys.exit(0)
print("timeout")
sys.exit(2)
"""


# ----------------------------------------------------------------------------
# Routing tables in the seed's format


def _hex_ip(text):
    return ".".join(str(b) for b in reversed(bytes.fromhex(text)))


def route_table(ns) -> str:
    """/proc/net/route of a namespace as ``route -n`` prints it (the seed's
    columns: Destination Gateway Genmask Flags Metric Ref Use Iface)."""
    rows = [("Destination", "Gateway", "Genmask", "Flags", "Metric", "Ref", "Use", "Iface")]
    for line in ns.read("/proc/net/route").splitlines()[1:]:
        f = line.split()
        flags_n = int(f[3], 16)
        flags = "".join(c for bit, c in ((0x1, "U"), (0x2, "G"), (0x4, "H"), (0x200, "!")) if flags_n & bit)
        rows.append((_hex_ip(f[1]), _hex_ip(f[2]), _hex_ip(f[7]), flags, f[6], f[4], f[5], f[0]))
    widths = [max(len(r[i]) for r in rows) for i in range(8)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def table_rows(text):
    return [line.split() for line in text.splitlines()[1:]]


# ----------------------------------------------------------------------------
# Helpers


class Upstream:
    """The upstream services, running in the upstream namespace."""

    def __init__(self, ns):
        self.proc = ns.popen([PY, "-c", _UPSTREAM, World.UPLINK_UPSTREAM, ANSWER, str(ECHO_PORT)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"upstream did not start: {self.proc.stderr.read()}")
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.log = []

    def lines(self, wait=0.2):
        """Everything logged so far (waiting up to ``wait`` for more)."""
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                break
            chunk = self.proc.stdout.read()
            if not chunk:
                break
            self.log.extend(chunk.splitlines())
        return list(self.log)

    def close(self):
        self.proc.kill()
        self.proc.wait()


def ask(guest, mode, dst, port, what, src="-", timeout=1.0):
    return guest.ns.exec([PY, "-c", _ASK, mode, dst, str(port), what, src, str(timeout)], check=False)


def mentions(text, word):
    return [line for line in text.splitlines() if re.search(rf"(?<![\w.]){re.escape(word)}(?![\w.])", line)]


# ----------------------------------------------------------------------------
# The world


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="e2e", dir="/tmp")  # AF_UNIX paths are short
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def world(sockdir, tmp_path):
    """netvm (domid 0 XenStore) + upstream + one XenStore server per guest."""
    servers = []
    upstream = w = None
    try:
        netvm_xs = XenStored(os.path.join(sockdir, "netvm.sock"), domid=0).start()
        servers.append(netvm_xs)
        w = World(netvm_xs, tmp_path / "netvm", gateway=GATEWAY, dns=DNS)
        upstream = Upstream(w.upstream)
        w.upstream_services = upstream
        w.guest_xs = {}
        for domid, addr in GUESTS.items():
            xs = XenStored(os.path.join(sockdir, f"g{domid}.sock"), domid=domid).start()
            servers.append(xs)
            for key, value in (("qubes_ip", addr), ("qubes_netmask", "255.255.255.255"),
                               ("qubes_gateway", GATEWAY), ("qubes_primary_dns", DNS[0]),
                               ("qubes_secondary_dns", DNS[1])):
                xs.write(key, value)  # relative: /local/domain/<domid>/key
            w.add_guest(domid, [addr])
            w.guest_xs[domid] = xs
        yield w
    finally:
        if upstream:
            upstream.close()
        if w:
            w.close()
        for xs in servers:
            xs.stop()


def guest_env(world, guest, tmp_path):
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "XENSTORED_PATH": world.guest_xs[guest.domid].socket_path,
        "VIF_ROUTE_QUBES_SYSLOG": str(tmp_path / "no-syslog"),
        "VIF_ROUTE_QUBES_HOTPLUG_LOG": str(tmp_path / "no-such-dir" / "xen-hotplug.log"),
        "QUBES_SETUP_IP_HOOK": "",
    }


def test_seed_world_end_to_end(world, tmp_path):
    w = world
    guests = list(w.guests)
    resolv = {g.domid: tmp_path / f"resolv-{g.domid}.conf" for g in guests}

    def tables():
        text = "netvm routing table:\n" + route_table(w.netvm)
        for g in guests:
            text += f"\n\nguest {g.domid} ({g.addresses[0]}) routing table:\n" + route_table(g.ns)
        return text

    # -- the netvm: vif-route-qubes online for each vif, then the DNS DNAT
    for g in guests:
        res = w.hotplug(g, "online")
        assert res.returncode == 0, f"online {g.vif}: {res.stderr}"
        assert w.xs.read(f"/local/domain/0/{g.xenbus_path}/hotplug-status") == b"connected"
    netvm_resolv = tmp_path / "netvm-resolv.conf"
    netvm_resolv.write_text(f"nameserver {World.UPLINK_UPSTREAM}\n")
    dnat = [os.path.join(BIN, "qubes-setup-dnat-to-ns"), "--resolv-conf", str(netvm_resolv)]
    res = w.netvm.exec(dnat, check=False, env=w.env)
    assert res.returncode == 0, f"qubes-setup-dnat-to-ns: {res.returncode} {res.stderr}"
    res = w.netvm.exec(dnat, check=False, env=w.env)
    assert res.returncode == 100, f"qubes-setup-dnat-to-ns rerun should be unchanged: {res.stderr}"

    # -- each guest: qubes-setup-ip only, from its own XenStore
    for g in guests:
        res = g.ns.exec([os.path.join(BIN, "qubes-setup-ip"), "--resolv-conf", str(resolv[g.domid]), "eth0"],
                        check=False, env=guest_env(w, g, tmp_path))
        assert res.returncode == 0, f"qubes-setup-ip in guest {g.domid}: {res.stderr}"
        assert resolv[g.domid].read_text().splitlines()[1:] == [f"nameserver {DNS[0]}", f"nameserver {DNS[1]}"]

    context = tables()
    print("\n" + context)

    # the tables have the seed's shape
    netvm_rows = table_rows(route_table(w.netvm))
    for g in guests:
        assert [g.addresses[0], "0.0.0.0", "255.255.255.255", "UH", str(32752 - g.domid), "0", "0", g.vif] \
            in netvm_rows, context
    assert ["192.168.0.0", "0.0.0.0", "255.255.255.0", "U"] in [r[:4] for r in netvm_rows], context
    assert ["0.0.0.0", "192.168.0.1", "0.0.0.0", "UG", "0", "0", "0", "eth0"] in netvm_rows, context
    for g in guests:
        rows = table_rows(route_table(g.ns))
        assert sorted(rows) == sorted([
            ["0.0.0.0", GATEWAY, "0.0.0.0", "UG", "0", "0", "0", "eth0"],
            [GATEWAY, "0.0.0.0", "255.255.255.255", "UH", "0", "0", "0", "eth0"],
        ]), context

    def check_reachable(g, tag):
        """UDP answered by upstream, which saw the guest's own address; a
        name resolved through DNS1 (and DNS2), the query arriving upstream
        from the guest's address (DNAT rewrote the destination only)."""
        addr = g.addresses[0]
        res = ask(g, "udp", World.UPLINK_UPSTREAM, ECHO_PORT, f"hello-{tag}-{g.domid}")
        assert res.returncode == 0 and res.stdout.split() == [World.UPLINK_UPSTREAM, "echo", f"hello-{tag}-{g.domid}"], \
            f"guest {g.domid} not answered by upstream: {res.stdout} {res.stderr}\n{context}"
        assert f"udp {addr} hello-{tag}-{g.domid}" in w.upstream_services.lines(), context
        for dns in DNS:
            name = f"g{g.domid}-{tag}-{dns.split('.')[-1]}.example"
            res = ask(g, "dns", dns, 53, name)
            # the answer comes back from the virtual nameserver the guest asked
            assert res.returncode == 0 and res.stdout.split() == [dns, ANSWER], \
                f"guest {g.domid}: {name} through {dns}: {res.stdout} {res.stderr}\n{context}"
            assert f"dns {addr} {name} 1" in w.upstream_services.lines(), context

    for g in guests:
        check_reachable(g, "first")
    # DNS1 is what the guest's own resolv.conf names first
    assert resolv[guests[0].domid].read_text().splitlines()[1] == f"nameserver {DNS[0]}"

    # -- a forged source address is dropped
    liar, victim = guests[0], guests[1]
    sent_before = int(liar.ns.read("/sys/class/net/eth0/statistics/tx_packets"))
    res = ask(liar, "udp", World.UPLINK_UPSTREAM, ECHO_PORT, "forged-by-liar", src=victim.addresses[0], timeout=0.5)
    assert res.returncode == 2, f"forged packet was answered: {res.stdout}\n{context}"
    res = ask(liar, "udp", World.UPLINK_UPSTREAM, ECHO_PORT, "forged-outside", src="192.0.2.99", timeout=0.5)
    assert res.returncode == 2, context
    # the guest did put them on the wire (3 tries each): the netvm dropped them
    sent = int(liar.ns.read("/sys/class/net/eth0/statistics/tx_packets")) - sent_before
    assert sent >= 6, f"only {sent} packets left the liar's eth0"
    time.sleep(0.2)
    assert not [line for line in w.upstream_services.lines() if "forged" in line], \
        f"a forged packet reached upstream\n{context}"
    check_reachable(liar, "after-forgery")  # the liar's own address still works

    # -- one guest goes offline: the others keep working, nothing of it is left
    gone = guests[1]
    res = w.hotplug(gone, "offline")
    assert res.returncode == 0, f"offline {gone.vif}: {res.stderr}"
    context = tables()
    print("\nafter offline of " + gone.vif + ":\n" + context)
    for g in guests:
        if g is not gone:
            check_reachable(g, "after-offline")
    res = ask(gone, "udp", World.UPLINK_UPSTREAM, ECHO_PORT, "from-the-dead", timeout=0.5)
    assert res.returncode != 0, context
    assert not [line for line in w.upstream_services.lines(0.3) if "from-the-dead" in line], context

    ns, vif, addr = w.netvm, gone.vif, gone.addresses[0]
    leftovers = {
        "route": mentions(ns.ip("route", "show", "table", "all").stdout, vif)
        + mentions(ns.ip("route", "show", "table", "all").stdout, addr)
        + mentions(ns.ip("-6", "route", "show", "table", "all").stdout, vif),
        "address": [line for line in ns.ip("-o", "addr", "show", "dev", vif).stdout.splitlines()
                    if " inet " in line or " inet6 " in line],
        "neighbour": ns.ip("neigh", "show", "dev", vif).stdout.splitlines()
        + mentions(ns.ip("neigh", "show").stdout, addr),
        "firewall": [line for tool in ("iptables-save", "ip6tables-save")
                     for line in mentions(ns.exec([tool]).stdout, vif)],
        "state record": [f for f in os.listdir(w.env["VIF_ROUTE_QUBES_STATE_DIR"]) if f.startswith(vif + ".")],
    }
    assert all(not v for v in leftovers.values()), f"left behind by offline of {vif}: {leftovers}\n{context}"
    assert [r for r in table_rows(route_table(ns)) if r[-1] == vif] == [], context
    # the others' routes, rules and records are untouched
    for g in guests:
        if g is not gone:
            assert mentions(ns.exec(["iptables-save"]).stdout, g.vif), context
            assert os.path.exists(os.path.join(w.env["VIF_ROUTE_QUBES_STATE_DIR"], f"{g.vif}.json"))
