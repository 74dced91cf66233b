"""The fast import of plumbum's local machine (vif_route_qubes._plumbum)
with both plumbum lines the project meets: pip's 2.x (the test venv) and
Debian 12's python3-plumbum 1.8 (the system python3, as the packages run it;
tests/install-packages installs it, and tests/test_debian.py runs the
installed packages in a Debian chroot too).

Each run checks what the hotplug path depends on: the machine runs a
command, the package ``__init__`` files of plumbum were skipped (no colour
library, no SSH/Paramiko machines), ``urllib.request`` is still the
stand-in, ``platform``'s lazy processor field did not cost a ``uname -p``
and a later plain ``import plumbum`` gets the real package."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"

PROBE = r"""
import json, sys
from vif_route_qubes import _plumbum
m = _plumbum.local()
out = m["echo"]("from", "plumbum").strip()
loaded = sorted(sys.modules)
real_urllib = bool(getattr(sys.modules.get("urllib.request"), "__file__", None))
import plumbum
print(json.dumps({
    "out": out, "version": plumbum.__version__, "plumbum_file": plumbum.__file__,
    "module_file": _plumbum.__file__,
    "colors": any(n.startswith("plumbum.colorlib") for n in loaded),
    "ssh": any(n.startswith(("plumbum.machines.ssh_machine", "plumbum.machines.paramiko")) for n in loaded),
    "real_urllib_before": real_urllib,
    "http": any(n in ("http.client", "ssl", "email") for n in loaded),
    "full_import_has_cmd": hasattr(plumbum, "cmd"),
}))
"""


def probe(python, env=None):
    res = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, cwd="/", env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def check(report):
    assert report["out"] == "from plumbum"
    assert not report["colors"] and not report["ssh"]
    assert not report["real_urllib_before"] and not report["http"]
    assert report["full_import_has_cmd"]


def test_with_pips_plumbum_2_in_the_venv():
    report = probe(sys.executable)
    assert report["version"].split(".")[0] == "2", report
    assert report["module_file"].startswith(str(ROOT)), report
    check(report)


def test_with_debians_plumbum_1_8_under_the_system_python():
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.fail(f"{SYSTEM_PYTHON} is missing")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "LC_ALL": "C.UTF-8"}
    report = probe(SYSTEM_PYTHON, env)
    assert report["plumbum_file"].startswith("/usr/lib/python3/dist-packages/"), (
        f"not Debian's python3-plumbum: {report['plumbum_file']} (apt-get install python3-plumbum)")
    assert report["version"].startswith("1.8"), report
    check(report)
