#!/usr/bin/env python3
"""Performance benchmark of vif-route-qubes against the targets of the
performance issue (see benchmarks/README.md for what each number means).

    sudo python benchmarks/run.py [--quick] [--json out.json] [--venv DIR]

Builds its own fixture from the project's rig: an in-memory XenStore server
(``python -m tests.rigs.xenstored``, a separate process so it
does not share this process's GIL) and throwaway network namespaces
(``tests.rigs.netns.World``). Commands are timed from inside the
netvm namespace by ``_nsdriver.py`` (exec to exit of the command itself,
rusage from ``wait4``). Every namespace is removed at the end, also on errors.

The code measured is installed in a virtual environment of Debian's
``/usr/bin/python3`` (the production interpreter), by default
``/tmp/vrq-bench-venv``: created on first use, the project reinstalled into it
whenever its sources differ, and byte-compiled (this machine sets
PYTHONDONTWRITEBYTECODE=1, so nothing else compiles it). ``--venv DIR``
measures another environment instead (e.g. the editable dev venv ``.venv``).
Standard library only, so any Python 3.9+ can run it.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.rigs.netns import World, run as sh  # noqa: E402

DRIVER = os.path.join(HERE, "_nsdriver.py")
DEFAULT_VENV = "/tmp/vrq-bench-venv"
PROD_PYTHON = "/usr/bin/python3"
# libxl/udev give hotplug scripts a short PATH; the login PATH of this machine
# (pyenv shims, cargo) would make every PATH search of a run slower
HOTPLUG_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# modules that must never be loaded by a hotplug run (see tests/test_startup_guard.py)
HEAVY = ("urllib.request", "http.client", "email", "ssl", "click")

TARGETS = {
    "online_ms": 55.0,
    "offline_ms": 60.0,
    "flat_ratio": 1.2,
    "concurrent64_ms": 3000.0,
    "dnat_changed_ms": 50.0,
    "dnat_unchanged_ms": 40.0,
    "maxrss_mb": 30.0,
}


# ----------------------------------------------------------------------------
# small helpers


def stats(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    p90 = values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))]
    return {"n": len(values), "min": round(values[0], 2), "median": round(statistics.median(values), 2),
            "p90": round(p90, 2), "max": round(values[-1], 2)}


def fmt(st, unit="ms"):
    if not st:
        return "n/a"
    return f"min {st['min']:7.1f}  median {st['median']:7.1f}  p90 {st['p90']:7.1f} {unit}  (n={st['n']})"


def say(text=""):
    print(text, flush=True)


class XsClient:
    """The fixture's XenStore client: the package's own (vif_route_qubes.xs,
    pyxs, writes pipelined), with what World needs of a server object
    (``socket_path``)."""

    def __init__(self, socket_path):
        from vif_route_qubes.xs import XenStore

        self.socket_path = socket_path
        self._xs = XenStore({"XENSTORED_PATH": socket_path})

    def __getattr__(self, name):  # read, write, write_many, rm, close
        return getattr(self._xs, name)


def start_xenstored(sock_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "tests.rigs.xenstored", "--socket", sock_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        raise RuntimeError(f"xenstored did not start: {proc.stderr.read()}")
    return proc


class Driver:
    """_nsdriver.py running inside a namespace."""

    def __init__(self, ns, private=None):
        # cwd "/": ``python -c`` puts the working directory first on sys.path,
        # which must not be the checkout (it would shadow the installed package).
        # private=(run, log): in a mount namespace of its own, with these
        # directories over /run and /var/log (see _nsdriver.py)
        argv = ["ip", "netns", "exec", ns.name]
        if private:
            argv += ["unshare", "-m", "--propagation", "private", sys.executable, DRIVER, "--private", *private]
        else:
            argv += [sys.executable, DRIVER]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")

    def call(self, **req):
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("namespace driver died")
        return json.loads(line)

    def run(self, argv, env, n=1):
        return self.call(op="run", argv=argv, env=env, n=n)["runs"]

    def parallel(self, jobs):
        return self.call(op="parallel", jobs=jobs)

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except Exception:
            self.proc.kill()


# ----------------------------------------------------------------------------
# the environment under test


def _tree_hash(top, suffix=".py"):
    h = hashlib.sha256()
    for dirpath, dirnames, files in sorted(os.walk(top)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(suffix):
                p = os.path.join(dirpath, f)
                h.update(os.path.relpath(p, top).encode())
                with open(p, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


def venv_python(venv):
    return os.path.join(venv, "bin", "python")


def site_packages(py):
    return subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, cwd="/").stdout.strip()


def prepare_venv(venv, default):
    """Create/refresh the measured environment and byte-compile it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    py = venv_python(venv)
    if default:
        if not os.path.exists(py):
            say(f"creating {venv} with {PROD_PYTHON} ...")
            subprocess.run([PROD_PYTHON, "-m", "venv", venv], check=True)
            subprocess.run([py, "-m", "pip", "install", "-q", ROOT], check=True, env=env)
        installed = os.path.join(site_packages(py), "vif_route_qubes")
        if not os.path.isdir(installed) or _tree_hash(installed) != _tree_hash(os.path.join(ROOT, "vif_route_qubes")):
            say(f"reinstalling the project into {venv} ...")
            subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", ROOT],
                           check=True, env=env)
    if not os.path.exists(py):
        raise SystemExit(f"{py} does not exist")
    targets = [site_packages(py)]
    pkg = subprocess.run([py, "-c", "import vif_route_qubes, os; print(os.path.dirname(vif_route_qubes.__file__))"],
                         capture_output=True, text=True, check=True, cwd="/").stdout.strip()
    if not pkg.startswith(targets[0]):
        targets.append(pkg)  # editable install
    subprocess.run([py, "-m", "compileall", "-q", *targets], check=True, env=env, stdout=subprocess.DEVNULL)
    info = subprocess.run([py, "-c", "import sys, os; print(sys.version.split()[0]); print(os.path.realpath(sys.executable))"],
                          capture_output=True, text=True, check=True).stdout.split("\n")
    versions = subprocess.run([py, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, env=env).stdout
    try:
        pkgs = {p["name"].lower(): p["version"] for p in json.loads(versions)}
    except ValueError:
        pkgs = {}
    return {"venv": venv, "python": info[1], "version": info[0], "package_dir": pkg,
            "packages": {k: pkgs.get(k) for k in ("click", "plumbum", "pyxs")}}


def machine_info():
    model = "unknown"
    mhz = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("cpu MHz") and mhz is None:
                mhz = line.split(":", 1)[1].strip()
    return {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "cpu": model, "cpu_mhz": mhz,
            "loadavg_at_start": os.getloadavg()[0],
            "kernel": platform.release(), "runner_python": sys.version.split()[0]}


# ----------------------------------------------------------------------------
# importtime


def parse_importtime(text):
    """[(depth, name, self_us, cumulative_us)] from ``-X importtime`` output."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum, name = line.split(":", 1)[1].split("|")
        indent = len(name) - len(name.lstrip(" "))
        rows.append(((indent - 1) // 2, name.strip(), int(self_us), int(cum)))
    return rows


def summarize_importtime(texts, top=25):
    """Medians over several runs: top-level entries (cumulative), the
    modules with the largest self time, and the total."""
    per_run = [parse_importtime(t) for t in texts]
    roots, selfs, totals = {}, {}, []
    for rows in per_run:
        totals.append(sum(cum for depth, _, _, cum in rows if depth == 0) / 1000)
        for depth, name, self_us, cum in rows:
            selfs.setdefault(name, []).append(self_us / 1000)
            if depth == 0:
                roots.setdefault(name, []).append(cum / 1000)
    n = len(per_run)
    med = lambda xs: statistics.median(xs + [0.0] * (n - len(xs)))  # noqa: E731
    root_list = sorted(((name, round(med(v), 2)) for name, v in roots.items()), key=lambda x: -x[1])
    self_list = sorted(((name, round(med(v), 2)) for name, v in selfs.items()), key=lambda x: -x[1])
    return {"total_ms": stats(totals), "modules": len(selfs), "roots_ms": root_list[:top],
            "self_ms": self_list[:top]}


# ----------------------------------------------------------------------------
# fixture helpers


def bulk_guests(world, domids, first_octet=137):
    """veth pairs vifD.0 in the netvm, peers in one shared guest namespace,
    XenStore backend keys written pipelined. -> {domid: (vif, address)}"""
    gns = next((ns for ns in world.namespaces if ns.name.endswith("-guests")), None) or world._ns("guests")
    lines, keys, made = [], [], {}
    for d in domids:
        vif = f"vif{d}.0"
        addr = f"10.{first_octet}.{1 + d // 200}.{10 + d % 200}"
        mac = "00:16:3e:%02x:%02x:%02x" % ((d >> 16) & 0xFF, (d >> 8) & 0xFF, d & 0xFF)
        lines.append(f"link add {vif} type veth peer name e{d} netns {gns.name}")
        base = f"/local/domain/0/backend/vif/{d}/0"
        keys += [(f"{base}/ip", addr), (f"{base}/mac", mac), (f"{base}/frontend-id", str(d)),
                 (f"{base}/handle", "0"), (f"{base}/type", "vif"),
                 (f"{base}/script", "/etc/xen/scripts/vif-route-qubes")]
        made[d] = (vif, addr)
    sh(["ip", "-n", world.netvm.name, "-batch", "-"], input="\n".join(lines) + "\n")
    world.xs.write_many(keys)
    return made


def hotplug_env(world, domid, backend=None):
    env = dict(world.env, PATH=HOTPLUG_PATH, vif=f"vif{domid}.0", XENBUS_PATH=f"backend/vif/{domid}/0",
               XENBUS_TYPE="vif", XENBUS_BASE_PATH="backend", script="/etc/xen/scripts/vif-route-qubes", netdev="")
    if backend:
        env["VIF_ROUTE_QUBES_IPTABLES"] = backend
    return env


def check(runs, what):
    bad = [r for r in runs if r["rc"] != 0]
    if bad:
        raise RuntimeError(f"{what} failed (exit {bad[0]['rc']}): {bad[0]['stderr'].strip()[-800:]}")
    return [r["ms"] for r in runs]


# ----------------------------------------------------------------------------
# the measurements


def bench_startup(drv, venv, world, n, results):
    py = venv_python(venv)
    script = os.path.join(venv, "bin", "vif-route-qubes")
    env = dict(world.env, PATH=HOTPLUG_PATH)
    cases = [
        ("python -c pass", [py, "-c", "pass"]),
        ("python -I -S -c pass", [py, "-I", "-S", "-c", "pass"]),
        ("python -c 'import vif_route_qubes.hotplug'", [py, "-c", "import vif_route_qubes.hotplug"]),
        ("vif-route-qubes add type_if=vif (fast-path no-op)", [script, "add", "type_if=vif"]),
        ("vif-route-qubes --version (click)", [script, "--version"]),
    ]
    out = {}
    for label, argv in cases:
        runs = drv.run(argv, env, n=n)
        out[label] = stats(check(runs, label))
        out[label]["cpu_median"] = round(statistics.median(r["cpu_ms"] for r in runs), 2)
        say(f"  {label:52s} {fmt(out[label])}  cpu {out[label]['cpu_median']:.1f} ms")
    results["startup_ms"] = out
    texts = [drv.run([py, "-X", "importtime", "-c", "import vif_route_qubes.hotplug"], env)[0]["stderr"]
             for _ in range(n)]
    base = [drv.run([py, "-X", "importtime", "-c", "pass"], env)[0]["stderr"] for _ in range(max(3, n // 2))]
    imp = summarize_importtime(texts)
    imp_base = summarize_importtime(base)
    results["importtime_hotplug"] = imp
    results["importtime_pass"] = {"total_ms": imp_base["total_ms"]}
    say(f"  -X importtime 'import vif_route_qubes.hotplug': total {fmt(imp['total_ms'])}, {imp['modules']} modules")
    say(f"  -X importtime 'pass' (site, encodings):        total {fmt(imp_base['total_ms'])}")


class _Cycles:
    """online/offline pairs of one contender (a command and its
    environment, one vif in one netvm), timed by that netvm's driver."""

    def __init__(self, name, drv, xs, argv, env):
        self.name, self.drv, self.xs, self.argv, self.env = name, drv, xs, argv, env
        self.reset()

    def reset(self):
        self.on, self.off, self.on_cpu, self.off_cpu, self.rss = [], [], [], [], []

    def cycle(self):
        r = self.drv.run([*self.argv, "online", "type_if=vif"], self.env)
        self.on += check(r, f"{self.name} online")
        self.rss.append(r[0]["maxrss_kb"])
        self.on_cpu.append(r[0]["cpu_ms"])
        if len(self.on) == 1:
            path = f"/local/domain/0/{self.env['XENBUS_PATH']}/hotplug-status"
            status = self.xs.read(path)
            if status != "connected":
                raise RuntimeError(f"{self.name}: online did not write hotplug-status=connected (got {status!r})")
            self.xs.rm(path)  # the next contender's check must see its own write
        r = self.drv.run([*self.argv, "offline", "type_if=vif"], self.env)
        self.off += check(r, f"{self.name} offline")
        self.rss.append(r[0]["maxrss_kb"])
        self.off_cpu.append(r[0]["cpu_ms"])

    def summary(self):
        return {"online_ms": stats(self.on), "offline_ms": stats(self.off),
                "online_cpu_ms": stats(self.on_cpu), "offline_cpu_ms": stats(self.off_cpu),
                "maxrss_mb": stats([k / 1024 for k in self.rss])}


def bench_single(drv, venv, world, n, results):
    script = os.path.join(venv, "bin", "vif-route-qubes")
    g = world.add_guest(10, ["10.137.0.10"])
    env = hotplug_env(world, g.domid)
    c = _Cycles("iptables backend", drv, world.xs, [script], env)
    for _ in range(n):
        c.cycle()
    results.update(c.summary())
    say(f"  online  {fmt(results['online_ms'])}   CPU {fmt(results['online_cpu_ms'])}")
    say(f"  offline {fmt(results['offline_ms'])}   CPU {fmt(results['offline_cpu_ms'])}")
    say(f"  peak RSS of a hotplug run: {fmt(results['maxrss_mb'], 'MB')}")
    # where the time goes: import times of a real online run, and the modules it loaded
    py = venv_python(venv)
    texts, loaded = [], set()
    for _ in range(max(3, n // 2)):
        r = drv.run([py, "-X", "importtime", script, "online", "type_if=vif"], env)
        check(r, "online -X importtime")
        texts.append(r[0]["stderr"])
        check(drv.run([script, "offline", "type_if=vif"], env), "offline")
        loaded |= {row[1] for row in parse_importtime(r[0]["stderr"])}
    imp = summarize_importtime(texts)
    imp["heavy_loaded"] = sorted(m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY)
    results["importtime_online"] = imp
    say(f"  -X importtime of a real online run: total {fmt(imp['total_ms'])}, {imp['modules']} modules")
    say("    top-level imports (cumulative, median ms): "
        + ", ".join(f"{name} {ms}" for name, ms in imp["roots_ms"][:10]))
    say("    largest self times (median ms): " + ", ".join(f"{name} {ms}" for name, ms in imp["self_ms"][:15]))
    if imp["heavy_loaded"]:
        say(f"    heavy modules loaded: {', '.join(imp['heavy_loaded'])}")


# the iptables-era Qubes script is not part of this project: the run takes a
# copy of it (--shell-script) and Xen's helper scripts it sources
# (--xen-scripts: vif-common.sh, xen-hotplug-common.sh, ...); qubesdb-read,
# which a Qubes netvm has, is answered by a small stand-in on its PATH
XEN_HELPERS = ("vif-common.sh", "xen-hotplug-common.sh", "xen-script-common.sh", "xen-network-common.sh",
               "locking.sh", "logging.sh", "hotplugpath.sh")
QUBESDB_STANDIN = """#!/bin/sh
# answers the keys vif-route-qubes reads, as a Qubes netvm's QubesDB would
case "$1" in
/qubes-netvm-gateway) echo {gateway} ;;
/qubes-netvm-primary-dns) echo 10.139.1.1 ;;
/qubes-netvm-secondary-dns) echo 10.139.1.2 ;;
*) exit 1 ;;
esac
"""


def prepare_shell(shell_script, xen_scripts, tmp, gateway):
    """A directory with the shell script and Xen's helpers next to it (it
    sources "$(dirname $0)/vif-common.sh"), and a bin directory with the
    qubesdb-read stand-in. -> (script path, bin dir)"""
    missing = [h for h in XEN_HELPERS if not os.path.exists(os.path.join(xen_scripts, h))]
    if missing:
        raise SystemExit(f"--xen-scripts {xen_scripts}: missing {', '.join(missing)}")
    d = os.path.join(tmp, "shell", "scripts")
    b = os.path.join(tmp, "shell", "bin")
    os.makedirs(d, exist_ok=True)
    os.makedirs(b, exist_ok=True)
    for h in XEN_HELPERS:
        shutil.copy(os.path.join(xen_scripts, h), d)
    script = os.path.join(d, "vif-route-qubes")
    shutil.copy(shell_script, script)
    os.chmod(script, 0o755)
    # xen-hotplug-common.sh appends stderr to the log a Xen host has
    os.makedirs("/var/log/xen", exist_ok=True)
    stub = os.path.join(b, "qubesdb-read")
    with open(stub, "w") as f:
        f.write(QUBESDB_STANDIN.format(gateway=gateway))
    os.chmod(stub, 0o755)
    return script, b


def bench_side_by_side(venv, xs, tmp, n, results, shell=None):
    """One vif, one IPv4 address: online/offline of the iptables-era shell
    script (if given), ours with the iptables backend and ours with the nft
    backend, interleaved round by round (one online+offline of each in turn)
    so the load of a shared machine falls on all three alike; each in its
    own netvm namespace (its own netfilter state). Ratios to the shell
    script's medians are the numbers to compare."""
    script = os.path.join(venv, "bin", "vif-route-qubes")
    contenders = []
    if shell:
        contenders.append(("shell script", "iptables", None))
    contenders += [("ours, iptables", "iptables", [script]), ("ours, nft", "nft", [script])]
    worlds, drivers, cycles = [], [], []
    try:
        for i, (name, firewall, argv) in enumerate(contenders):
            world = World(xs, os.path.join(tmp, f"side-{i}"), upstream=False, firewall=firewall)
            worlds.append(world)
            g = world.add_guest(30 + i, [f"10.137.0.{30 + i}"])
            env = hotplug_env(world, g.domid)
            if argv is None:
                shell_script, stub_bin = prepare_shell(shell[0], shell[1], tmp, world.gateway)
                argv = [shell_script]
                env["PATH"] = stub_bin + ":" + HOTPLUG_PATH
            drv = Driver(world.netvm)
            drivers.append(drv)
            cycles.append(_Cycles(name, drv, xs, argv, env))
        for c in cycles:  # warm-up: the first nft online creates the tables
            c.cycle()
            c.reset()
        for _ in range(n):
            for c in cycles:
                c.cycle()
    finally:
        for drv in drivers:
            drv.close()
        for world in worlds:
            world.close()
        xs.rm("/local/domain/0/backend")
    out = {c.name: c.summary() for c in cycles}
    ref = out.get("shell script")
    for name, row in out.items():
        if ref:
            row["ratio_to_shell"] = {k: round(row[k]["median"] / ref[k]["median"], 2)
                                     for k in ("online_ms", "offline_ms", "online_cpu_ms", "offline_cpu_ms")}
        say(f"  {name:16s} online  {fmt(row['online_ms'])}  CPU {fmt(row['online_cpu_ms'])}")
        say(f"  {'':16s} offline {fmt(row['offline_ms'])}  CPU {fmt(row['offline_cpu_ms'])}")
        if ref:
            r = row["ratio_to_shell"]
            say(f"  {'':16s} / shell script (medians): online {r['online_ms']} wall, {r['online_cpu_ms']} CPU; "
                f"offline {r['offline_ms']} wall, {r['offline_cpu_ms']} CPU")
    results["side_by_side"] = {"rounds": n, "contenders": out}
    if shell:
        results["side_by_side"]["shell_script_sha256"] = hashlib.sha256(open(shell[0], "rb").read()).hexdigest()


def bench_dnat(drv_factory, venv, world, n, results):
    script = os.path.join(venv, "bin", "qubes-setup-dnat-to-ns")
    pkg = results["env"]["package_dir"]
    if not (os.path.exists(script) and os.path.exists(os.path.join(pkg, "dnat.py"))):
        say("  qubes-setup-dnat-to-ns is not installed in the measured environment: skipped")
        results["dnat"] = None
        return
    # ip netns exec bind-mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf;
    # rewritten in place (same inode) between runs to change the upstreams
    conf_dir = f"/etc/netns/{world.netvm.name}"
    os.makedirs(conf_dir, exist_ok=True)
    conf = os.path.join(conf_dir, "resolv.conf")
    variants = ["nameserver 192.168.0.1\n", "nameserver 192.168.0.1\nnameserver 192.168.0.3\n"]
    with open(conf, "w") as f:
        f.write(variants[0])
    drv = drv_factory()
    try:
        env = dict(world.env, PATH=HOTPLUG_PATH)
        changed, unchanged, rss, changed_cpu, unchanged_cpu = [], [], [], [], []
        for i in range(n):
            with open(conf, "r+") as f:
                f.seek(0)
                f.truncate()
                f.write(variants[(i + 1) % 2])
            r = drv.run([script], env)[0]
            if r["rc"] != 0:
                raise RuntimeError(f"qubes-setup-dnat-to-ns (changing rules) exited {r['rc']}: {r['stderr'][-800:]}")
            changed.append(r["ms"])
            changed_cpu.append(r["cpu_ms"])
            rss.append(r["maxrss_kb"] / 1024)
            r = drv.run([script], env)[0]
            if r["rc"] != 100:
                raise RuntimeError(f"qubes-setup-dnat-to-ns (nothing to change) exited {r['rc']}, not 100: "
                                   f"{r['stderr'][-800:]}")
            unchanged.append(r["ms"])
            unchanged_cpu.append(r["cpu_ms"])
        results["dnat"] = {"changed_ms": stats(changed), "unchanged_ms": stats(unchanged), "maxrss_mb": stats(rss),
                           "changed_cpu_ms": stats(changed_cpu), "unchanged_cpu_ms": stats(unchanged_cpu)}
        d = results["dnat"]
        say(f"  dnat, rules changed (exit 0):    {fmt(d['changed_ms'])}   CPU median {d['changed_cpu_ms']['median']:.1f} ms")
        say(f"  dnat, already right (exit 100):  {fmt(d['unchanged_ms'])}   CPU median {d['unchanged_cpu_ms']['median']:.1f} ms")
    finally:
        drv.close()
        shutil.rmtree(conf_dir, ignore_errors=True)


def bench_concurrent(drv, venv, world, count, reps, results):
    script = os.path.join(venv, "bin", "vif-route-qubes")
    guests = bulk_guests(world, range(100, 100 + count))
    on_total, off_total, each, rss = [], [], [], []
    for _ in range(reps):
        jobs = [{"argv": [script, "online", "type_if=vif"], "env": hotplug_env(world, d)} for d in guests]
        res = drv.parallel(jobs)
        each += check(res["runs"], "concurrent online")
        rss += [r["maxrss_kb"] / 1024 for r in res["runs"]]
        on_total.append(res["total_ms"])
        bad = [d for d in guests if world.xs.read(f"/local/domain/0/backend/vif/{d}/0/hotplug-status") != "connected"]
        if bad:
            raise RuntimeError(f"concurrent online: no hotplug-status=connected for domains {bad[:5]}")
        jobs = [{"argv": [script, "offline", "type_if=vif"], "env": hotplug_env(world, d)} for d in guests]
        res = drv.parallel(jobs)
        check(res["runs"], "concurrent offline")
        off_total.append(res["total_ms"])
        for d in guests:
            world.xs.rm(f"/local/domain/0/backend/vif/{d}/0/hotplug-status")
    results["concurrent"] = {"count": count, "online_total_ms": stats(on_total),
                             "offline_total_ms": stats(off_total), "online_each_ms": stats(each),
                             "maxrss_mb": stats(rss)}
    say(f"  {count} concurrent online, total:  {fmt(results['concurrent']['online_total_ms'])}")
    say(f"  {count} concurrent offline, total: {fmt(results['concurrent']['offline_total_ms'])}")
    say(f"  each of the concurrent onlines:    {fmt(results['concurrent']['online_each_ms'])}")


def curve_label(backend, firewall):
    return "nft backend" if firewall == "nft" else f"iptables-{backend or 'nft'}"


def bench_curve(venv, xs, tmp, backend, size, checkpoints, reps, results, firewall="iptables"):
    """Bring 1..size online; at each checkpoint k (k-1 vifs configured) time
    ``reps`` offline+online cycles of vif k; time every 100th online.
    ``firewall``: the backend (iptables: ``backend`` is its flavour)."""
    script = os.path.join(venv, "bin", "vif-route-qubes")
    label = curve_label(backend, firewall)
    world = World(xs, os.path.join(tmp, f"curve-{label.replace(' ', '-')}"), upstream=False, dns=None,
                  firewall=firewall)
    drv = None
    try:
        t0 = time.monotonic()
        bulk_guests(world, range(1, size + 1), first_octet=138)
        setup_s = time.monotonic() - t0
        drv = Driver(world.netvm)
        ramp, points = {}, {}
        t0 = time.monotonic()
        for k in range(1, size + 1):
            env = hotplug_env(world, k, backend)
            if k in checkpoints:
                on, off, on_cpu, off_cpu = [], [], [], []
                for _ in range(reps):
                    r = drv.run([script, "online", "type_if=vif"], env)
                    on += check(r, f"{label} online vif{k}")
                    on_cpu.append(r[0]["cpu_ms"])
                    r = drv.run([script, "offline", "type_if=vif"], env)
                    off += check(r, f"{label} offline vif{k}")
                    off_cpu.append(r[0]["cpu_ms"])
                points[k] = {"online_ms": stats(on), "offline_ms": stats(off),
                             "online_cpu_ms": stats(on_cpu), "offline_cpu_ms": stats(off_cpu)}
                for what in ("online", "offline"):
                    say(f"    {label:6s} vif #{k:<5d} {what:7s} {fmt(points[k][what + '_ms'])}"
                        f"  CPU median {points[k][what + '_cpu_ms']['median']:.1f} ms")
            ms = check(drv.run([script, "online", "type_if=vif"], env), f"{label} online vif{k}")[0]
            if k % 100 == 0 or k == 1:
                ramp[k] = round(ms, 2)
        ramp_s = time.monotonic() - t0
        first, last = points[min(points)], points[max(points)]
        ratio = lambda what, key: round(last[what][key] / first[what][key], 3)  # noqa: E731
        ratio_on, ratio_off = ratio("online_ms", "median"), ratio("offline_ms", "median")
        ratios = {f"{what}_{name}": ratio(f"{what}{unit}", key) for what in ("online", "offline")
                  for name, unit, key in (("wall_median", "_ms", "median"), ("wall_min", "_ms", "min"),
                                          ("cpu_median", "_cpu_ms", "median"))}
        if firewall == "nft":
            rules = world.netvm.exec(["sh", "-c", "nft list ruleset | wc -l"]).stdout.strip()
        else:
            rules = world.netvm.exec(["sh", "-c", f"iptables{'-' + backend if backend else ''}-save -t raw | wc -l"]).stdout.strip()
        results.setdefault("curve", {})[label] = {
            "size": size, "reps": reps, "points": {str(k): v for k, v in points.items()},
            "ramp_online_ms": {str(k): v for k, v in ramp.items()},
            "ratio_online": round(ratio_on, 3), "ratio_offline": round(ratio_off, 3), "ratios": ratios,
            "raw_table_lines_at_end": int(rules or 0), "setup_s": round(setup_s, 1), "ramp_s": round(ramp_s, 1)}
        say(f"    {label}: ramp (online ms of every 100th): "
            + " ".join(f"{k}:{v:.0f}" for k, v in ramp.items()))
        say(f"    {label}: vif #{max(points)} / vif #1: online x{ratio_on:.2f}, offline x{ratio_off:.2f} "
            f"(min: x{ratios['online_wall_min']:.2f} / x{ratios['offline_wall_min']:.2f}; "
            f"CPU: x{ratios['online_cpu_median']:.2f} / x{ratios['offline_cpu_median']:.2f}) "
            f"({'nft list ruleset' if firewall == 'nft' else 'iptables-save -t raw'}: {rules} lines at the end; "
            f"set-up {setup_s:.1f} s, ramp {ramp_s:.0f} s)")
    finally:
        if drv:
            drv.close()
        t0 = time.monotonic()
        world.close()
        xs.rm("/local/domain/0/backend")
        say(f"    ({label} world removed in {time.monotonic() - t0:.1f} s)")

# ----------------------------------------------------------------------------
# firewall backends: forwarding rate, child processes, the plot

SENDER = r"""
import socket, sys, time
dst, secs = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
payload, addr, n = b"x" * 18, (dst, 9), 0
end = time.perf_counter() + secs
cpu0 = time.process_time()
while time.perf_counter() < end:
    for _ in range(512):
        try:
            s.sendto(payload, addr)
            n += 1
        except OSError:
            pass
print(n, time.process_time() - cpu0)
"""


def _rx(ns, dev):
    return int(ns.exec(["cat", f"/sys/class/net/{dev}/statistics/rx_packets"]).stdout)


def _bulk_firewall(world, firewall, vifs):
    """Install the anti-spoofing of ``vifs`` [(name, address)] in one
    transaction per family, rendered by the backend's own renderer (what
    ``online`` of each would leave, without 1000 runs of it)."""
    from ipaddress import ip_address

    from vif_route_qubes.plan import Vif

    if not vifs:
        return
    if firewall == "nft":
        from vif_route_qubes.firewall import nft as N

        text = "".join(N.transaction(name, (ip_address(a),)) for name, a in vifs)
        sh(["ip", "netns", "exec", world.netvm.name, "nft", "-f", "-"], input=text)
        return
    from vif_route_qubes.firewall import iptables as I

    for version, tool in ((4, "iptables-restore"), (6, "ip6tables-restore")):
        body = "".join(I.firewall(Vif(name=name, domid=0, addresses=(ip_address(a),)), version).create.split("\n", 1)[1]
                       .rsplit("COMMIT\n", 1)[0] for name, a in vifs)
        sh(["ip", "netns", "exec", world.netvm.name, tool, "--noflush"], input="*raw\n" + body + "COMMIT\n")


def bench_forwarding(venv, xs, tmp, firewall, sizes, secs, reps, results):
    """Packets per second the netvm forwards between the test guest and
    upstream (small UDP datagrams, one sender at saturation), with 1, ...
    vifs guarded; the test vif is always the last one configured (online
    again after the others were added)."""
    script = os.path.join(venv, "bin", "vif-route-qubes")
    world = World(xs, os.path.join(tmp, f"fwd-{firewall}"), dns=None, firewall=firewall)
    drv = None
    out = {}
    try:
        test_domid = 9999
        made = bulk_guests(world, [test_domid])
        vif, addr = made[test_domid]
        gns = next(ns for ns in world.namespaces if ns.name.endswith("-guests"))
        peer = f"e{test_domid}"
        mac = "00:16:3e:%02x:%02x:%02x" % ((test_domid >> 16) & 0xFF, (test_domid >> 8) & 0xFF, test_domid & 0xFF)
        for argv in (["link", "set", peer, "address", mac], ["addr", "add", f"{addr}/32", "dev", peer],
                     ["link", "set", peer, "up"], ["route", "add", "10.137.0.1", "dev", peer],
                     ["route", "add", "default", "via", "10.137.0.1", "dev", peer, "onlink"]):
            gns.ip(*argv)
        world.upstream.ip("route", "add", "10.138.0.0/16", "via", world.UPLINK_NETVM)
        drv = Driver(world.netvm)
        env = hotplug_env(world, test_domid)
        done = 1
        for size in sizes:
            if size > done:
                check(drv.run([script, "offline", "type_if=vif"], env), f"{firewall} offline test vif")
                _bulk_firewall(world, firewall, [(f"vif{d}.0", f"10.138.{1 + d // 200}.{10 + d % 200}")
                                                 for d in range(done, size)])
                done = size
            check(drv.run([script, "online", "type_if=vif"], env), f"{firewall} online test vif")
            row = {}
            for direction, sender_ns, dst, rx_ns, dev in (
                    ("guest->upstream", gns, world.UPLINK_UPSTREAM, world.upstream, "eth0"),
                    ("upstream->guest", world.upstream, addr, gns, peer)):
                rates, per_cpu = [], []
                for _ in range(reps):
                    before = _rx(rx_ns, dev)
                    sent, cpu = sender_ns.exec([sys.executable, "-c", SENDER, dst, str(secs)]).stdout.split()
                    got = _rx(rx_ns, dev) - before
                    if got < int(sent) * 0.5:
                        raise RuntimeError(f"{firewall} {direction} at {size} vifs: {got} of {sent} packets arrived")
                    rates.append(got / secs)
                    # the whole path (veth, the netvm's PREROUTING, forwarding)
                    # runs in the sender's system calls: packets per CPU
                    # second of the sender is the rate without the other
                    # load on this shared machine
                    per_cpu.append(got / float(cpu))
                row[direction] = stats(per_cpu)
                row[direction]["wall_pps"] = stats(rates)
                say(f"  {firewall:8s} {size:5d} vifs  {direction:16s} {row[direction]['median'] / 1000:8.1f} "
                    f"kpackets per sender CPU second (wall: {row[direction]['wall_pps']['median'] / 1000:.1f} kpps; n={reps})")
            out[str(size)] = row
    finally:
        if drv:
            drv.close()
        world.close()
        xs.rm("/local/domain/0/backend")
    base = out[str(sizes[0])]
    for size, row in out.items():
        for direction in list(row):
            row[direction]["ratio"] = round(row[direction]["median"] / base[direction]["median"], 3)
            row[direction]["wall_ratio"] = round(row[direction]["wall_pps"]["median"]
                                                 / base[direction]["wall_pps"]["median"], 3)
    results.setdefault("forwarding", {})[firewall] = {"sizes": sizes, "secs": secs, "points": out}


def _children(world, env, argv):
    """Programs a run starts (execve that succeeded), the run itself left out."""
    with tempfile.NamedTemporaryFile(prefix="vrq-strace-", dir="/tmp") as f:
        world.netvm.exec(["strace", "-f", "-qq", "-e", "trace=execve", "-o", f.name, *argv], env=env)
        lines = open(f.name).read().splitlines()
    progs = [os.path.basename(line.split('"', 2)[1]) for line in lines
             if "execve(" in line and line.rstrip().endswith("= 0")]
    return [p for p in progs[1:] if not p.startswith("python")]


def bench_children(venv, xs, tmp, reps, results, shell=None):
    """Child processes per online/offline, each backend (and the iptables-era
    shell script if given), the tables already made (the steady state; the
    first online on a host also reads them)."""
    if not shutil.which("strace"):
        say("  strace is not installed: skipped")
        return
    out = {}
    for firewall in ("iptables", "nft") + (("shell script",) if shell else ()):
        script = os.path.join(venv, "bin", "vif-route-qubes")
        world = World(xs, os.path.join(tmp, f"children-{firewall.replace(' ', '-')}"), dns=None,
                      firewall="iptables" if firewall == "shell script" else firewall)
        try:
            made = bulk_guests(world, [20, 21])
            warm = hotplug_env(world, 21)
            env = hotplug_env(world, 20)
            if firewall == "shell script":
                script, stub_bin = prepare_shell(shell[0], shell[1], tmp, world.gateway)
                warm["PATH"] = env["PATH"] = stub_bin + ":" + HOTPLUG_PATH
            world.netvm.exec([script, "online", "type_if=vif"], env=warm)
            world.netvm.exec([script, "offline", "type_if=vif"], env=warm)
            on, off, names, order = [], [], set(), {}
            for _ in range(reps):
                progs = order["online"] = _children(world, env, [script, "online", "type_if=vif"])
                on.append(len(progs))
                names |= set(progs)
                progs = order["offline"] = _children(world, env, [script, "offline", "type_if=vif"])
                off.append(len(progs))
                names |= set(progs)
            # the last run's programs in the order started, to say what they are
            out[firewall] = {"online": statistics.median(on), "offline": statistics.median(off),
                             "programs": sorted(names), "online_programs": order["online"],
                             "offline_programs": order["offline"]}
            say(f"  {firewall:12s} children per online {out[firewall]['online']:.0f}, per offline "
                f"{out[firewall]['offline']:.0f}")
            if firewall != "shell script":
                say(f"  {'':12s} online: {' '.join(order['online'])}; offline: {' '.join(order['offline'])}")
            else:
                say(f"  {'':12s} ({', '.join(sorted(names))})")
            del made
        finally:
            world.close()
            xs.rm("/local/domain/0/backend")
    results["children"] = out


def plot(results, path):
    """Forwarding rate and online/offline time against the number of vifs,
    both backends, as one PNG (matplotlib: pip install '.[bench]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say(f"  matplotlib is not installed (pip install '.[bench]'): no plot written to {path}")
        return None
    m = results["machine"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = {"iptables": "tab:red", "nft": "tab:blue"}
    for firewall, fw in (results.get("forwarding") or {}).items():
        xs_ = [int(k) for k in fw["points"]]
        for direction, ls in (("guest->upstream", "-"), ("upstream->guest", "--")):
            ys = [fw["points"][str(k)][direction]["ratio"] for k in xs_]
            ax1.plot(xs_, ys, ls, marker="o", color=styles.get(firewall), label=f"{firewall} backend, {direction}")
    ax1.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax1.set_xlabel("vifs online (test vif configured last)")
    ax1.set_ylabel("packets per sender CPU second, relative to 1 vif")
    ax1.set_ylim(0, max([1.15] + [float(max(line.get_ydata())) + 0.05 for line in ax1.get_lines()]))
    ax1.set_title("Forwarding rate (small UDP, saturation)")
    ax1.legend(fontsize=8)
    colors = {"nft backend": "tab:blue", "iptables-nft": "tab:red", "iptables-legacy": "tab:orange"}
    for label, c in (results.get("curve") or {}).items():
        ks = sorted(int(k) for k in c["points"])
        for what, ls in (("online", "-"), ("offline", "--")):
            ys = [c["points"][str(k)][f"{what}_cpu_ms"]["median"] for k in ks]
            ax2.plot(ks, ys, ls, marker="o", color=colors.get(label), label=f"{label}: {what}")
    ax2.set_xlabel("the vif's number (vifs already online + 1)")
    ax2.set_ylabel("CPU ms per run (process + children, median)")
    ax2.set_ylim(bottom=0)
    ax2.set_title("One online / offline")
    ax2.legend(fontsize=8)
    fig.suptitle(f"vif-route-qubes firewall backends, {m['date']}, {m['cpus']} x {m['cpu']}, kernel {m['kernel']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    say(f"  plot written to {path}")
    return path



def verdicts(results):
    v = []

    def med(st):
        return st["median"] if st else None

    vq = results.get("vs_qubes") or {}
    if vq.get("single"):
        r = vq["single"]["contenders"]["ours, nft"]["ratio_to_qubes"]
        v.append(("ours/Qubes today: one online <= 0.9x (wall, CPU)", (r["online_ms"], r["online_cpu_ms"]), 0.9))
        v.append(("ours/Qubes today: one offline <= 0.9x (wall, CPU)", (r["offline_ms"], r["offline_cpu_ms"]), 0.9))
    if (vq.get("dnat") or {}).get("contenders"):
        r = vq["dnat"]["contenders"]["ours, nft"]["ratio_to_qubes"]
        v.append(("ours/Qubes today: dnat, upstreams changed <= 1.0x (wall, CPU)",
                  (r["changed_ms"], r["changed_cpu_ms"]), 1.0))
        v.append(("ours/Qubes today: dnat, unchanged (exit 100) <= 1.0x (wall, CPU)",
                  (r["unchanged_ms"], r["unchanged_cpu_ms"]), 1.0))
    for size, row in ((vq.get("storms") or {}).get("results") or {}).items():
        r = row["ours, nft"]["ratio_to_qubes"]
        v.append((f"ours/Qubes today: storm of {size} online, offline <= 1.0x (wall)",
                  (r["online_ms"], r["offline_ms"]), 1.0))
    v.append(("online <= 55 ms (median)", med(results.get("online_ms")), 55))
    v.append(("offline <= 60 ms (median)", med(results.get("offline_ms")), 60))
    for label, c in (results.get("curve") or {}).items():
        # wall-time medians are what the target names; CPU time (process +
        # children) is the same cost without the other load on the machine:
        # the verdict wants both within the limit
        for what in ("online", "offline"):
            r = c["ratios"]
            v.append((f"{label}: {what} vif #{c['size']} / vif #1 <= 1.2 (wall, CPU)",
                      (r[f"{what}_wall_median"], r[f"{what}_cpu_median"]), 1.2))
    for firewall, fw in (results.get("forwarding") or {}).items():
        last = fw["points"][str(fw["sizes"][-1])]
        v.append((f"{firewall} backend: forwarding at {fw['sizes'][-1]} vifs / 1 vif >= 0.9 (both directions)",
                  tuple(last[d]["ratio"] for d in ("guest->upstream", "upstream->guest")), None))
    if results.get("children"):
        c = results["children"]
        v.append(("nft backend: at least one child process fewer per online/offline than iptables",
                  (c["nft"]["online"] - c["iptables"]["online"], c["nft"]["offline"] - c["iptables"]["offline"]), -1))
    if results.get("concurrent"):
        v.append(("64 concurrent online < 3000 ms (median total)", med(results["concurrent"]["online_total_ms"]), 3000))
    if results.get("dnat"):
        v.append(("dnat, rules changed <= 50 ms (median)", med(results["dnat"]["changed_ms"]), 50))
        v.append(("dnat, exit 100 <= 40 ms (median)", med(results["dnat"]["unchanged_ms"]), 40))
    rss = [results["maxrss_mb"]["max"]] if results.get("maxrss_mb") else []
    if results.get("concurrent"):
        rss.append(results["concurrent"]["maxrss_mb"]["max"])
    if rss:
        v.append(("peak RSS of one hotplug run <= 30 MB (max)", round(max(rss), 1), 30))
    out = {}
    for name, value, limit in v:
        if value is None:
            continue  # not measured in this run
        if limit is None:  # an at-least target: forwarding ratios >= 0.9
            out[name] = {"value": value, "limit": 0.9, "met": all(x >= 0.9 for x in value)}
            continue
        out[name] = {"value": value, "limit": limit,
                     "met": value is not None and all(x <= limit for x in (value if isinstance(value, tuple) else (value,)))}
    return out


# ----------------------------------------------------------------------------
# side by side with today's Qubes script (the main anchor)
#
# Nothing of Qubes is part of this project: the run reads Qubes' files at run
# time from a checkout of QubesOS/qubes-core-agent-linux (--qubes, or
# $VRQ_QUBES_CHECKOUT; a work tree, or a git directory without one), runs
# them from a scratch directory and deletes them at the end.

QUBES_SCRIPT = "network/vif-route-qubes"
QUBES_ANTISPOOF = "network/qubes-antispoof.nft"
QUBES_NAT = "network/vif-qubes-nat.sh"
QUBES_DNAT = "network/qubes-setup-dnat-to-ns"
# the iptables-era script (R4.1), the second line
IPTABLES_ERA_REV = "release4.1"
# these kernels have no nf_flow_table: today's script's flowtable block
# (every online redefines table inet qubes-nat-accel over all interfaces)
# would fail; it is switched off by replacing its condition
FLOWTABLE_IF = 'if [[ -n "$separator" ]]; then'
FLOWTABLE_OFF = "if false; then  # vrq benchmark: flowtable switched off (no nf_flow_table)"
CACHE = "/var/cache/vif-route-qubes-bench"
from tests.rigs.qubesdb import build_script  # noqa: E402
QUBESDB_STANDIN_KEYS = """#!/bin/sh
# qubesdb-read stand-in (only when the real QubesDB cannot run): the keys
# vif-route-qubes reads, as a netvm's QubesDB answers them; others absent (2)
[ "$1" = -- ] && shift
case "$1" in
/qubes-netvm-gateway) echo {gateway} ;;
/qubes-netvm-primary-dns) echo 10.139.1.1 ;;
/qubes-netvm-secondary-dns) echo 10.139.1.2 ;;
*) exit 2 ;;
esac
"""


# the two upstream lists the DNAT runs alternate between (two virtual
# nameservers: with one upstream both go to it, with two one each), and the
# chain each must leave: {virtual nameserver: upstream}
DNAT_UPSTREAMS = ("nameserver 192.168.0.1\n", "nameserver 192.168.0.1\nnameserver 192.168.0.3\n")
DNAT_WANT = ({"10.139.1.1": {"192.168.0.1"}, "10.139.1.2": {"192.168.0.1"}},
             {"10.139.1.1": {"192.168.0.1"}, "10.139.1.2": {"192.168.0.3"}})
# a system bus of our own with nothing on it (no systemd-resolved, no
# service files: a call to org.freedesktop.resolve1 is ServiceUnknown at
# once, and Qubes' script falls back to /etc/resolv.conf as it is written to)
from tests.rigs.resolved import BUS_CONF as SYSTEM_BUS_CONF  # noqa: E402


class QubesCheckout:
    """Files of a qubes-core-agent-linux checkout: a work tree (read from
    disk, or from its .git at a revision) or a bare git directory (what the
    ``fetch`` tool gives: ``git --git-dir=DIR show REV:PATH``)."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        if os.path.isdir(os.path.join(self.path, ".git")):
            self.git_dir = os.path.join(self.path, ".git")
        elif os.path.isfile(os.path.join(self.path, "HEAD")) and os.path.isdir(os.path.join(self.path, "objects")):
            self.git_dir = self.path
        else:
            self.git_dir = None
        if self.git_dir is None and not os.path.isfile(os.path.join(self.path, QUBES_SCRIPT)):
            raise SystemExit(f"--qubes {path}: neither a git directory nor a work tree with {QUBES_SCRIPT}")

    def _git(self, *args):
        return subprocess.run(["git", "--git-dir", self.git_dir, *args], capture_output=True, check=True).stdout

    def read(self, relpath, rev=None):
        if self.git_dir is None or (rev is None and os.path.isfile(os.path.join(self.path, relpath))):
            if rev is not None:
                raise SystemExit(f"--qubes {self.path}: no git directory, so no {rev}:{relpath}")
            with open(os.path.join(self.path, relpath), "rb") as f:
                return f.read()
        try:
            return self._git("show", f"{rev or 'HEAD'}:{relpath}")
        except subprocess.CalledProcessError as exc:
            raise SystemExit(f"--qubes {self.path}: git show {rev or 'HEAD'}:{relpath}: "
                             f"{exc.stderr.decode(errors='replace').strip()}") from None

    def commit(self, rev="HEAD"):
        if self.git_dir is None:
            return None
        try:
            return self._git("rev-parse", rev).decode().strip()
        except subprocess.CalledProcessError:
            return None

    def has(self, rev):
        return self.commit(rev) is not None


