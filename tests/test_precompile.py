"""Kernel variants listed and compiled before SGLang starts (runtime/precompile.py).

Triton's interpreter, which the other CPU tests run under, has no compile keys: the recording and
compiling run in a subprocess with Triton's compiler, for sm_90 (no GPU needed to compile).
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from mxserve.plan import Plan
from mxserve.runtime.precompile import plan_layers

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "benchmarks" / "plans" / "refmoe-3.25bit.json"  # 6 layers, 16 routed + 2 shared, mixed schemes

SCRIPT = r"""
import contextlib, json, os, sys, tempfile
from types import SimpleNamespace
from unittest import mock
import torch
from triton.backends.compiler import GPUTarget
from triton_stub import compile_only_launches
from mxkernels import moe, pdl
from mxkernels.arena import build_arena
from mxserve.plan import Plan
from mxserve.runtime.moe_layer import plan_kernel_codes
from mxkernels.count import count_routing
from mxkernels.router import fused_router
from router_stats import ExpertCounter
from mxserve.runtime.precompile import (DECODE_BATCHES, KERNELS, LayerKernels, Recorder, _stand_in,
                                        compile_variants, plan_layers, record_variants)

plan = Plan.load(sys.argv[1])
views = [SimpleNamespace(index=x.layer, hidden=256, intermediate=256, n_routed=16, top_k=2) for x in plan.layers]
layers = plan_layers(plan, views)
target = GPUTarget("cuda", 90, 32)
codes = plan_kernel_codes(plan)
out = {}
for name, model_codes, every_int in (("per-layer", 0, True), ("levers", codes, False)):
    for scope, lays in (("all", layers), ("first", layers[:1])):
        rec = record_variants(lays, DECODE_BATCHES, target, 132, model_codes, specialize_all=every_int)
        out[f"{name}/{scope}"] = rec.count()

@contextlib.contextmanager
def as_on_sm90(lay, codes):
    # Triton's own launch path (JITFunction.run, compile-only launches) as on an sm_90 GPU of 132 SMs; the layer's
    # stand-in arenas
    with compile_only_launches(target), mock.patch.object(moe, "multiprocessors", lambda d: 132), \
            mock.patch.object(moe, "tile_table", lambda dev: None), \
            mock.patch.object(moe, "_runs_gluon", lambda d: True), mock.patch.object(pdl, "capable", lambda d: True):
        blocks = {}
        gu = build_arena([_stand_in(s, 2 * lay.inter, lay.hidden, blocks) for s in lay.gate_up], codes)
        dn = build_arena([_stand_in(s, lay.hidden, lay.inter, blocks) for s in lay.down], codes)
        for arena, names in ((gu, lay.gate_up), (dn, lay.down)):
            arena.rotation_seed = 0 if lay.rotated and set(names) != {"bf16"} else None
        yield gu, dn


@contextlib.contextmanager
def found_in_cache():
    # the keys of the cache entries that Triton's compiles find already there (a compile that finds none writes one)
    from triton.compiler import compiler
    found, make = set(), compiler.get_cache_manager

    def recording(key):
        manager = make(key)
        get = manager.get_group

        def get_group(filename):
            group = get(filename)
            if group is not None:
                found.add(manager.key)
            return group

        manager.get_group = get_group
        return manager

    with mock.patch.object(compiler, "get_cache_manager", recording):
        yield found


def precompiled_then_launched(variants, launch):
    # precompiled (two processes, as `mxserve launch` does) into an empty cache; then Triton's own launch path
    # (JITFunction.run, compile-only launches) over that cache: [what precompiling wrote, what the launches found
    # there or wrote]. Equal: the launches compiled nothing, and every precompiled variant was launched
    cache = tempfile.mkdtemp()
    os.environ["TRITON_CACHE_DIR"] = cache
    compile_variants(variants, target, 2)
    precompiled = sorted(os.listdir(cache))
    for kernel in KERNELS.values():  # what an earlier case's launches compiled is in memory
        kernel.device_caches.clear()
    with found_in_cache() as found:
        launch()
    return [precompiled, sorted(found | (set(os.listdir(cache)) - set(precompiled)))]


def compare(lay, t, codes):
    variants = record_variants([lay], [t], target, 132, codes).all()

    def launch():
        with as_on_sm90(lay, codes) as (gu, dn):
            # SGLang's plugin hands the top-k sum Qwen2-MoE's shared gate, or nothing (DeepSeek-V2)
            gate = torch.randn(lay.hidden).bfloat16() if lay.shared_gate else None
            moe.mx_moe_forward(torch.randn(t, 256).bfloat16(), torch.randint(0, 16, (t, 2)), torch.rand(t, 2), gu,
                               dn, 16, None, gate)
            c = ExpertCounter(16)  # its launch on a GPU (router_stats, writing the host mirror), on SGLang's int32 ids
            count_routing(torch.randint(0, 16, (t, 2), dtype=torch.int32), c.buf, c.bounds, 16, c.buf.clone())

    return {"variants": len(variants), "kernels": sorted({v.kernel for v in variants}),
            "entries": precompiled_then_launched(variants, launch)}


