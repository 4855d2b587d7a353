"""The decode router in one launch (mxkernels/router.py), in Triton's interpreter; on the GPU:
tests/test_kernels_gpu.py."""

import pytest
import torch
from kernel_cases import fused_router_case


@pytest.mark.parametrize("t, renormalize, padded, h, per_program", [
    (1, False, False, 256, 1), (7, True, False, 256, 1), (9, False, True, 256, 1), (3, True, True, 2560, 1),
    (5, False, True, 256, 8),  # 8 programs a token, the last with 4 experts of 8
    (2, True, False, 2560, 64),  # one program a token (no counter), its K tile 512: five passes over K
])  # fmt: skip
def test_fused_router_routes_as_softmax_top_k(t, renormalize, padded, h, per_program):
    fused_router_case("cpu", t, renormalize, padded, h=h, per_program=per_program)


def test_fused_router_refuses_a_gate_of_another_width():
    from mxkernels.router import fused_router

    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="gate"):
        fused_router(x, torch.zeros(60, 128, dtype=torch.bfloat16), 4, False)
    with pytest.raises(ValueError, match="top-61"):
        fused_router(x, torch.zeros(60, 256, dtype=torch.bfloat16), 61, False)
    with pytest.raises(ValueError, match="power of two"):
        fused_router(x, torch.zeros(60, 256, dtype=torch.bfloat16), 4, False, experts_per_program=6)
