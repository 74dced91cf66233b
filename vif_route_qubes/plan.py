"""The pure half of vif-route-qubes: a validated :class:`Vif` in, plain data
and text out (iptables-restore payloads, ``ip -batch`` lines, conntrack argv
lists, sysctl writes). No I/O here, so all of it is tested without root and
the dry run prints exactly what the real run feeds to the commands.

Firewall layout (raw table, both iptables and ip6tables, one pair of chains
per interface, owned by name so ``offline`` removes exactly them)::

    PREROUTING -i VIF                      -j vrq-in-VIF   # ingress check
    PREROUTING -m devgroup ! --src-group 2 -j vrq-src-VIF  # our addresses elsewhere
    vrq-in-VIF:  -s ADDR -j RETURN (each address) ; -j DROP
    vrq-src-VIF: -s ADDR -j DROP   (each address)

The ingress chain RETURNs for *every* address of the vif before its single
DROP, so several addresses on one vif all work (the iptables-era shell script
added one ``-i VIF ! -s ADDR -j DROP`` per address, and each dropped the
others). "A non-vif interface" is "not in interface group 2", the group Qubes
gives every vif, rather than ``! -i vif+``: it stays right for interfaces
renamed through XenStore's ``vifname``.
"""

from collections import namedtuple

VIF_GROUP = 2  # Qubes puts every vif in interface group 2
CHAIN_MAX = 28  # xtables chain name limit (XT_EXTENSION_MAXNAMELEN - 1 - ...)


def metric_for(domid: int) -> int:
    """Current Qubes: 32752 - domid, so a newer domain's route to a reused
    address wins (lower metric) over a dying one's."""
    return 32752 - domid


def chains(name: str) -> tuple:
    cin, csrc = f"vrq-in-{name}", f"vrq-src-{name}"
    assert len(csrc) <= CHAIN_MAX, csrc  # ifname() caps names at 15 chars
    return cin, csrc


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


class Firewall(namedtuple("Firewall", "version create replace teardown jumps chain_names")):
    """The rules of one address family, as iptables-restore payload variants.

    ``create`` makes the chains with ``-N`` (fails if they exist, and since
    the chains and their jumps are only ever made and removed together in one
    atomic payload, "exists" means "jumps exist too"). ``replace`` refills
    existing chains and re-adds the jumps with ``-D`` + ``-A`` (fails if a
    jump is missing, so it never duplicates one). ``teardown`` removes both.
    ``jumps`` are the "PREROUTING ..." rule specs, for exact removal.
    """

    __slots__ = ()


def _payload(lines) -> str:
    return "*raw\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"


def firewall(vif: Vif, version: int) -> Firewall:
    cin, csrc = chains(vif.name)
    own = vif.family(version)
    rules = [f"-A {cin} -s {host(a)} -j RETURN" for a in own]
    if version == 6 and own:
        # Neighbour discovery comes from link-local sources, and duplicate
        # address detection from ::, before the guest uses its own address
        # (RFC 4861, RFC 4862); without these the guest never finds its router.
        rules.append(f"-A {cin} -s fe80::/10 -p ipv6-icmp -j RETURN")
        rules.append(f"-A {cin} -s ::/128 -p ipv6-icmp -j RETURN")
    rules.append(f"-A {cin} -j DROP")
    rules += [f"-A {csrc} -s {host(a)} -j DROP" for a in own]
    jumps = (
        f"PREROUTING -i {vif.name} -m comment --comment vrq-in -j {cin}",
        f"PREROUTING -m devgroup ! --src-group {VIF_GROUP} -m comment --comment vrq-src -j {csrc}",
    )
    create = [f"-N {cin}", f"-N {csrc}", *rules, *(f"-A {j}" for j in jumps)]
    replace = [
        f":{cin} - [0:0]",
        f":{csrc} - [0:0]",
        *rules,
        *(f"-D {j}" for j in jumps),
        *(f"-A {j}" for j in jumps),
    ]
    return Firewall(
        version=version,
        create=_payload(create),
        replace=_payload(replace),
        teardown=teardown_payload(jumps, (cin, csrc)),
        jumps=jumps,
        chain_names=(cin, csrc),
    )


def teardown_payload(jumps, chain_names) -> str:
    lines = [f"-D {j}" for j in jumps]
    lines += [f"-F {c}" for c in chain_names] + [f"-X {c}" for c in chain_names]
    return _payload(lines)


def teardown_from_save(save_text: str, name: str) -> str:
    """Exact removal of whatever of ours ``iptables-save -t raw`` still shows.

    Used when the all-in-one teardown failed because part of it was already
    gone (a hand-deleted rule, a half-finished earlier run): keep only what
    exists, so the removal itself cannot fail on a missing piece.
    """
    cin, csrc = chains(name)
    ours = {cin, csrc}
    present, jumps = set(), []
    for line in save_text.splitlines():
        if line.startswith(":") and line[1:].split(" ", 1)[0] in ours:
            present.add(line[1:].split(" ", 1)[0])
        elif line.startswith("-A ") and line.split()[-1] in ours and line.split()[-2] == "-j":
            if line.split()[1] != cin and line.split()[1] != csrc:
                jumps.append(line[3:])
    if not present and not jumps:
        return ""
    chains_present = tuple(c for c in (cin, csrc) if c in present)
    return teardown_payload(jumps, chains_present)


def addresses_from_save(save_text: str, name: str) -> tuple:
    """The source addresses our src chain drops: the firewall remembers what
    online was given even after XenStore and the state record are gone."""
    _, csrc = chains(name)
    found = []
    for line in save_text.splitlines():
        parts = line.split()
        if parts[:2] == ["-A", csrc] and "-s" in parts:
            found.append(parts[parts.index("-s") + 1])
    return tuple(found)


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
