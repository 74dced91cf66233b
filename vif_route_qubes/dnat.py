"""qubes-setup-dnat-to-ns: point the guests' two virtual nameservers at the
netvm's real ones.

Guests are told to use two fixed, private addresses, DNS1 and DNS2 (XenStore
``qubes_netvm_primary_dns`` / ``qubes_netvm_secondary_dns`` under the netvm's
home). This command rewrites DNS traffic (UDP and TCP port 53) for them to
whatever upstream nameservers the netvm has right now, and is re-run by the
NetworkManager dispatcher hook whenever those change.

What it owns, and why it is built this way:

* ``vrq-dnat-dns`` in the nat table, jumped to once from PREROUTING: DNS1 ->
  the first upstream, DNS2 -> the second (or both -> the only one). It is
  the only thing that changes when the upstreams change, and it is replaced
  by one ``iptables-restore --noflush`` transaction: declaring ``:CHAIN - [0:0]``
  flushes and refills it inside a single table commit, so no packet ever
  sees an empty or half-filled chain.
* ``vrq-dns-guard`` in the filter table, jumped to first from FORWARD: drops
  DNS to DNS1/DNS2. With no upstream there is no DNAT, and the query would
  follow the default route out to whatever network the netvm is on; this is
  what stops that leak. The obvious place, DROP inside the nat chain, is
  refused by both iptables-nft and iptables-legacy ("The nat table is not
  intended for filtering"). Dropping in raw or mangle PREROUTING would have to
  be switched on and off together with the DNAT rules, in a second table,
  and both backends commit each ``*table`` of a restore payload separately
  (checked: a failing second table leaves the first one applied), so that
  would not be atomic. In filter FORWARD, after DNAT, a translated packet no
  longer carries DNS1/DNS2 as destination: the guard can stay in place for
  good, its content depends on DNS1/DNS2 only, and changing upstreams touches
  one table. The guard is rewritten only on the first run or if DNS1/DNS2
  change. Dropped packets never confirm a conntrack entry, so the first
  query after an upstream appears is translated normally.
* "Already right" is decided from one ``iptables-save``, compared line by
  line with what would be written (rules rendered exactly as iptables-save
  prints them, jumps present exactly once); then nothing is run and the exit
  status is 100, which the hook relies on.

Start-up time matters (the hook runs on every link change): the plain call
without arguments goes straight to :func:`run`; every other form goes through
the click command built in :func:`command`, which calls the same function.
Everything else is imported where it is needed.
"""

import os
import sys

from .errors import Failure

PROG = "qubes-setup-dnat-to-ns"
NAT_CHAIN = "vrq-dnat-dns"
GUARD_CHAIN = "vrq-dns-guard"
XS_PRIMARY = "qubes_netvm_primary_dns"
XS_SECONDARY = "qubes_netvm_secondary_dns"
RESOLV_CONF = "/etc/resolv.conf"
RESOLVED_CONF = "/run/systemd/resolve/resolv.conf"
QUBES_NS = "/var/run/qubes/qubes-ns"
# systemd-resolved's stub listeners (the second one bypasses DNSSEC/LLMNR)
RESOLVED_STUBS = ("127.0.0.53", "127.0.0.54")
UNCHANGED = 100


class Options:
    """What the command line says; defaults are what the hook's plain call gets."""

    def __init__(self, dns1=None, dns2=None, resolv_conf=RESOLV_CONF, resolved_conf=RESOLVED_CONF,
                 qubes_ns=QUBES_NS, dry_run=False, status=False, verbose=False):
        self.dns1, self.dns2 = dns1, dns2
        self.resolv_conf, self.resolved_conf, self.qubes_ns = resolv_conf, resolved_conf, qubes_ns
        self.dry_run, self.status, self.verbose = dry_run, status, verbose


# ----------------------------------------------------------------------------
# Inputs (pure parts first)


def nameservers(text):
    """IPv4 ``nameserver`` addresses of a resolv.conf text, in order, without
    duplicates; malformed lines, IPv6 and anything not an address ignored
    (as the resolver itself skips what it cannot parse)."""
    from ipaddress import IPv4Address

    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            addr = IPv4Address(words[1])
        except ValueError:
            continue
        if addr not in found:
            found.append(addr)
    return found


def usable(addr) -> bool:
    """Can forwarded guest traffic be translated to it? Never to loopback
    (the kernel drops martians: route_localnet is off, and rightly so), nor
    to an address that is not a unicast host."""
    return not (addr.is_loopback or addr.is_unspecified or addr.is_multicast or addr.is_reserved)


