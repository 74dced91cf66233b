"""qubes-setup-ip: the guest side of Qubes' routed networking.

systemd runs it in a guest when a Xen network interface (xen-netfront)
appears: udev's rule (etc/udev/rules.d/99-qubes-setup-ip.rules) pulls in
``qubes-setup-ip@IFACE.service``, whose start is ``qubes-setup-ip add IFACE``
and whose stop (the interface went away) is ``qubes-setup-ip remove IFACE``.
``add`` reads the guest's own configuration, from its XenStore home in one
round trip or from its QubesDB on today's Qubes (the configuration source
seam, :mod:`vif_route_qubes.config`: :func:`read_values`), and makes the
interface look like the plan says:

* the address (``/32`` for Qubes' usual netmask 255.255.255.255), link up,
  the link in interface group 1 ("the uplink", for firewall rules);
* a permanent neighbour entry for the gateway with the backend's MAC
  ``fe:ff:ff:ff:ff:ff`` (what netback gives every vif), so nothing else on
  the link can answer ARP / neighbour discovery for the gateway;
* a host route to the gateway and the default route via it (``onlink``: the
  gateway is not inside a /32, the netvm answers ARP for it on the vif);
* IPv6 address, neighbour entry and routes when ``qubes_ip6`` is given;
* ``/etc/resolv.conf`` naming the virtual nameservers DNS1/DNS2 (the netvm
  DNATs them to the real ones), then the IPv6 ones; written atomically, or
  in place when it is a mount point; and, when systemd-resolved is running,
  the same servers handed to it for the interface (``resolvectl dns``);
* the change hook (``/rw/config/qubes-ip-change-hook``), only when something
  actually changed, so a re-run (udev "change", a manual run) is silent.

Plan, then apply: :func:`guest_net` validates the XenStore values into plain
data, :func:`render_batch` / :func:`render_resolv` / :func:`render_remove`
turn it into text, and :func:`run` applies that with one ``ip -batch -``
(``replace`` verbs, so a re-run is harmless) and one rename. Whether
anything changes is decided from one read-only probe (``ip -j -batch -``:
addresses and neighbours) and ``/proc/net/*route``; when the interface is
already as planned no batch runs at all.

Public, importable without click (dom0's attached interface is configured
"like a guest's" with these): :data:`KEYS`, :class:`GuestNet`,
:func:`guest_net`, :func:`render_batch`, :func:`render_resolv`,
:func:`render_remove`, :func:`resolvectl_argv`, :class:`Current`,
:func:`probe`, :func:`stale_addresses`, :func:`stale_neighbours`,
:func:`in_place`, :func:`resolved_running`,
:func:`run`.

``main()`` takes the fast path (no click import) for the plain calls
``qubes-setup-ip [add|remove] [INTERFACE]``; options go through click, into
the same :func:`run`.
"""

import os
import sys
from collections import namedtuple

from . import validate
from .errors import Failure
from .files import AtomicWrite, is_mount_point
from .log import Log
from .plan import UPLINK_GROUP as UPLINK
from .plan import json_arrays
from .system import System

TAG = "qubes-setup-ip"
DEFAULT_INTERFACE = "eth0"
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
DEFAULT_HOOK = "/rw/config/qubes-ip-change-hook"
DEFAULT_NETMASK = "255.255.255.255"
# xen-netback gives every backend vif this MAC (drivers/net/xen-netback:
# "fe:ff:ff:ff:ff:ff", so the guest's own MAC never appears twice on the
# link); it is the only MAC the gateway legitimately has.
GATEWAY_MAC = "fe:ff:ff:ff:ff:ff"
# Interface group of the uplink, as Qubes sets it: firewall rules can say
# "iifgroup 1" / "-m devgroup --src-group 1" without knowing the name.
UPLINK_GROUP = str(UPLINK)
# systemd-resolved's Varlink socket. A connect() succeeds only while
# resolved is running: cheaper than asking systemctl or D-Bus (the
# directory itself survives a stop: RuntimeDirectoryPreserve=yes).
RESOLVED_SOCKET = "/run/systemd/resolve/io.systemd.Resolve"
RESOLVED_DIR = "/run/systemd/resolve/"
ACTIONS = ("add", "remove")

# Per-guest switches (XenStore keys under the guest's home, Qubes' service
# names): "1" (or true/yes/on) turns the feature off.
SWITCH_NO_DEFAULT_ROUTE = "disable-default-route"
SWITCH_NO_DNS = "disable-dns-server"
SWITCH_NO_MAC_PIN = "disable-gateway-mac-pin"

# Relative keys: resolved under the guest's own /local/domain/<domid>.
KEYS = (
    "qubes_ip", "qubes_netmask", "qubes_gateway", "qubes_primary_dns",
    "qubes_secondary_dns", "qubes_ip6", "qubes_gateway6",
    "qubes_primary_dns6", "qubes_secondary_dns6",
    SWITCH_NO_DEFAULT_ROUTE, SWITCH_NO_DNS, SWITCH_NO_MAC_PIN,
)

