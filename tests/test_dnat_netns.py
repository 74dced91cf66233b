"""qubes-setup-dnat-to-ns with real packets, in network namespaces.

A guest (behind vif12.0, configured by the real vif-route-qubes) queries
DNS1/DNS2 through the netvm namespace; the upstream namespace runs small
UDP+TCP DNS servers on 192.168.0.53 and 192.168.0.54 that answer every
query with an address naming the server (192.0.2.1 / 192.0.2.2). The same
program also listens on DNS1/DNS2 themselves (10.139.1.1/.2 on the
upstream's lo, answering 192.0.2.101/.102): a query the netvm forwards
without translating lands there and is counted, which is how "nothing leaks"
is checked.

resolv.conf and systemd-resolved's file are bind-mounted over the real paths
inside a private mount namespace of the command only; the machine's own
files are never touched. Every test runs with iptables-nft and with
iptables-legacy.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from vif_route_qubes.testing.netns import PY, World
from vif_route_qubes.testing.xenstored import XenStored

CMD = os.path.join(os.path.dirname(sys.executable), "qubes-setup-dnat-to-ns")
DNS1, DNS2 = "10.139.1.1", "10.139.1.2"
UP1, UP2 = "192.168.0.53", "192.168.0.54"
ANSWER = {UP1: "192.0.2.1", UP2: "192.0.2.2", DNS1: "192.0.2.101", DNS2: "192.0.2.102"}
LEAKED = {ANSWER[DNS1], ANSWER[DNS2]}

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
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind((addr, 53))
    sel.register(u, selectors.EVENT_READ, ("udp", addr, ip))
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
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
    fam = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    s = socket.socket(socket.AF_INET, fam)
    s.settimeout(timeout)
    try:
        if proto == "udp":
            s.sendto(q, (server, 53))
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
        return "error:" + exc.__class__.__name__
    finally:
        s.close()

timeout, loop = float(sys.argv[1]), float(sys.argv[2])
targets = [t.split("/") for t in sys.argv[3:]]
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
    def __init__(self, world, backend, tmp):
        self.world, self.backend, self.tmp = world, backend, tmp
        self.env = dict(world.env, VIF_ROUTE_QUBES_IPTABLES=backend)
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

    def save(self, counters=False, tables=("filter", "nat")):
        """iptables-save of our two tables (the raw table's anti-spoofing
        counters move with every stray packet of the guest)."""
        text = ""
        for table in tables:
            argv = [f"iptables-{self.backend}-save", "-t", table] + (["-c"] if counters else [])
            text += self.netvm.exec(argv).stdout
        return "\n".join(l for l in text.splitlines() if not l.startswith("#"))

    def nft_handles(self):
        return [self.netvm.exec(["nft", "-a", "list", "table", "ip", t]).stdout for t in ("filter", "nat")]

    def ours(self):
        """Our lines (jumps included) in iptables-save order."""
        return [l for l in self.save().splitlines() if "vrq-dn" in l]

    def query(self, *targets, timeout=2.0, loop=0.0):
        res = self.guest.ns.exec([PY, "-c", DNS_CLIENT, str(timeout), str(loop), *targets])
        return [tuple(line.split()) for line in res.stdout.splitlines()]

    def answers(self, *targets, timeout=2.0):
        return {f"{s}/{p}": r for s, p, r in self.query(*targets, timeout=timeout)}


ALL = [f"{d}/{p}" for d in (DNS1, DNS2) for p in ("udp", "tcp")]


@pytest.fixture(params=["nft", "legacy"])
def rig(request):
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces, iptables)")
    tmp = tempfile.mkdtemp(prefix="vrqdn", dir="/tmp")  # short: AF_UNIX path limit
    xs = XenStored(os.path.join(tmp, "xs.sock"))
    xs.start()
    world = None
    rig = None
    try:
        world = World(xs, tmp)
        rig = Rig(world, request.param, tmp)
        for addr in (UP1, UP2):
            rig.up.ip("addr", "add", f"{addr}/24", "dev", "eth0")
        for addr in (DNS1, DNS2):
            rig.up.ip("addr", "add", f"{addr}/32", "dev", "lo")
        rig.servers = DnsServers(rig.up, [f"{a}={ANSWER[a]}" for a in (UP1, UP2, DNS1, DNS2)])
        rig.guest = world.add_guest(12, ["10.137.0.12"])
        res = world.hotplug(rig.guest, "online", env=rig.guest.env(VIF_ROUTE_QUBES_IPTABLES=request.param))
        assert res.returncode == 0, res.stderr
        rig.guest.configure()
        yield rig
    finally:
        if rig and rig.servers:
            rig.servers.close()
        if world:
            world.close()
        xs.stop()
        shutil.rmtree(tmp, ignore_errors=True)


TWO = f"# written by NetworkManager\nsearch example.org\nnameserver {UP1}\nnameserver {UP2}\n"


def expected_nat(pairs):
    return [f"-A vrq-dnat-dns -d {d}/32 -p {p} -m {p} --dport 53 -m comment --comment DNS{i} "
            f"-j DNAT --to-destination {to}" for i, (d, to) in enumerate(pairs, 1) for p in ("udp", "tcp")]


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
        ("udp", UP1, "10.137.0.12"), ("tcp", UP1, "10.137.0.12"),
        ("udp", UP2, "10.137.0.12"), ("tcp", UP2, "10.137.0.12")}
    assert rig.ours() == [":vrq-dns-guard - [0:0]", "-A FORWARD -j vrq-dns-guard",
                          *[l for l in rig.ours() if l.startswith("-A vrq-dns-guard")],
                          ":vrq-dnat-dns - [0:0]", "-A PREROUTING -j vrq-dnat-dns",
                          *expected_nat([(DNS1, UP1), (DNS2, UP2)])]
    assert rig.dnat(resolv=TWO).returncode == 100


def test_one_upstream_serves_both(rig):
    res = rig.dnat(resolv=f"nameserver {UP2}\n")
    assert res.returncode == 0, res.stderr
    assert set(rig.answers(*ALL).values()) == {"192.0.2.2"}
    assert [l for l in rig.ours() if "DNAT" in l] == expected_nat([(DNS1, UP2), (DNS2, UP2)])


def test_systemd_resolved_stub(rig):
    stub = "# managed by systemd-resolved\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n"
    real = f"# real upstreams\nnameserver {UP2}\nnameserver {UP1}\n"
    res = rig.dnat(resolv=stub, resolved=real)
    assert res.returncode == 0, res.stderr
    assert rig.answers(*ALL) == {f"{DNS1}/udp": "192.0.2.2", f"{DNS1}/tcp": "192.0.2.2",
                                 f"{DNS2}/udp": "192.0.2.1", f"{DNS2}/tcp": "192.0.2.1"}
    status = rig.dnat("--status", resolv=stub, resolved=real)
    assert status.returncode == 0
    assert f"upstream nameservers: {UP2} {UP1} (from systemd-resolved, /run/systemd/resolve/resolv.conf)" \
        in status.stdout
    # the stub alone, without the real file, is no upstream (never loopback)
    assert rig.dnat(resolv=stub).returncode == 0
    assert not [l for l in rig.ours() if "DNAT" in l]


def test_no_upstream_drops_and_nothing_leaks(rig):
    assert rig.dnat(resolv=TWO).returncode == 0
    res = rig.dnat(resolv="nameserver 127.0.0.1\n")  # loopback only: no usable upstream
    assert res.returncode == 0, res.stderr
    assert not [l for l in rig.ours() if "DNAT" in l]
    before = len(rig.servers.queries())
    got = rig.answers(*ALL, timeout=1.0)
    assert got == {t: "timeout" for t in ALL}
    leaked = [q for q in rig.servers.queries(0.5)[before:]]
    assert leaked == []  # neither DNS1/DNS2 nor the upstreams saw anything
    # and back: the first query after an upstream appears is translated
    assert rig.dnat(resolv=TWO).returncode == 0
    assert set(rig.answers(*ALL).values()) == {"192.0.2.1", "192.0.2.2"}


def test_unchanged_rules_exit_100_without_churn(rig):
    assert rig.dnat(resolv=TWO).returncode == 0
    rig.answers(*ALL)  # non-zero counters
    before = rig.save(counters=True)
    handles = rig.nft_handles() if rig.backend == "nft" else None
    for _ in range(3):
        res = rig.dnat(resolv=TWO)
        assert res.returncode == 100, res.stderr
        assert res.stdout == "" and res.stderr == ""
    assert rig.save(counters=True) == before
    # the counters compared are real ones: the 4 queries went through
    assert [l for l in before.splitlines() if "PREROUTING -j vrq-dnat-dns" in l][0].startswith("[4:")
    if handles is not None:
        assert rig.nft_handles() == handles
        assert "# handle" in handles[1] and "dnat to 192.168.0.53" in handles[1]


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
    assert not [l for l in rig.ours() if "DNAT" in l]  # nothing valid: dropped
    assert rig.answers(f"{DNS1}/udp", timeout=1.0) == {f"{DNS1}/udp": "timeout"}
    # one valid line among the garbage is used
    res = rig.dnat("--resolv-conf", rig.file("garbage2", garbage + f"nameserver {UP2}\n".encode()))
    assert res.returncode == 0, res.stderr
    assert set(rig.answers(*ALL).values()) == {"192.0.2.2"}


def test_dns_addresses_missing_everywhere(rig):
    rig.world.xs.rm("/local/domain/0/qubes_netvm_primary_dns")
    rig.world.xs.rm("/local/domain/0/qubes_netvm_secondary_dns")
    res = rig.dnat("--qubes-ns", os.path.join(rig.tmp, "absent"), resolv=TWO)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "no DNS1/DNS2 address" in res.stderr, res.stderr
    assert rig.ours() == []
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
    ours = rig.ours()
    assert ours.count("-A PREROUTING -j vrq-dnat-dns") == 1
    assert ours.count("-A FORWARD -j vrq-dns-guard") == 1
    assert [l for l in ours if "DNAT" in l] == expected_nat([(DNS1, UP1), (DNS2, UP2)])
    assert len([l for l in ours if l.startswith("-A vrq-dns-guard")]) == 4


def test_duplicate_jump_is_repaired(rig):
    assert rig.dnat(resolv=TWO).returncode == 0
    rig.netvm.exec([f"iptables-{rig.backend}", "-w", "-t", "nat", "-A", "PREROUTING", "-j", "vrq-dnat-dns"])
    assert rig.dnat(resolv=TWO).returncode == 0
    assert rig.ours().count("-A PREROUTING -j vrq-dnat-dns") == 1
    assert rig.dnat(resolv=TWO).returncode == 100


def test_dry_run_changes_nothing(rig):
    before = rig.save()
    res = rig.dnat("--dry-run", resolv=TWO)
    assert res.returncode == 0, res.stderr
    assert rig.save() == before
    assert f"# upstream nameservers: {UP1} {UP2} (from /etc/resolv.conf)" in res.stdout
    assert f"$ iptables-{rig.backend}-restore --noflush --wait 20 <<'EOF'" in res.stdout
    for line in expected_nat([(DNS1, UP1), (DNS2, UP2)]) + ["-I PREROUTING 1 -j vrq-dnat-dns", "*nat"]:
        assert line in res.stdout.splitlines()
    assert rig.dnat(resolv=TWO).returncode == 0
    res = rig.dnat("-n", resolv=TWO)
    assert res.returncode == 100 and "already right" in res.stdout


def test_status(rig):
    res = rig.dnat("--status", resolv=TWO)
    assert res.returncode == 0, res.stderr
    assert f"DNS1: {DNS1} (from XenStore qubes_netvm_primary_dns)" in res.stdout
    assert "(chain vrq-dnat-dns does not exist)" in res.stdout
    assert "state: out of date" in res.stdout
    rig.dnat(resolv=TWO)
    res = rig.dnat("--status", resolv=TWO)
    assert res.returncode == 0
    lines = [l.strip() for l in res.stdout.splitlines()]
    assert f"DNS2: {DNS2} (from XenStore qubes_netvm_secondary_dns)" in lines
    assert f"upstream nameservers: {UP1} {UP2} (from /etc/resolv.conf)" in lines
    assert "-A PREROUTING -j vrq-dnat-dns" in lines and "-A FORWARD -j vrq-dns-guard" in lines
    assert all(l in lines for l in expected_nat([(DNS1, UP1), (DNS2, UP2)]))
    assert lines[-1] == "state: up to date"


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
    assert res.returncode == 0 and rig.ours() == []
    for action in ("up", "dhcp4-change"):  # changes, then already right (100 -> 0)
        res = nm(action)
        assert res.returncode == 0 and res.stderr == "", res.stderr
    assert set(rig.answers(*ALL).values()) == {"192.0.2.1", "192.0.2.2"}
