"""Start-up regression guard for the hotplug fast path. Not a timing test:
it checks the two things that decide start-up cost and that a harmless
looking change can silently undo.

1. Which modules a hotplug run loads. ``click`` (only for ``--help`` and
   friends) and ``urllib.request`` (pulled in by ``plumbum.path.local``, and
   with it ``http.client``, ``email`` and ``ssl``) cost tens of milliseconds;
   none of them may be loaded by ``import vif_route_qubes.hotplug`` or by a
   real ``online``/``offline`` run. (``vif_route_qubes._plumbum`` puts a
   stand-in object under the name ``urllib.request`` while plumbum imports;
   the checks look for the real modules behind it: ``http.client``,
   ``email``, ``ssl`` and a ``urllib.request`` that is a file-backed module.)

2. How many processes a run starts, counted from outside with
   ``strace -f -e trace=execve`` (strace must be installed: it is in the CI
   package list for this reason). Successful ``execve`` calls of
   ``ip netns exec NETVM vif-route-qubes online type_if=vif``, one vif with
   one IPv4 address, empty conntrack table:

   ==========================  =====  =======
   program                     online offline
   ==========================  =====  =======
   ip (the netns exec wrapper)   1      1
   vif-route-qubes (python)      1      1
   ip -j -batch (the vif's state) 1     1
   iptables-restore              1      1
   ip6tables-restore             1      1
   ip (-batch / -force -batch)   1      1
   ==========================  =====  =======

   i.e. at most 4 helper programs per run, and nothing else (the read is
   what lets online converge and offline remove exactly what the kernel
   shows, issue 11; a run that finds stale state adds one ``ip -batch``
   that removes it before the firewall changes): in particular
   not ``uname -p``, which plumbum's ``LocalMachine.uname =
   platform.uname()[0]`` runs at import unless ``_plumbum`` fills platform's
   lazy ``processor`` field first (indexing ``uname_result`` evaluates it).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

PY = sys.executable
HEAVY = ("urllib.request", "http.client", "email", "ssl", "click")
HELPERS_ONLINE = {"iptables-restore", "ip6tables-restore", "ip"}
HELPERS_OFFLINE = {"iptables-restore", "ip6tables-restore", "ip"}
MAX_HELPERS = 4  # the vif's state read (ip -j), both firewall families, the ip batch
# (once the guard chain exists: the very first online on a host also reads
# iptables-save and creates it)
# the nft backend: one transaction for both families (once its tables
# exist: the very first online on a host also reads and creates them)
NFT_HELPERS = {"nft", "ip"}
NFT_MAX_HELPERS = 3  # the state read, one nft transaction, the ip batch

# Records the modules loaded when the process exits (after main()'s sys.exit)
# and whether "urllib.request" is the real, file-backed module.
WRAPPER = r"""
import atexit, json, sys
out = sys.argv[1]
def dump():
    real = getattr(sys.modules.get("urllib.request"), "__file__", None)
    with open(out, "w") as f:
        json.dump({"modules": sorted(sys.modules), "real_urllib_request": bool(real)}, f)
