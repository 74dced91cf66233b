"""The real QubesDB daemon for tests: built once from the upstream sources in
``../shared/vendor`` (``build-qubesdb``) into a cache, and run local-only
(``qubesdb-daemon 0 dom0``, as Qubes' dom0 runs its own database) in a mount
namespace of its own, so its compiled-in paths (``/var/run/qubes``,
``/var/log/qubes``) are private scratch directories.

The socket is reachable from outside that namespace: the daemon's
``/var/run`` is a bind mount of a test directory, so the socket is also at
``Daemon.socket`` for the client under test; the daemon's own clients
(``qubesdb-read`` ...) run inside its namespace (``Daemon.cli``), where the
compiled-in path is. A daemon that cannot be built or started is a test
failure that says why, never a skip.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("VRQ_QUBESDB") or "/var/cache/vif-route-qubes-qubesdb"


def vendor_dirs() -> list:
    """Where the vendored QubesDB sources may be, in order: $VRQ_VENDOR;
    ``../shared/vendor`` beside this checkout; beside the repository it was
    cloned from, when that is a local path (a clean clone made elsewhere,
    as CI and a check before landing make one); ``/work/shared/vendor``,
    where the machines of this project keep it."""
    dirs = [os.environ.get("VRQ_VENDOR", ""), os.path.join(os.path.dirname(ROOT), "shared", "vendor")]
    res = subprocess.run(["git", "-C", ROOT, "config", "--get", "remote.origin.url"],
                         capture_output=True, text=True)
    origin = res.stdout.strip() if res.returncode == 0 else ""
    if origin.startswith("file://"):
        origin = origin[len("file://"):]
    if origin.startswith("/"):
        dirs.append(os.path.join(os.path.dirname(origin.rstrip("/")), "shared", "vendor"))
    dirs.append("/work/shared/vendor")
    return list(dict.fromkeys(d for d in dirs if d))


def build_script():
    """The vendored ``build-qubesdb``, or None when no place has it."""
    for d in vendor_dirs():
        script = os.path.join(d, "build-qubesdb")
        if os.path.exists(script):
            return script
    return None


def build(prefix=CACHE) -> str:
    """PREFIX with bin/qubesdb-daemon, building it first when absent."""
    daemon = os.path.join(prefix, "bin", "qubesdb-daemon")
    if os.access(daemon, os.X_OK):
        return prefix
    script = build_script()
    if script is None:
        raise RuntimeError(f"no QubesDB: {daemon} is not built and no build-qubesdb is in "
                           f"{', '.join(vendor_dirs())} (the vendored sources: ../shared/vendor)")
    res = subprocess.run(["bash", script, prefix, "/usr/bin/python3"], capture_output=True, text=True)
    if res.returncode != 0 or not os.access(daemon, os.X_OK):
        raise RuntimeError(f"build-qubesdb {prefix} failed ({res.returncode}): {res.stderr[-2000:]}")
    return prefix


START = r"""
set -e
mount --make-rprivate /
mount --bind "$1" /var/run
mount --bind "$2" /var/log
mkdir -p /var/run/qubes /var/log/qubes
exec "$3/bin/qubesdb-daemon" 0 dom0
"""


class Daemon:
    def __init__(self, prefix=None, netns=None):
        self.prefix = prefix or build()
        self.dir = tempfile.mkdtemp(prefix="vrq-qdb-")
        self.run_dir = os.path.join(self.dir, "run")
        self.log_dir = os.path.join(self.dir, "log")
        os.makedirs(self.run_dir)
        os.makedirs(self.log_dir)
        # qubesdb.sock links to this one by its in-namespace path
        self.socket = os.path.join(self.run_dir, "qubes", "qubesdb.dom0.sock")
        self.pid = None
        argv = ["unshare", "-m", "sh", "-c", START, "sh", self.run_dir, self.log_dir, self.prefix]
        if netns:
            argv = ["ip", "netns", "exec", netns, "nsenter", "--mount=/proc/1/ns/mnt", "--"] + argv
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
        pidfile = os.path.join(self.run_dir, "qubes", "qubesdb.dom0.pid")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (os.path.exists(self.socket) and os.path.exists(pidfile)):
            time.sleep(0.02)
        if not os.path.exists(self.socket):
            log = ""
            for name in os.listdir(os.path.join(self.log_dir, "qubes")) if os.path.isdir(
                    os.path.join(self.log_dir, "qubes")) else []:
                log += open(os.path.join(self.log_dir, "qubes", name)).read()[-1000:]
            self.stop()
            raise RuntimeError(f"qubesdb-daemon did not start (exit {res.returncode}): {res.stderr} {log}")
        self.pid = int(open(pidfile).read().split()[0])

    def cli(self, tool, *args, data=None):
        """Run one of the daemon's own clients (``qubesdb-read`` ...) inside
        its mount namespace, where its compiled-in socket path is."""
        argv = ["nsenter", f"--mount=/proc/{self.pid}/ns/mnt", "--",
                os.path.join(self.prefix, "bin", tool), *args]
        return subprocess.run(argv, input=data, capture_output=True, timeout=30)

    def env(self, base=None):
        """The environment that points our client at this daemon."""
        return dict(base if base is not None else os.environ, VIF_ROUTE_QUBES_QUBESDB_SOCKET=self.socket)

    def stop(self):
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for _ in range(100):
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.01)
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
