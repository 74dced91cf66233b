"""qvm-dom0-network-via-netvm and vif-route-qubes-keys: the plan (pure
functions) and the command line (real processes against the XenStore
wire-protocol server; ``xl`` is the recorded stand-in tests/xl_standin.py,
for these tests only). What dom0's interface becomes is proved with the real
``ip`` in tests/test_dom0_network_netns.py, and under a real Xen in tests/e2e.
"""

import subprocess

import pytest

from vif_route_qubes import dom0_network as D
from vif_route_qubes import keys as K
from vif_route_qubes.errors import Failure

from tests.dom0_rig import Rig

XL_LIST = """Name                                        ID   Mem VCPUs\tState\tTime(s)
Domain-0                                     0  1024     2     r-----      12.1
netvm                                        1   800     1     -b----       3.0
work                                         2   448     1     -b----       1.0
admin-paused                                 3   448     1     --p---       1.0
dying                                        4   448     1     ---s--       1.0
"""


# ---------------------------------------------------------------- plan


def test_parse_xl_list():
    doms = D.parse_xl_list(XL_LIST)
    assert [(d.domid, d.name, d.state) for d in doms] == [
        (0, "Domain-0", "r-----"), (1, "netvm", "-b----"), (2, "work", "-b----"),
        (3, "admin-paused", "--p---"), (4, "dying", "---s--")]


def test_to_pause_spares_dom0_netvm_and_the_already_paused():
    doms = D.parse_xl_list(XL_LIST)
    assert [d.name for d in D.to_pause(doms, netvm_domid=1)] == ["work"]
    # another netvm: the first one is an ordinary running domain then
    assert [d.name for d in D.to_pause(doms, netvm_domid=2)] == ["netvm"]


def test_attach_and_detach_argv():
    assert D.attach_argv("netvm", "10.137.0.2") == [
        "xl", "network-attach", "0", "backend=netvm", "ip=10.137.0.2", "script=vif-route-qubes"]
    assert D.detach_argv(3) == ["xl", "network-detach", "0", "3"]


def test_choose_ip():
    assert D.choose_ip("10.137.0.1", []) == "10.137.0.2"
    assert D.choose_ip("10.137.0.1", ["10.137.0.2", "10.137.0.3", "10.139.1.1"]) == "10.137.0.4"
    assert D.choose_ip("10.137.0.5", ["10.137.0.1"]) == "10.137.0.2"
    full = [f"10.137.0.{i}" for i in range(2, 255)]
    with pytest.raises(Failure, match="no free address"):
        D.choose_ip("10.137.0.1", full)


def test_batches_are_each_others_undo():
    up = D.up_batch("eth0", "10.137.0.2", "10.137.0.1")
    assert up == [
        "addr add 10.137.0.2/32 dev eth0",
        "link set dev eth0 up",
        "route add 10.137.0.1/32 dev eth0 scope link",
        "route add default via 10.137.0.1 dev eth0 onlink",
    ]
    down = D.down_batch("eth0", "10.137.0.2", "10.137.0.1")
    assert down == [
        "route del default via 10.137.0.1 dev eth0",
        "route del 10.137.0.1/32 dev eth0",
        "link set dev eth0 down",
        "addr del 10.137.0.2/32 dev eth0",
    ]


def test_replaced_default_routes_go_first_and_come_back_last():
    routes = D.default_routes([
        {"dst": "default", "gateway": "192.0.2.1", "dev": "eno1", "metric": 100, "protocol": "dhcp",
         "flags": []},
        {"dst": "default", "dev": "wg0", "flags": ["onlink"]},
        {"dst": "192.0.2.0/24", "dev": "eno1"},
    ])
    assert routes == ["default via 192.0.2.1 dev eno1 metric 100 proto dhcp", "default dev wg0 onlink"]
    up = D.up_batch("eth1", "10.137.0.2", "10.137.0.1", routes)
    assert up[:2] == ["route del " + r for r in routes]
    down = D.down_batch("eth1", "10.137.0.2", "10.137.0.1", routes)
    assert down[-2:] == ["route add " + r for r in routes]


