"""An upgrade with guests running: what the previous release left (its state
record and its firewall rules) is handled by this one's ``status``,
``offline`` and re-``online``.

The fixtures in tests/fixtures/release-0.1.0/ are what the release before
the packages (main at 51b22ca, record format version 1) wrote for one guest,
vif7.0 with 10.137.0.17 and fd09:24ef:4179::a89:11, once per firewall
backend: the record (its boot id and network namespace replaced by
placeholders, filled in with this host's at test time, as a record of the
running boot would carry them) and the rules (``iptables-save`` /
``ip6tables-save``, or ``nft list ruleset``). ``python -m tests.test_upgrade
FIXTURE_DIR`` wrote them (as root) from that release's checkout.

The test puts a guest's links, addresses and routes in place with this
release's ``online``, then replaces its record and its rules with the old
release's, exactly as a package upgrade would leave the host, and checks:
``status`` finds nothing wrong, ``offline`` removes everything (nothing of
ours left, record gone) even without the XenStore directory, and a
re-``online`` converges to what this release makes from scratch.
"""

import json
import os
import pathlib
import sys

import pytest

from tests.rigs.netns import World, _script, comparable

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "release-0.1.0"
SCRIPT = _script("vif-route-qubes")
ADDRESSES = ["10.137.0.17", "fd09:24ef:4179::a89:11"]
BOTH = pytest.mark.parametrize("world", ["iptables", "nft"], indirect=True)
# what status says of the old release's ICMPv6 from link-local sources
LAX_ICMP6 = {
    "iptables": lambda what: "ipv6-icmp" in what and (" -s fe80::/10 " in what or " -s ::/128 " in what),
    "nft": lambda what: "vrq-nd" in what or "accepted only for ND and MLD" in what,
}


def _identity(ns):
    boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    netns = int(ns.exec(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).stdout.strip())
    return boot, netns


def put_old_release(world, guest):
    """The old release's record and rules in place of this one's."""
    fw = world.firewall
    d = FIXTURES / fw
    record = json.loads((d / "vif7.0.json").read_text())
    assert record["version"] == 1 and record["boot_id"] == "@BOOT_ID@" and record["netns"] == "@NETNS@"
    boot, netns = _identity(world.netvm)
    record.update(boot_id=boot, netns=netns)
    state = pathlib.Path(world.env["VIF_ROUTE_QUBES_STATE_DIR"])
    (state / "vif7.0.json").write_text(json.dumps(record, sort_keys=True))
    if fw == "iptables":
        world.netvm.exec(["iptables-restore"], input=(d / "iptables-save").read_text(), text=True)
        world.netvm.exec(["ip6tables-restore"], input=(d / "ip6tables-save").read_text(), text=True)
    else:
        world.netvm.exec(["nft", "flush", "ruleset"])
        world.netvm.exec(["nft", "-f", str(d / "ruleset.nft")])


def snap(world):
    """comparable(world.snapshot()); with the iptables backend less the nft
    view of the same rules: iptables-nft lists chains in the order they were
    made, which a whole-table iptables-restore (the fixture) changes, while
    iptables-save, compared, shows the rules themselves."""
    got = comparable(world.snapshot())
    if world.firewall == "iptables":
        got.pop("nft")
    return got


def status(world, guest, env=None):
    return world.netvm.exec([SCRIPT, "status", "--problems", guest.vif], check=False, env=env or guest.env())


@BOTH
def test_the_fixture_is_what_a_run_of_the_old_release_made(world):
    """Sanity: the fixture's rules name the guest and its addresses."""
    d = FIXTURES / world.firewall
    text = "".join(p.read_text() for p in sorted(d.iterdir()) if p.name != "vif7.0.json")
    for needle in ("vif7.0", "10.137.0.17", "fd09:24ef:4179::a89:11"):
        assert needle in text


