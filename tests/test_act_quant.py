"""The per-token activation quantization kernel (mxkernels/act_quant.py) against the torch ops it replaces."""

import pytest
import torch

from mxkernels import act_quant
from mxkernels.act_quant import FP8_MAX, row_quant


def _torch_fp8(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = a.abs().amax(dim=-1).float()
    # a tensor dividend: ``448 / t`` is t.reciprocal() * 448 in torch, two roundings
    inv = torch.full_like(amax, FP8_MAX) / amax.clamp(min=1e-8)
    return amax, (a.float() * inv[:, None]).to(torch.float8_e4m3fn)


GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs a CUDA GPU")])  # fmt: skip


@pytest.mark.parametrize("device", ["cpu", GPU])
@pytest.mark.parametrize("k", [64, 1408, 5000])
def test_row_quant_is_the_torch_ops_bit_for_bit(k, device, monkeypatch):
    # on the CPU the interpreter's fp8 conversion, on the GPU the cvt instruction: both take the
    # kernel's already rounded values
    monkeypatch.setattr(act_quant, "_MOST_BLOCK", 2048)  # 5000: three passes over a row
    g = torch.Generator().manual_seed(k)
    a = (torch.randn(6, k, generator=g) * torch.rand(6, 1, generator=g) * 20).to(torch.bfloat16)
    a[0] = 0  # a zero row: the scale's floor
    a[1] = torch.randn(k, generator=g).to(torch.bfloat16) * 1e-3
    a[1, k // 2] = 900.0  # the rest of the row falls into e4m3's subnormals
    a[2, :4] = torch.tensor([125.7, -31.6, 7.98, 448.0])  # values that round up into the next binade
    a = a.to(device)
    amax, a8 = row_quant(a, fp8=True)
    want_amax, want_a8 = _torch_fp8(a)
    assert torch.equal(amax, want_amax)
    assert torch.equal(a8.view(torch.uint8), want_a8.view(torch.uint8))
    row = a8[1].float()
    assert ((row != 0) & (row.abs() < 2**-6)).any()  # e4m3 subnormals reached


def test_row_quant_amax_only_and_empty_and_strided_input():
    a = torch.randn(3, 256).to(torch.bfloat16)
    amax, a8 = row_quant(a, fp8=False)
    assert torch.equal(amax, a.abs().amax(dim=-1).float()) and a8.numel() == 1
    amax, a8 = row_quant(a[:0], fp8=True)
    assert amax.shape == (0,) and a8.shape == (0, 256)
    with pytest.raises(ValueError, match="unit stride"):
        row_quant(a.t(), fp8=True)


@pytest.mark.parametrize("device", ["cpu", GPU])
def test_row_quant_of_some_slots_writes_their_rows_only(device):
    # (token, slot) rows, 3 slots a token, stacked twice (a rotated copy under the rows): slot 1 and 2 only,
    # as the shared experts' launches quantize their own rows while the routed ones write the others
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(2 * 12, 64, generator=g) * 3).to(torch.bfloat16).to(device)
    amax, a8 = row_quant(a, fp8=True)
    some_amax, some_a8 = row_quant(a, fp8=True, slots_of=(12, 3, 1, 2))
    mine = ((torch.arange(24) % 12) % 3 >= 1).to(device)
    assert torch.equal(some_amax[mine], amax[mine])
    assert torch.equal(some_a8[mine].view(torch.uint8), a8[mine].view(torch.uint8))
    poisoned = torch.full_like(amax, float("nan"))
    act_quant.row_quant_kernel[(1,)](a, poisoned, torch.empty_like(a8), 24, 64, 64, 12, 3, 1, 2, FP8=True, ROWS=32,
                                     BLOCK=64, ONE_PASS=True, FP8_LIMIT=FP8_MAX, ROUND=act_quant.INTERPRET,
                                     SOME=True)  # fmt: skip
    assert poisoned[~mine].isnan().all() and not poisoned[mine].isnan().any()
