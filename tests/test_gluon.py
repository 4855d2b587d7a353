"""The Gluon decode kernel (mxkernels/moe_gemm_gluon.py) on a machine without a GPU: its arithmetic.

Triton's interpreter does not run Gluon. So here the kernel's source runs in the interpreter with the layouts
dropped (tests/gluon_shim.py), which checks its arithmetic, indexing and masks. Its sm_90 machine code:
tests/test_gluon_sass.py; the CUDA-core kernel: tests/test_gluon_fma.py; its results on the GPU:
tests/test_kernels_gpu.py, test_gluon_*.
"""

import pytest
import torch
from kernel_cases import GLUON, GLUON_SCHEMES, code_orders_agree, gemm_errors, layouts_agree, make_experts, route
from kernel_cases import GLUON_BOUND as BOUND

gluon = pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")


@pytest.fixture
def interpreted_gluon(monkeypatch):
    """The Gluon kernel's source, its layouts dropped, run by the interpreter in place of the GPU."""
    from gluon_shim import interpreted_kernel

    from mxkernels import moe

    kernel = interpreted_kernel()
    monkeypatch.setattr(moe, "_gluon_kernel", lambda: kernel)


def _spied(monkeypatch, record, run: bool = True) -> list:
    """The launches of the (interpreted) Gluon kernel from here on, each as ``record(grid, its keywords)``; with
    ``run`` false they are recorded only (what a launch is given, not what it computes)."""
    from mxkernels import moe

    seen = []
    kernel = getattr(moe._gluon_kernel, "real", None) or moe._gluon_kernel()  # not a spy set before

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(record(grid, kw))
                return kernel[grid](*args, **kw) if run else None

            return launch

    def spied():
        return Spy()

    spied.real = kernel
    monkeypatch.setattr(moe, "_gluon_kernel", spied)
    return seen


def _launched(names, t, n_experts, n_shared, k, seed, **tiles) -> None:
    """A forward of gemm_errors' case (H = I = 256) for its launches alone (_spied with ``run`` false)."""
    from kernel_cases import make_experts, route

    from mxkernels import moe
    from mxkernels.arena import build_arena

    gen = torch.Generator().manual_seed(seed)
    experts = make_experts(names, 256, 256, n_experts, n_shared, "rtn", gen, "cpu")
    gu, dn = build_arena([e.gate_up for e in experts]), build_arena([e.down for e in experts])
    x = torch.randn(t, 256, generator=gen).to(torch.bfloat16)
    moe.moe_gemms(x, *route(t, n_experts, k, gen), gu, dn, n_experts, **tiles)


# each block shape unsplit, and split with an empty split for the 8-row blocks the launch picks; the
# padding slots loading no activations (skip_pad), at 8 and 16 rows per block; K split by each expert's
# bits (split_bits: bf16 experts 3 ways, 8-bit 2, the narrower ones 1, the rest of their programs zeros)
@pytest.mark.parametrize("bm, bn, split, skip_pad, split_bits", [
    (16, 64, 1, False, False), (8, 64, 1, False, False), (8, 64, 3, False, False), (8, 128, 1, False, False),
    (8, 128, 3, False, False), (8, 64, 3, True, False), (16, 128, 1, True, False), (8, 64, 3, False, True)])
def test_gluon_kernel_arithmetic_in_the_interpreter(interpreted_gluon, split, bm, bn, skip_pad, split_bits,
                                                    monkeypatch):  # fmt: skip
    # every scheme the kernel has, mixed; 18 routed experts, half of them empty. H = I = 256: two K tiles
    # of each GEMM, so split 3 leaves one split empty
    from mxkernels import moe

    taken = []
    monkeypatch.setattr(moe, "code_splits", lambda *a, f=moe.code_splits: taken.append(f(*a)) or taken[-1])
    errs = gemm_errors(GLUON_SCHEMES, 24, 256, 256, 18, 1, 2, "cpu", seed=11, split=split, bm=bm, bn=bn,
                       skip_pad=skip_pad, split_bits=split_bits, **GLUON)  # fmt: skip
    assert {key.split("/")[0] for key in errs} == set(GLUON_SCHEMES), errs.keys()
    for key, e in errs.items():
        assert e < BOUND, (key, e)
    assert bool(taken) == split_bits and all(taken)  # every launch got its splits per code


# Tiles.place (1 and 2-bit codes in place, the activations scaled to match) and Tiles.early (the loads
# fenced from the products by a branch) on both grids, BN 128 (two MMA tiles of rows a warp: the sums' row
# halves) and 64, gate/up's options apart from down's; Tiles.group_m (blocks taken a few at a time over every N
# tile, the last group of the grid's blocks shorter; on stream-K, of the (block, N tile) units). K is two tiles:
# split 3 leaves runs of one tile and an empty one; stream-K's runs start and end anywhere
@pytest.mark.parametrize("opts", [
    {"place": True, "bn": 128, "split": 3}, {"place": True, "early": True, "bn": 64, "stream_k": True},
    {"early": True, "bn": 128, "split": 3, "down_tiles": {"early": False}},
    {"early": True, "bn": 128, "split": 3, "down_tiles": {"early": None, "bn": None}},
    {"group_m": 4, "bn": 64, "split": 3}, {"group_m": 2, "bn": 128, "stream_k": True}])  # fmt: skip
def test_gluon_kernel_options_in_the_interpreter(interpreted_gluon, opts, monkeypatch):
    launches = _spied(monkeypatch, lambda grid, kw: (kw["GATE_UP"], kw.get("PLACE", False), kw.get("EARLY", False),
                                                     kw["BN"], kw.get("GROUP_M", 0), grid[0]))  # fmt: skip
    errs = gemm_errors(GLUON_SCHEMES, 24, 256, 256, 18, 1, 2, "cpu", seed=13, bm=8, **{**GLUON, **opts})
    assert {key.split("/")[0] for key in errs} == set(GLUON_SCHEMES), errs.keys()
    for key, e in errs.items():
        assert e < BOUND, (key, e)
    # each GEMM's launches (the shared expert's among them) so; a down field of None: the picked layout's (the
    # wide code set's BN 64, no early loads)
    down = {k: v for k, v in {**opts, **opts.get("down_tiles", {})}.items() if v is not None}
    g = opts.get("group_m", 0)
    assert {lc[:5] for lc in launches} == {(True, opts.get("place", False), opts.get("early", False), opts["bn"], g),
                                           (False, down.get("place", False), down.get("early", False),
                                            down.get("bn", 64), g)}, launches  # fmt: skip
    if g and not opts.get("stream_k"):  # some launch's grid of blocks is not a whole number of groups
        assert any(lc[5] % g for lc in launches), launches


