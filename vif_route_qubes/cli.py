"""The click interface of vif-route-qubes: help, dry run, verbosity, status.

Xen's own calls (``online type_if=vif``) skip this module entirely; see
:func:`vif_route_qubes.entry.main`. Everything here ends in the same
:func:`vif_route_qubes.hotplug.run`.
"""

import os
import sys

import click

from . import hotplug
from .errors import Failure

ENV_HELP = """

\b
Environment (as libxl and udev set it):
  vif            the backend interface, vifDOMID.DEVID (vifD.N-emu for type_if=tap)
  XENBUS_PATH    the device's XenStore directory, backend/vif/DOMID/DEVID
                 (relative to this domain's home) or absolute
  type_if        vif (default) or tap; also accepted as a type_if= word
  XENSTORED_PATH XenStore socket (default /var/run/xenstored/socket, else
                 /dev/xen/xenbus)
  PATH           searched for ip, iptables-restore, nft, conntrack; then
                 /usr/sbin, /sbin, /usr/local/sbin (libxl's PATH is short)
  VIF_ROUTE_QUBES_STATE_DIR   state records (default /run/vif-route-qubes)
  VIF_ROUTE_QUBES_LOCK        lock file (default STATE_DIR/lock)
  VIF_ROUTE_QUBES_LOCK_TIMEOUT  seconds to wait for the lock (default 20)
  VIF_ROUTE_QUBES_HOOKS_DIR   hooks (default /rw/config/network-hooks.d)
  VIF_ROUTE_QUBES_CONFIG      xenstore, qubesdb or auto (default): where the
                              netvm's own values come from; auto is QubesDB
                              where its daemon answers
  VIF_ROUTE_QUBES_QUBESDB_SOCKET  QubesDB socket (default /var/run/qubes/qubesdb.sock)
  VIF_ROUTE_QUBES_FIREWALL    iptables, nft or auto (default): the firewall
                              backend; auto is nft where the nft command exists
  VIF_ROUTE_QUBES_IPTABLES    nft or legacy: which iptables commands the
                              iptables backend runs
  VIF_ROUTE_QUBES_XS_TIMEOUT  seconds to wait for XenStore (default 10)
  VIF_ROUTE_QUBES_IFACE_WAIT  seconds online waits for the interface to
                              appear (default 5)
  VIF_ROUTE_QUBES_MAPPED_WAIT seconds a watch left by online waits for
                              /mapped-ip keys that are not there yet
                              (default 60; 0: no watch)
  VIF_ROUTE_QUBES_DEBUG=1     debug logging on stderr (like -v)
  VIF_ROUTE_QUBES_SYSLOG      syslog socket (default /dev/log)
  VIF_ROUTE_QUBES_HOTPLUG_LOG hotplug log (default /var/log/xen/xen-hotplug.log)

\b
XenStore keys read:
  $XENBUS_PATH/ip          guest addresses, space separated (IPv4/IPv6);
                           absent: the vif comes up with everything from it dropped
  $XENBUS_PATH/mac         guest MAC address
  $XENBUS_PATH/vifname     optional: rename the interface to this first
  $XENBUS_PATH/type        vif or vif_ioemu (passed to hooks)
  $XENBUS_PATH/frontend-id guest domain id (checked against the path)
  qubes_netvm_gateway      optional: gateway address put on the vif as /32
  qubes_netvm_gateway6     optional: IPv6 gateway (/128 and proxy_ndp)
  qubes-service/harden-network-interfaces
                           optional switch: Qubes' hardening sysctls for the vif
  (from QubesDB, the netvm's three as /qubes-netvm-gateway, ...)

\b
QubesDB keys read (configuration qubesdb only):
  /mapped-ip/REAL/visible-ip, /mapped-ip/REAL/visible-gateway
                           optional, per guest address REAL: the guest lives
                           with the visible address behind a NAT namespace
                           VIF-nat (a disposable's mapped address)
"""

WRITTEN_HELP = """
\b
XenStore keys written, only into an existing $XENBUS_PATH that belongs to
vif (otherwise the reason goes to stderr and syslog only):
  $XENBUS_PATH/hotplug-status  connected, or error on failure
  $XENBUS_PATH/hotplug-error   the one-line reason of a failure
"""

