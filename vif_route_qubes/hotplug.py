"""vif-route-qubes: what Xen runs for each guest network interface.

:func:`run` is one hotplug invocation (``online``/``offline``, and udev's
``add``/``remove`` for tap devices). The console script is
:func:`vif_route_qubes.entry.main`, which calls it straight for Xen's
argv form and through the click interface (:mod:`.cli`) for everything else.
"""

import os
import time
from ipaddress import ip_interface

from . import mapped
from . import plan as P
from . import state, validate
from .config import choose as config_choice
from .config import where
from .errors import CommandFailed, Failure
from .firewall import ENV as FIREWALL_ENV
from .firewall import backend_for, recorded_backend
from .lock import DEFAULT_TIMEOUT as DEFAULT_LOCK_TIMEOUT
from .lock import HostLock, state_dir, vif_lock
from .log import Log
from .system import System

COMMANDS = ("online", "offline", "add", "remove")
# XenStore keys of the backend directory that key=value words may override.
BACKEND_KEYS = ("ip", "mac", "vifname", "type", "frontend-id")
# the netvm's own keys, relative to its home; the service key has the path
# Qubes gives it in QubesDB (the XenStore scheme's one addition)
HARDEN_KEY = "qubes-service/harden-network-interfaces"
NETVM_KEYS = ("qubes_netvm_gateway", "qubes_netvm_gateway6", HARDEN_KEY)
ENV_WORDS = ("vif", "XENBUS_PATH", "type_if")
DEFAULT_HOOKS = "/rw/config/network-hooks.d"
# seconds online waits for the backend interface to appear (udev races)
DEFAULT_IFACE_WAIT = 5.0
# seconds a late-keys watch waits for a vif's /mapped-ip keys ("0": no watch)
MAPPED_WAIT_ENV = "VIF_ROUTE_QUBES_MAPPED_WAIT"
DEFAULT_MAPPED_WAIT = 60.0


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
        self._config = None
        self.state_dir = state_dir(self.env)
        self.fw.state_dir = self.state_dir  # where a backend keeps its hints
        self.hooks_dir = self.env.get("VIF_ROUTE_QUBES_HOOKS_DIR") or DEFAULT_HOOKS
        self._xs = None
        self.xenbus_path = None  # set once validated: where errors are reported
        self.xp_exists = None  # whether that directory exists (None: not read yet)
        self.iface_waited = 0
        self.ifindex = None  # of the proven interface (online), for the record
        self.harden = False  # dom0's harden-network-interfaces switch (online)
        self.hardened = []  # [(sysctl path, its value before)]: what a rollback puts back
        self.fw_applied = False  # this run's firewall change is in force
        self.fw_was = None  # the other backend, when the record names it
        self.hooks_ran = False  # told the hooks "online" (rollback tells them back)
        self.mapping = None  # the vif's NAT (mapped.MappedVif), from QubesDB's /mapped-ip
        self.mapped_pending = []  # real IPv4 addresses whose /mapped-ip keys are not all there
        self.nat_changed = False  # this run built, rebuilt or removed the vif's NAT namespace
        self.late = False  # a late-keys watch's re-run: only a vif that is still online
        self.record = None  # the vif's state record as online found it
        self.alone = False  # online: a new vif and no other has a record (rollback: retire too)

    @property
    def config(self):
        """(source, reason) of this run's configuration values (vif_route_qubes.config)."""
        if self._config is None:
            self._config = config_choice(self.env)
            self.log.debug(f"configuration: {self._config[0]} ({self._config[1]})")
            self.sys.note(f"configuration: {self._config[0]} ({self._config[1]})")
        return self._config

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


def _backend_values(ctx, xp, mapped=False):
    """Backend keys and the netvm's own keys, in one XenStore round trip;
    key=value words override XenStore values of the same name. The
    directory itself is read too: whether it exists decides whether we may
    report into it (``ctx.xp_exists``). From QubesDB, with ``mapped``, the
    guest's mapped addresses too (``found["mapped-ip"]``), on the same
    connection; the XenStore scheme has none."""
    qdb = ctx.config[0] == "qubesdb"
    paths = [f"{xp}/{k}" for k in BACKEND_KEYS] + ([] if qdb else list(NETVM_KEYS)) + [xp]
    values = ctx.xs.read_many(paths)
    found = {k: values[f"{xp}/{k}"] for k in BACKEND_KEYS}
    ctx.xp_exists = values[xp] is not None
    for key in BACKEND_KEYS:
        if key in ctx.vars:
            found[key] = ctx.vars[key]
    if qdb:
        from .config import netvm_from_qubesdb

        found.update(netvm_from_qubesdb(ctx.env, _real_addresses(found.get("ip")) if mapped else ()))
    else:
        found.update({k: values[k] for k in NETVM_KEYS})
    return found


