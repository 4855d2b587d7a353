"""The SGLang engine on a GPU: `mxserve launch --engine sglang` on a mixed-precision checkpoint.

Needs CUDA and sglang (on the lent GPU: the bundle of ../shared/device). The
SGLang flags are the ones the bundle was seen working with. With
``MXSERVE_TEST_SERVER_LOGS=FILE`` every server's whole log is appended to FILE.
"""

import contextlib
import importlib.util
import math
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import GLUON_MIX, MIX, mixed_plan, sglang_tiny
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
# A small KV cache: SGLang refuses to start when memory that others took while it loaded leaves
# less than its fraction; with every server's cache this small, test runs can share the GPU
# (two side by side failed at 0.3 without it).
SGLANG_ARGS = os.environ.get(
    "MXSERVE_TEST_SGLANG_ARGS",
    "--attention-backend triton --sampling-backend pytorch --grammar-backend none --mem-fraction-static 0.3 "
    "--max-total-tokens 16384",
)
ARCHS = ["qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v2"]


def failure_report(log_path: str, tail: int = 3000) -> str:
    """What a dead server's log says: its first traceback or fatal error (a crashed scheduler's
    thread dumps would push it out of a plain tail), then the log's end."""
    text = open(log_path, errors="replace").read()
    starts = [i for i in (text.find("Traceback"), text.find("Fatal Python error")) if i >= 0]
    first = text[min(starts) : min(starts) + 4000] if starts else ""
    return f"{first}\n...\n{text[-tail:]}" if first and min(starts) < len(text) - tail else text[-tail - 4000 :]


@contextlib.contextmanager
def serving(cmd: list[str], port: int, log_path: str, **env_more: str):
    """A server process from ``cmd`` (with ``env_more`` in its environment), healthy on ``port``;
    yields its base URL."""
    env = dict(os.environ, MXSERVE_CACHE=os.path.join(os.path.dirname(log_path), "cache"), **env_more)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 420
        while True:
            assert proc.poll() is None, failure_report(log_path)
            assert time.time() < deadline, "server did not come up"
            try:
                if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
        keep = os.environ.get("MXSERVE_TEST_SERVER_LOGS")  # one file that gathers every server's log
        if keep:
            with open(keep, "a") as f, open(log_path, errors="replace") as one:
                f.write(f"\n===== {os.environ.get('PYTEST_CURRENT_TEST', '')}: {' '.join(cmd[1:4])}\n{one.read()}")


def mxserve_cmd(ckpt: str, port: int, name: str, *more: str) -> list[str]:
    return [sys.executable, "-m", "mxserve.cli", "launch", "--engine", "sglang", "--model", ckpt, "--port", str(port),
            "--served-model-name", name, "--sglang-args", SGLANG_ARGS, *more]  # fmt: skip


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe", "mixtral", "deepseek_v2"])
def test_sglang_engine_serves_mixed_checkpoint(arch, tmp_path):
    import openai

    src = sglang_tiny(arch, tmp_path)
    plan = mixed_plan(load_model(src))
    assert len(plan.scheme_names()) == len(MIX)
    ckpt = str(tmp_path / "ckpt")
    quantize_to_dir(src, plan, ckpt, progress=False)
    port = 30000 + os.getpid() % 1000
    # MXSERVE_STREAM_K=0: the repeat below must add every sum in the same order (stream-K's reductions do not)
    with serving(mxserve_cmd(ckpt, port, "tiny"), port, str(tmp_path / "server.log"), MXSERVE_STREAM_K="0") as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        # a random model may say its end token first; the test is of serving, not of the text
        more = {"extra_body": {"ignore_eos": True}}
        comp = client.completions.create(model="tiny", prompt="To be, or not", max_tokens=12, temperature=0,
                                         logprobs=1, **more)  # fmt: skip
        assert comp.usage.completion_tokens > 0 and comp.choices[0].text
        assert_finite(comp.choices[0], "To be, or not")
        chunks = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True, **more
        )
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 0
        # Greedy is deterministic for the same computation. A repeat whose prompt hits the radix cache
        # prefills 1 token over 4 cached ones instead of 5, and SGLang does not promise equal bits then
        # (a tiny random DeepSeek-V2, whose logits nearly tie, parted in its last tokens, 2026-12-03).
        urllib.request.urlopen(urllib.request.Request(base + "/flush_cache", method="POST"), timeout=30)
        again = client.completions.create(model="tiny", prompt="To be, or not", max_tokens=12, temperature=0, **more)
        assert again.choices[0].text == comp.choices[0].text
        # the live decode read, priced from this engine's folded routing counts (the embedded engine's is tested on
        # the CPU: test_observability)
        assert decode_bytes(base) > 0


