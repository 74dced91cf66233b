"""Throwaway network namespaces that build the seed document's world: a
netvm with an uplink to an upstream host, and guests behind vif-named veth
pairs. Used by the integration tests, the demo and the benchmarks, so there
is one rig, not three.

Everything created here is named with a per-run prefix and removed by
:meth:`World.close` (also on errors: use it as a context manager).
Packets are real: :func:`udp_send` and :class:`UdpSink` run small Python
programs inside the namespaces.
"""

import os
import subprocess
import sys
import time
import uuid

PY = sys.executable
NETNS_DIR = "/run/netns"


def run(argv, check=True, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    res = subprocess.run(argv, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
    return res


class Netns:
    def __init__(self, name):
        self.name = name
        run(["ip", "netns", "add", name])
        self.ip("link", "set", "lo", "up")

    def ip(self, *args, check=True):
        return run(["ip", "-n", self.name, *args], check=check)

    def exec(self, argv, check=True, **kw):
        return run(["ip", "netns", "exec", self.name, *argv], check=check, **kw)

    def popen(self, argv, **kw):
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kw)

    def shared(self, argv):
        """``argv`` in this namespace *without* a mount namespace of its
        own for /run/netns: ``ip netns exec`` gives its command a slave
        mount namespace, so a named namespace made inside it (the mapped-IP
        NAT's) vanishes with the command. ``nsenter --net`` keeps the
        host's mounts; only /sys is mounted afresh (in a mount namespace
        of its own, made a slave first so nothing leaks back), so sysfs
        shows this namespace's interfaces."""
        return ["nsenter", f"--net={NETNS_DIR}/{self.name}", "--", "unshare", "--mount",
                "--propagation", "unchanged", "--", "sh", "-c",
                'mount --make-rslave /sys && mount -t sysfs sysfs /sys && exec "$@"', "sh", *argv]

    def exec_shared(self, argv, check=True, **kw):
        return run(self.shared(argv), check=check, **kw)

    def sysctl(self, key, value):
        self.exec(["sh", "-c", f"echo {value} > /proc/sys/{key.replace('.', '/')}"])

    def read(self, path):
        return self.exec(["cat", path]).stdout

    def delete(self):
        run(["ip", "netns", "del", self.name], check=False)


class Guest:
    def __init__(self, world, domid, devid, addresses, mac, vif, ns):
        self.world, self.domid, self.devid = world, domid, devid
        self.addresses, self.mac, self.vif, self.ns = addresses, mac, vif, ns

    @property
    def xenbus_path(self):
        return f"backend/vif/{self.domid}/{self.devid}"

    def env(self, **extra):
        """The environment libxl gives the hotplug script."""
        env = dict(self.world.env)
        env.update(vif=self.vif, XENBUS_PATH=self.xenbus_path, XENBUS_TYPE="vif",
                   XENBUS_BASE_PATH="backend", script="/etc/xen/scripts/vif-route-qubes", netdev="")
        env.update(extra)
        return env

    def configure(self, gateway="10.137.0.1"):
        """Configure the guest side by hand (qubes-setup-ip's job in the
        end-to-end test): address, a route to the gateway, default route."""
        for a in self.addresses:
            if ":" in a:
                self.ns.ip("-6", "addr", "add", f"{a}/128", "dev", "eth0", "nodad")
            else:
                self.ns.ip("addr", "add", f"{a}/32", "dev", "eth0")
        self.ns.ip("link", "set", "eth0", "up")
        self.ns.ip("route", "add", gateway, "dev", "eth0")
        self.ns.ip("route", "add", "default", "via", gateway, "dev", "eth0", "onlink")


class World:
    """netvm + upstream (192.168.0.0/24 uplink, as in the seed's table) +
    guests. ``xenstored`` is a started ``XenStored`` whose socket the
    commands under test reach through ``XENSTORED_PATH``."""

    UPLINK_NETVM = "192.168.0.2"
    UPLINK_UPSTREAM = "192.168.0.1"

    def __init__(self, xenstored, tmpdir, prefix=None, gateway="10.137.0.1",
                 dns=("10.139.1.1", "10.139.1.2"), upstream=True, firewall="iptables"):
        self.prefix = prefix or f"vrq{uuid.uuid4().hex[:6]}"
        self.xs = xenstored
        self.tmpdir = str(tmpdir)
        self.namespaces = []
        self.guests = []
        self.gateway = gateway
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": "/",
            "XENSTORED_PATH": getattr(xenstored, "socket_path", None) or str(xenstored),
            "VIF_ROUTE_QUBES_STATE_DIR": os.path.join(self.tmpdir, "state"),
            "VIF_ROUTE_QUBES_HOOKS_DIR": os.path.join(self.tmpdir, "hooks"),
            "VIF_ROUTE_QUBES_SYSLOG": os.path.join(self.tmpdir, "no-syslog"),
            "VIF_ROUTE_QUBES_HOTPLUG_LOG": os.path.join(self.tmpdir, "xen", "xen-hotplug.log"),
            # no late-keys watch left behind by a QubesDB online whose test
            # does not offline (tests/test_mapped.py asks for one)
            "VIF_ROUTE_QUBES_MAPPED_WAIT": "0",
        }
        # the firewall backend the commands under test use; None leaves the
        # choice to them (auto: nft where the nft command exists)
        self.firewall = firewall
        if firewall:
            self.env["VIF_ROUTE_QUBES_FIREWALL"] = firewall
        try:
            self.netvm = self._ns("netvm")
            self.netvm.sysctl("net.ipv4.ip_forward", 1)
            self.netvm.sysctl("net.ipv6.conf.all.forwarding", 1)
            if upstream:
                self.upstream = self._ns("up")
                self.netvm.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
                              "netns", self.upstream.name)
                self.netvm.ip("addr", "add", f"{self.UPLINK_NETVM}/24", "dev", "eth0")
                self.netvm.ip("link", "set", "eth0", "up")
                self.upstream.ip("addr", "add", f"{self.UPLINK_UPSTREAM}/24", "dev", "eth0")
                self.upstream.ip("link", "set", "eth0", "up")
                self.netvm.ip("route", "add", "default", "via", self.UPLINK_UPSTREAM, "metric", "0")
                # upstream routes guest space back to the netvm, so it sees
                # real guest source addresses (and so we can check them)
                self.upstream.ip("route", "add", "10.137.0.0/16", "via", self.UPLINK_NETVM)
            if gateway:
                self.xs.write("/local/domain/0/qubes_netvm_gateway", gateway)
            if dns:
                self.xs.write("/local/domain/0/qubes_netvm_primary_dns", dns[0])
                self.xs.write("/local/domain/0/qubes_netvm_secondary_dns", dns[1])
        except BaseException:
            self.close()
            raise

    def _ns(self, role):
        ns = Netns(f"{self.prefix}-{role}")
        self.namespaces.append(ns)
        return ns

    def add_guest(self, domid, addresses, devid=0, mac=None, write_xenstore=True, vifname=None):
        """A guest namespace whose eth0 is the peer of ``vifD.N`` in the netvm."""
        mac = mac or "00:16:3e:5e:%02x:%02x" % (domid % 256, devid % 256)
        vif = f"vif{domid}.{devid}"
        ns = self._ns(f"g{domid}-{devid}")
        # the vif gets netback's MAC, fe:ff:ff:ff:ff:ff, as every real one
        # has: qubes-setup-ip pins the gateway to it in the guest
        self.netvm.ip("link", "add", vif, "address", "fe:ff:ff:ff:ff:ff", "type", "veth", "peer", "name", "eth0",
                      "netns", ns.name)
        ns.ip("link", "set", "eth0", "address", mac)
        guest = Guest(self, domid, devid, list(addresses), mac, vif, ns)
        if write_xenstore:
            base = f"/local/domain/0/{guest.xenbus_path}"
            self.xs.write(f"{base}/ip", " ".join(addresses))
            self.xs.write(f"{base}/mac", mac)
            self.xs.write(f"{base}/frontend-id", str(domid))
            self.xs.write(f"{base}/handle", str(devid))
            self.xs.write(f"{base}/type", "vif")
            self.xs.write(f"{base}/script", "/etc/xen/scripts/vif-route-qubes")
            if vifname:
                self.xs.write(f"{base}/vifname", vifname)
        self.guests.append(guest)
        return guest

    def hotplug(self, guest, command="online", *words, env=None, check=False, cmd=None, shared=False):
        """Run the installed console script in the netvm as libxl would;
        ``shared``: with the host's mounts (:meth:`Netns.shared`), as a run
        that makes a named namespace (a mapped address's NAT) needs."""
        env = env or guest.env()
        prog = [cmd] if cmd else None
        if prog is None:
            from .faults import command as faulty

            prog, env = faulty(_script("vif-route-qubes"), env)
        argv = [*prog, command, "type_if=vif", *words]
        if shared:
            return run(self.netvm.shared(argv), check=check, env=env)
        return self.netvm.exec(argv, check=check, env=env)

    def snapshot(self, ns=None):
        """The netvm's networking state as comparable text: links, addresses,
        routes, neighbours, raw/nat rules of both families, state records.
        Timestamps and packet counters are left out (they change by
        themselves); everything that a hotplug run could change is in."""
        ns = ns or self.netvm
        snap = {
            "links": ns.ip("-o", "link", "show").stdout,
            "addrs": ns.ip("-o", "addr", "show").stdout,
            "routes": ns.ip("route", "show", "table", "all").stdout,
            "routes6": ns.ip("-6", "route", "show", "table", "all").stdout,
            "neigh": "\n".join(sorted(line for line in ns.ip("neigh", "show", "nud", "permanent").stdout.splitlines())),
        }
        # IPv6 link-local addresses appear on their own once DAD finishes,
        # whenever that is; nothing of ours touches them
        for key in ("addrs", "routes", "routes6"):
            snap[key] = "\n".join(line for line in snap[key].splitlines() if "fe80:" not in line)
        for tool in ("iptables-save", "ip6tables-save"):
            snap[tool] = _rules(ns.exec([tool]).stdout)
        snap["nft"], snap["nft-elements"] = nft_state(ns)
        for key in ("proxy_arp",):
            snap[key] = ns.exec(["sh", "-c", "grep -H . /proc/sys/net/ipv4/conf/*/proxy_arp"]).stdout
        state = self.env["VIF_ROUTE_QUBES_STATE_DIR"]
        snap["records"] = sorted(f for f in os.listdir(state) if f.endswith(".json")) if os.path.isdir(state) else []
        return snap

    def close(self):
        for ns in reversed(self.namespaces):
            ns.delete()
        self.namespaces.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# The iptables backend's guard as iptables-save shows it once no vif is left
