"""The SGLang engine's launcher on the CPU: plugin discovery, the server command, clear errors.

The plugin itself runs inside SGLang on a GPU: tests/test_sglang_gpu.py.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from mxserve.checkpoint import layout, quantize_to_dir
from mxserve.engines import sglang_launch
from mxserve.errors import MxServeError
from mxserve.models.adapters import moe_layers
from mxserve.models.configs import PLAN_FILE
from mxserve.models.loading import load_model
from mxserve.plan import Plan
from mxserve.schemes import get_scheme

PROBE = """
import importlib.util, json
from importlib.metadata import entry_points
eps = [(e.name, e.value) for e in entry_points(group="sglang.srt.plugins")]
import os
try:
    spec = importlib.util.find_spec("mxserve.engines.sglang_plugin")
    # what SGLang's registry imports: the package named in the environment
    models = importlib.util.find_spec(os.environ.get("SGLANG_EXTERNAL_MODEL_PACKAGE") or "-")
except ModuleNotFoundError:
    spec = models = None
print(json.dumps({"eps": eps, "plugin_module": spec is not None, "models_package": models is not None}))
"""


def _probe(env: dict, cwd) -> dict:
    out = subprocess.run([sys.executable, "-S", "-c", PROBE], env=env, cwd=cwd, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_plugin_visible_from_a_source_tree(tmp_path, monkeypatch):
    """Not pip-installed: a dist-info on PYTHONPATH lets SGLang's processes find the plugin.

    ``python -S`` leaves site-packages out, so only what plugin_env adds is seen.
    """
    monkeypatch.setattr(sglang_launch, "_plugin_installed", lambda: False)
    env = sglang_launch.plugin_env(str(tmp_path), {"PATH": os.environ["PATH"], "SGLANG_PLUGINS": "other"})
    got = _probe(env, tmp_path)
    assert ["mxmoe", "mxserve.engines.sglang_plugin:register"] in got["eps"]
    assert got["plugin_module"] and got["models_package"]
    assert env["SGLANG_PLUGINS"] == "other,mxmoe"
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "triton")  # compiled kernels kept in mxserve's cache
    assert sglang_launch.plugin_env(str(tmp_path), {"TRITON_CACHE_DIR": "/mine"})["TRITON_CACHE_DIR"] == "/mine"
    bare = _probe({"PATH": os.environ["PATH"]}, tmp_path)
    assert bare["eps"] == [] and not bare["plugin_module"] and not bare["models_package"]


def test_plugin_entry_point_installed():
    """pip install (here: editable) declares the entry point; then no dist-info is written."""
    assert sglang_launch._plugin_installed()


@pytest.fixture(scope="module")
def qwen2_ckpt(tiny_models, tmp_path_factory) -> str:
    model = load_model(str(tiny_models["qwen2_moe"]))
    plan = Plan.uniform("m", "qwen2_moe", layout(moe_layers(model)), get_scheme("w4a16g128"), "rtn")
    out = str(tmp_path_factory.mktemp("ckpt"))
    quantize_to_dir(str(tiny_models["qwen2_moe"]), plan, out, progress=False)
    return out


def test_sglang_command(qwen2_ckpt):
    cmd = sglang_launch.sglang_command(qwen2_ckpt, "127.0.0.1", 8123, "tiny", api_key="k", context_length=512,
                                       extra=["--attention-backend", "triton"])
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    args = {flag: cmd[i + 1] for i, flag in enumerate(cmd[:-1]) if flag.startswith("--")}
    assert args["--model-path"] == os.path.abspath(qwen2_ckpt)
    assert args["--host"] == "127.0.0.1" and args["--port"] == "8123" and args["--api-key"] == "k"
    assert args["--context-length"] == "512" and args["--served-model-name"] == "tiny"
    assert cmd[-2:] == ["--attention-backend", "triton"] and "--enable-metrics" in cmd
    over = json.loads(args["--json-model-override-args"])
    assert over["shared_expert_intermediate_size"] == 0  # the shared expert runs in the MoE launch
    qc = over["quantization_config"]
    assert qc["quant_method"] == "mxmoe" and qc["plan"] == os.path.join(os.path.abspath(qwen2_ckpt), PLAN_FILE)
    assert os.path.isfile(qc["plan"])
    assert qc["bf16_layers"] == "sglang"  # wholly-bf16 layers run SGLang's own MoE unless asked
    kernel = sglang_launch.sglang_command(qwen2_ckpt, "127.0.0.1", 8123, "tiny", bf16_layers="kernel")
    over = json.loads(kernel[kernel.index("--json-model-override-args") + 1])
    assert over["quantization_config"]["bf16_layers"] == "kernel"


def test_sglang_command_parallel(qwen2_ckpt):
    cmd = sglang_launch.sglang_command(qwen2_ckpt, "127.0.0.1", 8123, "tiny", parallel=(4, 2))
    assert cmd[cmd.index("--tp-size") + 1] == "4" and cmd[cmd.index("--ep-size") + 1] == "2"


def test_deepseek_shared_experts_run_in_the_launch(tiny_models, tmp_path):
    model = load_model(str(tiny_models["deepseek_v2"]))
    plan = Plan.uniform("m", "deepseek_v2", layout(moe_layers(model)), get_scheme("w4a16g128"), "rtn")
    quantize_to_dir(str(tiny_models["deepseek_v2"]), plan, str(tmp_path), progress=False)
    over = sglang_launch.model_overrides(str(tmp_path))
    # SGLang's DeepSeek-V2 calls its shared MLP even with n_shared_experts 0; the plugin zeroes it instead
    assert "n_shared_experts" not in over and "shared_expert_intermediate_size" not in over


def test_mixtral_served_under_mxserves_architecture(tiny_models, tmp_path):
    """SGLang builds a Mixtral quantized by a method outside its list without FusedMoE; the override
    names the class of engines/sglang_models, whose registry name is its class name."""
    import ast

    model = load_model(str(tiny_models["mixtral"]))
    plan = Plan.uniform("m", "mixtral", layout(moe_layers(model)), get_scheme("w4a16g128"), "rtn")
    quantize_to_dir(str(tiny_models["mixtral"]), plan, str(tmp_path), progress=False)
    arch = sglang_launch.model_overrides(str(tmp_path))["architectures"]
    assert arch != ["MixtralForCausalLM"]
    spec = importlib.util.find_spec(sglang_launch.MODELS_PACKAGE + ".mixtral")
    tree = ast.parse(open(spec.origin).read())
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    entry = [n.value.id for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "EntryClass"]
    assert arch == entry and entry[0] in classes
    with pytest.raises(MxServeError, match="SGLANG_EXTERNAL_MODEL_PACKAGE=theirs"):
        sglang_launch.plugin_env(str(tmp_path / "state"), {"SGLANG_EXTERNAL_MODEL_PACKAGE": "theirs"})


def test_sglang_command_errors(qwen2_ckpt, tiny_models, tmp_path):
    shutil.copytree(qwen2_ckpt, tmp_path / "other")
    cfg = json.loads((tmp_path / "other" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps(dict(cfg, model_type="dbrx")))
    with pytest.raises(MxServeError, match="dbrx runs on --engine embedded"):
        sglang_launch.sglang_command(str(tmp_path / "other"), "127.0.0.1", 1, "m")
    with pytest.raises(MxServeError, match="--bf16-layers"):
        sglang_launch.sglang_command(qwen2_ckpt, "127.0.0.1", 1, "m", bf16_layers="fast")
    with pytest.raises(MxServeError, match="not an mxmoe checkpoint"):
        sglang_launch.sglang_command(str(tiny_models["qwen2_moe"]), "127.0.0.1", 1, "m")


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="sglang is installed here")
def test_missing_sglang_is_a_clear_error():
    with pytest.raises(MxServeError, match="pip install 'mxserve\\[sglang\\]'"):
        sglang_launch.check_sglang()


def test_version_range():
    v = sglang_launch._version_tuple
    lo, hi = sglang_launch.SUPPORTED
    assert lo <= v("0.5.15") < hi and lo <= v("0.5.20.post1") < hi
    assert not lo <= v("0.5.9") < hi and not lo <= v("0.6.0") < hi


def test_kernels_compile_while_the_server_starts(tmp_path):
    """run_sglang starts the server first and runs ``while_starting`` (the precompile) beside its start,
    then returns the server's own exit code."""
    started = tmp_path / "started"
    server = f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); time.sleep(0.5); raise SystemExit(3)"
    seen = []

    def while_starting():
        for _ in range(200):  # the server process runs meanwhile: it makes its file
            if started.exists():
                break
            time.sleep(0.05)
        seen.append(started.exists())

    assert sglang_launch.run_sglang([sys.executable, "-c", server], dict(os.environ), while_starting) == 3
    assert seen == [True]


