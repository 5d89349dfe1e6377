"""The node's door keeper: who a connection is (its token), and the application's say on
what it may do (the `authorize` hook). The channel rules themselves are the hub's
(`pyrt.hub.rules`, sans-IO); docs/auth.md is the user's guide.

- Tokens are verified here (`pyrt.node.auth.TokenVerifier`: pyjwt), at the door (`identify`:
  `?token=` or `Authorization: Bearer`), in a WebSocket's `connect` command, in `refresh`,
  and as a join's subscription token. A revoked `jti` is refused until the token expires.
- The hook, `authorize(claims, action, channel)`, sync or async, is asked at join, publish,
  mutate and presence (not per delivered message); its True or False wins over the rules,
  None leaves the decision to them. A hook that raises refuses (and is logged).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import httpx
import trio

from ..hub.hub import Connection, Hub
from ..hub.identity import ANONYMOUS, Action, Identity
from ..hub.protocol import (
    CloseCode,
    Command,
    Connect,
    ErrorCode,
    Join,
    Mutate,
    PresenceQuery,
    Publish,
    Refresh,
    Track,
)
from ..hub.rules import Rules
from .auth import AuthConfig, AuthError, TokenVerifier
from .http import HttpError, HttpRequest, bearer_token

log = logging.getLogger("pyrt.auth")

Authorize: TypeAlias = Callable[
    [Mapping[str, Any], str, str], "bool | Awaitable[bool | None] | None"
]
"""The application's hook: `authorize(claims, action, channel)` -> True (allow), False
(refuse) or None (the channel rules decide); may be a coroutine function. `claims` is empty
for an anonymous connection; `action` is one of subscribe, publish, presence, mutate."""

HANDLED = object()
"""`Gate.screen`'s answer when it carried out the command itself (connect, refresh, a
refused subscription token)."""

_ACTIONS: dict[type, Action] = {
    Join: Action.SUBSCRIBE,
    Publish: Action.PUBLISH,
    Mutate: Action.MUTATE,
    Track: Action.PRESENCE,
    PresenceQuery: Action.PRESENCE,
}

DEVELOPMENT_USER = "dev"
"""The user of the token `pyrt serve` prints when no `[auth]` table is configured."""


class Gate:
    """Token verification, revocation and the `authorize` hook for one node."""

    def __init__(self, config: AuthConfig | None, hook: Authorize | None = None) -> None:
        self.development = config is None
        """No `[auth]` table: a secret made up for this run (`pyrt serve` prints a token)."""
        self.verifier = TokenVerifier.development() if config is None else TokenVerifier(config)
        self.config: AuthConfig = self.verifier.config
        self.rules = (
            Rules.from_config(self.config.rules) if self.config.rules else Rules.open_default()
        )
        self.hook: Authorize | None = hook
        self.proxy = (
            AuthProxy(self.config.proxy_url, self.config.proxy_timeout)
            if self.config.proxy_url is not None
            else None
        )
        if hook is None and self.proxy is not None:
            self.hook = self.proxy
        self.anonymous = self.config.anonymous or self.rules.allows_anonymous
        """Whether a connection without a token is let in (as `ANONYMOUS`)."""
        self.refused = 0
        """Tokens refused at the door or in `connect` (for metrics)."""

    def install(self, hub: Hub) -> None:
        """Puts the channel rules in force on `hub`."""
        hub.set_rules(
            self.rules,
            refresh_before=self.config.refresh_before,
            connect_timeout=self.config.connect_timeout,
        )

    def development_token(self) -> str:
        """A token for the development secret (user `dev`, role `authenticated`)."""
        return self.verifier.mint(
            {"sub": DEVELOPMENT_USER, "role": "authenticated"}, expires_in=None
        )

    # -- tokens ----------------------------------------------------------------------------

    async def verify(self, token: str, *, audience_optional: bool = False) -> Identity:
        """The identity `token` proves; AuthError (its message safe to show) otherwise.
        `audience_optional`: a token without `aud` passes (API keys that are JWTs)."""
        identity = await self.verifier.verify_async(token, audience_optional=audience_optional)
        if identity.jti is not None and self.verifier.is_revoked(identity.jti, time.time()):
            raise AuthError("token revoked")
        return identity

    async def identify(self, request: HttpRequest, *, pending_ok: bool = False) -> Identity | None:
        """Who the request's token (`?token=`, else `Authorization: Bearer`) says it is.
        Without a token: `ANONYMOUS` where anonymous access is allowed, else None when
        `pending_ok` (a WebSocket that will send `connect`), else HttpError 401. A bad token
        is HttpError 401, whatever the rest."""
        token = request.param("token") or bearer_token(request.header("authorization"))
        if token is None:
            if self.anonymous:
                return ANONYMOUS
            if pending_ok:
                return None
            self.refused += 1
            message = "a token is required: ?token=<JWT> or Authorization: Bearer"
            raise _unauthorized(message, invalid=False)
        try:
            return await self.verify(token)
        except AuthError as e:
            self.refused += 1
            raise _unauthorized(f"invalid token: {e}") from None

    def check_origin(self, request: HttpRequest) -> None:
        """Refuses (403) a browser's WebSocket upgrade from an origin not allowed (cross-site
        WebSocket hijacking): `allowed_origins`, or, when empty, the request's own host.
        Requests without an Origin (not from a browser) pass."""
        origin = request.header("origin")
        if origin is None:
            return
        allowed = self.config.allowed_origins
        if "*" in allowed or origin in allowed:
            return
        if not allowed:
            host = request.header("host")
            if host is not None and urlsplit(origin).netloc.lower() == host.lower():
                return
        self.refused += 1
        raise HttpError(403, f"origin {origin[:200]!r} is not allowed (auth.allowed_origins)")

    def revoke(self, jti: str, until: float) -> None:
        """Refuses the token `jti` until `until` (wall-clock seconds: its `exp`)."""
        self.verifier.revoke(jti, until)

    async def aclose(self) -> None:
        """Lets go of the proxy's connections (the node calls it when it stops)."""
        if self.proxy is not None:
            await self.proxy.aclose()

    # -- commands --------------------------------------------------------------------------

    def needs_screen(self, command: Command) -> bool:
        """Whether `screen` has anything to do for `command` (else: no await at all)."""
        if isinstance(command, (Connect, Refresh)):
            return True
        if isinstance(command, Join) and command.token is not None:
            return True
        return self.hook is not None and type(command) in _ACTIONS

    async def screen(self, hub: Hub, conn: Connection, command: Command) -> object:
        """What the node does with `command` before the hub: HANDLED (carried out here),
        or the verdict for `Hub.handle` (True, False or None)."""
        if conn.pending and not isinstance(command, Connect):
            # Nothing before `connect`: no subscription token checked, no hook asked; the
            # hub closes the connection (4401).
            return None
        match command:
            case Connect(rid, token):
                # A connection let in anonymously may still say who it is, first thing (a
                # WebSocket client with a token, on a node that also admits anonymous ones).
                fresh = conn.identity.anonymous and not conn.joins
                if not conn.pending and not fresh:
                    message = "already connected: send 'refresh' for a new token"
                    hub.push(conn.id, conn.codec.error(rid, ErrorCode.BAD_REQUEST, message))
                    return HANDLED
                try:
                    identity = await self.verify(token)
                except AuthError as e:
                    hub.stats.auth_refused += 1
                    hub.close(conn.id, CloseCode.UNAUTHORIZED, f"invalid token: {e}")
                    return HANDLED
                hub.authenticate(conn, identity, trio.current_time(), rid)
                return HANDLED
            case Refresh(rid, token):
                try:
                    identity = await self.verify(token)
                except AuthError as e:
                    hub.stats.auth_refused += 1
                    error = conn.codec.error(rid, ErrorCode.UNAUTHORIZED, f"invalid token: {e}")
                    hub.push(conn.id, error)
                    return HANDLED
                hub.refresh_identity(conn, identity, rid)
                return HANDLED
            case Join(rid, channel, token=str() as token):
                reason = await self._subscription_refusal(conn, channel, token)
                if reason is not None:
                    hub.stats.auth_refused += 1
                    error = conn.codec.error(rid, ErrorCode.UNAUTHORIZED, reason)
                    hub.push(conn.id, error)
                    return HANDLED
                return True
        action = _ACTIONS.get(type(command))
        if action is None or self.hook is None:
            return None
        target: str = command.channel  # type: ignore[union-attr]
        return await self.ask_hook(conn.identity, action, target)

    async def ask_hook(self, identity: Identity, action: Action, channel: str) -> bool | None:
        """The hook's verdict (None without a hook). A hook that raises or answers something
        else than True, False or None refuses, and is logged."""
        hook = self.hook
        if hook is None:
            return None
        try:
            verdict = hook(identity.claims, action.value, channel)
            if inspect.isawaitable(verdict):
                verdict = await verdict
        except Exception:
            log.exception("authorize hook failed on %s of %r: refused", action.value, channel)
            return False
        if verdict is None or isinstance(verdict, bool):
            return verdict
        log.error("authorize hook answered %r (not True, False or None): refused", verdict)
        return False

    async def _subscription_refusal(self, conn: Connection, channel: str, token: str) -> str | None:
        """Why a join's subscription token does not open `channel` to `conn`, or None: it
        must verify, name the channel in its `channel` claim and the connection's user in
        `sub`."""
        try:
            identity = await self.verify(token)
        except AuthError as e:
            return f"invalid subscription token: {e}"
        if identity.claims.get("channel") != channel:
            return f"the subscription token is not for '{channel}'"
        if identity.user != conn.identity.user:
            return "the subscription token is for another user"
        return None


