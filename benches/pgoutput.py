"""pgoutput decoding throughput: the Rust decoder (through the binding) against the reference.

    python benches/pgoutput.py
    python benches/pgoutput.py --changes 2000 --seconds 0.5

Workload `pgoutput_10col_60i30u10d`: one Relation of 10 columns (int8 key, int4, two text,
numeric, bool, timestamptz, jsonb, text, float8), then --changes pre-encoded change messages,
60% INSERT, 30% UPDATE (no old tuple, as under REPLICA IDENTITY DEFAULT), 10% DELETE (key
tuple), ~330 bytes each, cycled through. The payloads are built once, outside the timed loop,
as the replication client hands them over (bytes after the XLogData header).

Rows:
  decode_many        PgOutputDecoder.decode_many over batches of 256 payloads
  decode             PgOutputDecoder.decode, one call per payload
  decode+match+json  decode_many, then Matcher.match_changes against --subscriptions
                     `user_id=eq.K` subscriptions, then to_json(max_bytes=1 MB) for every change
                     that matched at least one subscription (the hub encodes once per change)
The reference column runs the same steps with pyrt.reference.pgoutput.ReferenceDecoder (and, for the
last row, the reference matcher and Change.to_json).
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from matcher import fmt_rate, machine, table  # the matcher benchmark's helpers

import pyrt
from pyrt._core import PgOutputDecoder
from pyrt.reference.matcher import ReferenceMatcher
from pyrt.reference.pgoutput import ReferenceDecoder

RELID = 16_384
COLUMNS = [  # (flags, name, type oid)
    (1, "id", 20),
    (0, "user_id", 23),
    (0, "name", 25),
    (0, "email", 25),
    (0, "amount", 1700),
    (0, "active", 16),
    (0, "created_at", 1184),
    (0, "meta", 3802),
    (0, "status", 25),
    (0, "score", 701),
]
BATCH = 256
MAX_BYTES = 1 << 20


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def relation() -> bytes:
    out = b"R" + struct.pack(">I", RELID) + _cstr("public") + _cstr("orders") + b"d"
    out += struct.pack(">h", len(COLUMNS))
    for flags, name, oid in COLUMNS:
        out += struct.pack(">B", flags) + _cstr(name) + struct.pack(">Ii", oid, -1)
    return out


def begin() -> bytes:
    return b"B" + struct.pack(">QqI", 1, 800_000_000_000_000, 7)


def tuple_data(kind: bytes, values: Sequence[str | None]) -> bytes:
    out = kind + struct.pack(">h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        else:
            raw = v.encode()
            out += b"t" + struct.pack(">i", len(raw)) + raw
    return out


def row(rng: random.Random, users: int) -> list[str | None]:
    k = rng.randrange(users)
    return [
        str(rng.randrange(10**12)),
        str(k),
        f"User {k} {rng.choice(('Ann', 'Bob', 'Chloé'))}",
        f"user{k}@example.com",
        f"{rng.randrange(10**6)}.{rng.randrange(100):02d}",
        rng.choice(("t", "f")),
        f"2026-01-{rng.randrange(1, 29):02d} 12:{rng.randrange(60):02d}:05.123456+00",
        f'{{"tags": ["a", "b"], "n": {rng.randrange(100)}, "ok": true}}',
        rng.choice(("new", "paid", "shipped", None)),
        repr(rng.random() * 100),
    ]


def payloads(n: int, users: int) -> list[bytes]:
    rng = random.Random(n)
    out = []
    for _ in range(n):
        r = rng.random()
        head = struct.pack(">I", RELID)
        values = row(rng, users)
        if r < 0.6:
            out.append(b"I" + head + tuple_data(b"N", values))
        elif r < 0.9:
            out.append(b"U" + head + tuple_data(b"N", values))
        else:
            key = [values[0]] + [None] * (len(values) - 1)
            out.append(b"D" + head + tuple_data(b"K", key))
    return out


def timed(call: Callable[[], int], seconds: float) -> float:
    """Runs `call` (returning how many changes it handled) until `seconds` pass: changes/s."""
    call()  # warm up
    done = 0
    start = time.perf_counter()
    while True:
        done += call()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def cycling(items: Sequence[bytes]) -> Callable[[], Sequence[bytes]]:
    """Successive batches of BATCH items, wrapping around."""
    position = 0

    def next_batch() -> Sequence[bytes]:
        nonlocal position
        if position + BATCH > len(items):
            position = 0
        batch = items[position : position + BATCH]
        position += BATCH
        return batch

    return next_batch


def prepared(decoder: Any) -> Any:
    decoder.decode(relation())
    decoder.decode(begin())
    return decoder


def run(changes: int, seconds: float, subscriptions: int, with_reference: bool) -> list[list[str]]:
    users = max(subscriptions, 1)
    data = payloads(max(changes, BATCH), users)
    rust = prepared(PgOutputDecoder())
    ref = prepared(ReferenceDecoder())
    rust_matcher = pyrt.Matcher()
    ref_matcher = ReferenceMatcher()
    for i in range(subscriptions):
        for m in (rust_matcher, ref_matcher):
            m.add_rows(i, "*", "public", "orders", f"user_id=eq.{i}")

    def rust_many() -> int:
        return len(rust.decode_many(batch()))

    def rust_one() -> int:
        items = batch()
        for p in items:
            rust.decode(p)
        return len(items)

    def rust_pipeline() -> int:
        decoded = rust.decode_many(batch())
        for change, ids in zip(decoded, rust_matcher.match_changes(decoded), strict=True):
            if ids:
                change.to_json(MAX_BYTES)
        return len(decoded)

    def ref_decode() -> int:
        items = batch()[:16]
        ref.decode_many(items)
        return len(items)

    def ref_pipeline() -> int:
        items = batch()[:16]
        for p in items:
            change = ref.decode(p)
            if ref_matcher.match_row(change.event):
                change.to_json(MAX_BYTES)
        return len(items)

    rows = []
    for name, fast, slow in (
        ("decode_many", rust_many, ref_decode),
        ("decode", rust_one, ref_decode),
        ("decode+match+json", rust_pipeline, ref_pipeline),
    ):
        batch = cycling(data)
        rate = timed(fast, seconds)
        ref_rate = timed(slow, max(seconds / 2, 0.01)) if with_reference else 0.0
        rows.append(
            [
                name,
                fmt_rate(rate),
                f"{1e9 / rate:,.0f} ns",
                fmt_rate(ref_rate) if with_reference else "-",
                f"{rate / ref_rate:,.0f}x" if with_reference else "-",
            ]
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=20_000, help="distinct payloads")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--subscriptions", type=int, default=1_000)
    parser.add_argument("--no-reference", action="store_true", help="skip the Python reference")
    args = parser.parse_args(argv)
    rows = run(args.changes, args.seconds, args.subscriptions, not args.no_reference)
    average = sum(map(len, payloads(256, 10))) / 256
    print(f"## pgoutput_10col_60i30u10d ({' '.join(sys.argv[1:]) or 'defaults'})\n")
    print(f"{args.changes:,} distinct changes of ~{average:.0f} bytes, "
          f"{args.subscriptions:,} subscriptions\n")  # fmt: skip
    print(table(["step", "Rust changes/s", "per change", "reference changes/s",
                 "Rust/reference"], rows))  # fmt: skip
    print(f"\nMachine: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
