"""Prefill on dequantized weights (mxkernels/dequant.py), under Triton's CPU interpreter: the weights it
writes, the view the GEMM runs, and when a forward takes the path."""

from unittest import mock

import pytest
import torch
from kernel_cases import make_experts, route

from mxkernels import dequant, moe
from mxkernels.arena import CODE_BF16, build_arena, kernel_code
from mxkernels.moe import moe_gemms

SCHEMES = ["bf16", "w4a16g128", "w3a16g128", "w2a16g128", "w1a16g128", "w8a16", "w4a16g32", "w8a8fp8", "w4a4"]


@pytest.mark.parametrize("k", [256, 96])  # 96: K tiles past K, packed rows not a multiple of 128
def test_dequantize_writes_each_experts_weights_bit_for_bit(k):
    gen = torch.Generator().manual_seed(k)
    names = SCHEMES if k == 256 else ["bf16", "w4a16g32", "w2a16g32", "w8a16", "w8a8fp8"]
    i = 128 if k == 256 else 64
    experts = make_experts(names, k, i, len(names), 0, "rtn", gen, "cpu")  # gate/up [2i, k]
    arena = build_arena([e.gate_up for e in experts])
    scratch = torch.full((dequant.scratch_elems(arena) + 8,), float("nan"), dtype=torch.bfloat16)
    view = dequant.dequantize(arena, scratch)
    n = arena.n
    for e, ex in enumerate(experts):
        ql = ex.gate_up
        code, w_off, *rest = view.meta[e].tolist()
        if ql.scheme.family in ("none", "int") and ql.scheme.a_bits == 16:
            want = ql.dequantize(torch.bfloat16)
            got = scratch[w_off: w_off + n * k].view(n, k)
            assert code == CODE_BF16 and w_off == e * n * k
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), ql.scheme.name
        else:  # fp8 and integer-activation experts keep their own branch and buffers
            assert [code, w_off, *rest] == arena.meta[e].tolist() and code == kernel_code(ql.scheme)
    assert view.codes_mask == dequant.view_codes(arena.codes_mask)
    assert view.codes_mask & dequant.WONLY_MASK == 0 and view.codes_mask & 1
    assert view.min_group == arena.min_group  # w4a4's groups still bound the K tile
    assert view.wi is arena.wi and view.wb is scratch
    with pytest.raises(ValueError, match="bf16 of at least"):
        dequant.dequantize(arena, scratch[:10])


