"""The served service on a read-only root file system, as the Kubernetes pod runs it (`readOnlyRootFilesystem: true`,
deploy/k8s/deployment.yaml): `bentoml serve` in a mount namespace of its own (`unshare --user --map-root-user
--mount`) where `/` (this checkout, the virtual environment, HOME, /tmp ...) is remounted read-only and only one
folder per variable of `WRITTEN_ENV` (tests/unit/deploy/writable.py: TMPDIR, NEURONOVA_DATA_DIR,
NEURONOVA_DISTRIBUTED__SHARED_DIR, BENTOML_HOME, XDG_CACHE_HOME, MPLCONFIGDIR) stays writable, the model store
(`BENTOML_HOME/models` here, served from source; the bento's own store in the image, an emptyDir filled by the init
container in the pod) with it. `/dev/shm` stays writable, as in a pod.

The instance runs in distributed mode like the pod (PostgreSQL for tasks, queue and feedback, the ReadWriteMany
folder). It classifies a CT slice with Grad-CAM, explains it again by occlusion and records feedback, predicts
biomarkers with SHAP plots, segments an MRI study with its explanation as a task, imports an uploaded model export
through `/update_model` and switches back, and serves /metrics and /model_info. Every request must succeed and the
server log must not mention a read-only file system. Where `strace` is installed every process of the server is
traced too: no file-system call fails with EROFS (Python's bytecode cache aside, which it skips by design), so no
write outside these folders is silently given up either.

`tests/unit/deploy/test_k8s_manifests.py` checks the other half: each of these variables names a path on a writable
volume of the pod."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import bentoml
import httpx
import pytest
from pydicom.data import get_testdata_file

from bench.harness import BENTOML_SERVE, serving
from core import store
from core.cards.classification import ClassificationCard
from tests.http.conftest import make_token, server_env
from tests.postgres import PostgresServer
from tests.prerequisites import under_ci, unavailable
from tests.unit.deploy.writable import WRITTEN_ENV
from tests.http.test_biomarker_http import SPEC_EXAMPLE
from tests.unit.mri.mri_inputs import four_d_nifti
from training_export.synthetic_mri import synthetic_case

pytestmark = pytest.mark.http

CT_SMALL = Path(get_testdata_file("CT_small.dcm")).read_bytes()
TASK_DEADLINE_S = 240
SANDBOX = r"""
set -eu
mount --bind "$(dirname "$1")" "$(dirname "$1")"
exec 3>>"$1"
umount -l "$(dirname "$1")"
shift
while [ "$1" != "--" ]; do mount --bind "$1" "$1"; shift; done
shift
mount -o remount,bind,ro /
exec "$@"
"""
"""`sh -c SANDBOX sandbox TRACE_FILE WRITABLE... -- COMMAND...`: the trace file is opened as fd 3 for strace's
filter (on a bind mount of its folder, detached at once: the open file stays writable, its folder does not; a file
open for writing on `/` would stop the remount), each writable folder becomes a mount of its own (so it stays
writable), then `/` is remounted read-only and COMMAND runs."""
TRACED_CALLS = ("open,openat,creat,mkdir,mkdirat,rename,renameat,renameat2,link,linkat,symlink,symlinkat,unlink,"
                "unlinkat,rmdir,truncate,chmod,fchmodat,chown,fchownat,utimensat,mknod,mknodat")
EROFS = re.compile(r'^\d+\s+(\w+)\((?:[^"]*)"([^"]*)".*= -1 EROFS', re.M)


def sandbox_available() -> str | None:
    """Why a read-only mount namespace cannot be made here, or None (util-linux's `unshare` is in every Debian; the
    kernel, or a container's seccomp profile, may refuse unprivileged user namespaces: then the test skips, CI or not,
    as no installation brings them)."""
    if shutil.which("unshare") is None:
        return "`unshare` (util-linux) is not installed"
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                                "mount -o remount,bind,ro / && ! touch probe 2>/dev/null"],
                               cwd=folder, capture_output=True, text=True, timeout=30)
    if probe.returncode:
        return f"unprivileged user and mount namespaces are not available here: {probe.stderr.strip()[:200]}"
    return None


@pytest.fixture(scope="module")
def read_only_server(demo_models: dict[str, str], postgres_server: PostgresServer,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    reason = sandbox_available()
    if reason:
        pytest.skip(reason)
    if shutil.which("strace") is None:  # the run is still checked, the silently refused writes are not
        if under_ci():
            unavailable("strace", "strace is not installed (Debian: apt-get install strace; .ci/run installs it)")
    root = tmp_path_factory.mktemp("read-only-root")
    writable = {name: root / name.lower() for name in WRITTEN_ENV}
    for folder in writable.values():
        folder.mkdir()
    # The model store, as the pod's init container copies the image's into the `models` emptyDir.
    shutil.copytree(Path(os.environ["BENTOML_HOME"]) / "models", writable["BENTOML_HOME"] / "models")
    database = postgres_server.new_database()
    env = {
        **server_env(writable["NEURONOVA_DATA_DIR"], database),
        **{name: str(folder) for name, folder in writable.items()},
        "NEURONOVA_DISTRIBUTED__DATABASE_URL": database,
        "NEURONOVA_DISTRIBUTED__REPLICA_ID": "read-only",
    }
    trace = root / "trace" / "strace.log"
    trace.parent.mkdir()
    # Only failed calls (-Z), and of those only EROFS, reach the trace (an import's ENOENT lookups are thousands).
    tracer = ["strace", "-f", "--seccomp-bpf", "-Z", "-qq", "-e", f"trace={TRACED_CALLS}",
              "-o", "|grep --line-buffered EROFS >&3"] if shutil.which("strace") else []
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", SANDBOX, "sandbox", str(trace),
               *(str(folder) for folder in writable.values()), "--", *tracer, *BENTOML_SERVE]
    # Left unset, as in the pod: BentoML's task store goes under the data dir (api/tasks.py). Coverage could not write
    # its data file into the read-only checkout: this server is not measured.
    hidden = {name: os.environ.pop(name) for name in list(os.environ)
              if name.startswith(("COV_CORE_", "COVERAGE_")) or name == "BENTOML_RESULT_STORE"}
    try:
        with serving(command, env, root / "server.log", timeout_s=300) as server:
            yield server.url, root
    finally:
        os.environ.update(hidden)


def wait_for_task(client: httpx.Client, task_id: str) -> dict:
    deadline = time.monotonic() + TASK_DEADLINE_S
    while (polled := client.get(f"/task/{task_id}").json())["status"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, polled
        time.sleep(0.2)
    return polled


def test_every_route_works_with_only_the_mounted_volumes_writable(read_only_server, tmp_path) -> None:
    url, root = read_only_server
    admin = {"Authorization": f"Bearer {make_token(role='admin')}"}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {make_token()}"}, timeout=300) as client:
        ct = client.post("/predict/ct_classification", files={"image": ("ct.dcm", CT_SMALL)},
                         data={"patient_id": "P000001", "xai": "true", "request_id": "ro-ct-1"})
        assert ct.status_code == 200, ct.text
        explained = client.post("/xai/explain", json={"request_id": "ro-ct-1", "xai_methods": ["occlusion"]})
        assert explained.status_code == 200, explained.text
        verdict = client.post("/feedback", json={"request_id": "ro-ct-1", "verdict": "accept",
                                                 "reviewer_id": "dr_read_only"})
        assert verdict.status_code == 200, verdict.text

        biomarker = client.post("/predict/biomarker_prediction", json={
            "patient_id": "P000002", "biomarkers": SPEC_EXAMPLE, "xai": True,
            "xai_options": {"shap": {"plots": True}}})
        assert biomarker.status_code == 200, biomarker.text

        case = synthetic_case(13, (96, 96, 64), (2.0, 2.0, 2.0))
        submitted = client.post("/predict/mri_segmentation/submit", data={"patient_id": "P000003", "xai": "true"},
                                files={"image": ("case.nii.gz", four_d_nifti(case, compressed=True))})
        assert submitted.status_code == 200, submitted.text
        task = wait_for_task(client, submitted.json()["task_id"])
        assert task["status"] == "completed", task

        served = client.get("/health").json()["models"]["ct_classification"]["version"]
        export = tmp_path / "uploaded.bentomodel"
        uploaded = new_ct_version(served)
        try:
            bentoml.models.export_model(uploaded, str(export))
        finally:
            store.delete_model(uploaded)  # only the server's store gets it, through the upload
        switched = client.post("/update_model", headers=admin, files={"model_file": ("m.bentomodel", export.read_bytes())},
                               data={"model_id": "ct_classification",
                                     "sha256": hashlib.sha256(export.read_bytes()).hexdigest()})
        assert switched.status_code == 200 and switched.json()["new_version"] == uploaded, switched.text
        assert client.post("/predict/ct_classification", files={"image": ("ct.dcm", CT_SMALL)},
                           data={"patient_id": "P000001"}).json()["model_version"] == uploaded
        back = client.post("/update_model", headers=admin, json={"model_id": "ct_classification", "version": served})
        assert back.status_code == 200, back.text

        assert client.get("/metrics").status_code == 200
        assert client.get("/model_info").status_code == 200

    log = (root / "server.log").read_text()
    assert "Read-only file system" not in log, log[-4000:]
    assert (root / "bentoml_home" / "models" / "neuronova-ct" / uploaded.split(":")[1]).is_dir()
    assert list((root / "neuronova_data_dir" / "bentoml-tasks").glob("task_result.db*"))
    trace = root / "trace" / "strace.log"
    if trace.exists():
        failed = {(call, path) for call, path in EROFS.findall(trace.read_text()) if "__pycache__" not in path}
        assert not failed, sorted(failed)


def new_ct_version(served: str) -> str:
    """Another version of the served CT model (same weights, a new card name) in this process's store."""
    model = store.get_model(served)
    card = store.read_card(model, ClassificationCard).model_copy(update={"name": "CT demo, uploaded read-only"})
    files = {file: Path(model.path_of(file)) for file in (card.model_file, card.torch.weights_file)}
    return store.save_model("neuronova-ct", card, files)
