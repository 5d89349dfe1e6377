"""atheris harness: the Phoenix (Supabase) codec on arbitrary frames.

The first byte picks how the frame arrives (text in vsn 1.0.0 or 2.0.0, binary in 2.0.0, or
binary in 1.0.0, which is refused); the rest is the frame. A `phx_join`'s payload also goes
through `parse_join`.

    PYTHONPATH=$PWD python3 fuzz/phoenix.py -dict=fuzz/json.dict -runs=500000 \
        /tmp/pyrt-corpus/phoenix fuzz/seeds/phoenix
"""

from __future__ import annotations

import _harness
import atheris

with atheris.instrument_imports(include=_harness.INSTRUMENTED):
    from parsekit import parse_phoenix

    from pyrt.plugins.supabase.phoenix import VSN_1, VSN_2

MODES = [(VSN_1, False), (VSN_2, False), (VSN_2, True), (VSN_1, True)]


def one_input(data: bytes) -> None:
    if not data:
        return
    vsn, binary = MODES[data[0] % len(MODES)]
    parse_phoenix(data[1:], vsn, binary=binary)


if __name__ == "__main__":
    _harness.fuzz(one_input)
