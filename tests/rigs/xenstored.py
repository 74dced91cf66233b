"""A small XenStore daemon speaking the real wire protocol over a Unix socket.

It exists so that tests (and the project's demo) can run the hotplug scripts,
pyxs and Debian's ``xenstore-*`` command-line clients against something that
behaves like ``xenstored`` without a Xen host.  Standard library only, and
cheap to import (``argparse`` is only loaded by the CLI).

Wire protocol (Xen ``docs/misc/xenstore.txt``, ``xen/include/public/io/xs_wire.h``)
-----------------------------------------------------------------------------------
Every message is a 16-byte header of four little-endian ``uint32`` -- operation,
request id, transaction id, payload length -- followed by at most 4096 bytes of
payload made of NUL-separated strings.  Replies echo the request and
transaction ids; failures are sent as operation ``ERROR`` (16) with the errno
*name* as payload (``b"ENOENT\\0"``).  A client sending a payload longer than
4096 bytes is disconnected, as real xenstored does.

Supported operations: ``READ``, ``WRITE``, ``MKDIR``, ``RM``, ``DIRECTORY``,
``DIRECTORY_PART``, ``GET_PERMS``, ``SET_PERMS``, ``GET_DOMAIN_PATH``,
``TRANSACTION_START``/``TRANSACTION_END``, ``WATCH``/``UNWATCH``,
``RESET_WATCHES``, ``INTRODUCE``/``RELEASE``/``IS_DOMAIN_INTRODUCED`` (only to
fire ``@introduceDomain``/``@releaseDomain`` watches).  Every other operation
gets ``EINVAL`` (C xenstored would answer ``ENOSYS``).

Semantics worth knowing:

* ``WRITE`` and ``MKDIR`` create missing parents with empty values, because
  xenstore has no real directories: "if a path exists, all of its parents do
  too".  ``RM`` is recursive; removing a missing node is fine as long as its
  parent exists, otherwise ``ENOENT`` (as the protocol document says).
* Paths: ``[A-Za-z0-9/_@-]``, no ``//``, no trailing ``/`` (except ``/``), not
  empty, at most 3072 bytes absolute / 2048 relative, else ``EINVAL``.
  Relative paths are resolved under ``/local/domain/<domid>`` of the server
  (real xenstored treats socket clients as dom0).
* The tree starts with only ``/``; nothing else (not even the domain path)
  exists until written.  Permissions are stored (new nodes inherit their
  parent's, the root has ``n0``) and returned but never enforced.
* Transactions see a snapshot of the store plus their own changes.  Commit
  fails with ``EAGAIN`` if any node the transaction read, wrote, listed or
  found missing was changed by someone else in the meantime; ``F`` aborts.
  Watch events for transactional changes are sent at commit.
* A watch fires once as soon as it is registered (path = watched path), then on
  every change of the path or a descendant; the recursive removal of a parent
  fires it with the watched path.  Relative watches get relative event paths.
  Watch events are queued per connection and written by a per-connection
  writer thread, so a client that never reads cannot stall the server.

Real clients
------------
Debian's ``xenstore-utils`` (libxenstore 4.17) honour ``XENSTORED_PATH``: they
``stat`` it and connect to it when it is a socket.  When the variable is set
it is also used in place of the ``/dev/xen/xenbus`` fallback, so a missing
socket makes them fail with ``xs_open: No such file or directory`` instead of
touching the real device.  Unset, they try ``/var/run/xenstored/socket``, then
``/dev/xen/xenbus``, then ``/proc/xen/xenbus``.  Nothing else is needed: no
handshake, no special op.  What they send (observed through ``requests``):

* with one operation (``xenstore-read P``, ``xenstore-write P V``) the bare
  ``READ``/``WRITE`` with tx id 0;
* with several paths, and always for ``xenstore-exists``, ``-list``, ``-rm``
  and ``-chmod``, a transaction: ``TRANSACTION_START`` (payload ``"\\0"``),
  the ops with that tx id, then ``TRANSACTION_END`` -- ``T`` on success, ``F``
  when an op failed -- retried on ``EAGAIN``;
* ``xenstore-exists`` is a ``READ``; ``xenstore-ls`` sends ``DIRECTORY`` and
  ``READ`` for every node (plus ``GET_PERMS`` with ``-p``), no transaction,
  and falls back to ``DIRECTORY_PART`` when ``DIRECTORY`` answers ``E2BIG``;
* ``xenstore-rm -t /x`` also reads the parent as the empty path ``""`` (which
  is ``EINVAL`` and ignored by the client);
* ``xenstore-write`` sends the value without a trailing NUL; ``WRITE``'s value
  is everything after the first NUL.

Fault injection
---------------
For reliability tests the server can misbehave on purpose (constructor
keywords, attributes that may be changed while running, and CLI flags):

* ``delay``: seconds to sleep before answering every request.
* ``close_on``: path prefixes; a request naming a path at or under one of them
  makes the server close that connection without replying.
* ``deny``: path prefixes; requests naming a path at or under one of them get
  ``EACCES``.
* ``drop_after``: close every connection once it has been sent N replies.

Python API
----------
>>> with XenStored("/tmp/xs.sock") as xs:          # doctest: +SKIP
...     xs.write("/local/domain/0/name", "dom0")
...     xs.read("/local/domain/0/name")
b'dom0'

CLI
---
``python3 -m tests.rigs.xenstored --socket PATH [--domid N]
[--set PATH=VALUE ...] [--delay S] [--deny P ...] [--close-on P ...]
[--drop-after N]`` runs in the foreground, prints ``ready PATH`` once it
accepts connections, and removes its socket on SIGTERM/SIGINT.
"""

