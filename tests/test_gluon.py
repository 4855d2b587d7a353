"""The experimental Gluon decode kernel (mxkernels/moe_gemm_gluon.py) on a machine without a GPU.

Triton's interpreter does not run Gluon, so here the kernel is compiled for sm_90 and its SASS
is read: the point of the kernel is that the weights reach the MMA without shared memory. Its
results are checked on the GPU (tests/test_kernels_gpu.py, test_gluon_kernel_*).
"""

import os
import re
import subprocess

import pytest

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


def test_gluon_kernel_is_refused_where_it_cannot_run():
    from kernel_cases import gemm_errors

    # the interpreter runs these tests: Gluon cannot run there, and fp8 experts have no Gluon path
    with pytest.raises(ValueError, match="Gluon"):
        gemm_errors(["w4a16g128", "w8a8fp8"], 4, 128, 128, 4, 0, 2, "cpu", seed=0, swap=True, gluon=True, split=1)
