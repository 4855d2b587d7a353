"""Every Prometheus series mxserve exports, declared once; both engines export these names.

Label cardinality is bounded by the model, never by traffic: at most
layers x experts x blocks series per block metric (x schemes in use for
``mxserve_expert_block_scheme``), layers x experts x 2 windows for load
shares; nothing is labelled per request. Experts are numbered as in the plan:
routed experts first, then shared-expert slices (which receive every token and
so have no load share).

Routing (folded from the device counters every ``--stats-interval`` seconds):

- ``mxserve_expert_routed_tokens_total{layer,expert}``: tokens routed to a routed expert;
- ``mxserve_layer_tokens_total{layer}``: tokens through the MoE layer;
- ``mxserve_expert_load_share{layer,expert,window}``: the expert's part of the layer's
  routed slots (0..1, sums to 1 over experts) over ``window="sliding"`` (the last
  ``--stats-window`` seconds) or ``window="ewma"`` (half-life ``--stats-halflife``);
- ``mxserve_forward_tokens`` (histogram): tokens per forward pass, the batch regime;
- ``mxserve_tokens_per_forward{window}``: its mean over the same two windows;
- ``mxserve_stats_window_seconds{window}``: the two window lengths.

Precision (what the blocks actually hold, read from the runtime layers):

- ``mxserve_expert_block_bits{layer,expert,block}``: bits per weight, scale/zero overhead included;
- ``mxserve_expert_block_scheme{layer,expert,block,scheme}``: 1 for the scheme in use, 0 for one used before;
- ``mxserve_plan_avg_bits``, ``mxserve_plan_budget_bits``;
- ``mxserve_decode_bytes_per_token{window}``: expert weight bytes a decoded token reads, expected under the observed
  routing (each routed expert's bytes times the chance a token picks it, the shared experts' whole): what decode
  bandwidth the plan costs, which the average bits do not tell (planner.decode_reads for the same under calibration);
- ``mxserve_plan_info{plan_id,method}``: 1 for the plan served now (0 for earlier ones);
- ``mxserve_plan_changes_total``: plans applied after start (re-plans, uploads).

Re-planning (the controller, mxserve/online):

- ``mxserve_replans_total{outcome}``: re-plan attempts by outcome (OUTCOMES);
- ``mxserve_replan_seconds`` (histogram): time to solve;
- ``mxserve_replan_gain``: relative objective gain of the last solve over the plan served;
- ``mxserve_swap_seconds`` (histogram): time to apply a plan, all layers;
- ``mxserve_swap_layer_seconds`` (histogram): time one layer was held for its swap.

Under SGLang these live in the scheduler process and reach SGLang's own
``/metrics`` through prometheus_client's multiprocess mode (gauges
``mostrecent``, counters and histograms summed over processes).
"""

from __future__ import annotations

import hashlib
import math
import operator
import time
from dataclasses import dataclass

from router_stats.snapshot import FORWARD_TOKEN_BUCKETS, CounterSnapshot
from router_stats.windows import RoutingStats

WINDOWS = ("sliding", "ewma")
BLOCKS = ("gate_up", "down")
OUTCOMES = ("applied", "kept", "too_soon", "failed", "rejected", "swap_failed")
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class BlockPrecision:
    layer: int
    expert: int
    block: str
    scheme: str
    bits: float
    params: int


@dataclass
class Precision:
    """What the served blocks hold, with the plan's identity."""

    blocks: list[BlockPrecision]
    budget_bits: float
    method: str

    @property
    def avg_bits(self) -> float:
        total = sum(b.params for b in self.blocks)
        return sum(b.bits * b.params for b in self.blocks) / total if total else 0.0

    @property
    def plan_id(self) -> str:
        """A short hash of every block's scheme: equal ids, equal plans."""
        key = ";".join(f"{b.layer}.{b.expert}.{b.block}={b.scheme}" for b in self.blocks)
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    def to_json(self) -> dict:
        """The blocks as rows (layer, expert, block, scheme, bits, params): what the fold process is sent."""
        return {"budget_bits": self.budget_bits, "method": self.method,
                "blocks": [[b.layer, b.expert, b.block, b.scheme, b.bits, b.params] for b in self.blocks]}

    @classmethod
    def from_json(cls, d: dict) -> Precision:
        return cls([BlockPrecision(*row) for row in d["blocks"]], d["budget_bits"], d["method"])


def plan_versions(layers) -> tuple:
    """(layer index, plan version) of each runtime layer: a change means its precision must be exported again."""
    return tuple((m.layer_index, getattr(m, "version", 0)) for m in layers)


def precision_of(layers, budget_bits: float, method: str) -> Precision:
    """The precision of runtime layers (each with ``layer_index`` and ``experts_q``)."""
    blocks = []
    for layer in layers:
        for e, qe in enumerate(layer.experts_q):
            for block, ql in zip(BLOCKS, (qe.gate_up, qe.down)):
                blocks.append(BlockPrecision(layer.layer_index, e, block, ql.scheme.name,
                                             ql.scheme.bits_per_weight(ql.k), ql.n * ql.k))
    return Precision(blocks, budget_bits, method)


