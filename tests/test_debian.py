"""The Debian packages (debian/): built with Debian's own tooling, lintian
clean, and installed, run, removed, reinstalled and purged in a clean
Debian 12 chroot, with their dependencies from Debian (deb.debian.org).

The chroot's base (``debootstrap --variant=minbase bookworm`` plus fresh
package lists) is cached as one archive under
``/var/cache/vif-route-qubes-debian`` (``VRQ_DEBIAN_CACHE``), keyed by its
recipe, as tests/e2e caches its images; every test run unpacks a fresh copy,
so each run starts from the same clean system. Downloaded dependencies are
kept in the cache's ``archives/`` between runs. The chroot runs in a network
namespace of its own (``unshare --net``) except for apt, so nothing the
installed tools do can reach the host's interfaces or firewall.

Needs root, debootstrap, the build dependencies of tests/install-packages
and, on the first run, the mirror: the build of the base takes 1-3 minutes,
a run afterwards about one.
"""

import hashlib
import inspect
import json
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("VRQ_DEBIAN_CACHE", "/var/cache/vif-route-qubes-debian"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3-vif-route-qubes", "vif-route-qubes-netvm", "vif-route-qubes-guest", "vif-route-qubes-dom0")
COMMANDS = {
    "vif-route-qubes-netvm": ("vif-route-qubes", "qubes-setup-dnat-to-ns"),
    "vif-route-qubes-guest": ("qubes-setup-ip",),
    "vif-route-qubes-dom0": ("qvm-dom0-network-via-netvm", "vif-route-qubes-keys", "qvm-set-default-netvm"),
}
HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
# What apt and dpkg keep about themselves (and the kernel file systems):
# not left by our packages, and not compared.
NOT_COMPARED = ("proc/", "sys/", "dev/", "tmp/", "var/lib/apt/", "var/cache/apt/", "var/lib/dpkg/",
                "var/log/", "var/cache/debconf/", "var/cache/ldconfig/", "etc/ld.so.cache",
                "var/lib/systemd/deb-systemd-helper-enabled/", "var/lib/systemd/deb-systemd-user-helper-enabled/")


def sh(argv, **kw):
    kw.setdefault("env", HOST_ENV)
    res = subprocess.run(argv, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, argv))} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


# ---------------------------------------------------------------- the base