def upstreams_from(resolv_text, resolved_text):
    """(upstreams, which) from the two files' texts: ``which`` is
    "resolv.conf" or "systemd-resolved". ``resolved_text`` is a callable
    (the file is read only when resolv.conf names nothing but the stub)."""
    listed = nameservers(resolv_text)
    real = [a for a in listed if usable(a)]
    if not real and listed and all(str(a) in RESOLVED_STUBS for a in listed):
        text = resolved_text()
        return [a for a in nameservers(text or "") if usable(a)], "systemd-resolved"
    return real, "resolv.conf"


def _read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def find_upstreams(opts, log=None):
    """-> (upstreams, source text for people)."""
    text = _read(opts.resolv_conf)
    if text is None and log:
        log.warning(f"cannot read {opts.resolv_conf}: no upstream nameserver")
    found, which = upstreams_from(text or "", lambda: _read(opts.resolved_conf))
    where = opts.resolv_conf if which == "resolv.conf" else f"systemd-resolved, {opts.resolved_conf}"
    return found, where


def qubes_ns_values(text):
    """NS1/NS2 of the old ``qubes-ns`` file (shell assignments, maybe quoted)."""
    values = {}
    for line in text.splitlines():
        key, eq, value = line.strip().partition("=")
        if eq and key in ("NS1", "NS2"):
            values[key] = value.strip().strip("'\"") or None
    return values.get("NS1"), values.get("NS2")


def _dns_address(value, where):
    from ipaddress import IPv4Address

    try:
        addr = IPv4Address(value.strip())
    except ValueError:
        raise Failure(f"{where}: {value[:40]!r} is not an IPv4 address") from None
    if not usable(addr):
        raise Failure(f"{where}: {addr} cannot be a virtual nameserver address")
    return addr


def find_dns(opts, env):
    """[(address, where)] for DNS1 and DNS2: --dns1/--dns2, else XenStore,
    else (XenStore having neither) the qubes-ns file. Raises Failure when
    none of them names either."""
    given = [opts.dns1, opts.dns2]
    found = [(v, f"--dns{i + 1}") if v else (None, None) for i, v in enumerate(given)]
    xs_problem = None
    if None in given:
        values = {}
        try:
            from .xs import XenStore

            with XenStore(env) as xs:
                values = xs.read_many([XS_PRIMARY, XS_SECONDARY])
        except Failure as exc:
            xs_problem = str(exc)
        from_xs = [values.get(XS_PRIMARY), values.get(XS_SECONDARY)]
        if any(from_xs):
            for i, key in enumerate((XS_PRIMARY, XS_SECONDARY)):
                if found[i][0] is None and from_xs[i]:
                    found[i] = (from_xs[i], f"XenStore {key}")
        else:
            text = _read(opts.qubes_ns)
            if text is not None:
                for i, v in enumerate(qubes_ns_values(text)):
                    if found[i][0] is None and v:
                        found[i] = (v, f"{opts.qubes_ns} NS{i + 1}")
    result = []
    for value, where in found:
        if value is not None:
            addr = _dns_address(value, where)
            if all(addr != a for a, _ in result):
                result.append((addr, where))
    if not result:
        why = xs_problem or f"XenStore has neither {XS_PRIMARY} nor {XS_SECONDARY}"
        raise Failure(f"no DNS1/DNS2 address: {why}; {opts.qubes_ns} names neither NS1 nor NS2; "
                      "--dns1/--dns2 not given")
    return result


# ----------------------------------------------------------------------------
# Plan and render (pure)


def _match(dns, proto):
    # exactly as iptables-save prints it, so "already right" is a text compare
    return f"-d {dns}/32 -p {proto} -m {proto} --dport 53"


def nat_rules(dns, upstreams):
    """Rule lines of the nat chain: DNSi -> upstream i (cycling)."""
    rules = []
    if not upstreams:
        return rules
    for i, addr in enumerate(dns):
        to = upstreams[i % len(upstreams)]
        for proto in ("udp", "tcp"):
            rules.append(f"-A {NAT_CHAIN} {_match(addr, proto)} -m comment --comment DNS{i + 1} "
                         f"-j DNAT --to-destination {to}")
    return rules


def guard_rules(dns):
    """Rule lines of the filter chain: whatever still goes to DNSi in FORWARD
    was not translated (no upstream): drop it."""
    return [f"-A {GUARD_CHAIN} {_match(addr, proto)} -m comment --comment DNS{i + 1} -j DROP"
            for i, addr in enumerate(dns) for proto in ("udp", "tcp")]


class Table:
    """What iptables-save shows of one table: declared chains and rule lines."""

    def __init__(self):
        self.chains, self.rules = set(), []

    def chain(self, name):
        prefix = f"-A {name} "
        return [r for r in self.rules if r.startswith(prefix)]


