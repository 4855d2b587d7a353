"""Loading Hugging Face MoE checkpoints (a local directory or a hub id) on the CPU or GPU."""

from __future__ import annotations

import os

import torch
from torch import nn

from mxserve.errors import MxServeError
from mxserve.models.adapters import moe_layers
from mxserve.models.configs import arch_spec, read_config
from mxserve.preflight import check_model_path


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    check_model_path(path)
    if os.path.isdir(path):
        read_config(path)  # a directory that is no model is named as such, not as a tokenizer problem
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise MxServeError(f"cannot load tokenizer of {path}: {str(e).splitlines()[0]}") from None


def load_config(path: str):
    """The transformers config of a supported model (MxServeError for a missing or unsupported one)."""
    from transformers import AutoConfig

    check_model_path(path)
    if os.path.isdir(path):
        read_config(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise MxServeError(f"cannot load model {path}: {str(e).splitlines()[0]}") from None
    arch_spec(config.model_type)
    return config


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A supported MoE model in eval mode; unsupported or non-MoE models are a clear error."""
    from transformers import AutoModelForCausalLM

    load_config(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise MxServeError(f"cannot load model {path}: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    moe_layers(model)  # fail early on a model without MoE blocks
    return model