# Tiles.staged: each K tile's activations copied one tile ahead into a ring of 4 shared-memory buffers
# (moe_gemm_gluon._stage), read back where the tile's products need them. K of 5 tiles wraps the ring; split 2 and
# stream-K start runs inside K. The same sums, bit for bit, as the activations loaded into registers (a tile read
# from another buffer, or a token's two rows of words swapped, would differ)
@pytest.mark.parametrize("tiles", [
    {"bm": 16, "bn": 64, "split": 1}, {"bm": 16, "bn": 128, "split": 2, "skip_pad": True},
    {"bm": 16, "bn": 64, "stream_k": True}])  # fmt: skip
def test_gluon_kernel_staged_activations_give_the_same_layer(interpreted_gluon, tiles, monkeypatch):
    launches = _spied(monkeypatch, lambda grid, kw: (kw.get("STAGED", False), kw["BM"]))
    diff = layouts_agree(GLUON_SCHEMES[:3], 16, 640, 640, 4, 2, "cpu", seed=5, a={**GLUON, **tiles},
                         b={**GLUON, **tiles, "staged": True})  # fmt: skip
    assert diff == 0, diff
    assert set(launches) == {(False, tiles["bm"]), (True, tiles["bm"])}, launches


# 32-row blocks, which only staging allows (held in registers a tile ahead, 32 tokens' activations spill:
# benchmarks/sass_census.py table --bm 32), on both grids; 6 experts of about 16 rows, so most take one block
@pytest.mark.parametrize("stream_k", [False, True])
def test_gluon_kernel_32_row_blocks_staged_in_the_interpreter(interpreted_gluon, stream_k, monkeypatch):
    launches = _spied(monkeypatch, lambda grid, kw: (kw.get("STAGED", False), kw["BM"]))
    errs = gemm_errors(GLUON_SCHEMES, 48, 384, 256, 6, 1, 2, "cpu", seed=9,
                       **{**GLUON, "bm": 32, "bn": 64, "staged": True, "stream_k": stream_k})  # fmt: skip
    assert len({key.split("/")[0] for key in errs}) >= 6, errs.keys()  # 7 experts' 14 GEMMs: most schemes
    for key, e in errs.items():
        assert e < BOUND, (key, e)
    assert set(launches) == {(True, 32)}, launches


# Tiles.wgmma: the products as warpgroup MMAs, each K tile's activations copied into a ring of 3 buffers in the A
# operand's K order (K of 5 tiles wraps it), blocks of 16 and 64 rows, both grids; every scheme the kernel runs (8 bits
# in one sum: the high nibble's codes as 2048 + 16 hi)
@pytest.mark.parametrize("bm, stream_k", [(16, True), (64, False)])
def test_gluon_kernel_warpgroup_mma_in_the_interpreter(interpreted_gluon, bm, stream_k, monkeypatch):
    launches = _spied(monkeypatch, lambda grid, kw: (kw.get("WGMMA", False), kw["BM"]))
    errs = gemm_errors(GLUON_SCHEMES, 48, 640, 256, 18, 2, 4, "cpu", seed=13,
                       **{**GLUON, "bm": bm, "bn": 64, "wgmma": True, "stream_k": stream_k})  # fmt: skip
    assert {key.split("/")[0] for key in errs} == set(GLUON_SCHEMES), errs.keys()
    for key, e in errs.items():
        assert e < BOUND, (key, e)
    assert set(launches) == {(True, bm)}, launches


def test_gluon_kernel_takes_32_row_blocks_only_staged(interpreted_gluon):
    with pytest.raises(ValueError, match="32 with staged activations"):
        gemm_errors(GLUON_SCHEMES[:2], 8, 256, 256, 4, 1, 2, "cpu", seed=3, **{**GLUON, "bm": 32})


@pytest.mark.parametrize("opts, message", [({"bm": 128}, "up to 64 with warpgroup MMAs"), ({"bn": 128}, "bn 64"),
                                           ({"place": True}, "codes in place"), ({"staged": True}, "staged")])
def test_gluon_kernel_warpgroup_mma_refuses_what_it_does_not_run(interpreted_gluon, opts, message):
    with pytest.raises(ValueError, match=message):
        gemm_errors(GLUON_SCHEMES[:2], 8, 256, 256, 4, 1, 2, "cpu", seed=3,
                    **{**GLUON, "bn": 64, "wgmma": True, **opts})  # fmt: skip


def test_gluon_kernel_reads_the_codes_tiled_as_row_by_row(interpreted_gluon):
    # arena.tile_words (TILED): every code width's planes at their tiled addresses, BN 128 (two MMA tiles of rows
    # a warp, so the rows of two 16-row groups), scales and zeros a pair of rows a load (tile_rows' pair order);
    # the same sums, bit for bit, as on codes row by row
    diff, orders = code_orders_agree(GLUON_SCHEMES, 12, 256, 256, 10, 2, "cpu", seed=7, bm=8, bn=128, **GLUON)
    assert orders == [(True, True), (False, False)] and diff == 0, (orders, diff)


