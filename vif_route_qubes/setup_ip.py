"""qubes-setup-ip: the guest side of Qubes' routed networking.

udev runs it in a guest when a Xen network interface (xen-netfront) appears
(etc/udev/rules.d/99-qubes-setup-ip.rules). It reads the guest's own
configuration from its XenStore home in one round trip and makes the
interface look like the plan says:

* the address (``/32`` for Qubes' usual netmask 255.255.255.255), link up;
* a host route to the gateway and the default route via it (``onlink``: the
  gateway is not inside a /32, the netvm answers ARP for it on the vif);
* IPv6 address and routes when ``qubes_ip6`` is given;
* ``/etc/resolv.conf`` naming the two virtual nameservers DNS1/DNS2 (the
  netvm DNATs them to the real ones), written atomically;
* the change hook (``/rw/config/qubes-ip-change-hook``), only when something
  actually changed, so a re-run (udev "change", a manual run) is silent.

Plan, then apply: :func:`guest_net` validates the XenStore values into plain
data, :func:`render_batch` / :func:`render_resolv` turn it into text, and
:func:`run` applies that with one ``ip -batch -`` (``replace`` verbs, so a
re-run is harmless) and one rename. Whether anything changes is decided from
one read-only probe (``ip -j addr show``) and ``/proc/net/*route``; when the
interface is already as planned no batch runs at all.

``main()`` takes the fast path (no click import) for udev's plain call
``qubes-setup-ip [INTERFACE]``; options go through click, into the same
:func:`run`.
"""

import os
import sys
from collections import namedtuple

from . import validate
from .errors import Failure
from .log import Log
from .system import System

TAG = "qubes-setup-ip"
DEFAULT_INTERFACE = "eth0"
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
DEFAULT_HOOK = "/rw/config/qubes-ip-change-hook"
DEFAULT_NETMASK = "255.255.255.255"

# Relative keys: resolved under the guest's own /local/domain/<domid>.
KEYS = (
    "qubes_ip", "qubes_netmask", "qubes_gateway", "qubes_primary_dns",
    "qubes_secondary_dns", "qubes_ip6", "qubes_gateway6",
)

ENV_HELP = """

\b
Environment:
  INTERFACE        the interface when none is given (udev sets it); default eth0
  XENSTORED_PATH   XenStore socket (default /var/run/xenstored/socket if it
                   exists, else /dev/xen/xenbus)
  QUBES_SETUP_IP_RESOLV_CONF  default for --resolv-conf (/etc/resolv.conf)
  QUBES_SETUP_IP_HOOK         default for --hook (/rw/config/qubes-ip-change-hook)
  VIF_ROUTE_QUBES_XS_TIMEOUT  seconds to wait for XenStore (default 10)
  VIF_ROUTE_QUBES_DEBUG=1     debug logging on stderr (like -v)

\b
XenStore keys read (relative to this domain's home, one round trip):
  qubes_ip             IPv4 address; absent: nothing to do (exit 0)
  qubes_netmask        netmask (default 255.255.255.255, i.e. /32)
  qubes_gateway        gateway: host route + default route via it (onlink)
  qubes_primary_dns    DNS1 (default: the gateway)
  qubes_secondary_dns  DNS2 (optional)
  qubes_ip6            optional IPv6 address (/128)
  qubes_gateway6       optional IPv6 gateway: host route + default route

\b
Exit status: 0 configured (or nothing to do), 1 error (nothing changed when
the input was bad).
"""


# The guest's network configuration, validated. (namedtuple, not a
# dataclass: ``dataclasses`` pulls in ``inspect`` and ``ast``, a few ms of a
# run whose whole budget is start-up time.)
GuestNet = namedtuple("GuestNet", "ip prefix gateway dns ip6 gateway6", defaults=(None, (), None, None))


# ----------------------------------------------------------------------------
# Plan (pure)


def netmask_prefix(value: str, what: str = "XenStore qubes_netmask") -> int:
    """A dotted IPv4 netmask -> prefix length; refuses non-contiguous masks
    (255.0.255.0), prefix notation and 0.0.0.0 (a guest on "every" network
    would ARP for the whole internet)."""
    import ipaddress

    text = (value or "").strip()
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        raise Failure(f"{what}: {text[:40]!r} is not a dotted netmask (like 255.255.255.255)")
    try:
        number = int(ipaddress.IPv4Address(text))
    except ValueError:
        raise Failure(f"{what}: {text[:40]!r} is not a dotted netmask (like 255.255.255.255)") from None
    inverted = ~number & 0xFFFFFFFF
    if inverted & (inverted + 1):  # host bits must be a run of ones
        raise Failure(f"{what}: {text} is not a contiguous netmask")
    prefix = 32 - inverted.bit_length()
    if prefix == 0:
        raise Failure(f"{what}: {text} would put every address on the local link")
    return prefix


