"""The pure half of vif-route-qubes: a validated :class:`Vif` in, plain data
and text out (``ip -batch`` lines, conntrack argv
lists, sysctl writes). No I/O here, so all of it is tested without root and
the dry run prints exactly what the real run feeds to the commands.

The firewall's rules are rendered by the backends of
:mod:`vif_route_qubes.firewall` (iptables, nft) from the same :class:`Vif`.
"""

from collections import namedtuple

VIF_GROUP = 2  # Qubes puts every vif in interface group 2


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


# ``ip -batch`` lines and (path, value) sysctl writes for one interface.
LinkPlan = namedtuple("LinkPlan", "batch sysctls undo_batch")


def sysctl_path(version: int, name: str, key: str) -> str:
    return f"/proc/sys/net/ipv{version}/conf/{name}/{key}"


def link_online(vif: Vif, ipv6: bool) -> LinkPlan:
    """What online does to the link, in the order that keeps it safe: the
    caller has already installed the anti-spoofing rules; the link comes up
    with its neighbour entries pinned; routes and the gateway address last,
    so nothing is routed to the guest before it is fully described."""
    n, m = vif.name, vif.metric
    batch = [f"link set dev {n} group {VIF_GROUP}", f"link set dev {n} up"]
    sysctls = [(sysctl_path(4, n, "proxy_arp"), "1")]
    for a in vif.addresses:
        if a.version == 6 and not ipv6:
            continue
        if vif.mac:
            batch.append(f"neigh replace {a} lladdr {vif.mac} dev {n} nud permanent")
    for a in vif.addresses:
        if a.version == 6 and not ipv6:
            continue
        batch.append(f"route replace {host(a)} dev {n} metric {m}")
    if vif.gateway is not None:
        batch.append(f"addr replace {host(vif.gateway)} dev {n}")
    if vif.gateway6 is not None and ipv6:
        batch.append(f"addr replace {host(vif.gateway6)} dev {n} nodad")
        sysctls.append((sysctl_path(6, n, "proxy_ndp"), "1"))
    return LinkPlan(batch=tuple(batch), sysctls=tuple(sysctls), undo_batch=link_offline(vif, ipv6).batch)


def link_offline(vif: Vif, ipv6: bool) -> LinkPlan:
    """The inverse of :func:`link_online`, for ``ip -force -batch``.

    Order matters twice over. Routes go before the gateway address: removing
    a device's last IPv4 address makes the kernel flush every route through
    it, and the explicit deletes after that would fail. There is no
    ``neigh del``: taking the link down flushes the device's neighbour
    entries (permanent ones too), and ``ip neigh`` exits the whole batch on
    an error even under ``-force``, which an already-flushed entry would be.
    """
    n, m = vif.name, vif.metric
    batch = []
    for a in vif.addresses:
        if a.version == 6 and not ipv6:
            continue
        batch.append(f"route del {host(a)} dev {n} metric {m}")
    if vif.gateway6 is not None and ipv6:
        batch.append(f"addr del {host(vif.gateway6)} dev {n}")
    if vif.gateway is not None:
        batch.append(f"addr del {host(vif.gateway)} dev {n}")
    batch += [f"link set dev {n} down", f"link set dev {n} group 0"]
    sysctls = [(sysctl_path(4, n, "proxy_arp"), "0")]
    if vif.gateway6 is not None and ipv6:
        sysctls.append((sysctl_path(6, n, "proxy_ndp"), "0"))
    return LinkPlan(batch=tuple(batch), sysctls=tuple(sysctls), undo_batch=())


def conntrack_purges(addresses) -> tuple:
    """One ``conntrack -D`` per address and direction: flows of a previous
    owner of the address must not survive into the new guest's."""
    calls = []
    for a in addresses:
        fam = ["-f", "ipv6"] if a.version == 6 else []
        calls.append(("conntrack", "-D", *fam, "-s", str(a)))
        calls.append(("conntrack", "-D", *fam, "-d", str(a)))
    return tuple(calls)


def render_batch(lines) -> str:
    return "".join(line + "\n" for line in lines)
