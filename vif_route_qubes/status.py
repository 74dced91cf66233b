"""``vif-route-qubes status``: what each vif should have, next to what the
kernel has, one line per fact marked ``ok``, ``missing`` or ``unexpected``.

What a vif *should* have comes from its state record (what ``online`` was
given, key=value overrides included) and from XenStore (what the toolstack
says now); they are shown side by side, and a disagreement is itself a
finding (XenStore changed after ``online`` ran). Without a record the
expectations come from XenStore alone; without XenStore (unreachable, or
run inside ``ip netns exec`` on a test host) from the record alone, which is
noted, not an error.

What the kernel *has* is read with one process per kind of query, all
started at once: a single ``ip -j -batch -`` (links with their addresses,
routes of both families in every table, permanent neighbour entries) and
the firewall backend's own reads (``iptables-save -t raw`` of both
families, or one ``nft -j list``); ``proxy_arp`` and ``proxy_ndp`` are
/proc reads. Nothing is changed. The firewall lines come from the chosen
backend (:mod:`vif_route_qubes.firewall`); what the *other* backend has for
a vif is listed as unexpected, so a silent mix of both shows, and so is
its default deny (iptables' ``vrq-guard``, nft's ``antispoof``) when it is
left on the host and has no allowance for a vif the chosen backend guards:
it drops the guest's traffic.

Exit status: 0 when every line is ok, 1 otherwise.
"""

import json
import os
from dataclasses import dataclass, field
from ipaddress import ip_interface

from . import plan as P
from . import state, validate
from .config import choose as config_choice
from .config import netvm_from_qubesdb
from .errors import Failure
from .lock import state_dir
from .system import System

OK, MISSING, UNEXPECTED = "ok", "missing", "unexpected"
VERDICTS = (OK, MISSING, UNEXPECTED)

# one ip process for everything ip knows; "root ::/0" asks for IPv6 routes
# explicitly, for iproute2 versions whose "table all" lists IPv4 only
IP_QUERIES = ("addr show", "route show table all", "route show table all root ::/0", "neigh show nud permanent")

DEFAULT_XS_TIMEOUT = 3.0  # status is interactive: do not wait 10 s for a dead daemon


@dataclass
class Check:
    verdict: str
    kind: str
    item: str
    detail: str = ""
    xenstore: str = None  # config rows only: the two sources side by side
    record: str = None

    def as_dict(self) -> dict:
        d = {"verdict": self.verdict, "kind": self.kind, "item": self.item}
        if self.detail:
            d["detail"] = self.detail
        if self.kind == "config":
            d["xenstore"], d["record"] = self.xenstore, self.record
        return d


@dataclass
class Want:
    """What one vif should have (the inputs online works from)."""

    name: str
    domid: int
    mac: str
    addresses: tuple
    gateway: object = None
    gateway6: object = None
    ipv6: bool = True

    def vif(self) -> P.Vif:
        return P.Vif(name=self.name, domid=self.domid, mac=self.mac, addresses=self.addresses,
                     gateway=self.gateway, gateway6=self.gateway6)

    def routed(self) -> tuple:
        return tuple(a for a in self.addresses if a.version == 4 or self.ipv6)


@dataclass
class VifStatus:
    name: str
    xenbus_path: str = None
    sources: list = field(default_factory=list)
    xenstore: dict = None
    record: dict = None
    checks: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.verdict == OK for c in self.checks)

    def add(self, verdict, kind, item, detail="", **kw):
        self.checks.append(Check(verdict, kind, item, detail, **kw))

    def as_dict(self) -> dict:
        return {
            "name": self.name, "ok": self.ok, "xenbus_path": self.xenbus_path, "sources": self.sources,
            "xenstore": self.xenstore, "record": _public_record(self.record),
            "checks": [c.as_dict() for c in self.checks],
        }


def _public_record(record):
    if record is None:
        return None
    keep = ("name", "original", "domid", "devid", "type", "mac", "addresses", "gateway", "gateway6",
            "xenbus_path", "ipv6", "mapped")
    return {k: record.get(k) for k in keep}