def compare_router(h, e, k):
    # the fused router's variants (SGLang's engine), precompiled and as its launches compile them: with and without
    # renormalization and SGLang's int32 count of unpadded tokens, at any decode batch
    variants = record_variants([], [1], target, 132, 0, routers=[(h, e, k)]).all()

    def launch():
        with compile_only_launches(target):
            for renormalize in (False, True):
                for valid in (None, torch.tensor([1], dtype=torch.int32)):
                    for t in (1, 8, 64):
                        fused_router(torch.randn(t, h).bfloat16(), torch.randn(e, h).bfloat16(), k, renormalize,
                                     valid)  # fmt: skip

    return {"variants": len(variants), "entries": precompiled_then_launched(variants, launch)}


out["router"] = compare_router(2048, 60, 4)
out["plan"] = compare(layers[0], 2, codes)
# a layer the Gluon kernel runs (4- and 2-bit experts, groups of 128), at 16 tokens: its decode launches on
# the unbalanced grid (MXSERVE_STREAM_K=0), and below with the CUDA-core kernels at 1 token
both = ("w4a16g128", "w2a16g128") * 9
os.environ["MXSERVE_STREAM_K"] = "0"
out["gluon"] = compare(LayerKernels(256, 256, 16, 2, both, both[::-1]), 16, 0)
# the same layer at 1 token on the Gluon CUDA-core kernel (asked for with MXSERVE_GLUON_FMA=1)
os.environ["MXSERVE_GLUON_FMA"] = "1"
out["gluon_fma"] = compare(LayerKernels(256, 256, 16, 2, both, both[::-1]), 1, 0)
os.environ["MXSERVE_GLUON_FMA"] = "packed"  # and with its packed bf16 arithmetic (inline PTX)
out["gluon_fma_packed"] = compare(LayerKernels(256, 256, 16, 2, both, both[::-1]), 1, 0)
os.environ.pop("MXSERVE_GLUON_FMA")
# the layer at 12 tokens on the stream-K grid (the default below moe.STREAM_K_ROWS: 3.2 rows per expert here;
# 16 tokens, 4 rows, take the unbalanced one): its own variants, and the grid
os.environ.pop("MXSERVE_STREAM_K")
out["gluon_stream_k"] = compare(LayerKernels(256, 256, 16, 2, both, both[::-1]), 12, 0)
out["gluon_16"] = compare(LayerKernels(256, 256, 16, 2, both, both[::-1]), 16, 0)
# the same with programmatic dependent launch (MXSERVE_PDL=1): launches, and so compiled variants, of their own
pdl.ENABLED = True
out["gluon_stream_k_pdl"] = compare(LayerKernels(256, 256, 16, 2, both, both[::-1]), 12, 0)
pdl.ENABLED = False
# and with Qwen2-MoE's shared gate: the top-k sum's launch computes the gate (its own variant)
out["gluon_stream_k_gate"] = compare(LayerKernels(256, 256, 16, 2, both, both[::-1], shared_gate=True), 12, 0)
rec = record_variants([LayerKernels(256, 256, 16, 2, both, both[::-1])], [12], target, 132, 0)
out["stream_k_grids"] = [[k, list(g)] for k, _, g in rec.launches if k.startswith("gemm")]
# a prefill of more rows than the one-program alignment takes (2100 tokens x 4 slots), with fp8 experts:
# the alignment's three launches, the per-token quantization's and, for the w4 experts, the dequantization's
fp8 = ("w8a8fp8", "w4a16g128") * 9
out["prefill_fp8"] = compare(LayerKernels(256, 256, 16, 2, fp8, fp8), 2100, 0)
# each launch's grid, as launched (benchmarks/decode_waves.py): refmoe's first layer at 1 token on the
# CUDA-core products (the layout before stream-K)
os.environ["MXSERVE_STREAM_K"] = "0"
rec = record_variants(layers[:1], [1], target, 132, codes)
out["grids"] = [[k, list(g)] for k, _, g in rec.launches if k.startswith("gemm")]
# the intra-op threads each recorded launch saw, and the caller's afterwards
torch.set_num_threads(2)
seen, recorder_run = [], Recorder._run
def counted_run(self, name, kern):
    run = recorder_run(self, name, kern)
    return lambda *a, **kw: (seen.append(torch.get_num_threads()), run(*a, **kw))[1]
