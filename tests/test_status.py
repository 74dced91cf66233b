"""vif-route-qubes status, run inside the netvm namespace (ip netns exec)
against the real kernel state that online made, then drifted by hand."""

import json
import os

import pytest

from tests.rigs.netns import _script

SCRIPT = _script("vif-route-qubes")


def status(world, guest, *args, env=None):
    return world.netvm.exec([SCRIPT, "status", *args], check=False, env=env or guest.env())


def rows(text):
    """Text output -> [(verdict, kind, item)] for every check line."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("ok", "missing", "unexpected"):
            item = line.split("  # ")[0].split(None, 2)[2]
            if parts[1] == "config":
                item = item.split()[0]
            found.append((parts[0], parts[1], item.strip()))
    return found


def online_guest(world, domid=3, addresses=("10.137.0.12",)):
    g = world.add_guest(domid, list(addresses))
    res = world.hotplug(g, "online")
    assert res.returncode == 0, res.stderr
    return g


def test_all_ok_right_after_online(world):
    world.xs.write("/local/domain/0/qubes_netvm_gateway6", "fd09:24ef:4179::1")
    g = online_guest(world, 3, ("10.137.0.12", "fd09:24ef:4179::a89:e"))
    online_guest(world, 4, ("10.137.0.14",))
    res = status(world, g)
    assert res.returncode == 0, res.stdout + res.stderr
    found = rows(res.stdout)
    assert {v for v, _, _ in found} == {"ok"}
    assert res.stdout.startswith("vif3.0: ok (state record, XenStore; backend/vif/3/0)\n")
    assert "vif4.0: ok" in res.stdout
    for expected in [
        ("ok", "route", "10.137.0.12/32 metric 32749"),
        ("ok", "route", "fd09:24ef:4179::a89:e/128 metric 32749"),
        ("ok", "address", "10.137.0.1/32 (gateway)"),
        ("ok", "address", "fd09:24ef:4179::1/128 (gateway)"),
        ("ok", "neigh", "10.137.0.12 lladdr 00:16:3e:5e:03:00 permanent"),
        ("ok", "link", "vif3.0 up"),
        ("ok", "link", "vif3.0 group 2"),
        ("ok", "sysctl", "proxy_arp 1"),
        ("ok", "sysctl", "proxy_ndp 1"),
        ("ok", "iptables", "-A vrq-guard -i vif3.0 -g vrq-in-vif3.0"),
        ("ok", "iptables", "chain vrq-guard"),
        ("ok", "ip6tables", "-A PREROUTING -m devgroup --src-group 2 -m comment --comment vrq-guard -j vrq-guard"),
        ("ok", "ip6tables", "-A vrq-guard -j DROP"),
        ("ok", "ip6tables", "-A vrq-in-vif3.0 -s fd09:24ef:4179::a89:e/128 -j RETURN"),
        ("ok", "config", "hotplug-status"),
    ]:
        assert expected in found, expected
    # side by side: XenStore's and the record's addresses on one line
    line = [ln for ln in res.stdout.splitlines() if " config " in ln and "addresses" in ln][0]
    assert line.count("10.137.0.12") == 2


DRIFTS = {
    "route": (["ip", "route", "del", "10.137.0.12/32", "dev", "vif3.0", "metric", "32749"],
              ("missing", "route", "10.137.0.12/32 metric 32749")),
    "jump": (["iptables", "-t", "raw", "-D", "vrq-guard", "-i", "vif3.0", "-g", "vrq-in-vif3.0"],
             ("missing", "iptables", "-A vrq-guard -i vif3.0 -g vrq-in-vif3.0")),
    # the guard every vif relies on: its jump, its final DROP (the default deny)
    "guard jump": (["iptables", "-t", "raw", "-D", "PREROUTING", "-m", "devgroup", "--src-group", "2", "-m", "comment",
                    "--comment", "vrq-guard", "-j", "vrq-guard"],
                   ("missing", "iptables",
                    "-A PREROUTING -m devgroup --src-group 2 -m comment --comment vrq-guard -j vrq-guard")),
    "guard drop": (["ip6tables", "-t", "raw", "-D", "vrq-guard", "-j", "DROP"],
                   ("missing", "ip6tables", "-A vrq-guard -j DROP")),
    "guard drop not last": (["iptables", "-t", "raw", "-A", "vrq-guard", "-i", "eth9", "-j", "RETURN"],
                            ("missing", "iptables", "-A vrq-guard -j DROP")),
    "rule": (["iptables", "-t", "raw", "-D", "vrq-in-vif3.0", "-j", "DROP"],
             ("missing", "iptables", "-A vrq-in-vif3.0 -j DROP")),
    "ip6 jump": (["ip6tables", "-t", "raw", "-D", "PREROUTING", "-m", "devgroup", "!", "--src-group", "2", "-m",
                  "comment", "--comment", "vrq-src", "-j", "vrq-src-vif3.0"],
                 ("missing", "ip6tables",
                  "-A PREROUTING -m devgroup ! --src-group 2 -m comment --comment vrq-src -j vrq-src-vif3.0")),
    # order matters in a chain: a RETURN after the DROP lets nothing out
    "rule order": (["sh", "-c", "iptables -t raw -D vrq-in-vif3.0 -s 10.137.0.12/32 -j RETURN && "
                    "iptables -t raw -A vrq-in-vif3.0 -s 10.137.0.12/32 -j RETURN"],
                   ("missing", "iptables", "-A vrq-in-vif3.0 -j DROP")),
    "neighbour": (["ip", "neigh", "del", "10.137.0.12", "dev", "vif3.0"],
                  ("missing", "neigh", "10.137.0.12 lladdr 00:16:3e:5e:03:00 permanent")),
    "gateway address": (["ip", "addr", "del", "10.137.0.1/32", "dev", "vif3.0"],
                        ("missing", "address", "10.137.0.1/32 (gateway)")),
    "link down": (["ip", "link", "set", "vif3.0", "down"], ("missing", "link", "vif3.0 up")),
    "group": (["ip", "link", "set", "vif3.0", "group", "0"], ("missing", "link", "vif3.0 group 2")),
    "proxy_arp": (["sh", "-c", "echo 0 > /proc/sys/net/ipv4/conf/vif3.0/proxy_arp"],
                  ("missing", "sysctl", "proxy_arp 1")),
    "extra route": (["ip", "route", "add", "10.137.0.99/32", "dev", "vif3.0"],
                    ("unexpected", "route", "10.137.0.99/32 metric 0")),
}


@pytest.mark.parametrize("drift", sorted(DRIFTS))
def test_status_reports_hand_made_drift(world, drift):
    g = online_guest(world)
    assert status(world, g).returncode == 0
    argv, expected = DRIFTS[drift]
    world.netvm.exec(argv)
    res = status(world, g)
    assert res.returncode == 1, res.stdout
    found = rows(res.stdout)
    assert expected in found, res.stdout
    assert res.stdout.splitlines()[0].startswith("vif3.0: ")
    assert "ok (" not in res.stdout.splitlines()[0]
    # the same verdicts in --json
    js = status(world, g, "--json")
    assert js.returncode == 1
    data = json.loads(js.stdout)
    assert data["ok"] is False
    (vif,) = data["vifs"]
    assert vif["name"] == "vif3.0" and vif["ok"] is False
    assert [(c["verdict"], c["kind"], c["item"]) for c in vif["checks"]] == found
    # online repairs it: what is missing is put back, and a host route on
    # the vif that its inputs do not name is removed (issue 11: online
    # converges to exactly the inputs); status says so
    assert world.hotplug(g, "online").returncode == 0
    assert status(world, g).returncode == 0, status(world, g).stdout


def test_json_matches_text_and_parses(world):
    g = online_guest(world)
    text = status(world, g)
    js = status(world, g, "--json")
    assert text.returncode == js.returncode == 0
    data = json.loads(js.stdout)
    assert data["ok"] is True and data["xenstore"] == {"reachable": True, "error": None}
    (vif,) = data["vifs"]
    assert vif["record"]["addresses"] == ["10.137.0.12"]
    assert vif["xenstore"]["ip"] == "10.137.0.12" and vif["xenstore"]["hotplug-status"] == "connected"
    assert [(c["verdict"], c["kind"], c["item"]) for c in vif["checks"]] == rows(text.stdout)
    config = {c["item"]: c for c in vif["checks"] if c["kind"] == "config"}
    assert config["mac"]["xenstore"] == config["mac"]["record"] == "00:16:3e:5e:03:00"


def test_status_without_xenstore_uses_the_record(world, tmp_path):
    g = online_guest(world)
    for xs_path in (str(tmp_path / "no-such-socket"), str(tmp_path)):  # absent; not a socket
        env = g.env(XENSTORED_PATH=xs_path)
        res = status(world, g, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.startswith("# XenStore unreachable (")
        assert ("ok", "route", "10.137.0.12/32 metric 32749") in rows(res.stdout)
        assert "not checked: XenStore unreachable" in res.stdout
        data = json.loads(status(world, g, "--json", env=env).stdout)
        assert data["ok"] is True and data["xenstore"]["reachable"] is False
        assert data["xenstore"]["error"]
    # ... and still sees drift
    world.netvm.ip("neigh", "del", "10.137.0.12", "dev", "vif3.0")
    res = status(world, g, env=g.env(XENSTORED_PATH=str(tmp_path / "no-such-socket")))
    assert res.returncode == 1
    assert ("missing", "neigh", "10.137.0.12 lladdr 00:16:3e:5e:03:00 permanent") in rows(res.stdout)


def test_xenstore_changed_after_online(world):
    g = online_guest(world)
    world.xs.write(f"/local/domain/0/{g.xenbus_path}/ip", "10.137.0.50")
    res = status(world, g)
    assert res.returncode == 1
    line = [ln for ln in res.stdout.splitlines() if " config " in ln and "addresses" in ln][0]
    assert line.split()[0] == "unexpected" and "10.137.0.50" in line and "10.137.0.12" in line
    assert "XenStore changed after online ran" in line


def test_failed_hotplug_status_is_missing(world):
    g = online_guest(world)
    world.xs.write(f"/local/domain/0/{g.xenbus_path}/hotplug-status", "error")
    world.xs.write(f"/local/domain/0/{g.xenbus_path}/hotplug-error", "something broke")
    res = status(world, g, "vif3.0")
    assert res.returncode == 1
    line = [ln for ln in res.stdout.splitlines() if "hotplug-status" in ln][0]
    assert line.split()[:2] == ["missing", "config"] and "hotplug-error: something broke" in line


def test_leftovers_without_record_or_xenstore_are_unexpected(world):
    g = online_guest(world)
    os.unlink(os.path.join(world.env["VIF_ROUTE_QUBES_STATE_DIR"], "vif3.0.json"))
    world.xs.rm(f"/local/domain/0/backend/vif/{g.domid}")
    res = status(world, g)
    assert res.returncode == 1
    found = rows(res.stdout)
    assert ("unexpected", "link", "vif3.0 group 2") in found
    assert ("unexpected", "iptables", "chain vrq-in-vif3.0") in found
    assert ("unexpected", "ip6tables", "chain vrq-src-vif3.0") in found
    # offline cleans it up; then there is nothing to report
    assert world.hotplug(g, "offline").returncode == 0
    res = status(world, g)
    assert res.returncode == 0, res.stdout
    assert res.stdout.splitlines() == [
        "no vifs: no state records, no interfaces in group 2, no firewall rules of ours",
        "# firewall: iptables backend (VIF_ROUTE_QUBES_FIREWALL=iptables)",
        "# configuration: xenstore (auto: no QubesDB on /var/run/qubes/qubesdb.sock)"]


def test_record_lost_but_xenstore_connected(world):
    g = online_guest(world)
    os.unlink(os.path.join(world.env["VIF_ROUTE_QUBES_STATE_DIR"], "vif3.0.json"))
    res = status(world, g)
    assert res.returncode == 1
    assert ("missing", "record", "state record") in rows(res.stdout)
    # the kernel side is still checked, from XenStore's values
    assert ("ok", "route", "10.137.0.12/32 metric 32749") in rows(res.stdout)


def test_named_vif_that_does_not_exist(world):
    g = world.add_guest(3, ["10.137.0.12"], write_xenstore=False)
    res = status(world, g, "vif9.0")
    assert res.returncode == 1
    assert ("missing", "vif", "vif9.0") in rows(res.stdout)


def test_renamed_vif_found_by_either_name(world):
    g = world.add_guest(5, ["10.137.0.15"], vifname="guest-web")
    assert world.hotplug(g, "online").returncode == 0
    for name in ("guest-web", "vif5.0"):
        res = status(world, g, name)
        assert res.returncode == 0, res.stdout
        assert res.stdout.startswith("guest-web: ok")
        assert ("ok", "route", "10.137.0.15/32 metric 32747") in rows(res.stdout)


@pytest.mark.parametrize("world", ["iptables", "nft"], indirect=True)
def test_status_and_online_agree_on_what_is_ours(world):
    """issue 17 §5: status judges exactly what online's plan converges. An
    administrator's /24 route and /24 address on the vif are not ours:
    online leaves them, and status does not call them unexpected (it did,
    forever); a stray host address is ours to remove, and status says so
    until online removes it."""
    g = online_guest(world)
    world.netvm.exec(["ip", "route", "add", "10.200.0.0/24", "dev", "vif3.0"])
    world.netvm.exec(["ip", "addr", "add", "10.201.0.1/24", "dev", "vif3.0"])
    res = status(world, g, "--problems")
    assert res.returncode == 0, res.stdout
    assert world.hotplug(g, "online").returncode == 0
    assert "10.200.0.0/24" in world.netvm.ip("route", "show", "dev", "vif3.0").stdout
    assert status(world, g, "--problems").returncode == 0
    world.netvm.exec(["ip", "addr", "add", "10.137.0.77/32", "dev", "vif3.0"])
    res = status(world, g)
    assert res.returncode == 1 and ("unexpected", "address", "10.137.0.77/32") in rows(res.stdout), res.stdout
    assert world.hotplug(g, "online").returncode == 0
    assert status(world, g, "--problems").returncode == 0
