"""Perplexity on held-out text.

Protocol: the file is tokenized as one stream; the first ``max_tokens`` tokens
are cut into non-overlapping windows of ``ctx`` tokens (stride = ctx, the last
partial window dropped); each window is scored on its own, predicting tokens
2..ctx from their prefix within the window. ppl = exp(mean NLL).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm import tqdm

from mxserve.data import tokenize_file
from mxserve.errors import MxServeError


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    path: str,
    ctx: int = 512,
    max_tokens: int = 32768,
    batch: int = 8,
    progress: bool = True,
) -> tuple[float, int]:
    """(perplexity, number of predicted tokens) of ``model`` on the text file ``path``."""
    ids = tokenize_file(path, tokenizer, max_tokens)
    nwin = ids.numel() // ctx
    if nwin == 0:
        raise MxServeError(f"{path}: {ids.numel()} tokens, fewer than one window of {ctx}")
    windows = ids[: nwin * ctx].view(nwin, ctx)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, nwin, batch), desc=f"eval {path.rsplit('/', 1)[-1]}", leave=False, disable=not progress):
        x = windows[i : i + batch].to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += x[:, 1:].numel()
    return math.exp(nll / count), count
