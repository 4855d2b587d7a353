"""`mxserve launch --tp 2` and `--ep 2` on two GPUs: issue 14's acceptance.

Needs 2 CUDA GPUs and sglang (on a lent 2-GPU machine: the bundle of ../shared/device); skipped
otherwise. Each test runs on a tiny Qwen2-MoE (256 columns of down per expert, so 128 per rank at TP 2:
whole groups of 128 for the grouped schemes), on refmoe-25m where its weights are on the machine (the
GPU machine gets them from a call of their own: MXSERVE_REFMOE_WEIGHTS=1 scripts/device_prep.sh), and on each model
directory MXSERVE_MULTIGPU_MODELS names (comma-separated; scripts/device_runs.sh phase 42 passes a
random-weight model of Qwen1.5-MoE-A2.7B's shapes).
"""

import json
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_sglang_gpu import greedy_texts, mxserve_cmd, serving

from conftest import REFMOE, build_tiny
from mxserve.checkpoint import layout, quantize_to_dir
from mxserve.models.adapters import moe_layers
from mxserve.models.loading import load_model
from mxserve.plan import Plan
from mxserve.schemes import get_scheme

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]
LAYOUTS = [["--tp", "2"], ["--ep", "2"]]  # experts split over both GPUs; whole experts on each
MODELS = [
    pytest.param("tiny", id="tiny"),
    pytest.param(str(REFMOE), id="refmoe-25m", marks=pytest.mark.skipif(
        not (REFMOE / "model.safetensors").exists(), reason="refmoe-25m's weights are not on this machine")),
    *(pytest.param(m, id=os.path.basename(m.rstrip("/")))
      for m in os.environ.get("MXSERVE_MULTIGPU_MODELS", "").split(",") if m),
]  # fmt: skip


def source(model: str, tmp_path) -> str:
    """The model directory: the tiny model built here, or a given one."""
    return str(build_tiny("qwen2_moe", tmp_path / "src", moe_intermediate_size=256)) if model == "tiny" else model


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("flags", LAYOUTS)
def test_two_gpus_give_the_one_gpu_greedy_text(flags, model, tmp_path):
    pytest.importorskip("sglang")
    src = source(model, tmp_path)
    loaded = load_model(src)
    plan = Plan.uniform("tiny", loaded.config.model_type, layout(moe_layers(loaded)), get_scheme("bf16"), "rtn")
    del loaded
    ckpt = str(tmp_path / "ckpt")
    quantize_to_dir(src, plan, ckpt, progress=False)
    port = 32000 + os.getpid() % 1000
    with serving(mxserve_cmd(ckpt, port, "tiny"), port, str(tmp_path / "one.log")) as base:
        want = greedy_texts(base, "tiny", batched=False)
    with serving(mxserve_cmd(ckpt, port, "tiny") + flags, port, str(tmp_path / "two.log")) as base:
        got = greedy_texts(base, "tiny", batched=False)
    assert got == want


def _json(url: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("flags", LAYOUTS)
def test_a_forced_replan_swaps_on_both_ranks_without_a_failed_request(flags, model, tmp_path):
    pytest.importorskip("sglang")
    import openai

    src = source(model, tmp_path)
    port = 33000 + os.getpid() % 1000
    cmd = mxserve_cmd(src, port, "tiny") + ["--budget", "4.25bit", "--method", "rtn", "--calib-samples", "8",
                                            "--replan-interval", "0", *flags]  # fmt: skip
    with serving(cmd, port, str(tmp_path / "server.log")) as base:
        admin = f"http://127.0.0.1:{port + 1}"
        served = _json(admin + "/mxserve/plan")
        new = json.loads(json.dumps(served))
        experts = new["layers"][0]["experts"]
        # expert 0 and one of the later half (the other rank's under --ep 2) trade schemes, so both ranks swap
        routed = [i for i, e in enumerate(experts) if not e["shared"]]
        b = next(i for i in routed[len(routed) // 2:] if experts[i]["gate"] != experts[0]["gate"])
        for f in ("gate", "up", "down"):
            experts[0][f], experts[b][f] = experts[b][f], experts[0][f]  # same bits, other experts
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)

        def ask(i: int) -> str:
            return client.completions.create(model="tiny", prompt=f"{i} To be, or not", max_tokens=32,
                                             temperature=0).choices[0].text  # fmt: skip

        with ThreadPoolExecutor(8) as ex:
            answers = [ex.submit(ask, i) for i in range(32)]
            out = _json(admin + "/mxserve/plan", new)
            texts = [a.result() for a in answers]  # raises if any request failed
        assert out["outcome"] == "applied", out
        assert all(texts)
        now = _json(admin + "/mxserve/plan")
        assert now["layers"][0]["experts"][0]["gate"] == new["layers"][0]["experts"][0]["gate"]
        stats = _json(admin + "/mxserve/stats")  # rank 0's export: the whole layer, the new schemes
        blocks = {(lay, e, blk): s for lay, e, blk, s in stats["precision"]["blocks"]}
        assert blocks[(0, 0, "gate_up")] == new["layers"][0]["experts"][0]["gate"]
        assert len(blocks) == sum(2 * len(lay["experts"]) for lay in new["layers"])