def _real_addresses(text) -> list:
    """The canonical text of each word of an ``ip`` value that is an
    address, for the /mapped-ip lookups (validated later, with the rest)."""
    from ipaddress import ip_address

    out = []
    for word in (text or "").split()[:validate.MAX_ADDRESSES]:
        try:
            a = str(ip_address(word.split("/")[0]))
        except ValueError:
            continue
        if a not in out:
            out.append(a)
    return out


def _mapping(ctx, vif, raw):
    """The vif's NAT (a mapped.MappedVif) from the validated /mapped-ip
    values ``raw`` = {real text: (visible-ip, visible-gateway)}, or None.
    Sets ``ctx.mapped_pending``: real IPv4 addresses whose keys are not
    (both) there yet, which a late-keys watch waits for (Qubes issue 9318:
    dom0 may write them after the hotplug ran). Only IPv4: Qubes' dom0
    writes the keys for a qube's IPv4 address and never for IPv6, so
    waiting for those would be waiting for nothing."""
    found = {}
    ctx.mapped_pending = []
    for a in vif.addresses:
        visible, gateway = (raw or {}).get(str(a), (None, None))
        base = f"QubesDB /mapped-ip/{a}/"
        v = validate.gateway(visible, base + "visible-ip", a.version)
        g = validate.gateway(gateway, base + "visible-gateway", a.version)
        if (v is None or g is None) and a.version == 4:
            ctx.mapped_pending.append(a)
        found[a] = (v, g)
    return mapped.mapping_for(vif, found)


def _netvm_gateways(found, source):
    gw = validate.gateway(found.get("qubes_netvm_gateway"), where(source, "qubes_netvm_gateway"), 4)
    gw6 = validate.gateway(found.get("qubes_netvm_gateway6"), where(source, "qubes_netvm_gateway6"), 6)
    return gw, gw6


def _where(ctx, xp, key):
    """Where a value came from, for the error that quotes it."""
    return f"argument {key}=" if key in ctx.vars else f"XenStore {xp}/{key}"


def _vif_from(ctx, found, name, xp, front, devid):
    """Validate XenStore/argv values into a Vif (raises Failure)."""
    w = lambda key: _where(ctx, xp, key)  # noqa: E731
    addresses = ()
    if found.get("ip") is None:
        # Qubes brings such a vif up too: the guest starts, and the
        # anti-spoofing rules (which RETURN for no address) drop all of it.
        ctx.log.info(f"{w('ip')}: missing: {name} comes up with every packet from it dropped")
    else:
        addresses = validate.addresses(found["ip"], w("ip"))
    if found.get("mac") is None:
        raise Failure(f"{w('mac')}: missing")
    mac = validate.mac(found["mac"], w("mac"))
    if found.get("frontend-id") not in (None, ""):
        fid = validate.domid(found["frontend-id"], w("frontend-id"))
        if fid != front:
            raise Failure(f"{w('frontend-id')} is {fid}, but the path names domain {front}")
    vif_type = found.get("type") or "vif"
    if vif_type not in ("vif", "vif_ioemu"):
        raise Failure(f"{w('type')}: {vif_type[:40]!r} is not vif or vif_ioemu")
    source = ctx.config[0]
    gw, gw6 = _netvm_gateways(found, source)
    for g, key in ((gw, "qubes_netvm_gateway"), (gw6, "qubes_netvm_gateway6")):
        if g is not None and g in addresses:
            raise Failure(f"{where(source, key)} {g} is also an address of the guest ({w('ip')})")
    ctx.harden = validate.switch(found.get(HARDEN_KEY), where(source, HARDEN_KEY))
    return P.Vif(
        name=name, domid=front, devid=devid, vif_type=vif_type, mac=mac,
        addresses=addresses, gateway=gw, gateway6=gw6, xenbus_path=xp,
    )


def _identify(ctx):
    """The interface named by ``vif`` and the backend path, validated.
    ``ctx.xenbus_path`` (where a failure is reported) is set only once the
    two agree: a mistyped manual run must not write into another device's
    directory."""
    name = ctx.env.get("vif", "")
    if not name:
        raise Failure("environment variable vif is not set (the interface to configure)")
    domid, devid = validate.vif_name(name, "vif")
    xp = ctx.env.get("XENBUS_PATH", "")
    if not xp:
        raise Failure("environment variable XENBUS_PATH is not set (the device's XenStore directory)")
    xp, front, xdev = validate.xenbus_path(xp)
    if (front, xdev) != (domid, devid):
        raise Failure(f"vif={name} does not match XENBUS_PATH={xp}")
    ctx.xenbus_path = xp
    return name, xp, front, devid


# ----------------------------------------------------------------------------
# The link: read what the kernel has, converge it


def _wait_for(ctx, names):
    """The first of ``names`` that exists, waiting (bounded) for udev-driven
    setups that run us before the backend interface appears. -> name or None."""
    from .lock import seconds

    limit = seconds(ctx.env, "VIF_ROUTE_QUBES_IFACE_WAIT", DEFAULT_IFACE_WAIT)
    deadline = time.monotonic() + limit
    while True:
        for n in names:
            if System.iface_exists(n):
                return n
        if time.monotonic() >= deadline or ctx.dry_run:
            ctx.iface_waited = limit if not ctx.dry_run else 0
            return None
        time.sleep(0.02)