ENV_HELP = """

\b
Actions:
  add (default)    configure INTERFACE from XenStore or QubesDB
  remove           take INTERFACE down and remove what add configured
                   (address, routes, pinned gateway MAC, group; resolved's
                   servers for it); resolv.conf is left as it is
A single word add or remove is the action (INTERFACE then as below).

\b
Environment:
  INTERFACE        the interface when none is given (udev sets it); default eth0
  VIF_ROUTE_QUBES_CONFIG  qubesdb, xenstore or auto (default auto: QubesDB
                   where its daemon answers, else XenStore)
  VIF_ROUTE_QUBES_QUBESDB_SOCKET  QubesDB socket (default /var/run/qubes/qubesdb.sock)
  XENSTORED_PATH   XenStore socket (default /var/run/xenstored/socket if it
                   exists, else /dev/xen/xenbus)
  QUBES_SETUP_IP_RESOLV_CONF  default for --resolv-conf (/etc/resolv.conf)
  QUBES_SETUP_IP_HOOK         default for --hook (/rw/config/qubes-ip-change-hook)
  VIF_ROUTE_QUBES_XS_TIMEOUT  seconds to wait for XenStore (default 10)
  VIF_ROUTE_QUBES_DEBUG=1     debug logging on stderr (like -v)

\b
XenStore keys read (relative to this domain's home, one round trip):
  qubes_ip             IPv4 address; absent: nothing to do (exit 0)
  qubes_netmask        netmask (default 255.255.255.255, i.e. /32)
  qubes_gateway        gateway: pinned MAC, host route, default route (onlink)
  qubes_primary_dns    DNS1 (default: the gateway)
  qubes_secondary_dns  DNS2 (optional)
  qubes_ip6            optional IPv6 address (/128)
  qubes_gateway6       optional IPv6 gateway: pinned MAC, host route, default
  qubes_primary_dns6   optional IPv6 DNS1 (written after the IPv4 ones; used
  qubes_secondary_dns6 optional IPv6 DNS2  only with qubes_ip6)
  disable-default-route  1: no default routes (the gateway routes stay)
  disable-dns-server     1: leave resolv.conf and systemd-resolved alone
  disable-gateway-mac-pin  1: no permanent neighbour entry for the gateways
                         (a backend with a custom MAC; like --no-pin-gateway-mac)

\b
QubesDB keys read instead (today's Qubes; one connection):
  /net-config/MAC/ip, netmask, gateway, ip6, netmask6, gateway6, custom
                       this interface's values (MAC: its own); when there is
                       no ip there, /qubes-ip, /qubes-netmask, /qubes-gateway,
                       /qubes-ip6, /qubes-netmask6 (default 128), /qubes-gateway6;
                       custom present: no pinned gateway MAC
  /qubes-primary-dns, /qubes-secondary-dns   DNS1, DNS2
  /qubes-service/disable-default-route, disable-dns-server   as above
  /qubes-service/network-manager  1 (and nmcli installed): NetworkManager
                       configures INTERFACE from Qubes' keyfile
                       (/etc/NetworkManager/system-connections/qubes-uplink-IF)
  /qubes-netvm-network  non-empty: this qube provides network; then every
                       add runs qubes-setup-dnat-to-ns (unless
                       disable-dns-server) and the hook, as Qubes does (the
                       hook does not run otherwise)

\b
Files:
  /etc/resolv.conf     written atomically (rename); in place when it is a
                       mount point (containers, ip netns exec); left alone
                       when systemd-resolved runs and it points into
                       /run/systemd/resolve/
  /run/systemd/resolve/io.systemd.Resolve  resolved running: resolvectl dns
  /rw/config/qubes-ip-change-hook          run after a change

\b
Exit status: 0 configured, removed or nothing to do; 1 error (nothing
changed when the input was bad); 2 usage error (unknown option, extra
argument).
"""


# The guest's network configuration, validated. (namedtuple, not a
# dataclass: ``dataclasses`` pulls in ``inspect`` and ``ast``, a few ms of a
# run whose whole budget is start-up time.)
#   dns, dns6      nameserver addresses, IPv4 then IPv6 (dns6 only with ip6)
#   default_route  False: disable-default-route
#   configure_dns  False: disable-dns-server (resolv.conf, resolved untouched)
#   gateway_mac    the MAC pinned for the gateways, None: not pinned
#   prefix6        the IPv6 address's prefix length (QubesDB's netmask6;
#                  the XenStore scheme has none: 128)
GuestNet = namedtuple(
    "GuestNet", "ip prefix gateway dns ip6 gateway6 dns6 default_route configure_dns gateway_mac prefix6",
    defaults=(None, (), None, None, (), True, True, GATEWAY_MAC, 128))


# ----------------------------------------------------------------------------
# Plan (pure)


def netmask_prefix(value: str, what: str = "XenStore qubes_netmask") -> int:
    """A dotted IPv4 netmask -> prefix length; refuses non-contiguous masks
    (255.0.255.0), prefix notation and 0.0.0.0 (a guest on "every" network
    would ARP for the whole internet)."""
    import ipaddress

    text = (value or "").strip()
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        raise Failure(f"{what}: {text[:40]!r} is not a dotted netmask (like 255.255.255.255)")
    try:
        number = int(ipaddress.IPv4Address(text))
    except ValueError:
        raise Failure(f"{what}: {text[:40]!r} is not a dotted netmask (like 255.255.255.255)") from None
    inverted = ~number & 0xFFFFFFFF
    if inverted & (inverted + 1):  # host bits must be a run of ones
        raise Failure(f"{what}: {text} is not a contiguous netmask")
    prefix = 32 - inverted.bit_length()
    if prefix == 0:
        raise Failure(f"{what}: {text} would put every address on the local link")
    return prefix


