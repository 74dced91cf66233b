"""``vif-route-qubes-keys netvm|guest DOMAIN``: the Qubes keys on plain Xen.

Writes the XenStore keys Qubes' toolstack would write (the netvm's
``qubes_netvm_*``, a guest's ``qubes_ip``...), owned by dom0 and readable
by that domain only, between ``xl create -p`` and ``xl unpause``.

A dom0 tool: it believes only what dom0 or libxl wrote (docs/configuration.md).
"""

import os
import sys

from . import validate
from .dom0_xs import GUEST_KEYS, NETVM_KEYS, Dom0Store, perms_for  # noqa: F401 - re-exported
from .errors import Failure, reported
from .log import Log
from .system import System

TAG = "vif-route-qubes-keys"


# ----------------------------------------------------------------------------
# Plan (pure)


def guest_keys(ip: str, gateway: str, dns) -> list:
    """(key, value) pairs for a guest's home, as qubes-setup-ip reads them."""
    pairs = [("qubes_ip", ip), ("qubes_netmask", "255.255.255.255"), ("qubes_gateway", gateway)]
    if dns:
        pairs.append(("qubes_primary_dns", dns[0]))
    if len(dns) > 1:
        pairs.append(("qubes_secondary_dns", dns[1]))
    return pairs


def netvm_keys(gateway: str, dns) -> list:
    pairs = [("qubes_netvm_gateway", gateway)]
    if dns:
        pairs.append(("qubes_netvm_primary_dns", dns[0]))
    if len(dns) > 1:
        pairs.append(("qubes_netvm_secondary_dns", dns[1]))
    return pairs


# ----------------------------------------------------------------------------
# Applying


class Ctx:
    def __init__(self, env, dry_run=False, verbose=False, out=None):
        self.env = os.environ if env is None else env
        self.dry_run = dry_run
        self.out = out or sys.stdout
        self.log = Log(TAG, env=self.env, verbose=verbose, stderr_only=dry_run)
        self.system = System(dry_run=dry_run, out=self.out, log=self.log, env=self.env)
        self.store = Dom0Store(self.env)

    def say(self, text):
        print(text, file=self.out)

    def close(self):
        self.store.close()
        self.log.close()


def write_keys(ctx, domid: int, pairs) -> None:
    home = f"/local/domain/{domid}"
    items = [(f"{home}/{k}", v) for k, v in pairs]
    if ctx.dry_run:
        for path, value in items:
            ctx.say(f"xenstore write {path} = {value} (perms {' '.join(perms_for(domid))})")
        return
    ctx.system.before_change(["xenstore-write", home])
    ctx.store.xs.write_many(items)
    for path, _ in items:
        ctx.store.set_perms(path, perms_for(domid))
    ctx.log.info("wrote " + ", ".join(f"{k}={v}" for k, v in pairs) + f" under {home}")


def keys_netvm(ctx, who, gateway, dns) -> int:
    domid, name = ctx.store.resolve(who)
    if domid == 0:
        raise Failure("dom0 is not a netvm here (in the dom0-backend layout write /local/domain/0 yourself)")
    gw = validate.gateway(gateway, "--gateway", 4)
    if gw is None:
        raise Failure("--gateway is required")
    servers = [str(validate.gateway(d, f"--dns{i}", 4)) for i, d in enumerate(dns, 1) if d]
    write_keys(ctx, domid, netvm_keys(str(gw), servers))
    return 0


def guest_backend(xs, domid, name):
    """(backend directory, backend domid) of guest ``domid``'s vif 0, from
    keys no guest can write: libxl's ``/libxl/G/device/vif/0/backend`` in
    dom0's private tree. Without it (a toolstack that does not keep it), the
    guest's own frontend directory, which a running guest can rewrite, is
    believed only where it names exactly the directory a backend keeps for
    this guest (``/local/domain/B/backend/vif/G/0``, with ``backend-id`` B)
    and that directory says it serves this guest (``frontend-id`` G)."""
    libxl = f"/libxl/{domid}/device/vif/0/backend"
    front = f"/local/domain/{domid}/device/vif/0"
    v = xs.read_many([libxl, f"{front}/backend", f"{front}/backend-id"])
    back, source = v[libxl], libxl
    if not back:
        back, source = v[f"{front}/backend"], f"{front}/backend"
        if not back or not v[f"{front}/backend-id"]:
            raise Failure(f"{name}: no vif 0 ({libxl} and {front}/backend missing)")
    parts = back.split("/")
    if (len(parts) != 8 or parts[:3] != ["", "local", "domain"] or parts[4:6] != ["backend", "vif"]
            or not parts[3].isdigit() or parts[6:] != [str(domid), "0"]):
        raise Failure(f"{name}: {source} is {back!r}, not /local/domain/B/backend/vif/{domid}/0; nothing written")
    bid = validate.domid(parts[3], source)
    if source != libxl:
        said = validate.domid(v[f"{front}/backend-id"], f"{front}/backend-id")
        served = xs.read(f"{back}/frontend-id")
        if said != bid or served != str(domid):
            raise Failure(f"{name}: its frontend directory ({front}, which the guest can write) names {back} "
                          f"and backend-id {said}, which that backend does not confirm; nothing written")
    return back, bid


