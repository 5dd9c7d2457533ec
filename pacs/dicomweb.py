"""The PACS seen through DICOMweb (dicomweb-client): the series of a study (QIDO-RS + one instance's metadata each),
their instances (WADO-RS), and storing results into a study (STOW-RS). Transport failures become PacsUnavailable,
which the job queue retries with backoff.
"""

from __future__ import annotations

from dataclasses import dataclass

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from core.errors import ImageTooLarge
from pacs.config import DicomWebEndpoint, RetrievalLimits

SERIES_INSTANCE_UID = "0020000E"
RELATED_INSTANCES = "00201209"


class PacsUnavailable(Exception):
    """The PACS did not answer, or answered with a server error: try again later."""


class PacsRefused(Exception):
    """The PACS answered with a client error (4xx): trying again will not help."""


@dataclass(frozen=True)
class StudySeries:
    """One series of a study: its UID, instance count and the header of one instance (no pixel data)."""

    series_uid: str
    instance_count: int
    header: Dataset


def _client(endpoint: DicomWebEndpoint) -> DICOMwebClient:
    session = requests.Session()
    session.headers.update(endpoint.headers())
    client = DICOMwebClient(url=endpoint.url, session=session, timeout=endpoint.timeout_seconds)
    # Its own retries (5 attempts, 2-16 s apart, on any exception: a refused connection took 30 s) would hold a
    # worker; the job queue retries with backoff instead, and frees the worker meanwhile.
    client.set_http_retry_params(retry=False)
    return client


def _calling(what: str):
    """Map requests' exceptions to PacsUnavailable (connection, timeout, 5xx) or PacsRefused (4xx)."""

    def wrap(func):
        def inner(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except requests.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                if 400 <= status < 500:
                    raise PacsRefused(f"{what}: HTTP {status}") from None
                raise PacsUnavailable(f"{what}: HTTP {status}") from None
            except requests.RequestException as exc:
                raise PacsUnavailable(f"{what}: {type(exc).__name__}") from None

        return inner

    return wrap


class DicomWebPacs:
    """QIDO-RS / WADO-RS on the source, STOW-RS to the destination (blocking: call from a thread)."""

    def __init__(self, source: DicomWebEndpoint, destination: DicomWebEndpoint,
                 limits: RetrievalLimits | None = None) -> None:
        self.source = source
        self.destination = destination
        self.limits = limits or RetrievalLimits()

    @_calling("QIDO-RS series search")
    def study_series(self, study_uid: str) -> list[StudySeries]:
        """Every series of the study, each with the metadata of its first instance (series selected client-side:
        Orthanc's QIDO matches descriptions with spaces unreliably)."""
        client = _client(self.source)
        found = []
        for series in client.search_for_series(study_uid, get_remaining=True):
            series_uid = series[SERIES_INSTANCE_UID]["Value"][0]
            metadata = client.retrieve_series_metadata(study_uid, series_uid)
            if not metadata:
                continue
            count = series.get(RELATED_INSTANCES, {}).get("Value", [len(metadata)])[0]
            found.append(StudySeries(series_uid, int(count), Dataset.from_json(metadata[0])))
        return found

    @_calling("WADO-RS series retrieve")
    def retrieve(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """The series' instances as they arrive; ImageTooLarge (the job fails) once they pass the retrieval limits."""
        limits, instances, pixel_bytes = self.limits, [], 0
        for instance in _client(self.source).iter_series(study_uid, series_uid):
            instances.append(instance)
            pixel_bytes += len(instance.PixelData) if "PixelData" in instance else 0
            if len(instances) > limits.max_instances_per_series or pixel_bytes > limits.max_bytes_per_series:
                raise ImageTooLarge("the series exceeds the PACS retrieval limits", {
                    "max_instances_per_series": limits.max_instances_per_series,
                    "max_bytes_per_series": limits.max_bytes_per_series, "reason": "pacs_retrieval_limit"})
        return instances

    @_calling("STOW-RS store")
    def store(self, study_uid: str, datasets: list[Dataset]) -> None:
        """Store the datasets into the study; PacsRefused when the PACS refused any of them."""
        response = _client(self.destination).store_instances(datasets, study_instance_uid=study_uid)
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise PacsRefused(f"STOW-RS: {len(failed)} instance(s) refused (failure reasons {reasons})")
