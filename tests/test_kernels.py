"""The mixed-precision grouped GEMM against the torch reference, under Triton's CPU interpreter.

Tolerances: the kernel feeds bf16 activations and stores the intermediate and
outputs in bf16, so the schemes land at a few 1e-3 (METHOD.md's bf16 range).
"""

import json
import os

import pytest
import torch
from kernel_cases import LAYOUTS, bf16_layer_agreement, check_padded_slots_and_shared_gate, gemm_errors, layer_error

ALL = ["bf16", "w4a16g128", "w3a16g128", "w2a16g128", "w1a16g128", "w8a16", "w8a8fp8", "w4a4", "w8a8"]
SMALL_GROUPS = ["bf16", "w4a16g32", "w3a16g32", "w2a16g32", "w8a16", "w8a8fp8", "w4a4"]


BOUND = 1e-2


@pytest.mark.parametrize(
    "t,h,i,n_exp,n_shared,k",
    [
        (7, 128, 128, 9, 1, 2),  # every scheme of the registry mixed in one launch
        (1, 128, 128, 9, 0, 2),  # a single token
    ],
)
def test_gemms_all_schemes_mixed(t, h, i, n_exp, n_shared, k):
    errs = gemm_errors(ALL, t, h, i, n_exp, n_shared, k, "cpu", seed=t)
    assert errs, "no expert received a token"
    for key, e in errs.items():
        assert e < BOUND, (key, e)


# fma-split (CUDA-core products, split, no prefetch; 47 s here) is a benchmark variant, not a pick: the
# GPU tests run it, and its two halves are here as fma (no prefetch) and fma-prefetch (split)
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "fma-split"])
def test_gemms_every_layout_every_scheme(layout):
    # 18 routed experts, of which the skewed routing feeds the first 9: every scheme gets rows. The
    # CUDA-core layouts run a program per row: 12 tokens keep the interpreter's time (24 took twice it)
    t = 12 if LAYOUTS[layout].get("fma") else 24
    errs = gemm_errors(ALL, t, 128, 128, 18, 1, 2, "cpu", seed=11, **LAYOUTS[layout])
    assert {key.split("/")[0] for key in errs} == set(ALL), errs.keys()
    for key, e in errs.items():
        assert e < BOUND, (key, e)


def test_decode_launch_splits_k_when_few_experts_are_active():
    from mxkernels.moe import pick_tiles

    one_token = pick_tiles(8, 8, 128, 1408, 2048, 0b10000, 132)  # an H100
    assert one_token.swap and one_token.scale_after and one_token.split > 1
    assert one_token.fma and one_token.bm == 1  # one row per expert: CUDA-core products
    sixteen = pick_tiles(128, 44, 128, 1408, 2048, 0b10000, 132)  # Qwen1.5 at 16 tokens: about 3 rows
    assert sixteen.swap and not sixteen.fma and sixteen.bm == 16
    assert not pick_tiles(8, 8, 128, 1408, 2048, 0b10000, 132, swap=False).fma  # the prefill layout
    assert pick_tiles(8, 8, 128, 1408, 2048, 0b1, 132).split == 1  # all-bf16 keeps SGLang's rounding
    prefill = pick_tiles(4096, 60, 128, 1408, 2048, 0b10000, 132)
    assert not prefill.swap and prefill.split == 1


