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

VERSION = 1


def _identity() -> dict:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        netns = 0
    return {"boot_id": boot, "netns": netns}


def path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}.json")


def load(directory: str, name: str):
    """The record for ``name``, or None if absent, unreadable or stale."""
    try:
        with open(path(directory, name)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("version") != VERSION:
        return None
    ident = _identity()
    if record.get("boot_id") != ident["boot_id"] or record.get("netns") != ident["netns"]:
        return None
    return record


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


def remove(directory: str, name: str) -> None:
    try:
        os.unlink(path(directory, name))
    except FileNotFoundError:
        pass
