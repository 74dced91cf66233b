"""One host-wide lock around changes to shared state (firewall tables and
state records), so concurrent hotplug and DNAT runs never interleave their
check-then-change steps.

Held exclusively by whatever reads shared state and then changes it: the
iptables backend (its guard chain and the vifs' jumps), the DNAT, the nft
backend's slow path (read the sets, then a second transaction). The nft
backend's fast path is one atomic transaction on the vif's own set
elements whose assertions the kernel checks: those runs hold the lock
*shared*, so a storm of them runs side by side, and a run upgrades to
exclusive before it reads to decide (:meth:`HostLock.exclusive`). Runs of
the same vif are kept apart by a per-vif lock (:func:`vif_lock`, taken
before the host lock: the one order), which is what guards its state
record and its link.

The wait is bounded (default 20 s, well inside libxl's 40 s hotplug timeout):
a hung holder must not wedge every later guest start, so a waiter gives up
with a clear message instead. ``flock`` locks die with their process, so a
crashed holder never leaves the host locked.
"""

import fcntl
import os
import signal

from .errors import Failure

DEFAULT_TIMEOUT = 20.0


class LockTimeout(Failure):
    pass


def lock_path(env) -> str:
    return env.get("VIF_ROUTE_QUBES_LOCK") or os.path.join(state_dir(env), "lock")


def state_dir(env) -> str:
    return env.get("VIF_ROUTE_QUBES_STATE_DIR") or "/run/vif-route-qubes"


def seconds(env, key, default) -> float:
    """A positive, finite number of seconds from the environment (empty or
    unset: ``default``). Anything else is a Failure naming the variable,
    never a ValueError traceback (and never inf/nan, which setitimer and
    condition waits would turn into "forever" or an error of their own)."""
    raw = env.get(key, "")
    if not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1e6:
        raise Failure(f"{key}={raw[:40]!r}: expected a number of seconds")
    return value


def vif_lock(env, name, timeout=None) -> "HostLock":
    """The lock of one interface's runs (``name`` validated by the caller):
    ``STATE_DIR/NAME.lock``, taken exclusively only. ``offline`` deletes it
    while holding it (:meth:`HostLock.discard`), so a gone guest leaves no
    file; a waiter that then wins the deleted file notices and retries on
    the path's new file (:meth:`HostLock.acquire`)."""
    return HostLock(env, timeout, path=os.path.join(state_dir(env), f"{name}.lock"))


class HostLock:
    def __init__(self, env, timeout=None, shared=False, path=None):
        self.path = path or lock_path(env)
        self.timeout = timeout if timeout is not None else seconds(
            env, "VIF_ROUTE_QUBES_LOCK_TIMEOUT", DEFAULT_TIMEOUT)
        self.shared = shared
        self.fd = None

    def acquire(self):
        while True:
            try:
                os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                # an unwritable state dir or a lock path that is a directory:
                # one line naming the file, not a traceback
                raise Failure(f"cannot open the lock file {self.path}: {exc.strerror}") from None
            self._flock(fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX)
            # A holder may have discarded the file while this run waited:
            # the lock it won is on a file nobody else can open. Only the
            # file still at the path is the lock.
            try:
                same = os.path.samestat(os.fstat(self.fd), os.stat(self.path))
            except OSError:
                same = False
            if same:
                return self
            os.close(self.fd)
            self.fd = None

    def discard(self):
        """Delete the lock file while holding it exclusively, then release:
        for a lock whose subject is gone (a vif after ``offline``). Waiters
        retry on a new file (see :meth:`acquire`)."""
        if self.fd is None or self.shared:
            return self.release()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self.release()

    def exclusive(self):
        """A shared hold becomes exclusive (waiting, bounded, as acquire
        does). flock converts by dropping the shared lock first, so two
        upgrading runs cannot deadlock; nothing read under the shared hold
        may be trusted after it (callers read after). Does nothing when the
        lock is exclusive already, or not held (a dry run, or a run that
        gave up waiting and goes on without it)."""
        if self.fd is None or not self.shared:
            return
        self.shared = False
        self._flock(fcntl.LOCK_EX)

    def _flock(self, mode):
        try:
            fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
            return self
        except BlockingIOError:
            pass
        # Contended: block in flock() and let a timer interrupt it. The
        # handler raises, which is how an interrupted flock() gives up in
        # Python (PEP 475 retries it otherwise); no polling loop.
        def expired(signum, frame):
            raise LockTimeout(
                f"another vif-route-qubes run has held {self.path} for more than "
                f"{self.timeout:g} s; giving up"
            )

        old = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        try:
            fcntl.flock(self.fd, mode)
        except LockTimeout:
            os.close(self.fd)
            self.fd = None
            raise
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        return self

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