def _read_vif(ctx, name) -> "P.VifState":
    """What of ours the kernel shows on ``name``: one ``ip -j -batch``."""
    res = ctx.sys.run(["ip", "-j", "-batch", "-"], P.read_queries(name), readonly=True, check=False)
    if res.code != 0:
        raise CommandFailed(res.argv, res.code, res.stderr)
    try:
        arrays = P.json_arrays(res.stdout)
    except ValueError as exc:
        raise Failure(f"ip -j -batch: unreadable answer about {name}: {exc}") from None
    if len(arrays) != 4:
        raise Failure(f"ip -j -batch: expected 4 answers about {name}, got {len(arrays)}")
    return P.vif_state(arrays)


def _write_sysctls(ctx, sysctls, check=True):
    """Write the wanted values where the kernel differs (none to write on a
    re-run that changes nothing). A value the kernel does not have (IPv6
    off altogether) is skipped."""
    for path, value in sysctls:
        now = System.read(path)
        if now is None or now.strip() == value:
            continue
        try:
            ctx.sys.write(path, value)
        except Failure:
            if check:
                raise


def _converge(ctx, name, vif, ipv6, guard, check=True):
    """Take ``name`` to exactly ``vif``'s configuration (None: nothing of
    ours): stale routes and neighbour entries out first, then ``guard()``
    (the firewall change), then the sysctls and the rest of the link.
    -> the plan (for the caller's log)."""
    s = ctx.sys
    have = _read_vif(ctx, name)
    plan = P.converge(name, vif, ipv6, have)
    force = [] if check else ["-force"]
    if plan.pre:
        s.run(["ip", *force, "-batch", "-"], P.render_batch(plan.pre), check=check)
    guard()
    _write_sysctls(ctx, plan.sysctls, check)
    if plan.batch:
        s.run(["ip", *force, "-batch", "-"], P.render_batch(plan.batch), check=check)
    return plan


def _conntrack_calls(ctx, addresses):
    """conntrack purges worth running: none when the kernel tracks no
    connection at all in this namespace (module not loaded, or an empty
    table), which a /proc read tells for free."""
    if not addresses:
        return []
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
        # a vif without addresses still runs its hooks, once, with no address
        for addr in vif.addresses or (None,):
            try:
                ctx.sys.run([hook, command, vif.name, vif.vif_type] + ([str(addr)] if addr else []))
            except Failure as exc:
                ctx.log.warning(f"hook {hook} failed (ignored): {exc}")


# ----------------------------------------------------------------------------
# Online


def online(ctx) -> int:
    name, xp, front, devid = _identify(ctx)
    found = _backend_values(ctx, xp, mapped=True)
    target = name
    if found.get("vifname"):
        target = validate.ifname(found["vifname"], _where(ctx, xp, "vifname"))
    vif = _vif_from(ctx, found, target, xp, front, devid)
    if "mapped-ip" in found:
        ctx.mapping = _mapping(ctx, vif, found["mapped-ip"])
        if ctx.mapping is not None:
            ctx.sys.note(f"mapped addresses (NAT namespace {mapped.netns_name(target)}): " + ", ".join(
                f"{x.real} seen by the guest as {x.visible} (gateway {x.gateway})" for x in ctx.mapping.maps))
    s = ctx.sys
    present = _wait_for(ctx, [name, target] if target != name else [name])
    if present is None:
        waited = f" (waited {ctx.iface_waited:g} s for it to appear)" if ctx.iface_waited else ""
        raise Failure(f"interface {name} does not exist{waited}")
    rename = present != target
    if rename and s.iface_exists(target):
        raise Failure(f"cannot rename {name} to {target}: an interface named {target} already exists")
    own, lock = _locks(ctx, name)
    record, done = None, False
    if not ctx.dry_run:
        own.acquire()
    try:
        if not ctx.dry_run:
            lock.acquire()
        record = ctx.record = state.load(ctx.state_dir, name)
        if ctx.late and (record is None or record.get("name") != target):
            # the watch outlived its vif (offline ran meanwhile): a re-run
            # must not bring back a gone guest's configuration
            ctx.log.info(f"late /mapped-ip keys for {name}: it is no longer online, nothing done")
            return 0
        # Nothing is touched before the interface is proven the one netback
        # made for this backend directory: a vifname=eth0 must never turn
        # the uplink into a guest vif.
        facts = System.iface_facts(present)
        why = _proof(present, name, front, devid, record, facts)
        if isinstance(why, Refusal):
            raise Failure(f"refusing to configure {present} for {name}: {why}; nothing changed")
        ctx.sys.note(f"{present} is this vif's interface: {why}")
        ctx.ifindex = facts["ifindex"]  # a rename keeps it: the record's proof for later runs
        ipv6 = System.ipv6_enabled(present)
        if vif.family(6) and not ipv6:
            ctx.log.info(f"IPv6 is disabled on {target}: IPv6 addresses "
                         f"{' '.join(map(str, vif.family(6)))} are not routed")
        previous = None
        if record and record.get("name") == target:
            previous = state.vif_of(record)[0]
        ctx.alone = previous is None and not state.others(ctx.state_dir, name)
        # guarded by the other firewall backend until now: move over
        ctx.fw_was = recorded_backend(ctx.sys, ctx.env, record, ctx.fw) if previous is not None else None
        if ctx.fw_was is not None:
            lock.exclusive()  # the other backend's shared state changes too
        try:
            _online(ctx, name, target, rename, vif, ipv6, previous)
        except BaseException:
            if not ctx.dry_run:
                _roll_back(ctx, name, target, rename, vif, ipv6, previous, record)
            raise
        done = True
    finally:
        lock.release()
        # a run that failed where there was no record leaves no lock file
        # either: the host as it found it
        if done or record is not None:
            own.release()
        else:
            own.discard()
    ctx.log.info(
        f"online {target}: {' '.join(map(str, vif.addresses)) or 'no address (everything from it dropped)'}"
        f" mac {vif.mac} metric {vif.metric}" + (f" gateway {vif.gateway}" if vif.gateway else "")
        + f" firewall {ctx.fw.name} config {ctx.config[0]}"
    )
    _start_watch(ctx, name)
    return 0


