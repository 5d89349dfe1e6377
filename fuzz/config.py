"""atheris harness: the config loader (`node_config`) on arbitrary files.

Each input is written to a scratch file, which `node_config` reads as `pyrt serve` would.

    PYTHONPATH=$PWD python3 fuzz/config.py -dict=fuzz/toml.dict -runs=500000 \
        /tmp/pyrt-corpus/config fuzz/seeds/config
"""

from __future__ import annotations

import _harness
import atheris

with atheris.instrument_imports(include=_harness.INSTRUMENTED):
    from parsekit import parse_config


def one_input(data: bytes) -> None:
    parse_config(data)


if __name__ == "__main__":
    _harness.fuzz(one_input)
