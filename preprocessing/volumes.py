"""The one path from uploaded MRI files to a model tensor, shared by serving and training.

`decode_upload`: NIfTI files (3D or 4D), DICOM files and zips of DICOM series or whole studies -> a DecodedVolume
with every sequence on one voxel grid (the finest sequence's), each sequence matched by the caller's
`sequence_type`, the card's rules (descriptions and acquisition tags) or a 4D file's volume order.
`prepare_volume`: reorient to the card's orientation and resample to its spacing (MONAI Orientation, Spacing),
normalise per channel, zero-fill missing sequences, channels in the card's order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import NormalizeIntensity, Orientation, Spacing

from core.cards.segmentation import SequenceRule, VolumeInputSpec
from core.errors import ImageTooLarge, InvalidImageFormat, InvalidRequest
from core.settings import LimitSettings
from core.volumes import DecodedVolume, RawSeries, SeriesSource, resample_to_grid
from preprocessing.archive import is_zip, read_zip_members
from preprocessing.dicom import could_be_dicom, has_dicom_prefix
from preprocessing.dicom_series import decode_dicom_series, is_dicom
from preprocessing.nifti import decode_nifti, is_nifti
from preprocessing.sequences import check_required_sequences

Upload = tuple[str | None, bytes]
_GRID_ATOL = 1e-3
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class PreparedVolume:
    """The model input: (C, X, Y, Z) float32 in the card's channel order, on the model grid given by `affine`."""

    tensor: np.ndarray
    affine: np.ndarray
    missing_sequences: tuple[str, ...]


def decode_upload(
    uploads: Sequence[Upload], spec: VolumeInputSpec, limits: LimitSettings, sequence_types: list[str] | None = None
) -> DecodedVolume:
    """Decode every uploaded file, match the volumes to sequences and put them on one grid."""
    if not uploads:
        raise InvalidRequest("no image was uploaded", {"field": "image"})
    raws, from_4d = _decode_all(uploads, spec, limits)
    assigned = _assign(raws, spec, sequence_types, from_4d)
    check_required_sequences([sequence for sequence, *_ in assigned], spec)
    return _on_one_grid(assigned, spec)


def could_be_volume_file(head: bytes) -> bool:
    """Whether a file starting with `head` can be NIfTI or DICOM (checked before an archive member is decompressed)."""
    return is_nifti(head) or could_be_dicom(head)


def _decode_all(uploads: Sequence[Upload], spec: VolumeInputSpec, limits: LimitSettings) -> tuple[list[RawSeries], bool]:
    """RawSeries in upload order (DICOM series where their first slice appears); whether one 4D file gave them all."""
    ordered: list[tuple[int, RawSeries]] = []
    dicom_parts: list[tuple[int, Upload]] = []
    budget = limits.max_volume_voxels
    nifti_files = 0
    for index, (name, data) in enumerate(uploads):
        parts = read_zip_members(data, max_files=limits.archive_max_files,
                                 max_total_bytes=limits.archive_max_uncompressed_bytes,
                                 max_ratio=limits.archive_max_compression_ratio,
                                 accepts=could_be_volume_file) if is_zip(data) else [(name, data)]
        for part_name, part in parts:
            if is_nifti(part) and not has_dicom_prefix(part):
                series = decode_nifti(part, part_name, max_voxels=budget)
                budget -= sum(s.voxels for s in series)
                ordered += [(index, s) for s in series]
                nifti_files += 1
            elif is_dicom(part):
                dicom_parts.append((index, (part_name, part)))
            else:
                raise InvalidImageFormat("A file is neither NIfTI (.nii, .nii.gz) nor DICOM (its content was checked).",
                                         {"size_bytes": len(part), "position": index})
    if dicom_parts:
        found = decode_dicom_series([part for _, part in dicom_parts], max_voxels=budget, modalities=spec.modalities)
        ordered += [(dicom_parts[first_file][0], series) for first_file, series in found]
    ordered.sort(key=lambda pair: pair[0])
    raws = [raw for _, raw in ordered]
    return raws, nifti_files == 1 and not dicom_parts and len(raws) > 1


def _assign(
    raws: list[RawSeries], spec: VolumeInputSpec, sequence_types: list[str] | None, from_4d: bool
) -> list[tuple[str, RawSeries, str]]:
    """(sequence, series, how it was matched) for each sequence found, in the card's channel order."""
    if sequence_types is not None:
        if len(sequence_types) != len(raws):
            raise InvalidRequest(
                f"sequence_type names {len(sequence_types)} sequence(s) but the upload holds {len(raws)} volume(s) or "
                "series; name one sequence per volume, in upload order", {"sequence_type": sequence_types,
                                                                          "volumes": len(raws)})
        if len(set(sequence_types)) != len(sequence_types):
            raise InvalidRequest("sequence_type names a sequence twice", {"sequence_type": sequence_types})
        pairs = [(sequence, raw, "sequence_type") for sequence, raw in zip(sequence_types, raws)]
    elif from_4d and len(raws) == len(spec.sequences):
        pairs = [(sequence, raw, "volume_order") for sequence, raw in zip(spec.sequences, raws)]
    elif len(spec.sequences) == 1 and len(raws) == 1:
        pairs = [(spec.sequences[0], raws[0], "only_sequence")]
    else:
        pairs = _match_by_rules(raws, spec)
    return sorted(pairs, key=lambda pair: spec.sequences.index(pair[0]))


