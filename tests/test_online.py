"""The online loop: precision ladder, plan validation, swaps and their failures, the controller, the admin API."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from conftest import DATA, REFMOE, start_server
from mxserve.schemes import CANONICAL, get_scheme

BUDGET = 4.0


@pytest.fixture(scope="module")
def tiny_online(tiny_models, calib_text, tmp_path_factory):
    """A tiny Qwen2-MoE served in-process with re-planning: (TestClient, app, plan path, ladder)."""
    from fastapi.testclient import TestClient

    from mxserve.calibrate import calibrate
    from mxserve.checkpoint import load_quantized, quantize_to_dir
    from mxserve.costmodel import RooflineCostModel
    from mxserve.engines.embedded import EmbeddedEngine
    from mxserve.models.loading import load_tokenizer
    from mxserve.online.controller import ReplanSettings
    from mxserve.online.ladder import build_ladder
    from mxserve.online.setup import OnlineSetup
    from mxserve.planner import solve_plan
    from mxserve.schemes import parse_schemes
    from mxserve.server.api import create_app

    root = tmp_path_factory.mktemp("online")
    model_path = str(tiny_models["qwen2_moe"])
    prof = calibrate(model_path, [str(calib_text)], parse_schemes(None), "rtn", nsamples=4, progress=False)
    plan = solve_plan(prof, BUDGET).plan
    quantize_to_dir(model_path, plan, str(root / "ckpt"), nsamples=4, progress=False)
    tok = load_tokenizer(model_path)
    build_ladder(model_path, str(root / "ladder"), prof.schemes, "rtn", prof.data, tok, 4,
                 progress=False)
    model, served = load_quantized(str(root / "ckpt"))
    engine = EmbeddedEngine(model, tok, 256)
    online = OnlineSetup(prof, BUDGET, 1.0, RooflineCostModel(), str(root / "ladder"),
                         ReplanSettings(interval=0, margin=0.0, min_interval=0))
    app = create_app(engine, "tiny", plan=served, online=online)
    with TestClient(app) as client:
        yield client, app, root
    engine.shutdown()


def served_schemes(app) -> list:
    """(layer, expert, gate_up scheme, down scheme) of what the runtime layers actually hold."""
    layers = app.state.controller.swapper.layers()
    return [(m.layer_index, e, qe.gate_up.scheme.name, qe.down.scheme.name)
            for m in layers for e, qe in enumerate(m.experts_q)]


def plan_schemes(plan: dict) -> list:
    return [(lay["layer"], ep["expert"], ep["gate"], ep["down"]) for lay in plan["layers"] for ep in lay["experts"]]


def metric(client, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def mixed_plan(current: dict, shift: int) -> dict:
    """The served plan with every layer's schemes rotated: a valid plan that changes every layer."""
    plan = json.loads(json.dumps(current))
    low = ["w1a16g128", "w2a16g128", "w3a16g128", "w4a16g128"]
    for lay in plan["layers"]:
        for ep in lay["experts"]:
            s = low[(ep["expert"] + shift) % len(low)]
            ep["gate"] = ep["up"] = ep["down"] = s
    return plan


def test_ladder_blocks_are_the_offline_quantizer_s(tiny_models, calib_text, tmp_path):
    """A block read from the ladder is the tensor `mxserve quantize` writes (GPTQ with rotation)."""
    from mxserve.checkpoint import layout, quantize_layers
    from mxserve.models.adapters import moe_layers
    from mxserve.models.loading import load_model, load_tokenizer
    from mxserve.online.ladder import Ladder, build_ladder
    from mxserve.plan import Plan

    model = load_model(str(tiny_models["qwen2_moe"]))
    tok = load_tokenizer(str(tiny_models["qwen2_moe"]))
    views = moe_layers(model)
    plan = Plan.uniform("m", "qwen2_moe", layout(views), get_scheme("w4a16g128"), "gptq-had", data=[str(calib_text)])
    names = list(CANONICAL)
    for lay in plan.layers:
        for i, e in enumerate(lay.experts):
            e.gate = e.up = names[i % len(names)]
            e.down = names[(i + 3) % len(names)]
    offline = quantize_layers(model, plan, tokenizer=tok, nsamples=4, progress=False)
    build_ladder(str(tiny_models["qwen2_moe"]), str(tmp_path / "ladder"), names, "gptq-had", [str(calib_text)], tok, 4,
                 progress=False)  # layer by layer, against the whole-model quantizer
    ladder = Ladder(str(tmp_path / "ladder"))
    for lay, experts in zip(plan.layers, offline):
        for got, want in zip(ladder.experts(lay, views[0].hidden), experts):
            for a, b in ((got.gate_up, want.gate_up), (got.down, want.down)):
                assert a.scheme == b.scheme and a.hadamard_seed == b.hadamard_seed
                assert all(torch.equal(a.tensors()[k], v) for k, v in b.tensors().items())


