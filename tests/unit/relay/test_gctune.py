"""relay.gctune: the thresholds a serving node runs with, and its startup heap frozen."""

from __future__ import annotations

import json
import subprocess
import sys

from relay.gctune import THRESHOLDS


def test_tune_sets_the_thresholds_and_freezes_the_startup_heap() -> None:
    # In a process of its own: the test process keeps CPython's defaults.
    code = (
        "import gc, json; from relay.gctune import tune; tune(); "
        "print(json.dumps([list(gc.get_threshold()), gc.get_freeze_count()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    thresholds, frozen = json.loads(out.stdout)
    assert tuple(thresholds) == THRESHOLDS
    assert frozen > 1000  # the modules imported before serving
    # Full collections still happen: the last threshold is finite and nonzero.
    assert all(t > 0 for t in THRESHOLDS)
