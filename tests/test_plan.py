"""Pure tests of validation and the plan/render layer: golden payloads."""

from ipaddress import ip_address

import pytest

from vif_route_qubes.firewall import xtables as X
from vif_route_qubes import plan as P
from vif_route_qubes.firewall import iptables as I
from vif_route_qubes import validate
from vif_route_qubes.errors import Failure


def vif(**kw):
    base = dict(
        name="vif3.0", domid=3, devid=0, mac="00:16:3e:5e:6c:00",
        addresses=(ip_address("10.137.0.12"),), gateway=ip_address("10.137.0.1"),
    )
    base.update(kw)
    return P.Vif(**base)


def test_firewall_create_payload_golden():
    fw = I.firewall(vif(addresses=(ip_address("10.137.0.12"), ip_address("10.137.0.13"))), 4)
    assert fw.create == (
        "*raw\n"
        "-N vrq-in-vif3.0\n"
        "-N vrq-src-vif3.0\n"
        "-A vrq-in-vif3.0 -s 10.137.0.12/32 -j RETURN\n"
        "-A vrq-in-vif3.0 -s 10.137.0.13/32 -j RETURN\n"
        "-A vrq-in-vif3.0 -j DROP\n"
        "-A vrq-src-vif3.0 -s 10.137.0.12/32 -j DROP\n"
        "-A vrq-src-vif3.0 -s 10.137.0.13/32 -j DROP\n"
        "-I vrq-guard -i vif3.0 -g vrq-in-vif3.0\n"
        "-A PREROUTING -m devgroup ! --src-group 2 -m comment --comment vrq-src -j vrq-src-vif3.0\n"
        "-C PREROUTING -m devgroup --src-group 2 -m comment --comment vrq-guard -j vrq-guard\n"
        "-D vrq-guard -j DROP\n"
        "-A vrq-guard -j DROP\n"
        "COMMIT\n"
    )
    # without the guard check: what the rebuild installs once the guard is whole
    assert fw.core == fw.create.replace(
        "-C PREROUTING -m devgroup --src-group 2 -m comment --comment vrq-guard -j vrq-guard\n"
        "-D vrq-guard -j DROP\n-A vrq-guard -j DROP\n", "")


def test_firewall_replace_and_teardown_golden():
    fw = I.firewall(vif(), 4)
    assert fw.replace == (
        "*raw\n"
        ":vrq-in-vif3.0 - [0:0]\n"
        ":vrq-src-vif3.0 - [0:0]\n"
        "-A vrq-in-vif3.0 -s 10.137.0.12/32 -j RETURN\n"
        "-A vrq-in-vif3.0 -j DROP\n"
        "-A vrq-src-vif3.0 -s 10.137.0.12/32 -j DROP\n"
        "-D vrq-guard -i vif3.0 -g vrq-in-vif3.0\n"
        "-D PREROUTING -m devgroup ! --src-group 2 -m comment --comment vrq-src -j vrq-src-vif3.0\n"
        "-I vrq-guard -i vif3.0 -g vrq-in-vif3.0\n"
        "-A PREROUTING -m devgroup ! --src-group 2 -m comment --comment vrq-src -j vrq-src-vif3.0\n"
        "-C PREROUTING -m devgroup --src-group 2 -m comment --comment vrq-guard -j vrq-guard\n"
        "-D vrq-guard -j DROP\n"
        "-A vrq-guard -j DROP\n"
        "COMMIT\n"
    )
    # the guard is never part of a vif's teardown: other vifs rely on it
    assert fw.teardown == (
        "*raw\n"
        "-D vrq-guard -i vif3.0 -g vrq-in-vif3.0\n"
        "-D PREROUTING -m devgroup ! --src-group 2 -m comment --comment vrq-src -j vrq-src-vif3.0\n"
        "-F vrq-in-vif3.0\n-F vrq-src-vif3.0\n-X vrq-in-vif3.0\n-X vrq-src-vif3.0\n"
        "COMMIT\n"
    )


def test_ipv6_without_addresses_drops_everything_from_the_vif():
    fw = I.firewall(vif(), 6)
    assert "-A vrq-in-vif3.0 -j DROP\n" in fw.create
    assert "RETURN" not in fw.create
    assert "-A vrq-src-vif3.0 -s" not in fw.create


