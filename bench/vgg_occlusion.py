"""Cost of serving and explaining a VGG16-size imported classifier on CPU (issue #8's "VGG16-size" figure).

Run: `.venv/bin/python bench/vgg_occlusion.py`. Builds a Keras-style VGG16 (13 conv layers, global average pool,
softmax head; random weights, seeded: timing does not depend on them) taking NHWC 240×240 RGB, exports it to ONNX as
a hospital's Keras export would look, and times ONNX Runtime on the CPU: prediction at batch 1 and 8, and occlusion
maps (xai.occlusion, the method served for models without torch weights) at 4×4 and 7×7 grids. Prints a Markdown
table and writes bench/results/vgg_occlusion.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runners.engines import onnx_session
from training_export.onnx_export import export_onnx
from xai.occlusion import occlusion_maps

VGG16_CHANNELS = [64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512, "pool"]
SIZE = 240


class KerasStyleVgg16(torch.nn.Module):
    """VGG16's convolutional base with a global-average-pool softmax head, NHWC input."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        channels = 3
        for spec in VGG16_CHANNELS:
            if spec == "pool":
                layers.append(torch.nn.MaxPool2d(2))
            else:
                layers += [torch.nn.Conv2d(channels, int(spec), 3, padding=1), torch.nn.ReLU()]
                channels = int(spec)
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(channels, classes)

    def forward(self, nhwc: torch.Tensor) -> torch.Tensor:
        features = self.features(nhwc.permute(0, 3, 1, 2)).mean(dim=(2, 3))
        return torch.softmax(self.head(features), dim=1)


def seconds(run, repeats: int) -> float:
    """Median wall time of `run()` over `repeats` calls (after one warm-up)."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    with TemporaryDirectory() as scratch:
        path = export_onnx(KerasStyleVgg16().eval(), torch.zeros(1, SIZE, SIZE, 3), Path(scratch) / "vgg16.onnx")
        size_mb = path.stat().st_size / 2**20
        session, engine = onnx_session(str(path))
        name = session.get_inputs()[0].name

        def predict(batch: np.ndarray) -> np.ndarray:
            return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

        one, eight = rng.random((1, SIZE, SIZE, 3), dtype=np.float32), rng.random((8, SIZE, SIZE, 3), dtype=np.float32)
        rows = {
            "predict, batch 1 (s per image)": seconds(lambda: predict(one), 3),
            "predict, batch 8 (s per image)": seconds(lambda: predict(eight), 2) / 8,
            "occlusion 4x4 = 16 + 1 passes (s per image)": seconds(lambda: occlusion_maps(predict, one, "NHWC", 4), 1),
            "occlusion 7x7 = 49 + 1 passes (s per image)": seconds(lambda: occlusion_maps(predict, one, "NHWC", 7), 1),
        }
    print(f"VGG16-size model: {size_mb:.0f} MB ONNX, engine {engine}, {torch.get_num_threads()} CPU threads\n")
    print("| measurement | seconds |\n|---|---|")
    for label, value in rows.items():
        print(f"| {label} | {value:.2f} |")
    out = Path(__file__).resolve().parent / "results" / "vgg_occlusion.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"onnx_mb": size_mb, "engine": engine, **rows}, indent=2))


if __name__ == "__main__":
    main()
