"""qubes-setup-dnat-to-ns with real packets, in network namespaces.

A guest (behind vif12.0, configured by the real vif-route-qubes, IPv4 and
IPv6) queries the virtual nameservers through the netvm namespace; the
upstream namespace runs small UDP+TCP DNS servers on 192.168.0.53 /
192.168.0.54 and 2001:db8::53 / 2001:db8::54 that answer every query with
an address naming the server (192.0.2.1 / .2 / .3 / .4). The same program
also listens on the virtual nameservers themselves (10.139.1.1/.2 and
fd09:24ef:4179::a8b:1/2 on the upstream's lo, answering 192.0.2.101/.102/
.103/.104): a query the netvm forwards without translating lands there and
is counted, which is how "nothing leaks" is checked.

resolv.conf and systemd-resolved's file are bind-mounted over the real paths
inside a private mount namespace of the command only; the machine's own
files are never touched. Every test runs with each firewall backend: nft,
and iptables in both flavours (iptables-nft, iptables-legacy).

``DBUS_SYSTEM_BUS_ADDRESS`` points at a socket that does not exist unless a
test starts the real systemd-resolved on a private dbus-daemon
(:func:`real_resolved`): the machine's own bus, if it has one, is never asked.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from tests.rigs import resolved as resolved_rig
from tests.rigs.netns import PY, World
from tests.rigs.xenstored import XenStored

CMD = os.path.join(os.path.dirname(sys.executable), "qubes-setup-dnat-to-ns")
DNS1, DNS2 = "10.139.1.1", "10.139.1.2"
DNS6_1, DNS6_2 = "fd09:24ef:4179::a8b:1", "fd09:24ef:4179::a8b:2"
UP1, UP2 = "192.168.0.53", "192.168.0.54"
UP6_1, UP6_2 = "2001:db8::53", "2001:db8::54"
GUEST4, GUEST6, GATEWAY6 = "10.137.0.12", "fd09:24ef:4179::a89:c", "fd09:24ef:4179::a8a:1"
ANSWER = {UP1: "192.0.2.1", UP2: "192.0.2.2", UP6_1: "192.0.2.3", UP6_2: "192.0.2.4",
          DNS1: "192.0.2.101", DNS2: "192.0.2.102", DNS6_1: "192.0.2.103", DNS6_2: "192.0.2.104"}
LEAKED = {ANSWER[d] for d in (DNS1, DNS2, DNS6_1, DNS6_2)}
BACKENDS = [("nft", ""), ("iptables", "nft"), ("iptables", "legacy")]

# Bind-mount the given files (an empty argument: leave that path alone) and
# run the rest of argv. Fixed text; paths only ever arrive as "$@".
MOUNT_AND_RUN = r"""
set -e
if [ -n "$1" ]; then mount --bind "$1" /etc/resolv.conf; fi
if [ -n "$2" ]; then
    mount -t tmpfs tmpfs /run/systemd
    mkdir -p /run/systemd/resolve
    cp "$2" /run/systemd/resolve/resolv.conf
fi
shift 2
exec "$@"
"""

DNS_SERVER = r"""
import selectors, socket, struct, sys

def answer(query, ip):
    end = 12
    while query[end] != 0:
        end += 1 + query[end]
    end += 5
    head = query[:2] + b"\x81\x80" + struct.pack(">HHHH", 1, 1, 0, 0)
    rr = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 0, 4) + socket.inet_aton(ip)
    return head + query[12:end] + rr

sel = selectors.DefaultSelector()
for spec in sys.argv[1:]:
    addr, ip = spec.split("=")
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    u = socket.socket(fam, socket.SOCK_DGRAM)
    u.bind((addr, 53))
    sel.register(u, selectors.EVENT_READ, ("udp", addr, ip))
    t = socket.socket(fam, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind((addr, 53))
    t.listen(64)
    sel.register(t, selectors.EVENT_READ, ("tcp", addr, ip))
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        proto, addr, ip = key.data
        try:
            if proto == "udp":
                data, src = key.fileobj.recvfrom(4096)
                key.fileobj.sendto(answer(data, ip), src)
            else:
                conn, src = key.fileobj.accept()
                conn.settimeout(2)
                size = struct.unpack(">H", conn.recv(2, socket.MSG_WAITALL))[0]
                data = conn.recv(size, socket.MSG_WAITALL)
                reply = answer(data, ip)
                conn.sendall(struct.pack(">H", len(reply)) + reply)
                conn.close()
            print(proto, addr, src[0], flush=True)
        except OSError as exc:
            print("error", proto, addr, exc, flush=True)
"""

# argv: timeout seconds-to-loop target... (target = SERVER/udp|tcp); one
# line per query: "SERVER PROTO RESULT" (an address, timeout or error:...)
DNS_CLIENT = r"""
import os, socket, struct, sys, time

def query(server, proto, timeout):
    qid = os.urandom(2)
    q = qid + b"\x01\x00" + struct.pack(">HHHH", 1, 0, 0, 0) + b"\x07example\x04test\x00" + struct.pack(">HH", 1, 1)
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if proto == "udp":
            s.connect((server, 53))  # as resolvers do: an ICMP refusal then reaches recv
            s.send(q)
            r = s.recv(4096)
        else:
            s.connect((server, 53))
            s.sendall(struct.pack(">H", len(q)) + q)
            size = struct.unpack(">H", s.recv(2, socket.MSG_WAITALL))[0]
            r = s.recv(size, socket.MSG_WAITALL)
        if r[:2] != qid:
            return "error:id"
        return socket.inet_ntoa(r[-4:])
    except socket.timeout:
        return "timeout"
    except OSError as exc:
        return "refused" if isinstance(exc, ConnectionRefusedError) else "error:" + exc.__class__.__name__
    finally:
        s.close()

timeout, loop = float(sys.argv[1]), float(sys.argv[2])
targets = [t.rsplit("/", 1) for t in sys.argv[3:]]
end = time.monotonic() + loop
while True:
    for server, proto in targets:
        print(server, proto, query(server, proto, timeout), flush=True)
    if time.monotonic() >= end:
        break
"""


class DnsServers:
    """The upstream's DNS servers; ``queries()`` lists (proto, addr, src)."""

    def __init__(self, ns, specs):
        self.proc = ns.popen([PY, "-c", DNS_SERVER, *specs], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"DNS servers did not start: {self.proc.stderr.read()}")
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.split())

    def queries(self, settle=0.2):
        time.sleep(settle)
        return [tuple(words) for words in self.lines if words and words[0] in ("udp", "tcp")]

    def close(self):
        self.proc.kill()
        self.proc.wait()