def test_decode_tiles_from_the_environment_reach_the_decode_launches(interpreted_gluon, monkeypatch):
    # MXSERVE_DECODE_TILES: decode's tile fields for a server (a moe_layer.py variant, no code change);
    # down_tiles.FIELD the down GEMM's alone; a forward's own override wins field by field; a bad one is refused
    from mxkernels import moe

    launches = _spied(monkeypatch, lambda grid, kw: (kw["GATE_UP"], kw.get("PLACE", False), kw.get("EARLY", False)))
    monkeypatch.setenv("MXSERVE_DECODE_TILES", "early=true, place=true,down_tiles.early=false")
    errs = gemm_errors(["w2a16g128", "w4a16g128"], 8, 256, 256, 6, 1, 2, "cpu", seed=5, bm=8, **GLUON)
    assert errs and all(e < BOUND for e in errs.values()), errs
    assert set(launches) == {(True, True, True), (False, True, False)}, launches
    launches = _spied(monkeypatch, lambda grid, kw: (kw["GATE_UP"], kw.get("PLACE", False), kw.get("EARLY", False)),
                      run=False)  # fmt: skip
    _launched(["w2a16g128"], 8, 6, 1, 2, 5, bm=8, place=False, **GLUON)
    assert set(launches) == {(True, False, True), (False, False, False)}, launches
    # the down GEMM alone on 128-row tiles where a wide code set (3 and 8 bits) takes 64 (phase 73's server), the
    # shared experts' launches apart too
    tiles = _spied(monkeypatch, lambda grid, kw: (kw["GATE_UP"], kw["BN"]))
    monkeypatch.setattr(moe, "_runs_gluon", lambda dev: True)  # the launches as picked: the interpreter for the GPU
    monkeypatch.setenv("MXSERVE_DECODE_TILES", "down_tiles.bn=128")
    errs = gemm_errors(["w4a16g128", "w3a16g128", "w8a16", "w2a16g128"], 8, 256, 256, 16, 2, 4, "cpu", seed=2)
    assert errs and all(e < BOUND for e in errs.values()), errs
    assert tiles == [(True, 64), (False, 128)] * 2, tiles
    # ... and its K split in two (the layer variant "down split 2": at 8 requests the routed down GEMM took 0.87x
    # Marlin's time, forty-second session), gate/up's split as picked
    picked = _spied(monkeypatch, lambda grid, kw: (kw["GATE_UP"], grid[2] if len(grid) > 2 else 1), run=False)
    case = (["w4a16g128", "w3a16g128", "w8a16", "w2a16g128"], 8, 256, 256, 16, 2, 4, "cpu")
    monkeypatch.delenv("MXSERVE_DECODE_TILES")
    _launched(case[0], 8, 16, 2, 4, 2)
    splits = _spied(monkeypatch, lambda grid, kw: (kw["GATE_UP"], grid[2] if len(grid) > 2 else 1))
    monkeypatch.setenv("MXSERVE_DECODE_TILES", "down_tiles.split=2")
    errs = gemm_errors(*case, seed=2)
    assert errs and all(e < BOUND for e in errs.values()), errs
    assert splits == [(True, picked[0][1]), (False, 2)] * 2 and picked[1][1] != 2, (picked, splits)
    monkeypatch.setenv("MXSERVE_DECODE_TILES", "early=yes")
    with pytest.raises(ValueError, match="an integer or true/false"):
        moe.decode_tiles()


def test_gluon_kernel_grouped_dispatch_in_the_interpreter(interpreted_gluon):
    # one launch per group of codes (moe.code_groups): each launch's programs skip the other
    # groups' experts, and every output element is written (the outputs are NaN-poisoned)
    errs = gemm_errors(GLUON_SCHEMES, 24, 256, 256, 18, 1, 2, "cpu", seed=12, split=3, bm=8, dispatch="grouped",
                       **GLUON)  # fmt: skip
    assert {key.split("/")[0] for key in errs} == set(GLUON_SCHEMES), errs.keys()
    for key, e in errs.items():
        assert e < BOUND, (key, e)


def test_gluon_kernel_runs_a_layer_of_a_model_whose_code_set_it_lacks(interpreted_gluon):
    # the model's code set (every layer's kernel compiles it) has fp8 and w4a4, which the Gluon kernel
    # has no branch for; this layer's experts are all ones it runs
    names = ["w4a16g128", "w2a16g128"]
    errs = gemm_errors(names, 9, 256, 256, 6, 1, 2, "cpu", seed=2, extra_codes=(1 << 6) | (1 << 7), split=1,
                       **GLUON)  # fmt: skip
    assert {key.split("/")[0] for key in errs} == set(names), errs.keys()
    for key, e in errs.items():
        assert e < BOUND, (key, e)


@pytest.mark.parametrize("t, h, bm, bn, down", [
    (24, 256, 8, 64, None), (24, 256, 8, 128, None), (24, 256, 16, 64, None), (2, 128, 8, 64, None),
    (5, 384, 8, 128, None),
    (24, 256, 8, 64, {"per_sm": 6, "maxnreg": 255}),  # the down GEMM uncapped, up to 6 programs an SM
    (5, 384, 8, 128, {"per_sm": 2, "maxnreg": 96}),  # capped at 96, at most 2
])  # fmt: skip
def test_gluon_kernel_stream_k_in_the_interpreter(interpreted_gluon, t, h, bm, bn, down, monkeypatch):
    # Tiles.stream_k: one launch per GEMM on a grid of the programs the SMs hold (moe._stream_k_per_sm; the
    # interpreter's 4 SMs, STREAM_K_MOST each: 16), the K tiles of every (block, N tile) dealt out in equal
    # runs that start and end inside a tile's K; every run adds into zeroed fp32 sums. 2 tokens at K = 128:
    # fewer K tiles than programs, some programs get none. ``down``: the down GEMM's own most programs an SM and
    # register cap (down_tiles: per_sm, maxnreg; moe.NO_CAP none) on its grid and launch, gate/up's as they were
    from mxkernels import moe

    launches = _spied(monkeypatch, lambda grid, kw: (grid, kw.get("STREAM_K"), kw.get("maxnreg")))
    extra = {"down_tiles": down} if down else {}
    errs = gemm_errors(GLUON_SCHEMES, t, h, 256, 18, 1, 2, "cpu", seed=t, bm=bm, bn=bn, stream_k=True, **GLUON,
                       **extra)  # fmt: skip
    # the shared expert in the routed launches: one per GEMM
    sms = moe.multiprocessors(torch.device("cpu"))
    most = moe.STREAM_K_MOST
    dn_most, dn_cap = (most, 128) if not down else (down["per_sm"], None if down["maxnreg"] == moe.NO_CAP
                                                    else down["maxnreg"])  # fmt: skip
    assert launches == [((sms * most,), True, None), ((sms * dn_most,), True, dn_cap)]  # gate/up, then down
    assert t < 24 or {key.split("/")[0] for key in errs} == set(GLUON_SCHEMES), errs.keys()  # 2, 5: a few experts
    for key, e in errs.items():
        assert e < BOUND, (key, e)


