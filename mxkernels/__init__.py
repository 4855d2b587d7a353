"""Kernels for the mixed-precision MoE layer, and their torch reference (the oracle)."""

from mxkernels.reference import moe_reference

__all__ = ["moe_reference"]
