"""`mxserve launch --tp 2` and `--ep 2` on two GPUs: issue 14's acceptance on a tiny model.

Needs 2 CUDA GPUs and sglang (on a lent 2-GPU machine: the bundle of ../shared/device); skipped
otherwise. The tiny Qwen2-MoE has 256 columns of down per expert, so 128 per rank at TP 2: whole
groups of 128 for the grouped schemes.
"""

import json
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_sglang_gpu import greedy_texts, mxserve_cmd, serving

from conftest import build_tiny
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


def tiny(tmp_path) -> str:
    return str(build_tiny("qwen2_moe", tmp_path / "src", moe_intermediate_size=256))


@pytest.mark.parametrize("flags", LAYOUTS)
def test_two_gpus_give_the_one_gpu_greedy_text(flags, tmp_path):
    pytest.importorskip("sglang")
    src = tiny(tmp_path)
    plan = Plan.uniform("tiny", "qwen2_moe", layout(moe_layers(load_model(src))), get_scheme("bf16"), "rtn")
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


@pytest.mark.parametrize("flags", LAYOUTS)
def test_a_forced_replan_swaps_on_both_ranks_without_a_failed_request(flags, tmp_path):
    pytest.importorskip("sglang")
    import openai

    src = tiny(tmp_path)
    port = 33000 + os.getpid() % 1000
    cmd = mxserve_cmd(src, port, "tiny") + ["--budget", "4.25bit", "--method", "rtn", "--calib-samples", "8",
                                            "--replan-interval", "0", *flags]  # fmt: skip
    with serving(cmd, port, str(tmp_path / "server.log")) as base:
        admin = f"http://127.0.0.1:{port + 1}"
        served = _json(admin + "/mxserve/plan")
        new = json.loads(json.dumps(served))
        experts = new["layers"][0]["experts"]
        b = next(i for i, e in enumerate(experts) if not e["shared"] and e["gate"] != experts[0]["gate"])
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