def _address(value, what, version):
    addr = validate.gateway(value, what, version)  # one address of that family, host-usable
    if addr is None:
        raise Failure(f"{what}: empty")
    return addr


def _nameserver(value, what, version=None):
    found = validate.addresses(value, what)
    if len(found) != 1:
        raise Failure(f"{what}: {value.strip()[:60]!r} is more than one address")
    if version is not None and found[0].version != version:
        raise Failure(f"{what}: {found[0]} is not an IPv{version} address")
    return found[0]


def _prefix6(value, what) -> int:
    text = (value or "").strip()
    if not (text.isdigit() and len(text) <= 3 and 1 <= int(text) <= 128):
        raise Failure(f"{what}: {text[:40]!r} is not an IPv6 prefix length (1 to 128)")
    return int(text)


def _dns_pair(values, primary_key, secondary_key, version, default=None, where=None):
    where = where or _xenstore
    dns = []
    primary = values.get(primary_key)
    if primary not in (None, ""):
        dns.append(_nameserver(primary, where(primary_key), version))
    elif default is not None:
        dns.append(default)
    secondary = values.get(secondary_key)
    if secondary not in (None, ""):
        second = _nameserver(secondary, where(secondary_key), version)
        if second not in dns:
            dns.append(second)
    return tuple(dns)


def _xenstore(key):
    return f"XenStore {key}"


def guest_net(values: dict, names=None):
    """The values under their XenStore names (None when absent) ->
    :class:`GuestNet`, or None when there is no ``qubes_ip`` (not a
    networked guest). ``names`` ({name: QubesDB path}) gives the real keys
    for the messages when the values came from QubesDB. Raises Failure."""
    def where(key):
        return f"QubesDB {names[key]}" if names and key in names else _xenstore(key)

    raw_ip = values.get("qubes_ip")
    if raw_ip is None or not raw_ip.strip():
        return None
    ip = _address(raw_ip, where("qubes_ip"), 4)
    mask = values.get("qubes_netmask")
    prefix = netmask_prefix(DEFAULT_NETMASK if mask in (None, "") else mask, where("qubes_netmask"))
    if prefix < 31:
        import ipaddress

        net = ipaddress.IPv4Network(f"{ip}/{prefix}", strict=False)
        if ip in (net.network_address, net.broadcast_address):
            raise Failure(f"{where('qubes_ip')}: {ip} is the network or broadcast address of {net}")
    gw = validate.gateway(values.get("qubes_gateway"), where("qubes_gateway"), 4)
    if gw is not None and gw == ip:
        raise Failure(f"{where('qubes_gateway')}: {gw} is the guest's own address")
    dns = _dns_pair(values, "qubes_primary_dns", "qubes_secondary_dns", 4, default=gw, where=where)
    ip6 = validate.gateway(values.get("qubes_ip6"), where("qubes_ip6"), 6)
    gw6 = validate.gateway(values.get("qubes_gateway6"), where("qubes_gateway6"), 6)
    if gw6 is not None and ip6 is None:
        raise Failure(f"{where('qubes_gateway6')} is set but {(names or {}).get('qubes_ip6', 'qubes_ip6')} is not")
    if gw6 is not None and gw6 == ip6:
        raise Failure(f"{where('qubes_gateway6')}: {gw6} is the guest's own address")
    mask6 = values.get("qubes_netmask6")
    prefix6 = 128 if mask6 in (None, "") else _prefix6(mask6, where("qubes_netmask6"))
    # Validated even without qubes_ip6 (a typo is reported, not hidden), but
    # used only with it: a guest without an IPv6 address cannot reach them.
    dns6 = _dns_pair(values, "qubes_primary_dns6", "qubes_secondary_dns6", 6, where=where)
    no_route, no_dns, no_pin = (validate.switch(values.get(k), where(k))
                                for k in (SWITCH_NO_DEFAULT_ROUTE, SWITCH_NO_DNS, SWITCH_NO_MAC_PIN))
    return GuestNet(
        ip=ip, prefix=prefix, gateway=gw, dns=() if no_dns else dns, ip6=ip6, gateway6=gw6,
        dns6=() if no_dns or ip6 is None else dns6, default_route=not no_route,
        configure_dns=not no_dns, gateway_mac=None if no_pin else GATEWAY_MAC, prefix6=prefix6)


def without_ipv6(net: GuestNet) -> GuestNet:
    """The plan for an interface with IPv6 disabled: nothing IPv6 at all."""
    return net._replace(ip6=None, gateway6=None, dns6=())


def nameservers(net: GuestNet) -> tuple:
    """All nameservers in resolver order: IPv4 first (what every guest
    has), then IPv6."""
    return tuple(net.dns) + tuple(net.dns6)


