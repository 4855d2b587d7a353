"""The serving benchmark's own logic, on the CPU, so a GPU run does not find its bugs."""

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

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


def _serve(handler):
    """``handler`` (a BaseHTTPRequestHandler class, its log kept quiet) on a free local port, in a thread."""
    import threading
    from http.server import ThreadingHTTPServer

    handler.log_message = lambda self, *args: None
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _sse_server(chunks: list[dict], gap_s: float):
    """An HTTP server that streams ``chunks`` as SSE, ``gap_s`` apart: the wire format alone, as SGLang writes it."""
    import time
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for c in chunks:
                time.sleep(gap_s)
                self.wfile.write(f"data: {json.dumps(c)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")

    return _serve(Handler)


def test_a_streamed_token_without_text_still_counts():
    """A random-weight model's tokens often decode to nothing alone, and SGLang streams their empty deltas (the
    thirty-ninth session's GPU run failed on that): the first token is the first chunk with a choice, text or not."""
    steps = [{"choices": [{"index": 0, "text": t, "finish_reason": None}]} for t in ["", "", "ab", ""]]
    srv = _sse_server(steps + [{"choices": [], "usage": {"completion_tokens": 4}}], gap_s=0.05)
    try:
        got = serving.stream_once(f"http://127.0.0.1:{srv.server_port}", "m", "p", 4)
    finally:
        srv.shutdown()
    assert got["tokens"] == 4
    assert 0.04 < got["ttft_s"] < 1.0 and 0.03 < got["tpot_s"] < 1.0
    srv = _sse_server([{"choices": [], "usage": {"completion_tokens": 0}}], gap_s=0)
    try:
        with pytest.raises(RuntimeError, match="no chunk with a choice"):
            serving.stream_once(f"http://127.0.0.1:{srv.server_port}", "m", "p", 4)
    finally:
        srv.shutdown()


def _json_server(answer, delay_s: float, seen: list):
    """An HTTP server that answers every POST with ``answer`` as JSON after ``delay_s`` (404 for None), keeping each
    request's path and body in ``seen``."""
    import time
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            time.sleep(delay_s)
            data = json.dumps(answer).encode()
            self.send_response(404 if answer is None else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return _serve(Handler)


def test_requests_through_sglang_generate_split_the_servers_time_from_the_http_paths():
    """SGLang's own /generate answers with meta_info.e2e_latency (its tokenizer manager's time for the request): the
    client's time less it is the HTTP path's. A server answering after 60 ms that says it took 20: 40 ms outside."""
    seen: list = []
    answer = {"text": "ab", "meta_info": {"e2e_latency": 0.02, "completion_tokens": 4}}
    srv = _json_server(answer, 0.06, seen)
    try:
        got = serving.native_latency(f"http://127.0.0.1:{srv.server_port}", ["p", "q"], 4, 3)
    finally:
        srv.shutdown()
    assert got["requests"] == 3 and got["tokens"] == 4 and got["server_ms"] == 20.0
    assert 60 <= got["client_ms"] < 1000 and 40 <= got["outside_ms"] < 980
    assert abs(got["client_ms"] - got["server_ms"] - got["outside_ms"]) < 1.0
    # a warm-up of 8 tokens first, then the prompts in turn, every one to /generate, greedy, to its full length
    assert [(path, b["text"], b["sampling_params"]["max_new_tokens"]) for path, b in seen] == [
        ("/generate", "p", 8), ("/generate", "p", 4), ("/generate", "q", 4), ("/generate", "p", 4)]
    assert all(b["sampling_params"]["ignore_eos"] and b["sampling_params"]["temperature"] == 0 for _, b in seen)
    for bad, why in (({"text": "ab", "meta_info": {}}, "no meta_info.e2e_latency"), (None, "not an SGLang server")):
        srv = _json_server(bad, 0, [])
        try:
            with pytest.raises(RuntimeError, match=why):
                serving.native_once(f"http://127.0.0.1:{srv.server_port}", "p", 4)
        finally:
            srv.shutdown()
    # the report: each request beside what the streamed medians predict (first token, then 3 steps of 2 ms)
    rec = {"name": "m", "startup_s": 1.0, "throughput": [], "native": got,
           "latency": {"requests": 3, "ttft_ms": 10.0, "tpot_ms": 2.0, "tokens": 4, "ttft_ms_each": [10.0] * 3}}
    table = serving.markdown({"tag": "t", "device": "cpu", "command": "c", "max_tokens": 4, "concurrency": [1],
                              "servers": [rec], "equal": [], "self": {}})
    assert f"| m | {got['client_ms']} | 20.0 | {got['outside_ms']} | 16.0 |" in table


def test_an_mxserve_server_is_timed_once_its_kernels_are_compiled(tmp_path: Path):
    """SGLang can be healthy while `mxserve launch` still compiles: the benchmark waits for the launcher's line that
    ends its precompile step; a server that is no mxserve launch (no "starting SGLang" line) waits for nothing."""
    import subprocess
    import time

    log = tmp_path / "s.log"
    script = ("import sys, time; print('mxserve: starting SGLang on http://x (model m)', flush=True); time.sleep(1.5); "
              "print('mxserve: phase precompile: 1.5 s, peak GPU 0.00 GiB', flush=True); time.sleep(30)")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=f)
    try:
        time.sleep(0.5)
        waited = serving.wait_precompiled(str(log), proc, 20)
        assert waited is not None and 0.5 <= waited < 10
        assert "phase precompile" in log.read_text()
    finally:
        proc.kill()
    plain = tmp_path / "p.log"
    plain.write_text("[2026-12-06] Load weight begin\n")
    assert serving.wait_precompiled(str(plain), proc, 20) is None
    # a launcher that dies first: said, not waited on
    log.write_text("mxserve: starting SGLang on http://x\n")
    proc.wait()
    with pytest.raises(RuntimeError, match="while its kernels precompiled"):
        serving.wait_precompiled(str(log), proc, 20)
    # what the launcher's precompile took, from its log line (runtime/precompile.py's, launch.py's when warm)
    from procs import precompile_summary

    line = ("compiled 44 kernel variants in 44.7 s (Triton 3.6.0, sm_90): recorded in 33.0 s, then 49.2 s of "
            "compiling in 16 processes, the longest 4.7 s")
    said = precompile_summary(f"[x] Capturing num tokens (num_tokens=512)mxserve: {line}\nmxserve: phase precompile")
    assert said == line
    assert precompile_summary("mxserve: kernels precompiled by an earlier launch like this one: nothing to compile\n")
    assert precompile_summary("mxserve: phase precompile: 1.5 s\n[x] Load weight begin") is None
    rec = {"name": "m", "startup_s": 76.1, "precompile_after_health_s": 12.0, "precompile": said,
           "throughput": [{"concurrency": 1, "output_tok_per_s": 41.5, "rounds": [41.5]}]}
    table = serving.markdown({"tag": "t", "device": "cpu", "command": "c", "max_tokens": 4, "concurrency": [1],
                              "servers": [rec], "equal": [], "self": {}})
    assert "| m | 76.1 (+12.0 compiling) | 41.5 |" in table
    assert f"- m: {line}" in table


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
        startup_timeout, greedy_tokens, max_tokens, concurrency, min_requests, rounds = 120, 6, 6, [1, 4], 4, 2
        profile_steps, profile_concurrency = 0, [1]  # the embedded engine has no /start_profile
        profile_prefill = False
        latency_requests = 3

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
    # two timed rounds after the warm-up wave, the lower reported (the median of two)
    assert all(len(r["rounds"]) == 2 and r["output_tok_per_s"] == min(r["rounds"]) for r in rec["throughput"])
    # streamed one at a time: the first token's time, then each one's after it (a bf16 step is well under a second)
    lat = rec["latency"]
    assert lat["requests"] == 3 and len(lat["ttft_ms_each"]) == 3 and 1 <= lat["tokens"] <= 6
    assert 0 < lat["ttft_ms"] < 60_000 and 0 <= lat["tpot_ms"] < 1_000
    # SGLang's own /generate is not the embedded engine's: said, and the rest stands
    assert "native" not in rec and "not an SGLang server" in rec["native_error"]
    own = {"x": serving.compare_greedy(["a", "hello"], rec)}
    table = serving.markdown({"tag": "t", "device": "cpu", "command": "c", "max_tokens": 6, "concurrency": [1, 4],
                              "servers": [rec], "equal": [], "self": own})
    assert "| x |" in table and "0 of 2 identical" in table
    assert f"| x | {lat['ttft_ms']} | {lat['tpot_ms']} |" in table
    # the server's live decode read after its rounds (mxserve_decode_bytes_per_token), beside its throughput
    assert rec["decode_bytes_per_token"] > 0
    assert f"- x: {rec['decode_bytes_per_token'] / 1e6:.1f} MB" in table
    assert serving.live_decode_bytes(f"http://127.0.0.1:{serving.free_port()}") is None  # no server there: none
    first = rec["throughput"][0]
    assert f"| {first['output_tok_per_s']} ({first['rounds'][0]} / {first['rounds'][1]}) |" in table
    # each round's requests spread out: least <= median <= most, the mean among them, and in the report
    for r in rec["throughput"]:
        ms = r["latency_ms"]
        assert 0 < ms["min"] <= ms["median"] <= ms["max"]
        assert ms["min"] - 0.1 <= r["mean_latency_s"] * 1e3 <= ms["max"] + 0.1
    spread = " | ".join(f"{r['latency_ms']['min']} / {r['latency_ms']['median']} / {r['latency_ms']['max']}"
                        for r in rec["throughput"])  # fmt: skip
    assert f"| x | {spread} |" in table


