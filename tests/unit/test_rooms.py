"""Lower rooms never import higher ones: training_export, core, preprocessing and monitoring never import api/ or the service."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HIGHER = ("api", "service")


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("room", ["training_export", "core", "preprocessing", "monitoring"])
def test_lower_room_never_imports_api_or_service(room: str) -> None:
    offences = sorted(
        f"{path.relative_to(ROOT)}: {module}"
        for path in (ROOT / room).rglob("*.py")
        for module in imported_modules(path)
        if module.split(".")[0] in HIGHER
    )
    assert offences == []
