"""atheris harness: the native codec on arbitrary frames.

Every input is a client frame for `JsonCodec.decode`; when it is JSON, it is also what a
client reads off the server (`decode_record`, `decode_mutate_reply`).

    PYTHONPATH=$PWD python3 fuzz/native.py -dict=fuzz/json.dict -runs=500000 \
        /tmp/pyrt-corpus/native fuzz/seeds/native
"""

from __future__ import annotations

import _harness
import atheris
import orjson

with atheris.instrument_imports(include=_harness.INSTRUMENTED):
    from parsekit import parse_mutate_reply, parse_native, parse_record


def one_input(data: bytes) -> None:
    parse_native(data)
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    parse_record(value)
    if isinstance(value, dict):
        parse_mutate_reply(value)


if __name__ == "__main__":
    _harness.fuzz(one_input)
