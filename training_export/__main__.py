"""Command line of training_export: `python -m training_export <command> ...`.

Commands live in COMMANDS. A demo trainer with a `train_and_save(seed)` function needs one line:

    trainer_command("train-mri", "training_export.train_mri", "train the MRI demo segmenter into the model store")

any other command a decorated function:

    @command("name", "help text", configure=lambda parser: parser.add_argument(...))
    def _name(args: argparse.Namespace) -> int: ...

Exit codes: 0 success, 1 a NeuroNova error, 2 a refused import or bad arguments (message on stderr).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ConfigDict

from core.cards.base import CardBase
from core.errors import ModelCardError, NeuroNovaError

Handler = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], object]

EXIT_OK, EXIT_ERROR, EXIT_REFUSED = 0, 1, 2


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, how it adds its arguments, and what it runs."""

    help: str
    run: Handler
    configure: Configure | None = None


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, configure: Configure | None = None) -> Callable[[Handler], Handler]:
    """Register the decorated function as subcommand `name`."""

    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(help=help, run=handler, configure=configure)
        return handler

    return register


def trainer_command(name: str, module: str, help: str) -> None:
    """Register `name [--seed N]` running `<module>.train_and_save(seed=N)` (imported only when run)."""

    def train(args: argparse.Namespace) -> int:
        print(importlib.import_module(module).train_and_save(seed=args.seed))
        return EXIT_OK

    command(name, help, lambda parser: parser.add_argument("--seed", type=int, default=0, help="random seed"))(train)


def _configure_ensure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help="demo model names (default: all)")
    parser.add_argument("--retrain", action="store_true", help="train each named model anew from code")


@command("ensure-demo", "import the shipped demo models the store lacks (or train them: --retrain)",
         _configure_ensure_demo)
def _ensure_demo(args: argparse.Namespace) -> int:
    from training_export.demo import ensure_demo_models

    print(json.dumps(ensure_demo_models(args.names or None, retrain=args.retrain), indent=2))
    return EXIT_OK


def _configure_export_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help="demo model names (default: all)")


@command("export-demo", "rewrite demo_models/<name>.bentomodel from the store's latest version",
         _configure_export_demo)
def _export_demo(args: argparse.Namespace) -> int:
    from training_export.demo import export_demo_models

    print(json.dumps(export_demo_models(args.names or None), indent=2))
    return EXIT_OK


trainer_command("train-ct", "training_export.train_ct", "train the CT demo classifier into the model store")
trainer_command(
    "train-biomarker", "training_export.train_biomarker", "train the biomarker demo model (synthetic cohort)"
)
trainer_command("train-glioma", "training_export.train_glioma", "train the glioma grade model on the real TCGA cohort")


def _configure_import(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="the classifier's ONNX file")
    parser.add_argument("--card", type=Path, required=True, help="its model card (.yaml, .yml or .json)")
    parser.add_argument("--name", default="neuronova-ct", help="model store name (default: neuronova-ct)")
    parser.add_argument("--validation-dir", type=Path, help="labelled images, one sub-folder per class")


@command(
    "import-classifier", "check a hospital's ONNX slice classifier against its card and store it", _configure_import
)
def _import_classifier(args: argparse.Namespace) -> int:
    from training_export.import_classifier import import_classifier

    print(import_classifier(args.model, args.card, name=args.name, validation_dir=args.validation_dir))
    return EXIT_OK


def _configure_import_segmenter(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="the segmenter's ONNX file")
    parser.add_argument("--card", type=Path, required=True, help="its segmentation card (.yaml, .yml or .json)")
    parser.add_argument("--name", default="neuronova-mri", help="model store name (default: neuronova-mri)")
    parser.add_argument("--validation-dir", type=Path,
                        help="in-distribution studies (each a 4D NIfTI or a folder of its files): calibrates the "
                             "out-of-distribution warning")


@command("import-segmenter", "check a hospital's ONNX MRI segmenter against its card and store it",
         _configure_import_segmenter)
def _import_segmenter(args: argparse.Namespace) -> int:
    from training_export.import_segmenter import import_segmenter

    print(import_segmenter(args.model, args.card, name=args.name, validation_dir=args.validation_dir))
    return EXIT_OK


def _configure_finetune(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="neuronova-ct:latest", help="parent store tag (default: neuronova-ct:latest)")
    parser.add_argument("--min-records", type=int, default=8, help="fewest reviewed inputs to train on (default: 8)")


@command("finetune-ct", "fine-tune the CT classifier on reviewed feedback; store it only if not worse",
         _configure_finetune)
def _finetune_ct(args: argparse.Namespace) -> int:
    from state.feedback import FeedbackStore
    from core.settings import get_settings
    from training_export.finetune_ct import FineTuneConfig, finetune_from_feedback

    feedback = FeedbackStore.from_settings(get_settings())
    report = finetune_from_feedback(feedback.labelled_inputs("ct_classification"), args.model,
                                    config=FineTuneConfig(min_records=args.min_records))
    print(report.model_dump_json(indent=2))
    return EXIT_OK if report.registered else EXIT_REFUSED


class _AnyCard(CardBase):
    """The fields every task's card shares; the task-specific ones are ignored."""

    model_config = ConfigDict(extra="ignore")


def _configure_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help="model names (default: the demo models' names)")


@command("list", "list stored versions with creation time and the card's metrics", _configure_list)
def _list(args: argparse.Namespace) -> int:
    from core import store
    from training_export.demo import DEMO_TRAINERS

    for name in args.names or list(DEMO_TRAINERS):
        for model in store.list_versions(name):
            metrics = store.read_card(model, _AnyCard).metrics
            shown = " ".join(f"{key}={value:.4g}" for key, value in metrics.items())
            print(f"{model.tag}\t{model.creation_time.isoformat(timespec='seconds')}\t{shown}")
    return EXIT_OK


def _configure_synthetic_study(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="where to write the study (.nii or .nii.gz)")
    parser.add_argument("--seed", type=int, default=0, help="which synthetic case (deterministic)")


@command("synthetic-study", "write a synthetic 4-sequence brain-MR study (T1, T1ce, T2, FLAIR as one 4D NIfTI) "
         "to try the MRI route with", _configure_synthetic_study)
def _synthetic_study(args: argparse.Namespace) -> int:
    import nibabel as nib
    import numpy as np

    from training_export.synthetic_mri import synthetic_case

    volume = synthetic_case(args.seed).volume
    nib.save(nib.Nifti1Image(np.moveaxis(volume.data, 0, -1).astype(np.int16), volume.affine), args.out)
    print(f"{args.out}: sequences {', '.join(volume.sequences)} (4th dimension, in that order)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per registered command."""
    parser = argparse.ArgumentParser(prog="python -m training_export", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, spec in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=spec.help, description=spec.help)
        if spec.configure is not None:
            spec.configure(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command].run(args)
    except ModelCardError as exc:
        print(f"refused: {exc.message}", file=sys.stderr)
        return EXIT_REFUSED
    except NeuroNovaError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
