"""Shared fixtures: tiny random models of every supported architecture, and ../shared paths.

No test downloads anything: tiny models are built from transformers configs and
saved with the reference model's tokenizer; the reference model and data come
from ../shared beside the checkout.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before
# triton.jit decorates them, i.e. before any test imports mxkernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpret_helpers_without_repatching() -> None:
    """Triton's interpreter patches triton.language again at every call of a @triton.jit helper inside a kernel
    (the launch has already patched it, and the helper's patch is never undone): inspect.getmembers over the language
    per call, a quarter of a Gluon interpreter test's time (cProfile). Where every language module the helper sees is
    patched already, the launch's patch stands; otherwise Triton's own patch runs."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang", None)
    if patch is None or getattr(patch, "_mx_once", False) or not hasattr(interpreter, "_LangPatchScope"):
        return

    def patch_once(fn):
        langs = [v for v in fn.__globals__.values() if v is tl or v is tl.core]
        if langs and all(not tl.core.is_builtin(getattr(v, "load", None)) for v in langs):
            return interpreter._LangPatchScope()  # nothing to undo: the launch's scope undoes its own
        return patch(fn)

    patch_once._mx_once = True
    interpreter._patch_lang = patch_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpret_helpers_without_repatching()
# under pytest-xdist (the README's test command: a worker per core), torch's threads in one worker, and
# in the servers it starts, would contend with the other worker for the same cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MXSERVE_SHARED", ROOT.parent / "shared"))  # the GPU machine gets a copy
REFMOE = SHARED / "models" / "refmoe-25m"
DATA = SHARED / "data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

ARCHS = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v2")


def tiny_config(arch: str):
    """A 2-3 layer model with 8 experts, hidden 128 (so group-128 schemes apply), vocab of refmoe."""
    import transformers as tf

    common = dict(
        vocab_size=8192,
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        num_hidden_layers=2,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **common,
            intermediate_size=256,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=256,
            num_experts=8,
            norm_topk_prob=False,
        )
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common, head_dim=32, intermediate_size=256, moe_intermediate_size=128, num_experts=8, norm_topk_prob=True
        )
    if arch == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=128, num_local_experts=8)
    if arch == "olmoe":
        return tf.OlmoeConfig(**common, intermediate_size=128, num_experts=8)
    if arch == "deepseek_v2":
        c = dict(common, num_hidden_layers=3, num_key_value_heads=4)
        return tf.DeepseekV2Config(
            **c,
            intermediate_size=256,
            moe_intermediate_size=128,
            n_routed_experts=8,
            n_shared_experts=2,
            first_k_dense_replace=1,
            kv_lora_rank=32,
            q_lora_rank=None,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=32,
            topk_method="greedy",
            routed_scaling_factor=1.0,
        )
    raise ValueError(arch)


