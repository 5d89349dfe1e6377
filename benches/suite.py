"""Fan-out throughput and latency of pyrt and its peers, side by side on this machine.

    python benches/suite.py                         # every scenario, pyrt + Nchan + python-socketio
    python benches/suite.py --quick                 # small sizes, a few seconds (the smoke test)
    python benches/suite.py --scenario fanout_1ch_10000subs_100B --repeat 3
    python benches/suite.py --pyrt-publisher ws     # pyrt's publisher pipelined over a WebSocket
    pyrt bench --quick                              # the same, through the pyrt command

For each scenario and target the harness starts the server in a subprocess on a free loopback
port and runs the Rust load generator (benches/loadgen, built once with
`cargo build --release -p pyrt-loadgen`) against it:

- pyrt: `python -m pyrt._cli serve` with a config sized for the run (outboxes that hold the
  whole burst, so the slow-consumer policy is not what is measured; publishing without
  joining, so one publisher reaches 1,000 channels); WebSocket subscribers. Its publisher
  (`--pyrt-publisher`) is by default the like for like of Nchan's: HTTP POSTs to
  `/api/publish` over 64 keep-alive connections (`http`); `ws` sends `publish` commands
  pipelined over one WebSocket instead, 64 awaiting their ack, which lets the hub cork a
  burst into one write per subscriber and so favours pyrt: every table says which was used;
- Nchan: nginx with Debian's ngx_nchan_module from a config written to a temp dir, one worker
  process (pyrt and python-socketio get one core too), WebSocket subscribers, HTTP POST
  publishers (64 keep-alive connections);
- python-socketio: benches/socketio_server.py (AsyncServer on aiohttp, rooms as channels);
  its publisher emits events pipelined over one WebSocket, 64 awaiting their ack.

The load generator opens the subscribers, then publishes M messages as fast as the server
accepts them (a window of 64 unacknowledged: over HTTP, requests in flight; deliveries/s =
deliveries / time until the last one arrived), then paces messages at half of that peak rate
for the latency percentiles (every message carries its send time). The harness samples the
server's CPU time (every process of it, from /proc/<pid>/stat) at the load generator's phase
boundaries, its RSS, the load generator's own CPU, and how busy the rest of the machine was,
and prints one markdown table per scenario with pyrt/peer ratios, then a plot (PNG) of
throughput and p99 against the number of subscribers. `idle_*` scenarios only connect, then
measure RSS per connection.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from matcher import machine  # benches/ is a folder of programs, not a package

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("pyrt", "nchan", "socketio")
LABELS = {"pyrt": "pyrt", "nchan": "Nchan", "socketio": "python-socketio"}
NCHAN_MODULE_PATHS = (
    "/usr/lib/nginx/modules/ngx_nchan_module.so",
    "/usr/share/nginx/modules/ngx_nchan_module.so",
    "/usr/lib64/nginx/modules/ngx_nchan_module.so",
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
NO_LIMITS_SERVER = "max_connections_per_ip = 0\n"
NO_LIMITS_HUB = "command_rate = 0\nchannel_publish_rate = 0\n"
"""pyrt's abuse limits, off (docs/http.md): the peers have none."""
PUBLISHERS = ("http", "ws")
PUBLISHER_LABELS = {"http": "HTTP POST", "ws": "pipelined over one WebSocket"}
"""How each target's publisher sent its messages, as the tables say it: `http`, one request
per message over 64 keep-alive connections (Nchan always; pyrt with `--pyrt-publisher http`);
`ws`, 64 commands in flight over one WebSocket (python-socketio always; pyrt with `ws`)."""
KEEPALIVE_SECONDS = 75.0
"""How long pyrt keeps an idle keep-alive connection (`request_timeout`): nginx's default
`keepalive_timeout`, so the HTTP publisher's connections live as long with both servers."""


