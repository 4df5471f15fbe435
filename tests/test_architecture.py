"""The shape of the package, as docs/architecture.md describes it: imports run one way
through the layers, no two areas import each other, and no module grows past 750 lines
(the expression evaluator excepted).

Every ``import`` and ``from ... import`` in src/flowcraft counts, including the ones inside
functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "flowcraft"

LAYERS: list[set[str]] = [
    # foundation
    {"errors", "expressions", "blueprint", "context", "nodes", "events", "analysis", "flow",
     "observability", "examples", "__version__"},
    {"core"},
    {"runtime", "replay", "runview", "webhook", "lint"},
    {"distributed"},
    {"adapters"},
    {"client", "worker", "serverless"},
    {"local"},  # the local emulators (the demo and the tests)
    {"cli", "ui", "__main__", ""},  # "": the package's own __init__ (lazy public names)
]
LAYER_OF = {area: index for index, areas in enumerate(LAYERS) for area in areas}
MAX_LINES = 750
LONG_MODULES_ALLOWED = {"expressions.py"}


def _module(path: Path) -> tuple[str, str]:
    """(dotted module name, the package its relative imports start from)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        name, package = _module(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                if target == "flowcraft" or target.startswith("flowcraft."):
                    if node.module is None or target == "flowcraft":
                        found[name].update(f"{target}.{alias.name}" for alias in node.names)
                    else:
                        found[name].add(target)
            elif isinstance(node, ast.Import):
                found[name].update(a.name for a in node.names if a.name.startswith("flowcraft"))
    return found


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_area_has_a_layer() -> None:
    areas = {_area(_module(p)[0]) for p in PACKAGE.rglob("*.py")}
    assert areas - set(LAYER_OF) == set(), "add new modules to a layer in docs/architecture.md"


def test_imports_never_go_up_a_layer() -> None:
    upward = sorted(
        f"{source} imports {target}"
        for source, targets in _imports().items()
        for target in targets
        if _area(target) in LAYER_OF and _area(source) in LAYER_OF
        and LAYER_OF[_area(target)] > LAYER_OF[_area(source)]
    )
    assert upward == []


def test_no_two_areas_import_each_other() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    for source, targets in _imports().items():
        for target in targets:
            if _area(source) != _area(target):
                edges[_area(source)].add(_area(target))
    # Any cycle between areas shows as a strongly connected set; find one by DFS.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(area: str) -> None:
        state[area] = 1
        stack.append(area)
        for nxt in sorted(edges.get(area, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[area] = 2

    for area in sorted(edges):
        if area not in state:
            visit(area)
    assert cycles == []


def test_no_module_is_longer_than_the_limit() -> None:
    long = sorted(
        f"{path.relative_to(PACKAGE)}: {lines} lines"
        for path in PACKAGE.rglob("*.py")
        if path.name not in LONG_MODULES_ALLOWED
        and (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    )
    assert long == []
