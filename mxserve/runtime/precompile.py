"""Compile the MoE kernels a served plan will launch, once, up front, in parallel.

SGLang captures CUDA graphs over its decode batch sizes right after loading, and
every capture that meets a new kernel variant waits for Triton to compile it, one
at a time. Instead, :func:`record_variants` lists the variants the plan's layers
will launch: it runs the real launch path (mxkernels.moe) on stand-in tensors of
the layers' shapes and schemes, over SGLang's decode batch sizes and a ladder of
prefill token counts, with each kernel's launch replaced by a record of its compile
key (what Triton's cache is indexed by: constexprs, options, argument types and
their divisibility). :func:`compile_variants` then compiles them in a process pool
into Triton's on-disk cache (``TRITON_CACHE_DIR``: mxserve's cache under `mxserve
launch`), where the serving processes find them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from unittest import mock

import torch

from mxkernels import act_quant, align, combine, count, dequant, moe, moe_gemm, moe_gemm_gluon, moe_gemm_gluon_fma
from mxkernels import pdl as pdl_launch
from mxkernels import router as fused_router
from mxkernels.arena import build_arena
from mxserve.quant.qlinear import QuantizedLinear, quantize_linear
from mxserve.runtime.launch_stamp import STAMPS
from mxserve.schemes import get_scheme
from router_stats.counters import ExpertCounter

KERNELS = {"gemm": moe_gemm.mx_moe_gemm_kernel, "silu_mul": moe_gemm.silu_mul_kernel,
           "align": align.moe_align_kernel, "shared_rows": align.shared_rows_kernel,
           "combine": combine.moe_combine_kernel,
           "gemm_gluon": moe_gemm_gluon.mx_moe_gemm_gluon_kernel,
           "gemm_gluon_fma": moe_gemm_gluon_fma.mx_moe_gemm_gluon_fma_kernel,
           "count": count.routing_count_kernel, "align_count": align.align_count_kernel,
           "align_blocks": align.align_blocks_kernel, "align_place": align.align_place_kernel,
           "row_quant": act_quant.row_quant_kernel, "dequant": dequant.dequant_kernel,
           "router": fused_router.fused_router_kernel}  # fmt: skip
# SGLang 0.5.15's default decode CUDA-graph batch sizes (server_args, up to its max_bs: 256 on an H200
# with a 15B model; the sizes past 256 are taken when memory allows a larger max_bs)
DECODE_BATCHES = [1, 2, 4, 8, 12, *range(16, 257, 8), *range(272, 512, 16)]
PREFILL_TOKENS = [*range(4, 33, 4), *range(48, 257, 16), *range(288, 513, 32), *range(576, 1025, 64),
                  *range(1280, 4097, 256), *range(4608, 8193, 512)]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LayerKernels:
    """What decides a layer's kernel variants: its shape and the schemes of its blocks."""

    hidden: int
    inter: int
    n_routed: int
    top_k: int
    gate_up: tuple[str, ...]  # scheme per expert (routed, then shared)
    down: tuple[str, ...]
    rotated: bool = False  # gptq-had: the non-bf16 blocks read a rotated copy of their input
    shared_gate: bool = False  # Qwen2-MoE's gate on the shared experts, which SGLang's plugin hands the top-k sum


@dataclasses.dataclass
class Variant:
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    @property
    def decode(self) -> bool:
        """A decode-layout GEMM (weights on the MMA's M side; the Gluon kernels have no other)."""
        if self.kernel in ("gemm_gluon", "gemm_gluon_fma"):
            return True
        return "SWAP" in self.signature and bool(self.constexprs.get((self.names().index("SWAP"),), False))

    def names(self) -> list[str]:
        return list(self.signature)


