"""The decode router in one launch (mxkernels/router.py), in Triton's interpreter; on the GPU:
tests/test_kernels_gpu.py."""

import re

import pytest
import torch
from kernel_cases import fused_router_case


@pytest.mark.parametrize("t, renormalize, padded, h, per_program", [
    (1, False, False, 256, 1), (7, True, False, 256, 1), (9, False, True, 256, 1), (3, True, True, 2560, 1),
    (5, False, True, 256, 8),  # 8 programs a token, the last with 4 experts of 8
    (7, True, True, 256, 4),  # the default: 4 experts a program
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


def _router_sass(pdl: bool) -> str:
    """The sm_90 code of the router at Qwen1.5's width (one expert a program), as its launch specializes it."""
    import triton
    from sass_tools import disassemble
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mxkernels.router import fused_router_kernel

    params = fused_router_kernel.arg_names
    consts = {"TOPK": 4, "KP": 4, "NP": 64, "BN": 1, "BK": 2048, "RENORMALIZE": False, "HAS_VALID": True,
              "ALONE": False, "PDL": pdl}
    types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "logits_ptr": "*fp32", "count_ptr": "*i32", "topk_w_ptr": "*fp32",
             "topk_ids_ptr": "*i32", "valid_ptr": "*i64"}  # fmt: skip
    sig = {p: types.get(p, "constexpr" if p in consts else "i32") for p in params}
    aligned = set(types) | {"stride_x", "K"}
    src = ASTSource(fused_router_kernel, sig, {(params.index(p),): v for p, v in consts.items()},
                    {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p in aligned})  # fmt: skip
    options = {"num_warps": 1, **({"launch_pdl": True} if pdl else {})}
    return disassemble(triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options),
                       f"router{int(pdl)}")


def test_fused_router_loads_the_gate_before_waiting_for_the_launch_before():
    # programmatic dependent launch (mxkernels/pdl.py): the gate's weights (8 16-byte loads a lane at 2048 wide)
    # are in flight before griddepcontrol.wait (ACQBULK in the sm_90 code), the tokens' hidden states load after
    # it; without it, no wait at all
    from sass_tools import in_fresh_process

    for pdl in (True, False):
        sass = in_fresh_process("test_fused_router", f"_router_sass({pdl})")
        lines = [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", ln)]
        wait = next((i for i, ln in enumerate(lines) if re.search(r"\bACQBULK\b", ln)), None)
        wide = [i for i, ln in enumerate(lines) if re.search(r"\bLDG\.E\.128\b", ln)]
        if not pdl:
            assert wait is None
            continue
        assert wait is not None and sum(i < wait for i in wide) >= 8 and sum(i > wait for i in wide) >= 8, (wait, wide)