def _match_by_rules(raws: list[RawSeries], spec: VolumeInputSpec) -> list[tuple[str, RawSeries, str]]:
    """Each series matched by description first, acquisition tags second; of two for one sequence the finer wins."""
    chosen: dict[str, tuple[RawSeries, str]] = {}
    for raw in raws:
        match = _rule_match(raw, spec.sequence_rules)
        if match is None:
            continue
        sequence, how = match
        if sequence not in chosen or raw.voxels > chosen[sequence][0].voxels:
            chosen[sequence] = (raw, how)
    if not chosen:
        raise InvalidRequest(
            f"could not tell which sequence the {len(raws)} uploaded volume(s) are (no series description, file name or "
            f"acquisition tags matched); send sequence_type, e.g. \"{','.join(spec.sequences[:len(raws)])}\"",
            {"volumes": len(raws), "sequences": spec.sequences},
        )
    return [(sequence, raw, how) for sequence, (raw, how) in chosen.items()]


def _rule_match(raw: RawSeries, rules: list[SequenceRule]) -> tuple[str, str] | None:
    texts = [text for text in (raw.description, raw.file_name) if text]
    for rule in rules:
        if any(re.search(rule.description_pattern, text, flags=re.IGNORECASE) for text in texts):
            return rule.sequence, "description"
    for rule in rules:
        if rule.tag_ranges and _tags_fit(rule, raw.acquisition):
            return rule.sequence, "acquisition_tags"
    return None


def _tags_fit(rule: SequenceRule, acquisition: dict[str, float]) -> bool:
    in_ranges = all(tag in acquisition and low <= acquisition[tag] <= high for tag, (low, high) in rule.tag_ranges.items())
    contrast = bool(acquisition.get("contrast"))
    return in_ranges and (rule.contrast == "any" or contrast == (rule.contrast == "with"))


def _on_one_grid(assigned: list[tuple[str, RawSeries, str]], spec: VolumeInputSpec) -> DecodedVolume:
    """Stack the sequences on the finest sequence's grid (ties: the card's order), resampling the others."""
    reference_sequence, reference, _ = max(assigned, key=lambda item: (item[1].voxels, -spec.sequences.index(item[0])))
    channels = []
    for _, raw, _ in assigned:
        same_grid = raw.data.shape == reference.data.shape and np.allclose(raw.affine, reference.affine, atol=_GRID_ATOL)
        channels.append(raw.data if same_grid else
                        resample_to_grid(raw.data[None], raw.affine, reference.affine, reference.data.shape, "bilinear")[0])
    sources = tuple(
        SeriesSource(sequence=sequence, format=raw.format, file_name=raw.file_name, series_uid=raw.series_uid,
                     description=raw.description, matched_by=how, slices=int(raw.data.shape[2]),  # type: ignore[arg-type]
                     transfer_syntax=raw.transfer_syntax, headers=raw.headers)
        for sequence, raw, how in assigned
    )
    return DecodedVolume(data=np.stack(channels).astype(np.float32, copy=False), affine=reference.affine,
                         sequences=tuple(sequence for sequence, *_ in assigned), sources=sources,
                         reference_sequence=reference_sequence)


def prepare_volume(volume: DecodedVolume, spec: VolumeInputSpec, max_voxels: int) -> PreparedVolume:
    """Reorient, resample to the card's spacing, normalise; missing sequences become zero channels."""
    check_model_grid_size(volume.affine, volume.shape, spec, max_voxels)
    image = _to_model_grid(volume.data, volume.affine, spec, "bilinear")
    normalised = NormalizeIntensity(nonzero=True, channel_wise=True)(image)
    present = dict(zip(volume.sequences, normalised.as_tensor().numpy()))
    shape = normalised.shape[1:]
    tensor = np.stack([present.get(s, np.zeros(shape, dtype=np.float32)) for s in spec.sequences]).astype(np.float32)
    missing = tuple(s for s in spec.sequences if s not in present)
    return PreparedVolume(tensor=tensor, affine=normalised.affine.numpy().astype(np.float64), missing_sequences=missing)


def prepare_labels(labels: np.ndarray, affine: np.ndarray, spec: VolumeInputSpec) -> np.ndarray:
    """A label map (X, Y, Z) on the same model grid `prepare_volume` gives its volume (nearest neighbour)."""
    return _to_model_grid(labels[None].astype(np.float32), affine, spec, "nearest").as_tensor().numpy()[0].astype(np.uint8)


def _to_model_grid(data: np.ndarray, affine: np.ndarray, spec: VolumeInputSpec, mode: str) -> MetaTensor:
    image = MetaTensor(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), affine=torch.as_tensor(affine))
    oriented = Orientation(axcodes=spec.orientation, labels=RAS_LABELS)(image)
    return Spacing(pixdim=spec.target_spacing_mm, mode=mode, padding_mode="zeros")(oriented)


def check_model_grid_size(affine: np.ndarray, shape: Sequence[int], spec: VolumeInputSpec, max_voxels: int) -> None:
    """Refuse, before resampling, a volume whose extent would need more model-grid voxels than allowed."""
    extent_mm = np.abs(np.asarray(shape, dtype=np.float64) * np.linalg.norm(affine[:3, :3], axis=0))
    voxels = float(np.prod(extent_mm / min(spec.target_spacing_mm) + 1))
    if voxels > max_voxels:
        raise ImageTooLarge(
            f"The volume covers {np.round(extent_mm, 1).tolist()} mm, which would be {int(voxels)} voxels at the model's "
            f"spacing; at most {max_voxels} are accepted.", {"extent_mm": extent_mm.round(1).tolist()},
        )