def test_gluon_kernel_stream_k_by_rows_by_environment_and_single_dispatch_only(interpreted_gluon, monkeypatch):
    # MXSERVE_STREAM_K unset (auto): decode takes the stream-K grid below moe.STREAM_K_ROWS rows per expert,
    # from one row on (the CUDA-core products before), and the unbalanced grid from there on or under the
    # grouped dispatch; =0 never (one row: the CUDA-core products again); =1 always, and the grouped
    # dispatch then refuses; any other value is an error
    from mxkernels import moe
    from mxkernels.arena import build_arena

    taken, compute = [], []
    gemm = moe._gemm_gluon  # the interpreted kernel runs where a case checks the arithmetic too; else only noted
    monkeypatch.setattr(moe, "_gemm_gluon", lambda *a: taken.append(a[11].stream_k) or (gemm(*a) if compute else None))
    monkeypatch.setattr(moe, "_runs_gluon", lambda dev: True)  # the interpreter stands in for the GPU
    monkeypatch.delenv("MXSERVE_STREAM_K", raising=False)
    both = ["w4a16g128", "w2a16g128"]

    def launches(t, names=both, arithmetic=False, **kw):
        taken.clear()
        compute[:] = [True] if arithmetic else []
        if arithmetic:
            errs = gemm_errors(names, t, 256, 256, 18, 1, 2, "cpu", seed=4, **kw)
            assert max(errs.values()) < BOUND
        else:
            gen = torch.Generator().manual_seed(4)
            experts = make_experts(names, 256, 256, 18, 1, "rtn", gen, "cpu")
            gu, dn = (build_arena([getattr(e, m) for e in experts]) for m in ("gate_up", "down"))
            moe.moe_gemms(torch.randn(t, 256, generator=gen).bfloat16(), *route(t, 18, 2, gen), gu, dn, 18, **kw)
        return list(taken)

    assert launches(1, arithmetic=True) == [True, True]  # 3 rows (top-2 and the shared expert) over 3 experts
    assert launches(16) == [True, True]  # 48 rows over 16 experts: 3 rows per expert
    assert launches(40) == [False] * 4  # 6 rows per expert: the shared expert launches apart
    # where more than moe.STREAM_K_COSTLY of the weights are in costly codes (here half are 3-bit), only below
    # moe.STREAM_K_ROWS_COSTLY rows; a few costly blocks (7% of the weights) keep the bound, 16% do not
    costly = ["w4a16g128", "w3a16g128"]
    assert launches(1, costly) == [True, True] and launches(16, costly) == [False] * 4
    assert launches(16, ["w4a16g128"] * 9 + ["w3a16g128"]) == [True, True]
    assert launches(16, ["w4a16g128"] * 5 + ["w3a16g128"]) == [False] * 4
    grouped = launches(16, ["w4a16g128", "w8a16"], dispatch="grouped")  # a launch per code and set of experts
    assert len(grouped) == 8 and not any(grouped)
    monkeypatch.setenv("MXSERVE_STREAM_K", "0")
    assert launches(1) == [] and launches(16) == [False] * 4
    monkeypatch.setenv("MXSERVE_STREAM_K", "1")
    assert launches(40, arithmetic=True) == [True, True]  # the shared expert in the launch
    with pytest.raises(ValueError, match="single dispatch"):
        gemm_errors(["w4a16g128", "w8a16"], 24, 256, 256, 18, 1, 2, "cpu", seed=4, dispatch="grouped")
    monkeypatch.setenv("MXSERVE_STREAM_K", "yes")
    with pytest.raises(ValueError, match="MXSERVE_STREAM_K='yes'"):
        gemm_errors(both, 24, 256, 256, 18, 1, 2, "cpu", seed=4)


def test_gluon_decode_stages_activations_for_full_blocks_of_large_layers(interpreted_gluon, monkeypatch):
    # Tiles.staged by default from moe.STAGED_ROWS rows per expert where the active experts' gate/up weights
    # come to moe.STAGED_WEIGHTS_PER_SM an SM (the interpreter's GPU: 4 SMs), both GEMMs alike, on either grid;
    # MXSERVE_DECODE_TILES' staged=false keeps it off; prefill never takes it
    from mxkernels import moe
    from mxkernels.arena import build_arena

    taken = []
    monkeypatch.setattr(moe, "_gemm_gluon", lambda *a: taken.append(a[11].staged))
    monkeypatch.setattr(moe, "_gemm_triton", lambda *a: taken.append(None))
    monkeypatch.setattr(moe, "_runs_gluon", lambda dev: True)
    monkeypatch.delenv("MXSERVE_DECODE_TILES", raising=False)
    gen = torch.Generator().manual_seed(4)
    experts = make_experts(["w4a16g128", "w2a16g128"], 256, 256, 18, 1, "rtn", gen, "cpu")
    gu, dn = (build_arena([getattr(e, m) for e in experts]) for m in ("gate_up", "down"))

    def launches(t):
        taken.clear()
        moe.moe_gemms(torch.randn(t, 256, generator=gen).bfloat16(), *route(t, 18, 2, gen), gu, dn, 18)
        return list(taken)

    # gate/up weights 512 x 256 an expert; expected active (moe.expected_active) at 16 tokens 16.1 (527888 an SM, 3
    # rows per expert), at 40 tokens 18.8 (616499 an SM, 6.3 rows)
    monkeypatch.setattr(moe, "STAGED_WEIGHTS_PER_SM", 500_000)
    assert launches(16) == [False, False]  # stream-K, below STAGED_ROWS
    assert launches(40) == [True] * 4  # the unbalanced grid, the shared expert apart
    monkeypatch.setattr(moe, "STAGED_ROWS", 2.0)
    assert launches(16) == [True, True]  # stream-K staged
    assert launches(1) == [False, False]  # 3 rows over 2.9 experts: 96484 weights an SM
    monkeypatch.setattr(moe, "STAGED_WEIGHTS_PER_SM", 620_000)
    assert launches(40) == [False] * 4
    monkeypatch.setattr(moe, "STAGED_WEIGHTS_PER_SM", 500_000)
    monkeypatch.setenv("MXSERVE_DECODE_TILES", "staged=false")
    assert launches(40) == [False] * 4
    monkeypatch.delenv("MXSERVE_DECODE_TILES")
    assert launches(400) == [None, None]  # 60 rows per expert: prefill, on the Triton kernel


def test_costly_share_weighs_each_arena_by_its_size_and_follows_a_slab_swap():
    # the share of a layer's weights in costly codes (3 and 8 bits, bf16) that picks the stream-K bound, read
    # from counts kept on the host (no device sync at a launch), which a swap into a slab carries over
    from kernel_cases import make_experts

    from mxkernels.arena import build_arena, build_slab, copy_slab, kernel_code, slab_capacity
    from mxkernels.moe import costly_share
    from mxserve.schemes import get_scheme

    gen = torch.Generator().manual_seed(0)
    # gate/up (256 x 128): w4, w2, w3, w4; down (128 x 128): w3, w4, w2, w3
    a = make_experts(["w4a16g128", "w2a16g128", "w3a16g128"], 128, 128, 3, 1, "rtn", gen, "cpu")
    gu, dn = build_arena([e.gate_up for e in a]), build_arena([e.down for e in a])
    assert costly_share(gu, dn) == pytest.approx((1 * 2 + 2 * 1) / (4 * 2 + 4 * 1))
    assert costly_share(gu) == pytest.approx(0.25) and costly_share(gu.to("cpu")) == costly_share(gu)
    b = make_experts(["w8a16", "w3a16g128"], 128, 128, 3, 1, "rtn", gen, "cpu")
    codes = sum(1 << kernel_code(get_scheme(s)) for s in ("w8a16", "w4a16g128", "w3a16g128", "w2a16g128"))
    cap = slab_capacity(8.5, [ql for e in b for ql in e.linears()])

    def slab(experts):
        return build_slab([e.gate_up for e in experts], [e.down for e in experts], cap, codes, None, 128)

    served = slab(a)
    assert costly_share(*served) == costly_share(gu, dn)
    copy_slab(served, slab(b))
    assert costly_share(*served) == 1.0


