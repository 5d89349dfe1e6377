"""The public API is what __init__ exports, nothing more, and the CLI works."""

from __future__ import annotations

import subprocess
import sys

import pyrt
from pyrt import _core
from pyrt._cli import main

PUBLIC = {
    "ChannelNameError",
    "CloseCode",
    "ErrorCode",
    "FilterError",
    "HttpError",
    "HttpExchange",
    "HttpRequest",
    "Hub",
    "HubConfig",
    "HybridClock",
    "Matcher",
    "Mutation",
    "Node",
    "NodeConfig",
    "Publication",
    "Record",
    "Rejection",
    "RowEvent",
    "Session",
    "SlowConsumerPolicy",
    "Source",
    "SourceError",
    "StreamPosition",
    "Timestamp",
    "Transport",
    "__version__",
    "check_channel",
    "parse_filter",
}


def test_public_names() -> None:
    assert set(pyrt.__all__) == PUBLIC
    exported = {name for name in vars(pyrt) if not name.startswith("_")} | {"__version__"}
    # Only the curated names, and the public submodules once imported, are visible.
    submodules = {
        "client",
        "conflict",
        "hub",
        "node",
        "plugin",
        "plugins",
        "postgres",
        "reference",
        "testing",
    }
    assert exported - submodules == PUBLIC


def test_import_pyrt_loads_no_plugin_driver_or_oracle() -> None:
    # A fresh interpreter: in this one, other tests have imported them already.
    code = (
        "import sys, pyrt; print(' '.join(sorted(m for m in sys.modules"
        " if m.startswith(('pyrt.plugins', 'pyrt.postgres', 'pyrt.reference', 'scramp')))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []
    # The check sees those modules when they are loaded.
    code = code.replace("import sys, pyrt;", "import sys, pyrt, pyrt.plugins.wal;")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = out.stdout.split()
    assert {"pyrt.plugins.wal", "pyrt.postgres.protocol", "scramp"} <= set(loaded)
    assert not [m for m in loaded if m.startswith("pyrt.reference")]


POSTGRES = {
    "DecodeError",
    "NotificationResponse",
    "PgAuthError",
    "PgConnection",
    "PgConnectionError",
    "PgError",
    "PgOptions",
    "PgProtocolError",
    "ResultSet",
    "quote_ident",
    "quote_literal",
}


def test_postgres_public_names() -> None:
    import pyrt.postgres

    assert set(pyrt.postgres.__all__) == POSTGRES
    exported = {name for name in vars(pyrt.postgres) if not name.startswith("_")}
    modules = {"connection", "errors", "options", "pgoutput", "protocol", "replication"}
    assert exported - modules == POSTGRES


def test_version_comes_from_the_compiled_core() -> None:
    assert pyrt.__version__ == _core.__version__
    assert pyrt.__version__.count(".") == 2


def test_errors_are_value_errors_with_position() -> None:
    for error in (pyrt.FilterError, pyrt.ChannelNameError):
        e = error("bad thing", 3)
        assert isinstance(e, ValueError)
        assert (e.reason, e.position) == ("bad thing", 3)
        assert str(e) == "bad thing (at position 3)"


def test_cli_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pyrt._cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"pyrt {pyrt.__version__}"


def test_cli_demo_shows_matches_and_a_rejected_filter(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "INSERT public.messages {'id': 1, 'room_id': 42, 'body': 'hi'} -> [1]" in out
    assert "UPDATE public.orders {'id': 9, 'status': 'paid', 'total': 120.5} -> [2, 3]" in out
    assert "DELETE public.orders {'id': 9, 'status': 'paid'} -> [4]" in out
    assert "publish room:lobby -> [5]" in out
    assert "unknown operator 'between' (at position 6)" in out