def test_decode_split_by_waves_fits_the_programs_to_the_multiprocessors(monkeypatch):
    from mxkernels.moe import RESIDENT, _split_fit, pick_tiles, wave_split

    # Qwen1.5's down GEMM at 1 token (4 routed + 4 shared rows, 32 column tiles, 11 K tiles) on an H100:
    # split 3 ("fill") makes 768 programs, 1.45 waves of 4 per SM, 8 tiles in sequence; split 2 makes 512,
    # one wave, 6 tiles
    fill = pick_tiles(8, 8, 128, 2048, 1408, 0b111110, 132)
    waves = pick_tiles(8, 8, 128, 2048, 1408, 0b111110, 132, "waves")
    assert (fill.split, waves.split) == (3, 2) and waves.fma and waves.maxnreg == 128
    assert 8 * 32 * waves.split <= RESIDENT * 132 < 8 * 32 * fill.split
    gate_up = pick_tiles(8, 8, 128, 1408, 2048, 0b111110, 132, "waves")  # 176 x 3 programs: one wave
    assert gate_up.split == 3 and gate_up.maxnreg == 128
    assert wave_split(200, 16, 132) == 2  # one wave of 8 tiles; fill's 3 takes 2 waves of 6, 4 ties at 2 x 4
    assert wave_split(10, 1, 132) == 1 and wave_split(10, 40, 132) == 8  # at most 8 splits
    assert pick_tiles(4096, 60, 128, 1408, 2048, 0b10000, 132, "waves").split == 1  # prefill: no split
    monkeypatch.setenv("MXSERVE_DECODE_SPLIT", "most")
    with pytest.raises(ValueError, match="MXSERVE_DECODE_SPLIT"):
        _split_fit(None)


def test_decode_split_by_waves_computes_what_the_reference_computes(monkeypatch):
    # the CUDA-core (1 token) and MMA decode (6 tokens) layouts with K split by waves: every scheme mixed.
    # At 6 tokens (the interpreter's 4 "SMs") waves split gate/up 4 ways and down 2 where fill leaves them whole
    from mxkernels import moe

    splits, real = [], moe.pick_tiles
    monkeypatch.setattr(moe, "pick_tiles", lambda *a, **kw: (lambda t: splits.append(t.split) or t)(real(*a, **kw)))
    for t in (1, 6):
        for fit in ("waves", "fill"):
            errs = gemm_errors(["w4a16g128", "w3a16g128", "w8a16", "bf16"], t, 256, 128, 8, 2, 2, "cpu", seed=t,
                               split_fit=fit)  # fmt: skip
            for key, e in errs.items():
                assert e < BOUND, (t, fit, key, e)
    assert splits[4:] == [4, 2, 1, 1], splits  # 6 tokens: (gate/up, down) by waves, then by fill


def test_gemms_non_multiple_shapes_small_groups():
    # I = 96 and H = 160 are not multiples of the 64/128 tiles; 70 rows are not a multiple of BM
    errs = gemm_errors(SMALL_GROUPS, 35, 160, 96, 8, 1, 2, "cpu", seed=3)
    for key, e in errs.items():
        assert e < BOUND, (key, e)


def test_gemms_with_rotation():
    errs = gemm_errors(["bf16", "w4a16g128", "w4a4"], 9, 128, 128, 6, 0, 2, "cpu", seed=5, method="gptq-had")
    for key, e in errs.items():
        assert e < BOUND, (key, e)


@pytest.mark.parametrize("layout", ["prefill", "decode"])
def test_model_wide_codes_compute_what_the_layers_own_codes_compute(layout):
    """A layer compiled with the whole model's kernel codes (Arena.extra_codes, one variant per
    model) gives the same output bits: the other codes' branches are never taken."""
    from kernel_cases import make_experts, route

    from mxkernels.arena import build_arena, kernel_codes
    from mxkernels.moe import moe_gemms
    from mxserve.schemes import get_scheme

    gen = torch.Generator().manual_seed(3)
    experts = make_experts(["bf16", "w4a16g128", "w2a16g128"], 128, 128, 6, 1, "rtn", gen, "cpu")
    x = torch.randn(7, 128, generator=gen).to(torch.bfloat16)
    ids, w = route(7, 6, 2, gen)
    every = kernel_codes(get_scheme(s) for s in ALL)
    outs = []
    for extra in (0, every):
        gu, dn = (build_arena(list(blocks), extra) for blocks in zip(*(e.linears() for e in experts)))
        assert gu.kernel_mask == (every if extra else gu.codes_mask) and gu.codes_mask != every
        outs.append(moe_gemms(x, ids, w, gu, dn, 6, **LAYOUTS[layout]))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_code_groups_launch_each_wide_code_alone():
    from mxkernels.arena import kernel_codes
    from mxkernels.moe import SHARED_LAUNCH, code_groups
    from mxserve.schemes import get_scheme

    every = kernel_codes(get_scheme(s) for s in ALL)
    groups = code_groups(every)
    assert sum(groups) == every and len(groups) == 1 + bin(every & ~SHARED_LAUNCH).count("1")  # disjoint, whole
    assert code_groups(0b10100) == [0b10100]  # w2 and w4: one launch
    assert code_groups(0b101000) == [0b1000, 0b100000]  # w3 and w8: one each


