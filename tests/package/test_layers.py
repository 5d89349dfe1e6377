"""The package's structure, checked: layers import only downwards (no import cycles, type-only
imports included), and built-in plugins use the plugin API only, as third-party ones must."""

from __future__ import annotations

import ast
from pathlib import Path

import pyrt
import pyrt.plugin

ROOT = Path(pyrt.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every pyrt module `path` imports, at run time or for type checking only; `from X
    import Y` counts as importing X.Y when that is a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pyrt")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("pyrt"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return found - {name}


PATHS = sorted(ROOT.rglob("*.py"))
MODULES = {module_name(p) for p in PATHS} | {"pyrt._core"}
GRAPH = {module_name(p): imports(p) for p in PATHS}


def test_the_graph_is_read() -> None:
    assert "pyrt.hub.hub" in GRAPH["pyrt.node.node"]
    assert "pyrt._core" in GRAPH["pyrt.hub.hub"]
    assert "pyrt.plugin" in GRAPH["pyrt.plugins.websocket"]


def test_no_import_cycles() -> None:
    """Between modules (a package's `__init__` re-exporting its modules is not a cycle: it
    is imported by nothing inside the package)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for target in sorted(GRAPH.get(module, ())):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)


def test_the_hub_is_below_the_node() -> None:
    for module, targets in GRAPH.items():
        if module.startswith("pyrt.hub"):
            above = {t for t in targets if t.startswith(("pyrt.node", "pyrt.plugin"))}
            assert not above, f"{module} imports {above}"


BUILT_IN_PLUGINS = [p for p in PATHS if module_name(p).startswith("pyrt.plugins.")]
ALLOWED = ("pyrt.plugin", "pyrt.postgres", "pyrt.plugins")


def test_built_in_plugins_use_the_plugin_api_only() -> None:
    """No private `pyrt._*` module, nothing of the hub or node layers: what a third-party
    plugin can use is all a built-in one uses."""
    assert len(BUILT_IN_PLUGINS) >= 7
    for path in BUILT_IN_PLUGINS:
        module = module_name(path)
        wrong = {
            t
            for t in GRAPH[module]
            if not (t in ALLOWED or t.startswith(tuple(a + "." for a in ALLOWED)))
        }
        assert not wrong, f"{module} imports {sorted(wrong)}"


def test_built_in_plugins_never_touch_the_hub() -> None:
    for path in BUILT_IN_PLUGINS:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or node.attr not in ("hub", "_node", "_hub"):
                continue
            # `ctx.config.hub` is the hub's configuration (read-only data), not the hub.
            if not (isinstance(node.value, ast.Attribute) and node.value.attr == "config"):
                raise AssertionError(f"{module_name(path)}:{node.lineno} reaches .{node.attr}")


def test_the_plugin_api_is_versioned_and_pinned() -> None:
    assert pyrt.plugin.API_VERSION == (1, 1)
    exported = {n for n in vars(pyrt.plugin) if not n.startswith("_")}
    assert set(pyrt.plugin.__all__) <= exported
    assert {"Transport", "Source", "Session", "TransportContext", "SourceContext"} <= set(
        pyrt.plugin.__all__
    )
