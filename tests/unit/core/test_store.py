"""The model store read while another thread is still importing a module BentoML checks lazily (`core.store`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from core import store

ROOT = Path(__file__).resolve().parents[3]
READ_DURING_IMPORT = """
import sys, threading, time
sys.path.insert(0, sys.argv[1])  # a slow `pandas` ahead of the real one
from core import store
if sys.argv[3] == "unsettled":
    store.settle_imports = lambda: None
store.get_model(sys.argv[2])  # BentoML's own lazy imports done: the read below takes milliseconds
importer = threading.Thread(target=__import__, args=("pandas",))
importer.start()
time.sleep(0.5)  # what an API worker's first MRI task does in a thread: monai imports pandas
print(store.get_model(sys.argv[2]).tag, store.has_version(sys.argv[2]), len(store.list_versions("neuronova-ct")) > 0)
importer.join()
"""
SLOW_PANDAS = "import time\ntime.sleep(2.0)\n\ndef __getattr__(name):\n    return type(name, (), {})\n"
"""Seconds to import, then any class BentoML asks for (Series, DataFrame, Timestamp ...)."""


def read_during_import(tag: str, tmp_path: Path, variant: str) -> subprocess.CompletedProcess:
    (tmp_path / "pandas").mkdir(exist_ok=True)
    (tmp_path / "pandas" / "__init__.py").write_text(SLOW_PANDAS)
    return subprocess.run([sys.executable, "-c", READ_DURING_IMPORT, str(tmp_path), tag, variant], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_model_read_waits_for_a_half_imported_pandas(ct_model, tmp_path) -> None:
    """Without waiting, BentoML's metadata check finds `pandas` half-initialised (AttributeError: the 500 that
    schemathesis found on /model_info while a worker imported the MRI pipeline); `settle_imports` waits for it."""
    tag = str(store.get_model("neuronova-ct:latest").tag)
    unsettled = read_during_import(tag, tmp_path, "unsettled")
    assert unsettled.returncode != 0 and "partially initialized module 'pandas'" in unsettled.stderr
    settled = read_during_import(tag, tmp_path, "settled")
    assert settled.returncode == 0, settled.stderr[-2000:]
    assert settled.stdout.split() == [tag, "True", "True"]
