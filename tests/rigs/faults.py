"""Fault injection for the rollback tests, kept out of the product.

``VIF_ROUTE_QUBES_FAIL_AT=N`` in a run's environment makes the N-th
mutating action of one :class:`~vif_route_qubes.system.System` (a command,
a file write, a XenStore write: every place the product calls
``System.before_change``) fail as if the command had exited 99, so every
step of ``online`` (and of ``qvm-dom0-network-via-netvm up``) can be failed
once and the host checked to end as it began.

The product's hook does nothing; :func:`install` replaces it in this
process. ``python -m tests.rigs.faults TOOL ARGS...`` runs an installed
console script with faults installed, and :func:`command` gives the argv
(and environment) that runs a tool that way exactly when the environment
asks for a fault.
"""

import os
import sys
from importlib.metadata import entry_points

from vif_route_qubes.errors import CommandFailed
from vif_route_qubes.system import System

ENV = "VIF_ROUTE_QUBES_FAIL_AT"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def install(env=None) -> None:
    """Make System's N-th change fail, N from ``env`` (default: os.environ)."""
    value = (os.environ if env is None else env).get(ENV, "")
    if not value.isdigit():
        return
    fail_at = int(value)

    def before_change(self, what):
        self._changes = getattr(self, "_changes", 0) + 1
        if self._changes == fail_at:
            raise CommandFailed(what, 99, f"injected fault ({ENV}={fail_at})")

    System.before_change = before_change


def command(script, env):
    """-> (argv prefix, env) that run the console script at path ``script``:
    the script itself, or, when ``env`` names a fault, this module with it."""
    if ENV not in env:
        return [script], env
    path = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return [sys.executable, "-m", "tests.rigs.faults", os.path.basename(script)], dict(env, PYTHONPATH=path)


def main(argv) -> None:
    if not argv:
        sys.exit("usage: python -m tests.rigs.faults TOOL [ARGS...]")
    found = [ep for ep in entry_points(group="console_scripts") if ep.name == argv[0]]
    if not found:
        sys.exit(f"{argv[0]}: no such console script installed")
    install()
    sys.argv = argv
    sys.exit(found[0].load()())


if __name__ == "__main__":
    main(sys.argv[1:])
