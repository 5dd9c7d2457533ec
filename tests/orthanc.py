"""A real Orthanc PACS on loopback for the `pacs` tests: its own storage and index in a temp dir, free HTTP and DICOM
ports, the DICOMweb plugin loaded, an optional Lua script; started as a subprocess and stopped by PID.

Debian's `orthanc` and `orthanc-dicomweb` packages provide `/usr/sbin/Orthanc` and the plugin. Where they are absent
the tests skip with the reason, except under CI (`CI` set), where they fail: `.ci/run` installs them.
`stop()` and `start()` may be called mid-test (a PACS outage): the storage survives, the ports stay the same.
`service_config` writes the service's PACS YAML (the shipped one) pointed at an Orthanc.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from bench.harness import ROOT, free_port
from tests.prerequisites import unavailable

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
READY_TIMEOUT_S = 30.0


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")


def missing_prerequisites(plugin: Path = DICOMWEB_PLUGIN) -> str | None:
    """Why an Orthanc with DICOMweb cannot be started here, or None."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb dicom3tools)"
    if not plugin.is_file():
        return f"the Orthanc DICOMweb plugin {plugin} is missing (Debian: apt-get install orthanc-dicomweb)"
    return None


def require_orthanc() -> str:
    """The Orthanc binary; otherwise skip the test, or fail it under CI."""
    reason = missing_prerequisites()
    if reason is None:
        return orthanc_binary()  # type: ignore[return-value]
    unavailable("Orthanc", reason)


@dataclass
class Orthanc:
    """One Orthanc instance: `start()`, `stop()` (by PID), again and again, on the same ports and storage."""

    binary: str
    root: Path
    lua: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    stable_age_s: int = 2
    aet: str = "TESTPACS"
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    def config(self) -> dict:
        config = {
            "Name": "NEURONOVA-TEST-PACS", "StorageDirectory": str(self.root / "db"), "IndexDirectory": str(self.root / "db"),
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomServerEnabled": True, "DicomAet": self.aet, "DicomPort": self.dicom_port,
            "DicomAlwaysAllowStore": True, "DicomCheckModalityHost": False, "StableAge": self.stable_age_s,
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpTimeout": 10,
        }
        if self.lua is not None:
            script = self.root / "hook.lua"
            script.write_text(self.lua)
            config["LuaScripts"] = [str(script)]
        return config

    def start(self) -> None:
        """Start Orthanc (with the current `lua` and `env`) and wait until its REST API answers."""
        config_path = self.root / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([self.binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.env}, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc not ready after {READY_TIMEOUT_S}s:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop by PID (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def get(self, path: str) -> object:
        response = httpx.get(f"{self.url}{path}", timeout=10)
        response.raise_for_status()
        return response.json()

    def upload(self, files: list[bytes]) -> None:
        """Store DICOM files as a modality would (REST `POST /instances`, one file each)."""
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for data in files:
                client.post("/instances", content=data, headers={"content-type": "application/dicom"}).raise_for_status()

    def series_of_study(self, study_uid: str) -> list[dict]:
        """Every series of the study as Orthanc's REST API shows them (MainDicomTags, Instances)."""
        found = httpx.post(f"{self.url}/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}},
                           timeout=10).json()
        return [series for study in found for series in self.get(f"/studies/{study}/series")]  # type: ignore[union-attr]


def service_config(path: Path, dicomweb_url: str, *, every_object: bool = True, models: tuple[str, ...] | None = None,
                   changes_url: str | None = None, poll_seconds: float = 0.2) -> Path:
    """Write NeuroNova's PACS YAML to `path`: the shipped rules (`models`: only these), the source an Orthanc's
    DICOMweb root, quick export retries, an idle worker's queue poll every `poll_seconds`; `every_object`: each rule asks for every object its model can
    store (the MR uncertainty map included); `changes_url`: the `/changes` poller notifies instead of Orthanc's Lua."""
    from postprocessing.result_sets import OBJECTS_OF_MODEL

    config = yaml.safe_load((ROOT / "deploy" / "pacs" / "pacs.yaml").read_text())
    config["source"] = {"url": dicomweb_url, "timeout_seconds": 5}
    config["export_retry"] = {"initial_seconds": 1, "max_seconds": 4}
    config["poll_seconds"] = poll_seconds
    config["models"] = [rules for rules in config["models"] if models is None or rules["model_id"] in models]
    for rules in config["models"] if every_object else ():
        rules["results"] = list(OBJECTS_OF_MODEL[rules["model_id"]])
    if changes_url is not None:
        config["changes"] = {"url": changes_url, "interval_seconds": 0.5}
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def running_orthanc(lua: str | None = None, stable_age_s: int = 2) -> Iterator[Orthanc]:
    """An Orthanc started in a fresh temp dir, stopped and removed afterwards."""
    binary = require_orthanc()
    root = Path(tempfile.mkdtemp(prefix="neuronova-orthanc-"))
    orthanc = Orthanc(binary=binary, root=root, lua=lua, stable_age_s=stable_age_s)
    try:
        orthanc.start()
        yield orthanc
    finally:
        orthanc.stop()
        shutil.rmtree(root, ignore_errors=True)
