"""atheris harness: cursor tokens (`decode_cursor`).

The first byte picks the mode: even, the rest is the token itself (as UTF-8, with
replacement characters, as a query string decodes it); odd, the rest is the JSON body a token
carries, base64url-encoded here, so the fuzzer works on the body's structure directly.

    PYTHONPATH=$PWD python3 fuzz/cursor.py -dict=fuzz/json.dict -runs=500000 \
        /tmp/pyrt-corpus/cursor fuzz/seeds/cursor
"""

from __future__ import annotations

import base64

import _harness
import atheris

with atheris.instrument_imports(include=_harness.INSTRUMENTED):
    from parsekit import parse_cursor


def one_input(data: bytes) -> None:
    if not data:
        return
    body = data[1:]
    if data[0] % 2:
        token = base64.urlsafe_b64encode(body).rstrip(b"=").decode()
    else:
        token = body.decode("utf-8", "replace")
    parse_cursor(token)


if __name__ == "__main__":
    _harness.fuzz(one_input)
