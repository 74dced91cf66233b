"""The firewall seam's contract (vif_route_qubes.firewall.backend_for), held
by both backends against the real iptables/nft in a network namespace:
apply's failure rule (a failed apply leaves the previous guard, or nothing
of ours), remove's report, addresses from the kernel alone, check's
verdicts. The backend object is driven inside the netvm namespace by a
small Python program, as the hotplug script drives it."""

import json
import os
import shutil
import sys

import pytest

from tests.rigs import faults

BOTH = pytest.mark.parametrize("world", ["iptables", "nft"], indirect=True)

DRIVE = r"""
import json, os, sys
from ipaddress import ip_address
from vif_route_qubes.errors import Failure
from vif_route_qubes.firewall import backend_for
from vif_route_qubes.plan import Vif
from vif_route_qubes.system import System
from tests.rigs import faults

def vif(addrs):
    return Vif(name="vif3.0", domid=3, addresses=tuple(ip_address(a) for a in addrs)) if addrs is not None else None

req = json.loads(sys.argv[1])
faults.install()
fw = backend_for(System(env=os.environ), os.environ)
out = {"name": fw.name}
try:
    if req["op"] == "apply":
        fw.apply(vif(req["vif"]), vif(req.get("previous")))
    elif req["op"] == "remove":
        out["removed"] = fw.remove("vif3.0")
    elif req["op"] == "addresses":
        out["addresses"] = sorted(str(a) for a in fw.addresses("vif3.0"))
    elif req["op"] == "check":
        out["check"] = fw.check(vif(req["vif"]), "vif3.0")
    out["ok"] = True
except Failure as exc:
    out["ok"], out["error"] = False, str(exc)
print(json.dumps(out))
"""


def drive(world, env=None, **req):
    env = dict(env or world.env)
    env["PYTHONPATH"] = faults.ROOT
    res = world.netvm.exec([sys.executable, "-c", DRIVE, json.dumps(req)], env=env, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def guard(world):
    """The vif's guard as the kernel has it, comparable."""
    snap = world.snapshot()
    return {k: snap[k] for k in ("iptables-save", "ip6tables-save", "nft-elements")}


OLD = ["10.137.0.12", "fd09:24ef:4179::a89:c"]
NEW = ["10.137.0.40", "fd09:24ef:4179::a89:f"]


@BOTH
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "replacing"])
def test_a_failed_apply_leaves_the_previous_guard(world, fresh):
    world.add_guest(3, OLD)
    if not fresh:
        assert drive(world, op="apply", vif=OLD)["ok"]
    before = guard(world)
    # the second change of the run fails: iptables' ip6tables-restore,
    # after iptables-restore succeeded (the nft backend has one transaction)
    n = "2" if world.firewall == "iptables" else "1"
    res = drive(world, env=dict(world.env, VIF_ROUTE_QUBES_FAIL_AT=n), op="apply", vif=NEW,
                previous=None if fresh else OLD)
    assert not res["ok"] and "injected fault" in res["error"]
    assert guard(world) == before


@pytest.mark.parametrize("world", ["nft"], indirect=True)
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "replacing"])
def test_nft_a_real_refused_transaction_leaves_the_previous_guard(world, fresh, tmp_path):
    """Not injected: an nft first on PATH lists as the real one does but
    refuses every transaction (``nft -f``), as the kernel refuses one that
    does not fit. Whatever the backend does next (a retry, a rebuild), the
    guard in the kernel is the one before."""
    world.add_guest(3, OLD)
    if not fresh:
        assert drive(world, op="apply", vif=OLD)["ok"]
    before = guard(world)
    real = shutil.which("nft")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nft").write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = -f ] && { cat >/dev/null; echo "nft: refused" >&2; exit 1; }; done\n'
        f'exec {real} "$@"\n')
    (bindir / "nft").chmod(0o755)
    env = dict(world.env, PATH=f"{bindir}:{os.environ['PATH']}")
    res = drive(world, env=env, op="apply", vif=NEW, previous=None if fresh else OLD)
    assert not res["ok"] and "refused" in res["error"], res
    assert guard(world) == before


@pytest.mark.parametrize("world", ["iptables"], indirect=True)
def test_iptables_a_real_ip6tables_failure_restores_the_ipv4_rules(world, tmp_path):
    """Not injected: ip6tables-restore refuses every variant (create,
    replace, rebuild); the IPv4 rules that were already in are put back."""
    world.add_guest(3, OLD)
    assert drive(world, op="apply", vif=OLD)["ok"]
    before = guard(world)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ip6tables-restore").write_text("#!/bin/sh\ncat >/dev/null\necho 'ip6tables-restore: refused' >&2\nexit 1\n")
    (bindir / "ip6tables-restore").chmod(0o755)
    env = dict(world.env, PATH=f"{bindir}:{os.environ['PATH']}")
    res = drive(world, env=env, op="apply", vif=NEW, previous=OLD)
    assert not res["ok"] and "ip6tables-restore" in res["error"]
    assert guard(world) == before
    assert shutil.which("ip6tables-restore")


@BOTH
def test_remove_says_what_it_removed_and_addresses_come_from_the_kernel(world):
    world.add_guest(3, OLD)
    assert drive(world, op="remove")["removed"] == []  # nothing there: nothing said
    assert drive(world, op="apply", vif=OLD)["ok"]
    assert drive(world, op="addresses")["addresses"] == sorted(OLD)
    removed = drive(world, op="remove")["removed"]
    assert removed and all("vif3.0" in r for r in removed)
    assert drive(world, op="addresses")["addresses"] == []
    assert drive(world, op="remove")["removed"] == []


@BOTH
def test_check_verdicts(world):
    world.add_guest(3, OLD)
    assert drive(world, op="apply", vif=OLD)["ok"]
    verdicts = drive(world, op="check", vif=OLD)["check"]
    assert verdicts and {v for v, _, _ in verdicts} == {"ok"}
    kinds = {item.split()[0] for _, item, _ in verdicts}
    assert kinds == ({"nft"} if world.firewall == "nft" else {"iptables", "ip6tables"})
    # expected other addresses: what is there is unexpected, what is not missing
    verdicts = drive(world, op="check", vif=NEW)["check"]
    assert {"missing", "unexpected"} <= {v for v, _, _ in verdicts}
    # nothing expected: everything of ours is unexpected
    verdicts = drive(world, op="check", vif=None)["check"]
    assert verdicts and {v for v, _, _ in verdicts} == {"unexpected"}


@BOTH
def test_a_bad_setting_refuses_online_cleanly_and_never_stops_offline(world):
    g = world.add_guest(3, OLD)
    before = world.snapshot()
    bad = g.env(VIF_ROUTE_QUBES_FIREWALL="pf")
    res = world.hotplug(g, "online", env=bad)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "VIF_ROUTE_QUBES_FIREWALL='pf'" in lines[0], res.stderr
    assert world.snapshot() == before
    assert world.hotplug(g, "online").returncode == 0
    res = world.hotplug(g, "offline", env=bad)
    assert res.returncode == 0, res.stderr
    after = world.snapshot()
    for key in ("iptables-save", "ip6tables-save", "nft-elements", "routes", "records"):
        assert after[key] == before[key], key
