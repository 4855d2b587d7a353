"""Expert- and tensor-parallel sharding of a mixed-precision layer (CPU: ranks simulated, their
outputs added as SGLang's all-reduce adds them)."""

import pytest
import torch

from mxkernels.reference import moe_reference
from mxserve.errors import MxServeError
from mxserve.parallel.collective import ep_local_ids
from mxserve.parallel.ranks import ep_range
from mxserve.parallel.sharding import check_ep_budget, check_tp, ep_rank_bits, rank_experts, tp_shard
from mxserve.quant.gptq import hessian
from mxserve.quant.qlinear import quantize_linear
from mxserve.runtime.moe_layer import MixedExperts, QuantizedExpert
from mxserve.schemes import get_scheme

H, INTER, ROUTED, SHARED, K = 256, 256, 8, 1, 2
# weight-only schemes of every bit width and group size, and bf16: all split by columns at TP 2
SPLITTABLE = ["w4a16g128", "w3a16g128", "w2a16g32", "w1a16g128", "w8a16", "bf16"]


def layer(gate_up_schemes, down_schemes, method="rtn", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, H, generator=gen)
    experts = []
    for e in range(ROUTED + SHARED):
        gu = torch.randn(2 * INTER, H, generator=gen) * 0.05
        d = torch.randn(H, INTER, generator=gen) * 0.05
        s1 = get_scheme(gate_up_schemes[e % len(gate_up_schemes)])
        s2 = get_scheme(down_schemes[e % len(down_schemes)])
        h1 = hessian(x) if method != "rtn" else None
        h2 = hessian(torch.randn(128, INTER, generator=gen)) if method != "rtn" else None
        experts.append(QuantizedExpert(quantize_linear(gu, s1, method, h1, 0), quantize_linear(d, s2, method, h2, 0),
                                       e >= ROUTED))  # fmt: skip
    return experts


def forward(experts, x, ids, w, scale):
    return moe_reference(x, ids, w, [e.linears() for e in experts],
                         [(e.gate_up.dequantize(), e.down.dequantize()) for e in experts], ROUTED, scale)  # fmt: skip


def inputs(seed=1, t=24):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=gen)
    w, ids = torch.topk(torch.softmax(torch.randn(t, ROUTED, generator=gen), -1), K)
    return x, ids, w, torch.sigmoid(torch.randn(t, 1, generator=gen))


