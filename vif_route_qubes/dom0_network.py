"""dom0's network through the netvm.

For dom0 in the layout the design document recommends (a netvm driver
domain serves the guests; dom0 has no network); the keys tool that goes
with it is :mod:`vif_route_qubes.keys`.

``qvm-dom0-network-via-netvm up|down|status``
    ``up`` pauses every running domain except dom0 and the netvm (they can
    do no harm to dom0 while it talks to the outside), attaches a vif to
    dom0 with the netvm as backend (``xl network-attach 0 backend=NETVM
    ip=IP script=vif-route-qubes``), waits, bounded, for the netvm's
    ``hotplug-status=connected`` and dom0's frontend to connect, then
    configures dom0's new interface like a guest's with one ``ip -batch``
    (address /32, route to the gateway, default route via it) and writes
    resolv.conf naming DNS1/DNS2, saving what it replaces. ``down`` undoes
    exactly that, from the record ``up`` wrote, and unpauses exactly the
    domains ``up`` paused.

Plan as data (pure functions below), applied through the System seam; the
record (``STATE_DIR/dom0-network.json``) is written after each step of
``up``, so even a killed ``up`` leaves what ``down`` needs to undo it.
"""

import ipaddress
import os
import sys
import time
from collections import namedtuple

from . import state, validate
from .dom0_xs import Dom0Store
from .errors import Failure, reported
from .files import write_file
from .lock import HostLock, seconds, state_dir
from .log import Log
from .system import System

TAG = "qvm-dom0-network-via-netvm"
KEYS_TAG = "vif-route-qubes-keys"  # named in a message: it writes the keys read here
RECORD = "dom0-network"
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
DEFAULT_TIMEOUT = 60.0
SCRIPT = "vif-route-qubes"

Domain = namedtuple("Domain", "domid name state")


# ----------------------------------------------------------------------------
# Plan (pure)


def parse_xl_list(text: str) -> list:
    """``xl list`` output -> [Domain]. State is xl's six flags (r b p s c d)."""
    domains = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 6 or not fields[1].isdigit():
            continue
        domains.append(Domain(int(fields[1]), fields[0], fields[4]))
    return domains


def is_paused(domain: Domain) -> bool:
    return "p" in domain.state


def to_pause(domains, netvm_domid: int) -> list:
    """Every running domain except dom0 and the netvm; not those already
    paused (the administrator's: ``down`` must leave them paused), nor those
    shutting down, crashed or dying."""
    return [d for d in domains
            if d.domid not in (0, netvm_domid) and not any(f in d.state for f in "pscd")]


def attach_argv(netvm: str, ip: str) -> list:
    return ["xl", "network-attach", "0", f"backend={netvm}", f"ip={ip}", f"script={SCRIPT}"]


def detach_argv(devid: int) -> list:
    return ["xl", "network-detach", "0", str(devid)]


def choose_ip(gateway: str, taken) -> str:
    """The lowest address of the gateway's /24 that is not the gateway, not
    a nameserver and not any guest's."""
    gw = ipaddress.IPv4Address(gateway)
    used = {ipaddress.ip_address(a) for a in taken} | {gw}
    net = ipaddress.IPv4Network(f"{gw}/24", strict=False)
    for host in net.hosts():
        if host not in used:
            return str(host)
    raise Failure(f"no free address left in {net}; give one with --ip")


def default_routes(routes_json) -> list:
    """``ip -j -4 route show default`` -> the routes ``up`` replaces, as
    ``ip route`` arguments that recreate each one."""
    out = []
    for r in routes_json or []:
        if r.get("dst") != "default":
            continue
        words = ["default"]
        if r.get("gateway"):
            words += ["via", r["gateway"]]
        if r.get("dev"):
            words += ["dev", r["dev"]]
        if r.get("metric") is not None:
            words += ["metric", str(r["metric"])]
        if r.get("protocol") and r["protocol"] != "boot":
            words += ["proto", str(r["protocol"])]
        if "onlink" in (r.get("flags") or []):
            words.append("onlink")
        out.append(" ".join(words))
    return out