class Recorder:
    """Stands in for the launches of the mxkernels kernels: keeps one :class:`Variant` per compile key."""

    def __init__(self, target, specialize_all: bool = False):
        from triton.compiler import make_backend

        self.target = target
        self.backend = make_backend(target)
        self.specialize_all = specialize_all  # as before do_not_specialize: every integer specialized
        self.variants: dict[str, dict[str, Variant]] = defaultdict(dict)
        self.launches: list[tuple[str, str, tuple]] = []  # (kernel, compile key, grid) of every launch, in order

    def _run(self, name: str, kern):
        from triton.runtime.jit import compute_cache_key, create_function_from_signature

        params = [_specialized(p) for p in kern.params] if self.specialize_all else kern.params
        binder = create_function_from_signature(kern.signature, params, self.backend)

        def run(*args, grid, warmup, **kwargs):
            from triton import knobs

            # as JITFunction.run completes the options, so the key (and Triton's cache entry) is the same
            kwargs["debug"] = kwargs.get("debug", kern.debug) or knobs.runtime.debug
            bound, spec, opts = binder(*args, **kwargs)
            key = compute_cache_key({}, spec, opts)
            self.launches.append((name, key, tuple(grid)))
            if key not in self.variants[name]:
                options, signature, constexprs, attrs = kern._pack_args(self.backend, kwargs, bound, spec, opts)
                self.variants[name][key] = Variant(name, signature, constexprs, attrs, options.__dict__)

        return run

    def patches(self) -> list:
        return [mock.patch.object(k, "run", self._run(name, k)) for name, k in KERNELS.items()]

    def count(self) -> dict[str, int]:
        return {name: len(v) for name, v in self.variants.items()}

    def all(self) -> list[Variant]:
        return [v for per in self.variants.values() for v in per.values()]


def _specialized(p):
    q = object.__new__(type(p))
    q.__dict__.update(p.__dict__)
    q.do_not_specialize = False
    return q


def _stand_in(scheme: str, n: int, k: int, cache: dict) -> QuantizedLinear:
    """A block of this scheme and shape (random weights; one per scheme and shape, shared by the
    experts, since a recorded launch reads no weight)."""
    if (scheme, n, k) not in cache:
        sc = get_scheme(scheme)
        w = torch.randn(n, k) * 0.02
        cache[scheme, n, k] = QuantizedLinear(sc, n, k, w.bfloat16()) if sc.family == "none" else \
            quantize_linear(w, sc, "rtn")  # fmt: skip
    return cache[scheme, n, k]


def _unrotated_input(a: torch.Tensor, arena) -> tuple[torch.Tensor, int]:
    """moe._rotated_input's shapes without its arithmetic (recording reads no value)."""
    if arena.rotation_seed is None:
        return a, 0
    return a.new_empty(2 * a.shape[0], a.shape[1]), a.numel()


def record_variants(layers: Iterable[LayerKernels], tokens: Iterable[int], target, sms: int, model_codes: int = 0,
                    table=None, specialize_all: bool = False,
                    routers: Iterable[tuple[int, int, int]] = ()) -> Recorder:  # fmt: skip
    """The kernel variants that serving ``layers`` launches at these token counts on a GPU of
    ``sms`` multiprocessors (``table``: its tile table) for ``target``; ``routers``: the (hidden, experts, top-k)
    of the gates whose decode routing SGLang's engine fuses (engines/sglang_router.py), with and without
    renormalization and SGLang's count of unpadded tokens (what a model's config and SGLang's graphs pick)."""
    rec = Recorder(target, specialize_all)
    tokens = list(tokens)
    cache: dict = {}
    # One intra-op thread: a recording is thousands of small tensor ops, and `mxserve launch` records beside SGLang's
    # start, whose processes keep the cores busy, where torch's thread pool (a thread a core) waits on its slowest
    # thread at every op. On the H100 (16 cores) Qwen1.5's 24 layers took 33 and 69 s to record, 5.3 s on 2 idle cores
    # here; here with both cores kept busy, 18.0 s at 2 threads and 9.0 s at 1 (refmoe-25m: 5.2 and 0.7 s).
    threads = torch.get_num_threads()
    # the launch path as on that GPU: its multiprocessors, its tile table, and the Gluon kernel's
    # decode launches (recorded like the others, not run). A recorded launch reads no value, so the
    # stand-in inputs are zeros and their Hadamard-rotated copy is not computed: that arithmetic was
    # 95% of a real-size plan's recording (about 50 s per Qwen1.5 layer on 2 cores).
    patches = [*rec.patches(), mock.patch.object(moe, "_rotated_input", _unrotated_input),
               mock.patch("mxkernels.arena.kernel_order", lambda words, bits, k: words),  # codes read by no one,
               mock.patch("mxkernels.arena.tile_words", lambda words, bits, k: words),  # nor copied tile by tile
               mock.patch.object(moe, "multiprocessors", lambda dev: sms),
               mock.patch.object(moe, "tile_table", lambda dev: table),
               mock.patch.object(moe, "_runs_gluon", lambda dev: target.arch >= 80),
               mock.patch.object(pdl_launch, "capable", lambda dev: target.arch >= 90),  # launched as on the target
               mock.patch.object(moe, "_gluon_kernel", lambda: moe_gemm_gluon.mx_moe_gemm_gluon_kernel),
               mock.patch.object(moe, "_gluon_fma_kernel",
                                 lambda: moe_gemm_gluon_fma.mx_moe_gemm_gluon_fma_kernel)]  # fmt: skip
    for p in patches:
        p.start()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        for lay in dict.fromkeys(layers):  # equal layers launch equal variants
            h, i, e, k = lay.hidden, lay.inter, lay.n_routed, lay.top_k
            gu = build_arena([_stand_in(s, 2 * i, h, cache) for s in lay.gate_up], model_codes)
            dn = build_arena([_stand_in(s, h, i, cache) for s in lay.down], model_codes)
            for arena, names in ((gu, lay.gate_up), (dn, lay.down)):
                if lay.rotated and any(get_scheme(s).family != "none" for s in names):
                    arena.rotation_seed = 0  # as build_arena sets it from rotated blocks
            shared = len(lay.gate_up) > e
            # the routing counter's launch (router_stats on a GPU, writing its host mirror), on SGLang's int32 ids
            counter = ExpertCounter(e)
            count.count_routing(torch.zeros(tokens[0], k, dtype=torch.int32), counter.buf, counter.bounds, e,
                                host=counter.buf)  # fmt: skip
            # as SGLang's plugin hands the top-k sum the block's shared gate (Qwen2-MoE), or nothing (DeepSeek-V2)
            gate = torch.zeros(h, dtype=torch.bfloat16) if shared and lay.shared_gate else None
            for t in tokens:
                ids = torch.randint(0, e, (t, k), generator=gen)
                w = torch.rand(t, k, generator=gen)
                moe.mx_moe_forward(torch.zeros(t, h, dtype=torch.bfloat16), ids, w, gu, dn, e, None, gate)
        for h, e, k in dict.fromkeys(routers):  # one variant whatever the tokens (the grid's only)
            gate = torch.zeros(e, h, dtype=torch.bfloat16)
            for renormalize, valid in _router_kinds():
                fused_router.fused_router(torch.zeros(1, h, dtype=torch.bfloat16), gate, k, renormalize, valid)
    finally:
        for p in patches:
            p.stop()
        torch.set_num_threads(threads)
    return rec


