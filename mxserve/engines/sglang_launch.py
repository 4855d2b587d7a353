"""Starting SGLang's HTTP server on an mxserve checkpoint.

The server is SGLang's own ``sglang.launch_server`` in a child process; what
mxserve adds is in its arguments and environment:

- the ``mxmoe`` plugin made visible to every SGLang process: through the
  entry point pip installed, or, when mxserve runs from a source tree, through
  a small ``*.dist-info`` folder put on ``PYTHONPATH`` (SGLang finds plugins
  with ``importlib.metadata``, in each process it starts);
- ``--json-model-override-args`` with the plan's absolute path, how layers the
  plan leaves wholly in bf16 run (``bf16_layers``, see sglang_plugin) and, for
  models with a shared expert, ``shared_expert_intermediate_size: 0`` (the
  shared expert runs inside the MoE layer's method instead).

Supported SGLang: 0.5.15 <= version < 0.6 (the plugin group and FusedMoE
method API it uses appeared in 0.5.x). Run on the GPU with 0.5.15; the parts it
relies on (plugin loading before argument parsing, FusedMoEMethodBase, the
standard dispatcher's apply/combine) read the same in 0.5.23's source.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable

from mxserve import hf_env
from mxserve.engines import BF16_LAYERS
from mxserve.errors import MxServeError
from mxserve.models.configs import QUANT_METHOD, read_config

PLUGIN_GROUP = "sglang.srt.plugins"
PLUGIN_NAME = "mxmoe"
PLUGIN_TARGET = "mxserve.engines.sglang_plugin:register"
SUPPORTED = ((0, 5, 15), (0, 6))
GRPC_PORT_OFFSET = 10000  # sglang 0.5.15 derives a gRPC port from --port and rejects it above 65535
# Model types whose SGLang implementation holds the experts in one FusedMoE per layer under
# the checkpoint's MoE block name (ArchSpec.stored_block), with the transformers tensor names
# elsewhere (tests/test_sglang_gpu.py runs each). The shared experts of qwen2_moe and
# deepseek_v2 run in the method's launch, so SGLang is told Qwen2-MoE has none (model_overrides);
# SGLang's DeepSeek-V2 runs its shared MLP even when told so, and the plugin makes it add zeros
# (sglang_plugin.SharedInLaunch).
MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v2")
# config keys that size the separate shared MLP SGLang would build beside the experts
SHARED_MLP_KEYS = ("shared_expert_intermediate_size",)
# Model types served under an architecture of mxserve's (engines/sglang_models says why), and
# the package SGLang reads it from
OWN_ARCHITECTURES = {"mixtral": "MxMoEMixtralForCausalLM"}
MODELS_PACKAGE = "mxserve.engines.sglang_models"
MODELS_PACKAGE_ENV = "SGLANG_EXTERNAL_MODEL_PACKAGE"
# With re-planning, SGLang loads swapped plans through this custom weight loader (engines/sglang_swap.py),
# which finds the precision ladder at the path in this variable
LOADER = "mxserve.engines.sglang_swap.apply_plan"
LADDER_ENV = "MXSERVE_LADDER"


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_sglang() -> str:
    """SGLang's version, or a clear error when it is missing or outside the supported range."""
    if importlib.util.find_spec("sglang") is None:
        raise MxServeError(
            "--engine sglang needs SGLang (pip install 'mxserve[sglang]'; on an air-gapped GPU host see the "
            "README's GPU section); --engine embedded serves without it"
        )
    try:
        version = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        import sglang

        version = getattr(sglang, "__version__", "0")
    lo, hi = SUPPORTED
    if not lo <= _version_tuple(version) < hi:
        raise MxServeError(f"sglang {version} is not supported; mxserve needs sglang >=0.5.15,<0.6")
    check_models_package(os.environ)
    return version


def check_models_package(env) -> None:
    """SGLang reads one external model package; without mxserve's, a quantized Mixtral loses FusedMoE."""
    if env.get(MODELS_PACKAGE_ENV, MODELS_PACKAGE) != MODELS_PACKAGE:
        raise MxServeError(f"{MODELS_PACKAGE_ENV}={env[MODELS_PACKAGE_ENV]}: mxserve launch sets it to "
                           f"{MODELS_PACKAGE} (SGLang's Mixtral under a name of mxserve's); unset it")


def _plugin_installed() -> bool:
    return any(
        ep.name == PLUGIN_NAME and ep.value == PLUGIN_TARGET
        for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP)
    )