@pytest.mark.parametrize("tp,group", [(2, 128), (4, 32)])  # 128 and 64 columns of down per rank
def test_tensor_parallel_shards_add_up_to_the_whole_layer(tp, group):
    schemes = [s.replace("g128", f"g{group}").replace("g32", f"g{group}") for s in SPLITTABLE]
    experts = layer(schemes, list(reversed(schemes)))
    x, ids, w, scale = inputs()
    whole = forward(experts, x, ids, w, scale)
    ranks = [forward([tp_shard(e, tp, r) for e in experts], x, ids, w, scale) for r in range(tp)]
    gate_up, down = tp_shard(experts[0], tp, 0).linears()
    assert (gate_up.n, gate_up.k, down.n, down.k) == (2 * INTER // tp, H, H, INTER // tp)
    total = torch.stack(ranks).sum(0)  # the all-reduce
    assert ((total - whole).norm() / whole.norm()).item() < 1e-5


@pytest.mark.parametrize(
    "down,tp,why",
    [
        ("w4a4", 2, "activations"),
        ("w8a8fp8", 2, "activations"),
        ("w4a16g128", 4, "whole groups of 128"),  # 64 columns per rank
        ("w1a16", 16, "32-bit words of 1-bit codes"),  # 16 columns per rank, per-channel scales
    ],
)
def test_tensor_parallel_refuses_what_cannot_split(down, tp, why):
    experts = layer(["w4a16g128"], [down])
    with pytest.raises(MxServeError, match=why):
        check_tp(experts, tp)
    check_tp(layer(["w4a16g128"], ["w4a16g128"]), 2)  # the same layer in a splittable scheme passes


def test_tensor_parallel_refuses_rotated_down_blocks():
    experts = layer(["w4a16g128"], ["w4a16g128"], method="gptq-had")
    with pytest.raises(MxServeError, match="Hadamard"):
        check_tp(experts, 2)


def test_expert_parallel_ranks_add_up_and_budget_holds_per_rank():
    plan = ["w4a16g128"] * 4 + ["w2a16g128"] * 4 + ["w4a16g128"]  # routed 0-3 at 4 bits, 4-7 at 2, shared 4
    experts = layer(plan, plan)
    x, ids, w, scale = inputs(seed=3)
    whole = forward(experts, x, ids, w, scale)
    parts = []
    for rank in range(2):
        mine = torch.isin(ids, torch.tensor(list(ep_range(ROUTED, 2, rank))))
        out = forward(experts, x, ids, w * mine, scale)  # other ranks' experts get no weight here
        if rank:  # the shared expert runs on rank 0 only
            out = out - forward(experts, x, ids, torch.zeros_like(w), scale)
        parts.append(out)
    assert ((torch.stack(parts).sum(0) - whole).norm() / whole.norm()).item() < 1e-5
    bits = ep_rank_bits(experts, ROUTED, 2)
    assert bits[0] > 4 > bits[1] > 2
    total = sum(bits) / 2
    check_ep_budget(experts, ROUTED, 2, bits[0])  # the tighter rank's bits: fits
    with pytest.raises(MxServeError, match="rank 0 of --ep 2 would hold"):
        check_ep_budget(experts, ROUTED, 2, total + 0.01)  # fits on average, not on rank 0
    with pytest.raises(MxServeError, match="do not split evenly"):
        ep_range(ROUTED, 3, 0)


def _rank_bits(plan, prof, ep):
    """Per (layer, rank): average bits of the rank's routed experts and the shared ones."""
    out = []
    for lay, st in zip(plan.layers, prof.layers):
        per = st.n_routed // ep
        for rank in range(ep):
            bits = params = 0.0
            for xp, xs in zip(lay.experts, st.experts):
                if not xs.shared and xs.expert // per != rank:
                    continue
                for block in ("gate", "up", "down"):
                    n, k = xs.shapes[block]
                    bits += xp.scheme(block).bits_per_weight(k) * n * k
                    params += n * k
            out.append(bits / params)
    return out


def test_expert_parallel_plan_keeps_the_budget_on_every_rank(capsys, tmp_path):
    from test_planner import synthetic_profile

    from mxserve.cli import main
    from mxserve.plan import Plan
    from mxserve.planner import solve_plan

    prof = synthetic_profile(freqs=(0.9, 0.8, 0.1, 0.05))  # the popular experts all land on rank 0
    plain = solve_plan(prof, 4.25).plan
    assert max(_rank_bits(plain, prof, 2)) > 4.25 + 1e-6  # the average plan overloads rank 0
    ep = solve_plan(prof, 4.25, ep=2).plan
    assert max(_rank_bits(ep, prof, 2)) <= 4.25 + 1e-6 and ep.summary["ep"] == 2
    assert ep.summary["avg_bits"] <= 4.25 + 1e-6
    # the CLI: same plan from `mxserve plan --ep 2`, and an uneven split is a clear error
    prof.save(tmp_path / "p.json")
    assert main(["plan", "--profile", str(tmp_path / "p.json"), "--budget", "4.25", "--ep", "2",
                 "--out", str(tmp_path / "plan.json")]) == 0  # fmt: skip
    assert Plan.load(str(tmp_path / "plan.json")).to_json()["layers"] == ep.to_json()["layers"]
    assert main(["plan", "--profile", str(tmp_path / "p.json"), "--budget", "4.25", "--ep", "3",
                 "--out", str(tmp_path / "x.json")]) == 2  # fmt: skip
    assert "do not split evenly over 3 ranks" in capsys.readouterr().err


@pytest.mark.parametrize("ep,tp", [(2, 1), (1, 2), (2, 2)])
def test_each_rank_of_sglang_moe_groups_adds_up_to_the_layer(ep, tp):
    """What the SGLang method runs on each of ep x tp ranks (router ids mapped to the rank's experts,
    -1 elsewhere, as SGLang's dispatcher maps them) sums to the whole layer."""
    schemes = ["w4a16g128", "w2a16g32", "bf16", "w8a16"]
    experts = layer(schemes, list(reversed(schemes)))
    x, ids, w, scale = inputs(seed=5)
    whole = forward(experts, x, ids, w, scale)
    parts = []
    for er in range(ep):
        for tr in range(tp):
            local, n_local = rank_experts(experts, ROUTED, 0, er, ep, tr, tp)
            assert n_local == ROUTED // ep and len(local) == n_local + (SHARED if er == 0 else 0)
            assert local[0].down.k == INTER // tp
            parts.append(MixedExperts(0, n_local, local).forward(x, ep_local_ids(ids, ROUTED, er, ep), w, scale))
    assert ((torch.stack(parts).sum(0) - whole).norm() / whole.norm()).item() < 1e-5


def test_rank_experts_refuses_the_whole_layer_on_every_rank():
    experts = layer(["w4a16g128"], ["w4a16g128"] * (ROUTED - 1) + ["w8a8fp8", "w4a16g128"])  # expert 7's down
    for er in range(2):  # rank 0 does not hold expert 7, and refuses all the same
        with pytest.raises(MxServeError, match="expert 7 down"):
            rank_experts(experts, ROUTED, 0, er, 2, 0, 2)


def test_tensor_parallel_plan_keeps_to_splittable_down_schemes(tmp_path):
    import dataclasses

    from test_planner import synthetic_profile

    from mxserve.planner import solve_plan

    prof = synthetic_profile()  # down blocks of 128 columns: 64 per rank at --tp 2, not whole groups of 128
    plain = solve_plan(prof, 4.25).plan
    assert any(ep.down.endswith("g128") for lay in plain.layers for ep in lay.experts)
    tp = solve_plan(prof, 4.25, tp=2).plan
    downs = {ep.down for lay in tp.layers for ep in lay.experts}
    assert downs <= {"bf16", "w8a16"} and tp.summary["tp"] == 2 and tp.summary["avg_bits"] <= 4.25 + 1e-6
    assert any(ep.gate.endswith("g128") for lay in tp.layers for ep in lay.experts)  # rows split: any scheme
    rotated = dataclasses.replace(prof, method="gptq-had")  # no rotated down block splits: bf16 only
    with pytest.raises(MxServeError, match="infeasible"):
        solve_plan(rotated, 4.25, tp=2)
    from mxserve.cli import main
    from mxserve.plan import Plan

    prof.save(tmp_path / "p.json")  # the same from `mxserve plan --tp 2`
    assert main(["plan", "--profile", str(tmp_path / "p.json"), "--budget", "4.25", "--tp", "2",
                 "--out", str(tmp_path / "plan.json")]) == 0  # fmt: skip
    assert Plan.load(str(tmp_path / "plan.json")).to_json()["layers"] == tp.to_json()["layers"]


def test_one_rank_counts_the_routers_global_ids_for_the_whole_layer():
    """Over several GPUs the exporting rank counts the router's ids before SGLang's dispatcher maps
    them to its own experts, and reports every block of the layer, as one GPU would."""
    from types import SimpleNamespace

    from mxserve.parallel.stats import CountingDispatcher, WholeLayer
    from router_stats.metrics import precision_of

    experts = layer(["w4a16g128", "w2a16g128", "bf16"], ["w3a16g128"])
    x, ids, w, _ = inputs(seed=7)
    ids[:3] = -1  # padded rows (CUDA-graph padding) count nowhere

    class Standard:  # SGLang's StandardDispatcher under --ep 2, on rank 1: ids mapped to its experts
        name = "standard"

        def dispatch(self, hidden_states, topk_output):
            return SimpleNamespace(hidden_states=hidden_states,
                                   topk_ids=ep_local_ids(topk_output.topk_ids, ROUTED, 1, 2))

    view = WholeLayer(3, ROUTED, experts)
    dispatcher = CountingDispatcher(Standard(), view.counter)
    out = dispatcher.dispatch(hidden_states=x, topk_output=SimpleNamespace(topk_ids=ids))
    assert dispatcher.name == "standard" and (out.topk_ids < ROUTED // 2).all()  # the rank's own view
    snap = view.counter.snapshot()
    valid = ids[ids >= 0]
    assert snap.counts == torch.bincount(valid, minlength=ROUTED).tolist()
    whole = MixedExperts(3, ROUTED, experts)
    assert precision_of([view], 4.0, "rtn") == precision_of([whole], 4.0, "rtn")
    assert all(ql.qweight.numel() == 0 for e in view.experts_q for ql in e.linears())  # no weights held
    whole.counting = False  # what the plugin sets on every rank: its own ids are not the layer's
    whole.forward(x, ids, w)
    assert sum(whole.counter.snapshot().counts) == 0


def test_a_plan_the_gpus_cannot_serve_is_refused_before_serving():
    """`mxserve launch --tp/--ep` checks a plan made elsewhere (--plan, a quantized checkpoint)
    against the layout from the model's shapes alone, naming the layer and block."""
    from types import SimpleNamespace

    from mxserve.parallel.sharding import check_plan_layout
    from mxserve.plan import Plan

    lay = [(0, [False] * ROUTED + [True] * SHARED)]
    views = [SimpleNamespace(index=0, hidden=H, intermediate=INTER, n_routed=ROUTED)]
    plan = Plan.uniform("m", "qwen2_moe", lay, get_scheme("w4a16g128"), "gptq")
    check_plan_layout(plan, views, 2, 1)  # 128 columns of down per rank: whole groups
    check_plan_layout(plan, views, 1, 2)
    with pytest.raises(MxServeError, match="layer 0 expert 0 down .* whole groups of 128"):
        check_plan_layout(plan, views, 4, 1)  # 64 columns per rank
    rotated = Plan.uniform("m", "qwen2_moe", lay, get_scheme("w4a16g128"), "gptq-had")
    with pytest.raises(MxServeError, match="Hadamard"):
        check_plan_layout(rotated, views, 2, 1)
    check_plan_layout(rotated, views, 1, 2)  # whole experts per GPU keep the rotation
    skewed = Plan.uniform("m", "qwen2_moe", lay, get_scheme("w4a16g128"), "gptq")
    skewed.budget_bits = 3.25
    for ep in skewed.layers[0].experts[ROUTED // 2 : ROUTED]:
        ep.gate = ep.up = ep.down = "w2a16g128"  # rank 1 at 2 bits, rank 0 (and the shared) at 4
    with pytest.raises(MxServeError, match="rank 0 of --ep 2 would hold 4.250 bits"):
        check_plan_layout(skewed, views, 1, 2)


def test_launch_checks_a_quantized_checkpoints_plan_against_the_gpus(tiny_models, tmp_path):
    from argparse import Namespace

    from mxserve.checkpoint import layout, quantize_to_dir
    from mxserve.cli import check_given_plan_layout
    from mxserve.models.adapters import moe_layers
    from mxserve.models.loading import load_model
    from mxserve.plan import Plan

    src = str(tiny_models["qwen2_moe"])  # down blocks of 128 columns
    plan = Plan.uniform("m", "qwen2_moe", layout(moe_layers(load_model(src))), get_scheme("w4a16g128"), "rtn")
    quantize_to_dir(src, plan, str(tmp_path), progress=False)
    check_given_plan_layout(Namespace(model=str(tmp_path), plan=None, ep=2), 1)  # whole experts per GPU
    with pytest.raises(MxServeError, match="64 columns per rank are not whole groups of 128"):
        check_given_plan_layout(Namespace(model=str(tmp_path), plan=None, ep=1), 2)