with mock.patch.object(Recorder, "_run", counted_run):
    record_variants(layers[:1], [1, 16], target, 132, codes)
out["threads"] = [sorted(set(seen)), torch.get_num_threads()]
print(json.dumps(out))
"""


def test_one_kernel_variant_set_per_model_and_the_launch_finds_it_compiled(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]))
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(PLAN)], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    # with the model-wide code set and no batch-dependent specialization, the GEMM variants of six
    # layers over every decode batch size are those of one layer; before, the layers multiplied them
    assert out["levers/all"]["gemm"] == out["levers/first"]["gemm"]
    assert out["per-layer/all"]["gemm"] > out["per-layer/first"]["gemm"]
    assert out["levers/all"]["gemm"] < out["per-layer/all"]["gemm"]
    assert out["levers/all"]["silu_mul"] <= out["per-layer/all"]["silu_mul"]
    # Triton's own launch path, on the cache precompiling filled, compiles nothing and finds every entry it
    # made: a server finds every kernel it launches already compiled, the Gluon kernel's included
    for case in ("plan", "gluon", "gluon_fma", "gluon_fma_packed", "gluon_stream_k", "gluon_stream_k_pdl",
                 "gluon_stream_k_gate", "prefill_fp8"):  # fmt: skip
        precompiled, launched = out[case]["entries"]
        assert len(precompiled) >= out[case]["variants"] >= 3, case
        assert launched == precompiled, case
    assert out["router"]["variants"] == 4 and out["router"]["entries"][0] == out["router"]["entries"][1]
    # recorded on one thread (on cores kept busy, as beside SGLang's start, 2 threads took 2 to 7x the time), the
    # caller's count kept
    assert out["threads"] == [[1], 2]
    assert "gemm_gluon" in out["plan"]["kernels"]  # the refmoe plan's 3- and 8-bit experts too
    assert "gemm_gluon" in out["gluon"]["kernels"] and "gemm" not in out["gluon"]["kernels"]
    for case in ("gluon_fma", "gluon_fma_packed"):
        assert "gemm_gluon_fma" in out[case]["kernels"] and "gemm" not in out[case]["kernels"], case
    assert out["gluon_fma_packed"]["entries"][0] != out["gluon_fma"]["entries"][0]  # a variant of its own
    assert out["gluon_stream_k"]["entries"][0] != out["gluon"]["entries"][0]
    # with the gate, the top-k sum's launch computes it: that launch's variant differs, the GEMMs' do not
    plain, gated = (set(out[c]["entries"][0]) for c in ("gluon_stream_k", "gluon_stream_k_gate"))
    assert len(gated - plain) == 1 and len(plain - gated) == 1
    assert out["gluon_16"]["entries"][0] == out["gluon"]["entries"][0]
    # every launch of the chain compiled for programmatic launch, but the routing count's (on the second stream)
    assert len(set(out["gluon_stream_k_pdl"]["entries"][0]) & set(out["gluon_stream_k"]["entries"][0])) == 1
    # stream-K: one launch per GEMM (the shared experts in it), as many programs as 132 SMs hold (recorded
    # without compiling: moe.STREAM_K_MOST each; on the GPU, as many as their registers allow)
    assert out["stream_k_grids"] == [["gemm_gluon", [132 * 4]], ["gemm_gluon", [132 * 4]]]
    assert "count" in out["plan"]["kernels"] and out["levers/all"]["count"] == 1  # one per model
    assert {"align_count", "align_blocks", "align_place", "row_quant", "dequant"} <= set(out["prefill_fp8"]["kernels"])
    assert "align" not in out["prefill_fp8"]["kernels"]
    # at 1 token the shared experts' two GEMMs, then the routed ones: a program per row (2 shared experts,
    # top-2 routed) and per 64 columns (I = H = 256), K split alike in the two launches of a GEMM
    grids = out["grids"]
    assert [k for k, _ in grids] == ["gemm"] * 4, grids
    assert [g[:2] for _, g in grids] == [[2, 4]] * 4 and grids[0][1][2] == grids[2][1][2] > 1, grids


def test_plan_layers_per_rank():
    plan = Plan.load(str(PLAN))
    views = [SimpleNamespace(index=x.layer, hidden=256, intermediate=256, n_routed=16, top_k=2) for x in plan.layers]
    whole = plan_layers(plan, views)
    assert len(whole) == len(plan.layers) and len(whole[0].gate_up) == 18 and whole[0].inter == 256
    assert whole[0].rotated == (plan.method == "gptq-had")
    ranks = plan_layers(plan, views, tp=2, ep=2)
    assert len(ranks) == 2 * len(plan.layers)
    r0, r1 = ranks[:2]
    assert (r0.inter, r0.n_routed, len(r0.gate_up), len(r1.gate_up)) == (128, 8, 10, 8)  # shared on rank 0
    lay = plan.layers[0]
    assert r1.down == tuple(x.down for x in lay.experts[8:16])


def test_launch_goes_on_when_precompiling_fails(tmp_path, capsys, tiny_models):
    from mxserve.launch import precompile_kernels

    precompile_kernels(str(tiny_models["qwen2_moe"]), "sglang", None, (1, 1), str(tmp_path / "triton"))
    assert "precompiling the kernels failed" in capsys.readouterr().err
    assert "TRITON_CACHE_DIR" not in os.environ or os.environ["TRITON_CACHE_DIR"] != str(tmp_path / "triton")


def test_layer_shapes_read_from_a_quantized_checkpoint(tiny_models, tmp_path):
    """What `mxserve launch` precompiles for: the served checkpoint's plan over its MoE layers,
    read from its config alone (meta tensors), equal to the source model's layers."""
    from mxserve.checkpoint import layout, quantize_to_dir
    from mxserve.models.adapters import moe_layers
    from mxserve.models.configs import PLAN_FILE
    from mxserve.models.layerwise import LayerwiseModel
    from mxserve.models.loading import load_model
    from mxserve.schemes import get_scheme

    model = load_model(str(tiny_models["qwen2_moe"]))
    views = moe_layers(model)
    plan = Plan.uniform("m", "qwen2_moe", layout(views), get_scheme("w4a16g128"), "rtn")
    quantize_to_dir(str(tiny_models["qwen2_moe"]), plan, str(tmp_path), progress=False)
    served = plan_layers(Plan.load(str(tmp_path / PLAN_FILE)), LayerwiseModel(str(tmp_path)).moe_views)
    assert [(x.hidden, x.inter, x.n_routed, x.top_k, len(x.gate_up)) for x in served] == \
        [(v.hidden, v.intermediate, v.n_routed, v.top_k, v.n_routed + v.n_shared()) for v in views]  # fmt: skip
    assert {s for x in served for s in x.gate_up + x.down} == {"w4a16g128"}


