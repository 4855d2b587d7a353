"""Expert parallel over real process groups (torch.distributed, gloo on the CPU, 2 ranks): the
layer's output, routing counts and the plan check, each against one process holding everything."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_ranks import gloo_rank
from test_parallel import ROUTED, SHARED, inputs, layer

from mxserve.errors import MxServeError
from mxserve.parallel.collective import (
    check_same_plan,
    ep_local,
    ep_moe_forward,
    gather_ep_counts,
    plan_digest,
    reduce_counts,
    swap_on_every_rank,
    tp_local,
    tp_moe_forward,
)
from mxserve.plan import Plan
from mxserve.runtime.moe_layer import MixedExperts
from mxserve.schemes import get_scheme

WORLD = 2


def _rank(rank: int, store: str) -> None:
    with gloo_rank(store, rank, WORLD):
        torch.set_num_threads(1)
        experts = layer(["w4a16g128", "w2a16g64", "w8a16", "bf16"], ["w3a16g128", "w4a16g128", "w1a16g128"])
        x, ids, w, scale = inputs(seed=5, t=40)
        whole = MixedExperts(0, ROUTED, experts)
        ref = whole.forward(x, ids, w, scale)

        # tensor parallel: each rank holds a slice of every expert (down: 128 of 256 columns, whole groups)
        sliced = tp_local(experts, ROUTED, rank, WORLD)
        out = tp_moe_forward(sliced, x, ids, w, scale)
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5
        assert torch.equal(sliced.counter.counts, whole.counter.counts)  # same tokens, same routing: no reduction

        local = ep_local(experts, ROUTED, rank, WORLD)
        out = ep_moe_forward(local, x, ids, w, ROUTED, scale)
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5
        # each rank counted only its own experts; gathered, they are the whole layer's counts
        per = ROUTED // WORLD
        assert torch.equal(gather_ep_counts(local.counter.counts, per), whole.counter.counts[:ROUTED].long())

        # ranks that see different tokens: the summed counts are those of all tokens in one place
        mine = MixedExperts(0, ROUTED, experts)
        mine.record(ids[rank::WORLD])
        both = MixedExperts(0, ROUTED, experts)
        both.record(ids)
        assert torch.equal(reduce_counts(mine.counter.counts), both.counter.counts.long())

        lay = [(0, [False] * ROUTED + [True] * SHARED)]
        plan = Plan.uniform("m", "qwen2_moe", lay, get_scheme("w4a16g128"), "gptq")
        assert check_same_plan(plan) == plan_digest(plan)
        if rank == 1:
            plan.layers[0].experts[3].down = "w2a16g128"
        try:
            check_same_plan(plan)
        except MxServeError as e:
            assert "ranks [1] differ from rank 0" in str(e)
        else:
            raise AssertionError("a plan that differs on rank 1 was accepted")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_expert_parallel_over_two_processes(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)


def _swap_rank(rank: int, store: str) -> None:
    with gloo_rank(store, rank, WORLD):
        lay = [(0, [False] * ROUTED + [True] * SHARED)]
        plan = Plan.uniform("m", "qwen2_moe", lay, get_scheme("w4a16g128"), "gptq")
        log: list[str] = []

        def apply(p, fail=False):
            log.append("apply")
            if fail:
                raise RuntimeError("out of memory")
            return "report"

        def undo(p):
            log.append("undo")

        # the same plan on both ranks: applied on both
        assert swap_on_every_rank(lambda: plan, apply, undo) == (plan, "report") and log == ["apply"]

        # rank 1 cannot read its copy: both refuse, neither applies
        log.clear()

        def read():
            if rank == 1:
                raise ValueError("bad JSON")
            return plan

        with pytest.raises(MxServeError, match="differ"):
            swap_on_every_rank(read, apply, undo)
        assert log == []

        # rank 1 fails while applying: rank 0 puts its previous plan back, both report it
        log.clear()
        with pytest.raises(MxServeError, match="previous plan serves on every rank"):
            swap_on_every_rank(lambda: plan, lambda p: apply(p, fail=rank == 1), undo)
        assert log == (["apply", "undo"] if rank == 0 else ["apply"])


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_a_plan_swap_happens_on_every_rank_or_on_none(tmp_path):
    mp.spawn(_swap_rank, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)