def _address(value, what, version):
    addr = validate.gateway(value, what, version)  # one address of that family, host-usable
    if addr is None:
        raise Failure(f"{what}: empty")
    return addr


def _nameserver(value, what):
    found = validate.addresses(value, what)
    if len(found) != 1:
        raise Failure(f"{what}: {value.strip()[:60]!r} is more than one address")
    return found[0]


def guest_net(values: dict):
    """XenStore values (None when absent) -> :class:`GuestNet`, or None when
    there is no ``qubes_ip`` (not a networked guest). Raises Failure."""
    raw_ip = values.get("qubes_ip")
    if raw_ip is None or not raw_ip.strip():
        return None
    ip = _address(raw_ip, "XenStore qubes_ip", 4)
    mask = values.get("qubes_netmask")
    prefix = netmask_prefix(DEFAULT_NETMASK if mask in (None, "") else mask)
    if prefix < 31:
        import ipaddress

        net = ipaddress.IPv4Network(f"{ip}/{prefix}", strict=False)
        if ip in (net.network_address, net.broadcast_address):
            raise Failure(f"XenStore qubes_ip: {ip} is the network or broadcast address of {net}")
    gw = validate.gateway(values.get("qubes_gateway"), "XenStore qubes_gateway", 4)
    if gw is not None and gw == ip:
        raise Failure(f"XenStore qubes_gateway: {gw} is the guest's own address")
    dns = []
    primary = values.get("qubes_primary_dns")
    if primary not in (None, ""):
        dns.append(_nameserver(primary, "XenStore qubes_primary_dns"))
    elif gw is not None:
        dns.append(gw)
    secondary = values.get("qubes_secondary_dns")
    if secondary not in (None, ""):
        second = _nameserver(secondary, "XenStore qubes_secondary_dns")
        if second not in dns:
            dns.append(second)
    ip6 = validate.gateway(values.get("qubes_ip6"), "XenStore qubes_ip6", 6)
    gw6 = validate.gateway(values.get("qubes_gateway6"), "XenStore qubes_gateway6", 6)
    if gw6 is not None and ip6 is None:
        raise Failure("XenStore qubes_gateway6 is set but qubes_ip6 is not")
    return GuestNet(ip=ip, prefix=prefix, gateway=gw, dns=tuple(dns), ip6=ip6, gateway6=gw6)


def render_batch(net: GuestNet, ifname: str, ipv6: bool = True, stale=()) -> list:
    """``ip -batch`` lines. Address first, then stale addresses out (after
    the new one is in, so the interface is never without one), then link up
    (IPv4 routes on a down link fail with ENETDOWN), then routes."""
    n = ifname
    lines = [f"addr replace {net.ip}/{net.prefix} dev {n}"]
    if net.ip6 is not None and ipv6:
        # The address is dom0's to give and unique by construction; DAD would
        # only keep it unusable for a second after every boot.
        lines.append(f"addr replace {net.ip6}/128 dev {n} nodad")
    lines += [f"addr del {a} dev {n}" for a in stale]
    lines.append(f"link set dev {n} up")
    if net.gateway is not None:
        lines.append(f"route replace {net.gateway}/32 dev {n} scope link")
        lines.append(f"route replace default via {net.gateway} dev {n} onlink")
    if net.gateway6 is not None and ipv6:
        lines.append(f"route replace {net.gateway6}/128 dev {n}")
        # "::/0", not "default": a batch line cannot carry -6, the prefix
        # tells ip the family.
        lines.append(f"route replace ::/0 via {net.gateway6} dev {n} onlink")
    return lines


def render_resolv(net: GuestNet) -> str:
    lines = ["# Written by qubes-setup-ip from XenStore (qubes_primary_dns, qubes_secondary_dns)."]
    lines += [f"nameserver {a}" for a in net.dns]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# What is there now (read-only)


# What the interface has now: ``up``; ``addresses`` ("10.137.0.12/32", ...,
# scope global, not dynamic); ``routes4`` {(dest, mask, gateway, metric)} and
# ``routes6`` {(dest, plen, nexthop, metric)} of this interface.
Current = namedtuple("Current", "up addresses routes4 routes6")


def _hex4(text):
    import ipaddress

    return ipaddress.IPv4Address(int.from_bytes(bytes.fromhex(text), "little"))


def _routes4(proc_text: str, ifname: str) -> frozenset:
    found = set()
    for line in proc_text.splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[0] == ifname:
            found.add((_hex4(f[1]), _hex4(f[7]), _hex4(f[2]), int(f[6])))
    return frozenset(found)


def _routes6(proc_text: str, ifname: str) -> frozenset:
    import ipaddress

    found = set()
    for line in proc_text.splitlines():
        f = line.split()
        if len(f) >= 10 and f[9] == ifname:
            found.add((ipaddress.IPv6Address(int(f[0], 16)), int(f[1], 16),
                       ipaddress.IPv6Address(int(f[4], 16)), int(f[5], 16)))
    return frozenset(found)


