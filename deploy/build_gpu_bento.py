"""Build the GPU Bento from bentofile.yaml: a CUDA base image and PyPI's CUDA build of torch.

The image starts FROM nvidia/cuda:<CUDA_VERSION>-cudnn-runtime-ubuntu24.04 (cuDNN 9). On a GPU the runners serve
with torch on CUDA ("engine": "torch-cuda" in /health): ONNX Runtime's CUDA provider (onnxruntime-gpu 1.31) needs
CUDA 13, which BentoML 1.4.40's CUDA base images do not offer yet. Usage: `make bento-gpu`, then
`bentoml containerize neuronova-gpu:latest` and `docker run --gpus all ...`.
"""

from __future__ import annotations

from pathlib import Path
from tempfile import TemporaryDirectory

import bentoml
import yaml

ROOT = Path(__file__).resolve().parents[1]
CUDA_VERSION = "12.8.1"
"""The newest CUDA that BentoML 1.4.40 builds images for."""


def gpu_build_config(bentofile: Path = ROOT / "bentofile.yaml") -> dict:
    """bentofile.yaml's options with the CPU-only torch index dropped and the CUDA base image selected."""
    config = yaml.safe_load(bentofile.read_text())
    config["name"] = "neuronova-gpu"
    config["labels"] = {**config.get("labels", {}), "accelerator": "nvidia-gpu"}
    config["python"].pop("extra_index_url", None)
    config["docker"]["cuda_version"] = CUDA_VERSION
    return config


def build_gpu_bento() -> bentoml.Bento:
    """Build the GPU Bento from this tree (the same sources, models and pins as the CPU one)."""
    with TemporaryDirectory() as scratch:
        bentofile = Path(scratch) / "bentofile.gpu.yaml"
        bentofile.write_text(yaml.safe_dump(gpu_build_config()))
        return bentoml.bentos.build_bentofile(str(bentofile), build_ctx=str(ROOT))


if __name__ == "__main__":
    print(build_gpu_bento().tag)

