"""qubes-setup-dnat-to-ns: point the guests' virtual nameservers at the
netvm's real ones.

Guests are told to use fixed, private addresses: DNS1 and DNS2 (QubesDB
``/qubes-netvm-primary-dns`` / ``-secondary-dns``, or XenStore
``qubes_netvm_primary_dns`` / ``qubes_netvm_secondary_dns`` under the netvm's
home: :mod:`vif_route_qubes.config` chooses) and, for IPv6, the same names
ending in ``dns6``. This command rewrites DNS traffic (UDP and
TCP port 53) for them to whatever upstream nameservers of the same family
the netvm has right now, and is re-run by the NetworkManager dispatcher hook
whenever those change.

How it is built:

* Inputs (XenStore, resolv.conf, systemd-resolved) become a plan: per
  family, a list of (virtual nameserver, upstream or None). DNSi goes to
  upstream i, the list of upstreams repeated when it is shorter (Qubes'
  rule since its issue #9011: with one upstream both go to it, so a query to
  DNS2 never leaks); None means no upstream of that family: drop.
* A backend (``vif_route_qubes.firewall.dns_iptables`` or ``dns_nft``,
  chosen once by :func:`vif_route_qubes.firewall.choose`) reads what is in
  force, renders the difference, and the tool runs what it rendered. The
  tool never branches on which backend it is.
* "Already right" is the backend's text compare of what is in force with
  what it would write; then nothing is run and the exit status is 100,
  which the hook relies on.
* An upstream source that cannot be read is an error (exit 1, rules in
  force untouched): treating it as "no upstream" would silently drop every
  guest's DNS. A readable source naming no usable server is "no upstream":
  drop, as intended.

Start-up time matters (the hook runs on every link change): the plain call
without arguments goes straight to :func:`run`; every other form goes through
the click command built in :func:`command`, which calls the same function.
Everything else is imported where it is needed.
"""

import os
import sys

from .errors import Failure

PROG = "qubes-setup-dnat-to-ns"
XS_KEYS = {4: ("qubes_netvm_primary_dns", "qubes_netvm_secondary_dns"),
           6: ("qubes_netvm_primary_dns6", "qubes_netvm_secondary_dns6")}
XS_PRIMARY, XS_SECONDARY = XS_KEYS[4]
RESOLV_CONF = "/etc/resolv.conf"
RESOLVED_CONF = "/run/systemd/resolve/resolv.conf"
QUBES_NS = "/var/run/qubes/qubes-ns"
# systemd-resolved's stub listeners (the second one bypasses DNSSEC/LLMNR)
RESOLVED_STUBS = ("127.0.0.53", "127.0.0.54")
# resolved's D-Bus API: the DNS property is a(iiay): (ifindex, family,
# address bytes), ifindex 0 for the global servers (resolved.conf DNS=).
RESOLVED_QUERY = ["busctl", "--json=short", "--timeout=5", "get-property", "org.freedesktop.resolve1",
                  "/org/freedesktop/resolve1", "org.freedesktop.resolve1.Manager", "DNSEx"]
UNCHANGED = 100
OUT_OF_DATE = 3  # --status: the rules in force are not what a run would write


class Options:
    """What the command line says; defaults are what the hook's plain call gets."""

    def __init__(self, dns1=None, dns2=None, dns6_1=None, dns6_2=None, resolv_conf=RESOLV_CONF,
                 resolved_conf=RESOLVED_CONF, qubes_ns=QUBES_NS, dry_run=False, status=False, verbose=False,
                 firewall=None, remove=False):
        self.given = {4: [dns1, dns2], 6: [dns6_1, dns6_2]}
        self.resolv_conf, self.resolved_conf, self.qubes_ns = resolv_conf, resolved_conf, qubes_ns
        self.dry_run, self.status, self.verbose = dry_run, status, verbose
        self.firewall, self.remove = firewall, remove


def _option_name(version, i):
    return f"--dns{i + 1}" if version == 4 else f"--dns6-{i + 1}"


def _label(version, i):
    """DNS1, DNS2 (IPv4) and DNS6-1, DNS6-2 (IPv6), for people."""
    return f"DNS{i + 1}" if version == 4 else f"DNS6-{i + 1}"


# ----------------------------------------------------------------------------
# Inputs (pure parts first)


def _address(text):
    from ipaddress import ip_address

    return ip_address(text)