def render_batch(net: GuestNet, ifname: str, ipv6: bool = True, stale=(), stale_neigh=(), stale_routes=()) -> list:
    """``ip -batch`` lines. Address first, then stale addresses out (after
    the new one is in, so the interface is never without one), then link up
    (IPv4 routes on a down link fail with ENETDOWN) in the uplink group,
    then the gateway's pinned MAC (before any route can send to it, so the
    first packet already goes to the real gateway), then routes.
    ``stale_neigh`` are addresses whose pinned entries go; ``stale_routes``
    are ``route del`` arguments (a default route the plan no longer has)."""
    n = ifname
    if not ipv6:
        net = without_ipv6(net)
    lines = [f"addr replace {net.ip}/{net.prefix} dev {n}"]
    if net.ip6 is not None:
        # The address is dom0's to give and unique by construction; DAD would
        # only keep it unusable for a second after every boot.
        lines.append(f"addr replace {net.ip6}/{net.prefix6} dev {n} nodad")
    lines += [f"addr del {a} dev {n}" for a in stale]
    lines.append(f"link set dev {n} up group {UPLINK_GROUP}")
    lines += [f"neigh del {a} dev {n}" for a in stale_neigh]
    if net.gateway_mac:
        for gw in (net.gateway, net.gateway6):
            if gw is not None:
                lines.append(f"neigh replace {gw} lladdr {net.gateway_mac} nud permanent dev {n}")
    lines += [f"route del {r} dev {n}" for r in stale_routes]
    if net.gateway is not None:
        lines.append(f"route replace {net.gateway}/32 dev {n} scope link")
        if net.default_route:
            lines.append(f"route replace default via {net.gateway} dev {n} onlink")
    if net.gateway6 is not None:
        lines.append(f"route replace {net.gateway6}/128 dev {n}")
        if net.default_route:
            # "::/0", not "default": a batch line cannot carry -6, the prefix
            # tells ip the family.
            lines.append(f"route replace ::/0 via {net.gateway6} dev {n} onlink")
    return lines


def render_remove(ifname: str) -> list:
    """``ip -batch`` lines of ``remove``: link down first (no packet leaves
    through a half-removed uplink from here on; the kernel drops the
    routes, neighbour entries and, unless keep_addr_on_down, the IPv6
    addresses with it), then flushes of what it keeps or what a sysctl may
    have kept: global addresses, permanent neighbour entries, routes in any
    table; the uplink group back to the default. Flushes succeed on an empty
    list, so the batch holds whatever the link had left."""
    n = ifname
    return [f"link set dev {n} down group 0", f"addr flush dev {n} scope global",
            f"neigh flush dev {n} nud permanent", f"route flush dev {n} table all"]


def render_resolv(net: GuestNet, names=None) -> str:
    """resolv.conf; ``names`` as for :func:`guest_net` (the header names the
    keys the servers came from)."""
    keys = ["qubes_primary_dns", "qubes_secondary_dns"] + (
        ["qubes_primary_dns6", "qubes_secondary_dns6"] if net.dns6 else [])
    if names:
        origin = "QubesDB (" + ", ".join(names[k] for k in keys if k in names) + ")."
    else:
        origin = "XenStore (" + ", ".join(keys) + ")."
    lines = ["# Written by qubes-setup-ip from " + origin]
    lines += [f"nameserver {a}" for a in nameservers(net)]
    return "\n".join(lines) + "\n"


def resolvectl_argv(net: GuestNet, ifname: str) -> list:
    """Hand the nameservers to systemd-resolved for this link: a guest whose
    resolv.conf is resolved's stub (127.0.0.53) then still asks DNS1/DNS2."""
    return ["resolvectl", "dns", ifname, *map(str, nameservers(net))]


# ----------------------------------------------------------------------------
# What is there now (read-only)


# What the interface has now: ``up``; ``addresses`` ("10.137.0.12/32", ...,
# scope global, not dynamic); ``routes4`` {(dest, mask, gateway, metric)} and
# ``routes6`` {(dest, plen, nexthop, metric)} of this interface; ``group``
# (as ``ip`` prints it); ``neighbours`` {(address, lladdr)} of the permanent
# entries on it.
Current = namedtuple("Current", "up addresses routes4 routes6 group neighbours", defaults=("0", frozenset()))


def _hex4(text):
    import ipaddress

    return ipaddress.IPv4Address(int.from_bytes(bytes.fromhex(text), "little"))


def _routes4(proc_text: str, ifname: str) -> frozenset:
    found = set()
    for line in proc_text.splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[0] == ifname:
            found.add((_hex4(f[1]), _hex4(f[7]), _hex4(f[2]), int(f[6])))
    return frozenset(found)


def _routes6(proc_text: str, ifname: str) -> frozenset:
    import ipaddress

    found = set()
    for line in proc_text.splitlines():
        f = line.split()
        if len(f) >= 10 and f[9] == ifname:
            found.add((ipaddress.IPv6Address(int(f[0], 16)), int(f[1], 16),
                       ipaddress.IPv6Address(int(f[4], 16)), int(f[5], 16)))
    return frozenset(found)


def probe(s: System, ifname: str) -> Current:
    return probe_result(probe_start(s, ifname), ifname)


PROBE_BATCH = "addr show dev {n}\nneigh show dev {n} nud permanent\n"


def probe_start(s: System, ifname: str):
    """Start the read-only ``ip`` probe (addresses and link, permanent
    neighbours: one process); it runs while XenStore is read."""
    return s.start(["ip", "-j", "-batch", "-"], PROBE_BATCH.format(n=ifname), readonly=True)


