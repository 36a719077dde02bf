"""Child processes the local tools start (Redis servers, `relay dev` nodes, the WAN proxy,
benchmark servers): stopping one politely, then for sure."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def stop_child(
    proc: subprocess.Popen[Any], timeout_s: float, sig: signal.Signals = signal.SIGTERM
) -> None:
    """Send ``sig`` to ``proc`` if it still runs and reap it; SIGKILL it if it has not
    exited after ``timeout_s``. Returns once it is gone; the caller closes its pipes."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