def up_batch(ifname: str, ip: str, gateway: str, replaced=()) -> list:
    """dom0's interface made like a guest's (qubes-setup-ip's shape): /32,
    link up, host route to the gateway, default route via it (onlink: the
    gateway is outside the /32). Default routes dom0 had go first."""
    lines = [f"route del {r}" for r in replaced]
    lines += [
        f"addr add {ip}/32 dev {ifname}",
        f"link set dev {ifname} up",
        f"route add {gateway}/32 dev {ifname} scope link",
        f"route add default via {gateway} dev {ifname} onlink",
    ]
    return lines


def down_batch(ifname: str, ip: str, gateway: str, replaced=()) -> list:
    """The exact undo of :func:`up_batch`, in reverse order."""
    lines = [
        f"route del default via {gateway} dev {ifname}",
        f"route del {gateway}/32 dev {ifname}",
        f"link set dev {ifname} down",
        f"addr del {ip}/32 dev {ifname}",
    ]
    lines += [f"route add {r}" for r in replaced]
    return lines


def render_resolv(dns) -> str:
    lines = [f"# Written by {TAG} up (dom0 through the netvm); {TAG} down restores the previous file."]
    lines += [f"nameserver {a}" for a in dns]
    return "\n".join(lines) + "\n"


def new_record(plan: dict) -> dict:
    """The record ``up`` starts with; each step fills in what it did
    (``paused``, ``devid``, ``ifname``/``mac``, ``replaced_routes`` and
    ``configured``, ``resolv_conf``: what was there before) and ``down``
    undoes exactly what is filled in."""
    return {"netvm": plan["netvm"], "netvm_domid": plan["netvm_domid"], "ip": plan["ip"],
            "gateway": plan["gateway"], "dns": list(plan["dns"]), "paused": [], "devid": None,
            "ifname": None, "mac": None, "replaced_routes": [], "resolv_conf": None,
            "configured": False}


# ----------------------------------------------------------------------------
# Reading the system (read-only)


def xl_list(system: System) -> list:
    return parse_xl_list(system.run(["xl", "list"], readonly=True).stdout)


def _ifname_by_mac(mac: str):
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        return None
    for name in sorted(names):
        addr = System.read(f"/sys/class/net/{name}/address", "") or ""
        if addr.strip().lower() == mac.lower():
            return name
    return None


# ----------------------------------------------------------------------------
# Applying


class Ctx:
    def __init__(self, env, dry_run=False, verbose=False, out=None, timeout=None):
        self.env = os.environ if env is None else env
        self.dry_run = dry_run
        self.out = out or sys.stdout
        self.log = Log(TAG, env=self.env, verbose=verbose, stderr_only=dry_run)
        self.system = System(dry_run=dry_run, out=self.out, log=self.log, env=self.env)
        self.dir = state_dir(self.env)
        self.timeout = timeout or seconds(self.env, "QVM_DOM0_NETWORK_TIMEOUT", DEFAULT_TIMEOUT)
        self.store = Dom0Store(self.env)

    def say(self, text):
        print(text, file=self.out)

    def save(self, record):
        if not self.dry_run:
            state.save(self.dir, RECORD, record)

    def close(self):
        self.store.close()
        self.log.close()


def _lock(ctx):
    env = dict(ctx.env)
    env["VIF_ROUTE_QUBES_LOCK"] = os.path.join(ctx.dir, "dom0-network.lock")
    return HostLock(env, timeout=5.0)


def _replace_file(ctx, path: str, text: str) -> None:
    """Write a file atomically (:mod:`.files`: a temporary file renamed
    over it, or in place when it is a mount point)."""
    if ctx.dry_run:
        ctx.say(f"write {path} <<'EOF'\n{text}EOF")
        return
    ctx.log.debug(f"write {path}")
    write_file(ctx.system, path, text)


def _save_file(path: str) -> dict:
    """What resolv.conf is now: a symlink's target, a file's text, or absent."""
    if os.path.islink(path):
        return {"link": os.readlink(path)}
    text = System.read(path)
    return {"text": text} if text is not None else {"absent": True}


def _restore_file(ctx, path: str, saved: dict) -> None:
    if ctx.dry_run:
        ctx.say(f"restore {path} from the record ({', '.join(saved)})")
        return
    ctx.system.before_change(["restore", path])
    try:
        if "link" in saved:
            tmp = f"{path}.{TAG}.tmp"
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.symlink(saved["link"], tmp)
            os.replace(tmp, path)
        elif "text" in saved:
            _replace_file(ctx, path, saved["text"])
        elif os.path.lexists(path):
            os.unlink(path)
    except OSError as exc:
        raise Failure(f"cannot restore {path}: {exc.strerror}") from None


