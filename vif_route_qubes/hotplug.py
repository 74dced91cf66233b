"""vif-route-qubes: what Xen runs for each guest network interface.

``main()`` is the console script. libxl and udev call it with a command word
and ``key=value`` words only; that form runs straight through
:func:`run` without importing click (half of a hotplug run's start-up cost,
see benchmarks/README.md). Anything else (``--help``, ``--dry-run``,
``status``, ...) goes through the click interface in :mod:`.cli`, which
calls the same :func:`run`.
"""

import os
import sys

from . import plan as P
from . import state, validate
from .errors import Failure
from .firewall import ENV as FIREWALL_ENV
from .firewall import backend_for, recorded_backend
from .lock import DEFAULT_TIMEOUT as DEFAULT_LOCK_TIMEOUT
from .lock import HostLock, state_dir
from .log import Log
from .system import System

COMMANDS = ("online", "offline", "add", "remove")
# XenStore keys of the backend directory that key=value words may override.
BACKEND_KEYS = ("ip", "mac", "vifname", "type", "frontend-id")
NETVM_KEYS = ("qubes_netvm_gateway", "qubes_netvm_gateway6")
ENV_WORDS = ("vif", "XENBUS_PATH", "type_if")
DEFAULT_HOOKS = "/rw/config/network-hooks.d"


def parse_words(words):
    """Xen's convention: a word with '=' sets a variable, the word without
    one is the command. -> (command or None, {key: value})."""
    command, variables = None, {}
    for word in words:
        key, eq, value = word.partition("=")
        if eq:
            if not key or not (key[0].isalpha() or key[0] == "_") or not all(
                c.isalnum() or c in "_-" for c in key
            ):
                raise Failure(f"argument {word[:40]!r} is not of the form key=value")
            variables[key] = value
        elif command is None:
            command = word
        else:
            raise Failure(f"two commands given: {command!r} and {word[:40]!r}")
    return command, variables


class Context:
    """One invocation: its inputs and the seams it works through."""

    def __init__(self, command, variables, env, dry_run=False, log=None, out=None, firewall=None):
        self.command = command
        self.vars = variables
        self.env = dict(env)
        for key in ENV_WORDS:  # Xen's scripts evaluate these words as variables
            if key in variables:
                self.env[key] = variables[key]
        self.dry_run = dry_run
        self.log = log or Log("vif-route-qubes", env)
        self.sys = System(dry_run=dry_run, out=out, log=self.log, env=self.env)
        # the one firewall decision of this run (``--firewall`` wins over
        # VIF_ROUTE_QUBES_FIREWALL); every firewall change goes through it
        try:
            self.fw = backend_for(self.sys, self.env, firewall)
        except Failure as exc:
            if command not in ("offline", "remove"):
                raise
            # a bad setting must not stop a cleanup: the default choice, and
            # the backend each vif's record names, still remove what is there
            self.log.warning(f"{exc}; cleaning up with the default firewall choice")
            self.fw = backend_for(self.sys, {k: v for k, v in self.env.items() if k != FIREWALL_ENV})
        self.state_dir = state_dir(self.env)
        self.hooks_dir = self.env.get("VIF_ROUTE_QUBES_HOOKS_DIR") or DEFAULT_HOOKS
        self._xs = None
        self.xenbus_path = None  # set once validated: where errors are reported

    @property
    def xs(self):
        if self._xs is None:
            from .xs import XenStore

            self._xs = XenStore(self.env)
        return self._xs

    def close(self):
        if self._xs is not None:
            self._xs.close()
        self.log.close()


# ----------------------------------------------------------------------------
# Reading inputs


def _backend_values(ctx, xp):
    """Backend keys and the netvm's own keys, in one XenStore round trip;
    key=value words override XenStore values of the same name."""
    paths = [f"{xp}/{k}" for k in BACKEND_KEYS] + list(NETVM_KEYS)
    values = ctx.xs.read_many(paths)
    found = {k: values[f"{xp}/{k}"] for k in BACKEND_KEYS}
    found.update({k: values[k] for k in NETVM_KEYS})
    for key in BACKEND_KEYS:
        if key in ctx.vars:
            found[key] = ctx.vars[key]
    return found


