"""qvm-set-default-netvm NAME|dom0: which domain serves guests' vifs by default.

The design document activates a netvm with "qvm-set-default-netvm netvm".
On plain Xen the default lives in xl.conf(5) (Xen 4.17), read by ``xl
create`` for every vif whose line names no ``backend=`` / ``script=``:

``vif.default.backend``
    "any valid domain identifier": we write the netvm's *name* (its domid
    changes when it is recreated) or ``0`` for dom0.
``vif.default.script``
    the hotplug script, set to ``vif-route-qubes`` (libxl looks it up in
    /etc/xen/scripts of the backend domain; libxl's own default is
    vif-bridge).

The file is edited, not regenerated: it is tokenised the way libxlu reads
it (``KEY = VALUE`` or ``KEY += VALUE`` statements ended by a newline or
``;``, ``#`` comments, quoted strings, numbers, lists), and only the last
assignment of each of our two keys is rewritten (libxlu keeps the last one),
so every other byte, comments included, stays. A key that is not set yet
goes after Debian's commented-out example of it (``#vif.default.backend=``)
or, without one, at the end. The new file replaces the old by rename (the
setup-ip writer: temporary file in the same directory, fsync, rename), and
is not written at all when the values are already right.

Which domains may be named: the domain must exist (``/local/domain/DOMID``
with that ``name`` in XenStore, both written by libxl in dom0) and be a
driver domain, which libxl marks at creation: for ``driver_domain = 1`` it
creates ``/local/domain/DOMID/libxl`` (and ``device-model``) for the
domain's own libxl (libxl_create.c). A domain cannot create that node
itself (its home directory is dom0's, read-only to it), so its presence is
dom0's word. dom0 is always accepted.
"""

import os
import re
import sys
from collections import namedtuple

from .errors import Failure

TAG = "qvm-set-default-netvm"
XL_CONF = "/etc/xen/xl.conf"
BACKEND = "vif.default.backend"
SCRIPT_KEY = "vif.default.script"
SCRIPT = "vif-route-qubes"
DOM0_NAMES = ("dom0", "Domain-0", "0")
# libxl's defaults when the keys are absent (libxl_nic.c: vif-bridge; the
# backend defaults to domain 0).
UNSET = {BACKEND: "0 (dom0: not set)", SCRIPT_KEY: "vif-bridge (not set)"}

# Domain names we are willing to write between quotes: no quote, backslash,
# space or control character can reach the file.
_NAME_RE = re.compile(r"[A-Za-z0-9_.:+@-]{1,64}")

Token = namedtuple("Token", "kind text start line")
Statement = namedtuple("Statement", "key op value start end line")

_TOKEN_RE = re.compile(r"""
    (?P<space>[ \t\r\f\v]+)
  | (?P<comment>\#[^\n]*)
  | (?P<newline>\n)
  | (?P<op>\+=|=|;|,|\[|\])
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>0[xX][0-9A-Fa-f]+|[0-9]+)
  | (?P<id>[A-Za-z_][A-Za-z0-9_.-]*)
""", re.X)


# ----------------------------------------------------------------------------
# Plan (pure): text in, text out


def tokens(text: str, where: str = XL_CONF) -> list:
    """The file's tokens (spaces and comments included, so positions add up)."""
    out, pos, line = [], 0, 1
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m:
            raise Failure(f"{where}: line {line}: cannot parse {text[pos:pos + 20]!r}; nothing changed")
        out.append(Token(m.lastgroup, m.group(), pos, line))
        line += m.group().count("\n")
        pos = m.end()
    return out