def nameservers(text, warn=None):
    """``nameserver`` addresses (IPv4 and IPv6) of a resolv.conf text, in
    order, without duplicates; malformed lines and anything not an address
    ignored (as the resolver itself skips what it cannot parse). resolv.conf
    is written by DHCP hooks and VPN clients, so an address is validated as
    XenStore input is: an IPv6 zone (``%eth0``) never reaches a payload (nft
    and iptables refuse it): on a link-local address the entry is dropped
    later (:func:`usable`), on any other the zone is stripped, with a warning
    through ``warn``."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            addr = _address(words[1])
        except ValueError:
            continue
        addr = _without_zone(addr, warn)
        if addr not in found:
            found.append(addr)
    return found


def _without_zone(addr, warn):
    zone = getattr(addr, "scope_id", None)
    if not zone:
        return addr
    bare = _address(str(addr).partition("%")[0])
    if not bare.is_link_local and warn:
        warn(f"upstream nameserver {addr}: zone %{zone} stripped (a global address needs none)")
    # a link-local one keeps its zone in the warning usable() leads to
    return bare if not bare.is_link_local else addr


def usable(addr) -> bool:
    """Can forwarded guest traffic be translated to it? Never to loopback
    (the kernel drops martians: route_localnet is off, and rightly so), nor
    to link-local (a router never forwards to it), nor to an address that is
    not a unicast host."""
    if addr.is_loopback or addr.is_unspecified or addr.is_multicast or addr.is_reserved or addr.is_link_local:
        return False
    return getattr(addr, "ipv4_mapped", None) is None


def resolved_servers(json_text, warn=None):
    """(addresses, scope) from resolved's ``DNSEx`` property (``DNS`` has no
    port) as busctl prints it: the global servers when there are any (scope
    "global"), else the per-link ones ("per-link"). Qubes sorts the global
    ones first because a VPN client's per-link server leaked queries; a
    global server configured means the administrator chose where DNS goes,
    so per-link ones are then not used at all (not even for the other
    family). A server on a port other than 53 is not used (the DNAT
    translates to port 53), with a warning through ``warn``."""
    import json
    from ipaddress import IPv4Address, IPv6Address

    try:
        data = json.loads(json_text)["data"]
        entries = [(int(e[0]), int(e[1]), bytes(e[2]), int(e[3]) if len(e) > 3 else 0) for e in data]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise Failure(f"unexpected answer from systemd-resolved ({' '.join(RESOLVED_QUERY[:2])}): {exc}") from None
    glob = [e for e in entries if e[0] == 0]
    chosen, scope = (glob, "global") if glob else ([e for e in entries if e[0] != 0], "per-link")
    found = []
    for _, family, raw, port in chosen:
        kind = {(2, 4): IPv4Address, (10, 16): IPv6Address}.get((family, len(raw)))
        addr = kind(raw) if kind else None
        if addr is not None and port not in (0, 53):
            if warn:
                warn(f"upstream nameserver {addr} port {port} (systemd-resolved): not port 53, not used")
            continue
        if addr is not None and addr not in found:
            found.append(addr)
    return found, scope


def _read(path):
    """The file's text; Failure naming it when it cannot be read (missing,
    a directory, no permission): the caller must not treat that as "no
    upstream"."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as exc:
        raise Failure(f"cannot read {path}: {exc.strerror or exc}; the rules in force were left as they are") \
            from None


def _ask_resolved(s, log):
    """resolved's servers over D-Bus, or None when it does not answer (not
    running, no bus, no busctl): then its file is the fallback."""
    try:
        res = s.run(RESOLVED_QUERY, readonly=True, check=False)
    except Failure as exc:  # busctl not installed
        log.debug(f"systemd-resolved not asked: {exc}")
        return None
    if res.code != 0:
        log.debug(f"systemd-resolved did not answer on D-Bus: {res.stderr.strip()[:200]}")
        return None
    return resolved_servers(res.stdout, lambda msg: log.warning(msg, loud=True))


def find_upstreams(opts, s, log):
    """-> (usable upstreams of both families, where they came from). What
    cannot be a DNAT target is skipped with a warning (stderr and the log)
    naming it and its source."""
    def warn(msg):
        log.warning(msg, loud=True)

    def checked(found, where):
        out = []
        for a in found:
            if usable(a):
                out.append(a)
            elif str(a) not in RESOLVED_STUBS:
                why = "link-local" if a.is_link_local else "not a unicast host a router forwards to"
                warn(f"upstream nameserver {a} from {where}: {why}, not a DNAT target; skipped")
        return out

    listed = nameservers(_read(opts.resolv_conf), warn)
    if listed and all(str(a) in RESOLVED_STUBS for a in listed):
        # only systemd-resolved's stub: ask it for the real servers
        answer = _ask_resolved(s, log)
        if answer is not None:
            found, scope = answer
            where = f"systemd-resolved over D-Bus, {scope} servers"
            return checked(found, where), where
        text = _read(opts.resolved_conf)
        where = f"systemd-resolved, {opts.resolved_conf}"
        return checked(nameservers(text, warn), where), where
    return checked(listed, opts.resolv_conf), opts.resolv_conf