# (its chain, its DROP, its jump): it stays by design (default deny).
IDLE_GUARD = frozenset({
    ":vrq-guard", ":vrq-guard -", "-A vrq-guard -j DROP",
    "-A PREROUTING -m devgroup --src-group 0x2 -m comment --comment vrq-guard -j vrq-guard",
})


def without_idle_guard(lines):
    """``lines`` of iptables-save less the idle guard; a guard that still
    holds a vif's goto is not idle and stays."""
    if any(line.startswith("-A vrq-guard ") and line != "-A vrq-guard -j DROP" for line in lines):
        return list(lines)
    return [line for line in lines if line.split(" [")[0] not in IDLE_GUARD]


def _rules(save_text):
    """iptables-save output without comments and counters, and without
    tables that hold nothing (an emptied table stays listed once touched).
    An idle guard (chain ``vrq-guard`` holding only its DROP, and its jump)
    is left out too: the first online on a host makes it and no offline
    removes it, by design, so "as before" means "as before, guard aside";
    a guard that still holds a vif's goto stays in, and shows."""
    lines = without_idle_guard(save_text.splitlines())
    blocks, cur = [], []
    for line in lines:
        if line.startswith("#"):
            continue
        cur.append(line.split(" [")[0] if line.startswith(":") else line)
        if line == "COMMIT":
            blocks.append(cur)
            cur = []
    kept = []
    for block in blocks:
        chains = [line for line in block if line.startswith(":")]
        empty = not any(line.startswith("-") for line in block) and all(
            line.endswith(" ACCEPT") for line in chains
        )
        if not empty:
            kept.extend(block)
    return "\n".join(kept)


