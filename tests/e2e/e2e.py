#!/usr/bin/env python3
"""End-to-end proof of vif-route-qubes under a real Xen 4.17 hypervisor.

Builds (and caches) a Debian bookworm PV dom0 initramfs, a busybox guest
initramfs and the Xen image, boots Xen under qemu (TCG), lets dom0 run the
checks in ``dom0/checks.sh`` and reports them as ``E2E CHECK <name> PASS|FAIL
<detail>`` lines plus a final ``E2E RESULT PASS|FAIL``.

Usage (as root):  python3 tests/e2e/e2e.py [--log FILE] [--timeout SEC]
Exit status: 0 when every check passed, 1 when a check failed, 2 when the
images could not be built or qemu could not run / timed out.

Environment:
  VRQ_E2E_CACHE      cache directory (default /var/cache/vif-route-qubes-e2e)
  VRQ_E2E_PROJECT    project checkout to install (default: this repository)
  VRQ_E2E_VIF_SCRIPT a stand-in to put over /etc/xen/scripts/vif-route-qubes
                     (default: none, the packaged drop-in)
  VRQ_E2E_TIMEOUT    overall qemu timeout in seconds (default 600)
  VRQ_E2E_FIREWALL   iptables|nft|auto: VIF_ROUTE_QUBES_FIREWALL in the netvm
                     for a1, a2 and up/down (default unset: the product's own
                     default, nft here); AppVM a3 then runs with the other one.
                     dom0 as the backend runs every check with both.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import inspect
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITE = "bookworm"
XEN_MAJOR = "4.17"
# Bump to force a rebuild of the cached dom0 base when the recipe below changes.
BASE_RECIPE = "dom0-base-v2"
DEBOOTSTRAP_INCLUDE = "busybox,iproute2,kmod,python3,procps"
DOM0_PACKAGES = [
    "xenstore-utils",
    "iptables",
    "conntrack",
    "nftables",  # the firewall's auto choice picks nft where nft exists
    # the project's packages' dependencies, from Debian: in the base, so that
    # the per-run "apt-get install ./*.deb" of the packages resolves them
    # without the network (the base's package lists are trimmed)
    "python3-click",
    "python3-plumbum",
    "python3-pyxs",
]
# The project's Debian packages installed per image, by role: dom0 is also
# the backend of the first part (the netvm role), the netvm and the AppVMs
# share one root (the netvm and guest roles).
DOM0_ROLES = ["python3-vif-route-qubes", "vif-route-qubes-netvm", "vif-route-qubes-dom0"]
DOMU_ROLES = ["python3-vif-route-qubes", "vif-route-qubes-netvm", "vif-route-qubes-guest"]
# Kernel module trees (relative to lib/modules/VER/kernel) copied into dom0.
DOM0_MODULE_DIRS = [
    "net",
    "lib",
    "crypto",
    "drivers/xen",
    "drivers/net/xen-netback",
    "drivers/net/xen-netfront.ko",  # dom0 as a frontend (qvm-dom0-network-via-netvm), the netvm's uplink
    "drivers/net/dummy.ko",
    "drivers/net/veth.ko",
]
USED: set = set()  # cache entries used by this run (others get pruned)

RESULT_RE = re.compile(r"^E2E RESULT (PASS|FAIL)", re.M)
CHECK_RE = re.compile(r"^E2E CHECK (\S+) (PASS|FAIL)\b ?(.*)$", re.M)


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    if isinstance(cmd, str):
        kw.setdefault("shell", True)
    kw.setdefault("check", True)
    try:
        return subprocess.run(cmd, **kw)
    except subprocess.CalledProcessError as e:
        out = ""
        if e.stdout:
            out += e.stdout if isinstance(e.stdout, str) else e.stdout.decode(errors="replace")
        if e.stderr:
            out += e.stderr if isinstance(e.stderr, str) else e.stderr.decode(errors="replace")
        raise BuildError(f"command failed ({e.returncode}): {cmd}\n{out[-4000:]}") from None
    except FileNotFoundError as e:
        raise BuildError(f"command not found: {e.filename} (needed by: {cmd})") from None


def out(cmd) -> str:
    return run(cmd, capture_output=True, text=True).stdout


def sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path):
            h.update(p.read_bytes())
        else:
            h.update(str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise BuildError(
            "missing host tools: " + " ".join(missing)
            + " (apt-get install qemu-system-x86 debootstrap busybox-static cpio zstd xz-utils)"
        )


# --------------------------------------------------------------------------
# host-side downloads


def apt_candidate(pkg: str) -> str:
    for attempt in (0, 1):
        txt = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True).stdout
        m = re.search(r"Candidate: (\S+)", txt)
        if m and m.group(1) != "(none)":
            return m.group(1)
        if attempt == 0:
            log("apt lists lack %s: running apt-get update" % pkg)
            run(["apt-get", "update"], capture_output=True)
    raise BuildError(f"Debian package {pkg} not found by apt (check the host's apt sources)")


def kernel_package() -> str:
    apt_candidate("linux-image-amd64")
    txt = out(["apt-cache", "depends", "linux-image-amd64"])
    m = re.search(r"Depends: (linux-image-6\.1\.\S+-amd64)", txt)
    if not m:
        raise BuildError("cannot resolve the current linux-image-6.1 package:\n" + txt)
    return m.group(1)


def fetch_deb(cache: Path, pkg: str, version: str) -> Path:
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    # apt-get download names files pkg_version_arch.deb with ':' encoded as %3a
    ver_fs = version.replace(":", "%3a")
    hits = list(debs.glob(f"{pkg}_{ver_fs}_*.deb"))
    if hits:
        return hits[0]
    log(f"downloading {pkg}={version}")
    tmp = Path(tempfile.mkdtemp(dir=debs))
    try:
        os.chmod(tmp, 0o777)
        run(["apt-get", "download", f"{pkg}={version}"], cwd=tmp, capture_output=True)
        got = list(tmp.glob("*.deb"))
        if len(got) != 1:
            raise BuildError(f"apt-get download {pkg} produced {got}")
        dest = debs / got[0].name
        got[0].rename(dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract_vmlinux(bzimage: Path, dest: Path) -> None:
    """Uncompressed ELF kernel out of a bzImage (guests boot much faster from it)."""
    data = bzimage.read_bytes()
    for magic, kind in ((b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd")):
        pos = data.find(magic)
        while pos != -1:
            try:
                if kind == "xz":
                    blob = lzma.LZMADecompressor().decompress(data[pos:])
                else:
                    blob = subprocess.run(["zstd", "-dc"], input=data[pos:],
                                          capture_output=True).stdout
                if blob[:4] == b"\x7fELF":
                    dest.write_bytes(blob)
                    return
            except lzma.LZMAError:
                pass
            pos = data.find(magic, pos + 1)
    raise BuildError(f"no compressed ELF kernel found in {bzimage}")


def prepare_kernel_and_xen(cache: Path) -> dict:
    kpkg = kernel_package()
    kver_pkg = apt_candidate(kpkg)
    xver = apt_candidate(f"xen-hypervisor-{XEN_MAJOR}-amd64")
    kdeb = fetch_deb(cache, kpkg, kver_pkg)
    xdeb = fetch_deb(cache, f"xen-hypervisor-{XEN_MAJOR}-amd64", xver)
    key = sha(kdeb.name, xdeb.name, "kx-v1")
    d = cache / f"kernel-{key}"
    if not (d / "done").exists():
        log(f"unpacking {kdeb.name} and {xdeb.name}")
        shutil.rmtree(d, ignore_errors=True)
        (d / "root").mkdir(parents=True)
        run(["dpkg-deb", "-x", str(kdeb), str(d / "root")])
        run(["dpkg-deb", "-x", str(xdeb), str(d / "root")])
        with gzip.open(d / "root" / "boot" / f"xen-{XEN_MAJOR}-amd64.gz") as z:
            (d / "xen").write_bytes(z.read())
        vmlinuz = next((d / "root" / "boot").glob("vmlinuz-*"))
        shutil.copy(vmlinuz, d / "vmlinuz")
        extract_vmlinux(vmlinuz, d / "vmlinux")
        (d / "done").write_text("ok\n")
    modroot = d / "root" / "lib" / "modules"
    kver = next(modroot.iterdir()).name
    return {"dir": d, "kver": kver, "xen_version": xver, "key": key}


# --------------------------------------------------------------------------
# cpio helpers


def pack_cpio(root: Path, dest: Path, paths: list[str] | None = None, level: int = 6) -> None:
    """newc cpio of ROOT (or of the given relative paths under it), zstd-compressed."""
    tmp = dest.with_suffix(".tmp")
    if paths is None:
        find = "find . -mindepth 1"
    else:
        find = "find " + " ".join(f"'./{p}'" for p in paths)
    run(f"cd '{root}' && {find} | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 "
        f"| zstd -q -T0 -{level} > '{tmp}'")
    tmp.rename(dest)


# --------------------------------------------------------------------------
# dom0 base: debootstrap + Xen tools + kernel modules + guest kernel


class Mounts:
    def __init__(self, root: Path):
        self.root = root
        self.done: list[Path] = []

    def __enter__(self):
        for src, dst, opts in (("proc", "proc", ["-t", "proc"]),
                               ("sysfs", "sys", ["-t", "sysfs"]),
                               ("/dev", "dev", ["--bind"])):
            p = self.root / dst
            p.mkdir(exist_ok=True)
            run(["mount", *opts, src, str(p)])
            self.done.append(p)
        return self

    def __exit__(self, *exc):
        for p in reversed(self.done):
            subprocess.run(["umount", "-l", str(p)])


def chroot(root: Path, cmd: str, **kw) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C", "HOME": "/root"}
    return run(["chroot", str(root), "/bin/sh", "-ec", cmd], env=env, **kw)


def copy_host_apt_sources(root: Path) -> None:
    src = Path("/etc/apt")
    dst = root / "etc" / "apt"
    (dst / "sources.list.d").mkdir(parents=True, exist_ok=True)
    copied = [f for f in (src / "sources.list.d").glob("*") if f.suffix in (".list", ".sources")]
    for f in copied:
        shutil.copy(f, dst / "sources.list.d" / f.name)
    if (src / "sources.list").exists():
        shutil.copy(src / "sources.list", dst / "sources.list")
    elif copied:  # debootstrap's own line would duplicate the host's
        (dst / "sources.list").unlink(missing_ok=True)


def build_dom0_base(cache: Path, kx: dict) -> Path:
    xver = kx["xen_version"]
    recipe = inspect.getsource(build_dom0_base) + inspect.getsource(copy_host_apt_sources)
    key = sha(BASE_RECIPE, recipe, SUITE, DEBOOTSTRAP_INCLUDE, DOM0_PACKAGES, DOM0_MODULE_DIRS,
              xver, kx["key"], HERE / "dom0" / "etc-default-xen")
    d = cache / f"dom0-base-{key}"
    img = d / "base.cpio.zst"
    if img.exists():
        return d
    need_tools("debootstrap", "cpio", "zstd")
    log(f"building dom0 base {key} (debootstrap {SUITE}, xen-utils-{XEN_MAJOR}={xver})")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    root = d / "root"
    t0 = time.time()
    run(["debootstrap", "--variant=minbase", f"--include={DEBOOTSTRAP_INCLUDE}", SUITE,
         str(root)], capture_output=True)
    log(f"debootstrap done in {time.time() - t0:.0f}s")
    copy_host_apt_sources(root)
    (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
    os.chmod(root / "usr/sbin/policy-rc.d", 0o755)
    pkgs = " ".join([f"xen-utils-{XEN_MAJOR}={xver}"] + DOM0_PACKAGES)
    with Mounts(root):
        # a host source unreachable from here must not stop the build: a
        # missing package still fails the install below, loudly
        chroot(root, f"{{ apt-get update -q || true; }} && apt-get install -y -q --no-install-recommends {pkgs}"
               " && apt-get clean", capture_output=True)
    log(f"packages installed at {time.time() - t0:.0f}s")
    (root / "usr/sbin/policy-rc.d").unlink()
    # trim
    for p in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
              "var/lib/apt/lists", "var/cache/apt", "var/cache/debconf/templates.dat-old",
              "usr/share/i18n"):
        shutil.rmtree(root / p, ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    # kernel modules
    kver = kx["kver"]
    ksrc = kx["dir"] / "root" / "lib" / "modules" / kver
    kdst = root / "lib" / "modules" / kver
    (kdst / "kernel").mkdir(parents=True, exist_ok=True)
    for rel in DOM0_MODULE_DIRS:
        s = ksrc / "kernel" / rel
        t = kdst / "kernel" / rel
        t.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir():
            shutil.copytree(s, t, dirs_exist_ok=True)
        else:
            shutil.copy(s, t)
    for f in ksrc.glob("modules.*"):
        if f.name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            shutil.copy(f, kdst / f.name)
    chroot(root, f"depmod -a {kver}")
    # guest kernel (uncompressed ELF) lives in dom0's /e2e
    (root / "e2e").mkdir(exist_ok=True)
    shutil.copy(kx["dir"] / "vmlinux", root / "e2e" / "vmlinux")
    # Xen defaults: guest consoles logged to files
    shutil.copy(HERE / "dom0" / "etc-default-xen", root / "etc" / "default" / "xen")
    (root / "var/log/xen/console").mkdir(parents=True, exist_ok=True)
    pack_cpio(root, img, level=10)
    log(f"dom0 base packed ({img.stat().st_size >> 20} MB) in {time.time() - t0:.0f}s")
    return d


def build_domu_base(cache: Path, base: Path) -> Path:
    """The root of the netvm and the AppVMs: dom0's base without its /e2e
    payload (guest kernel and images) and without the project venv (the
    project layer brings it), as one cached archive."""
    img = cache / f"domu-{base.name}-v1.cpio.zst"
    if img.exists():
        return img
    log("packing the netvm/AppVM root from the dom0 base")
    tmp = img.with_suffix(".tmp")
    run(f"cd '{base / 'root'}' && find . -mindepth 1 \\( -path ./e2e -o -path ./e2e-layer "
        f"-o -path ./opt/vif-route-qubes -o -path ./tmp/e2e-wheels \\) -prune -o -print "
        f"| LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | zstd -q -T0 -10 > '{tmp}'")
    tmp.rename(img)
    return img


# --------------------------------------------------------------------------
# guest initramfs


def build_guest(cache: Path, kx: dict) -> Path:
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise BuildError("/bin/busybox (static) is missing: apt-get install busybox-static")
    key = sha("guest-v1", busybox, HERE / "guest" / "init", kx["key"])
    img = cache / f"guest-{key}.cpio.zst"
    if img.exists():
        return img
    log(f"building guest initramfs {key}")
    with tempfile.TemporaryDirectory(dir=cache) as t:
        root = Path(t)
        for p in ("bin", "sbin", "proc", "sys", "dev", "etc", "tmp", "lib/modules"):
            (root / p).mkdir(parents=True, exist_ok=True)
        shutil.copy(busybox, root / "bin" / "busybox")
        shutil.copy(HERE / "guest" / "init", root / "init")
        os.chmod(root / "init", 0o755)
        ko = next((kx["dir"] / "root" / "lib" / "modules").glob(
            "*/kernel/drivers/net/xen-netfront.ko*"))
        if ko.suffix == ".xz":
            (root / "lib/modules/xen-netfront.ko").write_bytes(lzma.decompress(ko.read_bytes()))
        else:
            shutil.copy(ko, root / "lib/modules/xen-netfront.ko")
        pack_cpio(root, img, level=19)
    return img


# --------------------------------------------------------------------------
# project layer: the packages + checks, rebuilt on every run (seconds)


def build_debs(project: Path, dest: Path) -> dict:
    """The project's .debs, built from a copy of the checkout with the
    documented command (dpkg-buildpackage -b -us -uc) and Debian's python3:
    {package name: path}."""
    need_tools("dpkg-buildpackage", "dh")
    with tempfile.TemporaryDirectory() as t:
        src = Path(t) / "src"
        # no build/, *.egg-info or venv from the checkout in the build
        shutil.copytree(project, src, ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", ".venv", ".tox",
            ".pytest_cache", ".hypothesis", ".pybuild"))
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
        run(["dpkg-buildpackage", "-b", "-us", "-uc"], cwd=src, env=env, capture_output=True)
        dest.mkdir(parents=True, exist_ok=True)
        debs = {}
        for deb in Path(t).glob("*.deb"):
            shutil.copy(deb, dest / deb.name)
            debs[deb.name.split("_")[0]] = dest / deb.name
    if not all(p in debs for p in DOM0_ROLES + DOMU_ROLES):
        raise BuildError(f"dpkg-buildpackage made {sorted(debs)}, not {sorted(set(DOM0_ROLES + DOMU_ROLES))}")
    return debs


def install_debs(cache: Path, base: Path, debs: dict, roles: list, dest: Path) -> None:
    """``apt-get install ./PKG.deb...`` of ``roles`` into the base root, as
    an admin does, through an overlay (the cached base stays untouched): what
    the install wrote (the upper directory: files, dpkg's database, the
    units' enablement links) is packed into DEST, a cpio layer that the
    initramfs lays over the base. Whiteouts (files the install removed, such
    as dpkg's *-old backups) are left out: harmless where they remain."""
    with tempfile.TemporaryDirectory(dir=cache) as t:
        upper, work, merged = (Path(t) / n for n in ("upper", "work", "merged"))
        for d in (upper, work, merged):
            d.mkdir()
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={base / 'root'},upperdir={upper},workdir={work}", str(merged)])
        try:
            (merged / "tmp/debs").mkdir(parents=True, exist_ok=True)
            (merged / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)  # trimmed in the base
            for pkg in roles:
                shutil.copy(debs[pkg], merged / "tmp/debs" / debs[pkg].name)
            (merged / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
            os.chmod(merged / "usr/sbin/policy-rc.d", 0o755)
            with Mounts(merged):
                # the dependencies are in the base (its package lists are
                # trimmed: apt could download nothing anyway)
                chroot(merged, "apt-get install -y -q --no-install-recommends "
                       + " ".join(f"/tmp/debs/{debs[p].name}" for p in roles)
                       + " && test -x /usr/bin/vif-route-qubes && test -x /etc/xen/scripts/vif-route-qubes",
                       capture_output=True)
            (merged / "usr/sbin/policy-rc.d").unlink()
            shutil.rmtree(merged / "tmp/debs")
        finally:
            run(["umount", str(merged)])
        for junk in ("tmp", "var/cache/apt", "var/log", "usr/sbin/policy-rc.d"):
            p = upper / junk
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        run(f"cd '{upper}' && find . -mindepth 1 ! -type c | LC_ALL=C sort "
            f"| cpio -o -H newc --quiet -R 0:0 | zstd -q -T0 -3 > '{dest}'")


def build_layer(cache: Path, base: Path, project: Path, vif_script, dest: Path,
                domu_dest: Path) -> None:
    debs = build_debs(project, cache / "debs")
    USED.add("debs")
    parts = [dest.with_suffix(".pkgs"), dest.with_suffix(".extra")]
    install_debs(cache, base, debs, DOM0_ROLES, parts[0])
    domu_pkgs = dest.with_suffix(".domu-pkgs")
    install_debs(cache, base, debs, DOMU_ROLES, domu_pkgs)
    # the rest of the layer: /init, checks, from a staging tree
    with tempfile.TemporaryDirectory(dir=cache) as t:
        st = Path(t)
        (st / "e2e").mkdir()
        shutil.copy(HERE / "dom0" / "init", st / "init")
        for f in (HERE / "dom0").iterdir():
            if f.name not in ("init", "etc-default-xen"):
                shutil.copy(f, st / "e2e" / f.name)
        env = []
        if os.environ.get("VRQ_E2E_STANDIN") == "1":
            shutil.copy(HERE / "standin" / "qubes-setup-dnat-to-ns", st / "e2e" / "standin-dnat")
            env.append("DNAT_TOOL=/e2e/standin-dnat")
        fw = os.environ.get("VRQ_E2E_FIREWALL", "")
        if fw not in ("", "iptables", "nft", "auto"):
            raise BuildError(f"VRQ_E2E_FIREWALL={fw!r}: expected iptables, nft or auto")
        if fw:  # the netvm's backend (unset: the product's default, auto)
            env.append(f"NETVM_FIREWALL={fw}")
        (st / "e2e" / "env").write_text("".join(e + "\n" for e in env))
        paths = ["init", "e2e"]
        if vif_script is not None:  # a stand-in over the packaged drop-in
            (st / "etc/xen/scripts").mkdir(parents=True)
            shutil.copy(vif_script, st / "etc/xen/scripts/vif-route-qubes")
            paths.append("etc/xen/scripts/vif-route-qubes")
        run(["chmod", "-R", "a+rX,u+w", str(st)])
        os.chmod(st / "init", 0o755)
        if vif_script is not None:
            os.chmod(st / "etc/xen/scripts/vif-route-qubes", 0o755)
        pack_cpio(st, parts[1], paths=paths, level=3)
    # the netvm's and AppVMs' layer: their packages, their inits
    domu_extra = dest.with_suffix(".domu")
    with tempfile.TemporaryDirectory(dir=cache) as t:
        st = Path(t)
        for name in ("netvm-init", "appvm-init"):
            shutil.copy(HERE / "domu" / name, st / f"vrq-{name}")
        paths = ["vrq-netvm-init", "vrq-appvm-init"]
        if vif_script is not None:
            (st / "etc/xen/scripts").mkdir(parents=True)
            shutil.copy(vif_script, st / "etc/xen/scripts/vif-route-qubes")
            paths.append("etc/xen/scripts/vif-route-qubes")
        run(["chmod", "-R", "a+rX,u+w", str(st)])
        # the kernel runs rdinit= only when it is executable in the archive
        for f in paths:
            os.chmod(st / f, 0o755)
        pack_cpio(st, domu_extra, paths=paths, level=3)
    with open(domu_dest, "wb") as f:
        for p in (domu_pkgs, domu_extra):
            f.write(p.read_bytes())
            p.unlink()
    with open(dest, "wb") as f:
        for p in parts:
            f.write(p.read_bytes())
            p.unlink()


# --------------------------------------------------------------------------
# boot


def prune(cache: Path, keep: set) -> None:
    """Drop images built from older inputs (a dom0 base tree is ~250 MB)."""
    for pat in ("kernel-*", "dom0-base-*", "guest-*.cpio.zst", "domu-*.cpio.zst", "wheels-deps*",
                "buildenv-*", "debs"):
        for p in cache.glob(pat):
            if p.name not in keep | USED:
                log(f"pruning stale {p.name}")
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in cache.glob("run-*"):  # left by killed runs
        if time.time() - p.stat().st_mtime > 3600:
            shutil.rmtree(p, ignore_errors=True)


def build_all(cache: Path, project: Path, vif_script: Path, run_dir: Path) -> dict:
    need_tools("qemu-system-x86_64", "apt-get", "apt-cache", "dpkg-deb", "cpio", "zstd", "chroot", "mount")
    if os.geteuid() != 0:
        raise BuildError("must run as root (debootstrap, chroot)")
    if vif_script is not None and not vif_script.exists():
        raise BuildError(f"hotplug drop-in {vif_script} does not exist")
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    kx = prepare_kernel_and_xen(cache)
    base = build_dom0_base(cache, kx)
    guest = build_guest(cache, kx)
    domu_base = build_domu_base(cache, base)
    layer = run_dir / "layer.cpio.zst"
    domu_layer = run_dir / "domu-layer.cpio.zst"
    build_layer(cache, base, project, vif_script, layer, domu_layer)
    # guest images go to /e2e/guest.cpio.zst and /e2e/domu.cpio.zst (the
    # netvm's and AppVMs' ramdisk: root + project layer) inside dom0: wrap
    # them in a tiny cpio (already compressed: stored, not recompressed)
    with tempfile.TemporaryDirectory(dir=cache) as t:
        (Path(t) / "e2e").mkdir()
        shutil.copy(guest, Path(t) / "e2e" / "guest.cpio.zst")
        with open(Path(t) / "e2e" / "domu.cpio.zst", "wb") as f:
            for part in (domu_base, domu_layer):
                with open(part, "rb") as p:
                    shutil.copyfileobj(p, f)
        pack_cpio(Path(t), run_dir / "guest-layer.cpio.zst", level=1)
    initrd = run_dir / "dom0.img"
    with open(initrd, "wb") as f:
        for part in (base / "base.cpio.zst", run_dir / "guest-layer.cpio.zst", layer):
            with open(part, "rb") as p:
                shutil.copyfileobj(p, f)
    prune(cache, keep={kx["dir"].name, base.name, guest.name, domu_base.name})
    log(f"images ready in {time.time() - t0:.1f}s")
    return {"xen": kx["dir"] / "xen", "kernel": kx["dir"] / "vmlinuz", "initrd": initrd}


def boot(images: dict, logfile: Path, timeout: int) -> tuple[int, str]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise BuildError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    xen_cmd = ("console=com1 com1=115200 dom0_mem=1024M,max:1024M loglvl=all "
               "guest_loglvl=all noreboot")
    dom0_cmd = "console=hvc0 earlyprintk=xen quiet"
    # 4G: dom0 1024M, the netvm 800M and two AppVMs 448M each (ramfs roots)
    cmd = [qemu, "-accel", "tcg,thread=multi", "-cpu", "qemu64,+svm", "-m", "4G", "-smp", "2",
           "-nographic", "-no-reboot", "-monitor", "none", "-serial", "stdio", "-nic", "none",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
           "-kernel", str(images["xen"]), "-append", xen_cmd,
           "-initrd", f"{images['kernel']} {dom0_cmd},{images['initrd']}"]
    log(f"booting Xen under qemu (timeout {timeout}s), serial log: {logfile}")
    t0 = time.time()
    with open(logfile, "wb") as lf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=lf,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"timeout after {timeout}s: killing qemu pid {proc.pid}")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    text = logfile.read_bytes().decode(errors="replace").replace("\r", "")
    log(f"qemu exited with {rc} after {time.time() - t0:.0f}s")
    if rc is None:
        with open(logfile, "a") as lf:
            lf.write(f"\nE2E RESULT FAIL timeout after {timeout}s\n")
        text += f"\nE2E RESULT FAIL timeout after {timeout}s\n"
    return rc, text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", type=Path, default=None, help="serial log file")
    ap.add_argument("--timeout", type=int,
                    default=int(os.environ.get("VRQ_E2E_TIMEOUT", "600")))
    ap.add_argument("--build-only", action="store_true")
    args = ap.parse_args(argv)
    cache = Path(os.environ.get("VRQ_E2E_CACHE", "/var/cache/vif-route-qubes-e2e"))
    project = Path(os.environ.get("VRQ_E2E_PROJECT", HERE.parent.parent)).resolve()
    vif_script = Path(os.environ["VRQ_E2E_VIF_SCRIPT"]) if os.environ.get("VRQ_E2E_VIF_SCRIPT") else None
    if os.environ.get("VRQ_E2E_STANDIN") == "1":
        vif_script = HERE / "standin" / "vif-route-qubes"
    logfile = args.log or cache / "serial.log"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # one build at a time per cache (the dom0 base tree is shared); the
        # finished initramfs is private to this run, so boots may overlap
        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=cache))
        try:
            with open(cache / ".lock", "w") as lock:
                t0 = time.time()
                fcntl.flock(lock, fcntl.LOCK_EX)
                if time.time() - t0 > 1:
                    log(f"waited {time.time() - t0:.0f}s for another run's build")
                images = build_all(cache, project, vif_script, run_dir)
            if args.build_only:
                return 0
            logfile.parent.mkdir(parents=True, exist_ok=True)
            rc, text = boot(images, logfile, args.timeout)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    except BuildError as e:
        print(f"E2E RESULT FAIL build/boot error: {e}", flush=True)
        if args.log:
            args.log.parent.mkdir(parents=True, exist_ok=True)
            args.log.write_text(f"E2E RESULT FAIL build/boot error: {e}\n")
        return 2
    for m in CHECK_RE.finditer(text):
        print(m.group(0), flush=True)
    res = RESULT_RE.findall(text)
    if rc is None:
        print(f"E2E RESULT FAIL timeout after {args.timeout}s (log: {logfile})")
        return 2
    # isa-debug-exit: qemu exits with (value << 1) | 1; dom0 writes 1 for PASS, 2 for FAIL
    if rc == 3 and res and res[-1] == "PASS":
        print("E2E RESULT PASS")
        return 0
    print(f"E2E RESULT FAIL (qemu status {rc}, result {res[-1] if res else 'missing'}; "
          f"log: {logfile})")
    return 1 if res else 2


if __name__ == "__main__":
    sys.exit(main())
