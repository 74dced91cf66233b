"""The one seam between vif-route-qubes and the host: every command it runs
and every /proc or /sys file it writes goes through :class:`System`.

* Commands run through plumbum's local machine, as argv lists (never a
  shell string), with their payload on stdin.
* ``dry_run=True`` prints each mutating action exactly as it would be
  performed (the same argv and the same stdin text) and performs none;
  read-only probes still run, so the printed plan is the one a real run
  would choose.
* :meth:`System.before_change` is called before every mutating action
  (command, file write, XenStore write). It does nothing here; the rollback
  tests override it (tests/rigs/faults.py) to fail the N-th change, so no
  fault injection ships in the product.
"""

import os
import sys
from collections import namedtuple
from subprocess import PIPE

from .errors import CommandFailed, Failure

Result = namedtuple("Result", "argv code stdout stderr")

COMMAND_TIMEOUT = 30.0  # inside libxl's 40 s hotplug timeout
XTABLES_WAIT = "20"  # seconds iptables-restore waits for the xtables lock

_PACKAGES = {
    "ip": "iproute2",
    "conntrack": "conntrack",
    "nft": "nftables",
}


# libxl runs hotplug scripts with a short PATH (often /bin:/usr/bin only),
# while iptables-restore, conntrack (and on some systems ip) live in sbin
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def leave(code):
    """Exit without the interpreter's teardown (freeing every module and
    object one by one: ~8 ms of CPU per run). What exiting must still do
    is done first: the atexit handlers run and stdout/stderr are flushed;
    everything of ours (log file, XenStore or QubesDB connection) is closed
    by then, and every command's reply was collected. For the one-shot
    entry points (the hotplug script's Xen form, the DNAT's plain call)."""
    import atexit  # loaded at every start already

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def which(prog: str, path: str):
    """The executable ``prog`` in ``path`` (a PATH string), then in the sbin
    directories (libxl's and udev's short PATH must not hide an installed
    tool); None if nowhere. The one lookup of a program by every tool."""
    if "/" in prog:
        return prog
    dirs = [d for d in (path or os.defpath).split(os.pathsep) if d]
    dirs += [d for d in SBIN if d not in dirs]
    return next((os.path.join(d, prog) for d in dirs
                 if os.access(os.path.join(d, prog), os.X_OK)
                 and not os.path.isdir(os.path.join(d, prog))), None)


def _package_of(prog: str) -> str:
    if "tables" in prog:
        return "iptables"
    return _PACKAGES.get(prog, prog)


