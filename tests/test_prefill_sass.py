"""The Triton GEMM kernel's prefill variants as served on an H200, compiled for sm_90 on the CPU
(tests/sass_tools.py): what the interpreter cannot show, how the MMAs accumulate."""

import re

from sass_tools import disassemble, in_fresh_process


def _compile_prefill_sass(scheme: str, tokens: int, kmajor: bool = False) -> str:
    """The SASS of the GEMM variants a Qwen1.5-shaped layer of ``scheme`` experts (a comma-separated
    list: a mix, expert by expert) launches at ``tokens`` tokens with the H200's tuned tiles, gate/up
    first, through the launch path (precompile's recording); ``kmajor``: with Tiles.kmajor."""
    import json

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mxkernels import moe
    from mxkernels.tile_table import TABLE_DIR, TileTable
    from mxserve.runtime.precompile import KERNELS, LayerKernels, record_variants

    moe.PREFILL_DEQUANT = "0"  # the weight-only tiles themselves (dequantized first, the GEMM runs bf16 ones)

    target = GPUTarget("cuda", 90, 32)
    table = TileTable.from_json(json.load(open(f"{TABLE_DIR}/nvidia-h200.json")))
    names = scheme.split(",")
    schemes = tuple(names[e % len(names)] for e in range(64))
    layer = LayerKernels(2048, 1408, 60, 4, schemes, schemes)
    gemms = [v for v in record_variants([layer], [tokens], target, 132, table=table).all() if v.kernel == "gemm"]
    for v in gemms:
        v.constexprs[(v.names().index("KMAJOR"),)] = kmajor
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


def test_kmajor_prefill_stores_the_dequantized_tile_in_16_byte_vectors():
    # weight-only prefill: the dequantized [BK, BN] tile went to the MMA's shared memory 2 bytes at a time
    # (128 STS.U16 a thread per K tile in gate/up). Dequantized as [BN, BK] and transposed into the MMA
    # (Tiles.kmajor), each thread's values are K-contiguous there: 16-byte stores, and no more spills (the
    # mixed code set's gate/up spilled before: 22 local loads and stores, 6 with kmajor)
    for mix in ("w4a16g128", "w3a16g128,w2a16g128,w4a16g128,w8a16"):
        plain, kmajor = (in_fresh_process("test_prefill_sass", f'_compile_prefill_sass("{mix}", 4096, {k})')
                         .split("\n=====\n") for k in (False, True))  # fmt: skip
        assert len(plain) == len(kmajor) == 2  # gate/up and down
        for before, after in zip(plain, kmajor):
            assert len(re.findall(r"STS\.U16", before)) >= 64, mix  # the fault this fixes
            assert not re.search(r"STS\.U16", after), mix
            assert len(re.findall(r"STS\.128", after)) > len(re.findall(r"STS\.128", before)), mix
            assert len(re.findall(r"\b(STL|LDL)\b", after)) <= len(re.findall(r"\b(STL|LDL)\b", before)), mix