def _batch(ctx, lines, check=True):
    # the undo goes on past a line that fails (a route someone removed)
    argv = ["ip", "-batch", "-"] if check else ["ip", "-force", "-batch", "-"]
    return ctx.system.run(argv, data="".join(line + "\n" for line in lines), check=check)


def _unpause(ctx, paused):
    """Unpause the recorded domains that are still the same domain (domid and
    name) and still paused; returns the ones that failed."""
    failed = []
    now = {d.domid: d for d in xl_list(ctx.system)}
    for domid, name in paused:
        cur = now.get(domid)
        if cur is None or cur.name != name:
            ctx.log.info(f"{name} ({domid}) is gone; nothing to unpause")
            continue
        if not is_paused(cur):
            ctx.log.info(f"{name} ({domid}) is already running")
            continue
        try:
            ctx.system.run(["xl", "unpause", str(domid)])
            ctx.log.info(f"unpaused {name} ({domid})")
        except Failure as exc:
            ctx.log.error(str(exc))
            failed.append(name)
    return failed


def _choose_netvm(ctx, wanted, running):
    by_id = {d.domid: d for d in running}
    if wanted:
        domid, name = ctx.store.resolve(wanted)
        if domid == 0:
            raise Failure("--netvm: dom0 cannot be its own netvm")
        if domid not in by_id:
            raise Failure(f"--netvm {wanted}: the domain is not running")
        return domid, name
    candidates = [d for d in sorted(by_id) if d != 0 and any(f != 0 for f in ctx.store.served(d))]
    if not candidates:
        raise Failure("no running netvm: no domain other than dom0 is the backend of a guest's vif "
                      "(name one with --netvm)")
    if len(candidates) > 1:
        names = ", ".join(by_id[d].name for d in candidates)
        raise Failure(f"several domains serve guests' vifs ({names}): choose one with --netvm")
    return candidates[0], by_id[candidates[0]].name


def plan_up(ctx, netvm=None, ip=None):
    """Everything ``up`` will do, decided from read-only probes."""
    running = xl_list(ctx.system)
    nid, nname = _choose_netvm(ctx, netvm, running)
    mine = {d: b for d, b in ctx.store.dom0_vifs().items() if b == str(nid)}
    if mine:
        devs = ", ".join(str(d) for d in sorted(mine))
        raise Failure(f"dom0 is already attached to {nname} (device/vif/{devs}) but not by this command: "
                      f"detach it with 'xl network-detach 0 DEVID' first")
    values = ctx.store.netvm_values(nid)
    where = f"XenStore /local/domain/{nid}"
    gw = validate.gateway(values["qubes_netvm_gateway"], f"{where}/qubes_netvm_gateway", 4)
    if gw is None:
        raise Failure(f"{where}/qubes_netvm_gateway is missing: the netvm has no gateway for its guests "
                      f"(write it with '{KEYS_TAG} netvm {nname} --gateway ADDR')")
    dns = [str(a) for k in ("qubes_netvm_primary_dns", "qubes_netvm_secondary_dns")
           for a in [validate.gateway(values[k], f"{where}/{k}", 4)] if a is not None] or [str(gw)]
    taken = ctx.store.backend_ips(nid) + dns
    if ip is None:
        ip = choose_ip(str(gw), taken)
    else:
        addr = validate.gateway(ip, "--ip", 4)
        if str(addr) in taken or addr == gw:
            raise Failure(f"--ip {ip}: the address is already in use behind {nname}")
        ip = str(addr)
    return {
        "netvm": nname, "netvm_domid": nid, "ip": ip, "gateway": str(gw), "dns": dns,
        "pause": [(d.domid, d.name) for d in to_pause(running, nid)],
    }