def xen_helpers(opt):
    """A directory with Xen's hotplug helpers (vif-common.sh, ...) that the
    Qubes scripts source: --xen-scripts, else /etc/xen/scripts, else Debian's
    xen-utils-common unpacked into the cache (apt-get download, dpkg-deb -x;
    nothing installed)."""
    for d in ([opt] if opt else []) + ["/etc/xen/scripts", os.path.join(CACHE, "xen-utils-common/etc/xen/scripts")]:
        if all(os.path.exists(os.path.join(d, h)) for h in XEN_HELPERS):
            return d
        if d == opt:
            raise SystemExit(f"--xen-scripts {opt}: missing some of {', '.join(XEN_HELPERS)}")
    say(f"  Xen's hotplug helpers: apt-get download xen-utils-common into {CACHE} ...")
    os.makedirs(CACHE, exist_ok=True)
    subprocess.run(["apt-get", "download", "-q", "xen-utils-common"], cwd=CACHE, check=True,
                   stdout=subprocess.DEVNULL)
    deb = sorted(f for f in os.listdir(CACHE) if f.startswith("xen-utils-common_") and f.endswith(".deb"))[-1]
    subprocess.run(["dpkg-deb", "-x", os.path.join(CACHE, deb), os.path.join(CACHE, "xen-utils-common")], check=True)
    return os.path.join(CACHE, "xen-utils-common/etc/xen/scripts")


