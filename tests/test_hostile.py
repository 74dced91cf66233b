"""Hostile input, table-driven, against the real commands in a namespace.

Every case: exit 1, one line of reason on stderr (no traceback), the Xen
failure protocol (hotplug-error + hotplug-status=error) wherever
XENBUS_PATH is a valid backend path, nothing written to XenStore where it
is not, and the netvm exactly as before.

The namespaces and XenStore are shared by the whole table (nothing of it
may change anything, and that is checked after every case); each case
starts from a freshly written backend directory.
"""

import os

import pytest

from tests.rigs.netns import World, _script, comparable
from tests.rigs.xenstored import XenStored

SCRIPT = _script("vif-route-qubes")
GUEST_IP = "10.137.0.12"
XP = "backend/vif/3/0"
BASE = f"/local/domain/0/{XP}"
GATEWAY = "10.137.0.1"

GARBAGE = "".join(chr(33 + (i * 7) % 94) for i in range(4000))  # printable, shell metacharacters
MISSING = object()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (network namespaces, iptables)")
    tmp = tmp_path_factory.mktemp("hostile")
    xs = XenStored(str(tmp / "xenstored.sock")).start()
    try:
        world = World(xs, tmp)
        try:
            guest = world.add_guest(3, [GUEST_IP])
            world.before = comparable(world.snapshot())
            yield world, guest
        finally:
            world.close()
    finally:
        xs.stop()


@pytest.fixture
def fresh(shared):
    world, guest = shared
    xs = world.xs
    xs.rm("/local/domain/0/backend")
    for key, value in (("ip", GUEST_IP), ("mac", guest.mac), ("frontend-id", "3"), ("handle", "0"),
                       ("type", "vif"), ("script", "/etc/xen/scripts/vif-route-qubes")):
        xs.write(f"{BASE}/{key}", value)
    xs.write("/local/domain/0/qubes_netvm_gateway", GATEWAY)
    xs.rm("/local/domain/0/qubes_netvm_gateway6")
    return world, guest


