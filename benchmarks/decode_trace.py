"""Where a server's decode step goes on the GPU: SGLang's own profiler over a few decode steps.

SGLang serves ``POST /start_profile`` (torch profiler, CUPTI): with ``num_steps`` it traces
that many forward passes and writes a Chrome trace. Kernels replayed from a CUDA graph are
traced one by one, so the trace shows what each decode step launches and how long each
kernel runs. :func:`profile_decode` starts ``concurrency`` long requests, waits until each
has streamed the same number of tokens, traces ``steps`` forward passes and sums the trace per step (:func:`summarize`):
the GPU time of each kernel, the number of kernels and copies, and the span from the first
kernel's start to the last one's end (busy time plus the gaps between kernels).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import threading
import time
import urllib.request
from collections.abc import Callable

GPU_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


def _traces(folder: str) -> list[str]:
    """The trace files (plain or gzip JSON) the profiler wrote into ``folder``."""
    return sorted(glob.glob(os.path.join(folder, "*.json*")))


def _events(path: str) -> list[dict]:
    """A trace's events; ``path`` may be the folder the profiler wrote it into (serving.py's trace-* folders)."""
    if os.path.isdir(path):
        found = _traces(path)
        if len(found) != 1:
            raise ValueError(f"{path}: a folder of one trace (*.json or *.json.gz), not {len(found)}")
        path = found[0]
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)
    return events.get("traceEvents", []) if isinstance(events, dict) else events


def _gpu(events: list[dict], path: str) -> list[dict]:
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_EVENTS and "dur" in e]
    if not gpu:
        raise ValueError(f"{path}: no GPU events (kernels, copies) in the trace")
    return sorted(gpu, key=lambda e: float(e["ts"]))


def summarize(path: str, steps: int, top: int = 25) -> dict:
    """Per decode step: the GPU events of a Chrome trace (gzip or plain JSON) by name, longest first.
    The steps are the trace's CUDA-graph launches where it has them (SGLang replays one graph per
    decode step; the profiler's first step can fall outside the trace), else ``steps``."""
    events = _events(path)
    gpu = _gpu(events, path)
    steps = sum(e.get("name") == "cudaGraphLaunch" for e in events) or steps
    by: dict[str, list[float]] = {}
    for e in gpu:
        by.setdefault(e["name"][:120], []).append(float(e["dur"]))
    start = min(float(e["ts"]) for e in gpu)
    end = max(float(e["ts"]) + float(e["dur"]) for e in gpu)
    busy = sum(float(e["dur"]) for e in gpu)
    rows = sorted(((name, sum(d) / steps, len(d) / steps) for name, d in by.items()), key=lambda r: -r[1])
    return {
        "steps": steps,
        "span_us_per_step": round((end - start) / steps, 1),
        "busy_us_per_step": round(busy / steps, 1),
        "events_per_step": round(len(gpu) / steps, 1),
        "copies_per_step": round(sum(e["cat"] != "kernel" for e in gpu) / steps, 1),
        "top": [[name, round(us, 2), round(n, 2)] for name, us, n in rows[:top]],
        "step_us": _or_none(step_period, path),
        "graph_us": _or_none(graph_time, path),
    }


def _or_none(f: Callable[[str], float], path: str) -> float | None:
    try:
        return round(f(path), 1)
    except ValueError:  # a trace without graph launches tagged with their correlation ids
        return None


def sequence(path: str, marker: str, at: int = 10) -> list[tuple[float, float, str, str]]:
    """The GPU events from the ``at``-th event whose name holds ``marker`` up to the next one:
    (microseconds since the first one started, duration, name, "stream: grid") each: e.g. one
    layer, between two of its normalizations; the stream shows which launches overlap."""
    gpu = _gpu(_events(path), path)
    hits = [i for i, e in enumerate(gpu) if marker in e["name"]]
    if len(hits) < at + 2:
        raise ValueError(f"{path}: fewer than {at + 2} events named like {marker!r}")
    t0 = float(gpu[hits[at]]["ts"])
    return [(round(float(e["ts"]) - t0, 1), round(float(e["dur"]), 1), e["name"], _where(e))
            for e in gpu[hits[at] : hits[at + 1] + 1]]  # fmt: skip


