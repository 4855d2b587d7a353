"""Routing metrics of the SGLang engine against the embedded engine, same checkpoint, same prompts.

    python3 benchmarks/metrics_parity.py --ckpt CKPT --data DATA --out OUT [--sglang-args "..."]

For each engine in turn (`mxserve launch --engine sglang`, then `--engine
embedded`, both on this GPU): scrape /metrics, send Shakespeare then Python
prompts one at a time with max_tokens=1 (so only the prompts' prefill runs
through the experts: the routed tokens depend on the prompts alone, not on
sampled text), scrape again; then, on the SGLang engine, 32 concurrent
streams while /metrics is scraped every second (no request may fail, every
mxserve series must be there). Writes OUT/metrics-parity.{json,md}: per
layer the tokens and routed-token counts of both engines and their
difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from procs import stop, wait_up
from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERIES = ("mxserve_expert_routed_tokens_total", "mxserve_layer_tokens_total", "mxserve_expert_load_share",
          "mxserve_forward_tokens_bucket", "mxserve_tokens_per_forward", "mxserve_expert_block_bits",
          "mxserve_expert_block_scheme", "mxserve_plan_avg_bits", "mxserve_plan_info", "mxserve_replans_total",
          "mxserve_swap_seconds_bucket", "mxserve_decode_bytes_per_token")


def scrape(base: str) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def routed(m) -> dict[int, dict[int, float]]:
    out: dict[int, dict[int, float]] = {}
    for k, v in m.get("mxserve_expert_routed_tokens_total", {}).items():
        d = dict(k)
        out.setdefault(int(d["layer"]), {})[int(d["expert"])] = v
    return out


def layer_tokens(m) -> dict[int, float]:
    return {int(dict(k)["layer"]): v for k, v in m.get("mxserve_layer_tokens_total", {}).items()}


def prompts(data: str, n: int) -> list[str]:
    out = []
    for name in ("shakespeare-dev.txt", "python-dev.txt"):
        text = open(os.path.join(data, name)).read()
        step = len(text) // (n + 1)
        out += [text[i * step : i * step + 400] for i in range(n)]
    return out


def start(args: list[str], port: int, log: str, timeout: float = 600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "mxserve.cli", "launch", *args, "--port", str(port),
                             "--stats-interval", "0.5"], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    return proc, base, wait_up(base + "/health", proc, log, timeout)


def run_prompts(base: str, model: str, texts: list[str]) -> int:
    n = 0
    for t in texts:
        r = httpx.post(base + "/v1/completions", timeout=120,
                       json={"model": model, "prompt": t, "max_tokens": 1, "temperature": 0})
        r.raise_for_status()
        n += r.json()["usage"]["prompt_tokens"]
    return n


def load_under_scrape(base: str, model: str, streams: int = 32) -> dict:
    """``streams`` concurrent streamed completions while /metrics is scraped every second."""
    done = threading.Event()
    scrapes, scrape_errors = [0], [0]

    def scraper():
        while not done.is_set():
            try:
                scrape(base)
                scrapes[0] += 1
            except Exception:  # noqa: BLE001 - counted, reported
                scrape_errors[0] += 1
            done.wait(1.0)

    def one(i: int) -> bool:
        body = {"model": model, "prompt": f"def f{i}(x):", "max_tokens": 32, "stream": True, "temperature": 0.8}
        try:
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as r:
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                return r.status_code == 200 and lines[-1] == "data: [DONE]"
        except httpx.HTTPError:
            return False

    th = threading.Thread(target=scraper)
    th.start()
    with ThreadPoolExecutor(streams) as pool:
        ok = list(pool.map(one, range(streams)))
    done.set()
    th.join()
    return {"streams": streams, "failed": ok.count(False), "scrapes": scrapes[0], "scrape_errors": scrape_errors[0]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-prompts", type=int, default=16, help="per domain")
    ap.add_argument("--sglang-args", default="--attention-backend triton --sampling-backend pytorch "
                    "--grammar-backend none --mem-fraction-static 0.6")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    texts = prompts(a.data, a.n_prompts)
    model = "refmoe-25m"
    res: dict = {"command": " ".join(sys.argv), "prompts": len(texts)}
    engines = {"sglang": ["--engine", "sglang", "--sglang-args", a.sglang_args], "embedded": ["--engine", "embedded"]}
    for name, extra in engines.items():
        proc, base, up = start(["--model", a.ckpt, "--served-model-name", model, *extra], 30000,
                               os.path.join(a.out, f"{name}.log"))
        try:
            time.sleep(2)
            m0 = scrape(base)
            n = run_prompts(base, model, texts)
            time.sleep(2)  # a few folds
            m1 = scrape(base)
            r0, r1, t0, t1 = routed(m0), routed(m1), layer_tokens(m0), layer_tokens(m1)
            res[name] = {
                "startup_s": round(up, 1),
                "prompt_tokens": n,
                "layer_tokens": {li: t1[li] - t0.get(li, 0) for li in t1},
                "routed": {li: [r1[li][e] - r0.get(li, {}).get(e, 0) for e in sorted(r1[li])] for li in r1},
                "series_present": [s for s in SERIES if s in m1],
            }
            if name == "sglang":
                res[name]["under_load"] = load_under_scrape(base, model)
        finally:
            stop(proc)
    sg, em = res["sglang"], res["embedded"]
    rows = []
    for li in sorted(em["routed"], key=int):
        a_, b_ = sg["routed"][li], em["routed"][li]
        diff = sum(abs(x - y) for x, y in zip(a_, b_))
        rows.append({"layer": li, "tokens_sglang": sg["layer_tokens"][li], "tokens_embedded": em["layer_tokens"][li],
                     "routed_sglang": sum(a_), "routed_embedded": sum(b_), "l1_diff": diff,
                     "l1_diff_share": diff / max(sum(b_), 1)})
    res["layers"] = rows
    with open(os.path.join(a.out, "metrics-parity.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = [f"# SGLang vs embedded routing metrics (refmoe-25m, {len(texts)} prompts, prefill only)", "",
          f"`{res['command']}`", "",
          "| layer | tokens SGLang | tokens embedded | routed SGLang | routed embedded | sum abs diff of per-expert "
          "counts | as share |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['layer']} | {r['tokens_sglang']:.0f} | {r['tokens_embedded']:.0f} | {r['routed_sglang']:.0f}"
                  f" | {r['routed_embedded']:.0f} | {r['l1_diff']:.0f} | {r['l1_diff_share']:.2%} |")
    md += ["", f"Series present on SGLang: {', '.join(sg['series_present'])}",
           f"Series present on embedded: {', '.join(em['series_present'])}",
           f"Under load on SGLang: {json.dumps(sg['under_load'])}",
           f"Startup to /health: SGLang {sg['startup_s']} s, embedded {em['startup_s']} s"]
    with open(os.path.join(a.out, "metrics-parity.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
