"""Text data: calibration windows and evaluation token streams."""

from __future__ import annotations

import os

import torch

from mxserve.errors import MxServeError


def read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise MxServeError(f"data file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise MxServeError(f"cannot read data file {path}: {e}") from None
    if not text.strip():
        raise MxServeError(f"data file {path} is empty")
    return text


def tokenize_file(path: str, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """The whole file as one token stream (documents keep their <|endoftext|> separators)."""
    text = read_text(path)
    if max_tokens is not None:
        # ~3 characters per token is a safe lower bound for BPE on English/code;
        # tokenizing only a prefix keeps large files fast.
        text = text[: max_tokens * 8]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    t = torch.tensor(ids, dtype=torch.long)
    return t if max_tokens is None else t[:max_tokens]


def calibration_windows(paths: list[str], tokenizer, nsamples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows of ``seq_len`` tokens, drawn evenly from the files."""
    if not paths:
        raise MxServeError("no calibration data given")
    g = torch.Generator().manual_seed(seed)
    windows = []
    per_file = [nsamples // len(paths) + (i < nsamples % len(paths)) for i in range(len(paths))]
    for path, n in zip(paths, per_file):
        stream = tokenize_file(path, tokenizer)
        if stream.numel() <= seq_len:
            raise MxServeError(f"{path} has {stream.numel()} tokens, fewer than one window of {seq_len}")
        starts = torch.randint(0, stream.numel() - seq_len, (n,), generator=g)
        windows += [stream[s : s + seq_len] for s in starts.tolist()]
    return torch.stack(windows)
