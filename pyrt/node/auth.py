"""Connection authentication: the `[auth]` table, and JWTs verified into `Identity`s.

`TokenVerifier(config).verify(token)` checks a JWT (pyjwt, with cryptography for the public
keys) and returns the `pyrt.hub.identity.Identity` it proves, or raises `AuthError`, whose
message is safe to show the client (it never holds key material). What is checked, in order:

- the size, before anything is decoded (`max_token_bytes`);
- the header: parsable, `alg` one of the accepted algorithms (never `none`), `kid` one of the
  keys (with a JWKS);
- the signature, with the one key that `alg` and `kid` name (a key is bound to its algorithm,
  so an HS256 token is never checked with an RSA public key as its secret: the HS/RS key
  confusion is refused in the config, `AuthConfig`, and again here);
- the claims: `aud` and `iss` when configured (a token with an `aud` is refused when no
  `audience` is configured, RFC 7519 4.1.3), `exp` and `nbf` (each optional, a finite number
  when present, with `leeway`), `sub`/`jti` strings, `channels` a list of strings, and the
  `jti` not revoked (`revoke`).

With `jwks_url`, the keys are fetched over HTTP (httpx, async, bounded in time and size) and
cached. `verify` is synchronous and never does I/O: in the URL case, for a `kid` the cache
does not hold, it raises `NeedsFetch`. `verify_async` is the same check that fetches then:
on an unknown `kid` (at most once per `jwks_refresh_interval`, so a client sending random
kids cannot make the node hammer the URL) and when the cached keys are older than that
interval. Every other case (a secret, a PEM key, a JWKS file, cached keys) needs no fetch.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ..hub.identity import Identity
from ..hub.rules import Rules

log = logging.getLogger("pyrt.auth")

HS_ALGORITHMS = ("HS256", "HS384", "HS512")
"""Algorithms of a shared secret (HMAC)."""
KEY_ALGORITHMS = (
    *("RS256", "RS384", "RS512"),
    *("PS256", "PS384", "PS512"),
    *("ES256", "ES384", "ES512"),
    "EdDSA",
)
"""Algorithms of public keys (RSA, RSA-PSS, ECDSA, Ed25519)."""
_HS_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
"""The shortest secret each HMAC algorithm is safe with (its hash's size, RFC 7518 3.2)."""
_EC_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
_JWK_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521", "EdDSA": "Ed25519"}
_MIN_RSA_BITS = 2048

JWKS_FETCH_TIMEOUT = 10.0
"""Seconds one fetch of `jwks_url` may take, connection included."""
MAX_JWKS_BYTES = 1024 * 1024
"""Largest JWKS document read (file or URL)."""
RETRY_WITHOUT_KEYS = 5.0
"""While no fetch of `jwks_url` has succeeded yet, fetches are this many seconds apart at
least (or `jwks_refresh_interval`, if shorter) instead of `jwks_refresh_interval`."""
MAX_REVOKED = 100_000
"""Revoked token ids kept at most; past it, the ones whose revocation ends soonest go first."""


class AuthError(ValueError):
    """A token that does not authenticate. `reason` (also the message) is safe to show the
    client: it names what is wrong, never a key or the token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NeedsFetch(Exception):
    """`TokenVerifier.verify` with `jwks_url` met a `kid` its cached keys do not hold (or no
    keys were fetched yet): call `verify_async`, which fetches them. Not an `AuthError`: the
    token may well be good."""

    def __init__(self, kid: str | None) -> None:
        super().__init__("the JWKS URL's keys are needed: use verify_async")
        self.kid = kid


def _strings(value: Any) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen(slots=True, kw_only=True)
class AuthConfig:
    """The `[auth]` table (docs/configuration.md, docs/auth.md). One source of keys: a shared
    secret (`jwt_secret` or `jwt_secret_env`), a PEM public key (`public_key` or
    `public_key_file`), `jwks_file` or `jwks_url`; none only with `anonymous = true`.
    Checked when built (ValueError); key files are read by `TokenVerifier`."""

    jwt_secret: str | None = attrs.field(default=None, repr=False)
    """The HMAC secret (HS256/384/512), at least 32 bytes."""
    jwt_secret_env: str | None = None
    """The environment variable holding the secret, read when the config is built (a missing
    or empty variable is an error); `jwt_secret` then holds its value."""
    public_key: str | None = attrs.field(default=None, repr=False)
    """A PEM public key (RSA of at least 2048 bits, EC P-256/384/521, Ed25519)."""
    public_key_file: str | None = None
    """A file holding the PEM public key."""
    jwks_file: str | None = None
    """A JWKS file (`{"keys": [...]}`); a token names its key by `kid`."""
    jwks_url: str | None = None
    """A JWKS URL (http or https), fetched, cached and fetched again on an unknown `kid`."""
    audience: str | tuple[str, ...] | None = None
    """Accepted `aud` values; a token's `aud` must name one. None: tokens with an `aud` are
    refused."""
    issuer: str | None = None
    """The required `iss`. None: `iss` is not checked."""
    algorithms: tuple[str, ...] | None = None
    """Accepted `alg`s. None: HS256/384/512 (those the secret is long enough for) with a
    secret, the public-key algorithms with keys. Never `none`; HS with a public key is
    refused (the HS/RS key confusion)."""
    anonymous: bool = False
    """Connections without a token are let in, as anonymous identities."""
    max_token_bytes: int = 8192
    """Longer tokens are refused before anything in them is decoded."""
    leeway: float = 0.0
    """Seconds of clock skew allowed when checking `exp` and `nbf`."""
    jwks_refresh_interval: float = 300.0
    """With `jwks_url`: seconds between two fetches, at least (an unknown `kid` within it is
    refused without a fetch), and the age at which cached keys are fetched again."""
    refresh_before: float = 30.0
    """Seconds before a token's `exp` the server asks the client for a new one."""
    connect_timeout: float = 10.0
    """Seconds a WebSocket opened without a token has to send its `connect` command."""
    proxy_url: str | None = None
    """An HTTP endpoint asked at join, publish, mutate and presence (the `authorize` hook
    of a backend not written in Python; docs/auth.md)."""
    proxy_timeout: float = 2.0
    """Seconds the proxy has to answer; no answer in time refuses."""
    allowed_origins: tuple[str, ...] = ()
    """WebSocket `Origin`s allowed; empty: the node's own host only; `"*"`: any."""
    rules: tuple[Mapping[str, Any], ...] = ()
    """The `[[auth.rules]]` tables, as written (`pyrt.hub.rules.Rules.from_config` reads them)."""

    def __attrs_post_init__(self) -> None:
        if self.jwt_secret is None and self.jwt_secret_env is not None:
            value = os.environ.get(self.jwt_secret_env)
            if not value:
                raise ValueError(
                    f"jwt_secret_env: the environment variable {self.jwt_secret_env} is not set"
                )
            object.__setattr__(self, "jwt_secret", value)
        if not (isinstance(self.max_token_bytes, int) and self.max_token_bytes >= 64):
            raise ValueError("max_token_bytes: must be an integer of at least 64")
        for name in ("leeway", "refresh_before"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name}: must be a number of seconds >= 0")
        if not 0 < self.connect_timeout < math.inf:
            raise ValueError("connect_timeout: must be a positive number of seconds")
        if not 0 < self.proxy_timeout < math.inf:
            raise ValueError("proxy_timeout: must be a positive number of seconds")
        if self.proxy_url is not None and not self.proxy_url.startswith(("https://", "http://")):
            raise ValueError("proxy_url: must be an http:// or https:// URL")
        if not 0 < self.jwks_refresh_interval < math.inf:
            raise ValueError("jwks_refresh_interval: must be a positive number of seconds")
        if self.audience is not None and (
            not _strings(self.audience) or not all(_strings(self.audience))
        ):
            raise ValueError("audience: must be a non-empty string or list of them")
        if self.jwks_url is not None and not self.jwks_url.startswith(("https://", "http://")):
            raise ValueError("jwks_url: must be an http:// or https:// URL")
        self._check_keys()

    def _check_keys(self) -> None:
        if self.public_key is not None and self.public_key_file is not None:
            raise ValueError("public_key, public_key_file: give one of them, not both")
        sources = [
            name
            for name, value in (
                ("jwt_secret", self.jwt_secret),
                ("public_key", self.public_key or self.public_key_file),
                ("jwks_file", self.jwks_file),
                ("jwks_url", self.jwks_url),
            )
            if value is not None
        ]
        if len(sources) > 1:
            raise ValueError(f"{', '.join(sources)}: give one source of keys, not several")
        if not sources and not self.anonymous:
            raise ValueError(
                "give jwt_secret, jwt_secret_env, public_key, public_key_file, jwks_file or "
                "jwks_url (or anonymous = true: no tokens at all)"
            )
        if self.jwt_secret is not None and len(self.jwt_secret.encode()) < 32:
            raise ValueError("jwt_secret: must be at least 32 bytes (RFC 7518 3.2)")
        algorithms = self.algorithms
        if algorithms is None:
            return
        if not algorithms:
            raise ValueError("algorithms: must not be empty")
        for alg in algorithms:
            if alg.lower() == "none":
                raise ValueError('algorithms: "none" (unsigned tokens) is never accepted')
            if alg not in HS_ALGORITHMS and alg not in KEY_ALGORITHMS:
                known = ", ".join((*HS_ALGORITHMS, *KEY_ALGORITHMS))
                raise ValueError(f"algorithms: {alg!r} is not one of {known}")
        if self.jwt_secret is not None:
            if wrong := [a for a in algorithms if a not in HS_ALGORITHMS]:
                raise ValueError(f"algorithms: a secret verifies HS* only, not {wrong[0]}")
            secret_bytes = len(self.jwt_secret.encode())
            for alg in algorithms:
                if secret_bytes < _HS_MIN_BYTES[alg]:
                    raise ValueError(
                        f"algorithms: {alg} needs a secret of at least {_HS_MIN_BYTES[alg]} bytes"
                    )
        elif sources and (hs := [a for a in algorithms if a in HS_ALGORITHMS]):
            raise ValueError(
                f"algorithms: {hs[0]} with public keys is refused: a token signed with the "
                "public key as its HMAC secret would pass (the HS/RS key confusion)"
            )

    @property
    def accepted_algorithms(self) -> tuple[str, ...]:
        """`algorithms`, or its default for the configured keys."""
        if self.algorithms is not None:
            return self.algorithms
        if self.jwt_secret is not None:
            length = len(self.jwt_secret.encode())
            return tuple(a for a in HS_ALGORITHMS if length >= _HS_MIN_BYTES[a])
        return KEY_ALGORITHMS

    @property
    def audiences(self) -> tuple[str, ...] | None:
        return None if self.audience is None else _strings(self.audience)


def _key_algorithms(key: Any) -> tuple[str, ...]:
    """The algorithms a public key verifies."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"an RSA key of {key.key_size} bits: at least {_MIN_RSA_BITS}")
        return tuple(a for a in KEY_ALGORITHMS if a[:2] in ("RS", "PS"))
    if isinstance(key, ec.EllipticCurvePublicKey):
        return tuple(a for a, curve in _EC_CURVES.items() if isinstance(key.curve, curve))
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ("EdDSA",)
    raise ValueError(f"a {type(key).__name__} key: not RSA, EC (P-256/384/521) or Ed25519")


def _jwk_algorithms(jwk: Mapping[str, Any]) -> tuple[str, ...]:
    """The algorithms a JWK may verify: those of its type (and curve), narrowed to its `alg`."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        fits = tuple(a for a in KEY_ALGORITHMS if a[:2] in ("RS", "PS"))
    elif kty in ("EC", "OKP"):
        fits = tuple(
            a for a, c in _JWK_CURVES.items() if c == crv and (a == "EdDSA") == (kty == "OKP")
        )
    else:
        return ()  # "oct" (secrets) and unknown types are not public keys
    alg = jwk.get("alg")
    return fits if alg is None else tuple(a for a in fits if a == alg)


KeyTable = dict[tuple[str | None, str], jwt.PyJWK]
"""(kid, alg) -> the key bound to that algorithm."""


def jwk_table(document: Any, accepted: tuple[str, ...], origin: str) -> KeyTable:
    """The signing keys of a JWKS document, for each accepted algorithm they fit. Keys that
    are not for signatures, not public keys, or that pyjwt cannot read are left out (logged)."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError(f"{origin}: not a JWKS document ({{'keys': [...]}})")
    table: KeyTable = {}
    for index, jwk in enumerate(document["keys"]):
        if not isinstance(jwk, Mapping) or jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            log.warning("%s: key %d has a kid that is not a string: skipped", origin, index)
            continue
        for alg in _jwk_algorithms(jwk):
            if alg not in accepted:
                continue
            try:
                # Only the public half: a private JWK published by mistake still verifies.
                key = jwt.PyJWK(_public_jwk(jwk), algorithm=alg)
                if isinstance(key.key, rsa.RSAPublicKey) and key.key.key_size < _MIN_RSA_BITS:
                    raise ValueError("RSA key shorter than 2048 bits")
            except (jwt.PyJWTError, ValueError, TypeError, KeyError) as e:
                log.warning("%s: key %d (kid %r) skipped: %s", origin, index, kid, e)
                break
            table[kid, alg] = key
    return table


def _public_jwk(jwk: Mapping[str, Any]) -> dict[str, Any]:
    private = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
    return {k: v for k, v in jwk.items() if k not in private}


class TokenVerifier:
    """Verifies JWTs under an `AuthConfig` (see the module's docstring). Reads key files when
    built (ValueError when they are unusable); `jwks_url` keys are fetched by `verify_async`.
    `clock` (monotonic seconds) paces the JWKS fetches; token times are wall-clock (`now`)."""

    def __init__(self, config: AuthConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._algorithms = config.accepted_algorithms
        self._secret: bytes | None = None
        self._public_key: Any = None
        self._keys: KeyTable = {}
        self._kids: set[str | None] = set()
        self._url = config.jwks_url
        self._fetched_at: float | None = None  # when the URL's keys were last fetched
        self._last_fetch: float | None = None  # when a fetch was last tried
        self._fetch_tries = 0
        self._fetch_lock: Any = None  # a trio.Lock, made by the first verify_async
        self._revoked: dict[str, float] = {}
        self._revoked_heap: list[tuple[float, str]] = []
        self._jwt = jwt.PyJWT(
            options={
                "verify_exp": False,  # checked here, against `now`
                "verify_nbf": False,
                "verify_iat": False,
                "verify_sub": False,  # sub and jti: checked here (pyjwt < 2.10 does not)
                "verify_jti": False,
                "verify_aud": True,  # without an audience: tokens with an aud are refused
                "verify_iss": config.issuer is not None,
                "enforce_minimum_key_length": True,
            }
        )
        if config.jwt_secret is not None:
            self._secret = config.jwt_secret.encode()
        elif config.public_key is not None or config.public_key_file is not None:
            pem = config.public_key
            if pem is None:
                pem = _read(config.public_key_file, "public_key_file")
            try:
                self._public_key = load_pem_public_key(pem.encode())
            except (ValueError, TypeError):
                raise ValueError("public_key: not a PEM public key") from None
            fits = _key_algorithms(self._public_key)
            self._algorithms = tuple(a for a in self._algorithms if a in fits)
            if not self._algorithms:
                raise ValueError(
                    f"algorithms: none of them fits the public key (it verifies {', '.join(fits)})"
                )
        elif config.jwks_file is not None:
            text = _read(config.jwks_file, "jwks_file")
            try:
                document = json.loads(text)
            except ValueError:
                raise ValueError(f"jwks_file: {config.jwks_file} is not JSON") from None
            self._set_keys(jwk_table(document, self._algorithms, "jwks_file"))
            if not self._keys:
                raise ValueError(f"jwks_file: {config.jwks_file} holds no usable signing key")

    @classmethod
    def development(cls, secret: str | None = None) -> TokenVerifier:
        """A verifier of HS256 tokens signed with `secret`, by default a random 32-byte one
        (what `pyrt serve` uses without an `[auth]` table, to mint a development token)."""
        return cls(AuthConfig(jwt_secret=secret or secrets.token_urlsafe(32)))

    def _set_keys(self, table: KeyTable) -> None:
        self._keys = table
        self._kids = {kid for kid, _alg in table}

    # -- verification ------------------------------------------------------------------------

    def verify(
        self, token: str, *, now: float | None = None, audience_optional: bool = False
    ) -> Identity:
        """The identity `token` proves at `now` (wall-clock seconds; default: the time), or
        AuthError. Raises NeedsFetch, only with `jwks_url`, for a key not in the cache.
        `audience_optional`: a token without `aud` passes even when `audience` is configured
        (Supabase's API keys, the anon and service_role JWTs, carry none); one with an `aud`
        is checked all the same."""
        config = self.config
        if len(token) > config.max_token_bytes:
            raise AuthError("token too large")
        if not token.isascii():
            raise AuthError("malformed token")
        key: Any
        algorithms: tuple[str, ...] | list[str] = self._algorithms
        if self._secret is not None:
            key = self._secret
        elif self._public_key is not None:
            key = self._public_key
        else:  # a JWKS: the header names the key (parsed here, and again by pyjwt)
            header = _header(token)
            alg = self._algorithm(header)
            key = self._jwk(header.get("kid"), alg)
            algorithms = [alg]
        try:
            payload = self._jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=config.audiences,
                issuer=config.issuer,
            )
        except jwt.InvalidSignatureError:
            raise AuthError("bad signature") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong audience (aud)") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong issuer (iss)") from None
        except jwt.InvalidAlgorithmError:
            self._algorithm(_header(token))  # raises the reason
            raise AuthError("token algorithm not accepted") from None
        except jwt.MissingRequiredClaimError as e:
            if not (audience_optional and e.claim == "aud"):
                raise AuthError(f"missing claim {e.claim}") from None
            return self._verify_without_audience(token, key, algorithms, now)
        except jwt.InvalidKeyError:
            raise AuthError("the key cannot verify this token") from None
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
            raise AuthError("malformed token") from None
        return self._identity(payload, time.time() if now is None else now)

    def _verify_without_audience(
        self, token: str, key: Any, algorithms: tuple[str, ...] | list[str], now: float | None
    ) -> Identity:
        """`verify` again, all but the audience, for a token that has no `aud`."""
        try:
            payload = self._jwt.decode(
                token,
                key,
                algorithms=algorithms,
                issuer=self.config.issuer,
                options={"verify_aud": False},
            )
        except jwt.InvalidIssuerError:
            raise AuthError("wrong issuer (iss)") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthError(f"missing claim {e.claim}") from None
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
            raise AuthError("malformed token") from None
        if "aud" in payload:  # not expected: pyjwt said it was missing
            raise AuthError("wrong audience (aud)")
        return self._identity(payload, time.time() if now is None else now)

    def _algorithm(self, header: Mapping[str, Any]) -> str:
        """The header's `alg`, if accepted; else the reason it is not, as an AuthError."""
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise AuthError("malformed token")
        if alg.lower() == "none":
            raise AuthError("unsigned tokens (alg none) are not accepted")
        if alg not in self._algorithms:
            raise AuthError("token algorithm not accepted")
        return alg

    def _jwk(self, kid: Any, alg: str) -> jwt.PyJWK:
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed token")
        if kid is None and len(self._kids) == 1 and None not in self._kids:
            # A token without kid, and one key: that key (JWKS of one key need no kid).
            (kid,) = self._kids
        found = self._keys.get((kid, alg))
        if found is not None:
            return found
        if kid in self._kids:
            raise AuthError("token algorithm not accepted for its key")
        if self._url is not None:
            raise NeedsFetch(kid)
        raise AuthError("unknown kid" if kid is not None else "token has no kid")

    def _identity(self, payload: dict[str, Any], now: float) -> Identity:
        leeway = self.config.leeway
        exp = _time_claim(payload, "exp")
        if exp is not None and exp <= now - leeway:
            raise AuthError("token expired")
        nbf = _time_claim(payload, "nbf")
        if nbf is not None and nbf > now + leeway:
            raise AuthError("token not yet valid (nbf)")
        _time_claim(payload, "iat")
        sub = payload.get("sub", "")
        if not isinstance(sub, str):
            raise AuthError("sub must be a string")
        jti = payload.get("jti")
        if jti is not None and not isinstance(jti, str):
            raise AuthError("jti must be a string")
        channels = payload.get("channels", [])
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise AuthError("channels must be a list of strings")
        if jti is not None and self.is_revoked(jti, now):
            raise AuthError("token revoked")
        return Identity(
            user=sub,
            claims=payload,
            anonymous=False,
            expires=exp,
            jti=jti,
            channels=tuple(channels),
        )

    async def verify_async(
        self, token: str, *, now: float | None = None, audience_optional: bool = False
    ) -> Identity:
        """`verify`, fetching the JWKS URL's keys when it needs them (an unknown `kid`, at most
        once per `jwks_refresh_interval`) or when the cached ones are older than that. Never
        blocks the event loop; a fetch takes at most JWKS_FETCH_TIMEOUT seconds."""
        if self._url is None:
            return self.verify(token, now=now, audience_optional=audience_optional)
        if (
            self._fetched_at is not None
            and self._clock() - self._fetched_at >= self.config.jwks_refresh_interval
            and not (self._fetch_lock is not None and self._fetch_lock.locked())
        ):  # stale keys: fetch again (while another task fetches, the stale ones do)
            await self._refresh()
        try:
            return self.verify(token, now=now, audience_optional=audience_optional)
        except NeedsFetch:
            await self._refresh()
        try:
            return self.verify(token, now=now, audience_optional=audience_optional)
        except NeedsFetch as e:
            raise AuthError("unknown kid" if e.kid is not None else "token has no kid") from None

    async def _refresh(self) -> None:
        """Fetch the URL's keys, unless the last try was too recent, or another task tried
        while this one waited for the lock (then its result is this one's too)."""
        import trio

        if self._fetch_lock is None:
            self._fetch_lock = trio.Lock()
        tries = self._fetch_tries
        async with self._fetch_lock:
            if self._fetch_tries != tries:
                return
            start = self._clock()
            interval = self.config.jwks_refresh_interval
            if self._fetched_at is None:
                interval = min(interval, RETRY_WITHOUT_KEYS)
            if self._last_fetch is not None and start - self._last_fetch < interval:
                return
            self._last_fetch = start
            self._fetch_tries += 1
            try:
                with trio.fail_after(JWKS_FETCH_TIMEOUT):
                    table = await self._fetch()
            except (OSError, ValueError, trio.TooSlowError) as e:
                log.warning("jwks_url: fetching the keys failed: %s", e)
                return
            if not table:
                log.warning("jwks_url: the fetched JWKS holds no usable signing key")
            self._set_keys(table)
            self._fetched_at = start

    async def _fetch(self) -> KeyTable:
        import httpx

        assert self._url is not None
        try:
            async with (
                httpx.AsyncClient(timeout=JWKS_FETCH_TIMEOUT) as client,
                client.stream("GET", self._url, headers={"accept": "application/json"}) as r,
            ):
                if r.status_code != 200:
                    raise ValueError(f"HTTP status {r.status_code}")
                body = bytearray()
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
        except httpx.HTTPError as e:
            raise ValueError(f"{type(e).__name__}: {e}") from None
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise ValueError("not JSON") from None
        return jwk_table(document, self._algorithms, "jwks_url")

    # -- minting (the secret case) -----------------------------------------------------------

    def mint(
        self, claims: Mapping[str, Any], *, expires_in: float | None, now: float | None = None
    ) -> str:
        """A token of `claims` signed with the secret (the first accepted HS algorithm), with
        `iat` now and, unless `expires_in` is None, `exp` that many seconds later."""
        if self._secret is None:
            raise ValueError("mint: only a verifier with a jwt_secret signs tokens")
        issued = time.time() if now is None else now
        payload = {"iat": int(issued), **claims}
        if expires_in is not None:
            payload["exp"] = int(issued + expires_in)
        return jwt.encode(payload, self._secret, algorithm=self._algorithms[0])

    # -- revocation --------------------------------------------------------------------------

    def revoke(self, jti: str, until: float) -> None:
        """Refuse tokens with this `jti` until `until` (wall-clock seconds: the token's `exp`).
        At most MAX_REVOKED are kept: past it, those ending soonest are forgotten first."""
        self._revoked[jti] = max(until, self._revoked.get(jti, until))
        heapq.heappush(self._revoked_heap, (self._revoked[jti], jti))
        while len(self._revoked) > MAX_REVOKED:
            self._pop_revoked()
        if len(self._revoked_heap) > 2 * MAX_REVOKED:  # superseded entries: rebuild
            self._revoked_heap = [(u, j) for j, u in self._revoked.items()]
            heapq.heapify(self._revoked_heap)

    def is_revoked(self, jti: str, now: float) -> bool:
        """Whether `jti` is revoked at `now`; forgets the revocations that ended."""
        while self._revoked_heap and self._revoked_heap[0][0] <= now:
            self._pop_revoked()
        return jti in self._revoked

    def _pop_revoked(self) -> None:
        until, jti = heapq.heappop(self._revoked_heap)
        if self._revoked.get(jti) == until:
            del self._revoked[jti]

    @property
    def revoked_count(self) -> int:
        return len(self._revoked)


def _header(token: str) -> dict[str, Any]:
    try:
        return jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
        raise AuthError("malformed token") from None


def _time_claim(payload: Mapping[str, Any], name: str) -> float | None:
    if name not in payload:
        return None
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AuthError(f"{name} must be a number")
    return float(value)


def _read(path: str | None, key: str) -> str:
    assert path is not None
    try:
        with Path(path).open("rb") as file:
            raw = file.read(MAX_JWKS_BYTES + 1)
    except OSError as e:
        raise ValueError(f"{key}: {path}: {e.strerror}") from None
    if len(raw) > MAX_JWKS_BYTES:
        raise ValueError(f"{key}: {path}: larger than {MAX_JWKS_BYTES} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ValueError(f"{key}: {path}: not UTF-8") from None


_KINDS: dict[str, str] = {
    "jwt_secret": "string",
    "jwt_secret_env": "string",
    "public_key": "string",
    "public_key_file": "string",
    "jwks_file": "string",
    "jwks_url": "string",
    "audience": "string or strings",
    "issuer": "string",
    "algorithms": "strings",
    "anonymous": "boolean",
    "max_token_bytes": "integer",
    "leeway": "number",
    "jwks_refresh_interval": "number",
    "refresh_before": "number",
    "connect_timeout": "number",
    "proxy_url": "string",
    "proxy_timeout": "number",
    "allowed_origins": "strings",
    "rules": "tables",
}
"""The `[auth]` table's keys (the fields of AuthConfig) and the TOML type of each."""


def auth_config(table: Any) -> AuthConfig:
    """The `[auth]` table of a config file, checked: unknown keys and wrong types are errors
    naming the key (ValueError, `auth.<key>: ...`), and so is a key file that cannot be read.
    A secret given both in the file and by `jwt_secret_env` is refused."""
    if not isinstance(table, Mapping):
        raise ValueError("auth: expected a table, [auth]")
    values: dict[str, Any] = {}
    for key, value in table.items():
        kind = _KINDS.get(key)
        if kind is None:
            raise ValueError(f"auth.{key}: unknown setting; known: {', '.join(sorted(_KINDS))}")
        if _is_scalar(kind, value):
            pass
        elif kind == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isnan(value):
                raise ValueError(f"auth.{key}: expected a number, got nan")
            value = float(value)
        elif kind.endswith("strings") and _is_strings(value):
            value = tuple(value)
        elif kind == "string or strings" and isinstance(value, str) and value:
            pass
        elif kind == "tables" and isinstance(value, list):
            if not all(isinstance(rule, Mapping) for rule in value):
                raise ValueError(f"auth.{key}: expected tables, [[auth.{key}]]")
            value = tuple(dict(rule) for rule in value)
        else:
            article = "an" if kind[0] in "ai" else "a"
            shown = "a secret" if key == "jwt_secret" else repr(value)
            raise ValueError(f"auth.{key}: expected {article} {kind}, got {shown}")
        values[key] = value
    if "jwt_secret" in values and "jwt_secret_env" in values:
        raise ValueError("auth: give jwt_secret or jwt_secret_env, not both")
    try:
        config = AuthConfig(**values)
        TokenVerifier(config)  # reads and checks the key files now, not at the first token
        Rules.from_config(config.rules)  # and the rules (their messages name auth.rules[i])
    except ValueError as e:
        raise ValueError(f"auth: {e}") from None
    return config


def _is_scalar(kind: str, value: Any) -> bool:
    if kind == "string":
        return isinstance(value, str) and bool(value)
    if kind == "boolean":
        return isinstance(value, bool)
    return kind == "integer" and isinstance(value, int) and not isinstance(value, bool)


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)
