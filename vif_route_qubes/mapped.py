"""Mapped addresses (Qubes' "fake IP", used for disposables): the guest
lives with its *visible* address and gateway while everything outside the
netvm's vif sees its *real* address.

As Qubes' ``vif-qubes-nat.sh`` does it, and in the same names, so a netvm
moved between the two finds its own things::

    netvm                          namespace VIF-nat
    VIF (veth, fe:ff:ff:ff:ff:ff) <-> VIF-p (veth, the guest's MAC)
      routes, guard, gateway           |  stateless NAT at netdev ingress
      as for any vif                   VIF (the real Xen vif) <-> guest

The real vif moves into a namespace of its own; a veth pair joins that
namespace to the netvm, and the netvm end takes the vif's name, so the rest
of online (routes, neighbour entries, anti-spoofing elements) happens to it
unchanged, for the real address. In the namespace one ``netdev`` table
rewrites addresses at ingress and forwards the packet straight to the other
device (``fwd to``: no routing, no forwarding sysctl, no conntrack); its
chains' policy is drop, so a source the guest has no right to never leaves
the namespace, and the netvm's anti-spoofing still checks what does.

Beyond Qubes (its script drops IPv6 as soon as it maps, Qubes issue 6216):

* an address without a mapping passes unchanged (IPv6 keeps working for a
  disposable whose IPv4 address is mapped);
* an IPv6 address is mapped too when ``/mapped-ip/REAL6/visible-ip`` (and
  ``visible-gateway``) name one: the same key layout, keyed by the real
  IPv6 address as ``ipaddress`` prints it (QubesDB allows ``:`` in paths).

Everything here is plain data and text (tested without root); the hotplug
applies it through :class:`vif_route_qubes.system.System`: one ``ip
-batch`` in the netvm (namespace, move, veth), one ``nft -f -`` and one
``ip -batch`` in the namespace.
"""

import os
from collections import namedtuple

from .errors import Failure
from .plan import host

NETNS_SUFFIX = "-nat"
PEER_SUFFIX = "-p"
# netback's MAC: every guest's gateway neighbour entry points at it
# (qubes-setup-ip), so the netvm end of the veth pair must carry it too
# for the guest's frames, forwarded untouched, to be addressed to it.
NETBACK_MAC = "fe:ff:ff:ff:ff:ff"
TABLE = "antispoof"  # netdev family, in the namespace: the name Qubes uses
NETNS_DIR = "/run/netns"
ND_TYPES = "{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }"

# real, visible: addresses of one family; gateway: what the guest uses as
# its gateway (the visible one), or None
Mapping = namedtuple("Mapping", "real visible gateway")
# name: the vif (and the netvm end of the veth); mac: the guest's;
# maps: Mappings whose visible address differs; passthrough: addresses that
# pass unchanged; gateways: the netvm's gateway addresses (the namespace's
# neighbour entries for them, as Qubes makes)
MappedVif = namedtuple("MappedVif", "name mac maps passthrough gateways")


def netns_name(name: str) -> str:
    return name + NETNS_SUFFIX


def peer_name(name: str) -> str:
    return name + PEER_SUFFIX


def netns_exists(name: str) -> bool:
    """The vif's NAT namespace is there (a file test: no process)."""
    return os.path.exists(os.path.join(NETNS_DIR, netns_name(name)))


def mapping_for(vif, found):
    """``vif`` (a plan.Vif) and ``found`` = {real address: (visible,
    visible gateway)} as validated from the configuration -> MappedVif, or
    None when no address of the vif is mapped to a different one (Qubes
    writes ``visible-ip`` for every qube, equal to the real one unless it
    is hidden). Raises Failure on a mapping that cannot work."""
    maps, passthrough = [], []
    for a in vif.addresses:
        visible, gateway = found.get(a, (None, None))
        if visible is None or gateway is None or visible == a:
            passthrough.append(a)
            continue
        if visible.version != a.version or gateway.version != a.version:
            raise Failure(f"mapped-ip {a}: visible address {visible} or gateway {gateway} "
                          f"is not an IPv{a.version} address")
        if visible in vif.addresses:
            raise Failure(f"mapped-ip {a}: visible address {visible} is also a real address of {vif.name}")
        maps.append(Mapping(a, visible, gateway))
    if not maps:
        return None
    if len(peer_name(vif.name)) > 15 or len(netns_name(vif.name)) > 255:
        raise Failure(f"{vif.name}: name too long for its NAT interface {peer_name(vif.name)}")
    if not vif.mac:
        raise Failure(f"{vif.name}: the guest's MAC is needed for its NAT")
    gateways = tuple(g for g in (vif.gateway, vif.gateway6) if g is not None)
    return MappedVif(vif.name, vif.mac.lower(), tuple(maps), tuple(passthrough), gateways)


