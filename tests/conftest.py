"""Shared fixtures: a XenStore server speaking the real wire protocol, and
the network-namespace world (tests.rigs.netns) around it."""

import os
import shutil
import tempfile

import pytest

from tests.rigs.netns import World
from tests.rigs.xenstored import XenStored


@pytest.fixture
def sockdir():
    """A short directory for Unix sockets: pytest's tmp_path can exceed the
    107-byte AF_UNIX path limit under a long base directory."""
    d = tempfile.mkdtemp(prefix="vrq", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def xenstored(sockdir):
    server = XenStored(os.path.join(sockdir, "xenstored.sock"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def world(request, xenstored, tmp_path):
    """The netvm world; its commands use the iptables firewall backend
    unless a test asks for another with
    ``@pytest.mark.parametrize("world", [...], indirect=True)``."""
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (network namespaces, iptables)")
    w = World(xenstored, tmp_path, firewall=getattr(request, "param", "iptables"))
    try:
        yield w
    finally:
        w.close()


def pytest_collection_modifyitems(config, items):
    # The real-Xen end-to-end run is the slowest; it goes last, after
    # everything it builds on has been shown to work.
    items.sort(key=lambda item: "tests/e2e/" in str(item.fspath).replace(os.sep, "/"))


@pytest.fixture
def qdb():
    """The real QubesDB daemon, local-only, in a mount namespace of its own
    (tests/rigs/qubesdb.py)."""
    from tests.rigs.qubesdb import Daemon

    if os.geteuid() != 0:
        pytest.fail("these tests need root (a mount namespace for the QubesDB daemon)")
    with Daemon() as d:
        yield d