QUBES_TABLES = ("table ip qubes {", "table ip6 qubes {")


def nft_state(ns):
    """(``nft -s list ruleset`` without the tables ``ip qubes`` and ``ip6
    qubes``, the elements of those tables' sets as sorted lines).

    The nft backend creates the qubes tables once and keeps them (their
    default deny must outlive every vif), so what a hotplug run changes,
    and what offline must take back, is the sets' elements; the tables'
    own definition is compared by the tests that are about it."""
    import json
    import re

    res = ns.exec(["nft", "-s", "list", "ruleset"], check=False)
    if res.returncode != 0:
        return "", ""
    blocks = re.split(r"(?m)^(?=table )", res.stdout)
    # the iptables backend's idle guard, as iptables-nft shows it in the
    # raw table: left out as in _rules() (it stays by design)
    idle = r"(?m)^\s*chain vrq-guard \{\n\s*counter drop\n\s*\}\n"
    blocks = [re.sub(r"(?m)^.*jump vrq-guard.*\n", "", re.sub(idle, "", b)) if re.search(idle, b) else b
              for b in blocks]
    # as in _rules(): a table that holds no rule (iptables-nft leaves its
    # emptied base chains behind) is as good as none
    other = "".join(b for b in blocks if not b.startswith(QUBES_TABLES) and any(
        not re.fullmatch(r"(table .*\{|chain \S+ \{|type .*policy accept;|\}|)", line.strip())
        for line in b.splitlines()))
    elements = []
    got = ns.exec(["nft", "-j", "list", "sets"], check=False)
    for item in json.loads(got.stdout or "{}").get("nftables", []) if got.returncode == 0 else ():
        st = item.get("set")
        if st and st.get("table") == "qubes" and st.get("family") in ("ip", "ip6"):
            for elem in st.get("elem", []):
                elements.append(f"{st['family']} {st['name']} {json.dumps(elem, sort_keys=True)}")
    return other, "\n".join(sorted(elements))


