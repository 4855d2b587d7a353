"""Packed weights of one MoE layer in mixed schemes, laid out for one kernel launch.

Every expert of a layer, whatever its scheme, lives in a few typed buffers (an
arena per GEMM: fused gate/up, and down):

- ``wi``: int32 packed codes of integer schemes (bit planes, see packing.py), in the kernels'
  paired order within each word (packing.kernel_order: codes k and k + 1 16 bits apart); where K is a
  multiple of 128, tiled (``Arena.tiled``, :func:`tile_words`): each block of 16 rows by 128 k contiguous;
- ``wb``: bf16 weights of bf16 experts; ``wf``: fp8 e4m3 weights;
- ``sc`` / ``zp``: bf16 scales and zeros [N, groups]; a tiled arena's weight-only experts keep them tiled too
  (:func:`tile_rows`: a K tile's 16 scales of a row group side by side, one 32-byte sector, rows r and r + 8
  adjacent).

``meta`` [E, 6] int64 holds per expert: kernel code, weight offset, scale
offset, zero offset, group size (K for per-channel) and whether its input is
Hadamard-rotated. Offsets count elements of the buffer they index.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from mxserve.quant.packing import kernel_order, planes

# Kernel codes: what the kernel's branch for an expert does.
CODE_BF16 = 0
CODE_WONLY = {1: 1, 2: 2, 3: 3, 4: 4, 8: 5}  # weight-only int, by bits: dequantize to bf16, bf16 MMA
CODE_FP8 = 6  # w8a8 fp8: per-token fp8 activations, fp8 MMA
CODE_WA_INT = {4: 7, 8: 8}  # w4a4 / w8a8 int: per-token int activations, int8 MMA
N_CODES = 9

# The tiled order of the codes (tile_words): blocks of TILE_ROWS rows (one MMA tile of the decode kernel's weight rows)
# by TILE_K k (its K tile). Row by row, a decode program read 64 bytes of each of its rows per K tile at 4 bits,
# rows a whole row of codes apart (2 KB at K 4096): on the H100 its gate/up kept DRAM 56% busy, its warps waiting on
# loads, where Marlin's contiguous tiles kept 73%. Tiled, 75%, and the w4 decode layer took 0.85x its time (geometric
# mean of 32 cells; benchmarks/README.md, thirty-first session). MXSERVE_TILED_CODES=0 keeps the rows (to measure both).
TILE_ROWS = 16
TILE_K = 128


def tiles_codes(k: int) -> bool:
    """Whether an arena of input size ``k`` keeps its codes tiled (MXSERVE_TILED_CODES, default on)."""
    return k % TILE_K == 0 and os.environ.get("MXSERVE_TILED_CODES", "1") != "0"


def tile_words(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Packed rows [N, K*bits/32] (K a multiple of 128) -> the tiled order, flat: row groups of 16 (the last padded
    with zero rows), in each its K tiles of 128, in each tile every plane (low first) row by row, so that word j of
    the tile's row n of the plane of width p at bit ``low`` sits at (n // 16) 16 R + t 64 bits + 64 low + (n % 16) 4 p
    + j, R = K bits / 32 and t the K tile. The kernels compute that address."""
    n = words.shape[0]
    words = torch.cat([words, words.new_zeros(-n % TILE_ROWS, words.shape[1])]) if n % TILE_ROWS else words
    groups, tiles = words.shape[0] // TILE_ROWS, k // TILE_K
    parts, col = [], 0
    for p in planes(bits):
        width = k * p // 32
        plane = words[:, col:col + width].reshape(groups, TILE_ROWS, tiles, 4 * p)
        parts.append(plane.permute(0, 2, 1, 3).reshape(groups, tiles, TILE_ROWS * 4 * p))
        col += width
    return torch.cat(parts, dim=2).reshape(-1)


