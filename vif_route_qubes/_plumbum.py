"""plumbum's local machine, without the rest of plumbum.

``import plumbum`` costs ~70 ms here (see benchmarks/README.md), more than a
whole hotplug run may take: its ``__init__`` pulls in the SSH and Paramiko
machines and colour library, and ``plumbum.path.local`` imports
``urllib.request`` (http.client, email, ssl) only for ``LocalPath.as_uri``.
We need ``plumbum.machines.local.local`` and nothing else, so:

* the three package ``__init__`` modules on the way are skipped by loading
  the submodule under placeholder package objects, removed again afterwards
  so a later ``import plumbum`` anywhere in the process gets the real ones;
* ``urllib.request`` is a stand-in that imports the real module on first
  attribute access (only ``as_uri`` would ever touch it).
"""

import os
import sys
import types

_local = None


class _OnFirstUse(types.ModuleType):
    def __getattr__(self, attr):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        import importlib

        return getattr(importlib.import_module(self.__name__), attr)


def local():
    """The plumbum ``LocalMachine`` singleton, imported as cheaply as possible."""
    global _local
    if _local is not None:
        return _local
    if "plumbum.machines.local" in sys.modules or "plumbum" in sys.modules:
        from plumbum.machines.local import local as machine

        _local = machine
        return _local
    import importlib.machinery
    import platform

    # plumbum's LocalMachine evaluates platform.uname()[0] at import, and
    # indexing a uname_result computes its ``processor`` field, which on
    # Linux runs ``uname -p`` in a subprocess: a whole extra process per
    # hotplug run, for a value nobody here reads. Fill that lazy field first.
    platform.uname().__dict__.setdefault("processor", "")

    spec = importlib.machinery.PathFinder.find_spec("plumbum")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("plumbum is not installed")
    base = list(spec.submodule_search_locations)[0]
    placeholders = []
    for name in ("plumbum", "plumbum.machines", "plumbum.path"):
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(base, *name.split(".")[1:])]
        sys.modules[name] = pkg
        placeholders.append(name)
    if "urllib.request" not in sys.modules:
        sys.modules["urllib.request"] = _OnFirstUse("urllib.request")
        placeholders.append("urllib.request")
    try:
        from plumbum.machines.local import local as machine
    finally:
        for name in placeholders:
            mod = sys.modules.get(name)
            if mod is not None and (type(mod) is _OnFirstUse or not getattr(mod, "__file__", None)):
                del sys.modules[name]
    _local = machine
    return _local
