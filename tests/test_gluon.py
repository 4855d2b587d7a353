"""The experimental Gluon decode kernel (mxkernels/moe_gemm_gluon.py) on a machine without a GPU.

Triton's interpreter does not run Gluon. So here the kernel is compiled for sm_90 and its SASS is
read (the point of the kernel is that the weights reach the MMA without shared memory), and its
source runs in the interpreter with the layouts dropped (tests/gluon_shim.py), which checks its
arithmetic, indexing and masks. Its results on the GPU: tests/test_kernels_gpu.py, test_gluon_*.
"""

import os
import re
import subprocess

import pytest
from kernel_cases import GLUON, WEIGHT_ONLY, gemm_errors

gluon = pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")

POINTERS = {"a_ptr": "*bf16", "out_ptr": "*fp32", "sorted_ids_ptr": "*i64", "block_expert_ptr": "*i64",
            "num_post_pad_ptr": "*i64", "route_w_ptr": "*fp32", "meta_ptr": "*i64", "wi_ptr": "*i32",
            "wb_ptr": "*bf16", "sc_ptr": "*bf16", "zp_ptr": "*bf16"}  # fmt: skip


def _sass(gate_up: bool) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from mxkernels.moe_gemm_gluon import WARPS, mx_moe_gemm_gluon_kernel

    params = mx_moe_gemm_gluon_kernel.arg_names
    # bf16, w2 and w4 experts
    consts = {"GATE_UP": gate_up, "CODES": 0b10101, "BM": 16, "BN": 64, "BK": 64, "PARTIAL": not gate_up}
    sig = {p: POINTERS.get(p, "constexpr" if p in consts else "i32") for p in params}
    src = GluonASTSource(mx_moe_gemm_gluon_kernel, sig, {(params.index(p),): v for p, v in consts.items()},
                         {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p in POINTERS})
    cubin = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": WARPS}).asm["cubin"]
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("this Triton wheel has no cuobjdump to read the SASS with")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mx_gluon_{os.getpid()}_{int(gate_up)}.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    try:
        return subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)


@pytest.mark.parametrize("gate_up", [True, False])
def test_gluon_kernel_feeds_the_mma_from_registers(gate_up):
    sass = _sass(gate_up)
    assert re.search(r"\bHMMA\.16816\.F32\.BF16\b", sass), "no bf16 mma.sync in the kernel"
    # no shared-memory traffic at all: the weight (and token) tiles are loaded into MMA fragments
    for op in ("LDS", "STS", "LDSM", "LDGSTS"):
        assert not re.search(rf"\b{op}\b", sass), op


BOUND = 2e-2  # the GPU tests' bound: the interpreter rounds fp32 to bf16 by truncation (moe_gemm._bf16)


@pytest.fixture
def interpreted_gluon(monkeypatch):
    """The Gluon kernel's source, its layouts dropped, run by the interpreter in place of the GPU."""
    from gluon_shim import interpreted_kernel

    from mxkernels import moe

    kernel = interpreted_kernel()
    monkeypatch.setattr(moe, "_gluon_kernel", lambda: kernel)


@pytest.mark.parametrize("split", [1, 3])
def test_gluon_kernel_arithmetic_in_the_interpreter(interpreted_gluon, split):
    # every scheme the kernel has, mixed; 18 routed experts, half of them empty; split 3 over K 128 in
    # BK 32 tiles leaves one split empty
    errs = gemm_errors(WEIGHT_ONLY, 24, 128, 128, 18, 1, 2, "cpu", seed=11, bk=32, split=split, **GLUON)
    assert {key.split("/")[0] for key in errs} == set(WEIGHT_ONLY), errs.keys()
    for key, e in errs.items():
        assert e < BOUND, (key, e)


def test_gluon_kernel_arithmetic_odd_sizes(interpreted_gluon):
    # H = 160, I = 96: K not a multiple of the tiles, N not of BN; groups of 32
    names = ["bf16", "w4a16g32", "w3a16g32", "w2a16g32", "w8a16"]
    for key, e in gemm_errors(names, 35, 160, 96, 8, 1, 2, "cpu", seed=3, bk=32, split=2, **GLUON).items():
        assert e < BOUND, (key, e)


def test_gluon_kernel_arithmetic_rotated_inputs(interpreted_gluon):
    # gptq-had: the quantized experts read the Hadamard-rotated copy of their input, bf16 ones the plain one
    errs = gemm_errors(["bf16", "w4a16g128", "w2a16g128"], 9, 128, 128, 6, 0, 2, "cpu", seed=5, method="gptq-had",
                       bk=32, split=2, **GLUON)  # fmt: skip
    assert {key.split("/")[0] for key in errs} == {"bf16", "w4a16g128", "w2a16g128"}, errs.keys()
    for key, e in errs.items():
        assert e < BOUND, (key, e)


def test_gluon_kernel_is_refused_where_it_cannot_run(interpreted_gluon, monkeypatch):
    from mxkernels import moe

    with pytest.raises(ValueError, match="bf16 and weight-only"):  # fp8 experts have no Gluon path
        gemm_errors(["w4a16g128", "w8a8fp8"], 4, 128, 128, 4, 0, 2, "cpu", seed=0, split=1, **GLUON)
    monkeypatch.undo()  # the real kernel again: Triton's interpreter does not run Gluon
    assert moe.INTERPRET
    with pytest.raises(ValueError, match="interpreter"):
        gemm_errors(["w4a16g128"], 4, 128, 128, 4, 0, 2, "cpu", seed=0, split=1, **GLUON)
