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


# Standard modules plumbum's local machine imports at its top but only uses
# inside functions a hotplug run never calls (shell quoting, pickling for
# daemons, temporary files, glob, copy ...): stand-ins that import the real
# module on first attribute access. ~8 ms of a run's CPU (inspect alone
# brings ast, dis and tokenize).
_LAZY = ("inspect", "pickle", "shlex", "random", "glob", "shutil", "urllib.parse", "copy")


def _on_call(module, name):
    """``from tempfile import mkdtemp`` binds this: the real function,
    imported when it is first called."""
    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = name
    return call


class _Logger:
    """What ``logging.getLogger(name)`` gives plumbum here. Debug and info
    lines (plumbum's "Running ..." per command) go nowhere while the real
    logging module has not been imported: nothing can have configured a
    handler or a level then, and an unconfigured logger drops them too
    (the root level is WARNING). Anything else, or anything once logging is
    imported, is the real logger's."""

    def __init__(self, name):
        self._name = name

    def _real(self):
        import logging

        return logging.getLogger(self._name)

    def __getattr__(self, attr):
        if attr in ("debug", "info") and "logging" not in sys.modules:
            return _drop
        return getattr(self._real(), attr)


def _drop(*args, **kwargs):
    return None


def _stand_ins():
    """{module name: stand-in} for the names not imported yet."""
    made = {name: _OnFirstUse(name) for name in _LAZY}
    tf = types.ModuleType("tempfile")
    tf.mkdtemp = _on_call("tempfile", "mkdtemp")
    tf.TemporaryFile = _on_call("tempfile", "TemporaryFile")
    made["tempfile"] = tf
    lg = types.ModuleType("logging")
    lg.DEBUG, lg.INFO = 10, 20
    lg.getLogger = _Logger
    made["logging"] = lg
    return {name: mod for name, mod in made.items() if name not in sys.modules}


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
    stand_ins = _stand_ins()
    sys.modules.update(stand_ins)
    try:
        from plumbum.machines.local import local as machine
    finally:
        for name in placeholders:
            mod = sys.modules.get(name)
            if mod is not None and (type(mod) is _OnFirstUse or not getattr(mod, "__file__", None)):
                del sys.modules[name]
        for name, mod in stand_ins.items():
            if sys.modules.get(name) is mod:
                del sys.modules[name]
    _local = machine
    return _local