def decode_bytes(base: str, wait_s: float = 30.0) -> float:
    """The server's ``mxserve_decode_bytes_per_token{window="sliding"}`` once a fold after traffic exported it."""
    from mxserve.served_stats import parse_metrics

    deadline = time.time() + wait_s
    while True:
        got = parse_metrics(urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()).decode_bytes
        if "sliding" in got:
            return got["sliding"]
        assert time.time() < deadline, "no mxserve_decode_bytes_per_token after traffic"
        time.sleep(0.5)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_shared_experts_launched_early_serve_the_same_text(arch, tmp_path):
    """MXSERVE_SHARED_EARLY=1 launches the shared experts when the MoE block is entered (before the
    router): the same launches into the same buffers, so the same greedy text one prompt at a time, CUDA graphs
    captured over them; all at once too, every token's log-probability finite (SGLang's batches follow the requests'
    arrival, so two servers' batched texts may part: the forty-ninth session). The plan mixes the Gluon kernel's
    schemes alone, so that decode runs on it."""
    # stream-K keeps the shared experts in its launches and adds sums in any order: off
    texts, ckpt, port = texts_served_with(tmp_path, arch, "MXSERVE_SHARED_EARLY", mix=GLUON_MIX, MXSERVE_STREAM_K="0")
    assert texts["1"][False] == texts["0"][False]
    assert len(texts["1"][True]) == len(PROMPTS)
    log = open(tmp_path / "MXSERVE_SHARED_EARLY1.log").read()
    assert "the shared experts launch early" in log
    # the forwards took the early launches (a forward that does not logs it: equal text would not show it)
    assert "were not used" not in log
    # on the stream-K grid too (their own stream-K launches, the routed ones adding into the same sums): served,
    # finite log-probs, and taken by every forward; its sums are added in any order, so the text is not compared
    with serving(mxserve_cmd(ckpt, port, "tiny"), port, str(tmp_path / "early_sk.log"), MXSERVE_SHARED_EARLY="1",
                 MXSERVE_STREAM_K="1") as base:  # fmt: skip
        assert len(greedy_texts(base, "tiny", True)) == len(PROMPTS)
    log = open(tmp_path / "early_sk.log").read()
    assert "the shared experts launch early" in log and "were not used" not in log


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_stream_k_decode_serves_in_sglang(arch, tmp_path):
    """MXSERVE_STREAM_K=1 (decode's default below 4 rows per expert): every Gluon decode launch on the
    stream-K grid, zero-filled fp32 sums and all, captured in SGLang's CUDA graphs. Its sums are added in
    any order, so its text is not held to another's; every token's log-probability must be finite, one
    prompt at a time and all at once. The plan mixes the Gluon kernel's schemes alone (with w8a8fp8 or w4a4 in a
    layer, its decode runs on other kernels)."""
    src = sglang_tiny(arch, tmp_path)
    ckpt = str(tmp_path / "ckpt")
    quantize_to_dir(src, mixed_plan(load_model(src), GLUON_MIX), ckpt, progress=False)
    port = 33000 + os.getpid() % 1000
    with serving(mxserve_cmd(ckpt, port, "tiny"), port, str(tmp_path / "stream_k.log"), MXSERVE_STREAM_K="1") as base:
        for batched in (False, True):
            greedy_texts(base, "tiny", batched)  # asserts every token's log-probability finite
    assert "Traceback" not in open(tmp_path / "stream_k.log").read()


def test_one_token_top_k_rows_serve_in_sglang(tmp_path):
    """MXSERVE_TOPK_ROWS=1: decode at one request (SGLang's batch-1 CUDA graph) takes each slot's expert from the
    fused router's top-k in the stream-K launches, with no alignment launch, stream-K's sums zeroed as the MoE block
    starts; batched forwards take the routed slots from the top-k either way (MXSERVE_TOPK_GRID). Its sums are added
    in any order (stream-K), so its text is not held to the default's: every token's log-probability finite, one
    prompt at a time and all at once, with and without it, and every one-token forward took the zero fill started
    for it (the Gluon kernel's schemes alone in the plan)."""
    texts, _, _ = texts_served_with(tmp_path, "qwen2_moe", "MXSERVE_TOPK_ROWS", mix=GLUON_MIX)
    assert all(len(texts[v][b]) == len(PROMPTS) for v in ("0", "1") for b in (False, True))
    log = open(tmp_path / "MXSERVE_TOPK_ROWS1.log").read()
    assert "take the top-k's rows straight" in log
    assert "Traceback" not in log and "were not used" not in log


