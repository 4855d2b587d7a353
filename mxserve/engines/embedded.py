"""The embedded engine: a transformers model whose MoE blocks are mxserve runtime layers.

One worker thread owns the model and serves requests from a queue, one at a
time, with a KV cache per request; tokens are handed to the caller as they are
produced (streaming). Greedy decoding with an all-bf16 plan gives exactly what
plain transformers gives. Requests are not batched together yet (see README).
"""

from __future__ import annotations

import inspect
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from mxserve.checkpoint import runtime_layers


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    out: queue.Queue  # token ids, then a final (finish_reason,) tuple or an exception
    cancelled: threading.Event = field(default_factory=threading.Event)


class EmbeddedEngine:
    def __init__(self, model: nn.Module, tokenizer, max_model_len: int):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.device = next(model.parameters()).device
        eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.lock = threading.Lock()  # held while the model runs (plan swaps take it too)
        # transformers renamed past_key_values to cache (5.2x); take whichever this version has
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._loop, name="mxserve-engine", daemon=True)
        self._worker.start()  # last: the worker reads everything above

    # -- public API -------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int | str]:
        """Yield token ids as they are produced, then the finish reason ("stop" or "length")."""
        req = _Request(list(prompt_ids), params, queue.Queue())
        self._queue.put(req)
        try:
            while True:
                item = req.out.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, tuple):
                    yield item[0]
                    return
                yield item
        finally:
            req.cancelled.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._worker.join(timeout=10)

    def layers(self):
        return runtime_layers(self.model)

    # -- worker -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            req = self._queue.get()
            if req is None:
                return
            try:
                with self.lock:
                    reason = self._run(req)
                req.out.put((reason,))
            except BaseException as e:  # noqa: BLE001 - the request gets the error, the engine lives on
                req.out.put(e)

    @torch.no_grad()
    def _run(self, req: _Request) -> str:
        from transformers import DynamicCache

        p = req.params
        gen = torch.Generator(device="cpu")
        if p.seed is not None:
            gen.manual_seed(p.seed)
        cache = DynamicCache()
        ids = torch.tensor([req.prompt_ids], device=self.device)
        produced: list[int] = []
        text_so_far = ""
        for _ in range(p.max_tokens):
            if req.cancelled.is_set():
                return "abort"
            out = self.model(input_ids=ids, use_cache=True, **{self._cache_kw: cache})
            logits = out.logits[0, -1].float().cpu()
            tok = _sample(logits, p, gen)
            produced.append(tok)
            if tok in self.eos_ids:
                return "stop"
            req.out.put(tok)
            if p.stop:
                text_so_far = self.tokenizer.decode(produced, skip_special_tokens=True)
                if any(s in text_so_far for s in p.stop):
                    return "stop"
            ids = torch.tensor([[tok]], device=self.device)
        return "length"


def _sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    if p.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < p.top_p
        probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
        probs /= probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))