def test_bad_uploads_are_4xx_and_change_nothing(tiny_online):
    client, app, _ = tiny_online
    before = client.get("/mxserve/plan").json()
    r = client.post("/mxserve/plan", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = client.post("/mxserve/plan", json={"layers": "corrupt"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_plan"
    over = json.loads(json.dumps(before))
    for ep in over["layers"][0]["experts"]:
        ep["gate"] = ep["up"] = ep["down"] = "bf16"
    r = client.post("/mxserve/plan", json=over)
    assert r.status_code == 422 and "over the budget" in r.json()["error"]["message"]
    wrong = json.loads(json.dumps(before))
    wrong["layers"] = wrong["layers"][:1]
    assert client.post("/mxserve/plan", json=wrong).status_code == 422
    alien = json.loads(json.dumps(before))
    alien["layers"][0]["experts"][0]["down"] = "w4a16g32"  # valid scheme, not a served candidate
    assert client.post("/mxserve/plan", json=alien).status_code == 422
    assert client.get("/mxserve/plan").json() == before
    assert served_schemes(app) == plan_schemes(before)
    assert metric(client, "mxserve_replans_total", outcome="rejected") >= 3


def test_uploaded_plan_swaps_every_layer_and_reports_it(tiny_online):
    client, app, _ = tiny_online
    before = client.get("/mxserve/plan").json()
    changes = metric(client, "mxserve_plan_changes_total")
    new = mixed_plan(before, 1)
    r = client.post("/mxserve/plan", json=new)
    assert r.status_code == 200 and r.json()["outcome"] == "applied", r.json()
    now = client.get("/mxserve/plan").json()
    assert plan_schemes(now) == plan_schemes(new) == served_schemes(app)
    assert metric(client, "mxserve_plan_changes_total") == changes + 1
    assert metric(client, "mxserve_plan_avg_bits") <= BUDGET
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "To be", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_swap_failure_half_way_keeps_a_consistent_plan(tiny_online, caplog):
    client, app, _ = tiny_online
    ctl = app.state.controller
    before = client.get("/mxserve/plan").json()
    layers = sorted(m.layer_index for m in ctl.swapper.layers())

    def fail(layer: int) -> None:
        if layer == layers[-1]:  # after the first layers were switched
            raise OSError("injected: ladder read failed")

    ctl.swapper.fault = fail
    try:
        with caplog.at_level(logging.WARNING, logger="mxserve.online"):
            r = client.post("/mxserve/plan", json=mixed_plan(before, 2))
    finally:
        ctl.swapper.fault = None
    assert r.status_code == 200 and r.json()["outcome"] == "swap_failed"
    assert "injected" in r.json()["message"] and "injected" in caplog.text
    assert served_schemes(app) == plan_schemes(before) == plan_schemes(client.get("/mxserve/plan").json())
    assert metric(client, "mxserve_replans_total", outcome="swap_failed") == 1
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hark", "max_tokens": 3})
    assert r.status_code == 200


def test_solver_failure_keeps_the_plan_and_is_counted(tiny_online, caplog):
    client, app, _ = tiny_online
    ctl = app.state.controller
    client.post("/v1/completions", json={"model": "tiny", "prompt": "def f(x): return x", "max_tokens": 3})
    before = client.get("/mxserve/plan").json()

    def broken(*_a, **_k):
        raise RuntimeError("injected: the solver timed out")

    ctl.solve = broken
    try:
        with caplog.at_level(logging.WARNING, logger="mxserve.online"):
            r = client.post("/mxserve/replan", json={"force": True})
    finally:
        from mxserve.planner import solve_plan

        ctl.solve = solve_plan
    assert r.status_code == 200 and r.json()["outcome"] == "failed" and "injected" in caplog.text
    assert client.get("/mxserve/plan").json() == before
    assert metric(client, "mxserve_replans_total", outcome="failed") == 1


def test_replan_without_a_controller_is_409():
    from fastapi.testclient import TestClient

    from conftest import stub_engine
    from mxserve.server.api import create_app

    engine = stub_engine()
    try:
        client = TestClient(create_app(engine, "m"))
        assert client.post("/mxserve/replan").status_code == 409
        assert client.post("/mxserve/plan", json={}).status_code == 409
    finally:
        engine.shutdown()


def test_openapi_documents_every_status(tiny_online):
    client, _, _ = tiny_online
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/mxserve/plan"]["post"]["responses"]) >= {"200", "400", "401", "409", "422"}
    assert set(paths["/v1/completions"]["post"]["responses"]) >= {"200", "400", "401", "404"}
    assert set(paths["/mxserve/replan"]["post"]["responses"]) >= {"200", "400", "401", "409"}


# -- the served refmoe-25m under load ---------------------------------------------------------------


def _prompts(name: str, n: int, chars: int = 250) -> list[str]:
    text = (DATA / name).read_text()
    step = len(text) // (n + 1)
    return [text[i * step : i * step + chars] for i in range(n)]


def _stream(base: str, prompt: str) -> tuple[int, str, bool]:
    body = {"model": "refmoe-25m", "prompt": prompt, "max_tokens": 48, "temperature": 0.8, "seed": 1,
            "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    ok = bool(lines) and lines[-1] == "data: [DONE]"
    text = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1]) if ok else ""
    return r.status_code, text, ok


def _greedy(base: str, prompt: str) -> str:
    r = httpx.post(base + "/v1/completions", timeout=300,
                   json={"model": "refmoe-25m", "prompt": prompt, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_replans_under_streaming_load_lose_nothing(served_refmoe, mxserve_cache, tmp_path):
    """>= 8 concurrent streams while >= 3 forced re-plans each change the plan (refmoe-25m, embedded)."""
    log = tmp_path / "replan-server.log"
    args = ["--model", str(REFMOE), "--budget", "4bit", "--method", "rtn", "--calib-samples", "8",
            "--replan-interval", "0", "--replan-min-interval", "0", "--replan-margin", "0",
            "--stats-interval", "0.2", "--stats-window", "3", "--stats-halflife", "1"]
    proc, base = start_server(args, mxserve_cache, log)
    try:
        probe = _prompts("python-dev.txt", 1, 200)[0]
        before = _greedy(base, probe)  # wholly before any swap: the launch plan, as served_refmoe serves it
        assert before == _greedy(served_refmoe, probe)
        domains = [_prompts("shakespeare-dev.txt", 6), _prompts("python-dev.txt", 6)]
        streams = [p for pair in zip(*domains) for p in pair]
        stop, results = threading.Event(), []

        def worker(i: int) -> None:  # one of 8 clients, each streaming one completion after another
            while not stop.is_set():
                t0 = time.monotonic()
                code, text, ok = _stream(base, streams[(i + len(results)) % len(streams)])
                results.append((code, text, ok, t0, time.monotonic()))

        plans, outcomes, swapped_at = [httpx.get(base + "/mxserve/plan").json()], [], []
        with ThreadPoolExecutor(8) as pool:
            workers = [pool.submit(worker, i) for i in range(8)]
            time.sleep(1.0)
            for attempt in range(8):
                if sum(o["outcome"] == "applied" for o in outcomes) >= 3:
                    break
                for p in domains[attempt % 2][:3]:  # shift the routing towards one domain
                    _greedy(base, p)
                time.sleep(0.5)
                t_swap = time.monotonic()
                out = httpx.post(base + "/mxserve/replan", json={"force": True}, timeout=300).json()
                outcomes.append(out)
                plan = httpx.get(base + "/mxserve/plan").json()
                # the plan reported is what the blocks hold, and within the budget
                m = httpx.get(base + "/mxserve/stats").json()["precision"]
                held = sorted((b[0], b[1], b[2], b[3]) for b in m["blocks"])
                want = sorted((lay["layer"], ep["expert"], blk, ep["gate"] if blk == "gate_up" else ep["down"])
                              for lay in plan["layers"] for ep in lay["experts"] for blk in ("gate_up", "down"))
                assert held == want
                assert m["avg_bits"] <= 4.0 + 1e-9
                if out["outcome"] == "applied":
                    assert plan_schemes(plan) != plan_schemes(plans[-1])
                    plans.append(plan)
                    swapped_at.append(t_swap)
            stop.set()
            for w in workers:
                w.result()
        assert sum(o["outcome"] == "applied" for o in outcomes) >= 3, outcomes
        assert not [o for o in outcomes if o["outcome"] in ("failed", "swap_failed")], outcomes
        assert len(results) >= 8 and all(code == 200 and ok and text for code, text, ok, _, _ in results), results
        for t in swapped_at:  # every swap happened while streams were running
            assert sum(t0 < t < t1 for *_, t0, t1 in results) >= 4
        after = _greedy(base, probe)  # wholly after the last swap
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # the same request on a server started with the final plan
    final = tmp_path / "final-plan.json"
    final.write_text(json.dumps(plans[-1]))
    proc2, base2 = start_server(["--model", str(REFMOE), "--plan", str(final)], mxserve_cache, tmp_path / "p.log")
    try:
        assert _greedy(base2, probe) == after
    finally:
        proc2.terminate()
        proc2.wait(timeout=30)


# -- fuzzing the served API from its own OpenAPI schema ----------------------------------------------


def test_fuzz_the_served_api_from_its_schema(tiny_models, calib_text, mxserve_cache, tmp_path):
    """schemathesis against a real server with re-planning on, admin routes included: no server error, no
    undocumented status, and the server alive after."""
    import shutil
    import subprocess
    import sys

    cli = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if not Path(cli).exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    args = ["--model", str(tiny_models["qwen2_moe"]), "--budget", "4bit", "--method", "rtn", "--calib-samples", "4",
            "--calib-data", str(calib_text), "--replan-interval", "0", "--replan-min-interval", "0",
            "--max-model-len", "96", "--default-max-tokens", "8", "--served-model-name", "tiny"]
    proc, base = start_server(args, mxserve_cache, tmp_path / "fuzz-server.log")
    try:
        checks = "not_a_server_error,status_code_conformance"
        cmd = [cli, "run", base + "/openapi.json", "--checks", checks, "--max-examples", "60", "--seed", "1",
               "--continue-on-failure", "--request-timeout", "60"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        out = r.stdout + r.stderr
        print(out[-1500:])  # the run summary, in the test log
        assert r.returncode == 0, out[-6000:]
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        # the fuzzer reached generation: the served name was sent, and completions came back
        stats = httpx.get(base + "/metrics", timeout=10).text
        done = [ln for ln in stats.splitlines() if ln.startswith("mxserve_requests_total{")
                and 'endpoint="/v1/completions"' in ln and 'status="200"' in ln]
        assert done and float(done[0].split()[-1]) > 0, out[-3000:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- the SGLang engine's controller adapters, against the same series from a real server ------------


def test_sglang_stats_reads_router_stats_series(served_refmoe):
    """SGLangStats reads the series SGLang's /metrics carries; the embedded server exports the same ones."""
    from mxserve.engines.sglang_admin import SGLangStats
    from mxserve.profile import CalibrationProfile, ExpertStats, LayerStats

    httpx.post(served_refmoe + "/v1/completions", timeout=120,
               json={"model": "refmoe-25m", "prompt": "Enter the ghost.", "max_tokens": 4})
    time.sleep(0.5)
    routed = [ExpertStats(e, False, {}, 0.1, 0, 0, {}) for e in range(16)]
    prof = CalibrationProfile("m", "qwen2_moe", "rtn", [], 0, 0, [], 0,
                              [LayerStats(li, 16, 2, 1.0, routed) for li in range(6)])
    st = SGLangStats(served_refmoe, None, prof, 4.0, "rtn")
    fold = st.fold()
    served = httpx.get(served_refmoe + "/mxserve/stats", timeout=30).json()
    assert st.precision().plan_id == served["precision"]["plan_id"]
    for got in fold.layers:
        assert sum(got.ewma_freq) == pytest.approx(2.0, abs=1e-6)  # top-2: frequencies sum to k
        assert got.tokens > 0 and sum(got.cumulative) == 2 * got.tokens


def test_sglang_swapper_validates_plans_from_the_ladder(tiny_online):
    from mxserve.engines.sglang_admin import SGLangSwapper
    from mxserve.online.ladder import Ladder
    from mxserve.online.swap import PlanRejected, validate_plan
    from mxserve.plan import Plan

    client, app, root = tiny_online
    plan = Plan.from_json(client.get("/mxserve/plan").json())
    swapper = SGLangSwapper("http://127.0.0.1:9", None, Ladder(str(root / "ladder")), 128)
    stand_ins = swapper.layers()
    served = app.state.controller.swapper.layers()
    assert [(m.layer_index, [(q.gate_up.n, q.gate_up.k, q.down.n, q.down.k, q.shared) for q in m.experts_q])
            for m in stand_ins] == [(m.layer_index, [(q.gate_up.n, q.gate_up.k, q.down.n, q.down.k, q.shared)
                                                     for q in m.experts_q]) for m in served]
    validate_plan(plan, stand_ins, swapper.ladder, BUDGET)
    over = json.loads(json.dumps(plan.to_json()))
    for ep in over["layers"][0]["experts"]:
        ep["gate"] = ep["up"] = ep["down"] = "bf16"
    with pytest.raises(PlanRejected):
        validate_plan(Plan.from_json(over), stand_ins, swapper.ladder, BUDGET)


def _swap_rank(rank: int, store: str, root: str, corrupt_on: int) -> None:
    """One of two expert-parallel ranks of an SGLang server, set up as the plugin sets it up,
    receiving a plan (rank ``corrupt_on`` gets a truncated copy)."""
    import contextlib
    import os

    from gloo_ranks import gloo_rank

    from mxserve.checkpoint import load_quantized, runtime_layers
    from mxserve.engines import sglang_launch, sglang_swap
    from mxserve.parallel.sharding import rank_experts
    from mxserve.parallel.stats import WholeLayer
    from mxserve.plan import Plan
    from mxserve.runtime.moe_layer import MixedExperts

    with gloo_rank(store, rank, 2):
        os.environ[sglang_launch.LADDER_ENV] = os.path.join(root, "ladder")
        sglang_swap._DeviceFence = contextlib.nullcontext  # CPU: nothing queued on a device
        sglang_swap._rank_group = lambda ranks: None  # the default group: these two processes
        model, plan = load_quantized(os.path.join(root, "ckpt"))
        served = {}
        for m in runtime_layers(model):
            n = m.mx.n_routed
            local, n_local = rank_experts(m.experts_q, n, m.layer_index, rank, 2)
            served[m.layer_index] = MixedExperts(m.layer_index, n_local, local)
            sglang_swap.register_layer(served[m.layer_index], plan, WholeLayer(m.layer_index, n, m.experts_q),
                                       (rank, 2, 0, 1))  # fmt: skip
        # a new plan at the same bits: two routed experts of the first layer trade schemes
        new = Plan.from_json(json.loads(json.dumps(plan.to_json())))
        experts = new.layers[0].experts
        b = next(i for i, e in enumerate(experts) if not e.shared and e.gate != experts[0].gate)
        for f in ("gate", "up", "down"):
            va, vb = getattr(experts[0], f), getattr(experts[b], f)
            setattr(experts[0], f, vb)
            setattr(experts[b], f, va)
        payload = json.dumps(new.to_json()).encode()
        if rank == corrupt_on:
            payload = payload[:-5]
        sglang_swap.apply_plan(None, [(sglang_swap.PLAN_TENSOR, torch.tensor(list(payload), dtype=torch.uint8))])
        want = plan if corrupt_on >= 0 else new  # all ranks or none
        assert sglang_swap._served["plan"].to_json() == want.to_json()
        lay = want.layers[0]
        per = sum(not e.shared for e in lay.experts) // 2
        mine = served[lay.layer].experts_q[:per]
        assert [q.gate_up.scheme.name for q in mine] == [e.gate for e in lay.experts[rank * per : (rank + 1) * per]]
        view = sglang_swap._served["whole"][lay.layer]
        assert [q.down.scheme.name for q in view.experts_q] == [e.down for e in lay.experts]


@pytest.mark.parametrize("corrupt_on", [-1, 1])
def test_sglang_plan_swap_on_two_expert_parallel_ranks(tiny_online, tmp_path, corrupt_on):
    """apply_plan as each rank of an --ep 2 SGLang server runs it (two gloo processes, CPU): every
    rank swaps its own experts, or, when one rank cannot read the plan, none does."""
    import torch.multiprocessing as mp

    _, _, root = tiny_online
    mp.spawn(_swap_rank, args=(str(tmp_path / "store"), str(root), corrupt_on), nprocs=2, join=True)


def test_replans_keep_the_launchs_cap_on_costly_codes(tiny_online):
    # `launch --keep-stream-k`: the controller's re-plans solve under the same cap, and the plan it swaps in says so
    from mxserve.planner import KEEP_STREAM_K, solve_plan

    client, app, _ = tiny_online
    ctl = app.state.controller
    client.post("/v1/completions", json={"model": "tiny", "prompt": "def f(x): return x", "max_tokens": 3})
    caps = []

    def solve(*a, **k):
        caps.append(k.get("costly_cap"))
        return solve_plan(*a, **k)

    ctl.solve, ctl.settings.costly_cap = solve, KEEP_STREAM_K
    try:
        r = client.post("/mxserve/replan", json={"force": True})
    finally:
        ctl.solve, ctl.settings.costly_cap = solve_plan, None
    assert caps == [KEEP_STREAM_K] and r.status_code == 200 and r.json()["outcome"] == "applied", r.json()
    assert client.get("/mxserve/plan").json()["summary"]["costly_cap"] == KEEP_STREAM_K