def test_routed_slots_straight_from_the_top_k_serve_in_sglang(tmp_path):
    """MXSERVE_TOPK_GRID (the default): decode forwards of more than one token take the routed slots straight from
    the fused router's top-k, with no alignment launch (a plan of the Gluon kernel's schemes alone). Off stream-K
    the grid adds its sums in a fixed order, so one prompt at a time (its prefill through the top-k's slots) the
    texts equal the aligned launches' (MXSERVE_TOPK_GRID=0); all at once, SGLang's batches follow the requests'
    arrival, so there every token's log-probability must be finite. On stream-K (decode's default) the same, and
    every forward took the zero fill started for it."""
    texts, ckpt, port = texts_served_with(tmp_path, "qwen2_moe", "MXSERVE_TOPK_GRID", mix=GLUON_MIX,
                                          MXSERVE_STREAM_K="0")  # fmt: skip
    assert texts["1"][False] == texts["0"][False]
    assert len(texts["1"][True]) == len(PROMPTS)
    said = "routed slots straight from the top-k"
    log = open(tmp_path / "MXSERVE_TOPK_GRID1.log").read()
    assert said in log and "Traceback" not in log
    assert said not in open(tmp_path / "MXSERVE_TOPK_GRID0.log").read()
    with serving(mxserve_cmd(ckpt, port, "tiny"), port, str(tmp_path / "topk_sk.log"), MXSERVE_STREAM_K="1") as base:
        assert len(greedy_texts(base, "tiny", True)) == len(PROMPTS)
    log = open(tmp_path / "topk_sk.log").read()
    assert said in log and "Traceback" not in log and "were not used" not in log


PROMPTS = [
    "To be, or not to be",
    "def main():\n    ",
    "ROMEO. But soft, what light",
    "import os\nimport sys\n",
    "KING. Now is the winter",
    "class Tree:\n    def __init__(self",
    "O Romeo, Romeo",
    "for i in range(",
]


def test_fused_router_serves_the_routing_of_sglangs_own(tmp_path):
    """MXSERVE_FUSED_ROUTER=1: each MoE block's decode routing in one launch (logits, softmax, top-k) in place of
    SGLang's gate and top-k, CUDA graphs captured over it. Its logits are rounded to bf16 from sums in another
    order than cuBLAS's, which can flip a near tie of a tiny random model: most texts, not all, must agree."""
    texts, _, _ = texts_served_with(tmp_path, "qwen2_moe", "MXSERVE_FUSED_ROUTER")
    pairs = [(a, b) for batched in (False, True) for a, b in zip(texts["0"][batched], texts["1"][batched])]
    assert sum(a == b for a, b in pairs) >= 3 * len(pairs) // 4, texts
    log = open(tmp_path / "MXSERVE_FUSED_ROUTER1.log").read()
    assert "routers fused into one launch" in log and "a router stays SGLang's" not in log


def test_programmatic_dependent_launch_serves_the_same_text(tmp_path):
    """MXSERVE_PDL=1: the router, alignment, GEMMs, SiLU and top-k sum of every decode MoE layer launched as
    programmatic dependent launches, captured so in SGLang's CUDA graphs. On the unbalanced grid (stream-K adds
    its sums in any order) every launch computes what it computes without: the same greedy text, one prompt at
    a time and all at once."""
    texts, _, _ = texts_served_with(tmp_path, "qwen2_moe", "MXSERVE_PDL", MXSERVE_STREAM_K="0")
    assert texts["1"] == texts["0"]
    assert "programmatic dependent launches" in open(tmp_path / "MXSERVE_PDL1.log").read()
    assert "programmatic dependent launches" not in open(tmp_path / "MXSERVE_PDL0.log").read()