def _dequote(text: str) -> str:
    if text[:1] in "\"'":
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def statements(text: str, where: str = XL_CONF) -> list:
    """Every ``KEY = VALUE`` of the file, in order, with its span.

    ``value`` is the string for a single value, a list of strings for a list.
    """
    toks = [t for t in tokens(text, where) if t.kind not in ("space", "comment")]
    out, i = [], 0

    def bad(tok, expected):
        seen = "the end of the file" if tok is None else repr(tok.text)
        line = tok.line if tok else text.count("\n") + 1
        raise Failure(f"{where}: line {line}: expected {expected}, found {seen}; nothing changed")

    def at(k):
        return toks[k] if k < len(toks) else None

    while i < len(toks):
        tok = toks[i]
        if tok.kind == "newline" or tok.text == ";":
            i += 1
            continue
        if tok.kind != "id":
            bad(tok, "a setting name")
        op = at(i + 1)
        if op is None or op.text not in ("=", "+="):
            bad(op, f"'=' after {tok.text}")
        j = i + 2
        while at(j) is not None and at(j).kind == "newline":
            j += 1
        first = at(j)
        if first is None:
            bad(first, f"a value for {tok.text}")
        if first.text == "[":
            value, j = [], j + 1
            while True:
                t = at(j)
                if t is not None and t.kind == "newline":
                    j += 1
                    continue
                if t is not None and t.text == "]":
                    break
                if t is None or t.kind not in ("string", "number", "id"):
                    bad(t, f"a list item or ']' in {tok.text}")
                value.append(_dequote(t.text))
                j += 1
                while at(j) is not None and at(j).kind == "newline":
                    j += 1
                if at(j) is not None and at(j).text == ",":
                    j += 1
            last = at(j)
        elif first.kind in ("string", "number"):
            value, last = _dequote(first.text), first
        else:
            bad(first, f"a value for {tok.text}")
        end = at(j + 1)
        if end is not None and end.kind != "newline" and end.text != ";":
            bad(end, f"a new line or ';' after the value of {tok.text}")
        out.append(Statement(tok.text, op.text, value, tok.start, last.start + len(last.text), tok.line))
        i = j + 1
    return out


def current(text: str, where: str = XL_CONF) -> dict:
    """{key: value} as xl reads them: the last assignment wins, ``+=``
    appends (libxlu_cfg.c)."""
    values = {}
    for st in statements(text, where):
        if st.op == "+=" and isinstance(values.get(st.key), type(st.value)):
            values[st.key] = values[st.key] + st.value
        else:
            values[st.key] = st.value
    return values


def _quoted(value: str) -> str:
    return '"' + value + '"'


def render(text: str, wanted: dict, where: str = XL_CONF) -> str:
    """``text`` with each key of ``wanted`` set to its value, everything
    else kept byte for byte."""
    sts = statements(text, where)
    last = {}
    for st in sts:
        if st.key in wanted:
            last[st.key] = st
    edits, appended = [], []  # edits: (start, end, replacement)
    for key, value in wanted.items():
        setting = f"{key}={_quoted(value)}"
        if key in last:
            edits.append((last[key].start, last[key].end, setting))
            continue
        example = re.search(rf"^[ \t]*#[ \t]*{re.escape(key)}[ \t]*=.*$", text, re.M)
        if example:
            edits.append((example.end(), example.end(), "\n" + setting))
        else:
            appended.append(setting)
    for start, end, repl in sorted(edits, reverse=True):
        text = text[:start] + repl + text[end:]
    if appended:
        if text and not text.endswith("\n"):
            text += "\n"
        text += f"# {TAG}: guests' vifs without backend=/script= go to this domain\n"
        text += "".join(setting + "\n" for setting in appended)
    return text


def backend_value(name: str) -> str:
    """What goes in vif.default.backend for NAME (dom0 is ``0``)."""
    if name in DOM0_NAMES:
        return "0"
    if not _NAME_RE.fullmatch(name or ""):
        raise Failure(f"{name!r} is not a domain name (1-64 characters of A-Z a-z 0-9 _ . : + @ -)")
    return name


# ----------------------------------------------------------------------------
# Reading the system


def check_domain(name: str, env) -> str:
    """Failure unless ``name`` is dom0 or a running driver domain."""
    if name in DOM0_NAMES:
        return "dom0"
    from .xs import XenStore

    with XenStore(env=env) as xs:
        ids = [d for d in (xs.ls("/local/domain") or []) if d.isdigit()]
        names = xs.read_many([f"/local/domain/{d}/name" for d in ids])
        by_name = {names[f"/local/domain/{d}/name"]: d for d in ids}
        domid = name if name in ids else by_name.get(name)
        if domid is None:
            known = ", ".join(sorted(n for n in by_name if n)) or "none"
            raise Failure(f"no domain named {name!r} (running: {known}); nothing changed")
        if domid == "0":
            return "dom0"
        if xs.ls(f"/local/domain/{domid}/libxl") is None:
            raise Failure(
                f"{name} (domain {domid}) is not a driver domain: libxl made no "
                f"/local/domain/{domid}/libxl for it; set driver_domain = 1 in its xl.cfg "
                "and recreate it; nothing changed")
        return names[f"/local/domain/{domid}/name"] or name


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise Failure(f"cannot read {path}: {exc.strerror}") from None