def _where(e: dict) -> str:
    args = e.get("args", {})
    return f"{args.get('stream', e.get('tid', '?'))}: {args.get('grid', '-')}"


def launches(path: str, marker: str, steps: int) -> list[dict]:
    """Per distinct launch of the kernels named like ``marker`` (name, grid, registers per thread):
    launches per step and microseconds each (mean, min, max): which launch of a layer takes the time."""
    by: dict[tuple, list[float]] = {}
    for e in _gpu(_events(path), path):
        if marker in e["name"]:
            args = e.get("args", {})
            key = (e["name"], str(args.get("grid", "-")), args.get("registers per thread", "-"))
            by.setdefault(key, []).append(float(e["dur"]))
    if not by:
        raise ValueError(f"{path}: no GPU event named like {marker!r}")
    rows = [{"kernel": k[0], "grid": k[1], "registers": k[2], "per_step": round(len(d) / steps, 2),
             "mean_us": round(sum(d) / len(d), 1), "min_us": round(min(d), 1), "max_us": round(max(d), 1)}
            for k, d in by.items()]  # fmt: skip
    return sorted(rows, key=lambda r: -r["mean_us"] * r["per_step"])


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    if not xs:
        raise ValueError("nothing to take the median of")
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def _graph_spans(path: str) -> list[tuple[float, float]]:
    """(first kernel's start, last event's end) of the GPU work of each CUDA-graph launch (the events of
    its correlation id), in launch order."""
    events = _events(path)
    launches = {e["args"]["correlation"] for e in events if e.get("name") == "cudaGraphLaunch" and "args" in e}
    spans: dict[int, tuple[float, float]] = {}
    for e in _gpu(events, path):
        c = e.get("args", {}).get("correlation")
        if c in launches:
            t0, t1 = float(e["ts"]), float(e["ts"]) + float(e["dur"])
            a, b = spans.get(c, (t0, t1))
            spans[c] = (min(a, t0), max(b, t1))
    if len(spans) < 2:
        raise ValueError(f"{path}: fewer than 2 CUDA-graph launches with GPU work")
    return sorted(spans.values())


def step_period(path: str) -> float:
    """Median microseconds from one decode step's first kernel to the next one's: the GPU work of
    each CUDA-graph launch (kernels of the launch's correlation id), so host time between steps
    counts, as it does for tokens per second."""
    starts = [a for a, _ in _graph_spans(path)]
    return _median([b - a for a, b in zip(starts, starts[1:])])


def graph_time(path: str) -> float:
    """Median microseconds from a decode step's first kernel to its last one's end, of its CUDA graph
    alone: the forward on the GPU. The step period less this is the GPU waiting between steps (the
    host's time, where it is not hidden, and work outside the graph such as sampling)."""
    return _median([b - a for a, b in _graph_spans(path)])


def span(path: str, start: str, end: str) -> tuple[float, int]:
    """Median microseconds from each GPU event named like ``start`` to the end of the next event
    named like ``end`` (e.g. one layer's routed MoE, from its alignment to its top-k sum), and how
    many such spans the trace has."""
    out, t0 = [], None
    for e in _gpu(_events(path), path):
        if t0 is None and start in e["name"]:
            t0 = float(e["ts"])
        elif t0 is not None and end in e["name"]:
            out.append(float(e["ts"]) + float(e["dur"]) - t0)
            t0 = None
    if not out:
        raise ValueError(f"{path}: no event named like {start!r} followed by one like {end!r}")
    return _median(out), len(out)


def sections(path: str, boundary: str, marker: str) -> dict[str, tuple[float, int]]:
    """The gaps between consecutive GPU kernels named like ``boundary`` (from one's end to the next one's start;
    e.g. a decoder layer's two RMSNorms), by whether a kernel named like one of ``marker``'s '|'-separated names
    starts inside: {"with": (median us, count), "without": ...}. With the norms and the router it splits each
    layer into its MoE section and its attention section alike in any server, whatever its MoE kernels."""
    gpu = [e for e in _gpu(_events(path), path) if e.get("cat") == "kernel"]
    names = [m for m in marker.split("|") if m]
    at = [i for i, e in enumerate(gpu) if boundary in e["name"]]
    gaps: dict[str, list[float]] = {"with": [], "without": []}
    for i, j in zip(at, at[1:]):
        end = float(gpu[i]["ts"]) + float(gpu[i]["dur"])
        inside = any(m in e["name"] for e in gpu[i + 1 : j] for m in names)
        gaps["with" if inside else "without"].append(float(gpu[j]["ts"]) - end)
    if not gaps["with"]:
        raise ValueError(f"{path}: no gap between kernels named like {boundary!r} holds one named like {marker!r}")
    return {k: (round(_median(v), 1), len(v)) for k, v in gaps.items() if v}