def _script(name):
    """The console script installed next to the running interpreter."""
    candidate = os.path.join(os.path.dirname(PY), name)
    return candidate if os.path.exists(candidate) else name


# ----------------------------------------------------------------------------
# Real packets

_SINK = r"""
import socket, sys, time
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
proto = sys.argv[3]
s = socket.socket(fam, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
if proto == "udp":
    while True:
        data, addr = s.recvfrom(2048)
        print(addr[0], data.decode(errors="replace"), flush=True)
"""

_SEND = r"""
import socket, sys
src, dst, port, msg = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
# getaddrinfo keeps a link-local address's %scope (a bare tuple drops it)
where = lambda a, p: socket.getaddrinfo(a, p, fam, socket.SOCK_DGRAM)[0][4]
if src != "-":
    s.bind(where(src, 0))
for _ in range(int(sys.argv[5])):
    s.sendto(msg.encode(), where(dst, port))
"""


class UdpSink:
    """A UDP listener in a namespace that records (source, payload) pairs."""

    def __init__(self, ns, addr, port):
        self.proc = ns.popen([PY, "-c", _SINK, addr, str(port), "udp"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"sink did not start: {self.proc.stderr.read()}")
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.received = []

    def collect(self, wait=0.3):
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(0.05)
            while True:
                try:
                    line = self.proc.stdout.readline()
                except (BlockingIOError, ValueError):
                    line = ""
                if not line:
                    break
                src, _, data = line.rstrip("\n").partition(" ")
                self.received.append((src, data))
        return list(self.received)

    def got(self, payload, wait=1.0):
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if any(d == payload for _, d in self.collect(0.1)):
                return True
        return False

    def close(self):
        self.proc.kill()
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def udp_send(ns, dst, port, payload, src="-", count=3):
    """Send ``count`` datagrams from inside ``ns`` (bound to ``src`` if given)."""
    return ns.exec([PY, "-c", _SEND, src, dst, str(port), payload, str(count)], check=False)


# ----------------------------------------------------------------------------
# Helpers for the reliability tests (storms, fault injection)


def add_vif_guests(world, specs, role="guests"):
    """Many vifs at once, their peers in ONE shared guest namespace.

    A namespace per guest costs ~10 ms and a few processes each; a storm of
    64 guests only needs the netvm side to be real, so every peer goes into
    ``PREFIX-guests`` named ``gDOMID-DEVID`` (with the guest's MAC). Each
    spec is ``(domid, addresses)`` or ``(domid, addresses, devid)``; the
    XenStore backend directories are written as :meth:`World.add_guest`
    does. Returns the :class:`Guest` objects (``ns`` is the shared one)."""
    ns = world._ns(role)
    lines, guests = [], []
    for spec in specs:
        domid, addresses = spec[0], list(spec[1])
        devid = spec[2] if len(spec) > 2 else 0
        mac = "00:16:3e:5e:%02x:%02x" % (domid % 256, devid % 256)
        vif = f"vif{domid}.{devid}"
        lines.append(f"link add {vif} type veth peer name g{domid}-{devid} address {mac} netns {ns.name}")
        guests.append(Guest(world, domid, devid, addresses, mac, vif, ns))
    run(["ip", "-n", world.netvm.name, "-batch", "-"], input="".join(x + "\n" for x in lines))
    for guest in guests:
        base = f"/local/domain/0/{guest.xenbus_path}"
        for key, value in (("ip", " ".join(guest.addresses)), ("mac", guest.mac),
                           ("frontend-id", str(guest.domid)), ("handle", str(guest.devid)),
                           ("type", "vif"), ("script", "/etc/xen/scripts/vif-route-qubes")):
            world.xs.write(f"{base}/{key}", value)
    world.guests.extend(guests)
    return guests


def comparable(snap):
    """A :meth:`World.snapshot` with the one difference no hotplug script
    can undo taken out: the kernel attaches a default qdisc (``noqueue``
    for veth) the first time a link goes up and keeps it after it goes down
    (``noop`` before). Everything else is compared as is."""
    import re

    snap = dict(snap)
    snap["links"] = re.sub(r" qdisc (noop|noqueue) ", " qdisc - ", snap["links"])
    return snap
