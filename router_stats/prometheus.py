"""Prometheus export of routing counts and the precision of every expert block.

Series (labels: layer = decoder layer index, expert = expert index, routed
first then shared slices):

- ``mxserve_expert_tokens_total{layer, expert}``: tokens routed to a routed expert since start;
- ``mxserve_layer_tokens_total{layer}``: tokens that went through the layer;
- ``mxserve_expert_block_bits{layer, expert, block}``: bits per weight of gate_up / down;
- ``mxserve_expert_block_scheme{layer, expert, block, scheme}``: 1 for the scheme in use.

Counts are read at scrape time (one device-to-host copy per layer per scrape).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class RoutingCollector:
    def __init__(self, layers: Callable[[], list]):
        self._layers = layers  # runtime layers (each with .layer_index, .counter, .experts_q)

    def describe(self):
        return []

    def collect(self):
        tokens = CounterMetricFamily("mxserve_expert_tokens", "Tokens routed to each expert",
                                     labels=["layer", "expert"])
        layer_tokens = CounterMetricFamily("mxserve_layer_tokens", "Tokens through each MoE layer", labels=["layer"])
        bits = GaugeMetricFamily("mxserve_expert_block_bits", "Bits per weight of each expert block",
                                 labels=["layer", "expert", "block"])
        scheme = GaugeMetricFamily("mxserve_expert_block_scheme", "Scheme of each expert block (1 = in use)",
                                   labels=["layer", "expert", "block", "scheme"])
        for layer in self._layers():
            li = str(layer.layer_index)
            counts, total = layer.counter.snapshot()
            layer_tokens.add_metric([li], total)
            for e, c in enumerate(counts):
                tokens.add_metric([li, str(e)], c)
            for e, qe in enumerate(layer.experts_q):
                for block, ql in (("gate_up", qe.gate_up), ("down", qe.down)):
                    bits.add_metric([li, str(e), block], ql.scheme.bits_per_weight(ql.k))
                    scheme.add_metric([li, str(e), block, ql.scheme.name], 1)
        yield tokens
        yield layer_tokens
        yield bits
        yield scheme
