"""Flowtable forwarding (Qubes R4.2's ``table inet qubes-nat-accel``):
golden payloads (pure), then the real nft in network namespaces on a kernel
without flowtable support (the machines here lack nf_flow_table): probed
once, logged once, skipped afterwards, nothing else changed. The offload
itself (flows shown [OFFLOAD], a forged source still dropped, nothing
offloaded after xl destroy) is proven under the real Xen: tests/e2e."""

import os

import pytest

from tests.rigs.netns import _script
from vif_route_qubes.firewall import nft as N
from vif_route_qubes.system import Result

SCRIPT = _script("vif-route-qubes")

NFT = pytest.mark.parametrize("world", ["nft"], indirect=True)


def test_flowtable_payload_golden():
    assert N.flowtable_payload(["vif3.0", "eth0", "lo", "vif4.0-emu"]) == (
        "add table inet qubes-nat-accel\n"
        "delete table inet qubes-nat-accel\n"
        "table inet qubes-nat-accel {\n"
        "\tflowtable qubes-accel {\n"
        "\t\thook ingress priority filter\n"
        '\t\tdevices = { "eth0", "lo", "vif3.0", "vif4.0-emu" }\n'
        "\t}\n"
        "\tchain qubes-accel {\n"
        "\t\ttype filter hook forward priority filter + 5; policy accept;\n"
        "\t\tmeta l4proto { tcp, udp } iifgroup 2 oifgroup 1 flow add @qubes-accel\n"
        "\t\tcounter\n"
        "\t}\n"
        "}\n"
    )
    # no devices: the table goes (absent-safe), nothing is defined
    assert N.flowtable_payload([]) == "add table inet qubes-nat-accel\ndelete table inet qubes-nat-accel\n"


def test_devices_all_but_the_leaving_vif_none_without_a_vif():
    names = ["all", "default", "lo", "eth0", "vif3.0", "vif4.0"]
    assert N.accel_devices(names) == ["eth0", "lo", "vif3.0", "vif4.0"]
    assert N.accel_devices(names, leaving="vif3.0") == ["eth0", "lo", "vif4.0"]
    # the last vif leaves: no table over the uplink alone
    assert N.accel_devices(["lo", "eth0", "vif3.0"], leaving="vif3.0") == []


def test_unsupported_is_told_from_other_refusals():
    assert N._unsupported("Error: Could not process rule: No such file or directory")
    assert not N._unsupported("Error: Could not process rule: No such device")


class _Recorder:
    """The system seam as accelerate uses it, recording the order of what
    it is asked (pure unit tests: this kernel cannot answer with a
    flowtable; the real one answers under tests/e2e)."""

    dry_run = False
    log = None

    def __init__(self, answers, events):
        self.answers, self.events = list(answers), events

    def read(self, path):
        return None

    def note(self, text):
        self.events.append(("note", text))

    def run(self, argv, data=None, check=True, **kw):
        self.events.append(("run", data))
        code, err = self.answers.pop(0)
        return Result(argv, code, "", err)


def _accel(monkeypatch, tmp_path, answers, listings, leaving=None):
    events = []
    lists = iter(listings)

    def listdir(path):
        assert path == "/proc/sys/net/ipv4/conf"
        events.append(("list",))
        return next(lists)

    monkeypatch.setattr(os, "listdir", listdir)
    backend = N.Backend(_Recorder(answers, events), "test")
    backend.serialize = lambda: events.append(("serialize",))
    done = backend.accelerate(str(tmp_path), leaving=leaving)
    return done, events


def test_interfaces_listed_under_the_exclusive_lock(monkeypatch, tmp_path):
    # two concurrent onlines: the one that listed first must not replace
    # the table last; so the listing waits for the host lock exclusively
    done, events = _accel(monkeypatch, tmp_path, [(0, "")], [["lo", "eth0", "vif3.0"]])
    assert [e[0] for e in events] == ["serialize", "list", "run"]
    assert events[2][1] == N.flowtable_payload(["eth0", "lo", "vif3.0"])
    assert done == "flowtable over 3 interfaces"


def test_a_vanished_interface_is_no_missing_kernel_support(monkeypatch, tmp_path):
    # the kernel says ENOENT for an interface gone between the listing and
    # nft as for a missing flowtable type: the loopback-only probe tells
    # them apart, the table is rebuilt from a new listing, no marker
    enoent = "Error: Could not process rule: No such file or directory"
    done, events = _accel(monkeypatch, tmp_path, [(1, enoent), (0, ""), (0, "")],
                          [["lo", "eth0", "vif3.0", "vif4.0"], ["lo", "eth0", "vif3.0"]])
    assert [e[0] for e in events] == ["serialize", "list", "run", "run", "list", "run"]
    assert events[3][1] == N.ACCEL_PROBE
    assert events[5][1] == N.flowtable_payload(["eth0", "lo", "vif3.0"])
    assert done == "flowtable over 3 interfaces"
    assert not (tmp_path / N.ACCEL_MARKER).exists()


def test_probe_refused_too_leaves_the_marker(monkeypatch, tmp_path):
    enoent = "Error: Could not process rule: No such file or directory"
    done, events = _accel(monkeypatch, tmp_path, [(1, enoent), (1, enoent)], [["lo", "eth0", "vif3.0"]])
    assert [e[0] for e in events] == ["serialize", "list", "run", "run"]
    assert done is None
    assert (tmp_path / N.ACCEL_MARKER).read_text().split()[0] == os.uname().release


def test_probe_payload_leaves_nothing():
    # created and deleted in one transaction, over the loopback only
    assert N.ACCEL_PROBE.rstrip().splitlines()[-1] == "delete table inet vrq-flowtable-probe"
    assert 'devices = { "lo" }' in N.ACCEL_PROBE


def _has_flowtables():
    return os.path.exists("/sys/module/nf_flow_table")


@NFT
def test_without_kernel_support_probed_once_logged_once(world):
    if _has_flowtables():
        pytest.fail("this kernel has nf_flow_table: the flowtable is tested under tests/e2e here")
    log = world.env["VIF_ROUTE_QUBES_HOTPLUG_LOG"]
    os.makedirs(os.path.dirname(log), exist_ok=True)  # the log is written where its directory exists
    marker = os.path.join(world.env["VIF_ROUTE_QUBES_STATE_DIR"], N.ACCEL_MARKER)
    a = world.add_guest(21, ["10.137.0.21"])
    b = world.add_guest(22, ["10.137.0.22"])
    assert world.hotplug(a, "online").returncode == 0
    with open(log) as f:
        told = [line for line in f if "no flowtable support" in line]
    assert len(told) == 1 and " info: " in told[0], told
    with open(marker) as f:
        assert f.read().split()[0] == os.uname().release
    assert world.hotplug(b, "online").returncode == 0
    assert world.hotplug(a, "offline").returncode == 0
    with open(log) as f:
        assert len([line for line in f if "no flowtable support" in line]) == 1
    # the dry run says why no flowtable process runs
    res = world.netvm.exec([SCRIPT, "online", "--dry-run", "type_if=vif"], check=False, env=b.env())
    assert res.returncode == 0, res.stderr
    assert "# flowtable: this kernel has no flowtable support (probed earlier)" in res.stdout
    assert "qubes-nat-accel" not in res.stdout
    nft = world.netvm.exec(["nft", "list", "tables"]).stdout
    assert N.ACCEL_TABLE not in nft