class Refusal(str):
    """Why an interface is not proven a guest's (see :func:`_proof`)."""


def _proof(present, name, domid, devid, record, facts):
    """Why ``present`` is the interface netback created for guest
    ``domid``'s vif ``devid`` (-> str), or a :class:`Refusal` saying why it
    is not. On Xen sysfs proves it: the net device's parent is the
    xen-backend device ``vif-DOMID-DEVID``. An interface with any other
    parent (a NIC, another guest's vif) is never the guest's. Without a
    parent (veth and the like: tests, no Xen) only the name netback gives,
    ``vifDOMID.DEVID``, or the interface an earlier online recorded (same
    name and ifindex) counts; and never the loopback or an uplink (group 1),
    whatever its name. ``facts``: System.iface_facts(present)."""
    if facts is None:
        return Refusal(f"{present} does not exist")
    parent = facts["parent"]
    if parent is not None:
        if parent == ("xen-backend", f"vif-{domid}-{devid}"):
            return f"its parent device is xen-backend vif-{domid}-{devid}"
        return Refusal(f"its parent device is {parent[0]} {parent[1]}, not xen-backend vif-{domid}-{devid}")
    if facts["loopback"]:
        return Refusal("it is a loopback interface")
    if facts["group"] == P.UPLINK_GROUP:
        return Refusal(f"it is in group {P.UPLINK_GROUP} (an uplink)")
    if (record and record.get("mapped") and record.get("name") == present
            and record.get("ifindex") == facts["ifindex"] and mapped.netns_exists(present)):
        # the real vif is in the NAT namespace; what is here is the netvm
        # end of the veth pair an earlier online made in its place
        return f"the netvm end of this vif's NAT, made by an earlier online (ifindex {facts['ifindex']})"
    if present == name:
        return f"named {name}, as netback names it (no parent device: not on Xen)"
    if record and record.get("name") == present and record.get("ifindex") == facts["ifindex"]:
        return f"the interface an earlier online renamed to {present} (ifindex {facts['ifindex']})"
    return Refusal(f"no parent device, and neither named {name} nor the one an earlier online recorded")


def _locks(ctx, name, timeout=None):
    """(this vif's lock, the host lock) of a run, in the order they are
    taken. A backend whose change of one vif is one atomic transaction
    (``concurrent``) holds the host lock shared, and takes it exclusively
    through ``serialize`` before it reads shared state to decide (see
    :mod:`.lock`); the others hold it exclusively, and then the host lock
    alone keeps runs of one vif apart too."""
    concurrent = getattr(ctx.fw, "concurrent", False)
    lock = HostLock(ctx.env, timeout=timeout, shared=concurrent)
    if concurrent:
        ctx.fw.serialize = lock.exclusive
        return vif_lock(ctx.env, name, timeout=timeout), lock
    return _NoLock(), lock


class _NoLock:
    def acquire(self):
        return self

    def release(self):
        pass

    def discard(self):
        pass


