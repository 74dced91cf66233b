"""--dry-run: prints exactly what a real run applies, and changes nothing.

"What a real run applies" is taken from two independent places: the real
run's own debug log (-v), and small shims put first on PATH that record the
argv and stdin every ip/iptables-restore/ip6tables-restore/conntrack call
really received before handing it to the real command.
"""

import os
import shutil
import stat

import pytest

from tests.rigs.netns import _script

SCRIPT = _script("vif-route-qubes")
READS = ("ip -j ", "iptables-save", "ip6tables-save", "nft -j list", "nft list")
SHIMMED = ("ip", "iptables-restore", "ip6tables-restore", "conntrack", "iptables-save", "ip6tables-save", "nft")
BOTH = pytest.mark.parametrize("world", ["iptables", "nft"], indirect=True)
FIREWALL_CMD = {"iptables": "iptables-restore", "nft": "nft"}


def tables_made(world):
    """The nft tables or the iptables guard chain exist (made once per host,
    by the first online, which reads the kernel for it): the steady state,
    where a run is exactly the transaction its dry run prints."""
    other = world.add_guest(9, ["10.137.0.19"])
    assert world.hotplug(other, "online").returncode == 0
    assert world.hotplug(other, "offline").returncode == 0


def cli(world, guest, *args, env=None, path=None):
    # PATH set inside the namespace, so `ip netns exec` itself is not shimmed
    pre = ["env", f"PATH={path}"] if path else []
    return world.netvm.exec([*pre, SCRIPT, *args], check=False, env=env or guest.env())


def parse_dry_run(text):
    """Dry-run output -> [(kind, what, data)]; comments dropped."""
    actions, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith("$ "):
            cmd = line[2:]
            if cmd.endswith(" <<'EOF'"):
                data = []
                while lines[i] != "EOF":
                    data.append(lines[i])
                    i += 1
                i += 1
                actions.append(("run", cmd[: -len(" <<'EOF'")], "".join(d + "\n" for d in data)))
            else:
                actions.append(("run", cmd, ""))
        elif line.startswith("write "):
            actions.append(("write", line[len("write "):], ""))
        elif line.startswith("xenstore-write "):
            actions.append(("xenstore-write", line[len("xenstore-write "):], ""))
        else:
            assert line.startswith("#") or not line, f"unexplained dry-run line: {line!r}"
    return actions


def parse_debug_log(stderr, tag="vif-route-qubes"):
    """The real run's -v output -> the same [(kind, what, data)]."""
    prefix = f"{tag}: debug: "
    actions = []
    for line in stderr.splitlines():
        if not line.startswith(prefix):
            continue
        msg = line[len(prefix):]
        if msg.startswith("run: "):
            cmd = msg[len("run: "):]
            if " <<" in cmd:
                cmd = cmd.rsplit(" <<", 1)[0]
            actions.append(["run", cmd, ""])
        elif msg.startswith("  | "):
            actions[-1][2] += msg[4:] + "\n"
        elif msg.startswith("write "):
            actions.append(["write", msg[len("write "):], ""])
        elif msg.startswith("xenstore-write "):
            actions.append(["xenstore-write", msg[len("xenstore-write "):], ""])
    return [tuple(a) for a in actions]


@pytest.fixture
def shims(tmp_path):
    """A directory of recording shims; returns (bin dir, reader)."""
    bindir, logdir = tmp_path / "shim-bin", tmp_path / "shim-log"
    bindir.mkdir()
    logdir.mkdir()
    for name in SHIMMED:
        real = shutil.which(name)
        assert real, f"{name} is needed"
        shim = bindir / name
        shim.write_text(
            "#!/bin/sh\n"
            f'rec=$(mktemp -p {logdir} "$(date +%s%N).XXXXXX")\n'
            f'{{ printf "%s" "{name}"; for a in "$@"; do printf " %s" "$a"; done; printf "\\n"; }} > "$rec.argv"\n'
            'cat > "$rec"\n'
            f'"{real}" "$@" < "$rec"\n'
        )
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    def calls(reads=False):
        """The calls that change something (with reads=True: all of them).
        The reads (ip -j, iptables-save) run in a dry run too, so the plan
        printed is the one a real run would choose."""
        found = []
        for entry in sorted(os.listdir(logdir)):
            if entry.endswith(".argv"):
                continue
            argv = (logdir / f"{entry}.argv").read_text().rstrip("\n")
            if reads or not argv.startswith(READS):
                found.append(("run", argv, (logdir / entry).read_text()))
        return found

    return str(bindir), calls


