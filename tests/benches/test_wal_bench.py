"""benches/wal_latency.py runs end to end and prints its table (its numbers are not checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benches" / "wal_latency.py"


@pytest.mark.slow
def test_wal_latency_benchmark_prints_its_table() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH), "--rates", "100", "--subscribers", "20", "--seconds", "1",
         "--warmup", "0.5", "--filters", "shared,distinct"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    assert "## wal_latency_20subs_tenth" in out
    rows = [line for line in out.splitlines() if line.startswith(("| shared", "| distinct"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "100"
        delivered, expected = cells[6].split(" (")[0].split(" / ")
        assert delivered == expected  # every row reached its tenth of the subscribers
