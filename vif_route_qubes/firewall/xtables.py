"""The one reading of ``iptables-save`` text, for everything that judges
what xtables holds: the anti-spoofing (``iptables.py``: its fallbacks,
``offline`` and ``status``) and the DNS DNAT (``dns_iptables.py``: "already
right" and ``--status``).

A save text is a list of tables (``*raw`` ... ``COMMIT``), each declaring
its chains (``:NAME POLICY [counters]``) and listing its rules
(``-A CHAIN ...``) in order. Rules are kept as their ``-A`` lines, made
comparable with the lines our payloads write (:func:`rule_key`), so a
rule's presence is a string compare.
"""


class Table:
    """What iptables-save shows of one table."""

    __slots__ = ("chains", "rules")

    def __init__(self):
        self.chains, self.rules = set(), []  # declared names; ``-A`` lines, in order

    def chain(self, name) -> list:
        """The rules of chain ``name``, in order."""
        prefix = f"-A {name} "
        return [r for r in self.rules if r.startswith(prefix)]

    def into(self, names) -> list:
        """The rules elsewhere whose target (``-j``/``-g``) is one of
        ``names``: the jumps into those chains."""
        out = []
        for r in self.rules:
            words = r.split()
            if len(words) > 3 and words[-2] in ("-j", "-g") and words[-1] in names and words[1] not in names:
                out.append(r)
        return out


def parse_save(text) -> dict:
    """{table name: :class:`Table`} of an iptables-save text (or of a
    restore payload: its ``-A`` lines count, ``-N`` declares nothing)."""
    tables, cur = {}, None
    for line in (text or "").splitlines():
        if line.startswith("*"):
            cur = tables.setdefault(line[1:].strip(), Table())
        elif cur is None or not line or line[0] == "#" or line == "COMMIT":
            continue
        elif line[0] == ":":
            cur.chains.add(line[1:].split(" ", 1)[0])
        elif line.startswith("-A "):
            cur.rules.append(rule_key(line))
    return tables


def table(text, name="raw") -> Table:
    """One table of a save text (empty when it is not there)."""
    return parse_save(text).get(name) or Table()


def rule_key(line: str) -> str:
    """A rule as iptables-save prints it and as our payload writes it, made
    comparable: save prints device groups in hex (``--src-group 0x2``)."""
    if "-group " not in line:
        return " ".join(line.split())
    words = line.split()
    for i, w in enumerate(words[:-1]):
        if w in ("--src-group", "--dst-group"):
            try:
                words[i + 1] = str(int(words[i + 1], 0))
            except ValueError:
                pass
    return " ".join(words)
