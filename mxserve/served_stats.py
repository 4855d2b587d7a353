"""What a running server exports, read back from its /metrics: `mxserve stats --url URL`.

Works against either engine (the series are the same, router_stats/metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mxserve.errors import MxServeError

# one character per scheme in the terminal map; anything else prints as '?'
SYMBOLS = {"bf16": "B", "w8a16": "8", "w8a8fp8": "F", "w8a8": "I", "w4a16g128": "4", "w3a16g128": "3",
           "w2a16g128": "2", "w1a16g128": "1", "w4a4": "A"}


@dataclass
class ServedStats:
    """Per layer: routed tokens, load shares and each block's scheme, plus plan figures."""

    tokens: dict[int, dict[int, float]] = field(default_factory=dict)  # layer -> expert -> routed tokens
    layer_tokens: dict[int, float] = field(default_factory=dict)  # layer -> tokens through it
    shares: dict[str, dict[int, dict[int, float]]] = field(default_factory=dict)  # window -> layer -> expert
    schemes: dict[str, dict[int, dict[int, str]]] = field(default_factory=dict)  # block -> layer -> expert
    avg_bits: float | None = None
    budget_bits: float | None = None
    tokens_per_forward: float | None = None
    decode_bytes: dict[str, float] = field(default_factory=dict)  # window -> expert bytes a decoded token reads

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.tokens) | {li for b in self.schemes.values() for li in b})


def parse_metrics(text: str) -> ServedStats:
    from prometheus_client.parser import text_string_to_metric_families

    st = ServedStats()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            lab = s.labels
            if s.name == "mxserve_expert_routed_tokens_total":
                st.tokens.setdefault(int(lab["layer"]), {})[int(lab["expert"])] = s.value
            elif s.name == "mxserve_layer_tokens_total":
                st.layer_tokens[int(lab["layer"])] = s.value
            elif s.name == "mxserve_expert_load_share":
                by_layer = st.shares.setdefault(lab["window"], {})
                by_layer.setdefault(int(lab["layer"]), {})[int(lab["expert"])] = s.value
            elif s.name == "mxserve_expert_block_scheme" and s.value == 1:
                by_layer = st.schemes.setdefault(lab["block"], {})
                by_layer.setdefault(int(lab["layer"]), {})[int(lab["expert"])] = lab["scheme"]
            elif s.name == "mxserve_plan_avg_bits":
                st.avg_bits = s.value
            elif s.name == "mxserve_plan_budget_bits":
                st.budget_bits = s.value
            elif s.name == "mxserve_tokens_per_forward" and lab.get("window") == "sliding":
                st.tokens_per_forward = s.value
            elif s.name == "mxserve_decode_bytes_per_token":
                st.decode_bytes[lab["window"]] = s.value
    return st


def fetch(url: str, api_key: str | None = None) -> ServedStats:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    target = url.rstrip("/") + "/metrics"
    try:
        r = httpx.get(target, headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise MxServeError(f"cannot read {target}: {e}") from None
    if r.status_code != 200:
        raise MxServeError(f"{target} answered HTTP {r.status_code}" + (" (give --api-key)" if r.status_code == 401
                                                                         else ""))
    st = parse_metrics(r.text)
    if not st.layers:
        raise MxServeError(f"{target} has no mxserve series (is it an mxserve server?)")
    return st


def render(st: ServedStats, window: str = "sliding", top: int = 4) -> str:
    """A compact table: per layer, the busiest experts and each expert's scheme (gate_up / down)."""
    lines = []
    head = []
    if st.avg_bits is not None:
        head.append(f"plan: {st.avg_bits:.3f} avg bits (budget {st.budget_bits or 0:g})")
    if st.tokens_per_forward is not None:
        head.append(f"{st.tokens_per_forward:.1f} tokens per forward (sliding window)")
    if window in st.decode_bytes:
        head.append(f"a decoded token reads {st.decode_bytes[window] / 1e6:.4g} MB of expert weights ({window})")
    if head:
        lines.append("; ".join(head))
    shares = st.shares.get(window, {})
    lines.append(f"{'layer':>5} {'tokens':>9}  {'load share, ' + window + ' window (top ' + str(top) + ')':<44}"
                 "schemes by expert: gate_up / down")
    for li in st.layers:
        sh = shares.get(li, {})
        busiest = sorted(sh, key=sh.get, reverse=True)[:top]
        load = "  ".join(f"e{e} {sh[e]:4.0%}" for e in busiest)
        maps = [
            "".join(SYMBOLS.get(st.schemes.get(b, {}).get(li, {}).get(e, ""), "?")
                    for e in sorted(st.schemes.get(b, {}).get(li, {})))
            for b in ("gate_up", "down")
        ]
        lines.append(f"{li:>5} {int(st.layer_tokens.get(li, 0)):>9}  {load:<44}{maps[0]} / {maps[1]}")
    used = sorted({s for b in st.schemes.values() for lay in b.values() for s in lay.values()})
    lines.append("schemes: " + ", ".join(f"{SYMBOLS.get(s, '?')} = {s}" for s in used))
    return "\n".join(lines)
