"""dom0's view of XenStore, shared by the dom0 tools (qvm-dom0-network-via-netvm
and vif-route-qubes-keys): which domains exist, a netvm's Qubes keys, and
dom0-owned writes. A thin layer over :class:`vif_route_qubes.xs.XenStore`,
which stays the one pyxs user.

Every path read here is written by dom0 or libxl (docs/configuration.md, the trust
table): ``/local/domain/D/name`` (the toolstack), ``/local/domain/N/qubes_netvm_*``
(dom0's keys tool, owner dom0), ``/local/domain/N/backend/...`` (libxl; the
backend domain may write its own backend directory, which is why the values
read from there are validated).
"""

import ipaddress

from .errors import Failure

# The netvm's own keys (dom0 writes them under its home; our hotplug script
# reads qubes_netvm_gateway there) and the guest's keys (qubes-setup-ip).
NETVM_KEYS = ("qubes_netvm_gateway", "qubes_netvm_primary_dns", "qubes_netvm_secondary_dns")
GUEST_KEYS = ("qubes_ip", "qubes_netmask", "qubes_gateway", "qubes_primary_dns", "qubes_secondary_dns")


def perms_for(domid: int) -> list:
    """Owner dom0, nobody else, read for the domain itself: a guest reads its
    own keys, cannot change them, and no other domain reads them."""
    return ["n0", f"r{domid}"]


class Dom0Store:
    """The XenStore reads and writes of the dom0 tools."""

    def __init__(self, env):
        from .xs import XenStore

        self.xs = XenStore(env=env)

    def close(self):
        self.xs.close()

    def domains(self) -> dict:
        """{domid: name} of every domain XenStore knows."""
        ids = [d for d in (self.xs.ls("/local/domain") or []) if d.isdigit()]
        names = self.xs.read_many([f"/local/domain/{d}/name" for d in ids])
        return {int(d): names[f"/local/domain/{d}/name"] or ("Domain-0" if d == "0" else f"domain-{d}")
                for d in ids}

    def resolve(self, who: str):
        """(domid, name) for a name or a domid, or Failure."""
        doms = self.domains()
        if who.isdigit() and int(who) in doms:
            return int(who), doms[int(who)]
        hits = [d for d, n in doms.items() if n == who]
        if not hits:
            raise Failure(f"no domain named {who!r} (running: {', '.join(sorted(doms.values()))})")
        return hits[0], who

    def served(self, domid: int) -> list:
        """Frontend domids whose vifs this domain is the backend of."""
        return [int(d) for d in (self.xs.ls(f"/local/domain/{domid}/backend/vif") or []) if d.isdigit()]

    def backend_ips(self, domid: int) -> list:
        base = f"/local/domain/{domid}/backend/vif"
        paths = []
        for front in self.xs.ls(base) or []:
            for dev in self.xs.ls(f"{base}/{front}") or []:
                paths.append(f"{base}/{front}/{dev}/ip")
        ips = []
        for value in self.xs.read_many(paths).values():
            for word in (value or "").split():
                try:
                    ips.append(str(ipaddress.ip_address(word)))
                except ValueError:
                    pass
        return ips

    def netvm_values(self, domid: int) -> dict:
        values = self.xs.read_many([f"/local/domain/{domid}/{k}" for k in NETVM_KEYS])
        return {k: values[f"/local/domain/{domid}/{k}"] for k in NETVM_KEYS}

    def dom0_vifs(self) -> dict:
        """{devid: backend-id} of dom0's own vif frontends."""
        devs = [d for d in (self.xs.ls("/local/domain/0/device/vif") or []) if d.isdigit()]
        ids = self.xs.read_many([f"/local/domain/0/device/vif/{d}/backend-id" for d in devs])
        return {int(d): ids[f"/local/domain/0/device/vif/{d}/backend-id"] for d in devs}

    def set_perms(self, path: str, perms) -> None:
        self.xs.set_perms(path, perms)
