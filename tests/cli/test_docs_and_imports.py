"""The README's command-line section names every command and its exit codes; the CLI
modules import one another in one direction only."""

from __future__ import annotations

import ast
import re

import typer

from runstate.cli import app
from runstate.cli_support import EXIT_FAILED, EXIT_OK, EXIT_USAGE

from .conftest import REPO
from .test_json import leaf_commands

PACKAGE = REPO / "services" / "runstate"


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_the_readme_names_every_command_and_the_exit_codes():
    section = readme_section("Command line")
    commands = [" ".join(path) for path, _ in leaf_commands(typer.main.get_command(app))]
    assert [c for c in commands if f"`runstate {c}" not in section] == []
    codes = re.findall(r"^\| (\d) \| ", section, re.M)
    assert codes == [str(EXIT_OK), str(EXIT_FAILED), str(EXIT_USAGE)]


def module_imports() -> dict[str, set[str]]:
    """runstate module -> the runstate modules it imports (at any depth of its code)."""
    modules = {
        ".".join(("runstate", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): path
        for path in PACKAGE.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_cli_modules_are_in_no_import_circle():
    graph = module_imports()
    assert "runstate.audit.commands" in graph["runstate.cli"]  # the graph sees real imports
    for module in ("runstate.cli", "runstate.cli_support", "runstate.audit.commands", "runstate.__main__"):
        assert module not in reachable(graph, module), f"{module} imports itself through a circle"
    assert "runstate.cli" not in reachable(graph, "runstate.audit.commands")