def qubesdb_prefix(opt):
    """The real QubesDB (daemon, qubesdb-read, the python module): --qubesdb
    PREFIX or $VRQ_QUBESDB, else built once into the cache by
    ../shared/vendor/build-qubesdb; None if neither can be had (then a
    qubesdb-read stand-in answers, and the results say so)."""
    prefix = opt or os.environ.get("VRQ_QUBESDB")
    if prefix:
        if not os.access(os.path.join(prefix, "bin", "qubesdb-daemon"), os.X_OK):
            raise SystemExit(f"--qubesdb {prefix}: no bin/qubesdb-daemon")
        return os.path.abspath(prefix)
    prefix = os.path.join(CACHE, "qubesdb")
    if os.access(os.path.join(prefix, "bin", "qubesdb-daemon"), os.X_OK):
        return prefix
    script = build_script()  # ../shared/vendor/build-qubesdb, as the tests find it
    if script is not None:
        say(f"  building QubesDB into {prefix} ({script}) ...")
        r = subprocess.run(["bash", script, prefix, PROD_PYTHON], capture_output=True, text=True)
        if r.returncode == 0:
            return prefix
        say(f"  build-qubesdb failed: {r.stderr.strip()[-400:]}")
    return None


class QubesNetvm:
    """One netvm namespace set up as a Qubes R4.2 netvm is for its hotplug
    scripts: Qubes' qubes-antispoof.nft loaded, a QubesDB daemon (the real
    one, local-only, in the driver's private /run) with the netvm keys the
    script reads, Qubes' scripts beside Xen's helpers. Every contender runs
    in this one namespace, through one driver."""

    def __init__(self, xs, tmp, checkout, xen_dir, qdb, iptables_era=True):
        self.tmp = os.path.join(tmp, "qubes")
        self.world = World(xs, os.path.join(self.tmp, "world"), upstream=False, firewall="nft")
        self.drv = None
        self.qdb = qdb
        self.run_dir = os.path.join(self.tmp, "run")
        self.log_dir = os.path.join(self.tmp, "log")
        try:
            self.info = {"checkout": checkout.path, "commit": checkout.commit(), "qubesdb": "real" if qdb else "stand-in"}
            scripts = os.path.join(self.tmp, "scripts")
            self.bin = os.path.join(self.tmp, "bin")
            for d in (scripts, self.bin, self.run_dir, self.log_dir):
                os.makedirs(d, exist_ok=True)
            for h in XEN_HELPERS:
                shutil.copy(os.path.join(xen_dir, h), scripts)
            with open(os.path.join(scripts, "vif-qubes-nat.sh"), "wb") as f:
                f.write(checkout.read(QUBES_NAT))
            today = checkout.read(QUBES_SCRIPT).decode()
            self.info["script_sha256"] = hashlib.sha256(today.encode()).hexdigest()
            if today.count(FLOWTABLE_IF) != 1:
                raise SystemExit(f"{QUBES_SCRIPT} of {checkout.path}: the flowtable block's condition "
                                 f"{FLOWTABLE_IF!r} is not there once; cannot switch it off")
            self.script = self._write(scripts, "vif-route-qubes", today.replace(FLOWTABLE_IF, FLOWTABLE_OFF))
            self.iptables_era = None
            if iptables_era and checkout.has(IPTABLES_ERA_REV):
                old = checkout.read(QUBES_SCRIPT, IPTABLES_ERA_REV)
                self.iptables_era = self._write(scripts, "vif-route-qubes-r41", old.decode())
                self.info["iptables_era"] = {"rev": IPTABLES_ERA_REV, "commit": checkout.commit(IPTABLES_ERA_REV),
                                             "script_sha256": hashlib.sha256(old).hexdigest()}
            dnat = checkout.read(QUBES_DNAT)
            self.dnat = self._write(scripts, "qubes-setup-dnat-to-ns", dnat.decode())
            self.info["dnat_sha256"] = hashlib.sha256(dnat).hexdigest()
            antispoof = checkout.read(QUBES_ANTISPOOF).decode()
            self.info["antispoof_sha256"] = hashlib.sha256(antispoof.encode()).hexdigest()
            self.world.netvm.exec(["nft", "-f", "-"], input=antispoof)
            if qdb:
                for c in ("qubesdb-read", "qubesdb-write"):
                    os.symlink(os.path.join(qdb, "bin", c), os.path.join(self.bin, c))
            else:
                self._write(self.bin, "qubesdb-read", QUBESDB_STANDIN_KEYS.format(gateway=self.world.gateway))
            self.path = self.bin + ":" + HOTPLUG_PATH
            # bind-mounted over /etc/resolv.conf in the driver's mount
            # namespace: what both DNAT scripts read as the upstreams
            self.resolv = os.path.join(self.tmp, "resolv.conf")
            self.set_resolv(DNAT_UPSTREAMS[0])
            self.drv = Driver(self.world.netvm, private=(self.run_dir, self.log_dir, self.resolv))
            if qdb:
                self._start_qubesdb()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _write(d, name, text):
        p = os.path.join(d, name)
        with open(p, "w") as f:
            f.write(text)
        os.chmod(p, 0o755)
        return p

    def _start_qubesdb(self):
        env = {"PATH": HOTPLUG_PATH, "HOME": "/"}
        # without NOTIFY_SOCKET the daemon forks once it serves its socket
        check(self.drv.run([os.path.join(self.qdb, "bin", "qubesdb-daemon"), "0", "dom0"], env), "qubesdb-daemon")
        keys = {"/qubes-netvm-gateway": self.world.gateway, "/qubes-netvm-primary-dns": "10.139.1.1",
                "/qubes-netvm-secondary-dns": "10.139.1.2", "/qubes-ip": "10.137.0.2", "/qubes-vm-type": "NetVM"}
        for k, v in keys.items():
            check(self.drv.run([os.path.join(self.qdb, "bin", "qubesdb-write"), k, v], env), f"qubesdb-write {k}")
        r = self.drv.run([os.path.join(self.bin, "qubesdb-read"), "/qubes-netvm-gateway"], env)
        if r[0]["rc"] != 0:
            raise RuntimeError(f"qubesdb-read does not answer: {r[0]['stderr']}")

    def set_resolv(self, text):
        """Rewritten in place: the bind mount covers this inode."""
        with open(self.resolv, "a+") as f:
            f.seek(0)
            f.truncate()
            f.write(text)

    def dnat_chain(self):
        """{virtual nameserver: upstream} of the ``dnat-dns`` chain in force."""
        out = self.world.netvm.exec(["nft", "list", "chain", "ip", "qubes", "dnat-dns"]).stdout
        found = {}
        for line in out.splitlines():
            words = line.split()
            if words[:2] == ["ip", "daddr"] and words[-3:-1] == ["dnat", "to"]:
                found.setdefault(words[2], set()).add(words[-1])
        return found

    def env(self, domid, firewall="nft"):
        env = hotplug_env(self.world, domid)
        env["PATH"] = self.path
        env["VIF_ROUTE_QUBES_FIREWALL"] = firewall
        return env

    def reset_vifs(self, vifs):
        """What the kernel does when a guest's vif goes away (untimed):
        Qubes' online adds a permanent neighbour entry that its offline does
        not remove, and a second ``ip neighbour add`` would fail."""
        lines = "".join(f"neigh flush dev {v} nud permanent\n" for v in vifs)
        sh(["ip", "-n", self.world.netvm.name, "-force", "-batch", "-"], input=lines, check=False)

    def elements(self, family="ip"):
        """The (interface, address) elements of Qubes' ``allowed`` set."""
        out = self.world.netvm.exec(["nft", "-j", "list", "set", family, "qubes", "allowed"]).stdout
        found = set()
        for item in json.loads(out)["nftables"]:
            for e in (item.get("set") or {}).get("elem", []):
                c = e["concat"] if isinstance(e, dict) and "concat" in e else (e.get("elem", {}).get("val", {}).get("concat") if isinstance(e, dict) else None)
                if c:
                    found.add((c[0], c[1]))
        return found

    def close(self):
        if self.drv:
            self.drv.close()
            self.drv = None
        pid_file = os.path.join(self.run_dir, "qubes", "qubesdb.dom0.pid")
        if os.path.exists(pid_file):
            try:
                os.kill(int(open(pid_file).read().strip()), 15)
            except (ValueError, ProcessLookupError):
                pass
        self.world.close()


