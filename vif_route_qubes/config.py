"""Where a tool's configuration values come from: the configuration source
seam. Two sources carry the same values under different names:

* **xenstore**, the design document's scheme: keys under the domain's own
  XenStore home (``qubes_netvm_gateway``, ...), written by dom0;
* **qubesdb**, what every Qubes release since 2013 uses: the domain's QubesDB
  (``/qubes-netvm-gateway``, ...), written by dom0's qubesd.

Chosen once per run: ``VIF_ROUTE_QUBES_CONFIG=qubesdb|xenstore``, else
``auto``: QubesDB where its daemon answers on its socket, else XenStore. The
backend directory of a vif (``ip``, ``mac``, ``vifname``, ``type``) is
libxl's XenStore in both cases, as in Qubes. Values are returned under the
XenStore names, as text, for the callers' one validation; ``where`` names
the real key for the messages that quote it.
"""

from .errors import Failure
from .validate import setting as chosen

ENV = "VIF_ROUTE_QUBES_CONFIG"
CHOICES = ("auto", "qubesdb", "xenstore")

# the netvm's values the hotplug script reads: XenStore name -> QubesDB path
NETVM = {
    "qubes_netvm_gateway": "/qubes-netvm-gateway",
    "qubes_netvm_gateway6": "/qubes-netvm-gateway6",
    "qubes-service/harden-network-interfaces": "/qubes-service/harden-network-interfaces",
}


# the virtual nameservers qubes-setup-dnat-to-ns translates; the IPv6 pair
# under the names of Qubes' pending IPv6 DNS work (qubes-core-admin PR 558,
# qubes-core-agent-linux PR 592, which network-proxy-setup reads)
DNAT = {
    "qubes_netvm_primary_dns": "/qubes-netvm-primary-dns",
    "qubes_netvm_secondary_dns": "/qubes-netvm-secondary-dns",
    "qubes_netvm_primary_dns6": "/qubes-netvm-primary-dns6",
    "qubes_netvm_secondary_dns6": "/qubes-netvm-secondary-dns6",
}
QUBESDB = {**NETVM, **DNAT}

# the guest's values (qubes-setup-ip), as Qubes' network/setup-ip reads
# them. Per interface: under /net-config/MAC/ when dom0 wrote an ``ip``
# there (a qube with several vifs), else the qube's /qubes-* keys; the
# suffixes are the same in both (ip, netmask, ..., netmask6). ``custom``
# (its presence) means "not Qubes' usual gateway MAC": nothing pinned.
GUEST_IFACE = {
    "qubes_ip": "ip", "qubes_netmask": "netmask", "qubes_gateway": "gateway",
    "qubes_ip6": "ip6", "qubes_netmask6": "netmask6", "qubes_gateway6": "gateway6",
}
GUEST_CUSTOM = "custom"
# per qube, wherever the interface's own values come from; the switches are
# Qubes' services, "1" when enabled; /qubes-netvm-network is non-empty when
# this qube provides network to others (it then runs the DNAT)
GUEST = {
    "qubes_primary_dns": "/qubes-primary-dns",
    "qubes_secondary_dns": "/qubes-secondary-dns",
    "disable-default-route": "/qubes-service/disable-default-route",
    "disable-dns-server": "/qubes-service/disable-dns-server",
    "network-manager": "/qubes-service/network-manager",
    "qubes_netvm_network": "/qubes-netvm-network",
}


def choose(env):
    """-> (source name, reason), for the log, the dry run and status."""
    setting, where = chosen(env, ENV, CHOICES, "auto")
    if setting != "auto":
        return setting, f"{where}={setting}"
    from .qubesdb import answers, socket_path

    if answers(env):
        return "qubesdb", f"auto: QubesDB answers on {socket_path(env)}"
    return "xenstore", f"auto: no QubesDB on {socket_path(env)}"


def where(source, key) -> str:
    """The real name of value ``key`` in ``source``, for messages."""
    return f"QubesDB {QUBESDB.get(key, key)}" if source == "qubesdb" else f"XenStore {key}"


def values(source, env, mapping) -> dict:
    """{XenStore name: text or None (absent)} of ``mapping``'s values from
    ``source``, in one connection (XenStore: one round trip)."""
    if source == "qubesdb":
        return qubesdb_values(env, mapping)
    from .xs import XenStore

    with XenStore(env) as xs:
        return xs.read_many(list(mapping))


