"""The firewall seam: which backend renders and applies the anti-spoofing
(vif-route-qubes) and DNS DNAT (qubes-setup-dnat-to-ns) rules.

Two backends render the same plan data: ``iptables`` (iptables-restore /
ip6tables-restore payloads, one chain pair per vif) and ``nft`` (one
``nft -f -`` transaction for both families, Qubes' nftables-era layout with
sets, so a packet's cost does not grow with the number of guests). The
choice is made once per run, here, and nowhere else; the tools never branch
on the backend's name.

``VIF_ROUTE_QUBES_FIREWALL`` (or each tool's ``--firewall``) selects:
``iptables``, ``nft`` or ``auto`` (the default): nft wherever the ``nft``
command is installed, iptables otherwise. ``VIF_ROUTE_QUBES_IPTABLES``
(nft or legacy) is a different, older knob: which *flavour* of the iptables
commands the iptables backend runs.
"""


from ..validate import setting as chosen
from ..system import which

CHOICES = ("iptables", "nft", "auto")
ENV = "VIF_ROUTE_QUBES_FIREWALL"


def installed(env, prog) -> bool:
    """``prog`` is an executable on PATH or in an sbin directory."""
    return which(prog, env.get("PATH") or "") is not None


def _have_nft(env) -> bool:
    return installed(env, "nft")


def choose(env, requested=None):
    """-> (backend name, reason): the one decision, for the log, the dry
    run and ``status`` to show. ``requested`` is a command-line option and
    wins over the environment."""
    setting, where = chosen(env, ENV, CHOICES, "auto", requested, "--firewall")
    if setting != "auto":
        return setting, f"{where}={setting}"
    if _have_nft(env):
        return "nft", f"{where} auto: the nft command is installed (sets keep per-packet cost flat)"
    return "iptables", f"{where} auto: no nft command found"


def backend_for(sys_, env, requested=None):
    """The backend object a run works through: a
    :class:`.contract.VifGuard`, whose methods the contract declares (only
    the chosen backend's module is imported)."""
    from .contract import guard_class

    name, reason = choose(env, requested)
    return guard_class(name)(sys_, reason)


def other(name):
    """The backend that is not ``name`` (to find its leftovers)."""
    return "iptables" if name == "nft" else "nft"


def recorded_backend(sys_, env, record, current):
    """The backend that guarded a vif according to its state record, when it
    is not ``current`` (None otherwise). Records written before the record
    named its backend are iptables ones: there was no other."""
    if not record:
        return None
    was = record.get("firewall") or "iptables"
    if was == current.name or was not in ("iptables", "nft"):
        return None
    return backend_for(sys_, env, was)