def test_ipv6_with_address_allows_it_and_neighbour_discovery():
    fw = I.firewall(vif(addresses=(ip_address("10.137.0.12"), ip_address("fd09:24ef:4179::a89:c"))), 6)
    lines = fw.create.splitlines()
    assert "-A vrq-in-vif3.0 -s fd09:24ef:4179::a89:c/128 -j RETURN" in lines
    # from link-local and ::, only neighbour discovery and MLD, each type
    # its own RETURN, all before the DROP
    link = [line for line in lines if " -s fe80::/10 " in line or " -s ::/128 " in line]
    types = [130, 131, 132, 133, 134, 135, 136, 143]
    assert link == [f"-A vrq-in-vif3.0 -s {src} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN"
                    for src in ("fe80::/10", "::/128") for t in types]
    assert lines.index("-A vrq-in-vif3.0 -j DROP") > max(lines.index(line) for line in link)
    assert "10.137.0.12" not in fw.create


def test_converge_fresh_vif_batch_golden_and_order():
    lp = P.converge("vif3.0", vif(), True, P.NOTHING)
    assert lp.pre == ()
    assert lp.batch == (
        "link set dev vif3.0 group 2",
        "link set dev vif3.0 up",
        "addr replace 10.137.0.1/32 dev vif3.0",
        "neigh replace 10.137.0.12 lladdr 00:16:3e:5e:6c:00 dev vif3.0 nud permanent",
        "route replace 10.137.0.12/32 dev vif3.0 metric 32749",
    )
    assert lp.sysctls == (("/proc/sys/net/ipv4/conf/vif3.0/proxy_arp", "1"),
                          ("/proc/sys/net/ipv6/conf/vif3.0/proxy_ndp", "0"))


def test_converge_removes_what_old_inputs_left():
    """A changed ip and gateway: the old route and neighbour entry go before
    the firewall changes (pre), the old gateway after the new one is there."""
    have = P.VifState(up=True, group="2", routes=(("10.137.0.99/32", 32749), ("10.137.0.12/32", 1)),
                      neigh=(("10.137.0.99", "00:16:3e:5e:6c:00"),), addrs=("10.137.0.254/32",))
    lp = P.converge("vif3.0", vif(), False, have)
    assert lp.pre == ("route del 10.137.0.99/32 dev vif3.0 metric 32749",
                      "route del 10.137.0.12/32 dev vif3.0 metric 1",
                      "neigh del 10.137.0.99 dev vif3.0")
    b = list(lp.batch)
    assert b.index("addr replace 10.137.0.1/32 dev vif3.0") < b.index("addr del 10.137.0.254/32 dev vif3.0") \
        < b.index("route replace 10.137.0.12/32 dev vif3.0 metric 32749")


def test_converge_to_nothing_removes_routes_before_the_last_address():
    have = P.wanted(vif(gateway6=ip_address("fd09:24ef:4179::a89:1"),
                        addresses=(ip_address("10.137.0.12"), ip_address("fd09:24ef:4179::a89:c"))), True)
    lp = P.converge("vif3.0", None, True, have)
    b = list(lp.pre)
    assert lp.batch == ()
    assert b.index("route del 10.137.0.12/32 dev vif3.0 metric 32749") < b.index("addr del 10.137.0.1/32 dev vif3.0")
    assert "route del fd09:24ef:4179::a89:c/128 dev vif3.0 metric 32749" in b
    assert b[-2:] == ["link set dev vif3.0 down", "link set dev vif3.0 group 0"]
    assert ("/proc/sys/net/ipv6/conf/vif3.0/proxy_ndp", "0") in lp.sysctls
    assert P.describe_removal(lp.pre)[-2:] == ["link up", "group 2"]
    assert P.converge("vif3.0", None, True, P.NOTHING).pre == ()


def test_converge_is_idempotent_on_its_own_result():
    v = vif(gateway6=ip_address("fd09:24ef:4179::a89:1"), addresses=(ip_address("fd09:24ef:4179::a89:c"),))
    assert P.converge("vif3.0", v, True, P.wanted(v, True)).pre == ()


def test_ipv6_gateway_only_where_ipv6_is_enabled():
    v = vif(gateway6=ip_address("fd09:24ef:4179::a89:1"), addresses=(ip_address("fd09:24ef:4179::a89:c"),))
    on = P.converge("vif3.0", v, True, P.NOTHING)
    assert "addr replace fd09:24ef:4179::a89:1/128 dev vif3.0 nodad" in on.batch
    assert ("/proc/sys/net/ipv6/conf/vif3.0/proxy_ndp", "1") in on.sysctls
    off = P.converge("vif3.0", v, False, P.NOTHING)
    assert not any("fd09" in line for line in off.batch)
    assert all("ipv6" not in path for path, _ in off.sysctls)


