"""The click side: --help everywhere, committed man pages equal to the
generator's output, shell completion."""

import os
import re
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from vif_route_qubes import manpages
from vif_route_qubes.cli import vif_route_qubes
from tests.rigs.netns import _script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAN = os.path.join(ROOT, "man")


@pytest.mark.parametrize("args", [[], ["online"], ["offline"], ["add"], ["remove"]])
def test_hotplug_help_names_environment_and_xenstore_keys(args):
    res = CliRunner().invoke(vif_route_qubes, [*args, "--help"])
    assert res.exit_code == 0, res.output
    for word in ("XENBUS_PATH", "vif ", "XENSTORED_PATH", "VIF_ROUTE_QUBES_STATE_DIR", "VIF_ROUTE_QUBES_DEBUG",
                 "VIF_ROUTE_QUBES_SYSLOG", "VIF_ROUTE_QUBES_HOTPLUG_LOG",
                 "$XENBUS_PATH/ip", "$XENBUS_PATH/mac", "qubes_netvm_gateway"):
        assert word in res.output, (args, word)
    # offline does not write hotplug-status, and its help does not claim it
    if args and args[0] in ("offline", "remove"):
        assert "hotplug-status" not in res.output and "writes nothing to XenStore" in res.output
    else:
        assert "$XENBUS_PATH/hotplug-status" in res.output
    if args:
        assert "--dry-run" in res.output and "--verbose" in res.output


def test_group_help_lists_every_command():
    res = CliRunner().invoke(vif_route_qubes, ["-h"])
    assert res.exit_code == 0
    for name in ("online", "offline", "add", "remove", "status"):
        assert f"  {name} " in res.output
    assert "syslog (facility daemon, tag vif-route-qubes)" in res.output


def test_status_help():
    res = CliRunner().invoke(vif_route_qubes, ["status", "--help"])
    assert res.exit_code == 0
    for word in ("--json", "[VIF]...", "ok, missing or unexpected", "VIF_ROUTE_QUBES_STATE_DIR", "XENSTORED_PATH",
                 "hotplug-status", "qubes_netvm_gateway"):
        assert word in res.output, word


def test_every_program_has_help_with_its_environment():
    for prog, spec in manpages.PROGRAMS:
        cmd = manpages.load(spec)
        if cmd is None:
            continue
        res = CliRunner().invoke(cmd, ["--help"], prog_name=prog)
        assert res.exit_code == 0, (prog, res.output)
        assert f"Usage: {prog}" in res.output and "Environment" in res.output, prog


def test_usage_errors_exit_2():
    res = CliRunner().invoke(vif_route_qubes, ["online", "bogus"])
    assert res.exit_code == 2 and "unexpected word 'bogus'" in res.output


def test_committed_man_pages_match_the_generator():
    generated = manpages.pages()
    assert "vif-route-qubes.1" in generated
    committed = {f: open(os.path.join(MAN, f)).read() for f in os.listdir(MAN) if f.endswith(".1")}
    assert sorted(committed) == sorted(generated), "run: python -m vif_route_qubes.manpages man"
    for name, text in generated.items():
        assert committed[name] == text, f"man/{name} is stale: run python -m vif_route_qubes.manpages man"


def test_man_page_content_and_roff(tmp_path):
    res = subprocess.run([sys.executable, "-m", "vif_route_qubes.manpages", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    page = (tmp_path / "vif-route-qubes.1").read_text()
    assert page.startswith('.TH "VIF-ROUTE-QUBES" "1"')
    for section in (".SH NAME", ".SH SYNOPSIS", ".SH DESCRIPTION", ".SH OPTIONS", ".SH COMMANDS",
                    '.SS "vif-route-qubes status"', ".SH SHELL COMPLETION", ".SH SEE ALSO"):
        assert section in page, section
    assert "\\fB\\-\\-dry\\-run\\fR" in page and "_VIF_ROUTE_QUBES_COMPLETE=bash_source" in page
    # groff accepts every page without a warning
    for f in sorted(tmp_path.iterdir()):
        check = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(f)], capture_output=True, text=True)
        assert check.returncode == 0 and check.stderr == "", (f.name, check.stderr)
    rendered = subprocess.run(["groff", "-man", "-Tascii", str(tmp_path / "vif-route-qubes.1")],
                              capture_output=True, text=True).stdout
    rendered = re.sub(".\b", "", rendered)  # overstrike bold/underline
    assert "VIF_ROUTE_QUBES_STATE_DIR" in rendered and "vif-route-qubes status [OPTIONS] [VIF]..." in rendered