def test_gluon_kernel_stream_k_whole_layer_in_the_interpreter(interpreted_gluon, monkeypatch):
    # the whole layer through mx_moe_forward with MXSERVE_STREAM_K=1: shared experts in the launch, the SiLU
    # after the fp32 gate/up sums, the top-k sum and the shared experts' sigmoid scale read from fp32 outputs
    from kernel_cases import make_experts, route

    from mxkernels import moe
    from mxkernels.arena import build_arena
    from mxkernels.reference import moe_reference

    monkeypatch.setattr(moe, "_runs_gluon", lambda dev: True)  # the interpreter stands in for the GPU
    monkeypatch.setenv("MXSERVE_STREAM_K", "1")
    gen = torch.Generator().manual_seed(0)
    experts = make_experts(["w4a16g128", "w2a16g128", "bf16", "w8a16"], 256, 256, 12, 2, "rtn", gen, "cpu")
    gu, dn = build_arena([e.gate_up for e in experts]), build_arena([e.down for e in experts])
    x = torch.randn(20, 256, generator=gen).bfloat16()
    ids, w = route(20, 12, 2, gen)
    scale = torch.sigmoid(torch.randn(20, 1, generator=gen))
    taken = []
    monkeypatch.setattr(moe, "_gemm_gluon", lambda *a, f=moe._gemm_gluon: taken.append(a[11].stream_k) or f(*a))
    out = moe.mx_moe_forward(x, ids, w, gu, dn, 12, scale).float()
    dense = [(e.gate_up.dequantize(), e.down.dequantize()) for e in experts]
    ref = moe_reference(x.float(), ids, w, [e.linears() for e in experts], dense, 12, scale)
    assert taken == [True, True]
    assert ((out - ref).norm() / ref.norm()).item() < BOUND


@pytest.mark.parametrize("padded", [False, True])
def test_one_token_takes_the_top_k_rows_straight(interpreted_gluon, monkeypatch, padded):
    # MXSERVE_TOPK_ROWS (on unless 0): at one token the stream-K launches read each slot's expert from the top-k (a
    # block a row: top-2 then 4 shared experts), with no alignment launch; the layer must equal the aligned one's and
    # the reference. ``padded``: SGLang's padded token, top-k ids -1, routes nowhere (its routed slots weigh 0)
    from kernel_cases import make_experts, route

    from mxkernels import moe
    from mxkernels.arena import build_arena
    from mxkernels.reference import moe_reference

    monkeypatch.setattr(moe, "_runs_gluon", lambda dev: True)  # the interpreter stands in for the GPU
    monkeypatch.delenv("MXSERVE_STREAM_K", raising=False)  # one token: stream-K by default
    gen = torch.Generator().manual_seed(3)
    experts = make_experts(["w4a16g128", "w3a16g128", "bf16", "w2a16g128", "w8a16"], 256, 256, 14, 2, "rtn", gen,
                           "cpu")  # fmt: skip
    gu, dn = build_arena([e.gate_up for e in experts]), build_arena([e.down for e in experts])
    x = torch.randn(1, 256, generator=gen).bfloat16()
    ids, w = route(1, 12, 2, gen, skew=False)
    if padded:
        ids = torch.full_like(ids, -1)
    scale = torch.sigmoid(torch.randn(1, 1, generator=gen))
    aligned = []
    monkeypatch.setattr(moe, "route", lambda *a, f=moe.route, **kw: aligned.append(1) or f(*a, **kw))
    outs = {}
    for set_to in ("0", "1", None):  # unset: on, the default since the forty-second session
        if set_to is None:
            monkeypatch.delenv("MXSERVE_TOPK_ROWS", raising=False)
        else:
            monkeypatch.setenv("MXSERVE_TOPK_ROWS", set_to)
        on = set_to or "1"
        # "1" and unset make the same launches: those of "1" recorded only (the interpreter's time)
        launches = _spied(monkeypatch, lambda grid, kw: (kw.get("STREAM_K"), kw.get("TOPK", 0), kw.get("N_ROUTED", 0)),
                          run=set_to != "1")  # fmt: skip
        aligned.clear()
        out = moe.mx_moe_forward(x, ids, w, gu, dn, 12, scale).float()
        if set_to != "1":
            outs[on] = out
        assert aligned == ([] if on == "1" else [1])
        assert launches == [(True, 2 if on == "1" else 0, 12 if on == "1" else 0)] * 2  # gate/up, down
    dense = [(e.gate_up.dequantize(), e.down.dequantize()) for e in experts]
    ref = moe_reference(x.float(), ids.clamp(min=0), w * (ids >= 0), [e.linears() for e in experts], dense, 12,
                        scale)  # fmt: skip
    for out in outs.values():
        assert ((out - ref).norm() / ref.norm()).item() < BOUND
    # stream-K adds its sums in any order: the two agree to rounding, not bit for bit
    assert ((outs["1"] - outs["0"]).norm() / outs["0"].norm()).item() < 1e-2
    if padded:
        return
    # an override asks for it per forward, whatever the environment says (its launches recorded only)
    _spied(monkeypatch, lambda grid, kw: None, run=False)
    aligned.clear()
    moe.mx_moe_forward(x, ids, w, gu, dn, 12, scale, topk_rows=True)
    assert aligned == []
    _spied(monkeypatch, lambda grid, kw: None)
    # the sums zeroed as the MoE block starts (start_zero_fill, the SGLang plugin's hook): the forward takes that
    # start and zeroes nothing again; none for other token counts or without the top-k's rows
    fills = []
    monkeypatch.setattr(moe, "_zero_and", lambda sums, *a, f=moe._zero_and: fills.append(sums is not None) or
                        f(sums, *a))  # fmt: skip
    started = moe.start_zero_fill(x, 2, gu, dn, 12)
    assert started is not None and started.zeroed and fills == [True]
    out = moe.mx_moe_forward(x, ids, w, gu, dn, 12, scale, started=started).float()
    assert started.taken and fills == [True, False]
    assert ((out - ref).norm() / ref.norm()).item() < BOUND
    assert moe.start_zero_fill(torch.cat([x, x]), 2, gu, dn, 12) is None
    # the layer benchmark's variant starts it so too (its "zero_early" mode), the forward asking for the rows itself
    from conftest import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import moe_layer

    monkeypatch.setenv("MXSERVE_TOPK_ROWS", "0")
    assert moe.start_zero_fill(x, 2, gu, dn, 12) is None
    _spied(monkeypatch, lambda grid, kw: None, run=False)
    mode = moe_layer.DECODE_VARIANTS["stream-K, top-k rows"]
    tiles = {f: v for f, v in mode.items() if f not in moe_layer.MODES}
    started = moe_layer.early_start(x, 2, gu, dn, 12, tiles, mode)["started"]
    moe.mx_moe_forward(x, ids, w, gu, dn, 12, scale, started=started, **tiles)
    assert started.zeroed and started.taken


