"""JWT verification cost per connection: µs per `TokenVerifier.verify`.

    python benches/jwt_verify.py            # 20,000 verifications per algorithm, median of 5
    python benches/jwt_verify.py --quick    # a smoke run

One verifier per algorithm (HS256 with a 64-byte secret; RS256 with a 2048-bit key; ES256 on
P-256; EdDSA on Ed25519), one typical token each (sub, exp, iat, jti, role, two channels), the
whole check a connection gets: size, header, signature, aud/iss, exp/nbf, claim types and
revocation. Prints the median over the rounds of the mean µs per verification, and the
spread (min-max of the rounds) to judge the noise. Single-threaded, in this process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from pyrt.node.auth import AuthConfig, TokenVerifier

NOW = 1_800_000_000.0
CLAIMS = {
    "sub": "user-1234",
    "exp": int(NOW + 3600),
    "iat": int(NOW),
    "jti": "0b0c5a4e-2d7f-4d8e-9a43-0f1f4c1e7a11",
    "role": "authenticated",
    "aud": "app",
    "iss": "https://auth.example.com",
    "channels": ["user:user-1234", "news"],
}


def cases() -> list[tuple[str, TokenVerifier, str]]:
    secret = "s" * 64
    common: dict[str, Any] = {"audience": "app", "issuer": "https://auth.example.com"}
    out = [
        (
            "HS256",
            TokenVerifier(AuthConfig(jwt_secret=secret, **common)),
            jwt.encode(CLAIMS, secret, algorithm="HS256"),
        )
    ]
    keys: list[tuple[str, Any]] = [
        ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", ec.generate_private_key(ec.SECP256R1())),
        ("EdDSA", ed25519.Ed25519PrivateKey.generate()),
    ]
    for alg, private in keys:
        pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        verifier = TokenVerifier(AuthConfig(public_key=pem.decode(), **common))
        out.append((alg, verifier, jwt.encode(CLAIMS, private, algorithm=alg)))
    return out


def measure(verifier: TokenVerifier, token: str, count: int, rounds: int) -> list[float]:
    """µs per verification, one figure per round."""
    verify = verifier.verify
    assert verify(token, now=NOW).user == "user-1234"
    results = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            verify(token, now=NOW)
        results.append((time.perf_counter() - start) / count * 1e6)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="verifications per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="200 verifications, 2 rounds")
    args = parser.parse_args()
    count, rounds = (200, 2) if args.quick else (args.count, args.rounds)
    print(f"jwt_verify: {count} verifications per round, median of {rounds} rounds")
    print(f"{'workload':<28} {'µs/verify':>10} {'verifies/s':>11} {'rounds min-max':>16}")
    for alg, verifier, token in cases():
        results = measure(verifier, token, count, rounds)
        median = statistics.median(results)
        name = f"jwt_verify_{alg.lower()}_{len(token)}B"
        spread = f"{min(results):.1f}-{max(results):.1f}"
        print(f"{name:<28} {median:>10.1f} {1e6 / median:>11,.0f} {spread:>16}")


if __name__ == "__main__":
    main()
