"""The package's import graph points one way: entry points above tools,
tools above the shared layers (plan, firewall, system, xs, ...). A cycle,
even through an import inside a function, is a layering bug: the lower
module then depends on what it serves."""

import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vif_route_qubes")


def _modules():
    for root, _dirs, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                yield (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel), path


def _imports(name, path):
    """Every vif_route_qubes module ``name`` imports, at any depth of the file."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] == "vif_route_qubes")
    return found


def graph():
    mods = dict(_modules())
    return {name: {t for t in _imports(name, path) if t in mods and t != name}
            for name, path in mods.items()}


def test_the_import_graph_has_no_cycle():
    g = graph()
    # package __init__ modules are imported by their submodules implicitly;
    # an edge from a package to its own submodule is not a cycle of layers
    state, path = {}, []

    def visit(n):
        state[n] = "open"
        path.append(n)
        for m in sorted(g[n]):
            if m.startswith(n + "."):
                continue
            if state.get(m) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
            if m not in state:
                visit(m)
        path.pop()
        state[n] = "done"

    for n in sorted(g):
        if n not in state:
            visit(n)


def test_the_hotplug_run_does_not_reach_up_to_its_interfaces():
    # hotplug is what both entry points call; it must not import them back
    assert not {"vif_route_qubes.cli", "vif_route_qubes.entry"} & graph()["vif_route_qubes.hotplug"]


def test_the_rigs_are_not_in_the_package():
    assert not [n for n in graph() if "testing" in n or "rigs" in n]


def test_each_tool_its_module_the_keys_tool_included():
    # issue 19 §6: vif-route-qubes-keys left dom0_network.py; the two dom0
    # tools share dom0_xs (a layer below both), neither imports the other
    g = graph()
    assert "vif_route_qubes.keys" in g
    assert "vif_route_qubes.dom0_network" not in g["vif_route_qubes.keys"]
    assert "vif_route_qubes.keys" not in g["vif_route_qubes.dom0_network"]
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(os.path.dirname(PKG), "setup.cfg"))
    scripts = cfg["options.entry_points"]["console_scripts"]
    assert "vif-route-qubes-keys = vif_route_qubes.keys:main" in scripts