def test_generator_is_generic():
    @click.group(help="A tool.\n\nIt does things.\n\n\b\nEnvironment:\n  FOO  a variable")
    @click.option("--level", metavar="N", help="How much.")
    def tool(level):
        pass

    @tool.command(help="Sub-command one. More text.")
    @click.argument("thing")
    @click.option("-x", is_flag=True, help="Be x.")
    def one(thing, x):
        pass

    page = manpages.render("some-tool", tool)
    assert "some\\-tool \\- A tool" in page
    assert ".SS \"some-tool one\"" in page and "\\fB\\-x\\fR" in page and "\\fB\\-\\-level\\fR \\fIN\\fR" in page
    # the environment table is the ENVIRONMENT section, after the commands
    assert ".SH ENVIRONMENT\n.PP\nEnvironment:\n.PP\n.nf\n  FOO  a variable\n.fi" in page
    assert page.index(".SS \"some-tool one\"") < page.index(".SH ENVIRONMENT")
    assert "Environment: see ENVIRONMENT below." in page
    assert "SHELL COMPLETION" not in page
    page = manpages.render("some-tool", tool, extra={"EXIT STATUS": "0 fine", "FILES": "/etc/x"})
    assert ".SH EXIT STATUS\n.PP\n0 fine" in page and ".SH FILES\n.PP\n/etc/x" in page


def test_every_page_has_exit_status_environment_and_files():
    for name, page in manpages.pages().items():
        for section in ("EXIT STATUS", "ENVIRONMENT", "FILES"):
            assert f".SH {section}\n" in page, (name, section)
        assert "usage error" in page, name


def test_bash_completion_script():
    env = dict(os.environ, _VIF_ROUTE_QUBES_COMPLETE="bash_source")
    res = subprocess.run([_script("vif-route-qubes")], env=env, capture_output=True, text=True, timeout=20)
    assert res.returncode == 0, res.stderr
    assert "complete -o nosort -F _vif_route_qubes_completion vif-route-qubes" in res.stdout
    assert subprocess.run(["bash", "-n"], input=res.stdout, text=True).returncode == 0
    # and the script's callback completes our commands
    env = dict(os.environ, _VIF_ROUTE_QUBES_COMPLETE="bash_complete", COMP_WORDS="vif-route-qubes st", COMP_CWORD="1")
    res = subprocess.run([_script("vif-route-qubes")], env=env, capture_output=True, text=True, timeout=20)
    assert res.returncode == 0 and res.stdout.split() == ["plain,status"]
    # sourced in a real bash, it registers the completion function
    script = subprocess.run([_script("vif-route-qubes")], env=dict(os.environ, _VIF_ROUTE_QUBES_COMPLETE="bash_source"),
                            capture_output=True, text=True).stdout
    out = subprocess.run(["bash", "-c", script + "\ncomplete -p vif-route-qubes"], capture_output=True, text=True)
    assert "_vif_route_qubes_completion" in out.stdout


@pytest.mark.parametrize("prog,var", [
    ("qubes-setup-ip", "_QUBES_SETUP_IP_COMPLETE"),
    ("qubes-setup-dnat-to-ns", "_QUBES_SETUP_DNAT_TO_NS_COMPLETE"),
])
def test_completion_of_the_no_argument_commands_reaches_click(prog, var, tmp_path):
    """Their plain call is a real run; completion (also argument-less) must
    print a script instead of configuring anything."""
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), prog)
    env = dict(os.environ, **{var: "bash_source"}, XENSTORED_PATH=str(tmp_path / "none"))
    res = subprocess.run([exe], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "complete -o nosort -F" in res.stdout or "complete " in res.stdout
    assert f"_{prog.replace('-', '_')}_completion()" in res.stdout


DROP_IN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hotplug", "vif-route-qubes")


def test_drop_in_without_an_installed_command_says_where_it_looked(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "VIF_ROUTE_QUBES_PREFIX": str(tmp_path / "nowhere")}
    res = subprocess.run(["sh", DROP_IN, "online", "type_if=vif"], env=env, capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr == (f"vif-route-qubes: the vif-route-qubes command is not installed (not in "
                          f"{tmp_path / 'nowhere'}/bin, nor on PATH=/usr/bin:/bin); install the package "
                          "or set VIF_ROUTE_QUBES_PREFIX\n")


def test_drop_in_runs_the_installed_command(tmp_path):
    bindir = tmp_path / "prefix" / "bin"
    bindir.mkdir(parents=True)
    fake = bindir / "vif-route-qubes"
    fake.write_text('#!/bin/sh\necho "ran $*"\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "VIF_ROUTE_QUBES_PREFIX": str(tmp_path / "prefix")}
    res = subprocess.run(["sh", DROP_IN, "online", "type_if=vif"], env=env, capture_output=True, text=True)
    assert (res.returncode, res.stdout) == (0, "ran online type_if=vif\n"), res.stderr