# the fused run is a decode with the shared experts apart: its down GEMMs must not read the poisoned rows
# the other set of launches writes (numpy warns of the NaN when they do)
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_a_forward_dequantizes_once_per_gemm_and_matches_the_fused_path():
    gen = torch.Generator().manual_seed(3)
    names = ["w4a16g128", "w3a16g128", "w2a16g128", "bf16", "w8a8fp8"]
    experts = make_experts(names, 128, 128, 10, 1, "rtn", gen, "cpu")
    gu, dn = build_arena([e.gate_up for e in experts]), build_arena([e.down for e in experts])
    x = torch.randn(40, 128, generator=gen).to(torch.bfloat16)
    ids, w = route(40, 10, 2, gen)
    calls = []
    real = dequant.dequantize
    with mock.patch.object(dequant, "dequantize", lambda a, *rest: calls.append(a) or real(a, *rest)):
        inter, out = moe_gemms(x, ids, w, gu, dn, 10, poison=True, dequant=True, swap=False, split=1)
    assert [c is a for c, a in zip(calls, (gu, dn))] == [True, True] and len(calls) == 2
    fused_inter, fused_out = moe_gemms(x, ids, w, gu, dn, 10, poison=True, dequant=False, swap=False, split=1)
    # the same bf16 weights; only the MMA tiles' order of sums differs
    assert torch.isfinite(out).all()
    torch.testing.assert_close(inter.float(), fused_inter.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(out.float(), fused_out.float(), rtol=2e-2, atol=2e-3)
    # a scratch capped below one expert: a chunk per expert, each launch skipping the others; the fp8
    # experts run in the first chunk's launch only. Every product is the same: the outputs bit for bit
    with mock.patch.object(moe, "DEQUANT_SCRATCH_MB", "0"):
        calls.clear()
        with mock.patch.object(dequant, "dequantize", lambda a, *rest: calls.append(rest[1]) or real(a, *rest)):
            chunked = moe_gemms(x, ids, w, gu, dn, 10, poison=True, dequant=True, swap=False, split=1)
    assert calls == list(range(11)) * 2
    assert torch.equal(chunked[0], inter) and torch.equal(chunked[1], out)


def test_a_chunk_writes_its_experts_and_skips_the_others():
    gen = torch.Generator().manual_seed(5)
    names = ["w4a16g128", "bf16", "w8a8fp8", "w2a16g128"]
    experts = make_experts(names, 128, 128, 8, 0, "rtn", gen, "cpu")
    arena = build_arena([e.gate_up for e in experts])
    n, k = arena.n, arena.k
    whole = torch.empty(dequant.scratch_elems(arena), dtype=torch.bfloat16)
    dequant.dequantize(arena, whole)
    for first, count in ((0, 3), (3, 5)):
        scratch = torch.empty(dequant.scratch_elems(arena, count), dtype=torch.bfloat16)
        view = dequant.dequantize(arena, scratch, first, count)
        for e, ex in enumerate(experts):
            code, w_off = view.meta[e, :2].tolist()
            others = ex.gate_up.scheme.family == "fp8"
            if others:  # run by the first chunk's launch, as it is
                assert (code, w_off) == ((kernel_code(ex.gate_up.scheme), arena.meta[e, 1].item()) if first == 0
                                         else (dequant.SKIP, arena.meta[e, 1].item()))  # fmt: skip
            elif first <= e < first + count:
                assert (code, w_off) == (CODE_BF16, (e - first) * n * k)
                assert torch.equal(scratch[w_off: w_off + n * k], whole[e * n * k: (e + 1) * n * k])
            else:
                assert code == dequant.SKIP
        assert view.kernel_mask == dequant.dequantized_view(arena).kernel_mask  # one kernel variant for all
        assert view.codes_mask == (dequant.view_codes(arena.codes_mask) if first == 0 else 1)
    with pytest.raises(ValueError, match="experts 6..9 of 8"):
        dequant.dequantize(arena, whole, 6, 4)


def test_when_a_forward_dequantizes_first(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    mixed = make_experts(["w4a16g128", "bf16"], 128, 128, 4, 0, "rtn", gen, "cpu")
    fp8 = make_experts(["w8a8fp8", "bf16"], 128, 128, 4, 0, "rtn", gen, "cpu")
    arenas = {name: (build_arena([e.gate_up for e in ex]), build_arena([e.down for e in ex]))
              for name, ex in (("mixed", mixed), ("fp8", fp8))}  # fmt: skip
    rows = moe.DEQUANT_ROWS
    assert moe._dequant_first(rows, *arenas["mixed"], None)
    assert not moe._dequant_first(rows - 1, *arenas["mixed"], None)
    assert not moe._dequant_first(4 * rows, *arenas["fp8"], None)  # nothing to dequantize
    assert not moe._dequant_first(4 * rows, *arenas["fp8"], True)
    assert moe._dequant_first(2, *arenas["mixed"], True) and not moe._dequant_first(4 * rows, *arenas["mixed"], False)
    monkeypatch.setattr(moe, "PREFILL_DEQUANT", "0")
    assert not moe._dequant_first(4 * rows, *arenas["mixed"], None)
    monkeypatch.setattr(moe, "PREFILL_DEQUANT", "1")
    assert moe._dequant_first(moe.DECODE_ROWS + 1, *arenas["mixed"], None)
    assert not moe._dequant_first(moe.DECODE_ROWS, *arenas["mixed"], None)
    monkeypatch.setattr(moe, "PREFILL_DEQUANT", "yes")
    with pytest.raises(ValueError, match="MXSERVE_PREFILL_DEQUANT"):
        moe._dequant_first(4 * rows, *arenas["mixed"], None)