# ----------------------------------------------------------------------------
# Reading the kernel


class Kernel:
    """One reading of the kernel's networking state."""

    def __init__(self, links, routes, neigh, firewalls, errors):
        self.links = links  # {ifname: ip -j addr show entry}
        self.routes = routes
        self.neigh = neigh
        self.firewalls = firewalls  # the chosen backend first, then the other
        self.errors = errors

    @classmethod
    def read(cls, sys_, firewalls):
        ipstart = sys_.start(["ip", "-j", "-batch", "-"], "".join(q + "\n" for q in IP_QUERIES), readonly=True)
        for fw in firewalls:
            fw.prefetch()
        ipres = ipstart.wait(check=False)
        errors = []
        for fw in firewalls:
            errors += fw.read_errors()
        if ipres.code != 0:
            raise Failure(f"{' '.join(ipres.argv)} exited {ipres.code}: {ipres.stderr.strip()}")
        arrays = _json_arrays(ipres.stdout)
        if len(arrays) != len(IP_QUERIES):
            raise Failure(f"ip -j -batch: expected {len(IP_QUERIES)} answers, got {len(arrays)}")
        links = {e["ifname"]: e for e in arrays[0] if "ifname" in e}
        routes, seen = [], set()
        for r in arrays[1] + arrays[2]:
            key = json.dumps(r, sort_keys=True)
            if key not in seen:
                seen.add(key)
                routes.append(r)
        return cls(links, routes, arrays[3], firewalls, errors)

    def group2(self):
        return sorted(n for n, e in self.links.items() if str(e.get("group")) == str(P.VIF_GROUP))

    def state_of(self, name) -> "P.VifState":
        """What of ours the kernel shows on ``name``, as hotplug reads it."""
        link = self.links.get(name)
        routes = [r for r in self.routes if r.get("dev") == name]
        neigh = [n for n in self.neigh if n.get("dev") == name]
        return P.vif_state([[link] if link else [], routes, [], neigh])

    def leftovers(self):
        """vifD.N interfaces that carry something of ours (a host route, a
        gateway address, a permanent neighbour entry, proxy_arp) though
        nothing may say they should: found without any record."""
        found = []
        for name in self.links:
            try:
                validate.vif_name(name)
            except Failure:
                continue
            have = self.state_of(name)
            if have.routes or have.addrs or have.neigh or _sysctl(4, name, "proxy_arp") == "1":
                found.append(name)
        return found

    def firewall_owners(self):
        names = set()
        for fw in self.firewalls:
            names |= fw.owners()
        return sorted(names)


_json_arrays = P.json_arrays  # the same parser hotplug reads a vif's state with


# ----------------------------------------------------------------------------
# Gathering the expectations


def _xs_paths(xp):
    return {k: f"{xp}/{k}" for k in ("ip", "mac", "hotplug-status", "hotplug-error", "vifname", "frontend-id")}


def _read_xenstore(env, backends):
    """{xenbus_path: {key: value}}, the netvm's gateways, and an error text
    (None when XenStore answered). One round trip for everything."""
    paths = [p for xp in backends for p in _xs_paths(xp).values()] + list(("qubes_netvm_gateway", "qubes_netvm_gateway6"))
    try:
        from .xs import XenStore

        xs = XenStore(env, default_timeout=DEFAULT_XS_TIMEOUT)
        try:
            values = xs.read_many(paths)
        finally:
            xs.close()
    except Exception as exc:  # noqa: BLE001 - any reason XenStore is unusable is only a note here
        return {}, {}, str(exc) or type(exc).__name__
    per = {xp: {k: values[p] for k, p in _xs_paths(xp).items()} for xp in backends}
    netvm = {k: values[k] for k in ("qubes_netvm_gateway", "qubes_netvm_gateway6")}
    return per, netvm, None


def _want_from_record(record) -> Want:
    vif, ipv6 = state.vif_of(record)
    return Want(name=vif.name, domid=vif.domid, mac=vif.mac, addresses=vif.addresses,
                gateway=vif.gateway, gateway6=vif.gateway6, ipv6=ipv6)


