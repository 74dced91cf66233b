"""qubes-setup-ip: pure plan/render tests, CLI tests (click's CliRunner
against a real XenStore server), and integration runs of the installed
console script inside throwaway network namespaces."""

import ipaddress
import os
import stat
import subprocess
import sys
import uuid

import pytest
from click.testing import CliRunner

from vif_route_qubes import setup_ip as S
from vif_route_qubes.errors import Failure
from tests.rigs.netns import Netns
from tests.rigs.xenstored import XenStored

GUEST_DOMID = 12
SCRIPT = os.path.join(os.path.dirname(sys.executable), "qubes-setup-ip")

GOOD = {
    "qubes_ip": "10.137.0.12",
    "qubes_netmask": "255.255.255.255",
    "qubes_gateway": "10.137.0.1",
    "qubes_primary_dns": "10.139.1.1",
    "qubes_secondary_dns": "10.139.1.2",
}
V6 = {"qubes_ip6": "fd09:24ef:4179::a89:c", "qubes_gateway6": "fd09:24ef:4179::a89:1"}


def values(**over):
    v = dict.fromkeys(S.KEYS)
    v.update(GOOD)
    v.update(over)
    return v


# ----------------------------------------------------------------------------
# Plan: netmask, validation, rendering


@pytest.mark.parametrize("mask,prefix", [
    ("255.255.255.255", 32), ("255.255.255.254", 31), ("255.255.255.0", 24),
    ("255.255.0.0", 16), ("255.128.0.0", 9), ("128.0.0.0", 1), (" 255.255.255.0 ", 24),
])
def test_netmask_prefix(mask, prefix):
    assert S.netmask_prefix(mask) == prefix


@pytest.mark.parametrize("mask,reason", [
    ("255.0.255.0", "not a contiguous netmask"),
    ("255.255.255.1", "not a contiguous netmask"),
    ("0.255.255.255", "not a contiguous netmask"),
    ("0.0.0.0", "every address"),
    ("24", "not a dotted netmask"),
    ("/24", "not a dotted netmask"),
    ("255.255.255", "not a dotted netmask"),
    ("256.255.255.0", "not a dotted netmask"),
    ("255.255.255.0/24", "not a dotted netmask"),
    ("ffff:ffff::", "not a dotted netmask"),
    ("", "not a dotted netmask"),
])
def test_netmask_refused(mask, reason):
    with pytest.raises(Failure, match=reason) as exc:
        S.netmask_prefix(mask)
    assert "qubes_netmask" in str(exc.value) and "\n" not in str(exc.value)


def test_guest_net_typical():
    net = S.guest_net(values())
    assert net == S.GuestNet(
        ip=ipaddress.ip_address("10.137.0.12"), prefix=32, gateway=ipaddress.ip_address("10.137.0.1"),
        dns=(ipaddress.ip_address("10.139.1.1"), ipaddress.ip_address("10.139.1.2")))


def test_guest_net_defaults():
    net = S.guest_net(values(qubes_netmask=None, qubes_primary_dns=None, qubes_secondary_dns=None))
    assert net.prefix == 32
    assert net.dns == (ipaddress.ip_address("10.137.0.1"),)  # DNS1 defaults to the gateway
    same = S.guest_net(values(qubes_secondary_dns="10.139.1.1"))
    assert [str(a) for a in same.dns] == ["10.139.1.1"]  # not listed twice


@pytest.mark.parametrize("absent", [None, "", "  "])
def test_guest_net_without_ip_is_nothing_to_do(absent):
    assert S.guest_net(values(qubes_ip=absent)) is None


