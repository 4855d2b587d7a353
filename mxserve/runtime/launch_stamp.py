"""Whether this launch's kernels were precompiled by an earlier one, told without torch or Triton.

``precompile.compile_once`` stamps a compiled variant set, but finding that stamp means recording the
variants first: importing torch and Triton and running the launch path on stand-in tensors. On the
H200 that took 16.6 s beside SGLang's warm start, which then came up 1.24x slower than plain SGLang's
(benchmarks/README.md, fifteenth session). This stamp is keyed by what the variants are made of, read
without either import: the plan, ladder and model config, the GPUs (NVML), Triton's version, the
launch's settings, and mxserve's own source. A stale key costs only speed, never results: Triton's
cache is keyed by the kernels' real source, and SGLang compiles any variant it does not find.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os

from mxserve import preflight
from mxserve.models.configs import PLAN_FILE

STAMPS = "mxserve-precompiled"  # a folder in Triton's cache: emptying the cache drops the stamps too
SOURCES = ("mxkernels", "mxserve", "router_stats")  # the packages whose code decides the variants
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch_key(ckpt: str, bf16_layers: str, ladder: str | None, parallel: tuple[int, int]) -> str | None:
    """A digest of everything the launch's kernel variants depend on; None where some of it cannot be
    read without torch (no NVML, MIG, no Triton metadata): the launch then records them."""
    gpus = preflight.nvml_gpus()
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None
    if gpus is None or not gpus.names:
        return None
    h = hashlib.sha256(repr((gpus.names, triton, bf16_layers, tuple(parallel))).encode())
    # the settings the kernels and their tiles read (MXSERVE_*) and Triton's own; not a secret (the API key)
    settings = sorted((k, v) for k, v in os.environ.items()
                      if k.startswith(("MXSERVE_", "TRITON_")) and not k.endswith("_KEY"))  # fmt: skip
    h.update(repr(settings).encode())
    try:
        for path in (os.path.join(ckpt, PLAN_FILE), os.path.join(ckpt, "config.json"), ladder):
            _add_file(h, path)
        for package in SOURCES:
            for top, dirs, files in os.walk(os.path.join(_ROOT, package)):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                for name in sorted(files):
                    if name.endswith((".py", ".json")):
                        _add_file(h, os.path.join(top, name), os.path.relpath(os.path.join(top, name), _ROOT))
    except OSError:  # unreadable: record the variants instead
        return None
    return h.hexdigest()


def _add_file(h, path: str | None, label: str | None = None) -> None:
    h.update(f"\0{label or path}\0".encode())
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            h.update(f.read())


def stamp_file(triton_cache: str, key: str) -> str:
    return os.path.join(triton_cache, STAMPS, f"launch-{key}")


def precompiled(triton_cache: str, key: str | None) -> bool:
    """Whether a launch with this key finished precompiling into this Triton cache."""
    return key is not None and os.path.isfile(stamp_file(triton_cache, key))


def mark_precompiled(triton_cache: str, key: str | None) -> None:
    if key is None:
        return
    path = stamp_file(triton_cache, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("precompiled by mxserve launch\n")
