"""The runtime MoE layer against the models' own MoE blocks."""

import pytest
import torch

from conftest import ARCHS
from mxserve.checkpoint import install_layers, layout, quantize_layers
from mxserve.models.adapters import join_shared, moe_layers
from mxserve.models.loading import load_model
from mxserve.plan import Plan
from mxserve.schemes import get_scheme


def _hidden(view, n=64, seed=0):
    return torch.randn(1, n, view.hidden, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_runtime_layer_equals_original(arch, tiny_models):
    model = load_model(str(tiny_models[arch]))
    views = moe_layers(model)
    inputs = [_hidden(v, seed=i) for i, v in enumerate(views)]
    with torch.no_grad():
        expected = [v.module(x) for v, x in zip(views, inputs)]
    plan = Plan.uniform("m", arch, layout(views), get_scheme("bf16"), "rtn")
    layers = install_layers(model, quantize_layers(model, plan, progress=False))
    assert len(layers) == len(views) > 0
    with torch.no_grad():
        for mx, x, y in zip(layers, inputs, expected):
            torch.testing.assert_close(mx(x), y)
            snap = mx.counter.snapshot()
            assert snap.tokens == 64 and sum(snap.counts) == 64 * views[0].top_k
            assert snap.forwards == 1 and snap.forward_hist[6] == 1  # 64 tokens: the le=64 bucket


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_shared_expert_slices_add_up(arch, tiny_models):
    model = load_model(str(tiny_models[arch]))
    view = moe_layers(model)[0]
    experts = view.experts()
    assert view.n_shared() == 2  # shared intermediate 256 = 2 x routed 128
    x = _hidden(view)[0]
    from mxserve.models.adapters import expert_mlp

    with torch.no_grad():
        whole = view.shared_mlp(x)
        parts = sum(expert_mlp(x, e.gate, e.up, e.down) for e in experts[view.n_routed :])
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)


def test_shared_slices_join_back_into_the_model_mlp(tiny_models):
    """The SGLang engine runs a bf16 shared expert as one MLP again: the joined slices are its weights."""
    model = load_model(str(tiny_models["qwen2_moe"]))
    views = moe_layers(model)
    view = views[0]
    plan = Plan.uniform("m", "qwen2_moe", layout(views), get_scheme("bf16"), "rtn")
    slices = [qe for qe in quantize_layers(model, plan, progress=False)[0] if qe.shared]
    assert len(slices) == 2
    gate_up, down = join_shared([qe.gate_up.qweight for qe in slices], [qe.down.qweight for qe in slices])
    m = view.shared_mlp
    torch.testing.assert_close(gate_up.float(), torch.cat([m.gate_proj.weight, m.up_proj.weight]).bfloat16().float())
    torch.testing.assert_close(down.float(), m.down_proj.weight.bfloat16().float())


def test_padded_slots_route_and_count_nowhere(tiny_models):
    """SGLang marks a padded token's top-k with -1: no expert output, no count."""
    model = load_model(str(tiny_models["olmoe"]))
    views = moe_layers(model)
    view = views[0]
    plan = Plan.uniform("m", "olmoe", layout(views), get_scheme("bf16"), "rtn")
    mx = install_layers(model, quantize_layers(model, plan, progress=False))[0].mx
    x = _hidden(view, n=4)[0]
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [-1, -1]])
    w = torch.full((4, 2), 0.5)
    with torch.no_grad():
        out = mx.forward(x, ids, w)
    snap = mx.counter.snapshot()
    assert snap.tokens == 3 and snap.counts[:4] == [1, 2, 2, 1] and sum(snap.counts) == 6
    assert out[3].abs().max() == 0 and out[:3].abs().amax(dim=-1).min() > 0


def test_mixed_plan_changes_output_boundedly(tiny_models):
    model = load_model(str(tiny_models["qwen2_moe"]))
    views = moe_layers(model)
    x = _hidden(views[0])
    with torch.no_grad():
        ref = views[0].module(x)
    plan = Plan.uniform("m", "qwen2_moe", layout(views), get_scheme("w4a16g128"), "rtn")
    for e in plan.layers[0].experts[::2]:
        e.down = "w8a8fp8"
    layers = install_layers(model, quantize_layers(model, plan, progress=False))
    schemes = {qe.scheme_names() for qe in layers[0].experts_q}
    assert schemes == {("w4a16g128", "w4a16g128"), ("w4a16g128", "w8a8fp8")}
    with torch.no_grad():
        out = layers[0](x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.2


def test_deepseek_router_of_transformers_5_12_is_wrapped(tiny_models):
    """SGLang 0.5.15 pins transformers 5.12, whose DeepSeek-V2 block has a plain Linear gate and
    routes itself; the view wraps it to route as later versions' router, under the same name."""
    from torch import nn

    from mxserve.models.adapters import MoELayerView
    from mxserve.models.configs import ARCHS as SPECS

    view = moe_layers(load_model(str(tiny_models["deepseek_v2"])))[0]

    class Block512(nn.Module):  # transformers 5.12's DeepseekV2Moe, routing as there (greedy)
        def __init__(self, block: nn.Module, factor: float):
            super().__init__()
            self.experts, self.shared_experts = block.experts, block.shared_experts
            self.gate = nn.Linear(view.hidden, view.n_routed, bias=False)
            self.gate.weight = block.gate.weight
            self.top_k, self.topk_method, self.routed_scaling_factor = view.top_k, "greedy", factor

        def route_tokens_to_experts(self, router_logits):
            probs = router_logits.view(-1, router_logits.shape[-1]).softmax(dim=-1, dtype=torch.float32)
            weights, ids = torch.topk(probs, k=self.top_k, dim=-1, sorted=False)
            return ids, weights * self.routed_scaling_factor

    old = Block512(view.module, 2.0)
    wrapped = MoELayerView(view.index, old, SPECS["deepseek_v2"])
    assert wrapped.top_k == view.top_k and "gate.weight" in dict(old.named_parameters())
    x = _hidden(view)[0]
    with torch.no_grad():
        weights, ids = wrapped.route(x)
        logits, _, _ = wrapped.router(x)
    probs = torch.softmax(x.float() @ view.router.weight.float().t(), dim=-1)
    torch.testing.assert_close(logits, x.float() @ view.router.weight.float().t())
    assert ids.shape == (x.shape[0], view.top_k)
    torch.testing.assert_close(weights, 2.0 * probs.gather(1, ids))  # the block's scaling kept
    assert MoELayerView(view.index, old, SPECS["deepseek_v2"]).router is wrapped.router  # wrapped once
