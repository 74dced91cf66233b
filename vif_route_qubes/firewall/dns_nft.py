"""qubes-setup-dnat-to-ns, nft backend: the DNS DNAT plan as one ``nft -f -``
transaction, in the layout of Qubes' nftables-era netvm.

What it owns, in table ``ip qubes`` and, for IPv6 virtual nameservers,
``ip6 qubes``, two base chains and nothing else:

* ``dnat-dns`` (nat, prerouting, priority dstnat): exactly Qubes' chain:
  DNSi -> its upstream, or ``drop`` when there is none.
* ``dnat-dns-guard`` (filter, prerouting, priority dstnat + 10, so after
  the translation): drops DNS still addressed to a virtual nameserver. The
  drop in ``dnat-dns`` alone is not enough: a nat chain only sees packets
  conntrack tracks, and conntrack is switched on in a network namespace
  only by something that needs it (a ``dnat`` rule does; a chain of drops
  does not). On a netvm where nothing else uses conntrack, Qubes'
  no-upstream chain is silently skipped and the queries leak out of the
  default route (found by tests/test_dnat_netns.py). A filter chain
  needs no conntrack. A virtual nameserver that is itself an upstream (a
  netvm behind another netvm, whose resolv.conf names DNS1/DNS2) is passed
  through untranslated and not guarded: the next netvm translates it.

The ``qubes`` tables may hold the hotplug script's sets and chains (or
Qubes' own), so a table is only ever *added* (``add table`` leaves an
existing one as it is), never flushed, deleted or redefined.

The chains are replaced the way Qubes replaces ``dnat-dns``: ``add chain``
(so the ``delete`` cannot fail on a first run), ``delete chain``, then the
chain declared anew with its rules, all in one transaction for both
families: no packet sees an empty or half-filled chain, and a failure
changes nothing.

"Already right" is decided from one ``nft --terse list ruleset`` (terse: the
hotplug script's set elements are not printed), comparing our chains line
by line with the text nft would print for what we would write.
"""

from ..errors import CommandFailed

NAME = "nft"
CHAIN = "dnat-dns"
GUARD = "dnat-dns-guard"
CHAINS = (CHAIN, GUARD)
FAMILY = {4: "ip", 6: "ip6"}
HEADERS = {CHAIN: "type nat hook prerouting priority dstnat; policy accept;",
           GUARD: "type filter hook prerouting priority dstnat + 10; policy accept;"}
OWNED = (f"chains {CHAIN} and {GUARD} in tables ip qubes and ip6 qubes "
         "(no other chain, no table is ever flushed or deleted)")


def chain_rules(version, pairs):
    """{chain: its lines exactly as ``nft list`` prints them}."""
    word = FAMILY[version]
    upstreams = {to for _, to in pairs}
    out = {CHAIN: [HEADERS[CHAIN]], GUARD: [HEADERS[GUARD]]}
    for dns, to in pairs:
        for proto in ("udp", "tcp"):
            match = f"{word} daddr {dns} {proto} dport 53"
            if to is None:
                out[CHAIN].append(f"{match} drop")
            elif to != dns:
                out[CHAIN].append(f"{match} dnat to {to}")
            if dns not in upstreams:
                out[GUARD].append(f"{match} drop")
    return out


def parse_ruleset(text):
    """{4: {chain: lines} (only our chains that exist), 6: ...} from
    ``nft -t list ruleset``: ``dnat-dns`` and ``dnat-dns-guard`` in
    ``ip qubes`` / ``ip6 qubes``."""
    found = {4: {}, 6: {}}
    tables = {f"table {w} qubes {{": v for v, w in FAMILY.items()}
    version, lines, depth, name = None, None, 0, None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if depth == 0:
            version = tables.get(line)
            if line.endswith("{"):
                depth = 1
            continue
        if line.endswith("{"):
            depth += 1
            name = line[6:-2] if line.startswith("chain ") else None
            if depth == 2 and version is not None and name in CHAINS:
                lines = []
            continue
        if line == "}":
            depth -= 1
            if depth == 1 and lines is not None:
                found[version][name], lines = lines, None
            continue
        if lines is not None:
            lines.append(line)
    return found


def render(plan, current):
    """The ``nft -f -`` payload turning ``current`` (:func:`parse_ruleset`)
    into ``plan`` ({4: pairs, 6: pairs}); "" when it is already right. A
    family whose plan is empty loses our chains (its table stays)."""
    out = []
    for version in (4, 6):
        fam, pairs, have = FAMILY[version], plan[version], current[version]
        if not pairs:
            out += [f"delete chain {fam} qubes {name}" for name in CHAINS if name in have]
            continue
        wanted = chain_rules(version, pairs)
        if have == wanted:
            continue
        out.append(f"add table {fam} qubes")
        for name in CHAINS:
            out += [f"add chain {fam} qubes {name}", f"delete chain {fam} qubes {name}"]
        out.append(f"table {fam} qubes {{")
        for name in CHAINS:
            out.append(f"\tchain {name} {{")
            out += [f"\t\t{line}" for line in wanted[name]]
            out.append("\t}")
        out.append("}")
    return "\n".join(out) + "\n" if out else ""


class Listing:
    def __init__(self, s):
        self.started = s.start(["nft", "--terse", "list", "ruleset"], readonly=True)

    def wait(self):
        return self.started.wait(check=False)


def _current(result):
    if result.code != 0:
        raise CommandFailed(result.argv, result.code, result.stderr)
    return parse_ruleset(result.stdout)


def changes(s, plan, result):
    payload = render(plan, _current(result))
    return [(["nft", "-f", "-"], payload)] if payload else []


def in_force(result):
    if result.code != 0:
        msg = f"(cannot read: nft exited {result.code}: {result.stderr.strip()[:200]})"
        return {4: [msg], 6: [msg]}
    current = parse_ruleset(result.stdout)
    shown = {}
    for v in (4, 6):
        shown[v] = []
        for name in CHAINS:
            if name in current[v]:
                shown[v] += [f"{name}: {line}" for line in current[v][name]]
            else:
                shown[v].append(f"(no chain {name} in table {FAMILY[v]} qubes)")
    return shown
