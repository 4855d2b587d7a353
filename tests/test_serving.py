"""Serving: `mxserve launch` with the embedded engine, through the official openai client."""

import dataclasses
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from conftest import REFMOE, start_server
from mxserve.cli import main
from mxserve.plan import Plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def server(tmp_path_factory, mxserve_cache):
    """The README's main job, on refmoe-25m at 4 bits (RTN and few samples to keep CI fast)."""
    log = tmp_path_factory.mktemp("log") / "server.log"
    proc, base = start_server(["--model", str(REFMOE), "--budget", "4bit", "--method", "rtn", "--calib-samples", "8"],
                              mxserve_cache, log, timeout=240)
    yield base, log
    proc.terminate()
    assert proc.wait(timeout=30) is not None  # clean shutdown on SIGTERM


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def test_openai_completion_and_streamed_chat(server):
    base, log = server
    c = client(base)
    assert [m.id for m in c.models.list().data] == ["refmoe-25m"]
    r = c.completions.create(model="refmoe-25m", prompt="def main():", max_tokens=12, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    chunks = list(c.chat.completions.create(model="refmoe-25m", max_tokens=10, stream=True, temperature=0,
                                            messages=[{"role": "user", "content": "Speak, Hamlet."}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and chunks[-1].choices[0].finish_reason in ("length", "stop")
    full = c.chat.completions.create(model="refmoe-25m", max_tokens=10, temperature=0,
                                     messages=[{"role": "user", "content": "Speak, Hamlet."}])
    assert full.choices[0].message.content == text  # streaming and not streaming agree (greedy)
    # stream_options.include_usage: a last chunk with the counts and no choices, on both endpoints
    for stream in (c.completions.create(model="refmoe-25m", prompt="def main():", max_tokens=5, temperature=0,
                                        stream=True, stream_options={"include_usage": True}),
                   c.chat.completions.create(model="refmoe-25m", max_tokens=5, stream=True, temperature=0,
                                             messages=[{"role": "user", "content": "Speak."}],
                                             stream_options={"include_usage": True})):  # fmt: skip
        got = list(stream)
        assert got[-1].choices == [] and got[-1].usage.completion_tokens == 5
        assert got[-1].usage.total_tokens == got[-1].usage.prompt_tokens + 5 and got[-1].usage.prompt_tokens > 0
        assert all(ch.usage is None for ch in got[:-1])
    assert list(c.completions.create(model="refmoe-25m", prompt="x", max_tokens=2, stream=True))[-1].choices
    assert "serving refmoe-25m" in log.read_text()


@pytest.mark.parametrize("body,status,needle", [
    ('{"model": "refmoe-25m", "prompt": "hi"', 400, "not valid JSON"),
    ('{"model": "gpt-4", "prompt": "hi"}', 404, "does not exist"),
    ('{"model": "refmoe-25m", "prompt": "hi", "max_tokens": -3}', 400, "max_tokens"),
    ('{"model": "refmoe-25m", "prompt": "' + "to be " * 2000 + '", "max_tokens": 4}', 400, "context length"),
    ('{"model": "refmoe-25m"}', 400, "prompt"),
    ('{"model": "refmoe-25m", "prompt": "hi", "temperature": 9}', 400, "temperature"),
])
def test_bad_requests_get_4xx_and_server_keeps_serving(server, body, status, needle):
    base, _ = server
    r = httpx.post(base + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]
    ok = client(base).completions.create(model="refmoe-25m", prompt="x", max_tokens=2)
    assert ok.usage.completion_tokens >= 1


def test_metrics_export_routing_and_precision(server):
    base, _ = server
    client(base).completions.create(model="refmoe-25m", prompt="Enter Macbeth.", max_tokens=3)
    deadline = time.time() + 10
    while True:  # counts reach /metrics at the next fold (--stats-interval, 1 s by default)
        text = httpx.get(base + "/metrics").text
        counts = [float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith('mxserve_expert_routed_tokens_total{expert=') and 'layer="0"' in line]
        if sum(counts) > 0 or time.time() > deadline:
            break
        time.sleep(0.3)
    assert len(counts) == 16 and sum(counts) > 0
    assert 'mxserve_expert_block_scheme{block="gate_up",expert="16"' in text  # shared-expert slice
    assert "mxserve_expert_block_bits" in text and "mxserve_requests_total" in text


@torch.no_grad()
def test_greedy_bf16_plan_equals_transformers():
    from mxserve.checkpoint import install_layers, layout, quantize_layers
    from mxserve.engines.embedded import EmbeddedEngine, SamplingParams
    from mxserve.models.adapters import moe_layers
    from mxserve.models.loading import load_model, load_tokenizer
    from mxserve.schemes import get_scheme

    tok = load_tokenizer(str(REFMOE))
    prompts = ["def fibonacci(n):", "KING HENRY. Once more unto the breach", "import os\nimport sys\n"]
    ref_model = load_model(str(REFMOE))
    expected = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        out = ref_model.generate(ids, max_new_tokens=16, do_sample=False)
        expected.append(out[0, ids.shape[1]:].tolist())
    model = load_model(str(REFMOE))
    plan = Plan.uniform("refmoe", "qwen2_moe", layout(moe_layers(model)), get_scheme("bf16"), "rtn")
    install_layers(model, quantize_layers(model, plan, progress=False))
    engine = EmbeddedEngine(model, tok, 2048)

    def run(p: str) -> list[int]:
        stream = engine.generate(tok(p)["input_ids"], SamplingParams(16, temperature=0))
        return [t for t in stream if isinstance(t, int)]

    def check(outputs: list[list[int]]) -> None:
        for got, exp in zip(outputs, expected):
            assert got == exp[: len(got)] and (len(got) == 16 or exp[len(got)] in engine.eos_ids)

    try:
        check([run(p) for p in prompts])  # one at a time
        assert engine.peak_running == 1
        def abandon(p: str) -> list[int]:  # a client that goes away after two tokens
            stream = engine.generate(tok(p)["input_ids"], SamplingParams(64, temperature=0))
            first = [next(stream), next(stream)]
            stream.close()
            return first

        with ThreadPoolExecutor(len(prompts) * 2 + 1) as ex:  # together: continuous batching, left-padded cache
            left = ex.submit(abandon, "Once upon a midnight dreary, while I pondered, weak and weary")
            outs = list(ex.map(run, prompts * 2))
            assert len(left.result()) == 2
        check(outs[: len(prompts)])
        check(outs[len(prompts) :])
        assert engine.peak_running >= 2
    finally:
        engine.shutdown()


def test_api_key_is_enforced():
    from fastapi.testclient import TestClient

    from conftest import stub_engine
    from mxserve.server.api import create_app

    engine = stub_engine()
    try:
        app = TestClient(create_app(engine, "m", api_key="s3cret"))
        assert app.get("/v1/models").status_code == 401
        assert app.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert app.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert app.get("/metrics").status_code == 401
        assert app.get("/mxserve/plan").status_code == 401 and app.get("/mxserve/stats").status_code == 401
        key = {"Authorization": "Bearer s3cret"}
        r = app.get("/mxserve/plan", headers=key)  # a server started without a plan
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_plan"
        assert app.get("/mxserve/stats", headers=key).json()["routing"]["layers"] == []
        assert app.get("/health").status_code == 200
    finally:
        engine.shutdown()


def test_launch_cache_and_errors(tmp_path, monkeypatch, capsys, tiny_models, calib_text):
    from mxserve.launch import LaunchSettings, resolve_checkpoint

    monkeypatch.setenv("MXSERVE_CACHE", str(tmp_path))
    s = LaunchSettings(model=str(tiny_models["olmoe"]), budget="3bit", calib_data=[str(calib_text)], method="rtn",
                       calib_samples=4, progress=False)
    first = resolve_checkpoint(s)
    assert "calibrating" in capsys.readouterr().err
    assert resolve_checkpoint(s) == first
    err = capsys.readouterr().err
    assert "profile from cache" in err and "checkpoint from cache" in err
    # a plan priced for decode at one request and at eight (--plan-tokens 1,8): from the same profile, a new checkpoint
    priced = resolve_checkpoint(dataclasses.replace(s, r=0.25, tokens=(1, 8)))
    assert priced != first and "profile from cache" in capsys.readouterr().err
    assert Plan.load(os.path.join(priced, "mxmoe_plan.json")).summary["priced_tokens"] == [1, 8]
    with pytest.raises(SystemExit) as bad:
        main(["launch", "--model", str(tiny_models["olmoe"]), "--budget", "4bit", "--plan-tokens", "1,x"])
    assert bad.value.code == 2 and "'x' is not an integer" in capsys.readouterr().err
    for args, needle in [([], "--budget"), (["--budget", "4bit", "--engine", "sglang"], "CUDA GPU"),
                         (["--budget", "4bit", "--tp", "2"], "--tp"),
                         (["--budget", "4bit", "--engine", "embedded", "--bf16-layers", "kernel"], "SGLang engine")]:
        assert main(["launch", "--model", str(tiny_models["olmoe"]), *args]) == 2
        assert needle in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["launch", "--model", first, "--port", str(port)]) == 2
        assert "cannot listen" in capsys.readouterr().err


def test_concurrent_requests_are_batched(server):
    """Eight clients at once: each gets what it would get alone (greedy), through one decode batch."""
    base, _ = server
    c = client(base)
    prompts = ["def main():", "ROMEO. But soft,"] * 4
    alone = {p: c.completions.create(model="refmoe-25m", prompt=p, max_tokens=12, temperature=0).choices[0].text
             for p in set(prompts)}
    with ThreadPoolExecutor(len(prompts)) as ex:
        got = list(ex.map(lambda p: c.completions.create(model="refmoe-25m", prompt=p, max_tokens=12,
                                                         temperature=0).choices[0].text, prompts))
    assert got == [alone[p] for p in prompts]
    assert "mxserve_running_requests 0.0" in httpx.get(base + "/metrics").text