OFFLINE_WRITTEN_HELP = """
offline writes nothing to XenStore (libxl removes the backend directory
itself). It removes whatever of ours the kernel shows on the interface,
whatever the state record says; if a tool is missing it removes what it
can and keeps the state record for a later offline.
"""

MAN_SECTIONS = {
    "EXIT STATUS": "\b\n"
    "0    done; offline and remove always exit 0 for what they find on the host\n"
    "     (what they could not remove is named on stderr), and so does a\n"
    "     command that does not apply to type_if (add for a vif, ...)\n"
    "1    online failed (the reason on stderr, and in hotplug-error when\n"
    "     $XENBUS_PATH belongs to vif); the host is as it was before; or status\n"
    "     found something not ok\n"
    "2    usage error in the interactive form (unknown option, a word that is\n"
    "     not key=value after the command); the form Xen uses exits 1",
    "FILES": "\b\n"
    "/run/vif-route-qubes/VIF.json   state record: what online made (VIF_ROUTE_QUBES_STATE_DIR)\n"
    "/run/vif-route-qubes/lock       host lock shared with qubes-setup-dnat-to-ns\n"
    "/rw/config/network-hooks.d/     hooks run as HOOK online|offline VIF TYPE [ADDR]\n"
    "/var/log/xen/xen-hotplug.log    info and error lines, when the directory exists\n"
    "/etc/xen/scripts/vif-route-qubes  the drop-in libxl runs (script=vif-route-qubes)",
}


FIREWALL_HELP = ("Firewall backend: iptables (a chain pair per vif), nft (Qubes' table "
                 "'qubes' with sets; per-packet cost flat in the number of guests) or auto "
                 "(nft where the nft command exists). Default: $VIF_ROUTE_QUBES_FIREWALL, else auto.")


def _firewall_option(f):
    return click.option("--firewall", type=click.Choice(["iptables", "nft", "auto"]), default=None,
                        help=FIREWALL_HELP)(f)


def _common(f):
    f = _firewall_option(f)
    f = click.option("-n", "--dry-run", is_flag=True,
                     help="Print exactly what would be run and written; change nothing.")(f)
    f = click.option("-v", "--verbose", is_flag=True, help="Log every action to stderr.")(f)
    return f


@click.group(
    help="Routed, spoof-proof networking for a Xen guest interface, run by "
    "Xen as a vif hotplug script (script=vif-route-qubes).\n\n"
    "Xen runs it as: vif-route-qubes online|offline [type_if=vif] [key=value ...]\n\n"
    "Logging: each run logs one debug line per action (with each payload line) and "
    "one info summary line to syslog (facility daemon, tag vif-route-qubes), appends "
    "info and error lines to the hotplug log when its directory exists, and prints "
    "errors, naming the failing command and its stderr, on stderr; -v or "
    "VIF_ROUTE_QUBES_DEBUG=1 put everything on stderr. A dry run (-n) prints the "
    "ip batch, firewall payloads, conntrack calls and XenStore writes in the order a "
    "real run applies them, and logs nothing but to stderr."
    + ENV_HELP + WRITTEN_HELP,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="vif-route-qubes", message="%(prog)s %(version)s")
def vif_route_qubes():
    pass


def _hotplug_command(name, summary, written):
    @vif_route_qubes.command(
        name,
        help=summary + "\n\nWORDS are key=value settings as Xen passes them (type_if=vif, "
        "and ip=, mac=, vifname=, type= to override the XenStore values)." + ENV_HELP + written,
        context_settings={"max_content_width": 100},
    )
    @click.argument("words", nargs=-1)
    @_common
    def command(words, dry_run, verbose, firewall):
        try:
            cmd, variables = hotplug.parse_words(list(words))
        except Failure as exc:
            raise click.UsageError(str(exc))
        if cmd is not None:
            raise click.UsageError(f"unexpected word {cmd!r}: only key=value words follow the command")
        from .log import Log

        # a dry run leaves no trace anywhere, logs included: stderr only
        log = Log("vif-route-qubes", os.environ, verbose=verbose, stderr_only=dry_run)
        if dry_run:
            click.echo(f"# vif-route-qubes {name} (dry run: nothing is changed)")
        sys.exit(hotplug.run(name, variables, os.environ, dry_run=dry_run, log=log, firewall=firewall))

    return command


