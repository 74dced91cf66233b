"""qubes-setup-ip inside a guest, issue 11 item 5 and issue 12: what the
guest side does against a hostile or unusual world, with the real ``ip``,
real packets and (where it can run here) the real systemd-resolved.

* the gateway's MAC is pinned: a forged ARP reply from another host on the
  link is ignored, traffic keeps going to the real gateway (and the same
  forgery does work without the pin: the test's attack is a real one);
* the per-guest switches (``disable-default-route``, ``disable-dns-server``,
  ``disable-gateway-mac-pin``) and converging when they change;
* ``remove`` leaves the link down with nothing of ours on it, and a packet
  the guest sends then goes nowhere;
* ``/etc/resolv.conf`` as a mount point (``unshare -m`` + bind mount, and
  ``ip netns exec`` with ``/etc/netns/NAME/resolv.conf``) is written in
  place; a read-only one fails before the network is touched;
* systemd-resolved: the real daemon on a private D-Bus, in a private mount
  namespace (tmpfs over ``/run/systemd``) inside the guest's network
  namespace; a query through its stub reaches DNS1;
* the systemd unit and the udev rule: ``systemd-analyze verify`` and that
  the rule pulls in that unit.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest

from vif_route_qubes import setup_ip as S
from tests.rigs import resolved as resolved_rig
from tests.rigs.netns import Netns, UdpSink, udp_send
from tests.rigs.xenstored import XenStored

GUEST_DOMID = 12
BIN = os.path.dirname(sys.executable)
SCRIPT = os.path.join(BIN, "qubes-setup-ip")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

GUEST_IP, GATEWAY, DNS1, DNS2 = "10.137.0.12", "10.137.0.1", "10.139.1.1", "10.139.1.2"
GUEST_MAC, ATTACKER_MAC = "00:16:3e:5e:00:0c", "00:16:3e:66:66:66"
OUTSIDE = "192.0.2.7"  # "the internet": held by the gateway (and by the attacker)
GUEST_IP6, GATEWAY6 = "fd09:24ef:4179::a89:c", "fd09:24ef:4179::a89:1"
GOOD = {
    "qubes_ip": GUEST_IP, "qubes_netmask": "255.255.255.255", "qubes_gateway": GATEWAY,
    "qubes_primary_dns": DNS1, "qubes_secondary_dns": DNS2,
}



@pytest.fixture(autouse=True)
def _root():
    # like every namespace test: fail, never skip, when it cannot run
    if os.geteuid() != 0:
        pytest.fail("these tests need root (network namespaces)")


@pytest.fixture
def xenstored(sockdir):
    server = XenStored(os.path.join(sockdir, "xs.sock"), domid=GUEST_DOMID).start()
    try:
        yield server
    finally:
        server.stop()


def put(server, **keys):
    for key, value in keys.items():
        path = f"/local/domain/{GUEST_DOMID}/{key}"
        if value is None:
            server.rm(path)
        else:
            server.write(path, value)


@pytest.fixture
def env(xenstored, tmp_path):
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "XENSTORED_PATH": xenstored.socket_path,
        "VIF_ROUTE_QUBES_SYSLOG": str(tmp_path / "no-syslog"),
        "VIF_ROUTE_QUBES_HOTPLUG_LOG": str(tmp_path / "no-such-dir" / "xen-hotplug.log"),
        "VIF_ROUTE_QUBES_XS_TIMEOUT": "5",
        "QUBES_SETUP_IP_HOOK": "",
    }


class Link:
    """A guest, its gateway (MAC fe:ff:ff:ff:ff:ff, as netback's vif has)
    and an attacker, all on one Ethernet segment (a bridge in a fourth
    namespace). The gateway and the attacker both hold ``OUTSIDE``: whoever
    the guest's frames are addressed to receives a datagram sent there."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.namespaces = []
        try:
            self.sw = self._ns(f"sip{tag}-sw")
            self.guest = self._ns(f"sip{tag}-g")
            self.gw = self._ns(f"sip{tag}-gw")
            self.attacker = self._ns(f"sip{tag}-x")
            self.sw.ip("link", "add", "br0", "type", "bridge")
            self.sw.ip("link", "set", "br0", "up")
            for port, ns, ifname, mac in (("pg", self.guest, "eth0", GUEST_MAC),
                                          ("pgw", self.gw, "gw0", S.GATEWAY_MAC),
                                          ("px", self.attacker, "x0", ATTACKER_MAC)):
                self.sw.ip("link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns.name)
                self.sw.ip("link", "set", port, "master", "br0", "up")
                ns.ip("link", "set", ifname, "address", mac)
            self.gw.ip("addr", "add", f"{GATEWAY}/32", "dev", "gw0")
            self.gw.ip("-6", "addr", "add", f"{GATEWAY6}/128", "dev", "gw0", "nodad")
            self.gw.ip("link", "set", "gw0", "up")
            self.gw.ip("route", "add", f"{GUEST_IP}/32", "dev", "gw0")
            self.attacker.ip("addr", "add", "10.137.0.66/32", "dev", "x0")
            self.attacker.ip("link", "set", "x0", "up")
            self.attacker.ip("route", "add", f"{GUEST_IP}/32", "dev", "x0")
            for ns in (self.gw, self.attacker):
                ns.ip("addr", "add", f"{OUTSIDE}/32", "dev", "lo")
        except BaseException:
            self.close()
            raise

    def _ns(self, name):
        ns = Netns(name)
        self.namespaces.append(ns)
        return ns

    def close(self):
        for ns in reversed(self.namespaces):
            ns.delete()


@pytest.fixture
def link():
    w = Link()
    try:
        yield w
    finally:
        w.close()


def setup_ip(ns, env, *args):
    return ns.exec([SCRIPT, *args], env=env, check=False)


def neighbour(ns, addr, dev="eth0"):
    return ns.ip("neigh", "show", addr, "dev", dev).stdout.strip()


# A forged ARP reply, "GATEWAY is at ATTACKER_MAC", unicast to the guest,
# sent from the attacker's interface as a raw Ethernet frame, repeatedly
# for longer than the kernel's neighbour locktime (1 s), so that an entry
# that can be overridden is overridden.
FORGE = r"""
import socket, struct, sys, time
ifname, src_mac, dst_mac, spoofed_ip, target_ip, seconds = sys.argv[1:7]
mac = lambda m: bytes.fromhex(m.replace(":", ""))
ip = socket.inet_aton
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
frame = (mac(dst_mac) + mac(src_mac) + struct.pack("!H", 0x0806)
         + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2)
         + mac(src_mac) + ip(spoofed_ip) + mac(dst_mac) + ip(target_ip))
end = time.monotonic() + float(seconds)
n = 0
while time.monotonic() < end:
    s.send(frame)
    n += 1
    time.sleep(0.1)
print(n)
"""


def forge_arp(link, seconds=1.6):
    res = link.attacker.exec([PY, "-c", FORGE, "x0", ATTACKER_MAC, GUEST_MAC, GATEWAY, GUEST_IP, str(seconds)])
    assert int(res.stdout) > 5


def test_pinned_gateway_ignores_forged_arp(xenstored, env, link, tmp_path):
    put(xenstored, **GOOD)
    res = setup_ip(link.guest, env, "--resolv-conf", str(tmp_path / "r"), "eth0")
    assert res.returncode == 0, res.stderr
    assert neighbour(link.guest, GATEWAY) == f"{GATEWAY} lladdr {S.GATEWAY_MAC} PERMANENT"
    assert link.guest.ip("-d", "link", "show", "eth0").stdout.count(" group 1 ") == 1
    with UdpSink(link.gw, OUTSIDE, 9999) as real, UdpSink(link.attacker, OUTSIDE, 9999) as fake:
        assert udp_send(link.guest, OUTSIDE, 9999, "before").returncode == 0
        assert real.got("before", 3)
        forge_arp(link)
        assert neighbour(link.guest, GATEWAY) == f"{GATEWAY} lladdr {S.GATEWAY_MAC} PERMANENT"
        assert udp_send(link.guest, OUTSIDE, 9999, "after").returncode == 0
        assert real.got("after", 3)
        assert fake.collect(0.3) == []  # the attacker saw nothing, before or after


def test_without_the_pin_the_same_forgery_redirects_traffic(xenstored, env, link, tmp_path):
    """The control for the test above: with disable-gateway-mac-pin the
    guest learns the gateway by ARP, and the forged replies take it over.
    (So the pin, not a weakness of the attack, is what stops it.)"""
    put(xenstored, **GOOD, **{"disable-gateway-mac-pin": "1"})
    res = setup_ip(link.guest, env, "--resolv-conf", str(tmp_path / "r"), "eth0")
    assert res.returncode == 0, res.stderr
    with UdpSink(link.gw, OUTSIDE, 9999) as real, UdpSink(link.attacker, OUTSIDE, 9999) as fake:
        assert udp_send(link.guest, OUTSIDE, 9999, "before").returncode == 0
        assert real.got("before", 3)
        assert "PERMANENT" not in neighbour(link.guest, GATEWAY)
        forge_arp(link)
        assert ATTACKER_MAC in neighbour(link.guest, GATEWAY)
        assert udp_send(link.guest, OUTSIDE, 9999, "after").returncode == 0
        assert fake.got("after", 3)


def test_pin_switch_converges_and_ipv6_gateway_is_pinned(xenstored, env, link, tmp_path):
    put(xenstored, **GOOD, qubes_ip6=GUEST_IP6, qubes_gateway6=GATEWAY6)
    r = str(tmp_path / "r")
    assert setup_ip(link.guest, env, "--resolv-conf", r).returncode == 0
    assert neighbour(link.guest, GATEWAY6) == f"{GATEWAY6} lladdr {S.GATEWAY_MAC} PERMANENT"
    # a changed gateway leaves neither a pin nor a host route for the old one
    put(xenstored, qubes_gateway="10.137.0.2")
    assert setup_ip(link.guest, env, "--resolv-conf", r).returncode == 0
    perm = link.guest.ip("neigh", "show", "nud", "permanent", "dev", "eth0").stdout
    assert sorted(x.strip() for x in perm.splitlines()) == sorted([
        f"10.137.0.2 lladdr {S.GATEWAY_MAC} PERMANENT", f"{GATEWAY6} lladdr {S.GATEWAY_MAC} PERMANENT"])
    routes = [x.strip() for x in link.guest.ip("route", "show", "dev", "eth0").stdout.splitlines()]
    assert sorted(routes) == ["10.137.0.2 scope link", "default via 10.137.0.2 onlink"]
    # the option switches pinning off: both entries go, the routes stay
    res = setup_ip(link.guest, env, "--no-pin-gateway-mac", "--resolv-conf", r)
    assert res.returncode == 0, res.stderr
    assert "PERMANENT" not in link.guest.ip("neigh", "show", "dev", "eth0").stdout
    routes = [x.strip() for x in link.guest.ip("route", "show", "dev", "eth0").stdout.splitlines()]
    assert sorted(routes) == ["10.137.0.2 scope link", "default via 10.137.0.2 onlink"]
    assert f"default via {GATEWAY6} dev eth0" in link.guest.ip("-6", "route", "show").stdout
    # and back on
    assert setup_ip(link.guest, env, "--resolv-conf", r).returncode == 0
    assert neighbour(link.guest, "10.137.0.2") == f"10.137.0.2 lladdr {S.GATEWAY_MAC} PERMANENT"
    # someone else's permanent entry (another MAC) is left alone
    link.guest.ip("neigh", "replace", "10.137.0.99", "lladdr", ATTACKER_MAC, "nud", "permanent", "dev", "eth0")
    res = setup_ip(link.guest, env, "-v", "--resolv-conf", r)
    assert "unchanged" in res.stderr
    assert "10.137.0.99" in link.guest.ip("neigh", "show", "nud", "permanent", "dev", "eth0").stdout


# ----------------------------------------------------------------------------
# Switches


def test_disable_default_route(xenstored, env, link, tmp_path):
    put(xenstored, **GOOD, qubes_ip6=GUEST_IP6, qubes_gateway6=GATEWAY6)
    r = str(tmp_path / "r")
    assert setup_ip(link.guest, env, "--resolv-conf", r).returncode == 0
    assert link.guest.ip("route", "show", "default").stdout.strip()
    put(xenstored, **{"disable-default-route": "1"})
    res = setup_ip(link.guest, env, "--resolv-conf", r)
    assert res.returncode == 0, res.stderr
    assert link.guest.ip("route", "show", "default").stdout == ""
    assert link.guest.ip("-6", "route", "show", "default").stdout == ""
    assert f"{GATEWAY} dev eth0 scope link" in link.guest.ip("route", "show").stdout
    assert f"{GATEWAY6} dev eth0" in link.guest.ip("-6", "route", "show").stdout
    # a real packet: the gateway itself is reachable, the outside is not
    with UdpSink(link.gw, GATEWAY, 9998) as gw, UdpSink(link.gw, OUTSIDE, 9999) as out:
        assert udp_send(link.guest, GATEWAY, 9998, "to-gw").returncode == 0
        assert gw.got("to-gw", 3)
        sent = udp_send(link.guest, OUTSIDE, 9999, "to-outside")
        assert sent.returncode != 0 and "Network is unreachable" in sent.stderr
        assert out.collect(0.3) == []
    # quiet re-run, then back: the default routes return
    assert "unchanged" in setup_ip(link.guest, env, "-v", "--resolv-conf", r).stderr
    put(xenstored, **{"disable-default-route": "0"})
    assert setup_ip(link.guest, env, "--resolv-conf", r).returncode == 0
    assert link.guest.ip("route", "show", "default").stdout.startswith(f"default via {GATEWAY} dev eth0")


def test_disable_dns_server_leaves_resolv_conf_alone(xenstored, env, link, tmp_path):
    put(xenstored, **GOOD, **{"disable-dns-server": "1"})
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53  # the administrator's own\n")
    res = setup_ip(link.guest, env, "-v", "--resolv-conf", str(resolv))
    assert res.returncode == 0, res.stderr
    assert "disable-dns-server is set: resolv.conf and systemd-resolved left alone" in res.stderr
    assert resolv.read_text() == "nameserver 192.0.2.53  # the administrator's own\n"
    assert f"inet {GUEST_IP}/32" in link.guest.ip("-o", "addr", "show", "dev", "eth0").stdout
    put(xenstored, **{"disable-dns-server": "maybe"})
    res = setup_ip(link.guest, env, "--resolv-conf", str(resolv))
    assert res.returncode == 1
    assert res.stderr == "qubes-setup-ip: XenStore disable-dns-server: 'maybe' is not a switch value (1 or 0)\n"


def test_ipv6_nameservers_after_the_ipv4_ones(xenstored, env, link, tmp_path):
    put(xenstored, **GOOD, qubes_ip6=GUEST_IP6, qubes_gateway6=GATEWAY6,
        qubes_primary_dns6="fd09:24ef:4179::a89:53", qubes_secondary_dns6="fd09:24ef:4179::a89:54")
    resolv = tmp_path / "resolv.conf"
    assert setup_ip(link.guest, env, "--resolv-conf", str(resolv)).returncode == 0
    assert resolv.read_text().splitlines()[1:] == [
        f"nameserver {DNS1}", f"nameserver {DNS2}",
        "nameserver fd09:24ef:4179::a89:53", "nameserver fd09:24ef:4179::a89:54"]
    # IPv6 off on the interface: neither the address nor the IPv6 servers
    link.guest.sysctl("net.ipv6.conf.eth0.disable_ipv6", 1)
    assert setup_ip(link.guest, env, "--resolv-conf", str(resolv)).returncode == 0
    assert resolv.read_text().splitlines()[1:] == [f"nameserver {DNS1}", f"nameserver {DNS2}"]


# ----------------------------------------------------------------------------
# remove


def snapshot(ns):
    return {
        "links": ns.ip("-o", "-d", "link", "show", "dev", "eth0").stdout,
        "addrs": ns.ip("-o", "addr", "show", "dev", "eth0").stdout,
        "routes": ns.ip("route", "show", "table", "all", "dev", "eth0").stdout,
        "routes6": ns.ip("-6", "route", "show", "table", "all", "dev", "eth0").stdout,
        "neigh": ns.ip("neigh", "show", "nud", "permanent", "dev", "eth0").stdout,
    }


@pytest.mark.parametrize("keep_addr_on_down", [0, 1])
def test_remove_takes_the_link_down_and_forgets_everything(xenstored, env, link, tmp_path, keep_addr_on_down):
    put(xenstored, **GOOD, qubes_ip6=GUEST_IP6, qubes_gateway6=GATEWAY6)
    link.guest.sysctl("net.ipv6.conf.eth0.keep_addr_on_down", keep_addr_on_down)
    assert setup_ip(link.guest, env, "--resolv-conf", str(tmp_path / "r"), "eth0").returncode == 0
    with UdpSink(link.gw, OUTSIDE, 9999) as out:
        assert udp_send(link.guest, OUTSIDE, 9999, "up").returncode == 0
        assert out.got("up", 3)
        res = setup_ip(link.guest, env, "-v", "remove", "eth0")
        assert res.returncode == 0, res.stderr
        assert "eth0: removed" in res.stderr
        snap = snapshot(link.guest)
        assert ",UP" not in snap["links"] and " group default " in snap["links"]
        assert " inet " not in snap["addrs"]
        assert "scope global" not in snap["addrs"]
        assert snap["routes"] == "" and snap["neigh"] == ""
        assert all("fe80::" in line for line in snap["routes6"].splitlines())
        sent = udp_send(link.guest, OUTSIDE, 9999, "after-remove")
        assert sent.returncode != 0 and "Network is unreachable" in sent.stderr
        assert not out.got("after-remove", 0.5)
    # remove again (the unit stopped twice, or the interface re-added down):
    # nothing to do, still success
    assert setup_ip(link.guest, env, "remove", "eth0").returncode == 0
    # add after remove brings everything back
    assert setup_ip(link.guest, env, "--resolv-conf", str(tmp_path / "r"), "add", "eth0").returncode == 0
    assert neighbour(link.guest, GATEWAY) == f"{GATEWAY} lladdr {S.GATEWAY_MAC} PERMANENT"


def test_remove_of_a_gone_interface_is_success(xenstored, env, link):
    res = setup_ip(link.guest, dict(env, INTERFACE="eth9"), "-v", "remove")
    assert res.returncode == 0, res.stderr
    assert "eth9: gone, nothing left to remove" in res.stderr


def test_remove_dry_run_prints_and_changes_nothing(xenstored, env, link, tmp_path):
    put(xenstored, **GOOD)
    assert setup_ip(link.guest, env, "--resolv-conf", str(tmp_path / "r")).returncode == 0
    before = snapshot(link.guest)
    res = setup_ip(link.guest, env, "--dry-run", "remove", "eth0")
    assert res.returncode == 0, res.stderr
    assert "$ ip -batch - <<'EOF'\n" + "".join(x + "\n" for x in S.render_remove("eth0")) + "EOF\n" in res.stdout
    assert snapshot(link.guest) == before


def test_usage_errors_exit_2(env):
    for args in (["--no-such-option"], ["add", "eth0", "extra"], ["eth0", "eth1"]):
        res = subprocess.run([SCRIPT, *args], env=env, capture_output=True, text=True)
        assert res.returncode == 2, (args, res.stderr)
        assert "Usage:" in res.stderr


# ----------------------------------------------------------------------------
# Dry runs leave no trace in syslog


def test_dry_run_logs_nothing_to_syslog(xenstored, env, link, tmp_path, sockdir):
    """A stand-in syslog (a datagram socket, drained by a thread as a real
    daemon would: a full queue would block the sender) sees nothing from
    dry runs, and the real run's lines."""
    import socket
    import threading

    put(xenstored, **GOOD)
    path = os.path.join(sockdir, "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    received = []

    def drain():
        while True:
            try:
                received.append(sock.recv(4096).decode())
            except OSError:
                return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        env = dict(env, VIF_ROUTE_QUBES_SYSLOG=path)
        res = setup_ip(link.guest, env, "--dry-run", "-v", "--resolv-conf", str(tmp_path / "r"))
        assert res.returncode == 0, res.stderr
        assert "ip -batch" in res.stdout and "debug:" in res.stderr  # it did have things to say
        res = setup_ip(link.guest, env, "--dry-run", "remove")
        assert res.returncode == 0, res.stderr
        res = setup_ip(link.guest, env, "--resolv-conf", str(tmp_path / "r"))
        assert res.returncode == 0, res.stderr
        import time

        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not any("eth0: configured" in d for d in received):
            time.sleep(0.05)
        # everything that arrived came from the real run (its pid), none
        # from the two dry runs before it
        pids = {d.split("[", 1)[1].split("]", 1)[0] for d in received}
        assert len(pids) == 1, received
        assert any("eth0: configured 10.137.0.12/32" in d for d in received)
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        reader.join(2)


# ----------------------------------------------------------------------------
# resolv.conf as a mount point


def _in_mount_ns(ns, script, env):
    """Run a shell script inside ``ns``'s network namespace and a private
    mount namespace of its own (so its mounts vanish with it)."""
    return ns.exec(["unshare", "-m", "--propagation", "private", "sh", "-ec", script], env=env, check=False)


def test_bind_mounted_resolv_conf_is_written_in_place(xenstored, env, link, tmp_path):
    put(xenstored, **GOOD)
    source = tmp_path / "container-resolv.conf"
    source.write_text("nameserver 192.0.2.53\n")
    target = tmp_path / "etc" / "resolv.conf"
    target.parent.mkdir()
    target.write_text("# the file under the mount\n")
    script = textwrap.dedent(f"""
        mount --bind {source} {target}
        stat -c %i {target}
        {SCRIPT} -v --resolv-conf {target} eth0
        stat -c %i {target}
        ls -A {target.parent}
    """)
    res = _in_mount_ns(link.guest, script, env)
    assert res.returncode == 0, res.stderr
    out = res.stdout.split()
    assert out[0] == out[1] == str(source.stat().st_ino)  # the same file, written in place
    assert out[2:] == ["resolv.conf"]  # no temporary file left behind
    assert f"{target} written (in place)" in res.stderr
    assert source.read_text() == S.render_resolv(S.guest_net(dict(dict.fromkeys(S.KEYS), **GOOD)))
    assert target.read_text() == "# the file under the mount\n"  # outside the namespace: untouched
    # a second run inside a mount namespace again: unchanged, not rewritten
    res = _in_mount_ns(link.guest, f"mount --bind {source} {target}\n{SCRIPT} -v --resolv-conf {target}\n", env)
    assert res.returncode == 0 and "unchanged" in res.stderr, res.stderr


# The mount table did not predict the mount point (here: the check is
# made to say no): the refused rename falls back to the descriptor opened
# beforehand, and the file is still written in place.
UNPREDICTED = r"""
import subprocess, sys
from vif_route_qubes import files as F
source, target = sys.argv[1:3]
subprocess.run(["mount", "--bind", source, target], check=True)
F.is_mount_point = lambda path: False
print(F.write_file(F.System(), target, "nameserver 10.139.1.1\n"))
"""


def test_refused_rename_falls_back_to_in_place(link, tmp_path):
    source = tmp_path / "source.conf"
    source.write_text("nameserver 192.0.2.53\n")
    target = tmp_path / "resolv.conf"
    target.write_text("")
    res = link.guest.exec(["unshare", "-m", "--propagation", "private", PY, "-c", UNPREDICTED,
                           str(source), str(target)], check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "in place"
    assert source.read_text() == "nameserver 10.139.1.1\n"
    assert sorted(os.listdir(tmp_path)) == ["resolv.conf", "source.conf"]  # no temporary file left


def test_read_only_bind_mount_fails_before_the_network_is_touched(xenstored, env, link, tmp_path):
    put(xenstored, **GOOD)
    source = tmp_path / "ro-resolv.conf"
    source.write_text("nameserver 192.0.2.53\n")
    target = tmp_path / "resolv.conf"
    target.write_text("")
    before = snapshot(link.guest)
    script = f"mount --bind {source} {target}\nmount -o remount,bind,ro {target}\n{SCRIPT} --resolv-conf {target}\n"
    res = _in_mount_ns(link.guest, script, env)
    assert res.returncode == 1
    assert res.stderr == (f"qubes-setup-ip: cannot write {target} (a mount point, written in place): "
                          "Read-only file system\n")
    assert snapshot(link.guest) == before
    assert source.read_text() == "nameserver 192.0.2.53\n"


def test_ip_netns_exec_resolv_conf(xenstored, env, link):
    """``ip netns exec NAME`` bind-mounts /etc/netns/NAME/resolv.conf over
    /etc/resolv.conf: the default path is a mount point there. The host's
    own /etc/resolv.conf must not change (checked), and the run refuses to
    go on unless the bind mount is really in place."""
    put(xenstored, **GOOD)
    host = "/etc/resolv.conf"
    host_before = (os.lstat(host).st_ino, open(host, "rb").read()) if os.path.lexists(host) else None
    netns_dir = f"/etc/netns/{link.guest.name}"
    os.makedirs(netns_dir)
    try:
        with open(f"{netns_dir}/resolv.conf", "w") as f:
            f.write("nameserver 192.0.2.53\n")
        res = link.guest.exec(["sh", "-ec", f"mountpoint -q /etc/resolv.conf || exit 99\nexec {SCRIPT} eth0"],
                              env=env, check=False)
        assert res.returncode == 0, res.stderr
        with open(f"{netns_dir}/resolv.conf") as f:
            assert f.read().splitlines()[1:] == [f"nameserver {DNS1}", f"nameserver {DNS2}"]
    finally:
        shutil.rmtree(netns_dir, ignore_errors=True)
        try:
            os.rmdir("/etc/netns")
        except OSError:
            pass
    host_after = (os.lstat(host).st_ino, open(host, "rb").read()) if os.path.lexists(host) else None
    assert host_after == host_before


# ----------------------------------------------------------------------------
# systemd-resolved, the real one

@pytest.fixture
def have_resolved():
    """The real daemon or a failure that says what is missing: never a skip
    (tests/install-packages installs it, keeping the host's resolv.conf)."""
    try:
        resolved_rig.binary()
    except resolved_rig.ResolvedUnavailable as exc:
        pytest.fail(str(exc))


# A minimal DNS client: query NAME (type A) at SERVER, print the answers.
DIG = r"""
import random, socket, struct, sys
server, name = sys.argv[1], sys.argv[2]
qid = random.randrange(65536)
q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(q, (server, 53))
data = s.recv(4096)
an = struct.unpack(">H", data[6:8])[0]
i = 12
while data[i]:
    i += data[i] + 1
i += 5
out = []
for _ in range(an):
    i += 2 if data[i] & 0xC0 == 0xC0 else len(data[i:].split(b"\0")[0]) + 1
    rtype, _, _, rdlen = struct.unpack(">HHIH", data[i:i + 10])
    i += 10
    if rtype == 1:
        out.append(socket.inet_ntoa(data[i:i + 4]))
    i += rdlen
print(" ".join(out))
"""

RESPONDER = os.path.join(ROOT, "tests", "e2e", "dom0", "dns_responder.py")


# The steps (argv lists) one by one in the guest's network namespace,
# inside resolved's private mount namespace (its /run/systemd: the host's
# stays untouched) and on its bus; [argv, returncode, stdout, stderr] each.
# resolved.conf: no global or fallback servers, the stub listener on.
def _steps(link, env, steps, tmp_path):
    with resolved_rig.Resolved(link.guest, resolved_rig.config(), env=env) as resolved:
        results = []
        for argv in steps:
            res = resolved.run(argv, timeout=60)
            results.append([argv, res.returncode, res.stdout, res.stderr])
        return results


# The stand-in pins down the exact calls, which the real daemon's tests
# cannot observe from outside. What stands in: for "resolved is running", a listener
# on /run/systemd/resolve/io.systemd.Resolve (on a private tmpfs); for
# resolved itself, a ``resolvectl`` first on PATH that records its argv.
# It shows what qubes-setup-ip asks for and when; that resolved then
# answers through its stub is the real-resolved test's part.
STANDIN = r"""
import os, socket, subprocess, sys, threading
steps = sys.argv[1:]
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run/systemd"], check=True)
os.makedirs("/run/systemd/resolve")
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind("/run/systemd/resolve/io.systemd.Resolve")
srv.listen(8)
def serve():
    while True:
        conn, _ = srv.accept()
        conn.close()
threading.Thread(target=serve, daemon=True).start()
for step in steps:
    res = subprocess.run(step.split("\x1f"), capture_output=True, text=True)
    print(res.returncode, repr(res.stderr), flush=True)
"""

RESOLVECTL = """#!/bin/sh
# stand-in resolvectl: records its argv, one line per call
printf '%s\\n' "$*" >> {log}
"""


def test_resolved_hand_off_with_a_stand_in(xenstored, env, link, tmp_path):
    put(xenstored, **GOOD, qubes_ip6=GUEST_IP6, qubes_gateway6=GATEWAY6,
        qubes_primary_dns6="fd09:24ef:4179::a89:53")
    bindir, calls = tmp_path / "bin", tmp_path / "resolvectl.calls"
    bindir.mkdir()
    (bindir / "resolvectl").write_text(RESOLVECTL.format(log=calls))
    (bindir / "resolvectl").chmod(0o755)
    stub = tmp_path / "stub-resolv.conf"
    stub.symlink_to("/run/systemd/resolve/stub-resolv.conf")
    plain = tmp_path / "resolv.conf"
    plain.write_text("nameserver 192.0.2.53\n")
    env = dict(env, PATH=f"{bindir}:{env['PATH']}")
    sep = "\x1f"
    steps = [sep.join([SCRIPT, "-v", "--resolv-conf", str(stub), "eth0"]),
             sep.join([SCRIPT, "--resolv-conf", str(plain), "eth0"]),
             sep.join([SCRIPT, "remove", "eth0"])]
    res = link.guest.exec(["unshare", "-m", "--propagation", "private", PY, "-c", STANDIN, *steps],
                          env=env, check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    codes = [line.split(" ", 1) for line in res.stdout.splitlines()]
    assert [c for c, _ in codes] == ["0", "0", "0"], codes
    assert "also to systemd-resolved" in codes[0][1]
    assert stub.is_symlink()  # resolved's stub is left as it is
    assert plain.read_text().splitlines()[1:] == [
        f"nameserver {DNS1}", f"nameserver {DNS2}", "nameserver fd09:24ef:4179::a89:53"]
    assert calls.read_text().splitlines() == [
        f"dns eth0 {DNS1} {DNS2} fd09:24ef:4179::a89:53",
        f"dns eth0 {DNS1} {DNS2} fd09:24ef:4179::a89:53",  # every run: resolved may have restarted
        "revert eth0",
    ]
    # without resolved running (no listener: the host's /run), resolvectl
    # is never called and resolv.conf is written as always
    calls.unlink()
    assert setup_ip(link.guest, env, "--resolv-conf", str(plain), "eth0").returncode == 0
    assert not calls.exists()
    # disable-dns-server: resolved is not asked either
    put(xenstored, **{"disable-dns-server": "1"})
    res = link.guest.exec(["unshare", "-m", "--propagation", "private", PY, "-c", STANDIN,
                           sep.join([SCRIPT, "--resolv-conf", str(plain), "eth0"])], env=env, check=False)
    assert res.returncode == 0 and res.stdout.startswith("0 "), res.stdout + res.stderr
    assert not calls.exists()


def test_real_resolved_gets_the_servers_and_the_stub_reaches_dns1(have_resolved, xenstored, env, link, tmp_path):
    """With resolved running, qubes-setup-ip hands DNS1/DNS2 to it for eth0
    (resolvectl dns), and leaves a resolv.conf that points at resolved's
    stub alone; a query through the stub 127.0.0.53 then arrives at DNS1
    from the guest's address and the answer comes back."""
    put(xenstored, **GOOD)
    link.gw.ip("addr", "add", f"{DNS1}/32", "dev", "lo")
    link.gw.ip("addr", "add", f"{DNS2}/32", "dev", "lo")
    responder = link.gw.popen([PY, "-u", RESPONDER, DNS1, "192.0.2.123"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        assert responder.stdout.readline().startswith("dns responder on")
        resolv = tmp_path / "resolv.conf"
        resolv.symlink_to("/run/systemd/resolve/stub-resolv.conf")
        steps = [
            [SCRIPT, "-v", "--resolv-conf", str(resolv), "eth0"],
            ["resolvectl", "dns", "eth0"],
            [PY, "-c", DIG, "127.0.0.53", "guest-query.example"],
            [SCRIPT, "-v", "remove", "eth0"],
            ["resolvectl", "dns", "eth0"],
        ]
        results = _steps(link, env, steps, tmp_path)
    finally:
        responder.terminate()
        log = responder.communicate()[0]
    (_, rc, _, err), (_, _, dns, _), (_, qrc, answer, qerr), (_, rrc, _, rerr), (_, _, after, _) = results
    assert rc == 0, err
    assert "also to systemd-resolved" in err
    assert "points into /run/systemd/resolve/: resolved serves it, not rewritten" in err
    assert resolv.is_symlink()  # the stub stays
    assert dns.split() == ["Link", "3", "(eth0):", DNS1, DNS2] or dns.split()[-2:] == [DNS1, DNS2], dns
    assert qrc == 0 and answer.split() == ["192.0.2.123"], qerr
    assert f"dns query from {GUEST_IP} for guest-query.example type 1" in log
    assert rrc == 0 and "resolved's servers for it reverted" in rerr, rerr
    assert DNS1 not in after


def test_real_resolved_with_a_plain_resolv_conf_and_the_dns_switch(have_resolved, xenstored, env, link, tmp_path):
    """A plain resolv.conf is still written when resolved runs (a guest
    that does not use the stub); disable-dns-server leaves both alone."""
    put(xenstored, **GOOD, qubes_ip6=GUEST_IP6, qubes_gateway6=GATEWAY6,
        qubes_primary_dns6="fd09:24ef:4179::a89:53")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    other = tmp_path / "other.conf"
    other.write_text("nameserver 192.0.2.54\n")
    results = _steps(link, env, [
        [SCRIPT, "--resolv-conf", str(resolv), "eth0"],
        ["resolvectl", "dns", "eth0"],
    ], tmp_path)
    assert results[0][1] == 0, results[0][3]
    assert resolv.read_text().splitlines()[1:] == [
        f"nameserver {DNS1}", f"nameserver {DNS2}", "nameserver fd09:24ef:4179::a89:53"]
    assert results[1][2].split()[-3:] == [DNS1, DNS2, "fd09:24ef:4179::a89:53"], results[1][2]
    put(xenstored, **{"disable-dns-server": "1"}, qubes_primary_dns="10.139.1.9")
    results = _steps(link, env, [
        [SCRIPT, "--resolv-conf", str(other), "eth0"],
        ["resolvectl", "dns", "eth0"],
    ], tmp_path)
    assert results[0][1] == 0, results[0][3]
    assert other.read_text() == "nameserver 192.0.2.54\n"
    assert "10.139.1.9" not in results[1][2]


# ----------------------------------------------------------------------------
# The systemd unit and the udev rule

UNIT = os.path.join(ROOT, "etc", "systemd", "system", "qubes-setup-ip@.service")
RULE = os.path.join(ROOT, "etc", "udev", "rules.d", "99-qubes-setup-ip.rules")


def _unit_sections(text):
    sections, cur = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            cur = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            cur.append((key, value))
    return sections


def test_unit_orders_and_runs_add_and_remove():
    sections = _unit_sections(open(UNIT).read())
    unit, service = sections["Unit"], dict(sections["Service"])
    assert ("After", "network-pre.target") in unit and ("Before", "network.target") in unit
    assert ("BindsTo", "sys-subsystem-net-devices-%i.device") in unit
    assert ("After", "sys-subsystem-net-devices-%i.device") in unit
    assert service["Type"] == "oneshot" and service["RemainAfterExit"] == "yes"
    assert service["ExecStart"] == "/opt/vif-route-qubes/bin/qubes-setup-ip add %i"
    assert service["ExecStop"] == "/opt/vif-route-qubes/bin/qubes-setup-ip remove %i"
    assert "qubes-setup-ip = vif_route_qubes.setup_ip:main" in open(os.path.join(ROOT, "setup.cfg")).read()


def test_unit_passes_systemd_analyze_verify(tmp_path):
    """The unit as shipped, with ExecStart/ExecStop pointing at this
    checkout's console script (verify checks the program exists)."""
    assert shutil.which("systemd-analyze"), "systemd-analyze is not installed (package systemd)"
    text = open(UNIT).read().replace("/opt/vif-route-qubes/bin/qubes-setup-ip", SCRIPT)
    (tmp_path / "qubes-setup-ip@.service").write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "qubes-setup-ip@eth0.service")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    # the check is real: a broken copy is reported
    (tmp_path / "qubes-setup-ip@.service").write_text(text.replace("Type=oneshot", "Type=oneshoot"))
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "qubes-setup-ip@eth0.service")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert "Failed to parse service type" in res.stderr


def test_udev_rule_pulls_in_the_unit():
    import re

    rules = [line for line in open(RULE).read().splitlines() if line.strip() and not line.startswith("#")]
    assert len(rules) == 1
    pairs = re.split(r'",\s*', rules[0].rstrip('"'))
    parsed = [re.fullmatch(r'([A-Z_]+(?:\{[A-Za-z_]+\})?)(==|!=|\+=|=|:=)"(.*)', p) for p in pairs]
    assert all(parsed), pairs
    keys = {(m.group(1), m.group(2)): m.group(3) for m in parsed}
    assert keys == {
        ("SUBSYSTEM", "=="): "net",
        ("ACTION", "=="): "add",
        ("SUBSYSTEMS", "=="): "xen",  # frontend bus; netback's driver "vif" is on xen-backend
        ("DRIVERS", "=="): "vif",
        ("TAG", "+="): "systemd",
        ("ENV{SYSTEMD_WANTS}", "+="): "qubes-setup-ip@$name.service",
    }
    # the unit it names is the template we ship
    wanted = keys[("ENV{SYSTEMD_WANTS}", "+=")]
    assert os.path.exists(os.path.join(ROOT, "etc", "systemd", "system", wanted.replace("$name", "")))
    assert "RUN" not in rules[0]


# ----------------------------------------------------------------------------
# QubesDB: the keys today's Qubes writes (issue 18), the real daemon


def qput(qdb, **keys):
    """Write QubesDB keys (path=value; the path's leading / and dashes as
    given) through the daemon's own qubesdb-write."""
    for path, value in keys.items():
        res = qdb.cli("qubesdb-write", path, value)
        assert res.returncode == 0, res.stderr


QDB_GOOD = {"/qubes-ip": GUEST_IP, "/qubes-netmask": "255.255.255.255", "/qubes-gateway": GATEWAY,
            "/qubes-primary-dns": DNS1, "/qubes-secondary-dns": DNS2}


@pytest.fixture
def qenv(qdb, env, xenstored):
    # XenStore holds other values: what the guest ends up with proves the source
    put(xenstored, qubes_ip="10.137.0.99", qubes_gateway="10.137.0.98")
    return qdb.env(env)


def addresses(ns, dev="eth0"):
    return sorted(line.split()[3] for line in ns.ip("-o", "addr", "show", "dev", dev, "scope", "global")
                  .stdout.splitlines())


def test_qubesdb_keys_configure_the_guest_and_traffic_flows(qdb, qenv, link, tmp_path):
    qput(qdb, **QDB_GOOD, **{"/qubes-ip6": GUEST_IP6, "/qubes-netmask6": "64", "/qubes-gateway6": GATEWAY6})
    resolv = tmp_path / "resolv.conf"
    dry = setup_ip(link.guest, qenv, "-n", "--resolv-conf", str(resolv), "eth0")
    assert dry.returncode == 0, dry.stderr
    assert f"# configuration: qubesdb (auto: QubesDB answers on {qdb.socket})" in dry.stdout
    assert f"addr replace {GUEST_IP6}/64 dev eth0 nodad" in dry.stdout
    assert addresses(link.guest) == [] and not resolv.exists()

    res = setup_ip(link.guest, qenv, "--resolv-conf", str(resolv), "eth0")
    assert res.returncode == 0, res.stderr
    assert addresses(link.guest) == sorted([f"{GUEST_IP}/32", f"{GUEST_IP6}/64"])
    assert neighbour(link.guest, GATEWAY) == f"{GATEWAY} lladdr {S.GATEWAY_MAC} PERMANENT"
    assert neighbour(link.guest, GATEWAY6) == f"{GATEWAY6} lladdr {S.GATEWAY_MAC} PERMANENT"
    assert resolv.read_text() == ("# Written by qubes-setup-ip from QubesDB (/qubes-primary-dns, "
                                  f"/qubes-secondary-dns).\nnameserver {DNS1}\nnameserver {DNS2}\n")
    with UdpSink(link.gw, OUTSIDE, 9999) as real:
        assert udp_send(link.guest, OUTSIDE, 9999, "via-qubesdb").returncode == 0
        assert real.got("via-qubesdb", 3)
    # a re-run is quiet; XenStore's different values were never used
    again = setup_ip(link.guest, qenv, "-v", "--resolv-conf", str(resolv), "eth0")
    assert "unchanged" in again.stderr
    assert "10.137.0.99" not in again.stderr + again.stdout
    # VIF_ROUTE_QUBES_CONFIG=xenstore chooses the design document's scheme
    xs = setup_ip(link.guest, dict(qenv, VIF_ROUTE_QUBES_CONFIG="xenstore"), "-n", "--resolv-conf", str(resolv))
    assert "# configuration: xenstore (VIF_ROUTE_QUBES_CONFIG=xenstore)" in xs.stdout
    assert "addr replace 10.137.0.99/32 dev eth0" in xs.stdout


def test_qubesdb_net_config_of_this_mac_first_and_custom_unpins(qdb, qenv, link, tmp_path):
    mine, other = f"/net-config/{GUEST_MAC}/", "/net-config/00:16:3e:5e:00:99/"
    qput(qdb, **QDB_GOOD, **{mine + "ip": "10.137.0.33", mine + "gateway": GATEWAY, mine + "custom": "",
                              other + "ip": "10.137.0.44", other + "gateway": "10.137.0.4"})
    res = setup_ip(link.guest, qenv, "--resolv-conf", str(tmp_path / "r"), "eth0")
    assert res.returncode == 0, res.stderr
    assert addresses(link.guest) == ["10.137.0.33/32"]
    # custom: no pinned gateway MAC (learnt by ARP instead), and traffic flows
    with UdpSink(link.gw, OUTSIDE, 9999) as real:
        assert udp_send(link.guest, OUTSIDE, 9999, "custom", src="10.137.0.33").returncode == 0
        assert real.got("custom", 3)
    assert "PERMANENT" not in neighbour(link.guest, GATEWAY)
    # without the per-MAC ip, the qube's own keys
    assert qdb.cli("qubesdb-rm", mine + "ip").returncode == 0
    assert setup_ip(link.guest, qenv, "--resolv-conf", str(tmp_path / "r"), "eth0").returncode == 0
    assert addresses(link.guest) == [f"{GUEST_IP}/32"]
    assert neighbour(link.guest, GATEWAY) == f"{GATEWAY} lladdr {S.GATEWAY_MAC} PERMANENT"


def test_qubesdb_bad_values_name_their_key_and_change_nothing(qdb, qenv, link, tmp_path):
    qput(qdb, **QDB_GOOD)
    resolv = tmp_path / "resolv.conf"
    assert setup_ip(link.guest, qenv, "--resolv-conf", str(resolv)).returncode == 0
    before = (addresses(link.guest), link.guest.ip("route", "show").stdout, resolv.read_text())
    for path, value, message in (
            ("/qubes-ip", "10.137.0.300", "QubesDB /qubes-ip: "),
            ("/qubes-netmask6", "129", "QubesDB /qubes-netmask6: '129' is not an IPv6 prefix length"),
            ("/qubes-service/disable-default-route", "maybe", "QubesDB /qubes-service/disable-default-route: "),
            ("/qubes-primary-dns", "10.139.1.1 ; rm", "QubesDB /qubes-primary-dns: ")):
        keep = qdb.cli("qubesdb-read", path)
        qput(qdb, **{path: value})
        if path == "/qubes-netmask6":
            qput(qdb, **{"/qubes-ip6": GUEST_IP6})
        res = setup_ip(link.guest, qenv, "--resolv-conf", str(resolv))
        assert res.returncode == 1 and message in res.stderr, (path, res.stderr)
        assert (addresses(link.guest), link.guest.ip("route", "show").stdout, resolv.read_text()) == before
        if keep.returncode == 0:
            qput(qdb, **{path: keep.stdout.decode()})
        else:
            assert qdb.cli("qubesdb-rm", path).returncode == 0
        assert qdb.cli("qubesdb-rm", "/qubes-ip6").returncode == 0
    # the daemon gone while QubesDB is the chosen source: one clear line
    qdb.stop()
    res = setup_ip(link.guest, dict(qenv, VIF_ROUTE_QUBES_CONFIG="qubesdb"), "--resolv-conf", str(resolv))
    assert res.returncode == 1 and "QubesDB" in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    assert (addresses(link.guest), link.guest.ip("route", "show").stdout, resolv.read_text()) == before


def test_qubesdb_services_as_qubes_names_them(qdb, qenv, link, tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    qput(qdb, **QDB_GOOD, **{"/qubes-service/disable-default-route": "1",
                             "/qubes-service/disable-dns-server": "1"})
    res = setup_ip(link.guest, qenv, "--resolv-conf", str(resolv))
    assert res.returncode == 0, res.stderr
    assert link.guest.ip("route", "show", "default").stdout == ""
    assert resolv.read_text() == "nameserver 192.0.2.53\n"
    qput(qdb, **{"/qubes-service/disable-default-route": "0", "/qubes-service/disable-dns-server": "0"})
    assert setup_ip(link.guest, qenv, "--resolv-conf", str(resolv)).returncode == 0
    assert link.guest.ip("route", "show", "default").stdout.startswith(f"default via {GATEWAY} dev eth0")
    assert f"nameserver {DNS1}" in resolv.read_text()


def test_qubesdb_a_qube_providing_network_runs_the_dnat_then_the_hook(qdb, qenv, link, tmp_path):
    hook = tmp_path / "hook"
    hook.write_text(f"#!/bin/sh\necho ran >> {tmp_path}/hook.log\n")
    hook.chmod(0o755)
    env = dict(qenv, QUBES_SETUP_IP_HOOK=str(hook), VIF_ROUTE_QUBES_FIREWALL="nft",
               VIF_ROUTE_QUBES_STATE_DIR=str(tmp_path / "state"))
    resolv = tmp_path / "resolv.conf"
    # the qube's own nameservers (what its resolv.conf gets) differ from the
    # virtual ones it serves, so the translation shows in the rules (Qubes'
    # proxy qubes have the same on both sides: no rule is needed then)
    qput(qdb, **{**QDB_GOOD, "/qubes-primary-dns": "192.0.2.53", "/qubes-secondary-dns": "192.0.2.54",
                 "/qubes-netvm-primary-dns": DNS1, "/qubes-netvm-secondary-dns": DNS2})
    # an AppVM (no /qubes-netvm-network): neither the DNAT nor the hook, as in Qubes
    assert setup_ip(link.guest, env, "--resolv-conf", str(resolv)).returncode == 0
    assert not (tmp_path / "hook.log").exists()
    assert "dnat-dns" not in link.guest.exec(["nft", "list", "ruleset"]).stdout
    # a qube that provides network (sys-firewall): DNS1/DNS2 translated to its
    # own nameservers, then the hook; on every add, as Qubes' setup-ip
    qput(qdb, **{"/qubes-netvm-network": "10.137.0.0"})
    for n in (1, 2):
        res = setup_ip(link.guest, env, "--resolv-conf", str(resolv))
        assert res.returncode == 0, res.stderr
        assert (tmp_path / "hook.log").read_text() == "ran\n" * n
    chain = link.guest.exec(["nft", "list", "chain", "ip", "qubes", "dnat-dns"]).stdout
    assert f"ip daddr {DNS1} udp dport 53 dnat to 192.0.2.53" in chain, chain
    assert f"ip daddr {DNS2} udp dport 53 dnat to 192.0.2.54" in chain
    # disable-dns-server: no DNAT run (the rules in force stay), the hook still
    qput(qdb, **{"/qubes-service/disable-dns-server": "1"})
    link.guest.exec(["nft", "flush", "chain", "ip", "qubes", "dnat-dns"])
    assert setup_ip(link.guest, env, "--resolv-conf", str(resolv)).returncode == 0
    assert "dnat to" not in link.guest.exec(["nft", "list", "chain", "ip", "qubes", "dnat-dns"]).stdout
    assert (tmp_path / "hook.log").read_text() == "ran\n" * 3


NMCLI = """#!/bin/sh
# nmcli stand-in: NetworkManager does not run here; records the call
echo "$@" >> "$NMCLI_LOG"
"""


def test_qubesdb_network_manager_gets_qubes_keyfile(qdb, qenv, link, tmp_path):
    bindir, nmdir = tmp_path / "bin", tmp_path / "nm"
    bindir.mkdir()
    nmdir.mkdir()
    (bindir / "nmcli").write_text(NMCLI)
    (bindir / "nmcli").chmod(0o755)
    env = dict(qenv, PATH=f"{bindir}:{qenv['PATH']}", NMCLI_LOG=str(tmp_path / "nmcli.log"),
               QUBES_SETUP_IP_NM_DIR=str(nmdir))
    qput(qdb, **QDB_GOOD, **{"/qubes-service/network-manager": "1", "/qubes-ip6": GUEST_IP6,
                             "/qubes-gateway6": GATEWAY6})
    resolv = tmp_path / "resolv.conf"
    res = setup_ip(link.guest, env, "--resolv-conf", str(resolv), "eth0")
    assert res.returncode == 0, res.stderr
    keyfile = nmdir / "qubes-uplink-eth0"
    assert keyfile.stat().st_mode & 0o777 == 0o600
    assert keyfile.read_text() == (
        "[802-3-ethernet]\nduplex=full\n\n[ethernet]\n"
        f"mac-address={GUEST_MAC}\n\n[connection]\nid=VM uplink eth0\n"
        f"uuid=de85f79b-8c3d-405f-a652-{GUEST_MAC.replace(':', '')}\ntype=802-3-ethernet\n\n"
        f"[ipv4]\nmethod=manual\nmay-fail=false\ndns={DNS1};{DNS2};\naddresses1={GUEST_IP};32;{GATEWAY}\n\n"
        f"[ipv6]\nmethod=manual\nmay-fail=false\naddresses1={GUEST_IP6};128;{GATEWAY6}\n")
    assert (tmp_path / "nmcli.log").read_text() == f"connection load {keyfile}\n"
    # NetworkManager configures the addresses; here the group and the pins only
    assert addresses(link.guest) == [] and not resolv.exists()
    assert link.guest.ip("-d", "link", "show", "eth0").stdout.count(" group 1 ") == 1
    assert neighbour(link.guest, GATEWAY) == f"{GATEWAY} lladdr {S.GATEWAY_MAC} PERMANENT"
    # unchanged: not loaded again; remove takes the keyfile away, as Qubes does
    assert setup_ip(link.guest, env, "--resolv-conf", str(resolv), "eth0").returncode == 0
    assert (tmp_path / "nmcli.log").read_text().count("connection load") == 1
    assert setup_ip(link.guest, env, "remove", "eth0").returncode == 0
    assert not keyfile.exists()
