"""transformers kept quiet by environment (mxserve/hf_env.py), and SGLang given the user's environment."""

import os
import subprocess
import sys

from mxserve import hf_env
from mxserve.engines import sglang_launch


def test_quiet_takes_effect_in_transformers_imported_later():
    code = ("from mxserve import hf_env; hf_env.quiet(); import logging, transformers; "
            "from transformers.utils import logging as hf; "
            "print(hf.get_verbosity() == logging.ERROR, hf.is_progress_bar_enabled())")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in hf_env.QUIET}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_a_users_own_setting_is_kept_and_passed_on(monkeypatch, tmp_path):
    monkeypatch.setattr(hf_env, "_SET", set())
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    hf_env.quiet()
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    env = sglang_launch.plugin_env(str(tmp_path))  # SGLang's processes: as the user started mxserve
    assert env["TRANSFORMERS_VERBOSITY"] == "info" and "HF_HUB_DISABLE_PROGRESS_BARS" not in env
