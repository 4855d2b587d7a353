"""The integer program on synthetic profiles whose optimum is known."""

from pathlib import Path

import pytest

from mxserve.costmodel import KernelProfile, MeasuredCostModel, ProfileEntry, RooflineCostModel
from mxserve.errors import MxServeError
from mxserve.planner import solve_plan
from mxserve.profile import CalibrationProfile, ExpertStats, LayerStats
from mxserve.schemes import get_scheme

SCHEMES = ["bf16", "w8a16", "w4a16g128", "w3a16g128", "w2a16g128"]


def synthetic_profile(freqs=(0.9, 0.5, 0.3, 0.2, 0.1), layers=2, h=256, i=128) -> CalibrationProfile:
    """Error halves per extra bit; frequent experts matter more (loss = freq * err)."""
    base = {"bf16": 0.0, "w8a16": 0.001, "w4a16g128": 0.02, "w3a16g128": 0.08, "w2a16g128": 0.32}
    lays = []
    for li in range(layers):
        experts = [
            ExpertStats(
                expert=e,
                shared=False,
                shapes={"gate": [i, h], "up": [i, h], "down": [h, i]},
                freq=f,
                routed_tokens=int(f * 1000),
                calib_tokens=int(f * 1000),
                err={b: dict(base) for b in ("gate", "up", "down")},
            )
            for e, f in enumerate(freqs)
        ]
        lays.append(LayerStats(layer=li, n_routed=len(freqs), top_k=2, out_energy=1.0 + li, experts=experts))
    return CalibrationProfile("m", "qwen3_moe", "rtn", SCHEMES, 1000, 128, [], 0, lays)


def avg_bits(plan, prof):
    bits = params = 0.0
    for lay, st in zip(plan.layers, prof.layers):
        for ep, es in zip(lay.experts, st.experts):
            for b in ("gate", "up", "down"):
                n, k = es.shapes[b]
                bits += get_scheme(getattr(ep, b)).bits_per_weight(k) * n * k
                params += n * k
    return bits / params


@pytest.mark.parametrize("budget", [2.25, 2.75, 3.25, 4.25, 6.0])
@pytest.mark.parametrize("granularity", ["layer", "model"])
def test_budget_and_tying(budget, granularity):
    prof = synthetic_profile()
    res = solve_plan(prof, budget, granularity=granularity)
    assert avg_bits(res.plan, prof) <= budget + 1e-9
    assert res.plan.summary["avg_bits"] == pytest.approx(avg_bits(res.plan, prof))
    for lay in res.plan.layers:
        for e in lay.experts:
            assert e.gate == e.up


def test_frequent_experts_get_more_bits():
    prof = synthetic_profile()
    plan = solve_plan(prof, 3.25).plan
    bits = [get_scheme(e.down).bits_per_weight() for e in plan.layers[0].experts]
    assert bits == sorted(bits, reverse=True) and bits[0] > bits[-1]


def test_reweighting_by_observed_frequencies_moves_bits():
    prof = synthetic_profile()
    flipped = [[0.1, 0.2, 0.3, 0.5, 0.9]] * 2
    plan = solve_plan(prof, 3.25, freqs=flipped).plan
    bits = [get_scheme(e.down).bits_per_weight() for e in plan.layers[0].experts]
    assert bits == sorted(bits) and bits[0] < bits[-1]


def test_r_trades_accuracy_for_latency():
    prof = synthetic_profile()
    # latency-only with a big bf16 advantage in the cost model: fewer bits do not always mean faster
    acc = solve_plan(prof, 6.0, r=1.0, tokens=4096)
    fast = solve_plan(prof, 6.0, r=0.0, tokens=4096)
    assert acc.plan.summary["L"] <= fast.plan.summary["L"]
    assert fast.plan.summary["T"] <= acc.plan.summary["T"]
    lts = [(lv, tv) for lv, tv, _ in acc.frontier]
    assert lts[0][1] <= lts[-1][1] and lts[0][0] >= lts[-1][0]  # fastest first, most accurate last


def test_layer_mode_meets_budget_in_every_layer():
    prof = synthetic_profile()
    prof.layers[1].out_energy = 1000.0  # layer 1 is insensitive: model mode starves it, layer mode cannot
    layer = solve_plan(prof, 3.25, granularity="layer").plan
    model = solve_plan(prof, 3.25, granularity="model").plan
    one = CalibrationProfile(prof.model, prof.model_type, prof.method, prof.schemes, 0, 0, [], 0, [prof.layers[1]])
    from mxserve.plan import Plan

    sub = Plan.from_json({**model.to_json(), "layers": [model.to_json()["layers"][1]]})
    assert avg_bits(sub, one) < 3.0
    sub = Plan.from_json({**layer.to_json(), "layers": [layer.to_json()["layers"][1]]})
    assert avg_bits(sub, one) > 3.0


