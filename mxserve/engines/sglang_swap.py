"""Plan swaps inside SGLang, through SGLang's own weight-update endpoints (nothing patched).

The channel: the caller pauses generation in place (``/pause_generation``,
mode ``in_place``: running requests stay in the scheduler with their KV cache,
new ones wait), sends the plan as a one-tensor "weight update" to
``/update_weights_from_tensor`` with ``load_format`` naming :func:`apply_plan`
(registered with ``--custom-weight-loader`` by ``mxserve launch``), then
continues generation. :func:`apply_plan` runs in the scheduler process,
between forward passes: it reads the new blocks from the precision ladder
(``MXSERVE_LADDER``), stages them on the host, and copies each layer in place
into its fixed-capacity slab (mxkernels.arena.build_slab), so the CUDA graphs
SGLang captured stay valid. Each layer's copy is fenced by device syncs.

SGLang would take an exception there for a crash, so :func:`apply_plan`
never raises: a failure puts back the layers already switched, is logged and
counted (``mxserve_replans_total{outcome="swap_failed"}``), and the caller
learns the outcome from ``mxserve_plan_info`` (the plan id of what is served).

Over several GPUs (``--tp``/``--ep``) SGLang hands each TP rank its own entry of
the request, so the caller sends one copy of the plan per rank, as a CPU tensor
shared by file name (no CUDA context on every GPU for a few bytes). Every rank
then swaps its own part of each layer (parallel/sharding.rank_experts), and the
ranks agree over SGLang's CPU process group that all of them or none switched
(parallel/collective.swap_on_every_rank). The plan is checked against the whole
layers (parallel/stats.WholeLayer), whose blocks the exporting rank reports.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time

import torch

from mxserve.engines.sglang_launch import LADDER_ENV, LOADER
from mxserve.online.ladder import Ladder
from mxserve.online.swap import PlanSwapper, plan_id, validate_plan
from mxserve.plan import Plan

log = logging.getLogger("mxserve.online")
PLAN_TENSOR = "mxserve.plan"

_served: dict = {}  # this scheduler's layers, plan and budget (set by the plugin)


def register_layer(mx, plan: Plan, whole=None, ranks: tuple[int, int, int, int] | None = None) -> None:
    """Called by the plugin for each MoE layer it builds (in the scheduler process). Over several
    GPUs, ``whole`` is the whole layer's WholeLayer and ``ranks`` (ep_rank, ep_size, tp_rank, tp_size)."""
    _served.setdefault("layers", {})[mx.layer_index] = mx
    _served["plan"] = plan
    if ranks is not None:
        _served.setdefault("whole", {})[mx.layer_index] = whole
        _served["ranks"] = ranks


def ladder() -> Ladder | None:
    path = os.environ.get(LADDER_ENV)
    if not path:
        return None
    if _served.get("ladder") is None:
        _served["ladder"] = Ladder(path)
    return _served["ladder"]


class _DeviceFence:
    """Holds a layer's swap between forward passes: every queued kernel finishes before and after."""

    def __enter__(self):
        torch.cuda.synchronize()

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        return False


def apply_plan(model, named_tensors) -> None:
    """SGLang custom weight loader: apply the plan carried by the ``mxserve.plan`` tensor (see module doc)."""
    from mxserve.parallel.collective import swap_on_every_rank
    from router_stats.service import process_metrics

    metrics = process_metrics()
    layers = list(_served["layers"].values())
    whole, ranks = _served.get("whole", {}), _served.get("ranks")
    current = _served["plan"]
    lad = ladder()

    def read() -> Plan:
        data = dict(named_tensors)[PLAN_TENSOR]
        plan = Plan.from_json(json.loads(bytes(data.cpu().to(torch.uint8).tolist()).decode()))
        if lad is None:
            raise RuntimeError(f"re-planning is off in this server ({LADDER_ENV} unset)")
        validate_plan(plan, list(whole.values()) if ranks else layers, lad, current.budget_bits, plan.granularity)
        return plan

    try:
        hidden = {m.layer_index: m.experts_q[0].gate_up.k for m in layers}
        swapper = PlanSwapper(lambda: layers, lad, _DeviceFence(), hidden, _local(whole, ranks))
        plan, report = swap_on_every_rank(read, lambda p: swapper.apply(current, p),
                                          lambda p: swapper.apply(p, current), _rank_group(ranks))  # fmt: skip
    except Exception as e:  # noqa: BLE001 - an exception here would take SGLang's scheduler down
        log.error("mxserve: plan swap failed, the previous plan keeps serving: %s", e)
        if metrics is not None:
            metrics.replans.labels("swap_failed").inc()
        return
    _served["plan"] = plan
    for index, view in whole.items():
        view.set_plan(plan.layer(index))
    if metrics is not None:
        metrics.plan_changes.inc()
        metrics.replans.labels("applied").inc()
        metrics.swap_seconds.observe(report.seconds)
        for held in report.layer_hold_seconds:
            metrics.swap_layer_seconds.observe(held)
    log.warning("mxserve: plan %s applied in %.3f s (%d layers, longest hold %.1f ms)", plan_id(plan),
                report.seconds, report.layers_changed, 1e3 * max(report.layer_hold_seconds, default=0.0))


