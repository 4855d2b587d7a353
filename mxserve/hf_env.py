"""transformers and huggingface_hub kept quiet through their environment variables.

Both read these when first imported; setting them costs nothing, where importing transformers to
call its setters cost every `mxserve launch` 1.3 s before SGLang started (H200 host, 2026-12-04;
3.1 s under cProfile: benchmarks/startup_profile.py).
SGLang's processes get the user's own environment back (``user_env``): its logs stay its own.
"""

from __future__ import annotations

import os
import sys

QUIET = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
_SET: set[str] = set()  # the ones this process set (a user's own value is kept, and passed on)


def quiet() -> None:
    for key, value in QUIET.items():
        if key not in os.environ:
            os.environ[key] = value
            _SET.add(key)
    if "transformers" in sys.modules:  # imported already (the CLI called from Python): its own setters
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def user_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` without what ``quiet`` set."""
    return {k: v for k, v in env.items() if k not in _SET}
