"""The iptables backend: anti-spoofing as iptables-restore payloads, one
pair of chains per interface in the raw table of both families.

Layout (``iptables`` and ``ip6tables``, table ``raw``)::

    PREROUTING -m devgroup --src-group 2   -j vrq-guard    # once per host
    PREROUTING -m devgroup ! --src-group 2 -j vrq-src-VIF  # our addresses elsewhere
    vrq-guard:   -i VIF -g vrq-in-VIF (each vif, inserted at the top) ; -j DROP
    vrq-in-VIF:  -s ADDR -j RETURN (each address) ; -j DROP
    vrq-src-VIF: -s ADDR -j DROP   (each address)

Default deny: everything from interface group 2 enters ``vrq-guard``, and an
interface without a ``-g`` line of ours there (a run that never finished, a
vif put in the group by hand) meets the guard's final DROP. The ``-g``
(goto) matters: the RETURN of ``vrq-in-VIF`` for an allowed source then
returns to PREROUTING past the guard jump, so everyone else's raw rules still
see the packet. The guard is made by the first online on a host (the payload
that assumes it fails, and the fallback reads ``iptables-save`` and creates
it) and never removed by offline: other vifs and the default deny rely on it.
Removing it by hand, once no vif uses this backend (both families)::

    iptables -t raw -D PREROUTING -m devgroup --src-group 2 -m comment --comment vrq-guard -j vrq-guard
    iptables -t raw -F vrq-guard ; iptables -t raw -X vrq-guard

The ingress chain RETURNs for *every* address of the vif before its single
DROP, so several addresses on one vif all work (the iptables-era shell script
added one ``-i VIF ! -s ADDR -j DROP`` per address, and each dropped the
others). "A non-vif interface" is "not in interface group 2", the group Qubes
gives every vif, rather than ``! -i vif+``: it stays right for interfaces
renamed through XenStore's ``vifname``.

Every packet walks the guard's gotos or the src jumps of every vif, so a
packet's cost grows with the number of guests (benchmarks/README.md); the nft backend's
sets do not. The upper half of this module is pure (payload text in, text
out, tested without root); :class:`Backend` applies it through the
:class:`~vif_route_qubes.system.System` seam.
"""

from collections import namedtuple

from ..errors import CommandFailed, Failure
from ..plan import LINK_ICMP6_TYPES, LINK_SOURCES6, VIF_GROUP, Vif, host
from .contract import VifGuard
from .xtables import Table, parse_save, rule_key

NAME = "iptables"
CHAIN_MAX = 28  # xtables chain name limit (XT_EXTENSION_MAXNAMELEN - 1 - ...)
FAMILIES = (4, 6)


def chains(name: str) -> tuple:
    cin, csrc = f"vrq-in-{name}", f"vrq-src-{name}"
    assert len(csrc) <= CHAIN_MAX, csrc  # ifname() caps names at 15 chars
    return cin, csrc


GUARD = "vrq-guard"
# the one jump into the guard, and its final rule (the default deny)
GUARD_JUMP = f"PREROUTING -m devgroup --src-group {VIF_GROUP} -m comment --comment {GUARD} -j {GUARD}"
GUARD_DROP = f"{GUARD} -j DROP"
# in every payload but the teardown: fails when the guard's jump or its
# DROP is gone (then the fallback rebuilds the guard from iptables-save),
# and keeps the DROP last without moving the jump among others' rules
GUARD_CHECK = (f"-C {GUARD_JUMP}", f"-D {GUARD_DROP}", f"-A {GUARD_DROP}")


class Firewall(namedtuple("Firewall", "version create replace teardown jumps chain_names core")):
    """The rules of one address family, as iptables-restore payload variants.

    ``create`` makes the chains with ``-N`` (fails if they exist, and since
    the chains and their jumps are only ever made and removed together in one
    atomic payload, "exists" means "jumps exist too"). ``replace`` refills
    existing chains and re-adds the jumps with ``-D`` + ``-I``/``-A`` (fails
    if a jump is missing, so it never duplicates one). Both fail when the
    guard is absent or damaged. ``teardown`` removes the vif's chains and
    jumps (never the guard). ``jumps`` are the rule specs that lead into our
    chains (the guard's goto, the src jump), for exact removal; ``core`` the
    lines of ``create`` without the guard check, for the rebuild.
    """

    __slots__ = ()


def _payload(lines) -> str:
    return "*raw\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"


