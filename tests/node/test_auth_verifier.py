"""pyrt.node.auth: JWT verification (the attack matrix at the verifier's level), the JWKS file
and URL (a real HTTP server on loopback), revocation, and the `[auth]` config table."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from pyrt.hub.identity import Identity
from pyrt.node import auth
from pyrt.node.auth import AuthConfig, AuthError, NeedsFetch, TokenVerifier
from pyrt.node.config import ConfigError, node_config

NOW = 1_800_000_000.0
SECRET = "s" * 64  # long enough for HS512
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def pem(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_built(header: dict[str, Any], payload: Any, key: bytes | None = None) -> str:
    """A token built without pyjwt (which refuses to make the bad ones): HS256 over `key`,
    or no signature at all."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if key is None:
        return signing_input + "."
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def hs_verifier(**options: Any) -> TokenVerifier:
    return TokenVerifier(AuthConfig(jwt_secret=SECRET, **options))


def hs_token(claims: dict[str, Any], alg: str = "HS256", secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm=alg)


def refused(verifier: TokenVerifier, token: str, reason: str) -> None:
    with pytest.raises(AuthError, match=reason) as info:
        verifier.verify(token, now=NOW)
    assert info.value.reason == str(info.value)
    assert SECRET not in info.value.reason


# -- valid tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_a_secret_verifies_hs_tokens(alg: str) -> None:
    claims = {"sub": "ann", "exp": NOW + 60, "jti": "t1", "channels": ["a", "b"], "role": "x"}
    identity = hs_verifier().verify(hs_token(claims, alg), now=NOW)
    assert identity.user == "ann"
    assert not identity.anonymous
    assert identity.expires == NOW + 60
    assert identity.jti == "t1"
    assert identity.channels == ("a", "b")
    assert identity.role == "x"
    assert dict(identity.claims) == claims


@pytest.mark.parametrize(
    ("private", "alg"),
    [
        (RSA_KEY, "RS256"),
        (RSA_KEY, "RS512"),
        (RSA_KEY, "PS256"),
        (EC_KEY, "ES256"),
        (ED_KEY, "EdDSA"),
    ],
)
def test_a_public_key_verifies_its_algorithms(private: Any, alg: str) -> None:
    verifier = TokenVerifier(AuthConfig(public_key=pem(private)))
    token = jwt.encode({"sub": "bob"}, private, algorithm=alg)
    identity = verifier.verify(token, now=NOW)
    assert (identity.user, identity.expires, identity.channels) == ("bob", None, ())


def test_a_token_without_sub_is_authenticated_with_an_empty_user() -> None:
    identity = hs_verifier().verify(hs_token({"exp": NOW + 1}), now=NOW)
    assert identity.user == ""
    assert not identity.anonymous


def test_a_public_key_file(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text(pem(EC_KEY))
    verifier = TokenVerifier(AuthConfig(public_key_file=str(path)))
    assert verifier.verify(jwt.encode({"sub": "c"}, EC_KEY, algorithm="ES256")).user == "c"


# -- the attack matrix -----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(alg: str) -> None:
    token = hand_built({"alg": alg, "typ": "JWT"}, {"sub": "admin"})
    refused(hs_verifier(), token, "alg none")
    refused(TokenVerifier(AuthConfig(public_key=pem(RSA_KEY))), token, "alg none")
    # The classic form, written by hand:
    refused(hs_verifier(), "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.", "alg none")


def test_hs_rs_key_confusion_is_refused() -> None:
    """A token signed HS256 with the RSA public key's PEM as the HMAC secret."""
    public = pem(RSA_KEY)
    token = hand_built({"alg": "HS256", "typ": "JWT"}, {"sub": "admin"}, public.encode())
    refused(TokenVerifier(AuthConfig(public_key=public)), token, "algorithm not accepted")
    with pytest.raises(ValueError, match="key confusion"):
        AuthConfig(public_key=public, algorithms=("RS256", "HS256"))


def test_hs_with_a_jwks_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(RSA_KEY, "a")]}))
    with pytest.raises(ValueError, match="key confusion"):
        AuthConfig(jwks_file=str(path), algorithms=("HS256",))
    token = hand_built({"alg": "HS256", "kid": "a"}, {"sub": "x"}, pem(RSA_KEY).encode())
    refused(TokenVerifier(AuthConfig(jwks_file=str(path))), token, "algorithm not accepted")


