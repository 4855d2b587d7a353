"""Reading the sm_90 code of a kernel on a machine without a GPU: compile for the target, disassemble
with the cuobjdump that Triton's wheel carries."""

import os
import re
import subprocess
import sys

import pytest

# the Gluon decode kernel's pointer arguments (mxkernels/moe_gemm_gluon.py), as its launches pass them
GLUON_POINTERS = {"a_ptr": "*bf16", "out_ptr": "*fp32", "sorted_ids_ptr": "*i64", "block_expert_ptr": "*i64",
                  "num_post_pad_ptr": "*i64", "route_w_ptr": "*fp32", "meta_ptr": "*i64", "wi_ptr": "*i32",
                  "wb_ptr": "*bf16", "sc_ptr": "*bf16", "zp_ptr": "*bf16"}  # fmt: skip


def in_fresh_process(module: str, call: str) -> str:
    """What ``module.<call>`` returns (a SASS listing), run in a fresh process without TRITON_INTERPRET:
    once a process has run interpreted kernels (any test before, in this file or, under pytest-xdist,
    another one), the interpreter's patches of Triton's language break a compile."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([here, os.path.dirname(here), env.get("PYTHONPATH", "")])
    code = f"import {module}; print({module}.{call}, end='')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if "no cuobjdump" in run.stdout + run.stderr:
        pytest.skip("this Triton wheel has no cuobjdump to read the SASS with")
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def disassemble(compiled, tag: str) -> str:
    """The SASS of a compiled kernel (cuobjdump from the Triton wheel)."""
    tool = _cuobjdump()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mx_sass_{os.getpid()}_{tag}.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    try:
        return subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)


def _cuobjdump() -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("this Triton wheel has no cuobjdump to read the SASS with")
    return tool


def resources(compiled) -> dict[str, int]:
    """A compiled kernel's registers a thread and stack bytes (cuobjdump -res-usage)."""
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mx_res_{os.getpid()}.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
    return {k.lower(): int(re.search(rf"\b{k}:(\d+)", out).group(1)) for k in ("REG", "STACK")}


def compile_decode(gate_up: bool, skip_pad: bool = False, codes: int = 0b111101, bm: int = 16, bn: int = 64,
                   stream_k: bool = False, pdl: int = 0, maxnreg: int | None = None, place: bool = False,
                   early: bool = False, tiled: bool = True, staged: bool = False, wgmma: bool = False,
                   topk: int = 0, n_routed: int = 0, grid_topk: int = 0, slots: int = 0, sp: int = 0):  # fmt: skip
    """The Gluon decode kernel compiled for sm_90 as its launches compile it (by default with bf16, w2, w3, w4
    and w8 experts), under stream-K's register cap or ``maxnreg``'s; ``place``, ``early``: moe.Tiles' options;
    ``tiled``: the codes in arena.tile_words' order (Arena.tiled, where K is a multiple of 128); ``staged``: the
    activations through shared memory (Tiles.staged); ``wgmma``: the products as warpgroup MMAs (Tiles.wgmma);
    ``topk``, ``n_routed``: one token's rows straight from its top-k (stream-K; moe.TOPK_ROWS); ``grid_topk``,
    ``slots``, ``sp``: any tokens' rows straight from their top-k (moe_gemm_gluon._topk_lead; with stream_k
    _topk_leaders)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from mxkernels.moe import STREAM_K_REGISTERS
    from mxkernels.moe_gemm_gluon import WARPS, mx_moe_gemm_gluon_kernel

    params = mx_moe_gemm_gluon_kernel.arg_names
    consts = {"GATE_UP": gate_up, "CODES": codes, "BN": bn, "BM": bm, "PARTIAL": not gate_up, "SKIP_PAD": skip_pad,
              "STREAM_K": stream_k, "PDL": pdl, "PLACE": place,
              "EARLY": early, "TILED": tiled, "GROUP_M": 0, "STAGED": staged, "WGMMA": wgmma, "TOPK": topk,
              "N_ROUTED": n_routed, "GRID_TOPK": grid_topk, "SLOTS": slots, "SP": sp}  # fmt: skip
    sig = {p: GLUON_POINTERS.get(p, "constexpr" if p in consts else "i32") for p in params}
    # as the launcher's arguments specialize on real shapes (every N of the served models is a multiple of 16)
    aligned = set(GLUON_POINTERS) | {"stride_am", "K", "N"}
    src = GluonASTSource(mx_moe_gemm_gluon_kernel, sig, {(params.index(p),): v for p, v in consts.items()},
                         {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p in aligned})  # fmt: skip
    cap = maxnreg or (STREAM_K_REGISTERS[gate_up] if stream_k else None)
    options = {"num_warps": WARPS, **({"maxnreg": cap} if cap else {}), **({"launch_pdl": True} if pdl else {})}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def loops(sass: str, innermost: bool = False) -> list[list[str]]:
    """The instructions of each of a kernel's loops, from a backward branch's target to it, longest first;
    ``innermost``: only loops with no loop inside (stream-K's K loops sit in a loop over units). A branch may take
    a second predicate (``BRA P1, 0x..``), and a large kernel's addresses more than 4 digits (Marlin's)."""
    lines = [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/\s+\S", ln)]
    at = [int(re.search(r"/\*([0-9a-f]{4,})\*/", ln).group(1), 16) for ln in lines]
    branch = re.compile(r"BRA (?:!?U?P\w+, )?(0x[0-9a-f]+)")
    found = [(int(m.group(1), 16), a) for ln, a in zip(lines, at) if (m := branch.search(ln))
             and int(m.group(1), 16) < a]  # fmt: skip
    if innermost:
        found = [(lo, hi) for lo, hi in found if not any(lo <= o[0] and o[1] < hi for o in found if o != (lo, hi))]
    return [[ln for ln, a in zip(lines, at) if lo <= a <= hi] for lo, hi in sorted(found, key=lambda t: t[0] - t[1])]


def k_loop(sass: str, innermost: bool = False) -> list[str]:
    """The instructions of a kernel's longest loop (its K loop); ``innermost``: see loops."""
    return loops(sass, innermost)[0]


def opcodes(sass: str) -> list[str]:
    """The opcode (with its modifiers) of each instruction of a listing, predicates left out."""
    return [m.group(1) for ln in sass.splitlines()
            if (m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", ln))]  # fmt: skip
