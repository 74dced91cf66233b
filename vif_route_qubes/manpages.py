"""Manual pages in roff, generated from the click definitions.

``python -m vif_route_qubes.manpages OUTDIR`` writes ``OUTDIR/PROG.1`` for
each program in :data:`PROGRAMS` whose module exists. The pages under
``man/`` are this output, committed; tests/test_cli.py checks they match.

Nothing here is specific to our commands: :func:`render` turns any click
``Command`` or ``Group`` (with its subcommands) into a page. Help text
follows click's conventions: paragraphs separated by blank lines are
filled, a paragraph starting with ``\\b`` is kept line for line. The output
carries no date or version, so it changes only when the help does.
"""

import importlib
import inspect
import os
import sys

import click

# (program, "module:attribute"); the attribute is a click command, or a
# function returning one (modules that build theirs lazily to keep click
# off their fast path). A module that does not exist yet is skipped.
PROGRAMS = (
    ("vif-route-qubes", "vif_route_qubes.cli:vif_route_qubes"),
    ("qubes-setup-dnat-to-ns", "vif_route_qubes.dnat:command"),
    ("qubes-setup-ip", "vif_route_qubes.setup_ip:command"),
    ("qvm-dom0-network-via-netvm", "vif_route_qubes.dom0_network:command"),
    ("vif-route-qubes-keys", "vif_route_qubes.keys:command"),
    ("qvm-set-default-netvm", "vif_route_qubes.set_default_netvm:command"),
)

# Programs whose argument-less call reaches click, so that click's
# completion variable works (a program whose plain call does real work must
# not be documented with it: the incantation would run that work).
COMPLETION = ("vif-route-qubes",)

SUITE = "vif-route-qubes"

# EXIT STATUS and FILES of each page come from a ``MAN_SECTIONS`` dict
# ({"EXIT STATUS": text, "FILES": text}, click's paragraph convention) in
# the program's module; these stand in for a module that has none. The
# ENVIRONMENT section is the help's own "Environment..." paragraph, moved.
FALLBACK_SECTIONS = {
    "qubes-setup-dnat-to-ns": {
        "EXIT STATUS": "\b\n"
        "0    the rules were changed (or, with --dry-run/--status, printed)\n"
        "100  the rules in force were already right: nothing was run\n"
        "1    failed (one line on stderr says why); the rules in force are untouched\n"
        "2    usage error (unknown option, --dry-run with --status, a bad --dns1/--dns2)",
        "FILES": "\b\n"
        "/etc/resolv.conf                    the upstream nameservers (--resolv-conf)\n"
        "/run/systemd/resolve/resolv.conf    systemd-resolved's real upstreams (--resolved-conf)\n"
        "/var/run/qubes/qubes-ns             old NS1=/NS2= file (--qubes-ns)\n"
        "/run/vif-route-qubes/lock           the lock shared with vif-route-qubes",
    },
    "qubes-setup-ip": {
        "EXIT STATUS": "\b\n"
        "0    configured, or nothing to do (no qubes_ip in XenStore)\n"
        "1    failed (one line on stderr says why)\n"
        "2    usage error (unknown option or argument)",
        "FILES": "\b\n"
        "/etc/resolv.conf    written with DNS1/DNS2 (--resolv-conf, QUBES_SETUP_IP_RESOLV_CONF)",
    },
    "qvm-dom0-network-via-netvm": {
        "EXIT STATUS": "\b\n"
        "0    done, or nothing to do (up when attached already, down without up)\n"
        "1    failed (one line on stderr says why); a failed up is rolled back, paused domains unpaused\n"
        "2    usage error (unknown option or command, a bad --timeout)",
        "FILES": "\b\n"
        "/run/vif-route-qubes/dom0-network.json    what up did (paused domains, the vif, saved files)\n"
        "/run/vif-route-qubes/dom0-network.lock    one up/down at a time\n"
        "/etc/resolv.conf                          written by up, restored by down (--resolv-conf)",
    },
    "vif-route-qubes-keys": {
        "EXIT STATUS": "\b\n"
        "0    the keys were written\n"
        "1    failed (one line on stderr says why); nothing written when the input was bad\n"
        "2    usage error (unknown option or command)",
        "FILES": "\b\n"
        "/var/run/xenstored/socket    XenStore (XENSTORED_PATH)",
    },
}


def load(spec):
    """The click command at ``module:attribute``, or None if the module does
    not exist. Falls back to any click command the module defines."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    obj = getattr(module, attr, None) if attr else None
    if obj is not None and not isinstance(obj, click.Command) and callable(obj):
        obj = obj()
    if isinstance(obj, click.Command):
        return obj
    found = [v for v in vars(module).values() if isinstance(v, click.Command)]
    return found[0] if found else None


# ----------------------------------------------------------------------------
# roff


def _esc(text: str) -> str:
    text = text.replace("\\", "\\e")
    lines = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def _opt(text: str) -> str:
    """An option or command name: bold, with real minus signs."""
    return "\\fB" + _esc(text).replace("-", "\\-") + "\\fR"


def _paragraphs(help_text: str):
    """(preformatted, text) pairs in click's paragraph convention."""
    text = inspect.cleandoc(help_text or "")
    out = []
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        if para.startswith("\b"):
            body = para[1:].lstrip("\n")
            out.append((True, body.rstrip()))
        else:
            out.append((False, " ".join(line.strip() for line in para.splitlines())))
    return out


