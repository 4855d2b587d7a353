"""Which tiny test models plain SGLang decodes to finite logits (run on the GPU).

The SGLang GPU tests serve tiny random models (tests/conftest.py, SGLANG_TINY). On 2026-12-03
plain SGLang 0.5.15 decoded the tiny DeepSeek-V2 then used to NaN logits (a finite first token,
null logprobs after it, a sampled request killing the scheduler), with or without mxserve
(benchmarks/results/gpu_sglang_tiny_deepseek_nan_h200.log), while DeepSeek-V2-Lite's real shapes
decode. The cause, found in SGLang's source: that config had 4 KV heads to 2 heads, and SGLang's
Triton decode sizes its KV splits from heads // KV heads (0), also for MLA. The tests now use 2 and
2; this probe confirmed it on an H200 (benchmarks/results/gpu_sglang_tests_probe_h200_s3.log:
2/2 and 16/16 decode finite, 2/4 does not). This serves config variants side by side on plain
SGLang and reports, per variant, the greedy logprobs of 8 tokens and whether a sampled request is
answered.

    source scripts/device_env.sh
    python3 scripts/sglang_tiny_probe.py --out $OUT/probe                        # the built-in DeepSeek-V2 variants
    python3 scripts/sglang_tiny_probe.py --out $OUT/probe --variant h16 num_attention_heads=16
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

# SGLang sizes its KV pool from the memory free when it started, less (1 - fraction) of it; a high
# fraction with a capped pool lets servers start side by side while other work takes GPU memory.
ARGS = ["--attention-backend", "triton", "--sampling-backend", "pytorch", "--grammar-backend", "none",
        "--mem-fraction-static", "0.9", "--max-total-tokens", "16384"]  # fmt: skip
# the tests' config; the one that decoded NaN (4 KV heads); toward DeepSeek-V2-Lite's attention
VARIANTS = {
    "tests": {},
    "kv_heads_4": {"num_key_value_heads": 4},
    "heads16": {"num_attention_heads": 16, "num_key_value_heads": 16},
    "lite_attention": {"num_attention_heads": 16, "num_key_value_heads": 16, "hidden_size": 2048,
                       "qk_nope_head_dim": 128, "v_head_dim": 128, "qk_head_dim": 192, "head_dim": 128},
}


def value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def probe(port: int) -> dict:
    """Greedy logprobs (None: NaN, as SGLang serializes it) and whether a sampled request is answered."""
    out = post(port, "/v1/completions", {"model": "tiny", "prompt": "To be, or not", "max_tokens": 8,
                                         "temperature": 0, "ignore_eos": True, "logprobs": 1})  # fmt: skip
    lps = out["choices"][0]["logprobs"]["token_logprobs"]
    finite = [lp is not None and math.isfinite(lp) for lp in lps]
    try:
        post(port, "/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 8, "ignore_eos": True})
        sampled = "answered"
    except OSError as e:
        sampled = f"failed: {e!r}"
    return {"greedy_logprobs": lps, "finite": sum(finite), "of": len(finite), "sampled": sampled}


def main() -> None:
    from conftest import SGLANG_TINY, build_tiny

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="deepseek_v2")
    ap.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                    help="a variant instead of the built-in ones: its name, then config overrides")  # fmt: skip
    ap.add_argument("--wait", type=float, default=300)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = VARIANTS if not a.variant else {
        v[0]: {k: value(x) for k, x in (kv.split("=", 1) for kv in v[1:])} for v in a.variant
    }
    base = SGLANG_TINY[a.arch]
    procs = {}
    for i, (name, over) in enumerate(variants.items()):
        src = build_tiny(a.arch, Path("/tmp/probe") / name, **{**base, **over})
        port = 32200 + i
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(src), "--port", str(port),
               "--served-model-name", "tiny", *ARGS]  # fmt: skip
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), port)
    results: dict[str, dict] = {}
    deadline = time.time() + a.wait
    while len(results) < len(procs) and time.time() < deadline:
        for name, (p, port) in procs.items():
            if name in results:
                continue
            if p.poll() is not None:
                results[name] = {"error": f"server exited ({p.returncode}) before /health"}
                continue
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            except OSError:
                continue
            try:
                results[name] = probe(port)
            except OSError as e:
                results[name] = {"error": repr(e)}
            print(name, variants[name], results[name], flush=True)
        time.sleep(1)
    for name, (p, _) in procs.items():
        results.setdefault(name, {"error": "no /health in time"})
        p.terminate()
    report = {name: {"overrides": variants[name], **r} for name, r in results.items()}
    (out / "probe.json").write_text(json.dumps(report, indent=2))
    for name, r in report.items():
        print(f"{name}: {r.get('finite', '-')}/{r.get('of', '-')} finite greedy logprobs, sampled "
              f"{r.get('sampled', r.get('error'))}")  # fmt: skip


if __name__ == "__main__":
    main()