STAMP_SCRIPT = r"""
import json, os, sys
from unittest import mock
from triton.backends.compiler import GPUTarget
os.environ["TRITON_CACHE_DIR"] = sys.argv[1]
import mxserve.runtime.precompile as pc

both = ("w4a16g128", "w2a16g128") * 9
lay = pc.LayerKernels(256, 256, 16, 2, both, both[::-1])
target = GPUTarget("cuda", 90, 32)
calls = []
with mock.patch.object(pc, "compile_variants", lambda v, t, w=None: calls.append(len(v))):
    one = pc.record_variants([lay], [1], target, 132).all()
    more = pc.record_variants([lay], [1, 16], target, 132).all()
    done = [pc.compile_once(one, target) is not None, pc.compile_once(one, target) is not None,
            pc.compile_once(more, target) is not None]
print(json.dumps({"done": done, "calls": calls, "sizes": [len(one), len(more)], "stamp": pc.stamp_path(one, target),
                  "other": pc.stamp_path(more, target)}))
"""


def test_a_warm_launch_compiles_nothing_and_spawns_no_compilers(tmp_path):
    # mxserve launch precompiles beside SGLang's start; on the second launch every variant is in Triton's
    # cache, and a pool of compilers (each importing torch and Triton) would only slow SGLang's start
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", STAMP_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    one, more = out["sizes"]
    assert more > one > 0
    # compiled once; the same set again is skipped; a set with more variants (another plan) compiles
    assert out["done"] == [True, False, True] and out["calls"] == [one, more]
    # the stamps lie in the Triton cache they describe, so emptying that cache drops them
    for key in ("stamp", "other"):
        assert Path(out[key]).parent == tmp_path / "mxserve-precompiled" and Path(out[key]).is_file()
    assert out["stamp"] != out["other"]


def test_compile_workers_run_at_the_lowest_priority():
    """The launcher's compile workers may still run once SGLang serves: each lowers itself to nice 19 first, the
    initializer compile_variants gives its pool."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    from unittest import mock

    from mxserve.runtime import precompile

    before = os.nice(0)
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=precompile.in_background) as pool:
        assert pool.submit(os.nice, 0).result() == 19
    assert os.nice(0) == before  # this process untouched
    with mock.patch.object(precompile, "ProcessPoolExecutor") as pool:
        pool.return_value.__enter__.return_value.map.return_value = []
        precompile.compile_variants(["a", "b"], None, 2)
    assert pool.call_args.kwargs["initializer"] is precompile.in_background