def probe_result(started, ifname: str) -> Current:
    import ipaddress

    res = started.wait()
    try:
        arrays = json_arrays(res.stdout)
        link, neigh = arrays[0][0], arrays[1]
    except (ValueError, IndexError):
        raise Failure(f"ip -j -batch (addr show, neigh show dev {ifname}): unexpected output") from None
    addresses = tuple(
        f"{a['local']}/{a['prefixlen']}"
        for a in link.get("addr_info", ())
        if a.get("scope") == "global" and a.get("family") in ("inet", "inet6") and not a.get("dynamic")
    )
    neighbours = frozenset(
        (ipaddress.ip_address(e["dst"]), e.get("lladdr", "").lower())
        for e in neigh if "dst" in e and "PERMANENT" in e.get("state", ())
    )
    return Current(
        up="UP" in link.get("flags", ()),
        addresses=addresses,
        routes4=_routes4(System.read("/proc/net/route", ""), ifname),
        routes6=_routes6(System.read("/proc/net/ipv6_route", ""), ifname),
        group=str(link.get("group", "")),
        neighbours=neighbours,
    )


def stale_addresses(net: GuestNet, current: Current, ipv6: bool) -> tuple:
    """Global addresses left on the interface from an earlier configuration
    (a changed qubes_ip): they would keep answering for the old address."""
    import ipaddress

    wanted = {f"{net.ip}/{net.prefix}"}
    if net.ip6 is not None and ipv6:
        wanted.add(f"{net.ip6}/{net.prefix6}")
    stale = []
    for a in current.addresses:
        iface = ipaddress.ip_interface(a)
        if f"{iface.ip}/{iface.network.prefixlen}" not in wanted:
            stale.append(a)
    return tuple(stale)


def _wanted_neighbours(net: GuestNet, ipv6: bool) -> set:
    if not net.gateway_mac:
        return set()
    gws = [net.gateway] + ([net.gateway6] if ipv6 else [])
    return {(gw, net.gateway_mac) for gw in gws if gw is not None}


def stale_neighbours(net: GuestNet, current: Current, ipv6: bool) -> tuple:
    """Pinned entries (permanent, the backend MAC) for an address that is no
    longer a gateway of the plan (a changed qubes_gateway, pinning switched
    off): they would keep a stale answer for that address forever."""
    wanted = {addr for addr, _ in _wanted_neighbours(net, ipv6)}
    return tuple(sorted((a for a, mac in current.neighbours if mac == GATEWAY_MAC and a not in wanted), key=str))


def stale_routes(net: GuestNet, current: Current, ipv6: bool) -> tuple:
    """``route del`` arguments for routes an earlier run made that the plan
    no longer has: the host route to an old gateway (known as ours by its
    pinned entry, which :func:`stale_neighbours` removes too), and default
    routes via the plan's gateways when disable-default-route is set."""
    import ipaddress

    out = []
    any4, any6 = ipaddress.IPv4Address(0), ipaddress.IPv6Address(0)
    host4 = ipaddress.IPv4Address("255.255.255.255")
    for old in stale_neighbours(net, current, ipv6):
        if old in (net.gateway, net.gateway6):
            continue  # still a gateway, only no longer pinned: its route stays
        if old.version == 4 and (old, host4, any4, 0) in current.routes4:
            out.append(f"{old}/32")
        elif old.version == 6 and any(d == old and p == 128 and h == any6 for d, p, h, _ in current.routes6):
            out.append(f"{old}/128")
    if net.default_route:
        return tuple(out)
    if net.gateway is not None and any(d == any4 and m == any4 and g == net.gateway for d, m, g, _ in current.routes4):
        out.append(f"default via {net.gateway}")
    if ipv6 and net.gateway6 is not None and any(
            d == any6 and p == 0 and h == net.gateway6 for d, p, h, _ in current.routes6):
        out.append(f"::/0 via {net.gateway6}")
    return tuple(out)


def in_place(net: GuestNet, current: Current, ipv6: bool) -> bool:
    """Whether the interface already is exactly as the batch would make it."""
    import ipaddress

    if not current.up or current.group != UPLINK_GROUP or stale_addresses(net, current, ipv6):
        return False
    if stale_neighbours(net, current, ipv6) or stale_routes(net, current, ipv6):
        return False
    if not _wanted_neighbours(net, ipv6) <= current.neighbours:
        return False
    have = set(current.addresses)
    if f"{net.ip}/{net.prefix}" not in have:
        return False
    any4 = ipaddress.IPv4Address(0)
    if net.gateway is not None:
        host = (net.gateway, ipaddress.IPv4Address("255.255.255.255"), any4, 0)
        default = (any4, any4, net.gateway, 0)
        if host not in current.routes4 or (net.default_route and default not in current.routes4):
            return False
    if net.ip6 is not None and ipv6:
        if f"{net.ip6}/{net.prefix6}" not in have:
            return False
        if net.gateway6 is not None:
            any6 = ipaddress.IPv6Address(0)
            r = current.routes6
            # the kernel reports a route without metric as 1024 for IPv6
            if not any(d == net.gateway6 and p == 128 and h == any6 for d, p, h, _ in r):
                return False
            if net.default_route and not any(d == any6 and p == 0 and h == net.gateway6 for d, p, h, _ in r):
                return False
    return True


