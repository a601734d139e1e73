"""The import graph of `runstate`: no circles, and no arrow from a lower layer to
a higher one (README, "Code map")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "services" / "runstate"

# Inner to outer. A module may import modules of its own layer or of inner ones.
LAYERS: list[tuple[str, ...]] = [
    ("runstate.domain", "runstate.strict_json", "runstate.version", "runstate.envfile", "runstate.database_urls"),
    ("runstate.messages", "runstate.config", "runstate.kafka_security"),
    ("runstate.events",),
    ("runstate.pipeline.records", "runstate.pipeline.ids", "runstate.pipeline.message_json",
     "runstate.pipeline.faults"),
    ("runstate.pipeline.ports",),
    ("runstate.pipeline.batch", "runstate.pipeline.owned"),
    ("runstate.pipeline.service",),
    ("runstate.store",),
    ("runstate.pipeline.kafka", "runstate.pipeline.consumer", "runstate.obs"),
    ("runstate.pipeline.app",),
    ("runstate.client", "runstate.gateway", "runstate.audit", "runstate.demo", "runstate.schemas",
     "runstate.limits", "runstate.cli_support"),
    ("runstate.cli", "runstate.config_cli", "runstate.__main__", "runstate.top"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                    best = (rank, len(prefix))
    return None if best is None else best[0]


def imports_of(path: Path, module: str) -> set[str]:
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("runstate"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("runstate"):
                found.add(target)
                # `from runstate.pipeline import app` imports the module runstate.pipeline.app.
                found.update(f"{target}.{a.name}" for a in node.names)
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}
    edges: dict[str, set[str]] = {}
    for module, path in paths.items():
        edges[module] = {t for t in imports_of(path, module) if t in paths and t != module}
    return edges


def test_every_module_has_a_layer():
    # The package roots only hold the version and nothing else.
    assert [m for m in graph() if layer_of(m) is None and m not in ("runstate", "runstate.pipeline")] == []


def test_no_arrow_points_outward():
    upward = []
    for module, targets in graph().items():
        rank = layer_of(module)
        for target in targets:
            target_rank = layer_of(target)
            if rank is not None and target_rank is not None and target_rank > rank:
                upward.append(f"{module} -> {target}")
    assert sorted(upward) == []


def test_there_are_no_import_circles():
    edges = graph()
    circles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert circles == []
