"""Layer-by-layer calibration and quantization (models/layerwise.py) against the whole model."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import ARCHS
from mxserve.calibrate import capture_moe_inputs
from mxserve.checkpoint import DOWN, GATE_UP, WEIGHTS_FILE, _prefix, layout, quantize_layers, quantize_to_dir
from mxserve.errors import MxServeError
from mxserve.models.adapters import moe_layers
from mxserve.models.configs import arch_spec, stored_name
from mxserve.models.layerwise import LayerwiseModel
from mxserve.models.loading import load_model, load_tokenizer
from mxserve.plan import Plan
from mxserve.schemes import get_scheme


@pytest.mark.parametrize("arch", ARCHS)
def test_layerwise_inputs_equal_whole_model(tiny_models, arch):
    """Every MoE block sees the inputs the whole model's forward gives it, in every architecture
    (Mixtral's renamed expert weights, DeepSeek-V2's dense first layer included)."""
    path = str(tiny_models[arch])
    windows = torch.randint(0, 8000, (5, 48), generator=torch.Generator().manual_seed(1))
    model = load_model(path)
    whole = capture_moe_inputs(model, moe_layers(model), windows, batch=2, progress=False)
    run = LayerwiseModel(path)
    hidden = run.embed(windows, batch=2)
    seen = []
    for i in range(run.n_layers):
        layer = run.layer(i)
        view = run.view(i, layer)
        x = run.advance(i, layer, hidden, capture=view.module if view else None)
        if view is not None:
            seen.append(x)
    assert len(seen) == len(whole)
    for a, b in zip(seen, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _mixed_plan(path: str, arch: str, method: str) -> Plan:
    """Alternating schemes over the experts, so every scheme's blocks go through the writer."""
    plan = Plan.uniform("m", arch, layout(moe_layers(load_model(path))), get_scheme("w4a16g128"), method)
    names = ["w2a16g64", "w3a16g128", "w8a16", "bf16"]
    for lp in plan.layers:
        for j, ep in enumerate(lp.experts):
            ep.gate = ep.up = names[j % len(names)]
            ep.down = names[(j + 1) % len(names)]
    return plan


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "deepseek_v2"])
def test_layerwise_checkpoint_holds_whole_model_blocks(tiny_models, calib_text, tmp_path, arch):
    """The checkpoint written layer by layer (GPTQ, so captured inputs matter) holds exactly the
    packed blocks the whole-model quantizer produces, and every other tensor as stored."""
    path = str(tiny_models[arch])
    plan = _mixed_plan(path, arch, "gptq")
    out = tmp_path / "ckpt"
    quantize_to_dir(path, plan, str(out), data=[str(calib_text)], nsamples=4, progress=False)
    stored = load_file(str(out / WEIGHTS_FILE))
    model = load_model(path)
    whole = quantize_layers(model, plan, [str(calib_text)], load_tokenizer(path), nsamples=4, progress=False)
    spec = arch_spec(arch)
    for view, experts in zip(moe_layers(model), whole):
        for e, qe in enumerate(experts):
            for block, q in ((GATE_UP, qe.gate_up), (DOWN, qe.down)):
                for name, t in q.tensors(_prefix(view.index, e, block)).items():
                    assert torch.equal(stored[stored_name(name, spec)], t), name
    # the MoE block under the source checkpoint's (and SGLang's) name: Mixtral's block_sparse_moe
    blocks = {k.split(".")[3] for k in stored if k.startswith("model.layers.1.") and ".experts." in k}
    assert blocks == {"block_sparse_moe" if arch == "mixtral" else "mlp"}
    source = load_file(f"{path}/model.safetensors")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.o_proj.weight"):
        assert torch.equal(stored[name], source[name]), name


def test_sharded_checkpoint_reads_like_one_file(tiny_models, tmp_path):
    """A checkpoint split over several safetensors files with an index gives the same layers."""
    from transformers import AutoModelForCausalLM

    path = str(tiny_models["olmoe"])
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    one, many = LayerwiseModel(path), LayerwiseModel(str(sharded))
    for i in range(one.n_layers):
        for (k, a), (k2, b) in zip(one.layer(i).state_dict().items(), many.layer(i).state_dict().items()):
            assert k == k2 and torch.equal(a, b), k


def test_missing_or_pickled_weights_are_clear_errors(tiny_models, tmp_path):
    src = tiny_models["qwen3_moe"]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(src / "config.json", pickled / "config.json")
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(MxServeError, match="no .safetensors weights"):
        LayerwiseModel(str(pickled))

    partial = tmp_path / "partial"
    shutil.copytree(src, partial)
    tensors = load_file(str(partial / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(tensors, str(partial / "model.safetensors"))
    run = LayerwiseModel(str(partial))
    run.layer(0)
    with pytest.raises(MxServeError, match="layer 1 has incomplete expert weights"):
        run.layer(1)


def test_cli_logs_each_phase_with_time_and_memory(tiny_models, calib_text, tmp_path):
    """`mxserve calibrate` and `quantize` log one parseable phase line each (benchmarks read it)."""
    import subprocess
    import sys

    from conftest import ROOT
    from mxserve.phases import parse_phases

    path = str(tiny_models["qwen2_moe"])
    prof, plan, out = tmp_path / "p.json", tmp_path / "plan.json", tmp_path / "ckpt"
    cmds = [["calibrate", "--model", path, "--data", str(calib_text), "--nsamples", "4", "--method", "gptq",
             "--out", str(prof)],
            ["plan", "--profile", str(prof), "--budget", "4.25bit", "--out", str(plan)],
            ["quantize", "--model", path, "--plan", str(plan), "--nsamples", "4", "--out", str(out)]]  # fmt: skip
    text = ""
    for c in cmds:
        r = subprocess.run([sys.executable, "-m", "mxserve.cli", *c], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        text += r.stdout
    phases = parse_phases(text)
    assert set(phases) == {"calibrate", "quantize"}
    for rec in phases.values():
        assert rec.seconds > 0 and rec.peak_host_gib > 0.1  # a Python process with torch holds far more than 100 MiB
        assert (rec.peak_gpu_gib is None) == (not torch.cuda.is_available())
