"""qubes-setup-dnat-to-ns, nft backend: the DNS DNAT plan as one ``nft -f -``
transaction, in the layout of Qubes' nftables-era netvm.

What it owns: the base chain ``dnat-dns`` (nat, prerouting, priority dstnat)
in table ``ip qubes`` and, for IPv6 virtual nameservers, the same chain in
table ``ip6 qubes``. Nothing else: the ``qubes`` tables may hold the hotplug
script's sets and chains (or Qubes' own), so a table is only ever *added*
(``add table`` leaves an existing one as it is), never flushed, deleted or
redefined. No guard chain is needed: nft, unlike iptables' nat table,
accepts ``drop`` in a nat chain, so the no-upstream drop sits in
``dnat-dns`` itself, as in Qubes.

The chain is replaced the way Qubes replaces it: ``add chain`` (so the
``delete`` cannot fail on a first run), ``delete chain``, then the chain
declared anew with its rules, all in one transaction for both families: no
packet sees an empty or half-filled chain, and a failure changes nothing.

"Already right" is decided from one ``nft --terse list ruleset`` (terse: the
hotplug script's set elements are not printed), comparing our chains line
by line with the text nft would print for what we would write.
"""

from ..errors import CommandFailed

NAME = "nft"
CHAIN = "dnat-dns"
FAMILY = {4: "ip", 6: "ip6"}
HEADER = "type nat hook prerouting priority dstnat; policy accept;"
OWNED = f"chain {CHAIN} in tables ip qubes and ip6 qubes (no other chain, no table is ever flushed or deleted)"


def chain_rules(version, pairs):
    """The chain's lines exactly as ``nft list`` prints them."""
    word = FAMILY[version]
    lines = [HEADER]
    for dns, to in pairs:
        for proto in ("udp", "tcp"):
            verdict = f"dnat to {to}" if to is not None else "drop"
            lines.append(f"{word} daddr {dns} {proto} dport 53 {verdict}")
    return lines


def parse_ruleset(text):
    """{4: chain lines or None (no chain), 6: ...} from ``nft -t list
    ruleset``: the lines of ``dnat-dns`` in ``ip qubes`` / ``ip6 qubes``."""
    found = {4: None, 6: None}
    tables = {f"table {w} qubes {{": v for v, w in FAMILY.items()}
    version, lines, depth = None, None, 0
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
            if depth == 2 and version is not None and line == f"chain {CHAIN} {{":
                lines = []
            continue
        if line == "}":
            depth -= 1
            if depth == 1 and lines is not None:
                found[version], lines = lines, None
            continue
        if lines is not None:
            lines.append(line)
    return found


def render(plan, current):
    """The ``nft -f -`` payload turning ``current`` (:func:`parse_ruleset`)
    into ``plan`` ({4: pairs, 6: pairs}); "" when it is already right. A
    family whose plan is empty loses our chain (its table stays)."""
    out = []
    for version in (4, 6):
        fam, pairs, have = FAMILY[version], plan[version], current[version]
        if not pairs:
            if have is not None:
                out.append(f"delete chain {fam} qubes {CHAIN}")
            continue
        wanted = chain_rules(version, pairs)
        if have == wanted:
            continue
        out += [f"add table {fam} qubes", f"add chain {fam} qubes {CHAIN}", f"delete chain {fam} qubes {CHAIN}",
                f"table {fam} qubes {{", f"\tchain {CHAIN} {{"]
        out += [f"\t\t{line}" for line in wanted]
        out += ["\t}", "}"]
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
    return {v: current[v] if current[v] is not None else [f"(no chain {CHAIN} in table {FAMILY[v]} qubes)"]
            for v in (4, 6)}