def tile_rows(t: torch.Tensor) -> torch.Tensor:
    """Scales or zeros [N, groups] -> row groups of 16 (the last padded), in each its groups, in each the 16 rows'
    in pair order: flat (n // 16) 16 G + g 16 + pair_slot(n % 16) for row n's group g of G. A decode program's K
    tile reads the 16 of each row group it covers as one 32-byte sector, where row by row each row's came from a
    sector of its own (2 of its 32 bytes used, the rest only if it stayed in cache until the row's next 15 groups;
    benchmarks/README.md, thirty-first session). Pair order puts rows r and r + 8 side by side, the two rows of a
    group that one lane of an MMA tile holds, so the Gluon decode kernel loads both in one 4-byte load."""
    n, g = t.shape
    t = torch.cat([t, t.new_zeros(-n % TILE_ROWS, g)]) if n % TILE_ROWS else t
    # rows (half, r % 8) -> groups first, then slots (r % 8, half)
    return t.reshape(-1, 2, TILE_ROWS // 2, g).permute(0, 3, 2, 1).reshape(-1)


def pair_slot(r: int) -> int:
    """Where row ``r`` (of 16) of a row group sits in tile_rows' pair order (the kernels compute the same)."""
    return (r & 7) * 2 + ((r >> 3) & 1)


def kernel_code(scheme) -> int:
    if scheme.family == "none":
        return CODE_BF16
    if scheme.family == "fp8":
        return CODE_FP8
    if scheme.a_bits < 16:
        return CODE_WA_INT[scheme.w_bits]
    return CODE_WONLY[scheme.w_bits]


def kernel_codes(schemes) -> int:
    """The code mask (bit c for kernel code c) of a set of schemes."""
    mask = 0
    for sc in schemes:
        mask |= 1 << kernel_code(sc)
    return mask


@dataclass
class Arena:
    n: int  # output rows per expert (2I for gate/up, H for down)
    k: int  # input size
    meta: torch.Tensor
    wi: torch.Tensor
    wb: torch.Tensor
    wf: torch.Tensor
    sc: torch.Tensor
    zp: torch.Tensor
    codes_mask: int  # bit c set when some expert uses code c (prunes kernel branches)
    rotation_seed: int | None  # seed of the input rotation, when some expert is rotated
    min_group: int = 1 << 30  # smallest group of a grouped integer scheme (bounds the K tile)
    raw: torch.Tensor | None = None  # a slab's byte buffer, which every typed buffer views (build_slab)
    # branches compiled in beyond the layer's own codes: the model-wide set, so that every layer
    # of a model launches the same kernel variant (one compile per tile config, not per layer)
    extra_codes: int = 0
    # experts per kernel code (index c: code c), kept beside ``meta`` so that a launch's layout reads it without
    # a device sync (moe._stream_k: the share of costly codes)
    code_counts: tuple[int, ...] = ()
    tiled: bool = False  # ``wi`` in the tiled order (tile_words) and weight-only scales and zeros so (tile_rows)
    # a forward's picked tiles and launches by token count and settings (moe._pick_cached); not copied by
    # dataclasses.replace, whose arena may differ
    picks: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def kernel_mask(self) -> int:
        """The CODES the kernel is compiled with."""
        return self.codes_mask | self.extra_codes

    @property
    def k128(self) -> int:
        """The Triton kernels' K128: 0 (K not a multiple of 128), 1 (codes row by row in 16-byte words), 2 (tiled)."""
        return 2 if self.tiled else int(self.k % 128 == 0)

    @property
    def n_experts(self) -> int:
        return self.meta.shape[0]

    def to(self, device) -> Arena:
        if self.raw is not None:
            raise ValueError("a slab is built on its device (build_slab), not moved")
        moved = {f: getattr(self, f).to(device) for f in ("meta", "wi", "wb", "wf", "sc", "zp")}
        return Arena(
            self.n,
            self.k,
            codes_mask=self.codes_mask,
            rotation_seed=self.rotation_seed,
            min_group=self.min_group,
            extra_codes=self.extra_codes,
            code_counts=self.code_counts,
            tiled=self.tiled,
            **moved,
        )

    def nbytes(self) -> int:
        if self.raw is not None:
            return self.raw.numel()
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in ("wi", "wb", "wf", "sc", "zp"))


