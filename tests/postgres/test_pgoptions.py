"""The connection options both Postgres sources share (pyrt.postgres.PgOptions): one
set of checks, the same errors from either source, and the connect/backoff they drive."""

from __future__ import annotations

import random
from typing import Any

import pytest
from pgserver import PASSWORD, PostgresServer

from pyrt.node.sources import load_sources
from pyrt.plugins.notify import NotifySource
from pyrt.plugins.wal import WalSource
from pyrt.postgres import PgAuthError, PgOptions

BAD = [
    ({"host": ""}, TypeError, "host must be a non-empty string"),
    ({"host": 5}, TypeError, "host must be a non-empty string, not 5"),
    ({"port": 0}, ValueError, "port must be at least 1, not 0"),
    ({"port": 70000}, ValueError, "port must be at most 65535, not 70000"),
    ({"port": "5432"}, TypeError, "port must be an integer"),
    ({"port": True}, TypeError, "port must be an integer"),
    ({"user": None}, TypeError, "user must be a non-empty string"),
    ({"password": ""}, TypeError, "password must be a non-empty string"),
    ({"password": "x", "password_env": "Y"}, ValueError, "password or password_env, not both"),
    ({"database": 1}, TypeError, "database must be a non-empty string"),
    ({"ssl": "yes"}, TypeError, "ssl must be true or false, not 'yes'"),
    ({"ssl_root_cert": ""}, TypeError, "ssl_root_cert must be a non-empty string"),
    ({"reconnect_min": -1}, ValueError, "reconnect_min must be a positive number of seconds"),
    ({"reconnect_max": float("inf")}, ValueError, "reconnect_max must be a positive number"),
    ({"reconnect_min": 5, "reconnect_max": 1}, ValueError, "reconnect_max must not be less"),
    ({"connect_timeout": "10"}, TypeError, "connect_timeout must be a number of seconds"),
    ({"startup_timeout": 0}, ValueError, "startup_timeout must be a positive number"),
    ({"application_name": ""}, TypeError, "application_name must be a non-empty string"),
    ({"hots": "x"}, TypeError, "unexpected keyword argument 'hots'"),
]


@pytest.mark.parametrize(("options", "error", "message"), BAD)
def test_bad_options_give_the_same_error_from_every_source(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        PgOptions(**options)
    with pytest.raises(error, match=message):
        WalSource(**options)
    with pytest.raises(error, match=message):
        NotifySource(channels={"a": "db:a"}, **options)
    for plugin, extra in [("wal", {}), ("notify", {"channels": {"a": "db:a"}})]:
        with pytest.raises(ValueError, match=f"^sources.src: .*{message}"):
            load_sources({"src": {"plugin": plugin, **extra, **options}})


def test_defaults_and_normalising() -> None:
    wal = WalSource()
    notify = NotifySource(channels={"a": "db:a"})
    assert wal.pg.application_name == "pyrt-wal"
    assert notify.pg.application_name == "pyrt-notify"
    assert wal.pg == PgOptions(application_name="pyrt-wal")
    assert (wal.pg.host, wal.pg.port, wal.pg.user, wal.pg.database) == (
        "127.0.0.1",
        5432,
        "postgres",
        None,
    )
    pg = PgOptions(ssl_root_cert="/etc/ca.pem", reconnect_min=1, port=6543)
    assert pg.ssl is True  # a CA file implies TLS
    assert isinstance(pg.reconnect_min, float)
    assert "postgres@127.0.0.1:6543/None" in repr(WalSource(port=6543))


def test_backoff_doubles_with_jitter_up_to_the_ceiling() -> None:
    pg = PgOptions(reconnect_min=0.5, reconnect_max=4.0)
    rng = random.Random(7)
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0), (500, 4.0)]:
        delays = [pg.backoff(attempt, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, delays)


async def test_connects_with_the_password_from_the_environment(
    postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = PgOptions(
        port=postgres.port, user="pyrt_scram", password_env="PYRT_PG_TEST", database="postgres"
    )
    with pytest.raises(PgAuthError, match="PYRT_PG_TEST is not set"):
        await pg.connect()
    monkeypatch.setenv("PYRT_PG_TEST", PASSWORD)
    async with await pg.connect() as conn:
        (result,) = await conn.simple_query("SELECT current_setting('application_name')")
        assert list(result.rows) == [("pyrt",)]
