"""Send a real signal to a running command once it has reached a given point (tests of pre-emption)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def signal_when_ready(cmd: list[str], *, cwd: Path, env: dict[str, str], ready: Callable[[], bool], sig: int,
                      group: bool = False, after_s: float = 0.0, what: str = "its work") -> subprocess.CompletedProcess:
    """Start ``cmd``; once ``ready()`` holds (polled every 50 ms, 300 s at most) wait ``after_s``, send ``sig`` to the
    process or, with ``group``, to its whole process group (as SLURM, ``timeout`` and a terminal's Ctrl-C do), and
    wait for it to exit. Fails the test if the command ends first; ``what`` names the point in that message."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=group)
    deadline = time.time() + 300
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            out, err = proc.communicate()
            pytest.fail(f"{Path(cmd[1]).name} ended (rc={proc.returncode}) before {what}:\n{err[-3000:]}")
        time.sleep(0.05)
    time.sleep(after_s)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