def test_resolv_text_and_keys():
    text = D.render_resolv(["10.139.1.1", "10.139.1.2"])
    assert text.splitlines()[1:] == ["nameserver 10.139.1.1", "nameserver 10.139.1.2"]
    assert text.startswith("# ") and text.endswith("\n")
    assert K.guest_keys("10.137.0.10", "10.137.0.1", ["10.139.1.1", "10.139.1.2"]) == [
        ("qubes_ip", "10.137.0.10"), ("qubes_netmask", "255.255.255.255"),
        ("qubes_gateway", "10.137.0.1"), ("qubes_primary_dns", "10.139.1.1"),
        ("qubes_secondary_dns", "10.139.1.2")]
    assert K.netvm_keys("10.137.0.1", ["10.139.1.1"]) == [
        ("qubes_netvm_gateway", "10.137.0.1"), ("qubes_netvm_primary_dns", "10.139.1.1")]
    assert K.perms_for(7) == ["n0", "r7"]


def test_new_record_names_nothing_done_yet():
    plan = {"netvm": "netvm", "netvm_domid": 1, "ip": "10.137.0.2", "gateway": "10.137.0.1",
            "dns": ["10.139.1.1"], "pause": [(2, "a1")]}
    rec = D.new_record(plan)
    assert rec == {"netvm": "netvm", "netvm_domid": 1, "ip": "10.137.0.2", "gateway": "10.137.0.1",
                   "dns": ["10.139.1.1"], "paused": [], "devid": None, "ifname": None, "mac": None,
                   "replaced_routes": [], "resolv_conf": None, "configured": False}


# ---------------------------------------------------------------- CLI


@pytest.fixture
def rig(xenstored, tmp_path):
    return Rig(xenstored, tmp_path)


@pytest.mark.parametrize("args", [[], ["up"], ["down"], ["status"]])
def test_help(rig, args):
    r = rig.d0(*args, "--help")
    assert r.returncode == 0 and "Usage: qvm-dom0-network-via-netvm" in r.stdout
    assert rig.xl_calls() == []


def test_keys_help(rig):
    for args in ([], ["netvm"], ["guest"]):
        r = rig.keys(*args, "--help")
        assert r.returncode == 0 and "Usage: vif-route-qubes-keys" in r.stdout


def test_dry_run_prints_the_plan_and_changes_nothing(rig):
    before = rig.xs.dump()
    r = rig.d0("up", "--dry-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "$ xl pause 2\n" in out
    assert "xl pause 3" not in out  # already paused by the administrator
    assert "$ xl network-attach 0 backend=netvm ip=10.137.0.2 script=vif-route-qubes\n" in out
    assert "addr add 10.137.0.2/32 dev IFACE" in out
    assert "route add default via 10.137.0.1 dev IFACE onlink" in out
    assert "nameserver 10.139.1.1\nnameserver 10.139.1.2\n" in out
    assert [c[0] for c in rig.xl_calls()] == ["list"]
    assert rig.xs.dump() == before
    assert rig.resolv.read_text() == "nameserver 192.0.2.99\n"
    assert not rig.state_dir.exists() or not list(rig.state_dir.iterdir())


def test_explicit_ip_and_netvm(rig):
    r = rig.d0("up", "--dry-run", "--netvm", "netvm", "--ip", "10.137.0.50")
    assert r.returncode == 0, r.stderr
    assert "ip=10.137.0.50 " in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--ip", "10.137.0.10"], "already in use"),
    (["--ip", "10.137.0.1"], "already in use"),
    (["--ip", "not-an-ip"], "--ip"),
    (["--netvm", "Domain-0"], "dom0 cannot be its own netvm"),
    (["--netvm", "nosuch"], "no domain named 'nosuch'"),
    (["--timeout", "-3"], "positive number"),
])
def test_bad_input_refused_in_one_line(rig, args, message):
    before = rig.xs.dump()
    r = rig.d0("up", *args)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert [c[0] for c in rig.xl_calls()] in ([], ["list"])
    assert rig.xs.dump() == before and rig.domains()["a1"] == "-b----"


def test_no_netvm_refused(xenstored, tmp_path):
    rig = Rig(xenstored, tmp_path, domains=[{"domid": 0, "name": "Domain-0", "state": "r-----"}])
    xenstored.rm("/local/domain/1")
    r = rig.d0("up")
    assert r.returncode == 1
    assert "no running netvm" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_several_netvms_listed(rig):
    rig.xs.write("/local/domain/2/backend/vif/3/0/ip", "10.137.1.5")
    r = rig.d0("up")
    assert r.returncode == 1
    assert "several domains serve guests' vifs (netvm, a1)" in r.stderr


