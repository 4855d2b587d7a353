"""Programmatic dependent launch for decode's chain of MoE launches (``MXSERVE_PDL=1``; opt-in until timed).

A decode step's MoE layer is a chain of small launches (router, alignment, gate/up, SiLU, down, top-k sum). Each
starts only once the one before has ended and its writes are flushed, and the GPU sits mostly idle in between
(benchmarks/README.md: 12.8 us a layer from the post-attention norm to the first GEMM at 1 request, in launches of
one or a few programs). With programmatic dependent launch (sm_90 on; SGLang launches its own router so) a launch's
programs start while the launch before still runs, and wait for it at ``griddepcontrol.wait``. What a program reads
before that wait must not come from the launch just before: the router loads its gate's weights there, and the
down GEMM the alignment's blocks, its expert's meta row and its first K tile of weights.

The rule that makes the second safe: every kernel here lets the next launch start (``launch_dependents``) only
after its own wait, and every program waits before it ends. A launch's programs therefore start only after the
launch two back has completed, so anything written two or more launches back may be read before the wait.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# not under Triton's interpreter, which has no grid dependency control (read here: moe_gemm.py imports this module)
ENABLED = os.environ.get("MXSERVE_PDL", "0") == "1" and os.environ.get("TRITON_INTERPRET", "0") != "1"


@functools.lru_cache(maxsize=8)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def capable(device: torch.device) -> bool:
    """Whether ``device`` is a GPU that launches programmatically (sm_90 on); precompile's recording of the
    launches on stand-in CPU tensors replaces it with its target's answer."""
    if device.type != "cuda":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def pdl(device: torch.device) -> bool:
    """Whether launches on ``device`` are programmatic dependent launches (MXSERVE_PDL=1 on an sm_90+ GPU)."""
    return ENABLED and capable(device)


@functools.cache
def gluon_has_it() -> bool:
    """Whether this Triton's Gluon compiles griddepcontrol. Triton 3.6 (the lent GPUs') writes gdc_wait as inline PTX,
    which a Gluon kernel compiles as any kernel does (its sm_90 code holds the wait: tests/test_gluon_sass.py); 3.9
    made it an op of the language's semantic, which Gluon's builder must have too. Until the fifty-third session this
    asked for the builder's op alone, so on Triton 3.6 the Gluon GEMMs launched plainly under MXSERVE_PDL=1."""
    from triton.language.semantic import TritonSemantic

    if not hasattr(TritonSemantic, "grid_dependency_wait"):
        return True  # inline PTX
    try:
        from triton._C.libtriton import gluon_ir
    except ImportError:
        return False
    return hasattr(gluon_ir.GluonOpBuilder, "create_grid_dependency_launch_dependents")


def launch(device: torch.device) -> dict:
    """The launch's keyword arguments: ``launch_pdl`` where :func:`pdl` holds."""
    return {"launch_pdl": True} if pdl(device) else {}


@triton.jit
def wait_then_release():
    """Wait for the launch before (its writes visible), then let the next launch's programs start."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()