@dataclass(frozen=True)
class Scenario:
    """A workload, named by size: `fanout_1ch_10000subs_100B`, `idle_10000conns`."""

    channels: int
    subscribers: int
    size: int = 100
    messages: int = 0
    idle: bool = False

    @property
    def name(self) -> str:
        if self.idle:
            return f"idle_{self.subscribers}conns"
        size = f"{self.size // 1024}KB" if self.size % 1024 == 0 else f"{self.size}B"
        per_channel = self.subscribers // self.channels
        return f"fanout_{self.channels}ch_{per_channel}subs_{size}"


FULL = (
    Scenario(1, 100, messages=1000),
    Scenario(1, 1000, messages=200),
    Scenario(1, 3000, messages=100),
    Scenario(1, 10_000, messages=40),
    Scenario(1, 1000, size=4096, messages=100),
    Scenario(1, 10_000, size=4096, messages=20),
    Scenario(1000, 10_000, messages=10_000),
    Scenario(1, 10_000, idle=True),
    Scenario(1, 50_000, idle=True),
)
QUICK = (
    Scenario(1, 20, messages=20),
    Scenario(1, 50, messages=20),
    Scenario(5, 50, messages=50),
    Scenario(1, 200, idle=True),
)


@dataclass
class Result:
    target: str
    scenario: Scenario
    report: dict[str, Any] = field(default_factory=dict)
    server_cpu: dict[str, float] = field(default_factory=dict)  # phase -> cores busy
    other_cpu: dict[str, float] = field(default_factory=dict)  # phase -> cores busy, others
    rss_kib: tuple[int, int] = (0, 0)  # before connecting, at the end (or while held)
    error: str | None = None

    @property
    def publisher(self) -> str:
        """How the load generator published (`http` or `ws`), as it reported it."""
        reported = self.report.get("publisher")
        if isinstance(reported, str):
            return reported
        return "http" if self.target == "nchan" else "ws" if self.target == "socketio" else "?"

    @property
    def rate(self) -> float:
        peak = self.report.get("peak") or {}
        return float(peak.get("deliveries_per_s", 0.0))

    def latency(self, phase: str, key: str) -> float | None:
        value = ((self.report.get(phase) or {}).get("latency_ms") or {}).get(key)
        return None if value is None else float(value)


# --- processes -------------------------------------------------------------------------------


def raise_nofile_limit() -> int:
    """Raises this process's (and so its children's) open-file limit as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
        resource.setrlimit(resource.RLIMIT_NOFILE, (nr_open, nr_open))
        return nr_open
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[Any], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds:.0f} s")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (nginx's master and workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, StopIteration, ValueError):
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            total += int(next(line for line in lines if line.startswith("VmRSS")).split()[1])
    return total


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


# --- servers ---------------------------------------------------------------------------------


class Server:
    """One target's server in a subprocess on a free loopback port."""

    def __init__(self, target: str, scenario: Scenario, workdir: Path) -> None:
        self.target = target
        self.workdir = workdir
        self.port = free_port()
        self.api_key = secrets.token_urlsafe(18)
        """pyrt's REST API key, for the HTTP publisher."""
        self.process: subprocess.Popen[str] | None = None
        self.log = workdir / f"{target}.log"
        self.command = self._command(scenario)

    def _command(self, s: Scenario) -> list[str]:
        if self.target == "pyrt":
            burst = max(s.messages, 1) + 200
            config = self.workdir / "pyrt.toml"
            config.write_text(
                '[server]\ntransports = ["websocket"]\n'
                # Every client comes from 127.0.0.1 and the publisher sends as fast as it
                # can: the abuse limits are off, as the peers have none.
                f"{NO_LIMITS_SERVER}"
                f'api_keys = ["{self.api_key}"]\n'
                f"request_timeout = {KEEPALIVE_SECONDS}\n"
                # Outboxes that hold the whole burst: fan-out is measured, not the policy
                # (nor the total budget, which would close laggards in a big burst).
                f"[hub]\noutbox_messages = {max(4096, burst)}\n"
                f"outbox_bytes = {max(4 << 20, burst * (s.size + 512))}\n"
                "outbox_total_bytes = 1099511627776\n"
                "publish_requires_join = false\n"
                f"{NO_LIMITS_HUB}"
                # Anonymous clients on channels open to anyone, as the peers' (no auth).
                '[auth]\nanonymous = true\njwt_secret = "pyrt-bench-secret-at-least-32-bytes!!"\n'
                '[[auth.rules]]\nchannel = ">"\nsubscribe = "anyone"\npublish = "anyone"\n'
            )
            serve = ["-m", "pyrt._cli", "serve", "--port", str(self.port)]
            return [sys.executable, *serve, "--config", str(config)]
        if self.target == "socketio":
            script = Path(__file__).resolve().parent / "socketio_server.py"
            return [sys.executable, str(script), "--port", str(self.port)]
        conf = self.workdir / "nginx.conf"
        conf.write_text(nginx_config(self.port, self.workdir, s))
        return [nginx_binary(), "-p", str(self.workdir), "-c", str(conf), "-e", "stderr"]

    def start(self) -> None:
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT
            )
        try:
            wait_for_port(self.port, self.process)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{self.target}: {e}: {self.tail()}") from None
        time.sleep(0.3)  # workers forked, interpreter settled

    def pids(self) -> list[int]:
        assert self.process is not None
        return process_tree(self.process.pid)

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log.read_text().strip().splitlines()[-3:])
        return ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # nginx: fast shutdown; pyrt: drain and stop
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            for pid in self.pids():
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)
            self.process.wait(timeout=15)


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def nchan_module() -> str | None:
    return next((p for p in NCHAN_MODULE_PATHS if os.path.exists(p)), None)


