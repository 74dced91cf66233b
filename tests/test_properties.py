"""Properties of the edge (validate) and the pure layer (plan), with
hypothesis: arbitrary text is either refused with a Failure or becomes
values that render into payload lines made only of safe tokens; accepted
addresses come out exactly as ipaddress prints them; plans are
deterministic. No root, no I/O."""

import ipaddress
import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vif_route_qubes.firewall import xtables as X
from vif_route_qubes import plan as P
from vif_route_qubes.firewall import iptables as I
from vif_route_qubes import validate
from vif_route_qubes.errors import Failure

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# What a payload token may be made of: iptables-restore and ip -batch split
# on whitespace and interpret quotes, '#', ';' and backslashes; nothing of
# that (nor any shell metacharacter) may come through from input.
TOKEN = re.compile(r"[A-Za-z0-9_.:/\-\[\]*!]+")

ANY_TEXT = st.text(max_size=80)
ADDRISH = st.text(alphabet="0123456789abcdefABCDEF:./% \t\n١", max_size=60)
V4 = st.ip_addresses(v=4)
V6 = st.ip_addresses(v=6)
MACISH = st.from_regex(r"\A[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}\Z") | ANY_TEXT
NAMEISH = st.from_regex(r"\A[A-Za-z0-9_.+:/ -]{0,18}\Z") | ANY_TEXT
VIFISH = st.from_regex(r"\Avif[0-9]{1,6}\.[0-9]{1,6}(-emu)?\Z") | ANY_TEXT
XBISH = st.from_regex(r"\A(/local/domain/[0-9]{1,3}/)?backend/vif/[0-9]{1,6}/[0-9]{1,3}\Z") | ANY_TEXT


def refused_or(fn, *args):
    """fn(*args), or None when it raises Failure; anything else propagates
    (and fails the property)."""
    try:
        return fn(*args)
    except Failure as exc:
        text = str(exc)
        assert text and "\n" not in text and len(text) < 400, text
        return None


def check_lines(text):
    assert text.endswith("\n")
    for line in text.splitlines():
        assert line == line.strip() and "  " not in line, repr(line)
        for token in line.split(" "):
            assert TOKEN.fullmatch(token), (token, line)


def render_all(vif):
    out = []
    for version in (4, 6):
        fw = I.firewall(vif, version)
        out += [fw.create, fw.replace, fw.teardown]
    for ipv6 in (True, False):
        on = P.converge(vif.name, vif, ipv6, P.NOTHING)
        out += [P.render_batch(on.batch)]
        out.append(P.render_batch(P.converge(vif.name, None, ipv6, P.wanted(vif, ipv6)).pre))
        for path, value in on.sysctls:
            assert TOKEN.fullmatch(path) and value in ("0", "1")
    return out


@SETTINGS
@given(ADDRISH | ANY_TEXT | st.lists(V4 | V6, max_size=5).map(lambda a: " ".join(map(str, a))))
@example("10.0.0.1; reboot")
@example("fd00::1 fd00:0::0001")
def test_addresses_refuse_or_return_unique_host_addresses(text):
    result = refused_or(validate.addresses, text, "ip")
    if result is None:
        return
    assert 1 <= len(result) <= validate.MAX_ADDRESSES
    assert len(set(result)) == len(result)
    for a in result:
        assert isinstance(a, (ipaddress.IPv4Address, ipaddress.IPv6Address))
        assert not (a.is_multicast or a.is_link_local or a.is_loopback or a.is_unspecified)


@SETTINGS
@given(MACISH)
def test_mac_refuses_or_normalises(text):
    result = refused_or(validate.mac, text, "mac")
    if result is not None:
        assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", result)
        assert result == text.lower()


@SETTINGS
@given(NAMEISH)
@example("../x")
@example("x+")
def test_ifname_refuses_or_is_a_safe_token(text):
    result = refused_or(validate.ifname, text, "vifname")
    if result is not None:
        assert result == text and 1 <= len(result) <= 15 and TOKEN.fullmatch(result)
        assert "+" not in result and "/" not in result and not result.startswith("-")
        assert all(len(c) <= I.CHAIN_MAX for c in I.chains(result))


@SETTINGS
@given(VIFISH)
def test_vif_name_refuses_or_gives_ids(text):
    result = refused_or(validate.vif_name, text, "vif")
    if result is not None:
        domid, devid = result
        assert 0 <= domid <= validate.MAX_DOMID
        assert text.startswith(f"vif{domid}.{devid}")


@SETTINGS
@given(XBISH)
@example("backend/vif/3/0/../x")
def test_xenbus_path_refuses_or_parses(text):
    result = refused_or(validate.xenbus_path, text)
    if result is not None:
        path, front, devid = result
        assert path == text and path.endswith(f"backend/vif/{front}/{devid}")
        assert re.fullmatch(r"[A-Za-z0-9/_@-]+", path) and "//" not in path


