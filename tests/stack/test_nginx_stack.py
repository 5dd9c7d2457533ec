"""The shipped Nginx configuration run for real in front of a served instance (one API worker, auth off on loopback,
a low rate limit): TLS, a 100 MB MRI upload, the service's 413 and Nginx's own in one error schema, the client's
address reaching the rate limiter and a forged X-Forwarded-For ignored, a slow upload, an unreachable upstream
answered 503 with Retry-After."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from bench.harness import free_port, served
from tests.nginx import Proxy, check, configure, dump, nginx

pytestmark = pytest.mark.stack

BIOMARKER = "/predict/biomarker_prediction"
MRI_SUBMIT = "/predict/mri_segmentation/submit"
PER_MINUTE = 5
RECORD = {
    "age": 61, "gender": "female", "imaging_features": {"tumor_size_mm": 30.0, "tumor_shape": "round",
                                                        "necrosis_present": False},
}
MiB = 2**20


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("stack-service")
    env = {"NEURONOVA_AUTH__ENABLED": "false", "NEURONOVA_DATA_DIR": str(folder / "data"),
           "NEURONOVA_RATE_LIMIT__PER_ROUTE_PER_MINUTE": f'{{"{BIOMARKER}": {PER_MINUTE}}}',
           "BENTOML_CONFIG_OPTIONS": "services.neuronova.workers=1"}  # one worker: one rate-limit window
    with served(env, folder / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def proxy(service: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    upstream = service.removeprefix("http://")
    with nginx(tmp_path_factory.mktemp("nginx"), upstream, pacs_upstream=f"127.0.0.1:{free_port()}") as running:
        yield running


def client(proxy: Proxy, address: str = "127.0.0.2", **kwargs) -> httpx.Client:
    """An HTTPS client of the proxy from `address` (any of 127.0.0.0/8), verifying the proxy's certificate."""
    transport = httpx.HTTPTransport(local_address=address, verify=str(proxy.certificate))
    return httpx.Client(base_url=proxy.https, transport=transport, timeout=120, **kwargs)


def test_tls_with_the_generated_certificate_and_http_redirected(proxy: Proxy) -> None:
    with client(proxy) as https:
        health = https.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "healthy"
    assert health.headers["strict-transport-security"].startswith("max-age=")
    redirect = httpx.get(f"{proxy.http}/health")
    assert redirect.status_code == 301 and redirect.headers["location"].startswith("https://")
    with pytest.raises(httpx.ConnectError):  # an unverified certificate is refused: TLS is real
        httpx.get(f"{proxy.https}/health")


def test_metrics_are_not_served_at_the_public_entrance(proxy: Proxy) -> None:
    with client(proxy) as https:
        response = https.get("/metrics")
    assert response.status_code == 404 and response.json()["error"]["code"] == "NOT_FOUND"


def nifti_of_about(size_bytes: int, folder: Path) -> bytes:
    """An uncompressed four-sequence NIfTI of about `size_bytes`: a brain-sized noise volume, zeros around it."""
    side = 256
    depth = size_bytes // (4 * side * side * 4)
    data = np.zeros((side, side, depth, 4), np.float32)
    data[64:192, 64:192, depth // 4: 3 * depth // 4] = np.random.default_rng(0).normal(
        100, 20, (128, 128, 3 * depth // 4 - depth // 4, 4))
    path = folder / "study.nii"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), path)
    return path.read_bytes()