def up(ctx, netvm=None, ip=None, resolv_conf=DEFAULT_RESOLV_CONF) -> int:
    old = state.load(ctx.dir, RECORD)
    if old is not None and not (old.get("configured") and old.get("resolv_conf")):
        raise Failure(f"an earlier up did not finish (record {state.path(ctx.dir, RECORD)}): "
                      f"run '{TAG} down' to undo what it did")
    if old is not None:
        ctx.say(f"dom0 is already attached to {old.get('netvm')} via {old.get('ifname') or '?'} "
                f"({old.get('ip')}): nothing to do")
        return 0
    plan = plan_up(ctx, netvm, ip)
    nid, nname = plan["netvm_domid"], plan["netvm"]
    if ctx.dry_run:
        ctx.say(f"# {TAG} up (dry run: nothing is changed): dom0 {plan['ip']} via {nname} "
                f"(domain {nid}), gateway {plan['gateway']}, DNS {' '.join(plan['dns'])}")
    record = new_record(plan)
    try:
        ctx.save(record)
        for domid, name in plan["pause"]:
            ctx.system.run(["xl", "pause", str(domid)])
            record["paused"].append([domid, name])
            ctx.save(record)
            ctx.log.info(f"paused {name} ({domid})")
        _load_netfront(ctx)
        before = set(ctx.store.dom0_vifs())
        try:
            ctx.system.run(attach_argv(nname, plan["ip"]))
        finally:
            new = sorted(set(ctx.store.dom0_vifs()) - before) if not ctx.dry_run else []
            if new:
                record["devid"] = new[-1]
                ctx.save(record)
        if ctx.dry_run:
            ctx.system.note("then: wait for hotplug-status=connected and the frontend, find the interface by its MAC")
            ifname = "IFACE"
        else:
            if record["devid"] is None:
                raise Failure("xl network-attach left no vif under /local/domain/0/device/vif")
            ifname, mac = _wait_connected(ctx, nid, record["devid"])
            record.update(ifname=ifname, mac=mac)
            ctx.save(record)
        routes = _current_defaults(ctx)
        record["replaced_routes"] = routes
        record["configured"] = True
        ctx.save(record)
        _batch(ctx, up_batch(ifname, plan["ip"], plan["gateway"], routes))
        record["resolv_conf"] = {"path": resolv_conf, **_save_file(resolv_conf)}
        ctx.save(record)
        _replace_file(ctx, resolv_conf, render_resolv(plan["dns"]))
        ctx.save(record)
    except BaseException as exc:
        if not ctx.dry_run:
            ctx.log.error(f"up failed ({exc}); rolling back")
            _rollback(ctx, record)
        raise
    if not ctx.dry_run:
        paused = ", ".join(f"{n} ({d})" for d, n in record["paused"]) or "none"
        ctx.say(f"dom0 attached to {nname} via {ifname} ({plan['ip']}, gateway {plan['gateway']}, "
                f"DNS {' '.join(plan['dns'])}); paused: {paused}")
        ctx.log.info(f"up: dom0 {plan['ip']} via {nname} on {ifname}, paused {paused}")
    return 0


def _current_defaults(ctx):
    import json

    res = ctx.system.run(["ip", "-j", "-4", "route", "show", "default"], readonly=True)
    try:
        return default_routes(json.loads(res.stdout or "[]"))
    except ValueError:
        raise Failure("ip -j route show default: unreadable output") from None


def _load_netfront(ctx):
    """dom0 needs xen-netfront to be a frontend (only on Xen: elsewhere, in
    the tests' namespaces, the stand-in interface needs no driver)."""
    if os.path.exists("/sys/module/xen_netfront"):
        return
    on_xen = (System.read("/sys/hypervisor/type", "") or "").strip() == "xen" \
        or os.path.exists("/proc/xen/capabilities")
    if not on_xen:
        ctx.log.debug("not on Xen: not loading xen-netfront")
        return
    ctx.system.run(["modprobe", "xen-netfront"])


def _wait_connected(ctx, nid, devid):
    """Bounded wait for the backend's ``hotplug-status=connected`` (the
    netvm's script ran) and dom0's frontend ``state=4``; returns (ifname, mac)."""
    xs = ctx.store.xs
    back = f"/local/domain/{nid}/backend/vif/0/{devid}"
    front = f"/local/domain/0/device/vif/{devid}"
    deadline = time.monotonic() + ctx.timeout
    first = True
    while True:
        v = xs.read_many([f"{back}/hotplug-status", f"{back}/hotplug-error", f"{front}/state", f"{front}/mac"])
        status, error, fstate, mac = (v[f"{back}/hotplug-status"], v[f"{back}/hotplug-error"],
                                      v[f"{front}/state"], v[f"{front}/mac"])
        if first:
            # libxl writes an empty hotplug-status before the backend starts
            # (the fix for the driver-domain attach race); seen here, if at all
            ctx.log.debug(f"right after attach: {back}/hotplug-status={status!r}")
            first = False
        if status == "error" or error:
            # the netvm wrote it: shown, never trusted (one bounded, printable line)
            raise Failure(f"the netvm's vif script failed: {validate.message(error) or 'hotplug-status=error'}")
        ifname = _ifname_by_mac(mac) if mac else None
        if status == "connected" and fstate == "4" and ifname:
            return ifname, mac
        if time.monotonic() > deadline:
            raise Failure(f"network attach timed out after {ctx.timeout:g} s (hotplug-status={status!r}, "
                          f"frontend state={fstate!r}, interface {'found' if ifname else 'not found'} "
                          f"for mac {mac}); is xen-netfront loaded in dom0?")
        time.sleep(0.2)


