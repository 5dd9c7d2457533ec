"""The OHIF viewer's own DICOM loaders, run on the objects we write: `tests/viewer/load.mjs` reads them in Node with
dcmjs and @cornerstonejs/adapters at the versions OHIF ships (`tests/viewer/package-lock.json`) and prints what the
viewer extracts (see the script's header).

Where `node` or the installed packages (`make test` runs `npm ci` in tests/viewer) are missing the tests skip with
the reason, except under CI (`CI` set), where they fail: CI installs Node and npm (`.ci/run`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.prerequisites import unavailable

VIEWER = Path(__file__).parent / "viewer"
SCRIPT = VIEWER / "load.mjs"
INSTALLED = VIEWER / "node_modules" / "@cornerstonejs" / "adapters" / "package.json"
"""What `npm ci --prefix tests/viewer` installs (the loaders' own package)."""
TIMEOUT_S = 120


class ViewerLoadError(AssertionError):
    """A viewer loader failed on an object (threw, found no segment, placed a frame nowhere), or the script did."""


def require_viewer() -> str:
    """The `node` binary, with the loaders installed; otherwise skip the test, or fail it under CI."""
    node = shutil.which("node")
    if node is None:
        unavailable("the viewer loaders", "node is not on PATH (Debian: apt-get install nodejs npm)")
    if not INSTALLED.is_file():
        unavailable("the viewer loaders",
                    f"{VIEWER / 'node_modules'} is not installed (make test, or npm ci --prefix tests/viewer)")
    return node


def load_in_viewer(paths: Sequence[Path]) -> dict[str, Any]:
    """What the viewer's loaders extract from DICOM files (result objects and the source images they reference):
    `{"objects": [...]}`, one entry per path, in order. Raises ViewerLoadError when a loader fails."""
    node = require_viewer()
    done = subprocess.run([node, str(SCRIPT), *(str(path) for path in paths)], capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
    try:
        document = json.loads(done.stdout)
    except json.JSONDecodeError:
        message = f"{SCRIPT.name} exited {done.returncode} without a result:\n{done.stderr[-4000:]}"
        raise ViewerLoadError(message) from None
    failures = [f"{entry['path']} ({entry['kind']}): {entry['error']}"
                for entry in document["objects"] if "error" in entry]
    if failures or done.returncode != 0:
        raise ViewerLoadError("the viewer's loaders failed:\n" + "\n".join(failures or [done.stderr[-4000:]]))
    return document


def loaded(document: dict[str, Any], sop_instance_uid: str) -> dict[str, Any]:
    """The entry of one instance in what `load_in_viewer` returned."""
    [entry] = [entry for entry in document["objects"] if entry.get("sopInstanceUID") == sop_instance_uid]
    return entry
