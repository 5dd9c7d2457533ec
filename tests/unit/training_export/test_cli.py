"""`python -m training_export`: commands, output and exit codes, called in-process through main(argv)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from core import store
from core.errors import ModelNotLoaded
from training_export import __main__ as cli
from training_export import demo, train_ct


@pytest.fixture()
def card_file(foreign_card, tmp_path):
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(foreign_card), encoding="utf-8")
    return path


def test_import_then_list(foreign_logits_onnx, card_file, scratch_model_name, stored_versions, capsys) -> None:
    argv = [
        "import-classifier",
        "--model",
        str(foreign_logits_onnx),
        "--card",
        str(card_file),
        "--name",
        scratch_model_name,
    ]
    assert cli.main(argv) == cli.EXIT_OK
    tag = capsys.readouterr().out.strip()
    assert stored_versions() == [tag]

    assert cli.main(["list", scratch_model_name]) == cli.EXIT_OK
    line = capsys.readouterr().out.strip()
    stored_tag, created, metrics = line.split("\t")
    assert stored_tag == tag and created.startswith("20") and metrics == "accuracy=0.91"


def test_a_refused_import_exits_2_with_the_reason_on_stderr(
    foreign_logits_onnx, foreign_card, scratch_model_name, stored_versions, tmp_path, capsys
) -> None:
    lying = tmp_path / "card.json"
    lying.write_text(json.dumps({**foreign_card, "input": {**foreign_card["input"], "height": 64}}), encoding="utf-8")
    argv = [
        "import-classifier",
        "--model",
        str(foreign_logits_onnx),
        "--card",
        str(lying),
        "--name",
        scratch_model_name,
    ]
    assert cli.main(argv) == cli.EXIT_REFUSED
    captured = capsys.readouterr()
    assert captured.out == "" and "refused: card says 64×32 input, graph expects 32×32" in captured.err
    assert stored_versions() == []


def test_train_ct_passes_the_seed_and_prints_the_tag(monkeypatch, capsys) -> None:
    monkeypatch.setattr(train_ct, "train_and_save", lambda seed: f"neuronova-ct:seed{seed}")
    assert cli.main(["train-ct", "--seed", "7"]) == cli.EXIT_OK
    assert capsys.readouterr().out.strip() == "neuronova-ct:seed7"


def test_other_errors_exit_1(monkeypatch, capsys) -> None:
    def fail(seed: int) -> str:
        raise ModelNotLoaded("store unavailable")

    monkeypatch.setattr(train_ct, "train_and_save", fail)
    assert cli.main(["train-ct"]) == cli.EXIT_ERROR
    assert "error: store unavailable" in capsys.readouterr().err


def test_ensure_demo_prints_each_model_status(monkeypatch, capsys) -> None:
    calls = []
    monkeypatch.setattr(demo, "ensure_demo_models",
                        lambda names, retrain: calls.append((names, retrain)) or {"neuronova-ct": "present"})
    assert cli.main(["ensure-demo", "neuronova-ct"]) == cli.EXIT_OK
    assert cli.main(["ensure-demo", "--retrain"]) == cli.EXIT_OK
    assert calls == [(["neuronova-ct"], False), (None, True)]
    assert json.loads(capsys.readouterr().out.split("}")[0] + "}") == {"neuronova-ct": "present"}


def test_list_defaults_to_the_demo_model_names(monkeypatch, capsys) -> None:
    asked = []
    monkeypatch.setattr(store, "list_versions", lambda name: asked.append(name) or [])
    assert cli.main(["--log-level", "WARNING", "list"]) == cli.EXIT_OK
    assert asked == list(demo.DEMO_TRAINERS) and capsys.readouterr().out == ""


def test_a_new_command_is_a_few_lines(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    cli.trainer_command("train-ct-again", "training_export.train_ct", "the same trainer under another name")
    monkeypatch.setattr(train_ct, "train_and_save", lambda seed: f"tag{seed}")
    assert cli.main(["train-ct-again", "--seed", "3"]) == cli.EXIT_OK
    assert capsys.readouterr().out.strip() == "tag3"


def test_bad_arguments_exit_2() -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["import-classifier", "--model", "x.onnx"])
    assert exited.value.code == 2


def test_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training_export", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert all(name in result.stdout for name in ("ensure-demo", "train-ct", "import-classifier", "list"))
