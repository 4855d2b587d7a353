"""Calibration's GPTQ batching: how many blocks go through one column loop is a matter of memory only."""

import torch

import mxserve.calibrate as calibrate
from mxserve.models.layerwise import free_bytes
from mxserve.schemes import parse_schemes


def test_gptq_batches_follow_free_memory(monkeypatch):
    jobs = list(range(10))
    per_block = 4 * (6 * 256 * 256 + 5 * 64 * 256)
    monkeypatch.setattr(calibrate, "free_bytes", lambda device: 2 * 3 * per_block)  # half of it: 3 blocks
    assert calibrate.gptq_batches(jobs, 64, 256, torch.device("cpu")) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    monkeypatch.setattr(calibrate, "free_bytes", lambda device: 0)
    assert calibrate.gptq_batches(jobs, 64, 256, torch.device("cpu")) == [[j] for j in jobs]
    assert free_bytes(torch.device("cpu")) > 0


def test_profile_does_not_depend_on_the_batches(tiny_models, calib_text, monkeypatch):
    """One block per GPTQ loop (memory short) and all of a layer's gate and up in one loop give
    the same block errors: the loop treats the blocks of a batch independently."""
    schemes = parse_schemes("bf16,w4a16g128,w2a16g128")
    kw = dict(method="gptq-had", nsamples=4, seq_len=64, progress=False)
    whole = calibrate.calibrate(str(tiny_models["qwen2_moe"]), [str(calib_text)], schemes, **kw)
    monkeypatch.setattr(calibrate, "free_bytes", lambda device: 0)
    one_by_one = calibrate.calibrate(str(tiny_models["qwen2_moe"]), [str(calib_text)], schemes, **kw)
    errs = [[e.err for e in lay.experts] for lay in whole.layers]
    assert errs == [[e.err for e in lay.experts] for lay in one_by_one.layers]
    assert any(v > 0 for lay in errs for e in lay for b in e.values() for v in b.values())
