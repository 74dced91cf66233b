#!/usr/bin/env python3
"""The start-up floor of a one-shot Python tool, ours against Qubes'
qubes-setup-dnat-to-ns, measured side by side (interleaved rounds):

* the interpreter alone (ours: the measured venv of benchmarks/run.py,
  Debian's /usr/bin/python3 inside; Qubes': /usr/bin/python3);
* + plumbum's local machine, which the brief keeps on every tool's path;
* + the rest of what our DNAT imports;
* Qubes': + ``import dbus, qubesdb`` (its two C extensions).

What remains of a DNAT run above these is the work itself (reading,
listing, ``nft``). Run after benchmarks/run.py has made its venv and built
QubesDB (the defaults below); nothing is changed, no root needed.

    python3 benchmarks/floor.py [--venv /tmp/vrq-bench-venv] [--qubesdb PREFIX] [--rounds 40]
"""

import argparse
import os
import statistics
import subprocess
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default="/tmp/vrq-bench-venv")
    ap.add_argument("--qubesdb", default="/var/cache/vif-route-qubes-bench/qubesdb",
                    help="a QubesDB build (its python/ holds the qubesdb module)")
    ap.add_argument("--rounds", type=int, default=40)
    opts = ap.parse_args()
    ours = os.path.join(opts.venv, "bin", "python")
    cases = [
        ("ours: interpreter", [ours, "-c", "pass"]),
        ("ours: + plumbum's local machine", [ours, "-c", "from vif_route_qubes._plumbum import local; local()"]),
        ("ours: + everything the DNAT imports", [ours, "-c", "from vif_route_qubes._plumbum import local; local(); "
                                                 "from vif_route_qubes import dnat, config, qubesdb, system, log"]),
        ("qubes: interpreter", ["/usr/bin/python3", "-c", "pass"]),
        ("qubes: + import dbus, qubesdb", ["/usr/bin/python3", "-c", "import dbus, qubesdb"]),
    ]
    env = dict(os.environ, PYTHONPATH=os.path.join(opts.qubesdb, "python"))
    times = {name: [] for name, _ in cases}
    for _ in range(opts.rounds):
        for name, argv in cases:
            start = time.perf_counter()
            subprocess.run(argv, env=env, check=True, cwd="/")
            times[name].append((time.perf_counter() - start) * 1000)
    for name, _ in cases:
        print(f"{name:40s} median {statistics.median(times[name]):6.1f} ms")


if __name__ == "__main__":
    main()
