"""A maintained policy scanner on what `kubectl apply -k deploy/k8s` applies: checkov's Kubernetes checks (its
CKV_K8S_* and CKV2_K8S_* policies: security contexts, read-only root, probes, resources, images, secrets ...) find
nothing that fails. A check the manifests do not follow is skipped in the manifest itself, by a
`checkov.io/skip<n>: <check>=<reason>` annotation, and must be one of `SKIPPED` below, so a new skip is reviewed here.

checkov runs as a program from `.venv-tools` (`make tools`, pinned in requirements-tools.txt): its own pins conflict
with the service's. Missing, the test skips locally and fails under CI (`make test` installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.prerequisites import unavailable
from tests.unit.deploy.kustomize import render

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
CHECKOV = ROOT / ".venv-tools" / "bin" / "checkov"
PINNED = re.search(r"^checkov==(\S+)$", (ROOT / "requirements-tools.txt").read_text(), re.M).group(1)
SKIPPED = {"CKV_K8S_11", "CKV_K8S_35", "CKV_K8S_40", "CKV_K8S_43"}
"""The checks deployment.yaml skips, each with its reason there: no CPU limit, secrets as environment variables, the
image's UID, no image digest."""


def checkov() -> Path:
    if not CHECKOV.exists():
        unavailable("checkov", f"{CHECKOV.relative_to(ROOT)} is missing: `make tools` installs checkov {PINNED}")
    return CHECKOV


def scan(documents: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    """checkov's Kubernetes checks on `documents`, offline (`--skip-download`: no Prisma Cloud look-up); its report."""
    manifest = folder / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    done = subprocess.run([str(checkov()), "--file", str(manifest), "--framework", "kubernetes", "--skip-download",
                           "--output", "json"], capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: some check failed
    return json.loads(done.stdout)


def failed(report: dict[str, Any]) -> list[str]:
    return [f"{c['check_id']} {c['check_name']} ({c['resource']})" for c in report["results"]["failed_checks"]]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return scan(render(K8S), tmp_path_factory.mktemp("checkov"))


def test_checkov_finds_no_failed_check_in_the_rendered_manifests(report) -> None:
    summary = report["summary"]
    assert summary["checkov_version"] == PINNED
    assert summary["parsing_errors"] == 0 and summary["resource_count"] >= len(render(K8S))
    assert failed(report) == []
    assert summary["passed"] >= 80  # the scan really ran its checks on the workload
    passed = {(c["check_id"], c["resource"].split(".")[0]) for c in report["results"]["passed_checks"]}
    assert ("CKV_K8S_22", "Deployment") in passed  # readOnlyRootFilesystem


def test_every_skip_is_a_reviewed_one_with_its_reason(report) -> None:
    skipped = report["results"]["skipped_checks"]
    assert {c["check_id"] for c in skipped} == SKIPPED
    for check in skipped:
        reason = check["check_result"]["suppress_comment"]
        assert len(reason.split()) >= 8, f"{check['check_id']}: {reason!r} is not a reason"


def test_the_scanner_catches_a_writable_root(tmp_path) -> None:
    documents = render(K8S)
    [deployment] = [doc for doc in documents if doc["kind"] == "Deployment"]
    del deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
    assert "CKV_K8S_22" in {line.split()[0] for line in failed(scan(documents, tmp_path))}


def test_the_rendering_is_what_kustomize_builds() -> None:
    """The Python rendering the scan uses against the real kustomize (`kustomize build` or `kubectl kustomize`)
    where one is installed."""
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(K8S)]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(K8S)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed")
    built = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    key = lambda doc: (doc["kind"], doc["metadata"]["name"])  # noqa: E731
    assert sorted(render(K8S), key=key) == sorted((doc for doc in yaml.safe_load_all(built) if doc), key=key)