def with_conntrack_entries(world):
    """Make the netvm track connections, so online has conntrack purges to
    run (an empty table is skipped, rightly, and would test nothing)."""
    world.netvm.exec(["iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "NEW,ESTABLISHED", "-j", "ACCEPT"])
    world.upstream.exec([os.sys.executable, "-c",
                         "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                         f"[s.sendto(b'x', ('{world.UPLINK_NETVM}', 9)) for _ in range(3)]"])
    count = world.netvm.read("/proc/sys/net/netfilter/nf_conntrack_count").strip()
    assert int(count) > 0, "the netvm should track at least one connection"


@BOTH
@pytest.mark.parametrize("command", ["online", "offline"])
def test_dry_run_changes_nothing(world, command):
    tables_made(world)
    g = world.add_guest(3, ["10.137.0.12", "fd09:24ef:4179::a89:e"])
    os.makedirs(os.path.dirname(world.env["VIF_ROUTE_QUBES_HOTPLUG_LOG"]))
    if command == "offline":
        assert world.hotplug(g, "online").returncode == 0
        world.xs.rm(f"/local/domain/0/{g.xenbus_path}/hotplug-status")
    hotplug_log = world.env["VIF_ROUTE_QUBES_HOTPLUG_LOG"]
    log_before = open(hotplug_log).read() if os.path.exists(hotplug_log) else None
    before = world.snapshot()
    res = cli(world, g, command, "--dry-run", "type_if=vif")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"# vif-route-qubes {command} (dry run: nothing is changed)\n")
    assert f"$ {FIREWALL_CMD[world.firewall]}" in res.stdout and "$ ip" in res.stdout
    assert f"# firewall: {world.firewall} backend (VIF_ROUTE_QUBES_FIREWALL={world.firewall})" in res.stdout
    assert world.snapshot() == before
    assert world.xs.read(f"/local/domain/0/{g.xenbus_path}/hotplug-status") is None
    # not even the logs: a dry run leaves no trace
    log_after = open(hotplug_log).read() if os.path.exists(hotplug_log) else None
    assert log_after == log_before


@BOTH
@pytest.mark.parametrize("command", ["online", "offline"])
def test_dry_run_text_is_what_the_real_run_applies(world, shims, command):
    bindir, recorded = shims
    tables_made(world)
    with_conntrack_entries(world)
    g = world.add_guest(3, ["10.137.0.12", "fd09:24ef:4179::a89:e"])
    world.xs.write("/local/domain/0/qubes_netvm_gateway6", "fd09:24ef:4179::1")
    if command == "offline":
        assert world.hotplug(g, "online").returncode == 0
    path = f"{bindir}:{g.env()['PATH']}"

    dry = cli(world, g, command, "-n", "type_if=vif", path=path)
    assert dry.returncode == 0, dry.stderr
    planned = parse_dry_run(dry.stdout)
    assert recorded() == [], "the dry run ran a mutating command"

    real = cli(world, g, command, "-v", "type_if=vif", path=path)
    assert real.returncode == 0, real.stderr
    # the reads run in both (the dry run's plan is the real run's choice)
    logged = [a for a in parse_debug_log(real.stderr) if not a[1].startswith(READS)]

    # the same actions in the same order, the same payload text
    assert logged == planned
    kinds = [k if k != "run" else what.split()[0] for k, what, _ in planned]
    if command == "online":
        # firewall before conntrack before the link, XenStore last
        assert kinds.index(FIREWALL_CMD[world.firewall]) < kinds.index("conntrack") < kinds.index("ip")
        assert kinds[-1] == "xenstore-write"
        assert ("xenstore-write", f"{g.xenbus_path}/hotplug-status connected", "") in planned
        assert world.xs.read(f"/local/domain/0/{g.xenbus_path}/hotplug-status") == b"connected"
    else:
        assert "conntrack" in kinds and "ip" in kinds
    # and what the commands really received on argv and stdin (parallel
    # starts may reach the shims in either order)
    runs = [a for a in planned if a[0] == "run"]
    assert sorted(recorded()) == sorted(runs)
    for _, what, data in runs:
        if what.startswith(("iptables-restore", "ip6tables-restore")):
            assert data.startswith("*raw\n") and data.endswith("COMMIT\n")
        if what == "nft -f -":
            assert ("add element" if command == "online" else "delete element") in data
        if what == "ip -batch -":
            assert "route replace 10.137.0.12/32 dev vif3.0 metric 32749\n" in data