def show(path: str, out) -> int:
    values = current(_read(path), path)
    for key in (BACKEND, SCRIPT_KEY):
        value = values.get(key)
        print(f"{key}={value if isinstance(value, str) else UNSET[key]}", file=out)
    return 0


def set_default(name: str, path: str, env, dry_run=False, out=None) -> int:
    out = out or sys.stdout
    wanted = {BACKEND: backend_value(name), SCRIPT_KEY: SCRIPT}
    text = _read(path)
    values = current(text, path)  # a file xl cannot read is refused first
    check_domain(name, env)
    if all(values.get(k) == v for k, v in wanted.items()):
        print(f"{path}: already {BACKEND}={_quoted(wanted[BACKEND])} {SCRIPT_KEY}={_quoted(SCRIPT)}", file=out)
        return 0
    new = render(text, wanted, path)
    if dry_run:
        out.write(new)
        return 0
    from .files import write_file
    from .system import System

    write_file(System(env=env), path, new)
    print(f"{path}: {BACKEND}={_quoted(wanted[BACKEND])} {SCRIPT_KEY}={_quoted(SCRIPT)}", file=out)
    if wanted[BACKEND] == "0" and not os.path.exists(f"/etc/xen/scripts/{SCRIPT}"):
        print(f"{TAG}: warning: dom0 has no /etc/xen/scripts/{SCRIPT} (install vif-route-qubes-netvm in dom0)",
              file=sys.stderr)
    return 0


HELP = f"""Make NAME (a netvm driver domain, or dom0) serve guests' vifs by default.

Sets {BACKEND} (to NAME, or 0 for dom0) and {SCRIPT_KEY} (to {SCRIPT}) in
xl.conf, the defaults xl create uses for a vif line without backend= or
script=. The rest of the file, comments included, is kept; the new file
replaces the old atomically, and is not rewritten when already right.
NAME must be a running driver domain (driver_domain = 1 in its xl.cfg,
seen in XenStore as /local/domain/DOMID/libxl) or dom0. Domains already
running keep the vifs they have.

\b
Environment:
  XENSTORED_PATH             xenstored's socket (default: /var/run/xenstored/socket)
  QVM_SET_DEFAULT_NETVM_XL_CONF  the file (like --xl-conf)

\b
Exit status: 0 set (or already set, or shown), 1 error (one line on stderr;
the file unchanged), 2 usage error.
"""

MAN_SECTIONS = {
    "EXIT STATUS": "\b\n"
    "0    set, already set, or shown\n"
    "1    failed (one line on stderr says why); the file is unchanged\n"
    "2    usage error (unknown option, no NAME without --show)",
    "FILES": "\b\n"
    f"{XL_CONF}    xl's global configuration, xl.conf(5) (--xl-conf)",
}


def command():
    import click

    @click.command(TAG, help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("name", required=False, metavar="NAME|dom0")
    @click.option("--show", "show_", is_flag=True, help="Print the current default backend and script; change nothing.")
    @click.option("--xl-conf", metavar="PATH", envvar="QVM_SET_DEFAULT_NETVM_XL_CONF", default=XL_CONF,
                  show_default=True, help="The xl.conf to edit.")
    @click.option("-n", "--dry-run", is_flag=True, help="Print the new file; write nothing.")
    @click.version_option(package_name="vif-route-qubes", message="%(prog)s %(version)s")
    def main_cmd(name, show_, xl_conf, dry_run):
        if show_ == (name is not None):
            raise click.UsageError("give NAME (a driver domain, or dom0), or --show")
        try:
            if show_:
                sys.exit(show(xl_conf, sys.stdout))
            sys.exit(set_default(name, xl_conf, os.environ, dry_run=dry_run))
        except Failure as exc:
            click.echo(f"{TAG}: {exc}", err=True)
            sys.exit(1)

    return main_cmd


def main(argv=None):
    command()(args=argv, prog_name=TAG)
