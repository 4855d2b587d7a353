"""Bad input gives one line on stderr and exit code 2, never a traceback."""

import json
import subprocess
import sys

import pytest

from conftest import build_tiny
from mxserve.cli import main


def run_err(capsys, *args) -> str:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse rejects a flag
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    return err


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mxserve: error:"), err
    return lines[0]


@pytest.fixture(scope="module")
def profile(tiny_models, calib_text, tmp_path_factory):
    p = tmp_path_factory.mktemp("prof") / "p.json"
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(tiny_models["olmoe"]),
                "--data",
                str(calib_text),
                "--method",
                "rtn",
                "--schemes",
                "bf16,w4a16g128,w2a16g128",
                "--nsamples",
                "4",
                "--seq-len",
                "128",
                "--quiet",
                "--out",
                str(p),
            ]
        )
        == 0
    )
    return p


def test_unknown_scheme(capsys, tiny_models, calib_text, tmp_path):
    err = run_err(
        capsys,
        "calibrate",
        "--model",
        tiny_models["olmoe"],
        "--data",
        calib_text,
        "--schemes",
        "w5a16",
        "--out",
        tmp_path / "p.json",
    )
    assert "unknown scheme 'w5a16'" in one_line(err)


def test_unknown_uniform_scheme(capsys, tiny_models, eval_text):
    assert "unknown scheme" in one_line(
        run_err(capsys, "eval", "--model", tiny_models["olmoe"], "--data", eval_text, "--uniform", "int4")
    )


def test_bad_budget_string(capsys, profile, tmp_path):
    assert "bad budget 'fourbit'" in one_line(
        run_err(capsys, "plan", "--profile", profile, "--budget", "fourbit", "--out", tmp_path / "x.json")
    )


def test_infeasible_budget(capsys, profile, tmp_path):
    err = one_line(run_err(capsys, "plan", "--profile", profile, "--budget", "2bit", "--out", tmp_path / "x.json"))
    assert "infeasible" in err and "2.25" in err
    assert not (tmp_path / "x.json").exists()


def test_budget_above_bf16(capsys, profile, tmp_path):
    assert "above bf16" in one_line(
        run_err(capsys, "plan", "--profile", profile, "--budget", "17bit", "--out", tmp_path / "x.json")
    )


def test_missing_profile(capsys, tmp_path):
    err = one_line(
        run_err(capsys, "plan", "--profile", tmp_path / "none.json", "--budget", "4", "--out", tmp_path / "x.json")
    )
    assert "does not exist" in err


@pytest.mark.parametrize(
    "content,expect",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other", "version": 1}', "not a calibration profile"),
        ('{"format": "mxmoe-calibration", "version": 1}', "corrupt"),
        ('{"format": "mxmoe-calibration", "version": 9}', "version 9"),
    ],
)
def test_corrupt_profile(capsys, tmp_path, content, expect):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert expect in one_line(run_err(capsys, "plan", "--profile", bad, "--budget", "4", "--out", tmp_path / "x"))


def test_every_data_format_reads_back_what_it_wrote_and_names_a_bad_file(tmp_path):
    # plan, calibration profile, kernel profile and precision ladder share one versioned JSON form (jsonio.Versioned):
    # each reads back what it saved; a file of its format with a field of the wrong kind, or of another version, is one
    # MxServeError naming what it is, not a traceback (an unknown scheme included, which the reading itself raises)
    import json

    from mxserve.costmodel import KernelProfile, ProfileEntry
    from mxserve.errors import MxServeError
    from mxserve.online.ladder import LadderMeta
    from mxserve.plan import ExpertPlan, LayerPlan, Plan
    from mxserve.profile import CalibrationProfile, ExpertStats, LayerStats

    shapes = {"gate": [512, 256], "up": [512, 256], "down": [256, 512]}
    cases = [
        (Plan("m", "qwen2_moe", "rtn", 0, 4.0, 1.0, 64, "layer",
              [LayerPlan(0, [ExpertPlan(0, False, "w4a16g128", "w4a16g128", "bf16")])]), "layers", "plan"),
        (CalibrationProfile("m", "qwen2_moe", "rtn", ["bf16"], 64, 512, ["d.txt"], 0, [LayerStats(
            0, 1, 1, 1.0, [ExpertStats(0, False, shapes, 1.0, 64, 64, {b: {"bf16": 0.0} for b in shapes})])]),
         "layers", "calibration profile"),
        (KernelProfile("H100", [ProfileEntry("w4a16g128", 2048, 1408, 8, 1e-5)]), "entries", "kernel profile"),
        (LadderMeta("qwen2_moe", "rtn", 0, ["bf16"], [], 4, [{"layer": 0, "shared": [False]}]), "layers",
         "precision ladder"),
    ]  # fmt: skip
    for obj, field, what in cases:
        path = tmp_path / f"{type(obj).__name__}.json"
        obj.save(str(path))
        assert type(obj).load(str(path)) == obj
        good = json.loads(path.read_text())
        for bad, says in (({**good, field: 7}, "is corrupt"), ({**good, "version": 9}, "version 9")):
            path.write_text(json.dumps(bad))
            with pytest.raises(MxServeError, match=f"{what}.*{says}|{says}.*{what}"):
                type(obj).load(str(path))
    unknown = {**cases[2][0].to_json(), "entries": [{**cases[2][0].to_json()["entries"][0], "scheme": "w5a16"}]}
    (tmp_path / "kp.json").write_text(json.dumps(unknown))
    with pytest.raises(MxServeError, match="kernel profile file .* is corrupt"):
        KernelProfile.load(str(tmp_path / "kp.json"))