@pytest.mark.parametrize("over,reason", [
    ({"qubes_ip": "10.137.0.300"}, "qubes_ip: '10.137.0.300' is not an IP address"),
    ({"qubes_ip": "10.137.0.12 10.137.0.13"}, "qubes_ip"),
    ({"qubes_ip": "fd00::1"}, "qubes_ip: fd00::1 is not an IPv4 address"),
    ({"qubes_ip": "127.0.0.1"}, "loopback"),
    ({"qubes_ip": "224.0.0.5"}, "multicast"),
    ({"qubes_ip": "10.137.0.0", "qubes_netmask": "255.255.255.0"}, "network or broadcast"),
    ({"qubes_ip": "10.137.0.255", "qubes_netmask": "255.255.255.0"}, "network or broadcast"),
    ({"qubes_gateway": "10.137.0.12"}, "the guest's own address"),
    ({"qubes_gateway": "gw"}, "qubes_gateway"),
    ({"qubes_primary_dns": "10.139.1.1; rm -rf /"}, "qubes_primary_dns"),
    ({"qubes_secondary_dns": "10.139.1.2 10.139.1.3"}, "more than one address"),
    ({"qubes_ip6": "10.1.1.1"}, "qubes_ip6: 10.1.1.1 is not an IPv6 address"),
    ({"qubes_gateway6": "fd00::1"}, "qubes_gateway6 is set but qubes_ip6 is not"),
])
def test_guest_net_refuses(over, reason):
    with pytest.raises(Failure) as exc:
        S.guest_net(values(**over))
    assert reason in str(exc.value)
    assert "\n" not in str(exc.value)


def test_render_batch_golden():
    net = S.guest_net(values())
    assert "".join(line + "\n" for line in S.render_batch(net, "eth0")) == (
        "addr replace 10.137.0.12/32 dev eth0\n"
        "link set dev eth0 up group 1\n"
        "neigh replace 10.137.0.1 lladdr fe:ff:ff:ff:ff:ff nud permanent dev eth0\n"
        "route replace 10.137.0.1/32 dev eth0 scope link\n"
        "route replace default via 10.137.0.1 dev eth0 onlink\n"
    )


def test_render_batch_golden_ipv6_and_stale():
    net = S.guest_net(values(qubes_netmask="255.255.255.0", **V6))
    lines = S.render_batch(net, "eth1", ipv6=True, stale=("10.137.0.5/32",))
    assert lines == [
        "addr replace 10.137.0.12/24 dev eth1",
        "addr replace fd09:24ef:4179::a89:c/128 dev eth1 nodad",
        "addr del 10.137.0.5/32 dev eth1",
        "link set dev eth1 up group 1",
        "neigh replace 10.137.0.1 lladdr fe:ff:ff:ff:ff:ff nud permanent dev eth1",
        "neigh replace fd09:24ef:4179::a89:1 lladdr fe:ff:ff:ff:ff:ff nud permanent dev eth1",
        "route replace 10.137.0.1/32 dev eth1 scope link",
        "route replace default via 10.137.0.1 dev eth1 onlink",
        "route replace fd09:24ef:4179::a89:1/128 dev eth1",
        "route replace ::/0 via fd09:24ef:4179::a89:1 dev eth1 onlink",
    ]
    # IPv6 disabled on the interface: nothing IPv6 is attempted
    assert not any("fd09:" in line or "::/0" in line for line in S.render_batch(net, "eth1", ipv6=False))


def test_render_batch_without_gateway():
    net = S.guest_net(values(qubes_gateway=None))
    assert S.render_batch(net, "eth0") == ["addr replace 10.137.0.12/32 dev eth0", "link set dev eth0 up group 1"]


def test_render_resolv_golden():
    assert S.render_resolv(S.guest_net(values())) == (
        "# Written by qubes-setup-ip from XenStore (qubes_primary_dns, qubes_secondary_dns).\n"
        "nameserver 10.139.1.1\n"
        "nameserver 10.139.1.2\n"
    )