def test_a_wrong_key_is_refused() -> None:
    refused(hs_verifier(), hs_token({"sub": "a"}, secret="t" * 64), "bad signature")
    verifier = TokenVerifier(AuthConfig(public_key=pem(RSA_KEY)))
    refused(verifier, jwt.encode({"sub": "a"}, RSA_OTHER, algorithm="RS256"), "bad signature")


def test_an_algorithm_outside_the_list_is_refused() -> None:
    verifier = hs_verifier(algorithms=("HS256",))
    refused(verifier, hs_token({"sub": "a"}, "HS512"), "algorithm not accepted")
    rs_only = TokenVerifier(AuthConfig(public_key=pem(RSA_KEY), algorithms=("RS256",)))
    refused(rs_only, jwt.encode({}, RSA_KEY, algorithm="PS256"), "algorithm not accepted")


def test_expired_and_not_yet_valid_tokens_are_refused() -> None:
    verifier = hs_verifier()
    refused(verifier, hs_token({"exp": NOW - 1}), "expired")
    refused(verifier, hs_token({"exp": NOW}), "expired")
    refused(verifier, hs_token({"nbf": NOW + 5}), "not yet valid")
    assert verifier.verify(hs_token({"nbf": NOW, "exp": NOW + 1}), now=NOW).expires == NOW + 1
    lenient = hs_verifier(leeway=10.0)
    assert lenient.verify(hs_token({"exp": NOW - 5, "nbf": NOW + 5}), now=NOW)
    refused(lenient, hs_token({"exp": NOW - 11}), "expired")


def test_verify_checks_times_against_the_clock_by_default() -> None:
    verifier = hs_verifier()
    refused_now = hs_token({"exp": time.time() - 1})
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(refused_now)
    assert verifier.verify(hs_token({"exp": time.time() + 60})).expires


@pytest.mark.parametrize("value", ["123", True, None, [1], {"a": 1}])
def test_time_claims_must_be_numbers_when_present(value: Any) -> None:
    for claim in ("exp", "nbf", "iat"):
        refused(hs_verifier(), hs_token({claim: value}), f"{claim} must be a number")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_time_claims_must_be_finite(value: float) -> None:
    token = hand_built({"alg": "HS256"}, {"exp": value}, SECRET.encode())
    refused(hs_verifier(), token, "exp must be a number")


def test_audience_and_issuer() -> None:
    verifier = hs_verifier(audience=("app", "admin"), issuer="https://issuer.example")
    good = {"aud": "app", "iss": "https://issuer.example"}
    assert verifier.verify(hs_token(good), now=NOW)
    assert verifier.verify(hs_token({**good, "aud": ["other", "admin"]}), now=NOW)
    refused(verifier, hs_token({**good, "aud": "other"}), "wrong audience")
    refused(verifier, hs_token({"iss": "https://issuer.example"}), "missing claim aud")
    refused(verifier, hs_token({**good, "iss": "https://evil.example"}), "wrong issuer")
    refused(verifier, hs_token({"aud": "app"}), "missing claim iss")
    # Without a configured audience, a token meant for some audience is not for us.
    refused(hs_verifier(), hs_token({"aud": "app"}), "wrong audience")


def test_an_optional_audience_passes_tokens_without_aud_only() -> None:
    """Supabase's API keys (anon, service_role) are JWTs without `aud`: the Supabase endpoint
    verifies them with `audience_optional`, while users' tokens carry the audience."""
    verifier = hs_verifier(audience="authenticated", issuer="supabase")
    key = hs_token({"role": "anon", "iss": "supabase", "exp": NOW + 60})
    refused(verifier, key, "missing claim aud")
    identity = verifier.verify(key, now=NOW, audience_optional=True)
    assert (identity.role, identity.expires) == ("anon", NOW + 60)
    # Everything else is still checked: an aud that is there, the issuer, the times, the
    # signature.
    for claims, reason in [
        ({"role": "anon", "iss": "supabase", "aud": "other"}, "wrong audience"),
        ({"role": "anon", "iss": "evil"}, "wrong issuer"),
        ({"role": "anon"}, "missing claim iss"),
        ({"role": "anon", "iss": "supabase", "exp": NOW - 1}, "token expired"),
        ({"role": "anon", "iss": "supabase", "nbf": NOW + 60}, "not yet valid"),
    ]:
        with pytest.raises(AuthError, match=reason):
            verifier.verify(hs_token(claims), now=NOW, audience_optional=True)
    forged = hs_token({"role": "service_role", "iss": "supabase"}, secret="x" * 64)
    with pytest.raises(AuthError, match="bad signature"):
        verifier.verify(forged, now=NOW, audience_optional=True)


