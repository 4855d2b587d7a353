"""What each rank of SGLang's parallel groups holds: which routed experts (expert parallel), and
whether a block's input columns split over tensor-parallel ranks (no heavy imports: the planner
uses it too)."""

from __future__ import annotations

from mxserve.errors import MxServeError


def moe_split(tp: int, ep: int) -> int:
    """Ways SGLang splits each expert: its MoE layers run over the ``tp`` GPUs, as ``ep`` groups
    that each hold whole experts, each expert split over the tp / ep GPUs of its group."""
    return tp // ep


def ep_range(n_routed: int, ep_size: int, rank: int) -> range:
    """The routed experts rank ``rank`` holds (contiguous, as SGLang's expert parallel assigns)."""
    if n_routed % ep_size:
        raise MxServeError(f"--ep {ep_size}: {n_routed} routed experts do not split evenly over {ep_size} ranks")
    per = n_routed // ep_size
    return range(rank * per, (rank + 1) * per)


def column_split_refusal(scheme, k: int, tp: int, rotated: bool) -> str | None:
    """Why a block of depth ``k`` in ``scheme`` cannot be split ``tp`` ways by input columns, or None.

    Each rank must keep whole quantization groups and whole packed words, and the input may not
    be transformed over all columns: the Hadamard rotation (``rotated``, gptq-had) or the per-token
    activation scale of w8a8fp8 / w4a4 / w8a8 (one amax over the whole row)."""
    if k % tp:
        return f"{k} columns do not split {tp} ways"
    part = k // tp
    if scheme.family == "none":
        return None
    if rotated:
        return "its input is Hadamard-rotated over all columns (gptq-had); quantize with gptq or rtn for TP"
    if scheme.a_bits < 16:
        return f"{scheme.name} quantizes activations with one scale over the whole row"
    if scheme.family == "int":
        if scheme.group is not None and part % scheme.group:
            return f"{part} columns per rank are not whole groups of {scheme.group}"
        from mxserve.quant.packing import planes

        for p in planes(scheme.w_bits):
            if part * p % 32:
                return f"{part} columns per rank are not whole 32-bit words of {p}-bit codes"
    return None
