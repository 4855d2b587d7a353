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


def test_a_forward_dequantizes_once_per_gemm_and_matches_the_fused_path():
    gen = torch.Generator().manual_seed(3)
    names = ["w4a16g128", "w3a16g128", "w2a16g128", "bf16", "w8a8fp8"]
    experts = make_experts(names, 128, 128, 10, 1, "rtn", gen, "cpu")
    gu, dn = build_arena([e.gate_up for e in experts]), build_arena([e.down for e in experts])
    x = torch.randn(40, 128, generator=gen).to(torch.bfloat16)
    ids, w = route(40, 10, 2, gen)
    calls = []
    real = dequant.dequantize
    with mock.patch.object(dequant, "dequantize", lambda a, s: calls.append(a) or real(a, s)):
        inter, out = moe_gemms(x, ids, w, gu, dn, 10, poison=True, dequant=True, swap=False, split=1)
    assert [c is a for c, a in zip(calls, (gu, dn))] == [True, True]
    fused_inter, fused_out = moe_gemms(x, ids, w, gu, dn, 10, poison=True, dequant=False, swap=False, split=1)
    # the same bf16 weights; only the MMA tiles' order of sums differs
    assert torch.isfinite(out).all()
    torch.testing.assert_close(inter.float(), fused_inter.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(out.float(), fused_out.float(), rtol=2e-2, atol=2e-3)


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
