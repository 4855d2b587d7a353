"""Pictures of a plan: the precision map (layer x expert, per block) and the planner's frontier.

`mxserve plan --plot FILE.png` draws a plan it just solved with its L/T
frontier; `mxserve stats --url URL --plot FILE.png` draws what a server
serves, with its live load shares. matplotlib, headless (Agg).
"""

from __future__ import annotations

from mxserve.schemes import get_scheme

# schemes by bits, so the colours read as a scale (dark = few bits)
_ORDER = ["w1a16g128", "w2a16g128", "w3a16g128", "w4a4", "w4a16g128", "w8a8", "w8a8fp8", "w8a16", "bf16"]


def _scheme_order(names: set[str]) -> list[str]:
    known = [s for s in _ORDER if s in names]
    rest = sorted(names - set(known), key=lambda s: get_scheme(s).bits_per_weight())
    return sorted(known + rest, key=lambda s: (get_scheme(s).bits_per_weight(), s))


def _precision_axes(fig, axes, maps: dict[str, dict[int, dict[int, str]]]) -> None:
    """One panel per block: rows = layers, columns = experts, colour = scheme."""
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    names = _scheme_order({s for lay in maps.values() for exp in lay.values() for s in exp.values()})
    cmap = ListedColormap([_colour(i, len(names)) for i in range(len(names))])
    norm = BoundaryNorm(np.arange(len(names) + 1) - 0.5, len(names))
    for ax, (block, by_layer) in zip(axes, maps.items()):
        layers = sorted(by_layer)
        n_exp = max(len(e) for e in by_layer.values())
        grid = np.full((len(layers), n_exp), np.nan)
        for r, li in enumerate(layers):
            for e, s in by_layer[li].items():
                grid[r, e] = names.index(s)
        ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_title(f"{block}: scheme of each expert")
        ax.set_xlabel("expert (routed, then shared slices)")
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(len(layers)), [str(li) for li in layers])
    handles = [Patch(color=cmap(i), label=f"{s} ({get_scheme(s).bits_per_weight():g} b)") for i, s in
               enumerate(names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 5), frameon=False)


def _colour(i: int, n: int):
    from matplotlib import colormaps

    return colormaps["viridis"](i / max(n - 1, 1))


def _plan_maps(plan) -> dict[str, dict[int, dict[int, str]]]:
    maps: dict[str, dict[int, dict[int, str]]] = {"gate_up": {}, "down": {}}
    for lay in plan.layers:
        for ep in lay.experts:
            maps["gate_up"].setdefault(lay.layer, {})[ep.expert] = ep.gate
            maps["down"].setdefault(lay.layer, {})[ep.expert] = ep.down
    return maps


def plot_plan(plan, frontier: list[tuple[float, float, float]], chosen: int | None, path: str) -> None:
    """Precision map of ``plan`` and the L/T frontier the planner explored, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    _precision_axes(fig, axes[:2], _plan_maps(plan))
    ax = axes[2]
    ts = [t * 1e3 for _, t, _ in frontier]
    ls = [lv for lv, _, _ in frontier]
    ax.plot(ts, ls, "o-", color="0.4", label="frontier (fastest to most accurate)")
    s = plan.summary
    ax.plot([s["T"] * 1e3], [s["L"]], "*", color="crimson", markersize=16, label=f"plan (r={plan.r:g})")
    ax.set_xlabel("T: modelled expert GEMM time per forward (ms)")
    ax.set_ylabel("L: relative layer-output error (log)")
    ax.set_yscale("log")
    ax.set_title(f"accuracy/latency frontier at {plan.tokens} tokens per forward")
    ax.legend(fontsize=8)
    fig.suptitle(f"{plan.model}: {s['avg_bits']:.3f} avg bits (budget {plan.budget_bits:g}), method {plan.method}")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_served(stats, path: str, window: str = "sliding") -> None:
    """What a server serves (from its metrics): precision map and load share per expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    _precision_axes(fig, axes[:2], {b: stats.schemes.get(b, {}) for b in ("gate_up", "down")})
    shares = stats.shares.get(window, {})
    layers = sorted(shares)
    n_exp = max((len(v) for v in shares.values()), default=0)
    grid = np.zeros((len(layers), n_exp))
    for r, li in enumerate(layers):
        for e, v in shares[li].items():
            grid[r, e] = v
    im = axes[2].imshow(grid, cmap="Oranges", aspect="auto", interpolation="nearest", vmin=0)
    axes[2].set_title(f"load share per routed expert ({window} window)")
    axes[2].set_xlabel("routed expert")
    axes[2].set_ylabel("MoE layer")
    axes[2].set_yticks(range(len(layers)), [str(li) for li in layers])
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    bits = f"{stats.avg_bits:.3f} avg bits" if stats.avg_bits is not None else "served plan"
    fig.suptitle(f"served: {bits}")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