def test_netvm_without_gateway_key(xenstored, tmp_path):
    rig = Rig(xenstored, tmp_path, keys=False)
    r = rig.d0("up")
    assert r.returncode == 1
    assert "qubes_netvm_gateway is missing" in r.stderr and "vif-route-qubes-keys netvm" in r.stderr
    assert rig.domains()["a1"] == "-b----"


def test_dom0_already_attached_by_someone_else(rig):
    rig.xs.write("/local/domain/0/device/vif/0/backend-id", "1")
    r = rig.d0("up")
    assert r.returncode == 1
    assert "already attached to netvm (device/vif/0) but not by this command" in r.stderr
    assert [c[0] for c in rig.xl_calls()] == ["list"]
    assert "device/vif/0 (backend domain 1)" in rig.d0("status").stdout


def test_down_and_status_without_up_are_harmless(rig):
    r = rig.d0("down")
    assert r.returncode == 0 and "nothing to do" in r.stdout
    r = rig.d0("status")
    assert r.returncode == 0 and "not attached" in r.stdout
    assert rig.xl_calls() == []


def test_attach_timeout_rolls_back(rig, tmp_path):
    """Without network namespaces the stand-in's interface appears in this
    namespace only if ip can create it; here the backend reports an error
    instead, and up must unpause what it paused."""
    rig.set_state(attach="error")
    r = rig.d0("up", "--timeout", "5")
    assert r.returncode == 1
    assert "the netvm's vif script failed: stand-in: the script failed" in r.stderr
    calls = [c[:2] for c in rig.xl_calls()]
    assert ["pause", "2"] in calls and ["unpause", "2"] in calls
    assert ["network-detach", "0"] in calls
    assert rig.domains() == {"Domain-0": "r-----", "netvm": "-b----", "a1": "-b----", "a2": "--p---"}
    assert rig.resolv.read_text() == "nameserver 192.0.2.99\n"
    assert rig.d0("status").stdout.startswith("dom0 is not attached")


def test_a_killed_up_is_undone_by_down(rig):
    """up writes its record after every step: one killed right after pausing
    a1 leaves a record that makes up refuse and down unpause a1."""
    from vif_route_qubes import state

    rec = D.new_record({"netvm": "netvm", "netvm_domid": 1, "ip": "10.137.0.2",
                        "gateway": "10.137.0.1", "dns": ["10.139.1.1"]})
    rec["paused"] = [[2, "a1"]]
    state.save(str(rig.state_dir), D.RECORD, rec)
    rig.set_state(domains=[dict(d, state="-bp---") if d["name"] == "a1" else d
                           for d in rig.domains_list()])
    r = rig.d0("up")
    assert r.returncode == 1 and "an earlier up did not finish" in r.stderr and "down" in r.stderr
    assert "paused because of it: a1 (2)" in rig.d0("status").stdout
    r = rig.d0("down")
    assert r.returncode == 0, r.stderr
    assert "unpaused: a1 (2)" in r.stdout
    assert [c for c in rig.xl_calls() if c[0] != "list"] == [["unpause", "2"]]
    assert rig.domains() == {"Domain-0": "r-----", "netvm": "-b----", "a1": "-b----", "a2": "--p---"}
    assert not (rig.state_dir / "dom0-network.json").exists()


# ---------------------------------------------------------------- keys


def _xs_cli(rig, *argv):
    return subprocess.run(list(argv), capture_output=True, text=True,
                          env=rig.env(), check=True).stdout


def test_keys_netvm_and_guest_written_with_private_perms(rig):
    for k in ("qubes_netvm_gateway", "qubes_netvm_primary_dns", "qubes_netvm_secondary_dns"):
        rig.xs.rm(f"/local/domain/1/{k}")
    r = rig.keys("netvm", "netvm", "--gateway", "10.137.0.1", "--dns1", "10.139.1.1", "--dns2", "10.139.1.2")
    assert r.returncode == 0, r.stderr
    assert rig.xs.read("/local/domain/1/qubes_netvm_gateway") == b"10.137.0.1"
    assert rig.xs.get_perms("/local/domain/1/qubes_netvm_primary_dns") == ["n0", "r1"]
    # a guest: its vif's ip= in the backend dir, found from libxl's own key
    rig.xs.write("/libxl/2/device/vif/0/backend", "/local/domain/1/backend/vif/2/0")
    r = rig.keys("guest", "a1")
    assert r.returncode == 0, r.stderr
    # read back with Debian's own client, and the permissions with xenstore-ls -p
    got = _xs_cli(rig, "xenstore-read", *[f"/local/domain/2/{k}" for k in K.GUEST_KEYS])
    assert got.split() == ["10.137.0.10", "255.255.255.255", "10.137.0.1", "10.139.1.1", "10.139.1.2"]
    perms = _xs_cli(rig, "xenstore-ls", "-p", "/local/domain/2")
    line = next(ln for ln in perms.splitlines() if ln.startswith("qubes_ip "))
    assert "(n0,r2)" in line
    for k in K.GUEST_KEYS:
        assert rig.xs.get_perms(f"/local/domain/2/{k}") == ["n0", "r2"]