def _online(ctx, name, target, rename, vif, ipv6, previous):
    s = ctx.sys
    if rename:
        s.run(["ip", "link", "set", "dev", name, "name", target])
    _nat(ctx, target, ctx.mapping)
    if ctx.harden:
        # before the link is up, as Qubes does; the old values are kept so a
        # failed run puts them back (it leaves the host as it found it)
        wanted = P.hardening(target, ipv6)
        ctx.hardened = [(path, (System.read(path) or "").strip()) for path, _ in wanted]
        _write_sysctls(ctx, wanted)

    was = ctx.fw_was

    def guard():
        ctx.fw.apply(vif, previous if was is None else None)
        ctx.fw_applied = True
        if was is not None:
            ctx.log.info(f"{target}: moved from the {was.name} to the {ctx.fw.name} firewall backend")
            was.remove(previous.name)
            if was.moved_away():
                ctx.log.warning(was.moved_away())
        # flows of an earlier owner of a new address must not reach this
        # guest; the same guest's own flows (a re-run) are kept
        old = set(previous.addresses) if previous else set()
        purges = _conntrack_calls(ctx, [a for a in vif.addresses if a not in old])
        if purges:
            s.run_all(purges)

    _converge(ctx, target, vif, ipv6, guard)
    # the flowtable over every interface, this one included: an
    # optimisation, so it never fails the run
    done = ctx.fw.accelerate(ctx.state_dir)
    if done:
        ctx.log.debug(done)
    if not ctx.dry_run:
        state.save(ctx.state_dir, name, dict(state.record_of(vif, ipv6, name, ctx.ifindex),
                                             firewall=ctx.fw.name, mapped=mapped.record_of(ctx.mapping)))
    ctx.hooks_ran = True
    _run_hooks(ctx, "online", vif)
    _report(ctx, ctx.xenbus_path, [(f"{ctx.xenbus_path}/hotplug-status", "connected")], clear_error=True)


def _nat(ctx, target, m):
    """Before anything else of the link: build (or rebuild in place) the
    vif's NAT namespace when it has mapped addresses, or remove one it no
    longer should have (its keys went: re-running is repair). Afterwards
    ``target`` in the netvm is the netvm end of the veth pair, and the rest
    of online configures it as any vif, for the real addresses; its ifindex
    is what the record proves later runs' interface by."""
    if m is None and not (mapped.netns_exists(target) and _nat_ours(target, ctx.env["vif"], ctx.record)):
        return
    ctx.nat_changed = True
    if m is None:
        for done in mapped.teardown(ctx.sys, target):
            ctx.log.info(f"{target}: no mapped address any more: removed its {done}")
    else:
        mapped.apply(ctx.sys, m)
    facts = System.iface_facts(target)
    if facts is not None and not ctx.dry_run:
        ctx.ifindex = facts["ifindex"]


def _nat_ours(target, name, record) -> bool:
    """Namespace ``target``-nat is this vif's to remove: named after the
    interface netback made (as Qubes' vif-qubes-nat.sh names it too), or
    recorded by an earlier online. A namespace that merely shares a
    ``vifname``'s name is someone else's."""
    return target == name or bool(record and record.get("mapped") and record.get("name") == target)


def _roll_back(ctx, name, target, rename, vif, ipv6, previous, record):
    """A failed online leaves the host as it found it: the previous working
    configuration, guarded as before, when there was one; else nothing of
    ours. Works from a fresh reading of the kernel, so whatever the failed
    step left half done is found and put right."""
    s = ctx.sys
    if ctx.nat_changed:
        # the NAT as it was first (the previous one rebuilt, or none), so
        # what follows converges the interface the netvm had before
        was = mapped.from_record(previous, (record or {}).get("mapped")) if previous is not None else None
        try:
            if was is None:
                mapped.teardown(s, target)
            else:
                mapped.apply(s, was)
        except Failure as exc:
            ctx.log.warning(f"rollback of {target}'s NAT: {exc}; removing it")
            mapped.teardown(s, target)
    now = target if s.iface_exists(target) else name
    for path, old in ctx.hardened:
        if old:
            _write_sysctls(ctx, [(path.replace(f"/{target}/", f"/{now}/"), old)], check=False)
    if previous is not None:
        # A firewall step that failed has put the previous rules back
        # itself (its contract); only rules this run installed are undone.
        was = ctx.fw_was

        def guard():
            if ctx.fw_applied and was is None:
                ctx.fw.apply(previous, vif)
            elif ctx.fw_applied:
                # back to the backend that guarded it: its rules first, then
                # this run's go, so the vif is never unguarded
                was.apply(previous, previous)
                ctx.fw.remove(target)
        try:
            _converge(ctx, now, previous, ipv6, guard, check=False)
        except Failure as exc:
            # The previous rules could not be put back: fail closed, no
            # route to the guest without the rules that guard it.
            ctx.log.warning(f"rollback of {target}: {exc}; removing its routes")
            try:
                _converge(ctx, now, None, ipv6, lambda: None, check=False)
            except Failure as exc2:
                ctx.log.warning(f"rollback of {target}: {exc2}")
    else:
        # alone: the sets this run created (the first vif after none) go too
        try:
            _converge(ctx, now, None, ipv6, lambda: ctx.fw.remove(target, alone=ctx.alone), check=False)
        except Failure as exc:
            ctx.log.warning(f"rollback of {target}: {exc}")
            ctx.fw.remove(target, alone=ctx.alone)
    try:
        if record:
            state.save(ctx.state_dir, name, record)
        else:
            state.remove(ctx.state_dir, name)
    except Failure as exc:
        ctx.log.warning(f"rollback: {exc}")
    if ctx.hooks_ran:
        # the hooks were told this run's configuration: tell them it is gone
        # again, and (on a vif that was online) that the previous one is back
        _run_hooks(ctx, "offline", vif)
        if previous is not None:
            _run_hooks(ctx, "online", previous)
    if rename and s.iface_exists(target) and not s.iface_exists(name):
        res = s.run(["ip", "link", "set", "dev", target, "name", name], check=False)
        if res.code != 0:
            ctx.log.warning(f"rollback: could not rename {target} back to {name}: {res.stderr.strip()}")