def test_run_server_reports_why_a_server_died(tmp_path: Path):
    """A server that dies while starting: the table names its own first error, not only its exit code."""

    class Args:
        startup_timeout, greedy_tokens, max_tokens, concurrency, min_requests, rounds = 30, 4, 4, [1], 1, 1

    die = "print('[07:47:34] loading', flush=True); raise AssertionError('scale dtype is not the activations')"
    rec = serving.run_server("dead", [sys.executable, "-c", die], serving.free_port(), Args, ["p"], str(tmp_path))
    assert rec["error"] == "RuntimeError: server exited with 1 (AssertionError: scale dtype is not the activations)"
    table = serving.markdown({"tag": "t", "device": "cpu", "command": "c", "max_tokens": 4, "concurrency": [1],
                              "servers": [rec], "equal": [], "self": {}})
    assert "| dead | failed: RuntimeError: server exited with 1 (AssertionError: scale dtype" in table
    # one that died after its first concurrency: the table keeps what it measured
    part = {"name": "part", "error": "RuntimeError: server exited with -9", "startup_s": 3.0,
            "throughput": [{"concurrency": 1, "output_tok_per_s": 41.5, "rounds": [41.5]}]}
    table = serving.markdown({"tag": "t", "device": "cpu", "command": "c", "max_tokens": 4, "concurrency": [1, 8],
                              "servers": [part], "equal": [], "self": {}})
    assert "| part | failed: RuntimeError: server exited with -9 | 41.5 |  |" in table


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


def test_moe_layer_benchmark_plans_by_popularity_tiers():
    import argparse
    from collections import Counter

    import moe_layer
    import pytest
    import torch

    label, tiers = moe_layer.parse_plan("t=w8a16:1,w4a16g128:2,w2a16g128:1")
    assert label == "t" and tiers == [("w8a16", 1), ("w4a16g128", 2), ("w2a16g128", 1)]
    for bad in ("t=w4a16g128", "t=w5a16:1", "w4a16g128:1"):
        with pytest.raises(argparse.ArgumentTypeError):
            moe_layer.parse_plan(bad)
    cpu = torch.device("cpu")
    plan = moe_layer.tiered_plan(16, 18, 2, True, cpu, tiers)
    assert Counter(plan[:16]) == {"w8a16": 4, "w4a16g128": 8, "w2a16g128": 4}
    assert plan[16:] == ["w8a16", "w8a16"]  # shared experts: the first tier
    # the most popular routed experts (skewed routing) take the first tier
    probe, _ = moe_layer.routing(4096, 16, 2, True, torch.Generator().manual_seed(7), cpu)
    top = torch.bincount(probe.reshape(-1), minlength=16).argsort(descending=True)[:4].tolist()
    assert all(plan[x] == "w8a16" for x in top)
    assert moe_layer.mixed_plan(16, 18, 2, True, cpu) == moe_layer.tiered_plan(
        16, 18, 2, True, cpu, [("w4a16g128", 1), ("w2a16g128", 1)])
    # a cell's draws are its own, whatever ran before it: the same cell draws the same routing, another cell another
    same = [moe_layer.routing(4, 16, 2, True, moe_layer.cell_generator("m", True, 4, cpu), cpu)[0] for _ in range(2)]
    other = moe_layer.routing(4, 16, 2, True, moe_layer.cell_generator("m", True, 5, cpu), cpu)[0]
    assert torch.equal(*same) and not torch.equal(same[0], other)
    # and so do those of the routing timed, drawn from a generator in any state: the mixed plan's w4 half of the
    # experts gets most of its rows (a draw with its own order of popularity gave them about half)
    mixed = moe_layer.mixed_plan(60, 60, 4, True, cpu)
    for seed in (0, 1, 2):
        ids, _ = moe_layer.routing(4096, 60, 4, True, torch.Generator().manual_seed(seed), cpu)
        rows = torch.bincount(ids.reshape(-1), minlength=60)
        assert sum(int(rows[x]) for x in range(60) if mixed[x] == "w4a16g128") > 0.9 * ids.numel()