def test_infeasible_and_bad_arguments():
    prof = synthetic_profile()
    with pytest.raises(MxServeError, match="infeasible"):
        solve_plan(prof, 2.0)
    with pytest.raises(MxServeError, match="--r"):
        solve_plan(prof, 4.0, r=1.5)
    with pytest.raises(MxServeError, match="granularity"):
        solve_plan(prof, 4.0, granularity="expert")


def test_measured_cost_model_interpolates():
    prof = KernelProfile(
        "test", [ProfileEntry("w4a16g128", 256, 128, t, s) for t, s in [(1, 1e-5), (16, 1e-5), (256, 5e-5)]]
    )
    cm = MeasuredCostModel(prof)
    s = get_scheme("w4a16g128")
    assert cm.time(s, 256, 128, 0) == 0
    assert cm.time(s, 256, 128, 8) == pytest.approx(1e-5)
    assert cm.time(s, 256, 128, 136) == pytest.approx(3e-5)
    assert cm.time(s, 256, 128, 512) == pytest.approx(1e-4)
    assert cm.time(get_scheme("bf16"), 256, 128, 8) == RooflineCostModel().time(get_scheme("bf16"), 256, 128, 8)


def test_latency_priced_by_the_roofline_is_said():
    # r < 1 trades accuracy for the latency term's time: priced by the roofline (no kernel profile, or one
    # without the model's shapes) it assumes fewer bits are faster, which the decode kernels do not do
    prof = synthetic_profile()
    assert solve_plan(prof, 3.25, r=1.0).warnings == []
    (roof,) = solve_plan(prof, 3.25, r=0.5).warnings
    assert "no kernel profile" in roof and "--kernel-profile" in roof
    elsewhere = KernelProfile("test", [ProfileEntry(s, 2816, 2048, 1, 1e-6) for s in SCHEMES])
    (missed,) = solve_plan(prof, 3.25, r=0.5, cost=MeasuredCostModel(elsewhere)).warnings
    assert "no times for" in missed and "256x128" in missed  # down; gate and up as one GEMM: 256x256
    here = KernelProfile("test", [ProfileEntry(s, n, k, 1, 1e-6) for s in SCHEMES for n, k in ((256, 256), (256, 128))])
    both = MeasuredCostModel(here)
    assert solve_plan(prof, 3.25, r=0.5, cost=both).warnings == []
    # a model reused (the online controller's) says only what the solve at hand missed
    both.time(get_scheme("bf16"), 999, 999, 1)
    assert solve_plan(prof, 3.25, r=0.5, cost=both).warnings == []


H100_PROFILE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "h100-kernel-profile.json"


def qwen15_profile() -> CalibrationProfile:
    """Calibration-like profile at Qwen1.5-MoE's expert shapes (the kernel profile measured them)."""
    err = {"bf16": 0.0, "w8a16": 1e-5, "w8a8fp8": 3e-4, "w4a16g128": 2e-3, "w3a16g128": 8e-3,
           "w2a16g128": 4e-2, "w1a16g128": 0.3, "w4a4": 1e-2}
    experts = [
        ExpertStats(expert=e, shared=False, shapes={"gate": [1408, 2048], "up": [1408, 2048], "down": [2048, 1408]},
                    freq=f, routed_tokens=100, calib_tokens=100, err={b: dict(err) for b in ("gate", "up", "down")})
        for e, f in enumerate([0.9, 0.7, 0.5, 0.3, 0.2, 0.15, 0.15, 0.1])
    ]
    layer = LayerStats(layer=0, n_routed=8, top_k=3, out_energy=1.0, experts=experts)
    return CalibrationProfile("m", "qwen2_moe", "rtn", list(err), 1000, 512, [], 0, [layer])


