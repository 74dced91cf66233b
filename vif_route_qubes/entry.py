"""The ``vif-route-qubes`` console script: the thinnest layer, above both
:mod:`.hotplug` (what a run does) and :mod:`.cli` (the click interface).

libxl and udev call it with a command word and ``key=value`` words only;
that form runs straight through :func:`.hotplug.run` without importing
click (half of a hotplug run's start-up cost, see benchmarks/README.md).
Anything else (``--help``, ``--dry-run``, ``status``, ...) goes through
:mod:`.cli`, which calls the same :func:`.hotplug.run`. Neither of the two
imports this module or each other's entry: the import graph points down.
"""

import os
import sys

from . import hotplug
from .errors import Failure
from .system import leave


def machine_form(argv) -> bool:
    """Xen's form: words only (no option), one of them a command."""
    return bool(argv) and all(not a.startswith("-") for a in argv) \
        and any(a in hotplug.COMMANDS for a in argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if machine_form(argv):
        try:
            command, variables = hotplug.parse_words(argv)
        except Failure as exc:
            print(f"vif-route-qubes: {exc}", file=sys.stderr)
            sys.exit(1)
        leave(hotplug.run(command, variables, os.environ))
    from .cli import vif_route_qubes

    vif_route_qubes.main(args=argv, prog_name="vif-route-qubes")
