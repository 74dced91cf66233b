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

The chains that differ from what they should be (only ``dnat-dns`` when
the upstreams change) are replaced the way Qubes replaces ``dnat-dns``:
``add chain`` (so the ``delete`` cannot fail on a first run), ``delete
chain``, then the chain declared anew with its rules, all in one
transaction for both families: no packet sees an empty or half-filled chain, and a failure
changes nothing.

"Already right" is decided from one ``nft -j --terse list ruleset`` (terse:
the hotplug script's set elements are not listed), read by :mod:`.nftjson`
as the anti-spoofing reads its listing, comparing our chains line by line
with the text nft would print for what we would write.
"""

from ..errors import CommandFailed, Failure
from .nftjson import Ruleset

NAME = "nft"
CHAIN = "dnat-dns"
GUARD = "dnat-dns-guard"
CHAINS = (CHAIN, GUARD)
FAMILY = {4: "ip", 6: "ip6"}
HEADERS = {CHAIN: "type nat hook prerouting priority dstnat; policy accept;",
           GUARD: "type filter hook prerouting priority dstnat + 10; policy accept;"}
# as ``nft list`` prints them: a plain reject is ICMP(v6) port unreachable
REFUSE = {"udp": "reject", "tcp": "reject with tcp reset"}
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
            if to is not None and to != dns:
                out[CHAIN].append(f"{match} dnat to {to}")
            if to is None:
                # no upstream of this family: refused at once (port
                # unreachable, a TCP reset), so the guest's resolver moves
                # to its next server now instead of after its timeout
                out[GUARD].append(f"{match} {REFUSE[proto]}")
            elif dns not in upstreams:
                out[GUARD].append(f"{match} drop")
    return out


def parse_ruleset(text):
    """{4: {chain: lines} (only our chains that exist), 6: ...} from
    ``nft -j --terse list ruleset``, read by :mod:`.nftjson` (as the
    anti-spoofing reads it): ``dnat-dns`` and ``dnat-dns-guard`` in
    ``ip qubes`` / ``ip6 qubes``, each as ``nft list`` prints it."""
    have = Ruleset.parse(text)
    found = {}
    for version, fam in FAMILY.items():
        found[version] = {name: have.listing(fam, name) for name in CHAINS if (fam, name) in have.chains}
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
        # only the chains that differ: a change of upstreams leaves the
        # guard as it is (its rules depend on DNS1/DNS2 and on whether the
        # family has an upstream at all), and a base chain not replaced is
        # one hook the kernel need not unregister and register again
        stale = [name for name in CHAINS if have.get(name) != wanted[name]]
        if not stale:
            continue
        out.append(f"add table {fam} qubes")
        for name in stale:
            out += [f"add chain {fam} qubes {name}", f"delete chain {fam} qubes {name}"]
        out.append(f"table {fam} qubes {{")
        for name in stale:
            out.append(f"\tchain {name} {{")
            out += [f"\t\t{line}" for line in wanted[name]]
            out.append("\t}")
        out.append("}")
    return "\n".join(out) + "\n" if out else ""


class Listing:
    def __init__(self, s):
        self.started = s.start(["nft", "-j", "--terse", "list", "ruleset"], readonly=True)

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
    try:
        current = parse_ruleset(result.stdout)
    except Failure as exc:
        return {4: [f"(cannot read: {exc})"], 6: [f"(cannot read: {exc})"]}
    shown = {}
    for v in (4, 6):
        shown[v] = []
        for name in CHAINS:
            if name in current[v]:
                shown[v] += [f"{name}: {line}" for line in current[v][name]]
            else:
                shown[v].append(f"(no chain {name} in table {FAMILY[v]} qubes)")
    return shown
