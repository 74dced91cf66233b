"""One host-wide lock around changes to shared state (firewall tables and
state records), so concurrent hotplug and DNAT runs never interleave their
check-then-change steps.

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


class HostLock:
    def __init__(self, env, timeout=None):
        self.path = lock_path(env)
        self.timeout = timeout if timeout is not None else seconds(
            env, "VIF_ROUTE_QUBES_LOCK_TIMEOUT", DEFAULT_TIMEOUT)
        self.fd = None

    def acquire(self):
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            # an unwritable state dir or a lock path that is a directory:
            # one line naming the file, not a traceback
            raise Failure(f"cannot open the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
            fcntl.flock(self.fd, fcntl.LOCK_EX)
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
