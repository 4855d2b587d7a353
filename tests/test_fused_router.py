"""The decode router in one launch (mxkernels/router.py), in Triton's interpreter; on the GPU:
tests/test_kernels_gpu.py."""

import re

import pytest
import torch
from kernel_cases import fused_router_case


@pytest.mark.parametrize("t, renormalize, padded, h, per_program, shared_gate", [
    (1, False, False, 256, 1, False), (7, True, False, 256, 1, False), (9, False, True, 256, 1, False),
    (3, True, True, 2560, 1, False),
    (5, False, True, 256, 8, False),  # 8 programs a token, the last with 4 experts of 8
    (2, True, False, 2560, 64, False),  # one program a token (no counter), its K tile 512: five passes over K
    # the shared experts' gate in a program more per token: beside one-expert programs (the counter waits for the
    # experts' programs only), past K's first tile, and beside one program of every expert
    (7, True, True, 256, 1, True), (3, False, False, 2560, 1, True), (2, True, False, 2560, 64, True),
])  # fmt: skip
def test_fused_router_routes_as_softmax_top_k(t, renormalize, padded, h, per_program, shared_gate):
    fused_router_case("cpu", t, renormalize, padded, h=h, per_program=per_program, shared_gate=shared_gate)


def test_fused_router_refuses_a_gate_of_another_width():
    from mxkernels.router import fused_router

    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="gate"):
        fused_router(x, torch.zeros(60, 128, dtype=torch.bfloat16), 4, False)
    with pytest.raises(ValueError, match="top-61"):
        fused_router(x, torch.zeros(60, 256, dtype=torch.bfloat16), 61, False)
    with pytest.raises(ValueError, match="power of two"):
        fused_router(x, torch.zeros(60, 256, dtype=torch.bfloat16), 4, False, experts_per_program=6)


def _router_sass(pdl: bool, align: bool = False, count: bool = False, shared_gate: bool = False) -> str:
    """The sm_90 code of the router at Qwen1.5's width (one expert a program), as its launch specializes it;
    ``align``: laying out the rows of Qwen1.5's 4 + 4 slots and zeroing stream-K's sums too; ``count``: and counting
    the routing into router_stats' buffer and its host mirror (8 lanes of 4 ids a step); ``shared_gate``: a program
    more per token computing the shared experts' scale."""
    import triton
    from sass_tools import disassemble
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mxkernels.router import fused_router_kernel

    params = fused_router_kernel.arg_names
    consts = {"TOPK": 4, "KP": 4, "NP": 64, "BN": 1, "BK": 2048, "RENORMALIZE": False, "HAS_VALID": True,
              "ALONE": False, "PDL": pdl, "ALIGN": align, "SLOTS": 8, "E": 64, "EP": 128, "BM": 8, "CHUNK": 256,
              "BCHUNK": 64, "SHARED": True, "ZERO": 128 if align else 0, "COUNT": count, "NB": 9, "NBP": 16, "BT": 8,
              "MIRROR": count, "SIZE": 128, "SHARED_GATE": shared_gate}  # fmt: skip
    types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "logits_ptr": "*fp32", "count_ptr": "*i32", "topk_w_ptr": "*fp32",
             "topk_ids_ptr": "*i32", "valid_ptr": "*i64", "sorted_ptr": "*i64", "block_expert_ptr": "*i64",
             "npp_ptr": "*i64", "w_out_ptr": "*fp32", "cursor_ptr": "*i32", "zero_ptr": "*fp32", "cbuf_ptr": "*i64",
             "cbounds_ptr": "*i64", "chost_ptr": "*i64", "sgate_ptr": "*bf16", "scale_ptr": "*fp32"}  # fmt: skip
    sig = {p: types.get(p, "constexpr" if p in consts else "i32") for p in params}
    aligned = set(types) | {"stride_x", "K"}
    src = ASTSource(fused_router_kernel, sig, {(params.index(p),): v for p, v in consts.items()},
                    {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p in aligned})  # fmt: skip
    options = {"num_warps": 1, **({"launch_pdl": True} if pdl else {})}
    return disassemble(triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options),
                       f"router{int(pdl)}{int(align)}{int(count)}{int(shared_gate)}")  # fmt: skip


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


@pytest.mark.parametrize("t, per_program, padded, n_shared", [
    (1, 1, False, 4), (5, 1, True, 4), (3, 8, False, 0), (9, 64, True, 4), (1, 64, False, 4),
])  # fmt: skip
def test_fused_router_lays_out_the_rows_as_the_alignment_launch(t, per_program, padded, n_shared):
    # the last token ranked aligns every token (a second counter; none at one token of one program)
    from kernel_cases import router_alignment_case

    router_alignment_case("cpu", t, per_program, padded, n_shared)


