"""A hospital's own ONNX segmenter imports from a card; a card that disagrees with the graph is refused, unstored."""

import pytest
import torch

from core import store
from core.cards import DEMO_INTENDED_USE, Provenance
from core.cards.segmentation import SegmentationCard, SlidingWindowSpec
from core.errors import ModelCardError
from training_export.import_segmenter import import_segmenter
from training_export.onnx_export import export_onnx

NAME = "test-foreign-segmenter"
ROI = (16, 16, 16)


class TinySegmenter(torch.nn.Module):
    def __init__(self, sequences: int, labels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(sequences, labels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def card(**changes) -> SegmentationCard:
    base = SegmentationCard(name="their segmenter", intended_use=DEMO_INTENDED_USE, inference=SlidingWindowSpec(roi_size=ROI),
                            provenance=Provenance(source="another hospital", synthetic_data=False))
    return base.model_copy(update=changes)


@pytest.fixture()
def onnx_file(tmp_path):
    labels = len(card().labels)
    path = export_onnx(TinySegmenter(4, labels).eval(), torch.zeros((1, 4, *ROI)), tmp_path / "seg.onnx")
    yield path
    for model in store.list_versions(NAME):
        store.delete_model(str(model.tag))


def test_good_card_imports_and_reads_back(onnx_file, tmp_path):
    card_path = tmp_path / "card.json"
    card_path.write_text(card().model_dump_json())
    tag = import_segmenter(onnx_file, card_path, name=NAME)
    assert store.read_card(store.get_model(tag), SegmentationCard).name == "their segmenter"


def test_lying_cards_are_refused_and_nothing_is_stored(onnx_file):
    three_sequences = card().input.model_copy(update={"sequences": ["T1", "T2", "FLAIR"]})
    with pytest.raises(ModelCardError, match="input sequences"):
        import_segmenter(onnx_file, card(input=three_sequences), name=NAME)
    with pytest.raises(ModelCardError, match="torch"):
        import_segmenter(onnx_file, card(torch=card().torch or {"kwargs": {}}), name=NAME)
    assert store.list_versions(NAME) == []


def test_cli_imports_and_refuses(onnx_file, tmp_path, capsys):
    from training_export.__main__ import main

    good = tmp_path / "card.yaml"
    good.write_text(card().model_dump_json())  # JSON is valid YAML
    assert main(["import-segmenter", "--model", str(onnx_file), "--card", str(good), "--name", NAME]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{NAME}:")
    bad = tmp_path / "bad.json"
    bad.write_text(card(inference=SlidingWindowSpec(roi_size=(32, 32, 32))).model_dump_json())
    assert main(["import-segmenter", "--model", str(onnx_file), "--card", str(bad), "--name", NAME]) == 2