def probe(s: System, ifname: str) -> Current:
    return probe_result(probe_start(s, ifname), ifname)


def probe_start(s: System, ifname: str):
    """Start the read-only ``ip`` probe; it runs while XenStore is read."""
    return s.start(["ip", "-j", "addr", "show", "dev", ifname], readonly=True)


def probe_result(started, ifname: str) -> Current:
    import json

    res = started.wait()
    try:
        link = json.loads(res.stdout)[0]
    except (ValueError, IndexError):
        raise Failure(f"ip -j addr show dev {ifname}: unexpected output") from None
    addresses = tuple(
        f"{a['local']}/{a['prefixlen']}"
        for a in link.get("addr_info", ())
        if a.get("scope") == "global" and a.get("family") in ("inet", "inet6") and not a.get("dynamic")
    )
    return Current(
        up="UP" in link.get("flags", ()),
        addresses=addresses,
        routes4=_routes4(System.read("/proc/net/route", ""), ifname),
        routes6=_routes6(System.read("/proc/net/ipv6_route", ""), ifname),
    )


def stale_addresses(net: GuestNet, current: Current, ipv6: bool) -> tuple:
    """Global addresses left on the interface from an earlier configuration
    (a changed qubes_ip): they would keep answering for the old address."""
    import ipaddress

    wanted = {f"{net.ip}/{net.prefix}"}
    if net.ip6 is not None and ipv6:
        wanted.add(f"{net.ip6}/128")
    stale = []
    for a in current.addresses:
        iface = ipaddress.ip_interface(a)
        if f"{iface.ip}/{iface.network.prefixlen}" not in wanted:
            stale.append(a)
    return tuple(stale)


def in_place(net: GuestNet, current: Current, ipv6: bool) -> bool:
    """Whether the interface already is exactly as the batch would make it."""
    import ipaddress

    if not current.up or stale_addresses(net, current, ipv6):
        return False
    have = set(current.addresses)
    if f"{net.ip}/{net.prefix}" not in have:
        return False
    any4 = ipaddress.IPv4Address(0)
    if net.gateway is not None:
        host = (net.gateway, ipaddress.IPv4Address("255.255.255.255"), any4, 0)
        default = (any4, any4, net.gateway, 0)
        if host not in current.routes4 or default not in current.routes4:
            return False
    if net.ip6 is not None and ipv6:
        if f"{net.ip6}/128" not in have:
            return False
        if net.gateway6 is not None:
            any6 = ipaddress.IPv6Address(0)
            r = current.routes6
            # the kernel reports a route without metric as 1024 for IPv6
            if not any(d == net.gateway6 and p == 128 and h == any6 for d, p, h, _ in r):
                return False
            if not any(d == any6 and p == 0 and h == net.gateway6 for d, p, h, _ in r):
                return False
    return True


# ----------------------------------------------------------------------------
# Apply