def resolved_running(socket_path: str = RESOLVED_SOCKET) -> bool:
    """systemd-resolved is running: its Varlink socket accepts a connection
    (microseconds; no process, no D-Bus)."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(0.5)
        sock.connect(socket_path)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def points_into_resolved(path: str) -> bool:
    """resolv.conf is a symlink to one of resolved's files (its stub, or its
    list of upstreams): resolved serves it, so it stays as it is."""
    try:
        target = os.readlink(path)
    except OSError:
        return False
    target = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), target))
    return (target + "/").startswith(RESOLVED_DIR) or target.startswith(RESOLVED_DIR)


# ----------------------------------------------------------------------------
# resolv.conf


# The file is written by files.AtomicWrite: prepared (temporary file, or
# a descriptor for a mount point) before the network is touched, committed
# after.


# ----------------------------------------------------------------------------
# Apply


def _run_hook(s: System, log: Log, hook: str):
    if not (hook and os.path.isfile(hook) and os.access(hook, os.X_OK)):
        log.debug(f"no executable hook at {hook}")
        return
    try:
        s.run([hook])
        log.debug(f"hook {hook} done")
    except Failure as exc:
        log.warning(f"hook {hook} failed (ignored): {exc}")


def run(interface=None, env=None, dry_run=False, resolv_conf=None, hook=None, log=None, out=None,
        action="add", pin_gateway_mac=True) -> int:
    """One run -> exit status (0 configured / removed / nothing to do, 1 failed)."""
    env = os.environ if env is None else env
    log = log or Log(TAG, env)
    if dry_run:
        log.stderr_only = True  # a dry run leaves no trace in syslog or the hotplug log
    s = System(dry_run=dry_run, out=out, log=log, env=env)
    try:
        if action == "remove":
            return _remove(s, log, interface, env)
        if action != "add":
            raise Failure(f"action: {action!r} is not add or remove")
        return _run(s, log, interface, env, resolv_conf, hook, pin_gateway_mac)
    except Failure as exc:
        log.error(str(exc))
        return 1
    finally:
        log.close()


def _interface(interface, env):
    name = interface or env.get("INTERFACE") or DEFAULT_INTERFACE
    return validate.ifname(name, "interface")


def _run(s, log, interface, env, resolv_conf, hook, pin_gateway_mac) -> int:
    name = _interface(interface, env)
    resolv_conf = resolv_conf or env.get("QUBES_SETUP_IP_RESOLV_CONF") or DEFAULT_RESOLV_CONF
    hook = hook if hook is not None else (env.get("QUBES_SETUP_IP_HOOK") or DEFAULT_HOOK)

    exists = s.iface_exists(name)
    started = probe_start(s, name) if exists else None
    try:
        source, values, names = read_values(env, name)
    except BaseException:
        if started:
            started.wait(check=False)  # leave nothing running behind us
        raise
    current = probe_result(started, name) if started else None
    log.debug(f"configuration: {source[0]} ({source[1]})")
    s.note(f"configuration: {source[0]} ({source[1]})")
    log.debug(f"{source[0]}: " + " ".join(f"{k}={v}" for k, v in values.items() if v is not None))
    net = guest_net(values, names)
    if net is None:
        where = f"{names['qubes_ip']} in QubesDB" if names else "qubes_ip in XenStore"
        log.info(f"{name}: no {where}, nothing to configure")
        return 0
    if not pin_gateway_mac:
        net = net._replace(gateway_mac=None)
    if not exists:
        raise Failure(f"interface {name} does not exist")
    ipv6 = System.ipv6_enabled(name)
    if net.ip6 is not None and not ipv6:
        log.info(f"IPv6 is disabled on {name}: qubes_ip6 {net.ip6} is not configured")
        net = without_ipv6(net)

    if names and validate.switch(values.get("network-manager"), f"QubesDB {names['network-manager']}"):
        if s.which("nmcli") is not None:
            _network_manager(s, log, name, net, env)
            _provide_network(s, log, env, net, values, resolv_conf, hook)
            return 0
        log.info("the network-manager service is on but nmcli is not installed: configured here")

    batch = render_batch(net, name, ipv6, stale_addresses(net, current, ipv6),
                         stale_neighbours(net, current, ipv6), stale_routes(net, current, ipv6))
    link_changes = not in_place(net, current, ipv6)

    # DNS: resolv.conf, and systemd-resolved when it runs. Decided (and the
    # file prepared) before the network is touched.
    resolved = net.configure_dns and bool(nameservers(net)) and resolved_running()
    text = None
    if not net.configure_dns:
        log.info(f"{SWITCH_NO_DNS} is set: resolv.conf and systemd-resolved left alone")
    elif not nameservers(net):
        log.info("no nameserver (neither qubes_primary_dns nor qubes_gateway): resolv.conf left alone")
    elif resolved and points_into_resolved(resolv_conf):
        log.debug(f"{resolv_conf} points into {RESOLVED_DIR}: resolved serves it, not rewritten")
    else:
        text = render_resolv(net, names)
    dns_changes = text is not None and System.read(resolv_conf) != text
    if resolved and not s.dry_run and s.which("resolvectl") is None:
        raise Failure("systemd-resolved is running but resolvectl is not on PATH (install systemd-resolved)")

    if s.dry_run:
        print(f"# {TAG} {name} (dry run: nothing is changed)", file=s.out)
    pending = None
    try:
        if dns_changes and not s.dry_run:
            pending = AtomicWrite(s, resolv_conf, text)
        if link_changes:
            s.run(["ip", "-batch", "-"], "".join(line + "\n" for line in batch))
        else:
            s.note(f"{name} already has its address, routes and pinned gateway: no ip batch to run")
        if dns_changes:
            if s.dry_run:
                how = ("in place: a mount point, truncate + write + fsync" if is_mount_point(resolv_conf)
                       else "temporary file + rename")
                print(f"$ write {resolv_conf} ({how}) <<'EOF'\n{text}EOF", file=s.out)
            else:
                how = pending.commit()
                pending = None
                log.debug(f"{resolv_conf} written ({how})")
        elif text is not None:
            s.note(f"{resolv_conf} already names {' '.join(map(str, nameservers(net)))}: not rewritten")
    finally:
        if pending is not None:
            pending.close()
    if resolved:
        # Every run: resolved forgets a link's servers when it restarts or
        # the link is re-created; setting them again is idempotent.
        s.run(resolvectl_argv(net, name))

    what = f"{net.ip}/{net.prefix}" + (f" via {net.gateway}" if net.gateway else "")
    what += f" {net.ip6}/128" if net.ip6 is not None else ""
    if not net.default_route:
        what += " (no default route)"
    if link_changes or dns_changes:
        log.info(f"{name}: configured {what}, nameservers {' '.join(map(str, nameservers(net))) or 'none'}"
                 + (" (also to systemd-resolved)" if resolved else ""))
    else:
        log.info(f"{name}: unchanged ({what})")
    if names is not None:
        _provide_network(s, log, env, net, values, resolv_conf, hook)
    elif link_changes or dns_changes:
        _run_hook(s, log, hook)
    return 0


def read_values(env, ifname) -> tuple:
    """-> (source (name, reason), values under the XenStore names, names):
    ``names`` is {XenStore name: QubesDB path} when the values came from
    QubesDB (Qubes' keys: /net-config/MAC/ for this interface's MAC first,
    else /qubes-*), None for XenStore (:data:`KEYS`, one round trip)."""
    from .config import choose

    source = choose(env)
    if source[0] == "qubesdb":
        from .config import guest_values

        values, names = guest_values(env, interface_mac(ifname))
        return source, values, names
    from .xs import XenStore

    with XenStore(env) as xs:
        return source, xs.read_many(KEYS), None


def interface_mac(ifname):
    """The interface's MAC as QubesDB's /net-config/MAC/ spells it (lower
    case), or None when there is no such interface (or no sane MAC)."""
    text = (System.read(f"/sys/class/net/{ifname}/address", "") or "").strip().lower()
    parts = text.split(":")
    if len(parts) == 6 and all(len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts):
        return text
    return None


def _provide_network(s, log, env, net, values, resolv_conf, hook):
    """QubesDB's /qubes-netvm-network is non-empty: this qube gives network
    to others. As Qubes' setup-ip does then: the DNAT of the virtual
    nameservers to this qube's own (unless disable-dns-server), then the
    change hook; a qube that provides no network runs neither."""
    if not (values.get("qubes_netvm_network") or "").strip():
        return
    if net.configure_dns:
        from . import dnat
        from .log import Log

        opts = dnat.Options(resolv_conf=resolv_conf, dry_run=s.dry_run)
        rc = dnat.run(opts, env, out=s.out, log=Log(dnat.PROG, env, stderr_only=s.dry_run))
        if rc not in (0, 100):
            raise Failure(f"{dnat.PROG} failed (exit {rc}): the interface is configured, the virtual "
                          "nameservers are not translated")
    _run_hook(s, log, hook)


# ----------------------------------------------------------------------------
# NetworkManager (Qubes' network-manager service)

NM_DIR = "/etc/NetworkManager/system-connections"


def nm_keyfile_path(ifname, env=None) -> str:
    directory = (env or {}).get("QUBES_SETUP_IP_NM_DIR") or NM_DIR
    return os.path.join(directory, f"qubes-uplink-{ifname}")


def render_nm_keyfile(net: GuestNet, ifname: str, mac: str) -> str:
    """The keyfile Qubes' setup-ip gives NetworkManager for the uplink (same
    name, id and uuid, so it replaces Qubes' own): static addresses, the
    gateways unless disable-default-route, the nameservers unless
    disable-dns-server."""
    uuid = "de85f79b-8c3d-405f-a652-" + mac.replace(":", "")
    lines = ["[802-3-ethernet]", "duplex=full", "", "[ethernet]", f"mac-address={mac}", "",
             "[connection]", f"id=VM uplink {ifname}", f"uuid={uuid}", "type=802-3-ethernet", ""]
    gw = f";{net.gateway}" if net.default_route and net.gateway is not None else ""
    lines += ["[ipv4]", "method=manual", "may-fail=false"]
    if net.configure_dns and net.dns:
        lines.append("dns=" + "".join(f"{a};" for a in net.dns))
    lines += [f"addresses1={net.ip};{net.prefix}{gw}", ""]
    if net.ip6 is not None:
        gw6 = f";{net.gateway6}" if net.default_route and net.gateway6 is not None else ""
        lines += ["[ipv6]", "method=manual", "may-fail=false", f"addresses1={net.ip6};{net.prefix6}{gw6}", ""]
    else:
        lines += ["[ipv6]", "method=ignore", ""]
    return "\n".join(lines)


def _network_manager(s, log, name, net, env):
    """NetworkManager configures the uplink (Qubes' network-manager service
    with nmcli installed): its keyfile, written (0600, NetworkManager
    ignores others) and loaded when it changed; here only the uplink group
    and the pinned gateway MAC, as Qubes' setup-ip does."""
    mac = interface_mac(name)
    if mac is None:
        raise Failure(f"interface {name}: no MAC address to name in the NetworkManager keyfile")
    path = nm_keyfile_path(name, env)
    text = render_nm_keyfile(net, name, mac)
    lines = [f"link set dev {name} group {UPLINK_GROUP}"]
    if net.gateway_mac:
        lines += [f"neigh replace {gw} lladdr {net.gateway_mac} nud permanent dev {name}"
                  for gw in (net.gateway, net.gateway6) if gw is not None]
    if s.dry_run:
        print(f"$ write {path} (mode 0600) <<'EOF'\n{text}EOF", file=s.out)
    elif System.read(path) != text:
        AtomicWrite(s, path, text, mode=0o600).commit()
    else:
        s.note(f"{path} unchanged")
        text = None
    s.run(["ip", "-batch", "-"], "".join(line + "\n" for line in lines))
    if text is not None:
        res = s.run(["nmcli", "connection", "load", path], check=False)
        if res.code != 0:
            log.warning(f"nmcli connection load {path} failed (exit {res.code}): NetworkManager "
                        "reads the keyfile when it next starts")
    log.info(f"{name}: handed to NetworkManager ({path}), uplink group and pinned gateway set")


