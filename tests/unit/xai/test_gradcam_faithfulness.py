"""Grad-CAM faithfulness on the demo CT model: the heatmap's peak falls inside the true lesion for tumour images."""

import numpy as np

from core import store
from runners.ct import load_classifier
from training_export.train_ct import heldout_set, prepare_ct_batch
from xai.render import to_source_geometry

FAITHFULNESS_FLOOR = 0.80


def test_gradcam_peak_inside_lesion(ct_model, record_property):
    classifier = load_classifier(store.get_model(ct_model if ":" in ct_model else "neuronova-ct:latest"))
    images, masks, labels = heldout_set(seed=0, n_per_class=25)
    tumour = np.array([classifier.card.contract_labels()[label] != "No Tumor" for label in labels])
    batch = prepare_ct_batch(images[tumour], classifier.card.input)
    heatmaps = np.concatenate([classifier.explain(batch[i:i + 16]) for i in range(0, len(batch), 16)])
    hits = []
    for heatmap, mask in zip(heatmaps, masks[tumour]):
        in_source = to_source_geometry(heatmap, mask.shape)
        row, col = np.unravel_index(np.argmax(in_source), mask.shape)
        hits.append(bool(mask[row, col]))
    rate = float(np.mean(hits))
    record_property("gradcam_peak_in_lesion_rate", rate)
    print(f"Grad-CAM ({classifier.explainer.layer_name}) peak inside lesion: {rate:.3f} of {len(hits)} tumour images")
    assert rate >= FAITHFULNESS_FLOOR