class _Started:
    """A command that is running (or, in a dry run, was only printed)."""

    def __init__(self, argv, proc, data, ok):
        self.argv, self.proc, self.data, self.ok = argv, proc, data, ok

    def wait(self, check=True) -> Result:
        if self.proc is None:
            return Result(self.argv, 0, "", "")
        try:
            out, err = self.proc.communicate(self.data, timeout=COMMAND_TIMEOUT)
        except Exception:  # TimeoutExpired: do not leave it running behind us
            self.proc.kill()
            self.proc.communicate()
            raise Failure(f"{' '.join(self.argv)} did not finish within {COMMAND_TIMEOUT:.0f} s") from None
        res = Result(self.argv, self.proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and res.code not in self.ok:
            raise CommandFailed(self.argv, res.code, res.stderr)
        return res


class System:
    def __init__(self, dry_run=False, out=None, log=None, env=None):
        env = os.environ if env is None else env
        self.dry_run = dry_run
        self.out = out or sys.stdout
        self.log = log
        # Which iptables the host uses is the administrator's choice
        # (update-alternatives); this only lets benchmarks and tests pick one.
        backend = env.get("VIF_ROUTE_QUBES_IPTABLES", "")
        if backend not in ("", "nft", "legacy"):
            raise Failure(f"VIF_ROUTE_QUBES_IPTABLES={backend!r}: expected nft or legacy")
        self._backend = f"-{backend}" if backend else ""
        self.spawned = 0
        self.path = env.get("PATH", "")
        self._found = {}

    def which(self, prog: str):
        """:func:`which` on this run's PATH, remembered for the run."""
        if prog not in self._found:
            self._found[prog] = which(prog, self.path)
        return self._found[prog]

    # -- naming --------------------------------------------------------------
    def iptables(self, version: int, tool: str) -> str:
        """``iptables-restore`` / ``ip6tables-legacy-save`` ..."""
        base = "iptables" if version == 4 else "ip6tables"
        return f"{base}{self._backend}-{tool}" if tool else f"{base}{self._backend}"

    def restore(self, version: int) -> list:
        """The argv every firewall change goes through: ``--noflush`` (only
        what the payload names changes) and ``--wait`` (another process
        holding the xtables lock delays us instead of failing us)."""
        return [self.iptables(version, "restore"), "--noflush", "--wait", XTABLES_WAIT]

    # -- commands ------------------------------------------------------------
    def before_change(self, what):
        """Called before each mutating action ``what`` (an argv-like list)
        is carried out: the one place a test makes a change fail."""

    def start(self, argv, data=None, ok=(0,), readonly=False) -> _Started:
        """Start a command; ``.wait()`` collects it. Several started before
        any is waited for run in parallel (the two firewall families, the
        conntrack purges), which is most of a hotplug run's wall time."""
        argv = [str(a) for a in argv]
        if not readonly:
            if self.dry_run:
                self._print(argv, data)
                return _Started(argv, None, None, ok)
            self.before_change(argv)
        if self.log:
            self.log.debug("run: " + " ".join(argv) + (f" <<{len(data.splitlines())} lines" if data else ""))
            if data:
                for line in data.splitlines():
                    self.log.debug("  | " + line)
        from ._plumbum import local

        machine = local()
        exe = self.which(argv[0])
        if exe is None:
            raise Failure(f"{argv[0]}: command not found in PATH={self.path or '(empty)'} or "
                          f"{':'.join(SBIN)} (install {_package_of(argv[0])})")
        cmd = machine[exe]
        stdin = PIPE if data is not None else open(os.devnull, "rb")
        proc = cmd.popen(argv[1:], stdin=stdin, stdout=PIPE, stderr=PIPE)
        if stdin is not PIPE:
            stdin.close()
        self.spawned += 1
        return _Started(argv, proc, data.encode() if data is not None else None, ok)

    def run(self, argv, data=None, ok=(0,), readonly=False, check=True) -> Result:
        return self.start(argv, data, ok, readonly).wait(check=check)

    def run_all(self, calls, check=True) -> list:
        """Run ``(argv, data, ok)`` triples in parallel; first failure raises
        after all have finished (nothing is left running)."""
        started = [self.start(argv, data, ok) for argv, data, ok in calls]
        results, first = [], None
        for s in started:
            try:
                results.append(s.wait(check=check))
            except Failure as exc:
                first = first or exc
                results.append(None)
        if first:
            raise first
        return results

    # -- files ---------------------------------------------------------------
    def write(self, path: str, value: str) -> None:
        if self.dry_run:
            print(f"write {path} = {value}", file=self.out)
            return
        self.before_change(["write", path])
        if self.log:
            self.log.debug(f"write {path} = {value}")
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as exc:
            raise Failure(f"cannot write {path}: {exc.strerror}") from None

    @staticmethod
    def read(path: str, default=None):
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return default

    @staticmethod
    def ipv6_enabled(name: str) -> bool:
        """IPv6 is on for the interface (the file is absent when the
        kernel has IPv6 off altogether)."""
        value = System.read(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6")
        return value is not None and value.strip() == "0"

    @staticmethod
    def iface_exists(name: str) -> bool:
        return os.path.exists(f"/sys/class/net/{name}")

    @staticmethod
    def iface_facts(name: str):
        """What sysfs says about interface ``name`` (no process): its
        ifindex, netdev group, IFF_LOOPBACK, and its parent device as
        ``(bus, device name)`` (None for a virtual interface: veth, dummy)
        -> dict, or None when it does not exist."""
        base = f"/sys/class/net/{name}"

        def number(leaf, radix=10):
            try:
                return int((System.read(f"{base}/{leaf}") or "").strip(), radix)
            except ValueError:
                return None

        ifindex = number("ifindex")
        if ifindex is None:
            return None
        parent = None
        if os.path.exists(f"{base}/device"):
            bus = os.path.basename(os.path.realpath(f"{base}/device/subsystem"))
            parent = (bus, os.path.basename(os.path.realpath(f"{base}/device")))
        flags = number("flags", 16) or 0
        return {"ifindex": ifindex, "group": number("netdev_group"),
                "loopback": bool(flags & 0x8), "parent": parent}

    def note(self, text: str) -> None:
        """A line of explanation in the dry run's output."""
        if self.dry_run:
            print(f"# {text}", file=self.out)

    def _print(self, argv, data):
        line = "$ " + " ".join(_quote(a) for a in argv)
        if data is None:
            print(line, file=self.out)
        else:
            print(f"{line} <<'EOF'\n{data}EOF", file=self.out)


def _quote(arg: str) -> str:
    """Display quoting only (the dry run's text is for people; nothing here
    ever reaches a shell)."""
    safe = all(c.isalnum() or c in "@%+=:,./-_" for c in arg) and arg
    return arg if safe else "'" + arg.replace("'", "'\\''") + "'"
