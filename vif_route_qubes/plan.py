"""The pure half of vif-route-qubes: a validated :class:`Vif` in, plain data
and text out (``ip -batch`` lines, conntrack argv
lists, sysctl writes). No I/O here, so all of it is tested without root and
the dry run prints exactly what the real run feeds to the commands.

The firewall's rules are rendered by the backends of
:mod:`vif_route_qubes.firewall` (iptables, nft) from the same :class:`Vif`.
"""

from collections import namedtuple

VIF_GROUP = 2  # Qubes puts every vif in interface group 2
UPLINK_GROUP = 1  # and a qube's own uplink (eth0) in group 1

# What a vif with IPv6 may send from a link-local source (fe80::/10) or the
# unspecified one (::, duplicate address detection), before and beside its
# own addresses: neighbour discovery (RFC 4861: router solicitation and
# advertisement, neighbour solicitation and advertisement, 133-136) and
# multicast listener discovery (RFC 2710: 130-132; RFC 3810's MLDv2 report,
# 143), as neutron's anti-spoofing allows. Nothing else: an echo request or
# a redirect from fe80:: is a guest speaking for an address that is not its
# own. Both firewall backends render this one list.
LINK_SOURCES6 = ("fe80::/10", "::/128")
LINK_ICMP6_TYPES = (130, 131, 132, 133, 134, 135, 136, 143)


def metric_for(domid: int) -> int:
    """Current Qubes: 32752 - domid, so a newer domain's route to a reused
    address wins (lower metric) over a dying one's."""
    return 32752 - domid


def host(addr) -> str:
    return f"{addr}/{addr.max_prefixlen}"


# namedtuples rather than dataclasses: ``dataclasses`` imports ``inspect``,
# a noticeable share of a hotplug run's start-up (benchmarks/README.md).
_VifBase = namedtuple(
    "_VifBase", "name domid devid vif_type mac addresses gateway gateway6 xenbus_path",
    defaults=(0, "vif", None, (), None, None, None),
)


class Vif(_VifBase):
    """Everything online/offline needs to know about one interface."""

    __slots__ = ()

    @property
    def metric(self) -> int:
        return metric_for(self.domid)

    def family(self, version: int) -> tuple:
        return tuple(a for a in self.addresses if a.version == version)


# ----------------------------------------------------------------------------
# The link side: what of ours the kernel shows on a vif, and the ``ip -batch``
# lines that take it from there to exactly what the inputs say.

# ``pre`` runs before the firewall changes (it only removes), ``batch`` after;
# ``sysctls`` are the wanted values, written where the kernel differs.
LinkPlan = namedtuple("LinkPlan", "pre batch sysctls")

# What of ours one ``ip -j -batch`` shows on an interface. "Ours" has the
# shapes online makes and nothing wider: host routes (/32, /128) in the main
# table that the kernel did not make, permanent neighbour entries, global
# host addresses (the gateway), the link's up flag and group 2. A route or
# address an administrator put there with another shape is left alone.
VifState = namedtuple("VifState", "up group routes neigh addrs")


def read_queries(name: str) -> str:
    """The ``ip -j -batch -`` text that reads a vif's state in one process.
    The IPv6 route query is explicit ("root ::/0") for iproute2 versions
    whose ``table all`` lists IPv4 only; duplicates are dropped on parsing."""
    return render_batch([
        f"addr show dev {name}",
        f"route show table all dev {name}",
        f"route show table all root ::/0 dev {name}",
        f"neigh show dev {name} nud permanent",
    ])


def vif_state(arrays) -> VifState:
    """Parse the four JSON arrays :func:`read_queries` produces."""
    from ipaddress import ip_interface

    links, routes4, routes6, neigh = arrays
    link = links[0] if links else {}
    routes = set()
    for r in list(routes4) + list(routes6):
        if r.get("protocol") == "kernel" or r.get("type", "unicast") != "unicast":
            continue
        if r.get("table", "main") != "main" or r.get("dst", "default") == "default":
            continue
        try:
            dst = ip_interface(r["dst"])
        except ValueError:
            continue
        if dst.network.prefixlen != dst.max_prefixlen:
            continue
        routes.add((host(dst.ip), int(r.get("metric", 0))))
    addrs = set()
    for ai in link.get("addr_info", ()):
        if ai.get("scope") != "global":
            continue
        a = ip_interface(f"{ai['local']}/{ai['prefixlen']}")
        if a.network.prefixlen == a.max_prefixlen:
            addrs.add(host(a.ip))
    entries = set()
    for n in neigh:
        if "PERMANENT" in n.get("state", ()) and n.get("dst"):
            entries.add((n["dst"], (n.get("lladdr") or "").lower()))
    group = str(link.get("group", "0"))
    return VifState(up="UP" in link.get("flags", ()), group=group,
                    routes=tuple(sorted(routes)), neigh=tuple(sorted(entries)), addrs=tuple(sorted(addrs)))


NOTHING = VifState(up=False, group="0", routes=(), neigh=(), addrs=())


def sysctl_path(version: int, name: str, key: str) -> str:
    return f"/proc/sys/net/ipv{version}/conf/{name}/{key}"