def _report(ctx, xp, items, clear_error=False):
    if ctx.dry_run:
        for path, value in items:
            print(f"xenstore-write {path} {value}", file=ctx.sys.out)
        return
    if not ctx.xp_exists:
        # key=value words supplied everything and the directory is not
        # there: writing would create it, holding only our keys
        ctx.log.warning(f"{xp} does not exist in XenStore: hotplug-status not written")
        return
    ctx.sys.before_change(["xenstore-write", xp])
    for path, value in items:
        ctx.log.debug(f"xenstore-write {path} {value}")
    ctx.xs.write_many(items)
    if clear_error:
        ctx.xs.rm(f"{xp}/hotplug-error")


# ----------------------------------------------------------------------------
# Late /mapped-ip keys (Qubes issue 9318)
#
# dom0 may write a disposable's /mapped-ip keys after the hotplug ran. When
# a QubesDB online found them missing, a watch is left behind: a detached
# process (stdio closed, so neither libxl nor udev waits for it) holding
# one QubesDB connection with a watch on /mapped-ip/REAL/ for each pending
# address, for at most VIF_ROUTE_QUBES_MAPPED_WAIT seconds. When the keys
# are there and map an address, it re-runs online for the vif, which then
# converges to its NAT (no detach); when they arrive equal to the real
# address, or never, it just ends. Its pid and start time are in
# STATE_DIR/VIF.watch; offline ends it and removes the file.


def _watch_file(ctx_or_dir, name):
    directory = ctx_or_dir if isinstance(ctx_or_dir, str) else ctx_or_dir.state_dir
    return os.path.join(directory, f"{name}.watch")


def _start_time(pid):
    """The kernel's start time of process ``pid`` (None: no such process):
    with the pid, it names one process, never a later one that reused it."""
    stat = System.read(f"/proc/{pid}/stat")
    if not stat or ")" not in stat:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _mapped_wait(env) -> float:
    from .lock import seconds

    return 0.0 if env.get(MAPPED_WAIT_ENV, "").strip() == "0" else seconds(env, MAPPED_WAIT_ENV, DEFAULT_MAPPED_WAIT)


def _start_watch(ctx, name):
    if not ctx.mapped_pending or ctx.mapping is not None or ctx.late:
        return
    limit = _mapped_wait(ctx.env)
    if limit <= 0:
        return
    pending = [str(a) for a in ctx.mapped_pending]
    what = ", ".join(f"/mapped-ip/{a}/" for a in pending)
    if ctx.dry_run:
        ctx.sys.note(f"would watch QubesDB {what} for {limit:g} s (keys that arrive late map the address)")
        return
    ctx.log.debug(f"{name}: watching QubesDB {what} for {limit:g} s")
    # online returns once the watch has written its file, so an offline
    # right after it always finds the watch to end (bounded: 2 s)
    ready, told = os.pipe()
    pid = os.fork()
    if pid:
        os.close(told)
        os.waitpid(pid, 0)
        os.close(ready)
        return
    try:
        os.setsid()
        if os.fork() == 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            # nothing of the parent's stays open: above all no lock file
            # (a flock held by a copy of its descriptor outlives release)
            os.closerange(3, told)
            os.closerange(told + 1, 65536)
            _watch(dict(ctx.env), name, pending, limit, ctx.state_dir, told)
        else:
            import select

            os.close(told)
            select.select([ready], [], [], 2.0)
    finally:
        os._exit(0)


