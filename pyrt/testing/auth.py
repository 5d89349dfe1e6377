"""Auth for tests: a node open to anyone, and tokens for a known secret.

`open_auth()` is the `[auth]` of a node whose tests are not about authorization: connections
without a token are let in and every channel is open to anyone (table channels included). A
test about authorization gives the node its own `AuthConfig` and rules, and mints tokens
with `TestTokens` (HS256 over the same secret)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..node.auth import AuthConfig, TokenVerifier

TEST_SECRET = "pyrt-test-secret-at-least-32-bytes-long!"
"""The HS256 secret of `open_auth` and `TestTokens` (a test's, never a deployment's)."""

OPEN_RULES: tuple[Mapping[str, Any], ...] = (
    {"channel": ">", "subscribe": "anyone", "publish": "anyone", "mutate": "anyone"},
)
"""Every channel open to anyone: subscribe, publish, presence, history and mutate."""


def open_auth(rules: Sequence[Mapping[str, Any]] = OPEN_RULES, **options: Any) -> AuthConfig:
    """An `[auth]` with `TEST_SECRET`, anonymous connections let in, and `rules` (default:
    everything open to anyone). `options` are further `AuthConfig` fields."""
    options.setdefault("anonymous", True)
    return AuthConfig(jwt_secret=TEST_SECRET, rules=tuple(rules), **options)


class TestTokens:
    """Mints tokens that a node configured with `TEST_SECRET` accepts."""

    __test__ = False  # not a pytest test class

    def __init__(self, secret: str = TEST_SECRET) -> None:
        self._verifier = TokenVerifier(AuthConfig(jwt_secret=secret))

    def token(
        self, sub: str | None = "alice", *, expires_in: float | None = 3600.0, **claims: Any
    ) -> str:
        """A token for `sub` (None: no `sub`) with `claims`, expiring in `expires_in` s."""
        body = dict(claims)
        if sub is not None:
            body["sub"] = sub
        return self._verifier.mint(body, expires_in=expires_in)
