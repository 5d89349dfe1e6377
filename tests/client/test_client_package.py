"""The client package's shape: its public names, no import cycles between its modules (type-only
imports included), and nothing else in pyrt/ importing it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pyrt.client

PYRT = Path(pyrt.__file__).resolve().parent
CLIENT = PYRT / "client"

PUBLIC = {
    "TRANSPORTS",
    "Channel",
    "Client",
    "ClientError",
    "ConnectionLost",
    "Message",
    "Records",
    "Write",
    "connect",
    # Added since, with tokens (issue 17).
    "AuthenticationError",
    "Unsubscribed",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PYRT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (under `if TYPE_CHECKING:` too), as
    absolute names. `from a import b` counts as importing `a` and `a.b` (b may be a module).
    """
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_the_public_names_are_the_same_as_before_the_split_and_the_auth_errors() -> None:
    assert set(pyrt.client.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(pyrt.client, name) is not None


def test_no_import_cycles_between_the_client_modules() -> None:
    modules = {module_name(p): p for p in CLIENT.glob("*.py") if p.name != "__init__.py"}
    assert {"pyrt.client._session", "pyrt.client._websocket", "pyrt.client._http"} <= set(modules)
    edges = {
        name: {m for m in imported(path) if m in modules or m == "pyrt.client"}
        for name, path in modules.items()
    }
    for name, targets in edges.items():
        # A module reaching back into the package's __init__ would import every module.
        assert "pyrt.client" not in targets, name
    # Depth-first search for a back edge.
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError(f"import cycle: {' -> '.join([*path, name])}")
        if name in done:
            return
        for target in edges.get(name, ()):
            visit(target, [*path, name])
        done.add(name)

    for name in edges:
        visit(name, [])
    # The layering the package's docstring describes.
    assert edges["pyrt.client._errors"] == set()
    assert edges["pyrt.client._link"] == set()
    assert edges["pyrt.client._channels"] == {"pyrt.client._errors"}
    assert edges["pyrt.client._websocket"] == {"pyrt.client._link"}
    assert edges["pyrt.client._http"] == {"pyrt.client._link"}


def test_nothing_else_in_pyrt_imports_the_client() -> None:
    importers = [
        module_name(path)
        for path in PYRT.rglob("*.py")
        if CLIENT not in path.parents
        and any(m == "pyrt.client" or m.startswith("pyrt.client.") for m in imported(path))
    ]
    assert importers == []
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, pyrt; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "pyrt.client" not in loaded
