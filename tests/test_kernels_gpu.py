"""The kernels on a real GPU at real expert shapes (run on the lent H100: pytest -m gpu).

Outputs are poisoned (NaN) before each launch, so an unwritten element fails;
inputs are fresh random draws per case; bounds follow METHOD.md for bf16
operands (1e-3..1e-2), fp8 included now that it runs on tensor cores.
"""

import pytest
import torch
from kernel_cases import (
    GLUON,
    GLUON_SCHEMES,
    LAYOUTS,
    assert_same_gemms,
    bf16_layer_agreement,
    check_padded_slots_and_shared_gate,
    gemm_errors,
    layer_error,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ALL = ["bf16", "w4a16g128", "w3a16g128", "w2a16g128", "w1a16g128", "w8a16", "w8a8fp8", "w4a4", "w8a8"]


def _arenas(schemes: list[str], h: int, i: int, n_experts: int, n_shared: int, gen) -> tuple:
    """The GEMMs' arenas (gate/up, down) on the GPU of experts cycling through ``schemes`` (kernel_cases.make_experts),
    ``n_shared`` of them shared."""
    from kernel_cases import make_experts

    from mxkernels.arena import build_arena

    experts = make_experts(schemes, h, i, n_experts, n_shared, "rtn", gen, "cuda")
    return tuple(build_arena(list(blocks)).to("cuda") for blocks in zip(*(e.linears() for e in experts)))


def _replayed(fn, refill):
    """What ``fn`` returns, captured in a CUDA graph and replayed twice, each time after ``refill()`` wrote new inputs
    into the captured ones."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    for _ in range(2):
        refill()
        g.replay()
    return out


@pytest.mark.parametrize("t, fit", [(1, "fill"), (37, "fill"), (300, "fill"), (1, "waves"), (6, "waves")])
def test_gemms_real_shapes_all_schemes(t, fit):
    # Qwen1.5-MoE expert shape (H 2048, I 1408), 16 experts + 2 shared slices in one launch; decode's K
    # split as by default and by waves (MXSERVE_DECODE_SPLIT=waves: CUDA-core programs at 128 registers)
    errs = gemm_errors(ALL, t, 2048, 1408, 16, 2, 4, "cuda", seed=t, split_fit=fit)
    for key, e in errs.items():
        assert e < 2e-2, (key, e)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gemms_real_shapes_every_layout(layout):
    # 18 routed experts of which the skewed routing feeds 9 (the rest stay empty), 2 shared
    errs = gemm_errors(ALL, 24, 2048, 1408, 18, 2, 4, "cuda", seed=5, **LAYOUTS[layout])
    assert {key.split("/")[0] for key in errs} == set(ALL), errs.keys()
    for key, e in errs.items():
        assert e < 2e-2, (key, layout, e)


@pytest.mark.parametrize("layout", ["decode", "split-uneven", "fma", "fma-split"])
def test_gemms_odd_sizes_decode_layouts(layout):
    # H = 160, I = 96: not multiples of the tiles; groups of 32
    names = ["bf16", "w4a16g32", "w3a16g32", "w2a16g32", "w8a16", "w8a8fp8", "w4a4"]
    for key, e in gemm_errors(names, 35, 160, 96, 8, 1, 2, "cuda", seed=3, **LAYOUTS[layout]).items():
        assert e < 2e-2, (key, layout, e)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("bm, bn, skip_pad, split_bits", [(16, 64, False, False), (8, 64, False, False),
                                                          (8, 128, False, False), (8, 64, True, False),
                                                          (8, 64, False, True)])  # fmt: skip
def test_gluon_kernel_real_shapes(split, bm, bn, skip_pad, split_bits):
    # the Gluon kernel (weights into MMA registers): the schemes it runs, mixed; BN 128: two MMA tiles per warp;
    # skip_pad: a block's padding slots load no activations; split_bits: K split by each expert's bits
    errs = gemm_errors(GLUON_SCHEMES, 24, 2048, 1408, 18, 2, 4, "cuda", seed=7, split=split, bm=bm, bn=bn,
                       skip_pad=skip_pad, split_bits=split_bits, **GLUON)  # fmt: skip
    assert {key.split("/")[0] for key in errs} == set(GLUON_SCHEMES), errs.keys()
    for key, e in errs.items():
        assert e < 2e-2, (key, split, e)


@pytest.mark.parametrize("t, bm, bn", [(24, 8, 64), (24, 8, 128), (24, 16, 64), (3, 8, 64), (64, 8, 128)])
def test_gluon_kernel_stream_k_real_shapes(t, bm, bn):
    # Tiles.stream_k: a grid of the programs the SMs hold (as many as each variant's registers let share an SM:
    # BN 128 and BM 16 gate/up kernels hold 180 to 254), every (block, N tile)'s K tiles dealt out in equal
    # runs and added with fp32 reductions; the schemes it runs, mixed, shared experts in the launch
    errs = gemm_errors(GLUON_SCHEMES, t, 2048, 1408, 18, 2, 4, "cuda", seed=21 + t, bm=bm, bn=bn, stream_k=True,
                       **GLUON)  # fmt: skip
    assert t < 24 or {key.split("/")[0] for key in errs} == set(GLUON_SCHEMES), errs.keys()
    for key, e in errs.items():
        assert e < 2e-2, (key, t, e)
    from mxkernels import moe

    assert moe._PER_SM and all(1 <= n <= moe.STREAM_K_MOST for n in moe._PER_SM.values()), moe._PER_SM


@pytest.mark.parametrize("t, opts", [
    (16, {"place": True, "stream_k": True}), (16, {"early": True, "stream_k": True}),
    (64, {"early": True, "place": True, "bn": 64}), (16, {"early": True, "stream_k": True, "bn": 64, "maxnreg": 168}),
    (16, {"early": True, "stream_k": True, "bn": 128, "maxnreg": 168}),  # capped: spills (sass_census_s29_*)
    (16, {"early": True, "stream_k": True, "maxnreg": 128}),
    (64, {"group_m": 4}), (64, {"group_m": 2, "stream_k": True}),  # an expert's blocks side by side, both grids
    (16, {"staged": True}), (64, {"staged": True, "bm": 32, "bn": 64}),  # the activations through shared memory
    (64, {"staged": True, "bm": 32, "stream_k": True}),
    # the products as warpgroup MMAs (Tiles.wgmma), blocks of 8 to 64 rows, both grids
    pytest.param(16, {"wgmma": True, "bn": 64}, id="wgmma-bm8"),
    pytest.param(64, {"wgmma": True, "bm": 32, "bn": 64}, id="wgmma-bm32"),
    pytest.param(64, {"wgmma": True, "bm": 64, "bn": 64, "stream_k": True}, id="wgmma-bm64-stream-k"),
    pytest.param(16, {"wgmma": True, "bm": 16, "bn": 64, "stream_k": True}, id="wgmma-bm16-stream-k")])
def test_gluon_kernel_options_real_shapes(t, opts):
    # Tiles.place (1 and 2-bit codes unpacked in place, the activations scaled by the packed bf16 multiply) and
    # Tiles.early (the next tile's loads fenced before the products), on both grids: the schemes it runs, mixed
    errs = gemm_errors(GLUON_SCHEMES, t, 2048, 1408, 18, 2, 4, "cuda", seed=41 + t, **{"bm": 8, **GLUON, **opts})
    assert {key.split("/")[0] for key in errs} == set(GLUON_SCHEMES), errs.keys()
    for key, e in errs.items():
        assert e < 2e-2, (key, opts, e)


@pytest.mark.parametrize("t, down", [(8, {"per_sm": 8, "maxnreg": 255}), (16, {"per_sm": 6, "maxnreg": 80})])
def test_gluon_kernel_stream_k_down_with_more_programs_an_sm(t, down):
    # the down GEMM's stream-K grid with more programs an SM (down_tiles: uncapped, as many as its registers let share
    # an SM up to 8; or capped at 80, 6): its grid from its compiled registers past STREAM_K_MOST, the same layer
    from mxkernels import moe

    moe._PER_SM.clear()
    errs = gemm_errors(GLUON_SCHEMES, t, 2048, 1408, 18, 2, 4, "cuda", seed=31 + t, stream_k=True, down_tiles=down,
                       **GLUON)  # fmt: skip
    for key, e in errs.items():
        assert e < 2e-2, (key, t, e)
    grids = {key.most: n for key, n in moe._PER_SM.items() if not key.gate_up}  # the down kernels': by their most an SM
    assert grids and all(1 <= n <= down["per_sm"] for n in grids.values()) and down["per_sm"] in grids, moe._PER_SM


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("t, split", [(1, 1), (1, 4), (24, 3)])
def test_gluon_fma_kernel_real_shapes(t, split, packed):
    # the Gluon CUDA-core kernel (moe_gemm_gluon_fma.py, opt-in): one row per block, the schemes it runs, mixed;
    # packed: 1, 2 and 4-bit codes in bf16 pairs by fma.rn.bf16x2 (MXSERVE_GLUON_FMA=packed)
    tiles = dict(swap=True, scale_after=True, fma=True, gluon=True, bm=1, prefetch=False, split=split, packed=packed)
    errs = gemm_errors(GLUON_SCHEMES, t, 2048, 1408, 18, 2, 4, "cuda", seed=9, **tiles)
    assert t == 1 or {key.split("/")[0] for key in errs} == set(GLUON_SCHEMES), errs.keys()
    for key, e in errs.items():
        assert e < 2e-2, (key, t, split, e)


def test_gluon_kernel_rotated_inputs_and_one_token():
    # gptq-had experts read the rotated copy; one token per launch, as at decode
    names = ["bf16", "w4a16g128", "w2a16g128"]
    for t in (1, 5):
        errs = gemm_errors(names, t, 1024, 512, 8, 1, 2, "cuda", seed=t, method="gptq-had", split=2, bm=8, **GLUON)
        assert {key.split("/")[0] for key in errs} == set(names), errs.keys()
        for key, e in errs.items():
            assert e < 2e-2, (key, t, e)


def test_decode_runs_on_the_gluon_kernel_by_default_where_it_can(monkeypatch):
    from mxkernels import moe

    blocks = []
    real = moe._gemm_gluon

    def spy(*args):
        tiles = next(a for a in args if isinstance(a, moe.Tiles))
        blocks.append((tiles.bm, tiles.bn))
        return real(*args)

    monkeypatch.setattr(moe, "_gemm_gluon", spy)

    def errors(names):  # one launch per GEMM: the shared experts in the routed experts' launches (their
        # own launches, the default at decode, are test_shared_experts_on_a_second_stream_...'s)
        return gemm_errors(names, 24, 2048, 1408, 18, 2, 4, "cuda", seed=9, shared_apart=False)

    # about 7 rows per active expert: the decode layout, 8 rows per block; bf16 and 3 and 8 bits
    # in the code set: one MMA tile of rows per warp
    errs = errors(GLUON_SCHEMES)
    assert blocks == [(8, 64), (8, 64)]
    for key, e in errs.items():
        assert e < 2e-2, (key, e)
    blocks.clear()
    errs = errors(["w4a16g128", "w2a16g128", "w1a16g128"])
    assert blocks == [(8, 128), (8, 128)]  # within 1, 2 and 4 bits: two
    for key, e in errs.items():
        assert e < 2e-2, (key, e)
    blocks.clear()
    errors(["w4a16g128", "w8a8fp8"])  # fp8: the Triton kernel
    assert blocks == []


@pytest.mark.parametrize("t, names, tiles", [(24, GLUON_SCHEMES, {}), (24, ALL, LAYOUTS["decode"]), (1, ALL, {}),
                                             (300, ALL, {})])  # fmt: skip
def test_grouped_dispatch_real_shapes(t, names, tiles):
    # one launch per group of codes: on the Gluon kernel (24 tokens, its schemes), the Triton decode
    # layout, CUDA-core products (1 token) and the prefill layout
    errs = gemm_errors(names, t, 2048, 1408, 18, 2, 4, "cuda", seed=13, dispatch="grouped", **tiles)
    assert t == 1 or {key.split("/")[0] for key in errs} == set(names), errs.keys()
    for key, e in errs.items():
        assert e < 2e-2, (key, t, e)


@pytest.mark.parametrize("t,tiles,early", [(1, {}, False), (8, {}, False), (8, {"gluon": False}, False),
                                           (16, LAYOUTS["decode"], False), (1, {}, True), (8, {}, True),
                                           (16, {}, False), (16, {}, True),
                                           (40, {"shared_bm": 32}, False)])  # fmt: skip
@pytest.mark.parametrize("graph", [False, True])
def test_shared_experts_on_a_second_stream_compute_what_one_launch_computes(t, tiles, early, graph, monkeypatch):
    # the decode picks without stream-K (CUDA-core products at 1 token, the Gluon kernel at 8; at 16 the shared
    # experts' own launches in 16-row blocks, the routed ones' in 8: Tiles.shared_own; at 40 in 32, staged), the
    # Triton MMA layout; eager, and captured in a CUDA graph (fork and join of the second stream) then replayed;
    # early: the shared experts launched before the top-k (start_shared, MXSERVE_SHARED_EARLY). Stream-K
    # keeps the shared experts in its launch and adds its sums in any order: off, for these bit-for-bit checks
    from kernel_cases import shared_apart_case

    monkeypatch.setenv("MXSERVE_STREAM_K", "0")

    shared_apart_case("cuda", t, graph, early, **tiles)


def test_padded_slots_and_the_shared_gate_inside_the_launches_cuda(monkeypatch):
    monkeypatch.setenv("MXSERVE_STREAM_K", "0")  # bit-for-bit checks: sums added in a fixed order
    check_padded_slots_and_shared_gate("cuda")


@pytest.mark.parametrize("t", [1, 8, 16])
@pytest.mark.parametrize("graph", [False, True])
def test_shared_experts_started_early_on_the_stream_k_grid(t, graph, monkeypatch):
    # MXSERVE_SHARED_EARLY under stream-K: the shared experts' own stream-K launches on the second stream (at 16 tokens
    # in 16-row blocks, Tiles.shared_own), the sums zeroed there first and the routed launches waiting for that alone
    # (an event); eager, and in a CUDA graph
    from kernel_cases import shared_apart_case

    monkeypatch.setenv("MXSERVE_STREAM_K", "1")
    shared_apart_case("cuda", t, graph, True, close=True)


def run_eager_or_replayed(layer, x: torch.Tensor, draw, graph: bool):
    """``layer(x)``, or with ``graph`` captured in a CUDA graph over ``x``, which is then refilled by ``draw()`` and
    the graph replayed: its outputs (synchronized)."""
    got = layer(x)
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            got = layer(x)
        x.copy_(draw())
        g.replay()
    torch.cuda.synchronize()
    return got


@pytest.mark.parametrize("t", [1, 8])
@pytest.mark.parametrize("stream_k", ["0", "1"])
@pytest.mark.parametrize("graph", [False, True])
def test_programmatic_dependent_launch_computes_what_plain_launches_do(t, stream_k, graph, monkeypatch):
    # MXSERVE_PDL (mxkernels/pdl.py): the router, alignment, gate/up, SiLU, down and top-k sum launched as
    # programmatic dependent launches, the router's weights and the down GEMM's first K tile loaded before
    # their waits: the same routing and, on the unbalanced grid, the same outputs bit for bit as plain launches
    # (stream-K adds its sums in any order: within 1%); eager, and captured in a CUDA graph replayed on new tokens
    from kernel_cases import make_experts

    from mxkernels import pdl
    from mxkernels.arena import build_arena
    from mxkernels.moe import mx_moe_forward
    from mxkernels.router import fused_router

    monkeypatch.setenv("MXSERVE_STREAM_K", stream_k)
    gen = torch.Generator().manual_seed(t)
    experts = make_experts(["w4a16g128", "w2a16g128", "w8a16", "w3a16g128"], 256, 128, 8, 2, "rtn", gen, "cuda")
    gu, dn = (build_arena(list(blocks)).to("cuda") for blocks in zip(*(e.linears() for e in experts)))
    gate = (torch.randn(8, 256, generator=gen) * 0.1).to(torch.bfloat16).cuda()
    shared_gate = (torch.randn(256, generator=gen) * 0.1).to(torch.bfloat16).cuda()

    def layer(x):
        w, ids, _ = fused_router(x, gate, 2, False)
        return ids, mx_moe_forward(x, ids, w, gu, dn, 8, shared_gate=shared_gate)

    def draw():
        return torch.randn(t, 256, generator=gen).to(torch.bfloat16).cuda()

    x = draw()
    monkeypatch.setattr(pdl, "ENABLED", True)
    got = run_eager_or_replayed(layer, x, draw, graph)
    monkeypatch.setattr(pdl, "ENABLED", False)
    want = layer(x)
    assert torch.equal(got[0], want[0])
    a, b = got[1].float(), want[1].float()
    assert torch.isfinite(a).all()
    if stream_k == "1":
        assert ((a - b).norm() / b.norm()).item() < 1e-2
    else:
        assert torch.equal(a, b), (a - b).abs().max().item()


@pytest.mark.parametrize("graph, padded, early", [(False, False, False), (True, False, False), (True, False, True),
                                                  (True, True, True), (False, True, True)])  # fmt: skip
def test_one_token_takes_the_top_k_rows_straight_cuda(graph, padded, early, monkeypatch):
    # MXSERVE_TOPK_ROWS=1 at Qwen1.5-MoE's shapes (60 routed experts, top-4, 4 shared, every scheme the Gluon kernel
    # runs): each slot a block, its expert read from the fused router's top-k in both stream-K launches, no
    # alignment; eager, and captured in a CUDA graph replayed on a new token. The same layer as the aligned launches
    # to within stream-K's order of sums. ``padded``: SGLang's padded token (-1 ids) adds nothing but its shared part;
    # ``early``: the sums zeroed on the second stream before the router (start_zero_fill, the SGLang plugin's hook)
    from kernel_cases import make_experts

    from mxkernels import moe
    from mxkernels.arena import build_arena
    from mxkernels.router import fused_router

    gen = torch.Generator().manual_seed(41)
    names = ["w4a16g128", "w3a16g128", "w2a16g128", "w8a16", "bf16", "w1a16g128"]
    experts = make_experts(names, 2048, 1408, 60, 4, "rtn", gen, "cuda")
    gu, dn = (build_arena(list(blocks)).to("cuda") for blocks in zip(*(e.linears() for e in experts)))
    gate = (torch.randn(60, 2048, generator=gen) * 0.05).to(torch.bfloat16).cuda()
    aligned = []
    monkeypatch.setattr(moe, "route", lambda *a, f=moe.route, **kw: aligned.append(1) or f(*a, **kw))

    def layer(x):
        started = moe.start_zero_fill(x, 4, gu, dn, 60) if early else None
        w, ids, _ = fused_router(x, gate, 4, False)
        if padded:
            ids = torch.full_like(ids, -1)
        out = moe.mx_moe_forward(x, ids, w, gu, dn, 60, started=started)
        assert started is None or started.taken
        return out

    def draw():
        return torch.randn(1, 2048, generator=gen).to(torch.bfloat16).cuda()

    x = draw()
    monkeypatch.setenv("MXSERVE_TOPK_ROWS", "1")
    got = run_eager_or_replayed(layer, x, draw, graph)
    assert aligned == []
    monkeypatch.setenv("MXSERVE_TOPK_ROWS", "0")
    want = layer(x).float()
    assert aligned
    a = got.float()
    assert torch.isfinite(a).all()
    assert ((a - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("tokens, graph, stream_k", [(8, False, "0"), (8, True, "0"), (16, False, "0"), (32, True, "0"),
                                                     (8, True, "1"), (16, False, "1")])  # fmt: skip
def test_the_grid_takes_the_routed_slots_straight_from_the_top_k_cuda(tokens, graph, stream_k, monkeypatch):
    # MXSERVE_TOPK_GRID=1 at Qwen1.5-MoE's shapes (60 routed experts, top-4, 4 shared, every scheme the Gluon kernel
    # runs), off stream-K: a program row per routed slot, each leading slot finding its expert's others in the fused
    # router's top-k, no alignment; eager, and captured in a CUDA graph replayed on new tokens. The grid's sums are
    # added in a fixed order, so the layer equals the aligned launches' bit for bit; a padded token (-1) and the
    # skewed router (some experts past one 8-row block) included. On stream-K every program finds all the leading
    # slots, the shared experts' blocks after them in the same launches: equal to rounding (its sums' order)
    from kernel_cases import make_experts

    from mxkernels import moe
    from mxkernels.arena import build_arena
    from mxkernels.router import fused_router

    monkeypatch.setenv("MXSERVE_STREAM_K", stream_k)
    gen = torch.Generator().manual_seed(47)
    names = ["w4a16g128", "w3a16g128", "w2a16g128", "w8a16", "bf16", "w1a16g128"]
    experts = make_experts(names, 2048, 1408, 60, 4, "rtn", gen, "cuda")
    gu, dn = (build_arena(list(blocks)).to("cuda") for blocks in zip(*(e.linears() for e in experts)))
    gate = (torch.randn(60, 2048, generator=gen) * 0.05).to(torch.bfloat16).cuda()
    gate[:4] *= 8.0  # a few popular experts: at 16 and 32 tokens some take more than one block
    aligned = []
    monkeypatch.setattr(moe, "route", lambda *a, f=moe.route, **kw: aligned.append(1) or f(*a, **kw))

    def layer(x):
        w, ids, _ = fused_router(x, gate, 4, False)
        ids[-1] = -1
        return moe.mx_moe_forward(x, ids, w, gu, dn, 60, poison=True)

    def draw():
        return torch.randn(tokens, 2048, generator=gen).to(torch.bfloat16).cuda()

    x = draw()
    monkeypatch.setenv("MXSERVE_TOPK_GRID", "1")
    got = run_eager_or_replayed(layer, x, draw, graph)
    assert aligned == []
    monkeypatch.setenv("MXSERVE_TOPK_GRID", "0")
    want = layer(x)
    assert aligned
    assert torch.isfinite(got).all()
    if stream_k == "0":
        assert torch.equal(got, want)
    else:
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


@pytest.mark.parametrize("tokens, want", [(1, "zero fill"), (8, "shared experts")])
def test_top_k_rows_straight_before_the_shared_experts_started_early_cuda(tokens, want, monkeypatch):
    # MixedExperts.start_early with the shared experts asked early (MXSERVE_SHARED_EARLY=1 in the SGLang plugin): one
    # token takes the top-k's rows (the zero fill started), more tokens start the shared experts; either start is taken
    # by the forward, which equals the one started nothing to within stream-K's order of sums
    from kernel_cases import make_experts, route

    from mxserve.runtime.moe_layer import MixedExperts

    monkeypatch.delenv("MXSERVE_TOPK_ROWS", raising=False)
    gen = torch.Generator().manual_seed(43)
    experts = make_experts(["w4a16g128", "w3a16g128", "w2a16g128", "bf16"], 2048, 1408, 60, 4, "rtn", gen, "cuda")
    layer = MixedExperts(0, 60, experts)
    x = torch.randn(tokens, 2048, generator=gen).to(torch.bfloat16).cuda()
    ids, w = route(tokens, 60, 4, gen, skew=False)
    ids, w = ids.cuda().to(torch.int32), w.cuda()
    want_out = layer.forward(x, ids, w).float()
    layer.start_early(x, 4, True)
    started = layer._started
    assert started is not None and ("zero fill" if started.zeroed else "shared experts") == want
    got = layer.forward(x, ids, w).float()
    assert started.taken and torch.isfinite(got).all()
    assert ((got - want_out).norm() / want_out.norm()).item() < 1e-2


def test_padded_slots_on_the_stream_k_grid_cuda():
    # SGLang's -1 ids under stream-K (decode's default below 4 rows per expert): a padded token's slots add
    # nothing anywhere, to within the order its sums are added in
    from kernel_cases import make_experts, route

    from mxkernels.arena import build_arena
    from mxkernels.moe import mx_moe_forward

    gen = torch.Generator().manual_seed(8)
    experts = make_experts(["w4a16g128", "bf16", "w2a16g128"], 256, 256, 6, 2, "rtn", gen, "cuda")
    gu, dn = (build_arena(list(blocks)).to("cuda") for blocks in zip(*(e.linears() for e in experts)))
    x = torch.randn(5, 256, generator=gen).to(torch.bfloat16).cuda()
    ids, w = route(5, 6, 2, gen)
    ids[3:] = -1
    masked, w_masked = torch.where(ids >= 0, ids, 0), torch.where(ids >= 0, w, 0)
    ids, w, masked, w_masked = ids.cuda(), w.cuda(), masked.cuda(), w_masked.cuda()
    padded = mx_moe_forward(x, ids, w, gu, dn, 6, stream_k=True).float()
    ref = mx_moe_forward(x, masked, w_masked, gu, dn, 6, stream_k=False).float()
    assert ((padded - ref).abs() <= ref.abs() * 2**-6 + 1e-3).all()


def test_stream_k_counts_routing_on_the_second_stream_in_a_cuda_graph():
    # stream-K keeps the shared experts in its launches, so nothing else runs on the second stream: the
    # routing counter and the zero fill of stream-K's sums go there all the same (beside the alignment, not in
    # line before it), and the graph joins it back before the launches add into the sums: every replay
    # counted, the layer's output as on the unbalanced grid
    from kernel_cases import make_experts, route

    from mxkernels.arena import build_arena
    from mxkernels.moe import moe_gemms
    from router_stats import ExpertCounter

    gen = torch.Generator().manual_seed(19)
    experts = make_experts(["w4a16g128", "w3a16g128", "w2a16g128"], 256, 256, 6, 2, "rtn", gen, "cuda")
    gu, dn = (build_arena(list(blocks)).to("cuda") for blocks in zip(*(e.linears() for e in experts)))
    counter, want = ExpertCounter(6).to("cuda"), ExpertCounter(6)
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16).cuda()
    ids, w = (v.cuda() for v in route(3, 6, 2, gen))
    streams = []  # (the layer's stream, the counter's)

    def layer():
        main = torch.cuda.current_stream()
        count = lambda: streams.append((main, torch.cuda.current_stream())) or counter.record(ids)  # noqa: E731
        return moe_gemms(x, ids, w, gu, dn, 6, stream_k=True, on_side=count)[1]

    layer()  # compiled outside the capture
    want.record(ids.cpu())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer()
    assert len(streams) == 2 and all(main != side for main, side in streams)  # eager, then captured
    for _ in range(2):
        nids, nw = route(3, 6, 2, gen)
        ids.copy_(nids), w.copy_(nw)
        graph.replay()
        want.record(nids)
        ref = moe_gemms(x, ids, w, gu, dn, 6, stream_k=False)[1]
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        assert ((out.float().sum(0) - ref.float().sum(0)).abs() <= ref.float().sum(0).abs() * 2**-6 + 1e-3).all()
    assert counter.snapshot() == want.snapshot()


def test_whole_layer_real_shapes():
    assert layer_error(["bf16", "w4a16g128", "w2a16g128", "w8a8fp8"], 200, 2048, 1408, 16, 2, 4, "cuda", 1) < 3e-2


def test_whole_layer_large_batch_alignment_and_fp8_rows():
    # 1100 tokens x 6 slots: above align.KERNEL_MAX_ROWS, so the alignment's three many-program launches,
    # and fp8 experts' per-token rows from act_quant's kernel, in one layer
    assert layer_error(["w8a8fp8", "w4a16g128", "bf16", "w8a8"], 1100, 2048, 1408, 16, 2, 4, "cuda", 2) < 3e-2


def test_runtime_layer_uses_kernels_on_cuda(tiny_models):
    from mxserve.checkpoint import install_layers, layout, quantize_layers
    from mxserve.models.adapters import moe_layers
    from mxserve.models.loading import load_model
    from mxserve.plan import Plan
    from mxserve.schemes import get_scheme

    model = load_model(str(tiny_models["qwen2_moe"]))
    plan = Plan.uniform("m", "qwen2_moe", layout(moe_layers(model)), get_scheme("w4a16g128"), "rtn")
    mx = install_layers(model, quantize_layers(model, plan, progress=False))[0]
    x = torch.randn(1, 33, 128)
    ref = mx(x)
    mx.to("cuda", torch.bfloat16)
    out = mx(x.cuda().bfloat16()).float().cpu()
    assert mx.mx._arenas is not None  # the kernel path ran
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2


def test_bf16_layer_rounds_like_unfused_sglang_real_shapes():
    # tensor-core fp32 sums run in another order than the CPU's, so a few elements may differ
    # by an ulp; the bf16 stores (gate/up, SiLU * up, each slot, routed sum, shared add) must match
    same, worst_ulps = bf16_layer_agreement(64, 2048, 1408, 16, 1, 4, "cuda", seed=2)
    print(f"bit-identical share {same:.5f}, worst {worst_ulps:.1f} ulps")
    assert same > 0.97, same


@pytest.mark.gpu
def test_slab_runs_any_plan_and_swaps_in_place_cuda():
    """The fixed-capacity slab SGLang swaps into: same outputs as plain arenas, before and after an in-place swap."""
    from kernel_cases import slab_swap_case

    before, after = slab_swap_case("cuda")
    print(f"max difference to plain arenas: before {before}, after {after}")
    assert before == 0 and after == 0


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe", "mixtral", "deepseek_v2"])
def test_mixed_checkpoint_runs_on_cuda_like_the_cpu(arch, tmp_path):
    """The checkpoint of the SGLang test that mixes every scheme, on this GPU's kernels without SGLang:
    finite logits for prompts of 1 to 40 tokens (one token and the decode layouts, prefill), close to
    the CPU reference. It tells a kernel fault from one of the SGLang adapter."""
    from conftest import mixed_plan, sglang_tiny
    from mxserve.checkpoint import load_quantized, quantize_to_dir
    from mxserve.models.loading import load_model

    src = sglang_tiny(arch, tmp_path)
    quantize_to_dir(src, mixed_plan(load_model(src)), str(tmp_path / "ckpt"), progress=False)
    cpu, _ = load_quantized(str(tmp_path / "ckpt"), dtype=torch.bfloat16)
    gpu, _ = load_quantized(str(tmp_path / "ckpt"), dtype=torch.bfloat16, device="cuda")
    gen = torch.Generator().manual_seed(0)
    for t in (1, 2, 5, 11, 40):
        ids = torch.randint(0, 8192, (1, t), generator=gen)
        with torch.no_grad():
            want, got = cpu(ids).logits.float(), gpu(ids.cuda()).logits.float().cpu()
        assert torch.isfinite(got).all(), (t, got.isnan().sum().item(), got.isinf().sum().item())
        # the same kernels in Triton's interpreter (CPU): within 0.008 of the reference for these four models
        assert ((got - want).norm() / want.norm()).item() < 5e-2, t


def test_routing_counter_writes_its_host_mirror_from_the_kernel_in_a_cuda_graph():
    from router_stats import ExpertCounter

    counter = ExpertCounter(16).to("cuda")
    assert counter.mapped, "the counting kernel could not store into pinned host memory"
    ids = torch.randint(-1, 16, (37, 4), device="cuda", dtype=torch.int32)
    ref = ExpertCounter(16)
    for _ in range(3):
        ref.record(ids.cpu())
    counter.record(ids)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        counter.record(ids)
    graph.replay()  # captured without running: this and the eager pass make two; one more replay, three
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(counter.host, ref.buf) and counter.snapshot() == ref.snapshot()


@pytest.mark.parametrize("t", [1, 8, 33])
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("per_program", [1, 4, 8, 64])
def test_fused_router_routes_as_softmax_top_k_cuda(t, graph, per_program):
    # the per-token counters' release and acquire across programs; their reset, replayed in a CUDA graph; one
    # program a token (64) has no counter
    from kernel_cases import fused_router_case

    fused_router_case("cuda", t, t == 8, t == 33, graph, h=2048 if t == 8 else 4096, per_program=per_program)


def test_prefill_grouped_order_computes_the_same_layer_cuda():
    # DeepSeek-V2-Lite's expert shape at 1100 tokens (6 routed slots and 2 shared), fp8, int8-activation, weight-only
    # and bf16 experts mixed, in the tiles the H200's table picks: the programs taken 8 blocks at a time
    # (Tiles.group_m, the prefill default) write every element (NaN-poisoned) bit for bit as the launch order does
    from kernel_cases import route

    from mxkernels.moe import moe_gemms

    gen = torch.Generator().manual_seed(9)
    gu, dn = _arenas(["w8a8fp8", "w4a16g128", "w8a8", "bf16"], 2048, 1408, 16, 2, gen)
    ids, w = route(1100, 16, 6, gen, skew=False)
    x = torch.randn(1100, 2048, generator=gen).to(torch.bfloat16).cuda()
    ids, w = ids.cuda(), w.cuda()
    want = moe_gemms(x, ids, w, gu, dn, 16, poison=True, group_m=0)
    got = moe_gemms(x, ids, w, gu, dn, 16, poison=True, group_m=8)
    assert_same_gemms(got, want)
