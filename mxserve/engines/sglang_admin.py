"""The admin routes and the re-planning controller for the SGLang engine, in `mxserve launch`'s process.

SGLang's HTTP app is SGLang's own; mxserve adds nothing to it. So `mxserve
launch --engine sglang --replan-interval S` serves the admin routes
(server/admin.py, the embedded engine's) on a port of its own
(``--admin-port``, loopback unless ``--host`` says otherwise), and the
controller reaches SGLang through two narrow channels: it reads the routing
statistics and the served precision from SGLang's ``/metrics`` (the series
router_stats exports from the scheduler), and it applies plans with
engines/sglang_swap.swap_plan (SGLang's pause/update/continue endpoints).
"""

from __future__ import annotations

import secrets
import threading
import time
from types import SimpleNamespace

from mxserve.errors import MxServeError
from mxserve.online.ladder import Ladder
from mxserve.online.swap import SwapError, SwapReport
from mxserve.plan import Plan
from mxserve.served_stats import parse_metrics
from router_stats.metrics import BlockPrecision, Precision
from router_stats.windows import LayerStats, RoutingStats


class SGLangStats:
    """router_stats' view of a running SGLang engine, read from its /metrics."""

    def __init__(self, base_url: str, api_key: str | None, profile, budget: float, method: str):
        self.base_url, self.api_key = base_url.rstrip("/"), api_key
        self.profile, self.budget, self.method = profile, budget, method
        self._text = ""

    def _scrape(self) -> str:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            r = httpx.get(self.base_url + "/metrics", headers=headers, timeout=30)
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise MxServeError(f"cannot read SGLang's /metrics: {e}") from None
        self._text = r.text
        return r.text

    def fold(self) -> RoutingStats:
        st = parse_metrics(self._scrape())
        out = RoutingStats(time.time(), 0.0, 0.0, tokens_per_forward_ewma=st.tokens_per_forward or 0.0,
                           tokens_per_forward_window=st.tokens_per_forward or 0.0)
        for lay in self.profile.layers:
            n = lay.n_routed
            shares = {w: [st.shares.get(w, {}).get(lay.layer, {}).get(e, 0.0) for e in range(n)]
                      for w in ("sliding", "ewma")}
            counts = [int(st.tokens.get(lay.layer, {}).get(e, 0)) for e in range(n)]
            # a share of the routed slots times top-k is the frequency (tokens routed / tokens)
            freqs = {w: [s * lay.top_k for s in v] for w, v in shares.items()}
            out.layers.append(LayerStats(lay.layer, counts, int(st.layer_tokens.get(lay.layer, 0)), shares["sliding"],
                                         shares["ewma"], freqs["sliding"], freqs["ewma"]))
        return out

    latest = fold

    def precision(self) -> Precision:
        st = parse_metrics(self._text or self._scrape())
        blocks = [BlockPrecision(li, e, block, scheme, 0.0, 0)
                  for block, by_layer in sorted(st.schemes.items(), key=lambda kv: kv[0] != "gate_up")
                  for li, experts in by_layer.items() for e, scheme in experts.items()]
        blocks.sort(key=lambda b: (b.layer, b.expert, b.block != "gate_up"))
        return Precision(blocks, self.budget, self.method)

    def refresh_precision(self) -> None:
        self._scrape()


class SGLangSwapper:
    """Applies plans to a running SGLang engine (engines/sglang_swap.py)."""

    def __init__(self, base_url: str, api_key: str | None, ladder: Ladder, hidden: int):
        self.base_url, self.api_key, self.ladder, self.hidden = base_url, api_key, ladder, hidden

    def layers(self) -> list:
        """Shape-only stand-ins of the served layers (what plan validation reads), from the ladder."""
        out = []
        for lay in self.ladder.meta.layers:
            experts = []
            for e, shared in enumerate(lay["shared"]):
                two_i = self.ladder.gate_up_rows(lay["layer"], e)
                experts.append(SimpleNamespace(gate_up=SimpleNamespace(n=two_i, k=self.hidden),
                                               down=SimpleNamespace(n=self.hidden, k=two_i // 2), shared=shared))
            out.append(SimpleNamespace(layer_index=lay["layer"], experts_q=experts))
        return out

    def apply(self, current: Plan, plan: Plan) -> SwapReport:
        from mxserve.engines.sglang_swap import swap_plan

        out = swap_plan(self.base_url, plan, self.api_key)
        if out["outcome"] != "applied":
            raise SwapError(f"SGLang kept plan {out['plan_id']} (its log says why); the previous plan is serving")
        return SwapReport(len(plan.layers), out["paused_seconds"], [])


def start_admin_server(host: str, port: int, controller, stats, api_key: str | None) -> threading.Thread:
    """The admin routes on ``host:port`` in a thread of this process."""
    import uvicorn
    from fastapi import FastAPI, Request

    from mxserve.server.admin import add_admin_routes
    from mxserve.server.http_errors import error_response, install_error_handlers

    app = FastAPI(title="mxserve admin (SGLang engine)", version="0.1.0")
    install_error_handlers(app)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/mxserve"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given, f"Bearer {api_key}"):
                return error_response(401, "invalid or missing API key", "authentication_error",
                                      code="invalid_api_key")
        return await call_next(request)

    add_admin_routes(app, lambda: controller.plan, lambda: controller, stats)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="mxserve-admin", daemon=True)
    thread.start()
    return thread