def _post(url: str, body: dict) -> None:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()


def _written_trace(folder: str, timeout: float) -> str:
    """The trace file once the profiler has finished writing it (its size stops changing)."""
    t0, last = time.time(), None
    while time.time() - t0 < timeout:
        found = _traces(folder)
        if found:
            size = os.path.getsize(found[-1])
            if size and size == last:
                return found[-1]
            last = size
        time.sleep(1)
    raise TimeoutError(f"no trace written into {folder} within {timeout:.0f} s")


def profile_decode(base: str, prompts: list[str], concurrency: int, steps: int, folder: str,
                   stream: Callable[[str, int, Callable[[], None]], object], timeout: float = 180,
                   at_token: int = 64) -> dict:  # fmt: skip
    """Trace ``steps`` decode steps of ``concurrency`` requests, each of another of ``prompts``
    (``stream(prompt, max_tokens, each)`` sends one and calls ``each()`` for every token it streams back); the
    summary, with the trace file's path. The trace starts once every request has streamed ``at_token`` tokens, so
    two servers are traced at the same place in their requests: a wait of fixed time found the faster server's
    requests longer, and their attention slower (the fiftieth session: 40.1 us a layer against the GPTQ copy's 36.3 at
    1 request, 20% more tokens in its KV cache). (Copies of one greedy request decode the same tokens, so their
    batch routes to the same experts, as no real batch does: the fifth session's first traces at 8 requests were
    such copies.)"""
    os.makedirs(folder, exist_ok=True)
    tokens = 64 * steps + 256 + at_token  # still decoding when the trace ends, whatever the step time
    counts = [0] * concurrency
    ready = threading.Event()

    def each(i: int) -> None:
        counts[i] += 1
        if min(counts) >= at_token:
            ready.set()

    workers = [threading.Thread(target=stream, args=(prompts[i % len(prompts)], tokens, lambda i=i: each(i)),
                                daemon=True) for i in range(concurrency)]  # fmt: skip
    for w in workers:
        w.start()
    if not ready.wait(timeout):
        raise TimeoutError(f"the requests streamed {min(counts)} tokens, not {at_token}, within {timeout:.0f} s")
    _post(base + "/start_profile", {"output_dir": folder, "num_steps": steps, "activities": ["GPU"],
                                    "with_stack": False})
    path = _written_trace(folder, timeout)
    for w in workers:
        w.join(timeout)
    return {"concurrency": concurrency, "at_token": at_token, "trace": os.path.basename(path),
            **summarize(path, steps)}


def profile_prefill(base: str, prompt: str, folder: str, complete: Callable[[str, int], object],
                    timeout: float = 180) -> dict:  # fmt: skip
    """Trace the one forward pass that prefills ``prompt`` alone (sent to an idle server); the summary, with the trace
    file's path. Its span against its busy time shows whether the GPU waits for the host to launch an eager pass's
    kernels. SGLang's profiler stops as the last of its steps begins, after that batch's preparation: one step held
    only the prefill's preparation (the forty-third session's run: 12 copies, no kernel), and 20 steps of decode hold
    19. So two steps, and a request of two output tokens, whose decode step begins the second."""
    os.makedirs(folder, exist_ok=True)
    _post(base + "/start_profile", {"output_dir": folder, "num_steps": 2, "activities": ["GPU"], "with_stack": False})
    complete(prompt, 2)
    path = _written_trace(folder, timeout)
    return {"prompt_chars": len(prompt), "trace": os.path.basename(path), **summarize(path, 1)}