def test_measured_profile_changes_plan_with_batch_size():
    """Memory-bound (8 tokens) and compute-bound (8192 tokens) forwards get different plans.

    In the measured profile w8a16 is slower than w4a16g128 at 8 tokens (more bytes) and faster
    at 8192 (cheaper dequantization); a latency-leaning r (0.1) lets that show in the plan.
    """
    from mxserve.costmodel import cost_model

    cost = cost_model(str(H100_PROFILE))
    prof = qwen15_profile()
    small = solve_plan(prof, 8.0, r=0.1, tokens=8, cost=cost).plan
    large = solve_plan(prof, 8.0, r=0.1, tokens=8192, cost=cost).plan
    pick = [(e.gate, e.down) for e in small.layers[0].experts]
    pick_large = [(e.gate, e.down) for e in large.layers[0].experts]
    assert pick != pick_large, pick
    assert small.summary["avg_bits"] <= 8.0 + 1e-9 and large.summary["avg_bits"] <= 8.0 + 1e-9


def test_decode_plans_leave_out_what_the_decode_kernel_does_not_run():
    # at decode a layer holding an activation-quantized block runs every expert on the Triton kernel, which the
    # per-block latency term cannot price: r < 1 for decode-sized forwards leaves those schemes out, and says so
    from mxserve.costmodel import cost_model

    cost, prof = cost_model(str(H100_PROFILE)), qwen15_profile()

    def used(res) -> set[str]:
        return {s for e in res.plan.layers[0].experts for s in (e.gate, e.down)}

    decode = solve_plan(prof, 5.0, r=0.1, tokens=8, cost=cost)
    assert not used(decode) & {"w8a8fp8", "w4a4"}, used(decode)
    (said,) = [w for w in decode.warnings if "left out" in w]
    assert "w8a8fp8, w4a4 left out" in said and "8 tokens" in said
    # kept: accuracy alone (r = 1), prefill-sized forwards, and where nothing else would be left
    assert "w8a8fp8" in used(solve_plan(prof, 5.0, r=0.1, tokens=8192, cost=cost))
    assert solve_plan(prof, 5.0, r=1.0, tokens=8, cost=cost).warnings == []
    only = solve_plan(prof, 8.5, r=0.1, tokens=8, cost=cost, schemes=["w8a8fp8"])
    assert used(only) == {"w8a8fp8"} and only.warnings == []


def test_float_noise_does_not_flip_a_near_tie():
    """Two equally used experts, budget for only one at 8 bits: which one gets it is a tie. Noise
    at the 1e-7 level (CPU vs GPU numerics) must not decide it differently between two profiles."""
    plans = []
    for noise in (1e-7, -1e-7):
        prof = synthetic_profile(freqs=(0.5, 0.5), layers=1)
        for e, sign in zip(prof.layers[0].experts, (1, -1)):
            for blk in e.err.values():
                for s in blk:
                    blk[s] *= 1 + sign * noise
        plan = solve_plan(prof, 6.2, solver="ilp").plan
        schemes = [ep.gate for ep in plan.layers[0].experts]
        assert sorted(schemes) == ["w4a16g128", "w8a16"]  # the tie is real: one expert each
        plans.append(schemes)
    assert plans[0] == plans[1]


def test_several_forward_sizes_price_one_forward_of_each():
    """--tokens 1,8: a block's time is its 1-token forward's plus its 8-token forward's, and the plan says so."""
    from mxserve.costmodel import cost_model
    from mxserve.planner import layer_units, token_counts

    cost, prof = cost_model(str(H100_PROFILE)), qwen15_profile()
    st, schemes = prof.layers[0], ["w4a16g128", "w3a16g128", "w2a16g128"]
    one, eight, both = (layer_units(st, 0, schemes, t, cost) for t in (1, 8, (8, 1)))
    for u1, u8, ub in zip(one, eight, both):
        for s in schemes:
            assert ub.options[s][2] == pytest.approx(u1.options[s][2] + u8.options[s][2])
            assert ub.options[s][:2] == u1.options[s][:2]  # bits and loss do not depend on the sizes
    res = solve_plan(prof, 3.25, r=0.25, tokens=[8, 1, 8], cost=cost)
    assert res.plan.tokens == 1 and res.plan.summary["priced_tokens"] == [1, 8]
    assert "priced_tokens" not in solve_plan(prof, 3.25, r=0.25, tokens=8, cost=cost).plan.summary
    for bad in (0, [], [1, 0], 2.5, [1, "8"]):
        with pytest.raises(MxServeError, match="--tokens"):
            token_counts(bad)
    # a scheme the decode kernel refuses at any of the sizes is left out, and the warning names them all
    res = solve_plan(prof, 5.0, r=0.1, tokens=[8, 8192], cost=cost)
    assert not {s for e in res.plan.layers[0].experts for s in (e.gate, e.down)} & {"w8a8fp8", "w4a4"}
    assert any("8 + 8192 tokens per forward" in w for w in res.warnings), res.warnings


