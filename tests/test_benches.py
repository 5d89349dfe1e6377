"""The benchmark programs run and print their tables (their numbers are not checked here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHES = Path(__file__).resolve().parent.parent / "benches"


def test_matcher_benchmark_prints_its_tables() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCHES / "matcher.py"), "--sizes", "300", "--seconds", "0.02",
         "--scan-sizes", "50"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    lines = out.splitlines()
    row = next(line for line in lines if line.startswith("| 300 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 10
    assert cells[5].endswith("x")  # Rust/reference ratio was measured
    assert any(line.startswith("| 50 |") for line in lines)
    assert any(line.startswith("Machine: ") for line in lines)


def test_fanout_benchmark_prints_a_row_per_transport() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCHES / "fanout.py"), "--subscribers", "20", "--sse", "5",
         "--longpoll", "5", "--messages", "10", "--rate", "50"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    assert "## fanout_1ch_30subs_100B" in out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] in ("websocket", "sse", "longpoll"):
            rows[cells[0]] = cells
    assert sorted(rows) == ["longpoll", "sse", "websocket"]
    assert [rows[t][1] for t in ("websocket", "sse", "longpoll")] == ["20", "5", "5"]
    for cells in rows.values():
        assert int(cells[2].replace(",", "")) > 0  # deliveries/s was measured
        assert cells[4].endswith("ms")
    assert any(line.startswith("Machine: ") for line in out.splitlines())


def test_pgoutput_benchmark_prints_its_table() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCHES / "pgoutput.py"), "--changes", "300", "--seconds", "0.02",
         "--subscriptions", "20"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    assert "## pgoutput_10col_60i30u10d" in out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] in ("decode_many", "decode", "decode+match+json"):
            rows[cells[0]] = cells
    assert sorted(rows) == ["decode", "decode+match+json", "decode_many"]
    for cells in rows.values():
        assert cells[2].endswith(" ns")
        assert cells[4].endswith("x")  # Rust/reference ratio was measured
    assert any(line.startswith("Machine: ") for line in out.splitlines())


def test_fanout_suite_quick_compares_pyrt_with_its_peers(tmp_path: Path) -> None:
    """pyrt, Nchan and python-socketio, the Rust load generator, ratios and the plot."""
    png = tmp_path / "fanout.png"
    # scripts/test builds the load generator before pytest; here cargo finds it up to date.
    out = subprocess.run(
        [sys.executable, str(BENCHES / "suite.py"), "--quick", "--plot", str(png)],
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout  # fmt: skip
    sections = {}
    for block in out.split("\n## ")[1:]:
        name, _, body = block.partition("\n")
        sections[name.strip()] = body
    assert sorted(sections) == [
        "fanout_1ch_20subs_100B", "fanout_1ch_50subs_100B", "fanout_5ch_10subs_100B",
        "idle_200conns",
    ]  # fmt: skip
    for name, body in sections.items():
        rows = {}
        for line in body.splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0] in ("pyrt", "Nchan", "python-socketio"):
                rows[cells[0]] = cells
        assert sorted(rows) == ["Nchan", "pyrt", "python-socketio"], name
        if name.startswith("idle_"):
            for cells in rows.values():
                assert cells[1] == "200"  # every connection was made
                assert cells[4].endswith("KiB")
            assert rows["pyrt"][5] == "1.00x"
            assert "pyrt/Nchan memory per connection" in body
        else:
            for cells in rows.values():
                assert int(cells[1].replace(",", "")) > 0  # deliveries/s was measured
                assert cells[2].endswith("x")  # the pyrt/target ratio
                assert re.match(r"[\d.,]+ ms / [\d.,]+ ms", cells[4])  # p50 / p99
                assert cells[-1] == "0"  # no errors, nothing missing
            assert rows["pyrt"][2] == "1.00x"
            assert "Ratios: pyrt/Nchan throughput" in body
            assert "pyrt/python-socketio throughput" in body
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("Machine: ") for line in out.splitlines())
    assert any(line.startswith("Peers: nginx/") for line in out.splitlines())


def test_history_budget_benchmark_prints_rss_and_history_bytes() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCHES / "history_budget.py"), "--channels", "3", "--messages", "10",
         "--size", "20000", "--history-max-bytes", "100000"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    assert "## history_3ch_10msgs_20KB" in out
    row = next(line for line in out.splitlines() if line.startswith("| 97.7 KiB |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 8
    assert cells[1].startswith("585.9 KiB in ")  # 30 x 20 KB published
    assert float(cells[2].removesuffix(" KiB")) <= 97.7  # history kept to 100,000 bytes
    assert int(cells[4]) > 0  # the budget evicted
    assert all(c.endswith("MiB") for c in cells[5:])
    assert any(line.startswith("Machine: ") for line in out.splitlines())