@SETTINGS
@given(st.lists(V4 | V6, min_size=1, max_size=6, unique=True), V4, V6,
       st.integers(0, validate.MAX_DOMID), st.integers(0, 20),
       st.from_regex(r"\A[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z"), NAMEISH, st.booleans())
def test_accepted_values_render_into_safe_lines_with_every_address(
        addrs, gw, gw6, domid, devid, mac, name, use_gateways):
    spelled = " ".join(a.exploded if a.version == 6 and domid % 2 else str(a) for a in addrs)
    addresses = refused_or(validate.addresses, spelled, "ip")
    mac = refused_or(validate.mac, mac, "mac")
    name = refused_or(validate.ifname, name, "vifname") or f"vif{domid}.{devid}"
    if addresses is None or mac is None:
        return
    gateway = refused_or(validate.gateway, str(gw), "gw", 4) if use_gateways else None
    gateway6 = refused_or(validate.gateway, str(gw6), "gw6", 6) if use_gateways else None
    vif = P.Vif(name=name, domid=domid, devid=devid, mac=mac, addresses=addresses,
                gateway=gateway, gateway6=gateway6, xenbus_path=f"backend/vif/{domid}/{devid}")
    payloads = render_all(vif)
    for text in payloads:
        check_lines(text)
    # deterministic: the same Vif renders byte for byte the same
    again = P.Vif(name=name, domid=domid, devid=devid, mac=mac, addresses=tuple(addresses),
                  gateway=gateway, gateway6=gateway6, xenbus_path=f"backend/vif/{domid}/{devid}")
    assert render_all(again) == payloads
    # round trip: each accepted address appears exactly as ipaddress prints
    # it, once per rule that names it, and is found again in the src chain
    for version in (4, 6):
        fw = I.firewall(vif, version)
        own = vif.family(version)
        tokens = fw.create.split()
        for a in own:
            assert tokens.count(P.host(a)) == 2 and str(a) == ipaddress.ip_address(str(a)).compressed
        assert I.addresses_from_save(X.table(fw.create), name) == tuple(P.host(a) for a in own)
        assert I.teardown_from_save(X.table(fw.create.replace("-N ", ":").replace(
            f":{fw.chain_names[0]}", f":{fw.chain_names[0]} -").replace(
            f":{fw.chain_names[1]}", f":{fw.chain_names[1]} -")), name).count("-X ") == 2
    batch = P.render_batch(P.converge(vif.name, vif, True, P.NOTHING).batch).split()
    for a in addresses:
        assert batch.count(P.host(a)) == 1 and batch.count(str(a)) == 1


@SETTINGS
@given(st.lists(V4 | V6, min_size=1, max_size=4, unique=True))
def test_conntrack_calls_are_argv_lists_of_printed_addresses(addrs):
    calls = P.conntrack_purges(addrs)
    assert len(calls) == 2 * len(addrs)
    for argv in calls:
        assert argv[0] == "conntrack" and all(TOKEN.fullmatch(a) for a in argv)
    assert {c[-1] for c in calls} == {str(a) for a in addrs}
    assert P.conntrack_purges(addrs) == calls


# nft's scanner: an interface name is a quoted string, sets and elements
# are braced lists; nothing from input may bring a quote, '#', ';' or a
# newline into a line
NFT_TOKEN = re.compile(r'"[A-Za-z0-9_.\-]{1,15}"|[A-Za-z0-9_.:/\-{},@]+')


@SETTINGS
@given(st.lists(V4 | V6, min_size=0, max_size=6, unique=True), st.lists(V4 | V6, max_size=4, unique=True),
       NAMEISH, st.sampled_from(["create", "add", "drop"]))
def test_nft_transactions_are_safe_lines_naming_every_address(addrs, old, name, guard):
    from vif_route_qubes.firewall import nft as N

    name = refused_or(validate.ifname, name, "vifname") or "vif3.0"
    addresses = refused_or(validate.addresses, " ".join(map(str, addrs)), "ip") if addrs else ()
    if addresses is None:
        return
    text = N.transaction(name, addresses, tuple(old), drop_nd=bool(old), guard=guard, fresh=addresses,
                         unshared=tuple(old), ruleset=N.Ruleset())
    assert text.endswith("\n")
    lines = text.splitlines()
    for line in lines:
        assert line == line.strip() and "  " not in line, repr(line)
        if " element " in line:  # the skeleton's lines are constants (golden tests)
            for token in line.split(" "):
                assert NFT_TOKEN.fullmatch(token), (token, line)
    # every address ends allowed for this interface, whatever was dropped:
    # the additions come after the last deletion
    last_delete = max([i for i, line in enumerate(lines) if line.startswith("delete ")], default=-1)
    added = " ".join(line for line in lines[last_delete + 1:] if " allowed " in line)
    for a in addresses:
        assert f'"{name}" . {a}' in added, (a, text)
    # deterministic
    assert N.transaction(name, addresses, tuple(old), drop_nd=bool(old), guard=guard, fresh=addresses,
                         unshared=tuple(old), ruleset=N.Ruleset()) == text