def _netvm_gateways(found):
    gw = validate.gateway(found.get("qubes_netvm_gateway"), "XenStore qubes_netvm_gateway", 4)
    gw6 = validate.gateway(found.get("qubes_netvm_gateway6"), "XenStore qubes_netvm_gateway6", 6)
    return gw, gw6


def _vif_from(found, name, xp, front, devid):
    """Validate XenStore/argv values into a Vif (raises Failure)."""
    where = f"XenStore {xp}"
    if found.get("ip") is None:
        raise Failure(f"{where}/ip: missing (the guest has no address to route)")
    addresses = validate.addresses(found["ip"], f"{where}/ip")
    if found.get("mac") is None:
        raise Failure(f"{where}/mac: missing")
    mac = validate.mac(found["mac"], f"{where}/mac")
    if found.get("frontend-id") not in (None, ""):
        fid = validate.domid(found["frontend-id"], f"{where}/frontend-id")
        if fid != front:
            raise Failure(f"{where}/frontend-id is {fid}, but the path names domain {front}")
    vif_type = found.get("type") or "vif"
    if vif_type not in ("vif", "vif_ioemu"):
        raise Failure(f"{where}/type: {vif_type[:40]!r} is not vif or vif_ioemu")
    gw, gw6 = _netvm_gateways(found)
    return P.Vif(
        name=name, domid=front, devid=devid, vif_type=vif_type, mac=mac,
        addresses=addresses, gateway=gw, gateway6=gw6, xenbus_path=xp,
    )


def _identify(ctx):
    """The interface named by ``vif`` and the backend path, validated."""
    name = ctx.env.get("vif", "")
    if not name:
        raise Failure("environment variable vif is not set (the interface to configure)")
    domid, devid = validate.vif_name(name, "vif")
    xp = ctx.env.get("XENBUS_PATH", "")
    if not xp:
        raise Failure("environment variable XENBUS_PATH is not set (the device's XenStore directory)")
    xp, front, xdev = validate.xenbus_path(xp)
    ctx.xenbus_path = xp
    if (front, xdev) != (domid, devid):
        raise Failure(f"vif={name} does not match XENBUS_PATH={xp}")
    return name, xp, front, devid


# ----------------------------------------------------------------------------
# Online


class Undo:
    """What this run changed, undone in reverse order if a later step fails."""

    def __init__(self, ctx):
        self.ctx, self.steps = ctx, []

    def push(self, label, fn):
        self.steps.append((label, fn))

    def run(self):
        for label, fn in reversed(self.steps):
            try:
                fn()
                self.ctx.log.debug(f"rolled back: {label}")
            except Failure as exc:
                self.ctx.log.warning(f"rollback of {label} failed: {exc}")
        self.steps.clear()


def _conntrack_calls(ctx, addresses):
    """conntrack purges worth running: none when the kernel tracks no
    connection at all in this namespace (module not loaded, or an empty
    table), which a /proc read tells for free."""
    count = System.read("/proc/sys/net/netfilter/nf_conntrack_count")
    if count is None or count.strip() == "0":
        ctx.sys.note("conntrack: the connection table is empty, nothing to purge")
        return []
    # exit 1 with "0 flow entries have been deleted" just means nothing matched
    return [(list(argv), None, (0, 1)) for argv in P.conntrack_purges(addresses)]


def _run_hooks(ctx, command, vif):
    try:
        names = sorted(os.listdir(ctx.hooks_dir))
    except OSError:
        return
    for entry in names:
        hook = os.path.join(ctx.hooks_dir, entry)
        if not (os.path.isfile(hook) and os.access(hook, os.X_OK)):
            continue
        for addr in vif.addresses:
            try:
                ctx.sys.run([hook, command, vif.name, vif.vif_type, str(addr)])
            except Failure as exc:
                ctx.log.warning(f"hook {hook} failed (ignored): {exc}")