def _watch(env, name, pending, limit, directory, told):
    import signal

    from .config import mapped_of, mapped_path
    from .qubesdb import QubesDB

    log = Log("vif-route-qubes", env)
    me = f"{os.getpid()} {_start_time(os.getpid())}"
    path = _watch_file(directory, name)
    try:
        with open(path, "w") as f:
            f.write(me + "\n")
    except OSError as exc:
        log.warning(f"{name}: no late-keys watch ({path}: {exc.strerror})")
        return
    finally:
        os.close(told)  # online may return

    def mine():
        return (System.read(path) or "").strip() == me

    deadline = time.monotonic() + limit
    try:
        with QubesDB(env) as q:
            for a in pending:
                q.watch(mapped_path(a))
            while True:
                # level-triggered: the keys are read after the watch is set,
                # and again after every event, so none is missed
                # dom0 writes them for a qube's first IPv4 address only, so
                # one address with both keys is what there is to wait for
                found = {real: v for real, (v, g) in mapped_of(q, pending).items() if v and g}
                if found:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    log.debug(f"{name}: no /mapped-ip keys within {limit:g} s: the vif stays unmapped")
                    return
                q.event(left)
    except Failure as exc:
        log.warning(f"{name}: late-keys watch ended: {exc}")
        return
    finally:
        if mine():
            # from here on offline finds nothing to stop; the re-run checks
            # under the vif's lock that the vif is still online
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.unlink(path)
        log.close()
    if all(v == real for real, v in found.items()):
        return  # not hidden after all: nothing to change
    run("online", {}, env, late=True)


def _stop_watch(ctx, name):
    """End the vif's late-keys watch, if one is waiting (offline)."""
    path = _watch_file(ctx, name)
    text = System.read(path)
    if text is None:
        return
    ctx.sys.note(f"end the late-keys watch of {name} ({path}: {text.strip()})")
    if ctx.dry_run:
        return
    words = text.split()
    if len(words) == 2 and words[0].isdigit() and _start_time(int(words[0])) == words[1]:
        import signal

        try:
            os.kill(int(words[0]), signal.SIGTERM)
        except OSError:
            pass
    try:
        os.unlink(path)
    except OSError:
        pass


# ----------------------------------------------------------------------------
# Offline


