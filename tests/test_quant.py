import pytest
import torch

from mxserve.errors import MxServeError
from mxserve.quant import hadamard
from mxserve.quant.families import quantize_activation
from mxserve.quant.gptq import hessian
from mxserve.quant.packing import kernel_order, pack, packed_words, unpack
from mxserve.quant.qlinear import QuantizedLinear, quantize_linear
from mxserve.schemes import CANONICAL, get_scheme


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (7, 256), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (7, packed_words(256, bits)) == (7, 256 * bits // 32)
    assert torch.equal(unpack(packed, bits, 256), codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_the_kernels_order_puts_codes_k_and_k_plus_1_sixteen_bits_apart(bits):
    # what the Gluon decode kernel relies on: one AND of a word with a mask of both halves gives the
    # two bf16 (k, k + 1) of one MMA register, in the activations' order (packing.py)
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 128), generator=g, dtype=torch.int64).to(torch.uint8)
    words = kernel_order(pack(codes, bits), bits, 128)
    assert torch.equal(words, pack(codes, bits, paired=True)) and not torch.equal(words, pack(codes, bits))
    assert torch.equal(unpack(words, bits, 128, paired=True), codes)
    w = words.to(torch.int64) & 0xFFFFFFFF
    low = codes.to(torch.int64) & 3 if bits == 3 else codes.to(torch.int64)  # 3 bits: the 2-bit plane first
    p = 2 if bits == 3 else bits
    per = 32 // p
    for t in range(per // 2):  # pair t of word 0: codes 2t and 2t + 1 at bits t p and 16 + t p
        assert torch.equal((w[:, 0] >> (t * p)) & (2**p - 1), low[:, 2 * t])
        assert torch.equal((w[:, 0] >> (16 + t * p)) & (2**p - 1), low[:, 2 * t + 1])


def test_pack_extremes_use_all_bits():
    codes = torch.full((2, 32), 15, dtype=torch.uint8)
    assert torch.equal(pack(codes, 4), torch.full((2, 4), -1, dtype=torch.int32))  # 0xFFFFFFFF


def _correlated_inputs(n=4096, k=256, seed=0):
    """Inputs with correlated channels and outliers, where GPTQ's error feedback matters."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, k // 8, generator=g)
    x = base.repeat_interleave(8, dim=1) + 0.3 * torch.randn(n, k, generator=g)
    x[:, :4] *= 8
    return x


@pytest.mark.parametrize("name", ["w4a16g128", "w3a16g128", "w2a16g128", "w8a16", "w4a4", "w8a8fp8"])
def test_gptq_beats_rtn_on_calibration_inputs(name):
    scheme = get_scheme(name)
    x = _correlated_inputs()
    w = torch.randn(192, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    h = hessian(x)
    y = x @ w.T
    err = {}
    for method in ("rtn", "gptq", "gptq-had"):
        q = quantize_linear(w, scheme, method, h, hadamard_seed=3)
        err[method] = ((q.forward(x) - y) ** 2).mean().item()
    assert err["gptq"] < err["rtn"], err
    assert err["gptq-had"] < err["rtn"], err


@pytest.mark.parametrize("name", CANONICAL)
@pytest.mark.parametrize("method", ["rtn", "gptq-had"])
def test_tensors_round_trip(name, method):
    scheme = get_scheme(name)
    x = torch.randn(64, 128)
    w = torch.randn(96, 128) * 0.1
    q = quantize_linear(w, scheme, method, hessian(x), hadamard_seed=5)
    q2 = QuantizedLinear.from_tensors(scheme, 96, 128, q.tensors("p."), "p.", q.hadamard_seed)
    assert torch.equal(q.forward(x), q2.forward(x))
    rel = ((q.forward(x) - x @ w.T).norm() / (x @ w.T).norm()).item()
    assert rel < {"bf16": 1e-2, "w8a16": 2e-2, "w8a8fp8": 0.1, "w1a16g128": 1.5}.get(name, 0.9)
    if scheme.family == "int":
        assert q.qweight.shape == (96, 128 * scheme.w_bits // 32)


def test_bf16_is_lossless_for_bf16_weights():
    w = (torch.randn(64, 128) * 0.1).to(torch.bfloat16).float()
    q = quantize_linear(w, get_scheme("bf16"), "gptq-had", hessian(torch.randn(32, 128)))
    assert q.hadamard_seed is None
    assert torch.equal(q.dequantize(), w)


def test_dequantize_is_on_grid_with_bf16_params():
    w = torch.randn(8, 256)
    q = quantize_linear(w, get_scheme("w4a16g128"), "rtn")
    codes = q.codes().float()
    assert codes.max() <= 15 and codes.min() >= 0
    assert q.scales.dtype == torch.bfloat16 and q.scales.shape == (8, 2)
    deq = q.dequantize()
    s = q.scales.float().repeat_interleave(128, 1)
    z = q.zeros.float().repeat_interleave(128, 1)
    assert torch.allclose(deq, (codes - z) * s)


def test_unsupported_k_is_clear_error():
    with pytest.raises(MxServeError, match="K=192"):
        quantize_linear(torch.randn(8, 192), get_scheme("w4a16g128"), "rtn")


def test_gptq_needs_hessian():
    with pytest.raises(MxServeError, match="Hessian"):
        quantize_linear(torch.randn(8, 128), get_scheme("w4a16g128"), "gptq")


@pytest.mark.parametrize("k", [256, 192, 7])
def test_hadamard_rotation_is_orthogonal(k):
    r = hadamard.rotate(torch.eye(k, dtype=torch.float64), seed=11)
    assert torch.allclose(r @ r.T, torch.eye(k, dtype=torch.float64), atol=1e-12)
    h = torch.randn(k, k, dtype=torch.float64)
    h = h @ h.T
    assert torch.allclose(hadamard.rotate_hessian(h, 11), r.T @ h @ r, atol=1e-9)


def test_activation_quantization_is_per_token():
    x = torch.tensor([[1.0, -0.4, 0.3, 0.0], [100.0, -40.0, 30.0, 0.0]])
    x4 = quantize_activation(x, get_scheme("w4a4"))
    assert torch.allclose(x4[1] / 100, x4[0], atol=1e-6)  # same grid relative to each token's max
    assert quantize_activation(x, get_scheme("w4a16g128")) is x
    x8 = quantize_activation(x, get_scheme("w8a8fp8"))
    assert torch.allclose(x8, x, rtol=0.07)


@pytest.mark.parametrize("name", ["w4a16g128", "w3a16g32", "w1a16g128", "w8a16", "w8a8fp8", "w4a4"])
def test_gptq_batched_over_experts_equals_one_at_a_time(name):
    # a layer's experts are quantized as one batch (calibration, checkpoints, the ladder)
    from mxserve.quant.families import family_for
    from mxserve.quant.gptq import gptq

    gen = torch.Generator().manual_seed(1)
    fam = family_for(get_scheme(name))
    w = torch.randn(4, 32, 256, generator=gen)
    h = torch.stack([hessian(torch.randn(300, 256, generator=gen)) for _ in range(4)])
    h[2, 5, :] = 0  # a dead input in one expert only
    h[2, :, 5] = 0
    batched = gptq(w, h, fam)
    for i in range(4):
        single = gptq(w[i], h[i], fam)
        for b, s in zip(batched, single):
            assert (b is None and s is None) or torch.equal(b[i], s)


@pytest.mark.parametrize("name", ["w4a16g128", "w1a16g128", "w8a16", "w8a8fp8", "w4a4"])
def test_quant_dequant_equals_codes_round_trip(name):
    # GPTQ's per-column step skips the codes; the values must be the stored codes' exactly
    from mxserve.quant.families import family_for

    fam = family_for(get_scheme(name))
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 3
    s, z = fam.fit(w)
    assert torch.equal(fam.quant_dequant(w, s, z), fam.decode(fam.encode(w, s, z), s, z))


def test_gptq_column_loop_stays_a_few_ops_per_column():
    """On a GPU the loop is bound by launches: ops per column are its cost (about 49 before the
    column-major loop, 13 after), so a change that adds many shows here."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mxserve.quant.families import family_for
    from mxserve.quant.gptq import gptq

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(2, 16, 512, generator=gen)
    h = torch.stack([hessian(torch.randn(700, 512, generator=gen)) for _ in range(2)])
    with Count():
        gptq(w, h, family_for(get_scheme("w4a16g128")))
    assert Count.n < 16 * 512, Count.n


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_tiled_codes_sit_where_the_kernels_address_them(bits):
    # arena.tile_words' address of word j of a K tile's row n in the plane of width p at bit `low`:
    # (n // 16) 16 R + t 64 bits + 64 low + (n % 16) 4 p + j, as the Triton and Gluon kernels compute it; the
    # last row group (N = 40: 8 rows) padded with zero rows
    from mxkernels.arena import tile_words
    from mxserve.quant.packing import planes

    n, k = 40, 384
    words = torch.randint(-(2**31), 2**31 - 1, (n, k * bits // 32), dtype=torch.int32)
    tiled = tile_words(words, bits, k)
    r = k * bits // 32
    assert tiled.shape == (48 * r,)
    col = low = 0
    for p in planes(bits):
        for t in range(k // 128):
            for row in range(48):
                at = row // 16 * 16 * r + t * 64 * bits + 64 * low + row % 16 * 4 * p
                want = words[row, col + 4 * p * t : col + 4 * p * (t + 1)] if row < n else torch.zeros(4 * p)
                assert torch.equal(tiled[at : at + 4 * p], want.to(torch.int32)), (p, t, row)
        col += k * p // 32
        low += p


def test_tiled_scales_sit_where_the_kernels_address_them():
    # arena.tile_rows: row n's group g of G at (n // 16) 16 G + g 16 + pair_slot(n % 16), as the kernels compute it,
    # rows r and r + 8 of a row group side by side (one lane of an MMA tile holds both), the last row group padded
    from mxkernels.arena import pair_slot, tile_rows

    assert [pair_slot(r) for r in range(16)] == [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15]
    t = torch.randn(40, 6).to(torch.bfloat16)
    tiled = tile_rows(t)
    assert tiled.shape == (48 * 6,)
    for n in range(48):
        for g in range(6):
            want = t[n, g] if n < 40 else torch.tensor(0.0, dtype=torch.bfloat16)
            assert tiled[n // 16 * 16 * 6 + g * 16 + pair_slot(n % 16)] == want, (n, g)
    one = torch.randn(32, 1).to(torch.bfloat16)  # one group per row (per channel): only the pairs' order
    assert torch.equal(tile_rows(one), one.reshape(2, 2, 8).transpose(1, 2).reshape(-1))