def test_missing_and_corrupt_plan(capsys, tiny_models, tmp_path):
    err = one_line(
        run_err(
            capsys, "quantize", "--model", tiny_models["olmoe"], "--plan", tmp_path / "no.json", "--out", tmp_path / "q"
        )
    )
    assert "does not exist" in err
    bad = tmp_path / "plan.json"
    bad.write_text('{"format": "mxmoe-plan", "version": 1, "layers": [{"layer": 0}]}')
    assert "corrupt" in one_line(
        run_err(capsys, "quantize", "--model", tiny_models["olmoe"], "--plan", bad, "--out", tmp_path / "q")
    )


def test_plan_for_another_model(capsys, profile, tiny_models, tmp_path):
    plan = tmp_path / "plan.json"
    assert main(["plan", "--profile", str(profile), "--budget", "4", "--out", str(plan)]) == 0
    capsys.readouterr()
    err = one_line(
        run_err(capsys, "quantize", "--model", tiny_models["mixtral"], "--plan", plan, "--out", tmp_path / "q")
    )
    assert "olmoe" in err and "mixtral" in err


def test_non_moe_model(capsys, tmp_path, calib_text):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path / "llama")
    err = one_line(
        run_err(capsys, "calibrate", "--model", tmp_path / "llama", "--data", calib_text, "--out", tmp_path / "p.json")
    )
    assert "llama" in err and "Qwen2-MoE" in err and "Mixtral" in err


def test_moe_architecture_without_moe_layers(capsys, tmp_path, calib_text):
    path = build_tiny("qwen2_moe", tmp_path / "dense")
    import json

    cfg = json.loads((path / "config.json").read_text())
    cfg["mlp_only_layers"] = [0, 1]  # every layer dense
    (path / "config.json").write_text(json.dumps(cfg))
    err = one_line(run_err(capsys, "calibrate", "--model", path, "--data", calib_text, "--out", tmp_path / "p"))
    assert "no MoE layer" in err


def test_missing_model_and_data(capsys, tiny_models, tmp_path, eval_text):
    assert "no config.json" in one_line(run_err(capsys, "eval", "--model", tmp_path, "--data", eval_text))
    assert "does not exist" in one_line(
        run_err(capsys, "eval", "--model", tiny_models["olmoe"], "--data", tmp_path / "missing.txt")
    )


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mxserve.cli",
            "plan",
            "--profile",
            str(tmp_path / "x.json"),
            "--budget",
            "4",
            "--out",
            str(tmp_path / "y.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("mxserve: error:") and "Traceback" not in proc.stderr


def test_old_checkpoint_format(capsys, tiny_models, tmp_path, calib_text):
    """A checkpoint of another format version says so and how to fix it."""
    import json

    from mxserve.checkpoint import layout, quantize_to_dir
    from mxserve.models.adapters import moe_layers
    from mxserve.models.loading import load_model
    from mxserve.plan import Plan
    from mxserve.schemes import get_scheme

    ckpt = tmp_path / "q"
    model = load_model(str(tiny_models["olmoe"]))
    quantize_to_dir(str(tiny_models["olmoe"]),
                    Plan.uniform("m", "olmoe", layout(moe_layers(model)), get_scheme("w4a16g128"), "rtn"),
                    str(ckpt), progress=False)
    capsys.readouterr()
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["version"] = 1
    (ckpt / "config.json").write_text(json.dumps(cfg))
    err = one_line(run_err(capsys, "eval", "--model", ckpt, "--data", calib_text))
    assert "format version 1" in err and "quantize the model again" in err


# -- start-up errors of `mxserve launch`: one line, exit 2, before any long work ----------------


def launch_err(capsys, monkeypatch, tmp_path, *args) -> str:
    import time

    monkeypatch.setenv("MXSERVE_CACHE", str(tmp_path / "cache"))  # nothing cached to lean on
    t0 = time.monotonic()
    err = one_line(run_err(capsys, "launch", "--engine", "embedded", "--port", "0", *args))
    assert time.monotonic() - t0 < 5, "a start-up error must come before any long work"
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("calib-*")), "it calibrated"
    return err


