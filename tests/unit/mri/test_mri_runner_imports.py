"""On a CPU host the MRI runner starts without torch and MONAI (~400 MB) and loads them with its first volume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PROBE = """
import asyncio, sys
import numpy as np
from runners import mri
runner = mri.MRISegmenter()
described = asyncio.run(runner.describe())
assert described["loaded"] and described["gradcam_layer"], described
assert not {"torch", "monai"} & set(sys.modules), "torch or MONAI imported at start"
card = runner.served.current.card
probabilities = runner.segment(np.zeros((len(card.input.sequences), 32, 32, 32), np.float32))
assert probabilities.shape[1:] == (32, 32, 32) and "torch" in sys.modules
print("ok")
"""


def test_the_mri_runner_starts_without_torch_and_segments_with_it(mri_model_tag: str) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
