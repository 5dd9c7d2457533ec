"""A doctor's review: the verdict goes to the service's `POST /feedback` (the human-in-the-loop record that fine-tuning
sets are built from), and the result counts as reviewed only once the service has recorded it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django import forms
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction

from neuronova_client.client import NeuroNovaClient
from neuronova_client.models import Prediction, Review


class ReviewForm(forms.Form):
    """`verdict` (accept / correct / reject), `corrected_label` (one of the result's classes, for `correct` only),
    optional `comment`."""

    verdict = forms.ChoiceField(choices=Prediction.Verdict.choices)
    corrected_label = forms.ChoiceField(required=False)
    comment = forms.CharField(required=False, max_length=2000)

    def __init__(self, *args: Any, labels: Sequence[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["corrected_label"].choices = [("", "-"), *((label, label) for label in labels)]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        correcting, label = data.get("verdict") == Prediction.Verdict.CORRECT, data.get("corrected_label")
        if correcting and not label:
            self.add_error("corrected_label", "a 'correct' verdict needs the corrected label")
        if label and not correcting:
            self.add_error("corrected_label", "only a 'correct' verdict takes a corrected label")
        return data

    def review(self) -> Review:
        """The validated verdict (call after `is_valid()`)."""
        data = self.cleaned_data
        return Review(data["verdict"], data["corrected_label"] or None, data["comment"])


def reviewer_id(user: AbstractBaseUser | AnonymousUser, prefix: str) -> str:
    """The anonymised id the service stores with a verdict: the prefix and the user's primary key, never a name."""
    return f"{prefix}{user.pk}"


def submit_review(client: NeuroNovaClient, prediction: Prediction, review: Review, *, reviewer: str,
                  subject: str) -> Prediction:
    """Send the verdict and store the service's receipt. The row is locked meanwhile, so two doctors cannot both send
    one; a service error (NOT_FOUND once the request left the service's cache, say) raises and leaves the prediction
    awaiting review. ValueError when it is not awaiting review."""
    with transaction.atomic():
        locked = Prediction.objects.select_for_update().get(pk=prediction.pk)
        locked.ensure_reviewable()
        receipt = client.submit_feedback(locked.request_id, review.verdict, reviewer_id=reviewer, subject=subject,
                                         corrected_label=review.corrected_label, comment=review.comment)
        locked.mark_reviewed(review, reviewer, receipt)
    return locked
