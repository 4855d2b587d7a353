"""Expert shapes of real MoE models (from their Hugging Face configs), for benchmarks and profiles.

Shared experts are given as a count of routed-sized slices (mxserve splits them so).
"""

MODEL_SHAPES: dict[str, dict[str, int]] = {
    # Qwen1.5-MoE-A2.7B: 60 experts top-4, shared expert 5632 = 4 x 1408
    "qwen1.5-moe-a2.7b": {"hidden": 2048, "inter": 1408, "experts": 60, "top_k": 4, "shared": 4},
    # DeepSeek-V2-Lite: 64 experts top-6, 2 shared experts of 1408
    "deepseek-v2-lite": {"hidden": 2048, "inter": 1408, "experts": 64, "top_k": 6, "shared": 2},
    # Mixtral-8x7B: 8 experts top-2
    "mixtral-8x7b": {"hidden": 4096, "inter": 14336, "experts": 8, "top_k": 2, "shared": 0},
    # Qwen3-30B-A3B: 128 experts top-8
    "qwen3-30b-a3b": {"hidden": 2048, "inter": 768, "experts": 128, "top_k": 8, "shared": 0},
}

TOKEN_COUNTS = (1, 4, 16, 64, 256, 1024, 4096, 8192)


def gemm_shapes(models=None) -> list[tuple[int, int]]:
    """Distinct (N, K) of the fused gate/up (2I, H) and down (H, I) GEMMs."""
    out: list[tuple[int, int]] = []
    for name in models or MODEL_SHAPES:
        m = MODEL_SHAPES[name]
        for nk in ((2 * m["inter"], m["hidden"]), (m["hidden"], m["inter"])):
            if nk not in out:
                out.append(nk)
    return out
