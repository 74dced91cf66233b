"""vif_route_qubes.qubesdb against the real QubesDB daemon (built from
../shared/vendor, run local-only in a mount namespace of its own per test),
checked both ways with the daemon's own clients: what ours writes
qubesdb-read reads, what qubesdb-write writes ours reads."""


import pytest

from vif_route_qubes.errors import Failure
from vif_route_qubes.qubesdb import MAX_VALUE, QubesDB, answers


VALUES = {
    "/qubes-netvm-gateway": b"10.137.0.1",
    "/empty": b"",
    "/long": b"x" * MAX_VALUE,
    "/not-utf8": b"\xff\xfe\x80 bytes",
    "/mapped-ip/10.137.0.20/visible-ip": b"10.137.1.5",
    "/mapped-ip/10.137.0.20/visible-gateway": b"10.137.1.1",
}


def test_ours_reads_what_qubesdb_write_wrote(qdb):
    for path, value in VALUES.items():
        assert qdb.cli("qubesdb-write", path, value).returncode == 0, path
    with QubesDB(qdb.env()) as q:
        for path, value in VALUES.items():
            assert q.read(path) == value, path
        assert q.read("/missing") is None
        assert q.multiread("/mapped-ip/") == {p: v for p, v in VALUES.items() if p.startswith("/mapped-ip/")}
        assert q.multiread("/nothing-here/") == {}


def test_qubesdb_read_reads_what_ours_wrote(qdb):
    with QubesDB(qdb.env()) as q:
        for path, value in VALUES.items():
            q.write(path, value)
        q.rm("/empty")
        q.rm("/missing")  # absent: no error, as qubesdb-rm
    for path, value in VALUES.items():
        res = qdb.cli("qubesdb-read", "-r", path)
        if path == "/empty":
            assert res.returncode != 0  # removed
        else:
            assert res.returncode == 0 and res.stdout == value + b"\n", path  # -r: raw, one line each
    listed = qdb.cli("qubesdb-multiread", "-f", "-r", "/mapped-ip/").stdout
    assert b"/mapped-ip/10.137.0.20/visible-ip = 10.137.1.5" in listed


def test_one_connection_many_reads_and_bad_input(qdb):
    with QubesDB(qdb.env()) as q:
        q.write("/a", b"1")
        assert [q.read("/a") for _ in range(50)] == [b"1"] * 50
        with pytest.raises(Failure, match="not a valid path"):
            q.read("relative")
        with pytest.raises(Failure, match="not a valid path"):
            q.read("/" + "p" * 70)
        with pytest.raises(Failure, match="at most 3071 bytes, without NUL"):
            q.write("/a", b"x" * (MAX_VALUE + 1))
        with pytest.raises(Failure, match="without NUL"):
            q.write("/a", b"a\0b")
        assert q.read("/a") == b"1"  # the connection survives our refusals


def test_a_daemon_that_is_gone_is_a_clear_error(qdb):
    env = qdb.env()
    assert answers(env)
    q = QubesDB(env)
    qdb.stop()
    with pytest.raises(Failure, match="QubesDB: .*qubesdb.dom0.sock"):
        q.read("/a")
    q.close()
    assert not answers(env)
    with pytest.raises(Failure, match="cannot connect to"):
        QubesDB(env)


def test_watch_events_from_the_daemons_own_writer(qdb):
    """A watch on a path ending in '/' fires for qubesdb-write and
    qubesdb-rm under it, not for a sibling; no event is a None after the
    timeout; reads between events still answer (an event in between is
    skipped by the read, not taken for its answer); a daemon that goes is
    a clear error."""
    import time

    with QubesDB(qdb.env()) as q:
        q.watch("/mapped-ip/10.138.0.9/")
        t0 = time.monotonic()
        assert q.event(0.2) is None
        assert 0.15 < time.monotonic() - t0 < 2
        assert qdb.cli("qubesdb-write", "/mapped-ip/10.138.0.90/visible-ip", "1.2.3.4").returncode == 0
        assert qdb.cli("qubesdb-write", "/mapped-ip/10.138.0.9/visible-ip", "10.137.0.5").returncode == 0
        assert q.event(5) == "/mapped-ip/10.138.0.9/visible-ip"
        assert q.event(0.2) is None  # the sibling fired nothing
        assert qdb.cli("qubesdb-write", "/mapped-ip/10.138.0.9/visible-gateway", "10.137.0.1").returncode == 0
        time.sleep(0.2)  # the event is queued before the read's answer
        assert q.read("/mapped-ip/10.138.0.9/visible-gateway") == b"10.137.0.1"
        assert qdb.cli("qubesdb-rm", "/mapped-ip/10.138.0.9/visible-ip").returncode == 0
        assert q.event(5) == "/mapped-ip/10.138.0.9/visible-ip"
        qdb.stop()
        with pytest.raises(Failure, match="QubesDB: .*closed the connection|QubesDB: .*qubesdb.dom0.sock"):
            q.event(5)
