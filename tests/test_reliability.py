"""Reliability of vif-route-qubes with the real commands in network
namespaces: hotplug storms, XenStore vanishing under a guest, a failure
injected at every step of ``online``, a real failure half-way, and a lock
held by someone else. The promise under test, every time: nothing lost,
nothing left behind."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from tests.rigs.netns import _script, add_vif_guests, comparable, nft_state
from vif_route_qubes.plan import LINK_ICMP6_TYPES

SCRIPT = _script("vif-route-qubes")
DNAT = _script("qubes-setup-dnat-to-ns")
HAVE_DNAT = importlib.util.find_spec("vif_route_qubes.dnat") is not None


def xs_value(world, guest, key):
    value = world.xs.read(f"/local/domain/0/{guest.xenbus_path}/{key}")
    return value.decode() if value is not None else None


def records(world):
    d = world.env["VIF_ROUTE_QUBES_STATE_DIR"]
    return sorted(f for f in os.listdir(d) if f.endswith(".json")) if os.path.isdir(d) else []


def files_left(world):
    """Everything in the state dir but what belongs to the host, not to a
    vif: the host lock (an empty file every later run opens again; deleting
    it would race them) and the kernel's flowtable verdict. A gone vif
    leaves neither its record nor its lock file."""
    d = world.env["VIF_ROUTE_QUBES_STATE_DIR"]
    host = {"lock", "flowtable-unsupported"}
    return sorted(f for f in os.listdir(d) if f not in host) if os.path.isdir(d) else []


def start(world, guest, command, env=None):
    return world.netvm.popen([SCRIPT, command, "type_if=vif"], env=env or guest.env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs, timeout=120):
    """Wait for every process; -> [(returncode, stderr)]."""
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


# ----------------------------------------------------------------------------
# Storm


STORM = 64
CYCLES = 3


def storm_addresses(domid):
    v4 = f"10.137.{domid // 200}.{domid % 200 + 2}"
    return [v4, f"fd09:24ef:4179::{domid:x}"] if domid % 2 else [v4]


class DnatLoop:
    """qubes-setup-dnat-to-ns run over and over in the netvm while the
    storm goes on: it changes the nat table under the same lock."""

    def __init__(self, world):
        self.world, self.stop, self.results = world, threading.Event(), []
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self.stop.is_set():
            res = self.world.netvm.exec([DNAT], check=False, env=dict(self.world.env))
            self.results.append((res.returncode, res.stderr))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)


def wanted_nft_elements(guests) -> set:
    """The elements the nft backend gives these vifs, as
    :func:`check_nft_elements` compares them."""
    want = set()
    for g in guests:
        want.add(f'ip vrq-guarded "{g.vif}"')
        for a in g.addresses:
            fam = "ip6" if ":" in a else "ip"
            want.add(f'{fam} allowed {{"concat": ["{g.vif}", "{a}"]}}')
            want.add(f'{fam} downstream "{a}"')
        if any(":" in a for a in g.addresses):
            want.add(f'ip6 vrq-nd-mld "{g.vif}"')
    return want


def check_nft_elements(world, guests, skip=()):
    """Every vif: exactly its elements in the qubes sets, nothing else (but
    in the sets named in ``skip``)."""
    want = wanted_nft_elements(guests)
    have = []
    for item in json.loads(world.netvm.exec(["nft", "-j", "list", "sets"]).stdout)["nftables"]:
        st = item.get("set")
        if st and st["table"] == "qubes" and st["name"] not in skip:
            have += [f"{st['family']} {st['name']} {json.dumps(e)}" for e in st.get("elem", [])]
    assert len(have) == len(set(have))
    assert set(have) == want, (sorted(set(have) - want)[:5], sorted(want - set(have))[:5])


def check_all_rules(world, guests):
    """Every vif: both chains and both jumps exactly once in both families
    (nft: exactly its set elements), its address rules exactly once, its
    routes and neighbour entries."""
    if world.firewall == "nft":
        check_nft_elements(world, guests)
    for version, tool in ((4, "iptables-save"), (6, "ip6tables-save")):
        if world.firewall == "nft":
            assert "vrq" not in world.netvm.exec([tool, "-t", "raw"]).stdout
            continue
        lines = world.netvm.exec([tool, "-t", "raw"]).stdout.splitlines()
        counts = {}
        for line in lines:
            key = line.split(" [")[0] if line.startswith(":") else line
            counts[key] = counts.get(key, 0) + 1
        jumps = [line for line in lines if line.startswith("-A PREROUTING ")]
        assert len(jumps) == len(guests) + 1, (tool, len(jumps))  # the src jumps and the guard's
        gotos = [line for line in lines if line.startswith("-A vrq-guard ")]
        assert len(gotos) == len(guests) + 1 and gotos[-1] == "-A vrq-guard -j DROP", (tool, gotos[-3:])
        for g in guests:
            cin, csrc = f"vrq-in-{g.vif}", f"vrq-src-{g.vif}"
            expect = [
                f":{cin} -", f":{csrc} -",
                f"-A vrq-guard -i {g.vif} -g {cin}",
                f"-A PREROUTING -m devgroup ! --src-group 0x2 -m comment --comment vrq-src -j {csrc}",
                f"-A {cin} -j DROP",
            ]
            own = [a for a in g.addresses if (":" in a) == (version == 6)]
            plen = 128 if version == 6 else 32
            expect += [f"-A {cin} -s {a}/{plen} -j RETURN" for a in own]
            expect += [f"-A {csrc} -s {a}/{plen} -j DROP" for a in own]
            for rule in expect:
                assert counts.get(rule) == 1, (tool, rule, counts.get(rule))
            mine = [line for line in lines if line.startswith((f"-A {cin} ", f"-A {csrc} "))]
            link = 2 * len(LINK_ICMP6_TYPES)  # ND and MLD from fe80::/10 and ::
            assert len(mine) == len(own) * 2 + 1 + (link if own and version == 6 else 0), (tool, mine)
    # the peers are down: "linkdown" routes are still the routes we made
    routes = {r.replace(" linkdown", "").strip() for r in world.netvm.ip("route", "show").stdout.splitlines()}
    routes6 = {r.replace(" linkdown", "").strip() for r in world.netvm.ip("-6", "route", "show").stdout.splitlines()}
    neigh = world.netvm.ip("neigh", "show", "nud", "permanent").stdout + \
        world.netvm.ip("-6", "neigh", "show", "nud", "permanent").stdout
    for g in guests:
        metric = 32752 - g.domid
        for a in g.addresses:
            if ":" in a:
                assert f"{a} dev {g.vif} metric {metric} pref medium" in routes6, (g.vif, a)
            else:
                assert f"{a} dev {g.vif} scope link metric {metric}" in routes, (g.vif, a)
            assert f"{a} dev {g.vif} lladdr {g.mac} PERMANENT" in neigh, (g.vif, a)


@pytest.mark.parametrize("world", ["iptables", "nft"], indirect=True)
def test_storm_of_concurrent_hotplugs_with_dnat_running(world):
    guests = add_vif_guests(world, [(d, storm_addresses(d)) for d in range(1, STORM + 1)])
    if HAVE_DNAT:
        # the DNAT tool's own chains belong to the netvm, not to any vif:
        # they are there before the storm and must be intact after it
        first = world.netvm.exec([DNAT], check=False, env=dict(world.env))
        assert first.returncode in (0, 100), first.stderr
    before = comparable(world.snapshot())
    dnat_runs = []
    for cycle in range(CYCLES):
        t0 = time.monotonic()
        with DnatLoop(world) if HAVE_DNAT else _Nothing() as dnat:
            results = finish([start(world, g, "online") for g in guests])
            online_s = time.monotonic() - t0
            for g, (rc, err) in zip(guests, results):
                assert rc == 0, (cycle, g.vif, err)
                assert err == "", (g.vif, err)
                assert xs_value(world, g, "hotplug-status") == "connected", g.vif
                assert xs_value(world, g, "hotplug-error") is None
            check_all_rules(world, guests)
            assert records(world) == sorted(f"{g.vif}.json" for g in guests)
            results = finish([start(world, g, "offline") for g in guests])
        for g, (rc, err) in zip(guests, results):
            assert rc == 0, (cycle, g.vif, err)
        after = comparable(world.snapshot())
        for key in before:
            assert after[key] == before[key], (cycle, key)
        if HAVE_DNAT:
            dnat_runs += dnat.results
        print(f"cycle {cycle}: {STORM} concurrent onlines took {online_s:.1f} s")
    if HAVE_DNAT:
        assert dnat_runs, "the DNAT tool never ran during the storm"
        bad = [(rc, err) for rc, err in dnat_runs if rc not in (0, 100)]
        assert not bad, bad[:3]


MIXED = 24
MIXED_ROUNDS = 4


def mixed_addresses(domid):
    """storm_addresses, except that vifs 3, 9, 15, ... have the IPv4
    address of the vif before them as well: a dying domain's vif and a new
    domain's may hold one address for a while (the nft backend's slow path,
    under the host lock taken exclusively)."""
    own = storm_addresses(domid)
    return own + storm_addresses(domid - 1)[:1] if domid % 6 == 3 else own


def check_each_vif_whole(world, guests):
    """Each vif is wholly online (its record, routes, neighbour entries,
    and the firewall's exact rules or elements for all online vifs) or
    wholly offline (none of it): the state of whichever of its runs came
    last. -> the online ones."""
    online = [g for g in guests if f"{g.vif}.json" in records(world)]
    routes = world.netvm.ip("route", "show").stdout + world.netvm.ip("-6", "route", "show").stdout
    neigh = world.netvm.ip("neigh", "show", "nud", "permanent").stdout + \
        world.netvm.ip("-6", "neigh", "show", "nud", "permanent").stdout
    for g in guests:
        if g not in online:
            assert f" dev {g.vif} " not in routes + neigh, g.vif
    if world.firewall == "nft":
        # vrq-shared marks addresses two vifs hold; what it holds is the
        # backend's own bookkeeping, checked empty at the end
        check_nft_elements(world, online, skip=("vrq-shared",))
        # routes and neighbours of the online ones, as the other storm checks them
        check_all_rules_links(world, online)
    else:
        check_all_rules(world, online)
    return online


def check_all_rules_links(world, guests):
    routes = {r.replace(" linkdown", "").strip() for r in world.netvm.ip("route", "show").stdout.splitlines()}
    routes6 = {r.replace(" linkdown", "").strip() for r in world.netvm.ip("-6", "route", "show").stdout.splitlines()}
    neigh = world.netvm.ip("neigh", "show", "nud", "permanent").stdout + \
        world.netvm.ip("-6", "neigh", "show", "nud", "permanent").stdout
    for g in guests:
        for a in g.addresses:
            want = (f"{a} dev {g.vif} metric {32752 - g.domid} pref medium" if ":" in a
                    else f"{a} dev {g.vif} scope link metric {32752 - g.domid}")
            assert want in (routes6 if ":" in a else routes), (g.vif, a)
            assert f"{a} dev {g.vif} lladdr {g.mac} PERMANENT" in neigh, (g.vif, a)


@pytest.mark.parametrize("world", ["nft", "iptables"], indirect=True)
def test_storm_mixing_online_and_offline_of_the_same_vifs(world):
    """All at once: for every vif one to three runs, online and offline
    mixed, racing each other (the nft backend's runs of different vifs
    proceed side by side, runs of one vif wait for each other), some vifs
    sharing an address. Every run succeeds, and every vif ends whole in the
    state of its last run; after a final storm of offlines nothing of ours
    is left."""
    import random

    guests = add_vif_guests(world, [(d, mixed_addresses(d)) for d in range(1, MIXED + 1)])
    before = comparable(world.snapshot())
    seed = int(os.environ.get("VRQ_STORM_SEED") or time.time())
    rng = random.Random(seed)
    print(f"seed {seed} (VRQ_STORM_SEED to repeat)")
    for rnd in range(MIXED_ROUNDS):
        runs = [(g, rng.choice(("online", "offline"))) for g in guests for _ in range(rng.randint(1, 3))]
        rng.shuffle(runs)
        results = finish([start(world, g, command) for g, command in runs])
        for (g, command), (rc, err) in zip(runs, results):
            assert rc == 0, (seed, rnd, g.vif, command, err)
            assert err == "", (seed, rnd, g.vif, command, err)
        online = check_each_vif_whole(world, guests)
        print(f"round {rnd}: {len(runs)} runs, {len(online)} vifs online after")
    results = finish([start(world, g, "offline") for g in guests])
    assert all(rc == 0 and err == "" for rc, err in results), results[:3]
    assert files_left(world) == []
    after = comparable(world.snapshot())
    for key in before:
        assert after[key] == before[key], (seed, key)


@pytest.mark.parametrize("world", ["nft"], indirect=True)
def test_the_last_offlines_at_once_still_retire_our_sets(world):
    """The last vifs go offline side by side (their runs overlap: the nft
    backend holds the host lock shared), so each sees the other's record
    when it removes its elements. Whichever finds no record after removing
    its own retires our bookkeeping sets, and the hint that they exist."""
    guests = [world.add_guest(d, [f"10.137.0.{40 + d}"]) for d in (1, 2, 3)]
    for rnd in range(6):
        for g in guests:
            assert world.hotplug(g, "online").returncode == 0
        assert "nft-sets" in files_left(world)
        results = finish([start(world, g, "offline") for g in guests])
        assert results == [(0, "")] * len(guests), (rnd, results)
        assert files_left(world) == [], rnd
        # what stays is what the rules name, empty (the ND set of our own
        # tables stays with the rule that names it)
        sets = world.netvm.exec(["nft", "list", "sets"]).stdout
        assert "vrq-guarded" not in sets and "vrq-shared" not in sets, (rnd, sets)
        assert "elements" not in sets, (rnd, sets)


class _Nothing:
    results = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


# ----------------------------------------------------------------------------
# XenStore vanishing under a guest


def full_snapshot(world, guest=None):
    """world.snapshot() plus what it leaves out that online changes too:
    proxy_ndp of every interface, and the comparable-link normalisation."""
    snap = comparable(world.snapshot())
    snap["proxy_ndp"] = world.netvm.exec(
        ["sh", "-c", "grep -H . /proc/sys/net/ipv6/conf/*/proxy_ndp"]).stdout
    return snap


def assert_same(after, before, what=""):
    for key in before:
        assert after[key] == before[key], (what, key)


def conntrack_insert(world, src, dst, sport):
    world.netvm.exec(["conntrack", "-I", "-p", "udp", "-s", src, "-d", dst, "--sport", str(sport),
                      "--dport", "53", "--timeout", "300"])


def conntrack_list(world):
    res = world.netvm.exec(["conntrack", "-L"], check=False)
    return res.stdout


BOTH = pytest.mark.parametrize("world", ["iptables", "nft"], indirect=True)


@BOTH
def test_offline_after_the_backend_directory_vanished(world):
    before = full_snapshot(world)
    g = world.add_guest(3, ["10.137.0.12", "fd09:24ef:4179::a89:c"])
    vif_only = full_snapshot(world)
    assert world.hotplug(g, "online").returncode == 0
    assert world.xs.rm(f"/local/domain/0/{g.xenbus_path}")
    res = world.hotplug(g, "offline")
    assert res.returncode == 0, res.stderr
    assert_same(full_snapshot(world), vif_only)
    world.netvm.ip("link", "del", g.vif)
    assert_same(full_snapshot(world), before)


@BOTH
def test_offline_without_record_or_xenstore_uses_our_own_chains(world):
    g = world.add_guest(3, ["10.137.0.12", "10.137.0.13"])
    other = world.add_guest(4, ["10.137.0.14"])
    vif_only = full_snapshot(world)
    for guest in (g, other):
        assert world.hotplug(guest, "online").returncode == 0
    with_other = None
    # flows of the guest's addresses (which must go) and of another (kept)
    conntrack_insert(world, "10.137.0.12", "192.168.0.1", 1001)
    conntrack_insert(world, "192.168.0.1", "10.137.0.13", 1002)
    conntrack_insert(world, "10.137.0.14", "192.168.0.1", 1003)
    assert "10.137.0.12" in conntrack_list(world)
    os.unlink(os.path.join(world.env["VIF_ROUTE_QUBES_STATE_DIR"], "vif3.0.json"))
    assert world.xs.rm(f"/local/domain/0/{g.xenbus_path}")
    res = world.hotplug(g, "offline")
    assert res.returncode == 0, res.stderr
    flows = conntrack_list(world)
    assert "10.137.0.12" not in flows and "10.137.0.13" not in flows, flows
    assert "10.137.0.14" in flows, "another guest's flow was purged"
    snap = full_snapshot(world)
    for tool in ("iptables-save", "ip6tables-save"):
        assert "vif3.0" not in snap[tool]
        assert ("vrq-in-vif4.0" in snap[tool]) == (world.firewall == "iptables")
    assert "vif3.0" not in snap["nft-elements"]
    assert ("vif4.0" in snap["nft-elements"]) == (world.firewall == "nft")
    for key in ("routes", "routes6", "neigh", "addrs"):
        assert "vif3.0" not in snap[key].replace(vif_only[key], ""), key
    assert "vif3.0" in snap["links"] and "group 2" not in [
        line for line in snap["links"].splitlines() if "vif3.0" in line][0]
    assert snap["records"] == ["vif4.0.json"]
    del with_other
    res = world.hotplug(other, "offline")
    assert res.returncode == 0
    assert_same(full_snapshot(world), vif_only)


@BOTH
@pytest.mark.parametrize("stale", ["boot_id", "netns"])
def test_stale_record_cannot_mislead(world, stale):
    g = world.add_guest(3, ["10.137.0.12"])
    vif_only = full_snapshot(world)
    assert world.hotplug(g, "online").returncode == 0
    path = os.path.join(world.env["VIF_ROUTE_QUBES_STATE_DIR"], "vif3.0.json")
    record = json.load(open(path))
    # a record from another boot or namespace, naming other addresses and
    # another interface name: trusting it would remove the wrong things
    record.update({stale: "other" if stale == "boot_id" else record["netns"] + 1,
                   "addresses": ["10.137.0.99"], "name": "guest-x", "gateway": None})
    json.dump(record, open(path, "w"))
    res = world.hotplug(g, "offline")
    assert res.returncode == 0, res.stderr
    assert_same(full_snapshot(world), vif_only)


# ----------------------------------------------------------------------------
# A failure at every step of online


SCENARIOS = {
    # IPv4 + IPv6 with an IPv6 gateway (proxy_ndp), flows to purge
    "plain": dict(addresses=["10.137.0.12", "fd09:24ef:4179::a89:c"], vifname=None, flows=True),
    # renamed through XenStore's vifname first
    "renamed": dict(addresses=["10.137.0.12"], vifname="guest-web", flows=False),
}


def fresh_status(world, guest):
    base = f"/local/domain/0/{guest.xenbus_path}"
    world.xs.rm(f"{base}/hotplug-status")
    world.xs.rm(f"{base}/hotplug-error")


@pytest.mark.parametrize("world,backend", [("iptables", "nft"), ("iptables", "legacy"), ("nft", "")],
                         indirect=["world"], ids=["iptables-nft", "iptables-legacy", "nft"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_a_failure_at_every_step_of_online_is_rolled_back(world, scenario, backend):
    sc = SCENARIOS[scenario]
    world.xs.write("/local/domain/0/qubes_netvm_gateway6", "fd09:24ef:4179::1")
    g = world.add_guest(3, sc["addresses"], vifname=sc["vifname"])
    if world.firewall == "nft":
        # the tables are made once and kept: make them first (with another
        # guest), so that every run below takes the same path (one transaction)
        other = world.add_guest(9, ["10.137.0.19"])
        assert world.hotplug(other, "online").returncode == 0
        assert world.hotplug(other, "offline").returncode == 0
    if sc["flows"]:
        # a flow in the table makes online purge the guest's addresses
        conntrack_insert(world, "192.168.0.1", "192.168.0.2", 999)
    before = full_snapshot(world)
    steps = 0
    for n in range(1, 40):
        fresh_status(world, g)
        t0 = time.monotonic()
        res = world.hotplug(g, "online", env=g.env(VIF_ROUTE_QUBES_FAIL_AT=str(n),
                                                  VIF_ROUTE_QUBES_IPTABLES=backend))
        took = time.monotonic() - t0
        if res.returncode == 0:
            break  # fewer than n mutating actions: every step has been failed once
        steps = n
        assert res.returncode == 1, res.stderr
        assert took < 10, f"step {n}: rollback took {took:.1f} s"
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert f"injected fault (VIF_ROUTE_QUBES_FAIL_AT={n})" in lines[0]
        assert xs_value(world, g, "hotplug-status") == "error", n
        assert f"VIF_ROUTE_QUBES_FAIL_AT={n}" in xs_value(world, g, "hotplug-error")
        assert_same(full_snapshot(world), before, f"after a failure at step {n}")
    else:
        pytest.fail("online never succeeded")
    # firewall (x2 with iptables: a restore per family; one nft transaction),
    # proxy_arp, proxy_ndp, ip batch, XenStore report; rename; a conntrack
    # purge per address and direction
    firewall = 2 if world.firewall == "iptables" else 1
    expected = 4 + firewall + (1 if sc["vifname"] else 0) + (2 * len(sc["addresses"]) if sc["flows"] else 0)
    assert steps == expected, res.stderr
    assert xs_value(world, g, "hotplug-status") == "connected"
    assert xs_value(world, g, "hotplug-error") is None


@BOTH
def test_interface_deleted_during_online_is_a_real_failure_rolled_back(world, tmp_path):
    """An honest failure, not an injected one: an ``ip`` earlier in PATH
    deletes the vif, then runs the real ip for the link step."""
    g = world.add_guest(3, ["10.137.0.12", "fd09:24ef:4179::a89:c"])
    before = full_snapshot(world)
    real_ip = shutil.which("ip")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "ip"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = -batch ]; then {real_ip} link del {g.vif}; fi\n'
        f'exec {real_ip} "$@"\n')
    wrapper.chmod(0o755)
    env = g.env(PATH=f"{bindir}:{os.environ['PATH']}")
    res = world.hotplug(g, "online", env=env)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert xs_value(world, g, "hotplug-status") == "error"
    assert "ip -batch - exited" in xs_value(world, g, "hotplug-error")
    after = full_snapshot(world)
    for key in ("iptables-save", "ip6tables-save", "nft-elements", "routes", "routes6", "neigh", "records"):
        assert after[key] == before[key], key
    # the interface itself is gone (that was the failure), and with it its
    # lines in the per-interface listings; nothing else changed
    for key in ("links", "addrs", "proxy_arp", "proxy_ndp"):
        kept = "\n".join(line for line in before[key].splitlines() if f"{g.vif}" not in line)
        assert "\n".join(after[key].splitlines()) == kept, key
    assert g.vif not in after["links"]


# ----------------------------------------------------------------------------
# The host lock

HOLD = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_a_lock_held_too_long_fails_online_and_offline_goes_ahead(world, tmp_path):
    g = world.add_guest(3, ["10.137.0.12"])
    other = world.add_guest(4, ["10.137.0.14"])
    vif_only = full_snapshot(world)
    assert world.hotplug(other, "online").returncode == 0
    before = full_snapshot(world)
    os.makedirs(tmp_path / "xen")  # so the hotplug log is written
    lock = os.path.join(world.env["VIF_ROUTE_QUBES_STATE_DIR"], "lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, lock], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        res = world.hotplug(g, "online", env=g.env(VIF_ROUTE_QUBES_LOCK_TIMEOUT="1"))
        took = time.monotonic() - t0
        assert res.returncode == 1
        assert 1.0 <= took < 3.5, took
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert lock in lines[0] and "1 s" in lines[0], lines
        assert xs_value(world, g, "hotplug-status") == "error"
        assert lock in xs_value(world, g, "hotplug-error")
        assert_same(full_snapshot(world), before)
        # offline of a guest that is online does not wait forever either:
        # a dead guest's rules must not outlive it because of a hung holder
        t0 = time.monotonic()
        res = world.hotplug(other, "offline", env=other.env(VIF_ROUTE_QUBES_LOCK_TIMEOUT="1"))
        took = time.monotonic() - t0
        assert res.returncode == 0, res.stderr
        assert 1.0 <= took < 3.5, took
        assert_same(full_snapshot(world), vif_only)
        log = (tmp_path / "xen" / "xen-hotplug.log").read_text()
        assert "cleaning up without the lock" in log
    finally:
        holder.stdin.close()
        holder.wait(10)


HOLD_SHARED = HOLD.replace("fcntl.LOCK_EX", "fcntl.LOCK_SH")


@pytest.mark.parametrize("world", ["nft"], indirect=True)
def test_nft_runs_hold_the_host_lock_shared_and_its_slow_path_exclusively(world, tmp_path):
    """Another run holding the host lock shared (as every nft run's fast
    path does) does not hold up an nft online whose one transaction fits
    the kernel; an online that must read the sets and decide (an address
    another vif has too) waits for the lock exclusively: with the holder
    staying, it gives up within its timeout and leaves the host as it was."""
    first = world.add_guest(3, ["10.137.0.12"])
    g = world.add_guest(4, ["10.137.0.14"])
    twin = world.add_guest(5, ["10.137.0.12"])  # first's address
    assert world.hotplug(first, "online").returncode == 0  # the tables exist from here on
    lock = os.path.join(world.env["VIF_ROUTE_QUBES_STATE_DIR"], "lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SHARED, lock], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        res = world.hotplug(g, "online", env=g.env(VIF_ROUTE_QUBES_LOCK_TIMEOUT="1"))
        assert res.returncode == 0, res.stderr
        assert time.monotonic() - t0 < 1.0
        assert xs_value(world, g, "hotplug-status") == "connected"
        before = full_snapshot(world)
        t0 = time.monotonic()
        res = world.hotplug(twin, "online", env=twin.env(VIF_ROUTE_QUBES_LOCK_TIMEOUT="1"))
        took = time.monotonic() - t0
        assert res.returncode == 1
        assert 1.0 <= took < 3.5, took
        assert lock in res.stderr and "1 s" in res.stderr, res.stderr
        assert xs_value(world, twin, "hotplug-status") == "error"
        assert_same(full_snapshot(world), before)
    finally:
        holder.stdin.close()
        holder.wait(10)
    # the holder gone, the same online goes through the slow path
    res = world.hotplug(twin, "online")
    assert res.returncode == 0, res.stderr
    allowed = world.netvm.exec(["nft", "list", "set", "ip", "qubes", "allowed"]).stdout
    for guest in (first, g, twin):
        assert f'"{guest.vif}" . {guest.addresses[0]}' in allowed, (guest.vif, allowed)
    for guest in (first, g, twin):
        assert world.hotplug(guest, "offline").returncode == 0
    assert files_left(world) == []
    assert nft_state(world.netvm)[1] == ""  # no element left, vrq-shared's neither