# Qubes' network/81-qubes.conf.optional, as its vif-route-qubes applies it
# when dom0 enables the service harden-network-interfaces (systemd-sysctl
# with the prefixes conf/all and conf/VIF: the wildcard lines for both,
# nothing else of the file): no redirects, no source routing, no router
# advertisements, autoconfiguration or duplicate address detection, no
# unicast in L2 multicast.
HARDENING = {
    4: (("accept_source_route", "0"), ("accept_redirects", "0"), ("secure_redirects", "0"),
        ("send_redirects", "0"), ("drop_unicast_in_l2_multicast", "1")),
    6: (("accept_source_route", "-1"), ("accept_redirects", "0"), ("accept_ra", "0"),
        ("accept_dad", "0"), ("autoconf", "0"), ("drop_unicast_in_l2_multicast", "1")),
}


def hardening(name: str, ipv6: bool) -> tuple:
    """(path, value) of the hardening sysctls for vif ``name`` and ``all``."""
    return tuple((sysctl_path(v, conf, key), value)
                 for conf in ("all", name) for v in ((4, 6) if ipv6 else (4,))
                 for key, value in HARDENING[v])


def wanted(vif: Vif, ipv6: bool) -> VifState:
    """The state of ours a clean ``online`` of ``vif`` leaves (None: nothing)."""
    if vif is None:
        return NOTHING
    routed = [a for a in vif.addresses if a.version == 4 or ipv6]
    addrs = []
    if vif.gateway is not None:
        addrs.append(host(vif.gateway))
    if vif.gateway6 is not None and ipv6:
        addrs.append(host(vif.gateway6))
    return VifState(
        up=True, group=str(VIF_GROUP),
        routes=tuple(sorted((host(a), vif.metric) for a in routed)),
        neigh=tuple(sorted((str(a), vif.mac.lower()) for a in routed)) if vif.mac else (),
        addrs=tuple(sorted(addrs)),
    )


def converge(name: str, vif, ipv6: bool, have: VifState) -> LinkPlan:
    """Lines that take interface ``name`` from ``have`` to exactly ``vif``'s
    clean-online state (``vif`` None: to nothing of ours).

    Order matters three times over. Stale routes and neighbour entries go in
    ``pre``, before the firewall changes: a route to an address must never
    exist without the rules that guard it. Addresses are added before stale
    ones are deleted, and routes are (re)added after both: removing a
    device's last IPv4 address makes the kernel flush every route through
    it. Only entries the kernel showed are deleted: ``ip neigh`` ends the
    whole batch on an error, even under ``-force``.
    """
    want = wanted(vif, ipv6)
    metric_of = dict(want.routes)
    pre = [f"route del {d} dev {name} metric {m}" for d, m in have.routes if metric_of.get(d) != m]
    want_neigh = {a for a, _ in want.neigh}
    pre += [f"neigh del {a} dev {name}" for a, _ in have.neigh if a not in want_neigh]
    batch = []
    if vif is None:
        pre += [f"addr del {a} dev {name}" for a in have.addrs]
        if have.up:
            pre.append(f"link set dev {name} down")
        if have.group == str(VIF_GROUP):
            pre.append(f"link set dev {name} group 0")
    else:
        batch += [f"link set dev {name} group {VIF_GROUP}", f"link set dev {name} up"]
        for a in want.addrs:
            batch.append(f"addr replace {a} dev {name}" + (" nodad" if ":" in a else ""))
        batch += [f"addr del {a} dev {name}" for a in have.addrs if a not in want.addrs]
        batch += [f"neigh replace {a} lladdr {mac} dev {name} nud permanent" for a, mac in want.neigh]
        batch += [f"route replace {d} dev {name} metric {m}" for d, m in want.routes]
    on = vif is not None
    sysctls = [(sysctl_path(4, name, "proxy_arp"), "1" if on else "0")]
    if ipv6:
        ndp = on and vif.gateway6 is not None
        sysctls.append((sysctl_path(6, name, "proxy_ndp"), "1" if ndp else "0"))
    return LinkPlan(pre=tuple(pre), batch=tuple(batch), sysctls=tuple(sysctls))


def describe_removal(pre) -> list:
    """``pre`` lines of a converge to nothing, as what they removed."""
    words = {"route": "route", "neigh": "neighbour entry", "addr": "address"}
    out = []
    for line in pre:
        parts = line.split()
        if parts[1] == "del":
            out.append(f"{words[parts[0]]} {parts[2]}")
        elif parts[-1] == "down":
            out.append("link up")
        elif parts[-2] == "group":
            out.append(f"group {VIF_GROUP}")
    return out


def conntrack_purges(addresses) -> tuple:
    """One ``conntrack -D`` per address and direction: flows of a previous
    owner of the address must not survive into the new guest's."""
    calls = []
    for a in addresses:
        fam = ["-f", "ipv6"] if a.version == 6 else []
        calls.append(("conntrack", "-D", *fam, "-s", str(a)))
        calls.append(("conntrack", "-D", *fam, "-d", str(a)))
    return tuple(calls)


def json_arrays(text) -> list:
    """The JSON values ``ip -j -batch`` prints one after another (one array
    per command) -> a list of them. ValueError on anything else."""
    import json

    dec, pos, out = json.JSONDecoder(), 0, []
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return out
        value, pos = dec.raw_decode(text, pos)
        out.append(value)


def render_batch(lines) -> str:
    return "".join(line + "\n" for line in lines)