def _remove(s, log, interface, env) -> int:
    name = _interface(interface, env)
    keyfile = nm_keyfile_path(name, env)
    if os.path.lexists(keyfile):
        # as Qubes' setup-ip: a keyfile left behind would give the next
        # interface of that name a stale duplicate connection
        s.before_change(["rm", keyfile])
        if s.dry_run:
            print(f"$ rm {keyfile}", file=s.out)
        else:
            os.unlink(keyfile)
    if not s.iface_exists(name):
        # udev's remove comes after the kernel dropped the interface: its
        # addresses, routes and neighbour entries went with it.
        log.info(f"{name}: gone, nothing left to remove")
        return 0
    if s.dry_run:
        print(f"# {TAG} remove {name} (dry run: nothing is changed)", file=s.out)
    s.run(["ip", "-batch", "-"], "".join(line + "\n" for line in render_remove(name)))
    resolved = resolved_running()
    if resolved:
        s.run(["resolvectl", "revert", name])
    log.info(f"{name}: removed (link down; addresses, routes, pinned gateway entries gone"
             + ("; resolved's servers for it reverted)" if resolved else ")"))
    return 0


# ----------------------------------------------------------------------------
# Entry points

_command = None


def split_words(words) -> tuple:
    """``[add|remove] [INTERFACE]`` -> (action, interface or None)."""
    words = list(words)
    if len(words) > 2:
        raise ValueError(f"at most two words (ACTION INTERFACE), got {len(words)}")
    if len(words) == 2:
        if words[0] not in ACTIONS:
            raise ValueError(f"{words[0]!r} is not an action (add or remove)")
        return words[0], words[1]
    if words and words[0] in ACTIONS:
        return words[0], None
    return "add", (words[0] if words else None)


