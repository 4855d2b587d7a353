"""router_stats: device counters, windows, and the Prometheus series in both exposition modes."""

import os
import subprocess
import sys
import time

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router_stats import CounterSnapshot, ExpertCounter, MxMetrics, RouterStats, RoutingWindows
from router_stats.counters import FORWARD_TOKEN_BUCKETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counter_counts_tokens_slots_and_forward_sizes():
    c = ExpertCounter(4)
    c.record(torch.tensor([[0, 1], [1, 2], [-1, -1]]))  # 2 tokens, one padded row
    c.record(torch.tensor([[3, 3]] * 5))
    c.record(torch.full((3, 2), -1))  # an all-padding forward counts nothing
    s = c.snapshot()
    assert s.counts == [1, 2, 1, 10] and s.tokens == 7 and s.forwards == 2
    # 2 tokens fall in le=2, 5 tokens in le=8
    assert s.forward_hist[FORWARD_TOKEN_BUCKETS.index(2)] == 1
    assert s.forward_hist[FORWARD_TOKEN_BUCKETS.index(8)] == 1 and sum(s.forward_hist) == 2


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_counting_kernel_adds_what_the_torch_ops_add(dtype):
    """mxkernels.count (the counter's one launch on a GPU; Triton's interpreter here) against the
    counter's torch ops: padded slots and rows, an empty pass, more tokens than one block, past the
    histogram's last bound, duplicates within a token."""
    from mxkernels.count import count_routing

    gen = torch.Generator().manual_seed(0)
    ref, buf = ExpertCounter(16), ExpertCounter(16).buf.clone()
    host = torch.full_like(buf, -1)  # the pinned mirror a GPU's kernel writes
    bounds = torch.tensor(FORWARD_TOKEN_BUCKETS, dtype=torch.int64)
    for i, (t, k) in enumerate([(3, 2), (0, 4), (1, 8), (300, 4), (20000, 1), (7, 3)]):
        ids = torch.randint(-1, 16, (t, k), generator=gen, dtype=torch.int64).to(dtype)
        if t:
            ids[0] = -1  # a padded row
        ref.record(ids)
        mirror, before = i % 2 == 1, host.clone()
        count_routing(ids, buf, bounds, 16, host if mirror else None)
        assert torch.equal(buf, ref.buf), (t, k)
        assert torch.equal(host, buf if mirror else before), (t, k)  # the mirror written only when given
    # the empty pass and the 1-token one (its only row padded) count no forward; 20000 tokens: +Inf
    assert ref.snapshot().forwards == 4 and ref.snapshot().forward_hist[-1] == 1


def snap(counts, tokens, forwards=1):
    return CounterSnapshot(list(counts), tokens, forwards, [])


def test_sliding_window_forgets_and_ewma_follows():
    w = RoutingWindows(window=10, halflife=5)
    st = w.fold(0.0, {0: snap([0, 0], 0, 0)})
    assert st.layers[0].window_share == [0.5, 0.5]  # no traffic yet: an even spread
    st = w.fold(1.0, {0: snap([90, 10], 50, 5)})
    assert st.layers[0].window_share == [0.9, 0.1]
    assert st.layers[0].window_freq == [90 / 50, 10 / 50] and st.tokens_per_forward_window == 10
    # 20 s later only expert 1 got traffic: the window holds only that, the EWMA mostly
    st = w.fold(21.0, {0: snap([90, 110], 100, 10)})
    assert st.layers[0].window_share == [0.0, 1.0]
    ewma = st.layers[0].ewma_share
    assert 0.9 < ewma[1] < 1.0 and abs(sum(ewma) - 1) < 1e-9
    # no traffic for a while: shares stay what the last traffic said
    st = w.fold(60.0, {0: snap([90, 110], 100, 10)})
    assert st.layers[0].window_share == [0.0, 1.0] and st.layers[0].ewma_share == pytest.approx(ewma)
    # a read that lags the device's copy never makes counts go back
    st = w.fold(61.0, {0: snap([89, 110], 99, 10)})
    assert st.layers[0].cumulative == [90, 110]