def test_plan_command_takes_several_forward_sizes(tmp_path, capsys):
    from mxserve.cli import main
    from mxserve.plan import Plan

    prof = tmp_path / "profile.json"
    qwen15_profile().save(str(prof))
    out = tmp_path / "plan.json"
    args = ["plan", "--profile", str(prof), "--budget", "3.25", "--r", "0.25", "--kernel-profile", str(H100_PROFILE)]
    assert main([*args, "--tokens", "8,1", "--out", str(out)]) == 0
    assert "1 + 8 tokens per forward" in capsys.readouterr().out
    assert Plan.load(str(out)).summary["priced_tokens"] == [1, 8]
    for bad, said in (("1,x", "'x' is not an integer"), ("0", "must be at least 1")):
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--tokens", bad, "--out", str(tmp_path / "no.json")])
        assert exit_.value.code == 2 and said in capsys.readouterr().err


def test_latency_term_charges_an_expert_by_its_chance_to_run():
    from mxserve.costmodel import expected_time

    cm, s = RooflineCostModel(), get_scheme("w4a16g128")
    every_step = cm.time(s, 2816, 2048, 1)
    assert expected_time(cm, s, 2816, 2048, 1, 1.0) == every_step  # a shared expert: read every decode step
    assert expected_time(cm, s, 2816, 2048, 1, 0.05) == pytest.approx(0.05 * every_step)  # picked 1 step in 20
    # 4096 tokens: it runs in every forward, on its 205 rows
    assert expected_time(cm, s, 2816, 2048, 4096, 0.05) == pytest.approx(cm.time(s, 2816, 2048, 4096 * 0.05))
    assert expected_time(cm, s, 2816, 2048, 8, 0.0) == 0.0


def test_decode_latency_charges_the_shared_expert_every_step():
    """Swapping the schemes of the shared expert and of the rarest routed one keeps the bits. At 1
    token per forward the latency term prefers the shared expert on the fewer bits: it is read
    every step, the rare one in 1 step of 10 (charging each its whole read made them equal)."""
    import copy

    from mxserve.planner import plan_terms

    prof = qwen15_profile()
    lay = prof.layers[0]
    lay.experts.append(ExpertStats(expert=8, shared=True, shapes=dict(lay.experts[0].shapes), freq=1.0,
                                   routed_tokens=100, calib_tokens=100, err=copy.deepcopy(lay.experts[0].err)))
    plan = solve_plan(prof, 3.25, r=1.0, tokens=1).plan
    shared, rare = plan.layers[0].experts[8], plan.layers[0].experts[7]  # rare: freq 0.1
    assert shared.shared and (shared.gate, shared.down) != (rare.gate, rare.down)
    swapped = copy.deepcopy(plan)
    s2, r2 = swapped.layers[0].experts[8], swapped.layers[0].experts[7]
    for b in ("gate", "up", "down"):
        setattr(s2, b, getattr(rare, b))
        setattr(r2, b, getattr(shared, b))
    cost = RooflineCostModel()
    (l_plan, t_plan), (l_swapped, t_swapped) = (plan_terms(prof, p, 1, cost) for p in (plan, swapped))
    assert t_swapped < t_plan and l_swapped > l_plan  # faster at decode, less accurate