import collections
import os
import re
import socket
import stat
import struct
import sys
import threading
import time

__all__ = ["XenStored", "OPS", "main"]

#: Operation numbers from ``enum xsd_sockmsg_type`` in xs_wire.h.
OPS = {
    "CONTROL": 0, "DIRECTORY": 1, "READ": 2, "GET_PERMS": 3, "WATCH": 4,
    "UNWATCH": 5, "TRANSACTION_START": 6, "TRANSACTION_END": 7,
    "INTRODUCE": 8, "RELEASE": 9, "GET_DOMAIN_PATH": 10, "WRITE": 11,
    "MKDIR": 12, "RM": 13, "SET_PERMS": 14, "WATCH_EVENT": 15, "ERROR": 16,
    "IS_DOMAIN_INTRODUCED": 17, "RESUME": 18, "SET_TARGET": 19,
    "RESET_WATCHES": 21, "DIRECTORY_PART": 22,
}
_OP_NAMES = {v: k for k, v in OPS.items()}

_HEADER = struct.Struct("<IIII")
PAYLOAD_MAX = 4096
ABS_PATH_MAX = 3072
REL_PATH_MAX = 2048

_PATH_CHARS = re.compile(r"^[A-Za-z0-9/_@-]+$")
_PERM = re.compile(r"^[wrbn][0-9]+$")

# Operations whose first argument is a path (used by fault injection and
# request logging).
_PATH_OPS = {"READ", "WRITE", "MKDIR", "RM", "DIRECTORY", "DIRECTORY_PART",
             "GET_PERMS", "SET_PERMS", "WATCH", "UNWATCH"}


class XenStoreError(Exception):
    """An error answered to a client as ``ERROR`` with an errno name."""

    def __init__(self, name):
        super().__init__(name)
        self.name = name


# A node is immutable: every change builds a new one.  That makes a snapshot
# for a transaction a shallow ``dict`` copy, and ``gen`` (a store-wide
# counter value at the last change) tells whether a node changed since.
_Node = collections.namedtuple("_Node", "value perms children gen")


def _parent(path):
    return path.rsplit("/", 1)[0] or "/"


def _basename(path):
    return path.rsplit("/", 1)[1]


def _join(parent, name):
    return "/" + name if parent == "/" else parent + "/" + name


def _is_child(child, parent):
    """True if ``child`` is ``parent`` or below it (xenstore.txt's definition)."""
    return (parent == "/" or child == parent
            or child.startswith(parent + "/"))


def _under_any(path, prefixes):
    return any(_is_child(path, p) for p in prefixes)


def _as_list(value):
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


class _View:
    """Access to the live tree (``tx is None``) or to a transaction's view."""

    def __init__(self, store, tx=None):
        self.store = store
        self.tx = tx

    def get(self, path):
        tx = self.tx
        if tx is None:
            return self.store.nodes.get(path)
        tx.touch(path)
        if path in tx.changes:
            return tx.changes[path]
        return tx.base.get(path)

    def put(self, path, node):
        if self.tx is None:
            self.store.nodes[path] = node
        else:
            self.tx.touch(path)
            self.tx.changes[path] = node

    def delete(self, path):
        if self.tx is None:
            self.store.nodes.pop(path, None)
        else:
            self.tx.touch(path)
            self.tx.changes[path] = None


