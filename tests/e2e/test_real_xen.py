"""Proof under a real Xen: pytest view of tests/e2e/e2e.py.

One module-scoped run of the runner (build or reuse cached images, boot Xen
4.17 + a Debian PV dom0 under qemu TCG, run dom0/checks.sh), then one test
per check parsed from the serial log. When the runner cannot build or boot,
every test FAILS with the runner's message: nothing is skipped.

Needs root, qemu-system-x86, debootstrap, busybox-static, cpio, zstd and
Debian's package archive (cold build only). See tests/e2e/README.md.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.e2e

# dom0 as the backend: the same checks once per firewall backend, named
# "<backend>-..." (dom0/checks.sh, dom0_round)
GUEST_CHECKS = ["hotplug-status", "route", "gateway-addr", "neighbour", "proxy-arp",
                "guard", "state-record", "offline-clean"]
BACKENDS = ("iptables", "nft")


def dom0_round(fw):
    return (
        [f"{fw}-dnat-setup", f"{fw}-dnat-unchanged", f"{fw}-g1-create", f"{fw}-g2-create"]
        + [f"{fw}-{g}-{c}" for g in ("g1", "g2") for c in GUEST_CHECKS]
        + [f"{fw}-guest-g1-ping-gateway", f"{fw}-guest-g2-ping-gateway", f"{fw}-guest-g1-dns",
           f"{fw}-guest-g2-dns", f"{fw}-guest-g1-forged-source", f"{fw}-dns-reached-upstream",
           f"{fw}-forged-source-dropped", f"{fw}-ipv6-dropped",
           f"{fw}-bad-ip-create-fails", f"{fw}-bad-ip-hotplug-error", f"{fw}-bad-ip-nothing-left",
           f"{fw}-no-guard-left"]
        # the iptables guard's default deny outlives the last vif
        + ([f"{fw}-guard-stays"] if fw == "iptables" else [])
    )


CHECKS = (
    ["xen-up", "drop-in-installed", "packages-installed", "netvm-keys"]
    + [c for fw in BACKENDS for c in dom0_round(fw)]
    + ["nft-dnat-moved-from-iptables", "debug-log"]
)
# the seed's layout: a netvm driver domain, AppVMs behind it, dom0 attached
# through it by qvm-dom0-network-via-netvm (dom0/netvm.sh, domu/*), with the
# netvm's backend (VRQ_E2E_FIREWALL; unset or auto: nft, which the image
# has); then the netvm moves to the other backend and AppVM a3 runs with it
NETVM_FW = "iptables" if os.environ.get("VRQ_E2E_FIREWALL") == "iptables" else "nft"
OTHER_FW = "nft" if NETVM_FW == "iptables" else "iptables"
NETVM_CHECKS = (
    ["netvm-keys-written", "netvm-create", "netvm-dnat", "dom0-no-route-before-up",
     "a1-create", "a2-create"]
    + [f"{g}-{c}" for g in ("a1", "a2") for c in ("hotplug-in-netvm", "keys-perms", "no-script-in-dom0")]
    + ["netvm-routing-table", f"netvm-{NETVM_FW}-guard"]
    # the flowtable (nft's table inet qubes-nat-accel): both vifs and the
    # uplink (group 1) in it after online
    + (["netvm-flowtable-devices"] if NETVM_FW == "nft" else [])
    + [f"appvm-{g}-{c}" for g in ("a1", "a2") for c in ("setup-ip", "keys-private", "reach-upstream", "dns")]
    + ["appvm-a2-forged-source", "appvm-dns-upstream", "appvm-forged-dropped-in-netvm",
       "dom0-up", "libxl-empty-hotplug-status", "appvms-paused-during-up", "a1-no-ticks-while-paused",
       "dom0-reaches-upstream-after-up", "dom0-resolves-after-up", "dom0-status", "dom0-up-twice",
       "netvm-routes-dom0", "dom0-down", "dom0-no-route-after-down", "dom0-resolv-restored",
       "down-unpauses-only-its-own", "a1-ticks-after-down", "dom0-down-twice",
       "netvm-clean-after-down"]
    # a1's TCP flow upstream [OFFLOAD]ed in the netvm's conntrack, its packets
    # past the forward hook, a forged source from a1 dropped meanwhile
    + (["netvm-flow-offloaded", "netvm-flow-forged-dropped", "netvm-flow-bypasses-forward"]
       if NETVM_FW == "nft" else [])
    + ["netvm-clean-after-destroy", "netvm-no-route-after-destroy"]
    # xl destroy a1 with the flow alive: its vif out of the flowtable, no
    # conntrack entry of its address
    + (["netvm-flowtable-after-destroy"] if NETVM_FW == "nft" else [])
    + [f"netvm-{OTHER_FW}-{c}" for c in (
        "switch", "a3-create", "a3-hotplug-in-netvm", "a3-guard", "appvm-a3-setup-ip",
        "appvm-a3-keys-private", "appvm-a3-reach-upstream", "appvm-a3-dns", "appvm-a3-forged-source",
        "dns-upstream", "forged-dropped-in-netvm", "clean-after-destroy")]
    # qvm-set-default-netvm: refusals, then a3 (vif line: ip= only) served by
    # the netvm, then d1 (the same) by dom0
    + ["set-default-netvm-refuses", "set-default-netvm", "default-netvm-a3-served-by-netvm",
       "set-default-netvm-dom0", "default-dom0-d1-served-by-dom0", "default-dom0-d1-hotplug-in-dom0",
       "default-dom0-guest-d1-ping-gateway", "default-dom0-guest-d1-forged-source"]
)
CHECKS = CHECKS + NETVM_CHECKS
CHECK_RE = re.compile(r"^E2E CHECK (\S+) (PASS|FAIL)\b ?(.*)$", re.M)


class Run:
    def __init__(self, rc, log_text, output):
        self.rc = rc
        self.log = log_text
        self.output = output
        self.checks = {}
        for m in CHECK_RE.finditer(log_text):
            self.checks.setdefault(m.group(1), (m.group(2), m.group(3)))

    def why(self):
        tail = "\n".join(self.output.splitlines()[-15:])
        return f"runner exit {self.rc}; last output:\n{tail}"


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    log = tmp_path_factory.mktemp("e2e") / "serial.log"
    timeout = int(os.environ.get("VRQ_E2E_TIMEOUT", "600"))
    cmd = [sys.executable, str(HERE / "e2e.py"), "--log", str(log), "--timeout", str(timeout)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 900)
        rc, output = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, output = "timeout", f"runner did not finish: {e}"
    sys.stderr.write(output)
    text = log.read_text(errors="replace").replace("\r", "") if log.exists() else ""
    return Run(rc, text, output)


@pytest.mark.parametrize("name", CHECKS)
def test_check(e2e_run, name):
    if name not in e2e_run.checks:
        pytest.fail(f"check {name} not reported in the serial log ({e2e_run.why()})")
    status, detail = e2e_run.checks[name]
    assert status == "PASS", f"{name}: {detail}"


def test_no_unexpected_failures(e2e_run):
    """Checks this file does not list by name (extra guest checks...) must pass too."""
    bad = {n: d for n, (s, d) in e2e_run.checks.items() if s != "PASS"}
    assert e2e_run.checks, f"no checks reported ({e2e_run.why()})"
    assert not bad, bad


def test_result_and_exit_status(e2e_run):
    passed = "E2E RESULT PASS" in e2e_run.log
    assert passed, e2e_run.why()
    assert e2e_run.rc == 0, e2e_run.why()
