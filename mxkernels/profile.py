"""Measuring the kernels for the planner's cost model (GPU only).

The cost model wants the time of one expert's GEMM for a scheme, shape (N, K)
and token count. Launch overhead is shared by every expert of a launch, so a
measurement runs ``n_experts`` experts of one scheme with ``tokens`` tokens
each in one launch and divides by ``n_experts``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mxkernels.align import route
from mxkernels.arena import build_arena
from mxkernels.moe import (
    _as_gluon,
    _gemm,
    _gluon_decode,
    _split_fit,
    _stream_k,
    costly_share,
    gluon_codes,
    multiprocessors,
    pick_tiles,
)


def random_expert_weights(n: int, k: int, n_experts: int, scheme, device, seed: int = 0) -> list:
    """Random weights of one scheme (RTN), quantized on ``device``."""
    from mxserve.quant.qlinear import quantize_linear

    g = torch.Generator(device=device).manual_seed(seed)
    return [
        quantize_linear(torch.randn(n, k, generator=g, device=device) * 0.02, scheme, "rtn") for _ in range(n_experts)
    ]


def expert_gemm(
    scheme, n: int, k: int, tokens: int, n_experts: int = 8, device: str = "cuda", linears: list | None = None
) -> tuple[Callable[[], None], torch.Tensor, torch.Tensor, list]:
    """One launch of ``n_experts`` experts' [tokens, K] x [K, N] GEMMs in ``scheme`` (down-GEMM path),
    in the layout and on the grid that serving picks for that many rows per expert (moe_gemms: the Gluon
    kernel where it takes it, on the stream-K grid below STREAM_K_ROWS, whose balance is then this
    scheme's alone). Until the fortieth session the profile kept the unbalanced grid, so its 1-token
    times were those of a launch serving no longer makes: on the H100, w4 2.4 us an expert at 1 token and
    1.2 at 4 (benchmarks/README.md). Returns the launch, its input [E*tokens, K] (expert-major rows),
    its output and the experts' weights."""
    linears = linears or random_expert_weights(n, k, n_experts, scheme, device)
    arena = build_arena(linears).to(device)
    dev = torch.device(device)
    e = arena.n_experts
    ids = torch.arange(e, device=device).repeat_interleave(tokens)
    rows = ids.numel()
    sk = _stream_k(tokens, None, {}, costly_share(arena))
    gluon = _gluon_decode(dev, tokens, arena, arena, {}, sk)
    tiles = pick_tiles(rows, e, arena.min_group, n, k, arena.codes_mask, multiprocessors(dev), _split_fit(None),
                       **({"fma": False, "stream_k": sk} if gluon else {}))  # fmt: skip
    if gluon:
        tiles = _as_gluon(tiles, tokens, k, gluon_codes(arena), {})
    sorted_ids, block_expert, npp, w = route(ids[:, None], torch.ones(rows, 1, device=device), e, e, tiles.bm)
    a = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    if tiles.stream_k:  # the programs add fp32 sums into the output (moe_gemms zeroes it beside the alignment)
        out = torch.zeros(1, rows, n, device=device, dtype=torch.float32)
    else:
        out = torch.empty(tiles.split, rows, n, device=device,
                          dtype=torch.float32 if tiles.split > 1 else torch.bfloat16)  # fmt: skip

    def run() -> None:
        _gemm(a, arena, out, sorted_ids, block_expert, npp, w, rows, 1, False, [(arena.kernel_mask, tiles)])

    return run, a, out, linears


def time_expert_gemm(
    scheme, n: int, k: int, tokens: int, n_experts: int = 8, device: str = "cuda", linears: list | None = None
) -> float:
    """Median seconds of one expert's [tokens, K] x [K, N] GEMM in ``scheme`` (expert_gemm's launch)."""
    import triton.testing

    run, *_ = expert_gemm(scheme, n, k, tokens, n_experts, device, linears)
    run()  # compile outside the graph capture
    torch.cuda.synchronize()
    ms = triton.testing.do_bench_cudagraph(run, rep=30, return_mode="median")  # no launch overhead
    return ms * 1e-3 / n_experts