def _want_from_xenstore(name, domid, xsv, netvm):
    try:
        addresses = validate.addresses(xsv["ip"], "XenStore ip")
        mac = validate.mac(xsv["mac"], "XenStore mac") if xsv.get("mac") else None
        gw = validate.gateway(netvm.get("qubes_netvm_gateway"), "qubes_netvm_gateway", 4)
        gw6 = validate.gateway(netvm.get("qubes_netvm_gateway6"), "qubes_netvm_gateway6", 6)
    except Failure:
        return None
    ipv6 = System.ipv6_enabled(name)
    return Want(name=name, domid=domid, mac=mac, addresses=addresses, gateway=gw, gateway6=gw6, ipv6=ipv6)


# ----------------------------------------------------------------------------
# Comparing


def _fmt_addresses(value):
    if value is None:
        return None
    items = value.split() if isinstance(value, str) else [str(a) for a in value]
    return " ".join(sorted(_canonical(a) for a in items)) if items else ""


def _canonical(text):
    try:
        return str(ip_interface(text).ip)
    except ValueError:
        return text


def _config_rows(st, xsv, record, xs_error, netvm):
    """XenStore and the record, side by side."""
    rec = record or {}
    rows = [
        ("addresses", _fmt_addresses(xsv.get("ip")) if xsv else None, _fmt_addresses(rec.get("addresses")) if record else None),
        ("mac", (xsv.get("mac") or "").lower() or None if xsv else None, rec.get("mac") if record else None),
        ("gateway", netvm.get("qubes_netvm_gateway") if xsv is not None else None, rec.get("gateway") if record else None),
    ]
    if rec.get("gateway6") or (xsv is not None and netvm.get("qubes_netvm_gateway6")):
        rows.append(("gateway6", netvm.get("qubes_netvm_gateway6") if xsv is not None else None, rec.get("gateway6")))
    unreachable = xs_error is not None
    for key, xs_val, rec_val in rows:
        shown_xs = "?" if unreachable else (xs_val if xs_val not in (None, "") else "-")
        shown_rec = rec_val if rec_val not in (None, "") else "-"
        if unreachable or not record or not xsv:
            verdict, detail = OK, ""  # one source only: nothing to disagree with
        elif (xs_val or None) == (rec_val or None):
            verdict, detail = OK, ""
        else:
            changed = "XenStore" if key in ("addresses", "mac") else "the netvm's configuration"
            verdict, detail = UNEXPECTED, f"{changed} changed after online ran (run online again)"
        st.add(verdict, "config", key, detail, xenstore=shown_xs, record=shown_rec)
    # hotplug-status: XenStore only; online's last word
    if unreachable:
        st.add(OK, "config", "hotplug-status", "not checked: XenStore unreachable", xenstore="?", record="-")
        return
    hs = (xsv or {}).get("hotplug-status")
    if record:
        if xsv is None or xsv.get("ip") is None and hs is None:
            st.add(MISSING, "config", "hotplug-status", "no backend directory in XenStore (domain gone? offline has not run)",
                   xenstore="-", record="connected")
        elif hs != "connected":
            detail = f"hotplug-error: {xsv.get('hotplug-error')}" if xsv.get("hotplug-error") else ""
            st.add(MISSING, "config", "hotplug-status", detail, xenstore=hs or "-", record="connected")
        else:
            st.add(OK, "config", "hotplug-status", xenstore=hs, record="connected")
    elif hs == "connected":
        st.add(MISSING, "record", "state record", "XenStore says connected but there is no state record")
    elif hs is not None:
        st.add(OK, "config", "hotplug-status", xenstore=hs, record="-")


def _sysctl(version, name, key):
    return (System.read(P.sysctl_path(version, name, key)) or "?").strip()


