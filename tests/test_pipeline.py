"""calibrate -> plan -> quantize -> eval through the CLI, on tiny models of every architecture."""

import json

import pytest

from conftest import ARCHS
from mxserve.cli import main
from mxserve.plan import Plan
from mxserve.profile import CalibrationProfile
from mxserve.schemes import get_scheme


def run(*args: str) -> int:
    return main([str(a) for a in args])


def check_plan(plan: Plan, prof: CalibrationProfile, budget: float) -> None:
    """Average bits within budget (per layer), gate == up, one scheme per block."""
    for lay, stats in zip(plan.layers, prof.layers):
        bits = params = 0.0
        for ep, es in zip(lay.experts, stats.experts):
            assert ep.gate == ep.up
            for b in ("gate", "up", "down"):
                n, k = es.shapes[b]
                bits += get_scheme(getattr(ep, b)).bits_per_weight(k) * n * k
                params += n * k
        assert bits / params <= budget + 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_full_pipeline(arch, tiny_models, calib_text, eval_text, tmp_path, capsys):
    model = tiny_models[arch]
    prof_path, plan_path, out = tmp_path / "prof.json", tmp_path / "plan.json", tmp_path / "q"
    assert (
        run(
            "calibrate",
            "--model",
            model,
            "--data",
            calib_text,
            "--method",
            "rtn",
            "--nsamples",
            8,
            "--seq-len",
            128,
            "--quiet",
            "--out",
            prof_path,
        )
        == 0
    )
    prof = CalibrationProfile.load(str(prof_path))
    assert prof.model_type == arch
    lay = prof.layers[0]
    assert abs(sum(e.freq for e in lay.experts if not e.shared) - lay.top_k) < 1e-6
    for e in lay.experts:
        assert e.err["down"]["bf16"] == 0.0 or e.err["down"]["bf16"] < e.err["down"]["w2a16g128"]
        assert e.err["down"]["w2a16g128"] > e.err["down"]["w4a16g128"] > e.err["down"]["w8a16"]

    assert run("plan", "--profile", prof_path, "--budget", "3.25bit", "--out", plan_path) == 0
    printed = capsys.readouterr().out
    assert "frontier" in printed and "<- plan" in printed
    plan = Plan.load(str(plan_path))
    check_plan(plan, prof, 3.25)
    assert len(plan.scheme_names()) > 1  # a mixed plan, not a uniform one

    assert run("quantize", "--model", model, "--plan", plan_path, "--quiet", "--out", out) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxmoe"
    assert run("eval", "--model", out, "--data", eval_text, "--ctx", 128, "--max-tokens", 1024, "--quiet") == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "ppl" in line and "mxmoe rtn" in line
    ppl_q = float(line.split("ppl ")[1].split()[0])

    # the quantized checkpoint holds what the in-memory quantization gives
    assert (
        run(
            "eval",
            "--model",
            model,
            "--plan",
            plan_path,
            "--data",
            eval_text,
            "--ctx",
            128,
            "--max-tokens",
            1024,
            "--quiet",
        )
        == 0
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(line.split("ppl ")[1].split()[0]) == pytest.approx(ppl_q, rel=1e-4)


def test_gptq_had_pipeline(tiny_models, calib_text, eval_text, tmp_path, capsys):
    model = tiny_models["qwen2_moe"]
    prof, plan, out = tmp_path / "p.json", tmp_path / "plan.json", tmp_path / "q"
    assert (
        run(
            "calibrate",
            "--model",
            model,
            "--data",
            calib_text,
            "--method",
            "gptq-had",
            "--nsamples",
            8,
            "--seq-len",
            128,
            "--schemes",
            "bf16,w4a16g128,w2a16g128,w4a4",
            "--quiet",
            "--out",
            prof,
        )
        == 0
    )
    assert run("plan", "--profile", prof, "--budget", "3", "--granularity", "model", "--r", "0.5", "--out", plan) == 0
    assert Plan.load(str(plan)).method == "gptq-had"
    assert run("quantize", "--model", model, "--plan", plan, "--nsamples", 8, "--quiet", "--out", out) == 0
    assert run("eval", "--model", out, "--data", eval_text, "--ctx", 128, "--max-tokens", 512, "--quiet") == 0
    assert "mxmoe gptq-had" in capsys.readouterr().out


def test_uniform_eval(tiny_models, calib_text, eval_text, capsys):
    """Uniform bf16 is the unquantized model; uniform w2 is not. (Random weights: no ordering claim.)"""
    model = tiny_models["mixtral"]
    common = ("--data", eval_text, "--ctx", 128, "--max-tokens", 1024, "--quiet")
    assert run("eval", "--model", model, *common) == 0
    base = float(capsys.readouterr().out.split("ppl ")[1].split()[0])
    ppl = {}
    for scheme in ("bf16", "w2a16g128"):
        assert (
            run("eval", "--model", model, "--uniform", scheme, "--method", "gptq", "--calib-data", calib_text, *common)
            == 0
        )
        line = capsys.readouterr().out.strip()
        assert f"uniform {scheme} gptq" in line
        ppl[scheme] = float(line.split("ppl ")[1].split()[0])
    assert ppl["bf16"] == pytest.approx(base, rel=1e-5)
    assert ppl["w2a16g128"] != pytest.approx(base, rel=1e-4)


def test_refmoe_plans_respect_budget_and_tying(tmp_path, shared_data, capsys):
    """The reference model's profile: every budget's plan stays within budget, gate == up."""
    from conftest import REFMOE

    prof_path = tmp_path / "refmoe.json"
    assert run("calibrate", "--model", REFMOE, "--data", shared_data / "shakespeare-calib.txt",
               shared_data / "python-calib.txt", "--method", "rtn", "--nsamples", 8, "--quiet",
               "--out", prof_path) == 0
    prof = CalibrationProfile.load(str(prof_path))
    assert len(prof.layers) == 6 and len(prof.layers[0].experts) == 18  # 16 routed + 2 shared slices
    for budget, granularity in (("2.25", "layer"), ("3.25", "layer"), ("4.25", "model")):
        out = tmp_path / f"plan-{budget}.json"
        assert run("plan", "--profile", prof_path, "--budget", budget, "--granularity", granularity,
                   "--out", out) == 0
        plan = Plan.load(str(out))
        if granularity == "layer":
            check_plan(plan, prof, float(budget))
        assert plan.summary["avg_bits"] <= float(budget) + 1e-9
        assert all(e.gate == e.up for lay in plan.layers for e in lay.experts)
    capsys.readouterr()