@pytest.mark.parametrize("scheme", ["w4a16g128", "w8a16", "bf16"])
@pytest.mark.parametrize("tokens", [1, 4])
def test_kernel_profile_launch_computes_each_experts_product(scheme, tokens):
    """`mxserve profile` times the launch that serving picks for that many rows per expert; here (the
    interpreter) it must run and compute every expert's product (it once called the kernel with an
    outdated signature, found only on the GPU)."""
    import torch

    from mxkernels.profile import expert_gemm

    n, k, e = 32, 256, 3
    run, a, out, linears = expert_gemm(get_scheme(scheme), n, k, tokens, n_experts=e, device="cpu")
    run()
    got = out.float().sum(0)  # split-K partials, or the one bf16 output
    want = torch.cat([a[i * tokens:(i + 1) * tokens].float() @ lin.dequantize().T for i, lin in enumerate(linears)])
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tokens, stream_k", [(1, True), (8, False)])
def test_kernel_profile_times_the_grid_serving_launches(tokens, stream_k, monkeypatch):
    """On a GPU serving runs a launch of one row per expert on the Gluon kernel's stream-K grid (moe_gemms);
    the profile must time that launch. Until the fortieth session it timed the unbalanced grid there, whose
    1-token times were twice its 4-token ones, and the planner priced decode with them."""
    import torch

    from mxkernels import moe, profile

    launched = []
    monkeypatch.setattr(moe, "_runs_gluon", lambda dev: True)  # the decision as on a GPU; the launch recorded
    monkeypatch.setattr(profile, "multiprocessors", lambda dev: 132)
    monkeypatch.setattr(profile, "_gemm", lambda *args: launched.extend(args[10]))
    monkeypatch.delenv("MXSERVE_STREAM_K", raising=False)
    run, _, out, _ = profile.expert_gemm(get_scheme("w4a16g128"), 256, 256, tokens, n_experts=8, device="cpu")
    run()
    [(_, tiles)] = launched
    assert tiles.gluon and tiles.stream_k == stream_k
    # stream-K's programs add fp32 sums into one output; split K, fp32 partials a split; else bf16
    want = (torch.float32, 1) if stream_k else (torch.float32 if tiles.split > 1 else torch.bfloat16, tiles.split)
    assert (out.dtype, out.shape[0]) == want


def test_the_plan_says_what_a_decoded_token_reads():
    """Expected expert bytes a decoded token reads: each block's bytes in its scheme times the chance a token is
    routed to its expert, a shared expert every token. With a shared expert at 8 bits, a plan of fewer average bits
    than w4a16g128 can read more a token than the uniform 4-bit model."""
    from mxserve.planner import decode_reads_line

    prof = synthetic_profile(freqs=(0.2, 0.1, 0.05))
    for st in prof.layers:  # a shared expert of the routed experts' shape, and its errors far larger
        st.experts.append(ExpertStats(expert=3, shared=True, shapes=dict(st.experts[0].shapes), freq=1.0,
                                      routed_tokens=1000, calib_tokens=1000,
                                      err={b: {s: 100 * v for s, v in st.experts[0].err[b].items()}
                                           for b in ("gate", "up", "down")}))  # fmt: skip
    plan = solve_plan(prof, 3.25).plan
    s = plan.summary
    want = shared = 0.0
    for lay, st in zip(plan.layers, prof.layers):
        for ep, es in zip(lay.experts, st.experts):
            p = 1.0 if es.shared else es.freq
            for b in ("gate", "up", "down"):
                n, k = es.shapes[b]
                mb = p * get_scheme(getattr(ep, b)).bits_per_weight(k) * n * k / 8e6
                want += mb
                shared += mb if es.shared else 0.0
    assert s["decode_mb_per_token"] == pytest.approx(want, rel=1e-4)
    assert s["decode_mb_shared"] == pytest.approx(shared, rel=1e-4) and shared > 0
    w4 = sum((1.0 if es.shared else es.freq) * 4.25 * n * k / 8e6 for st in prof.layers for es in st.experts
             for n, k in es.shapes.values())  # fmt: skip
    assert s["decode_mb_uniform_w4a16g128"] == pytest.approx(w4, rel=1e-4)
    # the sensitive shared expert took the bits: below 4 bits on average, more bytes a token than 4 bits
    assert s["avg_bits"] <= 3.25 + 1e-9 and s["decode_mb_per_token"] > s["decode_mb_uniform_w4a16g128"]
    assert f"reads {want:.4g} MB" in decode_reads_line(s) and decode_reads_line({"avg_bits": 3.0}) is None