def online(ctx) -> int:
    name, xp, front, devid = _identify(ctx)
    found = _backend_values(ctx, xp)
    target = name
    if found.get("vifname"):
        target = validate.ifname(found["vifname"], f"XenStore {xp}/vifname")
    vif = _vif_from(found, target, xp, front, devid)
    s = ctx.sys
    rename = False
    if target != name:
        if s.iface_exists(target) and not s.iface_exists(name):
            pass  # renamed by an earlier run of ours
        elif s.iface_exists(target):
            raise Failure(f"cannot rename {name} to {target}: an interface named {target} already exists")
        else:
            rename = True
    if not rename and not s.iface_exists(target):
        raise Failure(f"interface {target} does not exist")
    if rename and not s.iface_exists(name):
        raise Failure(f"interface {name} does not exist")
    ipv6 = System.ipv6_enabled(name if rename else target)
    if vif.family(6) and not ipv6:
        ctx.log.info(f"IPv6 is disabled on {target}: IPv6 addresses {' '.join(map(str, vif.family(6)))} are not routed")
    link = P.link_online(vif, ipv6)
    undo = Undo(ctx)
    lock = HostLock(ctx.env)
    if not ctx.dry_run:
        lock.acquire()
    try:
        record = state.load(ctx.state_dir, name)
        if rename:
            s.run(["ip", "link", "set", "dev", name, "name", target])
            undo.push("rename", lambda: s.run(["ip", "link", "set", "dev", target, "name", name]))
        undo.push("firewall", lambda: ctx.fw.remove(target))
        previous = state.vif_of(record)[0] if record else None
        was = recorded_backend(ctx.sys, ctx.env, record, ctx.fw)
        ctx.fw.apply(vif, previous if was is None else None)
        if was is not None:  # guarded by the other backend until now: move over
            ctx.log.info(f"{target}: moved from the {was.name} to the {ctx.fw.name} firewall backend")
            was.remove(previous.name)
            if was.moved_away():
                ctx.log.warning(was.moved_away())
        purges = _conntrack_calls(ctx, vif.addresses)
        if purges:
            s.run_all(purges)
        for path, value in link.sysctls:
            before = System.read(path, "0").strip()
            s.write(path, value)
            undo.push(f"write {path}", lambda p=path, b=before: s.write(p, b))
        undo.push("ip batch", lambda: s.run(["ip", "-force", "-batch", "-"], P.render_batch(link.undo_batch), check=False))
        s.run(["ip", "-batch", "-"], P.render_batch(link.batch))
        if not ctx.dry_run:
            state.save(ctx.state_dir, name, dict(state.record_of(vif, ipv6, name), firewall=ctx.fw.name))
            undo.push("state record", lambda: state.remove(ctx.state_dir, name))
        _run_hooks(ctx, "online", vif)
        _report(ctx, xp, [(f"{xp}/hotplug-status", "connected")], clear_error=True)
    except BaseException:
        undo.run()
        raise
    finally:
        lock.release()
    ctx.log.info(
        f"online {target}: {' '.join(map(str, vif.addresses))} mac {vif.mac} metric {vif.metric}"
        + (f" gateway {vif.gateway}" if vif.gateway else "") + f" firewall {ctx.fw.name}"
    )
    return 0


def _report(ctx, xp, items, clear_error=False):
    if ctx.dry_run:
        for path, value in items:
            print(f"xenstore-write {path} {value}", file=ctx.sys.out)
        return
    ctx.sys.fault_point(["xenstore-write", xp])
    for path, value in items:
        ctx.log.debug(f"xenstore-write {path} {value}")
    ctx.xs.write_many(items)
    if clear_error:
        ctx.xs.rm(f"{xp}/hotplug-error")


# ----------------------------------------------------------------------------
# Offline


