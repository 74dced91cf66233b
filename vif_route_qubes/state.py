"""State records: what ``online`` made for each vif, so ``offline`` can undo
exactly that even when XenStore no longer has the device's directory.

One JSON file per interface under ``/run/vif-route-qubes`` (a tmpfs, so a
reboot empties it), written atomically (temporary file + rename). A record
carries the boot id and the network namespace it was made in: a record that
survived somehow into another boot or namespace is ignored, never trusted.
"""

import json
import os

from .errors import Failure

# The record's format. Records outlive the release that wrote them: an
# upgrade happens with guests running, and the new release's offline, status
# and re-online must still find what the old one made. A release that
# changes the format bumps VERSION and adds, in UPGRADES, the step from the
# old version to the next ({old: function(record) -> record one version
# up}); load() applies the steps in order. A record of a version it cannot
# reach (a newer release's, after a downgrade) is not guessed at: ignored,
# as a missing one is (offline then works from XenStore, else from the
# firewall's own rules). tests/test_upgrade.py loads the records and rules of
# the release before this scheme (version 1, tests/fixtures/release-0.1.0).
VERSION = 1
UPGRADES = {}


def boot_id() -> str:
    """This boot's id ("" where the kernel does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _identity() -> dict:
    boot = boot_id()
    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        netns = 0
    return {"boot_id": boot, "netns": netns}


def record_of(vif, ipv6: bool, original: str, ifindex=None) -> dict:
    """What ``online`` made for ``vif`` (a plan.Vif), as a record; with the
    interface's ifindex, which proves a later run's interface the same one
    (an optional key: records without it stay version 1)."""
    return {"ifindex": ifindex,
        "name": vif.name, "original": original, "domid": vif.domid, "devid": vif.devid,
        "type": vif.vif_type, "mac": vif.mac, "addresses": [str(a) for a in vif.addresses],
        "gateway": str(vif.gateway) if vif.gateway else None,
        "gateway6": str(vif.gateway6) if vif.gateway6 else None,
        "xenbus_path": vif.xenbus_path, "ipv6": ipv6,
    }


def vif_of(record):
    """The inverse of :func:`record_of` -> (plan.Vif, ipv6 enabled)."""
    from ipaddress import ip_address

    from .plan import Vif

    def addr(key):
        return ip_address(record[key]) if record.get(key) else None

    vif = Vif(
        name=record["name"], domid=record["domid"], devid=record.get("devid", 0),
        vif_type=record.get("type") or "vif", mac=record.get("mac"),
        addresses=tuple(ip_address(a) for a in record.get("addresses") or ()),
        gateway=addr("gateway"), gateway6=addr("gateway6"), xenbus_path=record.get("xenbus_path"),
    )
    return vif, record.get("ipv6", True)


def path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}.json")


def load(directory: str, name: str):
    """The record for ``name``, or None if absent, unreadable or stale."""
    try:
        with open(path(directory, name)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    record = upgrade(record)
    if record is None:
        return None
    ident = _identity()
    if record.get("boot_id") != ident["boot_id"] or record.get("netns") != ident["netns"]:
        return None
    return record


def upgrade(record):
    """``record`` in the current format, or None when it cannot be read."""
    if not isinstance(record, dict):
        return None
    version = record.get("version")
    while isinstance(version, int) and not isinstance(version, bool) and version < VERSION and version in UPGRADES:
        record = UPGRADES[version](dict(record))
        version = record.get("version")
    return record if version == VERSION and type(version) is int else None


def save(directory: str, name: str, record: dict) -> None:
    data = dict(record, version=VERSION, **_identity())
    target = path(directory, name)
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(data, f, sort_keys=True)
        os.replace(tmp, target)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise Failure(f"cannot write state record {target}: {exc.strerror}") from None


def others(directory: str, name: str) -> bool:
    """Whether a vif other than ``name`` has a record in ``directory``
    (read or not: an unreadable one still counts)."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return False
    return any(e.endswith(".json") and e != f"{name}.json" for e in entries)


def remove(directory: str, name: str) -> None:
    try:
        os.unlink(path(directory, name))
    except FileNotFoundError:
        pass