class _Layer:
    """What RouterStats reads of a runtime layer."""

    def __init__(self, index, counter, experts_q):
        self.layer_index, self.counter, self.experts_q, self.version = index, counter, experts_q, 0


def _experts(schemes):
    from mxserve.quant.qlinear import quantize_linear
    from mxserve.runtime.moe_layer import QuantizedExpert
    from mxserve.schemes import get_scheme

    torch.manual_seed(0)
    return [QuantizedExpert(quantize_linear(torch.randn(256, 128), get_scheme(a)),
                            quantize_linear(torch.randn(128, 128), get_scheme(b))) for a, b in schemes]


def test_metrics_export_counts_shares_histogram_and_precision():
    reg = CollectorRegistry()
    counter = ExpertCounter(2)
    layer = _Layer(3, counter, _experts([("w4a16g128", "w2a16g128"), ("bf16", "w8a8fp8")]))
    rs = RouterStats(lambda: [layer], MxMetrics(reg), lambda: (6.0, "rtn"), window=5, halflife=5)
    counter.record(torch.tensor([[0, 1], [0, 1], [0, 0]]))
    rs.fold()
    s = samples(generate_latest(reg).decode())
    assert s[("mxserve_expert_routed_tokens_total", (("expert", "0"), ("layer", "3")))] == 4
    assert s[("mxserve_layer_tokens_total", (("layer", "3"),))] == 3
    assert s[("mxserve_expert_load_share", (("expert", "0"), ("layer", "3"), ("window", "sliding")))] == 4 / 6
    assert s[("mxserve_forward_tokens_bucket", (("le", "4.0"),))] == 1
    assert s[("mxserve_forward_tokens_sum", ())] == 3
    assert s[("mxserve_expert_block_bits", (("block", "gate_up"), ("expert", "0"), ("layer", "3")))] == 4.25
    key = ("mxserve_expert_block_scheme", (("block", "down"), ("expert", "1"), ("layer", "3"), ("scheme", "w8a8fp8")))
    assert s[key] == 1
    assert s[("mxserve_plan_budget_bits", ())] == 6.0
    assert s[("mxserve_replans_total", (("outcome", "failed"),))] == 0
    # a swap: the new scheme is 1, the old one 0, a new plan id
    old_id = rs.precision().plan_id
    layer.experts_q = _experts([("w4a16g128", "w2a16g128"), ("bf16", "w4a16g128")])
    layer.version += 1
    counter.record(torch.tensor([[1, 1]]))
    rs.fold()
    s = samples(generate_latest(reg).decode())
    assert s[key] == 0
    assert s[key[:1] + ((key[1][:3]) + (("scheme", "w4a16g128"),),)] == 1
    assert s[("mxserve_expert_routed_tokens_total", (("expert", "1"), ("layer", "3")))] == 4
    assert s[("mxserve_plan_info", (("method", "rtn"), ("plan_id", old_id)))] == 0
    assert s[("mxserve_plan_info", (("method", "rtn"), ("plan_id", rs.precision().plan_id)))] == 1


