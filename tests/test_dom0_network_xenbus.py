"""XenStore over the kernel's /dev/xen/xenbus (a driver domain, a guest):
one request at a time. Found by the e2e netvm: Linux keeps a queued
request's body in the device file's single message buffer, so a second
request written before the first is answered can mangle it (xenstored
answered EINVAL to our hotplug script and to qubes-setup-ip). Over the
daemon's socket (dom0) the reads stay pipelined.

The wire-protocol server checks, while answering each request, whether the
client has already written the next one."""

import select
import time

import pytest
from pyxs.connection import UnixSocketConnection, XenBusConnection

from vif_route_qubes import xs as xsmod
from tests.rigs.xenstored import XenStored


class _BusLike(UnixSocketConnection, XenBusConnection):
    """A socket connection that the XenStore class takes for the xenbus device."""


@pytest.fixture
def server(sockdir):
    s = XenStored(f"{sockdir}/xs.sock")
    seen = []
    inner = s._handle

    def handle(conn, op, rq_id, tx_id, payload):
        time.sleep(0.05)  # give a pipelining client time to write the next request
        ready, _, _ = select.select([conn.sock], [], [], 0)
        seen.append(bool(ready))
        return inner(conn, op, rq_id, tx_id, payload)

    s._handle = handle
    s.seen = seen
    s.start()
    for i in range(5):
        s.write(f"/k/{i}", str(i))
    try:
        yield s
    finally:
        s.stop()


def _store(server, monkeypatch, bus):
    cls = _BusLike if bus else UnixSocketConnection
    monkeypatch.setattr(xsmod, "_connection", lambda env: (cls(server.socket_path), ""))  # (connection, places tried)
    return xsmod.XenStore(env={}, timeout=5)


@pytest.mark.parametrize("bus", [True, False])
def test_reads_and_writes(server, monkeypatch, bus):
    store = _store(server, monkeypatch, bus)
    try:
        got = store.read_many([f"/k/{i}" for i in range(5)] + ["/k/none"])
        assert got == {**{f"/k/{i}": str(i) for i in range(5)}, "/k/none": None}
        store.write_many([(f"/w/{i}", f"v{i}") for i in range(4)])
        assert [server.read(f"/w/{i}") for i in range(4)] == [b"v0", b"v1", b"v2", b"v3"]
    finally:
        store.close()
    if bus:
        assert server.seen and not any(server.seen), "a request was written before the previous reply"
    else:
        assert any(server.seen), "the socket path should stay pipelined (one round trip)"
