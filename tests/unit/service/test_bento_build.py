"""`bentoml build` makes a Bento from this tree that pins the exact model versions and carries a Dockerfile."""

import os
import re
import subprocess
import sys
from pathlib import Path

import bentoml
import yaml

ROOT = Path(__file__).resolve().parents[3]


def test_bento_builds_with_pinned_models_and_dockerfile(demo_models):
    built = subprocess.run([sys.executable, "-m", "bentoml", "build", "-o", "tag"], cwd=ROOT, env=os.environ,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    tag = built.stdout.strip().split("__tag__:")[-1].strip()
    bento = bentoml.get(tag)
    try:
        path = Path(bento.path)
        assert (path / "env" / "docker" / "Dockerfile").is_file()
        assert (path / "src" / "service.py").is_file() and (path / "src" / "postprocessing").is_dir()
        services = {s["name"]: s for s in yaml.safe_load((path / "bento.yaml").read_text())["services"]}
        pinned = {m["tag"].split(":")[0]: m["tag"] for name in ("CTClassifier", "MRISegmenter", "BiomarkerModel")
                  for m in services[name]["models"]}
        assert set(pinned) == {"neuronova-ct", "neuronova-mri", "neuronova-biomarker"}
        assert all(not tag.endswith(":latest") for tag in pinned.values())
        dockerfile = (path / "env" / "docker" / "Dockerfile").read_text()
        assert not re.search(r"NEURONOVA_AUTH__SECRET=(?!\$NEURONOVA_AUTH__SECRET)", dockerfile)  # no baked value
    finally:
        bentoml.delete(tag)


def test_cpu_bento_takes_torch_cpu_build_and_gpu_bento_a_cuda_base_image(demo_models):
    from deploy.build_gpu_bento import CUDA_VERSION, build_gpu_bento

    cpu_config = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert "https://download.pytorch.org/whl/cpu" in cpu_config["python"]["extra_index_url"]
    bento = build_gpu_bento()
    try:
        path = Path(bento.path)
        dockerfile = (path / "env" / "docker" / "Dockerfile").read_text()
        assert f"FROM nvidia/cuda:{CUDA_VERSION}-cudnn-runtime" in dockerfile
        assert "download.pytorch.org/whl/cpu" not in (path / "env" / "python" / "requirements.txt").read_text()
        assert bento.info.labels["accelerator"] == "nvidia-gpu"
    finally:
        bentoml.delete(str(bento.tag))