def qubesdb_values(env, mapping) -> dict:
    """As :func:`values`, from QubesDB, on one connection."""
    from .qubesdb import QubesDB

    with QubesDB(env) as q:
        return _read(q, mapping)


def _read(q, mapping, under=None, have=None) -> dict:
    """``mapping``'s values on connection ``q``: a path that is a prefix of
    others (``/qubes-netvm-gateway`` of ``...gateway6``) is one multiread
    for all of them, the others one read each. ``have``: {path: bytes} of
    a multiread of ``under`` already made: paths under it are not asked
    again (absent from it is absent)."""
    paths = sorted(p for p in set(mapping.values()) if not (under and p.startswith(under)))
    found, covered = dict(have or {}), []
    for path in paths:
        if any(path.startswith(c) for c in covered):
            continue
        if any(o != path and o.startswith(path) for o in paths):
            found.update(q.multiread(path))
            covered.append(path)
        else:
            raw = q.read(path)
            if raw is not None:
                found[path] = raw
    return {key: _text(path, found.get(path)) for key, path in mapping.items()}


def _text(path, raw):
    """A QubesDB value as the text every validator takes (None: absent)."""
    try:
        return raw.decode("ascii") if raw is not None else None
    except UnicodeDecodeError:
        raise Failure(f"QubesDB {path}: {raw[:40]!r} is not ASCII text") from None


# a guest's mapped addresses (disposables): /mapped-ip/REAL/{visible-ip,
# visible-gateway}, keyed by the real address as Python's ipaddress prints
# it (qubes-core-admin writes str(vm.ip)); the IPv6 form is ours (Qubes
# issue 6216)
MAPPED = "/mapped-ip/"
MAPPED_KEYS = ("visible-ip", "visible-gateway")


def mapped_path(real) -> str:
    return f"{MAPPED}{real}/"


def netvm_from_qubesdb(env, addresses=()) -> dict:
    """The hotplug script's netvm values from QubesDB on one connection (one
    multiread answers both gateways, one read the service); with
    ``addresses`` (the guest's real addresses, canonical text), also their
    mapped addresses, one multiread each, under ``"mapped-ip"``: {real:
    (visible-ip, visible-gateway), text or None}."""
    from .qubesdb import QubesDB

    with QubesDB(env) as q:
        found = _read(q, NETVM)
        found["mapped-ip"] = mapped_of(q, addresses)
    return found


def mapped_of(q, addresses) -> dict:
    """{real: (visible-ip, visible-gateway)} on connection ``q``. An address
    whose key path is longer than QubesDB's paths can be has none (Qubes'
    dom0 cannot have written it)."""
    from .qubesdb import MAX_PATH

    out = {}
    for real in addresses:
        base = mapped_path(real)
        if len(base) + max(map(len, MAPPED_KEYS)) >= MAX_PATH:
            out[real] = (None, None)
            continue
        got = q.multiread(base)
        out[real] = tuple(_text(base + key, got.get(base + key)) for key in MAPPED_KEYS)
    return out


def guest_values(env, mac) -> tuple:
    """The guest's values for the interface with MAC ``mac`` (None: unknown)
    from QubesDB on one connection -> ({XenStore name: text or None}, {XenStore
    name: QubesDB path}, for messages). ``custom`` present becomes
    ``disable-gateway-mac-pin=1``, the XenStore scheme's switch for it."""
    from .qubesdb import QubesDB

    with QubesDB(env) as q:
        # the interface's own directory in one round trip: whether dom0
        # wrote an ip there decides, and the rest of it is then read too
        prefix, iface = "/qubes-", {}
        if mac is not None:
            iface = q.multiread(f"/net-config/{mac}/")
            if f"/net-config/{mac}/ip" in iface:
                prefix = f"/net-config/{mac}/"
        mapping = {key: prefix + suffix for key, suffix in GUEST_IFACE.items()}
        mapping.update(GUEST)
        if prefix != "/qubes-":
            mapping[GUEST_CUSTOM] = prefix + GUEST_CUSTOM
            found = _read(q, mapping, under=prefix, have=iface)
        else:
            found = _read(q, mapping)
    custom = mapping.pop(GUEST_CUSTOM, None)
    if found.pop(GUEST_CUSTOM, None) is not None:
        found["disable-gateway-mac-pin"] = "1"
        mapping["disable-gateway-mac-pin"] = custom
    return found, mapping
