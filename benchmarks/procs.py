"""Starting and stopping the servers the benchmarks measure (child processes)."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable


def wait_up(url: str, proc: subprocess.Popen, log: str, timeout: float = 600,
            each_poll: Callable[[], None] | None = None) -> float:  # fmt: skip
    """Seconds until ``url`` answers below 500; exits with the log's tail if the process dies or time runs out.
    ``each_poll`` runs before every poll (watching the server's log meanwhile)."""
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if each_poll is not None:
            each_poll()
        if proc.poll() is not None:
            raise SystemExit(f"server exited; {log}:\n" + open(log).read()[-4000:])
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"{url} not up in {timeout} s; log {log}")


def stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


# the launcher's lines that end its precompile step: done, failed, or done by an earlier launch (without
# the last, a warm launch was timed to cold_start.py's timeout: 601.5 s on the H200, ready after 30)
PRECOMPILE_ENDS = ("phase precompile", "precompiling the kernels failed", "precompiled by an earlier launch")


def precompile_settled(log_text: str) -> bool:
    """Whether an mxserve launch's log shows its precompile step over."""
    return any(m in log_text for m in PRECOMPILE_ENDS)


# the launcher's line that says what its precompile did: how many variants, recorded and compiled in how long
# (runtime/precompile.py), or that an earlier launch compiled them (launch.py)
PRECOMPILE_SAYS = re.compile(r"mxserve: ((?:compiled \d+ kernel variants|\d+ kernel variants compiled by|kernels "
                             r"precompiled by an earlier launch)[^\n]*)")


def precompile_summary(log_text: str) -> str | None:
    """What an mxserve launch's log says its precompile did, or None (another server, or the step not over)."""
    m = PRECOMPILE_SAYS.search(log_text)
    return m.group(1).strip() if m else None
