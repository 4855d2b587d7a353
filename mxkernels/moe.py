"""Launching the mixed-precision MoE layer: routing alignment, two grouped GEMMs, the top-k sum.

Shared experts are experts that receive every token: they are appended to each
token's top-k as extra slots (ids n_routed.., weight 1), so one launch per GEMM
can cover routed and shared experts alike; the shared gate scales their sum after.
At decode the shared experts' rows get launches of their own instead, on a second
stream: they need no routing, so they run beside the alignment and the routed
experts' launches, which at a few rows per expert wait on latency, not bandwidth.

Rounding follows the unfused bf16 pipeline SGLang runs for an unquantized MoE
(fused_moe: gate/up to bf16, SiLU(gate) * up to bf16, each slot's weighted down
output to bf16, routed slots summed once; shared MLP to bf16, then one fp32
``routed + sigmoid(gate) * shared``), so an all-bf16 plan reproduces SGLang's
numbers up to the order of fp32 sums inside the GEMMs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton

from mxkernels import dequant
from mxkernels.act_quant import row_quant
from mxkernels.align import route, shared_rows
from mxkernels.arena import CODE_FP8, N_CODES, Arena, kernel_code
from mxkernels.combine import combine
from mxkernels.moe_gemm import INTERPRET, mx_moe_gemm_kernel, silu_mul_kernel
from mxkernels.pdl import gluon_has_it, launch, pdl
from mxkernels.tile_table import codes_class, tile_table


@dataclass(frozen=True)
class Tiles:
    """One GEMM launch's configuration (moe_gemm.py says what split, SWAP and SCALE_AFTER do)."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int = 3
    split: int = 1
    swap: bool = False
    scale_after: bool = False
    maxnreg: int | None = None  # register cap per thread (more programs resident per SM)
    fma: bool = False  # with swap: CUDA-core products instead of the MMA (moe_gemm._dot)
    prefetch: bool = False  # weight-only codes: the next K tile's loads before this tile's products
    fold_zero: bool = False  # with fma: zero points off each weight, not off the sum (moe_gemm._wonly_step)
    gluon: bool = False  # with swap: the Gluon kernel, weights loaded into MMA registers (moe_gemm_gluon.py;
    # its own BK, and BN 64 unless bn asks for 128); with fma: the Gluon CUDA-core kernel (moe_gemm_gluon_fma.py)
    packed: bool = False  # with fma and gluon: 1, 2 and 4-bit codes in packed bf16 pairs (_product_packed)
    skip_pad: bool = False  # the Gluon MMA kernel: a block's padding slots load no activations (masked)
    # the Gluon MMA kernel: K split in proportion to each expert's bits (``split`` for the widest code of
    # the launch, fewer for narrower ones; the rest of its programs store zeros), so that a w8 expert's
    # programs walk as many bytes as a w2 one's (code_splits)
    split_bits: bool = False
    # weight-only prefill (no swap): the tile dequantized K-major and transposed into the MMA, so its
    # stores into shared memory are K-contiguous vectors (moe_gemm._mm_wonly); pick_tiles' prefill default
    kmajor: bool = False
    # the Gluon MMA kernel on a grid of as many programs as the SMs hold (_stream_k_per_sm), the K tiles of
    # all its work dealt out in equal runs and added with fp32 reductions into zeroed buffers (moe_gemm_gluon,
    # STREAM_K); one launch per GEMM, shared experts included. Decode's default below STREAM_K_ROWS
    stream_k: bool = False
    # the Triton kernel unswapped (prefill): programs taken GROUP_M blocks at a time over every N tile, so the rows
    # each block reads stay in L2 for its N tiles (moe_gemm.py); 0 keeps the launch's own order (block fastest). The
    # Gluon decode kernel (opt-in, both grids): so an expert's blocks read its weights at once (moe_gemm_gluon._grouped)
    group_m: int = 0
    # stream-K: at most this many programs an SM (0: STREAM_K_MOST), as many as their registers let share it; with
    # ``maxnreg`` the register cap in place of STREAM_K_REGISTERS' (NO_CAP: none)
    per_sm: int = 0
    # the Gluon MMA kernel, 1 and 2-bit codes: 7 or 3 fields unpacked a shift, each left in place (128 + 2^(B j) q) and
    # the activations scaled by 2^-(B j) to match (moe_gemm_gluon._pairs): 2 bits, a third fewer shifts and masks
    place: bool = False
    # the Gluon MMA kernel: the next K tile's loads kept before this tile's products (a branch between them: ptxas
    # otherwise sinks gate/up's loads past most of its MMAs, moe_gemm_gluon._expert), for more registers
    early: bool = False
    # the Gluon MMA kernel: the activations through shared memory (cp.async, moe_gemm_gluon._stage), not held a tile
    # ahead in registers (decode's default on large layers: STAGED_ROWS); lets a block take 32 rows (bm=32), which
    # took 2.1x the time (H100, thirty-third session)
    staged: bool = False
    # the Gluon MMA kernel on sm_90: the products as warpgroup MMAs (wgmma) of the 4 warps' 64 rows (BN 64) and all the
    # block's tokens, the activations copied into shared memory (moe_gemm_gluon._products_wg); blocks of 8 to 64 rows
    wgmma: bool = False
    # the shared experts' launches apart (decode): their block picked from their own rows, every token's (_layout);
    # false: the routed experts' block, as before the thirty-seventh session
    shared_own: bool = True
    # ... and that block forced (0: picked so): 8, 16, or 32 with the activations staged (moe_gemm_gluon: 32-row blocks
    # take them through shared memory)
    shared_bm: int = 0


_TILE_FIELDS = frozenset(f.name for f in dataclasses.fields(Tiles))


def _replace(tiles: Tiles, **changes) -> Tiles:
    """``dataclasses.replace`` for Tiles without its walk over the fields and ``__init__``: an eager forward
    (prefill: SGLang replays graphs for decode only) replaces tiles up to 8 times; with this its host time fell
    from 149-188 to 120-154 us (benchmarks/host_overhead.py on this project's CPU, Qwen1.5's expert counts)."""
    unknown = changes.keys() - _TILE_FIELDS
    if unknown:
        raise TypeError(f"Tiles has no field {', '.join(sorted(unknown))}")
    new = object.__new__(Tiles)
    new.__dict__.update(tiles.__dict__, **changes)  # frozen: no __setattr__, the instance dict is its state
    return new


# the Gluon decode kernel's activations through shared memory (Tiles.staged) at STAGED_ROWS rows per expert or more
# where the launch's active experts hold at least STAGED_WEIGHTS_PER_SM weights per SM (expected under uniform
# routing; gate/up's, and the down GEMM follows). On the H100 (thirty-third session,
# results/moe_layer_h100_s33_staged.md) Mixtral's layer at 16 and 64 tokens (4 and 16 rows, 7.0M weights an SM)
# took 0.85 to 0.98x the picked layout's time (mixed 3.25 bits, w4 and the served plan's tiers, both routings); at 8
# tokens (2.3 rows) 0.93 to 1.04x; the other shapes (Qwen1.5-MoE, DeepSeek-V2-Lite, Qwen3-30B-A3B: at most 3.1M
# weights an SM at 64 tokens) 0.96 to 1.18x, mostly 1.0 to 1.06x. Long K runs per program hide the ring's fill, and
# full blocks load the most activations
STAGED_ROWS = 4.0
STAGED_WEIGHTS_PER_SM = 4 << 20


# blocks a prefill launch's programs take at a time over every N tile (Tiles.group_m), unless a tile table entry or an
# override says otherwise (0: the launch's own order)
PREFILL_GROUP_M = 8


# fields an override (or a tile table entry) may set for the down GEMM alone, under "down_tiles": those that leave the
# layout both GEMMs share as it is (the alignment's block, BM; the orientation; the kernel)
DOWN_FIELDS = ("bn", "bk", "warps", "stages", "split", "maxnreg", "kmajor", "group_m", "per_sm", "place", "early")


DECODE_ROWS = 16  # rows per expert up to which a launch takes the decode layout


def tile_setting(text: str) -> tuple[str, int | bool | None]:
    """``FIELD=VALUE``: a field of Tiles (``down_tiles.FIELD``: the down GEMM's alone, one of DOWN_FIELDS), an
    integer or true/false, or for a down_tiles field "picked" (None: the picked layout's value, not the layer's
    override) (profile_layer.py's --set, MXSERVE_DECODE_TILES)."""
    field, _, value = text.strip().partition("=")
    fields = [f.name for f in dataclasses.fields(Tiles)] + [f"down_tiles.{f}" for f in DOWN_FIELDS]
    if field not in fields or not value:
        raise ValueError(f"{text!r}: FIELD=VALUE, FIELD one of {', '.join(fields)}")
    if value.lower() in ("true", "false"):
        return field, value.lower() == "true"
    if value.lower() == "picked" and field.startswith("down_tiles."):
        return field, None
    try:
        return field, int(value)
    except ValueError:
        raise ValueError(f"{text!r}: an integer or true/false (down_tiles.FIELD: or picked)") from None


def down_override(override: dict, down_only: dict) -> dict:
    """The down GEMM's override: the layer's fields, then its own (``down_only``), where None drops the layer's
    field so the down GEMM takes the picked layout's (gate/up's options alone)."""
    both = {**override, **down_only}
    return {f: v for f, v in both.items() if not (f in down_only and v is None)}


def tile_overrides(settings: list[tuple[str, int | bool | None]]) -> dict:
    """``tile_setting``'s settings as mx_moe_forward's tile overrides ("down_tiles.FIELD" ones under "down_tiles")."""
    out: dict = {f: v for f, v in settings if not f.startswith("down_tiles.")}
    down = {f.removeprefix("down_tiles."): v for f, v in settings if f.startswith("down_tiles.")}
    return {**out, "down_tiles": down} if down else out


