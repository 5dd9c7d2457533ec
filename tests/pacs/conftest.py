"""The `pacs` suite's set-up: a real Orthanc (tests/orthanc.py) and a real `bentoml serve` configured with the shipped
PACS YAML pointed at it; studies written as DICOM (synthetic brain MR, pydicom's CT_small, a small ultrasound)."""

from __future__ import annotations

import contextlib
import io
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

from bench.harness import BENTOML_SERVE, Server, serving
from core.cards.segmentation import MRI_SEQUENCES
from tests.http.conftest import JWT_SECRET, make_token
from tests.orthanc import Orthanc, running_orthanc, service_config
from training_export.synthetic_mri import dicom_series, synthetic_case

ROOT = Path(__file__).resolve().parents[2]
NOTIFY_TOKEN = "pacs-notify-token-0123456789abcdef"
PATIENT_NAME, PATIENT_ID = "Testpatient^Johanna", "PHI7731XYZ"
"""Written into every test study; must never appear in the service's logs or job store."""
OUR_MANUFACTURER = "NeuroNova Inference"


def wait_for(check: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.2,
             evidence: Callable[[], str] | None = None) -> object:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout_s`, with what `evidence`
    tells of the state then (e.g. the job rows and the service log)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            told = f"\n{evidence()}" if evidence is not None else ""
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}{told}")
        time.sleep(interval_s)


def _with_patient(data: bytes) -> bytes:
    dataset = dcmread(io.BytesIO(data))
    dataset.PatientName, dataset.PatientID = PATIENT_NAME, PATIENT_ID
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass(frozen=True)
class Study:
    uid: str
    files: list[bytes]
    series: dict[str, str] = field(default_factory=dict)
    """role -> SeriesInstanceUID, where the test knows it"""
    tumour_ml: float | None = None
    """The synthetic truth's whole tumour volume, for an MR study"""


def mr_study(seed: int = 3, *, tumour: bool = True) -> Study:
    """A synthetic 4-sequence brain-MR study (48 x 44 x 30 voxels of 4 x 4 x 5 mm), one series per sequence;
    `tumour=False`: a brain without a tumour."""
    case = synthetic_case(seed, (48, 44, 30), (4.0, 4.0, 5.0), tumour=tumour)
    study, frame = generate_uid(), generate_uid()
    files, series = [], {}
    for index, sequence in enumerate(MRI_SEQUENCES):
        written = dicom_series(case.volume.data[index], case.volume.affine, sequence, patient_id=PATIENT_ID,
                               study_uid=study, frame_of_reference_uid=frame)
        series[sequence] = str(dcmread(io.BytesIO(written[0]), stop_before_pixels=True).SeriesInstanceUID)
        files += [_with_patient(data) for data in written]
    voxel_ml = abs(float(np.linalg.det(case.volume.affine[:3, :3]))) / 1000.0
    return Study(study, files, series, tumour_ml=float(np.count_nonzero(case.labels)) * voxel_ml)


def ct_study() -> Study:
    """pydicom's CT_small.dcm as the single slice of a new study."""
    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID = (generate_uid() for _ in range(3))
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.PatientName, dataset.PatientID = PATIENT_NAME, PATIENT_ID
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return Study(str(dataset.StudyInstanceUID), [buffer.getvalue()], {"slice": str(dataset.SeriesInstanceUID)})


def ultrasound_study() -> Study:
    """One small ultrasound image: no model's rules match it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = UltrasoundImageStorage, ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = UltrasoundImageStorage, generate_uid()
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.Modality, dataset.SeriesDescription, dataset.SeriesNumber, dataset.InstanceNumber = "US", "ABDOMEN", 1, 1
    dataset.PatientName, dataset.PatientID = PATIENT_NAME, PATIENT_ID
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation, dataset.Rows, dataset.Columns = 1, "MONOCHROME2", 64, 64
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    dataset.PixelData = (np.arange(64 * 64) % 251).astype(np.uint8).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return Study(str(dataset.StudyInstanceUID), [buffer.getvalue()])


@dataclass
class PacsService:
    """The served NeuroNova with a PACS config pointing at `orthanc`; restartable (SIGKILL = a crash) on one state."""

    orthanc: Orthanc
    state: Path
    every_object: bool = True
    """Ask each rule for every object its model can store (else: the shipped rules' `results`)."""
    starts: int = 0
    server: Server | None = None
    _running: contextlib.AbstractContextManager | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    @property
    def logs(self) -> list[Path]:
        return sorted(self.state.glob("server-*.log"))

    def config(self, changes: bool) -> Path:
        return service_config(self.state / f"pacs-{self.starts}.yaml", self.orthanc.dicomweb_url,
                              every_object=self.every_object, changes_url=self.orthanc.url if changes else None)

    def start(self, changes: bool = False) -> None:
        """Serve with the shipped rules; `changes`: the /changes poller notifies instead of Orthanc's Lua."""
        self.starts += 1
        env = {
            "NEURONOVA_PACS__CONFIG": str(self.config(changes)), "NEURONOVA_PACS_TOKEN": NOTIFY_TOKEN,
            "NEURONOVA_AUTH__SECRET": JWT_SECRET, "NEURONOVA_DATA_DIR": str(self.state / "data"),
            "BENTOML_RESULT_STORE": str(self.state / "tasks.db"),
            "NEURONOVA_RATE_LIMIT__DEFAULT_PER_MINUTE": "100000",
        }
        self._running = serving(BENTOML_SERVE, env, self.state / f"server-{self.starts}.log")
        self.server = self._running.__enter__()

    def crash(self) -> None:
        """SIGKILL the whole server (arbiter, API workers, runners) at once: nothing gets to clean up. BentoML runs
        each worker in a session of its own, so they are found as the arbiter's children, not by process group."""
        assert self.server is not None and self._running is not None
        arbiter = psutil.Process(self.server.pid)
        tree = [arbiter, *arbiter.children(recursive=True)]
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(tree, timeout=30)
        self._running.__exit__(None, None, None)
        self._running = self.server = None

    def stop(self) -> None:
        if self._running is not None:
            self._running.__exit__(None, None, None)
            self._running = self.server = None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {make_token(role='admin')}"})

    def evidence(self, study_uid: str) -> str:
        """For a failure message: the study's jobs, the queue's pending notifications and cursors (read from its
        database), and the current server log without its access lines."""
        with contextlib.closing(sqlite3.connect(self.state / "data" / "pacs" / "jobs.sqlite3")) as database:
            jobs = database.execute("SELECT state, runs, reason, log_json FROM pacs_jobs WHERE study_uid = ?",
                                    (study_uid,)).fetchall()
            notices = database.execute("SELECT * FROM pacs_notices").fetchall()
            cursors = database.execute("SELECT * FROM pacs_cursors").fetchall()
        lines = [line for log in self.logs[-1:] for line in log.read_text(errors="replace").splitlines()
                 if "neuronova.access" not in line]
        return "\n".join([f"jobs of the study: {jobs}", f"notifications pending: {notices}", f"cursors: {cursors}",
                          "server log (access lines left out):", *lines[-60:]])

    def resolved_again(self, study_uid: str) -> bool:
        """Whether a server log says a notification of the study found its jobs already known (the stable-study
        event our own results cause comes to this)."""
        pattern = re.compile(rf"pacs: study {re.escape(study_uid)} -> \S+ job \S+ \(already known\)")
        return any(pattern.search(log.read_text(errors="replace")) for log in self.logs)

    def jobs(self, study_uid: str) -> list[dict]:
        with self.client() as client:
            return client.get("/pacs/jobs", params={"study_instance_uid": study_uid}).raise_for_status().json()


def notify_lua(orthanc: Orthanc, service: PacsService | None) -> None:
    """Restart Orthanc with the shipped Lua script notifying `service` (None: no script)."""
    orthanc.stop()
    if service is None:
        orthanc.lua, orthanc.env = None, {}
    else:
        orthanc.lua = (ROOT / "deploy" / "orthanc" / "neuronova.lua").read_text()
        orthanc.env = {"NEURONOVA_NOTIFY_URL": f"{service.url}/pacs/notify", "NEURONOVA_PACS_TOKEN": NOTIFY_TOKEN}
    orthanc.start()


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    with running_orthanc() as server:
        yield server


@pytest.fixture(scope="module")
def service(orthanc: Orthanc, demo_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[PacsService]:
    """NeuroNova served with the PACS connection on; Orthanc restarted with the Lua script notifying it."""
    served = PacsService(orthanc, tmp_path_factory.mktemp("pacs-service"))
    served.start()
    notify_lua(orthanc, served)
    try:
        yield served
    finally:
        served.stop()
