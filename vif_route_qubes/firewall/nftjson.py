"""The one reading of nft's JSON listing (``nft -j list ruleset``), for
everything that judges what the ``qubes`` tables hold: the anti-spoofing
(``nft.py``: its slow path, ``offline`` and ``status``, which need the sets'
elements) and the DNS DNAT (``dns_nft.py``: "already right" and
``--status``, from ``nft -j --terse``, which leaves the elements out).

What is kept, per family (``ip``, ``ip6``) of table ``qubes``: the table,
its sets and their elements, its chains with their hook, and each chain's
rules in order (their JSON expressions and handles). A rule can also be
shown the way ``nft list`` prints it (:func:`rule_text`), for the
expressions our rules use; anything else is shown as its JSON, so it never
compares equal to a rule of ours by accident.
"""

import json

from ..errors import Failure

TABLE = "qubes"
# the standard priorities, as nft names them (nft(8), ip/ip6 families)
# meta keys nft prints without "meta" (the rest: "meta l4proto", ...)
BARE_META = {"iif", "oif", "iifname", "oifname", "iifgroup", "oifgroup", "iiftype", "oiftype", "mark",
             "skuid", "skgid", "cpu", "cgroup"}
PRIORITIES = ((-300, "raw"), (-150, "mangle"), (-100, "dstnat"), (0, "filter"), (50, "security"), (100, "srcnat"))


class Ruleset:
    """The parts of the listing that concern us."""

    def __init__(self, tables=(), sets=None, chains=(), raw_chains=(), rules=None, hooks=None, handles=None,
                 heads=None):
        self.tables = set(tables)  # {"ip", "ip6"}
        self.sets = dict(sets or {})  # {(family, set): [element, ...]}
        self.chains = set(chains)  # {(family, chain)}
        self.raw_chains = set(raw_chains)  # iptables-nft chains named vrq-*: {(family, chain)}
        self.rules = dict(rules or {})  # {(family, chain): [[expr, ...], ...]} in order
        self.hooks = dict(hooks or {})  # {(family, chain): (hook, priority)}
        self.handles = dict(handles or {})  # {(family, chain): [handle, ...]}, as rules
        self.heads = dict(heads or {})  # {(family, chain): its first line as nft lists it}

    @classmethod
    def parse(cls, text):
        tables, sets, chains, raw, rules, hooks, handles, heads = set(), {}, set(), set(), {}, {}, {}, {}
        try:
            items = json.loads(text or "{}").get("nftables", [])
        except (ValueError, AttributeError):
            raise Failure("nft -j list ruleset: output is not JSON") from None
        for item in items:
            (kind, obj), = item.items() if isinstance(item, dict) and len(item) == 1 else ((None, None),)
            if not isinstance(obj, dict) or obj.get("family") not in ("ip", "ip6"):
                continue
            fam = obj["family"]
            table = obj.get("table") if kind != "table" else obj.get("name")
            if table == "raw" and kind == "chain" and str(obj.get("name", "")).startswith("vrq-"):
                raw.add((fam, obj["name"]))
            if table != TABLE:
                continue
            if kind == "table":
                tables.add(fam)
            elif kind == "set":
                sets[(fam, obj["name"])] = [_element(e) for e in obj.get("elem", [])]
            elif kind == "chain":
                chains.add((fam, obj["name"]))
                if obj.get("hook"):
                    hooks[(fam, obj["name"])] = (obj["hook"], obj.get("prio"))
                    heads[(fam, obj["name"])] = _head(obj)
            elif kind == "rule":
                rules.setdefault((fam, obj.get("chain")), []).append(obj.get("expr") or [])
                handles.setdefault((fam, obj.get("chain")), []).append(obj.get("handle"))
        return cls(tables, sets, chains, raw, rules, hooks, handles, heads)

    def listing(self, fam, chain):
        """The chain as ``nft list`` prints it, line by line (its header for
        a base chain, then its rules); None when there is no such chain."""
        if (fam, chain) not in self.chains:
            return None
        head = [self.heads[(fam, chain)]] if (fam, chain) in self.heads else []
        return head + [rule_text(r) for r in self.rules.get((fam, chain), [])]


