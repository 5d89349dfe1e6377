"""What the atheris harnesses share: the checks of tests/parsekit.py, and libFuzzer's loop.

Each harness imports pyrt and parsekit under `atheris.instrument_imports`, so the fuzzer sees
which branches of pyrt's Python code an input reached. An input that makes a parser raise
anything but its documented error, or return a value of the wrong shape, stops the run and
leaves a `crash-*` file with the input (docs/fuzzing.md).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

INSTRUMENTED = ["pyrt", "parsekit"]


def fuzz(one_input: Callable[[bytes], None]) -> None:
    """Runs libFuzzer with the process's arguments (-runs=N, corpus directories, ...)."""
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
