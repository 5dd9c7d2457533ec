"""The test set-up itself: the PostgreSQL fixture finds Debian's versioned binaries, and under CI a machine without
PostgreSQL fails the run instead of skipping its PostgreSQL tests."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.postgres import BINARIES, binary_dir, require_server


def fake_binaries(directory: Path, names=BINARIES) -> Path:
    directory.mkdir(parents=True)
    for name in names:
        (directory / name).write_text("#!/bin/sh\n")
        (directory / name).chmod(stat.S_IRWXU)
    return directory


def test_debians_versioned_directory_is_found_newest_first(tmp_path):
    root = tmp_path / "postgresql"
    fake_binaries(root / "9.6" / "bin")
    newest = fake_binaries(root / "15" / "bin")
    fake_binaries(root / "16" / "bin", names=("initdb",))  # incomplete: not chosen
    (root / "common").mkdir()
    assert binary_dir(str(tmp_path / "empty"), root) == newest
    on_path = fake_binaries(tmp_path / "local-bin")
    assert binary_dir(str(on_path), root) == on_path  # PATH first


@pytest.mark.parametrize("ci, outcome", [("1", pytest.fail.Exception), ("true", pytest.fail.Exception),
                                         (None, pytest.skip.Exception), ("false", pytest.skip.Exception)])
def test_without_postgresql_the_fixture_fails_under_ci_and_skips_elsewhere(tmp_path, monkeypatch, ci, outcome):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="PostgreSQL server binaries"):
        require_server(str(tmp_path / "empty-path"), tmp_path / "no-postgresql")

