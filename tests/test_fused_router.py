"""The decode router in one launch (mxkernels/router.py), in Triton's interpreter; on the GPU:
tests/test_kernels_gpu.py."""

import pytest
import torch
from kernel_cases import fused_router_case


@pytest.mark.parametrize("t, renormalize, padded, h", [(1, False, False, 256), (7, True, False, 256),
                                                       (9, False, True, 256), (3, True, True, 2560)])  # fmt: skip
def test_fused_router_routes_as_softmax_top_k(t, renormalize, padded, h):
    fused_router_case("cpu", t, renormalize, padded, h=h)


def test_fused_router_refuses_a_gate_of_another_width():
    from mxkernels.router import fused_router

    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="gate"):
        fused_router(x, torch.zeros(60, 128, dtype=torch.bfloat16), 4, False)
    with pytest.raises(ValueError, match="top-61"):
        fused_router(x, torch.zeros(60, 256, dtype=torch.bfloat16), 61, False)