# strict: a padding slot reads token 0's row (no mask), which the shared experts' down launch (in line, before the
# routed launches) reads before the routed gate/up writes it. The store drops those columns; the buffers are poisoned
# (NaN, which numpy's matmul passes silently) so that an unwritten row's bits cannot overflow in the interpreter
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("t, n_shared, tiles", [(3, 2, {}), (20, 0, {}), (9, 2, {"staged": True}),
                                                (20, 0, {"bm": 16})])  # fmt: skip
def test_the_grid_takes_the_routed_slots_straight_from_the_top_k(interpreted_gluon, monkeypatch, t, n_shared,
                                                                 tiles):  # fmt: skip
    # MXSERVE_TOPK_GRID=1: on the grid (not stream-K) the launches have a program row per routed slot, and each slot
    # that leads a block of its expert's slots finds them in the top-k; no alignment. The layer must equal the aligned
    # one bit for bit (the same blocks of 8, rows in another order), every element written, with a padded token (-1)
    # and, at 20 tokens, one expert taking 18 slots (three blocks of 8, two of 16); the shared experts (if any) in
    # launches of their own; also with the activations staged, and in 16-row blocks
    from kernel_cases import make_experts, route

    from mxkernels import moe
    from mxkernels.arena import build_arena

    monkeypatch.setattr(moe, "_runs_gluon", lambda dev: True)
    monkeypatch.setenv("MXSERVE_STREAM_K", "0")
    gen = torch.Generator().manual_seed(t)
    experts = make_experts(["w4a16g128", "w3a16g128", "bf16", "w2a16g128", "w8a16"], 256, 256, 12, n_shared, "rtn",
                           gen, "cpu")  # fmt: skip
    gu, dn = build_arena([e.gate_up for e in experts]), build_arena([e.down for e in experts])
    x = torch.randn(t, 256, generator=gen).bfloat16()
    ids, w = route(t, 12, 2, gen)
    ids[-1] = -1  # SGLang's padded token: routes nowhere
    if t == 20:
        ids[:18, 0] = 5
        ids[:18, 1] = torch.where(ids[:18, 1] == 5, 6, ids[:18, 1])
    aligned = []
    monkeypatch.setattr(moe, "route", lambda *a, f=moe.route, **kw: aligned.append(1) or f(*a, **kw))
    launches = _spied(monkeypatch, lambda grid, kw: (grid[0], kw.get("GRID_TOPK", 0), kw.get("SLOTS", 0),
                                                     kw.get("SP", 0), kw.get("STREAM_K", False), kw["BM"],
                                                     kw.get("STAGED", False)))  # fmt: skip
    got = {}
    for on in ("0", "1"):
        if not tiles:  # the switch; with tiles an override, which asks for it itself
            monkeypatch.setenv("MXSERVE_TOPK_GRID", on)
        aligned.clear(), launches.clear()
        got[on] = moe.moe_gemms(x, ids, w, gu, dn, 12, poison=True, **({"topk_grid": on == "1"} if tiles else {}),
                                **tiles)  # fmt: skip
        assert aligned == ([] if on == "1" else [1])
        routed = [v for v in launches if v[1]]
        want = (t * 2, 2, 2 + n_shared, 32 if t < 16 else 64, False, tiles.get("bm", 8), "staged" in tiles)
        assert routed == ([want] * 2 if on == "1" else [])
    for a, b in zip(got["1"], got["0"]):
        assert not a.isnan().any()
        assert torch.equal(a, b)
    if t != 3:
        return
    # an override asks for it per forward
    aligned.clear()
    moe.moe_gemms(x, ids, w, gu, dn, 12, poison=True, topk_grid=False)
    assert aligned == [1]


@pytest.mark.parametrize("stream_k", ["0", "1"])
def test_the_top_k_slots_skip_the_slots_another_rank_holds(interpreted_gluon, monkeypatch, stream_k):
    # under expert parallelism a rank's top-k marks the slots routed to other ranks' experts -1, some of a token's
    # slots and not others (SGLang's dispatcher); the routed slots straight from the top-k (MXSERVE_TOPK_GRID, the
    # default) must skip those and equal the aligned launches: bit for bit on the grid, to rounding on stream-K
    from kernel_cases import make_experts, route

    from mxkernels import moe
    from mxkernels.arena import build_arena

    monkeypatch.setattr(moe, "_runs_gluon", lambda dev: True)
    monkeypatch.setenv("MXSERVE_STREAM_K", stream_k)
    gen = torch.Generator().manual_seed(5)
    experts = make_experts(["w4a16g128", "w3a16g128", "w2a16g128"], 256, 256, 12, 0, "rtn", gen, "cpu")
    gu, dn = build_arena([e.gate_up for e in experts]), build_arena([e.down for e in experts])
    x = torch.randn(7, 256, generator=gen).bfloat16()
    ids, w = route(7, 12, 2, gen)
    ids[torch.rand(ids.shape, generator=gen) < 0.4] = -1
    assert ((ids < 0).sum(1) == 1).any()  # some tokens with one slot here and one on another rank
    aligned = []
    monkeypatch.setattr(moe, "route", lambda *a, f=moe.route, **kw: aligned.append(1) or f(*a, **kw))
    got = {}
    for on in ("0", "1"):
        monkeypatch.setenv("MXSERVE_TOPK_GRID", on)
        aligned.clear()
        got[on] = moe.moe_gemms(x, ids, w, gu, dn, 12, poison=True)
        assert aligned == ([] if on == "1" else [1])
    for a, b in zip(got["1"], got["0"]):
        assert not a.isnan().any()
        if stream_k == "0":
            assert torch.equal(a, b)
        else:
            assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2