def _offline_vif(ctx, name, record):
    """What to undo: from the state record if we have one; else from
    XenStore (if the directory is still there), else from our own chains."""
    if record:
        return state.vif_of(record)
    domid, devid = validate.vif_name(name, "vif")
    found = {}
    xp = ctx.xenbus_path
    xs_known = False
    if xp:
        try:
            found = _backend_values(ctx, xp)
            xs_known = True
        except Failure as exc:
            ctx.log.warning(f"offline {name}: {exc}; cleaning up from the kernel's state")
    target = name
    if found.get("vifname"):
        try:
            target = validate.ifname(found["vifname"], "vifname")
        except Failure:
            pass
    addresses = ()
    try:
        if found.get("ip"):
            addresses = validate.addresses(found["ip"])
    except Failure as exc:
        ctx.log.warning(f"offline {name}: {exc}")
    if not addresses:
        addresses = ctx.fw.addresses(target)
    try:
        gw, gw6 = _netvm_gateways(found)
    except Failure:
        gw = gw6 = None
    if not xs_known:
        # Without XenStore the netvm's gateways are unknown, but the kernel
        # still shows them: online puts nothing else as a host address on a
        # vif. Left there, they would outlive the guest (and keep a local
        # route) on an interface that may be reused.
        kgw, kgw6 = _host_addresses(ctx, target)
        gw, gw6 = gw or kgw, gw6 or kgw6
    mac = found.get("mac")
    try:
        mac = validate.mac(mac) if mac else None
    except Failure:
        mac = None
    vif = P.Vif(name=target, domid=domid, devid=devid, vif_type=found.get("type") or "vif",
                mac=mac, addresses=addresses, gateway=gw, gateway6=gw6, xenbus_path=xp)
    return vif, System.ipv6_enabled(target)


def _host_addresses(ctx, name):
    """The first global /32 and /128 address on ``name`` (or None each)."""
    from ipaddress import ip_interface

    res = ctx.sys.run(["ip", "-o", "addr", "show", "dev", name, "scope", "global"],
                      readonly=True, check=False)
    found = {4: None, 6: None}
    for line in res.stdout.splitlines() if res.code == 0 else ():
        parts = line.split()
        for fam in ("inet", "inet6"):
            if fam in parts[:-1]:
                try:
                    addr = ip_interface(parts[parts.index(fam) + 1])
                except ValueError:
                    continue
                if addr.network.prefixlen == addr.max_prefixlen and found[addr.version] is None:
                    found[addr.version] = addr.ip
    return found[4], found[6]


def offline(ctx) -> int:
    """Undo what online made. Never fails: every step is best effort and
    what is already gone counts as done."""
    name = ctx.env.get("vif", "")
    if not name:
        raise Failure("environment variable vif is not set (the interface to clean up)")
    validate.vif_name(name, "vif")
    xp = ctx.env.get("XENBUS_PATH", "")
    if xp:
        try:
            ctx.xenbus_path = validate.xenbus_path(xp)[0]
        except Failure as exc:
            ctx.log.warning(str(exc))
    s = ctx.sys
    try:
        lock = HostLock(ctx.env)
    except Failure as exc:  # a bad VIF_ROUTE_QUBES_LOCK_TIMEOUT must not stop the cleanup
        ctx.log.warning(f"{exc}; waiting the default {DEFAULT_LOCK_TIMEOUT:g} s")
        lock = HostLock(ctx.env, timeout=DEFAULT_LOCK_TIMEOUT)
    locked = False
    if not ctx.dry_run:
        try:
            lock.acquire()
            locked = True
        except Failure as exc:
            # Leaving a dead guest's rules behind is worse than racing a hung
            # holder: the next guest with this name would inherit them.
            ctx.log.warning(f"{exc}; cleaning up without the lock")
    try:
        record = state.load(ctx.state_dir, name)
        vif, ipv6 = _offline_vif(ctx, name, record)
        if s.iface_exists(vif.name):
            link = P.link_offline(vif, ipv6)
            # routes and addresses first: nothing is routed to the guest once
            # its anti-spoofing rules are gone
            s.run(["ip", "-force", "-batch", "-"], P.render_batch(link.batch), check=False)
            for path, value in link.sysctls:
                try:
                    s.write(path, value)
                except Failure:
                    pass
        else:
            s.note(f"{vif.name} no longer exists: its routes, addresses and neighbour entries went with it")
        ctx.fw.remove(vif.name, known=vif.addresses if record else None)
        was = recorded_backend(ctx.sys, ctx.env, record, ctx.fw)
        if was is not None:
            was.remove(vif.name)
        purges = _conntrack_calls(ctx, vif.addresses)
        if purges:
            try:
                s.run_all(purges)
            except Failure as exc:
                ctx.log.warning(f"conntrack purge: {exc}")
        _run_hooks(ctx, "offline", vif)
        if not ctx.dry_run:
            state.remove(ctx.state_dir, name)
    finally:
        if locked:
            lock.release()
    ctx.log.info(f"offline {vif.name}: removed {' '.join(map(str, vif.addresses)) or 'rules'} firewall {ctx.fw.name}")
    return 0