def chain_rules(vif: Vif, version: int) -> list:
    """The ``-A`` lines of our two chains, in the order they must have:
    the RETURNs before the DROP is what lets the guest's own addresses out."""
    cin, csrc = chains(vif.name)
    own = vif.family(version)
    rules = [f"-A {cin} -s {host(a)} -j RETURN" for a in own]
    if version == 6 and own:
        # Neighbour discovery comes from link-local sources, and duplicate
        # address detection from ::, before the guest uses its own address
        # (RFC 4861, RFC 4862); without these the guest never finds its
        # router. Only ND and MLD (plan.LINK_ICMP6_TYPES), one rule per type:
        # xtables' icmp6 match takes one type. Only link-local ICMPv6 walks
        # them: the guest's own addresses RETURN above.
        rules += [f"-A {cin} -s {src} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN"
                  for src in LINK_SOURCES6 for t in LINK_ICMP6_TYPES]
    rules.append(f"-A {cin} -j DROP")
    rules += [f"-A {csrc} -s {host(a)} -j DROP" for a in own]
    return rules


def jump_specs(name: str) -> tuple:
    """The guard's goto into the ingress chain (inserted at the guard's
    top, before its DROP) and the PREROUTING jump into the src chain."""
    cin, csrc = chains(name)
    return (
        f"{GUARD} -i {name} -g {cin}",
        f"PREROUTING -m devgroup ! --src-group {VIF_GROUP} -m comment --comment vrq-src -j {csrc}",
    )


def _add(spec: str) -> str:
    return f"-I {spec}" if spec.startswith(GUARD + " ") else f"-A {spec}"


def firewall(vif: Vif, version: int) -> Firewall:
    cin, csrc = chains(vif.name)
    rules = chain_rules(vif, version)
    jumps = jump_specs(vif.name)
    core = [f"-N {cin}", f"-N {csrc}", *rules, *(_add(j) for j in jumps)]
    replace = [
        f":{cin} - [0:0]",
        f":{csrc} - [0:0]",
        *rules,
        *(f"-D {j}" for j in jumps),
        *(_add(j) for j in jumps),
        *GUARD_CHECK,
    ]
    return Firewall(
        version=version,
        create=_payload(core + list(GUARD_CHECK)),
        replace=_payload(replace),
        teardown=teardown_payload(jumps, (cin, csrc)),
        jumps=jumps,
        chain_names=(cin, csrc),
        core=_payload(core),
    )


def guard_from_save(raw: Table) -> tuple:
    """(lines before, lines after) a vif's ``core`` that make the guard whole
    again from what ``iptables-save -t raw`` shows (parsed): the chain and
    its jump when absent, and exactly one DROP, last."""
    head = []
    if GUARD not in raw.chains:
        head.append(f"-N {GUARD}")
    if rule_key(f"-A {GUARD_JUMP}") not in raw.rules:
        head.append(f"-A {GUARD_JUMP}")
    drops = raw.rules.count(f"-A {GUARD_DROP}")
    return head, [f"-D {GUARD_DROP}"] * drops + [f"-A {GUARD_DROP}"]


def rebuild_payload(raw: Table, fw: Firewall, name: str) -> str:
    """The last resort of apply: remove exactly what is left of the vif's
    rules, make the guard whole, then install the vif (one transaction)."""
    head, tail = guard_from_save(raw)
    core = fw.core.split("\n", 1)[1].rsplit("COMMIT\n", 1)[0].splitlines()
    return merge_payloads(teardown_from_save(raw, name), _payload(head + core + tail))


def teardown_payload(jumps, chain_names) -> str:
    lines = [f"-D {j}" for j in jumps]
    lines += [f"-F {c}" for c in chain_names] + [f"-X {c}" for c in chain_names]
    return _payload(lines)


def teardown_from_save(raw: Table, name: str) -> str:
    """Exact removal of whatever of ours ``iptables-save -t raw`` still shows.

    Used when the all-in-one teardown failed because part of it was already
    gone (a hand-deleted rule, a half-finished earlier run): keep only what
    exists, so the removal itself cannot fail on a missing piece.
    """
    ours = chains(name)
    jumps = [r[3:] for r in raw.into(ours)]
    present = tuple(c for c in ours if c in raw.chains)
    if not present and not jumps:
        return ""
    return teardown_payload(jumps, present)


