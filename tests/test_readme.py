"""The README's two commands stay true: CI runs exactly the test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _block_after(marker):
    text = (ROOT / "README.rst").read_text()
    tail = text[text.index(marker):]
    m = re.search(r"::\n\n    (.+)\n", tail)
    return m.group(1)


def test_ci_runs_the_readme_test_command():
    readme = _block_after("**Install and run the whole test suite**")
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip("\n").splitlines()[-1] == readme, "the last line of .ci/run must be the README's test command"
    assert readme.startswith("bash tests/install-packages && ")
    script = (ROOT / "tests" / "install-packages").read_text()
    for needed in ("nftables", "conntrack", "xenstore-utils", "systemd-resolved", "dbus-daemon", "qemu-system-x86",
                   "debhelper", "dh-python", "pybuild-plugin-pyproject", "lintian", "debootstrap"):
        assert needed in script


def test_demo_command_installs_and_runs_the_demo():
    demo = _block_after("**Install and run the real job**")
    assert demo.startswith("apt-get update && apt-get install -y ")
    assert demo.endswith("/opt/vif-route-qubes/bin/python -m tests.rigs.demo")
    # the demo is a tests-side program: nothing of it is installed
    assert "demo" not in (ROOT / "setup.cfg").read_text()
