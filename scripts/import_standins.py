"""Import-only stand-ins for packages SGLang declares but the lent GPU's image lacks.

SGLang 0.5.15 depends on ``nvidia-cutlass-dsl`` (``cutlass``); the SGLang bundle
of ../shared/device leaves it out to stay under the 64 MiB a device call carries
(its wheels are over 80 MB). SGLang's DeepSeek-V2 model module imports the
CuTe-DSL kernels of DeepSeek-V3.2's sparse-attention indexer at module level, so
without it DeepSeek-V2 does not even import, although it never runs those kernels
(the indexer exists only for models whose config has index heads).

This writes OUT/sitecustomize.py, which every Python process with OUT on its
PYTHONPATH runs at start (SGLang's scheduler processes too). It adds a finder,
last on ``sys.meta_path`` (a real package wins), that hands a missing package
NAME and its submodules to the modules named with ``--for`` and to no one else:
FlashInfer asks ``importlib.util.find_spec("cutlass")`` to decide whether to run
its CuTe-DSL kernels, and must still be told no. What the stand-in hands out
(attributes, call results, decorators, base classes) is inert; a decorator
returns what it decorates. For the lent device only: a normal SGLang install has
the real package.

Once a named importer has imported it, the stand-in sits in ``sys.modules``, where
any later import finds it. FlashInfer decides on its CuTe-DSL RMSNorm when its norm
module is imported; ``FLASHINFER_USE_CUDA_NORM=1`` (FlashInfer's own switch for a
missing nvidia-cutlass-dsl) keeps that decision off the import order:

    python3 scripts/import_standins.py /tmp/standins cutlass \
        --for sglang.jit_kernel.dsa sglang.jit_kernel.cutedsl_fp8_paged_mqa_logits
    export PYTHONPATH=$PYTHONPATH:/tmp/standins FLASHINFER_USE_CUDA_NORM=1
"""

from __future__ import annotations

import argparse
import importlib.util
import os

SITECUSTOMIZE = '''"""Import-only stand-ins written by mxserve's scripts/import_standins.py (see there)."""
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


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] not in NAMES or not self._asked_by_importer():
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    @staticmethod
    def _asked_by_importer():
        frame = sys._getframe(2)
        while frame is not None:  # the first frame outside importlib is the one asking
            name = frame.f_globals.get("__name__", "")
            if not name.startswith(("importlib", "_frozen_importlib")):
                return name.startswith(IMPORTERS)
            frame = frame.f_back
        return False

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _Placeholder(spec.name).__getattr__
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_StandIns())
'''


def missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except ModuleNotFoundError:  # a parent package is missing too
        return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("names", nargs="+", help="top-level packages to stand in for where missing")
    ap.add_argument("--for", dest="importers", nargs="+", required=True,
                    help="module name prefixes that may import them")  # fmt: skip
    a = ap.parse_args()
    names = tuple(n for n in a.names if missing(n))
    for n in a.names:
        print(f"{n}: " + ("import-only stand-in" if n in names else "installed, no stand-in"))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "sitecustomize.py"), "w") as f:
        f.write(f"NAMES = {names!r}\nIMPORTERS = {tuple(a.importers)!r}\n" + SITECUSTOMIZE)


if __name__ == "__main__":
    main()
