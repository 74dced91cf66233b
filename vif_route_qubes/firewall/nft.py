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

IPv6 neighbour discovery: a vif with IPv6 addresses may also send ICMPv6
from link-local sources and from ``::`` (duplicate address detection), as
with the iptables backend. That needs one more rule and a set of ours in
``ip6 qubes``::

        set vrq-nd { type ifname; }                      # vifs with IPv6
        chain antispoof {
            iifname . ip6 saddr @allowed accept
            iifname @vrq-nd ip6 saddr { fe80::/10, :: } meta l4proto ipv6-icmp accept
            counter drop
        }

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
from ipaddress import ip_address

from ..errors import CommandFailed, Failure
from ..plan import VIF_GROUP

NAME = "nft"
TABLE = "qubes"
FAMILIES = {4: "ip", 6: "ip6"}
ND_SET = "vrq-nd"
GUARDED = "vrq-guarded"  # in ip qubes: the interfaces we hold elements for
SHARED = "vrq-shared"  # per family: addresses more than one vif has in allowed
ND_SOURCES = "{ fe80::/10, :: }"


def _saddr(version):
    return "ip saddr" if version == 4 else "ip6 saddr"


def _addr_type(version):
    return "ipv4_addr" if version == 4 else "ipv6_addr"


# ----------------------------------------------------------------------------
# The pure part: what the kernel has (parsed) and the payload text


class Ruleset:
    """The parts of ``nft -j list ruleset`` that concern us: which of the
    qubes tables, sets and chains exist, and the sets' elements."""

    def __init__(self, tables=(), sets=None, chains=(), raw_chains=(), rules=None, hooks=None):
        self.tables = set(tables)  # {"ip", "ip6"}
        self.sets = dict(sets or {})  # {(family, set): [element, ...]}
        self.chains = set(chains)  # {(family, chain)}
        self.raw_chains = set(raw_chains)  # iptables-nft chains named vrq-*: {(family, chain)}
        self.rules = dict(rules or {})  # {(family, chain): [[expr, ...], ...]} in order
        self.hooks = dict(hooks or {})  # {(family, chain): (hook, priority)}

    @classmethod
    def parse(cls, text):
        tables, sets, chains, raw, rules, hooks = set(), {}, set(), set(), {}, {}
        try:
            items = json.loads(text or "{}").get("nftables", [])
        except ValueError:
            raise Failure("nft -j list ruleset: output is not JSON") from None
        for item in items:
            (kind, obj), = item.items() if len(item) == 1 else ((None, None),)
            if not isinstance(obj, dict) or obj.get("family") not in ("ip", "ip6"):
                continue
            table = obj.get("table") if kind != "table" else obj.get("name")
            if table == "raw" and kind == "chain" and str(obj.get("name", "")).startswith("vrq-"):
                raw.add((obj["family"], obj["name"]))
            if table != TABLE:
                continue
            if kind == "table":
                tables.add(obj["family"])
            elif kind == "set":
                sets[(obj["family"], obj["name"])] = [_element(e) for e in obj.get("elem", [])]
            elif kind == "chain":
                chains.add((obj["family"], obj["name"]))
                if obj.get("hook"):
                    hooks[(obj["family"], obj["name"])] = (obj["hook"], obj.get("prio"))
            elif kind == "rule":
                rules.setdefault((obj["family"], obj.get("chain")), []).append(obj.get("expr") or [])
        return cls(tables, sets, chains, raw, rules, hooks)

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
        ]

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
        names |= {e for e in self.sets.get(("ip6", ND_SET), []) if isinstance(e, str)}
        names |= {e for e in self.sets.get(("ip", GUARDED), []) if isinstance(e, str)}
        return names


DENY_RULE = "{fam} " + TABLE + " antispoof: ends in drop (default deny)"


def _sends_group(prerouting):
    return any(_matches(r, "iifgroup", VIF_GROUP) and _verdict(r) in ("goto antispoof", "jump antispoof")
               for r in prerouting)


def _ends_in_drop(antispoof):
    return bool(antispoof) and _verdict(antispoof[-1]) == "drop" and not any("match" in e for e in antispoof[-1])


def _matches(rule, meta_key, right):
    """A rule has a ``==`` match on ``meta_key`` (any left side if None)
    against ``right``."""
    for e in rule:
        m = e.get("match") if isinstance(e, dict) else None
        if not m or m.get("op") not in ("==", "in"):
            continue
        left = m.get("left") or {}
        if meta_key is not None and (left.get("meta") or {}).get("key") != meta_key:
            continue
        if str(m.get("right")) == str(right):
            return True
    return False