class Rig:
    def __init__(self, world, firewall, flavour, tmp):
        self.world, self.firewall, self.flavour, self.tmp = world, firewall, flavour, tmp
        self.env = dict(world.env, VIF_ROUTE_QUBES_FIREWALL=firewall,
                        DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={os.path.join(tmp, 'no-bus')}")
        if flavour:
            self.env["VIF_ROUTE_QUBES_IPTABLES"] = flavour
        self.netvm, self.up = world.netvm, world.upstream
        self.servers = None

    def file(self, name, text):
        path = os.path.join(self.tmp, name)
        with open(path, "w" if isinstance(text, str) else "wb") as f:
            f.write(text)
        return path

    def dnat(self, *args, resolv=None, resolved=None, env=None, popen=False):
        """Run the command in the netvm, with ``resolv``/``resolved`` (texts)
        bind-mounted over the real paths."""
        paths = []
        for name, text in (("resolv.conf", resolv), ("resolved.conf", resolved)):
            paths.append(self.file(f"{name}.{time.monotonic_ns()}", text) if text is not None else "")
        argv = ["unshare", "-m", "sh", "-c", MOUNT_AND_RUN, "sh", *paths, CMD, *args]
        if popen:
            return self.netvm.popen(argv, env=env or self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        return self.netvm.exec(argv, check=False, env=env or self.env)

    # -- what is in force, per backend -----------------------------------------
    def _ipt(self, version, tool):
        base = "iptables" if version == 4 else "ip6tables"
        return f"{base}-{self.flavour}-{tool}"

    def save(self, version=4, counters=False, tables=("filter", "nat")):
        """iptables-save of our two tables (the raw table's anti-spoofing
        counters move with every stray packet of the guest)."""
        text = ""
        for table in tables:
            argv = [self._ipt(version, "save"), "-t", table] + (["-c"] if counters else [])
            text += self.netvm.exec(argv).stdout
        return "\n".join(l for l in text.splitlines() if not l.startswith("#"))

    def ours(self, version=4):
        """Our lines (jumps included) in iptables-save order."""
        return [l for l in self.save(version).splitlines() if "vrq-dn" in l]

    def nft_chain(self, version=4):
        fam = "ip" if version == 4 else "ip6"
        res = self.netvm.exec(["nft", "list", "chain", fam, "qubes", "dnat-dns"], check=False)
        # without the table and chain lines and their closing braces
        return [l.strip() for l in res.stdout.splitlines()][2:-2] if res.returncode == 0 else None

    def translations(self, version=4):
        """[(virtual nameserver, upstream or 'drop')] in force, from either backend."""
        out = []
        if self.firewall == "nft":
            for line in self.nft_chain(version) or []:
                words = line.split()
                if "dport" in words:
                    out.append((words[2], words[-1]))
        else:
            for line in self.ours(version):
                words = line.split()
                if line.startswith("-A vrq-dnat-dns "):
                    out.append((words[3].split("/")[0], words[-1]))
                elif line.startswith("-A vrq-dns-guard "):
                    pass
        return out[::2]  # udp and tcp rules come in pairs

    def state(self):
        """Everything of ours, with counters / handles: equal before and after
        means nothing was rewritten."""
        if self.firewall == "nft":
            return "".join(self.netvm.exec(["nft", "-a", "list", "chain", fam, "qubes", chain], check=False).stdout
                           for fam in ("ip", "ip6") for chain in ("dnat-dns", "dnat-dns-guard"))
        # our chains and jumps, with their counters (built-in chains' policy
        # counters move with any packet of the netvm's own)
        return [l for v in (4, 6) for l in self.save(v, counters=True).splitlines() if "vrq-dn" in l]

    def query(self, *targets, timeout=2.0, loop=0.0):
        res = self.guest.ns.exec([PY, "-c", DNS_CLIENT, str(timeout), str(loop), *targets])
        return [tuple(line.split()) for line in res.stdout.splitlines()]

    def answers(self, *targets, timeout=2.0):
        return {f"{s}/{p}": r for s, p, r in self.query(*targets, timeout=timeout)}


ALL = [f"{d}/{p}" for d in (DNS1, DNS2) for p in ("udp", "tcp")]
ALL6 = [f"{d}/{p}" for d in (DNS6_1, DNS6_2) for p in ("udp", "tcp")]


@pytest.fixture(params=BACKENDS, ids=lambda b: "-".join(x for x in b if x))
def rig(request):
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces, iptables)")
    firewall, flavour = request.param
    tmp = tempfile.mkdtemp(prefix="vrqdn", dir="/tmp")  # short: AF_UNIX path limit
    xs = XenStored(os.path.join(tmp, "xs.sock"))
    xs.start()
    world = None
    rig = None
    try:
        world = World(xs, tmp)
        rig = Rig(world, firewall, flavour, tmp)
        xs.write("/local/domain/0/qubes_netvm_gateway6", GATEWAY6)
        for addr in (UP1, UP2):
            rig.up.ip("addr", "add", f"{addr}/24", "dev", "eth0")
        for addr in ("2001:db8::1", UP6_1, UP6_2):
            rig.up.ip("-6", "addr", "add", f"{addr}/64", "dev", "eth0", "nodad")
        rig.netvm.ip("-6", "addr", "add", "2001:db8::2/64", "dev", "eth0", "nodad")
        rig.netvm.ip("-6", "route", "add", "default", "via", "2001:db8::1")
        rig.up.ip("-6", "route", "add", "fd09:24ef:4179::/48", "via", "2001:db8::2")
        for addr in (DNS1, DNS2):
            rig.up.ip("addr", "add", f"{addr}/32", "dev", "lo")
        for addr in (DNS6_1, DNS6_2):
            rig.up.ip("-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad")
        rig.servers = DnsServers(rig.up, [f"{a}={ANSWER[a]}" for a in ANSWER])
        rig.guest = world.add_guest(12, [GUEST4, GUEST6])
        genv = rig.guest.env(VIF_ROUTE_QUBES_FIREWALL=firewall, **({"VIF_ROUTE_QUBES_IPTABLES": flavour}
                                                                   if flavour else {}))
        res = world.hotplug(rig.guest, "online", env=genv)
        assert res.returncode == 0, res.stderr
        rig.guest.configure()
        # the guest's IPv6 default route via the netvm's gateway6 (qubes-setup-ip's job)
        g = rig.guest.ns
        vif_mac = world.netvm.ip("-br", "link", "show", "dev", rig.guest.vif).stdout.split()[2]
        g.ip("-6", "route", "add", GATEWAY6, "dev", "eth0")
        g.ip("-6", "neigh", "replace", GATEWAY6, "lladdr", vif_mac, "dev", "eth0", "nud", "permanent")
        g.ip("-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0")
        # The first IPv6 packet through a fresh rig can take a second or more
        # (neighbour discovery on both links, the guest's own DAD): walk the
        # whole path once, untimed, straight to the upstreams.
        warm = rig.query(*[f"{u}/udp" for u in (UP1, UP2, UP6_1, UP6_2)], timeout=5.0)
        assert [r for _, _, r in warm] == [ANSWER[u] for u in (UP1, UP2, UP6_1, UP6_2)], warm
        yield rig
    finally:
        if rig and rig.servers:
            rig.servers.close()
        if world:
            world.close()
        xs.stop()
        shutil.rmtree(tmp, ignore_errors=True)


TWO = f"# written by NetworkManager\nsearch example.org\nnameserver {UP1}\nnameserver {UP2}\n"
FOUR = f"nameserver {UP1}\nnameserver {UP6_1}\nnameserver {UP2}\nnameserver {UP6_2}\n"
V6_ONLY = f"nameserver {UP6_1}\nnameserver fe80::1%eth0\nnameserver {UP6_2}\n"


def set_dns6(rig):
    rig.world.xs.write("/local/domain/0/qubes_netvm_primary_dns6", DNS6_1)
    rig.world.xs.write("/local/domain/0/qubes_netvm_secondary_dns6", DNS6_2)


def test_two_upstreams_udp_and_tcp(rig):
    # before: nothing translates, the query leaks to whoever owns DNS1 upstream
    assert rig.answers(f"{DNS1}/udp")[f"{DNS1}/udp"] == ANSWER[DNS1]
    res = rig.dnat(resolv=TWO)  # the hook's plain call: default paths
    assert res.returncode == 0, res.stderr
    got = rig.answers(*ALL)
    assert got == {f"{DNS1}/udp": "192.0.2.1", f"{DNS1}/tcp": "192.0.2.1",
                   f"{DNS2}/udp": "192.0.2.2", f"{DNS2}/tcp": "192.0.2.2"}
    # the upstream saw the guest's own address (only the destination is rewritten)
    assert {(p, a, s) for p, a, s in rig.servers.queries() if a in (UP1, UP2)} == {
        ("udp", UP1, GUEST4), ("tcp", UP1, GUEST4), ("udp", UP2, GUEST4), ("tcp", UP2, GUEST4)}
    assert rig.translations() == [(DNS1, UP1), (DNS2, UP2)]
    if rig.firewall == "iptables":
        assert rig.ours() == [":vrq-dns-guard - [0:0]", "-A FORWARD -j vrq-dns-guard",
                              *[l for l in rig.ours() if l.startswith("-A vrq-dns-guard")],
                              ":vrq-dnat-dns - [0:0]", "-A PREROUTING -j vrq-dnat-dns",
                              *expected_nat([(DNS1, UP1), (DNS2, UP2)])]
    else:
        assert rig.nft_chain()[:2] == ["type nat hook prerouting priority dstnat; policy accept;",
                                        f"ip daddr {DNS1} udp dport 53 dnat to {UP1}"]
    assert rig.dnat(resolv=TWO).returncode == 100


def test_virtual_nameservers_from_qubesdb(rig, qdb):
    """A netvm of today's Qubes: DNS1/DNS2 (and the IPv6 pair, under the
    names of Qubes' PR 558/592) in QubesDB, none in XenStore (issue 18 §1)."""
    for key in ("qubes_netvm_primary_dns", "qubes_netvm_secondary_dns"):
        rig.world.xs.rm(f"/local/domain/0/{key}")
    for path, value in (("/qubes-netvm-primary-dns", DNS1), ("/qubes-netvm-secondary-dns", DNS2),
                        ("/qubes-netvm-primary-dns6", DNS6_1), ("/qubes-netvm-secondary-dns6", DNS6_2)):
        assert qdb.cli("qubesdb-write", path, value).returncode == 0
    env = qdb.env(rig.env)
    res = rig.dnat("--status", resolv=FOUR, env=env)
    assert res.returncode == 3, res.stdout + res.stderr
    assert f"configuration: qubesdb (auto: QubesDB answers on {qdb.socket})" in res.stdout
    assert f"DNS1: {DNS1} (from QubesDB /qubes-netvm-primary-dns)" in res.stdout
    assert f"DNS6-2: {DNS6_2} (from QubesDB /qubes-netvm-secondary-dns6)" in res.stdout
    res = rig.dnat(resolv=FOUR, env=env)
    assert res.returncode == 0, res.stderr
    got = rig.answers(*ALL, *ALL6)
    assert got == {**{f"{DNS1}/{p}": ANSWER[UP1] for p in ("udp", "tcp")},
                   **{f"{DNS2}/{p}": ANSWER[UP2] for p in ("udp", "tcp")},
                   **{f"{DNS6_1}/{p}": ANSWER[UP6_1] for p in ("udp", "tcp")},
                   **{f"{DNS6_2}/{p}": ANSWER[UP6_2] for p in ("udp", "tcp")}}, got
    assert rig.dnat(resolv=FOUR, env=env).returncode == 100
    # a bad value from QubesDB: refused naming the key, the rules kept
    before = rig.translations()
    assert qdb.cli("qubesdb-write", "/qubes-netvm-secondary-dns", "10.139.1.2 ; x").returncode == 0
    res = rig.dnat(resolv=TWO, env=env)
    assert res.returncode == 1 and "QubesDB /qubes-netvm-secondary-dns" in res.stderr, res.stderr
    assert rig.translations() == before
    # the daemon gone: auto is XenStore, which has no IPv4 pair here
    qdb.stop()
    res = rig.dnat("--status", resolv=TWO, env=env)
    assert "configuration: xenstore (auto: no QubesDB on" in res.stdout, res.stdout


def expected_nat(pairs):
    return [f"-A vrq-dnat-dns -d {d}/32 -p {p} -m {p} --dport 53 -m comment --comment DNS{i} "
            f"-j DNAT --to-destination {to}" for i, (d, to) in enumerate(pairs, 1) for p in ("udp", "tcp")]


def test_one_upstream_serves_both(rig):
    res = rig.dnat(resolv=f"nameserver {UP2}\n")
    assert res.returncode == 0, res.stderr
    assert set(rig.answers(*ALL).values()) == {"192.0.2.2"}
    assert rig.translations() == [(DNS1, UP2), (DNS2, UP2)]


def test_more_upstreams_than_virtual_nameservers(rig):
    res = rig.dnat(resolv=f"nameserver {UP2}\nnameserver {UP1}\nnameserver 192.168.0.55\n")
    assert res.returncode == 0, res.stderr
    assert rig.answers(f"{DNS1}/udp", f"{DNS2}/tcp") == {f"{DNS1}/udp": "192.0.2.2", f"{DNS2}/tcp": "192.0.2.1"}


def test_ipv6_only_upstreams_answer_ipv6_guests(rig):
    set_dns6(rig)
    res = rig.dnat(resolv=V6_ONLY)
    assert res.returncode == 0, res.stderr
    assert rig.answers(*ALL6) == {f"{DNS6_1}/udp": "192.0.2.3", f"{DNS6_1}/tcp": "192.0.2.3",
                                  f"{DNS6_2}/udp": "192.0.2.4", f"{DNS6_2}/tcp": "192.0.2.4"}
    assert {(p, a, s) for p, a, s in rig.servers.queries() if a in (UP6_1, UP6_2)} == {
        ("udp", UP6_1, GUEST6), ("tcp", UP6_1, GUEST6), ("udp", UP6_2, GUEST6), ("tcp", UP6_2, GUEST6)}
    assert rig.translations(6) == [(DNS6_1, UP6_1), (DNS6_2, UP6_2)]
    # IPv4 guests have no path: dropped, nothing leaks, and --status says so
    before = len(rig.servers.queries())
    assert rig.answers(*ALL, timeout=1.0) == {t: "refused" for t in ALL}
    assert rig.servers.queries(0.5)[before:] == []
    status = rig.dnat("--status", resolv=V6_ONLY)
    assert status.returncode == 0, status.stdout + status.stderr
    assert ("warning: guests have no IPv4 DNS path: DNS1/DNS2 are IPv4 but every upstream nameserver is IPv6"
            in status.stdout)
    assert rig.dnat(resolv=V6_ONLY).returncode == 100


def test_both_families_at_once_and_ipv6_removed_again(rig):
    set_dns6(rig)
    assert rig.dnat(resolv=FOUR).returncode == 0
    assert rig.answers(f"{DNS1}/udp", f"{DNS6_2}/tcp") == {f"{DNS1}/udp": "192.0.2.1", f"{DNS6_2}/tcp": "192.0.2.4"}
    # an upstream change: the same rules in force for both families (100), then a swap
    assert rig.dnat(resolv=FOUR).returncode == 100
    assert rig.dnat(resolv=f"nameserver {UP6_2}\nnameserver {UP1}\n").returncode == 0
    assert rig.answers(f"{DNS6_1}/udp", f"{DNS2}/tcp") == {f"{DNS6_1}/udp": "192.0.2.4", f"{DNS2}/tcp": "192.0.2.1"}
    # the IPv6 keys gone: our IPv6 rules go, IPv4 stays
    rig.world.xs.rm("/local/domain/0/qubes_netvm_primary_dns6")
    rig.world.xs.rm("/local/domain/0/qubes_netvm_secondary_dns6")
    assert rig.dnat(resolv=FOUR).returncode == 0
    assert rig.translations(6) == []
    if rig.firewall == "nft":
        assert rig.nft_chain(6) is None
    else:
        assert rig.ours(6) == []
    assert rig.answers(f"{DNS1}/udp") == {f"{DNS1}/udp": "192.0.2.1"}


def test_no_ipv6_upstream_drops_ipv6_queries(rig):
    set_dns6(rig)
    assert rig.dnat(resolv=FOUR).returncode == 0
    assert rig.dnat(resolv=TWO).returncode == 0
    before = len(rig.servers.queries())
    assert rig.answers(*ALL6, timeout=1.0) == {t: "refused" for t in ALL6}
    assert rig.servers.queries(0.5)[before:] == []
    assert set(rig.answers(*ALL).values()) == {"192.0.2.1", "192.0.2.2"}


def test_systemd_resolved_file_when_resolved_does_not_answer(rig):
    stub = "# managed by systemd-resolved\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n"
    real = f"# real upstreams\nnameserver {UP2}\nnameserver {UP1}\n"
    res = rig.dnat(resolv=stub, resolved=real)
    assert res.returncode == 0, res.stderr
    assert rig.answers(*ALL) == {f"{DNS1}/udp": "192.0.2.2", f"{DNS1}/tcp": "192.0.2.2",
                                 f"{DNS2}/udp": "192.0.2.1", f"{DNS2}/tcp": "192.0.2.1"}
    status = rig.dnat("--status", resolv=stub, resolved=real)
    assert status.returncode == 0, status.stdout
    assert f"upstream nameservers: {UP2} {UP1} (from systemd-resolved, /run/systemd/resolve/resolv.conf)" \
        in status.stdout
    # the stub, resolved silent and its file missing: an error naming the file, rules untouched
    before = rig.state()
    res = rig.dnat(resolv=stub)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "cannot read /run/systemd/resolve/resolv.conf" in res.stderr
    assert rig.state() == before
    assert rig.answers(f"{DNS1}/udp") == {f"{DNS1}/udp": "192.0.2.2"}


# The real systemd-resolved, on a private dbus-daemon, inside the netvm's
# network namespace and a private mount namespace (the shared rig in
# tests.rigs.resolved): the machine's own resolved, bus and
# files are never touched. The command runs outside that mount namespace
# and reaches resolved over its bus (resolved.env).
STUB = "# managed by systemd-resolved\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n"


def real_resolved(rig, global_dns):
    """systemd-resolved with ``DNS=`` (its global servers) as given."""
    return resolved_rig.Resolved(rig.netvm, resolved_rig.config(global_dns, stub_listener=False), env=rig.env)


def test_real_resolved_global_servers_only(rig):
    set_dns6(rig)
    with real_resolved(rig, [UP1, UP6_1]) as resolved:
        # a per-link server too, as a VPN client or NetworkManager sets one
        resolved.resolvectl("dns", "eth0", UP2, UP6_2)
        shown = resolved.resolvectl("dns")
        assert f"Global: {UP1} {UP6_1}" in shown and f"{UP2} {UP6_2}" in shown, shown
        res = rig.dnat(resolv=STUB, env=resolved.env)
        assert res.returncode == 0, res.stderr
        before = len(rig.servers.queries())
        got = rig.answers(*ALL, *ALL6)
        assert got == {**{t: ANSWER[UP1] for t in ALL}, **{t: ANSWER[UP6_1] for t in ALL6}}
        seen = {a for _, a, _ in rig.servers.queries()[before:]}
        assert seen == {UP1, UP6_1}  # the per-link servers received nothing
        status = rig.dnat("--status", resolv=STUB, env=resolved.env)
        assert status.returncode == 0, status.stdout
        assert f"upstream nameservers: {UP1} {UP6_1} (from systemd-resolved over D-Bus, global servers)" \
            in status.stdout
        assert rig.dnat(resolv=STUB, env=resolved.env).returncode == 100
    # resolved gone: its file is the fallback, and without it the run fails, rules untouched
    before = rig.state()
    res = rig.dnat(resolv=STUB, env=resolved.env)
    assert res.returncode == 1 and "cannot read /run/systemd/resolve/resolv.conf" in res.stderr, res.stderr
    assert rig.state() == before


def test_real_resolved_per_link_servers_without_global_ones(rig):
    with real_resolved(rig, []) as resolved:
        resolved.resolvectl("dns", "eth0", UP2)
        res = rig.dnat(resolv=STUB, env=resolved.env)
        assert res.returncode == 0, res.stderr
        assert rig.answers(*ALL) == {t: ANSWER[UP2] for t in ALL}
        status = rig.dnat("--status", resolv=STUB, env=resolved.env)
        assert "(from systemd-resolved over D-Bus, per-link servers)" in status.stdout


def test_unreadable_upstream_source_changes_nothing(rig):
    assert rig.dnat(resolv=TWO).returncode == 0
    before = rig.state()
    for path in ("/nonexistent", rig.tmp):
        res = rig.dnat("--resolv-conf", path)
        assert res.returncode == 1, res.stderr
        assert res.stderr.count("\n") == 1 and f"cannot read {path}: " in res.stderr, res.stderr
        assert rig.state() == before
    unreadable = rig.file("unreadable", TWO)
    os.chmod(unreadable, 0)
    # root reads anything: drop the capability that lets it
    res = rig.netvm.exec(["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search",
                          CMD, "--resolv-conf", unreadable], check=False, env=rig.env)
    assert res.returncode == 1 and f"cannot read {unreadable}: Permission denied" in res.stderr, res.stderr
    assert rig.state() == before
    assert set(rig.answers(*ALL).values()) == {"192.0.2.1", "192.0.2.2"}


def test_no_upstream_drops_and_nothing_leaks(rig):
    assert rig.dnat(resolv=TWO).returncode == 0
    res = rig.dnat(resolv="nameserver 127.0.0.1\n")  # loopback only: no usable upstream
    assert res.returncode == 0, res.stderr
    assert rig.translations() == []
    before = len(rig.servers.queries())
    got = rig.answers(*ALL, timeout=1.0)
    assert got == {t: "refused" for t in ALL}
    leaked = [q for q in rig.servers.queries(0.5)[before:]]
    assert leaked == []  # neither DNS1/DNS2 nor the upstreams saw anything
    # and back: the first query after an upstream appears is translated
    assert rig.dnat(resolv=TWO).returncode == 0
    assert set(rig.answers(*ALL).values()) == {"192.0.2.1", "192.0.2.2"}


def test_unchanged_rules_exit_100_without_churn(rig):
    set_dns6(rig)
    assert rig.dnat(resolv=FOUR).returncode == 0
    rig.answers(*ALL, *ALL6)  # non-zero counters
    before = rig.state()
    for _ in range(3):
        res = rig.dnat(resolv=FOUR)
        assert res.returncode == 100, res.stderr
        assert res.stdout == "" and res.stderr == ""
    assert rig.state() == before
    if rig.firewall == "iptables":
        # the counters compared are real ones: the 4 queries went through
        assert [l for l in before if "PREROUTING -j vrq-dnat-dns" in l][0].startswith("[4:")
    else:
        assert "# handle" in before and f"dnat to {UP6_1} # handle" in before


def test_swapping_upstreams_while_querying(rig):
    files = [TWO, f"nameserver {UP2}\nnameserver {UP1}\n", f"nameserver {UP1}\n", TWO]
    assert rig.dnat(resolv=files[0]).returncode == 0
    client = rig.guest.ns.popen([PY, "-c", DNS_CLIENT, "2", "3.0", *ALL],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    codes = []
    try:
        for i in range(8):
            time.sleep(0.25)
            codes.append(rig.dnat(resolv=files[1 + i % 3]).returncode)
        out, err = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    results = [line.split()[2] for line in out.splitlines()]
    assert codes == [0] * 8
    assert len(results) > 40, err
    assert set(results) == {"192.0.2.1", "192.0.2.2"}, [r for r in results if not r.startswith("192.0.2.")]


def test_garbage_resolv_conf(rig):
    garbage = (b"\x00\xff\xfe garbage\nnameserver\nnameserver 300.1.1.1\nnameserverx 192.168.0.53\n"
               b"nameserver 192.168.0.54junk\n nameserver fe80::1%eth0\n\xc3\x28 nameserver\n")
    path = rig.file("garbage", garbage)
    res = rig.dnat("--resolv-conf", path)
    assert res.returncode == 0, res.stderr
    assert rig.translations() == []  # nothing valid: refused
    assert rig.answers(f"{DNS1}/udp", timeout=1.0) == {f"{DNS1}/udp": "refused"}
    # one valid line among the garbage is used
    res = rig.dnat("--resolv-conf", rig.file("garbage2", garbage + f"nameserver {UP2}\n".encode()))
    assert res.returncode == 0, res.stderr
    assert set(rig.answers(*ALL).values()) == {"192.0.2.2"}


def test_dns_addresses_missing_everywhere(rig):
    rig.world.xs.rm("/local/domain/0/qubes_netvm_primary_dns")
    rig.world.xs.rm("/local/domain/0/qubes_netvm_secondary_dns")
    before = rig.state()
    res = rig.dnat("--qubes-ns", os.path.join(rig.tmp, "absent"), resolv=TWO)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "no DNS1/DNS2 address" in res.stderr, res.stderr
    assert rig.state() == before and rig.translations() == []
    # the old qubes-ns file gives them
    ns = rig.file("qubes-ns", f"NS1={DNS1}\nNS2='{DNS2}'\n")
    assert rig.dnat("--qubes-ns", ns, resolv=TWO).returncode == 0
    assert set(rig.answers(*ALL).values()) == {"192.0.2.1", "192.0.2.2"}


def test_without_xenstore_options_or_file_suffice(rig):
    env = dict(rig.env, XENSTORED_PATH=os.path.join(rig.tmp, "no-such-socket"))
    res = rig.dnat("--dns1", DNS1, "--dns2", DNS2, resolv=f"nameserver {UP1}\n", env=env)
    assert res.returncode == 0, res.stderr
    ns = rig.file("qubes-ns", f"NS1={DNS1}\nNS2={DNS2}\n")
    res = rig.dnat("--qubes-ns", ns, resolv=TWO, env=env)
    assert res.returncode == 0, res.stderr
    assert rig.answers(f"{DNS2}/tcp") == {f"{DNS2}/tcp": "192.0.2.2"}
    res = rig.dnat(resolv=TWO, env=env)  # neither: the XenStore problem is named
    assert res.returncode == 1 and "XenStore" in res.stderr and res.stderr.count("\n") == 1


def test_concurrent_runs_end_in_one_rule_set(rig):
    procs = [rig.dnat(resolv=TWO, popen=True) for _ in range(6)]
    codes = sorted(p.wait(timeout=60) for p in procs)
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert codes == [0] + [100] * 5
    assert rig.translations() == [(DNS1, UP1), (DNS2, UP2)]
    if rig.firewall == "iptables":
        ours = rig.ours()
        assert ours.count("-A PREROUTING -j vrq-dnat-dns") == 1
        assert ours.count("-A FORWARD -j vrq-dns-guard") == 1
        assert [l for l in ours if "DNAT" in l] == expected_nat([(DNS1, UP1), (DNS2, UP2)])
        assert len([l for l in ours if l.startswith("-A vrq-dns-guard")]) == 4
    else:
        assert len(rig.nft_chain()) == 1 + 4  # the type line, 4 rules


def test_duplicate_jump_or_foreign_rule_is_repaired(rig):
    assert rig.dnat(resolv=TWO).returncode == 0
    if rig.firewall == "iptables":
        rig.netvm.exec([f"iptables-{rig.flavour}", "-w", "-t", "nat", "-A", "PREROUTING", "-j", "vrq-dnat-dns"])
    else:
        rig.netvm.exec(["nft", "add", "rule", "ip", "qubes", "dnat-dns", "accept"])
    assert rig.dnat(resolv=TWO).returncode == 0
    if rig.firewall == "iptables":
        assert rig.ours().count("-A PREROUTING -j vrq-dnat-dns") == 1
    else:
        assert "accept" not in rig.nft_chain()[1:]
    assert rig.dnat(resolv=TWO).returncode == 100


def test_dry_run_changes_nothing_and_logs_nothing(rig):
    log = rig.world.env["VIF_ROUTE_QUBES_HOTPLUG_LOG"]
    os.makedirs(os.path.dirname(log), exist_ok=True)
    syslog = SyslogSink(rig.world.env["VIF_ROUTE_QUBES_SYSLOG"])
    try:
        size = os.path.getsize(log) if os.path.exists(log) else 0
        before = rig.state()
        res = rig.dnat("--dry-run", resolv=TWO)
        assert res.returncode == 0, res.stderr
        assert rig.state() == before
        assert f"# upstream nameservers: {UP1} {UP2} (from /etc/resolv.conf)" in res.stdout
        assert f"# firewall backend: {rig.firewall} (VIF_ROUTE_QUBES_FIREWALL={rig.firewall})" in res.stdout
        if rig.firewall == "iptables":
            assert f"$ iptables-{rig.flavour}-restore --noflush --wait 20 <<'EOF'" in res.stdout
            for line in expected_nat([(DNS1, UP1), (DNS2, UP2)]) + ["-I PREROUTING 1 -j vrq-dnat-dns", "*nat"]:
                assert line in res.stdout.splitlines()
        else:
            assert "$ nft -f - <<'EOF'" in res.stdout
            assert f"\t\tip daddr {DNS2} tcp dport 53 dnat to {UP2}" in res.stdout.splitlines()
        assert rig.dnat("--status", resolv=TWO).returncode == 3
        # neither the dry run nor --status left a trace in syslog or the hotplug log
        assert syslog.lines() == []
        assert (os.path.getsize(log) if os.path.exists(log) else 0) == size
        assert rig.dnat(resolv=TWO).returncode == 0
        # a real run does log, to both
        assert any("DNS1 10.139.1.1 -> 192.168.0.53" in l for l in syslog.lines())
        assert "DNS1 10.139.1.1 -> 192.168.0.53" in open(log).read()[size:]
        res = rig.dnat("-n", resolv=TWO)
        assert res.returncode == 100 and "already right" in res.stdout
    finally:
        syslog.close()


class SyslogSink:
    """A Unix datagram socket standing in for /dev/log, drained by a thread
    (a full socket queue, 10 datagrams by default, would block the sender)."""

    def __init__(self, path):
        import socket

        if os.path.exists(path):
            os.unlink(path)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.seen, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self):
        import socket

        while not self.stop.is_set():
            try:
                self.seen.append(self.sock.recv(4096).decode(errors="replace"))
            except socket.timeout:
                continue
            except OSError:
                return

    def lines(self, settle=0.3):
        time.sleep(settle)
        return list(self.seen)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
        os.unlink(self.path)


def test_status(rig):
    res = rig.dnat("--status", resolv=TWO)
    assert res.returncode == 3, res.stdout + res.stderr
    assert f"DNS1: {DNS1} (from XenStore qubes_netvm_primary_dns)" in res.stdout
    missing = "(chain vrq-dnat-dns does not exist)" if rig.firewall == "iptables" else \
        "(no chain dnat-dns in table ip qubes)"
    assert missing in res.stdout
    assert "state: out of date" in res.stdout
    assert rig.dnat(resolv=TWO).returncode == 0
    res = rig.dnat("--status", resolv=TWO)
    assert res.returncode == 0, res.stdout
    lines = [l.strip() for l in res.stdout.splitlines()]
    assert f"DNS2: {DNS2} (from XenStore qubes_netvm_secondary_dns)" in lines
    assert f"upstream nameservers: {UP1} {UP2} (from /etc/resolv.conf)" in lines
    if rig.firewall == "iptables":
        assert "nat: -A PREROUTING -j vrq-dnat-dns" in lines and "filter: -A FORWARD -j vrq-dns-guard" in lines
        assert all(f"nat: {l}" in lines for l in expected_nat([(DNS1, UP1), (DNS2, UP2)]))
    else:
        assert f"dnat-dns: ip daddr {DNS1} tcp dport 53 dnat to {UP1}" in lines
        assert f"dnat-dns-guard: ip daddr {DNS1} tcp dport 53 drop" in lines
    assert lines[-1] == "state: up to date"
    # an unreadable source: it cannot tell (1), and says why
    res = rig.dnat("--status", "--resolv-conf", "/nonexistent")
    assert res.returncode == 1 and "cannot read /nonexistent" in res.stdout


def test_moving_to_the_other_backend_and_removing_the_old_one(rig):
    other = "iptables" if rig.firewall == "nft" else "nft"
    env = dict(rig.env, VIF_ROUTE_QUBES_FIREWALL=other)
    assert rig.dnat(resolv=TWO).returncode == 0
    # the documented order: the new backend first, then the old one removed
    res = rig.dnat(resolv=TWO, env=env)
    assert res.returncode == 0, res.stderr
    res = rig.dnat("--remove", resolv=TWO)
    assert res.returncode == 0, res.stderr
    assert rig.translations() == []
    if rig.firewall == "nft":
        assert rig.nft_chain() is None and rig.nft_chain(6) is None
        # the table stays (it may hold the hotplug script's sets and chains)
        assert rig.netvm.exec(["nft", "list", "table", "ip", "qubes"], check=False).returncode == 0
    else:
        assert rig.ours() == [] and rig.ours(6) == []
    assert rig.dnat("--remove", resolv=TWO).returncode == 100
    assert set(rig.answers(*ALL).values()) == {"192.0.2.1", "192.0.2.2"}  # the new backend answers
    # nothing left of the old one also means nothing leaks once the new one drops
    assert rig.dnat(resolv="# none\n", env=env).returncode == 0
    assert rig.answers(*ALL, timeout=1.0) == {t: "refused" for t in ALL}
    res = rig.dnat("--remove", resolv=TWO, env=env)
    assert res.returncode == 0, res.stderr


# A netvm where Qubes' antispoof layout (or the hotplug script's nft
# backend) already lives in the same tables: sets of allowed (interface,
# address) pairs and downstream addresses, a raw-priority prerouting chain.
QUBES_STYLE = f"""
table ip qubes {{
    set downstream {{ type ipv4_addr; elements = {{ {GUEST4} }} }}
    set allowed {{ type ifname . ipv4_addr; elements = {{ "vif12.0" . {GUEST4} }} }}
    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        iifgroup 2 goto antispoof
        ip saddr @downstream counter drop
    }}
    chain antispoof {{
        iifname . ip saddr @allowed accept
        counter drop
    }}
}}
table ip6 qubes {{
    set downstream {{ type ipv6_addr; elements = {{ {GUEST6} }} }}
    set allowed {{ type ifname . ipv6_addr; elements = {{ "vif12.0" . {GUEST6} }} }}
    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        iifgroup 2 goto antispoof
        ip6 saddr @downstream counter drop
    }}
    chain antispoof {{
        iifname . ip6 saddr @allowed accept
        counter drop
    }}
}}
"""


def qubes_parts(rig):
    """The pre-loaded sets (with elements) and chains, counters left out."""
    import re

    out = []
    for fam in ("ip", "ip6"):
        for kind, name in (("set", "downstream"), ("set", "allowed"), ("chain", "prerouting"),
                           ("chain", "antispoof")):
            text = rig.netvm.exec(["nft", "list", kind, fam, "qubes", name]).stdout
            out.append(re.sub(r"counter packets \d+ bytes \d+", "counter", text))
    return out


def test_coexists_with_a_qubes_style_table(rig):
    rig.netvm.exec(["nft", "-f", "-"], input=QUBES_STYLE)
    before = qubes_parts(rig)
    set_dns6(rig)
    for resolv in (FOUR, TWO, V6_ONLY, "# none\n", FOUR):
        res = rig.dnat(resolv=resolv)
        assert res.returncode == 0, res.stderr
        assert qubes_parts(rig) == before
    # with the antispoof in force, the guest's own sources pass and DNS works in both families
    assert rig.answers(f"{DNS1}/udp", f"{DNS6_2}/tcp") == {f"{DNS1}/udp": ANSWER[UP1],
                                                           f"{DNS6_2}/tcp": ANSWER[UP6_2]}
    res = rig.dnat("--remove")
    assert res.returncode == 0, res.stderr
    assert qubes_parts(rig) == before
    assert rig.translations() == [] and rig.translations(6) == []


def test_networkmanager_hook_runs_the_real_command(rig):
    hook = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "etc", "NetworkManager", "dispatcher.d", "qubes-nmhook")
    # the command under test, not whatever a machine has in /opt
    env = dict(rig.env, PATH=f"{os.path.dirname(CMD)}:{rig.env['PATH']}",
               VIF_ROUTE_QUBES_PREFIX=os.path.dirname(os.path.dirname(CMD)))

    def nm(action):  # as NetworkManager calls it: INTERFACE ACTION
        paths = [rig.file(f"hook-resolv.{action}", TWO), ""]
        return rig.netvm.exec(["unshare", "-m", "sh", "-c", MOUNT_AND_RUN, "sh", *paths, hook, "eth0", action],
                              check=False, env=env)

    res = nm("down")  # ignored action
    assert res.returncode == 0 and rig.translations() == []
    for action in ("up", "dhcp4-change"):  # changes, then already right (100 -> 0)
        res = nm(action)
        assert res.returncode == 0 and res.stderr == "", res.stderr
    assert set(rig.answers(*ALL).values()) == {"192.0.2.1", "192.0.2.2"}