# (id, XenStore changes {path under BASE or absolute: value | MISSING},
#  environment changes {name: value | MISSING}, words, reported at, text)
CASES = [
    # -- the guest's addresses
    ("ip-4000-garbage", {"ip": GARBAGE}, {}, (), XP, "is not an IP address"),
    ("ip-shell-command", {"ip": "10.0.0.1; reboot"}, {}, (), XP, "is not an IP address"),
    ("ip-substitution", {"ip": "$(id)"}, {}, (), XP, "is not an IP address"),
    ("ip-backticks", {"ip": "10.137.0.12 `reboot`"}, {}, (), XP, "is not an IP address"),
    ("ip-arabic-digits", {"ip": "١٠.١٣٧.٠.١٢"}, {}, (), XP, "is not an IP address"),
    ("ip-fullwidth-digits", {"ip": "１０.１３７.０.１２"}, {}, (), XP, "is not an IP address"),
    ("ip-control-chars", {"ip": "\x1b[2J\x07"}, {}, (), XP, "is not an IP address"),
    ("ip-octal-looking", {"ip": "010.137.0.12"}, {}, (), XP, "is not an IP address"),
    ("ip-scoped", {"ip": "fd00::1%vif3.0"}, {}, (), XP, "is not an IP address"),
    ("ip-duplicated", {"ip": "10.137.0.12 10.137.0.12"}, {}, (), XP, "given twice"),
    ("ip-duplicated-v6-spelling", {"ip": "fd00::1 fd00:0::0001"}, {}, (), XP, "given twice"),
    ("ip-network", {"ip": "10.0.0.0/24"}, {}, (), XP, "is a network"),
    ("ip-v4-mapped", {"ip": "::ffff:10.1.1.1"}, {}, (), XP, "IPv4-mapped"),
    ("ip-link-local-v4", {"ip": "169.254.0.1"}, {}, (), XP, "link-local"),
    ("ip-link-local-v6", {"ip": "fe80::1"}, {}, (), XP, "link-local"),
    ("ip-multicast-v4", {"ip": "224.0.0.1"}, {}, (), XP, "multicast"),
    ("ip-multicast-v6", {"ip": "ff02::1"}, {}, (), XP, "multicast"),
    ("ip-unspecified", {"ip": "0.0.0.0"}, {}, (), XP, "unspecified"),
    ("ip-loopback", {"ip": "127.0.0.1"}, {}, (), XP, "loopback"),
    ("ip-broadcast", {"ip": "255.255.255.255"}, {}, (), XP, "not usable"),
    ("ip-too-many", {"ip": " ".join(f"10.137.1.{i}" for i in range(1, 66))}, {}, (), XP, "at most 64"),
    ("ip-empty", {"ip": ""}, {}, (), XP, "no address given"),
    ("ip-blank", {"ip": " \t "}, {}, (), XP, "no address given"),
    ("ip-word-hostile", {}, {}, ("ip=10.0.0.1;reboot",), XP, "argument ip=: '10.0.0.1;reboot' is not an IP address"),
    # -- the guest's MAC
    ("mac-garbage", {"mac": "zz:zz:zz:zz:zz:zz"}, {}, (), XP, "is not a MAC address"),
    ("mac-shell", {"mac": "00:16:3e:5e:03:00; reboot"}, {}, (), XP, "is not a MAC address"),
    ("mac-multicast", {"mac": "01:00:5e:00:00:01"}, {}, (), XP, "multicast MAC"),
    ("mac-zero", {"mac": "00:00:00:00:00:00"}, {}, (), XP, "all-zero"),
    ("mac-empty", {"mac": ""}, {}, (), XP, "is not a MAC address"),
    ("mac-missing", {"mac": MISSING}, {}, (), XP, "mac: missing"),
    # -- the name to rename to
    ("vifname-space", {"vifname": "a b"}, {}, (), XP, "not a valid interface name"),
    ("vifname-wildcard", {"vifname": "x+"}, {}, (), XP, "not a valid interface name"),
    ("vifname-20-chars", {"vifname": "a" * 20}, {}, (), XP, "not a valid interface name"),
    ("vifname-path", {"vifname": "../x"}, {}, (), XP, "not a valid interface name"),
    ("vifname-option", {"vifname": "-x"}, {}, (), XP, "not a valid interface name"),
    ("vifname-existing", {"vifname": "eth0"}, {}, (), XP, "already exists"),
    ("vifname-loopback", {"vifname": "lo"}, {}, (), XP, "already exists"),
    # -- other backend keys and the netvm's own
    ("frontend-id-other", {"frontend-id": "7"}, {}, (), XP, "frontend-id is 7"),
    ("frontend-id-garbage", {"frontend-id": "3; x"}, {}, (), XP, "is not a domain id"),
    ("type-garbage", {"type": "bridge; rm -rf /"}, {}, (), XP, "is not vif or vif_ioemu"),
    ("gateway-garbage", {"/local/domain/0/qubes_netvm_gateway": "10.137.0.1; x"}, {}, (), XP,
     "qubes_netvm_gateway"),
    ("gateway-is-the-guest", {"/local/domain/0/qubes_netvm_gateway": GUEST_IP}, {}, (), XP,
     f"qubes_netvm_gateway {GUEST_IP} is also an address of the guest"),
    ("gateway6-is-v4", {"/local/domain/0/qubes_netvm_gateway6": "10.0.0.1"}, {}, (), XP,
     "not an IPv6 address"),
    # -- the environment
    ("vif-empty", {}, {"vif": ""}, (), None, "vif is not set"),
    ("vif-missing", {}, {"vif": MISSING}, (), None, "vif is not set"),
    ("vif-eth0", {}, {"vif": "eth0"}, (), None, "not an interface name"),
    ("vif-huge-domid", {}, {"vif": "vif99999.0"}, (), None, "above 32752"),
    ("vif-shell", {}, {"vif": "vif3.0; reboot"}, (), None, "not an interface name"),
    ("vif-leading-zero", {}, {"vif": "vif03.0"}, (), None, "not an interface name"),
    ("vif-not-utf8", {}, {"vif": b"vif3.0\xff"}, (), None, "not an interface name"),
    ("vif-word", {}, {}, ("vif=eth0",), None, "not an interface name"),
    ("xenbus-path-empty", {}, {"XENBUS_PATH": ""}, (), None, "XENBUS_PATH is not set"),
    ("xenbus-path-missing", {}, {"XENBUS_PATH": MISSING}, (), None, "XENBUS_PATH is not set"),
    ("xenbus-path-dotdot", {}, {"XENBUS_PATH": f"{XP}/../x"}, (), None, "not a valid XenStore path"),
    ("xenbus-path-trailing-slash", {}, {"XENBUS_PATH": f"{XP}/"}, (), None, "not a valid XenStore path"),
    ("xenbus-path-vbd", {}, {"XENBUS_PATH": "backend/vbd/3/51712"}, (), None, "not a vif backend path"),
    # a mistyped manual run: another device's healthy directory is not
    # touched, and one that does not exist is not created
    ("xenbus-path-other-domain", {}, {"XENBUS_PATH": "backend/vif/4/0"}, (), None, "does not match"),
    ("xenbus-path-other-healthy", {"/local/domain/0/backend/vif/5/0/hotplug-status": "connected"},
     {"vif": "vif6.0", "XENBUS_PATH": "backend/vif/5/0"}, (), None, "does not match"),
    ("vif-eth0-other-healthy", {"/local/domain/0/backend/vif/5/0/hotplug-status": "connected"},
     {"vif": "eth0", "XENBUS_PATH": "backend/vif/5/0"}, (), None, "not an interface name"),
    ("vif-no-devid-other-healthy", {"/local/domain/0/backend/vif/5/0/hotplug-status": "connected"},
     {"vif": "vif5", "XENBUS_PATH": "backend/vif/5/0"}, (), None, "not an interface name"),
    ("backend-dir-absent", {}, {"vif": "vif3.1", "XENBUS_PATH": "backend/vif/3/1"}, (), None,
     "backend/vif/3/1/mac: missing"),
    ("xenstored-path-empty", {}, {"XENSTORED_PATH": ""}, (), None,
     "(XENSTORED_PATH is not set, no socket at /var/run/xenstored/socket, no /dev/xen/xenbus, "
     "then /proc/xen/xenbus)"),
    ("xs-timeout-garbage", {}, {"VIF_ROUTE_QUBES_XS_TIMEOUT": "soon"}, (), None,
     "VIF_ROUTE_QUBES_XS_TIMEOUT='soon'"),
    ("xs-timeout-inf", {}, {"VIF_ROUTE_QUBES_XS_TIMEOUT": "inf"}, (), None,
     "VIF_ROUTE_QUBES_XS_TIMEOUT='inf'"),
    ("lock-timeout-garbage", {}, {"VIF_ROUTE_QUBES_LOCK_TIMEOUT": "-1"}, (), XP,
     "VIF_ROUTE_QUBES_LOCK_TIMEOUT='-1'"),
    ("lock-is-a-directory", {}, {"VIF_ROUTE_QUBES_LOCK": "/"}, (), XP, "cannot open the lock file /"),
    ("state-dir-unwritable", {}, {"VIF_ROUTE_QUBES_STATE_DIR": "/proc/vrq-state"}, (), XP,
     "cannot open the lock file /proc/vrq-state/lock"),
    ("iptables-backend-garbage", {}, {"VIF_ROUTE_QUBES_IPTABLES": "bogus"}, (), None,
     "VIF_ROUTE_QUBES_IPTABLES='bogus'"),
    # -- argv
    ("word-not-key-value", {}, {}, ("1x=y",), None, "is not of the form key=value"),
    ("two-commands", {}, {}, ("offline",), None, "two commands given"),
]