def _local(whole: dict, ranks: tuple | None):
    """What this rank keeps of a layer's experts read from the ladder (None: all, on one GPU)."""
    if ranks is None:
        return None
    from mxserve.parallel.sharding import rank_experts

    return lambda index, experts: rank_experts(experts, whole[index].n_routed, index, *ranks)[0]


def _rank_group(ranks: tuple | None):
    """SGLang's CPU (gloo) group of the tensor-parallel ranks, which hold the MoE layers' parts.
    Every TP rank runs the weight-update handler for the same request (SGLang 0.5.15 indexes
    ``serialized_named_tensors[tp_rank]`` and barriers on this group after it), so a collective
    here meets all ranks."""
    if ranks is None:
        return None
    from sglang.srt.distributed.parallel_state import get_tp_group

    return get_tp_group().cpu_group


# -- the caller's side ---------------------------------------------------------------------------------


def swap_plan(base_url: str, plan: Plan, api_key: str | None = None, timeout: float = 300.0) -> dict:
    """Apply ``plan`` to a running `mxserve launch --engine sglang` server; returns what happened.

    Outcome "applied" when the server's /metrics then report the plan's id, else "swap_failed".
    """
    import httpx
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = list(json.dumps(plan.to_json()).encode())
    with httpx.Client(base_url=base_url, headers=headers, timeout=timeout) as c:
        info = c.get("/server_info")
        tp = int(info.json().get("tp_size", 1)) if info.status_code == 200 else 1
    if tp == 1:
        # a CUDA tensor travels by CUDA IPC, the path SGLang's own weight updates take
        monkey_patch_torch_reductions()
        payload = torch.tensor(data, dtype=torch.uint8, device="cuda")
    else:
        # one entry per TP rank; a CPU tensor shared by file name reaches a rank on any GPU
        torch.multiprocessing.set_sharing_strategy("file_system")
        payload = torch.tensor(data, dtype=torch.uint8)
    blob = base64.b64encode(MultiprocessingSerializer.serialize([(PLAN_TENSOR, payload)])).decode()
    body = {"serialized_named_tensors": [blob] * tp, "load_format": LOADER, "flush_cache": False}
    t0 = time.perf_counter()
    with httpx.Client(base_url=base_url, headers=headers, timeout=timeout) as c:
        c.post("/pause_generation", json={"mode": "in_place"}).raise_for_status()
        try:
            r = c.post("/update_weights_from_tensor", json=body)
        finally:
            c.post("/continue_generation", json={"torch_empty_cache": False}).raise_for_status()
        paused = time.perf_counter() - t0
        want = plan_id(plan)
        served = None
        for _ in range(50):  # the precision series follow at the next router_stats fold
            served = _served_plan_id(c.get("/metrics").text)
            if served == want:
                break
            time.sleep(0.2)
    return {"outcome": "applied" if served == want else "swap_failed", "plan_id": served, "wanted": want,
            "paused_seconds": paused, "update_status": r.status_code}


def _served_plan_id(metrics_text: str) -> str | None:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(metrics_text):
        for s in fam.samples:
            if s.name == "mxserve_plan_info" and s.value == 1:
                return s.labels["plan_id"]
    return None
