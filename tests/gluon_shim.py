"""The Gluon kernel's source run by Triton's interpreter, its layouts dropped (tests only).

Layouts decide where values live, not what they are, so with every layout removed the kernel's
arithmetic, indexing and masking run in the interpreter like any Triton kernel. What this cannot
check (the layouts themselves, the compiled code) is left to tests/test_gluon_sass.py (sm_90 SASS) and
the GPU tests.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl


class _Layout:
    def __init__(self, *args, **kwargs) -> None:
        pass


class _SharedMemory:
    """Shared memory as the interpreter sees it: each index of the allocation's first dimension (a ring's
    buffer) holds the tensor last copied into it, read back whole (the layouts dropped, so are its own)."""

    type = None  # what gl.bank_conflicts would read

    def __init__(self, buffers: dict | None = None, at: int | None = None) -> None:
        self.buffers = {} if buffers is None else buffers
        self.at = at

    def index(self, i):
        return _SharedMemory(self.buffers, int(i.handle.data.reshape(-1)[0]) if hasattr(i, "handle") else int(i))

    def store(self, value) -> None:
        self.buffers[self.at] = value

    def load(self, layout=None):
        return self.buffers[self.at]

    def _reinterpret(self, dtype, shape, layout):
        """int32 words as bf16 (Tiles.wgmma's ring): each word's two halves, the low one first."""
        assert dtype == tl.bfloat16
        return _View(self, lambda x: tl.reshape(
            tl.join(x.to(tl.int16), (x >> 16).to(tl.int16)).to(tl.bfloat16, bitcast=True), shape))

    def permute(self, order):
        return _View(self, lambda x: tl.permute(x, order))


class _View:
    """A view of shared memory (reinterpreted or permuted): what its load gives, made from the buffer's."""

    def __init__(self, base, f) -> None:
        self.base, self.f = base, f

    def load(self, layout=None):
        return self.f(self.base.load())

    def permute(self, order):
        return _View(self, lambda x: tl.permute(x, order))


class async_copy:  # noqa: N801 - stands in for gluon's nvidia.ampere.async_copy: copies at once
    async_load = staticmethod(lambda smem, pointer, mask=None, **k: smem.store(tl.load(pointer, mask=mask)))
    commit_group = staticmethod(lambda: None)
    wait_group = staticmethod(lambda n=0: None)


def _alloc(value):
    smem = _SharedMemory(at=0)
    if value is not None:
        smem.store(value)
    return smem


def _drop_layout(f):
    def call(*args, layout=None, **kwargs):
        return f(*args, **kwargs)

    return call


class gl:  # noqa: N801 - stands in for the module triton.experimental.gluon.language
    constexpr = tl.constexpr
    float32, bfloat16, int16, int32, int64, uint32 = tl.float32, tl.bfloat16, tl.int16, tl.int32, tl.int64, tl.uint32
    pointer_type = tl.pointer_type
    NVMMADistributedLayout = DotOperandLayout = SliceLayout = BlockedLayout = DistributedLinearLayout = _Layout
    SwizzledSharedLayout = NVMMASharedLayout = _Layout
    shared_memory_descriptor = _SharedMemory  # Triton 3.6's (its reinterpret is _reinterpret)
    allocate_shared_memory = staticmethod(lambda dtype, shape, layout, value=None: _alloc(value))
    thread_barrier = staticmethod(lambda: None)
    static_assert = staticmethod(lambda cond, msg="": None)  # a compile-time check: tests/test_gluon_sass.py compiles
    bank_conflicts = staticmethod(lambda distr_ty, shared_ty: 0)
    arange = staticmethod(_drop_layout(lambda *a, **k: tl.arange(*a, **k)))
    zeros = staticmethod(_drop_layout(lambda *a, **k: tl.zeros(*a, **k)))
    zeros_like = staticmethod(lambda *a, **k: tl.zeros_like(*a, **k))
    full = staticmethod(_drop_layout(lambda *a, **k: tl.full(*a, **k)))
    convert_layout = staticmethod(lambda x, layout, assert_trivial=False: x)
    load = staticmethod(lambda *a, **k: tl.load(*a, **k))
    store = staticmethod(lambda *a, **k: tl.store(*a, **k))
    where = staticmethod(lambda *a, **k: tl.where(*a, **k))
    exp = staticmethod(lambda *a, **k: tl.exp(*a, **k))
    program_id = staticmethod(lambda *a, **k: tl.program_id(*a, **k))
    num_programs = staticmethod(lambda *a, **k: tl.num_programs(*a, **k))
    cdiv = staticmethod(lambda *a, **k: tl.cdiv(*a, **k))
    minimum = staticmethod(lambda *a, **k: tl.minimum(*a, **k))
    maximum = staticmethod(lambda *a, **k: tl.maximum(*a, **k))
    atomic_add = staticmethod(lambda *a, **k: tl.atomic_add(*a, **k))
    multiple_of = staticmethod(lambda *a, **k: tl.multiple_of(*a, **k))
    join = staticmethod(lambda *a, **k: tl.join(*a, **k))
    split = staticmethod(lambda *a, **k: tl.split(*a, **k))
    broadcast = staticmethod(lambda *a, **k: tl.broadcast(*a, **k))
    reduce = staticmethod(lambda *a, **k: tl.reduce(*a, **k))
    sum = staticmethod(lambda *a, **k: tl.sum(*a, **k))
    min = staticmethod(lambda *a, **k: tl.min(*a, **k))
    associative_scan = staticmethod(lambda *a, **k: tl.associative_scan(*a, **k))
    permute = staticmethod(lambda *a, **k: tl.permute(*a, **k))
    reshape = staticmethod(lambda *a, **k: tl.reshape(*a, **k))


class gluon:  # noqa: N801 - stands in for triton.experimental.gluon
    jit = staticmethod(triton.jit)
    constexpr_function = staticmethod(triton.constexpr_function)


def mma_v2(a, b, acc):
    # fp32 operands: the interpreter mis-computes bf16 tl.dot (moe_gemm.py)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)


def warpgroup_mma(a, b, acc, use_acc=True, is_async=False):
    """Done at once: the result stands for its own token. Either operand may be in shared memory."""
    a, b = (x.load() if hasattr(x, "load") else x for x in (a, b))
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc if use_acc else tl.zeros_like(acc))