def ratios(row, ref, keys):
    return {k: round(row[k]["median"] / ref[k]["median"], 3) for k in keys if row.get(k) and ref.get(k)}


def say_vs_qubes(out, phases, width):
    """Each contender's ``phases`` ((key, label) pairs: its ``KEY_ms`` and
    ``KEY_cpu_ms`` medians), then its ratios to today's Qubes, which are
    also kept in the row (``ratio_to_qubes``)."""
    ref = out["qubes today"]
    keys = [f"{k}_ms" for k, _ in phases] + [f"{k}_cpu_ms" for k, _ in phases]
    for name, row in out.items():
        r = row["ratio_to_qubes"] = ratios(row, ref, keys)
        for i, (k, label) in enumerate(phases):
            say(f"  {name if i == 0 else '':{width}s} {label}  {fmt(row[k + '_ms'])}  "
                f"CPU median {row[k + '_cpu_ms']['median']:.1f}")
        if name != "qubes today":
            say(f"  {'':{width}s} / qubes today: " + "; ".join(
                f"{k} {r[k + '_ms']} wall, {r[k + '_cpu_ms']} CPU" for k, _ in phases))


def bench_vs_qubes_single(q, venv, n, results):
    """One vif, one IPv4 address each: today's Qubes script, ours (nft), and
    the iptables-era script, in one netvm with Qubes' table, in rounds whose
    order rotates, so load on the machine falls on all alike."""
    script = os.path.join(venv, "bin", "vif-route-qubes")
    contenders = [("qubes today", [q.script], 40), ("ours, nft", [script], 41)]
    if q.iptables_era:
        contenders.append(("qubes R4.1 (iptables)", [q.iptables_era], 42))
    cycles = []
    for name, argv, domid in contenders:
        q.world.add_guest(domid, [f"10.137.0.{domid}"])
        c = _Cycles(name, q.drv, q.world.xs, argv, q.env(domid, "nft"))
        c.vif = f"vif{domid}.0"
        cycles.append(c)
    for c in cycles:  # warm-up: our first online adds our sets to Qubes' table
        c.cycle()
        q.reset_vifs([c.vif])
        c.reset()
    for i in range(n):
        for c in cycles[i % len(cycles):] + cycles[:i % len(cycles)]:
            c.cycle()
            q.reset_vifs([c.vif])
    out = {c.name: c.summary() for c in cycles}
    say_vs_qubes(out, (("online", "online "), ("offline", "offline")), 22)
    results.setdefault("vs_qubes", {})["single"] = {"rounds": n, "contenders": out}


