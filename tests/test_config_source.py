"""The configuration source seam (issue 18 §1) with the real QubesDB daemon
and the real commands in namespaces: a netvm of today's Qubes has its
values in QubesDB and none in XenStore; the design document's netvm has them
in XenStore. The backend directory is XenStore's in both."""

from tests.test_vif_route import reaches_upstream

QDB_GATEWAY = "10.137.0.254"


def addrs(world, vif):
    return world.netvm.ip("-o", "addr", "show", "dev", vif).stdout


def test_auto_takes_qubesdb_where_it_answers(world, qdb):
    world.xs.rm("/local/domain/0/qubes_netvm_gateway")  # nothing of Qubes in XenStore
    assert qdb.cli("qubesdb-write", "/qubes-netvm-gateway", QDB_GATEWAY).returncode == 0
    assert qdb.cli("qubesdb-write", "/qubes-service/harden-network-interfaces", "1").returncode == 0
    g = world.add_guest(3, ["10.137.0.12"])
    dry = world.hotplug(g, "online", "--dry-run", env=qdb.env(g.env()))
    assert dry.returncode == 0 and f"configuration: qubesdb (auto: QubesDB answers on {qdb.socket})" in dry.stdout
    res = world.hotplug(g, "online", env=qdb.env(g.env()))
    assert res.returncode == 0, res.stderr
    assert f"{QDB_GATEWAY}/32" in addrs(world, g.vif)
    assert world.netvm.read(f"/proc/sys/net/ipv6/conf/{g.vif}/accept_ra").strip() == "0"  # the service
    g.configure(gateway=QDB_GATEWAY)
    ok, _ = reaches_upstream(world, g, "10.137.0.12", "qubesdb-scheme")
    assert ok
    assert world.hotplug(g, "offline", env=qdb.env(g.env())).returncode == 0


def test_xenstore_when_asked_or_without_qubesdb(world, qdb):
    assert qdb.cli("qubesdb-write", "/qubes-netvm-gateway", QDB_GATEWAY).returncode == 0
    g = world.add_guest(3, ["10.137.0.12"])
    env = qdb.env(g.env(VIF_ROUTE_QUBES_CONFIG="xenstore"))
    res = world.hotplug(g, "online", env=env)
    assert res.returncode == 0, res.stderr
    assert "10.137.0.1/32" in addrs(world, g.vif) and QDB_GATEWAY not in addrs(world, g.vif)
    g.configure()
    ok, _ = reaches_upstream(world, g, "10.137.0.12", "xenstore-scheme")
    assert ok
    # no daemon at all: auto is XenStore
    qdb.stop()
    dry = world.hotplug(g, "online", "--dry-run", env=qdb.env(g.env()))
    assert "configuration: xenstore (auto: no QubesDB on" in dry.stdout


def test_bad_values_from_qubesdb_are_refused_naming_the_key(world, qdb):
    assert qdb.cli("qubesdb-write", "/qubes-netvm-gateway", "10.137.0.1; reboot").returncode == 0
    g = world.add_guest(3, ["10.137.0.12"])
    before = world.snapshot()
    res = world.hotplug(g, "online", env=qdb.env(g.env()))
    assert res.returncode == 1 and "QubesDB /qubes-netvm-gateway" in res.stderr, res.stderr
    assert world.snapshot() == before
    res = world.hotplug(g, "online", env=qdb.env(g.env(VIF_ROUTE_QUBES_CONFIG="bogus")))
    assert res.returncode == 1 and "VIF_ROUTE_QUBES_CONFIG='bogus'" in res.stderr


def test_status_judges_the_gateways_from_qubesdb(world, qdb):
    """On a netvm of today's Qubes, status reads the gateways where online
    read them: a clean online is clean, and QubesDB's change is named."""
    world.xs.rm("/local/domain/0/qubes_netvm_gateway")
    assert qdb.cli("qubesdb-write", "/qubes-netvm-gateway", QDB_GATEWAY).returncode == 0
    g = world.add_guest(3, ["10.137.0.12"])
    env = qdb.env(g.env())
    assert world.hotplug(g, "online", env=env).returncode == 0
    from tests.rigs.netns import _script

    status = lambda: world.netvm.exec([_script("vif-route-qubes"), "status", "--problems", g.vif],  # noqa: E731
                                      check=False, env=env)
    res = status()
    assert res.returncode == 0, res.stdout
    assert f"# configuration: qubesdb (auto: QubesDB answers on {qdb.socket})" in res.stdout
    assert qdb.cli("qubesdb-write", "/qubes-netvm-gateway", "10.137.0.253").returncode == 0
    res = status()
    assert res.returncode == 1 and "10.137.0.253" in res.stdout and "changed after online ran" in res.stdout, res.stdout
