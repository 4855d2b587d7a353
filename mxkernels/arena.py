"""Packed weights of one MoE layer in mixed schemes, laid out for one kernel launch.

Every expert of a layer, whatever its scheme, lives in a few typed buffers (an
arena per GEMM: fused gate/up, and down):

- ``wi``: int32 packed codes of integer schemes (bit planes, see packing.py);
- ``wb``: bf16 weights of bf16 experts; ``wf``: fp8 e4m3 weights;
- ``sc`` / ``zp``: bf16 scales and zeros.

``meta`` [E, 6] int64 holds per expert: kernel code, weight offset, scale
offset, zero offset, group size (K for per-channel) and whether its input is
Hadamard-rotated. Offsets count elements of the buffer they index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Kernel codes: what the kernel's branch for an expert does.
CODE_BF16 = 0
CODE_WONLY = {1: 1, 2: 2, 3: 3, 4: 4, 8: 5}  # weight-only int, by bits: dequantize to bf16, bf16 MMA
CODE_FP8 = 6  # w8a8 fp8: per-token fp8 activations, fp8 MMA
CODE_WA_INT = {4: 7, 8: 8}  # w4a4 / w8a8 int: per-token int activations, int8 MMA
N_CODES = 9


def kernel_code(scheme) -> int:
    if scheme.family == "none":
        return CODE_BF16
    if scheme.family == "fp8":
        return CODE_FP8
    if scheme.a_bits < 16:
        return CODE_WA_INT[scheme.w_bits]
    return CODE_WONLY[scheme.w_bits]


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

    @property
    def n_experts(self) -> int:
        return self.meta.shape[0]

    def to(self, device) -> Arena:
        moved = {f: getattr(self, f).to(device) for f in ("meta", "wi", "wb", "wf", "sc", "zp")}
        return Arena(
            self.n,
            self.k,
            codes_mask=self.codes_mask,
            rotation_seed=self.rotation_seed,
            min_group=self.min_group,
            **moved,
        )

    def nbytes(self) -> int:
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in ("wi", "wb", "wf", "sc", "zp"))


def build_arena(linears: list) -> Arena:
    """Pack QuantizedLinear blocks of equal shape (one per expert) into one arena."""
    n, k = linears[0].n, linears[0].k
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
        w_off = put(name, parts, ql.qweight)
        s_off = put("sc", sc, ql.scales) if ql.scales is not None else 0
        z_off = put("zp", zp, ql.zeros) if ql.zeros is not None else 0
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
    )
