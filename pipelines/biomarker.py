"""The biomarker pipeline on the API side: encode with the served model's card, run the tree heads in the runner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.runner_slots import ModelSlot, RunnerModel
from core.cards.tabular import HeadOutput, TabularCard
from core.generation import output_generation
from monitoring import metrics
from preprocessing.tabular import EncodedRecord, encode_request


@dataclass(frozen=True)
class Predicted:
    """One record's prediction: the model that computed it, the encoded record, each head's output."""

    model: RunnerModel[TabularCard]
    record: EncodedRecord
    heads: dict[str, HeadOutput]

    def monitor(self, model_id: str) -> None:
        """Report each head's answer and the features not given to the per-version metrics (monitoring/)."""
        card, tag = self.model.card, self.model.tag
        metrics.observe_model(model_id, tag, metrics.reference_accuracy(card.metrics, card.heads[0].name))
        for name, head in self.heads.items():
            metrics.observe_prediction(model_id, tag, name, head.classes[head.top])
        metrics.observe_missing(model_id, tag, self.record.missing, card.feature_names())


async def predict_record(slot: ModelSlot[TabularCard], biomarkers: dict[str, Any], *, explain: bool) -> Predicted:
    """Validate and encode `biomarkers` with the served model's card and run it (`explain`: with exact TreeSHAP); after
    a model switch in between, encoded and run again with the new card (`ModelSlot.on_served_model`)."""
    async def run(model: RunnerModel[TabularCard]) -> tuple[EncodedRecord, np.ndarray]:
        record = encode_request(biomarkers, model.card)
        return record, (await slot.call("explain" if explain else "predict", record.row[None]))[0]

    model, (record, output) = await slot.on_served_model(run, lambda out: output_generation(out[1]))
    predicted = Predicted(model, record, model.card.read_heads(output))
    predicted.monitor(slot.model_id)
    return predicted