def plugin_env(state_dir: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for SGLang's processes, in which they find and can import the plugin."""
    env = hf_env.user_env(os.environ if env is None else env)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not _plugin_installed():
        dist = os.path.join(state_dir, "sglang-plugin", "mxserve_sglang_plugin-1.0.dist-info")
        os.makedirs(dist, exist_ok=True)
        with open(os.path.join(dist, "METADATA"), "w") as f:
            f.write("Metadata-Version: 2.1\nName: mxserve-sglang-plugin\nVersion: 1.0\n")
        with open(os.path.join(dist, "entry_points.txt"), "w") as f:
            f.write(f"[{PLUGIN_GROUP}]\n{PLUGIN_NAME} = {PLUGIN_TARGET}\n")
        paths = [os.path.dirname(dist)] + paths
    if src not in paths:
        paths.append(src)  # mxserve itself importable in the children, installed or not
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # Triton's compiled kernels live in mxserve's cache, so the next launch (and a cache volume) reuses them
    env.setdefault("TRITON_CACHE_DIR", os.path.join(state_dir, "triton"))
    check_models_package(env)
    env[MODELS_PACKAGE_ENV] = MODELS_PACKAGE
    allowed = env.get("SGLANG_PLUGINS")
    if allowed and PLUGIN_NAME not in allowed.split(","):
        env["SGLANG_PLUGINS"] = allowed + "," + PLUGIN_NAME  # a whitelist would otherwise skip us
    return env


def stats_env(env: dict[str, str], settings=None) -> dict[str, str]:
    """router_stats' settings for the plugin in SGLang's scheduler (router_stats.service.process_stats)."""
    from router_stats.service import FOLD_ENV, FOLD_MODES

    fold = env.get(FOLD_ENV)
    if fold is not None and fold not in FOLD_MODES:
        raise MxServeError(f"{FOLD_ENV}={fold!r}: 'process' (a fold process beside SGLang's scheduler, the default) "
                           "or 'thread' (a thread of the scheduler)")  # fmt: skip
    if settings is not None:
        env["MXSERVE_STATS_INTERVAL"] = str(settings.interval)
        env["MXSERVE_STATS_WINDOW"] = str(settings.window)
        env["MXSERVE_STATS_HALFLIFE"] = str(settings.halflife)
    return env


def check_model_type(model_type: str | None) -> None:
    if model_type not in MODEL_TYPES:
        raise MxServeError(
            f"the SGLang engine serves {', '.join(MODEL_TYPES)} models; {model_type} runs on --engine embedded"
        )


def model_overrides(ckpt: str, bf16_layers: str = "sglang") -> dict:
    """What SGLang must read differently from the checkpoint's config.json."""
    cfg = read_config(ckpt)
    qc = dict(cfg.get("quantization_config") or {})
    if qc.get("quant_method") != QUANT_METHOD:
        raise MxServeError(f"{ckpt} is not an mxmoe checkpoint")
    check_model_type(cfg.get("model_type"))
    if bf16_layers not in BF16_LAYERS:
        raise MxServeError(f"--bf16-layers {bf16_layers}: one of {', '.join(BF16_LAYERS)}")
    qc["plan"] = os.path.abspath(os.path.join(ckpt, qc.get("plan", "mxmoe_plan.json")))
    qc["bf16_layers"] = bf16_layers
    out: dict = {"quantization_config": qc}
    for key in SHARED_MLP_KEYS:
        if cfg.get(key):
            out[key] = 0
    if cfg["model_type"] in OWN_ARCHITECTURES:
        out["architectures"] = [OWN_ARCHITECTURES[cfg["model_type"]]]
    return out


def sglang_command(
    ckpt: str,
    host: str,
    port: int,
    served_model_name: str,
    api_key: str | None = None,
    context_length: int | None = None,
    parallel: tuple[int, int] = (1, 1),
    extra: list[str] | None = None,
    bf16_layers: str = "sglang",
) -> list[str]:
    """The ``sglang.launch_server`` command line for a checkpoint; ``parallel`` is (tp, ep)."""
    tp, ep = parallel
    if port + GRPC_PORT_OFFSET > 65535:
        raise MxServeError(f"--port {port}: SGLang also listens on port + {GRPC_PORT_OFFSET}; use a port below "
                           f"{65536 - GRPC_PORT_OFFSET}")
    cmd = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", os.path.abspath(ckpt),
        "--host", host,
        "--port", str(port),
        "--tp-size", str(tp),
        "--ep-size", str(ep),
        "--served-model-name", served_model_name,
        "--json-model-override-args", json.dumps(model_overrides(ckpt, bf16_layers)),
        "--enable-metrics",
    ]  # fmt: skip
    if api_key:
        cmd += ["--api-key", api_key]
    if context_length:
        cmd += ["--context-length", str(context_length)]
    return cmd + list(extra or [])


def run_sglang(cmd: list[str], env: dict[str, str], while_starting: Callable[[], None] | None = None) -> int:
    """Run the server until it exits; SIGINT/SIGTERM are passed on so it shuts down cleanly.
    ``while_starting`` runs here once the server process is started: work that must be done before
    SGLang needs it (the kernels its CUDA-graph capture launches) but not before its imports and
    weight loading, which take 15 s and more."""
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if while_starting is not None:
            while_starting()
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:
            proc.kill()
