"""The house: each room imports only the rooms below it (the design card's one-way data flow), and no module of the
project imports itself back through another (no import cycle, lazy imports inside functions included)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOMS: dict[str, set[str]] = {
    "service": {"api", "pacs", "pipelines", "runners", "state", "monitoring", "postprocessing", "preprocessing", "xai",
                "core"},
    "api": {"pipelines", "runners", "state", "preprocessing", "core"},
    "pacs": {"pipelines", "state", "postprocessing", "preprocessing", "xai", "core"},
    "pipelines": {"runners", "state", "monitoring", "postprocessing", "preprocessing", "xai", "core"},
    "runners": {"state", "postprocessing", "xai", "core"},
    "training_export": {"state", "postprocessing", "preprocessing", "core"},
    "monitoring": {"state", "core"},
    "postprocessing": {"preprocessing", "xai", "core"},
    "state": {"core"},
    "preprocessing": {"core"},
    "xai": {"core"},
    "core": set(),
}
"""Which rooms each room may import. `api/` is HTTP only; pipelines hold no HTTP; durable state sits below them all."""


def modules_of(room: str) -> Iterator[tuple[str, Path]]:
    if room == "service":
        yield "service", ROOT / "service.py"
        return
    for path in sorted((ROOT / room).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return modules


PROJECT = {name: path for room in ROOMS for name, path in modules_of(room)}


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_a_room_imports_only_the_rooms_below_it(room: str) -> None:
    offences = sorted(
        f"{path.relative_to(ROOT)}: {module}"
        for _, path in modules_of(room)
        for module in imported_modules(path)
        if (top := module.split(".")[0]) in ROOMS and top != room and top not in ROOMS[room]
    )
    assert offences == []


def test_the_rooms_table_is_acyclic() -> None:
    def below(room: str) -> set[str]:
        return set().union(*(below(lower) | {lower} for lower in ROOMS[room]))

    assert [room for room in ROOMS if room in below(room)] == []


def test_no_module_imports_itself_back() -> None:
    graph = {name: {module for module in imported_modules(path) if module in PROJECT and module != name}
             for name, path in PROJECT.items()}
    cycles = []

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycles.append(" -> ".join(trail[trail.index(name):] + [name]))
            return
        if name in done:
            return
        for module in sorted(graph[name]):
            visit(module, [*trail, name])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        visit(name, [])
    assert cycles == []