def qubes_ns_values(text):
    """NS1/NS2 of the old ``qubes-ns`` file (shell assignments, maybe quoted)."""
    values = {}
    for line in text.splitlines():
        key, eq, value = line.strip().partition("=")
        if eq and key in ("NS1", "NS2"):
            values[key] = value.strip().strip("'\"") or None
    return values.get("NS1"), values.get("NS2")


def _dns_address(value, where, version=4):
    from ipaddress import IPv4Address, IPv6Address

    kind = IPv4Address if version == 4 else IPv6Address
    try:
        addr = kind(value.strip())
    except ValueError:
        raise Failure(f"{where}: {value[:40]!r} is not an IPv{version} address") from None
    if not usable(addr):
        raise Failure(f"{where}: {addr} cannot be a virtual nameserver address")
    return addr


def find_dns(opts, env, source=None):
    """{4: [(address, where)], 6: [...]}: the virtual nameservers of each
    family. Each comes from its option, else the configuration source
    (``source``: (name, reason) of :func:`vif_route_qubes.config.choose`,
    chosen when None): QubesDB's ``/qubes-netvm-primary-dns``... or
    XenStore's ``qubes_netvm_primary_dns``...; the IPv4 pair, when the source
    has neither IPv4 value, from the old qubes-ns file. Raises Failure when
    no family has any."""
    from .config import DNAT, values, where

    found = {v: [(val, _option_name(v, i)) if val else (None, None) for i, val in enumerate(opts.given[v])]
             for v in (4, 6)}
    problem = None
    name = None
    if any(val is None for v in (4, 6) for val in opts.given[v]):
        if source is None:
            from .config import choose

            source = choose(env)
        name = source[0]
        got = {}
        try:
            got = values(name, env, DNAT)
        except Failure as exc:
            problem = str(exc)
        for v in (4, 6):
            for i, key in enumerate(XS_KEYS[v]):
                if found[v][i][0] is None and got.get(key):
                    found[v][i] = (got[key], where(name, key))
        if not any(got.get(k) for k in XS_KEYS[4]):
            try:
                text = _read(opts.qubes_ns)
            except Failure:
                text = None  # the old file is optional
            if text is not None:
                for i, val in enumerate(qubes_ns_values(text)):
                    if found[4][i][0] is None and val:
                        found[4][i] = (val, f"{opts.qubes_ns} NS{i + 1}")
    result = {4: [], 6: []}
    for v in (4, 6):
        for value, whence in found[v]:
            if value is not None:
                addr = _dns_address(value, whence, v)
                if all(addr != a for a, _ in result[v]):
                    result[v].append((addr, whence))
    if not result[4] and not result[6]:
        keys = XS_KEYS[4] + XS_KEYS[6]
        why = problem or (f"{'QubesDB' if name == 'qubesdb' else 'XenStore'} has none of "
                          + ", ".join(where(name, k).split(" ", 1)[1] for k in keys))
        raise Failure(f"no DNS1/DNS2 address: {why}; {opts.qubes_ns} names neither NS1 nor NS2; "
                      "--dns1/--dns2 not given")
    return result


# ----------------------------------------------------------------------------
# Plan (pure)


def plan(dns, upstreams):
    """{version: [(virtual nameserver, upstream or None)]}: DNSi -> the
    i-th upstream of its family, the upstreams repeated when fewer (Qubes'
    rule); None (drop) when the family has no upstream."""
    out = {}
    for version in (4, 6):
        ups = [u for u in upstreams if u.version == version]
        out[version] = [(addr, ups[i % len(ups)] if ups else None) for i, addr in enumerate(dns[version])]
    return out


def describe(the_plan, upstreams, where):
    parts = [f"{_label(v, i)} {a} -> {to if to is not None else 'dropped'}"
             for v in (4, 6) for i, (a, to) in enumerate(the_plan[v])]
    return f"{', '.join(parts)} (upstreams from {where}: {' '.join(map(str, upstreams)) or 'none'})"