@pytest.mark.parametrize("t, per_program, router_counts", [(1, 1, False), (6, 64, False), (5, 1, True)])
def test_the_router_laying_out_the_rows_computes_the_same_layer(t, per_program, router_counts):
    # no shared experts: on this (unbalanced, Triton) grid, one launch per GEMM, whose rows the router lays out; the
    # routing counted beside the forward's launches, or by the router's launch (the forward then launches no count)
    from kernel_cases import router_lay_out_case

    router_lay_out_case("cpu", t, 0, per_program, router_counts=router_counts)


def test_the_router_lays_out_no_rows_where_the_shared_experts_launch_apart():
    # decode on the unbalanced grid launches the shared experts apart (their own rows): the router routes only
    from kernel_cases import make_experts

    from mxkernels.arena import build_arena
    from mxkernels.moe import route_and_lay_out

    gen = torch.Generator().manual_seed(0)
    experts = make_experts(["w4a16g128"], 256, 128, 8, 2, "rtn", gen, "cpu")
    gu, dn = (build_arena(list(blocks)) for blocks in zip(*(e.linears() for e in experts)))
    x = torch.randn(2, 256, generator=gen).to(torch.bfloat16)
    w, ids, _, started = route_and_lay_out(x, torch.randn(8, 256).to(torch.bfloat16), 2, False, gu, dn, 8)
    assert started is None and ids.shape == (2, 2) and ((ids >= 0) & (ids < 8)).all()


def test_rows_laid_out_from_another_top_k_are_laid_out_again():
    # a forward given other weights than the router returned (say, scaled after it) does not take the router's
    # rows (their weights are the unscaled ones): it aligns its own, and the start stays untaken (the layer logs it)
    from kernel_cases import make_experts

    from mxkernels.arena import build_arena
    from mxkernels.moe import moe_gemms, route_and_lay_out

    gen = torch.Generator().manual_seed(1)
    experts = make_experts(["w4a16g128", "bf16"], 256, 128, 8, 0, "rtn", gen, "cpu")
    gu, dn = (build_arena(list(blocks)) for blocks in zip(*(e.linears() for e in experts)))
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    w, ids, _, started = route_and_lay_out(x, (torch.randn(8, 256, generator=gen) * 0.5).to(torch.bfloat16), 2,
                                           False, gu, dn, 8)  # fmt: skip
    got = moe_gemms(x, ids, w * 2, gu, dn, 8, started=started)[1]
    assert not started.taken and not started.counted  # no counter given: the forward's layer counts
    assert torch.equal(got, moe_gemms(x, ids, w * 2, gu, dn, 8, poison=True)[1])
    assert not torch.equal(got, moe_gemms(x, ids, w, gu, dn, 8)[1])


def test_the_router_laying_out_the_rows_counts_them_in_its_sm_90_code():
    # MixedExperts.route's launch (MXSERVE_ROUTER_ALIGN=1) with the layer counting: the program that lays out the
    # rows adds the routing with 64-bit atomics and then stores the buffer into the host mirror, after a barrier;
    # nothing of it goes through local memory (Triton 3.9 keeps three pointers of the laying out there already; the
    # device's 3.6 none)
    from sass_tools import in_fresh_process

    plain, counting = (in_fresh_process("test_fused_router", f"_router_sass(False, True, {c})") for c in (False, True))
    atomics = r"\b(REDG|ATOMG)\.E\.ADD\.64\b"
    assert not re.search(atomics, plain) and len(re.findall(atomics, counting)) >= 3
    assert len(re.findall(r"\bBAR\.SYNC", counting)) > len(re.findall(r"\bBAR\.SYNC", plain))
    local = r"\b(STL|LDL)\b"
    assert len(re.findall(local, counting)) <= len(re.findall(local, plain))


def test_the_routers_program_of_the_shared_gate_in_its_sm_90_code():
    # route_and_lay_out's launch given Qwen2-MoE's shared-expert gate: a program more per token takes the dot in fp32
    # from 16-byte loads (16 more a lane at 2048 wide), with a wait of its own for the launch before (PDL), then the
    # sigmoid (a reciprocal on the SFU); no more local memory
    from sass_tools import in_fresh_process

    plain, gated = (in_fresh_process("test_fused_router", f"_router_sass(True, True, True, {g})")
                    for g in (False, True))  # fmt: skip
    assert len(re.findall(r"\bACQBULK\b", gated)) > len(re.findall(r"\bACQBULK\b", plain))
    assert len(re.findall(r"\bMUFU\.RCP\b", gated)) > len(re.findall(r"\bMUFU\.RCP\b", plain))
    assert len(re.findall(r"\bLDG\.E\.128\b", gated)) >= len(re.findall(r"\bLDG\.E\.128\b", plain)) + 16
    local = r"\b(STL|LDL)\b"  # Triton 3.9 keeps three pointers of the laying out there already, 3.6 none
    assert len(re.findall(local, gated)) <= len(re.findall(local, plain))