def test_layers_that_leave_stream_k_at_decode_are_said():
    """Priced for 8-token forwards (3 rows an active expert here), a layer with over a tenth of its weights in 3-bit,
    8-bit or bf16 blocks runs its decode launches off the stream-K grid, which the per-block latency term does not
    see: the plan says how many layers do. Not for narrow plans, accuracy alone, or sizes the rule does not touch."""
    from mxkernels.moe import STREAM_K_COSTLY, STREAM_K_ROWS, STREAM_K_ROWS_COSTLY, _rows
    from mxserve.costmodel import cost_model

    cost, prof = cost_model(str(H100_PROFILE)), qwen15_profile()
    st = prof.layers[0]
    assert STREAM_K_ROWS_COSTLY <= _rows(8, st.top_k, len(st.experts), st.n_routed)[2] < STREAM_K_ROWS
    assert _rows(1, st.top_k, len(st.experts), st.n_routed)[2] < STREAM_K_ROWS_COSTLY

    def costly(res) -> float:
        blocks = [(getattr(e, b), es.params(b)) for e, es in zip(res.plan.layers[0].experts, st.experts)
                  for b in ("gate", "up", "down")]  # fmt: skip
        return sum(n for s, n in blocks if s in ("bf16", "w3a16g128", "w8a16")) / sum(n for _, n in blocks)

    wide = solve_plan(prof, 3.25, r=0.5, tokens=[1, 8], cost=cost, schemes=["w4a16g128", "w3a16g128", "w2a16g128"])
    said = [w for w in wide.warnings if "stream-K" in w]
    assert costly(wide) > STREAM_K_COSTLY, costly(wide)
    assert len(said) == 1 and "at 8 tokens per forward: 1 of 1 layers" in said[0], wide.warnings
    narrow = solve_plan(prof, 3.25, r=0.5, tokens=[1, 8], cost=cost, schemes=["w4a16g128", "w2a16g128"])
    assert costly(narrow) == 0 and not [w for w in narrow.warnings if "stream-K" in w]
    kw = {"cost": cost, "schemes": ["w4a16g128", "w3a16g128", "w2a16g128"]}
    for res in (solve_plan(prof, 3.25, r=1.0, tokens=8, **kw), solve_plan(prof, 3.25, r=0.5, tokens=1, **kw)):
        assert not [w for w in res.warnings if "stream-K" in w], res.warnings


def test_keep_stream_k_caps_each_layers_costly_weights():
    """``costly_cap`` (`plan --keep-stream-k`): a plan of w4, w3 and w2 priced for 1 + 8 tokens keeps at most a tenth of
    each layer's weights in w3, so the dispatch rule keeps its 8-token launches on stream-K, where the same solve
    without the cap does not; the greedy path's multiplier and the ILP both keep it, and a cap of 1 changes nothing."""
    from mxkernels.moe import STREAM_K_COSTLY, _rows, _stream_k
    from mxserve.costmodel import cost_model
    from mxserve.planner import KEEP_STREAM_K, costly

    assert KEEP_STREAM_K == STREAM_K_COSTLY
    assert [costly(s) for s in ("bf16", "w8a16", "w4a16g128", "w3a16g128", "w2a16g128", "w1a16g128")] == [
        True, True, False, True, False, False]
    cost, prof = cost_model(str(H100_PROFILE)), qwen15_profile()
    st = prof.layers[0]
    per_expert = _rows(8, st.top_k, len(st.experts), st.n_routed)[2]

    def share(res) -> float:
        blocks = [(getattr(e, b), es.params(b)) for e, es in zip(res.plan.layers[0].experts, st.experts)
                  for b in ("gate", "up", "down")]  # fmt: skip
        return sum(n for s, n in blocks if costly(s)) / sum(n for _, n in blocks)

    kw = {"r": 0.5, "tokens": [1, 8], "cost": cost, "schemes": ["w4a16g128", "w3a16g128", "w2a16g128"]}
    wide = solve_plan(prof, 3.25, **kw)
    assert share(wide) > STREAM_K_COSTLY and not _stream_k(per_expert, None, {}, share(wide))
    for solver in ("auto", "greedy", "ilp"):
        for r in (0.5, 1.0):
            kept = solve_plan(prof, 3.25, costly_cap=KEEP_STREAM_K, solver=solver, **{**kw, "r": r})
            assert share(kept) <= KEEP_STREAM_K and _stream_k(per_expert, None, {}, share(kept)), (solver, r)
            assert kept.plan.summary["costly_cap"] == KEEP_STREAM_K and kept.plan.summary["avg_bits"] <= 3.25 + 1e-9
            assert not [w for w in kept.warnings if "stream-K" in w], kept.warnings
            if r == 1.0 and solver != "greedy":  # the ILP's accuracy point fills the room: two w3 down blocks
                assert share(kept) > 0, solver
    assert solve_plan(prof, 3.25, costly_cap=1.0, **kw).plan.layers == wide.plan.layers
    with pytest.raises(MxServeError, match="needs a 1, 2 or 4-bit candidate"):
        solve_plan(prof, 3.25, costly_cap=KEEP_STREAM_K, **{**kw, "schemes": ["w3a16g128", "w8a16"]})
    with pytest.raises(MxServeError, match="within \\[0, 1\\]"):
        solve_plan(prof, 3.25, costly_cap=1.5, **kw)