def _guest_writes_its_frontend(rig, backend, backend_id):
    """What a running guest can do: rewrite its own frontend directory."""
    rig.xs.write("/local/domain/2/device/vif/0/backend", backend)
    rig.xs.write("/local/domain/2/device/vif/0/backend-id", backend_id)


@pytest.mark.parametrize("backend, backend_id, libxl", [
    # another guest's backend directory: its address would become a1's
    ("/local/domain/1/backend/vif/3/0", "1", False),
    ("/local/domain/1/backend/vif/3/0", "1", True),   # libxl's key wins
    # the right directory, but another netvm claimed as backend
    ("/local/domain/1/backend/vif/2/0", "4", False),
    # a path that is not a vif backend directory at all
    ("/local/domain/1/qubes_netvm_gateway", "1", False),
], ids=["other-guests-dir", "other-guests-dir-libxl-key", "other-backend-id", "not-a-backend-dir"])
def test_keys_guest_believes_only_what_dom0_wrote(rig, backend, backend_id, libxl):
    """The frontend directory is the guest's to write: it never makes dom0
    copy another domain's address or another netvm's gateway."""
    for k in K.GUEST_KEYS:
        rig.xs.rm(f"/local/domain/2/{k}")
    _guest_writes_its_frontend(rig, backend, backend_id)
    if libxl:
        rig.xs.write("/libxl/2/device/vif/0/backend", "/local/domain/1/backend/vif/2/0")
    before = rig.xs.dump()
    r = rig.keys("guest", "a1")
    if libxl:
        assert r.returncode == 0, r.stderr
        assert rig.xs.read("/local/domain/2/qubes_ip") == b"10.137.0.10"  # its own, not a2's
        return
    assert r.returncode == 1 and "nothing written" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert rig.xs.dump() == before


def test_keys_guest_without_libxl_key_takes_a_frontend_its_backend_confirms(rig):
    _guest_writes_its_frontend(rig, "/local/domain/1/backend/vif/2/0", "1")
    r = rig.keys("guest", "a1")
    assert r.returncode == 0, r.stderr
    assert rig.xs.read("/local/domain/2/qubes_ip") == b"10.137.0.10"


def test_keys_dry_run_and_refusals(rig):
    before = rig.xs.dump()
    r = rig.keys("netvm", "1", "--gateway", "10.137.0.9", "--dry-run")
    assert r.returncode == 0
    assert "xenstore write /local/domain/1/qubes_netvm_gateway = 10.137.0.9 (perms n0 r1)" in r.stdout
    assert rig.xs.dump() == before
    r = rig.keys("guest", "a1")  # no vif 0 in its frontend dir
    assert r.returncode == 1 and "a1: no vif 0" in r.stderr
    r = rig.keys("netvm", "netvm", "--gateway", "10.137.0.300")
    assert r.returncode == 1 and "--gateway" in r.stderr and "Traceback" not in r.stderr
    r = rig.keys("netvm", "Domain-0", "--gateway", "10.137.0.1")
    assert r.returncode == 1 and "dom0 is not a netvm" in r.stderr
    assert rig.xs.dump() == before


def test_a_netvms_error_text_is_shown_as_one_printable_bounded_line():
    """qvm-dom0-network-via-netvm shows the netvm's hotplug-error (a value
    the netvm writes): never raw terminal control sequences, never unbounded."""
    from vif_route_qubes import validate

    shown = validate.message("bad\x1b[2J\nline\x00" + "x" * 1000)
    assert shown.isprintable() and len(shown) <= 300 and shown.startswith("bad?[2J?line?")
