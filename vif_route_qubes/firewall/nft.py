"""The nft backend: Qubes' nftables-era anti-spoofing layout, filled with
set elements, one ``nft -f -`` transaction per change for both families.

Layout (what ``qubes-antispoof.service`` loads on a Qubes R4.2 netvm; we
create whatever of it is absent, and reuse what is present exactly as it is:
never flushed, never redefined)::

    table ip qubes {                         # ip6: ipv6_addr, ip6 saddr
        set downstream { type ipv4_addr; }               # every guest address
        set allowed { type ifname . ipv4_addr; }         # (vif, its address)
        chain prerouting {
            type filter hook prerouting priority raw; policy accept;
            iifgroup 2 goto antispoof
            ip saddr @downstream counter drop            # ours, from elsewhere
        }
        chain antispoof {
            iifname . ip saddr @allowed accept
            counter drop                                 # default deny
        }
    }

``online`` adds the vif's elements (``"vif3.0" . 10.137.0.12`` to
``allowed``, ``10.137.0.12`` to ``downstream``) and ``offline`` removes them;
the rules never change, so a packet's cost does not depend on the number of
guests (a set lookup, not a walk over a chain per vif), and a vif in group 2
without elements gets nothing through (default deny).

IPv6 neighbour discovery: a vif with IPv6 addresses may also send the
ICMPv6 of neighbour discovery and MLD (``plan.LINK_ICMP6_TYPES``, nothing
else) from link-local sources and from ``::`` (duplicate address
detection), as with the iptables backend. That needs one more rule and a set
of ours in ``ip6 qubes``::

        set vrq-nd-mld { type ifname; }                  # vifs with IPv6
        chain antispoof {
            iifname . ip6 saddr @allowed accept
            iifname @vrq-nd-mld ip6 saddr { fe80::/10, :: } icmpv6 type { ND, MLD } accept
            counter drop
        }

Release 0.1 accepted every ICMPv6 type there, with a set named ``vrq-nd``.
Its name changed with the rule so that the transaction tells an old layout:
the first run that touches the set of a host the old release set up fails
its fast path, and the slow path replaces the old rule in place, moves the
old set's elements and deletes it (:func:`upgrade_nd`), for every vif at
once.

The rule is only part of an ``antispoof`` chain *we* create. Qubes' own
chain (reused as it is) lets no link-local source through; Qubes guests
reach their gateway through a static neighbour entry instead, so under a
Qubes-loaded table the guests behave as on Qubes.

Reading the kernel first would cost a process on every run, so the fast
path reads nothing and lets the transaction itself tell when the kernel
does not fit what the state record says (a failed transaction changes
nothing); only then are the sets read (``nft -j list ruleset``) and a second
transaction written from what they hold. The iptables backend's ``-N``
plays the same part. What makes the transaction fail:

* Stale elements: ``online`` of a vif without a state record must not keep
  elements an earlier vif of the same name left behind (another address
  would stay allowed). It *creates* the interface's element in ``set
  vrq-guarded { type ifname; }`` (``ip qubes``), which fails when we hold
  elements for that name already.
* Shared addresses: a dying domain's vif and a new domain's may have the
  same address for a while. ``downstream`` holds bare addresses, so the
  first offline must not take the address out of it. A new address's
  ``downstream`` element is *created* (fails if another vif has it); the
  slow path then marks it in ``set vrq-shared`` (per family), and a removal
  asserts its addresses are not marked (``create`` + ``delete``: no change
  when they are not), so the removal of a shared one goes the slow way,
  which keeps the ``downstream`` element while any vif still has it.
* Absent tables or sets (the first vif on a host; a Qubes table without
  our sets): the slow path creates what is absent.

Removing an element that is not there fails a whole nft transaction (nft
1.0.6 has no ``destroy``), so a removal is written ``add`` + ``delete``:
absent or present before, absent after, and the transaction stands.
"""


import json
import os
from ipaddress import ip_address

from ..errors import CommandFailed, Failure
from ..plan import LINK_ICMP6_TYPES, LINK_SOURCES6, UPLINK_GROUP, VIF_GROUP
from ..state import boot_id
from . import nftjson
from .nftjson import matches as _matches, verdict as _verdict
from .contract import VifGuard

NAME = "nft"
TABLE = nftjson.TABLE
FAMILIES = {4: "ip", 6: "ip6"}
ND_SET = "vrq-nd-mld"
OLD_ND_SET = "vrq-nd"  # release 0.1's, with its rule accepting every ICMPv6 type
GUARDED = "vrq-guarded"  # in ip qubes: the interfaces we hold elements for
SHARED = "vrq-shared"  # per family: addresses more than one vif has in allowed
SETS_MARKER = "nft-sets"  # in the state dir: our sets exist (a hint)
# our bookkeeping sets: (family, name, type)
OWN_SETS = (("ip", GUARDED, "ifname"), ("ip", SHARED, "ipv4_addr"),
            ("ip6", SHARED, "ipv6_addr"), ("ip6", ND_SET, "ifname"))
