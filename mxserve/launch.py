"""`mxserve launch`: resolve a plan, quantize (cached), and serve.

The plan comes from ``--plan``, or from ``--budget``: calibrate on
``--calib-data`` (else on a built-in text), then solve. Calibration profiles
and quantized checkpoints are cached under ``$MXSERVE_CACHE`` (default
``~/.cache/mxserve``), keyed by the model's files and every setting that
changes them, so a second launch with the same settings starts at once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import socket
import sys
import time
from dataclasses import dataclass

import mxserve
from mxserve.errors import MxServeError
from mxserve.models.configs import is_quantized_checkpoint
from mxserve.parallel.ranks import moe_split

# Standard-library modules whose source makes the built-in calibration text: present on
# every machine, real code and English docstrings. json, email and http are left out
# because they are the Python dev set of ../shared/data.
_BUILTIN_MODULES = ("argparse", "dataclasses", "functools", "textwrap", "pathlib", "string", "calendar",
                    "fractions", "shlex", "difflib")


def cache_root() -> str:
    return os.environ.get("MXSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mxserve")


def builtin_calibration_text() -> str:
    """Path of the built-in calibration text (written to the cache once)."""
    import importlib

    path = os.path.join(cache_root(), "builtin-calib.txt")
    if not os.path.isfile(path):
        os.makedirs(cache_root(), exist_ok=True)
        parts = [inspect.getsource(importlib.import_module(m)) for m in _BUILTIN_MODULES]
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n<|endoftext|>\n".join(parts))
        os.replace(tmp, path)
    return path


def _fingerprint(model: str) -> str:
    """What identifies a model's weights: its config and the size/mtime of its weight files."""
    if not os.path.isdir(model):
        return model
    h = hashlib.sha256(os.path.abspath(model).encode())
    for name in sorted(os.listdir(model)):
        if name.endswith((".json", ".safetensors")):
            st = os.stat(os.path.join(model, name))
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class LaunchSettings:
    model: str
    budget: str | None = None
    plan: str | None = None
    calib_data: list[str] | None = None
    method: str = "gptq-had"
    calib_samples: int = 64
    r: float = 1.0
    tokens: int | tuple[int, ...] = 64  # the planner's forward sizes (planner.token_counts)
    kernel_profile: str | None = None
    progress: bool = True
    device: str = "cpu"  # where calibration and quantization run (work_device: auto, cpu or cuda)
    tp: int = 1  # ways each expert is split over GPUs (parallel.ranks.moe_split): down blocks must split so
    ep: int = 1  # SGLang's expert-parallel size: the budget holds on every group's experts
    costly_cap: float | None = None  # --keep-stream-k (planner.solve_plan)