def prefill_markdown(profiled: list[tuple[str, dict]]) -> list[str]:
    """Each server's traced prefill (profile_prefill) as one row of a Markdown table."""
    lines = ["| server | GPU span (us) | GPU busy (us) | busy share | GPU events | longest kernel |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, prof in profiled:
        top = prof["top"][0] if prof["top"] else ["-", 0.0, 0]
        share = prof["busy_us_per_step"] / prof["span_us_per_step"] if prof["span_us_per_step"] else 0.0
        lines.append(f"| {name} | {prof['span_us_per_step']} | {prof['busy_us_per_step']} | {share:.0%} | "
                     f"{prof['events_per_step']} | `{top[0][:60]}` {top[1]} us |")  # fmt: skip
    return lines + [""]


def markdown(name: str, prof: dict, rows: int = 12) -> list[str]:
    """A server's profile as Markdown lines."""
    step = f"; a step every {prof['step_us']} us (median between CUDA-graph launches)" if prof.get("step_us") else ""
    if prof.get("graph_us"):
        step += f", {prof['graph_us']} us of it from the graph's first kernel to its last"
    lines = [
        f"**{name}**, {prof['concurrency']} request(s) decoding, {prof['steps']} steps: per step "
        f"{prof['span_us_per_step']} us from the first kernel's start to the last one's end, "
        f"{prof['busy_us_per_step']} us of it in {prof['events_per_step']} GPU events "
        f"({prof['copies_per_step']} copies or memsets){step}.",
        "",
        "| kernel | us per step | launches per step |",
        "|---|---:|---:|",
    ]
    lines += [f"| `{n[:90]}` | {us} | {c} |" for n, us, c in prof["top"][:rows]]
    return lines + [""]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Summarize a decode trace written by SGLang's /start_profile.")
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=1, help="decode steps traced, where the trace has no graph launches")
    ap.add_argument("--sequence", metavar="MARKER", help="list the events between two events named like MARKER")
    ap.add_argument("--at", type=int, default=10, help="which MARKER event to start from (default 10)")
    ap.add_argument("--launches", metavar="MARKER",
                    help="per distinct launch (grid, registers) of the kernels named like MARKER: time each")
    ap.add_argument("--span", nargs=2, metavar=("START", "END"),
                    help="the median decode step (between CUDA-graph launches) and the median time from each "
                         "event named like START to the end of the next one named like END")  # fmt: skip
    ap.add_argument("--sections", nargs=2, metavar=("BOUNDARY", "MARKER"),
                    help="the median gap between kernels named like BOUNDARY, those holding a kernel named like "
                         "MARKER ('|' between names) and the others: e.g. RMSNorm 'router|moe_align' splits each "
                         "layer into its MoE and attention sections")  # fmt: skip
    a = ap.parse_args()
    try:
        _report(a)
    except (OSError, ValueError) as e:  # an unreadable or empty trace: a message, not a traceback
        raise SystemExit(f"decode_trace.py: {e}") from None


def _report(a) -> None:
    if a.sections:
        got = sections(a.trace, *a.sections)
        for k, (us, n) in got.items():
            print(f"between {a.sections[0]} kernels, {k} {a.sections[1]}: {us} us (median of {n})")
    elif a.span:
        us, n = span(a.trace, *a.span)
        print(f"decode step {step_period(a.trace):.1f} us (median between graph launches); "
              f"{a.span[0]} .. {a.span[1]}: {us:.1f} us (median of {n})")
    elif a.sequence:
        print("| starts at us | us | kernel | stream: grid |\n|---:|---:|---|---|")
        for at, dur, name, where in sequence(a.trace, a.sequence, a.at):
            print(f"| {at} | {dur} | `{name[:70]}` | {where} |")
    elif a.launches:
        print("| kernel | grid | registers | per step | us each (mean) | min | max |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in launches(a.trace, a.launches, a.steps):
            print(f"| `{r['kernel'][:60]}` | {r['grid']} | {r['registers']} | {r['per_step']} | {r['mean_us']} "
                  f"| {r['min_us']} | {r['max_us']} |")
    else:
        s = summarize(a.trace, a.steps)
        print("\n".join(markdown(os.path.basename(a.trace), {"concurrency": "?", **s}, rows=25)))


if __name__ == "__main__":
    main()