def test_a_launch_from_a_checkpoint_starts_sglang_before_importing_torch(qwen2_ckpt, tmp_path):
    """Importing torch took 3 of the launcher's 4 s before SGLang started (H200 host): the checks and the
    command are made without it. Only the GPU (counted through NVML) and SGLang itself are stood in for."""
    script = f"""
import sys
from mxserve import cli, preflight
from mxserve.engines import sglang_launch

preflight.gpu_count = lambda: 1
preflight.free_gpu_memory = lambda: 80 * 2**30
sglang_launch.check_sglang = lambda: "0.5.15"

def run_sglang(cmd, env, while_starting=None):
    print("torch" in sys.modules, cmd[cmd.index("--model-path") + 1])
    return 0

sglang_launch.run_sglang = run_sglang
sys.exit(cli.main(["launch", "--engine", "sglang", "--model", {qwen2_ckpt!r}, "--port", "18123", "--quiet"]))
"""
    env = dict(os.environ, MXSERVE_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", os.path.abspath(qwen2_ckpt)]
    # the launcher's own share of a start, as benchmarks/cold_start.py reads it from this log
    assert 0 <= _cold_start().launcher_seconds(out.stderr) < 60


@pytest.mark.parametrize("sglang_args, own, want", [("--enable-deterministic-inference", None, "0"),
                                                    ("--enable-deterministic-inference", "1", "1"), ("", None, None)])
def test_sglang_deterministic_inference_turns_stream_k_off(qwen2_ckpt, tmp_path, sglang_args, own, want):
    """SGLang's --enable-deterministic-inference: the MoE decode launches without stream-K (sums added in
    a fixed order), in the server's environment and before precompiling; an explicit MXSERVE_STREAM_K stays."""
    script = f"""
import os, sys
from mxserve import cli, launch, preflight
from mxserve.engines import sglang_launch

preflight.gpu_count = lambda: 1
preflight.free_gpu_memory = lambda: 80 * 2**30
sglang_launch.check_sglang = lambda: "0.5.15"
launch.precompile_kernels = lambda *a: print("precompile", os.environ.get("MXSERVE_STREAM_K"))

def run_sglang(cmd, env, while_starting=None):
    while_starting()
    print("server", env.get("MXSERVE_STREAM_K"), "--enable-deterministic-inference" in cmd)
    return 0

sglang_launch.run_sglang = run_sglang
sys.exit(cli.main(["launch", "--engine", "sglang", "--model", {qwen2_ckpt!r}, "--port", "18124", "--quiet",
                   "--sglang-args=" + {sglang_args!r}]))
"""
    env = {k: v for k, v in os.environ.items() if k != "MXSERVE_STREAM_K"}
    env.update(MXSERVE_CACHE=str(tmp_path), **({"MXSERVE_STREAM_K": own} if own else {}))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    flag = str(bool(sglang_args))
    assert out.stdout.split("\n")[:2] == [f"precompile {want}", f"server {want} {flag}"], out.stdout


def _cold_start():
    """benchmarks/cold_start.py, which reads the launcher's lines from its log."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import cold_start

    return cold_start


FAKE_NVML = """
import sys
from types import SimpleNamespace

class NVMLError(Exception):
    pass

def _no_mig(h):
    raise NVMLError("Not Supported")

sys.modules["pynvml"] = SimpleNamespace(
    NVMLError=NVMLError, NVML_DEVICE_MIG_ENABLE=1, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
    nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetMigMode=_no_mig,
    nvmlDeviceGetName=lambda h: "NVIDIA H200", nvmlDeviceGetUUID=lambda h: "GPU-0abc",
    nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(free=100 * 2**30))
"""

COMPILING_LAUNCH = FAKE_NVML + """
import json, os
from mxserve import launch
from mxserve.runtime import precompile

ckpt, cache = sys.argv[1], sys.argv[2]
calls = []

def fake(plan, views, skip_bf16, codes, tp, ep, log):
    calls.append(len(views))
    if len(calls) == 1:
        raise RuntimeError("no GPU here")

precompile.precompile = fake
runs = []
for env in ("", "", "1"):  # fails; compiles; another setting of the kernels compiles again
    os.environ["MXSERVE_PREFILL_DEQUANT"] = env
    launch.precompile_kernels(ckpt, "sglang", None, (1, 1), cache)
    runs.append(len(calls))
print(json.dumps(runs))
"""

WARM_LAUNCH = FAKE_NVML + """
import os
from mxserve import launch

os.environ["MXSERVE_PREFILL_DEQUANT"] = sys.argv[3]
launch.precompile_kernels(sys.argv[1], "sglang", None, (1, 1), sys.argv[2])
print("torch" in sys.modules, "triton" in sys.modules)
"""


def test_a_warm_launch_finds_its_kernels_precompiled_without_importing_torch(qwen2_ckpt, tmp_path):
    # recording a launch's kernel variants imports torch and Triton: 16.6 s beside SGLang's warm start on
    # the H200. A launch like one that finished precompiling (same plan, GPU, settings, code) skips it
    cache = str(tmp_path / "triton")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MXSERVE_")}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(script, *args):
        out = subprocess.run([sys.executable, "-c", script, qwen2_ckpt, cache, *args], capture_output=True,
                             text=True, env=env, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        return out

    # a failed precompile leaves no stamp, so the next launch compiles; a changed setting compiles again
    assert json.loads(run(COMPILING_LAUNCH).stdout.split("\n")[-2]) == [1, 2, 3]
    for setting in ("", "1"):
        warm = run(WARM_LAUNCH, setting)
        assert warm.stdout.split() == ["False", "False"], warm.stdout
        assert "precompiled by an earlier launch like this one" in warm.stderr
    cold = run(WARM_LAUNCH, "0")  # a setting no launch precompiled for
    assert "precompiled by an earlier launch" not in cold.stderr and "precompil" in cold.stderr
    # benchmarks/cold_start.py counts Triton's entries once the step is over, either way
    settled = _cold_start().precompile_settled
    assert settled(warm.stderr) and settled(cold.stderr) and not settled(warm.stderr.split("kernels precompiled")[0])


def test_the_fold_mode_is_checked_before_sglang_starts():
    """MXSERVE_STATS_FOLD reaches SGLang's scheduler; a misspelt one is refused at launch, not in the scheduler."""
    assert sglang_launch.stats_env({"MXSERVE_STATS_FOLD": "thread"})["MXSERVE_STATS_FOLD"] == "thread"
    assert "MXSERVE_STATS_FOLD" not in sglang_launch.stats_env({})
    with pytest.raises(MxServeError, match="MXSERVE_STATS_FOLD='threads'"):
        sglang_launch.stats_env({"MXSERVE_STATS_FOLD": "threads"})