def addresses_from_save(raw: Table, name: str) -> tuple:
    """The source addresses our src chain drops: the firewall remembers what
    online was given even after XenStore and the state record are gone."""
    found = []
    for rule in raw.chain(chains(name)[1]):
        parts = rule.split()
        if "-s" in parts:
            found.append(parts[parts.index("-s") + 1])
    return tuple(found)


def owners_from_save(raw: Table) -> set:
    """Interface names that have a vrq- chain in this table."""
    names = set()
    for chain in raw.chains:
        for prefix in ("vrq-in-", "vrq-src-"):
            if chain.startswith(prefix):
                names.add(chain[len(prefix):])
    return names


def merge_payloads(first: str, second: str) -> str:
    """Two ``*raw ... COMMIT`` payloads as one transaction."""
    body = lambda p: p.split("\n", 1)[1].rsplit("COMMIT\n", 1)[0] if p else ""  # noqa: E731
    return "*raw\n" + body(first) + body(second) + "COMMIT\n"


def compare(raw: Table, vif, name: str, kind: str) -> list:
    """[(verdict, item, detail)] for one family: our chains, their rules in
    order, our jumps. ``vif`` None: nothing of ours is expected here.

    Order matters inside a chain (a RETURN after the DROP lets nothing
    through), so the rules of each chain are matched as a sequence: the
    longest run of expected rules found in order is ok, an expected rule
    present only out of that order is missing ("out of order"), and what
    is left over is unexpected."""
    cin, csrc = ours = chains(name)
    present = {c for c in ours if c in raw.chains}
    in_chain = {c: raw.chain(c) for c in ours}
    jumps = raw.into(ours)
    out = []
    if vif is None:
        for c in ours:
            if c in present:
                out.append(("unexpected", f"{kind} chain {c}", "left behind: no state record or XenStore entry wants it"))
        for r in jumps + in_chain[cin] + in_chain[csrc]:
            out.append(("unexpected", f"{kind} {r}", ""))
        return out
    out += guard_rows(raw, kind)
    for c in ours:
        out.append(("ok" if c in present else "missing", f"{kind} chain {c}", ""))
    # jumps first: without them the chains do nothing; their place among
    # other PREROUTING rules is not ours to judge
    for spec in jump_specs(name):
        r = rule_key(f"-A {spec}")
        if r in jumps:
            jumps.remove(r)
            out.append(("ok", f"{kind} {r}", ""))
        else:
            out.append(("missing", f"{kind} {r}", ""))
    for r in jumps:
        out.append(("unexpected", f"{kind} {r}", ""))
    expected = [rule_key(r) for r in chain_rules(vif, kind_version(kind))]
    for c in ours:
        want = [r for r in expected if r.split()[1] == c]
        have = in_chain[c]
        out += _sequence(want, have, kind)
    return out


def guard_rows(raw: Table, kind: str) -> list:
    """The guard every vif relies on: its chain, its jump from PREROUTING,
    and the DROP that must stay its last rule (the default deny)."""
    out = [("ok" if GUARD in raw.chains else "missing", f"{kind} chain {GUARD}", "")]
    jump = rule_key(f"-A {GUARD_JUMP}")
    out.append(("ok" if jump in raw.rules else "missing", f"{kind} {jump}", ""))
    drop = f"-A {GUARD_DROP}"
    rules = raw.chain(GUARD)
    if rules and rules[-1] == drop:
        out.append(("ok", f"{kind} {drop}", "last: the default deny"))
    elif drop in rules:
        out.append(("missing", f"{kind} {drop}", "present, but not last: the default deny"))
    else:
        out.append(("missing", f"{kind} {drop}", "the default deny"))
    return out


def guard_denies(raw: Table, name: str) -> bool:
    """The guard is in force in this family (a PREROUTING jump into it, and
    its DROP) and ``name`` has no goto there: the DROP takes its packets.
    What matters to a vif the other backend guards (status)."""
    jumped = any(r.split()[-2:] == ["-j", GUARD] for r in raw.chain("PREROUTING"))
    return jumped and f"-A {GUARD_DROP}" in raw.rules and rule_key(f"-A {jump_specs(name)[0]}") not in raw.rules


def removal(tool: str) -> str:
    """The hand removal of the guard in one family (README, moved_away)."""
    return f"{tool} -t raw -D {GUARD_JUMP}; {tool} -t raw -F {GUARD}; {tool} -t raw -X {GUARD}"


def kind_version(kind: str) -> int:
    return 6 if kind == "ip6tables" else 4