def parse_save(text):
    """{table name: Table} of an iptables-save text."""
    tables, cur = {}, None
    for line in text.splitlines():
        if line.startswith("*"):
            cur = tables.setdefault(line[1:].strip(), Table())
        elif cur is None or not line or line[0] == "#" or line == "COMMIT":
            continue
        elif line[0] == ":":
            cur.chains.add(line[1:].split(" ", 1)[0])
        elif line.startswith("-A "):
            cur.rules.append(line)
    return tables


# (table, our chain, built-in chain it is jumped to from)
SECTIONS = (("filter", GUARD_CHAIN, "FORWARD"), ("nat", NAT_CHAIN, "PREROUTING"))


def render(wanted, tables):
    """The iptables-restore --noflush payload turning ``tables`` (parsed
    iptables-save) into ``wanted`` ({table: rule lines}); "" when they are
    equal. Only tables that differ appear. The guard (filter) comes first: on
    a first run, or a change of DNS1/DNS2, nothing is translated before it
    is in place."""
    out = []
    for table, chain, hook in SECTIONS:
        cur = tables.get(table) or Table()
        jump = f"-A {hook} -j {chain}"
        jumps = cur.rules.count(jump)
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


def wanted_rules(dns, upstreams):
    return {"filter": guard_rules(dns), "nat": nat_rules(dns, upstreams)}


# ----------------------------------------------------------------------------
# Running


def _describe(dns, upstreams, where):
    pairs = ", ".join(
        f"DNS{i + 1} {a} -> {upstreams[i % len(upstreams)]}" if upstreams else f"DNS{i + 1} {a} -> dropped"
        for i, a in enumerate(dns)
    )
    return f"{pairs} (upstreams from {where}: {' '.join(map(str, upstreams)) or 'none'})"


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def apply(opts, env, s, log):
    from .lock import HostLock

    # Inputs are read under the lock too: of two runs racing over a change
    # of resolv.conf, the one that writes last has read last.
    with _NoLock() if opts.dry_run else HostLock(env):
        # iptables-save runs while XenStore and resolv.conf are read
        save = s.start([s.iptables(4, "save")], readonly=True)
        try:
            dns = [a for a, _ in find_dns(opts, env)]
            upstreams, where = find_upstreams(opts, log)
        finally:
            saved = save.wait(check=False)
        if saved.code != 0:
            from .errors import CommandFailed

            raise CommandFailed(saved.argv, saved.code, saved.stderr)
        log.debug(_describe(dns, upstreams, where))
        s.note(f"upstream nameservers: {' '.join(map(str, upstreams)) or 'none'} (from {where})")
        s.note(_describe(dns, upstreams, where))
        payload = render(wanted_rules(dns, upstreams), parse_save(saved.stdout))
        if not payload:
            s.note("the rules are already right: nothing to do")
            log.debug("rules already right, unchanged")
            return UNCHANGED
        s.run(s.restore(4), payload)
    if not opts.dry_run:
        log.info(_describe(dns, upstreams, where))
    return 0


def status(opts, env, s, out):
    def say(text=""):
        print(text, file=out)

    try:
        dns = find_dns(opts, env)
    except Failure as exc:
        dns = []
        say(f"DNS1/DNS2: unknown ({exc})")
    for i, (addr, where) in enumerate(dns):
        say(f"DNS{i + 1}: {addr} (from {where})")
    upstreams, where = find_upstreams(opts)
    say(f"upstream nameservers: {' '.join(map(str, upstreams)) or 'none'} (from {where})")
    tables = parse_save(s.run([s.iptables(4, "save")], readonly=True).stdout)
    for table, chain, hook in SECTIONS:
        cur = tables.get(table) or Table()
        say(f"rules in force, {table} table:")
        lines = [r for r in cur.rules if r == f"-A {hook} -j {chain}"] + cur.chain(chain)
        if chain not in cur.chains:
            lines.append(f"(chain {chain} does not exist)")
        for line in lines:
            say(f"  {line}")
    if dns:
        pending = render(wanted_rules([a for a, _ in dns], upstreams), tables)
        say("state: up to date" if not pending else f"state: out of date (run {PROG} to apply)")
    return 0


def run(opts, env, out=None, log=None) -> int:
    """One invocation -> exit status: 0 changed, 100 already right, 1 failed."""
    from .log import Log
    from .system import System

    log = log or Log(PROG, env, verbose=opts.verbose)
    out = out or sys.stdout
    try:
        s = System(dry_run=opts.dry_run, out=out, log=log, env=env)
        if opts.status:
            return status(opts, env, s, out)
        return apply(opts, env, s, log)
    except Failure as exc:
        log.error(str(exc))
        return 1
    finally:
        log.close()


