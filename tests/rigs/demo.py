"""The real job, in throwaway network namespaces: ``python -m tests.rigs.demo``
from a checkout, with the product installed in the running interpreter.

Builds the seed document's netvm (an uplink to 192.168.0.0/24 with a
default route, five guests on vif3.0 ... vif10.0), serves XenStore with the
project's own wire-protocol server, brings every vif online with the
installed ``vif-route-qubes`` exactly as libxl would call it, prints the
netvm's routing table in the seed's format, shows a guest's packet routed
and a forged one dropped, takes everything offline and deletes it all.
Needs root (network namespaces, iptables).
"""

import os
import sys
import tempfile

from . import routes
from .netns import UdpSink, World, _script, udp_send, without_idle_guard
from .xenstored import XenStored

SEED = [(4, "10.2.0.16"), (10, "10.2.0.7"), (9, "10.2.0.9"), (8, "10.2.0.8"), (3, "10.2.0.12")]


def say(text=""):
    print(text, flush=True)


def main(argv=None):
    if os.geteuid() != 0:
        say("tests.rigs.demo: needs root (it creates network namespaces and firewall rules)")
        return 1
    script = _script("vif-route-qubes")
    with tempfile.TemporaryDirectory(prefix="vrq-demo-") as tmp:
        server = XenStored(os.path.join(tmp, "xenstored.sock"))
        server.start()
        try:
            with World(server, tmp, gateway="10.2.0.1") as world:
                return _demo(world, script)
        finally:
            server.stop()


def _demo(world, script):
    say(f"XenStore: the project's wire-protocol server at {world.env['XENSTORED_PATH']}")
    say(f"netvm namespace {world.netvm.name}: uplink eth0 {world.UPLINK_NETVM}/24, "
        f"default route via {world.UPLINK_UPSTREAM}")
    # the seed's uplink route has metric 1
    world.netvm.ip("route", "replace", "192.168.0.0/24", "dev", "eth0", "metric", "1",
                   "proto", "kernel", "scope", "link", "src", world.UPLINK_NETVM)
    world.netvm.ip("route", "del", "192.168.0.0/24", "dev", "eth0", "metric", "0", check=False)
    guests = []
    for domid, addr in SEED:
        g = world.add_guest(domid, [addr])
        guests.append(g)
        res = world.hotplug(g, "online", cmd=script)
        status = world.xs.read(f"/local/domain/0/{g.xenbus_path}/hotplug-status")
        say(f"$ vif={g.vif} XENBUS_PATH={g.xenbus_path} vif-route-qubes online type_if=vif"
            f"  -> exit {res.returncode}, hotplug-status={status.decode() if status else None}")
        if res.returncode != 0:
            say(res.stderr.strip())
            return 1
    say("\nThe netvm's routing table (compare the seed document's):\n")
    say(routes.format_table(routes.table(world.netvm)))
    g = guests[-1]
    g.configure(gateway="10.2.0.1")
    say(f"\nGuest {g.vif} ({g.addresses[0]}) sends UDP to upstream {world.UPLINK_UPSTREAM}:")
    with UdpSink(world.upstream, world.UPLINK_UPSTREAM, 5353) as sink:
        udp_send(g.ns, world.UPLINK_UPSTREAM, 5353, "hello", src=g.addresses[0])
        ok = sink.got("hello", wait=1.5)
        say(f"  from its own address: {'arrived, source ' + sink.received[0][0] if ok else 'LOST'}")
        g.ns.ip("addr", "add", "10.2.0.99/32", "dev", "eth0")
        udp_send(g.ns, world.UPLINK_UPSTREAM, 5353, "forged", src="10.2.0.99")
        forged = sink.got("forged", wait=1.0)
        say(f"  from a forged address 10.2.0.99: {'ARRIVED (bad)' if forged else 'dropped at the netvm'}")
    say("\nAnti-spoofing rules of vif3.0 (raw table; vrq-guard is shared by every vif,")
    say("and its final DROP is the default deny for group 2):")
    for line in world.netvm.exec(["iptables-save", "-t", "raw"]).stdout.splitlines():
        if "vif3.0" in line or "vrq-guard" in line:
            say("  " + line)
    for g2 in guests:
        world.hotplug(g2, "offline", cmd=script)
    saved = world.netvm.exec(["iptables-save", "-t", "raw"]).stdout.splitlines()
    left = [line for line in without_idle_guard(saved) if "vrq" in line]
    say(f"\nAll five offline: {len(left)} rules of a vif left (the idle guard stays), routes left: "
        f"{sum(1 for r in routes.table(world.netvm) if r[7].startswith('vif'))}")
    say("Deleting the namespaces.")
    return 0 if ok and not forged and not left else 1


if __name__ == "__main__":
    sys.exit(main())