def test_launch_impossible_budget(capsys, monkeypatch, tiny_models, tmp_path):
    err = launch_err(capsys, monkeypatch, tmp_path, "--model", tiny_models["qwen2_moe"], "--budget", "0.5bit")
    assert "0.5 bits" in err and "cheapest" in err and "w1a16g128" in err


@pytest.mark.parametrize("path", ["{tmp}/no-such-model", "./no-such-model", "~/no/such/model"])
def test_launch_local_path_that_does_not_exist(capsys, monkeypatch, tmp_path, path):
    err = launch_err(capsys, monkeypatch, tmp_path, "--model", path.format(tmp=tmp_path), "--budget", "4bit")
    assert "does not exist" in err and "repo" not in err.lower()


def test_launch_unsupported_architecture(capsys, monkeypatch, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path / "llama")
    err = launch_err(capsys, monkeypatch, tmp_path, "--model", tmp_path / "llama", "--budget", "4bit")
    assert "unsupported architecture 'llama'" in err


@pytest.mark.parametrize("args,expect", [
    (["--tp", "2"], "need the SGLang engine"),
    (["--ep", "2"], "need the SGLang engine"),
])  # fmt: skip
def test_launch_parallel_errors(capsys, monkeypatch, tiny_models, tmp_path, args, expect):
    err = launch_err(capsys, monkeypatch, tmp_path, "--model", tiny_models["qwen2_moe"], "--budget", "4bit", *args)
    assert expect in err


@pytest.mark.parametrize("name, value, allowed", [("MXSERVE_DISPATCH", "per-expert", "single, grouped"),
                                                  ("MXSERVE_STREAM_K", "yes", "auto, 1, 0"),
                                                  ("MXSERVE_PDL", "true", "0 or 1"),
                                                  ("MXSERVE_FUSED_ROUTER", "off", "0 or 1"),
                                                  ("MXSERVE_TILED_CODES", "rows", "0 or 1"),
                                                  ("MXSERVE_TOPK_ROWS", "on", "0 or 1"),
                                                  ("MXSERVE_TOPK_GRID", "yes", "0 or 1"),
                                                  ("MXSERVE_ROUTER_ALIGN", "1", "option was removed"),
                                                  ("MXSERVE_DECODE_TILES", "early=yes", "an integer or true/false"),
                                                  ("MXSERVE_DECODE_TILES", "erly=1", "FIELD one of")])  # fmt: skip
def test_launch_unknown_kernel_setting(capsys, monkeypatch, tiny_models, tmp_path, name, value, allowed):
    monkeypatch.setenv(name, value)
    err = launch_err(capsys, monkeypatch, tmp_path, "--model", tiny_models["qwen2_moe"], "--budget", "4bit")
    assert f"{name}={value}" in err and allowed in err


def test_parallel_layout_and_method_checks():
    from mxserve.errors import MxServeError
    from mxserve.launch import check_parallel, parallel_method

    check_parallel(4, 2, 4)  # 2 expert-parallel groups of 2 tensor-parallel ranks
    with pytest.raises(MxServeError, match="--ep 4 must divide --tp 2"):
        check_parallel(2, 4, 8)
    with pytest.raises(MxServeError, match="--ep 2 must divide --tp 3"):
        check_parallel(3, 2, 8)
    with pytest.raises(MxServeError, match="--tp 2 needs 2 GPUs; this machine has 1"):
        check_parallel(2, 1, 1)
    assert parallel_method(None, 1) == "gptq-had" and parallel_method(None, 2) == "gptq"
    assert parallel_method("rtn", 2) == "rtn"
    with pytest.raises(MxServeError, match="use --method gptq or rtn"):
        parallel_method("gptq-had", 2)


def test_served_memory_estimate_and_refusal(tiny_models):
    from mxserve.errors import MxServeError
    from mxserve.models.loading import load_model
    from mxserve.preflight import check_gpu_memory, served_bytes, weight_params

    path = str(tiny_models["qwen2_moe"])
    model = load_model(path)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n or ".shared_expert." in n)
    total = sum(p.numel() for p in model.parameters())
    tied = model.config.tie_word_embeddings * model.get_output_embeddings().weight.numel()
    assert weight_params(path) == (experts, total - experts + tied)  # headers only, no weights read
    need = served_bytes(path, 3.25)
    assert need == int(experts * 3.25 / 8 + (total - experts + tied) * 2)
    check_gpu_memory(need, 2 * need, "m")  # fits
    with pytest.raises(MxServeError, match="needs about .* GiB of weights and the GPU has"):
        check_gpu_memory(need, need, "m")  # no room for the KV cache