def _wait_detached(ctx, nid, devid):
    xs = ctx.store.xs
    deadline = time.monotonic() + ctx.timeout
    paths = [f"/local/domain/0/device/vif/{devid}", f"/local/domain/{nid}/backend/vif/0/{devid}"]
    while any(v is not None for v in xs.read_many([p + "/state" for p in paths]).values()):
        if time.monotonic() > deadline:
            raise Failure(f"network detach of dom0's vif {devid} did not finish within {ctx.timeout:g} s")
        time.sleep(0.2)


def _undo(ctx, record) -> list:
    """Undo what the record says was done; returns the failures (each step
    is tried even when an earlier one failed: unpausing matters most)."""
    failed = []

    def step(what, fn):
        try:
            fn()
        except Failure as exc:
            ctx.log.error(f"{what}: {exc}")
            failed.append(what)

    rc = record.get("resolv_conf")
    if rc:
        step("restore resolv.conf", lambda: _restore_file(ctx, rc["path"], rc))
    ifname = record.get("ifname")
    if record.get("configured") and ifname and (ctx.dry_run or System.iface_exists(ifname)):
        def unconfigure():
            res = _batch(ctx, down_batch(ifname, record["ip"], record["gateway"],
                                         record.get("replaced_routes") or []), check=False)
            if res.code != 0:
                ctx.log.warning(f"ip -batch (undo) exited {res.code}: {res.stderr.strip()[-200:]}")
        step("unconfigure " + ifname, unconfigure)
    elif record.get("replaced_routes"):
        step("restore default routes", lambda: _batch(
            ctx, [f"route add {r}" for r in record["replaced_routes"]], check=False))
    devid = record.get("devid")
    if devid is not None:
        def detach():
            ctx.system.run(detach_argv(devid))
            if not ctx.dry_run:
                _wait_detached(ctx, record["netvm_domid"], devid)
        step(f"detach vif {devid}", detach)
    if record.get("paused"):
        try:
            failed += _unpause(ctx, [tuple(p) for p in record["paused"]])
        except Failure as exc:
            ctx.log.error(f"unpause: {exc}")
            failed.append("unpause")
    return failed


def _rollback(ctx, record):
    failed = _undo(ctx, record)
    if failed:
        ctx.log.error(f"rollback incomplete ({', '.join(failed)}); the record stays for '{TAG} down'")
    else:
        state.remove(ctx.dir, RECORD)


def down(ctx) -> int:
    record = state.load(ctx.dir, RECORD)
    if record is None:
        ctx.say("dom0 is not attached through a netvm by this command (no record): nothing to do")
        return 0
    if ctx.dry_run:
        ctx.say(f"# {TAG} down (dry run: nothing is changed)")
    failed = _undo(ctx, record)
    if failed:
        raise Failure(f"down incomplete: {', '.join(failed)} failed; the record "
                      f"{state.path(ctx.dir, RECORD)} stays so that down can be run again")
    if not ctx.dry_run:
        state.remove(ctx.dir, RECORD)
        paused = ", ".join(f"{n} ({d})" for d, n in record.get("paused") or []) or "none"
        ctx.say(f"dom0 detached from {record.get('netvm')}; unpaused: {paused}")
        ctx.log.info(f"down: dom0 detached from {record.get('netvm')}, unpaused {paused}")
    return 0