def _body(help_text: str, seen=None) -> list:
    """``seen``: {preformatted paragraph: the section it is printed in} (a
    group's environment table repeated in each subcommand's --help is
    printed once, in its own section)."""
    lines = []
    for pre, text in _paragraphs(help_text):
        if pre and seen is not None and text in seen and "\n" in text:
            lines += [".PP", _esc(text.split("\n", 1)[0].rstrip(":")) + f": see {seen[text]}."]
            continue
        if pre and seen is not None:
            seen[text] = "DESCRIPTION above"
        if pre:
            lines += [".PP", ".nf", _esc(text), ".fi"]
        else:
            lines += [".PP", _esc(text)]
    return lines


def _synopsis(cmd, ctx) -> list:
    pieces = " ".join(cmd.collect_usage_pieces(ctx))
    return [".B " + _esc(ctx.command_path), _esc(pieces)] if pieces else [".B " + _esc(ctx.command_path)]


def _options(cmd, ctx) -> list:
    lines = []
    for param in cmd.get_params(ctx):
        if isinstance(param, click.Argument):
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        shown = []
        for n in names.split(","):
            flag, _, metavar = n.strip().partition(" ")
            shown.append(_opt(flag) + (" \\fI" + _esc(metavar) + "\\fR" if metavar else ""))
        lines += [".TP", ", ".join(shown)]
        lines.append(_esc(" ".join(help_text.split())) if help_text else "")
    return lines


def _name(prog: str) -> str:
    return _esc(prog).replace("-", "\\-")


def _short(cmd) -> str:
    """The NAME line: ``short_help``, else the help's first sentence, whole."""
    if cmd.short_help:
        return cmd.short_help.rstrip(".")
    paras = _paragraphs(cmd.help)
    first = paras[0][1] if paras else ""
    return first.split(". ", 1)[0].rstrip(".")


def _environment(cmd) -> list:
    """The help's "Environment..." tables: the page's ENVIRONMENT section."""
    return [text for pre, text in _paragraphs(cmd.help) if pre and text.startswith("Environment")]


def render(prog: str, cmd, section: int = 1, extra=None) -> str:
    """A complete man page for ``cmd`` run as ``prog``; ``extra``:
    {section title: help-style text} (EXIT STATUS, FILES)."""
    extra = extra if extra is not None else FALLBACK_SECTIONS.get(prog, {})
    # as click.Command.make_context would: context_settings decide, e.g., -h
    ctx = click.Context(cmd, info_name=prog, **cmd.context_settings)
    out = [
        f'.TH "{prog.upper()}" "{section}" "" "{SUITE}" "User Commands"',
        ".SH NAME",
        _name(prog) + " \\- " + _esc(_short(cmd)),
        ".SH SYNOPSIS",
        *_synopsis(cmd, ctx),
    ]
    subs = []
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                subs.append((name, sub))
        for name, sub in subs:
            sctx = click.Context(sub, info_name=name, parent=ctx, **sub.context_settings)
            out += [".br", *_synopsis(sub, sctx)]
    env = _environment(cmd)
    seen = {text: "ENVIRONMENT below" for text in env}
    out += [".SH DESCRIPTION", *_body(cmd.help, seen)]
    opts = _options(cmd, ctx)
    if opts:
        out += [".SH OPTIONS", *opts]
    if subs:
        out += [".SH COMMANDS"]
        for name, sub in subs:
            sctx = click.Context(sub, info_name=name, parent=ctx, **sub.context_settings)
            out += [f'.SS "{_esc(prog)} {_esc(name)}"', *_synopsis(sub, sctx), *_body(sub.help, seen)]
            sopts = _options(sub, sctx)
            if sopts:
                out += [".PP", "Options:", ".RS", *sopts, ".RE"]
    if "EXIT STATUS" in extra:
        out += [".SH EXIT STATUS", *_body(extra["EXIT STATUS"])]
    if env:
        out += [".SH ENVIRONMENT"]
        for text in env:
            head, _, table = text.partition("\n")
            out += [".PP", _esc(head), ".PP", ".nf", _esc(table), ".fi"]
    if "FILES" in extra:
        out += [".SH FILES", *_body(extra["FILES"])]
    if prog in COMPLETION:
        var = "_" + prog.upper().replace("-", "_") + "_COMPLETE"
        out += [
            ".SH SHELL COMPLETION",
            ".PP",
            "Completion scripts come from click; for bash, put this in ~/.bashrc",
            "(zsh: zsh_source, fish: fish_source):",
            ".PP",
            ".nf",
            f'.RS\neval "$({var}=bash_source {prog})"\n.RE',
            ".fi",
        ]
    others = [p for p, spec in PROGRAMS if p != prog]
    out += [".SH SEE ALSO", ", ".join("\\fB" + _name(p) + "\\fR(1)" for p in others) + ","
            " \\fBxl\\fR(1), \\fBip\\fR(8), \\fBiptables\\fR(8)"]
    return "\n".join(out) + "\n"


def pages() -> dict:
    """{file name: roff text} for every program that exists."""
    result = {}
    for prog, spec in PROGRAMS:
        cmd = load(spec)
        if cmd is not None:
            module = sys.modules.get(spec.partition(":")[0])
            result[f"{prog}.1"] = render(prog, cmd, extra=getattr(module, "MAN_SECTIONS", None))
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m vif_route_qubes.manpages OUTDIR", file=sys.stderr)
        return 2
    outdir = argv[0]
    os.makedirs(outdir, exist_ok=True)
    for name, text in sorted(pages().items()):
        path = os.path.join(outdir, name)
        with open(path, "w") as f:
            f.write(text)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
