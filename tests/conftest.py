"""Shared test configuration."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import pytest
from hypothesis import settings
from pgserver import PostgresServer, start_server

# "ci" is the default so a plain `pytest` runs the differential tests as CI does: a few
# thousand examples, no deadline (the first call into the compiled module, shrinking and
# a busy CI machine all make timings useless as a failure signal). Tests that need other
# example counts say so in their own settings; those inherit the rest from here.
settings.register_profile("ci", max_examples=2000, deadline=None, print_blob=True)
# For a quick local loop: HYPOTHESIS_PROFILE=dev pytest
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# When a hypothesis test fails, its pytest plugin imports libcst to suggest an explicit
# @example. Some libcst releases use the deprecated mypy_extensions.TypedDict, and under
# `filterwarnings = error` that import turns every such failure into a pytest INTERNALERROR
# that hides the falsifying example. Importing it here, once, with that warning ignored,
# keeps failures readable.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server (wal_level=logical) for the whole session; see pgserver.py."""
    server = start_server()
    try:
        yield server
    finally:
        server.cleanup()
