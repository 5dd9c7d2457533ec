"""MRI jobs: submitted from a request (returns at once), collected later by `manage.py neuronova_poll`."""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import IO

from neuronova_client.client import NeuroNovaClient
from neuronova_client.errors import ServiceError, ServiceUnreachable
from neuronova_client.models import Prediction

log = logging.getLogger("neuronova_client")
POLLER_SUBJECT = "neuronova-django-poller"


def submit_mri(client: NeuroNovaClient, images: Sequence[IO[bytes]], patient_id: str, *, subject: str,
               xai: bool = False) -> Prediction:
    """Start a segmentation and store it as running, under a request id chosen here."""
    request_id = f"dj-{uuid.uuid4().hex}"
    task_id = client.submit_mri(images, patient_id, subject=subject, request_id=request_id, xai=xai)
    return Prediction.objects.create(request_id=request_id, model_id="mri_segmentation", patient_id=patient_id,
                                     task_id=task_id, submitted_by=subject, status=Prediction.Status.RUNNING)


def poll_running(client: NeuroNovaClient) -> Counter[str]:
    """One pass over the running jobs, each polled as the subject that submitted it (the service shows a task to
    its submitter only); returns how many ended in each status. An unknown task id (expired, or lost with the
    service's data) fails its job; an unreachable service ends the pass (the next one tries again)."""
    outcome: Counter[str] = Counter()
    for prediction in Prediction.objects.filter(status=Prediction.Status.RUNNING).exclude(task_id=""):
        try:
            polled = client.task_status(prediction.task_id, subject=prediction.submitted_by or POLLER_SUBJECT)
        except ServiceError as error:
            if error.code != "NOT_FOUND":
                log.warning("polling task %s failed: %s", prediction.task_id, error)
                continue
            prediction.fail(error.to_body()["error"])
        except ServiceUnreachable as error:
            log.warning("NeuroNova unreachable, polling stops for now: %s", error)
            break
        else:
            prediction.apply_task_status(polled)
        outcome[prediction.status] += 1
    return outcome