def keys_guest(ctx, who) -> int:
    """A guest's keys from what dom0 already knows: its first vif's ``ip=``
    (in the backend's directory) and its netvm's gateway and nameservers."""
    domid, name = ctx.store.resolve(who)
    xs = ctx.store.xs
    back, bid = guest_backend(xs, domid, name)
    ipword = xs.read(f"{back}/ip")
    if not ipword:
        raise Failure(f"{name}: its vif has no ip= ({back}/ip missing)")
    ip = next((a for a in validate.addresses(ipword, f"{back}/ip") if a.version == 4), None)
    if ip is None:
        raise Failure(f"{name}: {back}/ip has no IPv4 address")
    values = ctx.store.netvm_values(bid)
    where = f"XenStore /local/domain/{bid}"
    gw = validate.gateway(values["qubes_netvm_gateway"], f"{where}/qubes_netvm_gateway", 4)
    if gw is None:
        raise Failure(f"{where}/qubes_netvm_gateway is missing (write the netvm's keys first)")
    dns = [str(a) for k in ("qubes_netvm_primary_dns", "qubes_netvm_secondary_dns")
           for a in [validate.gateway(values[k], f"{where}/{k}", 4)] if a is not None]
    write_keys(ctx, domid, guest_keys(str(ip), str(gw), dns))
    return 0


# ----------------------------------------------------------------------------
# click


ENV_HELP = """

\b
Environment:
  XENSTORED_PATH   XenStore socket (default /var/run/xenstored/socket)
  VIF_ROUTE_QUBES_DEBUG=1    debug logging on stderr (like -v)

\b
Exit status: 0 written, 1 error (a one-line reason; nothing written when the
input was bad).
"""


def _run(ctx_args, fn, *args):
    return reported(TAG, lambda: Ctx(**ctx_args), fn, *args)


def command():
    import click

    @click.group(TAG, help=(
        "Write the Qubes XenStore keys on plain Xen (no Qubes toolstack), readable by "
        "the domain only.\n\n"
        "Run in dom0 between 'xl create -p' and 'xl unpause': first for the netvm "
        "(qubes_netvm_gateway, qubes_netvm_primary_dns, qubes_netvm_secondary_dns, which "
        "vif-route-qubes and qubes-setup-dnat-to-ns read in the netvm), then for each guest "
        "(qubes_ip from its vif's ip=, qubes_netmask, qubes_gateway, qubes_primary_dns, "
        "qubes_secondary_dns from its netvm, which qubes-setup-ip reads in the guest). "
        "Each key gets the permissions n0 rDOMID: owned by dom0, read by the domain "
        "itself, by no other domain." + ENV_HELP),
        context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(package_name="vif-route-qubes", message="%(prog)s %(version)s")
    def group():
        pass

    @group.command("netvm", help="The netvm's keys: the guests' gateway and DNS1/DNS2.")
    @click.argument("domain")
    @click.option("--gateway", required=True, metavar="ADDR", help="The gateway address the netvm puts on each vif.")
    @click.option("--dns1", metavar="ADDR", help="DNS1 (virtual; the netvm DNATs it).")
    @click.option("--dns2", metavar="ADDR", help="DNS2.")
    @click.option("-n", "--dry-run", is_flag=True, help="Print the keys; write nothing.")
    @click.option("-v", "--verbose", is_flag=True, help="Log every action to stderr.")
    def netvm_cmd(domain, gateway, dns1, dns2, dry_run, verbose):
        _run(dict(env=None, dry_run=dry_run, verbose=verbose), keys_netvm, domain, gateway, [dns1, dns2])

    @group.command("guest", help="A guest's keys, from its vif's ip= and its netvm's keys.")
    @click.argument("domain")
    @click.option("-n", "--dry-run", is_flag=True, help="Print the keys; write nothing.")
    @click.option("-v", "--verbose", is_flag=True, help="Log every action to stderr.")
    def guest_cmd(domain, dry_run, verbose):
        _run(dict(env=None, dry_run=dry_run, verbose=verbose), keys_guest, domain)

    return group


def main(argv=None):
    command()(args=argv, prog_name=TAG)