def decode_tiles() -> dict:
    """MXSERVE_DECODE_TILES (read per launch, as MXSERVE_STREAM_K): comma-separated ``tile_setting``s for the
    decode launches (at most DECODE_ROWS rows per expert), e.g. ``early=true,bn=64``, so that a server runs an
    option the layer benchmark times (benchmarks/moe_layer.py's variants) without a code change; a forward's own
    override wins field by field."""
    text = os.environ.get("MXSERVE_DECODE_TILES", "")
    return tile_overrides([tile_setting(t) for t in text.split(",") if t.strip()]) if text.strip() else {}


# rows per expert (expected under uniform routing) up to which decode takes CUDA-core products, one
# row per program: on the H200 they won at 1 and 2 tokens on every benchmarked shape and lost from
# 1.5 to 1.7 under skewed routing (benchmarks/results/moe_layer_h200.md, "Decode layouts")
FMA_ROWS = 1.4
WAVES = 4  # decode: split K until about this many programs per multiprocessor
# decode on the Gluon kernel where a layer's schemes allow (moe_gemm_gluon.eligible), above this many
# rows per expert: on the H200 it took 0.5 to 0.7x the Triton MMA layout's time and beat the CUDA-core
# products from 2 tokens on (1.2 to 1.4 rows), tied at 1.06 and lost at one row (benchmarks/README.md).
# MXSERVE_GLUON=0 keeps every layer on the Triton kernel
GLUON_DECODE = os.environ.get("MXSERVE_GLUON", "1") != "0"
GLUON_ROWS = 1.1
# the Gluon decode layout on the stream-K grid (Tiles.stream_k) below this many rows per expert, from one
# row (in place of the CUDA-core products): on the H200 it took 0.77 to 1.05x the time of the layouts it
# replaced wherever it is picked, on all four benchmarked shapes, mixed and w4 (1 to 16 tokens;
# benchmarks/results/moe_layer_h200_s18_decode.md); forced at 4 rows and more (Mixtral at 16 tokens, every
# shape at 64) it took up to 1.2x (moe_layer_h200_s18_stream_k.md).
# MXSERVE_STREAM_K: "auto" (this), "1" every Gluon decode launch, "0" none (its fp32 sums are added in
# whatever order the programs end: "0" gives outputs that repeat bit for bit)
STREAM_K_ROWS = 4.0
# ... and below this many where more than STREAM_K_COSTLY of the layer's weights are in costly codes (bf16, 3 or
# 8 bits: outside moe_gemm_gluon.NARROW_CODES; 3 and 8-bit K tiles take 1.5x the instructions of 2 and 4-bit
# ones, bf16's 4x their bytes; runs of equal cost, not length, did not help: the cause is not known). On the
# H200 (twentieth session): the layer of the served 3.25-bit plan's tiers (w8, w4, w3, w2; half costly; Qwen1.5)
# took 1.04 to 1.24x the unbalanced grid's time on it at 8 to 32 tokens (2.2 to 4.4 rows per expert), 0.82 to 0.88x
# at 1 token (results/moe_layer_h200_s20_served.md); the served r = 1 plan (46% costly) served 0.91x the
# tokens/s at 8 requests on it (serving-qwen15-24l-h200-s19-stream-k.md); the layer of the r = 0.25 plan (5%
# costly) took 67.9 us on it at 8 requests against 70.9 on the unbalanced grid, in two runs
# (results/decode_spans_h200_s20.md). With an eighth (12.5%) or a quarter of the tiers costly it took 1.02 to 1.06x
# at 8 tokens and 1.16 to 1.23x at 16, in two runs (twenty-first session, results/moe_layer_h200_s21_costly.md and
# moe_layer_h200_s21_deal.md); dealing the K tiles out by cost did not change that (benchmarks/README.md)
STREAM_K_ROWS_COSTLY = 1.5
STREAM_K_COSTLY = 0.1
STREAM_K_MODES = ("auto", "1", "0")
# "single": one launch per GEMM runs every scheme of a layer (the paper's design); "grouped": one
# launch per group of codes (code_groups), so that a wide branch (3 or 8 bits, bf16) does not set the
# registers of every expert's program. MXSERVE_DISPATCH picks one for every launch (read per launch,
# so that `mxserve launch`'s precompile sees what its server will run); `dispatch=` per call
DISPATCHES = ("single", "grouped")
# codes launched together by the grouped dispatch: weight-only 1, 2 and 4 bits, whose branches compile
# to about the same registers (moe_gemm_gluon.NARROW_CODES); every other code has a launch of its own
SHARED_LAUNCH = (1 << 1) | (1 << 2) | (1 << 4)


@functools.lru_cache(maxsize=8)
def multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a small GPU, so tests reach the split-K path
    return torch.cuda.get_device_properties(device).multi_processor_count


# how decode splits K: "fill" (the default) until about WAVES programs per SM over the layer's concurrent
# launches; "waves" the split whose programs walk the fewest K tiles one after another (waves of programs
# times tiles per program), with CUDA-core programs capped at 128 registers as the MMA ones are, so that
# RESIDENT fit an SM. Where programs outnumber what the SMs hold, the last ones wait for a first wave
# (benchmarks/decode_waves.py: the served 3.25-bit plan's 1-token launches take 1.3 to 1.5 waves).
# MXSERVE_DECODE_SPLIT picks one for every launch (read per launch, as MXSERVE_DISPATCH); split_fit= per call
SPLIT_FITS = ("fill", "waves")
RESIDENT = 4  # programs of 4 warps at 128 registers per SM (64K registers: sm_80 to sm_90)