def _router_kinds() -> list[tuple[bool, torch.Tensor | None]]:
    """The fused router's launches by what a model's config and SGLang's graphs pick: renormalized or not, with
    SGLang's count of unpadded tokens (its graph buffers are int32) or without."""
    return [(renormalize, valid) for renormalize in (False, True) for valid in (None, torch.ones(1, dtype=torch.int32))]


def _compile(v: Variant, target) -> tuple[float, bytes]:
    import triton
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource

    t0 = time.perf_counter()
    # as each kernel's own launch builds it
    source = GluonASTSource if v.kernel in ("gemm_gluon", "gemm_gluon_fma") else ASTSource
    c = triton.compile(source(KERNELS[v.kernel], v.signature, v.constexprs, v.attrs), target=target,
                       options=v.options)  # fmt: skip
    return time.perf_counter() - t0, c.asm["cubin"]


def in_background() -> None:
    """Lower this process's CPU priority to the least: a compile worker. SGLang may be serving already while the
    launcher compiles (its capture found what it needed), and a worker per core then shares the CPU with its
    scheduler and tokenizer: in the thirty-ninth session's run such a server admitted new requests in 82 prefill
    batches where the others took 28 to 30 (benchmarks/README.md)."""
    os.nice(19 - os.nice(0))


def compile_workers(n: int, workers: int | None = None) -> int:
    """How many processes compile ``n`` variants: ``workers``, else one per core, at most one per variant."""
    return max(1, min(workers or os.cpu_count() or 1, n))


def compile_variants(variants: list[Variant], target, workers: int | None = None) -> list[tuple[float, bytes]]:
    """Compile ``variants`` (into Triton's cache), ``workers`` at a time (processes of the lowest priority,
    ``in_background``); (seconds, cubin) each."""
    workers = compile_workers(len(variants), workers)
    if workers == 1:
        return [_compile(v, target) for v in variants]
    # spawned workers: a forked copy of a process that touched CUDA must not use it
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=in_background) as pool:
        return list(pool.map(_compile, variants, [target] * len(variants)))