def problems(the_plan, upstreams):
    """Lines for people about a plan that leaves guests without DNS."""
    out = []
    for v, other in ((4, 6), (6, 4)):
        if the_plan[v] and not any(u.version == v for u in upstreams):
            names = "/".join(_label(v, i) for i in range(len(the_plan[v])))
            if any(u.version == other for u in upstreams):
                others = "/".join(_label(other, i) for i in range(len(the_plan[other])))
                out.append(f"guests have no IPv{v} DNS path: {names} are IPv{v} but every upstream nameserver is "
                           f"IPv{other}; their queries are dropped"
                           + (f" (only guests using {others} get answers)" if the_plan[other] else
                              f" (set {' / '.join(XS_KEYS[other])} to give guests IPv{other} ones)"))
            else:
                out.append(f"no upstream nameserver: queries to {names} are dropped")
    return out


# ----------------------------------------------------------------------------
# Running


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _source(opts, env):
    """The configuration source's (name, reason), or None when the options
    give every virtual nameserver (nothing is read then)."""
    if all(val is not None for v in (4, 6) for val in opts.given[v]):
        return None
    from .config import choose

    return choose(env)


def backend_module(name):
    """The chosen backend's DNS renderer (a firewall.contract.DnsRules)."""
    from .firewall.contract import dns_rules

    return dns_rules(name)


def _backend(opts, env, s, log):
    from .firewall import choose

    name, why = choose(env, opts.firewall)
    log.debug(f"firewall backend {name} ({why})")
    s.note(f"firewall backend: {name} ({why})")
    return backend_module(name), name, why


def apply(opts, env, s, log):
    from .lock import HostLock

    fw, name, why = _backend(opts, env, s, log)
    # Inputs are read under the lock too: of two runs racing over a change
    # of resolv.conf, the one that writes last has read last.
    with _NoLock() if opts.dry_run else HostLock(env):
        # the listing runs while XenStore and resolv.conf are read
        listing = fw.listing(s)
        try:
            if opts.remove:
                the_plan, upstreams, where = {4: [], 6: []}, [], "--remove"
            else:
                source = _source(opts, env)
                if source is not None:
                    log.debug(f"configuration: {source[0]} ({source[1]})")
                    s.note(f"configuration: {source[0]} ({source[1]})")
                dns = find_dns(opts, env, source)
                upstreams, where = find_upstreams(opts, s, log)
                the_plan = plan({v: [a for a, _ in dns[v]] for v in (4, 6)}, upstreams)
        finally:
            listed = listing.wait()
        text = "remove the rules" if opts.remove else describe(the_plan, upstreams, where)
        log.debug(text)
        if not opts.remove:
            s.note(f"upstream nameservers: {' '.join(map(str, upstreams)) or 'none'} (from {where})")
        s.note(text)
        for line in problems(the_plan, upstreams) if not opts.remove else ():
            s.note(line)
        calls = fw.changes(s, the_plan, listed)
        if not calls:
            s.note("the rules are already right: nothing to do")
            log.debug("rules already right, unchanged")
            return UNCHANGED
        s.run_all([(argv, payload, (0,)) for argv, payload in calls])
    log.info(f"{text} [{name}]")
    for line in problems(the_plan, upstreams) if not opts.remove else ():
        log.warning(line)
    return 0


def status(opts, env, s, log, out):
    """Print what is known and in force -> 0 up to date, OUT_OF_DATE, or 1
    when it cannot tell."""
    def say(text=""):
        print(text, file=out)

    fw, name, why = _backend(opts, env, s, log)
    say(f"firewall backend: {name} ({why}); owns {fw.owned}")
    listing = fw.listing(s)
    try:
        try:
            source = _source(opts, env)
            if source is not None:
                say(f"configuration: {source[0]} ({source[1]})")
            dns = find_dns(opts, env, source)
        except Failure as exc:
            dns = None
            say(f"DNS1/DNS2: unknown ({exc})")
        for v in (4, 6):
            for i, (addr, where) in enumerate(dns[v] if dns else ()):
                say(f"{_label(v, i)}: {addr} (from {where})")
        try:
            upstreams, where = find_upstreams(opts, s, log)
            say(f"upstream nameservers: {' '.join(map(str, upstreams)) or 'none'} (from {where})")
        except Failure as exc:
            upstreams = None
            say(f"upstream nameservers: unknown ({exc})")
    finally:
        listed = listing.wait()
    for v, lines in fw.in_force(listed).items():
        say(f"rules in force, IPv{v}:")
        for line in lines:
            say(f"  {line}")
    if dns is None or upstreams is None:
        say("state: unknown (see above)")
        return 1
    the_plan = plan({v: [a for a, _ in dns[v]] for v in (4, 6)}, upstreams)
    say(f"wanted: {describe(the_plan, upstreams, where)}")
    for line in problems(the_plan, upstreams):
        say(f"warning: {line}")
    try:
        pending = fw.changes(s, the_plan, listed)
    except Failure as exc:
        say(f"state: unknown ({exc})")
        return 1
    if pending:
        say(f"state: out of date (run {PROG} to apply)")
        return OUT_OF_DATE
    say("state: up to date")
    return 0


