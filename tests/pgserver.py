"""A real PostgreSQL server for the tests: initdb in a temp dir, `wal_level=logical`, a free
port on 127.0.0.1, and roles for each authentication method the sources speak.

Debian's server binaries (`postgresql` package; scripts/bootstrap installs it) are used as
they are. PostgreSQL refuses to run as root, so under root the server runs as the `postgres`
system user the package creates.

Roles (all may replicate):
- `pyrt_scram` / `secret`: SCRAM-SHA-256 (the default for TCP here);
- `pyrt_md5` / `secret`: md5;
- `postgres`: the superuser, trusted over the Unix socket only (for admin SQL through psql).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

PASSWORD = "secret"
HBA = """\
local   all          all                       trust
local   replication  all                       trust
host    all          pyrt_md5   127.0.0.1/32   md5
host    replication  pyrt_md5   127.0.0.1/32   md5
host    all          all        127.0.0.1/32   scram-sha-256
host    replication  all        127.0.0.1/32   scram-sha-256
"""


def server_bin_dir() -> Path:
    """The newest installed server's bin directory (Debian: /usr/lib/postgresql/<v>/bin)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if not found:
        raise RuntimeError("PostgreSQL server not installed (scripts/bootstrap installs it)")
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresServer:
    """One server cluster in a temp dir; `start()`, `stop()`, `restart()`, `sql()`."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.bin = server_bin_dir()
        self.base = Path(tempfile.mkdtemp(prefix="pyrt-pg-"))
        self.data = self.base / "data"
        self.socket_dir = self.base / "sock"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.settings = {
            "wal_level": "logical",
            "max_replication_slots": "20",
            "max_wal_senders": "20",
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "off",  # test data: speed over durability of the host's disk
            "full_page_writes": "off",
            "wal_sender_timeout": "60s",
            **(settings or {}),
        }
        self._user: str | None = "postgres" if os.geteuid() == 0 else None
        self._initdb()

    # -- running -----------------------------------------------------------------------

    def _run(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(args), capture_output=True, text=True, user=self._user, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {result.stderr.strip()}")
        return result

    def _initdb(self) -> None:
        self.socket_dir.mkdir(parents=True)
        if self._user is not None:
            uid = pwd.getpwnam(self._user).pw_uid
            for path in (self.base, self.socket_dir):
                os.chown(path, uid, -1)
        self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ]
        )
        (self.data / "pg_hba.conf").write_text(HBA)
        lines = [f"{k} = '{v}'" for k, v in self.settings.items()]
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n" + "\n".join(lines) + "\n")

    def start(self) -> None:
        self._run(
            [
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.base / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )

    def stop(self, mode: str = "fast") -> None:
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        path = self.base / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cleanup(self) -> None:
        with contextlib.suppress(RuntimeError):  # not running
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    # -- SQL as the superuser (psql over the Unix socket) ----------------------------------

    def sql(self, query: str, database: str = "postgres") -> str:
        """Runs `query` with psql (ON_ERROR_STOP); returns unaligned, tuples-only output."""
        psql = shutil.which("psql") or str(self.bin / "psql")
        result = self._run(
            [
                psql,
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                query,
            ]
        )
        return result.stdout.strip()

    def setup_roles(self) -> None:
        self.sql(
            f"""
            SET password_encryption = 'scram-sha-256';
            CREATE ROLE pyrt_scram LOGIN REPLICATION SUPERUSER PASSWORD '{PASSWORD}';
            SET password_encryption = 'md5';
            CREATE ROLE pyrt_md5 LOGIN REPLICATION SUPERUSER PASSWORD '{PASSWORD}';
            """
        )

    def drop_replication_slots(self, database: str) -> None:
        """Ends the replication sessions of `database` and drops its slots (slots are per
        cluster and keep WAL until dropped): a WAL test's teardown."""
        self.sql(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
            f" WHERE database = '{database}' AND active"
        )
        self.sql(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            f" WHERE database = '{database}' AND NOT active"
        )

    def new_database(self, prefix: str = "t") -> str:
        """A fresh database (logical slots and publications are per database)."""
        name = f"{prefix}_{time.monotonic_ns()}"
        self.sql(f"CREATE DATABASE {name}")
        return name


def start_server(settings: dict[str, str] | None = None) -> PostgresServer:
    server = PostgresServer(settings)
    try:
        server.start()
        server.setup_roles()
    except BaseException:
        log = server.log()
        server.cleanup()
        raise RuntimeError(f"PostgreSQL did not start:\n{log}") from None
    return server