def test_the_decode_bytes_a_token_reads_follow_the_routing_and_the_plan():
    """mxserve_decode_bytes_per_token: each routed expert's bytes times the chance a token picks it (tokens routed to
    it over the layer's), the shared experts' (past the routed ones) whole; it moves with the routing and a swap."""
    reg = CollectorRegistry()
    counter = ExpertCounter(2)  # two routed experts, then a shared one
    layer = _Layer(0, counter, _experts([("w4a16g128", "w2a16g128"), ("w2a16g128", "w2a16g128"), ("w8a16", "w8a16")]))
    rs = RouterStats(lambda: [layer], MxMetrics(reg), lambda: (4.0, "rtn"), window=60, halflife=30)

    def read(window="sliding"):
        return samples(generate_latest(reg).decode()).get(("mxserve_decode_bytes_per_token", (("window", window),)))

    def expert_bytes(e):
        return sum(b.bits * b.params / 8 for b in rs.precision().blocks if b.expert == e)

    rs.fold()
    assert read() is None  # no traffic yet: nothing to weigh the routed experts by
    counter.record(torch.tensor([[0], [0], [0], [1]]))  # top-1: expert 0 takes 3 of 4 tokens
    rs.fold()
    want = 0.75 * expert_bytes(0) + 0.25 * expert_bytes(1) + expert_bytes(2)
    assert read() == pytest.approx(want) and read("ewma") == pytest.approx(want)
    layer.experts_q = _experts([("w2a16g128", "w2a16g128")] * 3)  # a swap to fewer bits: fewer bytes a token
    layer.version += 1
    rs.fold()
    assert read() == pytest.approx(0.75 * expert_bytes(0) + 0.25 * expert_bytes(1) + expert_bytes(2))
    assert read() < want


def test_a_fold_writes_only_the_series_that_moved(monkeypatch):
    """Under SGLang a fold holds the scheduler process's GIL while it writes: an idle fold writes no share (the EWMA's
    shares only jitter in their last bits as it decays), a busy one only the experts' series that changed, and what is
    exported still equals the statistics."""
    import prometheus_client.metrics as pm

    reg = CollectorRegistry()
    counter = ExpertCounter(4)
    layer = _Layer(0, counter, _experts([("w4a16g128", "w4a16g128")] * 4))
    rs = RouterStats(lambda: [layer], MxMetrics(reg), lambda: (4.25, "rtn"), window=60, halflife=30)
    counter.record(torch.tensor([[0, 1], [0, 2]]))
    rs.fold()
    writes: list[tuple[str, dict]] = []
    for cls, op in ((pm.Gauge, "set"), (pm.Counter, "inc")):
        orig = getattr(cls, op)
        monkeypatch.setattr(cls, op, lambda self, v=1, _o=orig: (writes.append((self._name, self._labelvalues)),
                                                                 _o(self, v))[1])  # fmt: skip
    rs.fold()  # nothing routed since the last fold
    assert [w for w in writes if w[0] in ("mxserve_expert_load_share", "mxserve_expert_routed_tokens")] == []
    counter.record(torch.tensor([[3, 3]]))  # only expert 3 gets tokens: every share moves, one count
    rs.fold()
    routed = [w[1] for w in writes if w[0] == "mxserve_expert_routed_tokens"]
    assert routed == [("0", "3")]
    assert len([w for w in writes if w[0] == "mxserve_expert_load_share"]) == 8
    s = samples(generate_latest(reg).decode())
    st = rs.latest().layers[0]
    for e in range(4):
        for window, shares in (("sliding", st.window_share), ("ewma", st.ewma_share)):
            assert s[("mxserve_expert_load_share", (("expert", str(e)), ("layer", "0"), ("window", window)))] == \
                pytest.approx(shares[e], rel=1e-12)
        assert s[("mxserve_expert_routed_tokens_total", (("expert", str(e)), ("layer", "0")))] == st.cumulative[e]


def test_a_fold_lets_the_gil_go_after_each_layers_writes(monkeypatch):
    """Under SGLang the fold shares the scheduler process's GIL: it lets it go after each layer's series are written,
    so the scheduler, back from a decode step, waits one layer's writes, not the whole fold."""
    import router_stats.metrics as rm

    reg = CollectorRegistry()
    layers = [_Layer(i, ExpertCounter(4), _experts([("w4a16g128", "w4a16g128")] * 4)) for i in range(6)]
    metrics = MxMetrics(reg)
    rs = RouterStats(lambda: layers, metrics, lambda: (4.25, "rtn"), window=60, halflife=30)
    rs.fold()
    for lay in layers:
        lay.counter.record(torch.tensor([[0, 1], [2, 3]]))
    exported = []  # at each letting go: the layers whose new counts are written
    monkeypatch.setattr(rm, "yield_gil", lambda: exported.append(sum(metrics._last[i].tokens == 2 for i in range(6))))
    rs.fold()
    assert exported == [1, 2, 3, 4, 5, 6]


