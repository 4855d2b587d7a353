"""The Gluon CUDA-core kernel (mxkernels/moe_gemm_gluon_fma.py) on a machine without a GPU: its source in the
interpreter with the layouts dropped (tests/gluon_shim.py), and its sm_90 SASS. Its results on the GPU:
tests/test_kernels_gpu.py.
"""

import re

import pytest
from kernel_cases import GLUON_BOUND as BOUND
from kernel_cases import GLUON_SCHEMES, code_orders_agree, gemm_errors
from sass_tools import GLUON_POINTERS as POINTERS
from sass_tools import disassemble, in_fresh_process

gluon = pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")


@pytest.fixture
def interpreted_gluon_fma(monkeypatch):
    """The Gluon CUDA-core kernel's source, its layouts dropped, run by the interpreter in place of the GPU."""
    from gluon_shim import interpreted_kernel

    from mxkernels import moe

    kernel = interpreted_kernel("moe_gemm_gluon_fma", "mx_moe_gemm_gluon_fma_kernel")
    monkeypatch.setattr(moe, "_gluon_fma_kernel", lambda: kernel)


GLUON_FMA = dict(swap=True, scale_after=True, fma=True, gluon=True, bm=1, prefetch=False)


@pytest.mark.parametrize("t, split", [(8, 3), (1, 1)])
def test_gluon_fma_kernel_arithmetic_in_the_interpreter(interpreted_gluon_fma, t, split):
    # every scheme it runs, mixed, one row per block (18 routed experts of which the skewed routing feeds
    # 9), split in fp32 partials; and one token alone, unsplit (SiLU and bf16 stores in the kernel).
    # H = 256, I = 128: two K tiles of gate/up and one of down, so split 3 leaves empty splits in both
    # (I = 256 took twice the interpreter's time for no other path); every output written
    errs = gemm_errors(GLUON_SCHEMES, t, 256, 128, 18, 1, 2, "cpu", seed=t, split=split, **GLUON_FMA)
    assert t == 1 or {key.split("/")[0] for key in errs} == set(GLUON_SCHEMES), errs.keys()
    for key, e in errs.items():
        assert e < BOUND, (key, t, split, e)


@pytest.mark.parametrize("t, split", [(4, 3), (1, 1)])
def test_gluon_fma_kernel_packed_arithmetic_in_the_interpreter(interpreted_gluon_fma, t, split):
    # MXSERVE_GLUON_FMA=packed: 1, 2 and 4-bit codes in packed bf16 pairs (its PTX emulated on each half),
    # beside a code that keeps the fp32 products (8 bits) in the same launch; split with empty splits
    schemes = ["w1a16g128", "w2a16g128", "w4a16g128", "w8a16"]
    errs = gemm_errors(schemes, t, 256, 128, 8, 1, 2, "cpu", seed=t, split=split, packed=True, **GLUON_FMA)
    assert t == 1 or {key.split("/")[0] for key in errs} == set(schemes), errs.keys()
    for key, e in errs.items():
        assert e < BOUND, (key, t, split, e)


def test_gluon_fma_kernel_reads_the_codes_tiled_as_row_by_row(interpreted_gluon_fma):
    diff, orders = code_orders_agree(GLUON_SCHEMES, 3, 256, 128, 8, 2, "cpu", seed=2, split=2, **GLUON_FMA)
    assert orders == [(True, True), (False, False)] and diff == 0, (orders, diff)


def test_gluon_fma_kernel_rotated_inputs_and_a_model_wide_code_set(interpreted_gluon_fma):
    errs = gemm_errors(["bf16", "w4a16g128", "w3a16g128"], 3, 128, 128, 4, 1, 2, "cpu", seed=4, method="gptq-had",
                       extra_codes=(1 << 6) | (1 << 7), split=2, **GLUON_FMA)  # fmt: skip
    assert {key.split("/")[0] for key in errs} == {"bf16", "w4a16g128", "w3a16g128"}, errs.keys()
    for key, e in errs.items():
        assert e < BOUND, (key, e)


