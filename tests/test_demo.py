"""The README's "real job": the demo as its command runs it (``python -m
tests.rigs.demo`` from the checkout, as root), ending in exit 0 with the seed's routes, a good
packet routed, a forged one dropped and nothing of a vif left."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_the_real_job_and_leaves_nothing():
    res = subprocess.run([sys.executable, "-m", "tests.rigs.demo"], capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = res.stdout
    for addr, vif in (("10.2.0.16", "vif4.0"), ("10.2.0.7", "vif10.0"), ("10.2.0.12", "vif3.0")):
        assert any(line.split()[:1] == [addr] and line.split()[-1] == vif for line in out.splitlines()), out
    assert "from its own address: arrived, source 10.2.0.12" in out
    assert "from a forged address 10.2.0.99: dropped at the netvm" in out
    assert "-A vrq-guard -i vif3.0 -g vrq-in-vif3.0" in out
    assert "All five offline: 0 rules of a vif left (the idle guard stays), routes left: 0" in out