def test_letting_the_gil_go_hands_it_to_a_waiting_thread():
    """yield_gil hands the GIL over: with Python's switch interval made long, a thread that wants it runs only when
    the holder lets it go (after one or more of the holder's calls, as the OS wakes the waiter)."""
    import threading

    from router_stats.metrics import yield_gil

    go, ran = threading.Event(), threading.Event()

    def waiter():
        go.wait()  # waits without the GIL; woken, it needs the GIL back to go on
        ran.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    thread = threading.Thread(target=waiter)
    try:
        thread.start()  # it runs until it waits for ``go``
        go.set()
        calls = 0
        while not ran.is_set() and calls < 20000:  # about 1.5 s of 76 us sleeps at most
            yield_gil()
            calls += 1
    finally:
        sys.setswitchinterval(old)
        thread.join(10)
    assert ran.is_set() and calls < 20000, calls


_MULTIPROC_CHILD = """
import sys, torch
from router_stats import ExpertCounter, process_stats
class L:
    def __init__(s, i, c, q): s.layer_index, s.counter, s.experts_q, s.version = i, c, q, 0
sys.path.insert(0, sys.argv[1])
from test_router_stats import _experts
c = ExpertCounter(2)
rs = process_stats(L(0, c, _experts([("w3a16g128", "bf16"), ("w1a16g128", "w8a16")])), 3.25, "gptq-had")
c.record(torch.tensor([[0, 1], [1, 1]]))
if sys.argv[2] == "thread":
    rs.fold()
else:  # published to the fold process, which exports it and exits when the pipe closes
    rs.publish()
    assert rs.stop() == 0
print(type(rs).__name__)
"""


def _multiprocess_samples(env: dict) -> dict:
    """What SGLang's HTTP process serves: every process's files in PROMETHEUS_MULTIPROC_DIR, collected."""
    code = ("from prometheus_client import CollectorRegistry, generate_latest, multiprocess\n"
            "reg = CollectorRegistry(); multiprocess.MultiProcessCollector(reg)\n"
            "print(generate_latest(reg).decode())")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return samples(r.stdout)


