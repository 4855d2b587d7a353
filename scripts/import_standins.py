"""Import-only stand-ins for packages SGLang declares but the lent GPU's image lacks.

SGLang 0.5.15 depends on ``nvidia-cutlass-dsl`` (``cutlass``) and ``cuda-python``
(``cuda.bindings``); the SGLang bundle of ../shared/device leaves them out to stay
under the 64 MiB a device call carries (their wheels alone are over 80 MB).
Its DeepSeek-V2 model module imports the CuTe-DSL kernels of DeepSeek-V3.2's
sparse-attention indexer at module level, so without them DeepSeek-V2 does not
even import, although it never runs those kernels (the indexer exists only for
models whose config has index heads).

For each name given whose package is missing, this writes a package under OUT
that imports and does nothing else: every attribute, submodule, call result,
decorator and base class it hands out is an inert placeholder (a decorator
returns what it decorates). A placeholder that is called at run time does not
raise; a model that really needs these kernels is out of scope of the stand-in.
An image that has the real packages keeps them (nothing is written for them).
For the lent device only; a normal SGLang install has both packages.

    python3 scripts/import_standins.py /tmp/standins cutlass cuda.bindings
    export PYTHONPATH=$PYTHONPATH:/tmp/standins
"""

from __future__ import annotations

import importlib.util
import os
import sys

PACKAGE = '''"""Import-only stand-in written by mxserve's scripts/import_standins.py (see there)."""
import importlib.abc
import importlib.machinery
import sys
import types


class _Placeholder:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(self._name + "." + attr)

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]  # used as a decorator
        return _Placeholder(self._name + "()")

    def __getitem__(self, key):
        return self

    def __mro_entries__(self, bases):
        return (object,)  # used as a base class

    def __iter__(self):
        return iter(())

    def __repr__(self):
        return "<import-only stand-in " + self._name + ">"


def _module_getattr(name):
    def getattr_(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(name + "." + attr)

    return getattr_


class _Submodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr(spec.name)
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_Submodules())
__getattr__ = _module_getattr(__name__)
'''


def missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except ModuleNotFoundError:  # a parent package is missing too
        return True


def main(out: str, names: list[str]) -> None:
    for name in names:
        if not missing(name):
            print(f"{name}: installed, no stand-in")
            continue
        pkg = os.path.join(out, *name.split("."))
        os.makedirs(pkg, exist_ok=True)
        with open(os.path.join(pkg, "__init__.py"), "w") as f:
            f.write(PACKAGE)
        print(f"{name}: import-only stand-in in {pkg}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(f"usage: {sys.argv[0]} OUT NAME [NAME...]")
    main(sys.argv[1], sys.argv[2:])