PROC_ROUTE = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0100890A\t0007\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0100890A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
eth1\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
"""
PROC_ROUTE6 = (
    "fd0924ef417900000000000000000a89 80 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000400 00000001 00000000 00000001     eth0\n"
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "fd0924ef417900000000000000000a89 00000400 00000001 00000000 00000003     eth0\n"
)


def test_proc_route_parsing_and_in_place():
    r4 = S._routes4(PROC_ROUTE, "eth0")
    gw, any4 = ipaddress.ip_address("10.137.0.1"), ipaddress.ip_address("0.0.0.0")
    assert r4 == {(any4, any4, gw, 0), (gw, ipaddress.ip_address("255.255.255.255"), any4, 0)}
    r6 = S._routes6(PROC_ROUTE6, "eth0")
    gw6 = ipaddress.ip_address("fd09:24ef:4179::a89")
    assert (gw6, 128, ipaddress.ip_address("::"), 1024) in r6
    net = S.guest_net(values())
    pinned = frozenset({(gw, S.GATEWAY_MAC)})
    cur = S.Current(up=True, addresses=("10.137.0.12/32",), routes4=r4, routes6=r6, group="1", neighbours=pinned)
    assert S.in_place(net, cur, True)
    assert not S.in_place(net, cur._replace(up=False), True)  # link down
    assert not S.in_place(net, cur._replace(addresses=("10.137.0.12/24",)), True)  # other prefix
    assert not S.in_place(net, cur._replace(group="0"), True)  # not in the uplink group
    assert not S.in_place(net, cur._replace(neighbours=frozenset()), True)  # gateway MAC not pinned
    assert not S.in_place(net, cur._replace(neighbours=frozenset({(gw, "00:16:3e:00:00:01")})), True)
    other = ipaddress.ip_address("10.137.0.99")
    stale_pin = pinned | {(other, S.GATEWAY_MAC)}
    assert not S.in_place(net, cur._replace(neighbours=stale_pin), True)  # an old gateway's pin
    assert S.stale_neighbours(net, cur._replace(neighbours=stale_pin), True) == (other,)
    # ... and its host route, known as ours by that pin
    old_route = r4 | {(other, ipaddress.ip_address("255.255.255.255"), any4, 0)}
    assert S.stale_routes(net, cur._replace(neighbours=stale_pin, routes4=old_route), True) == ("10.137.0.99/32",)
    assert S.stale_routes(net, cur._replace(routes4=old_route), True) == ()  # not pinned: not known as ours
    # someone else's permanent entry (another MAC) is not ours to remove
    assert S.in_place(net, cur._replace(neighbours=pinned | {(other, "00:16:3e:00:00:01")}), True)
    unpinned = net._replace(gateway_mac=None)
    assert not S.in_place(unpinned, cur, True) and S.stale_neighbours(unpinned, cur, True) == (gw,)
    assert S.in_place(unpinned, cur._replace(neighbours=frozenset()), True)
    assert S.stale_addresses(net, cur._replace(addresses=("10.137.0.12/24", "10.137.0.12/32")), True) == (
        "10.137.0.12/24",)
    assert not S.in_place(net, cur._replace(routes4=S._routes4(PROC_ROUTE, "eth1")), True)
    # disable-default-route: the default route is what is stale now
    noroute = S.guest_net(values(**{"disable-default-route": "1"}))
    assert not S.in_place(noroute, cur, True)
    assert S.stale_routes(noroute, cur, True) == ("default via 10.137.0.1",)
    host_only = frozenset(r for r in r4 if r[0] != ipaddress.ip_address("0.0.0.0"))
    assert S.in_place(noroute, cur._replace(routes4=host_only), True)
    net6 = S.guest_net(values(qubes_ip6="fd09:24ef:4179::a89:c", qubes_gateway6="fd09:24ef:4179::a89"))
    both = ("10.137.0.12/32", "fd09:24ef:4179::a89:c/128")
    pinned6 = pinned | {(gw6, S.GATEWAY_MAC)}
    cur6 = cur._replace(addresses=both, neighbours=pinned6)
    assert S.in_place(net6, cur6, True)
    assert not S.in_place(net6, cur6._replace(routes6=frozenset()), True)
    assert not S.in_place(net6, cur6._replace(neighbours=pinned), True)  # IPv6 gateway not pinned
    # with IPv6 disabled the IPv6 half is not wanted, and its address is stale
    assert S.stale_addresses(net6, cur6, False) == ("fd09:24ef:4179::a89:c/128",)


def test_probe_output_parsing():
    """``ip -j -batch`` prints one JSON array per command, back to back."""
    text = ('[{"ifname":"eth0","flags":["BROADCAST","UP"],"group":"1","addr_info":['
            '{"family":"inet","local":"10.137.0.12","prefixlen":32,"scope":"global"},'
            '{"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"},'
            '{"family":"inet6","local":"2001:db8::5","prefixlen":64,"scope":"global","dynamic":true}]}]\n'
            '[{"dst":"10.137.0.1","lladdr":"fe:ff:ff:ff:ff:ff","state":["PERMANENT"]},'
            '{"dst":"10.137.0.7","state":["FAILED"]}]\n')

    class Done:
        def wait(self):
            return type("R", (), {"stdout": text})()

    cur = S.probe_result(Done(), "eth0")
    assert cur.up and cur.group == "1" and cur.addresses == ("10.137.0.12/32",)
    assert cur.neighbours == {(ipaddress.ip_address("10.137.0.1"), "fe:ff:ff:ff:ff:ff")}


@pytest.mark.parametrize("over,reason", [
    ({"disable-default-route": "maybe"}, "disable-default-route: 'maybe' is not a switch value"),
    ({"disable-dns-server": "2"}, "disable-dns-server: '2' is not a switch value"),
    ({"qubes_primary_dns6": "10.139.1.1", **V6}, "qubes_primary_dns6: 10.139.1.1 is not an IPv6 address"),
    ({"qubes_secondary_dns6": "fd00::1 fd00::2", **V6}, "more than one address"),
    ({"qubes_primary_dns6": "nameserver"}, "qubes_primary_dns6"),  # checked even without qubes_ip6
    ({"qubes_gateway6": "fd09:24ef:4179::a89:c", "qubes_ip6": "fd09:24ef:4179::a89:c"}, "own address"),
])
def test_guest_net_refuses_new_keys(over, reason):
    with pytest.raises(Failure) as exc:
        S.guest_net(values(**over))
    assert reason in str(exc.value) and "\n" not in str(exc.value)


def test_switches_and_dns6_plan():
    dns6 = {"qubes_primary_dns6": "fd09:24ef:4179::a89:53", "qubes_secondary_dns6": "fd09:24ef:4179::a89:54"}
    net = S.guest_net(values(**V6, **dns6))
    assert [str(a) for a in S.nameservers(net)] == [
        "10.139.1.1", "10.139.1.2", "fd09:24ef:4179::a89:53", "fd09:24ef:4179::a89:54"]
    assert S.render_resolv(net).splitlines()[1:] == [
        "nameserver 10.139.1.1", "nameserver 10.139.1.2",
        "nameserver fd09:24ef:4179::a89:53", "nameserver fd09:24ef:4179::a89:54"]
    assert S.resolvectl_argv(net, "eth0") == [
        "resolvectl", "dns", "eth0", "10.139.1.1", "10.139.1.2", "fd09:24ef:4179::a89:53", "fd09:24ef:4179::a89:54"]
    # without an IPv6 address of its own the guest cannot reach IPv6 nameservers
    assert S.guest_net(values(**dns6)).dns6 == ()
    assert S.without_ipv6(net).dns6 == () and S.without_ipv6(net).ip6 is None
    for on in ("1", "true", "yes", " ON "):
        off_dns = S.guest_net(values(**V6, **dns6, **{"disable-dns-server": on}))
        assert off_dns.configure_dns is False and S.nameservers(off_dns) == ()
    for off in ("0", "", "no", None):
        assert S.guest_net(values(**{"disable-dns-server": off})).configure_dns is True
    noroute = S.guest_net(values(**V6, **{"disable-default-route": "1"}))
    lines = S.render_batch(noroute, "eth0")
    assert "route replace 10.137.0.1/32 dev eth0 scope link" in lines
    assert "route replace fd09:24ef:4179::a89:1/128 dev eth0" in lines
    assert not any("default" in line or "::/0" in line for line in lines)
    assert S.render_batch(noroute, "eth0", stale_routes=("default via 10.137.0.1",))[-3] == (
        "route del default via 10.137.0.1 dev eth0")
    nopin = S.guest_net(values(**{"disable-gateway-mac-pin": "1"}))
    assert nopin.gateway_mac is None
    assert not any(line.startswith("neigh replace") for line in S.render_batch(nopin, "eth0"))
    assert "neigh del 10.137.0.1 dev eth0" in S.render_batch(nopin, "eth0", stale_neigh=("10.137.0.1",))


def test_render_remove_golden():
    assert S.render_remove("eth0") == [
        "link set dev eth0 down group 0",
        "addr flush dev eth0 scope global",
        "neigh flush dev eth0 nud permanent",
        "route flush dev eth0 table all",
    ]


@pytest.mark.parametrize("words,expected", [
    ([], ("add", None)), (["eth1"], ("add", "eth1")), (["add"], ("add", None)),
    (["remove"], ("remove", None)), (["remove", "eth1"], ("remove", "eth1")), (["add", "eth2"], ("add", "eth2")),
])
def test_split_words(words, expected):
    assert S.split_words(words) == expected


# ----------------------------------------------------------------------------
# Fixtures: a XenStore per test (relative keys resolve to the guest's home)
# and a namespace with a veth "eth0" whose peer is up.


@pytest.fixture
def xenstored(sockdir):
    server = XenStored(os.path.join(sockdir, "xs.sock"), domid=GUEST_DOMID).start()
    try:
        yield server
    finally:
        server.stop()


def put(server, **keys):
    for key, value in keys.items():
        if value is None:
            server.rm(f"/local/domain/{GUEST_DOMID}/{key}")
        else:
            server.write(f"/local/domain/{GUEST_DOMID}/{key}", value)


@pytest.fixture
def env(xenstored, tmp_path):
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "XENSTORED_PATH": xenstored.socket_path,
        "VIF_ROUTE_QUBES_SYSLOG": str(tmp_path / "no-syslog"),
        "VIF_ROUTE_QUBES_HOTPLUG_LOG": str(tmp_path / "no-such-dir" / "xen-hotplug.log"),
        "VIF_ROUTE_QUBES_XS_TIMEOUT": "5",
        "QUBES_SETUP_IP_HOOK": "",
    }


@pytest.fixture
def guest():
    ns = Netns(f"sip{uuid.uuid4().hex[:8]}")
    try:
        ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        ns.ip("link", "set", "peer0", "up")
        yield ns
    finally:
        ns.delete()


def snapshot(ns):
    return {
        "links": ns.ip("-o", "link", "show").stdout,
        "addrs": ns.ip("-o", "addr", "show").stdout,
        "routes": ns.ip("route", "show", "table", "all").stdout,
        "routes6": ns.ip("-6", "route", "show", "table", "all").stdout,
    }


def setup_ip(ns, env, *args):
    return ns.exec([SCRIPT, *args], env=env, check=False)


# ----------------------------------------------------------------------------
# CLI


def test_help_lists_environment_and_keys():
    res = CliRunner().invoke(S.command(), ["--help"])
    assert res.exit_code == 0
    for word in ("INTERFACE", "XENSTORED_PATH", "QUBES_SETUP_IP_RESOLV_CONF", "QUBES_SETUP_IP_HOOK",
                 "--dry-run", "--resolv-conf", "--hook", "-v", *S.KEYS):
        assert word in res.output, word


def _invoke(env, args):
    return CliRunner().invoke(S.command(), args, env=env)


def test_cli_no_qubes_ip_is_nothing_to_do(xenstored, env, tmp_path):
    resolv = tmp_path / "resolv.conf"
    res = _invoke(env, ["-v", "--resolv-conf", str(resolv), "eth0"])
    assert res.exit_code == 0, res.output
    assert "no qubes_ip in XenStore, nothing to configure" in res.stderr
    assert not resolv.exists()


@pytest.mark.parametrize("args,over,reason", [
    (["eth0; reboot"], {}, "interface: 'eth0; reboot' is not a valid interface name"),
    (["a" * 16], {}, "is not a valid interface name"),
    (["eth0"], {"qubes_ip": "10.137.0.999"}, "qubes_ip: '10.137.0.999' is not an IP address"),
    (["eth0"], {"qubes_netmask": "255.0.255.0"}, "qubes_netmask: 255.0.255.0 is not a contiguous netmask"),
    (["no-such-if0"], {}, "interface no-such-if0 does not exist"),
])
def test_cli_bad_input_is_one_line_exit_1(xenstored, env, tmp_path, args, over, reason):
    put(xenstored, **{**GOOD, **over})
    resolv = tmp_path / "resolv.conf"
    res = _invoke(env, ["--resolv-conf", str(resolv), *args])
    assert res.exit_code == 1
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("qubes-setup-ip: ")
    assert reason in res.stderr
    assert res.stdout == ""
    assert not resolv.exists()


def test_cli_xenstore_unreachable(env, sockdir, tmp_path):
    env = dict(env, XENSTORED_PATH=os.path.join(sockdir, "nobody-home"))
    res = _invoke(env, ["--resolv-conf", str(tmp_path / "r"), "eth0"])
    assert res.exit_code == 1
    assert res.stderr.startswith("qubes-setup-ip: XenStore: cannot connect to") and res.stderr.count("\n") == 1


def test_plain_call_skips_click(xenstored, env):
    """udev's call (one interface word) must not pay for importing click."""
    code = ("import sys\nfrom vif_route_qubes import setup_ip\n"
            "try:\n    setup_ip.main(['eth0'])\nexcept SystemExit as e:\n"
            "    print(e.code, 'click' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.stdout.split() == ["0", "False"], res.stderr


# ----------------------------------------------------------------------------
# Integration: real ip in a namespace


def test_configures_address_routes_and_resolv_conf(xenstored, env, guest, tmp_path):
    put(xenstored, **GOOD)
    resolv = tmp_path / "etc" / "resolv.conf"
    resolv.parent.mkdir()
    res = setup_ip(guest, env, "--resolv-conf", str(resolv), "eth0")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    addrs = guest.ip("-o", "-4", "addr", "show", "dev", "eth0").stdout
    assert "inet 10.137.0.12/32 scope global eth0" in addrs
    assert ",UP," in guest.ip("-o", "link", "show", "dev", "eth0").stdout
    routes = guest.ip("route", "show").stdout.splitlines()
    assert "default via 10.137.0.1 dev eth0 onlink " in [r for r in routes if r.startswith("default")][0] + " "
    assert any(r.startswith("10.137.0.1 dev eth0 scope link") for r in routes)
    assert guest.ip("route", "get", "192.0.2.7").stdout.startswith("192.0.2.7 via 10.137.0.1 dev eth0 src 10.137.0.12")
    assert resolv.read_text() == S.render_resolv(S.guest_net(values()))
    assert stat.S_IMODE(resolv.stat().st_mode) == 0o644
    assert os.listdir(resolv.parent) == ["resolv.conf"]  # no temporary file left


def test_interface_from_environment_and_netmask(xenstored, env, guest, tmp_path):
    put(xenstored, **dict(GOOD, qubes_netmask="255.255.255.0"))
    res = setup_ip(guest, dict(env, INTERFACE="eth0", QUBES_SETUP_IP_RESOLV_CONF=str(tmp_path / "r")))
    assert res.returncode == 0, res.stderr
    assert "inet 10.137.0.12/24 " in guest.ip("-o", "addr", "show", "dev", "eth0").stdout
    assert (tmp_path / "r").read_text().endswith("nameserver 10.139.1.1\nnameserver 10.139.1.2\n")


def test_ipv6(xenstored, env, guest, tmp_path):
    put(xenstored, **GOOD, **V6)
    res = setup_ip(guest, env, "--resolv-conf", str(tmp_path / "r"))
    assert res.returncode == 0, res.stderr
    assert "inet6 fd09:24ef:4179::a89:c/128 scope global nodad" in guest.ip("-o", "addr", "show").stdout
    r6 = guest.ip("-6", "route", "show").stdout
    assert "fd09:24ef:4179::a89:1 dev eth0" in r6
    assert "default via fd09:24ef:4179::a89:1 dev eth0" in r6
    before = snapshot(guest)
    assert setup_ip(guest, env, "-v", "--resolv-conf", str(tmp_path / "r")).stderr.count("unchanged") == 1
    assert snapshot(guest) == before


def test_rerun_is_harmless(xenstored, env, guest, tmp_path):
    put(xenstored, **GOOD)
    resolv = tmp_path / "resolv.conf"
    assert setup_ip(guest, env, "--resolv-conf", str(resolv)).returncode == 0
    before, inode = snapshot(guest), resolv.stat().st_ino
    res = setup_ip(guest, env, "-v", "--resolv-conf", str(resolv))
    assert res.returncode == 0, res.stderr
    assert "eth0: unchanged (10.137.0.12/32 via 10.137.0.1)" in res.stderr
    assert "ip -batch" not in res.stderr  # nothing to apply: only the read-only probe ran
    assert snapshot(guest) == before
    assert resolv.stat().st_ino == inode  # not rewritten


def test_dry_run_changes_nothing_and_prints_the_plan(xenstored, env, guest, tmp_path):
    put(xenstored, **GOOD)
    resolv = tmp_path / "resolv.conf"
    before = snapshot(guest)
    res = setup_ip(guest, env, "--dry-run", "--resolv-conf", str(resolv), "eth0")
    assert res.returncode == 0, res.stderr
    assert snapshot(guest) == before
    assert not resolv.exists() and os.listdir(tmp_path) == []
    net = S.guest_net(values())
    batch = "".join(line + "\n" for line in S.render_batch(net, "eth0"))
    assert f"$ ip -batch - <<'EOF'\n{batch}EOF\n" in res.stdout
    assert f"$ write {resolv} (temporary file + rename) <<'EOF'\n{S.render_resolv(net)}EOF\n" in res.stdout


@pytest.mark.parametrize("args,over,reason", [
    ([], {"qubes_ip": "10.137.0.256"}, "qubes_ip: '10.137.0.256' is not an IP address"),
    ([], {"qubes_ip": "10.137.0.12\n10.0.0.1"}, "qubes_ip"),
    ([], {"qubes_netmask": "255.255.0.255"}, "is not a contiguous netmask"),
    ([], {"qubes_netmask": "0.0.0.0"}, "every address"),
    ([], {"qubes_gateway": "10.137.0.1.1"}, "qubes_gateway"),
    (["eth0/../lo"], {}, "is not a valid interface name"),
    (["-v", "eth1"], {}, "interface eth1 does not exist"),
])
def test_bad_values_change_nothing(xenstored, env, guest, tmp_path, args, over, reason):
    """First a good run, then a bad one: the bad one must leave the good
    configuration (network and resolv.conf) exactly as it was."""
    put(xenstored, **GOOD)
    resolv = tmp_path / "resolv.conf"
    assert setup_ip(guest, env, "--resolv-conf", str(resolv)).returncode == 0
    before, text = snapshot(guest), resolv.read_text()
    put(xenstored, **over)
    res = setup_ip(guest, env, "--resolv-conf", str(resolv), *args)
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if ": debug: " not in line]
    assert len(errors) == 1 and reason in errors[0], res.stderr
    assert snapshot(guest) == before
    assert resolv.read_text() == text and os.listdir(tmp_path) == ["resolv.conf"]