def _fake_nvml(mig: bool = False):
    """NVML's calls as nvidia-ml-py makes them, over two GPUs (no GPU on this machine)."""
    from types import SimpleNamespace

    class NVMLError(Exception):
        pass

    def mig_mode(h):
        if not mig:
            raise NVMLError("Not Supported")  # what a GPU without MIG answers
        return [1, 1]

    calls = []
    return calls, SimpleNamespace(
        NVMLError=NVMLError, NVML_DEVICE_MIG_ENABLE=1,
        nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetMigMode=mig_mode,
        nvmlDeviceGetName=lambda h: b"NVIDIA H200", nvmlDeviceGetUUID=lambda h: f"GPU-{h}abc",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(free=(110 + h) * 2**30),
    )  # fmt: skip


def test_gpus_are_counted_through_nvml_without_a_cuda_context(monkeypatch):
    # the launcher would hold a CUDA context (0.5 GB of an H200) for as long as its SGLang server runs,
    # and importing torch took 3 s of its start
    import sys

    import torch

    from mxserve import preflight

    def context(*_):
        raise AssertionError("asked CUDA: a context in the launcher")

    monkeypatch.setattr(torch.cuda, "mem_get_info", context)
    monkeypatch.setattr(torch.cuda, "device_count", context)
    calls, nvml = _fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1")
    assert preflight.free_gpu_memory() == 111 * 2**30 and preflight.gpu_count() == 1
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert preflight.nvml_gpus() == preflight.Gpus(2, 110 * 2**30, ("NVIDIA H200",) * 2)
    assert calls == ["init", "shutdown"] * 3

    _, mig = _fake_nvml(mig=True)  # MIG: NVML's totals are the whole GPU's, so CUDA's answer
    monkeypatch.setitem(sys.modules, "pynvml", mig)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (7 * 2**30, 9 * 2**30))
    assert preflight.nvml_gpus() is None and preflight.free_gpu_memory() == 7 * 2**30


def test_hub_ids_are_not_taken_for_missing_paths():
    from mxserve.errors import MxServeError
    from mxserve.preflight import check_model_path

    for repo_id in ("Qwen/Qwen1.5-MoE-A2.7B", "mistralai/Mixtral-8x7B-v0.1", "gpt2"):
        check_model_path(repo_id)  # left to the hub (offline here), not refused as a path
    with pytest.raises(MxServeError, match="is a file"):
        check_model_path(__file__)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu(capsys, tiny_models, calib_text, tmp_path):
    err = one_line(run_err(capsys, "calibrate", "--model", tiny_models["olmoe"], "--data", calib_text, "--device",
                           "cuda", "--out", tmp_path / "p.json"))  # fmt: skip
    assert "no CUDA GPU" in err


def test_visible_gpus_in_cudas_order():
    # what CUDA_VISIBLE_DEVICES shows, as NVML's indices (nvml_gpus then counts them without torch)
    from mxserve.preflight import cuda_order

    uuids = ["GPU-aaaa-1", "GPU-bbbb-2", "GPU-abcd-3"]
    assert cuda_order(None, uuids) == [0, 1, 2]
    assert cuda_order("2,0", uuids) == [2, 0]
    assert cuda_order("", uuids) == []
    assert cuda_order("1,7,0", uuids) == [1]  # CUDA stops at the first invalid entry
    assert cuda_order("0,-1,2", uuids) == [0]
    assert cuda_order("1,1", uuids) == []  # a repeated GPU: CUDA shows none
    assert cuda_order("GPU-bb,GPU-abc", uuids) == [1, 2]  # UUID prefixes
    assert cuda_order("GPU-a", uuids) == []  # ambiguous: invalid
    assert cuda_order("MIG-1234", uuids) is None  # MIG instances: NVML's totals do not apply, CUDA is asked


def test_keep_stream_k_needs_a_narrow_scheme(capsys, profile, tmp_path):
    # `plan --keep-stream-k` caps each layer's 3-bit, 8-bit and bf16 weights: with none of 1, 2 and 4 bits to
    # take the rest it says so; with them the plan records its cap
    err = one_line(run_err(capsys, "plan", "--profile", profile, "--budget", "8", "--schemes", "bf16",
                           "--keep-stream-k", "--out", tmp_path / "x.json"))  # fmt: skip
    assert "--keep-stream-k needs a 1, 2 or 4-bit candidate" in err and not (tmp_path / "x.json").exists()
    assert main(["plan", "--profile", str(profile), "--budget", "4", "--keep-stream-k", "--out",
                 str(tmp_path / "y.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "y.json").read_text())["summary"]["costly_cap"] == 0.1
