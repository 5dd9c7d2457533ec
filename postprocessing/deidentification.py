"""De-identification of the DICOM that leaves through the API (issue #24): the MRI route's SEG, returned in the answer
and kept 24 h with the task's result, carries the request's pseudonymous `patient_id`, not the source's patient module.

The profile is DICOM PS3.15 Annex E's Basic Application Level Confidentiality Profile (Table E.1-1, edition
`TABLE_EDITION`) as tabulated and applied by Kitware's `dicom-anonymizer`, with:

- the Retain UIDs Option, always: the SEG is only useful referencing the series, instances and frame of reference it
  was computed on, which the caller sent and already holds (UIDs replaced consistently would reference nothing it has);
- the Retain Longitudinal Temporal Information with Full Dates Option when `retain_dates` is set
  (`NEURONOVA_DEIDENTIFICATION__RETAIN_DATES`): the table's dates and times are kept, but for the patient's own (birth
  date and time, which the option leaves to the Basic Profile). Off (the default), the dates and times the profile
  removes or zeroes are removed, and the SEG's type-2 StudyDate, StudyTime and PatientBirthDate are empty (where the
  library writes a dummy 00010101, which a reader may take for a real date);
- sequences the profile does not keep are removed (the library's replacement inside them stops at some VRs, and the
  SEG copies none of them).

The library ships the Basic Profile column of the table, not the options' columns, so the options are derived from
it: Retain UIDs keeps every U and X/Z/U* attribute, dates are told by their VR. Both err on the strict side: the
Referenced Study and Performed Procedure Step Sequences, which Retain UIDs would keep, are removed.

The profile is applied to each source header the SEG is built from (highdicom copies the Patient and Study modules of
the first), then PatientID is the pseudonym and the SEG says what was done (PatientIdentityRemoved, De-identification
Method and its codes, CID 7050). Results written into the PACS (`dicom_results.mr_results`) keep the study's identity:
they file into that study.

Why `dicom-anonymizer` (2.1.0, BSD-3-Clause, a 35 kB wheel needing only pydicom and tqdm, both already installed; it
leaves pydicom 3.0.2 as it is): it ships Table E.1-1 of the standard per edition, so no tag list is written here. The
two libraries considered first fit worse: `dicognito` 0.19.0 (43 kB, pydicom only) is not the Basic Profile (it keeps
PatientAge, PatientWeight, EthnicGroup, AdditionalPatientHistory, StudyDescription, ProtocolName, DeviceSerialNumber and
private tags, writes realistic fake names and addresses, and replaces every UID); pydicom's `deid` 0.4.13 (66 kB,
matplotlib, numpy, python-dateutil) is a recipe engine whose only shipped recipe is a site's own (it removes every UID
and adds an IssuerOfPatientID of that site), so the profile would be a recipe written here, tag by tag.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from dicomanonymizer.simpledicomanonymizer import anonymize_dataset, initialize_actions, keep
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from core.settings import DeidentificationSettings
from postprocessing.dicom_results import study_reference

TABLE_EDITION = "dicomfields_2026c"
"""The edition of PS3.15 Table E.1-1 that `dicom-anonymizer` applies (it ships 2023, 2024b and 2026c)."""
_UID_CATEGORIES = ("U_TAGS", "X_Z_U_STAR_TAGS")
"""The table's UID actions: U, and X/Z/U* (Referenced and Source Image Sequences); K under the Retain UIDs Option."""
_TEMPORAL_VRS = ("DA", "DT", "TM")
_PATIENT_GROUP = 0x0010
"""The patient's own dates (birth date and time): the full-dates option does not keep them."""
_METHOD = "DICOM PS3.15 E.1-1 Basic Profile (dicom-anonymizer)"

Action = Callable[[Dataset, Any], None]
"""A library action: (dataset, tag) -> None, changing the dataset in place."""


def _remove(dataset: Dataset, tag: Any) -> None:
    """X: remove (the library's own removal writes a dummy date into a DA instead)."""
    if tag in dataset:
        del dataset[tag]


@lru_cache(maxsize=2)
def _rules(retain_dates: bool) -> dict[tuple[int, ...], Action]:
    """Tag -> action: the table's Basic Profile actions with the options above."""
    rules: dict[tuple[int, ...], Action] = initialize_actions(TABLE_EDITION)
    tables = dicom_anonymization_database_selector(TABLE_EDITION)
    for category, tags in tables.items():
        if category == "ALL_TAGS":  # the union of the others
            continue
        for tag in tags:
            vr = _vr(tag)
            if category in _UID_CATEGORIES:
                rules[tag] = keep
            elif vr in _TEMPORAL_VRS and (retain_dates or category != "D_TAGS"):
                rules[tag] = keep if retain_dates and tag[0] != _PATIENT_GROUP else _remove
            elif vr == "SQ":
                rules[tag] = _remove
    return rules


def _applies(rule: tuple[int, ...], present: set[tuple[int, int]]) -> bool:
    """Whether a rule's tag (or, for a repeating group, its masked form as the library matches it) is present. The
    library would try all ~650 rules on every header: 10 ms a slice where the few that apply take 1 ms."""
    if len(rule) == 2:
        return rule in present
    group, element, group_mask, element_mask = rule
    return any(g & group_mask == group & group_mask and e & element_mask == element & element_mask for g, e in present)


def _vr(tag: tuple[int, ...]) -> str | None:
    if len(tag) != 2:  # a repeating group (overlays, curves): its mask form
        return None
    try:
        return dictionary_VR((tag[0] << 16) | tag[1])
    except KeyError:
        return None


@dataclass(frozen=True)
class Deidentification:
    """The profile as configured, and the pseudonym the SEG's PatientID carries ("" when the caller gave none)."""

    patient_id: str = ""
    retain_dates: bool = False

    @classmethod
    def of(cls, settings: DeidentificationSettings, patient_id: str | None) -> Deidentification:
        return cls(patient_id=patient_id or "", retain_dates=settings.retain_dates)

    def reference(self, source: Dataset) -> Dataset:
        """A de-identified copy of one source header (`source` is left as it is): what `dicom_results.mr_segmentation`
        copies from in place of `study_reference`. `study_reference` then fills the type-2 patient and study attributes
        (its hand-written removals are a subset of the profile's)."""
        header = copy.deepcopy(source)
        meta = getattr(header, "file_meta", None) or Dataset()
        present = {(tag.group, tag.element) for dataset in (header, meta) for tag in dataset.keys()}
        rules = {tag: action for tag, action in _rules(self.retain_dates).items() if _applies(tag, present)}
        anonymize_dataset(header, base_rules_gen=lambda: rules, delete_private_tags=True)
        header = study_reference(header)
        header.PatientID = self.patient_id
        header.PatientIdentityRemoved = "YES"
        header.DeidentificationMethod = _METHOD
        header.DeidentificationMethodCodeSequence = Sequence([_code_item(code) for code in self.method_codes()])
        return header

    def method_codes(self) -> list[Code]:
        """CID 7050 codes of what was done: the Basic Profile, Retain UIDs and, with dates kept, the dates option."""
        options = [codes.cid7050.BasicApplicationConfidentialityProfile, codes.cid7050.RetainUidsOption]
        if self.retain_dates:
            options.append(codes.cid7050.RetainLongitudinalTemporalInformationFullDatesOption)
        return options


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return item
