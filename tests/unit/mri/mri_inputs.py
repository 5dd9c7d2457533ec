"""Builders of MRI uploads for the tests: NIfTI bytes, DICOM series, zips, small cards; real files' paths."""

from __future__ import annotations

import gzip
import io
import os
import struct
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid

from core.cards.base import DEMO_INTENDED_USE, Provenance
from core.cards.segmentation import MRI_SEQUENCES, SegmentationCard, VolumeInputSpec
from core.settings import LimitSettings
from training_export.synthetic_mri import dicom_series, synthetic_case

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
LIMITS = LimitSettings()


TOLERANT_INPUT = VolumeInputSpec(optional_sequences=list(MRI_SEQUENCES), sequence_dropout=0.2)
"""A model trained with sequence dropout: any sequence may be missing (zero-filled)."""


def card(**changes) -> SegmentationCard:
    """A valid card (BraTS labels, enhancing = 4, tolerant of missing sequences) with optional field overrides."""
    fields = {"name": "test segmenter", "intended_use": DEMO_INTENDED_USE, "input": TOLERANT_INPUT,
              "provenance": Provenance(source="tests", synthetic_data=True)}
    return SegmentationCard(**{**fields, **changes})


def nifti_bytes(data: np.ndarray, affine: np.ndarray, *, compressed: bool = False, dtype=np.int16,
                nifti2: bool = False) -> bytes:
    """(X, Y, Z) or (X, Y, Z, T) voxels as a single-file NIfTI."""
    image_class = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    raw = image_class(np.asarray(data).astype(dtype), affine).to_bytes()
    return gzip.compress(raw) if compressed else raw


def four_d_nifti(case, **kwargs) -> bytes:
    """A synthetic case's four sequences as one 4D NIfTI, volumes in the card's order."""
    return nifti_bytes(np.moveaxis(case.volume.data, 0, -1), case.volume.affine, **kwargs)


def case_dicom_files(case, sequences=MRI_SEQUENCES, patient_id: str = "P0001") -> dict[str, list[bytes]]:
    """Each sequence of a synthetic case as its own DICOM series (one study, one frame of reference)."""
    study, frame = generate_uid(), generate_uid()
    return {
        sequence: dicom_series(case.volume.data[MRI_SEQUENCES.index(sequence)], case.volume.affine, sequence,
                               patient_id=patient_id, study_uid=study, frame_of_reference_uid=frame)
        for sequence in sequences
    }


PHI = {
    "PatientName": "Quixote^Alonso^Q", "PatientID": "MRN-99887766", "IssuerOfPatientID": "Issuer-La-Mancha",
    "OtherPatientIDs": "OTHER-445566", "PatientBirthDate": "19610203", "PatientBirthTime": "071500",
    "PatientAge": "063Y", "PatientWeight": "83.17", "PatientSize": "1.913", "EthnicGroup": "Atlantean",
    "PatientAddress": "12 Rue de la Paix", "PatientTelephoneNumbers": "+33-555-0199", "Occupation": "lighthouse-kpr",
    "PatientMotherBirthName": "Mancha^Dulcinea", "MilitaryRank": "Colonel-Q", "PatientComments": "prefers mornings",
    "AdditionalPatientHistory": "seizures since Easter, sister Ms Panza", "Allergies": "peanut-allergy-xyz",
    "MedicalAlerts": "pacemaker-alert-xyz", "AdmittingDiagnosesDescription": "suspected glioma after a fall",
    "StudyDescription": "Quixote brain follow-up", "StudyID": "STUDY-3141", "AccessionNumber": "ACC-778899",
    "StudyDate": "20240315", "StudyTime": "101112", "SeriesDate": "20240316", "AcquisitionDate": "20240317",
    "ContentDate": "20240318", "AcquisitionDateTime": "20240317093000", "InstanceCreationDate": "20240319",
    "ReferringPhysicianName": "House^Gregory", "RequestingPhysician": "Requesting^Rita",
    "NameOfPhysiciansReadingStudy": "Reader^Rex", "PhysiciansOfRecord": "Record^Rob",
    "PerformingPhysicianName": "Performer^Paul", "OperatorsName": "Operator^Olga",
    "InstitutionName": "St Elsewhere Infirmary", "InstitutionAddress": "1 Hospital Road, Springfield",
    "InstitutionalDepartmentName": "Neuroradiology Dept Q", "StationName": "MRI-ROOM-3",
    "DeviceSerialNumber": "SN-4242-XY", "ProtocolName": "Quixote protocol", "ImageComments": "scanned for Dr Who",
    "ClinicalTrialSponsorName": "Rocinante Pharma", "ClinicalTrialProtocolID": "PROTO-WINDMILL-7",
    "ClinicalTrialProtocolName": "Windmill study", "ClinicalTrialSiteID": "SITE-TOBOSO",
    "ClinicalTrialSiteName": "El Toboso clinic", "ClinicalTrialSubjectID": "TRIAL-SUBJ-0101",
}
"""Identifying values a real MR header may carry (patient, study, equipment, staff), each unique enough to be searched
for in a file's bytes."""
PHI_IN_SEQUENCES = {"other patient id": "SEQ-MRN-7788", "requested procedure id": "RP-5566"}
PHI_PRIVATE = ("ACME PHI 1.0", "PRIVATE-SECRET-31337")
"""A private creator and the value of its private element."""


def with_phi(files: list[bytes]) -> list[bytes]:
    """The DICOM files with every PHI value, identifiers in sequences and a private element added to each header."""
    written = []
    for data in files:
        dataset = pydicom.dcmread(io.BytesIO(data))
        for keyword, value in PHI.items():
            setattr(dataset, keyword, value)
        other = Dataset()
        other.PatientID, other.TypeOfPatientID = PHI_IN_SEQUENCES["other patient id"], "TEXT"
        dataset.OtherPatientIDsSequence = [other]
        request = Dataset()
        request.RequestedProcedureID = PHI_IN_SEQUENCES["requested procedure id"]
        dataset.RequestAttributesSequence = [request]
        dataset.private_block(0x0009, PHI_PRIVATE[0], create=True).add_new(0x10, "LO", PHI_PRIVATE[1])
        buffer = DicomBytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        written.append(buffer.getvalue())
    return written


def phi_values() -> list[str]:
    """Every value `with_phi` adds, as searched for in what leaves."""
    return [*PHI.values(), *PHI_IN_SEQUENCES.values(), *PHI_PRIVATE]


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def patch_central_directory(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """Overwrite one field of every zip central directory entry (what zipfile trusts for sizes and flags)."""
    patched, start = bytearray(data), 0
    while (start := patched.find(b"PK\x01\x02", start)) >= 0:
        struct.pack_into(fmt, patched, start + offset, value)
        start += 4
    return bytes(patched)


def small_case(seed: int = 3, *, tumour: bool = True):
    """A small anisotropic synthetic case: 48 x 44 x 30 voxels of 4 x 4 x 5 mm (`tumour=False`: a healthy brain)."""
    return synthetic_case(seed, (48, 44, 30), (4.0, 4.0, 5.0), tumour=tumour)


def temp_dir_entries() -> set[str]:
    """What the system temp folder holds now (to prove nothing was written there; use the `private_temp_dir` fixture
    so that other processes' files do not show up)."""
    import tempfile

    return set(os.listdir(tempfile.gettempdir()))