def wave_split(work: int, k_tiles: int, sms: int, resident: int = RESIDENT, most: int = 8) -> int:
    """The split of ``k_tiles`` K tiles for ``work`` programs per split that takes the fewest K tiles in
    sequence on ``sms`` multiprocessors of ``resident`` programs each; the smaller split on a tie (fewer
    fp32 partial sums to add)."""
    slots = resident * sms
    return min(range(1, max(1, min(k_tiles, most)) + 1),
               key=lambda s: (-(-work * s // slots) * -(-k_tiles // s), s))  # fmt: skip


def _split_fit(asked: str | None) -> str:
    fit = asked or os.environ.get("MXSERVE_DECODE_SPLIT") or "fill"
    if fit not in SPLIT_FITS:
        raise ValueError(f"decode split {fit!r} (MXSERVE_DECODE_SPLIT): one of {', '.join(SPLIT_FITS)}")
    return fit


def code_groups(mask: int) -> list[int]:
    """The groups of kernel codes that ``mask``'s experts launch in under the grouped dispatch."""
    groups = [mask & SHARED_LAUNCH] + [1 << c for c in range(N_CODES) if (mask & ~SHARED_LAUNCH) >> c & 1]
    return [g for g in groups if g]


def _dispatch(asked: str | None) -> str:
    mode = asked or os.environ.get("MXSERVE_DISPATCH") or "single"
    if mode not in DISPATCHES:
        raise ValueError(f"kernel dispatch {mode!r} (MXSERVE_DISPATCH): one of {', '.join(DISPATCHES)}")
    return mode


def expected_active(n_routed: int, n_shared: int, routed_rows: int) -> float:
    """Experts that receive rows, expected under uniform routing (the launch cannot read the
    routing without a host sync, which CUDA graphs forbid): the shared ones and the distinct
    routed experts among ``routed_rows`` picks."""
    return n_shared + n_routed * (1 - (1 - 1 / max(n_routed, 1)) ** routed_rows)


def pick_tiles(rows: int, n_experts: float, min_group: int, n: int, k: int, codes_mask: int, sms: int,
               fit: str = "fill", **override) -> Tiles:
    """Tiles for ``rows`` (token, slot) rows over ``n_experts`` active experts of a GEMM with ``n``
    output columns per program row and depth ``k`` on a GPU of ``sms`` multiprocessors; ``fit``: how
    decode splits K (SPLIT_FITS). BK never exceeds the smallest group of the layer, so one K tile of a
    grouped scheme has one scale and zero per column. ``override`` replaces fields (benchmarks compare
    variants with it)."""
    per_expert = rows / max(round(n_experts), 1)  # 8 experts that all get tokens: 7.9999 expected
    fma = override.get("fma", per_expert <= FMA_ROWS and override.get("swap", True))
    if fma and codes_mask != 1:
        # a row per program, products on CUDA cores: no MMA operand layout to reach through shared
        # memory; an expert's weights are read once per row (the others hit L2)
        bk = max(32, min(128, min_group))
        work = rows * -(-n // 64)
        split = max(1, min(-(-k // bk), 8, math.ceil(WAVES * sms / work)))
        # the next K tile's loads first: never slower on the H200 (results/moe_layer_h200.md)
        tiles = Tiles(1, 64, bk, 4, 3, split, True, True, fma=True, prefetch=True)
        if fit == "waves":  # 128 registers: no spill for the served plans' code set (sm_90 SASS)
            tiles = _replace(tiles, split=wave_split(work, -(-k // bk), sms), maxnreg=128)
    elif per_expert <= DECODE_ROWS and codes_mask != 1:
        # few rows per expert: weights on the MMA's M side, K split until the GPU is full; an
        # all-bf16 layer keeps the unsplit layout, whose stores round exactly as SGLang's
        blocks = max(1.0, min(rows, n_experts))
        bk = max(32, min(64, min_group))  # 64 beat 128 at 1 to 64 tokens (moe_layer.md)
        work = blocks * -(-n // 64)
        split = max(1, min(-(-k // bk), 8, math.ceil(WAVES * sms / work)))
        if fit == "waves":
            split = wave_split(int(math.ceil(work)), -(-k // bk), sms)
        # 128 registers: 4 programs per SM instead of 3, without spills (sm_90 SASS)
        tiles = Tiles(16, 64, bk, 4, 3, split, True, True, 128)
    # prefill: weight-only tiles dequantized K-major (16-byte stores into shared memory; 6 to 8% off the
    # w4 and mixed layers at 4096 and 8192 tokens on the H200, results/moe_layer_h200_s13_kmajor.md), the programs
    # taken 8 blocks at a time over every N tile (group_m: 6 to 12% off DeepSeek-V2-Lite's fp8, w4 and mixed layers
    # at 4096 and 8192 tokens on the H200, results/moe_layer_h200_s25_prefill_grouped.md)
    elif per_expert <= 128:
        tiles = Tiles(32, 64, 128, 4, kmajor=True, group_m=PREFILL_GROUP_M)
    elif per_expert <= 512:
        tiles = Tiles(64, 128, 64, 4, kmajor=True, group_m=PREFILL_GROUP_M)
    else:
        tiles = Tiles(128, 128, 64, 8, kmajor=True, group_m=PREFILL_GROUP_M)
    tiles = _replace(tiles, **override) if override else tiles
    return _replace(tiles, bk=max(32, min(tiles.bk, min_group)))  # one scale per K tile


def _rotated_input(a: torch.Tensor, arena: Arena) -> tuple[torch.Tensor, int]:
    """Stack a Hadamard-rotated copy under ``a`` when some expert reads rotated input."""
    if arena.rotation_seed is None:
        return a, 0
    from mxserve.quant.hadamard import rotate

    both = torch.cat([a, rotate(a.float(), arena.rotation_seed).to(a.dtype)])
    return both, a.numel()


# kernel codes whose activations are quantized per token (fp8, int8 MMA): they need row amax
_ACT_QUANT_CODES = (1 << 6) | (1 << 7) | (1 << 8)


def _gemm(a, arena: Arena, out, sorted_ids, block_expert, num_post_pad, route_w, num_valid, a_div, gate_up,
          launches: list[tuple[int, Tiles]], *, slots: tuple[int, int, int] | None = None,
          static: bool = True, topk: tuple[int, int] | None = None) -> None:  # fmt: skip
    """One grouped GEMM into ``out``: [rows, N] bf16, or [split, rows, N] fp32 partial sums
    (gate | up side by side for gate_up) when the split is > 1; one kernel launch per (codes, tiles)
    of ``launches``, each running the experts whose code is among its codes (moe_gemms). ``slots``
    (slots per token, first, count): ``a``'s rows are (token, slot) rows and the launches read those of
    slots first..first+count-1 only (the activations quantized per token are those rows'). ``static``:
    ``arena``'s weights are not the launch before's (not dequantized just now), so under programmatic
    dependent launch the down GEMM loads them before it waits (pdl.py). ``topk`` (top_k, n_routed, slots per token,
    routed slots): the rows straight from the top-k (``sorted_ids`` and ``block_expert``: the top-k ids; ``route_w``:
    their weights), on the Gluon kernel: one token's on the stream-K grid, the routed slots' on the grid, a program
    row per slot (_layout's topk_rows)."""
    a_all, rot_off = _rotated_input(a, arena)
    # placeholders, read only by the branches of codes that quantize activations: empty, since a
    # filled one is a kernel per launch (4 of a decode layer's 8 at 16 tokens, about 3 us on the H200)
    amax = torch.empty(1, device=a.device)
    a8 = torch.empty(1, dtype=torch.float8_e4m3fn, device=a.device)
    if arena.codes_mask & _ACT_QUANT_CODES:  # per-token scales (and fp8 rows), once per GEMM
        amax, a8 = row_quant(a_all, bool(arena.codes_mask & (1 << CODE_FP8)), slots and (a.shape[0], *slots))
    n = arena.n // 2 if gate_up else arena.n
    for codes, tiles in launches:
        if tiles.gluon and tiles.fma:
            _gemm_gluon_fma(a_all, rot_off, arena, out, sorted_ids, block_expert, num_post_pad, route_w, num_valid,
                            a_div, gate_up, tiles, n, codes)  # fmt: skip
        elif tiles.gluon:
            _gemm_gluon(a_all, rot_off, arena, out, sorted_ids, block_expert, num_post_pad, route_w, num_valid,
                        a_div, gate_up, tiles, n, codes, static, topk)  # fmt: skip
        else:
            _gemm_triton(a, a_all, rot_off, amax, a8, arena, out, sorted_ids, block_expert, num_post_pad, route_w,
                         num_valid, a_div, gate_up, tiles, n, codes)  # fmt: skip


def _gemm_triton(a, a_all, rot_off, amax, a8, arena: Arena, out, sorted_ids, block_expert, num_post_pad, route_w,
                 num_valid, a_div, gate_up, tiles: Tiles, n: int, codes: int) -> None:  # fmt: skip
    grid = (block_expert.numel(), triton.cdiv(n, tiles.bn), tiles.split)
    mx_moe_gemm_kernel[grid](
        a_all,
        rot_off,
        amax,
        a.shape[0],
        a8,
        a.stride(0),
        out,
        out.stride(-2),
        out.stride(0) if tiles.split > 1 else 0,
        sorted_ids,
        block_expert,
        num_post_pad,
        route_w,
        arena.meta,
        arena.wi,
        arena.wb,
        arena.wf,
        arena.sc,
        arena.zp,
        n,
        arena.k,
        num_valid,
        a_div,
        tiles.split,
        1,  # one: the integer 1, not specialized (moe_gemm._fma_codes)
        GATE_UP=gate_up,
        CODES=codes,
        BM=tiles.bm,
        BN=tiles.bn,
        BK=tiles.bk,
        PARTIAL=tiles.split > 1,
        SWAP=2 if tiles.fma else int(tiles.swap),  # moe_gemm.FMA
        SCALE_AFTER=tiles.scale_after,
        F32=INTERPRET,
        K128=arena.k128,
        PREFETCH=tiles.prefetch,
        FOLD_Z=tiles.fold_zero and tiles.fma,
        KMAJOR=tiles.kmajor,
        GROUP_M=0 if tiles.swap else tiles.group_m,
        num_warps=tiles.warps,
        num_stages=tiles.stages,
        **({"maxnreg": tiles.maxnreg} if tiles.maxnreg and not INTERPRET else {}),
    )


def gluon_bn(tiles: Tiles) -> int:
    """The Gluon kernel's rows of weights a program for these tiles: one or two MMA tiles a warp."""
    from mxkernels.moe_gemm_gluon import BN

    return tiles.bn if tiles.bn in (BN, 2 * BN) else BN


def _gluon_kernel():
    if INTERPRET:
        raise ValueError("the Gluon kernel runs on a GPU: Triton's interpreter does not run Gluon")
    from mxkernels.moe_gemm_gluon import mx_moe_gemm_gluon_kernel

    return mx_moe_gemm_gluon_kernel


def _gemm_gluon(a_all, rot_off, arena: Arena, out, sorted_ids, block_expert, num_post_pad, route_w, num_valid,
                a_div, gate_up, tiles: Tiles, n: int, codes: int, static: bool = True,
                topk: tuple[int, int] | None = None) -> None:  # fmt: skip
    """_gemm's launch on the Gluon kernel (bf16 and weight-only experts, groups of whole 128s). Of
    ``codes`` (the model's, or a group of them: one variant per model, as the Triton kernel) it
    compiles the branches it has and needs none of the others: no expert of the arena uses them."""
    from mxkernels.moe_gemm_gluon import MAGIC

    if a_all.stride(-1) != 1 or a_all.stride(0) % 128:  # the kernel loads rows of K as 16-byte aligned
        a_all = a_all.contiguous()
    dev = a_all.device
    kernel = _gluon_kernel()
    bn, codes, splits, consts, key, most = _gluon_launch(kernel, tiles, codes, gate_up, static, topk, arena.codes_mask,
                                                         arena.k, arena.min_group, arena.tiled, dev,
                                                         pdl(dev) and gluon_has_it())  # fmt: skip
    args = (a_all, rot_off, a_all.stride(0), out, out.stride(-2), out.stride(0) if tiles.split > 1 else 0,
            sorted_ids, block_expert, num_post_pad, route_w, arena.meta, arena.wi, arena.wb, arena.sc, arena.zp,
            n, arena.k, num_valid, a_div, tiles.split, splits, MAGIC)  # fmt: skip
    if key is None:
        grid = (block_expert.numel(), triton.cdiv(n, bn), tiles.split)
    else:  # exactly the programs the SMs hold at once: a second wave would undo the balance
        grid = (multiprocessors(dev) * _stream_k_per_sm(kernel, args, consts, key, most),)
    kernel[grid](*args, **consts)


@functools.lru_cache(maxsize=1024)
def _gluon_launch(kernel, tiles: Tiles, codes: int, gate_up: bool, static: bool, topk: tuple[int, int] | None,
                  codes_mask: int, k: int, min_group: int, tiled: bool, dev: torch.device,
                  pdl_on: bool) -> tuple:  # fmt: skip
    """What a Gluon launch takes besides its tensors, checked and built once per launch configuration (an eager
    forward, every prefill, launches 2 to 4 of them a layer): the program's rows of weights, the compiled codes,
    the K splits per code, the kernel's constants (``pdl_on``: its programmatic launch), and for stream-K the key of
    its grid and the most programs an SM."""
    from mxkernels.moe_gemm_gluon import KERNEL_CODES, WARPS, eligible

    bn = gluon_bn(tiles)
    blocks = (8, 16, 32, 64) if tiles.wgmma else (8, 16, 32) if tiles.staged else (8, 16)
    if not eligible(codes_mask, k, min_group) or not tiles.swap or tiles.bm not in blocks:
        raise ValueError("the Gluon kernel runs bf16 and weight-only experts with groups of whole 128s, K a "
                         "multiple of 128, weights on the MMA's M side and 8 or 16 rows per block (32 with staged "
                         "activations, up to 64 with warpgroup MMAs)")
    if tiles.wgmma and (bn != 64 or tiles.place or tiles.staged):
        raise ValueError("the Gluon kernel's warpgroup MMAs take 64 rows of weights a program (bn 64), neither "
                         "codes in place nor the staged activations")
    if tiles.wgmma and dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] != 9:
        raise ValueError("the Gluon kernel's warpgroup MMAs (wgmma) run on sm_90 GPUs only (H100, H200)")
    codes &= KERNEL_CODES
    splits = code_splits(codes_mask & codes, tiles.split) if tiles.split_bits else 0
    consts = dict(GATE_UP=gate_up, CODES=codes, BN=bn, BM=tiles.bm, PARTIAL=tiles.split > 1, SKIP_PAD=tiles.skip_pad,
                  num_warps=WARPS, **({"PLACE": True} if tiles.place else {}),
                  **({"EARLY": True} if tiles.early else {}), **({"TILED": True} if tiled else {}),
                  **({"GROUP_M": tiles.group_m} if tiles.group_m > 1 else {}),
                  **({"STAGED": True} if tiles.staged else {}), **({"WGMMA": True} if tiles.wgmma else {}))  # fmt: skip
    if topk and tiles.fma:
        raise ValueError("the top-k's rows straight are taken by the Gluon kernel's MMA layouts only")
    if topk and tiles.stream_k and topk[3] == topk[0]:  # one token's rows straight (moe_gemm_gluon._block's TOPK)
        consts.update(TOPK=topk[0], N_ROUTED=topk[1])
    elif topk:  # the routed slots' blocks found in the top-k (moe_gemm_gluon._topk_lead; on stream-K _topk_leaders)
        widest = TOPK_STREAM_K_SLOTS if tiles.stream_k else TOPK_GRID_SLOTS
        if topk[3] > widest:
            raise ValueError(f"at most {widest} routed slots are taken straight from the top-k"
                             f"{' on stream-K' if tiles.stream_k else ''}")  # fmt: skip
        consts.update(GRID_TOPK=topk[0], SLOTS=topk[2], SP=max(32, triton.next_power_of_2(topk[3])),
                      **({"N_ROUTED": topk[1]} if tiles.stream_k else {}))  # fmt: skip
    if pdl_on:  # the kernel's PDL modes: moe_gemm_gluon.py
        consts.update(PDL=2 if static and not gate_up else 1, launch_pdl=True)
    key = None
    most = tiles.per_sm or STREAM_K_MOST
    if tiles.stream_k:
        cap = tiles.maxnreg or STREAM_K_REGISTERS[gate_up]
        consts.update(STREAM_K=True, **({"maxnreg": cap} if cap and cap != NO_CAP else {}))
        key = GridKey(kernel, gate_up, codes, bn, tiles.bm, tiles.skip_pad, consts.get("PDL", 0), cap, most,
                      tiles.place, tiles.early, dev, tiled, consts.get("GROUP_M", 0),
                      tiles.staged, tiles.wgmma, consts.get("TOPK", 0), consts.get("N_ROUTED", 0),
                      consts.get("GRID_TOPK", 0), consts.get("SLOTS", 0), consts.get("SP", 0))  # fmt: skip
    elif tiles.maxnreg:
        consts["maxnreg"] = tiles.maxnreg
    return bn, codes, splits, consts, key, most


# stream-K launches (Tiles.stream_k): the register cap by GEMM (gate_up: True). The sm_90 code of the gate/up
# kernel holds 168 registers at BM 8 and BN 64 uncapped (capped at 168 ptxas spills), 180 at BM 16 and 254 at
# BN 128 (every code); the down one 80 to 104 (capped at 128: no spill). The grid is as many programs as
# their registers let share an SM (_stream_k_per_sm), at most STREAM_K_MOST: on the H200 3 (gate/up) and 4
# (down) per SM balanced every SM's active cycles to within 10% at 16 and 64 tokens (benchmarks/README.md).
# Uncapped (Triton 3.6, sm_90), ptxas gives the down kernel fewer: 72 to 102 registers against 106 to 124 at 128,
# so 5 to 7 of its programs would fit an SM: Tiles.per_sm and maxnreg (NO_CAP) ask for that
STREAM_K_REGISTERS = {True: None, False: 128}
STREAM_K_MOST = 4
NO_CAP = 255  # Tiles.maxnreg of a stream-K launch: no register cap (ptxas's own choice)


class GridKey(NamedTuple):
    """What sets a stream-K kernel variant's registers, hence its programs an SM (named: tests read its fields)."""

    kernel: object
    gate_up: bool
    codes: int
    bn: int
    bm: int
    skip_pad: bool
    pdl: int
    cap: int | None
    most: int
    place: bool
    early: bool
    device: torch.device
    tiled: bool = False
    group_m: int = 0
    staged: bool = False
    wgmma: bool = False
    topk: int = 0
    n_routed: int = 0
    grid_topk: int = 0
    slots: int = 0
    sp: int = 0


_PER_SM: dict[GridKey, int] = {}


def _stream_k_per_sm(kernel, args: tuple, consts: dict, key: GridKey, most: int = STREAM_K_MOST) -> int:
    """How many programs of this stream-K kernel variant (``key``: what sets its registers) share an SM
    (64K registers), at most ``most``: from its compiled registers, taken once (compiled and loaded, not launched).
    ``most`` off a GPU (the interpreter, precompile's recording and compile-only launches): the
    grid is not part of what is compiled."""
    if args[0].device.type != "cuda" or INTERPRET:
        return most
    if key not in _PER_SM:
        compiled = kernel.warmup(*args, grid=(1,), **consts)
        compiled._init_handles()  # loads the module, as its first launch would: its registers are known then
        per_warp = -(-compiled.n_regs * 32 // 256) * 256  # registers are given to warps 256 at a time
        fit = 65536 // (per_warp * consts["num_warps"])
        shared = compiled.metadata.shared  # Tiles.staged: its activation ring
        if shared:
            fit = min(fit, torch.cuda.get_device_properties(args[0].device).shared_memory_per_multiprocessor // shared)
        if fit < 1:
            raise ValueError(f"stream-K: a kernel of {compiled.n_regs} registers a thread fits no SM")
        _PER_SM[key] = min(fit, most)
    return _PER_SM[key]


def code_splits(codes_mask: int, split: int) -> int:
    """K splits per kernel code (4 bits each, code c at bit 4c) for Tiles.split_bits: ``split`` for the
    widest code in ``codes_mask``, and in proportion to bits for the others (at least 1)."""
    bits = {0: 16, 1: 1, 2: 2, 3: 3, 4: 4, 5: 8}  # the Gluon kernel's codes (moe_gemm_gluon.KERNEL_CODES)
    present = [c for c in bits if codes_mask >> c & 1]
    widest = max((bits[c] for c in present), default=1)
    return sum(min(15, max(1, round(split * bits[c] / widest))) << (4 * c) for c in present)


def _gluon_fma_kernel():
    if INTERPRET:
        raise ValueError("the Gluon kernel runs on a GPU: Triton's interpreter does not run Gluon")
    from mxkernels.moe_gemm_gluon_fma import mx_moe_gemm_gluon_fma_kernel

    return mx_moe_gemm_gluon_fma_kernel


def _gemm_gluon_fma(a_all, rot_off, arena: Arena, out, sorted_ids, block_expert, num_post_pad, route_w, num_valid,
                    a_div, gate_up, tiles: Tiles, n: int, codes: int) -> None:  # fmt: skip
    """_gemm's launch on the Gluon CUDA-core kernel: one row per block, the experts the Gluon MMA kernel
    runs (bf16 and weight-only, groups of whole 128s), its 128-deep K tiles split ``tiles.split`` ways."""
    from mxkernels.moe_gemm_gluon import KERNEL_CODES, eligible
    from mxkernels.moe_gemm_gluon_fma import BN, WARPS

    if not eligible(arena.codes_mask, arena.k, arena.min_group) or tiles.bm != 1:
        raise ValueError("the Gluon CUDA-core kernel runs bf16 and weight-only experts with groups of whole 128s, "
                         "K a multiple of 128, and one row per block")  # fmt: skip
    if a_all.stride(-1) != 1 or a_all.stride(0) % 128:  # the kernel loads rows of K as 16-byte aligned
        a_all = a_all.contiguous()
    grid = (block_expert.numel(), triton.cdiv(n, BN), tiles.split)
    _gluon_fma_kernel()[grid](
        a_all, rot_off, a_all.stride(0), out, out.stride(-2), out.stride(0) if tiles.split > 1 else 0, sorted_ids,
        block_expert, num_post_pad, route_w, arena.meta, arena.wi, arena.wb, arena.sc, arena.zp, n, arena.k,
        num_valid, a_div, tiles.split, 1, GATE_UP=gate_up, CODES=codes & KERNEL_CODES, BN=BN,
        PARTIAL=tiles.split > 1, PACKED=tiles.packed, ASM=not INTERPRET, num_warps=WARPS, TILED=arena.tiled,
    )  # fmt: skip


@functools.lru_cache(maxsize=8)
def _runs_gluon(dev: torch.device) -> bool:
    """A GPU with bf16 mma.sync (Ampere on) outside Triton's interpreter, which does not run Gluon."""
    return dev.type == "cuda" and not INTERPRET and torch.cuda.get_device_capability(dev) >= (8, 0)


def gluon_codes(arena: Arena) -> int:
    """The kernel codes whose branches the Gluon kernel compiles for ``arena``: those of the model's
    code set (one variant per model) that it runs."""
    from mxkernels.moe_gemm_gluon import KERNEL_CODES

    return arena.kernel_mask & KERNEL_CODES


# prefill on weights dequantized first (mxkernels/dequant.py), from this many rows per active expert up, for
# layers with weight-only experts: MXSERVE_PREFILL_DEQUANT=0 never, =1 at every prefill (above DECODE_ROWS)
DEQUANT_ROWS = 256
PREFILL_DEQUANT = os.environ.get("MXSERVE_PREFILL_DEQUANT", "auto")
# bytes its scratch buffer may take (MXSERVE_DEQUANT_SCRATCH_MB, default 1024): a layer whose largest GEMM
# in bf16 is larger (Qwen1.5's gate/up: 738 MB; a 128-expert layer of hidden 4096 and 1536: 3.2 GB) is
# dequantized and multiplied chunk by chunk of experts, each chunk's GEMM launch skipping the other experts
DEQUANT_SCRATCH_MB = os.environ.get("MXSERVE_DEQUANT_SCRATCH_MB", "1024")


def dequant_chunk(gate_up: Arena, down: Arena) -> int:
    """Experts per chunk of prefill on dequantized weights, from DEQUANT_SCRATCH_MB (at least one)."""
    if not DEQUANT_SCRATCH_MB.isdigit():
        raise ValueError(f"MXSERVE_DEQUANT_SCRATCH_MB={DEQUANT_SCRATCH_MB!r}: a whole number of MiB")
    per_expert = 2 * max(gate_up.n * gate_up.k, down.n * down.k)
    return max(1, min(gate_up.n_experts, (int(DEQUANT_SCRATCH_MB) << 20) // per_expert))


def _dequant_first(per_expert: float, gate_up: Arena, down: Arena, asked: bool | None) -> bool:
    """Whether a forward dequantizes its weight-only experts before the GEMMs (``asked``: the caller's
    override, at any size), else by PREFILL_DEQUANT and the rows per expert."""
    if not (gate_up.codes_mask | down.codes_mask) & dequant.WONLY_MASK:
        return False
    if asked is not None:
        return asked
    if PREFILL_DEQUANT not in ("auto", "0", "1"):
        raise ValueError(f"MXSERVE_PREFILL_DEQUANT={PREFILL_DEQUANT!r}: auto, 0 or 1")
    least = {"auto": DEQUANT_ROWS, "1": DECODE_ROWS + 1e-9, "0": float("inf")}[PREFILL_DEQUANT]
    return per_expert >= least


def _gluon_decode(dev: torch.device, per_expert: float, gate_up: Arena, down: Arena, override: dict,
                  stream_k: bool = False) -> bool:  # fmt: skip
    """Whether the decode layout runs on the Gluon kernel: on a GPU, from GLUON_ROWS (from one row on
    ``stream_k``) to DECODE_ROWS rows per expert, for layers whose both arenas' experts (a slab's: every
    candidate) it runs (the alignment's block is shared by the two GEMMs) and that are not all bf16 (those
    keep SGLang's rounding: pick_tiles), unless ``override`` asks for another layout."""
    from mxkernels.moe_gemm_gluon import eligible

    return (GLUON_DECODE and _runs_gluon(dev) and (stream_k or GLUON_ROWS < per_expert) and per_expert <= DECODE_ROWS
            and override.get("swap", True) and not override.get("fma") and "gluon" not in override
            and (gate_up.codes_mask | down.codes_mask) != 1
            and all(eligible(a.codes_mask, a.k, a.min_group) for a in (gate_up, down)))  # fmt: skip


def costly_code(code: int) -> bool:
    """Whether a kernel code (arena.kernel_code) is costly on the Gluon kernel: outside NARROW_CODES (bf16, 3 and 8
    bits). One place for the dispatch rule below and the planner's `--keep-stream-k` (planner.costly)."""
    from mxkernels.moe_gemm_gluon import NARROW_CODES

    return not NARROW_CODES >> code & 1


def costly_share(*arenas: Arena) -> float:
    """The share of ``arenas``' weights whose code is costly on the Gluon kernel (:func:`costly_code`)."""
    size = sum(a.n * a.k * sum(a.code_counts) for a in arenas)
    costly = sum(a.n * a.k * n for a in arenas for c, n in enumerate(a.code_counts) if costly_code(c))
    return costly / size if size else 0.0


def _stream_k(per_expert: float, dispatch: str | None, override: dict, costly: float) -> bool:
    """Whether the Gluon decode launches take the stream-K grid: ``override``'s stream_k, else
    MXSERVE_STREAM_K (read per launch, as MXSERVE_DISPATCH): "auto" below STREAM_K_ROWS rows per expert
    (STREAM_K_ROWS_COSTLY where a ``costly`` share above STREAM_K_COSTLY of the layer's weights is in costly
    codes) under the single dispatch, "1" always (the grouped dispatch then refuses), "0" never."""
    if "stream_k" in override:
        return bool(override["stream_k"])
    mode = os.environ.get("MXSERVE_STREAM_K") or "auto"
    if mode not in STREAM_K_MODES:
        raise ValueError(f"MXSERVE_STREAM_K={mode!r}: one of {', '.join(STREAM_K_MODES)}")
    if mode == "auto":  # an explicit MXSERVE_GLUON_FMA keeps its CUDA-core rows
        fma = per_expert <= FMA_ROWS and _gluon_fma_asked()
        rows = STREAM_K_ROWS_COSTLY if costly > STREAM_K_COSTLY else STREAM_K_ROWS
        return per_expert < rows and _dispatch(dispatch) == "single" and not fma
    return mode == "1"


def _gluon_fma_asked() -> bool:
    return os.environ.get("MXSERVE_GLUON_FMA", "0") in ("1", "packed")


def _gluon_fma(dev: torch.device, gate_up: Arena, down: Arena, override: dict) -> bool:
    """Whether the CUDA-core products (one row per block) run on the Gluon CUDA-core kernel: asked with
    MXSERVE_GLUON_FMA=1, or =packed for its packed bf16 arithmetic (read per launch, as MXSERVE_DISPATCH;
    off by default: 1 timed no faster than the Triton kernel on the H200, packed not yet timed), on a
    GPU, for layers whose both arenas' experts it runs, unless ``override`` picks the kernel."""
    from mxkernels.moe_gemm_gluon import eligible

    return (_gluon_fma_asked() and _runs_gluon(dev)
            and "gluon" not in override
            and all(eligible(a.codes_mask, a.k, a.min_group) for a in (gate_up, down)))  # fmt: skip


def _as_gluon(tiles: Tiles, per_expert: float, k: int, codes: int, override: dict, staged: bool = False) -> Tiles:
    """The decode tiles on the Gluon kernel: two MMA tiles of rows per warp for narrow code sets, 8
    rows per block up to 8 rows per expert (12 for narrow code sets: Qwen1.5-MoE at 64 tokens, 8.5
    rows, runs 9 to 18% faster so), and no more K splits than its 128-deep tiles (H200,
    results/moe_layer_h200_layouts.md); ``staged`` unless the override says (STAGED_ROWS). ``codes``:
    the launch's (the block is the one both GEMMs' codes give: they share the alignment's)."""
    from mxkernels.moe_gemm_gluon import BK, BN, NARROW_CODES

    narrow = not codes & ~NARROW_CODES
    bn = override.get("bn", 2 * BN if narrow else BN)
    bm = override.get("bm", 8 if per_expert <= (12 if narrow else 8) else 16)
    staged = override.get("staged", staged)
    split = 1 if tiles.stream_k else min(tiles.split, max(1, k // BK))  # stream-K: K is dealt out whole
    return _replace(tiles, gluon=True, bm=bm, bn=bn, split=split, maxnreg=override.get("maxnreg"),
                    staged=staged)  # fmt: skip


@dataclass
class _Layout:
    """One forward's launches: the tiles of both GEMMs, the buffers they write, and whether the shared
    experts launch apart (``experts`` enqueues both GEMMs for a set of rows)."""

    x: torch.Tensor
    gate_up: Arena
    down: Arena
    n_routed: int
    top_k: int
    slots: int
    bm: int
    shared_bm: int  # the shared experts' block where they launch apart
    apart: bool
    experts: Callable[..., None]
    inter: torch.Tensor
    out: torch.Tensor
    w: torch.Tensor  # the rows' routing weights, which the alignment fills
    sums: torch.Tensor | None = None  # stream-K's fp32 sums, to be zeroed before its launches
    # stream-K on a GPU: recorded on the second stream once ``sums`` is zeroed, so that the launches wait for the
    # zeroing alone, not for what follows it there (the shared experts started early, the routing counter)
    zeroed: torch.cuda.Event | None = None
    # the launches take the top-k's rows straight, with no alignment: one token's on stream-K (TOPK_ROWS), or the
    # routed slots' on the grid (TOPK_GRID)
    topk_rows: bool = False


def _rows(t: int, top_k: int, n_experts: int, n_routed: int) -> tuple[int, float, float]:
    """A forward's (token, slot) rows, the experts expected active, and rows per active expert."""
    rows = t * (top_k + n_experts - n_routed)
    active = expected_active(n_routed, n_experts - n_routed, t * top_k)
    return rows, active, rows / max(round(active), 1)


def decode_kernel_refuses(scheme, tokens: int, top_k: int, n_experts: int, n_routed: int) -> bool:
    """Whether a forward of ``tokens`` tokens takes the decode layout (DECODE_ROWS rows per expert at most)
    and the Gluon decode kernel does not run ``scheme`` (moe_gemm_gluon.eligible: its code, whole K tiles
    per group), so that a layer holding it runs every expert on the Triton kernel (_gluon_decode)."""
    from mxkernels.moe_gemm_gluon import BK, eligible

    if _rows(tokens, top_k, n_experts, n_routed)[2] > DECODE_ROWS:
        return False
    group = scheme.group if scheme.family == "int" and scheme.group else BK  # as Arena.min_group counts them
    return not eligible(1 << kernel_code(scheme), BK, group)


def _options(poison: bool, dispatch: str | None, shared_apart: bool | None, split_fit: str | None,
             override: dict) -> tuple:
    """What else a forward's launches depend on (a Started is taken only by a forward of the same)."""
    return poison, dispatch, shared_apart, split_fit, tuple(sorted(override.items()))


class _Picked(NamedTuple):
    """What a forward's launches are, apart from its buffers: the same for every forward of a token count on
    one pair of arenas under the same settings, so picked once (_pick_cached) and replayed."""

    src_dn: Arena  # the down arena picked for (not gate_up: kept on it, the pick would make a reference cycle that
    # holds a dropped layer's GPU memory until Python's cycle collector runs)
    dq: bool  # the GEMMs run dequantized views (made per forward: a view copies the arena's fields)
    slots: int
    rows: int
    bm: int
    shared_bm: int
    split_gu: int
    split_dn: int
    stream_k: bool
    apart: bool
    topk_rows: bool
    l_gu: list  # (codes, tiles) per launch: the routed (or all) rows' GEMMs
    l_dn: list
    s_gu: list  # the shared experts' launches apart
    s_dn: list


def _pick(tokens: int, dev: torch.device, top_k: int, gate_up: Arena, down: Arena, n_routed: int, dispatch: str | None,
          shared_apart: bool | None, split_fit: str | None, override: dict, early: bool) -> _Picked:  # fmt: skip
    """The tiles and launches of a forward of ``tokens`` tokens (_layout)."""
    slots = top_k + gate_up.n_experts - n_routed
    rows, active, per_expert = _rows(tokens, top_k, gate_up.n_experts, n_routed)
    override = dict(override)
    src_dn = down
    dq = _dequant_first(per_expert, gate_up, down, override.pop("dequant", None))
    topk_asked, grid_asked = override.pop("topk_rows", None), override.pop("topk_grid", None)
    if dq:  # the GEMMs run the views; dequantize() writes their weights as the forward launches
        gate_up, down = dequant.dequantized_view(gate_up), dequant.dequantized_view(down)
    min_group = min(gate_up.min_group, down.min_group)
    codes = gate_up.codes_mask | down.codes_mask
    sms = multiprocessors(dev)
    if per_expert > DECODE_ROWS:  # a tuned prefill entry (tile_table.py), if any
        table = tile_table(dev)
        tuned = table.lookup(gate_up.k, down.k, codes_class(codes), rows / active) if table else None
        override = {**(tuned or {}), **override}
    elif env := decode_tiles():
        down_env = {**env.pop("down_tiles", {}), **override.get("down_tiles", {})}
        override = {**env, **override, **({"down_tiles": down_env} if down_env else {})}
    down_only = override.pop("down_tiles", None) or {}  # the down GEMM's own fields (DOWN_FIELDS)
    if set(down_only) - set(DOWN_FIELDS):
        raise ValueError(f"the down GEMM's own tiles take {', '.join(DOWN_FIELDS)}, not {sorted(down_only)}")
    sk = _stream_k(per_expert, dispatch, override, costly_share(gate_up, down))
    gluon = not dq and _gluon_decode(dev, per_expert, gate_up, down, override, sk)
    if gluon:  # the MMA decode layout's tiles (its split), then the Gluon kernel's block and K tile
        override = {"fma": False, **override, "stream_k": sk}
    fit = _split_fit(split_fit)
    t_gu = pick_tiles(rows, active, min_group, gate_up.n // 2, gate_up.k, codes, sms, fit, **override)
    ov_dn = down_override(override, down_only)
    t_dn = pick_tiles(rows, active, min_group, down.n, down.k, codes, sms, fit, **ov_dn)
    if t_gu.fma and _gluon_fma(dev, gate_up, down, override):
        packed = os.environ.get("MXSERVE_GLUON_FMA") == "packed"
        t_gu, t_dn = (_replace(t, gluon=True, packed=packed) for t in (t_gu, t_dn))
    gcodes = gluon_codes(gate_up) | gluon_codes(down)
    staged = per_expert >= STAGED_ROWS and active * gate_up.n * gate_up.k / sms >= STAGED_WEIGHTS_PER_SM

    def launches(arena: Arena, tiles: Tiles, ov: dict, rows_each: float = per_expert) -> list[tuple[int, Tiles]]:
        """(codes, tiles) per launch: the Gluon kernel's rows per warp follow each launch's codes,
        its block the whole layer's (the two GEMMs share the alignment's); ``ov``: this GEMM's override;
        ``rows_each``: the rows of each expert the launches run (the shared experts': every token)."""
        whole = _as_gluon(tiles, rows_each, arena.k, gcodes, ov, staged) if gluon else tiles
        if _dispatch(dispatch) != "grouped":
            return [(arena.kernel_mask, whole)]
        return [(g, _replace(_as_gluon(tiles, rows_each, arena.k, g, ov, staged), bm=whole.bm)
                 if gluon else whole) for g in code_groups(arena.kernel_mask) if g & arena.codes_mask]  # fmt: skip

    l_gu, l_dn = launches(gate_up, t_gu, override), launches(down, t_dn, ov_dn)
    bm, split_gu, split_dn = l_gu[0][1].bm, l_gu[0][1].split, l_dn[0][1].split  # alike in every launch
    stream_k = any(t.stream_k and t.gluon for _, t in l_gu + l_dn)
    if stream_k and len(l_gu) + len(l_dn) > 2:
        raise ValueError("stream-K deals out one launch's work per GEMM: it takes the single dispatch")
    # dequantized first, the shared experts stay in the routed launches: apart, each set would dequantize.
    # Stream-K balances one launch over the SMs, so they stay in it, unless started early: their launches then
    # run beside the router and the alignment, where the GPU would otherwise wait (at 1 token half the weights
    # read are the shared experts'; Marlin's server runs its shared expert there: benchmarks/README.md,
    # twenty-first session)
    apart = not dq and (early or not stream_k) and _shared_apart(slots - top_k, per_expert, shared_apart)
    # apart, the shared experts' launches take their own block by the same rule as the routed ones, from their own
    # rows: every token's. At 64 tokens Qwen1.5-MoE's 4 shared slices took 32 blocks of 8 rows (as many as the ~60
    # routed experts' blocks), each unpacking its slice's weights again (benchmarks/README.md, thirty-seventh session)
    sb = t_gu.shared_bm
    forced = {"bm": sb, **({"staged": True} if sb > 16 else {})} if sb else {}
    s_gu, s_dn = (launches(gate_up, t_gu, {**override, **forced}, tokens),
                  launches(down, t_dn, {**ov_dn, **forced}, tokens)) if apart and t_gu.shared_own else (l_gu, l_dn)
    if stream_k:
        split_gu = 1
    # the top-k's rows straight: one token's on stream-K, its shared experts in the launches (a block a row); or more
    # tokens' routed slots, on the grid (the shared experts, if any, in launches of their own) or on stream-K (the
    # shared experts' blocks after the routed ones)
    one = tokens == 1 and stream_k and not apart and topk_rows_on(topk_asked)
    many = (tokens > 1 and topk_grid_on(grid_asked)
            and (not stream_k and (apart or slots == top_k) and tokens * top_k <= TOPK_GRID_SLOTS
                 or stream_k and not apart and tokens * top_k <= TOPK_STREAM_K_SLOTS))  # fmt: skip
    topk_rows = (one or many) and all(t.gluon and not t.fma for _, t in l_gu + l_dn)
    return _Picked(src_dn, dq, slots, rows, bm, s_gu[0][1].bm, split_gu, split_dn, stream_k,
                   apart, topk_rows, l_gu, l_dn, s_gu, s_dn)  # fmt: skip


# what else a pick reads, so that a cached one is taken only under the same: the settings read per forward
_PICK_ENV = ("MXSERVE_DECODE_TILES", "MXSERVE_DECODE_SPLIT", "MXSERVE_DISPATCH", "MXSERVE_STREAM_K",
             "MXSERVE_GLUON_FMA", "MXSERVE_TOPK_ROWS", "MXSERVE_TOPK_GRID")  # fmt: skip
# and this module's tunables and hooks (tests and benchmarks set them; a swap of the slab's codes shows in
# code_counts, which the key holds)
_PICK_GLOBALS = ("GLUON_DECODE", "PREFILL_DEQUANT", "DEQUANT_SCRATCH_MB", "SHARED_APART", "STAGED_ROWS",
                 "STAGED_WEIGHTS_PER_SM", "DECODE_ROWS", "_runs_gluon", "tile_table", "pick_tiles")  # fmt: skip
PICKS_KEPT = 256  # picks kept per arena (a prefill's token counts vary; the oldest half goes when full)


def _pick_cached(tokens: int, dev: torch.device, top_k: int, gate_up: Arena, down: Arena, n_routed: int,
                 dispatch: str | None, shared_apart: bool | None, split_fit: str | None, override: dict,
                 early: bool) -> _Picked:  # fmt: skip
    """_pick, kept on ``gate_up`` for the next forward of the same: an eager forward (every prefill) spent about
    half its host time picking (benchmarks/host_overhead.py). Not kept for an ``override`` (benchmarks, tests)."""
    if override:
        return _pick(tokens, dev, top_k, gate_up, down, n_routed, dispatch, shared_apart, split_fit, override, early)
    g = globals()
    key = (tokens, dev, top_k, id(down), gate_up.code_counts, down.code_counts, n_routed, dispatch, shared_apart,
           split_fit, early, *map(os.environ.get, _PICK_ENV), *(g[n] for n in _PICK_GLOBALS))  # fmt: skip
    picks = gate_up.picks
    hit = picks.get(key)
    if hit is not None and hit.src_dn is down:
        return hit
    if len(picks) >= PICKS_KEPT:
        for old in list(picks)[: PICKS_KEPT // 2]:
            del picks[old]
    picks[key] = hit = _pick(tokens, dev, top_k, gate_up, down, n_routed, dispatch, shared_apart, split_fit, override,
                             early)  # fmt: skip
    return hit


def _layout(x: torch.Tensor, top_k: int, gate_up: Arena, down: Arena, n_routed: int, poison: bool,
            dispatch: str | None, shared_apart: bool | None, split_fit: str | None, override: dict,
            early: bool = False) -> _Layout:  # fmt: skip
    """The launches of a forward of ``x`` [T, H] with ``top_k`` routed experts per token (moe_gemms):
    everything but the routing itself, so the shared experts can launch before the top-k exists (``early``:
    start_shared's layout)."""
    alloc = (lambda *s, **kw: torch.full(s, float("nan"), **kw)) if poison else torch.empty
    dev = x.device
    p = _pick_cached(x.shape[0], dev, top_k, gate_up, down, n_routed, dispatch, shared_apart, split_fit, override,
                     early)  # fmt: skip
    src_gu, src_dn, rows, slots, dq = gate_up, down, p.rows, p.slots, p.dq
    if dq:
        gate_up, down = dequant.dequantized_view(gate_up), dequant.dequantized_view(down)
    inter = alloc(rows, gate_up.n // 2, dtype=torch.bfloat16, device=dev)
    sums = None
    if p.stream_k:  # fp32 sums that the programs add into: gate | up, then SiLU (split 1); the expert outputs.
        # One buffer, so one fill kernel zeroes both (moe_gemms: beside the alignment)
        sums = torch.empty(rows * (gate_up.n + down.n), dtype=torch.float32, device=dev)
        ws = sums[: rows * gate_up.n].view(1, rows, gate_up.n)
        out = sums[rows * gate_up.n :].view(1, rows, down.n)
    else:
        ws = alloc(p.split_gu, rows, gate_up.n, dtype=torch.float32, device=dev) if p.split_gu > 1 else None
        out = alloc(p.split_dn, rows, down.n, dtype=torch.float32 if p.split_dn > 1 else torch.bfloat16, device=dev)
    w = torch.empty(rows, dtype=torch.float32, device=dev)

    def experts(ids, block_expert, num_post_pad, first: int, count: int, shared: bool = False,
                topk: tuple[torch.Tensor, int] | None = None) -> None:  # fmt: skip
        """Both GEMMs for the rows that ``ids`` lays out: slots first..first+count-1 of each token (``shared``: the
        shared experts' launches apart, in blocks of shared_bm); ``topk`` (the top-k weights and n_routed; ``ids``
        the top-k ids): the rows straight from the top-k (topk_rows)."""
        gu_launches, dn_launches = (p.s_gu, p.s_dn) if shared else (p.l_gu, p.l_dn)
        # dequantized first: one scratch buffer, gate/up's weights then down's, chunk by chunk of experts
        # where the layer's largest GEMM in bf16 passes DEQUANT_SCRATCH_MB (the launches are in order)
        chunk = dequant_chunk(src_gu, src_dn) if dq else 0
        scratch = torch.empty(max(dequant.scratch_elems(a, chunk) for a in (src_gu, src_dn)), dtype=torch.bfloat16,
                              device=dev) if dq else None  # fmt: skip

        def gemm(a, arena: Arena, src: Arena, dst, a_div: int, gu: bool, launches, mine=None) -> None:
            for e0 in range(0, src.n_experts, chunk) if dq else (0,):
                view = dequant.dequantize(src, scratch, e0, min(chunk, src.n_experts - e0)) if dq else arena
                _gemm(a, view, dst, ids, block_expert, num_post_pad, w if topk is None else topk[0], rows, a_div,
                      gu, launches, slots=mine, static=not dq,
                      topk=None if topk is None else (ids.shape[-1], topk[1], slots, ids.numel()))  # fmt: skip

        gemm(x, gate_up, src_gu, inter if ws is None else ws, slots, True, gu_launches)
        if ws is not None:
            block = min(1024, triton.next_power_of_2(gate_up.n // 2))
            silu_mul_kernel[(rows // slots * count, triton.cdiv(gate_up.n // 2, block))](
                ws, inter, rows, gate_up.n // 2, slots, first, count, SPLIT=p.split_gu, BLOCK=block, F32=INTERPRET,
                PDL=pdl(dev), **launch(dev),
            )  # fmt: skip
        # the intermediate's rows of these slots only: the other launches (a second stream) write the rest
        gemm(inter, down, src_dn, out, 1, False, dn_launches, (slots, first, count) if count < slots else None)

    zeroed = torch.cuda.Event() if sums is not None and dev.type == "cuda" else None
    return _Layout(x, src_gu, src_dn, n_routed, top_k, slots, p.bm, p.shared_bm, p.apart, experts, inter, out, w,
                   sums, zeroed, p.topk_rows)  # fmt: skip


# MXSERVE_TOPK_ROWS (on by default since the forty-second session; 0: aligned): a one-token forward on the stream-K
# grid (decode at 1 request) takes each (token, slot) row as a block of its own, its expert read from the top-k in
# the GEMMs' launches, so the alignment's launch leaves the path from the router to the first GEMM and stream-K's
# programs wait for no row count. Measured on the H100 (benchmarks/README.md): the Qwen1.5-MoE layer at 1 token
# 22 us where aligned 26; end to end at 1 request, SGLang's logged decode rate 4% higher, per output token 1.93 ms
# where 2.06
TOPK_ROWS = "MXSERVE_TOPK_ROWS"
# MXSERVE_TOPK_GRID (the default since the forty-ninth session; =0: aligned): decode forwards of more than one token
# take the routed slots straight from the top-k too, up to TOPK_GRID_SLOTS routed slots, so no alignment launch
# stands between the router and the first GEMM (at 8 requests the forty-third session's trace had the alignment's
# 2.9 us there, the routed gate/up starting 11.5 us after the norm). On the grid the launches have a program row per
# routed slot, and the slot that leads a block of its expert's slots finds them in the top-k
# (moe_gemm_gluon._topk_lead); the shared experts keep launches of their own, as on the grid they have by default.
# On stream-K (the default below STREAM_K_ROWS rows per expert) every program finds all the leaders (_topk_leaders)
# and deals out their blocks, then the shared experts' blocks of tokens, in the same launch. Measured on the H100
# (benchmarks/README.md, forty-seventh to forty-ninth sessions): the Qwen1.5-MoE layer at 8 tokens 0.95 to 1.00x the
# aligned launches' time; end to end at 8 requests 2798.5 output tokens/s where aligned 2764.9 (each timed round
# above the aligned server's best), at 1 request level
TOPK_GRID = "MXSERVE_TOPK_GRID"
# each program reads every routed slot's expert (a reduction's width): at most this many
TOPK_GRID_SLOTS = 128
# ... and on stream-K it counts them pairwise: at 64 slots the sm_90 code keeps as many programs an SM as the aligned
# launches with w2, w3 and w4 experts (gate/up 128 registers where 100, 4 either way; down 96 where 95), at 128
# gate/up held 174 and stack (tests/test_gluon_sass.py)
TOPK_STREAM_K_SLOTS = 64


def topk_rows_on(asked: bool | None = None) -> bool:
    """Whether one-token forwards take the top-k's rows straight: ``asked`` (an override's topk_rows), else
    MXSERVE_TOPK_ROWS (read per forward, as MXSERVE_STREAM_K; unset: on)."""
    return os.environ.get(TOPK_ROWS, "1") != "0" if asked is None else bool(asked)


def topk_grid_on(asked: bool | None = None) -> bool:
    """Whether forwards of more tokens take the routed slots straight from the top-k: ``asked`` (an override's
    topk_grid), else MXSERVE_TOPK_GRID (read per forward; unset: on)."""
    return os.environ.get(TOPK_GRID, "1") != "0" if asked is None else bool(asked)


def _streams(dev: torch.device) -> tuple[torch.cuda.Stream | None, torch.cuda.Stream | None]:
    """The current stream and the shared experts' own one (None, None off a GPU)."""
    if dev.type != "cuda":
        return None, None
    return torch.cuda.current_stream(dev), _side_stream(dev)


def _shared_experts(lay: _Layout, on_side: Callable[[], None] | None) -> None:
    """The shared experts' launches (no routing needed) on a second stream where there is one, after
    ``on_side``; the routed experts' launches write the other rows of the same buffers."""

    def launch() -> None:
        _zero_and(lay.sums, lay.zeroed, on_side)  # stream-K: zeroed before either stream's launches add into them
        ids = shared_rows(lay.x.shape[0], lay.top_k, lay.gate_up.n_experts, lay.n_routed, lay.shared_bm, lay.w)
        lay.experts(*ids, lay.top_k, lay.slots - lay.top_k, shared=True)

    _beside(*_streams(lay.x.device), launch)


@dataclass
class Started:
    """A forward's launches begun before its :func:`moe_gemms` (``started=``), into the buffers of its layout: its
    shared experts launched before the top-k exists (:func:`start_shared`), or stream-K's sums zeroed then
    (:func:`start_zero_fill`, ``zeroed``). The forward takes it where it fits."""

    layout: _Layout
    options: tuple  # _options of the forward it was started for
    taken: bool = False  # set by the forward that launched the routed experts into its buffers
    zeroed: bool = False  # only the sums' zero fill was started (the shared experts stay in the forward's launches)

    def fits(self, x: torch.Tensor, top_k: int, gate_up: Arena, down: Arena, options: tuple) -> bool:
        """Whether it was started for this forward: the same input memory, routing width, arenas
        (no swap in between) and launch options."""
        lay = self.layout
        return (lay.x.data_ptr() == x.data_ptr() and lay.x.shape == x.shape and lay.x.stride() == x.stride()
                and lay.x.dtype == x.dtype and lay.top_k == top_k and lay.gate_up is gate_up and lay.down is down
                and self.options == options)  # fmt: skip


def start_shared(x: torch.Tensor, top_k: int, gate_up: Arena, down: Arena, n_routed: int, poison: bool = False,
                 dispatch: str | None = None, shared_apart: bool | None = None, split_fit: str | None = None,
                 **override) -> Started | None:  # fmt: skip
    """Launch the shared experts of a forward of ``x`` [T, H] now, before the router's top-k (its
    ``top_k`` routed experts per token) exists, on their own stream: they then run beside the router
    (SGLang runs its own shared MLP so). None where the shared experts do not launch apart (no shared
    experts, or not decode): the forward launches everything. Pass the result to the forward's
    :func:`moe_gemms` (or :func:`mx_moe_forward`) as ``started``."""
    rows, _, per_expert = _rows(x.shape[0], top_k, gate_up.n_experts, n_routed)
    if rows == 0 or not _shared_apart(gate_up.n_experts - n_routed, per_expert, shared_apart):
        return None  # before any buffer is allocated: prefill passes come here too
    x = x.to(torch.bfloat16).contiguous()  # as mx_moe_forward gives it to moe_gemms
    lay = _layout(x, top_k, gate_up, down, n_routed, poison, dispatch, shared_apart, split_fit, override, early=True)
    if not lay.apart:  # dequantized first (a forced override at decode): the forward launches them all
        return None
    _shared_experts(lay, None)
    return Started(lay, _options(poison, dispatch, shared_apart, split_fit, override))


def start_zero_fill(x: torch.Tensor, top_k: int, gate_up: Arena, down: Arena, n_routed: int, poison: bool = False,
                    dispatch: str | None = None, shared_apart: bool | None = None, split_fit: str | None = None,
                    **override) -> Started | None:  # fmt: skip
    """Zero stream-K's sums of a forward of ``x`` [T, H] that takes the top-k's rows straight (topk_rows: one token,
    or more unless MXSERVE_TOPK_GRID=0) now, before the router's top-k exists, on the second stream: its first GEMM
    then waits for the router alone, where the fill ran after it (the forty-first session's trace at 1 request: router
    4.2 us, fill 1.0, then the alignment's 2.6 before the GEMM). None for other forwards. Pass the result to the
    forward's :func:`moe_gemms` (or :func:`mx_moe_forward`) as ``started``."""
    if x.shape[0] != 1 and (x.shape[0] * top_k > TOPK_STREAM_K_SLOTS or not topk_grid_on(override.get("topk_grid"))):
        return None  # before any buffer is allocated: prefill passes come here too
    p = _pick_cached(x.shape[0], x.device, top_k, gate_up, down, n_routed, dispatch, shared_apart, split_fit,
                     override, False)  # fmt: skip
    if not (p.topk_rows and p.stream_k):  # the grid's top-k rows add into no zeroed sums
        return None
    x = x.to(torch.bfloat16).contiguous()  # as mx_moe_forward gives it to moe_gemms
    lay = _layout(x, top_k, gate_up, down, n_routed, poison, dispatch, shared_apart, split_fit, override)
    main, side = _streams(x.device)
    _beside(main, side, lambda: _zero_and(lay.sums, lay.zeroed, None))
    return Started(lay, _options(poison, dispatch, shared_apart, split_fit, override), zeroed=True)


def moe_gemms(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: Arena,
    down: Arena,
    n_routed: int,
    poison: bool = False,
    dispatch: str | None = None,
    shared_apart: bool | None = None,
    on_side: Callable[[], None] | None = None,
    split_fit: str | None = None,
    started: Started | None = None,
    **override,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two grouped GEMMs for top-k routing [T, k] (experts ``n_routed..`` shared: appended to
    every token). Returns the intermediate [T*slots, I] bf16 and the weighted expert outputs
    [S, T*slots, H], row = token*slots + slot: S = 1 bf16, or S fp32 partial sums over K
    (decode's split-K). ``poison`` fills the outputs with NaN first (tests: every element must
    be written); ``dispatch`` ("single" or "grouped") replaces MXSERVE_DISPATCH; ``shared_apart`` gives
    the shared experts launches of their own (True) or not (False) instead of the default
    (_shared_apart); ``on_side`` is launched first, on the second stream on a GPU (the shared experts'
    where they launch apart), beside the routed experts' launches (work no output depends on: the
    routing counter); ``split_fit`` replaces MXSERVE_DECODE_SPLIT; ``started``: the shared experts
    launched already (:func:`start_shared`), used where they were started for this forward, else ignored;
    ``override`` replaces fields of the picked tiles."""
    k = topk_ids.shape[1]
    early = started is not None and started.fits(x, k, gate_up, down,
                                                 _options(poison, dispatch, shared_apart, split_fit, override))
    if early:
        started.taken = True
    lay = started.layout if early else _layout(x, k, gate_up, down, n_routed, poison, dispatch, shared_apart,
                                               split_fit, override)  # fmt: skip
    main, side = _streams(x.device)
    if not lay.apart:
        # one launch per GEMM (stream-K, prefill): the routing counter and stream-K's zero fill run beside the
        # alignment, not in line before it (session 19's decode trace: 2.0 and 1.2 us of each layer's 83 at 8
        # requests, against 3.6 for the alignment); the fill not again where it was started before the router
        zero = None if early and started.zeroed else lay.sums
        fork = on_side is not None or lay.sums is not None
        if fork:
            _beside(main, side, lambda: _zero_and(zero, lay.zeroed, on_side))
        ids, rows_from = _routed_rows(lay, topk_ids, topk_weights, n_routed, shared=True)
        if lay.zeroed is not None:
            # the sums zeroed before the launches add into them; the counter after the zero fill is no launch's
            # input, so they do not wait for it (in the thirty-third session's decode trace at 1 request it ended
            # 1.6 us after the alignment, and the gate/up launch waited for it)
            main.wait_event(lay.zeroed)
        lay.experts(*ids, 0, lay.slots, topk=rows_from)
        if side is not None and fork:
            main.wait_stream(side)  # joined back after the launches (a CUDA graph's capture needs every fork joined)
        return lay.inter, lay.out
    if not early:
        # the shared experts need no routing: their launches go first, on a second stream where there
        # is one, beside the alignment and the routed experts' launches (SGLang runs its shared MLP so too)
        _shared_experts(lay, on_side)
    elif on_side is not None:  # the shared experts run already: the routing counter joins their stream
        _beside(main, side, on_side)
    if lay.zeroed is not None:
        main.wait_event(lay.zeroed)
    ids, rows_from = _routed_rows(lay, topk_ids, topk_weights, n_routed, shared=False)
    lay.experts(*ids, 0, k, topk=rows_from)
    if side is not None:
        main.wait_stream(side)
    return lay.inter, lay.out


def _routed_rows(lay: _Layout, topk_ids: torch.Tensor, topk_weights: torch.Tensor, n_routed: int,
                 shared: bool) -> tuple[tuple, tuple | None]:  # fmt: skip
    """The rows the routed launches take: the top-k's own where they take them straight (no alignment: each launch
    reads its blocks' experts from the top-k ids; ``topk_rows``), else the alignment's, ``shared``: with the shared
    slots. Returns (sorted ids, block experts, padded count) and the ``topk`` argument of ``lay.experts``."""
    if lay.topk_rows:
        top = topk_ids.contiguous()
        return (top, top, top), (topk_weights.contiguous(), n_routed)
    rows = route(topk_ids, topk_weights, lay.gate_up.n_experts, n_routed, lay.bm, shared=shared, w=lay.w)
    return rows[:3], None


def _zero_and(sums: torch.Tensor | None, zeroed: torch.cuda.Event | None, launch: Callable[[], None] | None) -> None:
    """Stream-K's sums zeroed (``zeroed`` recorded once they are; neither where ``sums`` is None), then ``launch``
    (the routing counter)."""
    if sums is not None:
        sums.zero_()
        if zeroed is not None:
            zeroed.record()
    if launch is not None:
        launch()


def _beside(main: torch.cuda.Stream | None, side: torch.cuda.Stream | None, launch: Callable[[], None]) -> None:
    """``launch``'s work on the second stream, after everything on ``main`` so far (the top-k); in line
    off a GPU. The caller joins ``side`` back into ``main`` before anything reads what it wrote."""
    if side is None:
        launch()
        return
    side.wait_stream(main)
    with torch.cuda.stream(side):
        launch()


# MXSERVE_SHARED_STREAM=0 keeps the shared experts in the routed experts' launches at decode
SHARED_APART = os.environ.get("MXSERVE_SHARED_STREAM", "1") != "0"


def _shared_apart(n_shared: int, per_expert: float, asked: bool | None) -> bool:
    """Whether the shared experts get launches of their own (on a second stream on a GPU): by default
    at decode (few rows per expert: the launches wait on latency, not on bandwidth, so two side by
    side overlap)."""
    if n_shared == 0:
        return False
    return SHARED_APART and per_expert <= DECODE_ROWS if asked is None else asked


@functools.lru_cache(maxsize=8)
def _side_stream(dev: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(dev)


def mx_moe_forward(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: Arena,
    down: Arena,
    n_routed: int,
    shared_scale: torch.Tensor | None = None,
    shared_gate: torch.Tensor | None = None,
    **override,
) -> torch.Tensor:
    """MoE output [T, H] (bf16) for x [T, H] with the layer's packed experts; ``shared_scale``
    [T, 1] scales the shared experts' sum (Qwen2-MoE's sigmoid gate; fp32 as SGLang computes it),
    or ``shared_gate`` [H] gives that gate's weight and the top-k sum computes sigmoid(x . gate).
    A top-k id of -1 (a padded token's slot) routes nowhere."""
    t, h = x.shape
    k = topk_ids.shape[1]
    slots = k + gate_up.n_experts - n_routed
    x = x.to(torch.bfloat16).contiguous()
    scale = gate = None
    if slots > k and shared_gate is not None:
        gate = (x, shared_gate.reshape(h).contiguous())
    elif slots > k and shared_scale is not None:
        scale = shared_scale.float().reshape(t).contiguous()
    _, out = moe_gemms(x, topk_ids, topk_weights, gate_up, down, n_routed, **override)
    return combine(out.view(out.shape[0], t, slots, h), k, scale, gate)
