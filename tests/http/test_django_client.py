"""The Django app in clients/django (neuronova_client): unit checks of its retries, errors, settings and tokens,
then a real Django test client (in-memory SQLite) against the real served NeuroNova process."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import django
import httpx
import pytest
from django.conf import settings

settings.configure(
    SECRET_KEY="django-client-test", ALLOWED_HOSTS=["testserver"], ROOT_URLCONF=__name__, USE_TZ=True,
    INSTALLED_APPS=["django.contrib.admin", "django.contrib.auth", "django.contrib.contenttypes",
                    "django.contrib.sessions", "django.contrib.messages", "neuronova_client"],
    MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware",
                "django.contrib.auth.middleware.AuthenticationMiddleware",
                "django.contrib.messages.middleware.MessageMiddleware"],
    TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True, "OPTIONS": {
        "context_processors": ["django.template.context_processors.request",
                               "django.contrib.auth.context_processors.auth",
                               "django.contrib.messages.context_processors.messages"]}}],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
)
django.setup()

import bentoml
from django.contrib import admin
from django.contrib.auth.models import Permission, User
from django.core.exceptions import ImproperlyConfigured
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.test import Client, override_settings
from django.urls import include, path, reverse
from neuronova_client.client import MRI_ROUTE, NeuroNovaClient, get_client
from neuronova_client.conf import ClientSettings
from neuronova_client.errors import ServiceError, ServiceUnreachable
from neuronova_client.models import Prediction
from neuronova_client.retry import RetryPolicy, call_with_retries
from pydicom.data import get_testdata_file

from api.auth import verify_token
from bench.harness import free_port
from core.settings import AuthSettings
from tests.http.conftest import JWT_SECRET
from tests.unit.mri.mri_inputs import four_d_nifti, zip_bytes
from training_export.synthetic_mri import synthetic_case

# This module is the test site's URLconf.
urlpatterns = [path("neuronova/", include("neuronova_client.urls")), path("admin/", admin.site.urls)]
SPEC_BIOMARKERS = {
    "age": 67, "gender": "male",
    "tumor_markers": {"CEA": 2.1, "CA125": 12.0, "AFP": 3.5, "PSA": 28.0},
    "blood_test": {"WBC": 7200, "RBC": 4.6, "hemoglobin": 14.1, "platelet": 250000},
    "genetic_markers": {"EGFR_mutation": False, "TP53_mutation": True, "KRAS_mutation": False},
    "imaging_features": {"tumor_size_mm": 42.0, "tumor_shape": "irregular", "necrosis_present": True},
}


def flaky(*failures: Exception):
    """An operation failing with `failures` in turn, then answering "ok"; counts its calls."""
    pending = list(failures)

    def operation() -> str:
        operation.calls += 1
        if pending:
            raise pending.pop(0)
        return "ok"
    operation.calls = 0
    return operation


def service_error(status: int, retry_after: str | None = None) -> ServiceError:
    return ServiceError.from_response(status, '{"success": false, "error": {"code": "X", "message": "m"}}', retry_after)


def test_retries_only_safe_failures_with_backoff_and_retry_after() -> None:
    policy, slept = RetryPolicy(retries=3, base_seconds=1.0, max_seconds=5.0), []
    operation = flaky(service_error(429, "2"), service_error(503), httpx.ConnectError("refused"))
    assert call_with_retries(operation, policy, idempotent=False, sleep=slept.append) == "ok"
    assert operation.calls == 4 and slept[0] == 2.0 and 1.0 <= slept[1] <= 2.0 and 2.0 <= slept[2] <= 4.0
    assert RetryPolicy(max_seconds=5.0).delay(0, retry_after=600.0) == 5.0

    for error, idempotent in ((service_error(400), True), (service_error(500), True)):
        with pytest.raises(ServiceError):
            call_with_retries(operation := flaky(error), policy, idempotent=idempotent, sleep=slept.append)
        assert operation.calls == 1
    with pytest.raises(ServiceUnreachable):  # a POST that may have reached the service is not sent twice
        call_with_retries(operation := flaky(httpx.ReadTimeout("slow")), policy, idempotent=False, sleep=slept.append)
    assert operation.calls == 1
    assert call_with_retries(operation := flaky(httpx.ReadTimeout("slow")), policy, idempotent=True,
                             sleep=slept.append) == "ok" and operation.calls == 2
    with pytest.raises(ServiceError) as raised:
        call_with_retries(operation := flaky(*[service_error(503)] * 5), policy, idempotent=True, sleep=slept.append)
    assert operation.calls == 4 and raised.value.code == "X"


def test_error_bodies_become_typed_errors() -> None:
    spec = ServiceError.from_response(400, '{"success": false, "error": {"code": "INVALID_IMAGE_FORMAT", '
                                           '"message": "not an image", "details": {"field": "image"}}}')
    assert (spec.status, spec.code, spec.message, spec.details) == (400, "INVALID_IMAGE_FORMAT", "not an image",
                                                                    {"field": "image"})
    bentoml_list = ServiceError.from_response(400, '[{"error": "bad"}]')
    assert bentoml_list.code == "INVALID_REQUEST" and "bad" in bentoml_list.message
    proxy = ServiceError.from_response(502, "<html>Bad Gateway</html>")
    assert proxy.code == "INTERNAL_SERVER_ERROR" and not proxy.retryable
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < ServiceError.from_response(503, "busy", later).retry_after <= 30
    assert ServiceError.from_response(429, "{}", "soon").retry_after is None


def test_settings_and_tokens_match_the_service() -> None:
    with pytest.raises(ImproperlyConfigured, match="JWT_SECRET"):
        ClientSettings.from_mapping({"URL": "http://x"})
    with pytest.raises(ImproperlyConfigured, match="TIMEOUT"):
        ClientSettings.from_mapping({"URL": "http://x", "JWT_SECRET": "s", "TIMEOUT": 3})
    with pytest.raises(ImproperlyConfigured, match="REVIEWER_ID_PREFIX"):
        ClientSettings.from_mapping({"URL": "http://x", "JWT_SECRET": "s", "REVIEWER_ID_PREFIX": "dr house/"})
    config = ClientSettings.from_mapping({"URL": "http://x", "JWT_SECRET": "s" * 32, "JWT_AUDIENCE": "neuronova",
                                          "JWT_ISSUER": "django", "TOKEN_TTL_SECONDS": 60})
    token = NeuroNovaClient(config).token("django-user-7")
    claims = verify_token(token, AuthSettings(secret="s" * 32, audience="neuronova", issuer="django"))
    assert claims["sub"] == "django-user-7" and claims["role"] == "clinician" and claims["exp"] - claims["iat"] == 60
    with pytest.raises(Exception, match="invalid token"):
        verify_token(token, AuthSettings(secret="s" * 32, audience="another"))


@pytest.fixture(scope="module")
def neuronova(server_url: str):
    """The app configured for the served process, the database migrated, and a logged-in doctor."""
    config = {"URL": server_url, "JWT_SECRET": JWT_SECRET, "RETRIES": 1, "BACKOFF_SECONDS": 0.05,
              "POLL_INTERVAL_SECONDS": 0.3}
    with override_settings(NEURONOVA=config):
        call_command("migrate", verbosity=0)
        doctor = User.objects.create_user("dr_house")
        doctor.user_permissions.add(*Permission.objects.filter(content_type__app_label="neuronova_client"))
        browser = Client()
        browser.force_login(doctor)
        yield browser
        get_client().close()


def test_ct_and_biomarker_through_the_views_then_review(neuronova) -> None:
    with open(get_testdata_file("CT_small.dcm"), "rb") as dicom:
        answer = neuronova.post(reverse("neuronova_client:ct"), {"image": dicom, "patient_id": "P000101"})
    assert answer.status_code == 201, answer.content
    stored = Prediction.objects.get(pk=answer.json()["id"])
    assert stored.status == "pending" and stored.model_id == "ct_classification"
    assert stored.model_version.startswith("neuronova-ct:") and stored.result["request_id"] == stored.request_id
    assert set(stored.result["result"]["probabilities"]) == {"Glioma", "Meningioma", "Pituitary", "No Tumor"}

    answer = neuronova.post(reverse("neuronova_client:biomarkers"), {"patient_id": "P000102", "biomarkers":
                            SPEC_BIOMARKERS}, content_type="application/json")
    assert answer.status_code == 201, answer.content
    assert answer.json()["result"]["result"]["tumor_type"]["predicted_class"] == "Prostate"

    review = reverse("neuronova_client:review", args=[stored.pk])
    for refused in ({"verdict": "correct"}, {"verdict": "correct", "corrected_label": "Astrocytoma"},
                    {"verdict": "accept", "corrected_label": "Glioma"}, {"verdict": "maybe"}):
        answer = neuronova.post(review, refused)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "INVALID_REQUEST", refused
    correction = {"verdict": "correct", "corrected_label": "Meningioma", "comment": "enhancing dural tail"}
    reviewed = neuronova.post(review, correction).json()
    doctor = User.objects.get(username="dr_house")
    assert reviewed["status"] == "reviewed" and reviewed["reviewed_by"] == f"django-user-{doctor.pk}"
    assert isinstance(reviewed["feedback_id"], int) and reviewed["feedback_id"] == reviewed["feedback_receipt"][
        "feedback_id"]
    assert {key: reviewed["feedback_receipt"][key] for key in ("request_id", "model_version", "verdict")} == {
        "request_id": stored.request_id, "model_version": stored.model_version, "verdict": "correct"}
    assert (reviewed["corrected_label"], reviewed["review_comment"]) == ("Meningioma", "enhancing dural tail")
    assert neuronova.post(review, correction).status_code == 409
    assert neuronova.get(reverse("neuronova_client:prediction", args=[stored.pk])).json()["status"] == "reviewed"
    assert Client().post(reverse("neuronova_client:ct")).status_code == 403  # not logged in
    stored.refresh_from_db()
    assert str(stored) == f"ct_classification {stored.request_id} (reviewed)"
    queue = Client()
    queue.force_login(User.objects.create_superuser("chief", password=None))
    listed = queue.get("/admin/neuronova_client/prediction/", {"status__exact": "reviewed"})
    assert listed.status_code == 200 and stored.request_id in listed.content.decode()


def test_a_review_the_service_refuses_leaves_the_prediction_awaiting_review(neuronova) -> None:
    """The service keeps requests for feedback a bounded time: an unknown (or expired) one is its NOT_FOUND; an
    unreachable service is SERVICE_UNAVAILABLE. Neither marks the prediction reviewed."""
    expired = Prediction.objects.create(request_id="dj-expired", model_id="ct_classification", patient_id="P000111",
                                        result={"result": {"probabilities": {"Glioma": 0.9, "No Tumor": 0.1}}})
    review = reverse("neuronova_client:review", args=[expired.pk])
    answer = neuronova.post(review, {"verdict": "correct", "corrected_label": "No Tumor"})
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "NOT_FOUND"
    with override_settings(NEURONOVA={"URL": f"http://127.0.0.1:{free_port()}", "JWT_SECRET": JWT_SECRET,
                                      "BACKOFF_SECONDS": 0.01}):
        answer = neuronova.post(review, {"verdict": "reject"})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    expired.refresh_from_db()
    assert (expired.status, expired.feedback_id, expired.verdict, expired.reviewed_by) == ("pending", None, "", "")


def test_requests_the_views_refuse_before_calling_the_service(neuronova) -> None:
    for name, kwargs in (("ct", {"data": {"patient_id": "P1"}}), ("mri", {"data": {"patient_id": "P1"}}),
                         ("biomarkers", {"data": "{not json", "content_type": "application/json"}),
                         ("biomarkers", {"data": {"patient_id": "P1"}, "content_type": "application/json"})):
        answer = neuronova.post(reverse(f"neuronova_client:{name}"), **kwargs)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "INVALID_REQUEST", name


def test_service_errors_become_the_typed_exception(neuronova, server_url) -> None:
    with pytest.raises(ServiceError) as raised:
        get_client().classify_ct(io.BytesIO(b"\x00garbage" * 50), "P000103", subject="t")
    assert (raised.value.status, raised.value.code) == (400, "INVALID_IMAGE_FORMAT")
    answer = neuronova.post(reverse("neuronova_client:ct"), {"image": SimpleUploadedFile("x.png", b"not a png"),
                                                             "patient_id": "P000103"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "INVALID_IMAGE_FORMAT"
    answer = neuronova.post(reverse("neuronova_client:biomarkers"), {"patient_id": "P000104", "biomarkers":
                            {**SPEC_BIOMARKERS, "age": "old"}}, content_type="application/json")
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "INVALID_REQUEST"
    assert not Prediction.objects.filter(patient_id__in=["P000103", "P000104"]).exists()

    wrong_secret = {"URL": server_url, "JWT_SECRET": "a-secret-the-service-does-not-know"}
    with override_settings(NEURONOVA=wrong_secret), pytest.raises(ServiceError) as raised:
        get_client().predict_biomarkers(SPEC_BIOMARKERS, "P000105", subject="t")
    assert (raised.value.status, raised.value.code) == (401, "UNAUTHORIZED")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with override_settings(NEURONOVA={"URL": closed, "JWT_SECRET": JWT_SECRET, "BACKOFF_SECONDS": 0.01}):
        answer = neuronova.post(reverse("neuronova_client:biomarkers"), {"patient_id": "P000106", "biomarkers":
                                SPEC_BIOMARKERS}, content_type="application/json")
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "SERVICE_UNAVAILABLE"


def test_mri_submitted_as_running_then_collected_by_the_management_command(neuronova) -> None:
    volume = four_d_nifti(synthetic_case(21), compressed=True)
    answer = neuronova.post(reverse("neuronova_client:mri"),
                            {"image": SimpleUploadedFile("case.nii.gz", volume), "patient_id": "P000107"})
    assert answer.status_code == 202, answer.content
    job = Prediction.objects.get(pk=answer.json()["id"])
    assert job.status == "running" and job.task_id and job.result is None
    assert job.submitted_by  # polled as its submitter: the service shows a task to no one else
    escape = zip_bytes({"../../escape.dcm": b"x"})
    hostile = Prediction.objects.get(pk=neuronova.post(reverse("neuronova_client:mri"), {
        "image": SimpleUploadedFile("study.zip", escape), "patient_id": "P000108"}).json()["id"])
    lost = Prediction.objects.create(request_id="dj-lost", model_id="mri_segmentation", patient_id="P000109",
                                     task_id="task_never_existed", status=Prediction.Status.RUNNING)

    out = io.StringIO()
    unreachable = {"URL": f"http://127.0.0.1:{free_port()}", "JWT_SECRET": JWT_SECRET, "BACKOFF_SECONDS": 0.01}
    with override_settings(NEURONOVA=unreachable):
        call_command("neuronova_poll", stdout=out)
    assert out.getvalue().strip() == "completed 0, failed 0, running 3"
    call_command("neuronova_poll", wait=120, stdout=out)
    assert out.getvalue().strip().endswith("running 0"), out.getvalue()
    job.refresh_from_db(), hostile.refresh_from_db(), lost.refresh_from_db()
    assert job.status == "pending" and job.progress == 100 and job.model_version.startswith("neuronova-mri:"), job.error
    assert job.result["request_id"] == job.request_id and job.result["result"]["tumor_detected"] is True
    assert hostile.status == "failed" and hostile.error["code"] == "INVALID_REQUEST"
    assert lost.status == "failed" and lost.error["code"] == "NOT_FOUND"


def test_bentomls_sync_submit_still_orphans_tasks(server_url, tmp_path) -> None:
    """Canary for the docs/bentoml-pitfalls.md G3 workaround in `NeuroNovaClient.submit_mri`: when BentoML's own
    `SyncHTTPClient.<task>.submit()` stops raising, this fails, and the workaround can go."""
    archive = tmp_path / "study.zip"
    archive.write_bytes(zip_bytes({"../../escape.dcm": b"x"}))  # fails at once on the server: no compute spent
    client = NeuroNovaClient(ClientSettings(url=server_url, jwt_secret=JWT_SECRET))
    with bentoml.SyncHTTPClient(server_url, token=client.token("canary")) as bento:
        assert bento.endpoints["predict_mri_segmentation"].route == MRI_ROUTE
        with pytest.raises(AttributeError, match="_opened_files"):
            bento.predict_mri_segmentation.submit(image=[archive], patient_id="P000110")