def test_a_tampered_payload_is_refused() -> None:
    verifier = hs_verifier()
    header, _payload, signature = hs_token({"sub": "ann", "role": "user"}).split(".")
    forged = b64(json.dumps({"sub": "ann", "role": "admin"}).encode())
    refused(verifier, f"{header}.{forged}.{signature}", "bad signature")
    rs = TokenVerifier(AuthConfig(public_key=pem(RSA_KEY)))
    header, _payload, signature = jwt.encode({"sub": "a"}, RSA_KEY, algorithm="RS256").split(".")
    refused(rs, f"{header}.{forged}.{signature}", "bad signature")


def test_an_oversized_token_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = hs_verifier(max_token_bytes=1024)
    assert verifier.verify(hs_token({"pad": "x" * 600}), now=NOW)

    def no_decoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an oversized token was decoded")

    monkeypatch.setattr(auth.jwt, "get_unverified_header", no_decoding)
    monkeypatch.setattr(auth.jwt.PyJWT, "decode", no_decoding)
    refused(verifier, hs_token({"pad": "x" * 1000}), "too large")
    huge = "eyJhbGciOiJIUzI1NiJ9." + "A" * 64_000_000 + ".sig"
    start = time.perf_counter()
    refused(verifier, huge, "too large")
    assert time.perf_counter() - start < 0.05


GARBAGE = [
    "",
    "a",
    "a.b",
    "a.b.c",
    "....",
    "é.é.é",
    "eyJhbGciOiJIUzI1NiJ9",
    b64(b"[1, 2]") + ".e30.",
    b64(b"not json") + ".e30.",
    b64(b'{"alg": 5}') + ".e30.",
    b64(b'{"alg": "HS256", "kid": 5}') + ".e30.",
    b64(b'{"a": ' + b"[" * 3000 + b"]" * 3000 + b"}") + ".e30.",
    b64(b'{"alg": "HS256"}') + "." + b64(b"[" * 3000) + ".sig",
    b64(b'{"alg": "HS256"}') + ".!!!.sig",
]


@pytest.mark.parametrize("token", GARBAGE)
def test_garbage_is_refused(token: str) -> None:
    refused(hs_verifier(), token, r"^(malformed token|bad signature)$")


def test_a_signed_payload_that_is_not_an_object_is_refused() -> None:
    refused(hs_verifier(), hand_built({"alg": "HS256"}, [1, 2], SECRET.encode()), "malformed")


@given(st.text(max_size=200) | st.from_regex(r"[A-Za-z0-9_-]{0,40}(\.[A-Za-z0-9_-]{0,40}){2}"))
def test_any_string_is_an_identity_or_an_auth_error(token: str) -> None:
    """Never another exception (a parser's, a RecursionError, ...): a refusal or, by luck, an
    identity."""
    outcome: object
    try:
        outcome = hs_verifier().verify(token, now=NOW)
    except AuthError as e:
        outcome = e
    assert isinstance(outcome, (Identity, AuthError))


def test_claim_types() -> None:
    verifier = hs_verifier()
    refused(verifier, hs_token({"sub": 42}), "sub must be a string")
    refused(verifier, hs_token({"sub": None}), "sub must be a string")
    refused(verifier, hs_token({"jti": 7}), "jti must be a string")
    for channels in ("a", [1], ["a", None], {"a": 1}):
        refused(verifier, hs_token({"channels": channels}), "channels must be a list")


# -- JWKS ------------------------------------------------------------------------------------


def jwk(private: Any, kid: str, **extra: Any) -> dict[str, Any]:
    public = private.public_key()
    algorithm: Any = {
        rsa.RSAPublicKey: RSAAlgorithm,
        ec.EllipticCurvePublicKey: ECAlgorithm,
        ed25519.Ed25519PublicKey: OKPAlgorithm,
    }
    for kind, alg in algorithm.items():
        if isinstance(public, kind):
            return {**alg.to_jwk(public, as_dict=True), "kid": kid, **extra}
    raise AssertionError(public)