def test_import_standins_answer_only_the_named_importers(tmp_path):
    """The device's stand-in for a missing package: importable by the named modules, absent for
    everyone else until they have imported it (FlashInfer asks find_spec whether cutlass is there)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out, mods = tmp_path / "standins", tmp_path / "mods"
    run = subprocess.run([sys.executable, os.path.join(root, "scripts", "import_standins.py"), str(out),
                          "mx_absent_pkg", "os", "--for", "mx_asker"], capture_output=True, text=True, check=True)
    assert "mx_absent_pkg: import-only stand-in" in run.stdout and "os: installed" in run.stdout
    mods.mkdir()
    (mods / "mx_asker.py").write_text(
        "import mx_absent_pkg.cute as cute\nfrom mx_absent_pkg import Float16\n\n"
        "@cute.jit\ndef f():\n    return 3\n\nclass K(cute.Kernel):\n    pass\n\nVALUE = f() + len(list(Float16))\n")
    check = ("import importlib.util\n"
             "assert importlib.util.find_spec('mx_absent_pkg') is None\n"  # an outsider is told no
             "import mx_asker\n"
             "assert mx_asker.VALUE == 3 and issubclass(mx_asker.K, object)\n"
             "import sys\nprint(sorted(m for m in sys.modules if m.startswith('mx_absent')))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(out), str(mods)]))
    res = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    # imported once, it is in sys.modules for every later import (the script's docstring says so)
    assert res.stdout.strip() == "['mx_absent_pkg', 'mx_absent_pkg.cute']"


def test_gptq_copy_writes_gptq_v1_tensors(tiny_models, tmp_path: Path):
    """gptq_copy.py (the Marlin serving baseline): GPTQ's v1 layout decoded here bit by bit gives the
    dequantized copy's weights, within half a step of the source; routers and attention stay
    unquantized. Both copies are fp16 (SGLang's Marlin MoE takes fp16 activations only)."""
    import json

    import gptq_copy
    import torch
    from safetensors import safe_open

    src = tiny_models["qwen2_moe"]
    out, deq = tmp_path / "gptq", tmp_path / "deq"
    info = gptq_copy.convert(str(src), str(out), str(deq), attention=False, device="cpu")

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        got = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                got.update({k: h.get_tensor(k) for k in h.keys()})
        return got

    g, d, s = tensors(out), tensors(deq), tensors(src)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == 4 and cfg["sym"] and not cfg["desc_act"]
    assert "quantization_config" not in json.loads((deq / "config.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(g) and (out / "tokenizer.json").is_file()
    linears = [k[: -len(".weight")] for k in s if gptq_copy.MLP.search(k)]
    # 2 layers x (8 experts + the shared expert) x 3 linears
    assert info["quantized_linears"] == len(linears) == 2 * 9 * 3
    for p in linears:
        qw, sc, qz, gi = (g[f"{p}.{t}"] for t in ("qweight", "scales", "qzeros", "g_idx"))
        n, k = s[f"{p}.weight"].shape
        assert qw.shape == (k // 8, n) and qw.dtype == torch.int32 and sc.shape == (k // 128, n)
        assert sc.dtype == torch.float16 and qz.shape == (k // 128, n // 8)
        assert gi.tolist() == [i // 128 for i in range(k)]
        words = qw.to(torch.int64) & 0xFFFFFFFF
        codes = torch.stack([(words >> (4 * i)) & 15 for i in range(8)], dim=1).reshape(k, n)  # row 8j + i
        zeros = torch.stack([((qz.to(torch.int64) & 0xFFFFFFFF) >> (4 * i)) & 15 for i in range(8)], dim=2)
        assert (zeros == 7).all()  # v1: zero - 1
        w = ((codes - 8).float() * sc.float()[gi]).t()
        assert f"{p}.weight" not in g
        assert torch.equal(w.half(), d[f"{p}.weight"])
        step = sc.float().t().repeat_interleave(128, dim=1)
        # half a step; a group's largest |w| lands on 7.5 steps, 7.5 (1 + 2^-11) with the scale rounded
        # to fp16, and is clamped to 7
        assert ((w - s[f"{p}.weight"].float()).abs() <= step * 0.504).all()
    for k, t in s.items():
        if not gptq_copy.MLP.search(k):
            assert g[k].dtype == d[k].dtype == torch.float16, k
            assert torch.equal(g[k], t.half()) and torch.equal(d[k], t.half()), k
    for c in (out, deq):
        c = json.loads((c / "config.json").read_text())
        assert c["dtype"] == c["torch_dtype"] == "float16"


def test_decode_trace_sums_gpu_events_per_step(tmp_path: Path):
    import gzip
    import json

    import decode_trace

    def ev(name, ts, dur, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    # two steps of: a GEMM (10 us), a small kernel (2 us) and a copy (3 us); CPU events are not counted
    events = [ev("gemm", 0, 10), ev("small", 12, 2), ev("Memcpy DtoH", 15, 3, "gpu_memcpy"),
              ev("gemm", 100, 10), ev("small", 112, 2), ev("Memcpy DtoH", 115, 3, "gpu_memcpy"),
              ev("aten::mm", 0, 500, "cpu_op"), {"ph": "M", "name": "process_name"}]  # fmt: skip
    path = tmp_path / "x.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = decode_trace.summarize(str(path), 2)
    assert s["busy_us_per_step"] == 15.0 and s["span_us_per_step"] == 59.0  # (118 - 0) / 2
    assert s["events_per_step"] == 3.0 and s["copies_per_step"] == 1.0
    assert s["top"] == [["gemm", 10.0, 1.0], ["Memcpy DtoH", 3.0, 1.0], ["small", 2.0, 1.0]]
    md = "\n".join(decode_trace.markdown("mx", {"concurrency": 1, **s}))
    assert "| `gemm` | 10.0 | 1.0 |" in md and "59.0 us" in md
    (tmp_path / "empty.json").write_text(json.dumps([ev("aten::mm", 0, 5, "cpu_op")]))
    with pytest.raises(ValueError, match="no GPU events"):
        decode_trace.summarize(str(tmp_path / "empty.json"), 1)
    # the steps are the CUDA-graph launches where the trace has them (here 2, whatever was asked)
    launches = [ev("cudaGraphLaunch", t, 1, "cuda_runtime") for t in (0, 100)]
    (tmp_path / "graphs.json").write_text(json.dumps({"traceEvents": events + launches}))
    assert decode_trace.summarize(str(tmp_path / "graphs.json"), 5)["busy_us_per_step"] == 15.0
    assert s["step_us"] is None and "median between" not in md  # no launches, no step period
    # CUDA-graph launches with their kernels (correlation ids): a step every 100 us, of which the graph's own
    # kernels span 14 (0..14, 100..114); a kernel outside the graphs (sampling, 20..25) counts in neither
    corr = [dict(ev("gemm", t, 10), args={"correlation": c}) for t, c in ((0, 1), (100, 2))] + \
        [dict(ev("small", t, 2), args={"correlation": c}) for t, c in ((12, 1), (112, 2))] + \
        [ev("sample", 20, 5)] + [dict(ev("cudaGraphLaunch", t, 1, "cuda_runtime"), args={"correlation": c})
                                 for t, c in ((0, 1), (99, 2))]  # fmt: skip
    (tmp_path / "corr.json").write_text(json.dumps({"traceEvents": corr}))
    g = decode_trace.summarize(str(tmp_path / "corr.json"), 2)
    assert (g["step_us"], g["graph_us"]) == (100.0, 14.0)
    assert "a step every 100.0 us (median between CUDA-graph launches), 14.0 us of it from the graph's" in \
        "\n".join(decode_trace.markdown("mx", {"concurrency": 1, **g}))  # fmt: skip
    # one "layer": the events from a marker up to the next one, each with its start from the first
    layer = [(0.0, 10.0, "gemm", "?: -"), (12.0, 2.0, "small", "?: -"), (15.0, 3.0, "Memcpy DtoH", "?: -"),
             (100.0, 10.0, "gemm", "?: -")]  # fmt: skip
    assert decode_trace.sequence(str(path), "gemm", 0) == layer


def test_decode_trace_splits_layers_into_sections_between_norms(tmp_path: Path):
    import json

    import decode_trace

    def ev(name, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}

    # three layers of: norm, attention (10 us after the norm's end), norm, router + GEMM (router at 20 us after it);
    # the MoE gaps 30, 32, 34 us, the attention gaps 10 us
    events, t = [], 0
    for moe in (30, 32, 34):
        events += [ev("FusedAddRMSNorm", t, 2), ev("attn", t + 2, 10), ev("FusedAddRMSNorm", t + 12, 2),
                   ev("fused_router_kernel", t + 14, 4), ev("gemm", t + 18, moe - 4)]  # fmt: skip
        t += 14 + moe
    events.append(ev("FusedAddRMSNorm", t, 2))
    (tmp_path / "t.json").write_text(json.dumps({"traceEvents": events}))
    got = decode_trace.sections(str(tmp_path / "t.json"), "RMSNorm", "router|moe_align")
    assert got == {"with": (32.0, 3), "without": (10.0, 3)}
    assert decode_trace.sections(str(tmp_path / "t.json"), "RMSNorm", "gemm|x")["with"] == (32.0, 3)
    with pytest.raises(ValueError, match="holds one named like 'marlin'"):
        decode_trace.sections(str(tmp_path / "t.json"), "RMSNorm", "marlin")
    # the folder serving.py's profiler wrote the trace into reads as the trace; a folder of two traces is refused
    assert decode_trace.sections(str(tmp_path), "RMSNorm", "router|moe_align") == got
    (tmp_path / "u.json.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="a folder of one trace"):
        decode_trace.sections(str(tmp_path), "RMSNorm", "router|moe_align")


def test_decode_trace_times_each_distinct_launch_of_a_kernel(tmp_path: Path):
    import json

    import decode_trace

    def ev(grid, dur, regs=128, stream=7):
        return {"ph": "X", "cat": "kernel", "name": "mx_gemm", "ts": 0, "dur": dur,
                "args": {"grid": grid, "registers per thread": regs, "stream": stream}}  # fmt: skip

    # two steps; per step a routed launch (32 programs x 22, 40 us) and a shared one (4 x 22, 10 us)
    events = [ev([32, 22, 1], 40), ev([4, 22, 1], 10), ev([32, 22, 1], 44), ev([4, 22, 1], 12, stream=9),
              {"ph": "X", "cat": "kernel", "name": "other", "ts": 0, "dur": 99}]  # fmt: skip
    (tmp_path / "t.json").write_text(json.dumps({"traceEvents": events}))
    rows = decode_trace.launches(str(tmp_path / "t.json"), "mx_gemm", 2)
    assert [(r["grid"], r["per_step"], r["mean_us"], r["min_us"], r["max_us"]) for r in rows] == [
        ("[32, 22, 1]", 1.0, 42.0, 40.0, 44.0), ("[4, 22, 1]", 1.0, 11.0, 10.0, 12.0)]
    assert rows[0]["registers"] == 128
    assert decode_trace.sequence(str(tmp_path / "t.json"), "mx_gemm", 0)[0][3] == "7: [32, 22, 1]"
    with pytest.raises(ValueError, match="no GPU event named like 'nothing'"):
        decode_trace.launches(str(tmp_path / "t.json"), "nothing", 1)


def test_decode_trace_times_steps_from_graph_launches_and_spans_between_kernels(tmp_path: Path):
    import json

    import decode_trace

    def ev(name, ts, dur, corr, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}

    # three graph launches (correlations 1 to 3) whose kernels start at 10, 110 and 230; each step
    # has an align kernel and a sum 5 us after it (a span of 7 us); an eager kernel of correlation 9
    # before the first step is no step's
    events = [ev("cudaGraphLaunch", t, 1, c, "cuda_runtime") for c, t in ((1, 0), (2, 100), (3, 220))]
    for c, t in ((1, 10), (2, 110), (3, 230)):
        events += [ev("align", t, 1, c), ev("gemm", t + 1, 3, c), ev("sum", t + 5, 2, c)]
    events.append(ev("sum", 2, 1, 9))
    (tmp_path / "t.json").write_text(json.dumps({"traceEvents": events}))
    assert decode_trace.step_period(str(tmp_path / "t.json")) == 110.0  # median of 100 and 120
    assert decode_trace.summarize(str(tmp_path / "t.json"), 3)["step_us"] == 110.0
    assert decode_trace.span(str(tmp_path / "t.json"), "align", "sum") == (7.0, 3)
    with pytest.raises(ValueError, match="no event named like 'sum' followed by one like 'nothing'"):
        decode_trace.span(str(tmp_path / "t.json"), "sum", "nothing")
    (tmp_path / "eager.json").write_text(json.dumps({"traceEvents": events[3:]}))
    with pytest.raises(ValueError, match="fewer than 2 CUDA-graph launches"):
        decode_trace.step_period(str(tmp_path / "eager.json"))


@contextlib.contextmanager
def profiler_standin(steps: int, events: list[dict]):
    """A stand-in for SGLang's /start_profile that asks for ``steps`` GPU steps and writes ``events`` as the trace;
    yields its base URL."""
    import gzip
    import http.server
    import threading

    class Profiler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server interface
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path == "/start_profile" and body["num_steps"] == steps and body["activities"] == ["GPU"]
            with gzip.open(Path(body["output_dir"]) / "1-TP-0.trace.json.gz", "wt") as f:
                json.dump({"traceEvents": events}, f)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"Start profiling.\n")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Profiler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def test_profile_decode_traces_a_batch_of_different_requests(tmp_path: Path):
    """profile_decode against a stand-in for SGLang's /start_profile: each of the batch's requests
    has its own prompt (copies of one greedy request would route alike), the trace starts only once every request
    has streamed ``at_token`` tokens (the slowest one too), and the trace it gets back is summed per step."""
    import threading
    import time

    import decode_trace

    events = [{"ph": "X", "cat": cat, "name": name, "ts": t, "dur": 5} for t in (0, 10)
              for cat, name in (("kernel", "gemm"), ("cuda_runtime", "cudaGraphLaunch"))]  # fmt: skip
    sent, seen, lock = [], [], threading.Lock()
    trace = tmp_path / "trace"

    def stream(prompt, n, each):
        with lock:
            sent.append((prompt, n))
            slow = len(sent) == 1  # one request streams at a fifth of the others' rate
        for k in range(n):
            if any(trace.glob("*.json*")):  # the tokens this request had streamed when the trace began
                seen.append(k)
                return
            each()
            time.sleep(0.005 if slow else 0.001)

    with profiler_standin(2, events) as base:
        prof = decode_trace.profile_decode(base, ["a", "b", "c"], 4, 2, str(trace), stream, timeout=30, at_token=8)
    assert sorted(p for p, _ in sent) == ["a", "a", "b", "c"] and all(n > 8 for _, n in sent)
    assert len(seen) == 4 and min(seen) >= 8
    assert prof["concurrency"] == 4 and prof["steps"] == 2 and prof["top"] == [["gemm", 5.0, 1.0]]
    assert prof["at_token"] == 8


def test_profile_decode_says_when_the_requests_do_not_stream(tmp_path: Path):
    import decode_trace

    with pytest.raises(TimeoutError, match="streamed 0 tokens, not 64"):
        decode_trace.profile_decode("http://127.0.0.1:9", ["a"], 2, 2, str(tmp_path), lambda p, n, each: None,
                                    timeout=0.5)  # fmt: skip


def test_profile_prefill_traces_one_prompt_and_reports_its_idle_gpu(tmp_path: Path):
    """profile_prefill: two profiler steps (SGLang stops as the second begins), one request of two output tokens; an
    eager pass whose kernels run 10 us of a 40 us span reads as the GPU busy a quarter of it."""
    import decode_trace

    events = [{"ph": "X", "cat": "kernel", "name": n, "ts": t, "dur": d}
              for n, t, d in (("norm", 0, 2), ("gemm", 12, 6), ("norm", 38, 2))]  # fmt: skip
    sent = []
    with profiler_standin(2, events) as base:
        prof = decode_trace.profile_prefill(base, "To be", str(tmp_path / "trace"), lambda p, n: sent.append((p, n)),
                                            timeout=30)  # fmt: skip
    assert sent == [("To be", 2)]
    assert prof["steps"] == 1 and prof["span_us_per_step"] == 40.0 and prof["busy_us_per_step"] == 10.0
    row = "| mx | 40.0 | 10.0 | 25% | 3.0 | `gemm` 6.0 us |"
    assert decode_trace.prefill_markdown([("mx", prof)])[2] == row
    # serving.py's report: the servers whose prefill was traced, in that table
    recs = [{"name": "mx", "startup_s": 1.0, "prefill_profile": prof}, {"name": "copy", "startup_s": 1.0}]
    table = serving.markdown({"tag": "t", "device": "d", "command": "c", "max_tokens": 4, "concurrency": [1],
                              "servers": recs, "equal": [], "self": {}})  # fmt: skip
    assert "One prompt's prefill on the GPU" in table and row in table and "| copy | " not in table.split("prefill")[-1]


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_batch_routing_counts_the_experts_a_decode_batch_reaches(tiny_models, arch):
    import batch_routing
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models[arch])
    with torch.inference_mode():
        routing, tokens = batch_routing.decode_routing(model, tok, ["a b", "def f(x):", "To be"], 4, 0.0)
    k = model.config.num_experts_per_tok
    assert len(routing) == 3 and all(len(r) == 4 and len(tokens[i]) == 4 for i, r in enumerate(routing))
    assert all(len(step) == model.config.num_hidden_layers and all(1 <= len(s) <= k for s in step)
               for r in routing for step in r)  # fmt: skip
    # the batch's distinct experts per layer and step: the union over its prompts
    hand = [[[{0, 1}], [{2, 3}]], [[{1, 2}], [{2, 3}]]]  # 2 prompts, 2 steps, 1 layer
    assert batch_routing.spread(hand) == {"batch": 2, "steps": 2, "distinct_experts_per_layer": [2.5], "mean": 2.5}


def test_decode_waves_counts_programs_per_multiprocessor_as_the_profiler_does():
    from decode_waves import resident

    # Nsight Compute's block limits on the H200 (results/ncu-qwen15-1tok-cudacore-h200.txt): 112 registers
    # x 128 threads -> 4 blocks per SM, 56 -> 9; and the served plan's gate/up kernel at 168 -> 3
    assert resident(112, 1536, 4) == 4 and resident(56, 1536, 4) == 9 and resident(168, 1536, 4) == 3
    assert resident(128, 0, 4) == 4 and resident(80, 0, 4) == 6
    assert resident(32, 0, 4) == 16  # 64 warps per SM
    assert resident(32, 100_000, 4) == 2  # shared memory: 228 KB per SM, 1 KB reserved per block


def test_moe_layer_times_variants_in_rotated_rounds_and_keeps_medians(monkeypatch):
    import moe_layer

    order, clock = [], iter(range(1, 100))

    def timed(label):
        def fn():
            order.append(label)
            if label == "broken" and order.count("broken") == 2:  # fails in its second round
                raise RuntimeError("no kernel image")
        return fn

    monkeypatch.setattr(moe_layer, "bench_graph", lambda fn: (fn(), next(clock))[1])
    monkeypatch.setattr(moe_layer, "bench", lambda fn: (fn(), -1.0)[1])
    jobs = [moe_layer.Job(v, timed(v), 1.0, 4.0, eager=(v == "a")) for v in ("a", "b", "broken")]
    jobs.append(moe_layer.Job("loop", timed("loop"), 1.0, 16.0, graph=False))
    got = {}
    moe_layer.time_jobs(jobs, 3, lambda v, sec, w, bits, eager: got.__setitem__(v, (sec, eager)))
    # each round starts one job later; broken is dropped; a's eager timings come after every graph timing
    assert order == ["a", "b", "broken", "loop",  # graph times a 1, b 2, broken 3
                     "b", "broken", "loop", "a",  # b 4, broken fails, a 5
                     "loop", "a", "b",  # a 6, b 7
                     "a", "a", "a"]  # fmt: skip
    assert got == {"a": (5, -1.0), "b": (4, None), "loop": (-1.0, None)}  # medians of (1, 5, 6) and (2, 4, 7)


def test_moe_layer_keeps_a_jobs_graph_time_when_its_eager_timing_fails(monkeypatch):
    import moe_layer

    def eager_fails(fn):
        raise RuntimeError("host loop failed")

    monkeypatch.setattr(moe_layer, "bench_graph", lambda fn: 2.0)
    monkeypatch.setattr(moe_layer, "bench", eager_fails)
    got = {}
    moe_layer.time_jobs([moe_layer.Job("a", lambda: None, 1.0, 4.0, eager=True)], 2,
                        lambda v, sec, w, bits, eager: got.__setitem__(v, (sec, eager)))
    assert got == {"a": (2.0, None)}


STANDIN_SERVER = """
import http.server, json, sys, time
print(sys.argv[2], flush=True)  # the launcher's line for its precompile step, or none
time.sleep(1.5)

class H(http.server.BaseHTTPRequestHandler):
    def _ok(self):
        body = json.dumps({"choices": []}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._ok()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._ok()

    def log_message(self, *a):
        pass

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.mark.parametrize("line", ["mxserve: kernels precompiled by an earlier launch like this one: nothing to compile",
                                  "mxserve: phase precompile: 3.0 s", "something else"])  # fmt: skip
def test_cold_start_times_a_launch_to_health_whatever_its_precompile_step_logs(tmp_path, line):
    # a warm launch's stamp line, unknown to cold_start.py, once made it wait out its 600 s timeout on the
    # H200 before polling /health (sixteenth session)
    import cold_start

    triton = tmp_path / "triton"
    (triton / "abc").mkdir(parents=True)
    port = serving.free_port()
    cmd = [sys.executable, "-c", STANDIN_SERVER, str(port), line]
    row = cold_start.launch("mx-warm", cmd, {}, port, str(tmp_path), str(triton), timeout=60)
    assert 1.0 < row["seconds_to_health"] < 20
    assert row.get("triton_entries_after_precompile") == (None if line == "something else" else 1)


def test_cold_start_writes_its_table_and_ratios_after_every_run(tmp_path):
    import cold_start

    rows = [{"run": "quantize (not part of a launch)", "seconds": 12.5}]
    info = {"command": "python3 benchmarks/cold_start.py --warm-rounds 3"}
    cold_start.write_results(str(tmp_path), rows, info)
    assert json.loads((tmp_path / "cold_start.json").read_text())["ratios"] == {}
    for run, secs in [("plain-cold", 100.0), ("mx-cold", 110.0), ("mx-warm", 60.0), ("plain-warm", 50.0),
                      ("mx-warm#2", 70.0), ("plain-warm#2", 40.0), ("mx-warm#3", 66.0)]:  # fmt: skip
        rows.append({"run": run, "seconds_to_health": secs})
        md = cold_start.write_results(str(tmp_path), rows, info)
    doc = json.loads((tmp_path / "cold_start.json").read_text())
    # medians: mx-warm 66 of (60, 70, 66), plain-warm 45 of (50, 40)
    assert doc["ratios"] == {"mx-cold / plain-cold": 1.1, "mx-warm / plain-warm": round(66 / 45, 2)}
    assert len(doc["rows"]) == 8 and doc["command"] == info["command"]
    assert (tmp_path / "cold_start.md").read_text() == md + "\n" and "| mx-warm#3 | 66.0 |" in md


def test_moe_layer_benchmark_runs_layouts_in_their_launch_modes():
    # a layout's "pdl" field is a launch mode, not a tile field: set while the layer runs, off after it
    import moe_layer

    from mxkernels import pdl

    seen = []
    moe_layer.in_modes(lambda: seen.append(pdl.ENABLED), moe_layer.DECODE_VARIANTS["PDL"])()
    moe_layer.in_modes(lambda: seen.append(pdl.ENABLED), moe_layer.FP8_PREFILL_VARIANTS["16 blocks at a time"])()
    assert seen == [True, False] and not pdl.ENABLED
    assert moe_layer.DECODE_VARIANTS["PDL"] == {"pdl": True}


def test_moe_layer_benchmark_starts_the_shared_experts_early_in_its_mode():
    # the "shared_early" mode launches the shared experts before the forward (start_shared), which takes that start
    # and computes what the forward alone computes; without the mode nothing is started
    import moe_layer
    import torch
    from kernel_cases import make_experts, route

    from mxkernels.arena import build_arena
    from mxkernels.moe import mx_moe_forward

    gen = torch.Generator().manual_seed(3)
    experts = make_experts(["w4a16g128", "w2a16g128"], 256, 128, 8, 2, "rtn", gen, "cpu")
    gu, dn = (build_arena(list(blocks)) for blocks in zip(*(e.linears() for e in experts)))
    ids, w = route(6, 8, 2, gen, skew=False)
    x = torch.randn(6, 256, generator=gen).to(torch.bfloat16)
    assert moe_layer.early_start(x, 2, gu, dn, 8, {}, moe_layer.DECODE_VARIANTS["PDL"]) == {}
    mode = moe_layer.DECODE_VARIANTS["shared experts started early"]
    kw = moe_layer.early_start(x, 2, gu, dn, 8, {}, mode)
    got = mx_moe_forward(x, ids, w, gu, dn, 8, **kw)
    assert kw["started"].taken
    assert torch.equal(got, mx_moe_forward(x, ids, w, gu, dn, 8))


def test_tile_tuning_takes_a_grid_of_its_own():
    # tune_tiles.py --grid: the candidates' values per field, group_m (the blocks a program group takes) among them;
    # a misspelt field or a value that is not an integer is an error naming the fields, not a traceback
    import tune_tiles

    grid = tune_tiles.parse_grid(["bm=128", "bn=128,256", "group_m=0,8"])
    cands = tune_tiles.candidates("fp8", grid)
    assert len(cands) == 2 * 2 * 2 * 2 * 2 and all(c["bm"] == 128 for c in cands)  # bk, warps, stages as GRID's
    assert {(c["bn"], c["group_m"]) for c in cands} == {(128, 0), (128, 8), (256, 0), (256, 8)}
    assert tune_tiles.candidates("fp8") == tune_tiles._grid(tune_tiles.GRID)
    grid = tune_tiles.parse_grid(["bm=128", "bk=128", "warps=8", "stages=3", "bn=128", "down_tiles.group_m=0,8",
                                  "down_tiles.bn=128,256"])  # fmt: skip
    down = tune_tiles.candidates("fp8", grid)
    assert down == [{"bm": 128, "bn": 128, "bk": 128, "warps": 8, "stages": 3, "down_tiles": {"group_m": g, "bn": n}}
                    for g in (0, 8) for n in (128, 256)]  # fmt: skip
    for bad, why in (["group=8"], "group_m"), (["bn=wide"], "integer"), (["down_tiles.bm=64"], "down_tiles.group_m"):
        with pytest.raises(SystemExit, match=why):
            tune_tiles.parse_grid(bad)


def test_profile_layer_lists_each_launch_in_order_and_takes_tile_settings():
    # profile_layer.py --launches: a kernel launched twice a forward (gate/up, then down) is two rows, each averaged
    # over the forwards in launch order; --set takes a Tiles field as an integer or true/false, and refuses others
    import argparse

    import profile_layer

    events = [(10.0 * r + 1, "align", 1.0) for r in range(2)] + [(10.0 * r + 2, "gemm", 4.0 + r) for r in range(2)]
    events += [(10.0 * r + 3, "gemm", 2.0 + r) for r in range(2)]
    assert profile_layer.per_launch(events, 2) == [("align", 1.0), ("gemm", 4.5), ("gemm", 2.5)]
    with pytest.raises(ValueError, match="not the same launches"):
        profile_layer.per_launch(events[:-1], 2)
    assert profile_layer.tile_setting("group_m=8") == ("group_m", 8)
    assert profile_layer.tile_setting("kmajor=false") == ("kmajor", False)
    sets = [profile_layer.tile_setting(t) for t in ("group_m=8", "down_tiles.group_m=16", "down_tiles.bn=256")]
    assert profile_layer.tile_overrides(sets) == {"group_m": 8, "down_tiles": {"group_m": 16, "bn": 256}}
    assert profile_layer.tile_setting("down_tiles.early=picked") == ("down_tiles.early", None)
    for bad in ("groupm=8", "group_m=", "bn=wide", "down_tiles.bm=16", "bn=picked"):
        with pytest.raises(argparse.ArgumentTypeError, match="--set"):
            profile_layer.tile_setting(bad)
    # --scheme marlin: SGLang's one kernel, so no plan, tile setting or layout of ours applies to it
    args = dict(scheme="marlin", plan=None, set=[], layout="auto")
    profile_layer.check_args(argparse.Namespace(**args))
    profile_layer.check_args(argparse.Namespace(**{**args, "scheme": "w4a16g128", "set": [("bn", 64)]}))
    for extra in ({"set": [("bn", 64)]}, {"layout": "prefill"}, {"plan": ("served", {"w4a16g128": 1})}):
        with pytest.raises(SystemExit, match="takes no --plan, --set or --layout"):
            profile_layer.check_args(argparse.Namespace(**{**args, **extra}))


def test_profile_layer_gives_marlin_the_tokens_and_routing_ours_get(monkeypatch):
    # --scheme marlin: SGLang's kernel is called as moe_layer.py calls it, on the same tokens and the same top-k
    # (shared experts as routed slots) that our layer gets from the same seed
    import profile_layer
    import torch
    from moe_layer import random_experts, routing

    calls = []
    monkeypatch.setattr(profile_layer, "marlin_impl", lambda: (lambda *a, **kw: calls.append((a, kw)), None))
    m = {"hidden": 256, "inter": 128, "experts": 8, "top_k": 2, "shared": 1}
    fwd, bits = profile_layer.marlin_forward(m, 5, True, torch.Generator().manual_seed(0), "cpu")
    fwd()
    (x, w1, w2, s1, s2, logits, weights, ids), kw = calls[0]
    gen = torch.Generator().manual_seed(0)
    gu, dn = random_experts(m, "cpu", gen)
    x_ours = torch.randn(5, 256, dtype=torch.bfloat16, generator=gen)
    ids_ours, w_ours = routing(5, 8, 2, True, gen, "cpu")
    assert torch.equal(x, x_ours) and torch.equal(ids[:, :2].long(), ids_ours.long())
    assert ids.shape == (5, 3) and ids.dtype == torch.int32 and (ids[:, 2] == 8).all()  # the shared slot
    assert torch.allclose(weights[:, :2], w_ours.float()) and kw["num_bits"] == 4 and logits.shape == (5, 9)
    assert (w1.shape, w2.shape, s1.shape, s2.shape) == ((9, 16, 512), (9, 8, 512), (9, 2, 256), (9, 1, 256))
    assert bits == 4 + 20 / 128  # Marlin's bits a weight as moe_layer.py counts them (w4, group-128 scales and zeros)
    monkeypatch.setattr(profile_layer, "marlin_impl", lambda: (None, "ImportError: no sglang"))
    with pytest.raises(SystemExit, match="did not import .ImportError: no sglang"):
        profile_layer.marlin_forward(m, 5, True, torch.Generator().manual_seed(0), "cpu")


def test_sass_census_counts_programs_by_registers_and_diffs_dumps(tmp_path: Path, capsys):
    # benchmarks/sass_census.py: programs of 4 warps an SM by registers (taken 8 a thread at a time) under a cap,
    # and the variants whose opcodes differ between two dumps (exit 1 where any does, or one dump lacks a variant)
    census = pytest.importorskip("sass_census", reason="needs Triton's Gluon")
    assert [census.programs_an_sm(r, None) for r in (64, 80, 128, 130, 168, 178)] == [8, 6, 4, 3, 3, 2]
    assert census.programs_an_sm(64, 4) == 4
    # and by shared memory (the staged activations' ring; 64 KB a program: 3 in the H100's 228 KB)
    assert [census.programs_an_sm(128, 4, shared) for shared in (0, 48 << 10, 64 << 10, 128 << 10)] == [4, 4, 3, 1]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"k1": ["LDG", "HMMA"], "k2": ["EXIT"]}))
    b.write_text(json.dumps({"k1": ["LDG", "HMMA"], "k2": ["EXIT"]}))
    assert census.diff(str(a), str(b)) == 0 and "2 of 2 variants the same" in capsys.readouterr().out
    b.write_text(json.dumps({"k1": ["LDG", "LOP3", "HMMA"], "k2": ["EXIT"], "k3": []}))
    assert census.diff(str(a), str(b)) == 1
    out = capsys.readouterr().out
    assert "k1: 2 -> 3 instructions" in out and "k3: only in" in out and "1 of 2 variants the same" in out


def test_sass_census_reads_marlins_main_loop():
    # sass_census.py marlin: of a Marlin module's kernels, the uint4 ones of one row block; of each, the innermost loop
    # with the most MMAs, closed by a branch on two predicates (BRA P1, 0x..) at a 5-digit address, not the slice loop
    # around it; the weights a thread takes an iteration from the template (stages x K x N over the threads)
    census = pytest.importorskip("sass_census", reason="needs Triton's Gluon")

    def fn(args: str, body: list[tuple[int, str]]) -> str:
        name = f"_ZN6device10marlin_moe6MarlinI13__nv_bfloat16{args}EEEvPK4int4"
        return f"\n\tFunction : {name}\n" + "\n".join(f"        /*{a:04x}*/   {ins} ;" for a, ins in body)

    uint4 = "Ll1125899906843648ELl1125899906909960ELi256ELi1ELi8ELi8ELb1ELi4ELi8ELb0E"
    body = [(0xFFE0, "MOV R1, R2"), (0xFFF0, "LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64]"),
            (0x10000, "LDS.128 R8, [R3]"), (0x10010, "LOP3.LUT R9, R8, 0xf000f, RZ, 0xc0, !PT"),
            (0x10020, "HADD2.BF16_V2 R9, R9, R10"), (0x10030, "HMMA.16816.F32.BF16 R12, R8, R10, R12"),
            (0x10040, "@!P0 BRA P1, 0xfff0"), (0x10050, "STG.E [R2], R12"), (0x10060, "@P0 BRA 0xffe0"),
            (0x10070, "EXIT")]  # fmt: skip
    other = "Ll1125899907892224ELl1125899906909960ELi256ELi1ELi8ELi8ELb1ELi4ELi8ELb0E"  # uint4b8: not ours
    blocks4 = uint4.replace("ELi1ELi8", "ELi4ELi8")  # 4 row blocks: prefill
    sass = fn(uint4, body) + fn(other, body) + fn(blocks4, body)
    usage = f" Function _ZN6device10marlin_moe6MarlinI13__nv_bfloat16{uint4}EEEvPK4int4:\n  REG:128 STACK:32\n"
    [row] = census.marlin_rows(sass, usage)
    assert (row["threads"], row["n_blocks"], row["k_blocks"], row["m_block_size_8"], row["group_blocks"]) == (
        256, 8, 8, 1, 8)
    assert row["registers"] == 128 and row["weights"] == 128 * 128 * 4 // 256
    assert row["loop"] == 6 and (row["HMMA"], row["LOP3"], row["HADD2"], row["LDGSTS"], row["LDS"]) == (1, 1, 1, 1, 1)
    assert census.marlin_args("_ZN3foo3barEv") is None


def test_pick_decode_tiles_serves_the_fastest_tile_variant_against_the_picked_layout(capsys):
    # benchmarks/pick_decode_tiles.py: of a layer's variants, the one with the lowest geometric mean of its times over
    # the picked layout's, cell by cell, as an MXSERVE_DECODE_TILES setting; launch modes (PDL) and other layers'
    # rows never; nothing where none is under the bound
    import pick_decode_tiles as p

    rows = []
    for rt in ("skewed", "uniform"):
        for t, base in ((8, 100.0), (16, 200.0)):
            for variant, us in (("ours served", base), ("ours served (Gluon, loads first)", 0.95 * base),
                                ("ours served (Gluon, BN 64, loads first)", (0.88 if t == 8 else 0.92) * base),
                                ("ours served (PDL)", 0.5 * base), ("ours mixed (Gluon, loads first)", 0.1 * base)):
                rows.append({"model": "m", "routing": rt, "tokens": t, "variant": variant, "seconds": us * 1e-6})
    rows.append({"model": "m", "routing": "skewed", "tokens": 64, "variant": "ours served (Gluon, loads first)",
                 "seconds": 1e-6})  # no picked row at 64 tokens: not compared
    variants = {"Gluon, loads first": {"early": True}, "Gluon, BN 64, loads first": {"bn": 64, "early": True},
                "PDL": {"pdl": True}}
    assert p.pick(rows, variants, "ours served", "m", [8, 16, 64], 0.97) == "bn=64,early=true"
    assert p.pick(rows, variants, "ours served", "m", [8, 16, 64], 0.85) == ""
    err = capsys.readouterr().err
    assert "PDL: 0.500x the picked layout's time (not a tile setting)" in err
    assert "Gluon, loads first: 0.950x" in err
    assert p.setting({"early": True, "down_tiles": {"early": False}}) == "early=true,down_tiles.early=false"
    # None: the down GEMM takes the picked layout's value, as MXSERVE_DECODE_TILES reads it back
    assert p.setting({"bn": 64, "down_tiles": {"bn": None}}) == "bn=64,down_tiles.bn=picked"
    assert p.setting({"dispatch": "grouped"}) is None and p.setting({"pdl": True}) is None


def test_expert_reads_counts_a_block_per_bm_rows_of_an_expert():
    # an expert routed more rows than a block holds is read once per block: one expert, top-1, 20 tokens in blocks
    # of 8 is read 3 times; few rows over many experts (2 tokens, top-2 of 64 experts) once each; more tokens than a
    # block's rows under the benchmark's skewed routing, more than once on average
    from expert_reads import expected_reads

    assert expected_reads(1, 1, 20, 8, False, draws=3) == (1.0, 3.0)
    active, blocks = expected_reads(64, 2, 2, 8, False, draws=20)
    assert 3 <= active <= 4 and blocks == active
    active, blocks = expected_reads(8, 2, 64, 16, True, draws=50)
    assert blocks / active > 1.2, (active, blocks)


def test_skewed_bytes_counts_the_experts_a_launch_reads_and_the_fixs_undercount():
    # benchmarks/skewed_bytes.py: a launch reads its active routed experts and every shared one, each at its scheme's
    # bits with the scales; under the mixed plan, the routing that follows the plan's order of popularity reads more
    # bytes than the draws with an order of their own did (about half the popular experts were w2)
    import torch
    from skewed_bytes import layer_bytes, ratio

    from mxserve.schemes import get_scheme

    plan = ["w4a16g128", "w2a16g128", "w4a16g128", "bf16"]  # 3 routed experts, 1 shared (bf16)
    per = {sc: (get_scheme(sc).bits_per_weight(256) * 2 * 128 * 256 + get_scheme(sc).bits_per_weight(128) * 256 * 128)
           / 8 for sc in set(plan)}  # fmt: skip
    assert layer_bytes(plan, torch.tensor([[0, 2], [2, 0]]), 3, 256, 128) == 2 * per["w4a16g128"] + per["bf16"]
    assert layer_bytes(plan, torch.tensor([[1]]), 3, 256, 128) == per["w2a16g128"] + per["bf16"]
    shape = {"hidden": 256, "inter": 128, "experts": 32, "shared": 0, "top_k": 2}
    from moe_layer import mixed_plan

    assert ratio(shape, mixed_plan(32, 32, 2, True, "cpu"), 16, 8) > 1.1


def _ncu_source_csv(path: Path, rows: list[tuple[str, int, int, int]]) -> None:
    """An ncu source-page export of one kernel: (instruction, samples, times run, long_sb samples) a row."""
    head = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_long_sb",
            "stall_wait", "stall_long_sb (Not Issued)"]  # fmt: skip
    lines = ['"Kernel Name","mx_moe_gemm_gluon_kernel",', ",".join(f'"{h}"' for h in head)]
    for i, (text, samples, run, long_sb) in enumerate(rows):
        cells = [hex(0x7F0000A00000 + 16 * i), f"      {text}", samples, run, long_sb, samples - long_sb, long_sb]
        lines.append(",".join(f'"{c}"' for c in cells))
    path.write_text("\n".join(lines) + "\n")


def test_ncu_stalls_names_the_load_a_loop_head_waits_for(tmp_path: Path, capsys):
    import ncu_stalls

    # a prologue loads R16 once; the loop reloads it at its tail, and its head waits for it: in the iterations after
    # the first the wait is on the tail's load, not the prologue's
    _ncu_source_csv(tmp_path / "k.csv", [
        ("LDG.E.128 R16, desc[UR12][R64.64]", 0, 10, 0),
        ("SHF.R.U32.HI R41, RZ, 0x4, R16", 30, 50, 28),
        ("FADD R20, R74, R20", 2, 50, 0),
        ("LDG.E.U16 R50, desc[UR12][R36.64]", 1, 50, 0),
        ("PRMT R113, R51, 0x5410, R50", 9, 50, 9),
        ("LDG.E.128 R16, desc[UR12][R42.64]", 0, 50, 0),
        ("@!P0  BRA 0x7f91f3ca4590", 0, 50, 0),
        ("EXIT", 1, 10, 0)])  # fmt: skip
    (k,) = ncu_stalls.read(str(tmp_path / "k.csv"))
    assert [x.samples for x in k.instrs] == [0, 30, 2, 1, 9, 0, 0, 1]
    load, before = ncu_stalls.producer(k, 1)  # around the back edge: the tail's load, then the branch
    assert load.text == "LDG.E.128 R16, desc[UR12][R42.64]" and before == 2
    load, before = ncu_stalls.producer(k, 4)
    assert load.text == "LDG.E.U16 R50, desc[UR12][R36.64]" and before == 1
    assert ncu_stalls.producer(k, 2) is None  # R20 and R74: no load writes them
    # an MMA's fp32 sums take 4 registers: one of them read after it comes from the MMA, not from an earlier load
    assert ncu_stalls._dest_and_sources("HMMA.16816.F32.BF16 R16, R16, R74, R64")[0] == {16, 17, 18, 19}
    assert ncu_stalls.main([str(tmp_path / "k.csv"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "43 samples" in out and "| 50 | 6 | 42 | 98% |" in out  # the loop: 6 instructions, 42 of 43 samples
    assert out.count("LDG.E.128 R16, desc[UR12][R42.64]") == 1  # the head's row names its load
    (tmp_path / "bad.csv").write_text("not,ncu\n")
    assert ncu_stalls.main([str(tmp_path / "bad.csv")]) == 2
    assert "no kernel" in capsys.readouterr().err


def test_stats_fold_benchmark_times_busy_and_idle_folds_in_multiprocess_mode():
    import stats_fold

    row = stats_fold._one("mixtral-8x7b", 16, 2, 1.2)  # and a loop of decode steps beside folds, 1.2 s a case
    assert row["layers"] == 32 and row["experts"] == 8 and row["tokens_between_folds"] == 16
    assert row["busy_ms"] > 0 and row["idle_ms"] > 0
    for case in ("alone", "held", "yielding"):  # the loop's lateness: no timing compared here (a shared CI machine)
        st = row[f"stall_{case}"]
        assert st["stalled_ms_per_s"] >= 0 and st["longest_step_ms"] >= st["median_step_ms"] > 0
    table = stats_fold.markdown({"cpu": "c", "commit": "x", "command": "python3 s", "stall_s": 1.2, "rows": [row]})
    assert f"| mixtral-8x7b | 32 | 8 | 16 | {row['busy_ms']} | {row['idle_ms']} |" in table
    held, ylds = row["stall_held"], row["stall_yielding"]
    assert (f"| mixtral-8x7b | {row['stall_alone']['stalled_ms_per_s']} | {held['stalled_ms_per_s']} | "
            f"{held['longest_step_ms']} | {ylds['stalled_ms_per_s']} | {ylds['longest_step_ms']} |") in table


def _histograms(e2e: tuple[float, int], stages: dict[str, tuple[float, int]]) -> str:
    """SGLang's request histograms as its /metrics writes them (two label sets for e2e, as two schedulers would)."""
    lines = ["# TYPE sglang:e2e_request_latency_seconds histogram"]
    for model, share in (("a", 0.25), ("b", 0.75)):
        lines += [f'sglang:e2e_request_latency_seconds_bucket{{le="+Inf",model_name="{model}"}} {e2e[1] * share}',
                  f'sglang:e2e_request_latency_seconds_sum{{model_name="{model}"}} {e2e[0] * share}',
                  f'sglang:e2e_request_latency_seconds_count{{model_name="{model}"}} {e2e[1] * share}']  # fmt: skip
    lines.append("# TYPE sglang:per_stage_req_latency_seconds histogram")
    for stage, (total, count) in stages.items():
        lines += [f'sglang:per_stage_req_latency_seconds_sum{{model_name="a",stage="{stage}"}} {total}',
                  f'sglang:per_stage_req_latency_seconds_count{{model_name="a",stage="{stage}"}} {count}']  # fmt: skip
    lines += ["# TYPE mxserve_load_share gauge", 'mxserve_load_share{layer="0",expert="0"} 0.5']
    return "\n".join(lines) + "\n"


def test_serving_reads_sglangs_request_histograms_around_each_round():
    """serving.py scrapes SGLang's request histograms before and after a timed round: each one's mean over the
    round's requests (the tokenizer manager's end to end, the scheduler's stages), summed over label sets; a server
    without them (no --enable-metrics) gives none, and the report's table holds the means beside the client's."""
    from http.server import BaseHTTPRequestHandler

    scrapes = [_histograms((2.0, 8), {"prefill_forward": (0.08, 8)}),
               _histograms((3.3, 12), {"prefill_forward": (0.10, 12), "request_process": (0.02, 4)})]  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = scrapes.pop(0).encode() if scrapes else b""
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body)

    srv = _serve(Handler)
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        before, after = serving.server_histograms(base), serving.server_histograms(base)
        assert before == {"e2e": [2.0, 8.0], "stage:prefill_forward": [0.08, 8.0]}
        assert serving.server_histograms(base) is None  # a scrape with none of them
    finally:
        srv.shutdown()
    means = serving.histogram_means(before, after)
    # 1.3 s over 4 requests; 0.02 s over 4 prefill passes; a stage first seen in the round counts from zero
    assert means == {"e2e": {"mean_ms": 325.0, "n": 4}, "stage:prefill_forward": {"mean_ms": 5.0, "n": 4},
                     "stage:request_process": {"mean_ms": 5.0, "n": 4}}  # fmt: skip
    assert serving.histogram_means(None, after) is None
    assert serving.server_histograms(f"http://127.0.0.1:{serving.free_port()}") is None  # no server: none
    rec = {"name": "s", "startup_s": 1.0, "throughput": [
        {"concurrency": 8, "output_tok_per_s": 2000.0, "rounds": [2000.0], "mean_latency_s": 0.3305,
         "server_ms": means}]}  # fmt: skip
    table = serving.markdown({"tag": "t", "device": "gpu", "command": "c", "max_tokens": 128, "concurrency": [8],
                              "servers": [rec], "equal": [], "self": {}})  # fmt: skip
    assert "| server | conc | client | e2e | first_token | inter_token | queue | prefill_forward | request_process |" \
        in table
    assert "| s | 8 | 330.5 | 325.0 |  |  |  | 5.0 | 5.0 |" in table


def test_serving_reads_sglangs_own_decode_rate_from_its_log():
    """The decode rate SGLang logs every 40 steps (no profiler), at a full batch only, and its table."""
    line = ("[2026-12-06 05:56:49] Decode batch, #running-req: {n}, #token: 14, token usage: 0.00, cuda graph: True, "
            "gen throughput (token/s): {r}, #queue-req: 0\n")
    text = "".join(line.format(n=n, r=r) for n, r in [(1, 480.5), (1, 300.0), (2, 900.0), (1, 486.25), (1, 470.0)])
    got = serving.log_decode_rate("Prefill batch, #new-seq: 1\n" + text, 1)
    assert got == {"lines": 4, "median": 470.0, "p90": 480.5}
    assert serving.log_decode_rate(text, 8) is None
    # 8 requests of 48 tokens in 0.13 s each: 47 steps at 470 tokens/s take 100 ms, 30 ms are left beside them
    one = {"concurrency": 1, "requests": 8, "output_tokens": 384, "mean_latency_s": 0.13, "output_tok_per_s": 400.0,
           "rounds": [400.0], "log_decode": got}
    rec = {"name": "s", "startup_s": 1.0, "throughput": [
        one, {"concurrency": 8, "output_tok_per_s": 2000.0, "rounds": [2000.0]}]}
    assert serving.beside_steps_ms(one) == 30.0 and serving.beside_steps_ms(rec["throughput"][1]) is None
    table = serving.markdown({"tag": "t", "device": "d", "command": "c", "max_tokens": 8, "concurrency": [1, 8],
                              "servers": [rec], "equal": [], "self": {}})
    assert "| s | 470.0 / 480.5 |  |" in table
    assert "| s | 30.0 |  |" in table


def test_host_overhead_counts_an_eager_forwards_launches_without_running_them(tmp_path: Path):
    """host_overhead.py on the CPU (Qwen1.5's expert counts, small widths): each forward's launches are counted and
    stubbed (a launch that ran would need a GPU or the interpreter); one token and 8 take the top-k's rows straight
    (MXSERVE_TOPK_ROWS, MXSERVE_TOPK_GRID: both on by default), so no alignment launch."""
    import subprocess

    unset = ("TRITON_INTERPRET", "MXSERVE_TOPK_ROWS", "MXSERVE_TOPK_GRID")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--small", "--tokens", "1",
                          "8", "--reps", "3", "--device", "cpu", "--out", str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads((tmp_path / "host_overhead.json").read_text())
    one, eight = res["rows"]
    assert one["tokens"] == 1 and one["kernels"]["mx_moe_gemm_gluon_kernel"] == 2
    assert all(r["host_us"] > 0 and r["host_us_fresh_picks"] > 0 for r in res["rows"])  # picks kept and afresh
    assert eight["tokens"] == 8 and eight["kernels"]["mx_moe_gemm_gluon_kernel"] >= 2
    assert "moe_align_kernel" not in one["kernels"] and "moe_align_kernel" not in eight["kernels"]
    assert one["launches"] == sum(one["kernels"].values())
    assert "| 8 | " in (tmp_path / "host_overhead.md").read_text()
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--tokens", "0", "--out",
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "positive" in bad.stderr
