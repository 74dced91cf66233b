"""QubesDB, in-process: the daemon's Unix-socket protocol spoken directly,
one connection per run, no child process per read (Qubes' own scripts run
``qubesdb-read`` once per key).

The wire format is ``struct qdb_hdr`` of QubesDB's ``include/qubesdb.h``: a
``uint8_t`` type, a 64-byte NUL-terminated path, a ``uint32_t`` data length
(native byte order and alignment: 72 bytes), then the data (the daemon
takes values of at most 3071 bytes, without NUL). A read answers ``QDB_RESP_READ`` with the value or
``QDB_RESP_ERROR_NOENT``; a multiread answers one ``QDB_RESP_MULTIREAD`` per
entry and ends with an empty path. Watch events (``QDB_RESP_WATCH``) may come
between any two messages: a command's answer skips them, and
:meth:`QubesDB.event` waits for the next one. A watch on a path ending in
``/`` fires for every entry under it.

Values are bytes, exactly as stored: what they mean, and whether they are
valid, is for the caller's validation (``vif_route_qubes.validate``).
"""

import os
import socket
import struct

from .errors import Failure

SOCKET = "/var/run/qubes/qubesdb.sock"
ENV_SOCKET = "VIF_ROUTE_QUBES_QUBESDB_SOCKET"

CMD_READ, CMD_WRITE, CMD_MULTIREAD, CMD_LIST, CMD_RM, CMD_WATCH, CMD_UNWATCH = range(7)
RESP_OK, RESP_NOENT, RESP_ERROR, RESP_READ, RESP_MULTIREAD, RESP_LIST, RESP_WATCH = range(7, 14)
MAX_PATH = 64
MAX_DATA = 3072  # QDB_MAX_DATA: the daemon refuses data_len >= this
MAX_VALUE = MAX_DATA - 1
HDR = struct.Struct("@B64sI")  # 72 bytes: the compiler pads the path to 68


def socket_path(env=None) -> str:
    return (env or os.environ).get(ENV_SOCKET) or SOCKET


def answers(env=None) -> bool:
    """The daemon accepts a connection on its socket (the ``auto`` choice of
    a configuration source): no read, nothing left open."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(1.0)
            s.connect(socket_path(env))
        return True
    except OSError:
        return False


class QubesDB:
    """One connection to the local QubesDB daemon."""

    def __init__(self, env=None, timeout=10.0):
        self.path = socket_path(env)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.timeout = timeout
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError as exc:
            self.sock.close()
            raise Failure(f"QubesDB: cannot connect to {self.path}: {exc.strerror or exc}") from None

    # -- the protocol ------------------------------------------------------------
    def _send(self, kind, path, data=b""):
        raw = path.encode() if isinstance(path, str) else path
        if not raw.startswith(b"/") or len(raw) >= MAX_PATH or b"\0" in raw:
            raise Failure(f"QubesDB: {path!r} is not a valid path (absolute, under {MAX_PATH} bytes)")
        if len(data) > MAX_VALUE or b"\0" in data:
            raise Failure(f"QubesDB: a value for {path} must be at most {MAX_VALUE} bytes, without NUL")
        try:
            self.sock.sendall(HDR.pack(kind, raw, len(data)) + data)
        except OSError as exc:
            raise self._gone(exc) from None

    def _exactly(self, n) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except OSError as exc:
                raise self._gone(exc) from None
            if not chunk:
                raise self._gone(None)
            buf += chunk
        return buf

    def _receive(self):
        """-> (type, path, data) of the next message that is not a watch event."""
        while True:
            kind, raw, size = HDR.unpack(self._exactly(HDR.size))
            if size > MAX_DATA:
                raise Failure(f"QubesDB: {self.path}: an answer of {size} bytes (at most {MAX_DATA})")
            data = self._exactly(size) if size else b""
            if kind != RESP_WATCH:
                return kind, raw.split(b"\0", 1)[0].decode("utf-8", "replace"), data

    def _gone(self, exc):
        why = f": {exc.strerror or exc}" if exc is not None else ": the daemon closed the connection"
        return Failure(f"QubesDB: {self.path}{why}")

    # -- the commands ------------------------------------------------------------
    def read(self, path):
        """The value at ``path`` (bytes), or None when there is none."""
        self._send(CMD_READ, path)
        kind, _, data = self._receive()
        if kind == RESP_READ:
            return data
        if kind == RESP_NOENT:
            return None
        raise Failure(f"QubesDB: reading {path} failed (answer type {kind})")

    def multiread(self, prefix) -> dict:
        """{path: value} of every entry whose path starts with ``prefix``, in
        one round trip."""
        self._send(CMD_MULTIREAD, prefix)
        found = {}
        while True:
            kind, path, data = self._receive()
            if kind != RESP_MULTIREAD:
                raise Failure(f"QubesDB: multiread of {prefix} failed (answer type {kind})")
            if not path:
                return found
            found[path] = data

    def write(self, path, value: bytes):
        self._send(CMD_WRITE, path, value)
        kind, _, _ = self._receive()
        if kind != RESP_OK:
            raise Failure(f"QubesDB: writing {path} failed (answer type {kind})")

    def rm(self, path):
        """Remove ``path`` (with a trailing ``/``: everything under it);
        absent is no error."""
        self._send(CMD_RM, path)
        kind, _, _ = self._receive()
        if kind not in (RESP_OK, RESP_NOENT):
            raise Failure(f"QubesDB: removing {path} failed (answer type {kind})")

    def watch(self, path):
        """Be told of every change at ``path`` (or under it, with a trailing
        ``/``) until this connection closes."""
        self._send(CMD_WATCH, path)
        kind, _, _ = self._receive()
        if kind != RESP_OK:
            raise Failure(f"QubesDB: watching {path} failed (answer type {kind})")

    def event(self, timeout):
        """The path of the next watch event, or None when none came within
        ``timeout`` seconds. Only between commands: an answer is never
        expected here."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            head = self.sock.recv(HDR.size, socket.MSG_PEEK)
        except socket.timeout:
            return None
        except OSError as exc:
            raise self._gone(exc) from None
        finally:
            self.sock.settimeout(self.timeout)
        if not head:
            raise self._gone(None)
        kind, raw, size = HDR.unpack(self._exactly(HDR.size))
        if size:
            self._exactly(min(size, MAX_DATA))
        if kind != RESP_WATCH:
            raise Failure(f"QubesDB: {self.path}: an answer (type {kind}) where a watch event was expected")
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