ND_SOURCES = "{ " + ", ".join(a.replace("::/128", "::") for a in LINK_SOURCES6) + " }"
# how nft names (and lists) plan.LINK_ICMP6_TYPES
ICMP6_NAMES = {130: "mld-listener-query", 131: "mld-listener-report", 132: "mld-listener-done",
               133: "nd-router-solicit", 134: "nd-router-advert", 135: "nd-neighbor-solicit",
               136: "nd-neighbor-advert", 143: "mld2-listener-report"}
ND_TYPES = [ICMP6_NAMES[t] for t in LINK_ICMP6_TYPES]
ND_RULE = f"iifname @{ND_SET} ip6 saddr {ND_SOURCES} icmpv6 type {{ {', '.join(ND_TYPES)} }} accept"
ND_CHECK = f"ip6 {TABLE} antispoof: ICMPv6 from fe80::/10 and :: accepted only for ND and MLD"


def _saddr(version):
    return "ip saddr" if version == 4 else "ip6 saddr"


def _addr_type(version):
    return "ipv4_addr" if version == 4 else "ipv6_addr"


# ----------------------------------------------------------------------------
# The pure part: what the kernel has (parsed) and the payload text


class Ruleset(nftjson.Ruleset):
    """What ``nft -j list ruleset`` shows of the qubes tables
    (:mod:`.nftjson` reads it), judged as the anti-spoofing's layout."""

    def denies(self, version):
        """The family's default deny is in force: a prerouting hook sends
        interface group 2 to ``antispoof``, which ends in a drop."""
        fam = FAMILIES[version]
        hook = self.hooks.get((fam, "prerouting"), (None, None))
        return hook[0] == "prerouting" and _sends_group(self.rules.get((fam, "prerouting"), [])) \
            and _ends_in_drop(self.rules.get((fam, "antispoof"), []))

    def policy_checks(self, version):
        """[(ok, description)]: the element-independent rules the sets
        depend on, as they are (ours or Qubes'): without them the elements
        guard nothing."""
        fam = FAMILIES[version]
        pre = self.rules.get((fam, "prerouting"), [])
        anti = self.rules.get((fam, "antispoof"), [])
        hook = self.hooks.get((fam, "prerouting"), (None, None))
        return [
            (hook[0] == "prerouting" and isinstance(hook[1], int) and hook[1] <= -300,
             f"{fam} {TABLE} prerouting: hook prerouting, priority raw or earlier"),
            (_sends_group(pre), f"{fam} {TABLE} prerouting: iifgroup {VIF_GROUP} goto antispoof"),
            (any(_matches(r, None, "@downstream") and _verdict(r) == "drop" for r in pre),
             f"{fam} {TABLE} prerouting: {_saddr(version)} @downstream drop"),
            (any(_matches(r, None, "@allowed") and _verdict(r) == "accept" for r in anti),
             f"{fam} {TABLE} antispoof: iifname . {_saddr(version)} @allowed accept"),
            (_ends_in_drop(anti), DENY_RULE.format(fam=fam)),
        ] + ([(not any(_lax_link_icmp(r) for r in anti), ND_CHECK)] if version == 6 else [])

    def holders(self, addr, but=()):
        """Interfaces other than ``but`` whose ``allowed`` elements hold ``addr``."""
        fam = FAMILIES[addr.version]
        return {e[0] for e in self.sets.get((fam, "allowed"), [])
                if isinstance(e, tuple) and e[0] not in but and _same(e[1], addr)}

    def allowed(self, name):
        """-> [address] of ``name``'s elements in both ``allowed`` sets."""
        found = []
        for family in ("ip", "ip6"):
            for e in self.sets.get((family, "allowed"), []):
                if isinstance(e, tuple) and e[0] == name:
                    found.append(e[1])
        return found

    def owners(self):
        names = set()
        for family in ("ip", "ip6"):
            names |= {e[0] for e in self.sets.get((family, "allowed"), []) if isinstance(e, tuple)}
        names |= {e for s in (ND_SET, OLD_ND_SET) for e in self.sets.get(("ip6", s), []) if isinstance(e, str)}
        names |= {e for e in self.sets.get(("ip", GUARDED), []) if isinstance(e, str)}
        return names


DENY_RULE = "{fam} " + TABLE + " antispoof: ends in drop (default deny)"


def _sends_group(prerouting):
    return any(_matches(r, "iifgroup", VIF_GROUP) and _verdict(r) in ("goto antispoof", "jump antispoof")
               for r in prerouting)