def yield_gil() -> None:
    """Let a thread waiting for the GIL run now. A fold runs in a thread of SGLang's scheduler process and held the
    GIL for its whole series writes (about 8 ms a busy fold of Qwen1.5-MoE's 24 x 60 experts on this project's CPU),
    so the scheduler, back from a decode step, waited up to Python's switch interval (5 ms) to launch the next; with
    the GIL let go after each layer it waits a layer's writes at most (benchmarks/stats_fold.py's stall columns)."""
    # a sleep lets the GIL go for the kernel's timer slack (about 76 us here), long enough for a waiting thread to
    # take it; os.sched_yield (1 us) let it go too briefly: the fold mostly took it straight back
    time.sleep(0)


class MxMetrics:
    """The series above in a registry (None: prometheus_client's default, as SGLang's processes use)."""

    def __init__(self, registry=None):
        # imported here: under SGLang, prometheus_client must first be imported after SGLang has
        # set PROMETHEUS_MULTIPROC_DIR, and this module is imported early by the plugin
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = REGISTRY if registry is None else registry
        gauge = dict(registry=reg, multiprocess_mode="mostrecent")
        self.routed = Counter("mxserve_expert_routed_tokens", "Tokens routed to each routed expert",
                              ["layer", "expert"], registry=reg)
        self.layer_tokens = Counter("mxserve_layer_tokens", "Tokens through each MoE layer", ["layer"], registry=reg)
        self.share = Gauge("mxserve_expert_load_share", "Share of the layer's routed slots taken by the expert",
                           ["layer", "expert", "window"], **gauge)
        self.forward_tokens = Histogram("mxserve_forward_tokens", "Tokens per forward pass",
                                        buckets=FORWARD_TOKEN_BUCKETS, registry=reg)
        self.tpf = Gauge("mxserve_tokens_per_forward", "Mean tokens per forward pass", ["window"], **gauge)
        self.window_seconds = Gauge("mxserve_stats_window_seconds",
                                    "Length of the sliding window and half-life of the EWMA", ["window"], **gauge)
        self.bits = Gauge("mxserve_expert_block_bits", "Bits per weight of each expert block (overhead included)",
                          ["layer", "expert", "block"], **gauge)
        self.scheme = Gauge("mxserve_expert_block_scheme", "Scheme of each expert block (1: in use)",
                            ["layer", "expert", "block", "scheme"], **gauge)
        self.avg_bits = Gauge("mxserve_plan_avg_bits", "Average bits per expert weight of the served plan", **gauge)
        self.budget_bits = Gauge("mxserve_plan_budget_bits", "Bit budget of the served plan", **gauge)
        self.decode_bytes = Gauge("mxserve_decode_bytes_per_token",
                                  "Expert weight bytes a decoded token reads, expected under the observed routing",
                                  ["window"], **gauge)  # fmt: skip
        self.plan_info = Gauge("mxserve_plan_info", "The served plan (1) and earlier ones (0)",
                               ["plan_id", "method"], **gauge)
        self.plan_changes = Counter("mxserve_plan_changes", "Plans applied after start", registry=reg)
        self.replans = Counter("mxserve_replans", "Re-plan attempts by outcome", ["outcome"], registry=reg)
        self.replan_seconds = Histogram("mxserve_replan_seconds", "Time to solve a re-plan",
                                        buckets=SECONDS_BUCKETS, registry=reg)
        self.replan_gain = Gauge("mxserve_replan_gain",
                                 "Relative objective gain of the last re-plan over the served plan", **gauge)
        self.swap_seconds = Histogram("mxserve_swap_seconds", "Time to apply a plan to every layer",
                                      buckets=SECONDS_BUCKETS, registry=reg)
        self.swap_layer_seconds = Histogram("mxserve_swap_layer_seconds", "Time one layer was held for its swap",
                                            buckets=SECONDS_BUCKETS, registry=reg)
        self.plan_changes.inc(0)
        for o in OUTCOMES:
            self.replans.labels(o).inc(0)  # every outcome exists from the start, at 0
        self._last: dict[int, CounterSnapshot] = {}
        self._series: dict[tuple, list] = {}  # (metric, layer[, window]) -> each expert's labelled series
        self._shares_sent: dict[tuple[str, str], list[float]] = {}
        self._hist_last: list[int] = []
        self._hist_tokens = 0
        self._schemes: dict[tuple[str, str, str], str] = {}
        self._plan: tuple[str, str] | None = None
        self._expert_bytes: dict[int, list[float]] = {}  # layer -> each expert's bytes (plan order: shared last)
        self._decode_tokens = 0  # tokens through every layer at the last export of mxserve_decode_bytes_per_token

    def set_windows(self, window: float, halflife: float) -> None:
        self.window_seconds.labels("sliding").set(window)
        self.window_seconds.labels("ewma").set(halflife)

    def _experts(self, metric, n: int, *key: str) -> list:
        """Each of ``n`` experts' series of ``metric`` under ``key`` (layer[, window]), labelled once: ``labels()``
        costs more than the write itself, and a fold writes thousands of series while holding the GIL of the process
        it runs in (under SGLang, the scheduler's)."""
        got = self._series.get((metric, *key))
        if got is None or len(got) != n:
            got = self._series[(metric, *key)] = [metric.labels(key[0], str(e), *key[1:]) for e in range(n)]
        return got

    def update_routing(self, stats: RoutingStats, first_hist: list[int]) -> None:
        """Export a fold: counter increments since the last one, shares (those that moved), the forward histogram."""
        for lay in stats.layers:
            li = str(lay.layer)
            last = self._last.get(lay.layer)
            prev_counts = last.counts if last else [0] * len(lay.cumulative)
            routed = self._experts(self.routed, len(lay.cumulative), li)
            for e, (c, p) in enumerate(zip(lay.cumulative, prev_counts)):
                if c > p or last is None:  # every expert's series exists from the first fold, at 0
                    routed[e].inc(max(c - p, 0))
            self.layer_tokens.labels(li).inc(max(lay.tokens - (last.tokens if last else 0), 0))
            self._last[lay.layer] = CounterSnapshot(list(lay.cumulative), lay.tokens, 0, [])
            for window, shares in (("sliding", lay.window_share), ("ewma", lay.ewma_share)):
                series = self._experts(self.share, len(shares), li, window)
                sent = self._shares_sent.get((li, window))
                fresh = sent is None or len(sent) != len(shares)
                for e, s in enumerate(shares):
                    # the EWMA's numerator and denominator decay alike: an idle fold moves its shares in the last bits
                    if fresh or not math.isclose(sent[e], s, rel_tol=1e-12):
                        series[e].set(s)
                self._shares_sent[(li, window)] = list(shares)
            yield_gil()
        self.tpf.labels("sliding").set(stats.tokens_per_forward_window)
        self.tpf.labels("ewma").set(stats.tokens_per_forward_ewma)
        self._observe_forwards(first_hist, stats.layers[0].tokens if stats.layers else 0)
        self._export_decode_bytes(stats)

    def _export_decode_bytes(self, stats: RoutingStats) -> None:
        """``mxserve_decode_bytes_per_token`` from a fold's observed frequencies (tokens routed to an expert over
        tokens through its layer) and the served blocks' bytes; nothing before the precision or any traffic, and
        nothing new where no token came since the last export under the same precision (an idle fold)."""
        tokens = sum(lay.tokens for lay in stats.layers)
        if not self._expert_bytes or not tokens or tokens == self._decode_tokens:
            return
        self._decode_tokens = tokens
        for window in WINDOWS:
            total = 0.0
            for lay in stats.layers:
                freq = lay.window_freq if window == "sliding" else lay.ewma_freq
                b = self._expert_bytes.get(lay.layer, [])
                # the experts past the routed ones are the shared ones, read by every token
                total += sum(map(operator.mul, b[: len(freq)], freq)) + sum(b[len(freq) :])
            self.decode_bytes.labels(window).set(total)

    def _observe_forwards(self, hist: list[int], tokens: int) -> None:
        """Add the device histogram's new counts to the Prometheus histogram.

        prometheus_client only observes single values; the device has already
        bucketed them, so the bucket counters are incremented directly.
        """
        if not hist:
            return
        last = self._hist_last or [0] * len(hist)
        for value, h, p in zip(self.forward_tokens._buckets, hist, last):
            if h > p:
                value.inc(h - p)
        if tokens > self._hist_tokens:
            self.forward_tokens._sum.inc(tokens - self._hist_tokens)
        self._hist_last = [max(h, p) for h, p in zip(hist, last)]
        self._hist_tokens = max(tokens, self._hist_tokens)

    def set_precision(self, p: Precision) -> None:
        """Export what every block holds now; schemes no longer used drop to 0."""
        now: dict[tuple[str, str, str], str] = {}
        for b in p.blocks:
            key = (str(b.layer), str(b.expert), b.block)
            now[key] = b.scheme
            self.bits.labels(*key).set(b.bits)
        for key, old in self._schemes.items():
            if now.get(key) != old:
                self.scheme.labels(*key, old).set(0)
        for key, scheme in now.items():
            self.scheme.labels(*key, scheme).set(1)
        self._schemes = now
        per: dict[int, dict[int, float]] = {}
        for b in p.blocks:
            got = per.setdefault(b.layer, {})
            got[b.expert] = got.get(b.expert, 0.0) + b.bits * b.params / 8
        self._expert_bytes = {lay: [got.get(e, 0.0) for e in range(max(got) + 1)] for lay, got in per.items()}
        self._decode_tokens = 0  # priced again at the next fold
        self.avg_bits.set(p.avg_bits)
        self.budget_bits.set(p.budget_bits)
        plan = (p.plan_id, p.method)
        if self._plan is not None and self._plan != plan:
            self.plan_info.labels(*self._plan).set(0)
        self.plan_info.labels(*plan).set(1)
        self._plan = plan