def record_of(m):
    """A MappedVif as JSON-able data (the state record, status)."""
    if m is None:
        return None
    return {"maps": [[str(x.real), str(x.visible), str(x.gateway)] for x in m.maps],
            "passthrough": [str(a) for a in m.passthrough]}


def from_record(vif, rec):
    """The inverse of :func:`record_of`, for ``vif`` (a plan.Vif from the
    same state record) -> MappedVif, or None (no NAT, or a record this
    release cannot read: then there is none to rebuild)."""
    from ipaddress import ip_address

    if not rec or not vif.mac:
        return None
    try:
        maps = tuple(Mapping(*map(ip_address, x)) for x in rec["maps"])
        passthrough = tuple(ip_address(a) for a in rec.get("passthrough") or ())
    except (KeyError, TypeError, ValueError):
        return None
    if not maps:
        return None
    gateways = tuple(g for g in (vif.gateway, vif.gateway6) if g is not None)
    return MappedVif(vif.name, vif.mac.lower(), maps, passthrough, gateways)


def guest_addresses(m, version=None):
    """What the guest uses as its own addresses: visible ones for mapped
    addresses, real ones for those that pass through."""
    out = [x.visible for x in m.maps] + list(m.passthrough)
    return [a for a in out if version is None or a.version == version]


# ----------------------------------------------------------------------------
# Rendering


def outer_batch(m) -> list:
    """``ip -batch`` lines for the netvm: the namespace, the real vif into
    it, and the veth pair whose netvm end takes the vif's name. The
    namespace end is created inside the namespace (``netns`` on the first
    device), so no moment has two devices of one name in one namespace."""
    ns, peer = netns_name(m.name), peer_name(m.name)
    return [
        f"netns add {ns}",
        f"link set dev {m.name} netns {ns}",
        f"link add name {peer} address {m.mac} netns {ns} type veth peer name {m.name} address {NETBACK_MAC}",
    ]


def _fam(a):
    return "ip" if a.version == 4 else "ip6"


def nft_payload(m) -> str:
    """The namespace's one table, replaced atomically (add + delete +
    define: a re-run changes it in one transaction, with no moment
    without it). Its chains' policy is drop: a source the guest may not
    use, any protocol but IPv4, IPv6 and ARP, and any address that is
    neither mapped nor passing through go nowhere."""
    vif, peer = m.name, peer_name(m.name)
    out_rules, back_rules = [], []
    for x in m.maps:
        f = _fam(x.real)
        out_rules.append(f"{f} saddr {x.visible} {f} saddr set {x.real} fwd to \"{peer}\"")
        back_rules.append(f"{f} daddr {x.real} {f} daddr set {x.visible} fwd to \"{vif}\"")
    for a in m.passthrough:
        f = _fam(a)
        out_rules.append(f"{f} saddr {a} fwd to \"{peer}\"")
        back_rules.append(f"{f} daddr {a} fwd to \"{vif}\"")
    arp4 = sorted(str(a) for a in guest_addresses(m, 4))
    if arp4:
        # the guest asks for its (visible) gateway; the namespace answers
        out_rules.append("arp htype 1 arp ptype ip arp hlen 6 arp plen 4 "
                         f"arp saddr ether {m.mac} arp saddr ip {{ {', '.join(arp4)} }} accept")
    if guest_addresses(m, 6):
        # duplicate address detection and neighbour discovery from
        # link-local sources stay in the namespace, which answers for the
        # gateway; from the guest's own addresses they are forwarded above
        out_rules.append(f"ip6 saddr {{ fe80::/10, :: }} icmpv6 type {ND_TYPES} accept")
        back_rules.append("icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept")
    back_rules.append("ether type arp accept")
    lines = [f"add table netdev {TABLE}", f"delete table netdev {TABLE}", f"table netdev {TABLE} {{"]
    for chain, dev, rules in (("antispoof", vif, out_rules), ("reverse", peer, back_rules)):
        lines.append(f"\tchain {chain} {{")
        lines.append(f"\t\ttype filter hook ingress device \"{dev}\" priority filter; policy drop;")
        lines += [f"\t\t{r}" for r in rules]
        lines.append("\t\tcounter")
        lines.append("\t}")
    lines.append("}")
    return "".join(line + "\n" for line in lines)