def bench_vs_qubes_storms(q, venv, sizes, reps, results):
    """Storms: N onlines started at once, then N offlines, of the same N vifs
    (peers in one guest namespace), Qubes' script and ours in turn, the order
    alternating per round; total wall = first spawn to last exit, CPU = the
    sum over the N runs (each with its children). After each storm: every
    hotplug-status=connected, and Qubes' ``allowed`` set holds exactly the
    N vifs' elements (none after the offlines)."""
    script = os.path.join(venv, "bin", "vif-route-qubes")
    contenders = [("qubes today", [q.script]), ("ours, nft", [script])]
    guests = bulk_guests(q.world, range(100, 100 + max(sizes)))
    base = {(f"vif{d}.0", a) for d, (_, a) in guests.items()}
    out = {}
    for size in sizes:
        doms = list(guests)[:size]
        want = {(f"vif{d}.0", guests[d][1]) for d in doms}
        rows = {name: {"online": [], "offline": [], "online_cpu": [], "offline_cpu": []} for name, _ in contenders}
        for rep in range(reps):
            for name, argv in (contenders if rep % 2 == 0 else contenders[::-1]):
                row = rows[name]
                for what in ("online", "offline"):
                    jobs = [{"argv": [*argv, what, "type_if=vif"], "env": q.env(d)} for d in doms]
                    res = q.drv.parallel(jobs)
                    check(res["runs"], f"{name}: storm of {size} {what}")
                    row[what].append(res["total_ms"])
                    row[f"{what}_cpu"].append(sum(r["cpu_ms"] for r in res["runs"]))
                    have = q.elements() & base
                    if what == "online":
                        bad = [d for d in doms
                               if q.world.xs.read(f"/local/domain/0/backend/vif/{d}/0/hotplug-status") != "connected"]
                        if bad:
                            raise RuntimeError(f"{name}: storm of {size}: no hotplug-status=connected for {bad[:5]}")
                        if have != want:
                            raise RuntimeError(f"{name}: storm of {size} online: allowed set differs "
                                               f"(missing {sorted(want - have)[:3]}, extra {sorted(have - want)[:3]})")
                    elif have:
                        raise RuntimeError(f"{name}: storm of {size} offline left {sorted(have)[:3]}")
                for d in doms:
                    q.world.xs.rm(f"/local/domain/0/backend/vif/{d}/0/hotplug-status")
                q.reset_vifs([f"vif{d}.0" for d in doms])
        sized = {}
        for name, row in rows.items():
            sized[name] = {f"{what}{unit}": stats(row[f"{what}{key}"]) for what in ("online", "offline")
                           for unit, key in (("_ms", ""), ("_cpu_ms", "_cpu"))}
        ref = sized["qubes today"]
        for name, row in sized.items():
            row["ratio_to_qubes"] = ratios(row, ref, ("online_ms", "offline_ms", "online_cpu_ms", "offline_cpu_ms"))
            r = row["ratio_to_qubes"]
            say(f"  storm {size:3d} {name:12s} online {row['online_ms']['median']:7.0f} ms (CPU "
                f"{row['online_cpu_ms']['median']:6.0f})  offline {row['offline_ms']['median']:7.0f} ms (CPU "
                f"{row['offline_cpu_ms']['median']:6.0f})"
                + ("" if name == "qubes today" else
                   f"   ratio: online {r['online_ms']} wall / {r['online_cpu_ms']} CPU, "
                   f"offline {r['offline_ms']} wall / {r['offline_cpu_ms']} CPU"))
        out[str(size)] = sized
    results.setdefault("vs_qubes", {})["storms"] = {"sizes": sizes, "rounds": reps, "results": out}