def command():
    """The click command (built on first use: the fast path never imports click)."""
    global _command
    if _command is not None:
        return _command
    import click

    @click.command(
        help="Configure this guest's Xen network interface from XenStore (or QubesDB on today's Qubes): address, "
        "uplink group, pinned gateway MAC, gateway and default route, IPv6, /etc/resolv.conf "
        "(and systemd-resolved when it runs), then run the change hook if anything changed; "
        "'remove' takes the interface down and removes all of that. systemd runs it as "
        "qubes-setup-ip add INTERFACE / remove INTERFACE (qubes-setup-ip@INTERFACE.service, "
        "pulled in by udev)." + ENV_HELP,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )
    @click.argument("words", nargs=-1, metavar="[add|remove] [INTERFACE]")
    @click.option("-n", "--dry-run", is_flag=True,
                  help="Print the ip batch and the resolv.conf text it would write; change nothing, log "
                  "nothing to syslog.")
    @click.option("-v", "--verbose", is_flag=True, help="Log every action to stderr.")
    @click.option("--resolv-conf", metavar="PATH", default=None,
                  help=f"resolv.conf to write (default {DEFAULT_RESOLV_CONF}).")
    @click.option("--hook", metavar="PATH", default=None,
                  help=f"executable run after a change (default {DEFAULT_HOOK}; '' for none).")
    @click.option("--no-pin-gateway-mac", is_flag=True,
                  help=f"no permanent neighbour entry ({GATEWAY_MAC}) for the gateways: for a backend "
                  f"with a custom MAC (the XenStore key {SWITCH_NO_MAC_PIN}=1 does the same).")
    @click.version_option(package_name="vif-route-qubes", message="%(prog)s %(version)s")
    def setup_ip(words, dry_run, verbose, resolv_conf, hook, no_pin_gateway_mac):
        try:
            action, interface = split_words(words)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        log = Log(TAG, os.environ, verbose=verbose, stderr_only=dry_run)
        sys.exit(run(interface, os.environ, dry_run=dry_run, resolv_conf=resolv_conf, hook=hook, log=log,
                     action=action, pin_gateway_mac=not no_pin_gateway_mac))

    _command = setup_ip
    return _command


def _plain_form(argv) -> bool:
    return len(argv) <= 2 and not any(a.startswith("-") for a in argv) and (
        len(argv) < 2 or argv[0] in ACTIONS)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # click's shell completion calls the program with no arguments and this
    # variable set: it must reach click, not configure the interface.
    if _plain_form(argv) and "_QUBES_SETUP_IP_COMPLETE" not in os.environ:
        action, interface = split_words(argv)
        sys.exit(run(interface, os.environ, action=action))
    command().main(args=argv, prog_name=TAG)
