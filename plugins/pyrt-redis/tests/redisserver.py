"""A real Redis server for the tests: `redis-server` (Debian's `redis-server` package;
scripts/bootstrap installs it) on a free port of 127.0.0.1, its data in a temp dir.

Every write is appended and fsynced (`appendfsync always`), so a server killed with SIGKILL
and started again on the same port has every entry it acknowledged: what the reconnect
tests need. `password` turns on `requirepass`; `tls` serves TLS only, with a self-signed
certificate for 127.0.0.1 made by the `openssl` command (`ca_file`).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One server in a temp dir: `start()`, `kill()`, `restart()`, `cli(*args)`, `cleanup()`."""

    def __init__(self, password: str | None = None, tls: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/bootstrap installs it)")
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="pyrt-redis-"))
        self.host = "127.0.0.1"
        self.port = free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.ca_file: Path | None = None
        if tls:
            self.ca_file = self.dir / "cert.pem"
            subprocess.run(
                [
                    "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(self.dir / "key.pem"), "-out", str(self.ca_file),
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                ],
                check=True,
                capture_output=True,
            )  # fmt: skip

    def command(self) -> list[str]:
        command = [
            self.binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        if self.password is not None:
            command += ["--requirepass", self.password]
        if self.ca_file is not None:
            command += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.ca_file),
                "--tls-key-file", str(self.dir / "key.pem"),
                "--tls-ca-cert-file", str(self.ca_file),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        return command

    def start(self, timeout: float = 10.0) -> None:
        assert self.process is None, "already running"
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{log}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port)):
                if self._answers():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            return self.cli("PING", check=False).strip() == "PONG"
        except subprocess.SubprocessError:
            return False

    def kill(self) -> None:
        """SIGKILL: a crash (every acknowledged write is in the append-only file)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def cli(self, *args: str, check: bool = True) -> str:
        """Runs `redis-cli` against the server and returns its output."""
        command = ["redis-cli", "-h", self.host, "-p", str(self.port), "--no-auth-warning"]
        if self.password is not None:
            command += ["-a", self.password]
        if self.ca_file is not None:
            command += ["--tls", "--cacert", str(self.ca_file)]
        done = subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=10, check=check
        )
        return done.stdout

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
