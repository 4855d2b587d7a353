"""OpenAI-compatible HTTP API over the embedded engine (FastAPI).

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (both with
``stream``), /health, /metrics (router_stats' series and the server's own),
and the admin routes /mxserve/plan and /mxserve/stats. Errors use OpenAI's
JSON shape ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
status; a bad request never takes the server down. With an API key set, every
/v1 and /mxserve route and /metrics need ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, field_validator

from mxserve.engines.embedded import EmbeddedEngine, SamplingParams
from mxserve.plan import Plan
from mxserve.server.admin import add_admin_routes
from mxserve.server.http_errors import APIError, error_response, error_responses, install_error_handlers
from mxserve.server.settings import StatsSettings
from router_stats import MxMetrics, RouterStats

PROTECTED = ("/v1", "/mxserve", "/metrics")  # what needs the API key when one is set
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class StreamOptions(BaseModel):
    include_usage: bool = False  # OpenAI's: a last chunk with the usage and no choices


class _Sampling(BaseModel):
    model: str = Field(description="the served model's name (GET /v1/models)")
    max_tokens: int | None = Field(default=None)
    temperature: float = 1.0
    top_p: float = 1.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v):
        if v is not None and v < 1:
            raise ValueError("max_tokens must be at least 1")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if not 0 <= v <= 2:
            raise ValueError("temperature must be within [0, 2]")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        if not 0 < v <= 1:
            raise ValueError("top_p must be within (0, 1]")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v


class CompletionRequest(_Sampling):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)




def create_app(engine: EmbeddedEngine, served_model_name: str, api_key: str | None = None,
               default_max_tokens: int = 256, plan: Plan | None = None,
               stats_settings: StatsSettings | None = None, online=None) -> FastAPI:
    """The app; ``online`` (mxserve.online.setup.OnlineSetup) adds re-planning and plan uploads."""
    st = stats_settings or StatsSettings()
    registry = CollectorRegistry()
    metrics = MxMetrics(registry)

    def current_plan() -> Plan | None:
        return controller.plan if controller is not None else plan

    def plan_meta() -> tuple[float, str]:
        p = current_plan()
        return (p.budget_bits, p.method) if p is not None else (0.0, "")

    stats = RouterStats(lambda: [m.mx for m in engine.layers()], metrics, plan_meta,
                        interval=st.interval, window=st.window, halflife=st.halflife)
    controller = online.controller(plan, [m.mx for m in engine.layers()], engine.lock, stats, metrics) \
        if online is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        stats.fold()  # the precision series exist before the first scrape
        stats.start()
        if controller is not None:
            controller.start()
        yield
        if controller is not None:
            controller.stop()
        stats.stop()

    app = FastAPI(title="mxserve", version="0.1.0", lifespan=lifespan)

    def openapi() -> dict:
        """FastAPI's schema, plus the served model's name as the one valid ``model``."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for name in ("CompletionRequest", "ChatRequest"):
                schema["components"]["schemas"][name]["properties"]["model"]["enum"] = [served_model_name]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.state.stats = stats
    app.state.controller = controller
    requests_total = Counter("mxserve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                             registry=registry)
    latency = Histogram("mxserve_request_duration_seconds", "Time to complete a generation request",
                        ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
    tokens_total = Counter("mxserve_generated_tokens", "Generated tokens", registry=registry)
    running = Gauge("mxserve_running_requests", "Requests in the decode batch", registry=registry)
    running.set_function(lambda: engine.running)
    tok = engine.tokenizer

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        path = request.url.path
        if api_key and path.startswith(PROTECTED):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given, f"Bearer {api_key}"):
                requests_total.labels(path, "401").inc()
                return error_response(401, "invalid or missing API key", "authentication_error",
                                      code="invalid_api_key")
        response = await call_next(request)
        requests_total.labels(path, str(response.status_code)).inc()
        return response

    install_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", responses=error_responses(401))
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    add_admin_routes(app, current_plan, lambda: controller, stats)

    @app.get("/v1/models", responses=error_responses(401))
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "mxserve", "max_model_len": engine.max_model_len}]}

    def check(req: _Sampling, prompt_ids: list[int]) -> SamplingParams:
        if req.model != served_model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{served_model_name!r}", param="model", code="model_not_found")
        max_tokens = req.max_tokens if req.max_tokens is not None else default_max_tokens
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) + max_tokens > engine.max_model_len:
            raise APIError(400, f"this model's maximum context length is {engine.max_model_len} tokens; the "
                                f"request has {len(prompt_ids)} prompt tokens and asks for {max_tokens} more",
                           param="max_tokens", code="context_length_exceeded")
        if any(t < 0 or t >= len(tok) for t in prompt_ids):
            raise APIError(400, "prompt token id out of the vocabulary", param="prompt")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return SamplingParams(max_tokens, req.temperature, req.top_p, stop, req.seed)

    def run(prompt_ids: list[int], params: SamplingParams, endpoint: str) -> tuple[str, str, int]:
        t0 = time.perf_counter()
        ids, reason = [], "length"
        for item in engine.generate(prompt_ids, params):
            if isinstance(item, str):
                reason = item
            else:
                ids.append(item)
        tokens_total.inc(len(ids))
        latency.labels(endpoint).observe(time.perf_counter() - t0)
        return _trim(tok.decode(ids, skip_special_tokens=True), params.stop), reason, len(ids)

    async def stream(prompt_ids, params, make_chunk, endpoint: str, usage: bool = False) -> AsyncIterator[str]:
        """SSE chunks; the engine runs in a thread and hands tokens over through a queue. ``usage``: a last chunk
        with the token counts and no choices (``stream_options.include_usage``)."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def produce():
            try:
                for item in engine.generate(prompt_ids, params):
                    loop.call_soon_threadsafe(q.put_nowait, item)
            except BaseException as e:  # noqa: BLE001
                loop.call_soon_threadsafe(q.put_nowait, e)
            loop.call_soon_threadsafe(q.put_nowait, None)

        threading.Thread(target=produce, daemon=True).start()
        ids: list[int] = []
        sent = ""
        reason = "length"
        yield _sse(make_chunk(None, None, first=True))
        while True:
            item = await q.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                yield _sse({"error": {"message": str(item), "type": "server_error"}})
                break
            if isinstance(item, str):
                reason = item
                continue
            ids.append(item)
            text = _trim(tok.decode(ids, skip_special_tokens=True), params.stop)
            if text.endswith("\ufffd"):
                continue  # an incomplete UTF-8 sequence: wait for the next token
            delta, sent = text[len(sent):], text
            if delta:
                yield _sse(make_chunk(delta, None))
        tokens_total.inc(len(ids))
        latency.labels(endpoint).observe(time.perf_counter() - t0)
        yield _sse(make_chunk(None, reason))
        if usage:
            last = make_chunk(None, None)
            last["choices"] = []
            last["usage"] = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids),
                             "total_tokens": len(prompt_ids) + len(ids)}
            yield _sse(last)
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions", responses=error_responses(400, 401, 404))
    async def completions(req: CompletionRequest):
        prompt_ids = req.prompt if isinstance(req.prompt, list) else tok(req.prompt, add_special_tokens=False)[
            "input_ids"]
        params = check(req, prompt_ids)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, reason, first=False):
            return {"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}

        if req.stream:
            return StreamingResponse(_skip_first(stream(prompt_ids, params, chunk, "/v1/completions",
                                                        req.include_usage)),
                                     media_type="text/event-stream")
        text, reason, n = await asyncio.to_thread(run, prompt_ids, params, "/v1/completions")
        body = chunk(text, reason)
        body["usage"] = {"prompt_tokens": len(prompt_ids), "completion_tokens": n,
                         "total_tokens": len(prompt_ids) + n}
        return body

    @app.post("/v1/chat/completions", responses=error_responses(400, 401, 404))
    async def chat(req: ChatRequest):
        try:
            prompt_ids = tok.apply_chat_template([m.model_dump() for m in req.messages], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        except Exception as e:  # noqa: BLE001 - a template that rejects the messages is the caller's error
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        if isinstance(prompt_ids, dict):
            prompt_ids = prompt_ids["input_ids"]
        params = check(req, list(prompt_ids))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, reason, first=False):
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served_model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

        if req.stream:
            return StreamingResponse(stream(list(prompt_ids), params, chunk, "/v1/chat/completions", req.include_usage),
                                     media_type="text/event-stream")
        text, reason, n = await asyncio.to_thread(run, list(prompt_ids), params, "/v1/chat/completions")
        return {"id": rid, "object": "chat.completion", "created": created, "model": served_model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": n,
                          "total_tokens": len(prompt_ids) + n}}

    return app


def _trim(text: str, stop: list[str]) -> str:
    for s in stop:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _skip_first(gen: AsyncIterator[str]) -> AsyncIterator[str]:
    """Completions streams have no role chunk: drop the first one."""
    first = True
    async for item in gen:
        if first:
            first = False
            continue
        yield item
