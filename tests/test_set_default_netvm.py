"""qvm-set-default-netvm: the xl.conf edit (pure: text in, text out) and the
command as a real process against the XenStore wire-protocol server. Under
a real Xen, tests/e2e proves that xl then puts a guest's vif on the netvm
with our script."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vif_route_qubes import set_default_netvm as S
from vif_route_qubes.errors import Failure

BIN = Path(sys.executable).parent

# Shaped like the xl.conf Debian's xen-utils-common installs: every setting
# commented out, each with a line saying what it does.
DEBIAN_LIKE = """\
## xl's host-wide settings ##

# balloon dom0 down when a domain does not fit
#autoballoon="auto"

# the backend domain of guests' vifs (any domain identifier)
#vif.default.backend="0"

# the vif hotplug script used when a guest's vif line names none
#vif.default.script="vif-bridge"

# the bridge for vif-bridge
#vif.default.bridge="xenbr0"
"""


def test_current_reads_as_libxlu_does():
    assert S.current(DEBIAN_LIKE) == {}
    text = 'a = "x" # note\nb=1; c=[ "p", \'q\',\n  "r", ]\na = \'y\'\nd="1"\nd+="2"\n'
    assert S.current(text) == {"a": "y", "b": "1", "c": ["p", "q", "r"], "d": "12"}


def test_set_on_debians_file_goes_under_the_examples_and_keeps_every_other_line():
    new = S.render(DEBIAN_LIKE, {S.BACKEND: "netvm", S.SCRIPT_KEY: "vif-route-qubes"})
    assert new == DEBIAN_LIKE.replace(
        '#vif.default.backend="0"\n', '#vif.default.backend="0"\nvif.default.backend="netvm"\n').replace(
        '#vif.default.script="vif-bridge"\n',
        '#vif.default.script="vif-bridge"\nvif.default.script="vif-route-qubes"\n')
    assert S.current(new) == {S.BACKEND: "netvm", S.SCRIPT_KEY: "vif-route-qubes"}
    # idempotent: the same values again change nothing
    assert S.render(new, {S.BACKEND: "netvm", S.SCRIPT_KEY: "vif-route-qubes"}) == new
    # and back to dom0: only the value changes
    back = S.render(new, {S.BACKEND: "0", S.SCRIPT_KEY: "vif-route-qubes"})
    assert back == new.replace('vif.default.backend="netvm"', 'vif.default.backend="0"')


def test_only_the_last_assignment_is_rewritten_in_place_with_its_comment():
    text = ('vif.default.backend = "old"   # first, dead\n'
            'autoballoon="off"; vif.default.backend += \'x\' ; lockfile="/var/lock/xl"  # keep me\n'
            "vif.default.script='vif-route'\n")
    new = S.render(text, {S.BACKEND: "netvm", S.SCRIPT_KEY: "vif-route-qubes"})
    assert new == ('vif.default.backend = "old"   # first, dead\n'
                   'autoballoon="off"; vif.default.backend="netvm" ; lockfile="/var/lock/xl"  # keep me\n'
                   'vif.default.script="vif-route-qubes"\n')
    assert S.current(new)[S.BACKEND] == "netvm"
    assert S.current(new)["lockfile"] == "/var/lock/xl"


def test_a_file_without_the_keys_gets_them_at_the_end():
    assert S.render("", {S.BACKEND: "0", S.SCRIPT_KEY: "vif-route-qubes"}) == (
        f"# {S.TAG}: guests' vifs without backend=/script= go to this domain\n"
        'vif.default.backend="0"\nvif.default.script="vif-route-qubes"\n')
    new = S.render('claim_mode=1', {S.BACKEND: "netvm", S.SCRIPT_KEY: "vif-route-qubes"})
    assert new.startswith("claim_mode=1\n# ") and S.current(new)["claim_mode"] == "1"


@pytest.mark.parametrize("text, line", [
    ('vif.default.backend = \n"x"\nfoo\n', 3),
    ('a="unterminated\n', 1),
    ('a = "x" "y"\n', 1),
    ('ok=1\nc = [ "p" \n', 3),
    ('a == 1\n', 1),
])
def test_a_file_xl_cannot_read_is_refused_with_its_line(text, line):
    with pytest.raises(Failure, match=rf"line {line}: .*nothing changed"):
        S.render(text, {S.BACKEND: "netvm", S.SCRIPT_KEY: "vif-route-qubes"})


@pytest.mark.parametrize("name", ['net"vm', "a b", "x\\y", "", "n" * 65, "vm\n"])
def test_names_that_cannot_be_written_between_quotes_are_refused(name):
    with pytest.raises(Failure, match="not a domain name"):
        S.backend_value(name)


def test_dom0_is_written_as_domain_zero():
    assert [S.backend_value(n) for n in ("dom0", "Domain-0", "0")] == ["0", "0", "0"]


# ---------------------------------------------------------------- the command


@pytest.fixture
def xen(xenstored, tmp_path):
    xenstored.write("/local/domain/0/name", "Domain-0")
    xenstored.write("/local/domain/1/name", "netvm")
    xenstored.write("/local/domain/1/libxl", "")  # libxl's mark of driver_domain = 1
    xenstored.write("/local/domain/2/name", "work")
    conf = tmp_path / "xl.conf"
    conf.write_text(DEBIAN_LIKE)
    return xenstored, conf


def run(conf, *args, xs=None):
    env = dict(os.environ, QVM_SET_DEFAULT_NETVM_XL_CONF=str(conf))
    env["XENSTORED_PATH"] = xs.socket_path if xs else "/nonexistent/xenstored.sock"
    return subprocess.run([str(BIN / "qvm-set-default-netvm"), *args], env=env,
                          capture_output=True, text=True, timeout=30)


def test_set_show_idempotent_and_back_to_dom0(xen):
    xs, conf = xen
    shown = run(conf, "--show")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "vif.default.backend=0 (dom0: not set)\nvif.default.script=vif-bridge (not set)\n"

    res = run(conf, "netvm", xs=xs)
    assert res.returncode == 0, res.stderr
    assert "vif.default.backend=\"netvm\"" in res.stdout
    assert S.current(conf.read_text()) == {S.BACKEND: "netvm", S.SCRIPT_KEY: "vif-route-qubes"}
    assert run(conf, "--show").stdout == "vif.default.backend=netvm\nvif.default.script=vif-route-qubes\n"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644
    assert sorted(p.name for p in conf.parent.iterdir()) == ["xl.conf"]  # no temporary left

    before = conf.stat()
    again = run(conf, "netvm", xs=xs)
    assert again.returncode == 0 and "already" in again.stdout
    assert conf.stat().st_ino == before.st_ino and conf.stat().st_mtime_ns == before.st_mtime_ns

    res = run(conf, "dom0", xs=xs)
    assert res.returncode == 0, res.stderr
    assert run(conf, "--show").stdout == "vif.default.backend=0\nvif.default.script=vif-route-qubes\n"
    # every line of the original is still there, in order
    lines = conf.read_text().splitlines()
    assert [ln for ln in lines if ln in DEBIAN_LIKE.splitlines()] == DEBIAN_LIKE.splitlines()


def test_dom0_needs_no_xenstore(xen):
    _, conf = xen
    res = run(conf, "dom0")
    assert res.returncode == 0, res.stderr
    assert S.current(conf.read_text())[S.BACKEND] == "0"


def test_by_domid(xen):
    xs, conf = xen
    assert run(conf, "1", xs=xs).returncode == 0
    assert S.current(conf.read_text())[S.BACKEND] == "1"


@pytest.mark.parametrize("name, reason", [
    ("nosuch", "no domain named 'nosuch' (running: Domain-0, netvm, work); nothing changed"),
    ("work", "work (domain 2) is not a driver domain: libxl made no /local/domain/2/libxl for it; "
             "set driver_domain = 1 in its xl.cfg and recreate it; nothing changed"),
    ('bad"name', "'bad\"name' is not a domain name"),
])
def test_refused_domains_leave_the_file_alone(xen, name, reason):
    xs, conf = xen
    res = run(conf, name, xs=xs)
    assert res.returncode == 1
    assert res.stderr.startswith(f"{S.TAG}: {reason}") and res.stderr.count("\n") == 1
    assert conf.read_text() == DEBIAN_LIKE


def test_no_xenstore_is_one_line(xen):
    _, conf = xen
    res = run(conf, "netvm")
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "XenStore" in res.stderr
    assert conf.read_text() == DEBIAN_LIKE


def test_unparsable_file_is_refused(xen):
    xs, conf = xen
    conf.write_text("oops oops\n")
    res = run(conf, "netvm", xs=xs)
    assert res.returncode == 1 and "line 1" in res.stderr
    assert conf.read_text() == "oops oops\n"


def test_dry_run_prints_the_new_file(xen):
    xs, conf = xen
    res = run(conf, "-n", "netvm", xs=xs)
    assert res.returncode == 0
    assert S.current(res.stdout)[S.BACKEND] == "netvm"
    assert conf.read_text() == DEBIAN_LIKE


def test_usage(xen):
    _, conf = xen
    assert run(conf).returncode == 2
    assert run(conf, "--show", "netvm").returncode == 2
