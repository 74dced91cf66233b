"""The real systemd-resolved for the tests, on a private dbus-daemon, in a
private mount namespace inside a given network namespace.

The machine's own resolved, system bus and files are never touched: the
daemons see a tmpfs over ``/run/systemd`` (resolved's sockets, its
``resolv.conf`` files and its stub link appear only there) and the given
resolved.conf bind-mounted over ``/etc/systemd/resolved.conf``; the bus
listens on a socket in a directory of its own. Used by the DNS tests of
qubes-setup-dnat-to-ns (which ask resolved over D-Bus from outside the
mount namespace, with :attr:`Resolved.env`) and of qubes-setup-ip (which
run inside it with :meth:`Resolved.run`, where resolved's varlink socket
is), so there is one rig, not two.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time

CANDIDATES = ("/lib/systemd/systemd-resolved", "/usr/lib/systemd/systemd-resolved")
TOOLS = ("dbus-daemon", "busctl", "resolvectl", "nsenter")

BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

# Runs as the first process of the private mount namespace; $1 is the
# directory (resolved.conf, bus.conf, the bus socket), $2 the daemon.
# dbus-daemon stays its child after the exec; both are in the process
# group that Resolved.close() stops.
START = r"""
set -e
mount -t tmpfs tmpfs /run/systemd
mount --bind "$1/resolved.conf" /etc/systemd/resolved.conf
dbus-daemon --config-file="$1/bus.conf" --nofork --nopidfile --nosyslog &
i=0
while [ ! -S "$1/bus" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
DBUS_SYSTEM_BUS_ADDRESS="unix:path=$1/bus" exec "$2"
"""

# Up means both: the bus answers for resolved (qubes-setup-dnat-to-ns asks
# there) and its varlink socket exists (qubes-setup-ip looks for it).
READY = ["sh", "-c", 'test -S /run/systemd/resolve/io.systemd.Resolve && exec "$@"', "sh",
         "busctl", "get-property", "org.freedesktop.resolve1", "/org/freedesktop/resolve1",
         "org.freedesktop.resolve1.Manager", "DNS"]


class ResolvedUnavailable(RuntimeError):
    """What the real-resolved tests need is missing, or it did not come up."""


def binary():
    """The systemd-resolved executable; an error naming what is missing
    otherwise (a failure for the tests, never a skip)."""
    for tool in TOOLS:
        if not shutil.which(tool):
            raise ResolvedUnavailable(f"{tool} is not installed: the real-resolved tests need it "
                                      "(tests/install-packages installs it)")
    for path in CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    raise ResolvedUnavailable("systemd-resolved is not installed (tests/install-packages installs it, "
                              "keeping the host's /etc/resolv.conf), so the real-resolved tests cannot run")


def config(dns=(), stub_listener=True):
    """A resolved.conf: ``DNS=`` (the global servers) as given, no compiled-in
    fallback servers, no LLMNR or mDNS chatter on the test links."""
    return (f"[Resolve]\nDNS={' '.join(dns)}\nFallbackDNS=\nLLMNR=no\nMulticastDNS=no\n"
            f"DNSStubListener={'yes' if stub_listener else 'no'}\n")


class Resolved:
    """systemd-resolved with resolved.conf ``conf`` (text) in network
    namespace ``ns`` (a :class:`~tests.rigs.netns.Netns`),
    answering on its bus when the constructor returns. ``env`` is the base
    environment of :meth:`run` and :attr:`env` (default: this process's).
    A context manager; :meth:`close` stops it."""

    def __init__(self, ns, conf, env=None, timeout=10.0):
        resolved = binary()
        self.ns, self.output = ns, ""
        # resolved drops to its own user before it connects to the bus:
        # the directory must be open to it (pytest's tmp_path is not)
        self.dir = tempfile.mkdtemp(prefix="vrq-resolved-")
        os.chmod(self.dir, 0o755)
        self.socket = os.path.join(self.dir, "bus")
        self.address = f"unix:path={self.socket}"
        with open(os.path.join(self.dir, "resolved.conf"), "w") as f:
            f.write(conf)
        with open(os.path.join(self.dir, "bus.conf"), "w") as f:
            f.write(BUS_CONF.format(socket=self.socket))
        #: the environment that reaches this bus (for commands run outside)
        self.env = dict(os.environ if env is None else env, DBUS_SYSTEM_BUS_ADDRESS=self.address)
        self._log = open(os.path.join(self.dir, "log"), "w+")
        self.proc = ns.popen(["unshare", "-m", "--propagation", "private", "sh", "-c", START, "sh",
                              self.dir, resolved], stdout=self._log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            res = self.run(READY)
            if res.returncode == 0:
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise ResolvedUnavailable(f"systemd-resolved did not come up: {res.stderr.strip()} {self.output}")
            time.sleep(0.1)

    def run(self, argv, check=False, env=None, timeout=None):
        """Run ``argv`` in the network namespace and in resolved's mount
        namespace (its /run/systemd), on its bus; a CompletedProcess (text)."""
        env = self.env if env is None else dict(env, DBUS_SYSTEM_BUS_ADDRESS=self.address)
        return self.ns.exec(["nsenter", "-t", str(self.proc.pid), "-m", "--", *argv], check=check, env=env,
                            timeout=timeout)

    def resolvectl(self, *args):
        """``resolvectl ARGS``' output; an error if it fails."""
        return self.run(["resolvectl", *args], check=True).stdout

    def close(self):
        """Stop the process group started above: resolved and its
        dbus-daemon (which outlives resolved if resolved failed)."""
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            # the group outlives its leader while dbus-daemon still runs
            for _ in range(100):
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                os.killpg(self.proc.pid, signal.SIGKILL)
        if not self._log.closed:
            self._log.seek(0)
            self.output = self._log.read()
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