def test_gluon_fma_kernel_is_taken_at_one_token_when_asked(interpreted_gluon_fma, monkeypatch):
    # MXSERVE_GLUON_FMA=1: the CUDA-core launches of a layer it can run go to it (on a GPU; here the
    # interpreted source), and compute what the reference computes; asked for, it keeps the one-row
    # launches that the stream-K grid takes by default
    from mxkernels import moe

    monkeypatch.setattr(moe, "_runs_gluon", lambda dev: True)
    monkeypatch.setenv("MXSERVE_GLUON_FMA", "1")
    taken = []
    real = moe._gemm_gluon_fma
    monkeypatch.setattr(moe, "_gemm_gluon_fma", lambda *a: taken.append(a[-3].fma) or real(*a))
    errs = gemm_errors(["w4a16g128", "w2a16g128"], 1, 256, 256, 6, 1, 2, "cpu", seed=3)
    assert taken == [True] * 4, taken  # gate/up and down, of the shared experts apart and of the routed ones
    for key, e in errs.items():
        assert e < BOUND, (key, e)
    monkeypatch.setenv("MXSERVE_GLUON_FMA", "0")
    monkeypatch.setenv("MXSERVE_STREAM_K", "0")
    taken.clear()
    gemm_errors(["w4a16g128"], 1, 128, 128, 4, 0, 2, "cpu", seed=3)
    assert taken == []  # off by default: the Triton CUDA-core products (without stream-K)


def _sass_fma(gate_up: bool, codes: int = 0b111110, packed: bool = False) -> str:
    return in_fresh_process("test_gluon_fma", f"_compile_sass_fma({gate_up}, {codes}, {packed})")


def _compile_sass_fma(gate_up: bool, codes: int, packed: bool) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from mxkernels.moe_gemm_gluon_fma import WARPS, mx_moe_gemm_gluon_fma_kernel

    params = mx_moe_gemm_gluon_fma_kernel.arg_names
    # default: the served plan's code set, w1, w2, w3, w4 and w8 experts
    consts = {"GATE_UP": gate_up, "CODES": codes, "BN": 64, "PARTIAL": True, "PACKED": packed, "ASM": True,
              "TILED": True}  # fmt: skip
    sig = {p: POINTERS.get(p, "constexpr" if p in consts else "i32") for p in params}
    aligned = set(POINTERS) | {"stride_am", "K"}
    src = GluonASTSource(mx_moe_gemm_gluon_fma_kernel, sig, {(params.index(p),): v for p, v in consts.items()},
                         {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p in aligned})
    return disassemble(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": WARPS}),
                        f"fma_{int(gate_up)}_{codes}_{int(packed)}")  # fmt: skip


@pytest.mark.parametrize("gate_up", [True, False])
def test_gluon_fma_kernel_has_no_barrier_and_no_shared_memory(gate_up):
    # the point of the kernel (moe_gemm_gluon_fma.py): each lane loads the codes and the activations of
    # its own 32 k and sums along them in registers; the 4 lanes of a row meet by shuffles after the loop
    sass = _sass_fma(gate_up)
    for op in ("BAR", "LDS", "STS", "LDSM", "STSM"):
        assert not re.search(rf"\b{op}\b", sass), op
    assert len(re.findall(r"\bFFMA\b", sass)) >= 32 * 5 * (2 if gate_up else 1)  # a chain per code width
    assert re.search(r"\bLDG\.E\.128\b", sass), "codes or activations not loaded 16 bytes at a time"


def test_gluon_fma_kernel_packed_cuts_the_instructions_of_a_4_bit_layer():
    # the point of PACKED: two codes per bf16x2 fused multiply-add, so a 4-bit layer's kernel is a sixth
    # shorter in all (its K loop a quarter: 571 -> 432 instructions for gate/up in the sm_90 SASS), still
    # without barriers or shared memory
    plain, packed = _sass_fma(True, 0b10000), _sass_fma(True, 0b10000, True)
    count = lambda sass: len(re.findall(r"/\*[0-9a-f]{4}\*/\s+\S", sass))  # noqa: E731
    assert count(packed) < 0.9 * count(plain), (count(packed), count(plain))
    assert len(re.findall(r"\bHFMA2\.(?:MMA\.)?BF16_V2\b", packed)) >= 64  # a tile's 64 pairs per lane
    # (ptxas may still use an HFMA2.MMA to set a constant in the plain kernel: no bf16x2 arithmetic)
    assert not re.search(r"\bHFMA2\.(?:MMA\.)?BF16_V2\b", plain)
    for op in ("BAR", "LDS", "STS"):
        assert not re.search(rf"\b{op}\b", packed), op
