"""The Triton GEMM kernel's prefill variants as served on an H200, compiled for sm_90 on the CPU
(tests/sass_tools.py): what the interpreter cannot show, how the MMAs accumulate."""

import re

from sass_tools import disassemble, in_fresh_process


def _compile_prefill_sass(scheme: str, tokens: int) -> str:
    """The SASS of the GEMM variants a Qwen1.5-shaped layer of ``scheme`` experts launches at ``tokens``
    tokens with the H200's tuned tiles, gate/up first, through the launch path (precompile's recording)."""
    import json

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mxkernels.tile_table import TABLE_DIR, TileTable
    from mxserve.runtime.precompile import KERNELS, LayerKernels, record_variants

    target = GPUTarget("cuda", 90, 32)
    table = TileTable.from_json(json.load(open(f"{TABLE_DIR}/nvidia-h200.json")))
    layer = LayerKernels(2048, 1408, 60, 4, (scheme,) * 64, (scheme,) * 64)
    gemms = [v for v in record_variants([layer], [tokens], target, 132, table=table).all() if v.kernel == "gemm"]
    return "\n=====\n".join(
        disassemble(triton.compile(ASTSource(KERNELS["gemm"], v.signature, v.constexprs, v.attrs), target=target,
                                   options=v.options), f"prefill{i}")
        for i, v in enumerate(gemms)
    )  # fmt: skip


def test_fp8_prefill_accumulates_in_the_wgmma():
    # `acc += tl.dot(a, b)` is not fused for fp8 (the MMA accumulates in less than fp32): every K tile's
    # wgmma chain started from zero, was waited for at once and was added in FADDs, with a stack spill in
    # gate/up. The accumulator passed into the dot (as SGLang's fused_moe does) keeps the chain async.
    variants = in_fresh_process("test_prefill_sass", '_compile_prefill_sass("w8a8fp8", 4096)').split("\n=====\n")
    assert len(variants) == 2  # gate/up and down
    for sass in variants:
        chains = re.findall(r"QGMMA\.64x\d+x32\.F32\.E4M3\.E4M3 (R\d+|RZ), gdesc\[\w+\][^,]*, (R\d+|RZ)", sass)
        assert len(chains) >= 4, "no fp8 wgmma in the prefill variant"
        assert all(src == dst for dst, src in chains), "a wgmma chain that does not accumulate into its result"
        assert not re.search(r"\b(STL|LDL)\b", sass), "local memory (spills) in the prefill variant"