def work_device(text: str) -> str:
    """--device of calibration and quantization: 'auto' is the GPU when there is one. Asked only when
    they run: a launch from cached files starts SGLang without importing torch."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cuda" and not torch.cuda.is_available():
        raise MxServeError("--device cuda: no CUDA GPU here (--device cpu, or auto)")
    return text


def log(msg: str) -> None:
    print(f"mxserve: {msg}", file=sys.stderr, flush=True)


@dataclass
class Resolved:
    ckpt: str
    profile: object | None = None  # the calibration profile, when the plan was solved from one
    budget: float | None = None


def resolve_checkpoint(s: LaunchSettings) -> str:
    """Directory of the quantized checkpoint to serve, making (and caching) it when needed."""
    return resolve(s).ckpt


def resolve(s: LaunchSettings) -> Resolved:
    """The checkpoint to serve, with the profile and budget it was planned from (for re-planning)."""
    from mxserve.preflight import check_architecture, check_budget, check_model_path

    check_model_path(s.model)
    if is_quantized_checkpoint(s.model):
        if s.budget or s.plan:
            log(f"{s.model} is already quantized; --budget/--plan are ignored")
        return Resolved(s.model)
    check_architecture(s.model)
    from mxserve.costmodel import cost_model
    from mxserve.models.configs import FORMAT_VERSION
    from mxserve.plan import Plan
    from mxserve.planner import decode_reads_line, solve_plan
    from mxserve.profile import CalibrationProfile
    from mxserve.schemes import parse_budget, parse_schemes

    fp = _fingerprint(s.model)
    prof = budget = None
    if s.plan:
        plan = Plan.load(s.plan)
    else:
        if not s.budget:
            raise MxServeError("give --budget (e.g. 4bit) or --plan")
        budget = parse_budget(s.budget)
        check_budget(budget, parse_schemes(None))  # before minutes of calibration for nothing
        data = s.calib_data or [builtin_calibration_text()]
        for d in data:
            if not os.path.isfile(d):
                raise MxServeError(f"calibration file {d} does not exist")
        data_ids = [(os.path.abspath(d), os.path.getsize(d), os.stat(d).st_mtime_ns) for d in data]
        prof_path = os.path.join(cache_root(), f"calib-{_key(fp, data_ids, s.method, s.calib_samples)}.json")
        if os.path.isfile(prof_path):
            log(f"calibration profile from cache: {prof_path}")
            prof = CalibrationProfile.load(prof_path)
        else:
            from mxserve.calibrate import calibrate
            from mxserve.phases import phase

            device = work_device(s.device)
            log(f"calibrating {s.model} ({s.method}, {s.calib_samples} x 512 tokens, on {device}) ...")
            with phase("calibrate", log=log):
                prof = calibrate(s.model, data, parse_schemes(None), s.method, nsamples=s.calib_samples,
                                 progress=s.progress, device=device)  # fmt: skip
            prof.save(prof_path)
        res = solve_plan(prof, budget, r=s.r, tokens=s.tokens, cost=cost_model(s.kernel_profile), ep=s.ep, tp=s.tp,
                         costly_cap=s.costly_cap)
        for w in res.warnings:
            log(f"warning: {w}")
        plan = res.plan
        shares = ", ".join(f"{k} {v:.0%}" for k, v in plan.summary["schemes"].items())
        log(f"plan: {plan.summary['avg_bits']:.3f} avg bits (budget {budget:g}) in {res.seconds:.1f} s: {shares}")
        reads = decode_reads_line(plan.summary)
        if reads:
            log(f"decode: {reads}")
    out = os.path.join(cache_root(), f"ckpt-{_key(fp, plan.to_json(), FORMAT_VERSION)}")
    if os.path.isfile(os.path.join(out, "config.json")):
        log(f"quantized checkpoint from cache: {out}")
        return Resolved(out, prof, budget)
    from mxserve.checkpoint import quantize_to_dir
    from mxserve.phases import phase

    log(f"quantizing to {out} ...")
    with phase("quantize", log=log):
        quantize_to_dir(s.model, plan, out, nsamples=s.calib_samples, progress=s.progress,
                        device=work_device(s.device))  # fmt: skip
    return Resolved(out, prof, budget)


def resolve_online(s: LaunchSettings, res: Resolved, settings):
    """What re-planning needs: the profile, and the precision ladder (built once, cached beside the checkpoints)."""
    from mxserve.costmodel import cost_model
    from mxserve.models.loading import load_tokenizer
    from mxserve.online.ladder import META_FILE, Ladder, build_ladder
    from mxserve.online.setup import OnlineSetup

    if res.profile is None:
        raise MxServeError("re-planning needs the calibration profile: launch an unquantized model with --budget "
                           "(not --plan or a quantized checkpoint)")
    prof = res.profile
    key = _key(_fingerprint(s.model), prof.data, prof.method, prof.schemes, prof.hadamard_seed, s.calib_samples)
    path = os.path.join(cache_root(), f"ladder-{key}")
    if os.path.isfile(os.path.join(path, META_FILE)):
        log(f"precision ladder from cache: {path}")
    else:
        log(f"building the precision ladder ({len(prof.schemes)} schemes per block) in {path} ...")
        t0 = time.perf_counter()
        build_ladder(s.model, path, prof.schemes, prof.method, prof.data, load_tokenizer(s.model), s.calib_samples,
                     prof.hadamard_seed, progress=s.progress, device=work_device(s.device))  # fmt: skip
        log(f"ladder built in {time.perf_counter() - t0:.1f} s, {Ladder(path).nbytes() / 2**20:.1f} MiB")
    return OnlineSetup(prof, res.budget, s.r, cost_model(s.kernel_profile), path, settings, s.tokens)


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise MxServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def pick_engine(requested: str | None, tp: int = 1, ep: int = 1) -> str:
    """The engine to serve with: SGLang by default when a GPU and sglang are there, else embedded.
    Parallel sizes are checked here, before any calibration. The GPUs are counted through NVML where it
    can (preflight.nvml_gpus): this process starts SGLang sooner without importing torch."""
    import importlib.util

    from mxserve.engines.sglang_launch import check_sglang
    from mxserve.preflight import gpu_count

    gpus = 0 if requested == "embedded" else gpu_count()
    if requested == "sglang" and not gpus:
        raise MxServeError("--engine sglang needs a CUDA GPU; --engine embedded serves on the CPU")
    if requested == "sglang" or (requested is None and gpus and importlib.util.find_spec("sglang")):
        check_sglang()
        check_parallel(tp, ep, gpus)
        return "sglang"
    if requested is None and gpus:
        log("CUDA found but not sglang: serving with the embedded engine (pip install 'mxserve[sglang]')")
    if tp > 1 or ep > 1:
        raise MxServeError("--tp/--ep > 1 need the SGLang engine (--engine sglang) on as many GPUs")
    return "embedded"


def check_parallel(tp: int, ep: int, gpus: int) -> None:
    """SGLang's layout: the expert-parallel group lies within the tensor-parallel one (the MoE
    layer's ranks are ep x moe_tp = tp), one GPU per rank."""
    if ep > tp or tp % ep:
        raise MxServeError(f"--ep {ep} must divide --tp {tp}: SGLang runs the MoE experts over the --tp GPUs, "
                           "--ep of them each holding whole experts (e.g. --tp 2 --ep 2)")
    if tp > gpus:
        raise MxServeError(f"--tp {tp} needs {tp} GPUs; this machine has {gpus}")