def _ends_in_drop(antispoof):
    return bool(antispoof) and _verdict(antispoof[-1]) == "drop" and not any("match" in e for e in antispoof[-1])


def _lax_link_icmp(rule):
    """An accepting rule for link-local or unspecified sources that lets
    more ICMPv6 through than ND and MLD (release 0.1's: any type), or any
    rule still naming release 0.1's set."""
    if _matches(rule, None, f"@{OLD_ND_SET}"):
        return True
    if _verdict(rule) != "accept":
        return False
    link, types = False, None
    for e in rule:
        m = e.get("match") if isinstance(e, dict) else None
        if not m:
            continue
        payload, right = (m.get("left") or {}).get("payload") or {}, m.get("right")
        values = right["set"] if isinstance(right, dict) and "set" in right else [right]
        if payload.get("field") == "saddr":
            # "::", or {"prefix": {"addr": "fe80::", "len": 10}}
            addrs = [v["prefix"].get("addr") if isinstance(v, dict) and "prefix" in v else v for v in values]
            link = link or any(a in ("::", "fe80::") for a in addrs)
        elif payload.get("protocol") == "icmpv6" and payload.get("field") == "type":
            types = {str(v) for v in values}
    return link and (types is None or not types <= set(ND_TYPES))


def upgrade_nd(ruleset):
    """The lines that take release 0.1's lax rule out of our ip6 antispoof
    chain: the rule replaced in place by this one's, the old set's elements
    moved to the new set (created before these lines), the old set deleted
    once nothing names it. Nothing when there is no old set."""
    if ("ip6", OLD_ND_SET) not in ruleset.sets:
        return []
    lines, kept = [], 0
    for (fam, chain), rules in sorted(ruleset.rules.items()):
        if fam != "ip6":
            continue
        for expr, handle in zip(rules, ruleset.handles.get((fam, chain), [])):
            if not _matches(expr, None, f"@{OLD_ND_SET}"):
                continue
            if chain == "antispoof" and _matches(expr, "iifname", f"@{OLD_ND_SET}") and handle is not None:
                # in its place: inserted before it, then it deleted (nft
                # 1.0.6 aborts on "replace rule" with an anonymous interval set)
                lines.append(f"insert rule ip6 {TABLE} antispoof position {handle} {ND_RULE}")
                lines.append(f"delete rule ip6 {TABLE} antispoof handle {handle}")
            else:
                kept += 1  # not ours to rewrite: the set stays with it
    old = [e for e in ruleset.sets[("ip6", OLD_ND_SET)] if isinstance(e, str)]
    if old:
        names = ", ".join(f'"{e}"' for e in old)
        lines.append(f"add element ip6 {TABLE} {ND_SET} {{ {names} }}")
    if not kept:
        lines.append(f"delete set ip6 {TABLE} {OLD_ND_SET}")
    return lines


def _same(text, addr):
    try:
        return ip_address(text) == addr
    except ValueError:
        return False


LOADER = "qubes-antispoof.service"


def _kernel_identity() -> str:
    """This boot of this kernel: the flowtable probe's answer holds that
    long (a module can only appear with a new kernel or a reboot, or an
    administrator's modprobe, after which removing the marker re-probes)."""
    return f"{os.uname().release} {boot_id()}"


def _nothing():
    pass


def retirement(have, name, dropping):
    """[(family, set)] of our bookkeeping sets to delete once ``name``'s
    elements are gone, where ``have`` shows no other interface with
    elements: those present and named by no rule (in tables we made, the
    ND set stays with the rule that names it). ``dropping``: the same
    transaction removes ``name``'s elements, and creates the sets of ours
    that names where a table lacks them. A Qubes-loaded table is then
    exactly as ``qubes-antispoof.nft`` made it. Release 0.1's ND set is
    left to its upgrade (:func:`upgrade_nd`)."""
    if have.owners() - {name} or ("ip6", OLD_ND_SET) in have.sets:
        return []
    named = {fam: json.dumps([r for (f, _), rules in have.rules.items() if f == fam for r in rules])
             for fam in ("ip", "ip6")}
    return [(fam, n) for fam, n, _ in OWN_SETS
            if fam in have.tables and ((fam, n) in have.sets or dropping) and f'"@{n}"' not in named[fam]]


def removal(fam):
    """The hand removal of one family's table (README, moved_away)."""
    return f"nft delete table {fam} {TABLE}"