def _leftover_checks(st, kernel):
    """Nothing should be configured on the interface: every piece of ours
    the kernel still shows is unexpected (what offline would remove)."""
    name, why = st.name, "left behind: no state record or XenStore entry wants it"
    have = kernel.state_of(name)
    found = []
    if have.group == str(P.VIF_GROUP):
        found.append(("link", f"{name} group {P.VIF_GROUP}"))
    for dst, metric in have.routes:
        found.append(("route", f"{dst} metric {metric}"))
    for addr in have.addrs:
        found.append(("address", addr))
    for addr, mac in have.neigh:
        found.append(("neigh", f"{addr} lladdr {mac} permanent"))
    for version, key in ((4, "proxy_arp"), (6, "proxy_ndp")):
        if _sysctl(version, name, key) == "1":
            found.append(("sysctl", f"{key} 1"))
    if found and have.up:
        # up on its own is no finding (another script's vif is up too);
        # up with our configuration on it is
        found.insert(0, ("link", f"{name} up"))
    for kind, item in found:
        st.add(UNEXPECTED, kind, item, why)


def _link_checks(st, want, kernel):
    name = st.name
    link = kernel.links.get(name)
    if link is None:
        if want:
            st.add(MISSING, "link", name, "no such interface")
        return
    if want is None:
        _leftover_checks(st, kernel)
        return
    up = "UP" in link.get("flags", [])
    st.add(OK if up else MISSING, "link", f"{name} up", "" if up else "link is down")
    group = str(link.get("group"))
    st.add(OK if group == str(P.VIF_GROUP) else MISSING, "link", f"{name} group {P.VIF_GROUP}",
           "" if group == str(P.VIF_GROUP) else f"group is {group}")
    sysctls = [(4, "proxy_arp")]
    if want.gateway6 is not None and want.ipv6:
        sysctls.append((6, "proxy_ndp"))
    for version, key in sysctls:
        value = (System.read(P.sysctl_path(version, name, key)) or "?").strip()
        st.add(OK if value == "1" else MISSING, "sysctl", f"{key} 1", "" if value == "1" else f"{key} is {value}")

    # Routes, addresses and neighbour entries: exactly what online's plan
    # says (one definition of "ours"). Wanted and there: ok; wanted and not
    # there: missing; what converge would delete: unexpected. Nothing else
    # is ours to judge (an administrator's /24 route stays, as online leaves it).
    vif = want.vif()
    have = kernel.state_of(name)
    goal = P.wanted(vif, want.ipv6)
    plan = P.converge(name, vif, want.ipv6, have)
    have_routes = dict(have.routes)
    for dst, metric in goal.routes:
        if (dst, metric) in have.routes:
            st.add(OK, "route", f"{dst} metric {metric}")
        else:
            other = have_routes.get(dst)
            st.add(MISSING, "route", f"{dst} metric {metric}",
                   f"present with metric {other}" if other is not None else "")
    for a in goal.addrs:
        st.add(OK if a in have.addrs else MISSING, "address", f"{a} (gateway)")
    have_neigh = dict(have.neigh)
    for a, mac in goal.neigh:
        got = have_neigh.get(a)
        st.add(OK if got == mac else MISSING, "neigh", f"{a} lladdr {mac} permanent",
               "" if got == mac or got is None else f"present with lladdr {got}")
    # converge deletes only what the kernel shows and the goal lacks
    for line in plan.pre + plan.batch:
        kind, verb, item, *_ = line.split()
        if verb != "del":
            continue
        if kind == "route":
            st.add(UNEXPECTED, "route", f"{item} metric {line.split()[-1]}")
        elif kind == "addr":
            st.add(UNEXPECTED, "address", item)
        else:
            st.add(UNEXPECTED, "neigh", f"{item} lladdr {have_neigh[item]} permanent")


def _firewall_checks(st, want, kernel):
    """The chosen backend's verdicts on what the vif should have; then the
    other backend's rules for the same vif, all unexpected (moving between
    backends is offline with one, online with the other: never a mix), and
    its default deny when it is in force and lets nothing of the vif through."""
    for i, fw in enumerate(kernel.firewalls):
        for verdict, item, detail in fw.check(want.vif() if want is not None and i == 0 else None, st.name):
            kind, _, rest = item.partition(" ")
            if i > 0 and verdict == UNEXPECTED:
                detail = f"{fw.name} backend's, but {kernel.firewalls[0].name} is in use" + (f"; {detail}" if detail else "")
            st.add(verdict, kind, rest, detail)
        if i > 0 and want is not None:
            # the other backend's default deny, left on the host, drops
            # what the chosen backend lets through (the log of the move
            # warned; this says it for as long as it lasts)
            for item, detail in fw.denies(want.vif()):
                kind, _, rest = item.partition(" ")
                st.add(UNEXPECTED, kind, rest, f"{fw.name} backend's, but {kernel.firewalls[0].name} is in use; {detail}")