def start_system_bus(d):
    """A private dbus-daemon (system bus config, socket in ``d``) -> (process,
    address). The caller terminates it."""
    conf = os.path.join(d, "bus.conf")
    sock = os.path.join(d, "bus")
    with open(conf, "w") as f:
        f.write(SYSTEM_BUS_CONF.format(socket=sock))
    proc = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork", "--nopidfile", "--nosyslog",
                             "--print-address"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()  # printed once it listens
    if not line:
        proc.kill()
        raise RuntimeError(f"dbus-daemon did not start: {proc.stderr.read()[-400:]}")
    return proc, f"unix:path={sock}"


def bench_vs_qubes_dnat(q, venv, n, results):
    """qubes-setup-dnat-to-ns: today's Qubes script (python3, dbus, qubesdb)
    and ours (nft), in the same netvm, the same resolv.conf (bind-mounted
    over /etc/resolv.conf in the driver's mount namespace), the same
    virtual nameservers (QubesDB for Qubes', XenStore for ours), a system
    bus with no systemd-resolved on it. Per round each contender, in an
    order alternating per round: the upstreams switched to the other list
    (so the chain the previous run left is wrong: a real change), one run
    (exit 0, the chain checked), one more (already right: exit 100)."""
    ours = os.path.join(venv, "bin", "qubes-setup-dnat-to-ns")
    why = None
    if not q.qdb:
        why = "no real QubesDB (its python module is what Qubes' script reads)"
    elif not os.path.exists(ours):
        why = f"{ours} is not installed"
    elif shutil.which("dbus-daemon") is None:
        why = "no dbus-daemon"
    elif subprocess.run([PROD_PYTHON, "-c", "import dbus"], capture_output=True).returncode != 0:
        why = f"{PROD_PYTHON} cannot import dbus (Debian's python3-dbus: tests/install-packages)"
    if why:
        say(f"  DNAT side by side skipped: {why}")
        results.setdefault("vs_qubes", {})["dnat"] = {"skipped": why}
        return
    service = os.path.join(q.run_dir, "qubes-service", "qubes-firewall")
    if os.path.exists(service):  # Qubes' script would call systemctl
        raise RuntimeError(f"{service} exists")
    bus_dir = os.path.join(q.tmp, "dbus")
    os.makedirs(bus_dir, exist_ok=True)
    bus, address = start_system_bus(bus_dir)
    try:
        base = dict(q.world.env, PATH=q.path, VIF_ROUTE_QUBES_FIREWALL="nft", DBUS_SYSTEM_BUS_ADDRESS=address)
        contenders = [("qubes today", [q.dnat],  # its #!/usr/bin/python3, as the hook runs it
                       dict(base, PYTHONPATH=os.path.join(q.qdb, "python"))),
                      ("ours, nft", [ours], base)]
        rows = {name: {k: [] for k in ("changed", "changed_cpu", "unchanged", "unchanged_cpu")}
                for name, _, _ in contenders}
        variant = 0  # what /etc/resolv.conf says now (the fixture starts with 0)

        def one(name, argv, env, keep):
            nonlocal variant
            variant = 1 - variant
            q.set_resolv(DNAT_UPSTREAMS[variant])
            r = q.drv.run(argv, env)[0]
            if r["rc"] != 0:
                raise RuntimeError(f"{name}: qubes-setup-dnat-to-ns (upstreams changed) exited {r['rc']}: "
                                   f"{r['stderr'][-800:]}")
            have = q.dnat_chain()
            if have != DNAT_WANT[variant]:
                raise RuntimeError(f"{name}: dnat-dns after the change is {have}, not {DNAT_WANT[variant]}")
            u = q.drv.run(argv, env)[0]
            if u["rc"] != 100:
                raise RuntimeError(f"{name}: qubes-setup-dnat-to-ns (nothing changed) exited {u['rc']}, "
                                   f"not 100: {u['stderr'][-800:]}")
            if keep:
                row = rows[name]
                row["changed"].append(r["ms"])
                row["changed_cpu"].append(r["cpu_ms"])
                row["unchanged"].append(u["ms"])
                row["unchanged_cpu"].append(u["cpu_ms"])

        for c in contenders:  # warm-up: ours adds its guard chain once
            one(*c, keep=False)
        for i in range(n):
            for c in (contenders if i % 2 == 0 else contenders[::-1]):
                one(*c, keep=True)
    finally:
        bus.terminate()
        try:
            bus.wait(10)
        except subprocess.TimeoutExpired:
            bus.kill()
    out = {}
    for name, row in rows.items():
        out[name] = {f"{k}_ms": stats(v) for k, v in row.items()}
    say_vs_qubes(out, (("changed", "changed (exit 0) "), ("unchanged", "unchanged (100)  ")), 12)
    results.setdefault("vs_qubes", {})["dnat"] = {
        "rounds": n, "upstreams": list(DNAT_UPSTREAMS), "virtual_nameservers": ["10.139.1.1", "10.139.1.2"],
        "system_bus": "private dbus-daemon, no systemd-resolved", "contenders": out}


