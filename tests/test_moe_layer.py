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