def _weights(ql, code: int, tiled: bool, device=None) -> torch.Tensor:
    """A block's weights as the kernels read them (on ``device``, where the repacking then runs):
    integer codes repacked in pairs (and ``tiled``: tile_words), bf16 and fp8 as they are. Checkpoints keep
    packing.py's order, so any checkpoint loads into this layout."""
    w = ql.qweight if device is None else ql.qweight.to(device)
    if code in (CODE_BF16, CODE_FP8):
        return w
    w = kernel_order(w, ql.scheme.w_bits, ql.k)
    return tile_words(w, ql.scheme.w_bits, ql.k) if tiled else w


def _group_scales(t: torch.Tensor | None, code: int, tiled: bool) -> torch.Tensor | None:
    """A block's scales or zeros as the kernels read them: a tiled arena's weight-only experts' in tile_rows' order
    (the others', per channel, as they are)."""
    return tile_rows(t) if t is not None and tiled and code in CODE_WONLY.values() else t


def build_arena(linears: list, extra_codes: int = 0) -> Arena:
    """Pack QuantizedLinear blocks of equal shape (one per expert) into one arena; the kernel
    also compiles the branches of ``extra_codes`` (Arena.extra_codes)."""
    n, k = linears[0].n, linears[0].k
    tiled = tiles_codes(k)
    wi, wb, wf, sc, zp = [], [], [], [], []
    sizes = dict.fromkeys(("wi", "wb", "wf", "sc", "zp"), 0)
    meta = []
    mask = 0
    min_group = 1 << 30
    seeds = {ql.hadamard_seed for ql in linears if ql.hadamard_seed is not None}
    if len(seeds) > 1:
        raise ValueError("experts of one layer must share one rotation seed")

    def put(name: str, parts: list, t: torch.Tensor) -> int:
        """Append ``t`` (flattened, padded to 16 elements) to buffer ``name``; return its offset.
        The padding keeps every offset a multiple of 16, which the kernel relies on for wide loads."""
        off = sizes[name]
        flat = t.reshape(-1)
        pad = -flat.numel() % 16
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        parts.append(flat)
        sizes[name] += flat.numel()
        return off

    for ql in linears:
        if (ql.n, ql.k) != (n, k):
            raise ValueError(f"expert shapes differ: {(ql.n, ql.k)} vs {(n, k)}")
        code = kernel_code(ql.scheme)
        mask |= 1 << code
        name, parts = {CODE_BF16: ("wb", wb), CODE_FP8: ("wf", wf)}.get(code, ("wi", wi))
        w_off = put(name, parts, _weights(ql, code, tiled))
        s_off = put("sc", sc, _group_scales(ql.scales, code, tiled)) if ql.scales is not None else 0
        z_off = put("zp", zp, _group_scales(ql.zeros, code, tiled)) if ql.zeros is not None else 0
        group = ql.scheme.group or k
        if ql.scheme.family == "int":
            min_group = min(min_group, group)
        meta.append([code, w_off, s_off, z_off, group, int(ql.hadamard_seed is not None)])

    def cat(parts, dtype):
        return torch.cat(parts) if parts else torch.zeros(1, dtype=dtype)

    return Arena(
        n,
        k,
        torch.tensor(meta, dtype=torch.int64),
        cat(wi, torch.int32),
        cat(wb, torch.bfloat16),
        cat(wf, torch.float8_e4m3fn),
        cat(sc, torch.bfloat16),
        cat(zp, torch.bfloat16),
        mask,
        seeds.pop() if seeds else None,
        min_group,
        extra_codes=extra_codes & ~mask,
        code_counts=_counts(m[0] for m in meta),
        tiled=tiled,
    )


def _counts(codes) -> tuple[int, ...]:
    """Arena.code_counts of experts with these kernel codes."""
    out = [0] * N_CODES
    for c in codes:
        out[c] += 1
    return tuple(out)


# -- fixed-capacity layer slabs (in-place swaps under CUDA graphs) ------------------------------------

SLAB_ALIGN = 64  # bytes: every typed offset stays a multiple of 16 elements for the kernel's wide loads
_BUFFERS = (("wi", torch.int32), ("wb", torch.bfloat16), ("wf", torch.float8_e4m3fn), ("sc", torch.bfloat16),
            ("zp", torch.bfloat16))