@pytest.mark.parametrize("layout", ["prefill", "decode", "fma-prefetch"])
def test_grouped_dispatch_computes_what_one_launch_computes(layout):
    """One launch per group of codes (each compiled for its codes only) writes every output
    element (NaN-poisoned) with the bits the single launch of every scheme writes."""
    from kernel_cases import make_experts, route

    from mxkernels.arena import build_arena
    from mxkernels.moe import moe_gemms

    gen = torch.Generator().manual_seed(4)
    experts = make_experts(ALL, 128, 128, 18, 1, "rtn", gen, "cpu")
    t = 5 if layout.startswith("fma") else 9  # a program per row on CUDA cores: fewer in the interpreter
    x = torch.randn(t, 128, generator=gen).to(torch.bfloat16)
    ids, w = route(t, 18, 2, gen)
    gu, dn = (build_arena(list(blocks)) for blocks in zip(*(e.linears() for e in experts)))
    one, grouped = (moe_gemms(x, ids, w, gu, dn, 18, poison=True, dispatch=d, **LAYOUTS[layout])
                    for d in ("single", "grouped"))  # fmt: skip
    for a, b in zip(one, grouped):
        assert torch.isfinite(b).all() and torch.equal(a, b)


def test_padded_slots_and_the_shared_gate_are_handled_inside_the_launches():
    check_padded_slots_and_shared_gate("cpu")


def test_whole_layer_weight_only_mix(alignment):
    assert layer_error(["bf16", "w4a16g128", "w2a16g128", "w8a16"], 12, 128, 128, 8, 2, 2, "cpu", seed=1) < BOUND