@pytest.mark.parametrize("mode,folder", [(None, "FoldApart"), ("process", "FoldApart"), ("thread", "RouterStats")])
def test_multiprocess_export_reaches_another_process(tmp_path, mode, folder):
    """SGLang's path: the scheduler process counts, its fold process (or, MXSERVE_STATS_FOLD=thread, a thread of
    its own) writes, the HTTP process's MultiProcessCollector reads; the counts exported once, not by both."""
    mp = tmp_path / "prom"
    mp.mkdir()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(mp), PYTHONPATH=ROOT)
    env.pop("MXSERVE_STATS_FOLD", None)
    if mode:
        env["MXSERVE_STATS_FOLD"] = mode
    r = subprocess.run([sys.executable, "-c", _MULTIPROC_CHILD, os.path.join(ROOT, "tests"), mode or "process"],
                       env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [folder]
    s = _multiprocess_samples(env)
    assert s[("mxserve_expert_routed_tokens_total", (("expert", "1"), ("layer", "0")))] == 3
    assert s[("mxserve_layer_tokens_total", (("layer", "0"),))] == 2
    assert s[("mxserve_expert_load_share", (("expert", "1"), ("layer", "0"), ("window", "ewma")))] == 0.75
    assert s[("mxserve_expert_block_scheme",
              (("block", "gate_up"), ("expert", "1"), ("layer", "0"), ("scheme", "w1a16g128")))] == 1
    assert s[("mxserve_plan_budget_bits", ())] == 3.25
    assert s[("mxserve_stats_window_seconds", (("window", "sliding"),))] == 60
    assert s[("mxserve_decode_bytes_per_token", (("window", "ewma"),))] > 0
    assert s[("mxserve_forward_tokens_count", ())] == 1
    assert s[("mxserve_replans_total", (("outcome", "applied"),))] == 0
    assert not any("pid" in dict(k[1]) for k in s)  # gauges are 'mostrecent': no per-process series


def test_the_fold_process_exports_each_publication_and_a_swap(tmp_path, monkeypatch):
    """FoldApart in this process: counts published twice fold into the windows; a plan version's change re-sends
    the precision (the old scheme drops to 0); sync waits for the export; stop ends the process cleanly."""
    from router_stats.apart import FoldApart

    mp = tmp_path / "prom"
    mp.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(mp))
    counter = ExpertCounter(2)
    layer = _Layer(5, counter, _experts([("w4a16g128", "w2a16g128"), ("bf16", "w8a8fp8")]))
    apart = FoldApart(lambda: [layer], lambda: (6.0, "rtn"), interval=3600, window=5, halflife=5).start()
    try:
        counter.record(torch.tensor([[0, 1], [0, 1], [0, 0]]))
        apart.publish()
        apart.sync()
        s = _multiprocess_samples(dict(os.environ))
        assert s[("mxserve_expert_routed_tokens_total", (("expert", "0"), ("layer", "5")))] == 4
        assert s[("mxserve_expert_load_share", (("expert", "0"), ("layer", "5"), ("window", "sliding")))] == 4 / 6
        old = ("mxserve_expert_block_scheme",
               (("block", "down"), ("expert", "1"), ("layer", "5"), ("scheme", "w8a8fp8")))
        assert s[old] == 1
        layer.experts_q = _experts([("w4a16g128", "w2a16g128"), ("bf16", "w4a16g128")])
        layer.version += 1
        counter.record(torch.tensor([[1, 1]]))
        apart.publish()
        apart.sync()
        s = _multiprocess_samples(dict(os.environ))
        assert s[("mxserve_expert_routed_tokens_total", (("expert", "1"), ("layer", "5")))] == 4
        assert s[("mxserve_layer_tokens_total", (("layer", "5"),))] == 4
        assert s[old] == 0 and s[old[:1] + (old[1][:3] + (("scheme", "w4a16g128"),),)] == 1
    finally:
        assert apart.stop() == 0


def test_the_fold_process_ends_with_the_process_that_publishes(tmp_path):
    """A scheduler killed outright (SIGKILL, no cleanup) leaves no fold process behind."""
    code = ("import os, sys, time\n"
            "from router_stats.apart import FoldApart\n"
            "a = FoldApart(lambda: [], lambda: (0.0, ''), interval=3600).start()\n"
            "print(a._proc.pid, flush=True)\n"
            "time.sleep(60)\n")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path), PYTHONPATH=ROOT)
    parent = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # running
    parent.kill()
    parent.wait(10)
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        try:  # reaped by init, or by us where this test's process adopted it
            os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    else:
        pytest.fail(f"the fold process {child} outlived its publisher")


def test_counts_cross_the_pipe_unchanged():
    from router_stats.apart import pack_counts, unpack_counts

    a, b = ExpertCounter(3), ExpertCounter(5)
    a.record(torch.tensor([[0, 2], [2, 2]]))
    b.record(torch.tensor([[4, 1]] * 9))
    t, snaps = unpack_counts(pack_counts(12.5, [(7, 3, a.host.numpy().tobytes()), (2, 5, b.host.numpy().tobytes())]))
    assert t == 12.5 and snaps == {7: a.snapshot(), 2: b.snapshot()}


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_bad_windows_are_refused(bad):
    with pytest.raises(ValueError):
        RoutingWindows(window=bad)