def slab_capacity(budget_bits: float, linears: list) -> int:
    """Bytes a layer slab needs for any plan within ``budget_bits`` per weight: the budget's bytes
    (bits per weight count scales and zeros) plus alignment padding for every tensor, and for the tiled codes' and
    scales' rows padded to 16 (tile_words, tile_rows; at most 8 bits a code, 4 bytes of scale and zero a group)."""
    params = sum(ql.n * ql.k for ql in linears)
    pad_rows = sum(-ql.n % TILE_ROWS * 2 * ql.k for ql in linears if tiles_codes(ql.k))  # codes, scales, zeros
    total = math.ceil(budget_bits * params / 8) + pad_rows + 3 * SLAB_ALIGN * (len(linears) + 1)
    return total // SLAB_ALIGN * SLAB_ALIGN


def build_slab(gate_up: list, down: list, capacity: int, codes_mask: int, rotation_seed: int | None,
               min_group: int, device=None) -> tuple[Arena, Arena]:
    """A layer's two arenas as typed views over one byte buffer of fixed ``capacity``.

    Every plan of the layer within its budget fits the same buffer, the kernel
    variant compiled for ``codes_mask`` (all candidate schemes) runs any of them,
    and ``min_group``/``rotation_seed`` are the candidates', not the plan's: so
    :func:`copy_slab` can replace the weights in place and CUDA graphs captured
    over the buffer stay valid. Raises ValueError when the plan does not fit.
    """
    raw = torch.zeros(capacity, dtype=torch.uint8, device=device)
    views = {name: raw.view(dtype) for name, dtype in _BUFFERS}
    used = 0
    arenas = []
    for linears in (gate_up, down):
        n, k = linears[0].n, linears[0].k
        tiled = tiles_codes(k)
        meta = []
        for ql in linears:
            code = kernel_code(ql.scheme)
            if not codes_mask & (1 << code):
                raise ValueError(f"scheme {ql.scheme.name} is not among the slab's compiled kernel codes")
            offs = []
            weights = (_weights(ql, code, tiled, device), {CODE_BF16: "wb", CODE_FP8: "wf"}.get(code, "wi"))
            for t, name in (weights, (_group_scales(ql.scales, code, tiled), "sc"),
                            (_group_scales(ql.zeros, code, tiled), "zp")):
                if t is None:
                    offs.append(0)
                    continue
                b = t.reshape(-1).contiguous().view(torch.uint8)
                if used + b.numel() > capacity:
                    raise ValueError(f"the plan needs more than the slab's {capacity} bytes")
                raw[used:used + b.numel()].copy_(b)
                offs.append(used // views[name].element_size())
                used += -(-b.numel() // SLAB_ALIGN) * SLAB_ALIGN
            meta.append([code, *offs, ql.scheme.group or k, int(ql.hadamard_seed is not None)])
        arenas.append(Arena(n, k, torch.tensor(meta, dtype=torch.int64, device=device), *views.values(),
                            codes_mask, rotation_seed, min_group, raw=raw, code_counts=_counts(m[0] for m in meta),
                            tiled=tiled))
    return arenas[0], arenas[1]


def copy_slab(dst: tuple[Arena, Arena], src: tuple[Arena, Arena]) -> None:
    """Write ``src``'s weights into ``dst``'s buffers in place (same capacity, same kernel variant)."""
    if dst[0].raw is None or src[0].raw is None or dst[0].raw.numel() != src[0].raw.numel():
        raise ValueError("both sides must be slabs of one capacity")
    if (dst[0].codes_mask, dst[0].rotation_seed, dst[0].tiled, dst[1].tiled) != \
            (src[0].codes_mask, src[0].rotation_seed, src[0].tiled, src[1].tiled):
        raise ValueError("slabs compiled for different kernel codes, rotations or code orders")
    dst[0].raw.copy_(src[0].raw)
    for d, s in zip(dst, src):
        d.meta.copy_(s.meta)
        d.code_counts = s.code_counts