def test_a_jwks_file_picks_the_key_by_kid(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    keys = [jwk(RSA_KEY, "rsa"), jwk(EC_KEY, "ec"), jwk(RSA_OTHER, "enc", use="enc")]
    path.write_text(json.dumps({"keys": keys}))
    verifier = TokenVerifier(AuthConfig(jwks_file=str(path)))
    by_rsa = jwt.encode({"sub": "r"}, RSA_KEY, algorithm="RS256", headers={"kid": "rsa"})
    by_ec = jwt.encode({"sub": "e"}, EC_KEY, algorithm="ES256", headers={"kid": "ec"})
    assert verifier.verify(by_rsa, now=NOW).user == "r"
    assert verifier.verify(by_ec, now=NOW).user == "e"
    # the RSA key's signature under the EC key's kid, and an ES token for the RSA key
    wrong = jwt.encode({"sub": "r"}, RSA_KEY, algorithm="RS256", headers={"kid": "ec"})
    refused(verifier, wrong, "algorithm not accepted for its key")
    unknown = jwt.encode({"sub": "r"}, RSA_KEY, algorithm="RS256", headers={"kid": "nope"})
    refused(verifier, unknown, "unknown kid")
    no_kid = jwt.encode({"sub": "r"}, RSA_KEY, algorithm="RS256")
    refused(verifier, no_kid, "no kid")
    # A key marked for encryption does not verify signatures.
    enc = jwt.encode({"sub": "r"}, RSA_OTHER, algorithm="RS256", headers={"kid": "enc"})
    refused(verifier, enc, "unknown kid")


def test_a_jwks_of_one_key_needs_no_kid(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(ED_KEY, "only")]}))
    verifier = TokenVerifier(AuthConfig(jwks_file=str(path)))
    assert verifier.verify(jwt.encode({"sub": "x"}, ED_KEY, algorithm="EdDSA")).user == "x"


def test_a_jwk_bound_to_an_alg_accepts_only_it(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(RSA_KEY, "k", alg="PS256")]}))
    verifier = TokenVerifier(AuthConfig(jwks_file=str(path)))
    headers = {"kid": "k"}
    assert verifier.verify(jwt.encode({}, RSA_KEY, algorithm="PS256", headers=headers))
    rs = jwt.encode({}, RSA_KEY, algorithm="RS256", headers=headers)
    refused(verifier, rs, "not accepted for its key")


def test_a_jwks_file_without_usable_keys_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]}))
    with pytest.raises(ValueError, match="no usable signing key"):
        TokenVerifier(AuthConfig(jwks_file=str(path)))
    path.write_text("[]")
    with pytest.raises(ValueError, match="not a JWKS"):
        TokenVerifier(AuthConfig(jwks_file=str(path)))


