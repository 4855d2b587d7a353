"""mxserve: mixed-precision MoE serving (MxMoE, online)."""

__version__ = "0.1.0"
