"""The search benches run end to end at a small size (they broke once, unnoticed, when schema v5
added columns their row generator did not fill): not timings, only that every step runs and the
bench's own equality checks hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.subprocess
def test_search_bench_runs_at_20k_rows_and_its_checks_hold():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "search.py"), "--n", "20000", "--add", "500", "--pairs", "50", "--queries", "10"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "exact top-10 equal True, BM25 top-50 equal True" in out, out[-3000:]
    assert "planted pairs found 50 of 50" in out, out[-3000:]
    assert "complete False" not in out, out[-3000:]


@pytest.mark.subprocess
def test_serve_bench_runs_at_5k_rows():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve.py"), "--n", "5000", "--queries", "10"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hybrid query median" in done.stdout, done.stdout[-3000:]