def plan_layers(plan, views, tp: int = 1, ep: int = 1) -> list[LayerKernels]:
    """What each rank launches for each layer of ``plan`` (``views``: the model's MoE layers): with
    ``ep`` its routed experts (and on rank 0 the shared ones), with ``tp`` a slice of each."""
    from mxserve.parallel.ranks import ep_range

    out = []
    for view in views:
        lp = plan.layer(view.index)
        for rank in range(ep):
            mine = ep_range(view.n_routed, ep, rank)
            experts = lp.experts[mine.start : mine.stop] + (lp.experts[view.n_routed :] if rank == 0 else [])
            gate_up = tuple(x.gate for x in experts)
            down = tuple(x.down for x in experts)
            gated = rank == 0 and bool(getattr(getattr(view, "spec", None), "shared_gate", None))
            out.append(LayerKernels(view.hidden, view.intermediate // tp, len(mine), view.top_k, gate_up, down,
                                    plan.method == "gptq-had", gated))  # fmt: skip
    return out


def precompile(plan, views, skip_bf16_layers: bool, codes: int, tp: int = 1, ep: int = 1, log=print) -> int:
    """Compile, for this machine's GPU, every kernel variant that serving ``plan`` launches (the
    kernel built for ``codes``, MixedExperts' model codes); returns how many. ``skip_bf16_layers``:
    wholly-bf16 layers run SGLang's own MoE."""
    import triton
    from triton.backends.compiler import GPUTarget

    from mxkernels.tile_table import tile_table

    dev = torch.device("cuda", torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability(dev)
    target = GPUTarget("cuda", major * 10 + minor, 32)
    layers = [lay for lay in plan_layers(plan, views, tp, ep)
              if not (skip_bf16_layers and all(get_scheme(s).family == "none" for s in lay.gate_up + lay.down))]
    if not layers:
        return 0
    t0 = time.perf_counter()
    # the routers SGLang's engine fuses by default (the gate is whole on every rank: all the layer's experts)
    routers = {(v.hidden, v.n_routed, v.top_k) for v in views} if fused_router.enabled() else set()
    rec = record_variants(layers, DECODE_BATCHES + PREFILL_TOKENS, target, moe.multiprocessors(dev), codes,
                          tile_table(dev), routers=sorted(routers))  # fmt: skip
    variants = rec.all()
    what = f"{len(variants)} kernel variants"
    recorded = time.perf_counter() - t0
    seconds = compile_once(variants, target)
    if seconds is not None:
        # where the time went: on the H100 a 24-layer Qwen1.5 plan's 44 variants took 62.9 s in 16 processes beside
        # SGLang's start, where one core of the development machine compiles them one after another in 46 s (Triton
        # 3.9 there, 3.6 on the H100; thirty-ninth session)
        log(f"compiled {what} in {time.perf_counter() - t0:.1f} s (Triton {triton.__version__}, sm_{target.arch}): "
            f"recorded in {recorded:.1f} s, then {sum(seconds):.1f} s of compiling in "
            f"{compile_workers(len(variants))} processes, the longest {max(seconds, default=0):.1f} s")
    else:
        log(f"{what} compiled by an earlier launch, in Triton's cache ({time.perf_counter() - t0:.1f} s)")
    return len(variants)


def stamp_path(variants: list[Variant], target) -> str:
    """Where a finished compile of exactly ``variants`` for ``target`` is noted: keyed by Triton's
    version, each kernel's source (its cache key: the code and what it calls) and every variant."""
    import triton
    from triton import knobs

    h = hashlib.sha256(f"{triton.__version__} {target}".encode())
    for name in sorted({v.kernel for v in variants}):
        h.update(f"{name} {KERNELS[name].cache_key}".encode())
    for v in variants:
        h.update(repr((v.kernel, v.signature, v.constexprs, v.attrs, sorted(v.options.items()))).encode())
    return os.path.join(knobs.cache.dir, STAMPS, h.hexdigest())


def compile_once(variants: list[Variant], target, workers: int | None = None) -> list[float] | None:
    """Compile ``variants`` unless a launch before compiled this very set into the same Triton cache: each
    one's compile seconds, or None where none was compiled. A warm launch so spawns no compilers: each imports
    torch and Triton (16 of them cost a warm `mxserve launch` about 16 s beside SGLang's start;
    benchmarks/README.md)."""
    stamp = stamp_path(variants, target)
    if os.path.isfile(stamp):
        return None
    done = compile_variants(variants, target, workers)
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    with open(stamp, "w") as f:
        f.write(f"{len(variants)} variants\n")
    return [t for t, _ in done or []]