# ----------------------------------------------------------------------------
# Entry points


def _report_failure(ctx, exc):
    """Xen's failure protocol: hotplug-error (one line), hotplug-status=error."""
    msg = str(exc)
    ctx.log.error(msg)
    if ctx.dry_run or ctx.command not in ("online", "add"):
        return
    xp = ctx.xenbus_path
    if xp is None:
        raw = ctx.env.get("XENBUS_PATH", "")
        try:
            xp = validate.xenbus_path(raw)[0] if raw else None
        except Failure:
            xp = None
    if xp is None:
        return
    try:
        ctx.xs.write_many([(f"{xp}/hotplug-error", msg[:1000]), (f"{xp}/hotplug-status", "error")])
    except Failure as exc2:
        # A warning, not a second error line: when XenStore itself is what
        # failed, this only repeats it, and stderr (which libxl and Xen's
        # hotplug log show) keeps its one line of reason. Syslog has it.
        ctx.log.warning(f"could not report the failure through XenStore: {exc2}")


def _loggable(value: str) -> str:
    """Raw argv/environment text as one printable log line. Bytes that are
    not UTF-8 arrive as lone surrogates, which the UTF-8 hotplug log cannot
    encode (a traceback instead of the reason), and a newline would forge a
    log line; repr() escapes both."""
    return value if value.isprintable() and value.isascii() else repr(value)[1:-1]


def run(command, variables, env, dry_run=False, log=None, out=None, firewall=None) -> int:
    """One hotplug invocation -> exit status (0 ok / nothing to do, 1 failed)."""
    try:
        ctx = Context(command, variables, env, dry_run=dry_run, log=log, out=out, firewall=firewall)
    except Failure as exc:
        # a broken setting (VIF_ROUTE_QUBES_IPTABLES=...) found before there
        # is anything to report through: one line, not a traceback
        (log or Log("vif-route-qubes", env)).error(str(exc))
        return 1
    try:
        ctx.log.debug(f"argv: {' '.join([_loggable(command or '')] + [f'{k}={_loggable(v)}' for k, v in variables.items()])}")
        ctx.log.debug("env: " + " ".join(f"{k}={_loggable(ctx.env.get(k, ''))}" for k in (
            "vif", "XENBUS_PATH", "XENBUS_TYPE", "XENBUS_BASE_PATH", "script", "netdev", "type_if", "INTERFACE")))
        ctx.log.debug(f"firewall: {ctx.fw.name} backend ({ctx.fw.reason})")
        ctx.sys.note(f"firewall: {ctx.fw.name} backend ({ctx.fw.reason})")
        type_if = ctx.env.get("type_if") or "vif"
        if command not in COMMANDS:
            raise Failure(f"unknown command {command!r}: expected one of {', '.join(COMMANDS)}")
        if (command in ("online", "offline")) != (type_if == "vif"):
            # Xen's pairing: online/offline act on vif, add/remove on tap.
            ctx.log.debug(f"{command} with type_if={type_if}: nothing to do")
            return 0
        if command in ("online", "add"):
            return online(ctx)
        return offline(ctx)
    except Failure as exc:
        if command in ("offline", "remove"):
            # offline() itself never raises for what it finds on the host;
            # only input too broken to know what to clean up gets here.
            ctx.log.error(f"offline: {exc}")
            return 1
        _report_failure(ctx, exc)
        return 1
    finally:
        ctx.close()


def _machine_form(argv) -> bool:
    return bool(argv) and all(not a.startswith("-") for a in argv) and any(a in COMMANDS for a in argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if _machine_form(argv):
        try:
            command, variables = parse_words(argv)
        except Failure as exc:
            print(f"vif-route-qubes: {exc}", file=sys.stderr)
            sys.exit(1)
        sys.exit(run(command, variables, os.environ))
    from .cli import vif_route_qubes

    vif_route_qubes.main(args=argv, prog_name="vif-route-qubes")