def _check_alignment(sorted_ids, block_expert, npp, flat, bm):
    n = len(flat)
    counts = torch.bincount(flat, minlength=len(block_expert))
    assert npp.item() == sum((c + bm - 1) // bm * bm for c in counts.tolist())
    blocks = sorted_ids[: npp.item()].view(-1, bm)
    for b, e in zip(blocks.tolist(), block_expert.tolist()):
        for r in b:
            assert r == n or flat[r].item() == e  # a block serves one expert; padding reads row n
    assert sorted(r for r in sorted_ids.tolist() if r < n) == list(range(n))  # every row exactly once
    assert (sorted_ids[npp.item() :] == n).all()


@pytest.fixture(params=["one launch", "large batch"])
def alignment(request, monkeypatch):
    """Which alignment runs: the one-program kernel, or (as above KERNEL_MAX_ROWS rows) the three launches
    of many programs, here with chunks of 16 rows so that small cases take several programs."""
    from mxkernels import align

    if request.param == "large batch":
        monkeypatch.setattr(align, "KERNEL_MAX_ROWS", 0)
        monkeypatch.setattr(align, "LARGE_CHUNK", 16)
    return request.param


def test_alignment_pads_per_expert(alignment):
    from mxkernels.align import route

    ids = torch.tensor([3, 0, 3, 3, 1, 0, 3])
    sorted_ids, block_expert, npp, _ = route(ids.view(-1, 1).int(), torch.rand(7, 1), 5, 5, 2)
    assert npp.item() == 2 + 2 + 4  # experts 0, 1, 3 padded to blocks of 2; 2 and 4 empty
    _check_alignment(sorted_ids, block_expert, npp, ids, 2)


@pytest.mark.parametrize(
    "t,k,routed,shared,bm", [(7, 1, 5, 0, 2), (9, 2, 6, 2, 4), (40, 4, 60, 4, 16), (1, 8, 8, 0, 16)]
)
def test_alignment_kernel_places_every_row_once(t, k, routed, shared, bm, alignment):
    # shared experts appended to every token, the routing weights beside
    from mxkernels.align import extend_routing, route

    gen = torch.Generator().manual_seed(t)
    topk_ids = torch.stack([torch.randperm(routed, generator=gen)[:k] for _ in range(t)]).to(torch.int32)
    topk_w = torch.rand(t, k, generator=gen)
    sorted_ids, block_expert, npp, w = route(topk_ids, topk_w, routed + shared, routed, bm)
    ids, w_ref = extend_routing(topk_ids, topk_w, routed + shared, routed)
    _check_alignment(sorted_ids, block_expert, npp, ids.reshape(-1), bm)
    assert torch.equal(w, w_ref.reshape(-1))


def test_alignment_capacity_pads_only_the_experts_that_can_get_rows():
    # 2 tokens of top-4 over 60 experts in blocks of 8: at most 8 experts get rows, so 8 blocks, not 54
    # (each block is a program per N tile of the GEMM). The worst case, every row its own expert, fills
    # them exactly
    from mxkernels.align import capacity, route

    assert capacity(8, 60, 8) == 64 and capacity(320, 60, 16) == 1232  # 320 + 60 * 15, to a whole block
    topk_ids = torch.arange(8, dtype=torch.int32).view(2, 4)
    sorted_ids, block_expert, npp, _ = route(topk_ids, torch.rand(2, 4), 60, 60, 8, shared=False)
    assert block_expert.numel() == 8 and npp.item() == 64
    _check_alignment(sorted_ids, block_expert, npp, topk_ids.reshape(-1).long(), 8)


@pytest.mark.parametrize("t,k,routed,shared,bm", [(9, 2, 6, 2, 4), (5, 4, 60, 4, 16), (1, 4, 60, 4, 1)])
def test_alignment_lays_out_routed_and_shared_rows_apart(t, k, routed, shared, bm, alignment):
    # the routed rows by the alignment kernel alone, the shared ones by shared_rows (another stream at
    # decode): together every row once, each block one expert's, and the weights of the one launch
    from mxkernels.align import extend_routing, route, shared_rows

    gen = torch.Generator().manual_seed(t)
    topk_ids = torch.stack([torch.randperm(routed, generator=gen)[:k] for _ in range(t)]).to(torch.int32)
    topk_w = torch.rand(t, k, generator=gen)
    slots, n = k + shared, t * (k + shared)
    flat, w_ref = (v.reshape(-1) for v in extend_routing(topk_ids, topk_w, routed + shared, routed))
    w = torch.full((n,), float("nan"))
    r_ids, r_be, r_npp, _ = route(topk_ids, topk_w, routed + shared, routed, bm, shared=False, w=w)
    assert torch.isnan(w.view(t, slots)[:, k:]).all()  # the shared rows' weights are left to shared_rows
    s_ids, s_be, s_npp = shared_rows(t, k, routed + shared, routed, bm, w)
    assert torch.equal(w, w_ref)
    placed = []
    for ids, be, npp in ((r_ids, r_be, r_npp), (s_ids, s_be, s_npp)):
        blocks = ids[: npp.item()].view(-1, bm)
        for b, e in zip(blocks.tolist(), be.tolist()):
            assert all(r == n or flat[r].item() == e for r in b)  # a block serves one expert
        placed += [r for r in ids.tolist() if r < n]
        assert (ids[npp.item() :] == n).all()
    assert sorted(placed) == list(range(n))
    assert all(r % slots < k for r in r_ids.tolist() if r < n)
    assert s_npp.item() == shared * -(-t // bm) * bm and s_be.numel() * bm == s_ids.numel()


@pytest.mark.parametrize("t,layout,early", [(1, "fma", False), (2, "fma-prefetch", False), (6, "decode", False),
                                             (5, "swapped", False), (1, "fma", True), (6, "decode", True)])  # fmt: skip
def test_shared_experts_apart_compute_what_one_launch_computes(t, layout, early):
    from kernel_cases import shared_apart_case

    shared_apart_case("cpu", t, early=early, **LAYOUTS[layout])


def test_a_shared_start_of_another_forward_is_not_taken():
    """A start for other input memory, routing width or launch options (or before a swap: other arenas)
    is ignored: the forward launches everything itself and computes its own input's result."""
    from kernel_cases import make_experts, route

    from mxkernels.arena import build_arena
    from mxkernels.moe import moe_gemms, start_shared

    gen = torch.Generator().manual_seed(3)
    experts = make_experts(["w4a16g128", "w2a16g128"], 256, 128, 6, 2, "rtn", gen, "cpu")
    gu, dn = (build_arena(list(blocks)) for blocks in zip(*(e.linears() for e in experts)))
    swapped = [build_arena(list(blocks)) for blocks in zip(*(e.linears() for e in experts))]  # a swap's
    ids, w = route(2, 6, 2, gen, skew=False)
    x, other = (torch.randn(2, 256, generator=gen).to(torch.bfloat16) for _ in range(2))
    want = moe_gemms(x, ids, w, gu, dn, 6, shared_apart=False)
    for started in (start_shared(other, 2, gu, dn, 6, shared_apart=True),  # another input
                    start_shared(x, 3, gu, dn, 6, shared_apart=True),  # another top-k
                    start_shared(x, 2, *swapped, 6, shared_apart=True),  # other arenas
                    start_shared(x, 2, gu, dn, 6, shared_apart=True, split_fit="waves")):  # other options
        got = moe_gemms(x, ids, w, gu, dn, 6, shared_apart=True, started=started)
        assert got[1] is not started.layout.out and not started.taken
        assert torch.equal(got[1], want[1])
    taken = start_shared(x, 2, gu, dn, 6, shared_apart=True)
    assert moe_gemms(x, ids, w, gu, dn, 6, shared_apart=True, started=taken)[1] is taken.layout.out
    assert taken.taken
    # no shared experts apart (here: asked so), nothing to start
    assert start_shared(x, 2, gu, dn, 6, shared_apart=False) is None


@pytest.mark.parametrize("t,h,i,n_exp,n_shared,k", [(12, 128, 128, 8, 1, 2), (9, 128, 96, 6, 0, 4)])
def test_bf16_layer_rounds_like_unfused_sglang(t, h, i, n_exp, n_shared, k):
    # An all-bf16 plan must give what SGLang's own unquantized MoE gives (greedy equality of
    # the two servers depends on it): the same bf16 stores, so equal bits but for fp32 sum order.
    same, worst_ulps = bf16_layer_agreement(t, h, i, n_exp, n_shared, k, "cpu", seed=1)
    assert same > 0.99, same
    assert worst_ulps <= 4, worst_ulps


@pytest.mark.parametrize("layout", ["prefill", "decode"])
def test_codes_tiled_and_row_by_row_give_the_same_layer(layout):
    # arena.tile_words: the kernels address the tiled codes (every integer code, weight-only and w4a4 / w8a8,
    # through the same plane loads) and compute bit for bit what they compute on the rows. I = 96 (groups of 32):
    # down's K is not a multiple of 128, so its codes stay in rows beside gate/up's tiled ones
    from kernel_cases import code_orders_agree

    for names, h, i, down_tiled in ((ALL, 256, 128, True), (SMALL_GROUPS, 128, 96, False)):
        diff, orders = code_orders_agree(names, 9, h, i, 10, 2, "cpu", seed=3, **LAYOUTS[layout])
        assert diff == 0, (layout, h, i, diff)
        assert orders == [(True, down_tiled), (False, False)], orders


def test_slab_runs_any_plan_and_swaps_in_place():
    from kernel_cases import slab_swap_case

    before, after = slab_swap_case("cpu")
    assert before == 0 and after == 0  # the same kernel math as plain arenas, bit for bit


def test_slab_swap_refuses_slabs_of_another_code_order(monkeypatch):
    # a slab's codes tiled (arena.tile_words) and another's in rows: copying one over the other would leave the
    # kernel reading every code at the wrong address
    from mxkernels.arena import build_slab, copy_slab
    from mxserve.quant.qlinear import quantize_linear
    from mxserve.schemes import get_scheme

    ql = quantize_linear(torch.randn(128, 128), get_scheme("w4a16g128"))
    tiled = build_slab([ql], [ql], 1 << 16, 1 << 4, None, 128)
    monkeypatch.setenv("MXSERVE_TILED_CODES", "0")
    rows = build_slab([ql], [ql], 1 << 16, 1 << 4, None, 128)
    assert tiled[0].tiled and not rows[0].tiled
    with pytest.raises(ValueError, match="code orders"):
        copy_slab(tiled, rows)


def test_slab_refuses_a_plan_over_its_capacity():
    from mxkernels.arena import build_slab
    from mxserve.quant.qlinear import quantize_linear
    from mxserve.schemes import get_scheme

    ql = quantize_linear(torch.randn(128, 128), get_scheme("bf16"))
    with pytest.raises(ValueError, match="more than"):
        build_slab([ql], [ql], 1024, 1, None, 128)


def test_committed_tile_tables_load_and_give_launchable_tiles():
    """Each table under mxkernels/tiles (tune_tiles.py's output, committed) loads under its GPU's file
    name, tunes only prefill buckets and the tuned classes, and each entry makes a Tiles that
    pick_tiles takes for that layer."""
    import dataclasses
    import re

    import mxkernels.moe as moe
    from mxkernels.tile_table import CLASSES, TABLE_DIR, TileTable

    files = sorted(f for f in os.listdir(TABLE_DIR) if f.endswith(".json"))
    assert files, "no committed tile table"
    for f in files:
        table = TileTable.from_json(json.loads(open(os.path.join(TABLE_DIR, f)).read()))
        assert re.sub(r"[^a-z0-9]+", "-", table.gpu.lower()).strip("-") + ".json" == f
        for e in table.entries:
            assert e.cls in CLASSES and e.rows > moe.DECODE_ROWS, (f, e)
            assert table.lookup(e.hidden, e.inter, e.cls, e.rows) == e.tiles
            fields = {x.name for x in dataclasses.fields(moe.Tiles)}
            assert set(e.tiles) - {"down_tiles"} <= fields
            assert set(e.tiles.get("down_tiles", {})) <= set(moe.DOWN_FIELDS)
            assert all(e.tiles[k] & (e.tiles[k] - 1) == 0 for k in ("bm", "bn", "bk"))
            t = moe.pick_tiles(e.rows * 8, 8, 128, e.inter, e.hidden, 0b10, 132,
                               **{k: v for k, v in e.tiles.items() if k != "down_tiles"})  # fmt: skip
            keys = ("bm", "bn", "bk", "warps", "stages")
            assert tuple(getattr(t, k) for k in keys) == tuple(e.tiles[k] for k in keys)


def test_tuned_prefill_tiles_are_looked_up_and_compute_right(monkeypatch, tmp_path):
    """A committed tile table's entry (tile_table.py) replaces the rules' tiles for its layer shape,
    scheme class and rows-per-expert bucket, and the layer still computes right with it."""
    import mxkernels.moe as moe
    from mxkernels.tile_table import TileEntry, TileTable, codes_class

    names = ["w4a16g128", "w2a16g32", "w8a16", "bf16"]
    tuned = {"bm": 64, "bn": 32, "bk": 32, "warps": 4, "stages": 2, "group_m": 2}  # 2 blocks at a time
    entries = [TileEntry(128, 128, "weight-only", 64, tuned), TileEntry(128, 128, "fp8", 64, {"bm": 16})]
    TileTable("test", entries).save(str(tmp_path / "t.json"))
    table = TileTable.from_json(json.loads((tmp_path / "t.json").read_text()))  # through its JSON form
    assert table.lookup(128, 128, "weight-only", 40) == tuned  # 40 rows per expert: bucket 64
    assert table.lookup(128, 128, "weight-only", 100) == tuned  # the nearest bucket tuned, one power away
    assert table.lookup(128, 128, "weight-only", 500) is None  # three powers away: the rules pick
    assert table.lookup(128, 128, "weight-only", 15) is None  # bucket 16: two powers below
    assert table.lookup(128, 128, None, 40) is None and table.lookup(256, 128, "weight-only", 40) is None
    assert codes_class(0b1) is None and codes_class(0b10001) == "weight-only" and codes_class(1 << 6) == "fp8"
    with pytest.raises(ValueError, match="version"):
        TileTable.from_json({"version": 0, "gpu": "x", "entries": []})

    seen = []
    gemm = moe._gemm
    monkeypatch.setattr(moe, "tile_table", lambda dev: table)
    monkeypatch.setattr(moe, "_gemm", lambda *a, **kw: (seen.append(a[-1]), gemm(*a, **kw))[1])
    # 256 tokens x 3 slots over 19 experts, the first 9 routed ones active: prefill
    errs = gemm_errors(names, 256, 128, 128, 18, 1, 2, "cpu", seed=4)
    tiles = {(t.bm, t.bn, t.bk, t.stages, t.swap, t.group_m) for launches in seen for _, t in launches}
    assert tiles == {(64, 32, 32, 2, False, 2)}
    # an entry's "down_tiles": the down GEMM's own fields (moe.DOWN_FIELDS), gate/up keeping the entry's; others refused
    table.entries[0].tiles = {**tuned, "down_tiles": {"bn": 64, "group_m": 0}}
    seen.clear()
    for key, e in gemm_errors(names, 256, 128, 128, 18, 1, 2, "cpu", seed=4).items():
        assert e < BOUND, (key, e)
    assert [{(t.bn, t.group_m) for _, t in launches} for launches in seen] == [{(32, 2)}, {(64, 0)}]
    table.entries[0].tiles = {**tuned, "down_tiles": {"bm": 16}}
    with pytest.raises(ValueError, match="down GEMM's own tiles"):
        gemm_errors(names, 256, 128, 128, 18, 1, 2, "cpu", seed=4)
    for key, e in errs.items():
        assert e < BOUND, (key, e)


def test_grouped_program_order_computes_what_the_launch_order_computes():
    """Tiles.group_m: the programs of the unswapped layout taken a few blocks at a time over every N tile (the last
    group smaller) compute every output element (NaN-poisoned) with the same bits: each tile is computed as before,
    only by another program."""
    from kernel_cases import make_experts, route

    from mxkernels.arena import build_arena
    from mxkernels.moe import moe_gemms

    gen = torch.Generator().manual_seed(8)
    experts = make_experts(["bf16", "w4a16g128", "w8a8fp8", "w2a16g128"], 128, 256, 8, 1, "rtn", gen, "cpu")
    x = torch.randn(40, 128, generator=gen).to(torch.bfloat16)
    ids, w = route(40, 8, 2, gen, skew=False)
    gu, dn = (build_arena(list(blocks)) for blocks in zip(*(e.linears() for e in experts)))
    outs = [moe_gemms(x, ids, w, gu, dn, 8, poison=True, **LAYOUTS["prefill"], bm=16, bn=64, group_m=g)
            for g in (0, 3, 64)]  # fmt: skip
    for got in outs[1:]:
        for a, b in zip(got, outs[0]):
            assert torch.isfinite(a).all() and torch.equal(a, b)


def test_a_forwards_launches_are_picked_once_per_token_count_and_replayed(monkeypatch):
    # an eager forward (every prefill) spent about half its host time picking tiles (benchmarks/host_overhead.py):
    # the picks are kept on the arena, taken again by a forward of the same token count and settings, and picked
    # anew when a setting read per forward or the slab's plan (swapped in place) changes
    from kernel_cases import make_experts, route

    from mxkernels import moe
    from mxkernels.arena import build_slab, copy_slab, kernel_code
    from mxserve.schemes import get_scheme

    gen = torch.Generator().manual_seed(3)
    picked = []
    monkeypatch.setattr(moe, "pick_tiles", lambda *a, f=moe.pick_tiles, **kw: picked.append(a[0]) or f(*a, **kw))
    names = ["w4a16g128", "w2a16g128", "bf16", "w8a16"]
    codes = sum({1 << kernel_code(get_scheme(s)) for s in names})
    plans = [make_experts(names[i : i + 2], 128, 128, 6, 1, "rtn", gen, "cpu") for i in (0, 2)]

    def slab(experts):
        return build_slab([e.gate_up for e in experts], [e.down for e in experts], 1 << 22, codes, None, 128)

    served = slab(plans[0])
    data = {t: (torch.randn(t, 128, generator=gen).to(torch.bfloat16), *route(t, 6, 2, gen)) for t in (3, 5)}

    def forward(t, arenas=served):
        x, ids, w = data[t]
        return moe.mx_moe_forward(x, ids, w, *arenas, 6)

    first = forward(3)
    assert len(picked) == 2  # gate/up's tiles and down's
    assert torch.equal(forward(3), first) and len(picked) == 2  # replayed, the same launches
    forward(5)
    assert len(picked) == 4 and len(served[0].picks) == 2  # a pick per token count
    monkeypatch.setenv("MXSERVE_DISPATCH", "grouped")  # read per forward: picked anew under it
    grouped = forward(3)
    assert len(picked) == 6
    monkeypatch.delenv("MXSERVE_DISPATCH")
    forward(3)
    assert len(picked) == 6  # the single dispatch's pick again
    assert (grouped.float() - first.float()).abs().max().item() < 1e-2
    copy_slab(served, slab(plans[1]))  # another plan in the same buffers: its code counts differ
    swapped = forward(3)
    assert len(picked) == 8
    assert torch.equal(swapped, forward(3, slab(plans[1])))


def test_a_dropped_layers_picks_do_not_hold_its_memory():
    # the picks live on the gate/up arena; a reference back to it would keep a swapped-out layer's GPU memory
    # until Python's cycle collector ran
    import gc
    import weakref

    from kernel_cases import make_experts, route

    from mxkernels import moe
    from mxkernels.arena import build_arena

    gen = torch.Generator().manual_seed(4)
    experts = make_experts(["w4a16g128"], 128, 128, 4, 1, "rtn", gen, "cpu")
    gu, dn = build_arena([e.gate_up for e in experts]), build_arena([e.down for e in experts])
    ids, w = route(2, 4, 2, gen)
    moe.mx_moe_forward(torch.randn(2, 128, generator=gen).to(torch.bfloat16), ids, w, gu, dn, 4)
    assert gu.picks
    refs = weakref.ref(gu), weakref.ref(dn)
    gc.disable()
    try:
        del gu, dn
        assert all(r() is None for r in refs)
    finally:
        gc.enable()