def nginx_config(port: int, workdir: Path, s: Scenario) -> str:
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must write the temp dir
    temp = "\n".join(
        f"  {kind}_temp_path {workdir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    buffer = max(s.messages // max(s.channels, 1), 1) + 200
    return f"""load_module {nchan_module()};
{user}daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {workdir / "nginx.pid"};
error_log stderr warn;
events {{ worker_connections {max(1024, nofile - 100)}; multi_accept on; }}
http {{
  access_log off;
{temp}
  keepalive_requests 1000000;
  nchan_max_reserved_memory 512M;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location ~ ^/sub/(\\w+)$ {{ nchan_subscriber websocket; nchan_channel_id $1; }}
    location ~ ^/pub/(\\w+)$ {{
      nchan_publisher; nchan_channel_id $1;
      nchan_message_buffer_length {buffer}; nchan_message_timeout 10m;
    }}
  }}
}}
"""


def missing_prerequisite(target: str) -> str | None:
    if target == "nchan":
        if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
            return "nginx is not installed (apt-get install libnginx-mod-nchan)"
        if nchan_module() is None:
            return "ngx_nchan_module.so not found (apt-get install libnginx-mod-nchan)"
    if target == "socketio":
        for module in ("socketio", "aiohttp"):
            try:
                __import__(module)
            except ImportError:
                return f"Python package {module!r} missing (pip install -e '.[bench]')"
    return None


# --- load generator --------------------------------------------------------------------------


def build_loadgen() -> Path:
    command = ["cargo", "build", "--release", "-p", "pyrt-loadgen"]
    print(f"building the load generator: {' '.join(command)}", file=sys.stderr, flush=True)
    subprocess.run(command, cwd=ROOT, check=True, stdout=sys.stderr)
    target_dir = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target_dir / "release" / "pyrt-loadgen"


def loadgen_command(
    loadgen: Path, server: Server, s: Scenario, args: argparse.Namespace, prefix: str
) -> list[str]:
    command = [str(loadgen), "--target", server.target, "--port", str(server.port)]
    command += ["--channels", str(s.channels), "--subscribers", str(s.subscribers)]
    command += ["--prefix", prefix, "--timeout", str(args.phase_timeout)]
    command += ["--threads", str(args.threads)]
    if s.idle:
        return [*command, "--idle"]
    command += ["--messages", str(s.messages), "--size", str(s.size)]
    if server.target == "pyrt":
        command += ["--publisher", args.pyrt_publisher]
        if args.pyrt_publisher == "http":
            command += ["--api-key", server.api_key]
    command += ["--paced-fraction", "0.5", "--paced-seconds", str(args.paced_seconds)]
    # Latency from a sample of subscribers, at most ~5M samples per phase.
    every = max(1, s.subscribers * s.messages // max(s.channels, 1) // 5_000_000)
    return [*command, "--latency-every", str(every)]


def run_one(
    loadgen: Path, target: str, s: Scenario, args: argparse.Namespace, run_id: str
) -> Result:
    result = Result(target, s)
    with tempfile.TemporaryDirectory(prefix=f"pyrt-suite-{target}-") as tmp:
        server = Server(target, s, Path(tmp))
        try:
            server.start()
        except RuntimeError as e:
            result.error = str(e)
            return result
        try:
            pids = server.pids()
            rss_before = rss_kib(pids)
            command = loadgen_command(loadgen, server, s, args, run_id)
            gen = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
            )
            assert gen.stdin is not None
            assert gen.stdout is not None
            marks: dict[str, tuple[float, float, float]] = {}
            rss_held = 0
            deadline = time.monotonic() + args.run_timeout
            lines: list[str] = []
            for line in gen.stdout:
                lines.append(line)
                if time.monotonic() > deadline:
                    gen.kill()
                    result.error = f"killed after {args.run_timeout:.0f} s"
                    break
                try:
                    phase = json.loads(line).get("phase")
                except (json.JSONDecodeError, AttributeError):
                    phase = None
                if not isinstance(phase, str):
                    continue
                pids = server.pids()
                marks[phase] = (time.monotonic(), cpu_seconds(pids), machine_busy_seconds())
                if phase == "connected" and s.idle:
                    time.sleep(1.0)  # let the server finish settling the last connections
                    rss_held = rss_kib(server.pids())
                    gen.stdin.write("\n")
                    gen.stdin.flush()
            gen.wait(timeout=60)
            final = lines[-1] if lines else ""
            if result.error is None:
                try:
                    result.report = json.loads(final)
                except json.JSONDecodeError:
                    result.error = f"load generator said: {final[:200]!r}"
            for name in ("peak", "paced"):
                if f"{name}_start" in marks and f"{name}_end" in marks:
                    (t0, c0, b0), (t1, c1, b1) = marks[f"{name}_start"], marks[f"{name}_end"]
                    wall = max(t1 - t0, 1e-9)
                    loadgen_cpu = float((result.report.get(name) or {}).get("loadgen_cpu_s", 0))
                    result.server_cpu[name] = (c1 - c0) / wall
                    others = (b1 - b0 - (c1 - c0) - loadgen_cpu) / wall
                    # Clock ticks make short phases coarse: keep it within the machine.
                    result.other_cpu[name] = min(max(0.0, others), float(os.cpu_count() or 1))
            result.rss_kib = (rss_before, rss_held or rss_kib(server.pids()))
        finally:
            server.stop()
        if server.process is not None and server.process.returncode not in (0, -15, None):
            tail = server.tail()
            if tail and result.error is None and not result.report:
                result.error = f"server exited {server.process.returncode}: {tail}"
    return result


# --- tables and plot -------------------------------------------------------------------------


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} ms" if x < 100 else f"{x:,.0f} ms"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fanout_table(results: dict[str, Result]) -> str:
    pyrt = results.get("pyrt")
    header = [
        "target", "publisher", "deliveries/s", "pyrt/target", "publishes/s", "p50 / p99 at ½ peak",
        "pyrt/target p99", "p99 at peak", "connects/s", "server CPU peak / paced", "loadgen CPU",
        "others' CPU", "server RSS", "errors",
    ]  # fmt: skip
    rows = []
    for target, r in results.items():
        if r.error and not r.report:
            rows.append([LABELS[target], "-", "failed", "-", "-", r.error[:80], *["-"] * 8])
            continue
        peak = r.report.get("peak") or {}
        paced = r.report.get("paced") or {}
        connect = r.report.get("connect") or {}
        p99 = r.latency("paced", "p99")
        pyrt_p99 = pyrt.latency("paced", "p99") if pyrt else None
        ratio = pyrt.rate / r.rate if pyrt and r.rate else None
        p99_ratio = pyrt_p99 / p99 if pyrt_p99 and p99 else None
        errors = int(r.report.get("errors", 0))
        missing = int(peak.get("expected", 0)) - int(peak.get("delivered", 0))
        error_cell = f"{errors}" + (f", {missing:,} missing" if missing else "")
        if peak.get("timed_out"):
            error_cell += ", timed out"
        loadgen_wall = float(peak.get("seconds", 0)) or 1e-9
        rows.append([
            LABELS[target],
            PUBLISHER_LABELS.get(r.publisher, r.publisher),
            f"{r.rate:,.0f}",
            fmt_ratio(ratio),
            "-" if peak.get("timed_out") else f"{float(peak.get('publishes_per_s', 0)):,.0f}",
            f"{fmt_ms(r.latency('paced', 'p50'))} / {fmt_ms(p99)}"
            + (f" ({float(paced.get('rate', 0)):,.0f} msg/s)" if paced else ""),
            fmt_ratio(p99_ratio),
            fmt_ms(r.latency("peak", "p99")),
            f"{float(connect.get('per_s', 0)):,.0f}",
            f"{r.server_cpu.get('peak', 0) * 100:.0f}% / {r.server_cpu.get('paced', 0) * 100:.0f}%",
            f"{float(peak.get('loadgen_cpu_s', 0)) / loadgen_wall * 100:.0f}%",
            f"{r.other_cpu.get('peak', 0) * 100:.0f}%",
            f"{r.rss_kib[0] / 1024:.0f} → {r.rss_kib[1] / 1024:.0f} MiB",
            error_cell,
        ])  # fmt: skip
    return table(header, rows)