def run(opts, env, out=None, log=None) -> int:
    """One invocation -> exit status: 0 changed, 100 already right, 1 failed
    (--status: 0 up to date, 3 out of date, 1 cannot tell)."""
    from .log import Log
    from .system import System

    # dry runs and --status leave no trace in syslog or the hotplug log
    log = log or Log(PROG, env, verbose=opts.verbose, stderr_only=opts.dry_run or opts.status)
    out = out or sys.stdout
    try:
        s = System(dry_run=opts.dry_run, out=out, log=log, env=env)
        if opts.status:
            return status(opts, env, s, log, out)
        return apply(opts, env, s, log)
    except Failure as exc:
        log.error(str(exc))
        return 1
    finally:
        log.close()


# ----------------------------------------------------------------------------
# Command line

HELP = f"""Translate DNS traffic for the guests' virtual nameservers (DNS1 and DNS2,
and their IPv6 counterparts DNS6-1 and DNS6-2) to the netvm's current upstream
nameservers of the same family (UDP and TCP port 53). With no upstream of a
family, DNS to that family's virtual nameservers is dropped, never forwarded.

\b
Firewall backends (--firewall, VIF_ROUTE_QUBES_FIREWALL; auto: nft when the
nft command is installed, else iptables):
  iptables  nat chain vrq-dnat-dns (from PREROUTING) and filter chain
            vrq-dns-guard (from FORWARD), iptables and ip6tables
  nft       chains dnat-dns (nat, as Qubes) and dnat-dns-guard (filter) in
            tables ip qubes and ip6 qubes, one nft -f - transaction; no
            other chain is touched, no table flushed or deleted
To move from one backend to the other: run with the new one, then with the
old one and --remove.

\b
Upstreams: the nameserver lines of --resolv-conf, in order (loopback,
link-local and other addresses that cannot be forwarded to are skipped).
When it names only systemd-resolved's stub (127.0.0.53/54), resolved is
asked over D-Bus (busctl) for its servers: the global ones when there are
any, else the per-link ones; when resolved does not answer, --resolved-conf
is read. DNS1 goes to the first upstream of its family, DNS2 to the second
(both to the only one). A source that cannot be read is an error.

\b
Exit status:
  0    the rules were changed (--dry-run: would be changed;
       --status: the rules in force are up to date)
  100  the rules were already right: nothing was changed
  3    --status only: the rules in force are out of date
  1    error (one line on stderr; the rules in force are left as they are)
  2    usage error (bad option or value)

\b
Virtual nameservers read from QubesDB where its daemon answers, else from
XenStore (relative to this domain's home); VIF_ROUTE_QUBES_CONFIG=qubesdb or
xenstore chooses:
  QubesDB                      XenStore
  /qubes-netvm-primary-dns     {XS_KEYS[4][0]}     DNS1
  /qubes-netvm-secondary-dns   {XS_KEYS[4][1]}   DNS2
  /qubes-netvm-primary-dns6    {XS_KEYS[6][0]}    DNS6-1 (IPv6)
  /qubes-netvm-secondary-dns6  {XS_KEYS[6][1]}  DNS6-2 (IPv6)

\b
Environment:
  VIF_ROUTE_QUBES_CONFIG      qubesdb, xenstore or auto (default auto)
  VIF_ROUTE_QUBES_QUBESDB_SOCKET  QubesDB socket (default /var/run/qubes/qubesdb.sock)
  XENSTORED_PATH              XenStore socket (default /var/run/xenstored/socket,
                              else /dev/xen/xenbus)
  VIF_ROUTE_QUBES_XS_TIMEOUT  seconds to wait for XenStore (default 10)
  VIF_ROUTE_QUBES_FIREWALL    iptables, nft or auto (default auto)
  VIF_ROUTE_QUBES_LOCK        lock file shared with vif-route-qubes
                              (default STATE_DIR/lock)
  VIF_ROUTE_QUBES_STATE_DIR   default /run/vif-route-qubes
  VIF_ROUTE_QUBES_LOCK_TIMEOUT  seconds to wait for the lock (default 20)
  VIF_ROUTE_QUBES_IPTABLES    nft or legacy: force an iptables flavour
  DBUS_SYSTEM_BUS_ADDRESS     the system bus busctl asks systemd-resolved on
  VIF_ROUTE_QUBES_DEBUG=1     debug logging on stderr (like -v)
  VIF_ROUTE_QUBES_SYSLOG      syslog socket (default /dev/log)
  VIF_ROUTE_QUBES_HOTPLUG_LOG log file (default /var/log/xen/xen-hotplug.log)

\b
Dry runs and --status log nothing to syslog or the hotplug log.
"""