def inner_batch(m) -> list:
    """``ip -batch`` lines run in the namespace: the addresses the
    namespace answers ARP and neighbour discovery for (the guest's gateway
    on the vif, the real addresses on the veth end), Qubes' permanent
    neighbour entries, no IPv6 link-local addresses of its own (nothing in
    the namespace talks but to answer), links up. Written to converge: a
    re-run flushes and rewrites."""
    vif, peer = m.name, peer_name(m.name)
    lines = []
    for dev in (vif, peer):
        lines += [f"link set dev {dev} addrgenmode none", f"addr flush dev {dev}",
                  f"neigh flush dev {dev} nud permanent"]
    gws = sorted({x.gateway for x in m.maps} | {g for g in m.gateways
                                                 if any(a.version == g.version for a in m.passthrough)},
                 key=lambda a: (a.version, a))
    for g in gws:
        lines.append(f"addr add {host(g)} dev {vif}" + (" nodad" if g.version == 6 else ""))
    for a in sorted([x.real for x in m.maps] + list(m.passthrough), key=lambda a: (a.version, a)):
        lines.append(f"addr add {host(a)} dev {peer}" + (" nodad" if a.version == 6 else ""))
    for a in sorted(guest_addresses(m), key=lambda a: (a.version, a)):
        lines.append(f"neigh replace {a} lladdr {m.mac} dev {vif} nud permanent")
    for g in m.gateways:
        lines.append(f"neigh replace {g} lladdr {NETBACK_MAC} dev {peer} nud permanent")
    lines += [f"link set dev {peer} up", f"link set dev {vif} up"]
    return lines


def teardown_batch(name: str, pid: int) -> list:
    """``ip -force -batch`` lines run in the namespace: the veth pair goes
    (its namespace end takes the netvm end with it) and the real vif goes
    back to the netvm (the namespace of ``pid``: ours) under its own name.
    Neither line can touch a device outside the namespace; either may find
    nothing to do (-force: the batch goes on)."""
    return [f"link del dev {peer_name(name)}", f"link set dev {name} netns {pid}"]


# ----------------------------------------------------------------------------
# Applying (through the System seam)


def _ip_in(sys_, ns, lines, force=False, check=True):
    from .plan import render_batch

    argv = ["ip", "-n", ns] + (["-force"] if force else []) + ["-batch", "-"]
    return sys_.run(argv, render_batch(lines), check=check)


def apply(sys_, m):
    """Build (or, when the namespace is there, rebuild) the NAT of ``m``.
    Raises Failure; the caller tears down what a failure left."""
    from .plan import render_batch

    ns = netns_name(m.name)
    there = netns_exists(m.name)
    built = there and _built(sys_, m)
    if there and not built:
        # half a namespace from an interrupted run: start from nothing
        teardown(sys_, m.name)
    if not built:
        sys_.run(["ip", "-batch", "-"], render_batch(outer_batch(m)))
    sys_.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], nft_payload(m))
    _ip_in(sys_, ns, inner_batch(m))


def _built(sys_, m) -> bool:
    """The namespace holds the real vif and the veth end, and the netvm
    end is there: a re-run rewrites their configuration in place."""
    if not os.path.exists(f"/sys/class/net/{m.name}"):
        return False
    res = sys_.run(["ip", "-n", netns_name(m.name), "-o", "link", "show"], readonly=True, check=False)
    names = {line.split(":")[1].strip().split("@")[0] for line in res.stdout.splitlines() if ":" in line}
    return res.code == 0 and {m.name, peer_name(m.name)} <= names


def teardown(sys_, name: str) -> list:
    """Remove ``name``'s NAT: the veth pair, the namespace, and the real vif
    back in the netvm when it still exists. Never raises. -> descriptions."""
    if not netns_exists(name):
        return []
    ns = netns_name(name)
    done = []
    try:
        _ip_in(sys_, ns, teardown_batch(name, os.getpid()), force=True, check=False)
        res = sys_.run(["ip", "netns", "del", ns], check=False)
        if res.code == 0:
            done.append(f"NAT namespace {ns}")
        elif sys_.log:
            sys_.log.warning(f"could not delete namespace {ns}: {res.stderr.strip()}")
    except Failure as exc:
        if sys_.log:
            sys_.log.warning(f"NAT of {name}: {exc}")
    return done