def parallel_method(method: str | None, split: int) -> str:
    """The quantizer: gptq-had unless given; gptq when experts are split over GPUs (``split`` > 1,
    parallel.ranks.moe_split), because the split cuts every down block's input columns and the
    rotation mixes all of them."""
    if split > 1 and method == "gptq-had":
        raise MxServeError("--tp without --ep splits each down block's input columns over GPUs, and gptq-had rotates "
                           "them all together: use --method gptq or rtn, or --ep for whole experts per GPU")
    if method:
        return method
    if split > 1:
        log("experts split over GPUs: quantizing with gptq (gptq-had's rotation spans the columns the split "
            "separates)")
        return "gptq"
    return "gptq-had"


def serve_sglang(ckpt: str, host: str, port: int, served_model_name: str, api_key: str | None,
                 max_model_len: int | None, parallel: tuple[int, int], extra: list[str], bf16_layers: str = "sglang",
                 stats_settings=None, ladder: str | None = None) -> int:
    """Serve ``ckpt`` with SGLang's HTTP server and the mxmoe plugin; returns its exit code.
    With ``ladder`` (a precision ladder's path), plans can be swapped in (engines/sglang_swap.py)."""
    from mxserve.engines.sglang_launch import LADDER_ENV, LOADER, plugin_env, run_sglang, sglang_command, stats_env

    _check_port(host, port)
    if "--enable-deterministic-inference" in extra and "MXSERVE_STREAM_K" not in os.environ:
        # SGLang's deterministic mode: the MoE decode launches without stream-K, whose fp32 sums add in whatever
        # order its programs end (mxkernels.moe.STREAM_K_ROWS). Set here, so precompiling records those launches
        os.environ["MXSERVE_STREAM_K"] = "0"
        log("--enable-deterministic-inference: the MoE decode launches without stream-K (MXSERVE_STREAM_K=0)")
    if ladder:
        extra = list(extra) + ["--custom-weight-loader", LOADER]
    cmd = sglang_command(ckpt, host, port, served_model_name, api_key, max_model_len, parallel, extra, bf16_layers)
    log(f"starting SGLang on http://{host}:{port}/v1 (model {served_model_name}, checkpoint {ckpt}; "
        f"{time.monotonic() - mxserve.STARTED:.1f} s after mxserve started); "
        f"mxserve's series on http://{host}:{port}/metrics")
    env = stats_env(plugin_env(cache_root()), stats_settings)
    if ladder:
        env[LADDER_ENV] = os.path.abspath(ladder)
    # compiled while SGLang imports and loads weights, before its CUDA-graph capture meets them
    cache = env["TRITON_CACHE_DIR"]
    return run_sglang(cmd, env, lambda: precompile_kernels(ckpt, bf16_layers, ladder, parallel, cache))