def test_a_global_upstream_with_a_zone_is_used_without_it(rig):
    """issue 17 §3: a zone (``%x``) never reaches nft/iptables (they refuse
    it, and every later run would fail with the rules frozen): stripped from a
    global address, the link-local entry skipped, each said on stderr."""
    set_dns6(rig)
    res = rig.dnat(resolv=f"nameserver {UP1}\nnameserver {UP6_1}%xvlan9\nnameserver fe80::1%wlan0\n")
    assert res.returncode == 0, res.stderr
    assert f"{UP6_1}%xvlan9: zone %xvlan9 stripped" in res.stderr
    assert "fe80::1%wlan0" in res.stderr and "link-local, not a DNAT target; skipped" in res.stderr
    assert rig.translations(6) == [(DNS6_1, UP6_1), (DNS6_2, UP6_1)]
    assert rig.answers(f"{DNS6_1}/udp") == {f"{DNS6_1}/udp": ANSWER[UP6_1]}


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_WORDS = st.one_of(
    st.sampled_from([UP1, UP2, UP6_1, UP6_2, "fe80::1%eth0", f"{UP6_1}%x", f"{UP6_2}%25", f"{UP1}%1",
                     "::1", "0.0.0.0", "ff02::1", "::ffff:192.0.2.1", "1.2.3", "300.1.1.1", "::", ""]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
)
_LINES = st.lists(st.one_of(st.builds("nameserver {}".format, _WORDS),
                            st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)),
                  max_size=6)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=_LINES)
