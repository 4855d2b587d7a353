"""The serving benchmark's own logic, on the CPU, so a GPU run does not find its bugs."""

import sys
from pathlib import Path

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import serving  # noqa: E402


def test_margins_and_where_texts_part():
    lp = {"tokens": ["ab", "cd", "ef"], "top_logprobs": [{"x": -0.1, "y": -2.1}, {"x": -0.7, "y": -0.75}, {"x": 0.0}]}
    assert serving.top2_margins(lp) == [2.0, 0.05, None]
    assert serving.top2_margins(None) is None
    assert serving.first_difference("abcdef", "abcxef") == 3
    assert serving.first_difference("abc", "abcd") == 3
    assert serving.token_at(lp["tokens"], 3) == 1 and serving.token_at(lp["tokens"], 0) == 0
    assert serving.token_at(None, 3) is None
    ref = {"greedy": ["abcdef", "xyz"], "greedy_margins": [[1.0, 0.0625, 2.0], None]}
    ref["greedy_tokens"] = [lp["tokens"], None]
    eq = serving.compare_greedy(["abcXef", "xyz"], ref)
    assert eq["same"] == 1 and eq["total"] == 2
    assert eq["differences"] == [{"prompt": 0, "char": 3, "token": 1, "b_margin_there": 0.0625}]


def test_run_server_against_the_embedded_engine(tiny_models, tmp_path: Path):
    """One server through the whole benchmark: health, openai client, greedy, throughput, shutdown."""
    from mxserve.checkpoint import layout, quantize_to_dir
    from mxserve.models.adapters import moe_layers
    from mxserve.models.loading import load_model
    from mxserve.plan import Plan
    from mxserve.schemes import get_scheme

    src = str(tiny_models["qwen3_moe"])
    plan = Plan.uniform("m", "qwen3_moe", layout(moe_layers(load_model(src))), get_scheme("w4a16g128"), "rtn")
    quantize_to_dir(src, plan, str(tmp_path / "ckpt"), progress=False)

    class Args:
        startup_timeout, greedy_tokens, max_tokens, concurrency, min_requests = 120, 6, 6, [1, 4], 4

    port = serving.free_port()
    assert port + 10000 <= 65535
    cmd = [sys.executable, "-m", "mxserve.cli", "launch", "--model", str(tmp_path / "ckpt"), "--port", str(port),
           "--served-model-name", "x", "--quiet"]
    rec = serving.run_server("x", cmd, port, Args, ["hello world", "def f(x):"], str(tmp_path))
    assert "error" not in rec, rec.get("log_tail")
    assert len(rec["greedy"]) == 2 and rec["startup_s"] > 0
    # the embedded engine batches the two prompts, and must still give each what it gives alone
    assert rec["greedy_batched"] == rec["greedy"]
    assert serving.compare_greedy(rec["greedy_batched"], rec)["same"] == 2
    assert [r["concurrency"] for r in rec["throughput"]] == [1, 4]
    assert all(r["output_tokens"] > 0 for r in rec["throughput"])
    own = {"x": serving.compare_greedy(["a", "hello"], rec)}
    table = serving.markdown({"tag": "t", "device": "cpu", "command": "c", "max_tokens": 6, "concurrency": [1, 4],
                              "servers": [rec], "equal": [], "self": own})
    assert "| x |" in table and "0 of 2 identical" in table


def test_moe_layer_benchmark_takes_any_expert_shape():
    import argparse

    import moe_layer
    import pytest

    name, m = moe_layer.parse_shape("mine:hidden=3072,inter=1024,experts=32,top_k=4,shared=1")
    assert name == "mine" and m == {"hidden": 3072, "inter": 1024, "experts": 32, "top_k": 4, "shared": 1}
    assert moe_layer.parse_shape("x:hidden=8,inter=8,experts=2,top_k=1")[1]["shared"] == 0
    for bad in ("nohidden:inter=8,experts=2,top_k=1", "x:hidden=8,inter=a,experts=2,top_k=1", ":hidden=8",
                "x:hidden=8,inter=8,experts=2,top_k=1,extra=3"):
        with pytest.raises(argparse.ArgumentTypeError):
            moe_layer.parse_shape(bad)