class AuthProxy:
    """The `authorize` hook of a backend not written in Python (`[auth] proxy_url`): each
    question is a `POST` of `{"action", "channel", "user", "claims"}` as JSON; the backend
    answers 200 with `{"allow": true}`, `{"allow": false}` or `{"allow": null}` (the channel
    rules decide). Anything else, an error or no answer within `timeout` refuses."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None
        self.calls = 0

    async def __call__(self, claims: Mapping[str, Any], action: str, channel: str) -> bool | None:
        if self._client is None:
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
            self._client = httpx.AsyncClient(timeout=self.timeout, limits=limits)
        self.calls += 1
        body = {"action": action, "channel": channel, "user": claims.get("sub"), "claims": claims}
        try:
            with trio.fail_after(self.timeout):
                response = await self._client.post(self.url, json=body)
        except (httpx.HTTPError, trio.TooSlowError) as e:
            log.warning("auth proxy %s: %s: refused", self.url, type(e).__name__)
            return False
        if response.status_code != 200:
            log.warning("auth proxy %s answered %d: refused", self.url, response.status_code)
            return False
        try:
            answer = response.json()
        except ValueError:
            return False
        allow = answer.get("allow", False) if isinstance(answer, dict) else False
        return allow if allow is None or isinstance(allow, bool) else False

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _unauthorized(message: str, *, invalid: bool = True) -> HttpError:
    """A 401 with its challenge (RFC 6750 3.1): `error="invalid_token"` only when a token
    came, and was refused; a request without one gets the bare challenge."""
    challenge = 'Bearer realm="pyrt", error="invalid_token"' if invalid else 'Bearer realm="pyrt"'
    return HttpError(401, message, headers=(("www-authenticate", challenge),))
