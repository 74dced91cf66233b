"""The one place that talks to XenStore, through pyxs.

pyxs's ``Client`` waits for each reply before sending the next request and
waits forever if the daemon never answers. A hotplug run reads seven keys
and libxl kills it after 40 s, so this module uses pyxs's own router,
connections and packets but:

* sends all reads of a run at once and then collects the replies (pyxs's
  router matches replies by request id), one round trip instead of seven;
* bounds every wait (``VIF_ROUTE_QUBES_XS_TIMEOUT``, default 10 s) and wakes
  waiters at once when the daemon closes the connection, so a dead or slow
  xenstored is a one-line error, not a hang.

Where to connect follows pyxs and libxenstore: ``XENSTORED_PATH``, else the
daemon's socket ``/var/run/xenstored/socket`` when it exists (dom0), else the
kernel's ``/dev/xen/xenbus`` (a driver domain such as a Qubes netvm).
"""

import errno
import os
import time

from pyxs._internal import NUL, Op, Packet, next_rq_id
from pyxs.client import Router
from pyxs.connection import UnixSocketConnection, XenBusConnection
from pyxs.exceptions import PyXSError
from pyxs.helpers import error

from .errors import Failure

DEFAULT_SOCKET = "/var/run/xenstored/socket"
_DEAD = object()  # set on pending replies when the router thread ends


class _Router(Router):
    """pyxs's router, which also wakes every pending request when its
    thread ends (the daemon closed the connection or sent garbage); pyxs's
    own would leave them waiting forever."""

    died = None

    def __call__(self):
        try:
            super().__call__()
        except BaseException as exc:  # noqa: BLE001 - reported to the waiters
            self.died = exc
        finally:
            self.died = self.died or "connection closed"
            for rvar in list(self.rvars.values()):
                rvar.set(_DEAD)


def _connection(env):
    """-> (connection, what was tried before it, for the error message)."""
    path = env.get("XENSTORED_PATH")
    if path:
        return UnixSocketConnection(path), ""
    if os.path.exists(DEFAULT_SOCKET):
        return UnixSocketConnection(DEFAULT_SOCKET), ""
    conn = XenBusConnection()  # pyxs: /dev/xen/xenbus, else the older /proc/xen/xenbus
    dev = "" if conn.path == "/dev/xen/xenbus" else "no /dev/xen/xenbus, "
    return conn, f"XENSTORED_PATH is not set, no socket at {DEFAULT_SOCKET}, {dev}"


