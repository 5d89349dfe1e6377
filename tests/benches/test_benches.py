"""The benchmark programs run and print their tables (their numbers are not checked here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

BENCHES = Path(__file__).resolve().parents[2] / "benches"


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


def _suite_rows(body: str) -> dict[str, list[str]]:
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("pyrt", "Nchan", "python-socketio"):
            rows[cells[0]] = cells
    return rows


def test_fanout_suite_quick_compares_pyrt_with_its_peers(tmp_path: Path) -> None:
    """pyrt, Nchan and python-socketio, the Rust load generator, ratios and the plot; pyrt
    publishes over HTTP by default, as Nchan does, and the tables say so."""
    png, results = tmp_path / "fanout.png", tmp_path / "results.json"
    # scripts/test builds the load generator before pytest; here cargo finds it up to date.
    out = subprocess.run(
        [sys.executable, str(BENCHES / "suite.py"), "--quick", "--plot", str(png),
         "--json", str(results)],
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout  # fmt: skip
    assert "pyrt's publisher: HTTP POST (like for like with Nchan)" in out
    sections = {}
    for block in out.split("\n## ")[1:]:
        name, _, body = block.partition("\n")
        sections[name.strip()] = body
    assert sorted(sections) == [
        "fanout_1ch_20subs_100B", "fanout_1ch_50subs_100B", "fanout_5ch_10subs_100B",
        "idle_200conns",
    ]  # fmt: skip
    for name, body in sections.items():
        rows = _suite_rows(body)
        assert sorted(rows) == ["Nchan", "pyrt", "python-socketio"], name
        if name.startswith("idle_"):
            for cells in rows.values():
                assert cells[1] == "200"  # every connection was made
                assert cells[4].endswith("KiB")
            assert rows["pyrt"][5] == "1.00x"
            assert "pyrt/Nchan memory per connection" in body
        else:
            assert rows["pyrt"][1] == rows["Nchan"][1] == "HTTP POST"  # like for like
            assert rows["python-socketio"][1] == "pipelined over one WebSocket"
            for cells in rows.values():
                assert int(cells[2].replace(",", "")) > 0  # deliveries/s was measured
                assert cells[3].endswith("x")  # the pyrt/target ratio
                assert re.match(r"[\d.,]+ ms / [\d.,]+ ms", cells[5])  # p50 / p99
                assert cells[-1] == "0"  # no errors, nothing missing
            assert rows["pyrt"][3] == "1.00x"
            assert "Ratios (pyrt's publisher: HTTP POST): pyrt/Nchan throughput" in body
            assert "pyrt/python-socketio throughput" in body
    # What the load generator itself reported: pyrt's messages went to /api/publish (a
    # refused request would be an error), every one delivered to every subscriber.
    report = json.loads(results.read_text())
    for name in sections:
        if not name.startswith("idle_"):
            pyrt = report[name]["pyrt"]
            assert pyrt["publisher"] == pyrt["report"]["publisher"] == "http"
            assert pyrt["report"]["errors"] == 0
            peak = pyrt["report"]["peak"]
            assert peak["delivered"] == peak["expected"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("Machine: ") for line in out.splitlines())
    assert any(line.startswith("Peers: nginx/") for line in out.splitlines())


def test_fanout_suite_runs_pyrt_with_its_pipelined_publisher(tmp_path: Path) -> None:
    """`--pyrt-publisher ws`: publications pipelined over one WebSocket, labelled as such."""
    out = subprocess.run(
        [sys.executable, str(BENCHES / "suite.py"), "--quick", "--scenario",
         "fanout_5ch_10subs_100B", "--targets", "pyrt", "--pyrt-publisher", "ws",
         "--plot", str(tmp_path / "fanout.png")],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    assert "pyrt's publisher: pipelined over one WebSocket;" in out
    body = out.split("\n## fanout_5ch_10subs_100B\n")[1]
    cells = _suite_rows(body)["pyrt"]
    assert cells[1] == "pipelined over one WebSocket"
    assert int(cells[2].replace(",", "")) > 0
    assert cells[-1] == "0"


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
