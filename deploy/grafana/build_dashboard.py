"""Build the mxserve Grafana dashboard with grafana-foundation-sdk (Grafana's typed schema).

    python deploy/grafana/build_dashboard.py            # rewrites dashboards/mxserve.json
    python deploy/grafana/build_dashboard.py --check    # exit 1 if the committed JSON is stale

The dashboard is written through the SDK's typed builders, so its shape follows
Grafana's dashboard schema; tests/test_deploy.py re-reads the committed JSON
through the same SDK and runs every query below through a real Prometheus.
Every query works on both engines: mxserve's own series are the same on both,
and the request panels fall back to SGLang's series (``or``) where mxserve's
HTTP series are absent.
"""

from __future__ import annotations

import json
import os
import sys

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, prometheus, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models import prometheus as pm

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboards", "mxserve.json")
DS = dm.DataSourceRef(type_val="prometheus", uid="mxserve-prometheus")  # provisioning/datasources


def q(expr: str, legend: str = "", ref: str = "A", instant: bool = False, fmt: pm.PromQueryFormat | None = None):
    b = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if legend:
        b = b.legend_format(legend)
    b = b.instant() if instant else b.range()
    return b.format(fmt) if fmt else b


def ts(title: str, description: str, unit: str, *queries, w: int = 12, h: int = 8):
    p = timeseries.Panel().title(title).description(description).unit(unit).datasource(DS).span(w).height(h)
    for query in queries:
        p = p.with_target(query)
    return p


def precision_table(block: str):
    """Bits per weight of every expert's ``block``: a layer x expert matrix, colour by bits."""
    return (
        table.Panel()
        .title(f"Precision map: {block} (bits per weight, layer x expert)")
        .description(f"Bits per weight of each expert's {block} block in the plan served now (scale and zero "
                     "overhead included). Rows: MoE layers; columns: experts (routed first, then shared slices).")
        .datasource(DS)
        .with_target(q(f'mxserve_expert_block_bits{{block="{block}"}}', instant=True, fmt=pm.PromQueryFormat.TABLE))
        .with_transformation(dm.DataTransformerConfig(
            id_val="groupingToMatrix",
            options={"rowField": "layer", "columnField": "expert", "valueField": "Value"},
        ))
        .cell_options(common.TableColoredBackgroundCellOptions())
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.CONTINUOUS_RD_YL_GR))
        .min(1)
        .max(16)
        .decimals(2)
        .span(12)
        .height(9)
    )