def texts_served_with(tmp_path, arch: str, var: str, tokens: dict | None = None, mix: tuple[str, ...] = MIX,
                      **env: str) -> tuple[dict, str, int]:  # fmt: skip
    """A tiny ``arch`` model's checkpoint of a plan mixing ``mix`` served with the environment variable ``var`` "0",
    then "1" (server logs: ``tmp_path / f"{var}{value}.log"``): each time its greedy texts one prompt at a time (False)
    and all at once (True); also the checkpoint and the port, for more servers. ``tokens``: filled with each
    server's tokens through each MoE layer after those requests ({value: {layer: tokens}}, from /metrics)."""
    src = sglang_tiny(arch, tmp_path)
    ckpt = str(tmp_path / "ckpt")
    quantize_to_dir(src, mixed_plan(load_model(src), mix), ckpt, progress=False)
    port = 32000 + os.getpid() % 1000
    texts = {}
    for value in ("0", "1"):
        with serving(mxserve_cmd(ckpt, port, "tiny"), port, str(tmp_path / f"{var}{value}.log"),
                     **{var: value}, **env) as base:  # fmt: skip
            texts[value] = {batched: greedy_texts(base, "tiny", batched) for batched in (False, True)}
            if tokens is not None:
                tokens[value] = layer_tokens(base)
    return texts, ckpt, port


def layer_tokens(base: str) -> dict[str, float]:
    """{layer: tokens through it} from the server's /metrics, once the routing counters have been folded in (every
    --stats-interval, 1 s by default)."""
    from prometheus_client.parser import text_string_to_metric_families

    time.sleep(3)
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    return {s.labels["layer"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "mxserve_layer_tokens_total"}  # fmt: skip


def greedy_texts(base: str, name: str, batched: bool, max_tokens: int = 24) -> list[str]:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)

    def one(p: str) -> str:
        choice = client.completions.create(model=name, prompt=p, max_tokens=max_tokens, temperature=0,
                                           logprobs=1).choices[0]  # fmt: skip
        assert_finite(choice, p)
        return choice.text

    if not batched:
        return [one(p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as ex:
        return list(ex.map(one, PROMPTS))


def assert_finite(choice, prompt: str) -> None:
    """Every generated token's logprob finite: SGLang sends a NaN one as null, and greedy decoding
    over NaN logits still returns text (plain SGLang decoded a tiny DeepSeek-V2 so, 2026-12-03)."""
    lps = choice.logprobs.token_logprobs
    assert lps and all(lp is not None and math.isfinite(lp) for lp in lps), (prompt, lps)


def bf16_checkpoint(arch: str, tmp_path) -> tuple[str, str]:
    """A tiny model of ``arch`` and its all-bf16 mxmoe checkpoint."""
    src = sglang_tiny(arch, tmp_path)
    plan = Plan.uniform("tiny", arch, layout(moe_layers(load_model(src))), get_scheme("bf16"), "rtn")
    ckpt = str(tmp_path / "ckpt")
    quantize_to_dir(src, plan, ckpt, progress=False)
    return src, ckpt


def plain_sglang_cmd(src: str, port: int) -> list[str]:
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", src, "--port", str(port),
            "--served-model-name", "tiny", *shlex.split(SGLANG_ARGS)]  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_all_bf16_plan_matches_plain_sglang(arch, tmp_path):
    """An all-bf16 plan serves plain SGLang's greedy text, prompts one at a time and all at once.

    DeepSeek-V2 also runs on mxserve's own kernel (``--bf16-layers kernel``), which rounds
    differently: its routed scaling factor (4 here) and two shared experts in the launch give
    plain SGLang's first two greedy tokens for all prompts but at most one; a missing factor
    changes seven of eight (transformers, on this model)."""
    src, ckpt = bf16_checkpoint(arch, tmp_path)
    port = 31000 + os.getpid() % 1000
    # one after the other: SGLang sizes its KV cache from the memory free while it loads
    with serving(plain_sglang_cmd(src, port), port, str(tmp_path / "plain.log")) as base:
        want = {batched: greedy_texts(base, "tiny", batched) for batched in (False, True)}
        first = greedy_texts(base, "tiny", False, max_tokens=2)
    assert len(set(want[False])) > 1  # a model that says the same thing to every prompt would prove little
    with serving(mxserve_cmd(ckpt, port, "tiny"), port, str(tmp_path / "mx.log")) as base:
        got = {batched: greedy_texts(base, "tiny", batched) for batched in (False, True)}
    assert got == want
    if arch == "deepseek_v2":
        cmd = mxserve_cmd(ckpt, port, "tiny", "--bf16-layers", "kernel")
        with serving(cmd, port, str(tmp_path / "kernel.log")) as base:
            got = greedy_texts(base, "tiny", False, max_tokens=2)
        assert sum(g == w for g, w in zip(got, first)) >= len(PROMPTS) - 1, (got, first)
