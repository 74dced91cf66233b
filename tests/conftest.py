"""Shared fixtures: a XenStore server speaking the real wire protocol, and
the network-namespace world (vif_route_qubes.testing.netns) around it."""

import os

import pytest

from vif_route_qubes.testing.netns import World
from vif_route_qubes.testing.xenstored import XenStored


@pytest.fixture
def xenstored(tmp_path):
    server = XenStored(str(tmp_path / "xenstored.sock"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def world(xenstored, tmp_path):
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (network namespaces, iptables)")
    w = World(xenstored, tmp_path)
    try:
        yield w
    finally:
        w.close()


def pytest_collection_modifyitems(config, items):
    # The real-Xen end-to-end run is the slowest; it goes last, after
    # everything it builds on has been shown to work.
    items.sort(key=lambda item: "tests/e2e/" in str(item.fspath).replace(os.sep, "/"))