def build() -> dm.Dashboard:
    layer_var = (
        db.QueryVariable("layer")
        .label("MoE layer")
        .datasource(DS)
        .query({"query": "label_values(mxserve_expert_load_share, layer)", "refId": "layers"})
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.NUMERICAL_ASC)
        .multi(True)
        .include_all(True)
    )
    load = (
        heatmap.Panel()
        .title("Expert load share, layer $layer (sliding window)")
        .description("Share of the layer's routed slots each expert took over the last sliding window "
                     "(mxserve launch --stats-window). One row per expert, time left to right.")
        .datasource(DS)
        .repeat("layer")
        .repeat_direction("h")
        .max_per_row(2)
        .with_target(q('mxserve_expert_load_share{layer=~"$layer", window="sliding"}', "{{expert}}"))
        .calculate(False)
        .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.UNKNOWN))
        .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme("Oranges").steps(64))
        .y_axis(heatmap.YAxisConfig().axis_label("expert"))
        .cell_gap(1)
        .span(12)
        .height(9)
    )
    d = (
        db.Dashboard("mxserve: expert load and precision")
        .uid("mxserve")
        .description("Live routing statistics and mixed-precision plan of an mxserve server (embedded or SGLang)")
        .tags(["mxserve", "moe", "quantization"])
        .refresh("10s")
        .time("now-30m", "now")
        .timezone("browser")
        .with_variable(layer_var)
        .with_row(db.Row("Expert load"))
        .with_panel(load)
        .with_panel(ts(
            "Expert load share, EWMA (layer $layer)",
            "Exponentially weighted share of routed slots per expert (half-life: mxserve launch --stats-halflife); "
            "follows a drift smoothly and holds its value when traffic stops.", "percentunit",
            q('mxserve_expert_load_share{layer=~"$layer", window="ewma"}', "layer {{layer}} expert {{expert}}")))
        .with_panel(ts(
            "Tokens per second through each MoE layer", "Rate of tokens entering each MoE layer.", "short",
            q("sum by (layer) (rate(mxserve_layer_tokens_total[1m]))", "layer {{layer}}")))
        .with_row(db.Row("Precision"))
        .with_panel(precision_table("gate_up"))
        .with_panel(precision_table("down"))
        .with_panel(ts(
            "Average bits and budget", "Average bits per expert weight of the plan served now, and its budget; "
            "a step is a plan change.", "short",
            q("mxserve_plan_avg_bits", "average bits"), q("mxserve_plan_budget_bits", "budget", "B")))
        .with_panel(ts(
            "Expert bytes a decoded token reads", "Expected expert weight bytes one decoded token reads under the "
            "observed routing: each routed expert's bytes times the chance a token picks it, the shared experts' "
            "whole. The decode bandwidth the plan costs, which its average bits do not show.", "decbytes",
            q('mxserve_decode_bytes_per_token{window="ewma"}', "EWMA"),
            q('mxserve_decode_bytes_per_token{window="sliding"}', "sliding window", "B")))
        .with_panel(ts(
            "Blocks per scheme", "How many expert blocks (gate_up and down of every expert) hold each scheme.",
            "short", q("sum by (scheme) (mxserve_expert_block_scheme)", "{{scheme}}")))
        .with_row(db.Row("Batch regime and requests"))
        .with_panel(ts(
            "Tokens per forward pass", "Median and 90th percentile of tokens per forward pass (the batch regime "
            "the planner's latency term uses), and the sliding-window mean.", "short",
            q("histogram_quantile(0.5, sum by (le) (rate(mxserve_forward_tokens_bucket[1m])))", "p50"),
            q("histogram_quantile(0.9, sum by (le) (rate(mxserve_forward_tokens_bucket[1m])))", "p90", "B"),
            q('mxserve_tokens_per_forward{window="sliding"}', "mean (sliding window)", "C")))
        .with_panel(ts(
            "Requests per second", "Completed requests per second: mxserve's own series on the embedded engine, "
            "SGLang's on the SGLang engine.", "reqps",
            q('sum by (status) (rate(mxserve_requests_total{endpoint=~"/v1/.*"}[1m])) '
              "or sum(rate(sglang:num_requests_total[1m]))", "{{status}}")))
        .with_panel(ts(
            "Request latency", "End-to-end latency of generation requests, 50th and 90th percentile.", "s",
            q("histogram_quantile(0.5, sum by (le) (rate(mxserve_request_duration_seconds_bucket[1m]))) "
              "or histogram_quantile(0.5, sum by (le) (rate(sglang:e2e_request_latency_seconds_bucket[1m])))",
              "p50"),
            q("histogram_quantile(0.9, sum by (le) (rate(mxserve_request_duration_seconds_bucket[1m]))) "
              "or histogram_quantile(0.9, sum by (le) (rate(sglang:e2e_request_latency_seconds_bucket[1m])))",
              "p90", "B")))
        .with_panel(ts(
            "Generated tokens per second", "Output tokens per second.", "short",
            q("rate(mxserve_generated_tokens_total[1m]) or sum(rate(sglang:generation_tokens_total[1m]))",
              "tokens/s")))
        .with_row(db.Row("Re-planning"))
        .with_panel(ts(
            "Re-plans by outcome", "Re-plan attempts in the last 5 minutes: applied, kept (not better by the "
            "margin), too_soon (hysteresis), failed (solver), rejected (uploaded plan), swap_failed.", "short",
            q("sum by (outcome) (increase(mxserve_replans_total[5m]))", "{{outcome}}"),
            q("increase(mxserve_plan_changes_total[5m])", "plans applied", "B")))
        .with_panel(ts(
            "Solve and swap time", "90th percentile of the re-plan solve time, of a whole swap, and of the "
            "time one layer is held for its swap.", "s",
            q("histogram_quantile(0.9, sum by (le) (rate(mxserve_replan_seconds_bucket[5m])))", "solve p90"),
            q("histogram_quantile(0.9, sum by (le) (rate(mxserve_swap_seconds_bucket[5m])))", "swap p90", "B"),
            q("histogram_quantile(0.9, sum by (le) (rate(mxserve_swap_layer_seconds_bucket[5m])))",
              "per-layer stall p90", "C")))
        .with_panel(ts(
            "Re-plan gain", "Relative objective gain of the last solve over the plan served then (applied only "
            "above --replan-margin).", "percentunit", q("mxserve_replan_gain", "gain")))
        .build()
    )
    for i, panel in enumerate(d.panels or []):
        panel.id_val = i + 1  # unique ids: Grafana keys panel state (and repeats) by id
    return d


def render() -> str:
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        with open(OUT) as f:
            if f.read() != text:
                print(f"{OUT} is stale: run python deploy/grafana/build_dashboard.py", file=sys.stderr)
                return 1
        return 0
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
