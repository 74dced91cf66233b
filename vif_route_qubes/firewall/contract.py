"""The contract every firewall backend keeps, declared as types rather than
described in a docstring: the tools (hotplug, status, the DNAT) work only
through these methods, and a backend that lacks one cannot be instantiated
(``abc`` refuses), so a renderer added later cannot silently miss a duty.

A backend is two renderers of the same plans: a :class:`VifGuard` (the
anti-spoofing of one vif) and a :class:`DnsRules` (the DNAT of the virtual
nameservers). The registry below names them; only the chosen backend's
modules are imported. ``abc`` is loaded by every Python start already, so
this costs the hot path nothing.
"""

import abc
import importlib

# backend name -> (module of its VifGuard class ``Backend``, module of its
# DNS renderer: ``NAME``, ``OWNED``, ``Listing``, ``changes``, ``in_force``,
# held to DnsRules by :class:`_ModuleRules`), under vif_route_qubes.firewall
REGISTRY = {
    "iptables": ("iptables", "dns_iptables"),
    "nft": ("nft", "dns_nft"),
}


class VifGuard(abc.ABC):
    """The anti-spoofing of vifs: a guest's packets leave its vif only with
    its own addresses, everything else from a vif is dropped."""

    name = ""
    # runs of different vifs may apply side by side (one atomic transaction
    # per vif: the host lock is then held shared, see vif_route_qubes.lock)
    concurrent = False
    tools = ()  # the commands it runs, for "what is missing" reports
    state_dir = None  # where it may keep hints across runs (hotplug sets it)

    @abc.abstractmethod
    def apply(self, vif, previous):
        """Guard ``vif`` (a plan.Vif); on failure, ``previous``'s guard (or
        nothing of ours) is back in place before the Failure propagates."""

    @abc.abstractmethod
    def remove(self, name, known=None, alone=False) -> list:
        """Remove everything of ours for interface ``name`` -> descriptions
        of what was removed. Never raises for what it finds; a missing tool
        is a Failure the caller reports (offline still exits 0). ``known``:
        the addresses the state record names (spares a read). ``alone``: the
        host's last vif, the host lock held exclusively: the host-wide
        bookkeeping of ours that then holds nothing goes in the same step,
        never what guards (the default deny outlives every guest)."""

    @abc.abstractmethod
    def addresses(self, name) -> list:
        """The guest addresses our rules for ``name`` hold in the kernel."""

    @abc.abstractmethod
    def check(self, vif, name) -> list:
        """[(verdict, item, detail)] for ``status``; ``vif`` None: nothing
        of ours is expected."""

    @abc.abstractmethod
    def denies(self, vif) -> list:
        """[(item, detail)]: this backend's default deny, left on the host
        while the other backend is chosen, in force for ``vif``."""

    @abc.abstractmethod
    def accelerate(self, state_dir, leaving=None):
        """Rebuild the forwarding flowtable where there is one -> a
        description or None; never raises."""

    @abc.abstractmethod
    def moved_away(self):
        """What of this backend stays on the host once no vif uses it."""

    @abc.abstractmethod
    def prefetch(self):
        """Start the read ``check``/``addresses`` need (status overlaps them)."""

    @abc.abstractmethod
    def read_errors(self) -> list:
        """Why the kernel's rules could not be read, if they could not."""

    @abc.abstractmethod
    def owners(self) -> set:
        """The interface names our rules exist for."""


class DnsRules(abc.ABC):
    """The DNAT of the virtual nameservers DNS1/DNS2 (and their IPv6 pair)."""

    name = ""
    owned = ""  # what of the firewall it owns, for --status

    @abc.abstractmethod
    def listing(self, s):
        """Start reading the rules in force -> an object whose ``wait()``
        gives the listing."""

    @abc.abstractmethod
    def changes(self, s, plan, listed) -> list:
        """The calls that take the rules in force to ``plan`` (none when
        they are right already)."""

    @abc.abstractmethod
    def in_force(self, listed) -> dict:
        """{version: [rule lines]} in force, for --status."""


def guard_class(name) -> type:
    module = importlib.import_module(f"{__package__}.{REGISTRY[name][0]}")
    return module.Backend


class _ModuleRules(DnsRules):
    """A DNS renderer module behind DnsRules: the module keeps plain
    functions (its golden tests call them), this one class keeps the
    contract, and refuses a module that lacks a part of it."""

    PARTS = ("NAME", "OWNED", "Listing", "changes", "in_force")

    def __init__(self, module):
        missing = [p for p in self.PARTS if not hasattr(module, p)]
        if missing:
            raise TypeError(f"{module.__name__} does not keep the DnsRules contract: no {', '.join(missing)}")
        self.module, self.name, self.owned = module, module.NAME, module.OWNED

    def listing(self, s):
        return self.module.Listing(s)

    def changes(self, s, plan, listed):
        return self.module.changes(s, plan, listed)

    def in_force(self, listed):
        return self.module.in_force(listed)


def dns_rules(name) -> DnsRules:
    return _ModuleRules(importlib.import_module(f"{__package__}.{REGISTRY[name][1]}"))