def test_a_100_mb_mri_submission_passes(proxy: Proxy, tmp_path: Path) -> None:
    study = nifti_of_about(99 * MiB + MiB // 2, tmp_path)  # under the service's 100 MiB per file
    assert len(study) > 100 * 10**6
    with client(proxy) as https:
        response = https.post(MRI_SUBMIT, files={"image": ("study.nii", study)}, data={"patient_id": "P000501"})
        assert response.status_code in (200, 202), response.text
        task_id = response.json()["task_id"]
        assert https.get(f"/task/{task_id}").json()["status"] in ("pending", "processing", "completed")
        cancelled = https.delete(f"/task/{task_id}")  # the upload got through; its inference is not the point here
        assert cancelled.status_code == 200, cancelled.text


def declared_upload(proxy: Proxy, path: str, length: int) -> tuple[int, dict]:
    """POST headers declaring a body of `length` bytes and the start of it, then read the answer the server sends
    before the rest (as a client whose upload is refused early sees it): (status, JSON body)."""
    context = ssl.create_default_context(cafile=str(proxy.certificate))
    host, port = proxy.https.removeprefix("https://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall((f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                     f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode() + b"\0" * 65536)
        answer = b""
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            while chunk := tls.recv(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_uploads_over_the_limit_get_the_error_schema_from_the_service_or_the_proxy(proxy: Proxy) -> None:
    status, body = declared_upload(proxy, MRI_SUBMIT, 101 * MiB + MiB // 2)  # over ours (101 MiB), under Nginx's
    assert status == 413 and body["error"]["code"] == "IMAGE_TOO_LARGE"
    assert body["error"]["details"]["limit_bytes"] == 101 * MiB  # the service's own answer
    status, body = declared_upload(proxy, MRI_SUBMIT, 103 * MiB)  # over Nginx's 102 MiB too
    assert status == 413 and body["success"] is False
    assert body["error"] == {**body["error"], "code": "IMAGE_TOO_LARGE", "details": {"reason": "proxy_body_limit"}}
    status, body = declared_upload(proxy, BIOMARKER, 3 * MiB)  # JSON routes: Nginx's 2 MiB
    assert status == 413 and body["error"]["details"] == {"reason": "proxy_body_limit"}


def predict(https: httpx.Client, **headers: str) -> int:
    return https.post(BIOMARKER, json={"patient_id": "P000502", "biomarkers": RECORD}, headers=headers).status_code


def test_the_rate_limit_keys_on_the_client_address_and_a_forged_forwarded_for_is_ignored(
        proxy: Proxy, service: str) -> None:
    with client(proxy, "127.0.0.2") as first, client(proxy, "127.0.0.3") as second:
        assert [predict(first) for _ in range(PER_MINUTE)] == [200] * PER_MINUTE
        assert predict(first) == 429
        assert predict(first, **{"X-Forwarded-For": "127.0.0.9"}) == 429  # Nginx replaces the client's header
        assert predict(second) == 200  # another client behind the same proxy has its own budget
    # Straight to the service from an address it does not trust as a proxy: the header is not believed.
    transport = httpx.HTTPTransport(local_address="127.0.0.4")
    with httpx.Client(base_url=service, transport=transport, timeout=60) as direct:
        assert [predict(direct) for _ in range(PER_MINUTE)] == [200] * PER_MINUTE
        assert predict(direct, **{"X-Forwarded-For": "127.0.0.10"}) == 429


def test_a_slow_upload_is_not_cut(proxy: Proxy) -> None:
    """A CT slice trickled over several seconds (Nginx streams it: `proxy_request_buffering off`)."""
    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    boundary = "neuronova-slow"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"patient_id\"\r\n\r\nP000503\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"ct.dcm\"\r\n"
            "Content-Type: application/dicom\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()

    def trickle() -> Iterator[bytes]:
        for start in range(0, len(body), len(body) // 8 + 1):
            yield body[start:start + len(body) // 8 + 1]
            time.sleep(0.5)

    with client(proxy) as https:
        response = https.post("/predict/ct_classification", content=trickle(),
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 200, response.text
    assert response.json()["result"]["predicted_class"]


def test_an_unreachable_upstream_is_a_503_with_retry_after(proxy: Proxy) -> None:
    """The PACS replica's upstream of this proxy points at a closed port."""
    with client(proxy) as https:
        response = https.get("/pacs/jobs")
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert response.json()["error"]["details"] == {"reason": "upstream_unavailable"}


def test_timeouts_fit_the_service(proxy: Proxy) -> None:
    """What the running configuration says (`nginx -T`): reads wait as long as the service's own request timeout,
    and a slow upload is cut only after 120 s without a byte."""
    dumped = dump(proxy.folder / "nginx.conf")
    assert "proxy_read_timeout 300s;" in dumped and "proxy_send_timeout 300s;" in dumped
    assert "client_body_timeout 120s;" in dumped and "proxy_request_buffering off;" in dumped


def test_a_broken_configuration_is_caught(tmp_path: Path) -> None:
    main, _ = configure(tmp_path, "127.0.0.1:1", "127.0.0.1:2")
    conf = tmp_path / "conf.d" / "neuronova.conf"
    conf.write_text(conf.read_text().replace("proxy_read_timeout 300s;", "proxy_read_timeout;"))
    assert check(main).returncode != 0