def _prepare_file(s: System, path: str, text: str):
    """Write ``text`` to a temporary file next to ``path`` (same file
    system, so the rename is atomic: a resolver never reads half a file).
    Returns the temporary name; done before anything else changes, so an
    unwritable directory fails the run with nothing changed."""
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    s.fault_point(["write", path])
    try:
        fd, tmp = tempfile.mkstemp(prefix=".qubes-setup-ip.", dir=directory)
    except OSError as exc:
        raise Failure(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except OSError as exc:
        _discard(tmp)
        raise Failure(f"cannot write {path}: {exc.strerror}") from None
    return tmp


def _discard(tmp):
    try:
        os.unlink(tmp)
    except OSError:
        pass


def _run_hook(s: System, log: Log, hook: str):
    if not (hook and os.path.isfile(hook) and os.access(hook, os.X_OK)):
        log.debug(f"no executable hook at {hook}")
        return
    try:
        s.run([hook])
        log.debug(f"hook {hook} done")
    except Failure as exc:
        log.warning(f"hook {hook} failed (ignored): {exc}")


def run(interface=None, env=None, dry_run=False, resolv_conf=None, hook=None, log=None, out=None) -> int:
    """One run -> exit status (0 configured / nothing to do, 1 failed)."""
    env = os.environ if env is None else env
    log = log or Log(TAG, env)
    s = System(dry_run=dry_run, out=out, log=log, env=env)
    try:
        return _run(s, log, interface, env, resolv_conf, hook)
    except Failure as exc:
        log.error(str(exc))
        return 1
    finally:
        log.close()


def _run(s, log, interface, env, resolv_conf, hook) -> int:
    name = interface or env.get("INTERFACE") or DEFAULT_INTERFACE
    name = validate.ifname(name, "interface")
    resolv_conf = resolv_conf or env.get("QUBES_SETUP_IP_RESOLV_CONF") or DEFAULT_RESOLV_CONF
    hook = hook if hook is not None else (env.get("QUBES_SETUP_IP_HOOK") or DEFAULT_HOOK)

    exists = s.iface_exists(name)
    started = probe_start(s, name) if exists else None
    try:
        from .xs import XenStore

        with XenStore(env) as xs:
            values = xs.read_many(KEYS)
    except BaseException:
        if started:
            started.wait(check=False)  # leave nothing running behind us
        raise
    current = probe_result(started, name) if started else None
    log.debug("xenstore: " + " ".join(f"{k}={values[k]}" for k in KEYS if values[k] is not None))
    net = guest_net(values)
    if net is None:
        log.info(f"{name}: no qubes_ip in XenStore, nothing to configure")
        return 0
    if not exists:
        raise Failure(f"interface {name} does not exist")
    ipv6 = System.ipv6_enabled(name)
    if net.ip6 is not None and not ipv6:
        log.info(f"IPv6 is disabled on {name}: qubes_ip6 {net.ip6} is not configured")

    batch = render_batch(net, name, ipv6, stale_addresses(net, current, ipv6))
    link_changes = not in_place(net, current, ipv6)
    text = render_resolv(net) if net.dns else None
    if text is None:
        log.info("no nameserver (neither qubes_primary_dns nor qubes_gateway): resolv.conf left alone")
    dns_changes = text is not None and System.read(resolv_conf) != text

    if s.dry_run:
        print(f"# {TAG} {name} (dry run: nothing is changed)", file=s.out)
    tmp = None
    try:
        if dns_changes and not s.dry_run:
            tmp = _prepare_file(s, resolv_conf, text)
        if link_changes:
            s.run(["ip", "-batch", "-"], "".join(line + "\n" for line in batch))
        else:
            s.note(f"{name} already has its address and routes: no ip batch to run")
        if dns_changes:
            if s.dry_run:
                print(f"$ write {resolv_conf} (temporary file + rename) <<'EOF'\n{text}EOF", file=s.out)
            else:
                try:
                    os.replace(tmp, resolv_conf)
                except OSError as exc:
                    raise Failure(f"cannot write {resolv_conf}: {exc.strerror}") from None
                tmp = None
        elif text is not None:
            s.note(f"{resolv_conf} already names {' '.join(map(str, net.dns))}: not rewritten")
    finally:
        if tmp:
            _discard(tmp)

    what = f"{net.ip}/{net.prefix}" + (f" via {net.gateway}" if net.gateway else "")
    what += f" {net.ip6}/128" if net.ip6 is not None and ipv6 else ""
    if link_changes or dns_changes:
        log.info(f"{name}: configured {what}, nameservers {' '.join(map(str, net.dns)) or 'none'}")
        _run_hook(s, log, hook)
    else:
        log.info(f"{name}: unchanged ({what})")
    return 0


# ----------------------------------------------------------------------------
# Entry points

_command = None


def command():
    """The click command (built on first use: the fast path never imports click)."""
    global _command
    if _command is not None:
        return _command
    import click

    @click.command(
        help="Configure this guest's Xen network interface from XenStore: address, "
        "gateway and default route, IPv6, /etc/resolv.conf, then run the change hook "
        "if anything changed. udev runs it as: qubes-setup-ip INTERFACE." + ENV_HELP,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )
    @click.argument("interface", required=False)
    @click.option("-n", "--dry-run", is_flag=True,
                  help="Print the ip batch and the resolv.conf text it would write; change nothing.")
    @click.option("-v", "--verbose", is_flag=True, help="Log every action to stderr.")
    @click.option("--resolv-conf", metavar="PATH", default=None,
                  help=f"resolv.conf to write (default {DEFAULT_RESOLV_CONF}).")
    @click.option("--hook", metavar="PATH", default=None,
                  help=f"executable run after a change (default {DEFAULT_HOOK}; '' for none).")
    @click.version_option(package_name="vif-route-qubes", message="%(prog)s %(version)s")
    def setup_ip(interface, dry_run, verbose, resolv_conf, hook):
        log = Log(TAG, os.environ, verbose=verbose)
        sys.exit(run(interface, os.environ, dry_run=dry_run, resolv_conf=resolv_conf, hook=hook, log=log))

    _command = setup_ip
    return _command


def _plain_form(argv) -> bool:
    return len(argv) == 0 or (len(argv) == 1 and not argv[0].startswith("-"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # click's shell completion calls the program with no arguments and this
    # variable set: it must reach click, not configure the interface.
    if _plain_form(argv) and "_QUBES_SETUP_IP_COMPLETE" not in os.environ:
        sys.exit(run(argv[0] if argv else None, os.environ))
    command().main(args=argv, prog_name=TAG)
