"""`mxserve` command line: launch, calibrate, plan, quantize, profile, eval, stats.

Every user error prints one line ``mxserve: error: ...`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mxserve import hf_env
from mxserve.engines import BF16_LAYERS
from mxserve.errors import MxServeError

METHOD_CHOICES = ("rtn", "gptq", "gptq-had")
# the kernels' on/off settings, read as "1" (or "0", for those on by default) by the launches: any other value is
# refused before serving (README, "GPU kernels")
KERNEL_SWITCHES = ("MXSERVE_GLUON", "MXSERVE_SHARED_STREAM", "MXSERVE_FUSED_ROUTER", "MXSERVE_SHARED_EARLY",
                   "MXSERVE_PDL", "MXSERVE_TILED_CODES", "MXSERVE_TOPK_ROWS", "MXSERVE_TOPK_GRID")
# opt-ins removed after the H200 timed them (benchmarks/README.md): asked for, they are refused, not silently ignored
REMOVED_SWITCHES = ("MXSERVE_L2_PREFETCH", "MXSERVE_ROW_AMAX_IN_GEMM", "MXSERVE_SILU_IN_GEMM", "MXSERVE_SUM_IN_GEMM",
                    "MXSERVE_ROUTER_ALIGN")


def cmd_calibrate(a: argparse.Namespace) -> None:
    from mxserve.calibrate import calibrate
    from mxserve.launch import work_device
    from mxserve.phases import phase
    from mxserve.schemes import parse_schemes

    schemes = parse_schemes(a.schemes)
    with phase("calibrate"):  # one line even with --quiet: the numbers a real-size run is planned by
        prof = calibrate(
            a.model,
            a.data,
            schemes,
            a.method,
            nsamples=a.nsamples,
            seq_len=a.seq_len,
            seed=a.seed,
            hadamard_seed=a.hadamard_seed,
            progress=not a.quiet,
            device=work_device(a.device),
        )
    prof.save(a.out)
    n_exp = sum(len(lay.experts) for lay in prof.layers)
    print(
        f"wrote {a.out}: {len(prof.layers)} MoE layers, {n_exp} experts, {len(schemes)} schemes, "
        f"{prof.tokens} tokens, method {prof.method}"
    )


KEEP_STREAM_K_HELP = ("keep each layer's 3-bit, 8-bit and bf16 expert weights within a tenth of its weights, so that "
                      "its decode launches keep the stream-K grid at 1.5 to 4 rows an expert (a few requests at "
                      "once), which the latency term, pricing each block alone, does not see")


def _costly_cap(a: argparse.Namespace) -> float | None:
    """--keep-stream-k's cap on each layer's share of 3-bit, 8-bit and bf16 weights (planner.KEEP_STREAM_K)."""
    from mxserve.planner import KEEP_STREAM_K

    return KEEP_STREAM_K if a.keep_stream_k else None


def cmd_plan(a: argparse.Namespace) -> None:
    from mxserve.costmodel import cost_model
    from mxserve.planner import counts_text, decode_reads_line, solve_plan
    from mxserve.profile import CalibrationProfile
    from mxserve.schemes import parse_budget, parse_schemes

    budget = parse_budget(a.budget)
    prof = CalibrationProfile.load(a.profile)
    schemes = None
    if a.schemes:
        schemes = [s.name for s in parse_schemes(a.schemes)]
        unknown = [s for s in schemes if s not in prof.schemes]
        if unknown:
            raise MxServeError(f"schemes {unknown} were not calibrated in {a.profile} (it has {prof.schemes})")
    res = solve_plan(
        prof,
        budget,
        r=a.r,
        tokens=a.tokens,
        granularity=a.granularity,
        cost=cost_model(a.kernel_profile),
        points=a.points,
        time_limit=a.time_limit,
        schemes=schemes,
        solver=a.solver,
        ep=a.ep,
        tp=a.tp,
        costly_cap=_costly_cap(a),
    )
    for w in res.warnings:
        print(f"mxserve: warning: {w}", file=sys.stderr)
    res.plan.save(a.out)
    print(
        f"L/T frontier ({a.granularity} budget {budget:g} bits, {counts_text(a.tokens)} tokens per forward; "
        f"L = relative output error, T = modelled expert GEMM time):"
    )
    print(f"  {'#':>2} {'L':>12} {'T (ms)':>10} {'avg bits':>9}")
    for j, (lv, tv, bits) in enumerate(res.frontier):
        mark = " <- plan" if j == res.chosen else ""
        print(f"  {j:>2} {lv:12.5g} {tv * 1e3:10.4f} {bits:9.3f}{mark}")
    s = res.plan.summary
    shares = ", ".join(f"{k} {v:.0%}" for k, v in s["schemes"].items())
    print(f"plan: avg bits {s['avg_bits']:.3f}, L {s['L']:.5g}, T {s['T'] * 1e3:.4f} ms (r={a.r:g}); {shares}")
    reads = decode_reads_line(s)
    if reads:
        print(f"decode: {reads}")
    print(f"solved in {res.seconds:.2f} s; wrote {a.out}")
    if a.plot:
        from mxserve.plots import plot_plan

        plot_plan(res.plan, res.frontier, res.chosen, a.plot)
        print(f"wrote {a.plot}")


def start_sglang_controller(online, ckpt: str, a: argparse.Namespace, api_key: str | None) -> None:
    """The admin routes and the re-planner for the SGLang engine, in this process (engines/sglang_admin.py)."""
    from mxserve.engines.sglang_admin import SGLangStats, SGLangSwapper, start_admin_server
    from mxserve.launch import _check_port, log
    from mxserve.models.configs import read_config
    from mxserve.online.controller import Controller
    from mxserve.online.ladder import Ladder
    from mxserve.plan import Plan

    plan = Plan.load(os.path.join(ckpt, "mxmoe_plan.json"))
    base = f"http://{'127.0.0.1' if a.host in ('0.0.0.0', '::') else a.host}:{a.port}"
    stats = SGLangStats(base, api_key, online.profile, online.budget, plan.method)
    swapper = SGLangSwapper(base, api_key, Ladder(online.ladder_path), read_config(ckpt)["hidden_size"])
    controller = Controller(online.profile, plan, online.budget, online.r, online.cost, stats, swapper, None,
                            online.settings, online.default_tokens)
    port = a.admin_port or a.port + 1
    _check_port(a.host, port)
    start_admin_server(a.host, port, controller, stats, api_key)
    controller.start()
    log(f"admin routes (/mxserve/plan, /mxserve/replan, /mxserve/stats) on http://{a.host}:{port}")


def cmd_swap(a: argparse.Namespace) -> None:
    from mxserve.engines.sglang_swap import swap_plan
    from mxserve.plan import Plan

    out = swap_plan(a.url, Plan.load(a.plan), a.api_key or os.environ.get("MXSERVE_API_KEY"))
    print(json.dumps(out))
    if out["outcome"] != "applied":
        raise MxServeError(f"the server kept plan {out['plan_id']}; see its log for why")


def cmd_stats(a: argparse.Namespace) -> None:
    from mxserve.served_stats import fetch, render

    st = fetch(a.url, a.api_key or os.environ.get("MXSERVE_API_KEY"))
    print(render(st, a.window, a.top))
    if a.plot:
        from mxserve.plots import plot_served

        plot_served(st, a.plot, a.window)
        print(f"wrote {a.plot}")


def cmd_quantize(a: argparse.Namespace) -> None:
    from mxserve.checkpoint import quantize_to_dir
    from mxserve.launch import work_device
    from mxserve.phases import phase
    from mxserve.plan import Plan

    plan = Plan.load(a.plan)
    with phase("quantize"):
        quantize_to_dir(a.model, plan, a.out, data=a.data, nsamples=a.nsamples, progress=not a.quiet,
                        device=work_device(a.device))  # fmt: skip
    print(f"wrote {a.out}: {plan.method} checkpoint, avg bits {plan.summary.get('avg_bits', plan.budget_bits):.3f}")


def cmd_eval(a: argparse.Namespace) -> None:
    import torch

    from mxserve.checkpoint import install_layers, layout, load_quantized, quantize_layers
    from mxserve.evaluate import perplexity
    from mxserve.models.adapters import model_type, moe_layers
    from mxserve.models.configs import is_quantized_checkpoint
    from mxserve.models.loading import load_model, load_tokenizer
    from mxserve.plan import Plan
    from mxserve.schemes import get_scheme

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.uniform and a.plan:
        raise MxServeError("give --uniform or --plan, not both")
    for path in a.data:
        if not os.path.isfile(path):
            raise MxServeError(f"data file {path} does not exist")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise MxServeError("--device cuda: no CUDA device found")
    # On CUDA the model runs in bf16 and its MoE layers use the Triton kernels; on the CPU, fp32 reference.
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    tok = load_tokenizer(a.model)
    if is_quantized_checkpoint(a.model):
        if a.uniform or a.plan:
            raise MxServeError(f"{a.model} is already quantized; --uniform/--plan take an unquantized model")
        model, plan = load_quantized(a.model, dtype=dtype, device=a.device)
        desc = f"mxmoe {plan.method} {plan.summary.get('avg_bits', plan.budget_bits):.3f}bit"
    else:
        model = load_model(a.model)
        desc = "bf16"
        plan = None
        if a.uniform:
            scheme = get_scheme(a.uniform)
            plan = Plan.uniform(
                a.model, model_type(model), layout(moe_layers(model)), scheme, a.method, data=a.calib_data
            )
            desc = f"uniform {scheme.name} {a.method}"
        elif a.plan:
            plan = Plan.load(a.plan)
            desc = f"plan {a.plan} {plan.method} {plan.summary.get('avg_bits', plan.budget_bits):.3f}bit"
        if plan is not None:
            install_layers(model, quantize_layers(model, plan, a.calib_data, tok, progress=not a.quiet))
        model.to(a.device, dtype)
    if a.device == "cuda":
        desc += " [cuda bf16]"
    for path in a.data:
        ppl, n = perplexity(model, tok, path, ctx=a.ctx, max_tokens=a.max_tokens, progress=not a.quiet)
        print(f"{os.path.basename(path)}\tppl {ppl:.3f}\t{desc}\t({n} tokens, ctx {a.ctx}, stride {a.ctx})", flush=True)


def cmd_profile(a: argparse.Namespace) -> None:
    import torch

    from mxkernels.profile import random_expert_weights, time_expert_gemm
    from mxkernels.shapes import MODEL_SHAPES, gemm_shapes
    from mxserve.costmodel import KernelProfile, ProfileEntry
    from mxserve.schemes import parse_schemes

    if not torch.cuda.is_available():
        raise MxServeError("mxserve profile measures GPU kernels and needs a CUDA device (none found)")
    unknown = [m for m in a.models if m not in MODEL_SHAPES]
    if unknown:
        raise MxServeError(f"unknown model shapes {unknown}; known: {', '.join(MODEL_SHAPES)}")
    schemes = parse_schemes(a.schemes)
    prof = KernelProfile(device=torch.cuda.get_device_name(), meta={"models": a.models, "n_experts": a.experts})
    shapes = gemm_shapes(a.models)
    for n, k in shapes:
        for s in schemes:
            if not s.supports(k):
                continue
            lin = random_expert_weights(n, k, a.experts, s, "cuda")
            for t in a.tokens:
                sec = time_expert_gemm(s, n, k, t, a.experts, linears=lin)
                prof.entries.append(ProfileEntry(s.name, n, k, t, sec))
            print(
                f"{s.name:>10} N={n:<6} K={k:<6} "
                + " ".join(f"{e.tokens}:{e.seconds * 1e6:.1f}us" for e in prof.entries[-len(a.tokens) :]),
                flush=True,
            )
    prof.save(a.out)
    print(f"wrote {a.out}: {len(prof.entries)} measurements on {prof.device}")


def check_served_memory(a: argparse.Namespace) -> None:
    """Too little free GPU memory for the weights of the plan, said before calibrating for it."""
    from mxserve.models.configs import is_quantized_checkpoint
    from mxserve.plan import Plan
    from mxserve.preflight import check_gpu_memory, free_gpu_memory, served_bytes
    from mxserve.schemes import parse_budget

    if not os.path.isdir(a.model):
        return  # a hub id: its size is known once downloaded
    if is_quantized_checkpoint(a.model):
        bits, what = None, a.model
    elif a.plan:
        plan = Plan.load(a.plan)
        bits = plan.summary.get("avg_bits", plan.budget_bits)
        what = f"{a.model} with plan {a.plan}"
    elif a.budget:
        bits = parse_budget(a.budget)
        what = f"{a.model} at {bits:g} bits"
    else:
        return
    # tensor/expert parallel: each of the --tp GPUs holds about 1/tp of the weights
    check_gpu_memory(served_bytes(a.model, bits) // a.tp, free_gpu_memory(),
                     what + (f" per GPU of {a.tp}" if a.tp > 1 else ""))  # fmt: skip


def check_given_plan_layout(a: argparse.Namespace, split: int) -> None:
    """A plan made elsewhere (--plan, or a quantized checkpoint's) that the GPUs cannot serve, said
    before any quantization; a plan launch solves is made for the layout."""
    from mxserve.models.configs import PLAN_FILE, is_quantized_checkpoint
    from mxserve.models.layerwise import LayerwiseModel
    from mxserve.parallel.sharding import check_plan_layout
    from mxserve.plan import Plan

    if not os.path.isdir(a.model):
        return  # a hub id: its shapes are known once downloaded
    path = a.plan or (os.path.join(a.model, PLAN_FILE) if is_quantized_checkpoint(a.model) else None)
    if path:
        check_plan_layout(Plan.load(path), LayerwiseModel(a.model).moe_views, split, a.ep)


def cmd_launch(a: argparse.Namespace) -> None:
    import shlex

    from mxserve.launch import (
        LaunchSettings,
        moe_split,
        parallel_method,
        pick_engine,
        resolve,
        resolve_online,
        serve,
        serve_sglang,
        work_device,
    )
    from mxserve.server.settings import StatsSettings

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.device == "cuda":
        work_device(a.device)  # no GPU: said now, not after the checks below
    a.tp = a.tp or a.ep  # --ep alone: that many GPUs, all expert parallel
    engine = pick_engine(a.engine, a.tp, a.ep)
    split = moe_split(a.tp, a.ep)  # ways each expert is split over GPUs
    method = parallel_method(a.method, split)
    extra = shlex.split(a.sglang_args or "")
    if engine == "sglang" and a.max_running_requests:
        extra += ["--max-running-requests", str(a.max_running_requests)]
    if extra and engine != "sglang":
        raise MxServeError("--sglang-args is for the SGLang engine")
    if a.bf16_layers and engine != "sglang":
        raise MxServeError("--bf16-layers is for the SGLang engine")
    for name, allowed in (("MXSERVE_DISPATCH", "DISPATCHES"), ("MXSERVE_STREAM_K", "STREAM_K_MODES")):
        if os.environ.get(name):  # read by every kernel launch: refused here, not mid-request
            from mxkernels import moe

            if os.environ[name] not in getattr(moe, allowed):
                raise MxServeError(f"{name}={os.environ[name]}: one of {', '.join(getattr(moe, allowed))}")
    if os.environ.get("MXSERVE_DECODE_TILES"):  # decode's tile fields, read by every decode launch
        from mxkernels import moe

        try:
            moe.decode_tiles()
        except ValueError as e:
            raise MxServeError(f"MXSERVE_DECODE_TILES={os.environ['MXSERVE_DECODE_TILES']}: {e}") from None
    for name in KERNEL_SWITCHES:  # "true" or "on" would silently keep the default
        if os.environ.get(name) and os.environ[name] not in ("0", "1"):
            raise MxServeError(f"{name}={os.environ[name]}: 0 or 1")
    for name in REMOVED_SWITCHES:
        if os.environ.get(name, "0") not in ("", "0"):
            raise MxServeError(f"{name}={os.environ[name]}: this option was removed (it did not pay on the H200: "
                               "benchmarks/README.md); unset it")
    if engine == "sglang" and os.path.isfile(os.path.join(a.model, "config.json")):
        from mxserve.engines.sglang_launch import check_model_type
        from mxserve.models.configs import read_config

        check_model_type(read_config(a.model).get("model_type"))  # before any calibration
    if engine == "sglang":
        check_served_memory(a)
    if engine == "sglang" and a.tp > 1:
        check_given_plan_layout(a, split)
    replan = a.replan_interval is not None
    settings = LaunchSettings(
        model=a.model, budget=a.budget, plan=a.plan, calib_data=a.calib_data, method=method,
        calib_samples=a.calib_samples, r=a.r, tokens=a.plan_tokens, kernel_profile=a.kernel_profile,
        progress=not a.quiet, device=a.device, tp=split, ep=a.ep, costly_cap=_costly_cap(a),
    )
    if replan and (a.plan or not a.budget):
        raise MxServeError("--replan-interval needs --budget (re-planning solves from the calibration profile)")
    res = resolve(settings)
    ckpt = res.ckpt
    online = None
    if replan:  # the controller's modules only then: each second here delays SGLang's start
        from mxserve.online.controller import ReplanSettings

        online = resolve_online(settings, res, ReplanSettings(a.replan_interval, a.replan_margin,
                                                              a.replan_min_interval, tp=split, ep=a.ep,
                                                              costly_cap=_costly_cap(a)))  # fmt: skip
    name = a.served_model_name or os.path.basename(os.path.normpath(a.model))
    api_key = a.api_key or os.environ.get("MXSERVE_API_KEY")
    stats = StatsSettings(a.stats_interval, a.stats_window, a.stats_halflife)
    if engine == "sglang" and online is not None:
        start_sglang_controller(online, ckpt, a, api_key)
    if engine == "sglang":
        sys.exit(serve_sglang(ckpt, a.host, a.port, name, api_key, a.max_model_len, (a.tp, a.ep), extra,
                              a.bf16_layers or "sglang", stats, online.ladder_path if online else None))
    serve(ckpt, a.host, a.port, name, api_key, a.max_model_len, a.default_max_tokens, a.max_running_requests or 16,
          stats, online)


DEVICE_HELP = "where calibration and quantization run: auto (the GPU when there is one), cpu or cuda"


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _token_counts(text: str) -> tuple[int, ...]:
    """``--tokens``: one forward size, or several comma-separated (the latency term sums one forward of each)."""
    return tuple(sorted({_positive_int(t.strip()) for t in text.split(",")}))


def _seconds(text: str, allow_zero: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 <= v if allow_zero else 0 < v) or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds {'>= 0' if allow_zero else '> 0'}, got {text}")
    return v


def _positive_float(text: str) -> float:
    return _seconds(text, allow_zero=False)


def _nonnegative_float(text: str) -> float:
    return _seconds(text, allow_zero=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mxserve", description="Mixed-precision MoE quantization and serving (MxMoE).")
    sub = p.add_subparsers(dest="command", required=True)

    la = sub.add_parser("launch", help="quantize to a budget (or plan) and serve an OpenAI-compatible API")
    la.add_argument("--model", required=True, help="model directory, Hugging Face id, or an mxmoe checkpoint")
    la.add_argument("--budget", help="average bits per expert weight: 4bit, 3.25bit or 3.25")
    la.add_argument("--plan", help="a plan from `mxserve plan` (instead of --budget)")
    la.add_argument("--calib-data", nargs="+", help="calibration text (default: built-in stdlib source text)")
    la.add_argument("--method", choices=METHOD_CHOICES,
                    help="quantizer (default gptq-had; gptq with --tp > 1, whose column split no rotation survives)")
    la.add_argument("--calib-samples", type=_positive_int, default=64, help="calibration windows of 512 tokens")
    la.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help=DEVICE_HELP)
    la.add_argument("--r", type=float, default=1.0, help="planner accuracy weight (1 accuracy only, 0 latency)")
    la.add_argument("--plan-tokens", type=_token_counts, default=(64,),
                    help="tokens per forward the plan targets; several, comma-separated, as `plan --tokens`")
    la.add_argument("--kernel-profile", help="measured kernel profile for the planner's latency term")
    la.add_argument("--keep-stream-k", action="store_true", help=KEEP_STREAM_K_HELP)
    la.add_argument("--engine", choices=("embedded", "sglang"),
                    help="default: sglang when a CUDA GPU and sglang are present, else embedded")
    la.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    la.add_argument("--port", type=int, default=8000)
    la.add_argument("--api-key", help="require this bearer token (or set MXSERVE_API_KEY)")
    la.add_argument("--served-model-name", help="model name in the API (default: the model's folder name)")
    la.add_argument("--max-model-len", "--context-length", type=_positive_int, dest="max_model_len",
                    help="context length (default: the model's max_position_embeddings)")
    la.add_argument("--default-max-tokens", type=_positive_int, default=256)
    la.add_argument("--max-running-requests", type=_positive_int,
                    help="requests decoded together (embedded default 16; SGLang's own default otherwise)")
    la.add_argument("--tp", "--tp-size", type=_positive_int, dest="tp",
                    help="GPUs to serve on (SGLang's tensor parallel size; default 1, or --ep): without --ep each "
                         "expert is split over them")
    la.add_argument("--ep", "--ep-size", type=_positive_int, default=1, dest="ep",
                    help="expert parallel size: the GPUs form this many groups, each holding whole experts, and the "
                         "plan's budget holds on each (SGLang engine only; divides --tp)")
    la.add_argument("--bf16-layers", choices=BF16_LAYERS,
                    help="SGLang engine: layers the plan leaves wholly in bf16 run SGLang's own fused MoE "
                         "(sglang, the default: plain SGLang's numbers) or mxserve's kernel (kernel)")
    la.add_argument("--sglang-args", help='more sglang.launch_server arguments, e.g. "--attention-backend triton"')
    la.add_argument("--stats-interval", type=_positive_float, default=1.0,
                    help="seconds between folds of the routing counters into metrics (default 1)")
    la.add_argument("--stats-window", type=_positive_float, default=60.0,
                    help="sliding window of the load shares, seconds (default 60)")
    la.add_argument("--stats-halflife", type=_positive_float, default=30.0,
                    help="half-life of the EWMA load shares, seconds (default 30)")
    la.add_argument("--replan-interval", type=_nonnegative_float,
                    help="re-plan for the observed traffic every this many seconds (0: only on POST /mxserve/replan);"
                         " builds the precision ladder at launch. Off by default")
    la.add_argument("--admin-port", type=int,
                    help="SGLang engine: port of the admin routes (default: --port + 1; the embedded engine serves "
                         "them on its own port)")
    la.add_argument("--replan-margin", type=_nonnegative_float, default=0.02,
                    help="relative gain of L^r*T^(1-r) a new plan needs to be swapped in (default 0.02)")
    la.add_argument("--replan-min-interval", type=_nonnegative_float, default=60.0,
                    help="seconds after a swap before the next automatic one (default 60)")
    la.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    la.add_argument("--quiet", action="store_true")
    la.set_defaults(func=cmd_launch)

    c = sub.add_parser("calibrate", help="measure per-block quantization sensitivity and routing frequency")
    c.add_argument("--model", required=True, help="model directory or Hugging Face id")
    c.add_argument("--data", required=True, nargs="+", help="calibration text file(s)")
    c.add_argument("--schemes", help="comma-separated candidate schemes (default: all canonical)")
    c.add_argument("--method", default="gptq-had", choices=METHOD_CHOICES)
    c.add_argument("--nsamples", "--calib-samples", dest="nsamples", type=_positive_int, default=128,
                   help="calibration windows (default 128; --calib-samples as in launch)")
    c.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per window (default 512)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--hadamard-seed", type=int, default=0)
    c.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help=DEVICE_HELP)
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--out", required=True, help="profile file to write (JSON)")
    c.set_defaults(func=cmd_calibrate)

    pl = sub.add_parser("plan", help="solve the precision allocation under a bit budget")
    pl.add_argument("--profile", required=True, help="calibration profile from `mxserve calibrate`")
    pl.add_argument("--budget", required=True, help="average bits per expert weight: 4bit, 3.25bit or 3.25")
    pl.add_argument("--r", type=float, default=1.0, help="accuracy weight: 1 accuracy only, 0 latency only")
    pl.add_argument("--tokens", type=_token_counts, default=(64,),
                    help="tokens per forward pass for the latency term; several, comma-separated (e.g. 1,8: decode "
                    "at one request and at eight), price one forward of each, summed")
    pl.add_argument(
        "--granularity",
        default="layer",
        choices=("layer", "model"),
        help="budget per layer (as the paper) or over the whole model",
    )
    pl.add_argument("--kernel-profile", help="measured kernel profile from `mxserve profile` (default: roofline)")
    pl.add_argument("--schemes", help="restrict to these calibrated schemes (comma-separated)")
    pl.add_argument("--keep-stream-k", action="store_true", help=KEEP_STREAM_K_HELP)
    pl.add_argument("--points", type=int, default=6, help="points of the L/T frontier to explore")
    pl.add_argument("--solver", default="auto", choices=("auto", "ilp", "greedy"),
                    help="auto: certified greedy knapsack per layer, the ILP where it is not proven within 1%% "
                         "(and for --granularity model); ilp: the integer program throughout")
    pl.add_argument("--time-limit", type=float, default=60.0, help="solver time limit in seconds, in all")
    pl.add_argument("--ep", type=_positive_int, default=1,
                    help="plan for N expert-parallel ranks: the budget holds on every rank's experts of a layer")
    pl.add_argument("--tp", type=_positive_int, default=1,
                    help="plan for experts split N ways over GPUs (`launch --tp` / `--ep`): down blocks keep to "
                         "schemes whose columns split into whole groups")
    pl.add_argument("--out", required=True, help="plan file to write (JSON)")
    pl.add_argument("--plot", help="also draw the precision map and the L/T frontier to this PNG")
    pl.set_defaults(func=cmd_plan)

    sw = sub.add_parser("swap", help="apply a plan to a running SGLang-engine server (launched with "
                                     "--replan-interval 0), in place, without dropping requests")
    sw.add_argument("--url", default="http://127.0.0.1:8000")
    sw.add_argument("--plan", required=True, help="a plan for the served model and budget (JSON)")
    sw.add_argument("--api-key", help="the server's API key (or MXSERVE_API_KEY)")
    sw.set_defaults(func=cmd_swap)

    stt = sub.add_parser("stats", help="a running server's expert load and precision map, from its /metrics")
    stt.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default http://127.0.0.1:8000)")
    stt.add_argument("--api-key", help="the server's API key (or MXSERVE_API_KEY)")
    stt.add_argument("--window", default="sliding", choices=("sliding", "ewma"), help="which load share to show")
    stt.add_argument("--top", type=_positive_int, default=4, help="busiest experts shown per layer")
    stt.add_argument("--plot", help="also draw the served precision map and load shares to this PNG")
    stt.set_defaults(func=cmd_stats)

    q = sub.add_parser("quantize", help="write a quantized checkpoint following a plan")
    q.add_argument("--model", required=True)
    q.add_argument("--plan", required=True)
    q.add_argument("--data", nargs="+", help="calibration text for GPTQ (default: the plan's)")
    q.add_argument("--nsamples", "--calib-samples", dest="nsamples", type=_positive_int, default=128,
                   help="calibration windows for GPTQ (default 128; --calib-samples as in launch)")
    q.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help=DEVICE_HELP)
    q.add_argument("--quiet", action="store_true")
    q.add_argument("--out", required=True, help="output directory")
    q.set_defaults(func=cmd_quantize)

    pr = sub.add_parser("profile", help="measure the mixed-precision kernels on this GPU for the cost model")
    pr.add_argument(
        "--models",
        nargs="+",
        default=["qwen1.5-moe-a2.7b", "deepseek-v2-lite", "mixtral-8x7b", "qwen3-30b-a3b"],
        help="expert shapes to measure",
    )
    pr.add_argument("--schemes", help="comma-separated schemes (default: all canonical)")
    pr.add_argument("--tokens", nargs="+", type=_positive_int, default=[1, 4, 16, 64, 256, 1024, 4096, 8192])
    pr.add_argument("--experts", type=_positive_int, default=8, help="experts per launch (time is per expert)")
    pr.add_argument("--out", required=True, help="kernel profile to write (JSON)")
    pr.set_defaults(func=cmd_profile)

    e = sub.add_parser("eval", help="perplexity on held-out text")
    e.add_argument("--model", required=True, help="model directory / id, or a quantized checkpoint")
    e.add_argument("--data", required=True, nargs="+")
    e.add_argument("--uniform", help="quantize every expert block with this scheme first")
    e.add_argument("--plan", help="quantize by this plan in memory first")
    e.add_argument("--method", default="rtn", choices=METHOD_CHOICES, help="quantizer for --uniform")
    e.add_argument("--calib-data", nargs="+", help="calibration text for GPTQ methods")
    e.add_argument("--ctx", type=_positive_int, default=512, help="window length (stride = window)")
    e.add_argument("--max-tokens", type=_positive_int, default=32768, help="tokens scored per file")
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: bf16 with the Triton kernels; cpu: fp32 torch reference")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    hf_env.quiet()
    try:
        args.func(args)
    except MxServeError as e:
        print(f"mxserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