class XenStore:
    def __init__(self, env=None, timeout=None, default_timeout=10.0):
        """``timeout`` wins; else VIF_ROUTE_QUBES_XS_TIMEOUT; else
        ``default_timeout`` (interactive callers wait less than hotplug)."""
        env = os.environ if env is None else env
        from .lock import seconds

        self.timeout = timeout or seconds(env, "VIF_ROUTE_QUBES_XS_TIMEOUT", default_timeout)
        self._conn, self._tried = _connection(env)
        self._router = None

    @property
    def where(self) -> str:
        return self._conn.path

    def _open(self):
        if self._router is None:
            router = _Router(self._conn)
            try:
                router.start()
            except PyXSError as exc:
                raise Failure(f"XenStore: cannot connect to {self.where}: {_reason(exc)}"
                              + (f" ({self._tried}then {self.where})" if self._tried else "")) from None
            self._router = router
        return self._router

    def close(self):
        if self._router is not None:
            self._router.terminate()
            self._router = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the protocol ----------------------------------------------------------
    def _send(self, op, *args):
        router = self._open()
        try:
            packet = Packet(op, b"".join(args), rq_id=next_rq_id(), tx_id=0)
            return router.send(packet)
        except (PyXSError, AttributeError) as exc:
            if router.died or not router.connection.is_connected:
                # the daemon hung up while our pipelined requests were still
                # going out: say so, not "not connected". pyxs's router
                # thread drops the transport without the send lock, so a
                # send that passed pyxs's is_connected check can find it
                # gone halfway (AttributeError on None).
                raise Failure(f"XenStore: {self.where} closed the connection") from None
            if isinstance(exc, AttributeError):
                raise
            raise Failure(f"XenStore: {self.where}: {_reason(exc)}") from None

    def _collect(self, rvar, what):
        deadline = time.monotonic() + self.timeout
        with rvar.condition:
            while rvar.target is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(f"XenStore: no answer to {what} within {self.timeout:g} s from {self.where}")
                rvar.condition.wait(left)
        packet = rvar.target
        if packet is _DEAD:
            raise Failure(f"XenStore: {self.where} closed the connection during {what}")
        if packet.op == Op.ERROR:
            raise error(packet.payload.rstrip(NUL))
        return packet.payload

    def _call(self, op, what, *args):
        return self._collect(self._send(op, *args), what)

    # -- operations --------------------------------------------------------------
    def _pipeline(self, requests):
        """Send ``(key, op, args)`` requests; yield ``(key, reply slot)``, to
        be collected in order.

        Over xenstored's socket (dom0) all go out at once and the replies are
        collected after: one round trip. Over the kernel's /dev/xen/xenbus (a
        driver domain or a guest) one at a time: Linux queues a request with
        its body still in the device file's single message buffer
        (``xenbus_dev_request_and_reply``: ``iov_base = msg + 1``), and the
        next write() overwrites that buffer before the xenbus thread has copied
        it to the ring; xenstored then gets a mangled path and answers EINVAL
        (seen under a real Xen in the e2e netvm)."""
        if isinstance(self._conn, XenBusConnection):
            for key, op, args in requests:
                # lazily: the caller collects this reply before asking for the next
                yield key, self._send(op, *args)
        else:
            yield from [(key, self._send(op, *args)) for key, op, args in requests]

    def read_many(self, paths) -> dict:
        """{path: value or None (absent)} in one round trip."""
        pending = self._pipeline([(p, Op.READ, (_enc(p) + NUL,)) for p in paths])
        values = {}
        for path, rvar in pending:
            try:
                values[path] = self._collect(rvar, f"read {path}").rstrip(NUL).decode("utf-8", "replace")
            except PyXSError as exc:
                if exc.args[0] != errno.ENOENT:
                    raise Failure(f"XenStore: read {path}: {_reason(exc)}") from None
                values[path] = None
        return values

    def read(self, path):
        return self.read_many([path])[path]

    def write_many(self, items) -> None:
        """Write ``(path, value)`` pairs, pipelined, in order."""
        pending = self._pipeline([(p, Op.WRITE, (_enc(p) + NUL, _enc(v))) for p, v in items])
        for path, rvar in pending:
            try:
                self._collect(rvar, f"write {path}")
            except PyXSError as exc:
                raise Failure(f"XenStore: write {path}: {_reason(exc)}") from None

    def write(self, path, value) -> None:
        self.write_many([(path, value)])

    def rm(self, path) -> None:
        try:
            self._call(Op.RM, f"rm {path}", _enc(path) + NUL)
        except PyXSError as exc:
            if exc.args[0] != errno.ENOENT:
                raise Failure(f"XenStore: rm {path}: {_reason(exc)}") from None

    def set_perms(self, path, perms) -> None:
        """Set ``path``'s permissions (xenstore-chmod's ``n0 r5`` words: the
        first names the owner and everyone else's access)."""
        payload = _enc(path) + NUL + b"".join(_enc(p) + NUL for p in perms)
        try:
            self._call(Op.SET_PERMS, f"set_perms {path}", payload)
        except PyXSError as exc:
            raise Failure(f"XenStore: set_perms {path}: {_reason(exc)}") from None

    def ls(self, path):
        """Children of ``path``, or None when it does not exist."""
        try:
            payload = self._call(Op.DIRECTORY, f"ls {path}", _enc(path) + NUL)
        except PyXSError as exc:
            if exc.args[0] == errno.ENOENT:
                return None
            raise Failure(f"XenStore: ls {path}: {_reason(exc)}") from None
        return [c.decode() for c in payload.split(NUL) if c]


def _enc(text: str) -> bytes:
    # XenStore values are bytes; ours are validated ASCII, but a message
    # quoting hostile input may not be: never let that fail the error report.
    return text.encode("ascii", "replace")


def _reason(exc) -> str:
    if isinstance(exc, PyXSError) and len(exc.args) == 2 and isinstance(exc.args[0], int):
        return f"{errno.errorcode.get(exc.args[0], exc.args[0])} ({exc.args[1]})"
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.strerror:
        # pyxs wraps socket errors as "error connecting to '/path': (2, '...')",
        # repeating the path we already name; the OS's reason is what matters
        return cause.strerror
    return " ".join(str(a) for a in exc.args) or type(exc).__name__