def test_unwritable_resolv_conf_fails_before_any_change(xenstored, env, guest, tmp_path):
    put(xenstored, **GOOD)
    before = snapshot(guest)
    res = setup_ip(guest, env, "--resolv-conf", str(tmp_path / "missing-dir" / "resolv.conf"))
    assert res.returncode == 1
    assert res.stderr.strip().endswith("resolv.conf: No such file or directory")
    assert snapshot(guest) == before


def test_hook_runs_only_after_a_change(xenstored, env, guest, tmp_path):
    log = tmp_path / "hook.log"
    hook = tmp_path / "qubes-ip-change-hook"
    hook.write_text(f"#!/bin/sh\nip -o -4 addr show dev eth0 | awk '{{print $4}}' >> {log}\n")
    hook.chmod(0o755)
    resolv = tmp_path / "resolv.conf"
    env = dict(env, QUBES_SETUP_IP_HOOK=str(hook))
    put(xenstored, **GOOD)

    def run():
        res = setup_ip(guest, env, "--resolv-conf", str(resolv))
        assert res.returncode == 0, res.stderr
        return log.read_text().splitlines() if log.exists() else []

    assert run() == ["10.137.0.12/32"]  # first configuration: hook ran, after the change
    assert run() == ["10.137.0.12/32"]  # unchanged: not again
    put(xenstored, qubes_secondary_dns="10.139.1.3")
    assert run() == ["10.137.0.12/32"] * 2  # only resolv.conf changed: still a change
    assert resolv.read_text().endswith("nameserver 10.139.1.3\n")
    put(xenstored, qubes_ip="10.137.0.77")
    assert run() == ["10.137.0.12/32"] * 2 + ["10.137.0.77/32"]  # new address, old one gone
    assert run() == ["10.137.0.12/32"] * 2 + ["10.137.0.77/32"]
    # a failing hook is reported, not fatal: the network is configured
    hook.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    put(xenstored, qubes_ip="10.137.0.78")
    res = setup_ip(guest, env, "--resolv-conf", str(resolv))
    assert res.returncode == 0
    assert "inet 10.137.0.78/32" in guest.ip("-o", "addr", "show", "dev", "eth0").stdout
    # the --hook option wins over the environment; '' disables it
    hook.write_text(f"#!/bin/sh\necho ran >> {log}\n")
    put(xenstored, qubes_ip="10.137.0.79")
    assert setup_ip(guest, env, "--hook", "", "--resolv-conf", str(resolv)).returncode == 0
    assert "ran" not in log.read_text()