def skeleton(version, ruleset=None):
    """The lines that create whatever of a family's layout is absent from
    ``ruleset`` (None: assume all of it is present, the fast path)."""
    fam = FAMILIES[version]
    if ruleset is None:
        return []
    lines = []
    if fam not in ruleset.tables:
        lines.append(f"add table {fam} {TABLE}")
    want_sets = [("downstream", _addr_type(version)), ("allowed", f"ifname . {_addr_type(version)}")]
    want_sets.append((GUARDED, "ifname") if version == 4 else (ND_SET, "ifname"))
    want_sets.append((SHARED, _addr_type(version)))
    for name, typ in want_sets:
        if (fam, name) not in ruleset.sets:
            lines.append(f"add set {fam} {TABLE} {name} {{ type {typ}; }}")
    if version == 6:
        lines += upgrade_nd(ruleset)
    # antispoof before prerouting: the prerouting rule jumps to it
    if (fam, "antispoof") not in ruleset.chains:
        lines.append(f"add chain {fam} {TABLE} antispoof")
        lines.append(f"add rule {fam} {TABLE} antispoof iifname . {_saddr(version)} @allowed accept")
        if version == 6:
            lines.append(f"add rule {fam} {TABLE} antispoof {ND_RULE}")
        lines.append(f"add rule {fam} {TABLE} antispoof counter drop")
    if (fam, "prerouting") not in ruleset.chains:
        lines.append(f"add chain {fam} {TABLE} prerouting "
                     "{ type filter hook prerouting priority raw; policy accept; }")
        lines.append(f"add rule {fam} {TABLE} prerouting iifgroup {VIF_GROUP} goto antispoof")
        lines.append(f"add rule {fam} {TABLE} prerouting {_saddr(version)} @downstream counter drop")
    return lines


def elements(name, addresses):
    """{(family, set): [element text]} for one vif's addresses."""
    out = {}
    for a in addresses:
        fam = FAMILIES[a.version]
        out.setdefault((fam, "allowed"), []).append(f'"{name}" . {a}')
        out.setdefault((fam, "downstream"), []).append(str(a))
    if any(a.version == 6 for a in addresses):
        out[("ip6", ND_SET)] = [f'"{name}"']
    return out


def _elem_lines(verb, elems):
    return [f"{verb} element {fam} {TABLE} {s} {{ {', '.join(items)} }}" for (fam, s), items in sorted(elems.items())]


def transaction(name, addresses, drop_addresses=(), drop_nd=False, ruleset=None, guard="add",
                fresh=(), unshared=(), keep_downstream=(), shared=(), unshare=()):
    """One ``nft -f -`` payload for interface ``name``, in this order:

    * what ``ruleset`` says is absent of the layout (None: nothing);
    * its ``vrq-guarded`` element: ``guard`` is ``create`` (fails if there),
      ``add`` or ``drop``;
    * assertions that fail the transaction: ``fresh`` addresses are not in
      ``downstream`` yet, ``unshared`` ones are not in ``vrq-shared``
      (create + delete: no change when they hold);
    * ``drop_addresses``' elements removed, absent-safe (add, then delete),
      except the ``downstream`` element of ``keep_downstream`` ones (another
      vif has the address too) and whatever ``addresses`` keeps;
    * ``addresses``' elements added; ``shared`` ones into ``vrq-shared``,
      ``unshare`` ones out of it.
    -> text ending in a newline."""
    keep = set(addresses)
    lines = []
    for version in (4, 6):
        lines += skeleton(version, ruleset)
    marker = f'{{ "{name}" }}'
    if guard == "drop":
        lines += [f"add element ip {TABLE} {GUARDED} {marker}", f"delete element ip {TABLE} {GUARDED} {marker}"]
    else:
        lines.append(f"{guard} element ip {TABLE} {GUARDED} {marker}")
    lines += _elem_lines("create", _by_family("downstream", fresh))
    check = _by_family(SHARED, unshared)
    lines += _elem_lines("create", check) + _elem_lines("delete", check)
    gone = [a for a in drop_addresses if a not in keep]
    drop = elements(name, gone)
    for a in keep_downstream:
        items = drop.get((FAMILIES[a.version], "downstream"), [])
        if str(a) in items:
            items.remove(str(a))
    drop = {k: v for k, v in drop.items() if v}
    if ("ip6", ND_SET) in drop or drop_nd:
        drop[("ip6", ND_SET)] = [f'"{name}"']
    if any(a.version == 6 for a in addresses):
        drop.pop(("ip6", ND_SET), None)  # it stays
    unsh = _by_family(SHARED, unshare)
    lines += _elem_lines("add", {**drop, **unsh}) + _elem_lines("delete", {**drop, **unsh})
    add = elements(name, addresses)
    for a in fresh:  # created above
        items = add.get((FAMILIES[a.version], "downstream"), [])
        if str(a) in items:
            items.remove(str(a))
    add = {k: v for k, v in add.items() if v}
    lines += _elem_lines("add", {**add, **_by_family(SHARED, shared)})
    return "".join(line + "\n" for line in lines)


def _by_family(set_name, addresses):
    out = {}
    for a in addresses:
        out.setdefault((FAMILIES[a.version], set_name), []).append(str(a))
    return out


