"""Bit packing of 1/2/3/4/8-bit unsigned codes into int32 words.

Codes run along the input dimension K of a [N, K] weight. A b-bit tensor is
stored as bit planes whose widths divide 32 (3 = 2 + 1), so no value straddles
two words and a kernel decodes any plane with one shift and mask:

    plane of width p: word j of row n holds codes K[j*32/p : (j+1)*32/p],
    code i at bits (i % (32/p)) * p.

The planes of one row are concatenated along the last dimension: the packed
tensor is [N, K * bits / 32] int32, low plane first.

The kernels read the codes of a word in pairs (``paired``): code i at bits
(i // 2) * p + (i % 2) * 16, so that codes k and k + 1 sit 16 bits apart and one
AND with a mask of both halves makes the two bf16 of one MMA register (k, k + 1),
in the order the activations have in memory. Checkpoints keep the order above;
the arena is repacked when it is built (:func:`kernel_order`).
"""

from __future__ import annotations

import torch

_PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}


def planes(bits: int) -> tuple[int, ...]:
    """Plane widths, low bits first, for a code width."""
    if bits not in _PLANES:
        raise ValueError(f"cannot pack {bits}-bit codes (supported: 1, 2, 3, 4, 8)")
    return _PLANES[bits]


def packed_words(k: int, bits: int) -> int:
    """int32 words per row for K codes of the given width."""
    return k * bits // 32


def _offsets(per_word: int, p: int, paired: bool, device) -> torch.Tensor:
    """Each code's bit offset in its word: i * p, or paired (i // 2) * p + (i % 2) * 16."""
    i = torch.arange(per_word, dtype=torch.int64, device=device)
    return (i // 2) * p + (i % 2) * 16 if paired else i * p


def pack(codes: torch.Tensor, bits: int, paired: bool = False) -> torch.Tensor:
    """Pack unsigned integer codes [N, K] (values < 2**bits) into [N, K*bits/32] int32 (``paired``:
    in the kernels' order within each word)."""
    n, k = codes.shape
    if k % 32:
        raise ValueError(f"K={k} must be a multiple of 32 to pack")
    c = codes.to(torch.int64)
    out = []
    shift = 0
    for p in planes(bits):
        per_word = 32 // p
        plane = (c >> shift) & ((1 << p) - 1)
        plane = plane.view(n, k // per_word, per_word)
        offsets = _offsets(per_word, p, paired, codes.device)
        words = (plane << offsets).sum(dim=-1)  # disjoint bit ranges: sum == or
        out.append(words)
        shift += p
    words = torch.cat(out, dim=1)
    # Reinterpret the low 32 bits as signed int32 (torch has no uint32 arithmetic).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, k: int, paired: bool = False) -> torch.Tensor:
    """Inverse of :func:`pack`: [N, K*bits/32] int32 -> [N, K] uint8 codes."""
    n = packed.shape[0]
    w = packed.to(torch.int64) & 0xFFFFFFFF
    codes = torch.zeros(n, k, dtype=torch.int64, device=packed.device)
    col = 0
    shift = 0
    for p in planes(bits):
        per_word = 32 // p
        nw = k // per_word
        words = w[:, col : col + nw]
        offsets = _offsets(per_word, p, paired, packed.device)
        plane = (words.unsqueeze(-1) >> offsets) & ((1 << p) - 1)
        codes |= plane.reshape(n, k) << shift
        col += nw
        shift += p
    return codes.to(torch.uint8)


def kernel_order(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Checkpoint-order packed codes [N, K*bits/32] int32 in the kernels' paired order (module
    docstring), on their device (a few launches per block on a GPU, where layers are packed)."""
    return pack(unpack(packed, bits, k), bits, paired=True)