def _sequence(want, have, kind):
    """Expected rules of one chain against the chain's rules, in order."""
    from difflib import SequenceMatcher

    matched_w, matched_h = set(), set()
    for block in SequenceMatcher(None, want, have, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            matched_w.add(block.a + k)
            matched_h.add(block.b + k)
    out = []
    for i, r in enumerate(want):
        if i in matched_w:
            out.append(("ok", f"{kind} {r}", ""))
        elif r in have:
            out.append(("missing", f"{kind} {r}", "present, but out of order"))
        else:
            out.append(("missing", f"{kind} {r}", ""))
    for j, r in enumerate(have):
        if j not in matched_h:
            out.append(("unexpected", f"{kind} {r}", "out of order" if r in want else ""))
    return out


# ----------------------------------------------------------------------------
# Applying


class Backend(VifGuard):
    """The iptables backend behind the firewall seam (see
    :mod:`vif_route_qubes.firewall` for the contract)."""

    name = NAME

    def __init__(self, sys_, reason):
        self.sys, self.reason = sys_, reason
        self._saved = None  # {version: raw Table}, read once, for check()
        self.errors = []

    # -- helpers ---------------------------------------------------------------
    def _save(self, version, check=True):
        """The raw table as the kernel has it now (parsed)."""
        s = self.sys
        res = s.run([s.iptables(version, "save"), "-t", "raw"], readonly=True, check=check)
        return parse_save(res.stdout if res.code == 0 else "").get("raw") or Table()

    def _try(self, version, data):
        """Start one restore; an injected fault counts as its failure."""
        s = self.sys
        try:
            return s.start(s.restore(version), data)
        except CommandFailed as exc:
            return exc

    @staticmethod
    def _wait(started):
        if isinstance(started, CommandFailed):
            return started
        res = started.wait(check=False)
        return None if res.code == 0 else CommandFailed(res.argv, res.code, res.stderr)

    def _install(self, fws, name, first, log):
        """Install ``fws`` (one Firewall per family), in parallel, choosing
        the payload variant by what we believe exists; fall back through the
        others so neither a missing nor a leftover piece can make us
        duplicate a rule. A command that could not even start (an injected
        fault) is final for its family. -> {version: CommandFailed} of the
        families that could not be installed (empty: all done)."""
        s = self.sys
        order = [first, "create" if first == "replace" else "replace", "rebuild"]
        if s.dry_run:
            order = order[:1]
        pending, final, refused = list(fws), {}, {}
        for mode in order:
            started = []
            for fw in pending:
                if mode == "rebuild":
                    data = rebuild_payload(self._save(fw.version, check=False), fw, name)
                else:
                    data = getattr(fw, mode)
                started.append((fw, self._try(fw.version, data)))
            pending, refused = [], {}
            for fw, st in started:
                if isinstance(st, CommandFailed):
                    final[fw.version] = st
                    continue
                err = self._wait(st)
                if err is not None:
                    pending.append(fw)
                    refused[fw.version] = err
                    if log:
                        log.debug(f"{err.argv[0]}: {mode} variant refused: {err.stderr.strip()}")
            if not pending:
                break
        return {**refused, **final}

    # -- the contract ----------------------------------------------------------
    def apply(self, vif, previous):
        s = self.sys
        first = "replace" if previous is not None else "create"
        if s.dry_run:
            s.note(f"firewall: '{first}' variant; if the chains turn out to be "
                   + ("missing" if previous is not None else "present already") + ", the other one is applied"
                   + f"; if the guard chain {GUARD} is absent or damaged (the first vif on this host), "
                   "it is made whole from iptables-save")
        failed = self._install([firewall(vif, v) for v in FAMILIES], vif.name, first, s.log)
        if not failed:
            return
        # One family failed, the other may be in place already: put the
        # family that succeeded back as it was (previous's rules, or nothing
        # of ours), so the two families never tell different stories.
        done = [v for v in FAMILIES if v not in failed]
        if done:
            if previous is not None:
                still = self._install([firewall(previous, v) for v in done], previous.name, "replace", None)
            else:
                still = {v: self._teardown(vif.name, v) for v in done}
                still = {v: e for v, e in still.items() if e is not None}
            if still and s.log:
                s.log.warning(f"could not restore the previous {NAME} rules of {vif.name}: "
                              + "; ".join(str(e) for e in still.values()))
        raise failed[max(failed)]

    def _teardown(self, name, version):
        """Remove our chains and jumps in one family: None when done (or
        nothing was there), else the error."""
        s = self.sys
        fw = firewall(Vif(name=name, domid=0), version)
        err = self._wait(self._try(version, fw.teardown))
        if err is None:
            return None
        payload = teardown_from_save(self._save(version, check=False), name)
        if not payload:
            return None
        res = s.run(s.restore(version), payload, check=False)
        return None if res.code == 0 else CommandFailed(res.argv, res.code, res.stderr)

    def remove(self, name, known=None, alone=False):
        """Remove our chains and jumps in both families; never fails: what is
        already gone is fine, and a partial leftover is removed exactly.
        (``known`` is not needed: the chains are named after the interface;
        ``alone`` neither: the guard chain is the default deny, it stays.)"""
        s = self.sys
        removed = []
        fws = [firewall(Vif(name=name, domid=0), v) for v in FAMILIES]
        started = [(fw, self._try(fw.version, fw.teardown)) for fw in fws]
        for fw, st in started:
            kind = "iptables" if fw.version == 4 else "ip6tables"
            err = self._wait(st)
            if err is None:
                removed.append(f"{kind} chains {' '.join(fw.chain_names)}")
                continue
            try:
                payload = teardown_from_save(self._save(fw.version, check=False), name)
                if not payload:
                    continue
                again = s.run(s.restore(fw.version), payload, check=False)
            except Failure as exc:
                again = exc
            if isinstance(again, Failure) or again.code != 0:
                why = again if isinstance(again, Failure) else again.stderr.strip()
                if s.log:
                    s.log.warning(f"could not remove firewall rules of {name}: {why}")
            else:
                removed.append(f"{kind} rules of {name} (what was left)")
        return removed

    def accelerate(self, state_dir, leaving=None):
        """The flowtable is an nft object: the nft backend's
        (:meth:`vif_route_qubes.firewall.nft.Backend.accelerate`)."""
        return None

    def moved_away(self):
        """What to tell when a vif leaves this backend for nft: the guard
        stays (other vifs may rely on it), and so does its default deny."""
        return (f"the iptables chain {GUARD} stays, and its default deny drops everything from interface "
                f"group {VIF_GROUP} that has no chains of ours: once no vif uses the iptables backend, delete it "
                f"in both families ({removal('iptables')}; the same with ip6tables)")

    def addresses(self, name):
        from ipaddress import ip_interface

        found = []
        for v in FAMILIES:
            found += addresses_from_save(self._save(v, check=False), name)
        return tuple(ip_interface(a).ip for a in found)

    # -- status ----------------------------------------------------------------
    def prefetch(self):
        """Start the reads check() and owners() work from (status starts
        them beside its own ``ip`` query)."""
        if self._saved is None:
            s = self.sys
            self._saved = {v: s.start([s.iptables(v, "save"), "-t", "raw"], readonly=True) for v in FAMILIES}

    def _saves(self):
        self.prefetch()
        for v, st in list(self._saved.items()):
            if not isinstance(st, Table):
                res = st.wait(check=False)
                if res.code != 0:
                    self.errors.append(f"{' '.join(res.argv)} exited {res.code}: {res.stderr.strip()}")
                self._saved[v] = parse_save(res.stdout if res.code == 0 else "").get("raw") or Table()
        return self._saved

    def read_errors(self):
        """Why a read for status failed (notes, not verdicts)."""
        self._saves()
        return list(self.errors)

    def owners(self):
        names = set()
        for raw in self._saves().values():
            names |= owners_from_save(raw)
        return names

    def check(self, vif, name):
        out = []
        for v, raw in sorted(self._saves().items()):
            out += compare(raw, vif, name, "iptables" if v == 4 else "ip6tables")
        return out

    def denies(self, vif):
        """[(item, detail)]: while the other backend guards ``vif``, this
        backend's default deny left on the host drops its traffic (the guard
        is in force and has no goto for it), per family it has addresses in."""
        out = []
        for v, raw in sorted(self._saves().items()):
            if vif.family(v) and guard_denies(raw, vif.name):
                tool = "iptables" if v == 4 else "ip6tables"
                cin = chains(vif.name)[0]
                out.append((f"{tool} -A {GUARD_DROP}",
                            f"its default deny drops {vif.name}'s traffic (no -g {cin} in {GUARD}); once no vif "
                            f"uses the iptables backend, remove it: {removal(tool)}"))
        return out