def command():
    """The click command (built on demand: the hook's plain call never
    imports click)."""
    import click

    from .firewall import CHOICES

    @click.command(PROG, help=HELP, context_settings={"help_option_names": ["-h", "--help"],
                                                      "max_content_width": 100})
    @click.option("--dns1", metavar="ADDR", help="DNS1 (default: from QubesDB or XenStore).")
    @click.option("--dns2", metavar="ADDR", help="DNS2 (default: from QubesDB or XenStore).")
    @click.option("--dns6-1", "dns6_1", metavar="ADDR", help="DNS6-1, IPv6 (default: from QubesDB or XenStore).")
    @click.option("--dns6-2", "dns6_2", metavar="ADDR", help="DNS6-2, IPv6 (default: from QubesDB or XenStore).")
    @click.option("--resolv-conf", default=RESOLV_CONF, show_default=True, metavar="PATH",
                  help="Where the upstream nameservers are listed.")
    @click.option("--resolved-conf", default=RESOLVED_CONF, show_default=True, metavar="PATH",
                  help="systemd-resolved's list of real upstreams, read when resolved does not answer on D-Bus.")
    @click.option("--qubes-ns", default=QUBES_NS, show_default=True, metavar="PATH",
                  help="Old NS1=/NS2= file, read when QubesDB or XenStore has neither IPv4 value.")
    @click.option("--firewall", type=click.Choice(CHOICES), default=None,
                  help="Firewall backend (default: VIF_ROUTE_QUBES_FIREWALL, else auto).")
    @click.option("--remove", is_flag=True,
                  help="Remove this backend's DNS rules (after moving to the other backend).")
    @click.option("-n", "--dry-run", is_flag=True,
                  help="Print the upstreams found and the payload that would be applied; change nothing.")
    @click.option("--status", is_flag=True,
                  help="Print the virtual nameservers, the upstreams and the rules in force; "
                       "exit 0 when up to date, 3 when not.")
    @click.option("-v", "--verbose", is_flag=True, help="Log every step to stderr.")
    @click.version_option(package_name="vif-route-qubes", message="%(prog)s %(version)s")
    def cmd(dns1, dns2, dns6_1, dns6_2, resolv_conf, resolved_conf, qubes_ns, firewall, remove, dry_run, status,
            verbose):
        if dry_run and status:
            raise click.UsageError("--dry-run and --status exclude each other")
        if remove and status:
            raise click.UsageError("--remove and --status exclude each other")
        for name, value, version in (("--dns1", dns1, 4), ("--dns2", dns2, 4),
                                     ("--dns6-1", dns6_1, 6), ("--dns6-2", dns6_2, 6)):
            if value is not None:
                try:
                    _dns_address(value, name, version)
                except Failure as exc:
                    raise click.BadParameter(str(exc)) from None
        opts = Options(dns1=dns1, dns2=dns2, dns6_1=dns6_1, dns6_2=dns6_2, resolv_conf=resolv_conf,
                       resolved_conf=resolved_conf, qubes_ns=qubes_ns, dry_run=dry_run, status=status,
                       verbose=verbose, firewall=firewall, remove=remove)
        if dry_run:
            click.echo(f"# {PROG} (dry run: nothing is changed)")
        sys.exit(run(opts, os.environ))

    return cmd


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # click's shell completion calls the program with no arguments and this
    # variable set: it must reach click, not rewrite the rules.
    if not argv and "_QUBES_SETUP_DNAT_TO_NS_COMPLETE" not in os.environ:  # the hook's and the unit's call
        from .system import leave

        leave(run(Options(), os.environ))
    command().main(args=argv, prog_name=PROG)
