"""The runner's model: probabilities per head, and exact TreeSHAP whose values add up to XGBoost's own margin."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import xgboost as xgb
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.models import ModelStore

from core import store
from core.generation import output_generation
from core.errors import ModelNotLoaded
from preprocessing.tabular import encode_records, stack_rows
from runners import biomarker as runner_module
from runners.biomarker import BiomarkerModel, load_tabular
from training_export.train_biomarker import TreeParams, fit_heads, save_tabular_model
from training_export.train_glioma import read_cohort

ADDITIVITY = 1e-6
"""base + sum(SHAP) agrees with XGBoost's float32 margin within 1e-6 absolute plus 1e-6 relative."""


def head_slices(card):
    start = 0
    for head in card.heads:
        yield head, slice(start, start + len(head.classes))
        start += len(head.classes)


@pytest.mark.parametrize("model", ["biomarker", "glioma"])
def test_shap_values_add_up_to_the_margin_on_many_rows(trained, heldout_rows, heldout_explained, model):
    loaded = getattr(trained, model)
    rows = heldout_rows if model == "biomarker" else _glioma_rows(trained)
    explained = heldout_explained if model == "biomarker" else loaded.explain(rows)
    data = xgb.DMatrix(rows)
    for (head, columns), booster in zip(head_slices(loaded.card), loaded.boosters):
        margin = booster.predict(data, output_margin=True).astype(np.float64)
        part = explained[:, columns]
        np.testing.assert_allclose(part[..., :-1].sum(axis=2), margin, rtol=ADDITIVITY, atol=ADDITIVITY)
        np.testing.assert_allclose(part[..., -1], booster.predict(data), atol=1e-6)
    assert len(rows) >= 800


def test_explain_matches_predict_and_batches_match_single_rows(trained, heldout_rows):
    model = trained.biomarker
    rows = heldout_rows[:32]
    probabilities = model.predict(rows)
    explained = model.explain(rows)
    assert probabilities.shape == (32, 15) and explained.shape == (32, 15, len(model.card.features) + 2)
    np.testing.assert_allclose(explained[..., -1], probabilities, atol=1e-6)
    np.testing.assert_allclose(model.explain(rows[5:6])[0], explained[5], atol=1e-6)
    for _, columns in head_slices(model.card):
        np.testing.assert_allclose(probabilities[:, columns].sum(axis=1), 1.0, atol=1e-5)


def test_an_all_missing_row_is_served(trained):
    blank = np.full((1, len(trained.biomarker_card.features)), np.nan, np.float32)
    heads = trained.biomarker_card.read_heads(trained.biomarker.explain(blank)[0])
    assert set(heads) == {"tumor_type", "metastasis_organ", "stage"}
    for head in heads.values():
        assert np.isfinite(head.shap_values).all() and abs(head.probabilities.sum() - 1.0) < 1e-6


def test_a_booster_that_disagrees_with_its_card_is_refused(trained, heldout_rows, tmp_path):
    card = trained.biomarker_card.model_copy(deep=True)
    boosters = fit_heads(heldout_rows[:200, :-1], {h.name: ["None"] * 100 + ["T1"] * 100 for h in card.heads},
                         [h.model_copy(update={"classes": ["T1", "None"]}) for h in card.heads], TreeParams(rounds=2))
    with BentoMLContainer.model_store.patch(ModelStore(tmp_path)):
        tag = save_tabular_model("mismatch", card, boosters)
        with pytest.raises(ValueError, match="does not match the card"):
            load_tabular(store.get_model(tag))


def test_service_reports_a_model_that_failed_to_load(monkeypatch):
    def fail(model):
        raise ValueError("broken file")

    monkeypatch.setattr(runner_module, "load_tabular", fail)
    monkeypatch.setattr(BiomarkerModel.inner, "model_ref", "a stored model")
    service = BiomarkerModel()
    described = asyncio.run(service.describe())
    assert described["loaded"] is False and "broken file" in described["error"]
    with pytest.raises(ModelNotLoaded):
        asyncio.run(service.predict(np.zeros((1, 16), np.float32)))


def test_service_serves_and_times_the_loaded_model(monkeypatch, trained, heldout_rows):
    monkeypatch.setattr(runner_module, "load_tabular", lambda model: trained.biomarker)
    monkeypatch.setattr(BiomarkerModel.inner, "model_ref", "a stored model")
    service = BiomarkerModel()
    assert asyncio.run(service.describe())["avg_inference_time_ms_per_image"] is None
    predicted, explained = asyncio.run(service.predict(heldout_rows[:4])), asyncio.run(service.explain(heldout_rows[:4]))
    assert predicted.shape == (4, 15 + 1) and explained.shape == (4, 15 + 1, 18)  # the heads' classes, the generation
    generation = service.served.generation
    assert [output_generation(row) for row in (*predicted, *explained)] == [generation] * 8
    np.testing.assert_array_equal(predicted[:, :15], trained.biomarker.predict(heldout_rows[:4]))
    described = asyncio.run(service.describe())
    assert described["loaded"] and described["tag"] == trained.biomarker_tag and described["engine"].startswith("xgboost")
    assert described["card"]["task"] == "biomarker_prediction" and described["avg_inference_time_ms_per_image"] > 0


def test_a_lone_row_runs_on_the_event_loop_and_a_batch_in_the_model_thread(monkeypatch, trained, heldout_rows):
    monkeypatch.setattr(runner_module, "load_tabular", lambda model: trained.biomarker)
    monkeypatch.setattr(BiomarkerModel.inner, "model_ref", "a stored model")
    service = BiomarkerModel()
    threads = []
    timed = service._timed
    monkeypatch.setattr(service, "_timed", lambda rows, method: threads.append(threading.current_thread()) or
                        timed(rows, method))

    async def serve(rows, method):
        return threading.current_thread(), await getattr(service, method)(rows)

    loop_thread, lone = asyncio.run(serve(heldout_rows[:1], "explain"))
    _, batch = asyncio.run(serve(heldout_rows[:3], "predict"))
    assert threads[0] is loop_thread and threads[1].name.startswith("biomarker-model")
    np.testing.assert_allclose(lone[0, :15, -1], trained.biomarker.predict(heldout_rows[:1])[0], atol=1e-6)
    np.testing.assert_array_equal(batch[:, :15], trained.biomarker.predict(heldout_rows[:3]))


def _glioma_rows(trained):
    return stack_rows(encode_records(read_cohort()[0], trained.glioma_card))