def kib_per_connection(r: Result) -> float | None:
    connected = int((r.report.get("connect") or {}).get("connected", 0))
    return (r.rss_kib[1] - r.rss_kib[0]) / connected if connected else None


def idle_table(results: dict[str, Result]) -> str:
    pyrt = kib_per_connection(results["pyrt"]) if "pyrt" in results else None
    header = ["target", "connected", "connects/s", "server RSS", "per connection", "pyrt/target"]
    rows = []
    for target, r in results.items():
        if r.error and not r.report:
            rows.append([LABELS[target], "failed", r.error[:80], "-", "-", "-"])
            continue
        connect = r.report.get("connect") or {}
        kib = kib_per_connection(r)
        rows.append([
            LABELS[target],
            f"{int(connect.get('connected', 0)):,}" + (
                f" ({int(connect.get('failed', 0)):,} failed)" if connect.get("failed") else ""
            ),
            f"{float(connect.get('per_s', 0)):,.0f}",
            f"{r.rss_kib[0] / 1024:.0f} → {r.rss_kib[1] / 1024:.0f} MiB",
            "-" if kib is None else f"{kib:.1f} KiB",
            fmt_ratio(pyrt / kib if pyrt is not None and kib else None),
        ])  # fmt: skip
    return table(header, rows)