# ----------------------------------------------------------------------------
# Command line

HELP = f"""Translate DNS traffic for the guests' virtual nameservers DNS1 and DNS2
to the netvm's current upstream nameservers (UDP and TCP port 53, nat table
chain {NAT_CHAIN}; with no upstream, DNS to DNS1/DNS2 is dropped by the
filter table chain {GUARD_CHAIN}).

\b
Upstreams: the IPv4 nameserver lines of --resolv-conf, in order; when it
names only systemd-resolved's stub (127.0.0.53/54), those of
--resolved-conf. Loopback addresses are never used.

\b
Exit status:
  0    the rules were changed (or --status / --dry-run with a change)
  100  the rules were already right: nothing was changed
  1    error (one line on stderr; nothing was changed)

\b
XenStore keys read (relative to this domain's home):
  {XS_PRIMARY}    DNS1
  {XS_SECONDARY}  DNS2

\b
Environment:
  XENSTORED_PATH              XenStore socket (default /var/run/xenstored/socket,
                              else /dev/xen/xenbus)
  VIF_ROUTE_QUBES_XS_TIMEOUT  seconds to wait for XenStore (default 10)
  VIF_ROUTE_QUBES_LOCK        lock file shared with vif-route-qubes
                              (default STATE_DIR/lock)
  VIF_ROUTE_QUBES_STATE_DIR   default /run/vif-route-qubes
  VIF_ROUTE_QUBES_LOCK_TIMEOUT  seconds to wait for the lock (default 20)
  VIF_ROUTE_QUBES_IPTABLES    nft or legacy: force an iptables backend
  VIF_ROUTE_QUBES_DEBUG=1     debug logging on stderr (like -v)
  VIF_ROUTE_QUBES_SYSLOG      syslog socket (default /dev/log)
  VIF_ROUTE_QUBES_HOTPLUG_LOG log file (default /var/log/xen/xen-hotplug.log)
"""


def command():
    """The click command (built on demand: the hook's plain call never
    imports click)."""
    import click

    @click.command(PROG, help=HELP, context_settings={"help_option_names": ["-h", "--help"],
                                                      "max_content_width": 100})
    @click.option("--dns1", metavar="ADDR", help=f"DNS1 (default: XenStore {XS_PRIMARY}).")
    @click.option("--dns2", metavar="ADDR", help=f"DNS2 (default: XenStore {XS_SECONDARY}).")
    @click.option("--resolv-conf", default=RESOLV_CONF, show_default=True, metavar="PATH",
                  help="Where the upstream nameservers are listed.")
    @click.option("--resolved-conf", default=RESOLVED_CONF, show_default=True, metavar="PATH",
                  help="systemd-resolved's list of real upstreams.")
    @click.option("--qubes-ns", default=QUBES_NS, show_default=True, metavar="PATH",
                  help="Old NS1=/NS2= file, read when XenStore has neither key.")
    @click.option("-n", "--dry-run", is_flag=True,
                  help="Print the upstreams found and the payload that would be applied; change nothing.")
    @click.option("--status", is_flag=True, help="Print DNS1/DNS2, the upstreams and the rules in force.")
    @click.option("-v", "--verbose", is_flag=True, help="Log every step to stderr.")
    @click.version_option(package_name="vif-route-qubes", message="%(prog)s %(version)s")
    def cmd(dns1, dns2, resolv_conf, resolved_conf, qubes_ns, dry_run, status, verbose):
        if dry_run and status:
            raise click.UsageError("--dry-run and --status exclude each other")
        for name, value in (("--dns1", dns1), ("--dns2", dns2)):
            if value is not None:
                try:
                    _dns_address(value, name)
                except Failure as exc:
                    raise click.BadParameter(str(exc)) from None
        opts = Options(dns1=dns1, dns2=dns2, resolv_conf=resolv_conf, resolved_conf=resolved_conf,
                       qubes_ns=qubes_ns, dry_run=dry_run, status=status, verbose=verbose)
        if dry_run:
            click.echo(f"# {PROG} (dry run: nothing is changed)")
        sys.exit(run(opts, os.environ))

    return cmd


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # click's shell completion calls the program with no arguments and this
    # variable set: it must reach click, not rewrite the rules.
    if not argv and "_QUBES_SETUP_DNAT_TO_NS_COMPLETE" not in os.environ:  # the hook's and the unit's call
        sys.exit(run(Options(), os.environ))
    command().main(args=argv, prog_name=PROG)
