"""JSON views: CT and biomarker answered in the request, MRI submitted (202) and collected by `neuronova_poll`; a
review sends the doctor's verdict to the service (`reviews.py`).

Service errors keep their SPEC body; the status stays for the caller's own mistakes (4xx) and becomes 502 for
the service's failures and for a refused token (a configuration problem of this site, not of the user).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from django.contrib.auth.decorators import permission_required
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.http import require_GET, require_POST

from neuronova_client.client import get_client
from neuronova_client.errors import ServiceError, ServiceUnreachable
from neuronova_client.jobs import submit_mri
from neuronova_client.models import Prediction
from neuronova_client.reviews import ReviewForm, reviewer_id, submit_review

View = Callable[..., JsonResponse]
CALLER_STATUSES = frozenset({400, 404, 409, 413, 429})


def _service_errors(view: View) -> View:
    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
        try:
            return view(request, *args, **kwargs)
        except ServiceError as error:
            return JsonResponse(error.to_body(), status=error.status if error.status in CALLER_STATUSES else 502)
        except ServiceUnreachable as error:
            return _error(503, "SERVICE_UNAVAILABLE", str(error))
    return wrapped


def _error(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> JsonResponse:
    return JsonResponse({"success": False, "error": {"code": code, "message": message, "details": details or {}}},
                        status=status)


def _subject(request: HttpRequest) -> str:
    """The token subject for this user: the service rate-limits and audits per subject (no names: the pk)."""
    return f"django-user-{request.user.pk}"


@require_POST
@permission_required("neuronova_client.add_prediction", raise_exception=True)
@_service_errors
def classify_ct(request: HttpRequest) -> JsonResponse:
    """multipart: `image`, `patient_id`, `xai` ("true"/"false")."""
    image = request.FILES.get("image")
    if image is None:
        return _error(400, "INVALID_REQUEST", "an `image` file is required")
    patient_id = request.POST.get("patient_id", "")
    body = get_client().classify_ct(image, patient_id, subject=_subject(request),
                                    xai=request.POST.get("xai", "").lower() == "true")
    return JsonResponse(Prediction.from_answer(body, patient_id).as_json(), status=201)


@require_POST
@permission_required("neuronova_client.add_prediction", raise_exception=True)
@_service_errors
def predict_biomarkers(request: HttpRequest) -> JsonResponse:
    """JSON: `{patient_id, biomarkers: {...}, xai}`."""
    try:
        payload = json.loads(request.body)
    except ValueError:
        return _error(400, "INVALID_REQUEST", "the body must be JSON")
    if not isinstance(payload, dict) or not isinstance(payload.get("biomarkers"), dict):
        return _error(400, "INVALID_REQUEST", "`biomarkers` (an object) is required")
    patient_id = str(payload.get("patient_id", ""))
    body = get_client().predict_biomarkers(payload["biomarkers"], patient_id, subject=_subject(request),
                                           xai=bool(payload.get("xai", False)))
    return JsonResponse(Prediction.from_answer(body, patient_id).as_json(), status=201)


@require_POST
@permission_required("neuronova_client.add_prediction", raise_exception=True)
@_service_errors
def segment_mri(request: HttpRequest) -> JsonResponse:
    """multipart: one `image` (NIfTI, DICOM, zipped series) or one per sequence, `patient_id`; answers 202."""
    images = request.FILES.getlist("image")
    if not images:
        return _error(400, "INVALID_REQUEST", "at least one `image` file is required")
    prediction = submit_mri(get_client(), images, request.POST.get("patient_id", ""), subject=_subject(request),
                            xai=request.POST.get("xai", "").lower() == "true")
    return JsonResponse(prediction.as_json(), status=202)


@require_GET
@permission_required("neuronova_client.view_prediction", raise_exception=True)
def prediction_detail(request: HttpRequest, pk: int) -> JsonResponse:
    return JsonResponse(get_object_or_404(Prediction, pk=pk).as_json())


@require_POST
@permission_required("neuronova_client.change_prediction", raise_exception=True)
@_service_errors
def review_prediction(request: HttpRequest, pk: int) -> JsonResponse:
    """form: `verdict` (accept / correct / reject), `corrected_label` (for correct), `comment`. The verdict goes to the
    service's `POST /feedback` under the user's anonymised reviewer id; reviewed once the service has recorded it."""
    prediction = get_object_or_404(Prediction, pk=pk)
    form = ReviewForm(request.POST, labels=prediction.labels())
    if not form.is_valid():
        return _error(400, "INVALID_REQUEST", "invalid review", {"fields": form.errors.get_json_data()})
    client = get_client()
    try:
        prediction = submit_review(client, prediction, form.review(), subject=_subject(request),
                                   reviewer=reviewer_id(request.user, client.config.reviewer_id_prefix))
    except ValueError as error:
        return _error(409, "INVALID_REQUEST", str(error))
    return JsonResponse(prediction.as_json())
