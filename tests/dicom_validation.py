"""DICOM conformance of the objects we write, checked by dicom3tools' `dciodvfy` (David Clunie's IOD verifier).

A dataset passes when `dciodvfy` exits 0 and reports no line starting with "Error" (or "Abort": it could not read
the file); warnings are allowed and shown only when the check fails. Where `dciodvfy` is not installed the check skips with the
reason, except under CI (`CI` set), where it fails: CI installs dicom3tools (`.ci/run`).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from pydicom.dataset import Dataset

from tests.prerequisites import unavailable

DCIODVFY = "dciodvfy"
FAILING_PREFIXES = ("Error", "Abort")


def dciodvfy_findings(path: Path, binary: str) -> tuple[int, list[str]]:
    """`dciodvfy`'s exit code and report lines (errors, warnings) on a DICOM file."""
    done = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60, check=False)
    return done.returncode, [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def require_dciodvfy() -> str:
    """The `dciodvfy` binary; otherwise skip the test, or fail it under CI."""
    binary = shutil.which(DCIODVFY)
    if binary is not None:
        return binary
    reason = f"{DCIODVFY} is not on PATH (Debian: apt-get install dicom3tools)"
    unavailable("the DICOM check", reason)


def assert_dciodvfy_clean(dataset_or_path: Dataset | str | Path) -> None:
    """Fail when `dciodvfy` reports an error on the dataset (written as a Part 10 file) or file."""
    binary = require_dciodvfy()
    with tempfile.TemporaryDirectory(prefix="neuronova-dciodvfy-") as folder:
        path = Path(dataset_or_path) if isinstance(dataset_or_path, (str, Path)) else Path(folder) / "object.dcm"
        if isinstance(dataset_or_path, Dataset):
            dataset_or_path.save_as(path, enforce_file_format=True)
        exit_code, findings = dciodvfy_findings(path, binary)
    errors = [line for line in findings if line.startswith(FAILING_PREFIXES)]
    assert not errors and exit_code == 0, (f"dciodvfy exited {exit_code} with {len(errors)} error line(s):\n"
                                           + "\n".join(findings))
