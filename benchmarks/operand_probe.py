"""How a dequantized weight tile reaches the MMA: Triton's tl.dot against Gluon's mma_v2 (sm_90 SASS, no GPU).

The same decode product (int4 codes -> bf16 weights [64, BK] on the MMA's M side, 16 token rows)
compiled for sm_90 three ways, with the shared-memory instructions counted in the SASS:

- ``triton-words``: as mxkernels/moe_gemm.py loads codes (each word once, split in registers);
- ``triton-elementwise``: every element loads its own word and nibble (a purely elementwise
  chain from the load to tl.dot, the case Triton's operand hoisting looks for);
- ``gluon``: the elementwise chain with every tensor in the mma.sync A-operand layout.

    python3 benchmarks/operand_probe.py
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def triton_kernel(w_ptr, a_ptr, o_ptr, K, BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                  ELEMENTWISE: tl.constexpr):  # fmt: skip
    n = tl.arange(0, BN)
    kk = tl.arange(0, BK)
    m = tl.arange(0, BM)
    K = tl.multiple_of(K, 128)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if ELEMENTWISE:
            words = tl.load(w_ptr + n[:, None] * (K // 8) + (k0 + kk[None, :]) // 8)
            q = (words >> (((k0 + kk[None, :]) % 8) * 4)) & 0xF
        else:
            q = tl.load(w_ptr + n[:, None] * (K // 8) + (k0 // 8 + tl.arange(0, BK // 8))[None, :])
            for level in tl.static_range(3):
                q = tl.join(q & ((1 << (16 >> level)) - 1), (q >> (16 >> level)) & ((1 << (16 >> level)) - 1))
            q = tl.reshape(q, (BN, BK))
        wq = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        a = tl.load(a_ptr + m[:, None] * K + k0 + kk[None, :])
        acc += tl.dot(wq, tl.trans(a))
    tl.store(o_ptr + n[:, None] * BM + m[None, :], acc)


def _gluon_kernel():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    @gluon.jit
    def gluon_kernel(w_ptr, a_ptr, o_ptr, K, BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr):
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1], instr_shape=[16, 8])
        aop: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        bop: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        n = gl.arange(0, BN, layout=gl.SliceLayout(1, aop))
        kk = gl.arange(0, BK, layout=gl.SliceLayout(0, aop))
        kb = gl.arange(0, BK, layout=gl.SliceLayout(1, bop))
        m = gl.arange(0, BM, layout=gl.SliceLayout(0, bop))
        acc = gl.zeros([BN, BM], gl.float32, layout=mma)
        for k0 in range(0, K, BK):
            words = gl.load(w_ptr + n[:, None] * (K // 8) + (k0 + kk[None, :]) // 8)
            q = (words >> (((k0 + kk[None, :]) % 8) * 4)) & 0xF
            wq = (q | 0x4300).to(gl.int16).to(gl.bfloat16, bitcast=True)
            acc = mma_v2(wq, gl.load(a_ptr + m[None, :] * K + k0 + kb[:, None]), acc)
        on = gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
        om = gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
        gl.store(o_ptr + on[:, None] * BM + om[None, :], acc)

    return gluon_kernel


def sass_counts(cubin: bytes) -> dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("LDS", "STS", "LDSM", "LDGSTS", "HGMMA", "HMMA")}


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    sig = {"w_ptr": "*i32", "a_ptr": "*bf16", "o_ptr": "*fp32", "K": "i32", "BN": "constexpr", "BM": "constexpr",
           "BK": "constexpr"}  # fmt: skip
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(3)}
    tile = {(4,): 64, (5,): 16, (6,): 64}
    rows = []
    for name, elementwise in (("triton-words", False), ("triton-elementwise", True)):
        src = ASTSource(triton_kernel, {**sig, "ELEMENTWISE": "constexpr"}, {**tile, (7,): elementwise}, attrs)
        c = triton.compile(src, target=target, options={"num_warps": 4, "num_stages": 3})
        rows.append((name, sass_counts(c.asm["cubin"]), c.asm["ttgir"].count("local_alloc")))
    from triton.experimental.gluon._runtime import GluonASTSource

    c = triton.compile(GluonASTSource(_gluon_kernel(), sig, tile, attrs), target=target, options={"num_warps": 4})
    rows.append(("gluon", sass_counts(c.asm["cubin"]), c.asm["ttgir"].count("local_alloc")))
    print(f"Triton {triton.__version__}, sm_90, int4 weights [64, 64] x 16 tokens per K tile")
    print("| kernel | local_alloc (TTGIR) | " + " | ".join(rows[0][1]) + " |")
    print("|---|---:|" + "---:|" * len(rows[0][1]))
    for name, counts, allocs in rows:
        print(f"| {name} | {allocs} | " + " | ".join(str(v) for v in counts.values()) + " |")


if __name__ == "__main__":
    main()