class _Transaction:
    def __init__(self, tid, base):
        self.tid = tid
        self.base = base          # snapshot: path -> _Node
        self.changes = {}         # path -> _Node, or None when removed
        self.accessed = {}        # path -> gen in the snapshot (None: absent)
        self.events = []          # (path, recursive) to fire at commit

    def touch(self, path):
        if path not in self.accessed:
            node = self.base.get(path)
            self.accessed[path] = node.gen if node is not None else None


class _Watch:
    __slots__ = ("conn", "wpath", "abs", "token", "relbase")

    def __init__(self, conn, wpath, abspath, token, relbase):
        self.conn = conn
        self.wpath = wpath        # as the client sent it (bytes)
        self.abs = abspath        # absolute or @special (str)
        self.token = token        # bytes
        self.relbase = relbase    # domain path if wpath was relative, else None


class _Connection:
    """One client: a reader thread handling requests and a writer thread.

    Replies and watch events go through ``outq``: a handler never blocks on a
    slow client's socket while holding the store lock.
    """

    _ids = 0

    def __init__(self, server, sock):
        _Connection._ids += 1
        self.cid = _Connection._ids
        self.server = server
        self.sock = sock
        self.outq = collections.deque()
        self.outcv = threading.Condition()
        self.closed = False
        self.transactions = {}
        self.replies = 0
        self.reader = threading.Thread(target=self._read_loop, daemon=True,
                                       name="xenstored-conn-%d" % self.cid)
        self.writer = threading.Thread(target=self._write_loop, daemon=True,
                                       name="xenstored-out-%d" % self.cid)

    def start(self):
        self.writer.start()
        self.reader.start()

    def send(self, op, rq_id, tx_id, payload):
        data = _HEADER.pack(op, rq_id, tx_id, len(payload)) + payload
        with self.outcv:
            if not self.closed:
                self.outq.append(data)
                self.outcv.notify()

    def close_after_flush(self):
        """Stop accepting output; the writer closes after what is queued."""
        with self.outcv:
            self.closed = True
            self.outcv.notify()

    def abort(self):
        """Used by ``stop()``: wake a reader blocked in ``recv``."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def _read_loop(self):
        try:
            while True:
                header = self._recv_exact(_HEADER.size)
                if header is None:
                    break
                op, rq_id, tx_id, length = _HEADER.unpack(header)
                if length > PAYLOAD_MAX:
                    # Real xenstored kills such a connection outright.
                    break
                payload = self._recv_exact(length) if length else b""
                if payload is None:
                    break
                if not self.server._handle(self, op, rq_id, tx_id, payload):
                    break
        except OSError:
            pass
        finally:
            self.server._forget(self)
            self.close_after_flush()

    def _write_loop(self):
        try:
            while True:
                with self.outcv:
                    while not self.outq and not self.closed:
                        self.outcv.wait()
                    if not self.outq:
                        break
                    data = self.outq.popleft()
                self.sock.sendall(data)
        except OSError:
            pass
        finally:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


class XenStored:
    """An in-memory XenStore served over the Unix socket ``socket_path``.

    :param socket_path: where to listen (a stale socket file is replaced).
    :param domid: the server's own domain id: relative paths are resolved
        under ``/local/domain/<domid>``.
    :param delay: seconds to sleep before every reply.
    :param close_on: path prefix (or list) that makes the server drop the
        connection without a reply.
    :param deny: path prefix (or list) answered with ``EACCES``.
    :param drop_after: close each connection after this many replies.

    ``requests`` records the last 10000 requests as
    ``(connection id, op name, tx id, payload)`` for tests that check what a
    client actually sends.
    """

    def __init__(self, socket_path, domid=0, delay=0.0, close_on=None,
                 deny=None, drop_after=None):
        self.socket_path = os.fspath(socket_path)
        self.domid = int(domid)
        self.delay = float(delay or 0)
        self.close_on = _as_list(close_on)
        self.deny = _as_list(deny)
        self.drop_after = drop_after
        self.requests = collections.deque(maxlen=10000)

        self.lock = threading.RLock()
        self.nodes = {"/": _Node(b"", ("n0",), (), 0)}
        self._gen = 0
        self._tx_ids = 0
        self._watches = []
        self._introduced = set()
        self._conns = set()
        self._listener = None
        self._accept_thread = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------

    @property
    def domain_path(self):
        return "/local/domain/%d" % self.domid

    def start(self):
        """Bind and listen; returns once clients can connect."""
        if self._listener is not None:
            return self
        try:
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)  # stale socket from a dead run
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.socket_path)
            sock.listen(256)
        except OSError:
            sock.close()
            raise
        # The timeout is a safety net so the accept loop always sees the
        # stop flag; stop() normally wakes it at once (see there).
        sock.settimeout(0.5)
        self._listener = sock
        self._stopping = False
        self._accept_thread = threading.Thread(
            target=self._accept_loop, daemon=True, name="xenstored-accept")
        self._accept_thread.start()
        return self

    def stop(self):
        """Close every connection, stop listening, remove the socket file."""
        if self._listener is None:
            return
        self._stopping = True
        # Neither close() nor shutdown() wakes accept() on a Unix socket;
        # a connection of our own does, so stop() does not wait for the
        # polling timeout.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:
                wake.settimeout(1)
                wake.connect(self.socket_path)
        except OSError:
            pass
        self._accept_thread.join(5)
        self._listener.close()
        self._listener = None
        with self.lock:
            conns = list(self._conns)
        for conn in conns:
            conn.abort()
        for conn in conns:
            conn.reader.join(5)
            conn.writer.join(5)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def connections(self):
        """Number of currently connected clients."""
        with self.lock:
            return len(self._conns)

    def _accept_loop(self):
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stopping:
                    return
                time.sleep(0.01)
                continue
            if self._stopping:
                sock.close()
                return
            sock.setblocking(True)
            conn = _Connection(self, sock)
            with self.lock:
                self._conns.add(conn)
            conn.start()

    def _forget(self, conn):
        with self.lock:
            self._conns.discard(conn)
            self._watches = [w for w in self._watches if w.conn is not conn]
            conn.transactions.clear()

    # -- direct access for tests ------------------------------------------

    def _path(self, path):
        try:
            return self._canon(path.encode() if isinstance(path, str) else path)
        except XenStoreError:
            raise ValueError("invalid xenstore path %r" % (path,))

    def write(self, path, value):
        """Write ``value`` (str or bytes) at ``path``, firing watches."""
        if isinstance(value, str):
            value = value.encode()
        with self.lock:
            events = []
            self._op_write(_View(self), self._path(path), value, events)
            self._fire_all(events)

    def mkdir(self, path):
        """Create ``path`` (and parents) if missing, firing watches."""
        with self.lock:
            events = []
            self._op_mkdir(_View(self), self._path(path), events)
            self._fire_all(events)

    def read(self, path):
        """The value at ``path`` as bytes, or ``None`` if it does not exist."""
        with self.lock:
            node = self.nodes.get(self._path(path))
            return None if node is None else node.value

    def exists(self, path):
        with self.lock:
            return self._path(path) in self.nodes

    def rm(self, path):
        """Remove ``path`` recursively, firing watches; True if it existed."""
        path = self._path(path)
        with self.lock:
            if path not in self.nodes:
                return False
            events = []
            self._op_rm(_View(self), path, events)
            self._fire_all(events)
            return True

    def ls(self, path):
        """Names of the children of ``path``, or ``None`` if it is missing."""
        with self.lock:
            node = self.nodes.get(self._path(path))
            return None if node is None else list(node.children)

    def get_perms(self, path):
        with self.lock:
            node = self.nodes.get(self._path(path))
            return None if node is None else list(node.perms)

    def dump(self):
        """``{path: value}`` of every node except the root, sorted by path."""
        with self.lock:
            return {p: self.nodes[p].value for p in sorted(self.nodes)
                    if p != "/"}

    def fire(self, special):
        """Fire a special watch such as ``@releaseDomain``."""
        with self.lock:
            self._fire(special, False)

    # -- tree operations (shared by live tree and transactions) ------------

    def _next_gen(self):
        self._gen += 1
        return self._gen

    def _create(self, view, path, value):
        """Create ``path`` (parent chain first); ``path`` must be missing."""
        parent_path = _parent(path)
        parent = view.get(parent_path)
        if parent is None:
            # xenstore has no directories: a node's parents always exist,
            # so creating a node creates its ancestors with empty values.
            parent = self._create(view, parent_path, b"")
        gen = self._next_gen()
        view.put(parent_path, parent._replace(
            children=parent.children + (_basename(path),), gen=gen))
        node = _Node(value, parent.perms, (), gen)
        view.put(path, node)
        return node

    def _op_write(self, view, path, value, events):
        node = view.get(path)
        if node is None:
            self._create(view, path, value)
        else:
            view.put(path, node._replace(value=value, gen=self._next_gen()))
        events.append((path, False))

    def _op_mkdir(self, view, path, events):
        if view.get(path) is None:
            self._create(view, path, b"")
            events.append((path, False))

    def _op_rm(self, view, path, events):
        if path == "/":
            raise XenStoreError("EINVAL")
        node = view.get(path)
        parent_path = _parent(path)
        parent = view.get(parent_path)
        if node is None:
            if parent is None:
                raise XenStoreError("ENOENT")
            return
        stack = [path]
        while stack:
            p = stack.pop()
            n = view.get(p)
            if n is not None:
                stack.extend(_join(p, c) for c in n.children)
            view.delete(p)
        name = _basename(path)
        view.put(parent_path, parent._replace(
            children=tuple(c for c in parent.children if c != name),
            gen=self._next_gen()))
        events.append((path, True))

    def _op_set_perms(self, view, path, perms, events):
        node = view.get(path)
        if node is None:
            raise XenStoreError("ENOENT")
        view.put(path, node._replace(perms=tuple(perms),
                                     gen=self._next_gen()))
        events.append((path, False))

    # -- watches -----------------------------------------------------------

    def _fire_all(self, events):
        for path, recursive in events:
            self._fire(path, recursive)

    def _fire(self, path, recursive):
        for w in self._watches:
            if w.abs.startswith("@") or path.startswith("@"):
                if w.abs != path:
                    continue
                epath = path
            elif _is_child(path, w.abs):
                epath = path
            elif recursive and _is_child(w.abs, path):
                # Removing a parent of the watched node reports the watched
                # path itself, so the event path is always under the watch.
                epath = w.abs
            else:
                continue
            self._send_event(w, epath)

    def _send_event(self, watch, epath):
        if watch.relbase is not None:
            epath = epath[len(watch.relbase) + 1:]
        watch.conn.send(OPS["WATCH_EVENT"], 0, 0,
                        epath.encode() + b"\0" + watch.token + b"\0")

    # -- request handling ----------------------------------------------------

    def _canon(self, raw, special=False):
        """Validate a wire path; return (absolute path, relative base|None)."""
        path, _ = self._canon2(raw, special)
        return path

    def _canon2(self, raw, special=False):
        try:
            path = raw.decode("ascii")
        except UnicodeDecodeError:
            raise XenStoreError("EINVAL")
        if special and path.startswith("@"):
            if len(path) > REL_PATH_MAX:
                raise XenStoreError("EINVAL")
            return path, None
        if not path or not _PATH_CHARS.match(path) or "//" in path:
            raise XenStoreError("EINVAL")
        relbase = None
        if not path.startswith("/"):
            if len(path) > REL_PATH_MAX:
                raise XenStoreError("EINVAL")
            relbase = self.domain_path
            path = relbase + "/" + path
        if (path != "/" and path.endswith("/")) or len(path) > ABS_PATH_MAX:
            raise XenStoreError("EINVAL")
        return path, relbase

    def _handle(self, conn, op, rq_id, tx_id, payload):
        """Answer one request; False means: close the connection now."""
        name = _OP_NAMES.get(op, str(op))
        self.requests.append((conn.cid, name, tx_id, payload))
        args = payload.split(b"\0")

        target = None
        if name in _PATH_OPS and (self.close_on or self.deny):
            try:
                target = self._canon(args[0], special=True)
            except XenStoreError:
                pass  # the handler answers EINVAL
        if target is not None and _under_any(target, self.close_on):
            return False

        if self.delay:
            time.sleep(self.delay)

        if target is not None and _under_any(target, self.deny):
            self._reply_error(conn, rq_id, tx_id, "EACCES")
            return self._count_reply(conn)

        handler = getattr(self, "_do_" + name.lower(), None)
        with self.lock:
            events = []
            try:
                if handler is None:
                    raise XenStoreError("EINVAL")
                reply, after = handler(conn, tx_id, args, payload, events)
            except XenStoreError as e:
                self._reply_error(conn, rq_id, tx_id, e.name)
            else:
                conn.send(op, rq_id, tx_id, reply)
                self._fire_all(events)
                if after is not None:
                    after()
        return self._count_reply(conn)

    def _reply_error(self, conn, rq_id, tx_id, errname):
        conn.send(OPS["ERROR"], rq_id, tx_id, errname.encode() + b"\0")

    def _count_reply(self, conn):
        conn.replies += 1
        return not (self.drop_after and conn.replies >= self.drop_after)

    def _view(self, conn, tx_id):
        if not tx_id:
            return _View(self)
        tx = conn.transactions.get(tx_id)
        if tx is None:
            raise XenStoreError("ENOENT")
        return _View(self, tx)

    def _changes(self, view, events):
        """Where a handler's events go: fired now, or kept until commit."""
        if view.tx is None:
            return events
        return view.tx.events

    # Each _do_<op> returns (reply payload, callable to run after the reply
    # has been queued or None) and appends (path, recursive) to ``events``.

    def _do_read(self, conn, tx_id, args, payload, events):
        node = self._view(conn, tx_id).get(self._canon(args[0]))
        if node is None:
            raise XenStoreError("ENOENT")
        return node.value, None

    def _do_write(self, conn, tx_id, args, payload, events):
        if b"\0" not in payload:
            raise XenStoreError("EINVAL")
        raw_path, value = payload.split(b"\0", 1)
        view = self._view(conn, tx_id)
        self._op_write(view, self._canon(raw_path), value,
                       self._changes(view, events))
        return b"OK\0", None

    def _do_mkdir(self, conn, tx_id, args, payload, events):
        view = self._view(conn, tx_id)
        self._op_mkdir(view, self._canon(args[0]), self._changes(view, events))
        return b"OK\0", None

    def _do_rm(self, conn, tx_id, args, payload, events):
        view = self._view(conn, tx_id)
        self._op_rm(view, self._canon(args[0]), self._changes(view, events))
        return b"OK\0", None

    def _do_directory(self, conn, tx_id, args, payload, events):
        node = self._view(conn, tx_id).get(self._canon(args[0]))
        if node is None:
            raise XenStoreError("ENOENT")
        reply = b"".join(c.encode() + b"\0" for c in node.children)
        if len(reply) > PAYLOAD_MAX:
            raise XenStoreError("E2BIG")  # client retries with DIRECTORY_PART
        return reply, None

    def _do_directory_part(self, conn, tx_id, args, payload, events):
        if len(args) < 2:
            raise XenStoreError("EINVAL")
        node = self._view(conn, tx_id).get(self._canon(args[0]))
        if node is None:
            raise XenStoreError("ENOENT")
        try:
            off = int(args[1])
        except ValueError:
            raise XenStoreError("EINVAL")
        gen = str(node.gen).encode() + b"\0"
        children = b"".join(c.encode() + b"\0" for c in node.children)
        if off >= len(children):
            return gen + b"\0", None
        part = b""
        for child in children[off:].split(b"\0")[:-1]:
            if len(gen) + len(part) + len(child) + 1 >= PAYLOAD_MAX:
                break
            part += child + b"\0"
        if off + len(part) == len(children):
            part += b"\0"  # an empty string marks the end of the list
        return gen + part, None

    def _do_get_perms(self, conn, tx_id, args, payload, events):
        node = self._view(conn, tx_id).get(self._canon(args[0]))
        if node is None:
            raise XenStoreError("ENOENT")
        return b"".join(p.encode() + b"\0" for p in node.perms), None

    def _do_set_perms(self, conn, tx_id, args, payload, events):
        path = self._canon(args[0])
        perms = [a.decode("ascii", "replace") for a in args[1:] if a]
        if not perms or not all(_PERM.match(p) for p in perms):
            raise XenStoreError("EINVAL")
        view = self._view(conn, tx_id)
        self._op_set_perms(view, path, perms, self._changes(view, events))
        return b"OK\0", None

    def _do_get_domain_path(self, conn, tx_id, args, payload, events):
        try:
            domid = int(args[0])
        except ValueError:
            raise XenStoreError("EINVAL")
        return b"/local/domain/%d\0" % domid, None

    def _do_transaction_start(self, conn, tx_id, args, payload, events):
        if tx_id:
            raise XenStoreError("EBUSY")  # no nested transactions
        self._tx_ids = self._tx_ids % 0xFFFFFFFE + 1  # never 0
        tx = _Transaction(self._tx_ids, dict(self.nodes))
        conn.transactions[tx.tid] = tx
        return str(tx.tid).encode() + b"\0", None

    def _do_transaction_end(self, conn, tx_id, args, payload, events):
        tx = conn.transactions.get(tx_id)
        if tx is None:
            raise XenStoreError("ENOENT")
        if args[0] not in (b"T", b"F"):
            raise XenStoreError("EINVAL")
        del conn.transactions[tx_id]
        if args[0] == b"T":
            for path, gen in tx.accessed.items():
                node = self.nodes.get(path)
                if (node.gen if node is not None else None) != gen:
                    raise XenStoreError("EAGAIN")
            for path, node in tx.changes.items():
                if node is None:
                    self.nodes.pop(path, None)
                else:
                    self.nodes[path] = node
            events.extend(tx.events)
        return b"OK\0", None

    def _do_watch(self, conn, tx_id, args, payload, events):
        if len(args) < 2:
            raise XenStoreError("EINVAL")
        abspath, relbase = self._canon2(args[0], special=True)
        token = args[1]
        for w in self._watches:
            if w.conn is conn and w.wpath == args[0] and w.token == token:
                raise XenStoreError("EEXIST")
        watch = _Watch(conn, args[0], abspath, token, relbase)
        self._watches.append(watch)
        # Like xenstored, fire once right away (after the OK) so a client
        # can read the initial state from the event handler.
        return b"OK\0", lambda: self._send_event(watch, abspath)

    def _do_unwatch(self, conn, tx_id, args, payload, events):
        if len(args) < 2:
            raise XenStoreError("EINVAL")
        self._canon2(args[0], special=True)
        for w in self._watches:
            if w.conn is conn and w.wpath == args[0] and w.token == args[1]:
                self._watches.remove(w)
                return b"OK\0", None
        raise XenStoreError("ENOENT")

    def _do_reset_watches(self, conn, tx_id, args, payload, events):
        self._watches = [w for w in self._watches if w.conn is not conn]
        conn.transactions.clear()
        return b"OK\0", None

    def _domid_arg(self, args):
        try:
            return int(args[0])
        except ValueError:
            raise XenStoreError("EINVAL")

    def _do_introduce(self, conn, tx_id, args, payload, events):
        self._introduced.add(self._domid_arg(args))
        events.append(("@introduceDomain", False))
        return b"OK\0", None

    def _do_release(self, conn, tx_id, args, payload, events):
        self._introduced.discard(self._domid_arg(args))
        events.append(("@releaseDomain", False))
        return b"OK\0", None

    def _do_is_domain_introduced(self, conn, tx_id, args, payload, events):
        domid = self._domid_arg(args)
        yes = domid == self.domid or domid in self._introduced
        return (b"T\0" if yes else b"F\0"), None