def expected(vif):
    """Status: [(set, element)] a vif should have, as ``check`` lists them."""
    out = [(f"ip {TABLE} {GUARDED}", f'"{vif.name}"')]
    for (fam, s), items in sorted(elements(vif.name, vif.addresses).items()):
        out += [(f"{fam} {TABLE} {s}", i) for i in items]
    return out


def _shown(e):
    return f'"{e[0]}" . {e[1]}' if isinstance(e, tuple) else (f'"{e}"' if not _is_addr(e) else e)


def _is_addr(text):
    try:
        ip_address(text)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------
# Applying


class Backend(VifGuard):
    """The nft backend behind the firewall seam (see
    :mod:`vif_route_qubes.firewall` for the contract)."""

    name = NAME
    # One vif's change is one transaction on its own set elements, whose
    # assertions (create: fails if present) the kernel checks atomically:
    # runs of different vifs need not wait for each other (hotplug holds
    # the host lock shared). What reads the sets and then decides from them
    # (the slow path) first calls ``serialize``, which hotplug points at
    # the host lock's upgrade to exclusive.
    concurrent = True

    def __init__(self, sys_, reason):
        self.sys, self.reason = sys_, reason
        self._read = None  # a started read (status) or its Ruleset
        self.errors = []
        self.serialize = _nothing

    def ruleset(self):
        """Read the kernel now (one ``nft -j list ruleset``)."""
        res = self.sys.run(["nft", "-j", "list", "ruleset"], readonly=True, check=False)
        if res.code != 0:
            raise CommandFailed(res.argv, res.code, res.stderr)
        return Ruleset.parse(res.stdout)

    def _commit(self, payload):
        if payload:
            self.sys.run(["nft", "-f", "-"], payload)

    # The hint that our sets exist (SETS_MARKER in ``state_dir``): made by
    # the slow path, removed by the removal that deletes them, both under
    # the exclusive lock; read under the shared one. Only a hint: the
    # transaction has the last word, a stale hint costs a refused one.
    def _marker(self):
        return os.path.join(self.state_dir, SETS_MARKER) if self.state_dir else None

    def _sets_known(self):
        """Whether our sets are there, as far as the hint knows (no state
        dir: assume so, and let the transaction tell)."""
        marker = self._marker()
        return marker is None or os.path.exists(marker)

    def _mark(self, present):
        marker = self._marker()
        if marker is None or self.sys.dry_run:
            return
        try:
            if present:
                os.makedirs(self.state_dir, mode=0o755, exist_ok=True)
                open(marker, "a").close()
            else:
                os.unlink(marker)
        except OSError:
            pass  # a hint: a wrong one costs a refused transaction, never a rule

    def apply(self, vif, previous):
        s = self.sys
        renamed = previous is not None and previous.name != vif.name
        # The fast path, no read: the record names the elements to replace,
        # and the transaction itself fails (changing nothing) when the
        # kernel does not fit it: a new vif's vrq-guarded element or a new
        # address's downstream element is there already (elements left
        # behind, or an address another vif has too), an address to drop is
        # shared, or the tables are absent. Then the kernel is read.
        before = previous.addresses if previous is not None else ()
        payload = ""
        if renamed:
            payload = transaction(previous.name, (), before, drop_nd=True, guard="drop", unshared=before)
            before = ()
        payload += transaction(vif.name, vif.addresses, before, drop_nd=bool(before),
                               guard="add" if previous is not None and not renamed else "create",
                               fresh=[a for a in vif.addresses if a not in before],
                               unshared=[a for a in before if a not in vif.addresses])
        # A new vif where the hint says our sets are absent (the last vif's
        # offline deleted them, or none were made since boot): the
        # transaction would only be refused, so the kernel is read first.
        cold = previous is None and not self._sets_known()
        if cold:
            s.note("nft: our sets are not there (no vif since the last one went): "
                   "the kernel's sets are read and one transaction creates them with this vif's elements")
        else:
            if s.dry_run:
                s.note("nft: if this transaction is refused (tables absent, elements of an earlier "
                       f"{vif.name} left behind, an address another vif has too), the kernel's sets are "
                       "read and a second one creates what is absent and replaces what is there")
            try:
                self._commit(payload)
                return
            except CommandFailed as exc:
                if "injected fault" in exc.stderr:
                    raise
                if s.log:
                    s.log.debug(f"nft: transaction refused ({exc.stderr.strip()}); reading the kernel")
        self._rebuild(vif, previous, renamed, retry=payload if cold else None)

    def _rebuild(self, vif, previous, renamed, retry=None):
        """The slow path of :meth:`apply`: under the exclusive lock, one
        read and one transaction written from what the kernel holds.
        ``retry``: the fast transaction not tried yet, tried first if
        another run made the sets while this one waited for the lock (the
        first vifs of a storm)."""
        self.serialize()
        if retry is not None and self._sets_known() and not self.sys.dry_run:
            try:
                self._commit(retry)
                return
            except CommandFailed as exc:
                if "injected fault" in exc.stderr:
                    raise
        # A failed transaction changed nothing; the kernel says what exists,
        # which elements of this interface are there to replace, and which
        # addresses other vifs have too.
        have = self.ruleset()
        mine = {vif.name} | ({previous.name} if renamed else set())
        # what is absent of the layout first: the old name's removal may
        # name a set only this creates
        head = "".join(line + "\n" for version in (4, 6) for line in skeleton(version, have))
        if renamed:
            head += self._drop(have, previous.name, mine)
        stale = [ip_address(a) for a in have.allowed(vif.name)]
        dropped = [a for a in stale if a not in vif.addresses]
        self._commit(head + transaction(
            vif.name, vif.addresses, stale, drop_nd=vif.name in have.owners(),
            keep_downstream=[a for a in dropped if have.holders(a, mine)],
            shared=[a for a in vif.addresses if have.holders(a, mine)],
            unshare=[a for a in dropped if len(have.holders(a, mine)) <= 1]))
        self._mark(True)  # the skeleton made whatever of our sets was absent

    @staticmethod
    def _drop(have, name, mine, alone=False):
        """The removal of ``name``'s elements as ``have`` shows them.
        ``alone``: the whole payload (offline), which then also takes
        release 0.1's ND set and rule out (:func:`upgrade_nd`) and creates
        the sets of ours the removal names where a table lacks them; with
        ``apply`` its own transaction's skeleton does that."""
        found = [ip_address(a) for a in have.allowed(name)]
        head = []
        if alone:
            # the removal names them; a host whose last vif deleted them may
            # still have elements of another writer (Qubes' own script)
            head = [f"add set {fam} {TABLE} {n} {{ type {typ}; }}" for fam, n, typ in OWN_SETS
                    if fam in have.tables and (fam, n) not in have.sets]
            if "ip6" in have.tables:
                head += upgrade_nd(have)
        return "".join(line + "\n" for line in head) + transaction(
            name, (), found, drop_nd=True, guard="drop",
            keep_downstream=[a for a in found if have.holders(a, mine)],
            unshare=[a for a in found if len(have.holders(a, mine)) <= 1])

    def remove(self, name, known=None, alone=False):
        """Remove ``name``'s elements. ``known``: the addresses the state
        record names (one transaction, no read, refused when one of them is
        shared with another vif); else, or if that was refused, the
        kernel's sets say. ``alone``: the kernel's sets say, and where they
        show no other interface, the same transaction deletes our
        bookkeeping sets (:func:`retirement`). Never raises."""
        s = self.sys
        try:
            if known is not None and not alone:
                try:
                    self._commit(transaction(name, (), known, drop_nd=True, guard="drop", unshared=known))
                    return [f"nft elements of {name}: {' '.join(map(str, known)) or 'none'}"]
                except CommandFailed as exc:
                    if "injected fault" in exc.stderr:
                        raise
                    if s.log:
                        s.log.debug(f"nft: removal by the record refused ({exc.stderr.strip()}); reading the kernel")
            try:
                self.serialize()
            except Failure as exc:
                # as offline does with the host lock: a dead guest's
                # elements must not outlive it because of a hung holder
                # (but the sets other runs may be filling stay)
                if s.log:
                    s.log.warning(f"{exc}; removing the nft elements of {name} without the lock")
                alone = False
            have = self.ruleset()
            found = [ip_address(a) for a in have.allowed(name)]
            payload = self._drop(have, name, {name}, alone=True) if found or name in have.owners() else ""
            retired = retirement(have, name, bool(payload)) if alone else []
            self._commit(payload + "".join(f"delete set {fam} {TABLE} {n}\n" for fam, n in retired))
            if ("ip", GUARDED) in retired:
                self._mark(False)
            done = [f"nft elements of {name}: {' '.join(map(str, found)) or 'none'}"] if payload else []
            if retired:
                done.append("our nft sets " + ", ".join(f"{fam} {n}" for fam, n in retired) + " (none left in use)")
            return done
        except Failure as exc:
            if s.log:
                s.log.warning(f"could not remove the nft elements of {name}: {exc}")
            return []

    def accelerate(self, state_dir, leaving=None):
        """Rebuild the flowtable over the namespace's interfaces (less
        ``leaving``, a vif going offline). -> what was done, for the log.
        Never raises: forwarding works without it. The kernel's support is
        probed once per boot and kernel: a refusal for want of it leaves a
        marker in ``state_dir``, logged once, and later runs skip the
        process."""
        s = self.sys
        marker = os.path.join(state_dir, ACCEL_MARKER)
        ident = _kernel_identity()
        if (s.read(marker) or "").strip() == ident:
            s.note("flowtable: this kernel has no flowtable support (probed earlier); not used")
            return None
        try:
            # listing the interfaces and replacing the table is one step for
            # the whole host: of two concurrent onlines, the one that listed
            # first must not replace the table last and leave the other's
            # vif out (hotplug holds the host lock shared until here)
            self.serialize()
        except Failure as exc:
            if s.log:
                s.log.warning(f"{exc}; rebuilding the flowtable without the lock")

        def attempt():
            try:
                names = os.listdir("/proc/sys/net/ipv4/conf")
            except OSError:
                names = []
            devices = accel_devices(names, leaving)
            return devices, s.run(["nft", "-f", "-"], flowtable_payload(devices), check=False)

        devices, res = attempt()
        if res.code != 0 and _unsupported(res.stderr) and devices and not s.dry_run \
                and s.run(["nft", "-f", "-"], ACCEL_PROBE, check=False).code == 0:
            # the kernel has flowtables: a listed interface went away before
            # nft ran (the kernel says ENOENT for that too); list again, once
            devices, res = attempt()
            if res.code != 0:
                if s.log:
                    s.log.warning(f"flowtable not rebuilt: {res.stderr.strip().splitlines()[-1:] or res.code}")
                return None
        if res.code == 0:
            if not devices:
                return f"flowtable {ACCEL_TABLE} (no vif left)"
            return f"{leaving} out of the flowtable" if leaving else f"flowtable over {len(devices)} interfaces"
        if _unsupported(res.stderr) and devices:
            if s.log:
                s.log.info("flowtable: the kernel has no flowtable support (nf_flow_table): "
                           "forwarding without offload; not probed again until the next boot")
            try:
                os.makedirs(state_dir, mode=0o755, exist_ok=True)
                with open(marker, "w") as f:
                    f.write(ident + "\n")
            except OSError:
                pass
            return None
        if s.log:
            s.log.warning(f"flowtable not rebuilt: {res.stderr.strip().splitlines()[-1:] or res.code}")
        return None

    def moved_away(self):
        """What to tell when a vif leaves this backend for iptables: the
        tables stay (they may be Qubes'), and so does their default deny."""
        return ("the nft tables ip/ip6 qubes stay, and their default deny drops everything from "
                "interface group 2 that is not in their sets: once no vif uses the nft backend, delete "
                f"them ({removal('ip')}; {removal('ip6')}), unless {LOADER} loads them (then stay with nft)")

    def addresses(self, name):
        try:
            return tuple(ip_address(a) for a in self.ruleset().allowed(name))
        except Failure as exc:
            if self.sys.log:
                self.sys.log.warning(f"nft: cannot read the kernel's sets: {exc}")
            return ()

    # -- status ----------------------------------------------------------------
    def prefetch(self):
        if self._read is None:
            self._read = self.sys.start(["nft", "-j", "list", "ruleset"], readonly=True)

    def _ruleset(self):
        self.prefetch()
        if not isinstance(self._read, Ruleset):
            res = self._read.wait(check=False)
            if res.code != 0:
                self.errors.append(f"{' '.join(res.argv)} exited {res.code}: {res.stderr.strip()}")
                self._read = Ruleset()
            else:
                self._read = Ruleset.parse(res.stdout)
        return self._read

    def read_errors(self):
        self._ruleset()
        return list(self.errors)

    def owners(self):
        return self._ruleset().owners()

    def denies(self, vif):
        """[(item, detail)]: while the other backend guards ``vif``, the
        default deny of tables left on the host drops its traffic (the
        family's antispoof is in force and ``allowed`` lacks an address of
        the vif), per family it has addresses in."""
        have = self._ruleset()
        out = []
        for version, fam in FAMILIES.items():
            if not vif.family(version) or not have.denies(version):
                continue
            held = [e[1] for e in have.sets.get((fam, "allowed"), []) if isinstance(e, tuple) and e[0] == vif.name]
            lacking = [a for a in vif.family(version) if not any(_same(h, a) for h in held)]
            if lacking:
                shown = ", ".join(f'"{vif.name}" . {a}' for a in lacking)
                out.append((f"nft rule {DENY_RULE.format(fam=fam)}",
                            f"its default deny drops {vif.name}'s traffic (no {shown} in {fam} {TABLE} allowed); "
                            f"once no vif uses the nft backend, delete the table: {removal(fam)} (unless "
                            f"{LOADER} loads it: then stay with nft)"))
        return out

    def check(self, vif, name):
        have = self._ruleset()
        out = []
        if vif is not None:
            for version, fam in FAMILIES.items():
                for s in ("allowed", "downstream", GUARDED if version == 4 else ND_SET):
                    ok = (fam, s) in have.sets
                    out.append(("ok" if ok else "missing", f"nft set {fam} {TABLE} {s}", ""))
                for c in ("prerouting", "antispoof"):
                    ok = (fam, c) in have.chains
                    out.append(("ok" if ok else "missing", f"nft chain {fam} {TABLE} {c}", ""))
                for ok, what in have.policy_checks(version):
                    out.append(("ok" if ok else "missing", f"nft rule {what}", ""))
        want = expected(vif) if vif is not None else []
        mine = []
        for (fam, s), elems in sorted(have.sets.items()):
            for e in elems:
                if (isinstance(e, tuple) and e[0] == name) or (s in (ND_SET, OLD_ND_SET, GUARDED) and e == name):
                    mine.append((f"{fam} {TABLE} {s}", _shown(e)))
        # downstream holds bare addresses: ours are those of our allowed elements
        for fam, addr in ((f, e[1]) for f in ("ip", "ip6") for e in have.sets.get((f, "allowed"), [])
                          if isinstance(e, tuple) and e[0] == name):
            if addr in have.sets.get((fam, "downstream"), []):
                mine.append((f"{fam} {TABLE} downstream", addr))
        for where, e in want:
            if (where, e) in mine:
                mine.remove((where, e))
                out.append(("ok", f"nft element {where} {e}", ""))
            else:
                out.append(("missing", f"nft element {where} {e}", ""))
        for where, e in mine:
            detail = "" if vif is not None else "left behind: no state record or XenStore entry wants it"
            out.append(("unexpected", f"nft element {where} {e}", detail))
        return out