def ratio_line(results: dict[str, Result], idle: bool) -> str:
    if "pyrt" not in results:
        return "Ratios: pyrt was not run"
    parts = []
    pyrt = results["pyrt"]
    label = "Ratios"
    if not idle and pyrt.report:
        label += f" (pyrt's publisher: {PUBLISHER_LABELS.get(pyrt.publisher, pyrt.publisher)})"
    for target, r in results.items():
        if target == "pyrt":
            continue
        if idle:
            mine, theirs = kib_per_connection(pyrt), kib_per_connection(r)
            if mine is not None and theirs:
                parts.append(f"pyrt/{LABELS[target]} memory per connection {mine / theirs:.2f}x")
            continue
        if r.rate and pyrt.rate:
            text = f"pyrt/{LABELS[target]} throughput {pyrt.rate / r.rate:.2f}x"
            a, b = pyrt.latency("paced", "p99"), r.latency("paced", "p99")
            if a and b:
                text += f", p99 {a / b:.2f}x"
            parts.append(text)
    return f"{label}: " + ("; ".join(parts) if parts else "no peer measured")


def plot(all_results: dict[Scenario, dict[str, Result]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    series: dict[str, list[tuple[int, float, float | None]]] = {}
    incomplete: dict[str, list[tuple[int, float]]] = {}  # cut short: drawn hollow
    names: dict[str, str] = {}  # target -> its legend: the name and how it published
    for s, results in all_results.items():
        if s.idle or s.channels != 1 or s.size != 100:
            continue
        for target, r in results.items():
            if r.rate:
                publisher = PUBLISHER_LABELS.get(r.publisher, r.publisher)
                names[target] = f"{LABELS[target]} (publisher: {publisher})"
                point = (s.subscribers, r.rate, r.latency("paced", "p99"))
                series.setdefault(target, []).append(point)
                if (r.report.get("peak") or {}).get("timed_out"):
                    incomplete.setdefault(target, []).append((s.subscribers, r.rate))
    if not series:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    markers = {"pyrt": "o", "nchan": "s", "socketio": "^"}
    for target, points in series.items():
        points.sort()
        xs = [p[0] for p in points]
        line = top.plot(xs, [p[1] for p in points], marker=markers[target], label=names[target])
        if target in incomplete:
            top.scatter(
                [x for x, _ in incomplete[target]],
                [y for _, y in incomplete[target]],
                s=120,
                facecolors="white",
                edgecolors=line[0].get_color(),
                zorder=3,
                label=f"{LABELS[target]}: cut short (rate until its last delivery)",
            )
        lat = [(p[0], p[2]) for p in points if p[2] is not None]
        bottom.plot(
            [x for x, _ in lat],
            [y for _, y in lat],
            marker=markers[target],
            label=names[target],
        )
    top.set_ylabel("deliveries/s (peak)")
    top.set_yscale("log")
    top.set_title("Fan-out on one channel, 100 B messages, WebSocket subscribers")
    bottom.set_ylabel("p99 latency, ms (at ½ of each peak)")
    bottom.set_yscale("log")
    bottom.set_xlabel("subscribers")
    bottom.set_xscale("log")
    counts = sorted({p[0] for points in series.values() for p in points})
    plain = FuncFormatter(lambda x, _: f"{x:,.0f}")
    bottom.set_xticks(counts)
    bottom.xaxis.set_major_formatter(plain)
    bottom.xaxis.set_minor_formatter(NullFormatter())
    for ax, corner in ((top, "lower left"), (bottom, "upper left")):
        ax.yaxis.set_major_formatter(plain)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc=corner, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def versions() -> str:
    parts = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True).stderr
        parts.append(out.strip().replace("nginx version: ", ""))
    for package in ("libnginx-mod-nchan",):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            version = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True
            ).stdout
            if version:
                parts.append(f"{package} {version}")
    for dist in ("python-socketio", "python-engineio", "aiohttp"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
    return ", ".join(parts)


# --- main ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], epilog="scenarios: "
        + ", ".join(s.name for s in FULL) + "; --quick: " + ", ".join(s.name for s in QUICK),
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--scenario", action="append", help="run only this one (repeatable)")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument(
        "--pyrt-publisher",
        choices=PUBLISHERS,
        default="http",
        help="how pyrt's messages are published: http, POSTs to /api/publish over 64 keep-alive"
        " connections, like Nchan's publisher (the default: like for like); ws, `publish`"
        " commands pipelined over one WebSocket (lets the hub cork a burst; favours pyrt)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per target; best is kept")
    parser.add_argument("--plot", type=Path, default=Path("fanout.png"), help="PNG to write")
    parser.add_argument("--json", type=Path, help="also write every result here")
    parser.add_argument("--loadgen", type=Path, help="a built pyrt-loadgen (default: build it)")
    parser.add_argument("--threads", type=int, default=1, help="load generator threads")
    parser.add_argument("--paced-seconds", type=float, default=4.0)
    parser.add_argument("--phase-timeout", type=float, default=180.0)
    parser.add_argument("--run-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.paced_seconds = min(args.paced_seconds, 1.0)
        args.phase_timeout = min(args.phase_timeout, 30.0)
        args.run_timeout = min(args.run_timeout, 60.0)
    known = {s.name: s for s in (*FULL, *QUICK)}
    if args.scenario:
        unknown = [n for n in args.scenario if n not in known]
        if unknown:
            parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(known)}")
        scenarios = [known[n] for n in args.scenario]
    else:
        scenarios = list(QUICK if args.quick else FULL)

    nofile = raise_nofile_limit()
    targets = []
    for target in args.targets:
        reason = missing_prerequisite(target)
        if reason:
            print(f"{LABELS[target]}: skipped: {reason}", file=sys.stderr)
        else:
            targets.append(target)
    loadgen = args.loadgen or build_loadgen()

    print(f"# Fan-out suite ({' '.join(sys.argv[1:]) or 'defaults'})\n")
    if "pyrt" in targets:
        like = " (like for like with Nchan)" if args.pyrt_publisher == "http" else ""
        print(
            f"pyrt's publisher: {PUBLISHER_LABELS[args.pyrt_publisher]}{like};"
            " the publisher column says how each row published.\n"
        )
    all_results: dict[Scenario, dict[str, Result]] = {}
    for s in scenarios:
        # The server and the load generator each hold one descriptor per connection.
        if s.subscribers + 200 > nofile:
            print(f"## {s.name}\n\nskipped: needs {s.subscribers + 200:,} open files per "
                  f"process, the limit here is {nofile:,} (and cannot be raised)\n")  # fmt: skip
            continue
        results: dict[str, Result] = {}
        for attempt in range(args.repeat):
            for target in targets:  # interleaved, so load from elsewhere hits every target
                run_id = f"r{os.getpid()}x{attempt}{target[0]}"
                print(f"{s.name}: {target} (run {attempt + 1})", file=sys.stderr, flush=True)
                r = run_one(loadgen, target, s, args, run_id)
                best = results.get(target)
                if (
                    best is None
                    or (not s.idle and r.rate > best.rate)
                    or (s.idle and r.report and not best.report)
                ):
                    results[target] = r
                if r.error:
                    print(f"  {target}: {r.error}", file=sys.stderr)
        all_results[s] = results
        print(f"## {s.name}\n")
        if s.idle:
            print(
                f"{s.subscribers:,} WebSocket connections, each joined to one channel, "
                "held idle; server RSS before connecting and while held.\n"
            )
            print(idle_table(results))
        else:
            print(
                f"{s.channels:,} channel(s), {s.subscribers:,} subscribers, {s.messages:,} "
                f"messages of {s.size:,} B at peak, then paced at ½ of each target's peak.\n"
            )
            print(fanout_table(results))
        print(f"\n{ratio_line(results, s.idle)}\n", flush=True)

    if plot(all_results, args.plot):
        print(f"Plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(
            {s.name: {t: {"publisher": r.publisher, "report": r.report,
                          "server_cpu": r.server_cpu, "other_cpu": r.other_cpu,
                          "rss_kib": r.rss_kib, "error": r.error}
                      for t, r in results.items()} for s, results in all_results.items()},
            indent=1,
        ))  # fmt: skip
    print(f"Load generator: {loadgen} ({args.threads} thread(s)); open-file limit {nofile:,}")
    print(f"Peers: {versions()}")
    print(f"Machine: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
