"""The Gluon kernels use only what the device's Triton has.

CI and this machine run Triton 3.9 (the interpreter, and the sm_90 compiles of test_gluon_sass.py); the lent GPUs run
Triton 3.6, whose Gluon lacks some of 3.9's functions. The forty-sixth session's stream-K top-k rows used gl.cumsum:
every CPU test passed (tests/gluon_shim.py stood in for it too), and the kernel did not compile on the H100
(benchmarks/results/gpu_tests_h100_s47_topk_grid.log)."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# dir(triton.experimental.gluon.language) of Triton 3.6.0 (the lent GPUs' release), public names:
#   pip download triton==3.6.0 --no-deps -d /tmp/t36 && unzip -q /tmp/t36/triton-3.6.0-*.whl -d /tmp/t36x
#   PYTHONPATH=/tmp/t36x python -c "import triton.experimental.gluon.language as gl; print(dir(gl))"
TRITON_36_GLUON = frozenset("""
    AutoLayout BlockedLayout CoalescedLayout DistributedLinearLayout DotOperandLayout NVMMADistributedLayout
    NVMMASharedLayout PaddedSharedLayout SharedLinearLayout SliceLayout SwizzledSharedLayout abs add
    allocate_shared_memory amd arange associative_scan assume atomic_add atomic_and atomic_cas atomic_max atomic_min
    atomic_or atomic_xchg atomic_xor bank_conflicts base_type base_value bfloat16 block_type broadcast cast cdiv ceil
    constexpr convert_layout cos device_assert device_print distributed_type div_rn dot_fma dtype erf exp exp2
    expand_dims extra fdiv float16 float32 float64 float8e4b15 float8e4b8 float8e4nv float8e5 float8e5b16 floor fma
    fp4_to_fp full full_like gather histogram inline_asm_elementwise int1 int16 int32 int64 int8 join load log log2
    map_elementwise max max_constancy max_contiguous maximum min minimum mul multiple_of num_ctas num_programs num_warps
    nvidia permute pointer_type program_id ravel reduce reduce_or reshape rsqrt set_auto_layout shared_memory_descriptor
    shared_memory_descriptor_type sin split sqrt sqrt_rn static_assert static_print static_range store sub sum tensor
    thread_barrier to_linear_layout to_tensor tuple tuple_type uint16 uint32 uint64 uint8 umulhi void warp_specialize
    where xor_sum zeros zeros_like
""".split())


def gluon_uses(path: Path) -> list[tuple[int, str, str]]:
    """Each ``gl.NAME`` in ``path``'s code (not its comments or strings): (line, NAME, the line's text)."""
    text = path.read_text()
    toks = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type not in (tokenize.COMMENT, tokenize.STRING, tokenize.NL, tokenize.NEWLINE)]  # fmt: skip
    lines = text.splitlines()
    return [(a.start[0], c.string, lines[a.start[0] - 1]) for a, b, c in zip(toks, toks[1:], toks[2:])
            if a.string == "gl" and b.string == "." and c.type == tokenize.NAME]  # fmt: skip


def test_gluon_kernels_use_only_what_triton_3_6_has():
    files = sorted((ROOT / "mxkernels").glob("*.py"))
    uses = [(f.name, *u) for f in files for u in gluon_uses(f)]
    assert len({f for f, *_ in uses}) >= 2 and len(uses) > 100  # the scan reads the kernels
    # a name newer than 3.6 only as the fallback of a getattr that asks for its 3.6 spelling first
    missing = [(f, n, name) for f, n, name, line in uses if name not in TRITON_36_GLUON
               and not any(f'getattr(gl, "{old}"' in line for old in TRITON_36_GLUON)]  # fmt: skip
    assert not missing, missing


def test_the_scan_finds_a_name_triton_3_6_lacks(tmp_path):
    kernel = tmp_path / "k.py"
    kernel.write_text("# gl.nothing in a comment\nx = gl.cumsum(lead, axis=0)  # gl.sum\ny = 'gl.foo'\n")
    assert [(n, name) for n, name, _ in gluon_uses(kernel)] == [(2, "cumsum")]
    assert "cumsum" not in TRITON_36_GLUON and "sum" in TRITON_36_GLUON