def test_vif_state_parses_ip_json():
    arrays = [
        [{"ifname": "vif3.0", "flags": ["UP"], "group": "2", "addr_info": [
            {"family": "inet", "local": "10.137.0.1", "prefixlen": 32, "scope": "global"},
            {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link"}]}],
        [{"dst": "10.137.0.12", "scope": "link", "metric": 32749},
         {"type": "local", "dst": "10.137.0.1", "table": "local", "protocol": "kernel"},
         {"dst": "10.0.0.0/24", "scope": "link"}, {"dst": "default", "gateway": "10.0.0.1"}],
        [{"dst": "fd00::12", "metric": 32749}, {"dst": "fd00::1", "protocol": "kernel", "metric": 256}],
        [{"dst": "10.137.0.12", "lladdr": "00:16:3E:00:00:01", "state": ["PERMANENT"]}],
    ]
    st = P.vif_state(arrays)
    assert st == P.VifState(up=True, group="2", routes=(("10.137.0.12/32", 32749), ("fd00::12/128", 32749)),
                            neigh=(("10.137.0.12", "00:16:3e:00:00:01"),), addrs=("10.137.0.1/32",))


def test_metric_is_32752_minus_domid():
    assert P.metric_for(0) == 32752
    assert P.metric_for(32752) == 0
    assert vif(domid=10).metric == 32742


def test_conntrack_purges_both_directions_per_address():
    calls = P.conntrack_purges((ip_address("10.137.0.12"), ip_address("fd00::c")))
    assert calls == (
        ("conntrack", "-D", "-s", "10.137.0.12"),
        ("conntrack", "-D", "-d", "10.137.0.12"),
        ("conntrack", "-D", "-f", "ipv6", "-s", "fd00::c"),
        ("conntrack", "-D", "-f", "ipv6", "-d", "fd00::c"),
    )


SAVE = """# Generated by iptables-save v1.8.9 (nf_tables)
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:vrq-in-vif3.0 - [0:0]
:vrq-src-vif3.0 - [0:0]
:vrq-in-vif3.1 - [0:0]
:vrq-guard - [0:0]
-A PREROUTING -m devgroup --src-group 0x2 -m comment --comment vrq-guard -j vrq-guard
-A vrq-guard -i vif3.1 -g vrq-in-vif3.1
-A vrq-guard -i vif3.0 -g vrq-in-vif3.0
-A vrq-guard -j DROP
-A vrq-in-vif3.0 -s 10.137.0.12/32 -j RETURN
-A vrq-in-vif3.0 -j DROP
-A vrq-src-vif3.0 -s 10.137.0.12/32 -j DROP
-A vrq-src-vif3.0 -s 10.137.0.13/32 -j DROP
COMMIT
"""


def test_teardown_from_save_removes_exactly_what_exists():
    # the src jump is gone (hand-deleted): only the rest is removed, and
    # vif3.1's chain is left alone
    assert I.teardown_from_save(X.table(SAVE), "vif3.0") == (
        "*raw\n"
        "-D vrq-guard -i vif3.0 -g vrq-in-vif3.0\n"
        "-F vrq-in-vif3.0\n-F vrq-src-vif3.0\n-X vrq-in-vif3.0\n-X vrq-src-vif3.0\n"
        "COMMIT\n"
    )
    assert I.teardown_from_save(X.table(SAVE), "vif9.0") == ""


def test_rebuild_makes_the_guard_whole_from_save():
    fw = I.firewall(vif(), 4)
    # a whole guard: only its DROP is moved back to the end
    whole = I.rebuild_payload(X.table(SAVE), fw, "vif3.0").splitlines()
    assert "-N vrq-guard" not in whole and not any(line.startswith("-A PREROUTING -m devgroup --src") for line in whole)
    assert whole[-3:] == ["-D vrq-guard -j DROP", "-A vrq-guard -j DROP", "COMMIT"]
    assert whole.index("-D vrq-guard -i vif3.0 -g vrq-in-vif3.0") < whole.index("-I vrq-guard -i vif3.0 -g vrq-in-vif3.0")
    # no guard at all (the first vif on a host): chain, jump and DROP made
    bare = "*raw\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"
    lines = I.rebuild_payload(X.table(bare), fw, "vif3.0").splitlines()
    assert lines[:3] == ["*raw", "-N vrq-guard",
                         "-A PREROUTING -m devgroup --src-group 2 -m comment --comment vrq-guard -j vrq-guard"]
    assert lines[-2:] == ["-A vrq-guard -j DROP", "COMMIT"] and "-D vrq-guard -j DROP" not in lines
    assert "-I vrq-guard -i vif3.0 -g vrq-in-vif3.0" in lines


def test_a_damaged_guard_is_reported():
    assert [r[0] for r in I.guard_rows(X.table(SAVE), "iptables")] == ["ok", "ok", "ok"]
    late = SAVE.replace("-A vrq-guard -j DROP\n", "-A vrq-guard -j DROP\n-A vrq-guard -i vif3.2 -g vrq-in-vif3.2\n")
    assert I.guard_rows(X.table(late), "iptables")[2][:2] == ("missing", "iptables -A vrq-guard -j DROP")
    assert "not last" in I.guard_rows(X.table(late), "iptables")[2][2]
    nojump = "\n".join(line for line in SAVE.splitlines() if "comment vrq-guard" not in line)
    assert I.guard_rows(X.table(nojump), "iptables")[1][0] == "missing"


def test_addresses_are_recovered_from_the_src_chain():
    assert I.addresses_from_save(X.table(SAVE), "vif3.0") == ("10.137.0.12/32", "10.137.0.13/32")


# -- validation ---------------------------------------------------------------


@pytest.mark.parametrize("name,expected", [("vif3.0", (3, 0)), ("vif32752.7", (32752, 7)), ("vif1.0-emu", (1, 0))])
def test_vif_names_accepted(name, expected):
    assert validate.vif_name(name) == expected


@pytest.mark.parametrize("name", ["", "eth0", "vif32753.0", "vif03.0", "vif3", "vif3.0;rm", "vif3.0 ", "vif+", "vif３.0"])
def test_vif_names_refused(name):
    with pytest.raises(Failure):
        validate.vif_name(name)


@pytest.mark.parametrize("name", ["x" * 16, "a b", "a/b", "vif+", "..", "-x", "é", "a:b", ""])
def test_ifnames_refused(name):
    with pytest.raises(Failure):
        validate.ifname(name, "vifname")


@pytest.mark.parametrize("value", [
    "10.137.0.300", "10.137.0.0/24", "::ffff:10.1.2.3", "169.254.1.1", "fe80::1", "224.0.0.1",
    "0.0.0.0", "127.0.0.1", "255.255.255.255", "10.1.1.1 10.1.1.1", "$(reboot)", "10.1.1.1;ls",
    "１０.1.1.1", "", "   ", "fd00::1%eth0", "ff02::1", "240.0.0.1",
])
def test_bad_addresses_refused_with_one_line_reason(value):
    with pytest.raises(Failure) as info:
        validate.addresses(value, "ip")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("ip")


def test_addresses_keep_order_and_accept_host_prefixes():
    got = validate.addresses(" 10.137.0.12   fd09::c/128 10.137.0.13/32 ")
    assert [str(a) for a in got] == ["10.137.0.12", "fd09::c", "10.137.0.13"]


@pytest.mark.parametrize("value", ["00:16:3e:5e:6c", "00-16-3e-5e-6c-00", "01:16:3e:5e:6c:00",
                                   "00:00:00:00:00:00", "zz:16:3e:5e:6c:00", "00:16:3e:5e:6c:00\n"])
def test_bad_macs_refused(value):
    with pytest.raises(Failure):
        validate.mac(value)


def test_mac_normalised_to_lower_case():
    assert validate.mac("00:16:3E:5E:6C:0A") == "00:16:3e:5e:6c:0a"


@pytest.mark.parametrize("value", ["backend/vif//3/0", "backend/vif/3/0/", "backend/vif/3/0 x",
                                   "backend/vbd/3/0", "../backend/vif/3/0", "backend/vif/3/x", "backend/vif/40000/0"])
def test_bad_xenbus_paths_refused(value):
    with pytest.raises(Failure):
        validate.xenbus_path(value)


def test_xenbus_paths_relative_and_absolute():
    assert validate.xenbus_path("backend/vif/3/0") == ("backend/vif/3/0", 3, 0)
    assert validate.xenbus_path("/local/domain/5/backend/vif/12/1") == ("/local/domain/5/backend/vif/12/1", 12, 1)