def status(ctx) -> int:
    record = state.load(ctx.dir, RECORD)
    if record is None:
        ctx.say("dom0 is not attached through a netvm by this command")
        others = ctx.store.dom0_vifs()
        if others:
            ctx.say("dom0 has vif frontends not made by it: " +
                    ", ".join(f"device/vif/{d} (backend domain {b})" for d, b in sorted(others.items())))
        return 0
    paused = ", ".join(f"{n} ({d})" for d, n in record.get("paused") or []) or "none"
    ctx.say(f"dom0 attached to {record.get('netvm')} (domain {record.get('netvm_domid')}) "
            f"via {record.get('ifname') or '?'} (device/vif/{record.get('devid')}), "
            f"{record.get('ip')}/32, gateway {record.get('gateway')}, DNS {' '.join(record.get('dns') or [])}")
    ctx.say(f"paused because of it: {paused}")
    return 0


# ----------------------------------------------------------------------------
# click


ENV_HELP = """

\b
Environment:
  XENSTORED_PATH   XenStore socket (default /var/run/xenstored/socket)
  VIF_ROUTE_QUBES_STATE_DIR  the record dom0-network.json (default /run/vif-route-qubes)
  QVM_DOM0_NETWORK_TIMEOUT   default for --timeout (60 s)
  QVM_DOM0_NETWORK_RESOLV_CONF  default for --resolv-conf (/etc/resolv.conf)
  VIF_ROUTE_QUBES_DEBUG=1    debug logging on stderr (like -v)

\b
Exit status: 0 done (or nothing to do), 1 error (up rolled back).
"""


def _run(ctx_args, fn, *args):
    # up and down change shared state: one at a time (a dry run changes none)
    return reported(TAG, lambda: Ctx(**ctx_args), fn, *args,
                    around=lambda ctx, f: _lock(ctx) if f in (up, down) and not ctx.dry_run else None)


def command():
    import click

    @click.group(TAG, help=(
        "Connect dom0 to the netvm's network like another AppVM, and back.\n\n"
        "In the recommended layout dom0 has no network: a netvm (a driver domain running "
        "xl devd and vif-route-qubes) serves the guests. 'up' pauses every running domain "
        "except dom0 and the netvm, attaches a vif to dom0 with the netvm as backend, waits "
        "for the netvm's script and dom0's frontend, and configures the interface like a "
        "guest's (address/32, route to the gateway, default route, resolv.conf naming "
        "DNS1/DNS2). 'down' undoes exactly that and unpauses exactly the domains 'up' "
        "paused." + ENV_HELP),
        context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(package_name="vif-route-qubes", message="%(prog)s %(version)s")
    def group():
        pass

    def common(f):
        f = click.option("-n", "--dry-run", is_flag=True,
                         help="Print what would be run and written; change nothing.")(f)
        f = click.option("-v", "--verbose", is_flag=True, help="Log every action to stderr.")(f)
        return f

    @group.command("up", help="Pause the other domains and attach dom0 to the netvm.")
    @click.option("--netvm", metavar="NAME", help="The netvm (default: the one domain whose backend serves the guests).")
    @click.option("--ip", metavar="ADDR", help="dom0's address (default: the lowest free one in the gateway's /24).")
    @click.option("--timeout", type=float, metavar="SEC", help="Bound for the attach (default 60).")
    @click.option("--resolv-conf", metavar="PATH", envvar="QVM_DOM0_NETWORK_RESOLV_CONF",
                  default=DEFAULT_RESOLV_CONF, show_default=True, help="The resolver file to write.")
    @common
    def up_cmd(netvm, ip, timeout, resolv_conf, dry_run, verbose):
        if timeout is not None and not 0 < timeout < 1e6:
            raise click.BadParameter("expected a positive number of seconds", param_hint="--timeout")
        _run(dict(env=None, dry_run=dry_run, verbose=verbose, timeout=timeout), up, netvm, ip, resolv_conf)

    @group.command("down", help="Undo 'up': restore resolv.conf and routes, detach, unpause.")
    @click.option("--timeout", type=float, metavar="SEC", help="Bound for the detach (default 60).")
    @common
    def down_cmd(timeout, dry_run, verbose):
        _run(dict(env=None, dry_run=dry_run, verbose=verbose, timeout=timeout), down)

    @group.command("status", help="Whether dom0 is attached, through which interface, and which domains it paused.")
    @click.option("-v", "--verbose", is_flag=True, help="Log every action to stderr.")
    def status_cmd(verbose):
        _run(dict(env=None, verbose=verbose), status)

    return group


def main(argv=None):
    command()(args=argv, prog_name=TAG)