def _base_recipe(root: pathlib.Path) -> None:
    sh(["debootstrap", "--variant=minbase", SUITE, str(root), MIRROR], timeout=1200)
    # no daemon may start from a maintainer script in here
    (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
    os.chmod(root / "usr/sbin/policy-rc.d", 0o755)
    (root / "etc/apt/apt.conf.d/90vrq").write_text('APT::Install-Recommends "false";\n')
    with Mounts(root):
        chroot(root, "apt-get update -q", net=True)
        chroot(root, "apt-get clean")


def base() -> pathlib.Path:
    key = hashlib.sha256((inspect.getsource(_base_recipe) + SUITE + MIRROR).encode()).hexdigest()[:16]
    archive = CACHE / f"base-{key}.tar"
    if archive.exists():
        return archive
    if not shutil.which("debootstrap"):
        pytest.fail("debootstrap is needed (tests/install-packages installs it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    for old in CACHE.glob("base-*.tar"):
        old.unlink()
    with tempfile.TemporaryDirectory(dir=CACHE) as t:
        root = pathlib.Path(t) / "root"
        _base_recipe(root)
        sh(["tar", "-C", str(root), "--numeric-owner", "-cf", str(archive) + ".tmp", "."])
    os.replace(str(archive) + ".tmp", archive)
    return archive


class Mounts:
    """/proc, /dev and the apt archive cache inside the chroot, always
    unmounted again."""

    def __init__(self, root):
        self.root, self.done = pathlib.Path(root), []

    def __enter__(self):
        archives = CACHE / "archives"
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        for src, dst, opts in (("proc", "proc", ["-t", "proc"]), ("/dev", "dev", ["--bind"]),
                               ("/dev/pts", "dev/pts", ["--bind"]),
                               (str(archives), "var/cache/apt/archives", ["--bind"])):
            target = self.root / dst
            target.mkdir(parents=True, exist_ok=True)
            sh(["mount", *opts, src, str(target)])
            self.done.append(target)
        return self

    def __exit__(self, *exc):
        for target in reversed(self.done):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def chroot(root, script, net=False, check=True, env=None):
    """Run ``script`` with /bin/sh -ec in the chroot; without ``net``, in a
    new network namespace (only loopback, down)."""
    argv = ([] if net else ["unshare", "--net"]) + ["chroot", str(root), "/bin/sh", "-ec", script]
    full = dict(HOST_ENV, DEBIAN_FRONTEND="noninteractive", **(env or {}))
    res = subprocess.run(argv, capture_output=True, text=True, env=full, timeout=900)
    if check:
        assert res.returncode == 0, f"in the chroot: {script}\nexit {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


def snapshot(root) -> dict:
    """{path: (type and mode, content digest for files)} of the chroot."""
    root = pathlib.Path(root)
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        if any(rel_dir.startswith(p) for p in NOT_COMPARED if p.endswith("/")):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            rel = rel_dir + name
            if any(rel == p.rstrip("/") or rel.startswith(p) for p in NOT_COMPARED):
                continue
            st = os.lstat(os.path.join(dirpath, name))
            digest = ""
            if os.path.isfile(os.path.join(dirpath, name)) and not os.path.islink(os.path.join(dirpath, name)):
                with open(os.path.join(dirpath, name), "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()[:16]
            found[rel] = (oct(st.st_mode), digest)
    return found


# ---------------------------------------------------------------- build


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the Debian package test needs root (debootstrap, chroot, mounts)")
    for tool in ("dpkg-buildpackage", "dh", "lintian"):
        if not shutil.which(tool, path=HOST_ENV["PATH"]):
            pytest.fail(f"{tool} is needed (tests/install-packages installs the build dependencies)")
    out = tmp_path_factory.mktemp("debs")
    src = out / "src"
    files = sh(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"]).stdout.split("\0")
    for rel in filter(None, files):
        s = ROOT / rel
        if s.is_file() or s.is_symlink():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, src / rel, follow_symlinks=False)
    # the documented command, with Debian's python3 (not a venv's) first on PATH
    build = sh(["dpkg-buildpackage", "-b", "-us", "-uc"], cwd=src, timeout=900)
    debs = {p.name.split("_")[0]: p for p in out.glob("*.deb")}
    changes = next(out.glob("*.changes"))
    return {"dir": out, "debs": debs, "changes": changes, "log": build.stdout + build.stderr}


def test_one_package_per_role_and_the_module(built):
    assert sorted(built["debs"]) == sorted(PACKAGES)
    contents = {name: sh(["dpkg-deb", "-c", str(p)]).stdout for name, p in built["debs"].items()}
    assert "./etc/xen/scripts/vif-route-qubes" in contents["vif-route-qubes-netvm"]
    assert "./etc/sysctl.d/80-vif-route-qubes.conf" in contents["vif-route-qubes-netvm"]
    assert "./etc/NetworkManager/dispatcher.d/qubes-nmhook" in contents["vif-route-qubes-netvm"]
    assert "./lib/systemd/system/xendriverdomain.service" in contents["vif-route-qubes-netvm"]
    assert "./lib/systemd/system/qubes-setup-dnat-to-ns.service" in contents["vif-route-qubes-netvm"]
    assert "./lib/udev/rules.d/99-qubes-setup-ip.rules" in contents["vif-route-qubes-guest"]
    assert "./lib/systemd/system/qubes-setup-ip@.service" in contents["vif-route-qubes-guest"]
    for pkg, commands in COMMANDS.items():
        for cmd in commands:
            assert f"./usr/bin/{cmd}\n" in contents[pkg]
            assert f"./usr/share/man/man1/{cmd}.1.gz" in contents[pkg]
    assert "/usr/bin/" not in contents["python3-vif-route-qubes"]
    # the product only: no test rig, no fault injection in what ships
    assert "./usr/lib/python3/dist-packages/vif_route_qubes/__init__.py" in contents["python3-vif-route-qubes"]
    assert "rigs" not in contents["python3-vif-route-qubes"]
    assert "tests/" not in contents["python3-vif-route-qubes"]
    control = sh(["dpkg-deb", "-f", str(built["debs"]["python3-vif-route-qubes"]), "Depends"]).stdout
    for dep in ("python3-click", "python3-plumbum", "python3-pyxs"):
        assert dep in control


def test_lintian_has_no_errors_or_warnings(built):
    res = subprocess.run(["lintian", "--fail-on", "error,warning", "--tag-display-limit", "0", str(built["changes"])],
                         capture_output=True, text=True, env=HOST_ENV, timeout=600)
    shown = [ln for ln in res.stdout.splitlines() if ln[:2] in ("E:", "W:")]
    assert res.returncode == 0 and not shown, res.stdout + res.stderr


def test_the_packaged_files_run_the_commands_in_usr_bin(built):
    d = built["dir"] / "x"
    sh(["dpkg-deb", "-x", str(built["debs"]["vif-route-qubes-netvm"]), str(d)])
    sh(["dpkg-deb", "-x", str(built["debs"]["vif-route-qubes-guest"]), str(d)])
    for rel in ("etc/xen/scripts/vif-route-qubes", "etc/NetworkManager/dispatcher.d/qubes-nmhook",
                "lib/systemd/system/qubes-setup-dnat-to-ns.service", "lib/systemd/system/qubes-setup-ip@.service"):
        text = (d / rel).read_text()
        code = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
        assert not [ln for ln in code if "/opt/vif-route-qubes" in ln], rel
        assert "/usr" in "\n".join(code), rel


# ---------------------------------------------------------------- in a chroot


@pytest.fixture(scope="module")
def system(built, tmp_path_factory):
    archive = base()
    root = tmp_path_factory.mktemp("chroot") / "root"
    root.mkdir()
    sh(["tar", "-C", str(root), "--numeric-owner", "-xf", str(archive)])
    (root / "debs").mkdir()
    for p in built["debs"].values():
        shutil.copy(p, root / "debs" / p.name)
    with Mounts(root):
        yield root
    shutil.rmtree(root, ignore_errors=True)


def install(root, *extra):
    debs = " ".join(f"./debs/{p.name}" for p in sorted((root / "debs").glob("*.deb")))
    cmd = f"cd / && apt-get install -y -q {' '.join(extra)} {debs}"
    res = chroot(root, cmd, net=True, check=False)
    if res.returncode != 0 and ("404" in res.stdout + res.stderr or "Unable to fetch" in res.stdout + res.stderr):
        chroot(root, "apt-get update -q", net=True)  # the cached lists went stale
        res = chroot(root, cmd, net=True, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res


def dpkg_status(root):
    res = chroot(root, "dpkg-query -W -f='${Package} ${db:Status-Abbrev}\\n' " + " ".join(PACKAGES), check=False)
    return {ln.split()[0]: ln.split()[1] for ln in res.stdout.splitlines() if len(ln.split()) > 1}


def run_tools(root):
    """Every installed command answers --help; dry runs and a real
    qvm-set-default-netvm on the chroot's own xl.conf."""
    for commands in COMMANDS.values():
        for cmd in commands:
            res = chroot(root, f"{cmd} --help")
            assert res.stdout.startswith(f"Usage: {cmd} "), res.stdout
            assert chroot(root, f"man -w {cmd} 2>/dev/null || test -e /usr/share/man/man1/{cmd}.1.gz").returncode == 0
    # the hotplug drop-in finds the packaged command (exit 2: a usage error, from click)
    res = chroot(root, "/etc/xen/scripts/vif-route-qubes --help")
    assert "Usage: vif-route-qubes" in res.stdout
    # the dom0 tool on the chroot's xl.conf (dom0 needs no XenStore)
    chroot(root, "mkdir -p /etc/xen && printf '# xl.conf\\n#vif.default.backend=\"0\"\\n' > /etc/xen/xl.conf")
    res = chroot(root, "qvm-set-default-netvm --dry-run dom0")
    assert 'vif.default.backend="0"' in res.stdout
    chroot(root, "qvm-set-default-netvm dom0")
    assert chroot(root, "qvm-set-default-netvm --show").stdout == (
        "vif.default.backend=0\nvif.default.script=vif-route-qubes\n")
    assert chroot(root, "cat /etc/xen/xl.conf").stdout.startswith('# xl.conf\n#vif.default.backend="0"\n')
    # the DNAT tool's dry run in the chroot's own (empty) network namespace
    chroot(root, "printf 'nameserver 192.0.2.53\\n' > /tmp/resolv.conf")
    res = chroot(root, "qubes-setup-dnat-to-ns --dry-run --resolv-conf /tmp/resolv.conf "
                       "--dns1 10.139.1.1 --dns2 10.139.1.2", check=False)
    assert res.returncode == 0, res.stderr
    assert "192.0.2.53" in res.stdout and "10.139.1.1" in res.stdout, res.stdout
    # the fast plumbum path with Debian's plumbum 1.8
    probe = ("import json, sys; from vif_route_qubes import _plumbum; "
             "m = _plumbum.local(); out = m['echo']('ok').strip(); "
             "print(json.dumps([out, sys.modules['plumbum.machines.local'].__file__, 'http.client' in sys.modules, "
             "any(n.startswith('plumbum.colorlib') for n in sys.modules)]))")
    out, where, http, colors = json.loads(chroot(root, f"python3 -c \"{probe}\"").stdout)
    assert out == "ok" and where.startswith("/usr/lib/python3/dist-packages/plumbum/")
    assert not http and not colors
    assert chroot(root, "dpkg-query -W -f='${Version}' python3-plumbum").stdout.startswith("1.8")


def test_install_run_remove_reinstall_purge(system):
    root = system
    before = snapshot(root)
    assert "usr/bin/dpkg" in before and "etc/apt/sources.list" in before  # the walk sees the system

    install(root)
    assert dpkg_status(root) == {p: "ii" for p in PACKAGES}
    assert "usr/bin/vif-route-qubes" in snapshot(root)
    run_tools(root)
    # the xl devd unit and the DNAT unit are enabled for the next boot
    for unit in ("xendriverdomain.service", "qubes-setup-dnat-to-ns.service"):
        assert (root / "etc/systemd/system/multi-user.target.wants" / unit).is_symlink(), unit
    # the tools' state directory exists once a tool ran (the lock of the dry run or not)
    (root / "run/vif-route-qubes").mkdir(parents=True, exist_ok=True)
    (root / "run/vif-route-qubes/lock").write_text("")

    # maintainer scripts are idempotent: the same packages over themselves
    install(root, "--reinstall")
    assert dpkg_status(root) == {p: "ii" for p in PACKAGES}

    chroot(root, "apt-get remove -y -q " + " ".join(PACKAGES))
    status = dpkg_status(root)
    assert status["vif-route-qubes-netvm"] == "rc"  # its conffiles stay until purge
    assert (root / "etc/xen/scripts/vif-route-qubes").exists()
    assert not (root / "usr/bin/vif-route-qubes").exists()
    # the drop-in, left behind by remove, says what is missing
    res = chroot(root, "/etc/xen/scripts/vif-route-qubes online", check=False)
    assert res.returncode == 1 and "not installed" in res.stderr

    install(root)
    assert dpkg_status(root) == {p: "ii" for p in PACKAGES}
    run_tools(root)

    chroot(root, "apt-get purge -y -q --autoremove " + " ".join(PACKAGES))
    assert dpkg_status(root) == {}
    chroot(root, "rm -f /etc/xen/xl.conf && rmdir /etc/xen 2>/dev/null || true")  # made by the test, not the packages
    after = snapshot(root)
    left = {p: after[p] for p in after if p not in before or before[p] != after[p]}
    gone = sorted(p for p in before if p not in after)
    assert not left and not gone, f"left by the packages: {sorted(left)}; removed: {gone}"


# A stand-in for Qubes' qubes-core-agent-networking: the three files of it
# that ours replace (docs/qubes.md), each a script that says whose it is.
QUBES_STANDIN = r"""
rm -rf /tmp/qubes-pkg && mkdir -p /tmp/qubes-pkg/DEBIAN /tmp/qubes-pkg/etc/xen/scripts /tmp/qubes-pkg/usr/lib/qubes
printf 'Package: qubes-core-agent-networking\nVersion: 4.2.99\nArchitecture: all\nMaintainer: test <t@example.org>\nDescription: stand-in of Qubes networking files\n' > /tmp/qubes-pkg/DEBIAN/control
for f in etc/xen/scripts/vif-route-qubes usr/lib/qubes/qubes-setup-dnat-to-ns usr/lib/qubes/setup-ip; do
    printf '#!/bin/sh\necho qubes %s\n' "$f" > /tmp/qubes-pkg/$f
    chmod 0755 /tmp/qubes-pkg/$f
done
dpkg-deb -Zgzip --build /tmp/qubes-pkg /tmp/qubes-core-agent-networking.deb >/dev/null
dpkg -i /tmp/qubes-core-agent-networking.deb >/dev/null
rm -rf /tmp/qubes-pkg /tmp/qubes-core-agent-networking.deb
"""
QUBES_FILES = ("etc/xen/scripts/vif-route-qubes", "usr/lib/qubes/qubes-setup-dnat-to-ns", "usr/lib/qubes/setup-ip")


def test_on_a_qubes_template_qubes_files_are_diverted_and_given_back(system):
    root = system
    chroot(root, QUBES_STANDIN)
    before = snapshot(root)
    install(root)
    # Qubes' copies set aside, its callers' paths run ours
    for rel in QUBES_FILES:
        assert (root / f"{rel}.qubes").read_text() == f"#!/bin/sh\necho qubes {rel}\n", rel
    assert os.readlink(root / "usr/lib/qubes/qubes-setup-dnat-to-ns") == "/usr/bin/qubes-setup-dnat-to-ns"
    assert os.readlink(root / "usr/lib/qubes/setup-ip") == "/usr/bin/qubes-setup-ip"
    assert chroot(root, "/usr/lib/qubes/setup-ip --help").stdout.startswith("Usage: qubes-setup-ip ")
    assert chroot(root, "/usr/lib/qubes/qubes-setup-dnat-to-ns --help").stdout.startswith(
        "Usage: qubes-setup-dnat-to-ns ")
    assert "Usage: vif-route-qubes" in chroot(root, "/etc/xen/scripts/vif-route-qubes --help").stdout
    diversions = chroot(root, "dpkg-divert --list").stdout
    assert sorted(line for line in diversions.splitlines() if "vif-route-qubes-" in line) == sorted(
        f"diversion of /{rel} to /{rel}.qubes by {pkg}" for rel, pkg in zip(
            QUBES_FILES, ("vif-route-qubes-netvm", "vif-route-qubes-netvm", "vif-route-qubes-guest")))
    # idempotent: again over itself, and Qubes' package upgraded meanwhile
    # lands beside ours, not over it
    install(root, "--reinstall")
    chroot(root, QUBES_STANDIN.replace("4.2.99", "4.2.100"))
    assert os.readlink(root / "usr/lib/qubes/setup-ip") == "/usr/bin/qubes-setup-ip"
    assert "Usage: vif-route-qubes" in chroot(root, "/etc/xen/scripts/vif-route-qubes --help").stdout
    # remove gives the two commands back; purge the hotplug script too
    chroot(root, "apt-get remove -y -q vif-route-qubes-guest vif-route-qubes-netvm")
    assert chroot(root, "/usr/lib/qubes/setup-ip").stdout == "qubes usr/lib/qubes/setup-ip\n"
    assert chroot(root, "/usr/lib/qubes/qubes-setup-dnat-to-ns").stdout == "qubes usr/lib/qubes/qubes-setup-dnat-to-ns\n"
    chroot(root, "apt-get purge -y -q --autoremove " + " ".join(PACKAGES))
    assert chroot(root, "/etc/xen/scripts/vif-route-qubes").stdout == "qubes etc/xen/scripts/vif-route-qubes\n"
    assert "vif-route-qubes-" not in chroot(root, "dpkg-divert --list").stdout
    assert chroot(root, "dpkg --verify qubes-core-agent-networking", check=False).returncode == 0
    after = snapshot(root)
    left = {p: after[p] for p in after if p not in before or before[p] != after[p]}
    gone = sorted(p for p in before if p not in after)
    assert not left and not gone, f"left by the packages: {sorted(left)}; removed: {gone}"
    chroot(root, "dpkg --purge qubes-core-agent-networking >/dev/null")