def warpgroup_mma_wait(num_outstanding=0, deps=None):
    return tuple(deps) if len(deps) > 1 else deps[0]


def fence_async_shared():
    pass


def interpreted_kernel(module: str = "moe_gemm_gluon", kernel: str = "mx_moe_gemm_gluon_kernel"):
    """A Gluon kernel of mxkernels from its module's own source, with this file's stand-ins imported."""
    real = importlib.import_module(f"mxkernels.{module}")
    src = inspect.getsource(real)
    src = src.replace("ampere import async_copy, mma_v2\n", "ampere import mma_v2\n")
    src = src.replace("from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, "
                      "warpgroup_mma_wait\n", "")
    for line in ("from triton.experimental import gluon\n", "from triton.experimental.gluon import language as gl\n",
                 "from triton.experimental.gluon.language.nvidia.ampere import mma_v2\n"):  # fmt: skip
        assert line in src or (line.endswith("mma_v2\n") and "mma_v2" not in src), line  # no MMA: no import
        src = src.replace(line, "")
    src = src.replace("from __future__ import annotations\n",
                      "from __future__ import annotations\nimport triton.language as tl  # noqa\n"
                      "from gluon_shim import async_copy, fence_async_shared, gl, gluon, mma_v2  # noqa\n"
                      "from gluon_shim import warpgroup_mma, warpgroup_mma_wait  # noqa\n")  # fmt: skip
    # the interpreter knows constexpr parameters and static loops by these names
    src = src.replace("gl.constexpr", "tl.constexpr").replace("gl.static_range", "tl.static_range")
    path = Path(tempfile.mkdtemp()) / f"{module}_interpreted.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return getattr(mod, kernel)
