"""Validation at the edge: everything from argv, the environment and XenStore
passes through here once, so nothing unchecked ever reaches an argv, an
iptables payload or an ``ip -batch`` line.

Every function returns a normalised value or raises :class:`Failure` with a
one-line reason naming where the bad value came from (``what``).
"""

import ipaddress
import re

from .errors import Failure

MAX_DOMID = 32752  # DOMID_FIRST_RESERVED - 1 in xen/include/public/xen.h
MAX_ADDRESSES = 64  # far above any real guest; bounds payload sizes

_NUM = r"(0|[1-9][0-9]{0,4})"  # no leading zeros: libxl never writes them
_VIF_RE = re.compile(rf"vif{_NUM}\.{_NUM}(-emu)?")
# Linux IFNAMSIZ is 16 including the NUL. '+' is iptables' wildcard, ':' an
# alias separator, '/' and whitespace break sysfs and argv: none allowed.
_IFNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_XS_PATH_RE = re.compile(r"[A-Za-z0-9/_@-]+")
_XENBUS_RE = re.compile(rf"(/local/domain/{_NUM}/)?backend/vif/{_NUM}/{_NUM}")
_ADDR_CHARS_RE = re.compile(r"[0-9A-Fa-f:.]+(/[0-9]{1,3})?")


def _show(value: str, limit: int = 60) -> str:
    """Quote a hostile value for a one-line message: bounded, printable."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "...'"


def setting(env, var, choices, default, requested=None, option=None) -> tuple:
    """(value, where it came from) of a choice among ``choices``: the
    command-line ``option`` (``requested``) wins over the environment
    variable ``var``, else ``default``; anything else is a Failure naming
    where it came from."""
    value = requested or env.get(var) or default
    where = f"option {option}" if requested else (var if env.get(var) else "default")
    if value not in choices:
        raise Failure(f"{where}={value[:40]!r}: expected one of {', '.join(choices)}")
    return value, where


_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


def switch(value, what: str) -> bool:
    """A switch key (``what`` names it and its source): absent/0/false/no/off
    -> False, 1/true/yes/on -> True; anything else is refused rather than
    guessed."""
    if value is None:
        return False
    text = value.strip().lower()
    if text in _ON:
        return True
    if text in _OFF:
        return False
    raise Failure(f"{what}: {value.strip()[:40]!r} is not a switch value (1 or 0)")


def message(value: str, limit: int = 300) -> str:
    """Text another domain wrote (a netvm's hotplug-error), fit for one line
    of our own output: printable characters only, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in (value or ""))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def vif_name(name: str, what: str = "vif") -> tuple:
    """``vifD.N`` (or ``vifD.N-emu`` for an emulated NIC) -> (domid, devid)."""
    m = _VIF_RE.fullmatch(name or "")
    if not m:
        raise Failure(f"{what}: {_show(name)} is not an interface name of the form vifDOMID.DEVID")
    domid, devid = int(m.group(1)), int(m.group(2))
    if domid > MAX_DOMID:
        raise Failure(f"{what}: domain id {domid} in {name} is above {MAX_DOMID}")
    return domid, devid


def ifname(name: str, what: str) -> str:
    """Any Linux interface name we are willing to put in argv and rules."""
    if not _IFNAME_RE.fullmatch(name or "") or set(name) == {"."}:
        raise Failure(
            f"{what}: {_show(name)} is not a valid interface name "
            "(1-15 characters of A-Z a-z 0-9 _ . -)"
        )
    return name


def domid(value: str, what: str) -> int:
    if not re.fullmatch(_NUM, value or "") or int(value) > MAX_DOMID:
        raise Failure(f"{what}: {_show(value)} is not a domain id (0-{MAX_DOMID})")
    return int(value)


def mac(value: str, what: str = "mac") -> str:
    if not _MAC_RE.fullmatch(value or ""):
        raise Failure(f"{what}: {_show(value)} is not a MAC address (six hex pairs joined by ':')")
    first = int(value[:2], 16)
    if first & 1:
        raise Failure(f"{what}: {value} is a multicast MAC address, not a guest's")
    if value == "00:00:00:00:00:00":
        raise Failure(f"{what}: the all-zero MAC address is not a guest's")
    return value.lower()


def xs_path(value: str, what: str) -> str:
    """A XenStore path as xenstored accepts it (docs/misc/xenstore.txt)."""
    if (
        not value
        or not _XS_PATH_RE.fullmatch(value)
        or "//" in value
        or (len(value) > 1 and value.endswith("/"))
        or len(value) > (3072 if value.startswith("/") else 2048)
    ):
        raise Failure(f"{what}: {_show(value)} is not a valid XenStore path")
    return value


def xenbus_path(value: str, what: str = "XENBUS_PATH") -> tuple:
    """``backend/vif/D/N`` (relative, as libxl passes it) or its absolute
    ``/local/domain/X/backend/vif/D/N`` form -> (path, frontend domid, devid)."""
    xs_path(value, what)
    m = _XENBUS_RE.fullmatch(value)
    if not m:
        raise Failure(f"{what}: {_show(value)} is not a vif backend path (backend/vif/DOMID/DEVID)")
    front = int(m.group(3))
    if front > MAX_DOMID:
        raise Failure(f"{what}: domain id {front} is above {MAX_DOMID}")
    return value, front, int(m.group(4))


def _one_address(token: str, what: str):
    if not token.isascii() or not _ADDR_CHARS_RE.fullmatch(token):
        raise Failure(f"{what}: {_show(token)} is not an IP address")
    text, _, prefix = token.partition("/")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise Failure(f"{what}: {_show(token)} is not an IP address") from None
    if prefix and int(prefix) != addr.max_prefixlen:
        raise Failure(f"{what}: {token} is a network, a guest address must be a single host")
    if addr.version == 6 and addr.ipv4_mapped is not None:
        raise Failure(f"{what}: {token} is an IPv4-mapped IPv6 address; give the IPv4 address itself")
    for flag, label in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_multicast", "multicast"),
        ("is_link_local", "link-local"),
        ("is_reserved", "reserved"),
    ):
        if getattr(addr, flag):
            raise Failure(f"{what}: {token} is a {label} address, not usable for a guest")
    if addr.version == 4 and addr == ipaddress.IPv4Address("255.255.255.255"):
        raise Failure(f"{what}: {token} is the broadcast address, not usable for a guest")
    return addr


def addresses(value: str, what: str = "ip") -> tuple:
    """The space-separated ``ip`` value -> tuple of addresses, in given order.

    Duplicates are refused rather than merged: they mean the toolstack and
    the guest disagree about something, which an operator should see.
    """
    if value is None or not value.strip():
        raise Failure(f"{what}: no address given")
    if len(value) > 4096:
        raise Failure(f"{what}: value is {len(value)} bytes long, more than XenStore allows")
    tokens = value.split()
    if len(tokens) > MAX_ADDRESSES:
        raise Failure(f"{what}: {len(tokens)} addresses, at most {MAX_ADDRESSES} are supported")
    result = []
    for token in tokens:
        addr = _one_address(token, what)
        if addr in result:
            raise Failure(f"{what}: address {addr} is given twice")
        result.append(addr)
    return tuple(result)


def gateway(value, what: str, version: int):
    """An optional netvm gateway address of the given IP version, or None."""
    if value is None or value == "":
        return None
    addr = _one_address(value.strip(), what)
    if addr.version != version:
        raise Failure(f"{what}: {value} is not an IPv{version} address")
    return addr