# ----------------------------------------------------------------------------
# The command


@dataclass
class Report:
    vifs: list
    notes: list
    xenstore_error: str = None
    firewall: dict = None
    config: dict = None  # where the netvm's own values come from

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.vifs)

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "xenstore": {"reachable": self.xenstore_error is None, "error": self.xenstore_error},
            "notes": self.notes,
            "firewall": self.firewall,
            "configuration": self.config,
            "vifs": [v.as_dict() for v in self.vifs],
        }


def _records(directory):
    """{interface name now: (record file key, record)}"""
    found = {}
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return found
    for entry in entries:
        if not entry.endswith(".json"):
            continue
        key = entry[: -len(".json")]
        record = state.load(directory, key)
        if record and record.get("name"):
            found[record["name"]] = (key, record)
    return found


def _backends(sys_, env, requested):
    """The chosen firewall backend, and the other one when its tool is
    installed (its leftovers are worth seeing; without its tool it has none)."""
    from .firewall import backend_for, installed, other

    chosen = backend_for(sys_, env, requested)
    alt = other(chosen.name)
    tool = "nft" if alt == "nft" else sys_.iptables(4, "save")
    if not installed(env, tool):
        return [chosen]
    try:
        return [chosen, backend_for(sys_, env, alt)]
    except Failure:
        return [chosen]


def collect(names, env, log=None, firewall=None) -> Report:
    sys_ = System(env=env, log=log)
    firewalls = _backends(sys_, env, firewall)
    kernel = Kernel.read(sys_, firewalls)
    notes = list(kernel.errors)
    records = _records(state_dir(env))
    by_original = {key: name for name, (key, _) in records.items()}
    if names:
        targets = []
        for n in names:
            validate.ifname(n, "VIF")
            targets.append(by_original.get(n, n))
    else:
        targets = sorted(set(records) | set(kernel.group2()) | set(kernel.firewall_owners())
                         | set(kernel.leftovers()))
    # where each vif's backend lives in XenStore
    backends = {}
    for name in targets:
        key, record = records.get(name, (name, None))
        xp = record.get("xenbus_path") if record else None
        if not xp:
            try:
                domid, devid = validate.vif_name(key)
                xp = f"backend/vif/{domid}/{devid}"
            except Failure:
                xp = None
        backends[name] = xp
    per_xs, netvm, xs_error = _read_xenstore(env, sorted({xp for xp in backends.values() if xp}))
    if xs_error is not None:
        notes.append(f"XenStore unreachable ({xs_error}): expectations come from the state records alone")
    # the netvm's own values from where online reads them (config.py)
    source, reason = config_choice(env)
    if source == "qubesdb":
        try:
            found = netvm_from_qubesdb(env)
            netvm = {k: found.get(k) for k in ("qubes_netvm_gateway", "qubes_netvm_gateway6")}
        except Failure as exc:
            notes.append(f"QubesDB unreadable ({exc}): the gateways are judged from the state records alone")
            netvm = {}
    vifs = []
    for name in targets:
        key, record = records.get(name, (name, None))
        xp = backends[name]
        xsv = per_xs.get(xp) if xp and xs_error is None else None
        if xsv is not None and all(v is None for v in xsv.values()):
            xsv = {}  # reachable, but the backend directory is gone
        st = VifStatus(name=name, xenbus_path=xp, record=record,
                       xenstore=({k: v for k, v in xsv.items() if v is not None} if xsv is not None else None))
        want = None
        if record:
            want = _want_from_record(record)
            st.sources.append("state record")
        if xsv:
            st.sources.append("XenStore")
            if want is None and xsv.get("ip"):
                try:
                    domid = validate.vif_name(key)[0]
                except Failure:
                    domid = None
                if domid is not None:
                    want = _want_from_xenstore(name, domid, xsv, netvm)
        if record or xsv:
            _config_rows(st, xsv, record, xs_error, netvm)
        if want is None and not record and not xsv and name in (names or ()) and name not in kernel.links:
            st.add(MISSING, "vif", name, "no state record, no XenStore entry, no interface")
        _link_checks(st, want, kernel)
        _nat_checks(st, record)
        _firewall_checks(st, want, kernel)
        vifs.append(st)
    chosen = firewalls[0]
    return Report(vifs=vifs, notes=notes, xenstore_error=xs_error,
                  firewall={"backend": chosen.name, "reason": chosen.reason},
                  config={"source": source, "reason": reason})