def _verdict(rule):
    for e in rule:
        if not isinstance(e, dict):
            continue
        for v in ("accept", "drop"):
            if v in e:
                return v
        for v in ("goto", "jump"):
            if v in e:
                return f"{v} {e[v].get('target')}"
    return None


def _same(text, addr):
    try:
        return ip_address(text) == addr
    except ValueError:
        return False


def _element(e):
    """A set element as JSON shows it -> str or (ifname, address str)."""
    if isinstance(e, dict) and "elem" in e:
        e = e["elem"].get("val")
    if isinstance(e, dict) and "concat" in e:
        return tuple(str(x) for x in e["concat"])
    return str(e)


LOADER = "qubes-antispoof.service"


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
    # antispoof before prerouting: the prerouting rule jumps to it
    if (fam, "antispoof") not in ruleset.chains:
        lines.append(f"add chain {fam} {TABLE} antispoof")
        lines.append(f"add rule {fam} {TABLE} antispoof iifname . {_saddr(version)} @allowed accept")
        if version == 6:
            lines.append(f"add rule {fam} {TABLE} antispoof iifname @{ND_SET} ip6 saddr {ND_SOURCES} "
                         "meta l4proto ipv6-icmp accept")
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


class Backend:
    """The nft backend behind the firewall seam (see
    :mod:`vif_route_qubes.firewall` for the contract)."""

    name = NAME

    def __init__(self, sys_, reason):
        self.sys, self.reason = sys_, reason
        self._read = None  # a started read (status) or its Ruleset
        self.errors = []

    def ruleset(self):
        """Read the kernel now (one ``nft -j list ruleset``)."""
        res = self.sys.run(["nft", "-j", "list", "ruleset"], readonly=True, check=False)
        if res.code != 0:
            raise CommandFailed(res.argv, res.code, res.stderr)
        return Ruleset.parse(res.stdout)

    def _commit(self, payload):
        if payload:
            self.sys.run(["nft", "-f", "-"], payload)

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
        # A failed transaction changed nothing; the kernel says what exists,
        # which elements of this interface are there to replace, and which
        # addresses other vifs have too.
        have = self.ruleset()
        mine = {vif.name} | ({previous.name} if renamed else set())
        head = ""
        if renamed:
            head = self._drop(have, previous.name, mine)
        stale = [ip_address(a) for a in have.allowed(vif.name)]
        dropped = [a for a in stale if a not in vif.addresses]
        self._commit(head + transaction(
            vif.name, vif.addresses, stale, drop_nd=vif.name in have.owners(), ruleset=have,
            keep_downstream=[a for a in dropped if have.holders(a, mine)],
            shared=[a for a in vif.addresses if have.holders(a, mine)],
            unshare=[a for a in dropped if len(have.holders(a, mine)) <= 1]))

    @staticmethod
    def _drop(have, name, mine):
        """The removal of ``name``'s elements as ``have`` shows them."""
        found = [ip_address(a) for a in have.allowed(name)]
        return transaction(name, (), found, drop_nd=True, guard="drop",
                           keep_downstream=[a for a in found if have.holders(a, mine)],
                           unshare=[a for a in found if len(have.holders(a, mine)) <= 1])

    def remove(self, name, known=None):
        """Remove ``name``'s elements. ``known``: the addresses the state
        record names (one transaction, no read, refused when one of them is
        shared with another vif); else, or if that was refused, the
        kernel's sets say. Never raises."""
        s = self.sys
        try:
            if known is not None:
                try:
                    self._commit(transaction(name, (), known, drop_nd=True, guard="drop", unshared=known))
                    return [f"nft elements of {name}: {' '.join(map(str, known)) or 'none'}"]
                except CommandFailed as exc:
                    if "injected fault" in exc.stderr:
                        raise
                    if s.log:
                        s.log.debug(f"nft: removal by the record refused ({exc.stderr.strip()}); reading the kernel")
            have = self.ruleset()
            found = [ip_address(a) for a in have.allowed(name)]
            if not found and name not in have.owners():
                return []
            self._commit(self._drop(have, name, {name}))
            return [f"nft elements of {name}: {' '.join(map(str, found)) or 'none'}"]
        except Failure as exc:
            if s.log:
                s.log.warning(f"could not remove the nft elements of {name}: {exc}")
            return []

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
                if (isinstance(e, tuple) and e[0] == name) or (s in (ND_SET, GUARDED) and e == name):
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