def test_any_resolv_conf_gives_rules_the_firewall_accepts(rig, lines):
    """issue 17 §3, property: whatever resolv.conf says, either the rules in
    force become exactly what a run writes (exit 0, or 100 unchanged) or the
    run exits 1 and the rules stay as they were."""
    set_dns6(rig)
    text = "\n".join(lines) + "\n"
    before = rig.state()
    res = rig.dnat(resolv=text)
    assert "Traceback" not in res.stderr, res.stderr
    if res.returncode == 1:
        assert rig.state() == before, res.stderr
        return
    assert res.returncode in (0, 100), res.stderr
    status = rig.dnat("--status", resolv=text)
    assert status.returncode == 0, status.stdout + status.stderr


@pytest.mark.parametrize("only", [4, 6], ids=["ipv4-upstreams-only", "ipv6-upstreams-only"])
def test_a_family_without_upstream_is_refused_at_once(rig, only):
    """issue 18 §5: a guest asking a virtual nameserver of a family with no
    upstream is refused at once (port unreachable for UDP, a reset for TCP),
    so its resolver falls back now, while the other family answers."""
    set_dns6(rig)
    assert rig.dnat(resolv=TWO if only == 4 else f"nameserver {UP6_1}\nnameserver {UP6_2}\n").returncode == 0
    dead, alive = (ALL6, ALL) if only == 4 else (ALL, ALL6)
    t0 = time.monotonic()
    got = rig.answers(*dead, timeout=2.0)
    took = time.monotonic() - t0
    assert got == {t: "refused" for t in dead}, got
    # four queries, each refused without waiting: well under 100 ms each
    assert took < 0.1 * len(dead) + 0.3, took  # + the client's own start
    assert all(r.count(".") == 3 for r in rig.answers(*alive).values())
