"""The admin routes, the same on both engines: GET/POST /mxserve/plan, POST /mxserve/replan, GET /mxserve/stats.

The embedded engine adds them to its OpenAI app; on the SGLang engine `mxserve
launch` serves them from its own process (engines/sglang_admin.py), with a
controller that reaches SGLang's scheduler through SGLang's weight-update
endpoints. ``stats`` needs ``latest()`` (routing statistics with ``to_json``)
and ``precision()`` (router_stats.Precision).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import FastAPI
from pydantic import BaseModel, Field

from mxserve.errors import MxServeError
from mxserve.online.swap import PlanRejected
from mxserve.plan import Plan
from mxserve.server.http_errors import APIError, error_responses


class ReplanRequest(BaseModel):
    force: bool = Field(default=True, description="apply a different plan even if not better by the margin or "
                                                  "sooner than the minimum interval")


def add_admin_routes(app: FastAPI, current_plan: Callable, controller: Callable, stats) -> None:
    """``current_plan()`` is the plan served now (or None); ``controller()`` the re-planner (or None)."""

    @app.get("/mxserve/plan", responses=error_responses(401, 404))
    async def get_plan():
        """The plan served now: every block's scheme (JSON form of plan.py)."""
        p = current_plan()
        if p is None:
            raise APIError(404, "this server was started without a plan", code="no_plan")
        return p.to_json()

    def need_controller():
        c = controller()
        if c is None:
            raise APIError(409, "re-planning is not enabled on this server: launch an unquantized model with "
                                "--budget and --replan-interval (0 for on-demand only)", code="replan_disabled")
        return c

    @app.post("/mxserve/replan", responses=error_responses(400, 401, 409))
    async def post_replan(req: ReplanRequest | None = None):
        """Re-solve for the observed traffic now and swap if the plan changes (see the controller)."""
        c = need_controller()
        out = await asyncio.to_thread(c.replan, True if req is None else req.force)
        return out.to_json()

    @app.post("/mxserve/plan", responses=error_responses(400, 401, 409, 422))
    async def post_plan(body: dict):
        """Apply an uploaded plan (plan.py's JSON form) after validating it against the model and budget."""
        c = need_controller()
        try:
            new = Plan.from_json(body)
        except (KeyError, TypeError, ValueError, MxServeError) as e:
            raise APIError(400, f"not a valid mxmoe plan: {e}", param="plan", code="invalid_plan") from None
        try:
            out = await asyncio.to_thread(c.upload, new)
        except PlanRejected as e:
            raise APIError(422, str(e), param="plan", code="plan_rejected") from None
        return out.to_json()

    @app.get("/mxserve/stats", responses=error_responses(401))
    async def get_stats():
        """Windowed routing statistics (router_stats) and the precision served now."""
        latest = await asyncio.to_thread(stats.latest)
        p = await asyncio.to_thread(stats.precision)
        return {"routing": latest.to_json(),
                "precision": {"plan_id": p.plan_id, "avg_bits": p.avg_bits, "budget_bits": p.budget_bits,
                              "method": p.method,
                              "blocks": [[b.layer, b.expert, b.block, b.scheme] for b in p.blocks]}}