def _nat_checks(st, record):
    """The mapped addresses' NAT namespace (disposables): there when the
    record says the vif has mapped addresses, else not (a file test; what
    is inside it online rewrites at every run)."""
    from . import mapped

    maps = ((record or {}).get("mapped") or {}).get("maps") or []
    ns = mapped.netns_name(st.name)
    there = mapped.netns_exists(st.name)
    detail = ", ".join(f"{real} seen by the guest as {visible} (gateway {gw})" for real, visible, gw in maps)
    if maps and there:
        st.add(OK, "nat", ns, detail)
    elif maps:
        st.add(MISSING, "nat", ns, f"{detail}: the namespace is gone (online again repairs it)")
    elif there:
        st.add(UNEXPECTED, "nat", ns, "no mapped address is recorded for this vif (online again removes it)")


def render_text(report, problems=False) -> str:
    """``problems``: only the lines that are not ok (and the vifs they
    belong to), so one finding is not lost among many ok lines."""
    out = []
    for note in report.notes:
        out.append(f"# {note}")
    if not report.vifs:
        out.append("no vifs: no state records, no interfaces in group 2, no firewall rules of ours")
    shown = [st for st in report.vifs if not (problems and st.ok)]
    if problems and report.vifs and not shown:
        out.append(f"no problems: {len(report.vifs)} vif(s), every line ok")
    for st in shown:
        bad = [c for c in st.checks if c.verdict != OK]
        counts = ", ".join(f"{sum(c.verdict == v for c in bad)} {v}" for v in (MISSING, UNEXPECTED)
                           if any(c.verdict == v for c in bad))
        where = ", ".join(st.sources) or "no state record, not in XenStore"
        out.append(f"{st.name}: {counts or 'ok'} ({where}{'; ' + st.xenbus_path if st.xenbus_path else ''})")
        checks = bad if problems else st.checks
        config = [c for c in checks if c.kind == "config"]
        width = max([len(c.xenstore) for c in config] + [len("XenStore")]) + 2
        if config:
            out.append(f"  {'':<10} {'':<9} {'':<15} {'XenStore':<{width}} state record")
        for c in checks:
            if c.kind == "config":
                line = f"  {c.verdict:<10} {c.kind:<9} {c.item:<15} {c.xenstore:<{width}} {c.record}"
            else:
                line = f"  {c.verdict:<10} {c.kind:<9} {c.item}"
            if c.detail:
                line += f"  # {c.detail}"
            out.append(line.rstrip())
    if report.firewall:
        out.append(f"# firewall: {report.firewall['backend']} backend ({report.firewall['reason']})")
    if report.config:
        out.append(f"# configuration: {report.config['source']} ({report.config['reason']})")
    return "\n".join(out) + "\n"


def main(names, env, as_json=False, log=None, out=None, firewall=None, problems=False) -> int:
    import sys

    out = out or sys.stdout
    report = collect(names, env, log=log, firewall=firewall)
    if as_json:
        data = report.as_dict()
        if problems:
            data["vifs"] = [dict(v, checks=[c for c in v["checks"] if c["verdict"] != OK])
                            for v in data["vifs"] if not v["ok"]]
        out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        out.write(render_text(report, problems))
    return 0 if report.ok else 1