def precompile_kernels(ckpt: str, bf16_layers: str, ladder: str | None, parallel: tuple[int, int],
                       triton_cache: str) -> None:  # fmt: skip
    """Compile the kernel variants the server will launch into its Triton cache, in parallel, while
    SGLang starts (runtime/precompile.py): CUDA-graph capture then finds them compiled. Only a speed-up:
    a failure is logged and serving goes on (SGLang then compiles what it meets)."""
    from mxserve.models.configs import PLAN_FILE
    from mxserve.runtime import launch_stamp

    # a launch like an earlier one finds its kernels compiled before importing torch and Triton, which
    # would only slow SGLang's own start beside it
    key = launch_stamp.launch_key(ckpt, bf16_layers, ladder, parallel)
    if launch_stamp.precompiled(triton_cache, key):
        log("kernels precompiled by an earlier launch like this one: nothing to compile")
        return
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = triton_cache  # the spawned compilers inherit it
    try:
        from mxserve.models.layerwise import LayerwiseModel
        from mxserve.online.ladder import Ladder
        from mxserve.phases import phase
        from mxserve.plan import Plan
        from mxserve.runtime.moe_layer import plan_kernel_codes
        from mxserve.runtime.precompile import precompile

        with phase("precompile", log=log):
            plan = Plan.load(os.path.join(ckpt, PLAN_FILE))
            codes = plan_kernel_codes(plan, Ladder(ladder).schemes if ladder else None)
            tp, ep = parallel
            precompile(plan, LayerwiseModel(ckpt).moe_views, bf16_layers == "sglang" and not ladder, codes,
                       moe_split(tp, ep), ep, log=log)  # fmt: skip
        launch_stamp.mark_precompiled(triton_cache, key)
    except Exception as e:  # noqa: BLE001 - a speed-up only; SGLang compiles on demand
        log(f"precompiling the kernels failed ({type(e).__name__}: {e}); SGLang will compile them as it meets them")
    finally:
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old


def serve(ckpt: str, host: str, port: int, served_model_name: str, api_key: str | None,
          max_model_len: int | None, default_max_tokens: int, max_running_requests: int = 16,
          stats_settings=None, online=None) -> None:
    import torch
    import uvicorn

    from mxserve.checkpoint import load_quantized
    from mxserve.engines.embedded import EmbeddedEngine
    from mxserve.models.loading import load_tokenizer
    from mxserve.server.api import create_app

    _check_port(host, port)
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mxserve: %(message)s"))
    for name in ("mxserve",):  # the controller and the stats thread log under mxserve.*
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, plan = load_quantized(ckpt, dtype=dtype, device=device)
    tok = load_tokenizer(ckpt)
    limit = getattr(model.config, "max_position_embeddings", 2048)
    if max_model_len is not None and max_model_len > limit:
        raise MxServeError(f"--max-model-len {max_model_len} exceeds the model's {limit} positions")
    engine = EmbeddedEngine(model, tok, max_model_len or limit, max_running_requests)
    app = create_app(engine, served_model_name, api_key, default_max_tokens, plan, stats_settings, online)
    log(f"serving {served_model_name} ({plan.summary.get('avg_bits', plan.budget_bits):.2f} avg bits, {device}) "
        f"on http://{host}:{port}/v1")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.shutdown()
