"""Grad-CAM faithfulness on the demo CT model: the heatmap points at the true lesion of held-out tumour images.

Measured on the demo model (layer4, trained with lesion supervision of its class activation maps; see
docs/performance.md): the peak falls strictly inside the lesion for 0.89 of the 75 held-out tumour images (chance:
the lesion's ~3 % area share), the heat inside the lesion is ~57× its area share, and 5 maps are flat (no positive
evidence at layer4; they count as misses). A broken, batch-mixed or wrong-class Grad-CAM scores near chance.
"""

import numpy as np

from core import store
from runners.ct import load_classifier
from training_export.train_ct import heldout_set, prepare_ct_batch
from xai.render import to_source_geometry

PEAK_IN_LESION_FLOOR = 0.80
HEAT_ENRICHMENT_FLOOR = 10.0
FLAT_SHARE_CEILING = 0.10


def test_gradcam_points_at_the_lesion(ct_model, record_property):
    classifier = load_classifier(store.get_model("neuronova-ct:latest"))
    images, masks, labels = heldout_set(seed=0, n_per_class=25)
    tumour = np.array([classifier.card.contract_labels()[label] != "No Tumor" for label in labels])
    batch = prepare_ct_batch(images[tumour], classifier.card.input)
    heatmaps = np.concatenate([classifier.explain(batch[i:i + 16]) for i in range(0, len(batch), 16)])
    peaks_inside, enrichment, flat = [], [], 0
    for heatmap, mask in zip(heatmaps, masks[tumour]):
        in_source = to_source_geometry(heatmap, mask.shape)
        peaks_inside.append(bool(in_source.max() > 0 and mask[np.unravel_index(np.argmax(in_source), mask.shape)]))
        if in_source.sum() > 0:
            enrichment.append((in_source[mask].sum() / in_source.sum()) / mask.mean())
        else:
            flat += 1
    rate, heat, flat_share = float(np.mean(peaks_inside)), float(np.median(enrichment)), flat / len(peaks_inside)
    record_property("gradcam_peak_in_lesion_rate", rate)
    record_property("gradcam_heat_enrichment", heat)
    print(f"Grad-CAM ({classifier.explainer.layer_name}) on {len(peaks_inside)} tumour images: peak inside lesion "
          f"{rate:.3f}, median heat-in-lesion / area share {heat:.1f}x, flat maps {flat}")
    assert rate >= PEAK_IN_LESION_FLOOR
    assert heat >= HEAT_ENRICHMENT_FLOOR
    assert flat_share <= FLAT_SHARE_CEILING
