"""The worked plugins of docs/plugins.md, as printed there, through the conformance kits."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
BLOCK = re.compile(r"```python\n# (example|test): (\w+)\n(.*?)```", re.S)


def example(name: str) -> types.ModuleType:
    """The module made of the doc's `example: name` blocks, then its `test: name` blocks."""
    blocks = BLOCK.findall(DOC.read_text())
    code = [body for kind, n, body in blocks if n == name and kind == "example"]
    code += [body for kind, n, body in blocks if n == name and kind == "test"]
    assert len(code) >= 2, f"docs/plugins.md has no example and test named {name}"
    module = types.ModuleType(f"docs_plugins_{name}")
    exec(compile("\n".join(code), f"{DOC}:{name}", "exec"), module.__dict__)
    return module


async def test_the_worked_transport_passes_the_kit() -> None:
    module: Any = example("lines_transport")
    await module.test_lines_transport()


async def test_the_worked_source_passes_the_kit() -> None:
    module: Any = example("udp_source")
    await module.test_udp_source()
