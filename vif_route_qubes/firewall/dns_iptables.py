"""qubes-setup-dnat-to-ns, iptables backend: the DNS DNAT plan rendered as
``iptables-restore`` / ``ip6tables-restore --noflush`` payloads.

Per family (``iptables`` for IPv4 virtual nameservers, ``ip6tables`` for
IPv6 ones), the same two chains:

* ``vrq-dnat-dns`` in the nat table, jumped to once from PREROUTING: DNSi ->
  its upstream. Replaced in one ``*nat`` commit: declaring ``:CHAIN - [0:0]``
  flushes and refills it inside a single table commit, so no packet ever
  sees an empty or half-filled chain.
* ``vrq-dns-guard`` in the filter table, jumped to first from FORWARD: drops
  DNS to DNSi. With no upstream there is no DNAT, and the query would follow
  the default route out to whatever network the netvm is on; this is what
  stops that leak. DROP inside the nat chain is refused by iptables-nft and
  iptables-legacy alike ("The nat table is not intended for filtering").
  Dropping in raw or mangle would have to be switched together with the nat
  rules, in a second table, and both flavours commit each ``*table`` of a
  payload separately (checked: a failing second table leaves the first one
  applied), so that would not be atomic. In FORWARD, after DNAT, a translated
  packet no longer carries DNSi as destination: the guard stays in place for
  good, its content depends on DNS1/DNS2 only, and changing upstreams touches
  one table. Dropped packets never confirm a conntrack entry, so the first
  query after an upstream appears is translated normally.

"Already right" is decided from one ``iptables-save`` per family (read by
:mod:`.xtables`, as the anti-spoofing reads it), compared line by line with what would be written (rules rendered exactly as
iptables-save prints them, jumps present exactly once). The two families are
two commands and commit separately; the nft backend is the one that commits
both at once.
"""

from ..errors import CommandFailed
from .xtables import Table, parse_save

NAME = "iptables"
NAT_CHAIN = "vrq-dnat-dns"
GUARD_CHAIN = "vrq-dns-guard"
# (table, our chain, built-in chain it is jumped to from); the guard first:
# on a first run, or a change of DNS1/DNS2, nothing is translated before it
# is in place.
SECTIONS = (("filter", GUARD_CHAIN, "FORWARD"), ("nat", NAT_CHAIN, "PREROUTING"))
OWNED = f"chains {GUARD_CHAIN} (filter FORWARD) and {NAT_CHAIN} (nat PREROUTING), iptables and ip6tables"


def _match(dns, proto):
    # exactly as iptables-save prints it, so "already right" is a text compare
    return f"-d {dns}/{dns.max_prefixlen} -p {proto} -m {proto} --dport 53"


def nat_rules(pairs):
    """Rule lines of the nat chain for ``pairs`` [(DNSi, upstream or None)].
    An upstream that is DNSi itself (a netvm behind another netvm, whose
    resolv.conf names DNS1/DNS2) needs no rule: the next netvm translates."""
    return [f"-A {NAT_CHAIN} {_match(dns, proto)} -m comment --comment DNS{i} -j DNAT --to-destination {to}"
            for i, (dns, to) in enumerate(pairs, 1) if to is not None and to != dns for proto in ("udp", "tcp")]


def _refuse(dns, proto):
    # as iptables-save prints it
    if proto == "tcp":
        return "REJECT --reject-with tcp-reset"
    return "REJECT --reject-with " + ("icmp-port-unreachable" if dns.version == 4 else "icmp6-port-unreachable")


def guard_rules(pairs):
    """Rule lines of the filter chain: whatever still goes to DNSi in FORWARD
    was not translated. Without an upstream of its family it is refused at
    once (port unreachable, a TCP reset: the guest's resolver tries its next
    server now, not after a timeout); otherwise dropped. A DNSi that is
    itself an upstream is passed through to the next netvm, so not guarded."""
    upstreams = {to for _, to in pairs}
    return [f"-A {GUARD_CHAIN} {_match(dns, proto)} -m comment --comment DNS{i} -j "
            + (_refuse(dns, proto) if to is None else "DROP")
            for i, (dns, to) in enumerate(pairs, 1) if dns not in upstreams for proto in ("udp", "tcp")]


def wanted_rules(pairs):
    """{table: rule lines}, or None: nothing of ours in this family."""
    return {"filter": guard_rules(pairs), "nat": nat_rules(pairs)} if pairs else None


def render(wanted, tables):
    """The ``--noflush`` restore payload turning ``tables`` (parsed
    iptables-save of one family) into ``wanted`` (:func:`wanted_rules`);
    "" when they are equal. Only tables that differ appear. ``wanted`` None
    removes our chains and jumps (the nat chain first: while anything of
    ours remains, an untranslated query is dropped, never forwarded)."""
    out = []
    sections = SECTIONS if wanted is not None else tuple(reversed(SECTIONS))
    for table, chain, hook in sections:
        cur = tables.get(table) or Table()
        jump = f"-A {hook} -j {chain}"
        jumps = cur.rules.count(jump)
        if wanted is None:
            if chain not in cur.chains and not jumps:
                continue
            out += [f"*{table}"]
            if chain in cur.chains:
                out += [f":{chain} - [0:0]"]
            out += [f"-D {hook} -j {chain}"] * jumps
            if chain in cur.chains:
                out += [f"-X {chain}"]
            out += ["COMMIT"]
            continue
        if chain in cur.chains and jumps == 1 and cur.chain(chain) == wanted[table]:
            continue
        out.append(f"*{table}")
        out.append(f":{chain} - [0:0]")  # creates, or flushes what is there
        if jumps == 0:
            out.append(f"-I {hook} 1 -j {chain}")
        out.extend([f"-D {hook} -j {chain}"] * max(0, jumps - 1))
        out.extend(wanted[table])
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


class Listing:
    """Both families' iptables-save, started together (they run while
    XenStore and resolv.conf are read)."""

    def __init__(self, s):
        self.s = s
        self.started = {v: s.start([s.iptables(v, "save")], readonly=True) for v in (4, 6)}

    def wait(self):
        """{4: result, 6: result} (Result; code non-zero when it failed)."""
        return {v: st.wait(check=False) for v, st in self.started.items()}


def _tables(results, version, needed):
    res = results[version]
    if res.code == 0:
        return parse_save(res.stdout)
    if needed:
        raise CommandFailed(res.argv, res.code, res.stderr)
    # IPv6 off in the kernel, say, and nothing of ours wanted there
    return {}


def changes(s, plan, results):
    """[(argv, payload)] turning what is in force into ``plan`` ({4: pairs,
    6: pairs}); [] when it is already right."""
    calls = []
    for version in (4, 6):
        tables = _tables(results, version, needed=bool(plan[version]))
        payload = render(wanted_rules(plan[version]), tables)
        if payload:
            calls.append((s.restore(version), payload))
    return calls


def in_force(results):
    """{version: lines} of what is in force, for ``--status``."""
    shown = {}
    for version in (4, 6):
        res = results[version]
        if res.code != 0:
            shown[version] = [f"(cannot read: {res.argv[0]} exited {res.code}: {res.stderr.strip()[:200]})"]
            continue
        tables = parse_save(res.stdout)
        lines = []
        for table, chain, hook in SECTIONS:
            cur = tables.get(table) or Table()
            lines += [f"{table}: {r}" for r in cur.rules if r == f"-A {hook} -j {chain}"]
            lines += [f"{table}: {r}" for r in cur.chain(chain)]
            if chain not in cur.chains:
                lines.append(f"{table}: (chain {chain} does not exist)")
        shown[version] = lines
    return shown