def build_tiny(arch: str, path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny model of ``arch`` saved at ``path``; ``overrides`` change its config."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch)
    for k, v in overrides.items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger router weights than the default init give skewed, input-dependent routing.
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            torch.nn.init.normal_(p, std=0.5)
    model.to(torch.bfloat16).save_pretrained(path)
    for f in TOKENIZER_FILES:
        shutil.copy(REFMOE / f, path / f)
    return path


# every canonical scheme, for checkpoints that mix them all in each layer
MIX = ("w4a16g128", "w3a16g128", "w8a8fp8", "bf16", "w2a16g128", "w8a16", "w4a4", "w1a16g128")
# the schemes the Gluon decode kernel runs (moe_gemm_gluon.KERNEL_CODES): a layer that mixes in w8a8fp8 or w4a4 decodes
# on the other kernels, so stream-K and the top-k's rows are tested on layers of these alone
GLUON_MIX = ("w4a16g128", "w3a16g128", "bf16", "w2a16g128", "w8a16", "w1a16g128")

# what DeepSeek-V2's own config.json holds and transformers' DeepseekV2Config does not (SGLang
# reads them); a routed scaling factor that is not 1, so a method that skips it fails; DeepSeek-V2's
# own MLA cache width, 512 + 64 (SGLang's Triton MLA decode kernel compiles for 512 + 64 and
# 256 + 32 only: it failed for 64 + 64 and for tiny_config's 32 + 16)
DEEPSEEK_KEYS = {"n_group": 1, "topk_group": 1, "scoring_func": "softmax", "moe_layer_freq": 1,
                 "routed_scaling_factor": 4.0, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                 "qk_nope_head_dim": 64, "v_head_dim": 64, "qk_head_dim": 128, "head_dim": 64}  # fmt: skip

# Config overrides of the tiny models SGLang serves: head_dim 64 (with 32, SGLang 0.5.15 takes a
# fallback rope that fails in CUDA-graph capture). As many KV heads as heads: SGLang sizes its
# Triton decode's KV splits from heads // KV heads, also for DeepSeek-V2's MLA, which reads none;
# with 4 KV heads to 2 heads (tiny_config's) that is 0 and plain SGLang decoded NaN
# (benchmarks/results/gpu_sglang_tiny_deepseek_nan_h200.log).
SGLANG_TINY = {
    "qwen2_moe": {},
    "qwen3_moe": {"head_dim": 64},
    "deepseek_v2": {"num_attention_heads": 2, "num_key_value_heads": 2, **DEEPSEEK_KEYS},
    "mixtral": {"num_attention_heads": 2, "num_key_value_heads": 2},
    "olmoe": {"num_attention_heads": 2, "num_key_value_heads": 2},
}


def sglang_tiny(arch: str, tmp_path: Path) -> str:
    """A tiny model of ``arch`` that SGLang serves (SGLANG_TINY)."""
    return str(build_tiny(arch, tmp_path / "src", **SGLANG_TINY[arch]))


def mixed_plan(model, mix: tuple[str, ...] = MIX):
    """A plan giving a layer's experts every scheme of ``mix``, gate/up and down shifted apart."""
    from mxserve.checkpoint import layout
    from mxserve.models.adapters import moe_layers
    from mxserve.plan import Plan
    from mxserve.schemes import get_scheme

    plan = Plan.uniform("tiny", model.config.model_type, layout(moe_layers(model)), get_scheme("w4a16g128"), "rtn")
    for lay in plan.layers:
        for ep in lay.experts:
            ep.gate = ep.up = mix[(ep.expert + lay.layer) % len(mix)]
            ep.down = mix[(ep.expert + lay.layer + 3) % len(mix)]
    return plan


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert DATA.is_dir(), f"tests need ../shared beside the checkout ({DATA} is missing)"
    return DATA


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    assert REFMOE.is_dir(), f"tests need the reference model's tokenizer at {REFMOE}"
    root = tmp_path_factory.mktemp("tiny")
    return {a: build_tiny(a, root / a) for a in ARCHS}


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory, shared_data) -> Path:
    """A small calibration file (both domains) so tiny-model tests stay fast."""
    text = (shared_data / "shakespeare-calib.txt").read_text()[:40000] + (shared_data / "python-calib.txt").read_text()[
        :40000
    ]
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text(text)
    return p


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory, shared_data) -> Path:
    p = tmp_path_factory.mktemp("data") / "dev.txt"
    p.write_text((shared_data / "shakespeare-dev.txt").read_text()[:20000])
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mxserve_cache(tmp_path_factory) -> Path:
    """One cache for every server the tests start: the same launch settings quantize once."""
    return tmp_path_factory.mktemp("mxserve-cache")


def start_server(args: list[str], cache: Path, log: Path, timeout: float = 300):
    """`mxserve launch ARGS` on a free port; returns (process, base URL) once /health answers."""
    import httpx

    port = free_port()
    env = dict(os.environ, MXSERVE_CACHE=str(cache), PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mxserve.cli", "launch", *args, "--port", str(port), "--quiet"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {log.read_text()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail(f"server did not come up: {log.read_text()}")


@pytest.fixture(scope="session")
def served_refmoe(mxserve_cache, tmp_path_factory):
    """refmoe-25m at 4 bits on the embedded engine, router_stats folding every 0.2 s (3 s window)."""
    log = tmp_path_factory.mktemp("log") / "served-refmoe.log"
    proc, base = start_server(["--model", str(REFMOE), "--budget", "4bit", "--method", "rtn", "--calib-samples", "8",
                               "--stats-interval", "0.2", "--stats-window", "3", "--stats-halflife", "2"],
                              mxserve_cache, log)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


class _StubModel(torch.nn.Module):
    """A model the HTTP layer can hold without running (auth, admin and error paths)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = type("G", (), {"eos_token_id": 0})()


def stub_engine():
    """An EmbeddedEngine over a model that never runs, with refmoe's tokenizer; call .shutdown() after."""
    from mxserve.engines.embedded import EmbeddedEngine
    from mxserve.models.loading import load_tokenizer

    return EmbeddedEngine(_StubModel(), load_tokenizer(str(REFMOE)), 64)
