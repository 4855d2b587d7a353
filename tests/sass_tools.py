"""Reading the sm_90 code of a kernel on a machine without a GPU: compile for the target, disassemble
with the cuobjdump that Triton's wheel carries."""

import os
import subprocess
import sys

import pytest


def in_fresh_process(module: str, call: str) -> str:
    """What ``module.<call>`` returns (a SASS listing), run in a fresh process without TRITON_INTERPRET:
    once a process has run interpreted kernels (any test before, in this file or, under pytest-xdist,
    another one), the interpreter's patches of Triton's language break a compile."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([here, os.path.dirname(here), env.get("PYTHONPATH", "")])
    code = f"import {module}; print({module}.{call}, end='')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if "no cuobjdump" in run.stdout + run.stderr:
        pytest.skip("this Triton wheel has no cuobjdump to read the SASS with")
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def disassemble(compiled, tag: str) -> str:
    """The SASS of a compiled kernel (cuobjdump from the Triton wheel)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("this Triton wheel has no cuobjdump to read the SASS with")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mx_sass_{os.getpid()}_{tag}.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    try:
        return subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
