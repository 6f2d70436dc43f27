"""The Moondream benches run: bench/gpu.py's --smoke setting on CPU (the full-size GPU run cannot be
checked without a GPU; this proves the script, its model builder and both loops work end to end)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.subprocess
def test_gpu_bench_smoke_runs_on_cpu():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--no-compile"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "engine, eager" in out and "one at a time" in out and "images/s" in out
    # Fixed answer lengths: 4 images x (a 6-token caption + 5 probes x 2 tokens).
    assert "64 tokens" in out
    assert "ids equal to the loop's: True" in out
    assert "settings: max_sequences 12 (2 image rows x 6 prompts)" in out