class JwksServer:
    """A JWKS document served over HTTP on 127.0.0.1 from a thread, counting the fetches."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.status = 200
        self.fetches = 0
        self.gate = threading.Event()  # a fetch is answered once it is set
        self.gate.set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.fetches += 1
                server.gate.wait(10)
                body = json.dumps(server.document).encode()
                self.send_response(server.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/jwks.json"


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    thread = threading.Thread(target=server.http.serve_forever, daemon=True)
    thread.start()
    yield server
    server.http.shutdown()
    server.http.server_close()
    thread.join()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rs_token(private: Any, kid: str, sub: str = "u") -> str:
    return jwt.encode({"sub": sub}, private, algorithm="RS256", headers={"kid": kid})


async def test_a_jwks_url_is_fetched_cached_and_refetched_on_a_new_kid(
    jwks_server: JwksServer,
) -> None:
    jwks_server.document = {"keys": [jwk(RSA_KEY, "k1")]}
    clock = FakeClock()
    verifier = TokenVerifier(
        AuthConfig(jwks_url=jwks_server.url, jwks_refresh_interval=60.0), clock=clock
    )
    first = rs_token(RSA_KEY, "k1", "ann")
    with pytest.raises(NeedsFetch):
        verifier.verify(first, now=NOW)  # nothing fetched yet: the synchronous path says so
    assert (await verifier.verify_async(first, now=NOW)).user == "ann"
    assert jwks_server.fetches == 1
    assert verifier.verify(first, now=NOW).user == "ann"  # cached: no I/O
    assert (await verifier.verify_async(first, now=NOW)).user == "ann"
    assert jwks_server.fetches == 1

    # The issuer rotates to a new key: the first token of the new kid fetches it ...
    clock.now += 61
    jwks_server.document = {"keys": [jwk(RSA_KEY, "k1"), jwk(RSA_OTHER, "k2")]}
    rotated = rs_token(RSA_OTHER, "k2", "bob")
    # (the cached keys are older than the interval: verify_async fetches before it checks)
    assert (await verifier.verify_async(rotated, now=NOW)).user == "bob"
    assert jwks_server.fetches == 2
    assert verifier.verify(rotated, now=NOW).user == "bob"

    # ... and a third key within the interval waits for the interval's end.
    third_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks_server.document["keys"].append(jwk(third_key, "k3"))
    third = rs_token(third_key, "k3", "cid")
    clock.now += 10
    with pytest.raises(AuthError, match="unknown kid"):
        await verifier.verify_async(third, now=NOW)
    assert jwks_server.fetches == 2
    clock.now += 51
    assert (await verifier.verify_async(third, now=NOW)).user == "cid"
    assert jwks_server.fetches == 3

    # A key the issuer withdrew stops verifying once the cache is refreshed.
    clock.now += 61
    jwks_server.document = {"keys": [jwk(RSA_OTHER, "k2")]}
    with pytest.raises(AuthError, match="unknown kid"):
        await verifier.verify_async(first, now=NOW)
    assert jwks_server.fetches == 4


async def test_a_spray_of_unknown_kids_fetches_at_most_once_per_interval(
    jwks_server: JwksServer,
) -> None:
    jwks_server.document = {"keys": [jwk(RSA_KEY, "k1")]}
    clock = FakeClock()
    verifier = TokenVerifier(
        AuthConfig(jwks_url=jwks_server.url, jwks_refresh_interval=300.0), clock=clock
    )
    assert await verifier.verify_async(rs_token(RSA_KEY, "k1"), now=NOW)
    assert jwks_server.fetches == 1
    refusals = 0

    async def attacker(n: int) -> None:
        nonlocal refusals
        for i in range(10):
            with pytest.raises(AuthError, match=r"^unknown kid$"):
                await verifier.verify_async(rs_token(RSA_KEY, f"random-{n}-{i}"), now=NOW)
            refusals += 1
            clock.now += 1.0

    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(attacker, n)
    # 100 unknown kids over 100 s of the clock: the interval (300 s) had not passed since the
    # first fetch, so none of them fetched.
    assert refusals == 100
    assert jwks_server.fetches == 1
    clock.now += 200.0  # past the interval: concurrent unknown kids share one fetch
    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(attacker, 100 + n)
    assert jwks_server.fetches == 2


async def test_stale_keys_still_verify_while_they_are_fetched_again(
    jwks_server: JwksServer,
) -> None:
    jwks_server.document = {"keys": [jwk(RSA_KEY, "k1")]}
    clock = FakeClock()
    verifier = TokenVerifier(
        AuthConfig(jwks_url=jwks_server.url, jwks_refresh_interval=60.0), clock=clock
    )
    token = rs_token(RSA_KEY, "k1", "ann")
    assert await verifier.verify_async(token, now=NOW)
    clock.now += 61
    jwks_server.gate.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(verifier.verify_async, token)
        while jwks_server.fetches < 2:  # the first task's fetch hangs in the server ...
            await trio.sleep(0.01)
        with trio.fail_after(5):  # ... and another connection is not held up by it
            assert (await verifier.verify_async(token, now=NOW)).user == "ann"
        jwks_server.gate.set()
    assert jwks_server.fetches == 2


async def test_a_jwks_url_that_fails_refuses_tokens_and_is_retried_later(
    jwks_server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    jwks_server.document = {"keys": [jwk(RSA_KEY, "k1")]}
    jwks_server.status = 500
    clock = FakeClock()
    verifier = TokenVerifier(AuthConfig(jwks_url=jwks_server.url), clock=clock)
    token = rs_token(RSA_KEY, "k1")
    with caplog.at_level(logging.WARNING, "pyrt.auth"):
        with pytest.raises(AuthError, match="unknown kid"):
            await verifier.verify_async(token, now=NOW)
        assert "HTTP status 500" in caplog.text
        with pytest.raises(AuthError, match="unknown kid"):
            await verifier.verify_async(token, now=NOW)
    assert jwks_server.fetches == 1
    jwks_server.status = 200
    clock.now += auth.RETRY_WITHOUT_KEYS  # never fetched: retried sooner than the interval
    assert await verifier.verify_async(token, now=NOW)
    assert jwks_server.fetches == 2


async def test_verify_async_without_a_url_is_verify() -> None:
    verifier = hs_verifier()
    assert (await verifier.verify_async(hs_token({"sub": "a"}), now=NOW)).user == "a"
    with pytest.raises(AuthError, match="expired"):
        await verifier.verify_async(hs_token({"exp": NOW - 1}), now=NOW)


# -- minting and revocation ------------------------------------------------------------------


def test_mint_and_development() -> None:
    verifier = TokenVerifier.development()
    token = verifier.mint({"sub": "dev"}, expires_in=60, now=NOW)
    identity = verifier.verify(token, now=NOW + 59)
    assert (identity.user, identity.expires) == ("dev", NOW + 60)
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(token, now=NOW + 60)
    assert verifier.verify(verifier.mint({}, expires_in=None)).expires is None
    with pytest.raises(AuthError, match="bad signature"):
        TokenVerifier.development().verify(token, now=NOW)  # another random secret
    same = TokenVerifier.development(SECRET)
    assert same.verify(hs_token({"sub": "s"}), now=NOW).user == "s"
    with pytest.raises(ValueError, match="jwt_secret"):
        TokenVerifier(AuthConfig(public_key=pem(RSA_KEY))).mint({}, expires_in=None)


def test_revoked_tokens_are_refused_until_their_revocation_ends() -> None:
    verifier = hs_verifier()
    token = hs_token({"sub": "a", "jti": "t1", "exp": NOW + 100})
    verifier.revoke("t1", until=NOW + 100)
    refused(verifier, token, "revoked")
    assert verifier.is_revoked("t1", NOW + 99)
    assert not verifier.is_revoked("t1", NOW + 100)
    assert verifier.revoked_count == 0  # pruned once over
    assert verifier.verify(hs_token({"sub": "a", "jti": "t2"}), now=NOW).jti == "t2"


def test_revocations_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "MAX_REVOKED", 10)
    verifier = hs_verifier()
    for i in range(20):
        verifier.revoke(f"t{i}", until=NOW + 100 + (i * 7) % 20)
    assert verifier.revoked_count == 10
    kept = {f"t{i}" for i in range(20) if verifier.is_revoked(f"t{i}", NOW)}
    untils = sorted(((i * 7) % 20, f"t{i}") for i in range(20))
    assert kept == {jti for _, jti in untils[10:]}  # the ten that end last
    verifier.revoke("t0", until=NOW + 1000)  # extended
    assert verifier.is_revoked("t0", NOW + 500)


# -- the [auth] table ------------------------------------------------------------------------


def load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "pyrt.toml"
    path.write_text(text)
    return node_config(path)


def test_the_auth_table_loads(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        f"""
        [auth]
        jwt_secret = "{SECRET}"
        audience = ["app", "admin"]
        issuer = "https://issuer.example"
        leeway = 5
        allowed_origins = ["https://app.example.com"]

        [[auth.rules]]
        channel = "user:{{sub}}"
        subscribe = "authenticated"

        [[auth.rules]]
        channel = "public:>"
        subscribe = "anonymous"
        """,
    )
    assert config.auth == AuthConfig(
        jwt_secret=SECRET,
        audience=("app", "admin"),
        issuer="https://issuer.example",
        leeway=5.0,
        allowed_origins=("https://app.example.com",),
        rules=(
            {"channel": "user:{sub}", "subscribe": "authenticated"},
            {"channel": "public:>", "subscribe": "anonymous"},
        ),
    )
    assert config.auth.accepted_algorithms == ("HS256", "HS384", "HS512")
    assert SECRET not in repr(config)
    assert load(tmp_path, "").auth is None
    assert load(tmp_path, "[auth]\nanonymous = true\n").auth == AuthConfig(anonymous=True)


def test_a_short_secret_gets_the_algorithms_it_is_long_enough_for() -> None:
    assert AuthConfig(jwt_secret="x" * 32).accepted_algorithms == ("HS256",)
    with pytest.raises(ValueError, match="HS512 needs a secret of at least 64 bytes"):
        AuthConfig(jwt_secret="x" * 32, algorithms=("HS512",))
    with pytest.raises(ValueError, match="at least 32 bytes"):
        AuthConfig(jwt_secret="short")


def test_jwt_secret_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYRT_TEST_JWT_SECRET", SECRET)
    config = load(tmp_path, '[auth]\njwt_secret_env = "PYRT_TEST_JWT_SECRET"\n')
    assert config.auth.jwt_secret == SECRET
    assert TokenVerifier(config.auth).verify(hs_token({"sub": "e"}), now=NOW).user == "e"
    monkeypatch.delenv("PYRT_TEST_JWT_SECRET")
    with pytest.raises(ConfigError, match="PYRT_TEST_JWT_SECRET is not set"):
        load(tmp_path, '[auth]\njwt_secret_env = "PYRT_TEST_JWT_SECRET"\n')


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('jwt_secrte = "x"', "auth.jwt_secrte: unknown setting; known: algorithms, "),
        ("anonymous = 1", "auth.anonymous: expected a boolean, got 1"),
        ('max_token_bytes = "8k"', "auth.max_token_bytes: expected an integer"),
        ('leeway = "5"', "auth.leeway: expected a number"),
        ("leeway = nan", "auth.leeway: expected a number, got nan"),
        ("leeway = -1", "leeway: must be a number of seconds >= 0"),
        ("jwks_refresh_interval = 0", "jwks_refresh_interval: must be a positive"),
        ("audience = 5", "auth.audience: expected a string or strings"),
        ("algorithms = 'HS256'", "auth.algorithms: expected a strings"),
        ("allowed_origins = [1]", "auth.allowed_origins: expected a strings"),
        ("rules = [1]", "auth.rules: expected tables"),
        ("rules = {a = 1}", "auth.rules: expected a tables"),
        ("jwt_secret = 5", "auth.jwt_secret: expected a string, got a secret"),
        ("", "give jwt_secret, jwt_secret_env, public_key"),
        (f'jwt_secret = "{SECRET}"\njwt_secret_env = "X"', "not both"),
        (f'jwt_secret = "{SECRET}"\nalgorithms = ["none"]', '"none" .* is never accepted'),
        (f'jwt_secret = "{SECRET}"\nalgorithms = ["RS256"]', "a secret verifies HS"),
        (f'jwt_secret = "{SECRET}"\nalgorithms = []', "algorithms: must not be empty"),
        (f'jwt_secret = "{SECRET}"\nalgorithms = ["XX1"]', "'XX1' is not one of"),
        (f'jwt_secret = "{SECRET}"\njwks_url = "http://x"', "give one source of keys"),
        ('jwks_url = "file:///etc/passwd"', "must be an http"),
        ('jwks_file = "/nonexistent/jwks.json"', "auth: jwks_file: /nonexistent"),
        ('public_key = "not a key"', "not a PEM public key"),
    ],
)
def test_bad_auth_tables_are_refused_naming_the_key(tmp_path: Path, table: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error) as info:
        load(tmp_path, f"[auth]\n{table}\n")
    assert SECRET not in str(info.value)


def test_hs_with_a_public_key_file_is_refused_at_load(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text(pem(RSA_KEY))
    table = f'[auth]\npublic_key_file = "{key}"\nalgorithms = ["RS256", "HS256"]\n'
    with pytest.raises(ConfigError, match="HS/RS key confusion"):
        load(tmp_path, table)
    config = load(tmp_path, f'[auth]\npublic_key_file = "{key}"\n')
    assert config.auth.accepted_algorithms == auth.KEY_ALGORITHMS


def test_a_weak_or_mismatched_public_key_is_refused(tmp_path: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="at least 2048"):
        TokenVerifier(AuthConfig(public_key=pem(weak)))
    with pytest.raises(ValueError, match="none of them fits the public key"):
        TokenVerifier(AuthConfig(public_key=pem(EC_KEY), algorithms=("RS256",)))