# ----------------------------------------------------------------------------
# Flowtable forwarding (Qubes R4.2's ``table inet qubes-nat-accel``)
#
# Established TCP and UDP flows from the guests (group 2) to the uplink
# (group 1, which qubes-setup-ip gives eth0) are offloaded to a flowtable:
# their packets are forwarded at the ingress hook, before prerouting, so
# they skip every later hook. Only a flow's first packets take the normal
# path; the anti-spoofing has checked them, and a packet with another
# source matches no offloaded flow, so it takes the normal path too and
# meets the anti-spoofing. Qubes issue 8212: ``conntrack -D`` of an
# offloaded flow did not stop it at once; offline therefore rebuilds the
# table without the vif (which drops every offloaded flow) *before* its
# conntrack purge.

ACCEL_TABLE = "qubes-nat-accel"
ACCEL_FLOWTABLE = "qubes-accel"
ACCEL_MARKER = "flowtable-unsupported"  # in the state directory, per boot and kernel


def flowtable_payload(devices) -> str:
    """The table, replaced atomically over ``devices`` (add + delete +
    define: one transaction, whatever was there); no devices: the table
    deleted (absent-safe). The chain runs at forward priority filter + 5,
    after the other filter hooks have had their say on a new flow."""
    lines = [f"add table inet {ACCEL_TABLE}", f"delete table inet {ACCEL_TABLE}"]
    if devices:
        names = ", ".join(f'"{d}"' for d in sorted(devices))
        lines += [
            f"table inet {ACCEL_TABLE} {{",
            f"\tflowtable {ACCEL_FLOWTABLE} {{",
            "\t\thook ingress priority filter",
            f"\t\tdevices = {{ {names} }}",
            "\t}",
            f"\tchain {ACCEL_FLOWTABLE} {{",
            "\t\ttype filter hook forward priority filter + 5; policy accept;",
            f"\t\tmeta l4proto {{ tcp, udp }} iifgroup {VIF_GROUP} oifgroup {UPLINK_GROUP} "
            f"flow add @{ACCEL_FLOWTABLE}",
            "\t\tcounter",
            "\t}",
            "}",
        ]
    return "".join(line + "\n" for line in lines)


def accel_devices(names, leaving=None):
    """The interfaces the flowtable covers: every one of the namespace (as
    Qubes lists them) but ``leaving``; none once no vif is left, so the
    last offline leaves no table behind."""
    keep = sorted(n for n in names if n != leaving and n not in ("all", "default"))
    return keep if any(n.startswith("vif") for n in keep) else []


# Whether the kernel has flowtables, asked without naming any interface that
# may go away: a flowtable over the loopback, created and deleted in one
# transaction (nothing is left either way).
ACCEL_PROBE = (
    "table inet vrq-flowtable-probe {\n"
    "\tflowtable probe {\n\t\thook ingress priority filter\n\t\tdevices = { \"lo\" }\n\t}\n"
    "}\n"
    "delete table inet vrq-flowtable-probe\n"
)


def _unsupported(stderr: str) -> bool:
    """nft's answer when the kernel has no flowtable support (no
    nf_flow_table / nf_flow_table_inet): the flowtable object type is
    unknown to it."""
    return "No such file or directory" in stderr or "Operation not supported" in stderr