@BOTH
def test_status_offline_and_online_after_an_upgrade(world):
    before = snap(world)
    g = world.add_guest(7, ADDRESSES)
    clean = snap(world)
    res = world.hotplug(g, "online")
    assert res.returncode == 0, res.stderr
    fresh = snap(world)

    # the upgrade: the old release's record and rules, this release's code
    put_old_release(world, g)
    res = status(world, g)
    # the one thing wrong: the old release accepted every ICMPv6 type from
    # fe80::/10 and ::, this one only ND and MLD (a re-online repairs it)
    problems = [line.split(None, 1) for line in res.stdout.splitlines()
                if line.split(None, 1)[:1] in (["missing"], ["unexpected"])]
    assert res.returncode == 1 and problems, res.stdout + res.stderr
    assert all(LAX_ICMP6[world.firewall](what) for _, what in problems), res.stdout

    # a re-online over them converges to what this release makes
    res = world.hotplug(g, "online")
    assert res.returncode == 0, res.stderr
    assert snap(world) == fresh
    assert status(world, g).returncode == 0

    # offline of what the old release made, with XenStore's directory gone
    # (the guest destroyed): the old record says what to remove
    put_old_release(world, g)
    world.xs.rm(f"/local/domain/0/{g.xenbus_path}")
    res = world.hotplug(g, "offline")
    assert res.returncode == 0, res.stderr
    after = snap(world)
    assert after == clean, {k: (clean[k], after[k]) for k in after if after[k] != clean[k]}
    assert after["records"] == [] and before["records"] == []


def test_a_record_of_an_unknown_version_is_ignored_and_a_known_one_upgraded(tmp_path, monkeypatch):
    from vif_route_qubes import state

    record = json.loads((FIXTURES / "iptables" / "vif7.0.json").read_text())
    boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    record.update(boot_id=boot, netns=os.stat("/proc/self/ns/net").st_ino)
    (tmp_path / "vif7.0.json").write_text(json.dumps(record))
    assert state.load(str(tmp_path), "vif7.0")["addresses"] == ADDRESSES
    # a later format (after a downgrade): not guessed at
    (tmp_path / "vif7.0.json").write_text(json.dumps(dict(record, version=2)))
    assert state.load(str(tmp_path), "vif7.0") is None
    for odd in ("1", True, None, 1.0):
        (tmp_path / "vif7.0.json").write_text(json.dumps(dict(record, version=odd)))
        assert state.load(str(tmp_path), "vif7.0") is None, odd
    # a release with format 2 reads version 1 through its upgrade step
    monkeypatch.setattr(state, "VERSION", 2)
    monkeypatch.setattr(state, "UPGRADES", {1: lambda r: dict(r, version=2, upgraded=True)})
    (tmp_path / "vif7.0.json").write_text(json.dumps(record))
    got = state.load(str(tmp_path), "vif7.0")
    assert got["version"] == 2 and got["upgraded"] and got["name"] == "vif7.0"


# ---------------------------------------------------------------- the fixture


def write_fixture(out: pathlib.Path) -> None:
    """Run the checkout's online for vif7.0 with each backend and keep what
    it left (run from the release whose output the fixture is)."""
    import shutil
    import tempfile

    from tests.rigs.xenstored import XenStored

    for fw in ("iptables", "nft"):
        d = out / fw
        d.mkdir(parents=True, exist_ok=True)
        sock = tempfile.mkdtemp(prefix="vrq", dir="/tmp")
        tmp = tempfile.mkdtemp(prefix="vrq-fixture")
        xs = XenStored(os.path.join(sock, "xs.sock"))
        xs.start()
        try:
            with World(xs, tmp, firewall=fw) as world:
                g = world.add_guest(7, ADDRESSES)
                res = world.hotplug(g, "online")
                assert res.returncode == 0, res.stderr
                record = json.loads(pathlib.Path(world.env["VIF_ROUTE_QUBES_STATE_DIR"], "vif7.0.json").read_text())
                record.update(boot_id="@BOOT_ID@", netns="@NETNS@")
                (d / "vif7.0.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
                if fw == "iptables":
                    for tool in ("iptables-save", "ip6tables-save"):
                        text = world.netvm.exec([tool]).stdout
                        (d / tool).write_text("".join(ln + "\n" for ln in text.splitlines() if not ln.startswith("#")))
                else:
                    (d / "ruleset.nft").write_text(world.netvm.exec(["nft", "list", "ruleset"]).stdout)
        finally:
            xs.stop()
            shutil.rmtree(sock, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    write_fixture(pathlib.Path(sys.argv[1]))