def plot_storms(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say(f"  matplotlib is not installed (pip install '.[bench]'): no plot written to {path}")
        return None
    st = results["vs_qubes"]["storms"]
    m = results["machine"]
    sizes = st["sizes"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = {"qubes today": "tab:grey", "ours, nft": "tab:blue"}
    for name in ("qubes today", "ours, nft"):
        for what, ls, marker in (("online", "-", "o"), ("offline", "--", "s")):
            ys = [st["results"][str(s)][name][f"{what}_ms"]["median"] / 1000 for s in sizes]
            ax.plot(sizes, ys, ls, marker=marker, color=colors[name], label=f"{name}: {what}")
    ax.set_xlabel("concurrent hotplug runs (guests starting / stopping at once)")
    ax.set_ylabel("storm wall time, first spawn to last exit (s, median)")
    ax.set_xticks(sizes)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Storms: today's Qubes vif-route-qubes vs ours (nft), one netvm\n"
                 f"{m['date']}, {m['cpus']} x {m['cpu']}, kernel {m['kernel']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    say(f"  plot written to {path}")
    return path


class _Done(Exception):
    """--firewall-only: the rest of the run is skipped."""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs, curves to 200 vifs (< 2 min)")
    ap.add_argument("--json", metavar="FILE", help="write all results as JSON")
    ap.add_argument("--venv", help=f"measure this environment (default: {DEFAULT_VENV}, Debian's python3)")
    ap.add_argument("--size", type=int, help="vifs for the flatness curves (default 1000; --quick 200)")
    ap.add_argument("--skip-curve", action="store_true")
    ap.add_argument("--firewall-only", action="store_true",
                    help="only the firewall backends: forwarding rate, child processes, the nft curve, the plot")
    ap.add_argument("--fwd-sizes", default=None,
                    help="vif counts for the forwarding rate (default 1,250,1000; --quick 1,50,200)")
    ap.add_argument("--shell-script", metavar="FILE",
                    help="a copy of the iptables-era Qubes vif-route-qubes shell script (not shipped here): "
                         "timed side by side with both backends, its child processes counted")
    ap.add_argument("--xen-scripts", metavar="DIR", default="/etc/xen/scripts",
                    help="Xen's hotplug helpers the shell script sources (vif-common.sh, ...; "
                         "default /etc/xen/scripts)")
    ap.add_argument("--side-by-side-only", action="store_true",
                    help="only online/offline of the shell script and both backends side by side, "
                         "and the child processes per run")
    ap.add_argument("--qubes", metavar="CHECKOUT", default=os.environ.get("VRQ_QUBES_CHECKOUT"),
                    help="a checkout of QubesOS/qubes-core-agent-linux (work tree or git directory; default "
                         "$VRQ_QUBES_CHECKOUT): today's network/vif-route-qubes is timed side by side with ours "
                         "(the main anchor), the iptables-era one (release4.1) as a second line")
    ap.add_argument("--qubesdb", metavar="PREFIX",
                    help="a built QubesDB (bin/qubesdb-daemon ...; default $VRQ_QUBESDB, else built into "
                         f"{CACHE}/qubesdb by ../shared/vendor/build-qubesdb)")
    ap.add_argument("--vs-qubes-only", action="store_true",
                    help="only the comparison with today's Qubes script (needs --qubes)")
    ap.add_argument("--storms", default="8,32,64", help="storm sizes (concurrent runs; default 8,32,64)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds of single runs (default 30; --quick 10)")
    ap.add_argument("--storm-rounds", type=int, help="rounds per storm size (default 5; --quick 2)")
    ap.add_argument("--plot", default=os.path.join(HERE, "firewall.png"), help="where to write the plot")
    ap.add_argument("--storm-plot", default=os.path.join(HERE, "storms.png"),
                    help="where to write the plot of storm wall time against concurrency")
    ap.add_argument("--plot-from", metavar="JSON", help="only draw the plot from an earlier run's --json file")
    opts = ap.parse_args()
    if opts.plot_from:
        with open(opts.plot_from) as f:
            earlier = json.load(f)
        if earlier.get("forwarding") or earlier.get("curve"):
            plot(earlier, opts.plot)
        if (earlier.get("vs_qubes") or {}).get("storms"):
            plot_storms(earlier, opts.storm_plot)
        return
    if os.geteuid() != 0:
        raise SystemExit("run as root: network namespaces and iptables")

    if opts.vs_qubes_only and not opts.qubes:
        raise SystemExit("--vs-qubes-only needs --qubes CHECKOUT (or $VRQ_QUBES_CHECKOUT)")
    quick = opts.quick
    n = opts.rounds or (10 if quick else 30)
    size = opts.size or (200 if quick else 1000)
    checkpoints = sorted({1, 100, size // 2, size} if size >= 200 else {1, size})
    reps = 3 if quick else 7
    started = time.monotonic()
    results = {"machine": machine_info(), "mode": "quick" if quick else "full"}
    venv = os.path.abspath(opts.venv or DEFAULT_VENV)
    results["env"] = prepare_venv(venv, default=opts.venv is None)
    m, e = results["machine"], results["env"]
    say(f"{m['date']}  {m['cpus']} x {m['cpu']}  kernel {m['kernel']}")
    say(f"measured: {e['python']} (Python {e['version']}) in {e['venv']}; {e['packages']}")

    tmp = tempfile.mkdtemp(prefix="vrq-bench-")
    xsd = xs = world = drv = None
    try:
        xsd = start_xenstored(os.path.join(tmp, "xenstored.sock"))
        xs = XsClient(os.path.join(tmp, "xenstored.sock"))
        shell = (os.path.abspath(opts.shell_script), os.path.abspath(opts.xen_scripts)) if opts.shell_script else None
        if opts.qubes:
            say("\n== side by side with today's Qubes script (one netvm, Qubes' qubes-antispoof.nft loaded)")
            checkout = QubesCheckout(opts.qubes)
            xen_dir = xen_helpers(opts.xen_scripts if opts.xen_scripts != "/etc/xen/scripts" else None)
            qdb = qubesdb_prefix(opts.qubesdb)
            if not qdb:
                say("  the real QubesDB cannot be had here: a qubesdb-read stand-in answers")
            q = QubesNetvm(xs, tmp, checkout, xen_dir, qdb)
            try:
                results.setdefault("vs_qubes", {})["fixture"] = q.info
                say(f"  Qubes checkout {q.info['commit'] or checkout.path}; QubesDB: {q.info['qubesdb']}")
                bench_vs_qubes_single(q, venv, n, results)
                say("  -- qubes-setup-dnat-to-ns")
                bench_vs_qubes_dnat(q, venv, n, results)
                sizes = [int(x) for x in opts.storms.split(",") if x]
                if sizes:
                    bench_vs_qubes_storms(q, venv, sizes, opts.storm_rounds or (2 if quick else 5), results)
            finally:
                q.close()
                xs.rm("/local/domain/0/backend")
            if opts.vs_qubes_only:
                raise _Done()
        say("\n== online/offline side by side, one vif, one IPv4 address"
            + (": the iptables-era shell script and both backends" if shell else ": both backends (no --shell-script)"))
        bench_side_by_side(venv, xs, tmp, n, results, shell=shell)
        if opts.side_by_side_only:
            say("\n== child processes per hotplug run")
            bench_children(venv, xs, tmp, 3 if quick else 5, results, shell=shell)
            raise _Done()
        fwd_sizes = [int(x) for x in (opts.fwd_sizes or ("1,50,200" if quick else "1,250,1000")).split(",")]
        say("\n== firewall backends: forwarding rate against the number of vifs")
        for firewall in ("iptables", "nft"):
            bench_forwarding(venv, xs, tmp, firewall, fwd_sizes, 1.0 if quick else 2.0, 3, results)
        say("\n== firewall backends: child processes per hotplug run")
        bench_children(venv, xs, tmp, 3 if quick else 5, results, shell=shell)
        if opts.firewall_only and not opts.skip_curve:
            say(f"\n== flatness: {size} vifs, nft backend")
            bench_curve(venv, xs, tmp, None, size, checkpoints, reps, results, firewall="nft")
        if opts.firewall_only:
            raise _Done()
        world = World(xs, os.path.join(tmp, "main"))
        drv = Driver(world.netvm)
        say("\n== start-up")
        bench_startup(drv, venv, world, n, results)
        say("\n== one vif, one IPv4 address (iptables-nft)")
        bench_single(drv, venv, world, n, results)
        say("\n== qubes-setup-dnat-to-ns")
        bench_dnat(lambda: Driver(world.netvm), venv, world, n, results)
        say("\n== 64 concurrent hotplug runs")
        bench_concurrent(drv, venv, world, 64, 2 if quick else 3, results)
        drv.close()
        drv = None
        world.close()
        world = None
        xs.rm("/local/domain/0/backend")
        if not opts.skip_curve:
            for backend, firewall in ((None, "nft"), (None, "iptables"), ("legacy", "iptables")):
                say(f"\n== flatness: {size} vifs, {curve_label(backend, firewall)}")
                bench_curve(venv, xs, tmp, backend, size, checkpoints, reps, results, firewall=firewall)
    except _Done:
        pass
    finally:
        if drv:
            drv.close()
        if world:
            world.close()
        if xs:
            xs.close()
        if xsd:
            xsd.terminate()
            try:
                xsd.wait(10)
            except subprocess.TimeoutExpired:
                xsd.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    results["verdicts"] = verdicts(results)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["machine"]["loadavg_at_end"] = os.getloadavg()[0]
    if opts.vs_qubes_only and not opts.json:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%MZ")
        opts.json = os.path.join(HERE, f"vs-qubes-{stamp}.json")
    if opts.json:  # before the plot: a plotting problem must not lose the numbers
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1)
    if results.get("forwarding") or results.get("curve"):  # --side-by-side-only has nothing to draw
        say("\n== plot")
        try:
            results["plot"] = plot(results, opts.plot)
        except Exception as exc:  # noqa: BLE001 - the numbers above stand without it
            say(f"  no plot: {type(exc).__name__}: {exc} (redraw with --plot-from)")
    if (results.get("vs_qubes") or {}).get("storms"):
        say("\n== storm plot")
        try:
            results["storm_plot"] = plot_storms(results, opts.storm_plot)
        except Exception as exc:  # noqa: BLE001
            say(f"  no plot: {type(exc).__name__}: {exc} (redraw with --plot-from)")
    say("\n== targets")
    for name, v in results["verdicts"].items():
        say(f"  {'MET ' if v['met'] else 'MISS'}  {name:45s} {v['value']}")
    say(f"\n(total {results['elapsed_s']} s; 1-min load average {m['loadavg_at_start']:.1f} at the start, "
        f"{results['machine']['loadavg_at_end']:.1f} at the end: other work on the machine inflates wall times, "
        "CPU times much less)")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1)
        say(f"results: {opts.json}")


if __name__ == "__main__":
    main()
