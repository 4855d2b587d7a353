"""The decode router's launch time on the GPU: SGLang's (the gate's GEMM, then its top-k) against
mxkernels.router.fused_router with 1 to all experts a program, with and without programmatic dependent
launch (MXSERVE_PDL). (Until the twenty-sixth session it also timed the router's launch laying out the rows,
MXSERVE_ROUTER_ALIGN, since removed: results/router_h200_s25.md.)

    python3 benchmarks/router.py --out DIR [--hidden 2048 --experts 60 --top-k 4 --tokens 1 8 32 64]

Each variant runs ``--layers`` times back to back in one CUDA graph (as a decode step's layers do, though
without the launches between them), replayed ``--replays`` times; the time per launch is the replays' time over
the launches. Writes DIR/router.json and DIR/router.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def sglang_router(h: int, top_k: int, renormalize: bool):
    """SGLang's decode routing as its Qwen2-MoE block runs it: the gate's bf16 GEMM, then fused_topk."""
    from sglang.srt.layers.moe.topk import fused_topk

    def run(x, w):
        logits = torch.nn.functional.linear(x, w)
        return fused_topk(x, logits, top_k, renormalize)

    return run


def time_graph(fn, layers: int, replays: int) -> float:
    """us per call of ``fn`` (``layers`` calls captured in one CUDA graph)."""
    for _ in range(3):  # compile and warm up, eagerly
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(layers):
            fn()
    for _ in range(10):
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=60)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--renormalize", action="store_true")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--per-program", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--replays", type=int, default=200)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("router.py: needs a CUDA GPU")
    from mxkernels import pdl
    from mxkernels.router import fused_router

    os.makedirs(a.out, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(a.experts, a.hidden, generator=gen) * 0.05).to(torch.bfloat16).cuda()
    try:
        sglang = sglang_router(a.hidden, a.top_k, a.renormalize)
    except Exception as e:  # noqa: BLE001 - ImportError, or SGLang's import failing otherwise
        sglang = None
        print(f"router.py: no SGLang router to compare ({e})", file=sys.stderr)
    rows = []
    for t in a.tokens:
        x = torch.randn(t, a.hidden, generator=gen).to(torch.bfloat16).cuda()
        row = {"tokens": t}
        if sglang is not None:
            try:
                row["sglang"] = round(time_graph(lambda: sglang(x, w), a.layers, a.replays), 2)
            except Exception as e:  # noqa: BLE001 - the baseline failing must not lose the run
                print(f"router.py: SGLang's router failed at {t} tokens ({type(e).__name__}: {e})", file=sys.stderr)
                sglang = None
        want = fused_router(x, w, a.top_k, a.renormalize)[1]
        for bn in a.per_program:
            for on in (False, True):
                pdl.ENABLED = on and pdl.capable(x.device)
                if on and not pdl.ENABLED:
                    continue
                got = fused_router(x, w, a.top_k, a.renormalize, experts_per_program=bn)[1]
                # the logits' sums run in another order per layout: a near tie may round apart in bf16
                row.setdefault("tokens routed otherwise", {})[bn] = int((got != want).any(-1).sum())
                us = time_graph(lambda bn=bn: fused_router(x, w, a.top_k, a.renormalize, experts_per_program=bn),
                                a.layers, a.replays)  # fmt: skip
                row[f"fused {bn}{' pdl' if on else ''}"] = round(us, 2)
        pdl.ENABLED = False
        rows.append(row)
        print(json.dumps(row), flush=True)
    cmd = "python3 benchmarks/router.py " + " ".join(sys.argv[1:])
    meta = {"device": torch.cuda.get_device_name(), "command": cmd, "date": time.strftime("%Y-%m-%d"),
            "hidden": a.hidden, "experts": a.experts, "top_k": a.top_k, "layers": a.layers}  # fmt: skip
    with open(os.path.join(a.out, "router.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    cols = [c for c in rows[0] if c not in ("tokens", "tokens routed otherwise")]
    lines = [f"# The decode router's launch, {meta['device']}", "", f"Command: `{cmd}`", "",
             f"us per launch ({a.layers} launches back to back in a CUDA graph), gate {a.experts} x {a.hidden}, "
             f"top-{a.top_k}; `fused N`: mxkernels.router with N experts a program (N >= experts: one program a "
             "token, no counter); `pdl`: a programmatic dependent launch, the gate's weights loaded before its wait.",
             "", "| tokens | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]  # fmt: skip
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in ["tokens", *cols]) + " |" for r in rows]
    with open(os.path.join(a.out, "router.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