@pytest.mark.parametrize("t, n_shared", [(20, 2), (6, 0)])
def test_stream_k_takes_the_routed_slots_straight_from_the_top_k(interpreted_gluon, monkeypatch, t, n_shared):
    # MXSERVE_TOPK_GRID=1 on stream-K beyond one token: every program finds the blocks that routed slots lead
    # (_topk_leaders) and deals out their K tiles, then the shared experts' blocks of tokens (2 at 20 tokens, 8 rows
    # each), in one launch per GEMM and no alignment. Stream-K adds its sums in any order, so the layer equals the
    # aligned one to rounding; with a padded token (-1) and, at 20 tokens, one expert taking 18 slots (three blocks)
    from kernel_cases import make_experts, route

    from mxkernels import moe
    from mxkernels.arena import build_arena

    monkeypatch.setattr(moe, "_runs_gluon", lambda dev: True)
    monkeypatch.setenv("MXSERVE_STREAM_K", "1")
    gen = torch.Generator().manual_seed(t + 1)
    experts = make_experts(["w4a16g128", "w3a16g128", "bf16", "w2a16g128", "w8a16"], 256, 256, 12, n_shared, "rtn",
                           gen, "cpu")  # fmt: skip
    gu, dn = build_arena([e.gate_up for e in experts]), build_arena([e.down for e in experts])
    x = torch.randn(t, 256, generator=gen).bfloat16()
    ids, w = route(t, 12, 2, gen)
    ids[-1] = -1
    if t == 20:
        ids[:18, 0] = 5
        ids[:18, 1] = torch.where(ids[:18, 1] == 5, 6, ids[:18, 1])
    aligned = []
    monkeypatch.setattr(moe, "route", lambda *a, f=moe.route, **kw: aligned.append(1) or f(*a, **kw))
    launches = _spied(monkeypatch, lambda grid, kw: (kw.get("GRID_TOPK", 0), kw.get("SLOTS", 0), kw.get("SP", 0),
                                                     kw.get("N_ROUTED", 0), kw.get("STREAM_K", False)))  # fmt: skip
    got = {}
    for on in ("0", "1"):
        monkeypatch.setenv("MXSERVE_TOPK_GRID", on)
        aligned.clear(), launches.clear()
        got[on] = moe.moe_gemms(x, ids, w, gu, dn, 12, poison=True)
        assert aligned == ([] if on == "1" else [1])
        want = (2, 2 + n_shared, 64 if t == 20 else 32, 12, True) if on == "1" else (0, 0, 0, 0, True)
        assert launches == [want] * 2
    for a, b in zip(got["1"], got["0"]):
        assert not a.isnan().any()
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
    if t != 6:
        return
    # the sums zeroed as the MoE block starts (start_zero_fill, the SGLang plugin's hook), taken by the forward; none
    # without MXSERVE_TOPK_GRID beyond one token
    started = moe.start_zero_fill(x, 2, gu, dn, 12)
    assert started is not None and started.zeroed
    inter, out = moe.moe_gemms(x, ids, w, gu, dn, 12, started=started)
    assert started.taken and torch.equal(out, got["1"][1])
    monkeypatch.setenv("MXSERVE_TOPK_GRID", "0")
    assert moe.start_zero_fill(x, 2, gu, dn, 12) is None


@pytest.mark.parametrize("tiles, shared_block", [({}, 16), ({"shared_own": False}, 8), ({"shared_bm": 32}, 32)])
def test_the_shared_experts_launches_take_a_block_of_their_own_rows(interpreted_gluon, monkeypatch, tiles,
                                                                   shared_block):  # fmt: skip
    # 16 tokens off stream-K: the routed experts get about 6 rows each, so 8-row blocks; the shared experts every
    # token's 16, so their launches apart take 16-row blocks (Tiles.shared_own; false: the layer's 8; or forced: 32,
    # staged) and compute what the one launch of both computes, every element written: in the layer's block bit for
    # bit, in another within 1% (the interpreter's products of another block shape round at another step)
    from kernel_cases import shared_apart_case

    from mxkernels import moe

    monkeypatch.setattr(moe, "_runs_gluon", lambda dev: True)
    monkeypatch.setenv("MXSERVE_STREAM_K", "0")
    blocks = []
    monkeypatch.setattr(moe, "_gemm_gluon", lambda *a, f=moe._gemm_gluon: blocks.append((a[11].bm, a[11].staged))
                        or f(*a))  # fmt: skip
    shared_apart_case("cpu", 16, close=shared_block != 8, **tiles)
    # the shared experts' gate/up and down, the routed experts', then the one launch per GEMM of both
    assert blocks == [(shared_block, shared_block == 32)] * 2 + [(8, False)] * 4


@pytest.mark.parametrize("t", [1, 5, 16])
def test_gluon_kernel_stream_k_with_the_shared_experts_started_early(interpreted_gluon, monkeypatch, t):
    # start_shared (MXSERVE_SHARED_EARLY's hook) on the stream-K grid: the shared experts get launches of their own
    # (the sums zeroed first; at 16 tokens in 16-row blocks, the routed experts' in 8), then the forward's routed
    # launches add into the same sums; together they compute what one launch of both computes, every element written
    # (the fp32 sums in another order: within 1%)
    from kernel_cases import shared_apart_case

    from mxkernels import moe

    monkeypatch.setattr(moe, "_runs_gluon", lambda dev: True)  # the interpreter stands in for the GPU
    monkeypatch.setenv("MXSERVE_STREAM_K", "1")
    taken = []
    monkeypatch.setattr(moe, "_gemm_gluon", lambda *a, f=moe._gemm_gluon: taken.append((a[11].stream_k, a[11].bm))
                        or f(*a))  # fmt: skip
    shared_apart_case("cpu", t, early=True, close=True)
    # the shared experts' gate/up and down, the routed experts', then one launch per GEMM for the forward that was
    # not started early
    assert taken == [(True, 16 if t == 16 else 8)] * 2 + [(True, 8)] * 4


@pytest.mark.parametrize("grid", [{"split": 2}, {"stream_k": True}])
def test_gluon_kernel_arithmetic_rotated_inputs(interpreted_gluon, grid):
    # gptq-had (mxserve's default method): the quantized experts read the Hadamard-rotated copy of their input,
    # bf16 ones the plain one; K split, and on the stream-K grid (decode's default at few rows per expert)
    errs = gemm_errors(["bf16", "w4a16g128", "w2a16g128"], 9, 128, 128, 6, 0, 2, "cpu", seed=5, method="gptq-had",
                       **grid, **GLUON)  # fmt: skip
    assert {key.split("/")[0] for key in errs} == {"bf16", "w4a16g128", "w2a16g128"}, errs.keys()
    for key, e in errs.items():
        assert e < BOUND, (key, e)