_hotplug_command("online", "Set up the routed interface (or converge it to exactly its inputs) and report "
                 "hotplug-status=connected; on failure leave the host as it was.", WRITTEN_HELP)
_hotplug_command("offline", "Remove everything of ours from the interface (never fails).", OFFLINE_WRITTEN_HELP)
_hotplug_command("add", "online, for an emulated NIC (type_if=tap).", WRITTEN_HELP)
_hotplug_command("remove", "offline, for an emulated NIC (type_if=tap).", OFFLINE_WRITTEN_HELP)


STATUS_HELP = """Compare what each vif should have with what the kernel has.

Without VIF: every vif with a state record, every interface in group 2,
every interface that has firewall rules or set elements of ours, and every
vifD.N interface that still carries a host route, gateway address,
permanent neighbour entry or proxy_arp of ours. VIF is the interface's
name (the original vifD.N name works for a renamed one).

A vif that nothing (no state record, no XenStore entry) says should be
configured gets every piece of ours the kernel shows listed as unexpected:
group 2, routes, gateway addresses, neighbour entries, proxy_arp/proxy_ndp,
the link being up alongside them, and the firewall's rules: what offline
would remove.

Should have: the state record (what online was given) and XenStore
($XENBUS_PATH/ip, mac, hotplug-status, hotplug-error; qubes_netvm_gateway,
qubes_netvm_gateway6), side by side. XenStore unreachable is noted, not an
error: the record alone is used then.

Has: routes with metric 32752-domid, the gateway /32 (/128) address,
permanent neighbour entries with the guest's MAC, link up, group 2,
proxy_arp (proxy_ndp), and the firewall: with the iptables backend the
vrq- chains (rules compared in order), their jumps and the guard chain
vrq-guard (its PREROUTING jump, its final DROP: the default deny) in the
raw table of both families; with the nft backend the elements of the sets allowed and
downstream of tables ip/ip6 qubes and the rules they depend on. The other
backend's rules for the vif are listed as unexpected, and so is its default
deny left on the host (vrq-guard without a goto for the vif, or tables
ip/ip6 qubes without its addresses in allowed): it drops the guest's
traffic, and the line says how to remove it (one ip -j -batch and
the backend's reads, iptables-save -t raw of both families or nft -j list;
nothing is changed). The first lines say which backend and why.

Every line is marked ok, missing or unexpected; --problems prints only the
lines that are not. Exit status: 0 when all lines are ok, 1 otherwise, 2 for
a usage error. Works inside ip netns exec.

\b
Environment:
  VIF_ROUTE_QUBES_STATE_DIR   state records (default /run/vif-route-qubes)
  XENSTORED_PATH              XenStore socket (default /var/run/xenstored/socket,
                              else /dev/xen/xenbus)
  VIF_ROUTE_QUBES_XS_TIMEOUT  seconds to wait for XenStore (default 3 here)
  VIF_ROUTE_QUBES_FIREWALL    iptables, nft or auto (default): the backend to check
  VIF_ROUTE_QUBES_IPTABLES    nft or legacy: which iptables commands to read
  VIF_ROUTE_QUBES_DEBUG=1     debug logging on stderr (like -v)
"""


@vif_route_qubes.command("status", help=STATUS_HELP, context_settings={"max_content_width": 100})
@click.argument("vifs", nargs=-1, metavar="[VIF]...")
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON (same checks, same exit status).")
@click.option("-p", "--problems", is_flag=True,
              help="Show only the lines that are not ok, and the vifs they belong to (same exit status).")
@click.option("-v", "--verbose", is_flag=True, help="Log every query to stderr.")
@_firewall_option
def status(vifs, as_json, problems, verbose, firewall):
    from . import status as st
    from .log import Log

    log = Log("vif-route-qubes", os.environ, verbose=verbose, stderr_only=True)
    try:
        code = st.main(list(vifs), os.environ, as_json=as_json, log=log, firewall=firewall, problems=problems)
    except Failure as exc:
        log.error(str(exc))
        code = 1
    finally:
        log.close()
    sys.exit(code)