atexit.register(dump)
sys.argv = ["vif-route-qubes"] + sys.argv[2:]
from vif_route_qubes.entry import main
main()
"""


def heavy(report):
    found = sorted(m for m in report["modules"]
                   if any(m == h or m.startswith(h + ".") for h in HEAVY if h != "urllib.request"))
    if report["real_urllib_request"]:
        found.append("urllib.request")
    return found


def status(world, guest):
    value = world.xs.read(f"/local/domain/0/{guest.xenbus_path}/hotplug-status")
    return value.decode() if value is not None else None


def script():
    path = os.path.join(os.path.dirname(PY), "vif-route-qubes")
    assert os.path.exists(path), f"{path}: the console script is not installed next to {PY}"
    return path


# ----------------------------------------------------------------------------
# 1. modules


def test_importing_the_entry_point_loads_no_heavy_module(tmp_path):
    out = tmp_path / "modules.json"
    code = WRAPPER.replace("from vif_route_qubes.entry import main\nmain()\n",
                           "import vif_route_qubes.entry\n")
    res = subprocess.run([PY, "-c", code, str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert {"vif_route_qubes.entry", "vif_route_qubes.hotplug"} <= set(report["modules"])
    assert heavy(report) == []
    # plumbum and pyxs are imported when first needed, not by the import
    assert not [m for m in report["modules"] if m.split(".")[0] in ("plumbum", "pyxs")]


def test_machine_form_noop_does_not_import_click(tmp_path):
    """``add type_if=vif`` does nothing (Xen's pairing) but goes through the
    same main() -> run() path as libxl's calls."""
    out = tmp_path / "modules.json"
    env = dict(os.environ, VIF_ROUTE_QUBES_SYSLOG=str(tmp_path / "no-syslog"),
               VIF_ROUTE_QUBES_HOTPLUG_LOG=str(tmp_path / "xen" / "log"))
    res = subprocess.run([PY, "-c", WRAPPER, str(out), "add", "type_if=vif"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert heavy(report) == []


@pytest.mark.parametrize("command", ["online", "offline"])
def test_a_real_run_loads_no_heavy_module(world, tmp_path, command):
    g = world.add_guest(7, ["10.137.0.17"])
    if command == "offline":
        res = world.hotplug(g, "online")
        assert res.returncode == 0, res.stderr
    out = tmp_path / "modules.json"
    res = world.netvm.exec([PY, "-c", WRAPPER, str(out), command, "type_if=vif"], env=g.env(), check=False)
    assert res.returncode == 0, res.stderr
    if command == "online":
        assert status(world, g) == "connected"
    report = json.loads(out.read_text())
    # the path that matters was taken: commands ran through plumbum, XenStore through pyxs
    assert "plumbum.machines.local" in report["modules"]
    assert "pyxs.client" in report["modules"] or command == "offline"
    assert heavy(report) == []


# ----------------------------------------------------------------------------
# 2. processes


def execs(world, guest, command, tmp_path):
    """Programs successfully exec'ed by ``ip netns exec NETVM vif-route-qubes
    COMMAND type_if=vif``, in order, as basenames."""
    if not shutil.which("strace"):
        pytest.fail("strace is needed to count spawned processes (apt-get install strace)")
    prefix = tmp_path / f"trace-{command}"
    argv = ["strace", "-f", "-ff", "-qq", "-e", "trace=execve", "-o", str(prefix),
            "ip", "netns", "exec", world.netvm.name, script(), command, "type_if=vif"]
    res = subprocess.run(argv, env=guest.env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    found = []
    for name in sorted(os.listdir(tmp_path), key=lambda n: int(n.rsplit(".", 1)[1]) if n.startswith(prefix.name + ".") else 0):
        if not name.startswith(prefix.name + "."):
            continue
        with open(tmp_path / name) as f:
            for line in f:  # one file per process (-ff): no interleaved lines
                if line.startswith("execve(") and line.rstrip().endswith("= 0"):
                    found.append(os.path.basename(line.split('"', 2)[1]))
    return found


def helpers_of(programs):
    """Drop the wrapper (ip netns exec) and the hotplug process itself."""
    assert programs[:2] == ["ip", "vif-route-qubes"], programs
    return programs[2:]


def expected_helpers(world, online):
    # the steady state: another guest is online (the nft tables or the
    # iptables guard exist; with nft, the first vif after none and the last
    # one read the ruleset, see test_the_first_and_last_nft_vif_read_once)
    other = world.add_guest(7, ["10.137.0.17"])
    assert world.hotplug(other, "online").returncode == 0
    if world.firewall == "nft":
        return NFT_HELPERS, NFT_MAX_HELPERS
    return (HELPERS_ONLINE if online else HELPERS_OFFLINE), MAX_HELPERS


@pytest.mark.parametrize("world", ["iptables", "nft"], indirect=True)
def test_online_spawns_few_helpers(world, tmp_path):
    allowed, most = expected_helpers(world, True)
    g = world.add_guest(8, ["10.137.0.18"])
    programs = execs(world, g, "online", tmp_path)
    assert status(world, g) == "connected"
    helpers = helpers_of(programs)
    assert set(helpers) <= allowed, helpers
    assert len(helpers) <= most, helpers
    assert "uname" not in helpers


@pytest.mark.parametrize("world", ["iptables", "nft"], indirect=True)
def test_offline_spawns_few_helpers(world, tmp_path):
    allowed, most = expected_helpers(world, False)
    g = world.add_guest(9, ["10.137.0.19"])
    res = world.hotplug(g, "online")
    assert res.returncode == 0, res.stderr
    helpers = helpers_of(execs(world, g, "offline", tmp_path))
    assert set(helpers) <= allowed, helpers
    assert len(helpers) <= most, helpers



@pytest.mark.parametrize("world", ["nft"], indirect=True)
def test_the_first_and_last_nft_vif_read_once(world, tmp_path):
    # the first vif after none reads the ruleset instead of trying a
    # transaction it knows will be refused (the last offline deleted our
    # sets); the last offline reads once to delete them in its transaction
    # a first cycle with another guest: the tables exist, and the kernel's
    # flowtable support has been probed (once per boot)
    other = world.add_guest(7, ["10.137.0.17"])
    assert world.hotplug(other, "online").returncode == 0
    assert world.hotplug(other, "offline").returncode == 0
    g = world.add_guest(9, ["10.137.0.19"])
    for round in range(2):
        for d in (f"on{round}", f"off{round}"):
            (tmp_path / d).mkdir()
        on = helpers_of(execs(world, g, "online", tmp_path / f"on{round}"))
        assert status(world, g) == "connected"
        assert on == ["ip", "nft", "nft", "ip"], on
        off = helpers_of(execs(world, g, "offline", tmp_path / f"off{round}"))
        assert off == ["ip", "nft", "nft", "ip"] or off == ["ip", "ip", "nft", "nft"], off


# ----------------------------------------------------------------------------
# the stand-ins of vif_route_qubes._plumbum

STAND_INS = r"""
import json, subprocess, sys
lazy = ("inspect", "pickle", "shlex", "random", "glob", "shutil", "urllib.parse", "copy", "tempfile", "logging")
before = {n for n in lazy if n in sys.modules}  # by site, on some interpreters
import vif_route_qubes._plumbum as p
m = p.local()
out = {}
# plumbum's import loaded none of them and left no stand-in behind
out["loaded_after_import"] = sorted(n for n in lazy if n in sys.modules and n not in before)
proc = m["cat"].popen([], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
out["cat"] = proc.communicate(b"through plumbum")[0].decode()
out["loaded_after_a_command"] = sorted(n for n in lazy if n in sys.modules and n not in before)
# the real modules, when someone imports them afterwards
import logging, shutil, tempfile
out["real"] = all(getattr(mod, "__file__", None) for mod in (logging, shutil, tempfile))
# plumbum's temporary files and quoting still work (the real modules behind)
import plumbum.commands.base as base
f = base.TemporaryFile(); f.write(b"x"); f.close()
out["quoted"] = base.shquote("a b")
# once logging is configured, plumbum's debug lines reach it
seen = []
class H(logging.Handler):
    def emit(self, record):
        seen.append(record.getMessage())
logging.getLogger().addHandler(H()); logging.getLogger().setLevel(logging.DEBUG)
m["true"].popen([]).wait()
out["logged"] = [s for s in seen if s.startswith("Running")]
print(json.dumps(out))
"""


def test_plumbum_stand_ins_load_nothing_and_stay_correct():
    res = subprocess.run([PY, "-c", STAND_INS], capture_output=True, text=True, cwd="/")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["loaded_after_import"] == []
    assert out["cat"] == "through plumbum"
    assert out["loaded_after_a_command"] == []
    assert out["real"] is True
    assert out["quoted"] == "'a b'"
    assert len(out["logged"]) == 1 and "true" in out["logged"][0]