def test_resolv_conf_replaced_atomically(xenstored, env, guest, tmp_path):
    """The new file is renamed over the old one: a reader holding the old
    file (here: a second hard link to it) never sees a half-written or
    truncated file, and the path always names a complete one."""
    put(xenstored, **GOOD)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    os.link(resolv, tmp_path / "old-link")
    old_inode = resolv.stat().st_ino
    assert setup_ip(guest, env, "--resolv-conf", str(resolv)).returncode == 0
    assert (tmp_path / "old-link").read_text() == "nameserver 192.0.2.53\n"  # old file untouched
    assert resolv.stat().st_ino != old_inode
    assert resolv.read_text() == S.render_resolv(S.guest_net(values()))
    assert sorted(os.listdir(tmp_path)) == ["old-link", "resolv.conf"]


# ----------------------------------------------------------------------------
# Property: whatever XenStore holds, guest_net refuses it with one line or
# plans only safe tokens (nothing unchecked reaches an ip batch line or
# resolv.conf).

from hypothesis import given, settings, strategies as st  # noqa: E402

_TEXT = st.one_of(st.none(), st.text(max_size=40), st.sampled_from(
    ["10.137.0.12", "10.137.0.1", "255.255.255.0", "fd00::5", "1", "0", "yes", "", " ", "10.0.0.1\nx"]))


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({k: _TEXT for k in S.KEYS}))
def test_any_xenstore_values_are_refused_or_render_safely(vals):
    import re

    try:
        net = S.guest_net(vals)
    except Failure as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    if net is None:
        return
    safe = re.compile(r"[A-Za-z0-9:./ -]+")
    for ipv6 in (True, False):
        for line in S.render_batch(net, "eth0", ipv6):
            assert safe.fullmatch(line), line
    for line in S.render_resolv(net).splitlines()[1:]:
        assert safe.fullmatch(line), line
    assert all(safe.fullmatch(a) for a in S.resolvectl_argv(net, "eth0"))
