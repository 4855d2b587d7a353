"""The SGLang engine on a GPU: `mxserve launch --engine sglang` on a mixed-precision checkpoint.

Needs CUDA and sglang (on the lent GPU: the bundle of ../shared/device). The
SGLang flags are the ones the bundle was seen working with.
"""

import importlib.util
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from mxserve.checkpoint import layout, quantize_to_dir
from mxserve.models.adapters import moe_layers
from mxserve.models.loading import load_model
from mxserve.plan import Plan
from mxserve.schemes import get_scheme

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs sglang"),
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SGLANG_ARGS = os.environ.get(
    "MXSERVE_TEST_SGLANG_ARGS",
    "--attention-backend triton --sampling-backend pytorch --grammar-backend none --mem-fraction-static 0.3",
)
MIX = ("w4a16g128", "w3a16g128", "w8a8fp8", "bf16", "w2a16g128", "w8a16", "w4a4", "w1a16g128")


def mixed_plan(model) -> Plan:
    plan = Plan.uniform("tiny", "qwen2_moe", layout(moe_layers(model)), get_scheme("w4a16g128"), "rtn")
    for lay in plan.layers:
        for ep in lay.experts:
            ep.gate = ep.up = MIX[(ep.expert + lay.layer) % len(MIX)]
            ep.down = MIX[(ep.expert + lay.layer + 3) % len(MIX)]
    return plan


def test_sglang_engine_serves_mixed_checkpoint(tiny_models, tmp_path):
    import openai

    src = str(tiny_models["qwen2_moe"])
    plan = mixed_plan(load_model(src))
    assert len(plan.scheme_names()) == len(MIX)
    ckpt = str(tmp_path / "ckpt")
    quantize_to_dir(src, plan, ckpt, progress=False)
    port = 30000 + os.getpid() % 1000
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mxserve.cli", "launch", "--engine", "sglang", "--model", ckpt, "--port", str(port),
         "--served-model-name", "tiny", "--sglang-args", SGLANG_ARGS],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, MXSERVE_CACHE=str(tmp_path / "cache")),
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 420
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            assert time.time() < deadline, "server did not come up"
            try:
                if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        comp = client.completions.create(model="tiny", prompt="To be, or not", max_tokens=12, temperature=0)
        assert comp.usage.completion_tokens > 0 and comp.choices[0].text
        chunks = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True
        )
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 0
        again = client.completions.create(model="tiny", prompt="To be, or not", max_tokens=12, temperature=0)
        assert again.choices[0].text == comp.choices[0].text  # greedy is deterministic
    finally:
        proc.terminate()
        proc.wait(timeout=60)