def _offline_vif(ctx, name, record):
    """Who the vif is (its name now, addresses for hooks and conntrack):
    from the state record if we have one; else from XenStore (if the
    directory is still there), else from our own firewall rules. What to
    remove from the link is read from the kernel, whatever this says."""
    if record:
        return state.vif_of(record)[0]
    domid, devid = validate.vif_name(name, "vif")
    found = {}
    xp = ctx.xenbus_path
    if xp:
        try:
            found = _backend_values(ctx, xp)
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
        addresses = tuple(ctx.fw.addresses(target))
    return P.Vif(name=target, domid=domid, devid=devid, vif_type=found.get("type") or "vif",
                 addresses=addresses, xenbus_path=xp)


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
            xp, front, xdev = validate.xenbus_path(xp)
            if (front, xdev) == validate.vif_name(name, "vif"):
                ctx.xenbus_path = xp
            else:
                ctx.log.warning(f"vif={name} does not match XENBUS_PATH={xp}: XenStore not read")
        except Failure as exc:
            ctx.log.warning(str(exc))
    s = ctx.sys
    _stop_watch(ctx, name)
    try:
        own, lock = _locks(ctx, name)
    except Failure as exc:  # a bad VIF_ROUTE_QUBES_LOCK_TIMEOUT must not stop the cleanup
        ctx.log.warning(f"{exc}; waiting the default {DEFAULT_LOCK_TIMEOUT:g} s")
        own, lock = _locks(ctx, name, timeout=DEFAULT_LOCK_TIMEOUT)
    locked = []
    if not ctx.dry_run:
        for held in (own, lock):
            try:
                locked.append(held.acquire())
            except Failure as exc:
                # Leaving a dead guest's rules behind is worse than racing a hung
                # holder: the next guest with this name would inherit them.
                ctx.log.warning(f"{exc}; cleaning up without the lock")
                break
    removed, left, gone = [], [], False
    try:
        record = state.load(ctx.state_dir, name)
        vif = _offline_vif(ctx, name, record)
        addresses = list(vif.addresses)
        # the NAT first: its veth pair (and every route on the netvm end)
        # goes, the real vif comes back, and the rest finds it as any vif
        if _nat_ours(vif.name, name, record):
            removed += mapped.teardown(s, vif.name)
        facts = System.iface_facts(vif.name)
        if facts is None:
            s.note(f"{vif.name} no longer exists: its routes, addresses and neighbour entries went with it")
        else:
            why = _proof(vif.name, name, vif.domid, vif.devid, record, facts)
            proven = not isinstance(why, Refusal)
            if not proven:
                # not proven the guest's (a vifname=eth0 and no record): its
                # link is never downed nor its addresses touched; only our
                # routes to the guest's addresses go, with our firewall elements
                ctx.log.warning(f"offline {name}: {vif.name} is not proven this vif's interface ({why}): "
                                "its link is left alone; only routes to the guest's addresses and our "
                                "firewall rules for it are removed")
            try:
                # routes, addresses, neighbours and link state first: nothing
                # is routed to the guest once its anti-spoofing rules are gone
                have = _read_vif(ctx, vif.name)
                plan = P.converge(vif.name, None, proven and System.ipv6_enabled(vif.name), have)
                if proven:
                    addresses += [a for a in (ip_interface(d).ip for d, _ in have.routes) if a not in addresses]
                    lines, sysctls = plan.pre, plan.sysctls
                else:
                    mine = {str(a) for a in vif.addresses}
                    lines = [line for line in plan.pre
                             if line.startswith("route del ") and str(ip_interface(line.split()[2]).ip) in mine]
                    sysctls = ()
                if lines:
                    res = s.run(["ip", "-force", "-batch", "-"], P.render_batch(lines), check=False)
                    if res.code != 0:
                        raise CommandFailed(res.argv, res.code, res.stderr)
                    removed += P.describe_removal(lines)
                for path, value in sysctls:
                    if (System.read(path) or "").strip() not in ("", value):
                        s.write(path, value)
                        removed.append(f"{path.split('/')[-1]} 1")
            except Failure as exc:
                ctx.log.warning(f"offline {vif.name}: {exc}")
                left.append("link configuration" if proven else "routes")
        missing = [t for t in getattr(ctx.fw, "tools", ()) if s.which(t) is None]
        alone = False
        try:
            # the host's last vif: our bookkeeping that then holds nothing
            # goes in the same step (one read instead of none: the last only)
            alone = not state.others(ctx.state_dir, name) and (ctx.dry_run or lock in locked)
            removed += ctx.fw.remove(vif.name, known=vif.addresses if record else None, alone=alone)
            was = recorded_backend(ctx.sys, ctx.env, record, ctx.fw)
            if was is not None:
                lock.exclusive()
                removed += was.remove(vif.name)
        except Failure as exc:  # the contract says it never raises; a missing tool still does
            ctx.log.warning(f"offline {vif.name}: {exc}")
            missing.append("?")
        if missing:
            left.append("firewall rules")
        # out of the flowtable before the conntrack purge: an offloaded
        # flow outlives its conntrack entry's deletion (Qubes issue 8212),
        # a rebuilt table holds no flow at all
        done = ctx.fw.accelerate(ctx.state_dir, leaving=vif.name)
        if done:
            removed.append(done)
        purges = _conntrack_calls(ctx, addresses)
        if purges:
            try:
                s.run_all(purges)
            except Failure as exc:
                ctx.log.warning(f"conntrack purge: {exc}")
        _run_hooks(ctx, "offline", vif)
        if not ctx.dry_run:
            if left:
                # on stderr too: offline exits 0 (Xen ignores its status), and
                # whoever runs it by hand must learn that something is left
                ctx.log.error(f"offline {vif.name}: could not remove its {' and '.join(left)}; "
                              "state record kept for a later offline")
            else:
                state.remove(ctx.state_dir, name)
                gone = True
                if ctx.fw.concurrent and not alone and lock in locked and not state.others(ctx.state_dir, name):
                    # runs of a concurrent backend overlap: two last
                    # offlines each saw the other's record above. Whichever
                    # finds no record after removing its own is the last one
                    # out, and retires what the kernel shows unused.
                    removed += ctx.fw.remove(vif.name, alone=True)
    finally:
        # the host lock first, then this vif's; once the vif is gone its
        # lock file goes too ("nothing of ours")
        for held in reversed(locked):
            if gone and held is own:
                held.discard()
            else:
                held.release()
    what = ", ".join(removed) if removed else "nothing of ours was there"
    ctx.log.info(f"offline {vif.name}: {'removed ' if removed else ''}{what} (firewall {ctx.fw.name})")
    return 0


# ----------------------------------------------------------------------------
# Entry points


def _report_failure(ctx, exc):
    """Xen's failure protocol: hotplug-error (one line), hotplug-status=error,
    written only into a directory that exists and belongs to the vif being
    configured (``vif`` and ``XENBUS_PATH`` agree); otherwise the reason goes
    to stderr and syslog only."""
    msg = str(exc)
    ctx.log.error(msg)
    if ctx.dry_run or ctx.command not in ("online", "add"):
        return
    xp = ctx.xenbus_path
    if xp is None:
        return
    try:
        if ctx.xp_exists is None:
            ctx.xp_exists = ctx.xs.read(xp) is not None
        if not ctx.xp_exists:
            ctx.log.warning(f"{xp} does not exist in XenStore: the failure is not reported there")
            return
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


def run(command, variables, env, dry_run=False, log=None, out=None, firewall=None, late=False) -> int:
    """One hotplug invocation -> exit status (0 ok / nothing to do, 1 failed).
    ``late``: the re-run of a late-keys watch (see :func:`_watch`)."""
    try:
        ctx = Context(command, variables, env, dry_run=dry_run, log=log, out=out, firewall=firewall)
        ctx.late = late
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
        if late:
            # the vif is up and was left as it was: Xen's failure protocol
            # is for the attach, long over
            ctx.log.error(f"late /mapped-ip keys: {exc}")
            return 1
        _report_failure(ctx, exc)
        return 1
    finally:
        ctx.close()