def _head(chain):
    prio = chain.get("prio")
    return (f"type {chain.get('type')} hook {chain.get('hook')} priority {_priority(prio)}; "
            f"policy {chain.get('policy', 'accept')};")


def _priority(prio):
    """As nft prints it: a standard name, or the nearest lower one + offset."""
    if not isinstance(prio, int):
        return str(prio)
    below = [(value, name) for value, name in PRIORITIES if value <= prio]
    if not below:
        return str(prio)
    value, name = below[-1]
    return name if value == prio else f"{name} + {prio - value}"


def _value(right):
    if isinstance(right, dict) and "set" in right:
        return "{ " + ", ".join(_value(v) for v in right["set"]) + " }"
    if isinstance(right, dict) and "prefix" in right:
        return f"{right['prefix'].get('addr')}/{right['prefix'].get('len')}"
    if isinstance(right, (str, int)):
        return str(right)
    return json.dumps(right, sort_keys=True)


def _left(left):
    if "payload" in left:
        return f"{left['payload'].get('protocol')} {left['payload'].get('field')}"
    if "meta" in left:
        key = left["meta"].get("key")
        return key if key in BARE_META else f"meta {key}"
    return None


def rule_text(expr):
    """One rule as ``nft list`` prints it, for the statements our rules use
    (matches on payload or meta, dnat, reject, drop, accept, goto, jump,
    counter); any other statement as its JSON."""
    words = []
    for e in expr:
        if not isinstance(e, dict) or len(e) != 1:
            words.append(json.dumps(e, sort_keys=True))
            continue
        (key, val), = e.items()
        if key == "match" and isinstance(val, dict) and _left(val.get("left") or {}) and val.get("op") in ("==", "in"):
            words.append(f"{_left(val['left'])} {_value(val.get('right'))}")
        elif key in ("accept", "drop") and val is None:
            words.append(key)
        elif key in ("goto", "jump") and isinstance(val, dict):
            words.append(f"{key} {val.get('target')}")
        elif key == "dnat" and isinstance(val, dict) and set(val) == {"addr"}:
            words.append(f"dnat to {_value(val['addr'])}")
        elif key == "reject" and (val is None or (isinstance(val, dict) and val.get("expr") == "port-unreachable")):
            words.append("reject")  # ICMP(v6) port unreachable: nft's default, printed bare
        elif key == "reject" and val == {"type": "tcp reset"}:
            words.append("reject with tcp reset")
        elif key == "counter":
            words.append("counter")
        else:
            words.append(json.dumps(e, sort_keys=True))
    return " ".join(words)


def _element(e):
    """A set element as JSON shows it -> str or (ifname, address str)."""
    if isinstance(e, dict) and "elem" in e:
        e = e["elem"].get("val")
    if isinstance(e, dict) and "concat" in e:
        return tuple(str(x) for x in e["concat"])
    return str(e)


def matches(rule, meta_key, right):
    """A rule has a ``==`` match on ``meta_key`` (any left side if None)
    against ``right``."""
    for e in rule:
        m = e.get("match") if isinstance(e, dict) else None
        if not m or m.get("op") not in ("==", "in"):
            continue
        left = m.get("left") or {}
        if meta_key is not None and (left.get("meta") or {}).get("key") != meta_key:
            continue
        if str(m.get("right")) == str(right):
            return True
    return False


def verdict(rule):
    for e in rule:
        if not isinstance(e, dict):
            continue
        for v in ("accept", "drop"):
            if v in e:
                return v
        for v in ("goto", "jump"):
            if v in e:
                return f"{v} {e[v].get('target')}"
    return None
