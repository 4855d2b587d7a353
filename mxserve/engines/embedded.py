"""The embedded engine: a transformers model whose MoE blocks are mxserve runtime layers.

One worker thread owns the model and batches requests continuously: a new
request is prefilled on its own, then joins the running batch, and every step
decodes one token for every running request in one forward pass; a finished
request leaves at once. The batch shares one KV cache, left-padded to the
longest sequence, with an attention mask and explicit positions, so each
sequence computes what it would alone. Tokens are handed to their callers as
they are produced (streaming). Greedy decoding with an all-bf16 plan gives
exactly what plain transformers gives.
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


@dataclass
class _Running:
    """A request in the batch: what it produced and where its next token goes."""

    req: _Request
    gen: torch.Generator
    produced: list[int]
    pos: int  # position of the next token fed to the model


class _Batch:
    """The running requests and their shared, left-padded KV cache."""

    def __init__(self):
        self.rows: list[_Running] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [B, L]: 1 for real tokens, 0 for left padding

    def add(self, row: _Running, cache) -> None:
        n = cache.get_seq_length()
        mask = torch.ones(1, n, dtype=torch.long, device=cache.layers[0].keys.device)
        if not self.rows:
            self.rows, self.cache, self.mask = [row], cache, mask
            return
        b = self.mask.shape[1]
        if n < b:
            _pad_left(cache, b - n)
            mask = torch.nn.functional.pad(mask, (b - n, 0))
        elif n > b:
            _pad_left(self.cache, n - b)
            self.mask = torch.nn.functional.pad(self.mask, (n - b, 0))
        for mine, new in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([mine.keys, new.keys])
            mine.values = torch.cat([mine.values, new.values])
        self.mask = torch.cat([self.mask, mask])
        self.rows.append(row)

    def keep(self, alive: list[int]) -> None:
        """Keep only rows ``alive``; drop cache columns that are padding in every remaining row."""
        if len(alive) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in alive]
        if not self.rows:
            self.cache = self.mask = None
            return
        idx = torch.tensor(alive, device=self.mask.device)
        first = int(self.mask[idx].argmax(dim=1).min())  # earliest real token of any row
        self.mask = self.mask[idx, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx, :, first:]
            layer.values = layer.values[idx, :, first:]


def _pad_left(cache, n: int) -> None:
    for layer in cache.layers:
        layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, n, 0))
        layer.values = torch.nn.functional.pad(layer.values, (0, 0, n, 0))


def _batchable(cache) -> bool:
    """Only plain growing caches can be padded and stacked (no sliding windows, no state)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


class EmbeddedEngine:
    def __init__(self, model: nn.Module, tokenizer, max_model_len: int, max_running_requests: int = 16):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_running = max_running_requests
        self._can_batch: bool | None = None  # known after the first prefill (see _batchable)
        self._batch = _Batch()
        self.peak_running = 0  # most requests decoded in one step so far
        self.device = next(model.parameters()).device
        eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.lock = threading.Lock()  # held while the model runs a step (plan swaps take it too)
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
    @property
    def running(self) -> int:
        """Requests being decoded now."""
        return len(self._batch.rows)

    def _loop(self) -> None:
        batch = self._batch
        while not self._stop.is_set():
            # admit waiting requests (block only when nothing runs)
            limit = self.max_running if self._can_batch is not False else 1
            while len(batch.rows) < limit:
                try:
                    req = self._queue.get(block=not batch.rows)
                except queue.Empty:
                    break
                if req is None:
                    for row in batch.rows:
                        row.req.out.put(("abort",))
                    return
                try:
                    self._admit(req, batch)
                except BaseException as e:  # noqa: BLE001 - this request gets the error, the engine lives on
                    req.out.put(e)
                if self._can_batch is False:
                    break  # this model's cache cannot be stacked: one request at a time
            if batch.rows:
                try:
                    self._step(batch)
                except BaseException as e:  # noqa: BLE001 - the running requests get the error
                    for r in batch.rows:
                        r.req.out.put(e)
                    batch.keep([])

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, cache, **kw) -> torch.Tensor:
        with self.lock:
            out = self.model(input_ids=ids, use_cache=True, **{self._cache_kw: cache}, **kw)
        return out.logits[:, -1].float().cpu()

    def _admit(self, req: _Request, batch: _Batch) -> None:
        """Prefill one request alone; it joins the batch unless its first token finishes it."""
        from transformers import DynamicCache

        gen = torch.Generator(device="cpu")
        if req.params.seed is not None:
            gen.manual_seed(req.params.seed)
        row = _Running(req, gen, [], len(req.prompt_ids))
        cache = DynamicCache()
        logits = self._forward(torch.tensor([req.prompt_ids], device=self.device), cache)
        if self._can_batch is None:
            self._can_batch = _batchable(cache)
        if not self._emit(row, logits[0]):
            batch.add(row, cache)

    def _step(self, batch: _Batch) -> None:
        """One decode step for every running request."""
        alive = [i for i, r in enumerate(batch.rows) if not r.req.cancelled.is_set()]
        batch.keep(alive)
        if not batch.rows:
            return
        self.peak_running = max(self.peak_running, len(batch.rows))
        ids = torch.tensor([[r.produced[-1]] for r in batch.rows], device=self.device)
        pos = torch.tensor([[r.pos] for r in batch.rows], device=self.device)
        ones = torch.ones(len(batch.rows), 1, dtype=torch.long, device=self.device)
        batch.mask = torch.cat([batch.mask, ones], dim=1)
        logits = self._forward(ids, batch.cache, attention_mask=batch.mask, position_ids=pos)
        alive = []
        for i, r in enumerate(batch.rows):
            r.pos += 1
            if not self._emit(r, logits[i]):
                alive.append(i)
        batch.keep(alive)

    def _emit(self, row: _Running, logits: torch.Tensor) -> bool:
        """Sample the next token and hand it out; True when the request is finished."""
        p = row.req.params
        tok = _sample(logits, p, row.gen)
        row.produced.append(tok)
        if tok in self.eos_ids:
            row.req.out.put(("stop",))
            return True
        row.req.out.put(tok)
        if p.stop and any(s in self.tokenizer.decode(row.produced, skip_special_tokens=True) for s in p.stop):
            row.req.out.put(("stop",))
            return True
        if len(row.produced) >= p.max_tokens:
            row.req.out.put(("length",))
            return True
        return False


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