def main(argv=None):
    """Command-line entry point; see the module docstring."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(
        prog="python3 -m tests.rigs.xenstored",
        description="Serve an in-memory XenStore on a Unix socket.")
    parser.add_argument("--socket", required=True, help="socket path")
    parser.add_argument("--domid", type=int, default=0,
                        help="own domain id for relative paths (default 0)")
    parser.add_argument("--set", action="append", default=[],
                        metavar="PATH=VALUE", help="initial node (repeatable)")
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds to wait before every reply")
    parser.add_argument("--deny", action="append", default=[], metavar="P",
                        help="answer EACCES for paths under P (repeatable)")
    parser.add_argument("--close-on", action="append", default=[],
                        metavar="P", help="drop the connection on requests "
                        "for paths under P (repeatable)")
    parser.add_argument("--drop-after", type=int, default=None, metavar="N",
                        help="close every connection after N replies")
    opts = parser.parse_args(argv)

    server = XenStored(opts.socket, domid=opts.domid, delay=opts.delay,
                       deny=opts.deny, close_on=opts.close_on,
                       drop_after=opts.drop_after)
    for item in opts.set:
        path, sep, value = item.partition("=")
        if not sep:
            parser.error("--set wants PATH=VALUE, got %r" % item)
        try:
            server.write(path, value)
        except ValueError as e:
            parser.error(str(e))

    done = threading.Event()

    def on_signal(signum, frame):
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    try:
        sys.stdout.write("ready %s\n" % opts.socket)
        sys.stdout.flush()
        while not done.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
