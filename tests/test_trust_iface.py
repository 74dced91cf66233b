"""The hotplug acts only on the interface netback made for the guest
(issue 17 §1): a ``vifname`` naming the uplink or the loopback, an uplink
that happens to carry a vif's name, an interface that merely took the
rename target's name: ``online`` refuses with one line and changes
nothing; ``offline`` never downs such a link and removes only what is ours.
Real namespaces, real packets: the netvm keeps reaching upstream."""

import pytest

from tests.rigs.netns import UdpSink, udp_send
from tests.test_reliability import xs_value

BOTH = pytest.mark.parametrize("world", ["iptables", "nft"], indirect=True)


def upstream_answers(world, tag="netvm-uplink"):
    """A datagram from the netvm's own uplink address reaches upstream."""
    with UdpSink(world.upstream, world.UPLINK_UPSTREAM, 7777) as sink:
        udp_send(world.netvm, world.UPLINK_UPSTREAM, 7777, tag, src=world.UPLINK_NETVM)
        return sink.got(tag, wait=1.5)


def guest_gone(world, guest):
    """What the toolstack shows when the guest's vif is gone (or was never
    made) but its backend directory is still there."""
    world.netvm.ip("link", "del", guest.vif)


@BOTH
@pytest.mark.parametrize("target", ["eth0", "lo"])
def test_vifname_of_a_host_interface_is_refused_and_offline_leaves_it(world, target):
    g = world.add_guest(3, ["10.137.0.12"], vifname=target)
    guest_gone(world, g)  # only the host's interface of that name is left
    assert upstream_answers(world)
    before = world.snapshot()
    res = world.hotplug(g, "online")
    assert res.returncode == 1
    assert f"refusing to configure {target} for {g.vif}" in res.stderr, res.stderr
    assert "nothing changed" in res.stderr
    assert target in (xs_value(world, g, "hotplug-error") or "")
    assert world.snapshot() == before
    res = world.hotplug(g, "offline")
    assert res.returncode == 0
    after = world.snapshot()
    assert after["links"] == before["links"] and after["addrs"] == before["addrs"]
    assert after["routes"] == before["routes"]
    assert upstream_answers(world)


@BOTH
def test_an_uplink_named_like_a_vif_is_refused(world):
    """Named vifD.N but in group 1 (Qubes' uplinks): not the guest's."""
    g = world.add_guest(7, ["10.137.0.17"])
    world.netvm.ip("link", "set", "dev", g.vif, "group", "1")
    before = world.snapshot()
    res = world.hotplug(g, "online")
    assert res.returncode == 1 and "group 1" in res.stderr, res.stderr
    assert world.snapshot() == before
    res = world.hotplug(g, "offline")
    assert res.returncode == 0
    assert world.snapshot()["links"] == before["links"]


def test_an_interface_holding_the_rename_target_is_not_taken_for_the_renamed_vif(world):
    """The vif is gone and an interface with the vifname's name exists, with
    no record of an earlier rename: not "already renamed"."""
    g = world.add_guest(5, ["10.137.0.15"], vifname="guest-web")
    guest_gone(world, g)
    world.netvm.ip("link", "add", "guest-web", "type", "veth", "peer", "name", "guest-web1")
    before = world.snapshot()
    res = world.hotplug(g, "online")
    assert res.returncode == 1 and "refusing to configure guest-web" in res.stderr, res.stderr
    assert world.snapshot() == before


@BOTH
def test_a_legitimate_rename_is_proven_by_its_record_on_every_rerun(world):
    g = world.add_guest(5, ["10.137.0.15"], vifname="guest-web")
    assert world.hotplug(g, "online").returncode == 0
    res = world.hotplug(g, "online")  # the vif is now guest-web: the record proves it
    assert res.returncode == 0, res.stderr
    assert "10.137.0.15" in world.netvm.ip("route", "show", "dev", "guest-web").stdout
    # a new interface under the same name is not the one recorded
    assert world.hotplug(g, "offline").returncode == 0
    assert "guest-web" not in world.netvm.ip("-o", "link", "show", "up").stdout