def test_gluon_kernel_is_refused_where_it_cannot_run(interpreted_gluon, monkeypatch):
    from mxkernels import moe

    # fp8 and int8-activation experts have no Gluon path; groups of 32 would put 4 groups in one K tile;
    # K = 160 is not a whole number of tiles
    for names, h in ((["w4a16g128", "w8a8fp8"], 128), (["w4a4"], 128), (["w4a16g32"], 128), (["bf16"], 160)):
        with pytest.raises(ValueError, match="weight-only experts with groups of whole 128s"):
            gemm_errors(names, 4, h, 128, 4, 0, 2, "cpu", seed=0, split=1, **GLUON)
    monkeypatch.undo()  # the real kernel again: Triton's interpreter does not run Gluon
    assert moe.INTERPRET
    with pytest.raises(ValueError, match="interpreter"):
        gemm_errors(["w4a16g128"], 4, 128, 128, 4, 0, 2, "cpu", seed=0, split=1, **GLUON)


def test_decode_takes_the_gluon_kernel_where_the_layers_schemes_allow(monkeypatch):
    from types import SimpleNamespace

    import torch

    from mxkernels import moe

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not moe._runs_gluon(cpu)
    monkeypatch.setattr(moe, "_runs_gluon", lambda dev: dev.type == "cuda")  # as on an sm_80+ GPU

    def arena(mask, k, group=128, model=0):
        return SimpleNamespace(kernel_mask=mask | model, codes_mask=mask, k=k, min_group=group)

    w4, w4_down = arena(0b10000, 2048), arena(0b10101, 1408)
    assert moe._gluon_decode(cuda, 3.0, w4, w4_down, {})  # Qwen1.5 at 16 tokens: about 3 rows per expert
    assert moe._gluon_decode(cuda, 1.39, w4, w4_down, {})  # and at 2 tokens
    # the model's code set (fp8 elsewhere) is not the layer's: its experts decide
    assert moe._gluon_decode(cuda, 3.0, arena(0b10000, 2048, model=1 << 6), arena(0b10100, 1408, model=1 << 6), {})
    assert not moe._gluon_decode(cpu, 3.0, w4, w4_down, {})  # Triton's interpreter does not run Gluon
    assert not moe._gluon_decode(cuda, 1.0, w4, w4_down, {})  # one row: CUDA-core products
    assert moe._gluon_decode(cuda, 1.0, w4, w4_down, {}, stream_k=True)  # unless on the stream-K grid
    assert not moe._gluon_decode(cuda, 40.0, w4, w4_down, {})  # prefill
    # 3- and 8-bit experts too; both GEMMs or neither (they share the block): not with groups of 32
    # or an fp8 expert
    assert moe._gluon_decode(cuda, 3.0, w4, arena(0b11000, 1408), {})
    assert moe._gluon_decode(cuda, 3.0, w4, arena(0b110000, 1408), {})
    assert not moe._gluon_decode(cuda, 3.0, arena(0b10000, 2048, 32), w4_down, {})
    assert not moe._gluon_decode(cuda, 3.0, w4, arena(0b10000 | 1 << 6, 1408), {})
    assert not moe._gluon_decode(cuda, 3.0, arena(0b1, 2048), arena(0b1, 1408), {})  # all bf16: SGLang's rounding
    for forced in ({"fma": True}, {"swap": False}, {"gluon": False}, {"gluon": True}):
        assert not moe._gluon_decode(cuda, 3.0, w4, w4_down, forced), forced
    monkeypatch.setattr(moe, "GLUON_DECODE", False)
    assert not moe._gluon_decode(cuda, 3.0, w4, w4_down, {})
    # 8 rows per block up to 8 rows per expert, and no more splits than 128-deep K tiles
    decode = moe.pick_tiles(128, 44, 128, 1408, 2048, 0b10000, 132, fma=False)
    assert moe._as_gluon(decode, 2.9, 2048, 0b10000, {}).bm == 8
    assert moe._as_gluon(decode, 13.0, 2048, 0b10000, {}).bm == 16
    assert moe._as_gluon(decode, 2.9, 2048, 0b10000, {"bm": 16}).bm == 16
    many = moe.pick_tiles(8, 2, 128, 1408, 2048, 0b10000, 132, fma=False)
    assert many.split == 8 and moe._as_gluon(many, 4.0, 256, 0b10000, {}).split == 2
    # two MMA tiles of rows per warp where the model's code set is within 1, 2 and 4 bits
    assert moe.gluon_codes(arena(0b10100, 2048, model=1 << 6)) == 0b10100  # fp8 elsewhere: not compiled here
    assert moe._as_gluon(decode, 2.9, 2048, 0b10110, {}).bn == 128
    for wide in (0b1, 0b1000, 0b100000):  # bf16, 3 or 8 bits in the code set: one
        assert moe._as_gluon(decode, 2.9, 2048, 0b10100 | wide, {}).bn == 64
    assert moe._as_gluon(decode, 2.9, 2048, 0b10100, {"bn": 64}).bn == 64
    # 8 rows per block up to 12 rows per expert for narrow code sets, 8 for the others
    assert moe._as_gluon(decode, 8.5, 2048, 0b10100, {}).bm == 8
    assert moe._as_gluon(decode, 8.5, 2048, 0b11100, {}).bm == 16
    assert moe._as_gluon(decode, 16.0, 2048, 0b10100, {}).bm == 16


def test_the_gluon_kernels_group_index_without_a_division_is_exact():
    # moe_gemm_gluon._scales: a K tile's group as int((tile + 1/2) * (1 / tiles per group)) in fp32, for every
    # tile of K up to 65536 (512 tiles) and every group of whole tiles, with the reciprocal up to 4 ulps off
    # (an approximate division would be within 2)
    tiles = torch.arange(512, dtype=torch.int32)
    for tpg in range(1, 513):
        inv = torch.tensor(1.0 / tpg, dtype=torch.float32)
        for ulps in (-4, 0, 4):
            r = torch.nextafter(inv, torch.tensor(ulps * float("inf"))) if ulps else inv
            for _ in range(abs(ulps) - 1):
                r = torch.nextafter(r, torch.tensor(ulps * float("inf")))
            got = ((tiles.float() + 0.5) * r).to(torch.int32)
            assert torch.equal(got, tiles // tpg), (tpg, ulps)


def test_code_splits_follow_the_bits_of_the_launchs_codes():
    from mxkernels.moe import code_splits

    def per_code(packed):
        return {c: packed >> (4 * c) & 15 for c in range(6) if packed >> (4 * c) & 15}

    # the served tiers' codes (w8, w4, w3, w2) split 4 ways at most: w8 4, w4 2, w3 2 (1.5 rounds to 2), w2 1
    assert per_code(code_splits(0b111100, 4)) == {5: 4, 4: 2, 3: 2, 2: 1}
    assert per_code(code_splits(0b000111, 3)) == {0: 3, 1: 1, 2: 1}  # bf16 the widest
    assert per_code(code_splits(0b000100, 2)) == {2: 2}  # one code: the launch's split