def _apply(world, guest, xs_changes, env_changes):
    for key, value in xs_changes.items():
        path = key if key.startswith("/") else f"{BASE}/{key}"
        if value is MISSING:
            world.xs.rm(path)
        else:
            world.xs.write(path, value)
    env = guest.env()
    for key, value in env_changes.items():
        if value is MISSING:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.mark.parametrize("xs_changes,env_changes,words,reported,text",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_cleanly(fresh, xs_changes, env_changes, words, reported, text):
    world, guest = fresh
    env = _apply(world, guest, xs_changes, env_changes)
    store_before = world.xs.dump()
    res = world.netvm.exec([SCRIPT, "online", "type_if=vif", *words], check=False, env=env)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vif-route-qubes: "), res.stderr
    assert text in lines[0], lines[0]
    assert len(lines[0]) < 1200, "the reason quotes hostile input without bound"
    store = world.xs.dump()
    if reported:
        base = f"/local/domain/0/{reported}"
        assert store.get(f"{base}/hotplug-status") == b"error"
        error = store.get(f"{base}/hotplug-error", b"").decode()
        assert text in error and "\n" not in error and len(error) <= 1000, error
        store.pop(f"{base}/hotplug-status")
        store.pop(f"{base}/hotplug-error")
        for parent in (f"{base}", "/local/domain/0/backend/vif/4"):
            if parent not in store_before:
                store.pop(parent, None)
    assert store == store_before, "XenStore changed beyond the failure report"
    assert comparable(world.snapshot()) == world.before


def test_unknown_key_value_words_are_ignored(fresh):
    world, guest = fresh
    words = ["script=/etc/xen/scripts/vif-route-qubes", "netdev=", "foo=bar", "x_y-z=$(reboot)",
             "bridge=xenbr0; reboot"]
    res = world.netvm.exec([SCRIPT, "online", "type_if=vif", *words], check=False, env=guest.env())
    assert res.returncode == 0, res.stderr
    assert world.xs.read(f"{BASE}/hotplug-status") == b"connected"
    assert GUEST_IP in world.netvm.ip("route", "show", "dev", guest.vif).stdout
    res = world.netvm.exec([SCRIPT, "offline", "type_if=vif", *words], check=False, env=guest.env())
    assert res.returncode == 0, res.stderr
    assert comparable(world.snapshot()) == world.before


def test_missing_environment_entirely(fresh):
    """Run by hand with nothing exported: a reason, nowhere to report it."""
    world, _ = fresh
    store_before = world.xs.dump()
    env = {"PATH": os.environ["PATH"], "XENSTORED_PATH": world.env["XENSTORED_PATH"]}
    for command in ("online", "offline"):
        res = world.netvm.exec([SCRIPT, command], check=False, env=env)
        assert res.returncode == 1
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and "vif is not set" in lines[0], res.stderr
    assert world.xs.dump() == store_before
    assert comparable(world.snapshot()) == world.before


def test_offline_with_hostile_xenstore_values_still_cleans_up(fresh):
    """Values that went bad between online and offline cannot keep a
    guest's rules alive: the record is what offline trusts."""
    world, guest = fresh
    assert world.netvm.exec([SCRIPT, "online"], check=False, env=guest.env()).returncode == 0
    world.xs.write(f"{BASE}/ip", GARBAGE)
    world.xs.write(f"{BASE}/vifname", "../x")
    world.xs.write("/local/domain/0/qubes_netvm_gateway", "$(id)")
    res = world.netvm.exec([SCRIPT, "offline"], check=False, env=guest.env())
    assert res.returncode == 0, res.stderr
    assert comparable(world.snapshot()) == world.before


def test_dry_run_never_changes_anything(fresh):
    """The click path: --dry-run prints what online/offline would do and
    leaves host, XenStore and state records alone, for good and bad input."""
    world, guest = fresh
    store_before = world.xs.dump()
    res = world.netvm.exec([SCRIPT, "online", "--dry-run", "type_if=vif"], check=False, env=guest.env())
    assert res.returncode == 0, res.stderr
    assert "iptables-restore" in res.stdout and f"route replace {GUEST_IP}/32" in res.stdout
    assert world.xs.dump() == store_before
    assert comparable(world.snapshot()) == world.before
    world.xs.write(f"{BASE}/ip", "10.0.0.1; reboot")
    store_before = world.xs.dump()
    res = world.netvm.exec([SCRIPT, "online", "-n"], check=False, env=guest.env())
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert world.xs.dump() == store_before
    assert comparable(world.snapshot()) == world.before
    # offline --dry-run of a guest that is really online removes nothing
    world.xs.write(f"{BASE}/ip", GUEST_IP)
    assert world.netvm.exec([SCRIPT, "online"], check=False, env=guest.env()).returncode == 0
    up = comparable(world.snapshot())
    res = world.netvm.exec([SCRIPT, "offline", "--dry-run"], check=False, env=guest.env())
    assert res.returncode == 0, res.stderr
    assert comparable(world.snapshot()) == up
    assert world.netvm.exec([SCRIPT, "offline"], check=False, env=guest.env()).returncode == 0
    assert comparable(world.snapshot()) == world.before


def test_undecodable_bytes_with_debug_logging_on(fresh, tmp_path):
    """Bytes that are not UTF-8 in the environment and argv, with every
    line going to the hotplug log: escaped in the log, not a traceback."""
    world, guest = fresh
    log = tmp_path / "xen" / "xen-hotplug.log"
    log.parent.mkdir()
    env = guest.env(vif=b"vif3.0\xff", VIF_ROUTE_QUBES_DEBUG="1", VIF_ROUTE_QUBES_HOTPLUG_LOG=str(log))
    res = world.netvm.exec([SCRIPT.encode(), b"online", b"type_if=vif", b"foo=\xfe\nforged line"],
                           check=False, env=env, text=False)
    stderr = res.stderr.decode(errors="replace")
    assert res.returncode == 1 and "Traceback" not in stderr, stderr
    text = log.read_text()
    assert "foo=\\udcfe\\nforged line" in text and "is not an interface name" in text
    assert not any(line.startswith("forged line") for line in text.splitlines())
    # vif does not name this device: nothing is reported into its directory
    assert world.xs.read(f"{BASE}/hotplug-status") is None
    assert comparable(world.snapshot()) == world.before
