"""Serving benchmark: plain SGLang against mxserve on SGLang, one server at a time, same prompts.

For each server: start it, wait for /health, check the official ``openai``
client, get greedy completions of fixed prompts (the equality check) one at a
time and then all at once (the server's own consistency: batching changes its
kernels' shapes and so its bf16 sums), then measure output throughput at each
concurrency with ``ignore_eos`` so every request generates exactly
``--max-tokens`` tokens. Servers:

- ``sglang-bf16``: ``sglang.launch_server`` on ``--model``;
- ``sglang-<q>`` for each ``--sglang-quant q``: SGLang's own uniform quantization;
- ``sglang-<name>`` for each ``--sglang-ckpt name=DIR``: plain SGLang on another checkpoint of the
  model (a GPTQ copy on Marlin: gptq_copy.py), with ``--plain-args name=ARGS`` added;
- ``mxserve-<name>`` for each ``--ckpt name=DIR``: ``mxserve launch --engine sglang``
  (with ``--launch-args name=ARGS`` added, e.g. ``--bf16-layers kernel``).

SGLang's own decode rate (its ``Decode batch`` log line) while each concurrency's rounds ran is
kept beside the throughput (``log_decode``: median and 90th percentile tokens/s, full batches).
``--latency-requests N`` (default 8) then streams N requests one at a time: the time to each one's
first token (queueing, prefill, the HTTP path) and per output token after it, so a gap in
tokens/s splits into what each request costs beside its decode steps and the steps themselves;
and N more, not streamed, through SGLang's own ``/generate``: the client's time beside the
server's ``e2e_latency`` (its tokenizer manager's, from the request's arrival to its last output),
so a request's time beside the steps splits again into the server's and the HTTP path's. Around each timed round
the servers' own request histograms (SGLang's, where ``--enable-metrics`` exports them) give the round's mean end to
end, first token, queue time and scheduler stages (``server_ms``), beside the client's mean and each round's least,
median and most request latency (``latency_ms``).
``--profile-steps N`` then traces N decode steps of each server with SGLang's profiler
(decode_trace.py: each kernel's GPU time per step); ``--server-env NAME=VAR=VALUE`` sets
an environment variable for one server (e.g. mxserve's MXSERVE_DISPATCH).

``--equal a:b`` asserts (and records) that servers a and b gave the same greedy text
(prompts sent one at a time); ``--compare a:b`` only records it. Where two texts part,
the report gives b's top-1 minus top-2 log-prob at that token: a near tie that one
bf16 ulp of the logits can flip.

    python3 benchmarks/serving.py --model M --ckpt 4bit=C4 --ckpt bf16plan=CB --sglang-quant fp8 \\
        --equal mxserve-bf16plan:sglang-bf16 --out $OUT/serving-refmoe
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_trace  # noqa: E402
from procs import precompile_settled, precompile_summary  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the lent GPU's SGLang bundle was seen working with (../shared/device/README.md)
DEFAULT_SGLANG_ARGS = "--attention-backend triton --sampling-backend pytorch --grammar-backend none"


def free_port() -> int:
    """A free port below 55536: SGLang also listens on port + 10000."""
    for port in range(30000 + os.getpid() % 1000, 55536, 7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def prompts_from(paths: list[str], n: int, chars: int = 300) -> list[str]:
    """``n`` prompts: consecutive chunks of the given text files, alternating between them."""
    texts = [open(p).read() for p in paths]
    out = []
    for i in range(n):
        t = texts[i % len(texts)]
        start = (i // len(texts)) * 4 * chars
        out.append(t[start : start + chars])
    return out


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.time() - t0
        except OSError:
            time.sleep(1)
    raise RuntimeError("server did not become healthy")


def wait_precompiled(log_path: str, proc: subprocess.Popen, timeout: float) -> float | None:
    """Seconds until an `mxserve launch` (its log says it started SGLang) logs its precompile step over; None for
    other servers. SGLang can answer /health while the launcher still compiles kernel variants, a process per core:
    a server timed then shares the CPU with them (thirty-ninth session: the second mxserve server of a run, ready
    after 76 s, compiled for 88, over all of its timed rounds)."""
    t0 = time.time()
    while True:
        with open(log_path, errors="replace") as f:
            text = f.read()
        if "mxserve: starting SGLang" not in text:
            return None
        if precompile_settled(text):
            return round(time.time() - t0, 1)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} while its kernels precompiled")
        if time.time() - t0 > timeout:
            raise RuntimeError(f"its kernels still precompiling {timeout:.0f} s after it was healthy")
        time.sleep(1)


def complete(base: str, model: str, prompt: str, max_tokens: int, ignore_eos: bool, logprobs: int = 0) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if ignore_eos:
        body["ignore_eos"] = True
    if logprobs:
        body["logprobs"] = logprobs
    req = urllib.request.Request(
        base + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


# SGLang's own per-request histograms (servers run with --enable-metrics, as `mxserve launch` always does): the
# tokenizer manager's end to end, first token and between tokens, the scheduler's queue time and its stages
SERVER_HISTOGRAMS = {"sglang:e2e_request_latency_seconds": "e2e", "sglang:time_to_first_token_seconds": "first_token",
                     "sglang:inter_token_latency_seconds": "inter_token", "sglang:queue_time_seconds": "queue"}
STAGE_HISTOGRAM = "sglang:per_stage_req_latency_seconds"


def server_histograms(base: str) -> dict[str, list[float]] | None:
    """{name: [sum seconds, count]} of SGLang's request histograms on ``base``'s /metrics (SERVER_HISTOGRAMS, and each
    stage of STAGE_HISTOGRAM as ``stage:NAME``), summed over their other labels; None where there are none (no
    --enable-metrics, or not an SGLang server)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    got: dict[str, list[float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name not in SERVER_HISTOGRAMS and fam.name != STAGE_HISTOGRAM:
            continue
        for smp in fam.samples:
            part = 0 if smp.name.endswith("_sum") else 1 if smp.name.endswith("_count") else None
            if part is None:
                continue
            key = f"stage:{smp.labels.get('stage', '')}" if fam.name == STAGE_HISTOGRAM else SERVER_HISTOGRAMS[fam.name]
            got.setdefault(key, [0.0, 0.0])[part] += smp.value
    return got or None


def histogram_means(before: dict | None, after: dict | None) -> dict | None:
    """Each histogram's mean (ms) and observations between two server_histograms scrapes; None without both."""
    if not before or not after:
        return None
    out = {}
    for key, (total, count) in after.items():
        t0, c0 = before.get(key, (0.0, 0.0))
        if count > c0:
            out[key] = {"mean_ms": round((total - t0) / (count - c0) * 1e3, 2), "n": int(count - c0)}
    return out or None


def throughput(base: str, model: str, prompts: list[str], conc: int, n: int, max_tokens: int,
               rounds: int = 1) -> dict:
    """Output tokens/s of ``n`` requests, ``conc`` at a time, over ``rounds`` timed rounds (the median
    reported, each kept). A warm-up wave of ``conc`` short requests goes first, so that what a server
    does once per batch shape (a kernel compiled on first use) is not timed; a one-time cost left
    after it shows as a slow first round."""
    jobs = [prompts[i % len(prompts)] for i in range(n)]

    def one(p: str) -> tuple[int, float]:
        t = time.perf_counter()
        r = complete(base, model, p, max_tokens, ignore_eos=True)
        return r["usage"]["completion_tokens"], time.perf_counter() - t

    with ThreadPoolExecutor(conc) as ex:
        list(ex.map(lambda p: complete(base, model, p, 8, ignore_eos=True), jobs[:conc]))
    runs = []
    for _ in range(rounds):
        before = server_histograms(base)  # outside the timed span
        t0 = time.perf_counter()
        with ThreadPoolExecutor(conc) as ex:
            res = list(ex.map(one, jobs))
        wall = time.perf_counter() - t0
        toks = sum(r[0] for r in res)
        # the spread as well as the mean: a few requests held up (a scheduler's stall) or all a little longer
        ms = sorted(r[1] * 1e3 for r in res)
        spread = {"min": round(ms[0], 1), "median": round(ms[(n - 1) // 2], 1), "max": round(ms[-1], 1)}
        runs.append({"seconds": round(wall, 3), "output_tok_per_s": round(toks / wall, 1),
                     "mean_latency_s": round(sum(r[1] for r in res) / n, 3), "output_tokens": toks,
                     "latency_ms": spread, "server_ms": histogram_means(before, server_histograms(base))})  # fmt: skip
    mid = sorted(runs, key=lambda r: r["output_tok_per_s"])[(rounds - 1) // 2]  # the median (lower of two)
    return {"concurrency": conc, "requests": n, **mid, "rounds": [r["output_tok_per_s"] for r in runs]}


def stream_chunks(base: str, model: str, prompt: str, max_tokens: int) -> Iterator[dict]:
    """The chunks of one streamed completion (``ignore_eos``; the last one carries the usage), as they come."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[len("data: "):])


def stream_each(base: str, model: str, prompt: str, max_tokens: int, each: Callable[[], None]) -> None:
    """One streamed completion, ``each()`` called for every token step it streams (decode_trace.profile_decode)."""
    for obj in stream_chunks(base, model, prompt, max_tokens):
        if obj.get("choices"):
            each()


def stream_once(base: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion (``ignore_eos``): seconds to its first token, and per token after it to its last."""
    t0 = time.perf_counter()
    first = last = None
    chunks, usage = 0, None
    for obj in stream_chunks(base, model, prompt, max_tokens):
        usage = obj.get("usage") or usage
        # A chunk with a choice is a token step even with no text: a random-weight model's tokens often decode
        # to nothing alone (a partial UTF-8 sequence), and SGLang still streams their empty deltas.
        if obj.get("choices"):
            last = time.perf_counter()
            first = first or last
            chunks += 1
    if first is None:
        raise RuntimeError(f"{model}: a streamed completion sent no chunk with a choice")
    n = (usage or {}).get("completion_tokens") or chunks  # a server without usage in streams: one chunk a token
    return {"ttft_s": first - t0, "tpot_s": (last - first) / max(n - 1, 1), "tokens": n}


def stream_latency(base: str, model: str, prompts: list[str], max_tokens: int, n: int) -> dict:
    """Medians over ``n`` streamed requests sent one at a time (after one not counted): where a request's time goes
    beside the decode steps (time to first token: queueing, prefill, the HTTP path) and the decode rate itself."""
    stream_once(base, model, prompts[0], 8)
    runs = [stream_once(base, model, prompts[i % len(prompts)], max_tokens) for i in range(n)]

    def med(key: str) -> float:
        return sorted(r[key] for r in runs)[(n - 1) // 2]

    return {"requests": n, "ttft_ms": round(med("ttft_s") * 1e3, 2), "tpot_ms": round(med("tpot_s") * 1e3, 3),
            "tokens": med("tokens"), "ttft_ms_each": [round(r["ttft_s"] * 1e3, 2) for r in runs]}


def native_once(base: str, prompt: str, max_tokens: int) -> dict:
    """One request through SGLang's own ``/generate``, not streamed (``ignore_eos``): the client's seconds, and the
    server's ``meta_info.e2e_latency`` (from the request's arrival in its tokenizer manager to the last output)."""
    body = {"text": prompt, "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}
    req = urllib.request.Request(base + "/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:  # mxserve's embedded engine serves the OpenAI routes alone
            raise RuntimeError("no /generate route: not an SGLang server") from None
        raise
    client = time.perf_counter() - t0
    meta = (out[0] if isinstance(out, list) else out).get("meta_info", {})
    if not isinstance(meta.get("e2e_latency"), (int, float)):
        raise RuntimeError("/generate's answer has no meta_info.e2e_latency (an SGLang older than the bundle's?)")
    return {"client_s": client, "server_s": float(meta["e2e_latency"]), "tokens": meta.get("completion_tokens")}


def native_latency(base: str, prompts: list[str], max_tokens: int, n: int) -> dict:
    """Medians over ``n`` requests through ``/generate`` sent one at a time (after one not counted): the client's
    time, the server's own, and the time outside the server (the HTTP path and JSON) of each request."""
    native_once(base, prompts[0], 8)
    runs = [native_once(base, prompts[i % len(prompts)], max_tokens) for i in range(n)]

    def med(values: list[float]) -> float:
        return round(sorted(values)[(n - 1) // 2] * 1e3, 2)

    return {"requests": n, "client_ms": med([r["client_s"] for r in runs]),
            "server_ms": med([r["server_s"] for r in runs]),
            "outside_ms": med([r["client_s"] - r["server_s"] for r in runs]), "tokens": runs[0]["tokens"]}


DECODE_LOG = re.compile(r"Decode batch, #running-req: (\d+),.*gen throughput \(token/s\): ([\d.]+)")


def log_decode_rate(text: str, conc: int) -> dict | None:
    """SGLang's own decode rate (its ``Decode batch`` log line, every 40 steps by default) over the lines of ``text``
    with ``conc`` requests running: median and 90th percentile tokens/s, no profiler. A line whose 40 steps took in a
    prefill or a request's end reads lower, so the upper percentile is the steady rate; None where none logged."""
    rates = sorted(float(m[2]) for m in DECODE_LOG.finditer(text) if int(m[1]) == conc)
    if not rates:
        return None
    return {"lines": len(rates), "median": rates[(len(rates) - 1) // 2], "p90": rates[int(0.9 * (len(rates) - 1))]}


def beside_steps_ms(r: dict) -> float | None:
    """Of a timed round's mean request latency, the milliseconds its decode steps at SGLang's logged rate do not explain
    (prefill, the HTTP path, the scheduler's gaps): a step at full batch takes ``concurrency / rate`` seconds, and a
    request of n tokens waits for n - 1 of them after its first. None where nothing was logged."""
    logged = r.get("log_decode")
    if not logged or not r.get("requests"):
        return None
    steps_s = (r["output_tokens"] / r["requests"] - 1) * r["concurrency"] / logged["median"]
    return round((r["mean_latency_s"] - steps_s) * 1e3, 1)


def top2_margins(lp: dict | None) -> list[float] | None:
    """Per generated token, log p(top 1) - log p(top 2): how near a tie each greedy choice was."""
    if not lp or not lp.get("top_logprobs"):
        return None
    out = []
    for top in lp["top_logprobs"]:
        vals = sorted((v for v in (top or {}).values() if v is not None), reverse=True)
        out.append(round(vals[0] - vals[1], 4) if len(vals) > 1 else None)
    return out


def first_difference(x: str, y: str) -> int:
    return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))


def token_at(tokens: list[str] | None, char: int) -> int | None:
    """Index of the generated token that holds character ``char`` of the text."""
    if not tokens:
        return None
    end = 0
    for i, t in enumerate(tokens):
        end += len(t or "")
        if end > char:
            return i
    return len(tokens) - 1


def compare_greedy(gx: list[str], ref: dict, key: str = "greedy") -> dict:
    """How many texts of ``gx`` equal ``ref[key]``; where they part, ``ref``'s top-2 margin there."""
    gy = ref.get(key) or []
    parts = []
    for i, (p, q) in enumerate(zip(gx, gy)):
        if p != q:
            char = first_difference(p, q)
            margins = (ref.get("greedy_margins") or [None] * len(gy))[i]
            at = token_at((ref.get("greedy_tokens") or [None] * len(gy))[i], char)
            margin = margins[at] if margins and at is not None and at < len(margins) else None
            parts.append({"prompt": i, "char": char, "token": at, "b_margin_there": margin})
    return {"same": sum(p == q for p, q in zip(gx, gy)), "total": len(gy), "differences": parts}


def openai_check(base: str, model: str) -> dict:
    """A completion and a streamed chat completion through the official client."""
    import openai

    c = openai.OpenAI(base_url=base + "/v1", api_key=os.environ.get("MXSERVE_API_KEY", "none"), max_retries=0)
    comp = c.completions.create(model=model, prompt="To be, or not to be", max_tokens=16, temperature=0)
    chunks = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "def add(a, b):"}], max_tokens=16, stream=True
    )
    chat = "".join((ch.choices[0].delta.content or "") for ch in chunks if ch.choices)
    return {"completion": comp.choices[0].text, "streamed_chat": chat}


def live_decode_bytes(base: str, wait_s: float = 30.0) -> float | None:
    """The expert weight bytes a decoded token reads, as an mxserve server's live gauge says after its traffic
    (``mxserve_decode_bytes_per_token{window="sliding"}``: the served blocks' bytes under the routing it counted),
    waiting up to ``wait_s`` for the statistics fold that exports it; None where the server exports no mxserve
    series (plain SGLang), no /metrics, or no such gauge by then."""
    deadline = time.time() + wait_s
    while True:
        try:
            with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
                text = r.read().decode(errors="replace")
        except OSError:  # no /metrics (404) or no answer: no gauge
            return None
        m = re.search(r'^mxserve_decode_bytes_per_token\{[^}]*window="sliding"[^}]*\} (\S+)$', text, re.M)
        if m:
            return float(m.group(1))
        if "mxserve_layer_tokens_total" not in text or time.time() > deadline:
            return None  # not an mxserve server, or no fold exported it in time
        time.sleep(0.5)


def run_server(name: str, cmd: list[str], port: int, a, prompts: list[str], log_dir: str,
               env: dict[str, str] | None = None) -> dict:  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    log_path = os.path.join(log_dir, f"{name}.log")
    rec: dict = {"name": name, "command": shlex.join(cmd), **({"env": env} if env else {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, **env} if env else None)  # fmt: skip
        try:
            rec["startup_s"] = round(wait_healthy(base, proc, a.startup_timeout), 1)
            print(f"[{name}] healthy after {rec['startup_s']} s", flush=True)
            log.flush()
            waited = wait_precompiled(log_path, proc, a.startup_timeout)
            if waited is not None:  # measured once the launcher's compiles are over
                rec["precompile_after_health_s"] = waited
                print(f"[{name}] its kernels precompiled {waited} s after that", flush=True)
            with open(log_path, errors="replace") as f:
                said = precompile_summary(f.read())
            if said:  # what the launcher's precompile took (the recording apart from the compiling)
                rec["precompile"] = said
            rec["openai"] = openai_check(base, name)
            greedy = [complete(base, name, p, a.greedy_tokens, False, logprobs=2)["choices"][0] for p in prompts]
            rec["greedy"] = [c["text"] for c in greedy]
            rec["greedy_margins"] = [top2_margins(c.get("logprobs")) for c in greedy]
            rec["greedy_tokens"] = [(c.get("logprobs") or {}).get("tokens") for c in greedy]
            with ThreadPoolExecutor(len(prompts)) as ex:
                batched = list(ex.map(lambda p: complete(base, name, p, a.greedy_tokens, False)["choices"][0], prompts))
            rec["greedy_batched"] = [c["text"] for c in batched]
            rec["throughput"] = []
            for conc in a.concurrency:
                log.flush()
                start = os.path.getsize(log_path)
                r = throughput(base, name, prompts, conc, max(a.min_requests, 2 * conc), a.max_tokens, a.rounds)
                with open(log_path, errors="replace") as f:  # what the server logged while these rounds ran
                    f.seek(start)
                    logged = log_decode_rate(f.read(), conc)
                if logged:
                    r["log_decode"] = logged
                print(f"[{name}] {r}", flush=True)
                rec["throughput"].append(r)
            read = live_decode_bytes(base)
            if read is not None:  # relates the throughput to the bytes each plan reads under the served routing
                rec["decode_bytes_per_token"] = read
            if a.latency_requests:
                try:  # the throughput above stands without it
                    rec["latency"] = stream_latency(base, name, prompts, a.max_tokens, a.latency_requests)
                    print(f"[{name}] streamed, one at a time: {rec['latency']}", flush=True)
                except Exception as e:  # noqa: BLE001
                    rec["latency_error"] = f"{type(e).__name__}: {e}"
                    print(f"[{name}] streamed latency failed: {rec['latency_error']}", flush=True)
                try:
                    rec["native"] = native_latency(base, prompts, a.max_tokens, a.latency_requests)
                    print(f"[{name}] through /generate, one at a time: {rec['native']}", flush=True)
                except Exception as e:  # noqa: BLE001
                    rec["native_error"] = f"{type(e).__name__}: {e}"
                    print(f"[{name}] /generate latency failed: {rec['native_error']}", flush=True)
            for conc in a.profile_concurrency if a.profile_steps else []:
                try:  # what a decode step launches on the GPU (decode_trace.py)
                    prof = decode_trace.profile_decode(
                        base, prompts, conc, a.profile_steps, os.path.join(log_dir, f"trace-{name}-c{conc}"),
                        lambda p, n, each: stream_each(base, name, p, n, each))  # fmt: skip
                    rec.setdefault("decode_profile", []).append(prof)
                    print(f"[{name}] decode profile at concurrency {conc}: {prof['span_us_per_step']} us per step",
                          flush=True)  # fmt: skip
                except Exception as e:  # noqa: BLE001 - the throughput stands without it
                    rec.setdefault("decode_profile_errors", []).append(f"{type(e).__name__}: {e}")
            if a.profile_prefill:
                try:  # how long one prompt's eager prefill keeps the GPU waiting on the host (decode_trace.py)
                    rec["prefill_profile"] = decode_trace.profile_prefill(
                        base, prompts[0], os.path.join(log_dir, f"trace-{name}-prefill"),
                        lambda p, n: complete(base, name, p, n, ignore_eos=True))  # fmt: skip
                    print(f"[{name}] prefill profile: {rec['prefill_profile']['span_us_per_step']} us GPU span",
                          flush=True)  # fmt: skip
                except Exception as e:  # noqa: BLE001 - the throughput stands without it
                    rec["prefill_profile_error"] = f"{type(e).__name__}: {e}"
        except Exception as e:  # record and go on to the next server
            rec["error"] = f"{type(e).__name__}: {e}"
            print(f"[{name}] FAILED: {rec['error']}", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
    with open(log_path, errors="replace") as f:
        text = f.read()
    rec["log_tail"] = text[-3000:] if "error" in rec else ""
    cause = re.search(r"^(?:\[[^]]*\] )?(\w+(?:Error|Exception): .*)$", text, re.M)
    if "error" in rec and cause:  # the server's own first error, not only how it died
        rec["error"] += f" ({cause[1]})"
    return rec


def _cell(r: dict) -> str:
    rounds = r.get("rounds", [])  # results before the eleventh session had one round, no list
    return f"{r['output_tok_per_s']}" + (f" ({' / '.join(map(str, rounds))})" if len(rounds) > 1 else "")


def _per_concurrency(res: dict, servers: list[dict], intro: str, cell) -> list[str]:
    """A table of a row per server and a column per concurrency, each cell ``cell(that throughput record)`` (None:
    empty), after ``intro``."""
    lines = ["", intro, "", "| server | " + " | ".join(f"conc {c}" for c in res["concurrency"]) + " |",
             "|---|" + "---|" * len(res["concurrency"])]  # fmt: skip
    for s in servers:
        got = {r["concurrency"]: cell(r) for r in s["throughput"]}
        lines.append(f"| {s['name']} | " + " | ".join("" if got.get(c) is None else str(got[c])
                                                     for c in res["concurrency"]) + " |")  # fmt: skip
    return lines


def markdown(res: dict) -> str:
    lines = [
        f"# Serving throughput: {res['tag']}",
        "",
        f"Device: {res['device']}. Command: `{res['command']}`",
        "",
        f"Output tokens per second, {res['max_tokens']} tokens per request (ignore_eos), greedy; after a warm-up "
        "wave at each concurrency, the median of the timed rounds (each round's in brackets where more than one).",
        "",
        "| server | startup s | " + " | ".join(f"conc {c}" for c in res["concurrency"]) + " |",
        "|---|---|" + "---|" * len(res["concurrency"]),
    ]
    for s in res["servers"]:
        # a server that failed part way keeps the concurrencies it served before
        tp = {r["concurrency"]: _cell(r) for r in s.get("throughput", [])}
        first = f"failed: {s['error'][:300].replace('|', '/')}" if "error" in s else str(s["startup_s"])
        if s.get("precompile_after_health_s"):  # timed after these: the launcher still compiled once healthy
            first += f" (+{s['precompile_after_health_s']} compiling)"
        lines.append(f"| {s['name']} | {first} | " + " | ".join(tp.get(c, "") for c in res["concurrency"]) + " |")
    said = [s for s in res["servers"] if s.get("precompile")]
    if said:
        lines += ["", "Each mxserve launcher's precompile, as its log says:", ""]
        lines += [f"- {s['name']}: {s['precompile']}" for s in said]
    read = [s for s in res["servers"] if s.get("decode_bytes_per_token")]
    if read:
        lines += ["", "Expert weights a decoded token reads, from each mxserve server's live "
                      "`mxserve_decode_bytes_per_token` (sliding window) after its timed rounds:", ""]  # fmt: skip
        lines += [f"- {s['name']}: {s['decode_bytes_per_token'] / 1e6:.1f} MB" for s in read]
    logged = [s for s in res["servers"] if any(r.get("log_decode") for r in s.get("throughput", []))]
    if logged:
        lines += _per_concurrency(res, logged, "Decode rate from each server's own log while the timed rounds ran "
                                  "(SGLang's `Decode batch` line, every 40 steps, at full batch; no profiler): "
                                  "median / 90th percentile tokens/s.",
                                  lambda r: f"{g['median']} / {g['p90']}" if (g := r.get("log_decode")) else None)
        lines += _per_concurrency(res, logged, "Each request's time beside its decode steps: the round's mean latency "
                                  "less its tokens' steps at the logged median rate (ms; prefill, the HTTP path, the "
                                  "scheduler's gaps).", beside_steps_ms)  # fmt: skip
    spread = [s for s in res["servers"] if any(r.get("latency_ms") for r in s.get("throughput", []))]
    if spread:
        lines += _per_concurrency(res, spread, "Each request's latency in the reported round: least / median / most "
                                  "(ms).", lambda r: f"{g['min']} / {g['median']} / {g['max']}"
                                  if (g := r.get("latency_ms")) else None)  # fmt: skip
    own = [s for s in res["servers"] if any(r.get("server_ms") for r in s.get("throughput", []))]
    if own:
        stages = sorted({k for s in own for r in s["throughput"] for k in (r.get("server_ms") or {})
                         if k.startswith("stage:")})  # fmt: skip
        keys = ["e2e", "first_token", "inter_token", "queue", *stages]
        lines += ["", "SGLang's own means in the reported round, from its request histograms (servers with "
                      "--enable-metrics; `mxserve launch` always passes it), beside the client's mean (ms): "
                      "end to end (the tokenizer manager's), first token, between tokens, the scheduler's queue, "
                      "and its stages.", "",
                  "| server | conc | client | " + " | ".join(k.removeprefix("stage:") for k in keys) + " |",
                  "|---|---:|---:|" + "---:|" * len(keys)]  # fmt: skip
        for s in own:
            for r in s["throughput"]:
                got = r.get("server_ms") or {}
                cells = [str(got[k]["mean_ms"]) if k in got else "" for k in keys]
                lines.append(f"| {s['name']} | {r['concurrency']} | {round(r['mean_latency_s'] * 1e3, 1)} | "
                             + " | ".join(cells) + " |")  # fmt: skip
    timed = [s for s in res["servers"] if s.get("latency")]
    if timed:
        n = timed[0]["latency"]["requests"]
        lines += ["", f"One request at a time, streamed, {res['max_tokens']} tokens (ignore_eos; median of {n}): "
                      "time to the first token (queueing, prefill, the HTTP path), then time per output token.", "",
                  "| server | first token (ms) | per output token (ms) | output tokens/s while decoding |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for s in timed:
            lat = s["latency"]
            rate = round(1e3 / lat["tpot_ms"], 1) if lat["tpot_ms"] > 0 else "-"  # one token: no step after it
            lines.append(f"| {s['name']} | {lat['ttft_ms']} | {lat['tpot_ms']} | {rate} |")
    native = [s for s in res["servers"] if s.get("native")]
    if native:
        n = native[0]["native"]["requests"]
        lines += ["", f"One request at a time through SGLang's own `/generate`, not streamed, {res['max_tokens']} "
                      f"tokens (ignore_eos; median of {n}): the client's time, the server's `e2e_latency` (arrival to "
                      "last output), and each request's time outside the server (the HTTP path, JSON).", "",
                  "| server | client (ms) | server (ms) | outside the server (ms) | streamed: first + the rest (ms) |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        for s in native:
            nat, lat = s["native"], s.get("latency")
            # what the streamed medians predict for a whole request: its first token, then a step a token
            pred = round(lat["ttft_ms"] + (res["max_tokens"] - 1) * lat["tpot_ms"], 2) if lat else "-"
            lines.append(f"| {s['name']} | {nat['client_ms']} | {nat['server_ms']} | {nat['outside_ms']} | {pred} |")
    for s in res["servers"]:
        if s.get("latency_error"):
            lines += ["", f"{s['name']}: the streamed requests failed ({s['latency_error']}); its throughput stands."]
        if s.get("native_error"):
            lines += ["", f"{s['name']}: the requests through /generate failed ({s['native_error']})."]

    def parts(eq: dict, b: str) -> None:
        for d in eq.get("differences", []):
            m = d.get("b_margin_there")
            near = "" if m is None else f" (token {d['token']}; {b}'s top-1 minus top-2 log-prob there: {m:.4f})"
            lines.append(f"- prompt {d['prompt']}: texts part at character {d['char']}{near}")

    profiled = [s for s in res["servers"] if s.get("decode_profile")]
    if profiled:
        lines += ["", "## Decode steps on the GPU (SGLang's profiler; decode_trace.py)", ""]
        for s in profiled:
            for prof in s["decode_profile"]:
                lines += decode_trace.markdown(s["name"], prof)
    prefilled = [(s["name"], s["prefill_profile"]) for s in res["servers"] if s.get("prefill_profile")]
    if prefilled:
        lines += ["", "## One prompt's prefill on the GPU (SGLang's profiler, an idle server; decode_trace.py)", "",
                  "From the pass's first GPU event to its last; busy: the time some GPU event ran.", ""]
        lines += decode_trace.prefill_markdown(prefilled)
    for eq in res["equal"]:
        must = " (required)" if eq.get("required", True) else ""
        lines += ["", f"Greedy equality{must} {eq['a']} vs {eq['b']}: {eq['same']} of {eq['total']} prompts identical."]
        parts(eq, eq["b"])
    for name, eq in res.get("self", {}).items():
        lines += ["", f"{name}, its own greedy texts all prompts at once vs one at a time: "
                      f"{eq['same']} of {eq['total']} identical."]  # fmt: skip
        parts(eq, name)
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the bf16 model plain SGLang serves")
    ap.add_argument("--ckpt", action="append", default=[], help="NAME=DIR of an mxserve checkpoint")
    ap.add_argument("--launch-args", action="append", default=[],
                    help='NAME=ARGS: more `mxserve launch` arguments for checkpoint NAME, e.g. "--bf16-layers kernel"')
    ap.add_argument("--plain-args", action="append", default=[], metavar="NAME=ARGS",
                    help="more arguments for the plain SGLang server of --sglang-ckpt NAME (e.g. --enable-metrics, "
                         "which mxserve launch always passes)")
    ap.add_argument("--server-env", action="append", default=[], metavar="NAME=VAR=VALUE",
                    help="an environment variable for server NAME only, e.g. mxserve-3.25bit-grouped=MXSERVE_DISPATCH="
                         "grouped")  # fmt: skip
    ap.add_argument("--sglang-quant", action="append", default=[], help="SGLang --quantization to compare")
    ap.add_argument("--sglang-ckpt", action="append", default=[],
                    help="NAME=DIR of a checkpoint plain SGLang serves (e.g. gptq_copy.py's)")  # fmt: skip
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--equal", action="append", default=[], help="A:B servers whose greedy text must match")
    ap.add_argument("--compare", action="append", default=[], help="A:B servers whose greedy text to compare")
    ap.add_argument("--prompts", nargs="+", default=[], help="text files to cut prompts from")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--greedy-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3,
                    help="timed rounds per concurrency, after a warm-up wave; the median is reported")
    ap.add_argument("--latency-requests", type=int, default=8,
                    help="after the throughput, this many streamed requests one at a time: time to the first token "
                         "and per output token (0: none)")  # fmt: skip
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="after the throughput, trace this many decode steps per server (SGLang's /start_profile)")
    ap.add_argument("--profile-concurrency", type=int, nargs="+", default=[1, 8],
                    help="requests decoding together while traced (default 1 and 8)")
    ap.add_argument("--profile-prefill", action="store_true",
                    help="after the throughput, trace the prefill of one prompt per server (SGLang's /start_profile)")
    ap.add_argument("--sglang-args", default=DEFAULT_SGLANG_ARGS)
    ap.add_argument("--startup-timeout", type=float, default=420)
    ap.add_argument("--tag", default="refmoe-25m")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import torch

    os.makedirs(a.out, exist_ok=True)
    prompts = (
        prompts_from(a.prompts, a.n_prompts) if a.prompts else [f"Once upon a time {i}" for i in range(a.n_prompts)]
    )
    extra = shlex.split(a.sglang_args)
    py = sys.executable
    servers = []
    if not a.skip_bf16:
        servers.append(("sglang-bf16", [py, "-m", "sglang.launch_server", "--model-path", a.model, *extra]))
    for q in a.sglang_quant:
        servers.append((f"sglang-{q}", [py, "-m", "sglang.launch_server", "--model-path", a.model,
                                        "--quantization", q, *extra]))  # fmt: skip
    launch_args = dict(spec.split("=", 1) for spec in a.launch_args)
    for spec in a.ckpt:
        name, path = spec.split("=", 1)
        servers.append((f"mxserve-{name}", [py, "-m", "mxserve.cli", "launch", "--engine", "sglang", "--model", path,
                                            "--sglang-args", a.sglang_args,
                                            *shlex.split(launch_args.get(name, ""))]))  # fmt: skip
    # other checkpoints on plain SGLang last: their start is the least sure (the GPTQ copy's once built a
    # Marlin module on the device for minutes), and the GPU runs are cut short when the machine goes
    plain_args = dict(spec.split("=", 1) for spec in a.plain_args)
    for spec in a.sglang_ckpt:
        name, path = spec.split("=", 1)
        servers.append((f"sglang-{name}", [py, "-m", "sglang.launch_server", "--model-path", path, *extra,
                                           *shlex.split(plain_args.get(name, ""))]))  # fmt: skip
    res = {
        "tag": a.tag,
        "device": torch.cuda.get_device_name(),
        "command": shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "max_tokens": a.max_tokens,
        "concurrency": a.concurrency,
        "prompts": prompts,
        "servers": [],
        "equal": [],
        "self": {},
    }
    envs: dict[str, dict[str, str]] = {}
    for spec in a.server_env:
        name, var, value = spec.split("=", 2)
        envs.setdefault(name, {})[var] = value
    for name, cmd in servers:
        port = free_port()
        cmd = [*cmd, "--port", str(port), "--served-model-name", name]
        res["servers"].append(run_server(name, cmd, port, a, prompts, a.out, envs.get(name)))
        with open(os.path.join(a.out, "serving.json"), "w") as f:
            json.dump(res, f, indent=1)
    by = {s["name"]: s for s in res["servers"]}
    ok = True
    for spec, required in [(e, True) for e in a.equal] + [(c, False) for c in a.compare]:
        x, y = spec.split(":")
        gx = by.get(x, {}).get("greedy")
        eq = compare_greedy(gx or [], by.get(y, {}))
        res["equal"].append({"a": x, "b": y, "required": required, **eq})
        ok &= not required or (gx is not None and eq["same"] == len(prompts))
    res["self"] = {s["name"]: compare_greedy(s["greedy_batched"], s) for s in res["servers"] if "greedy_batched" in s}
    with open(os.path.join(a.out, "serving.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "serving.md"), "w") as f:
        f.write(markdown(res))
    print(markdown(res))
    return 0 if ok and all("error" not in s for s in res["servers"]) else 1


if __name__ == "__main__":
    sys.exit(main())
