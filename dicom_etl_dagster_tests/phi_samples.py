"""Files full of PHI for the ``phi_policy`` tests, and what ``drop`` must leave of a file,
counted with plain pydicom.

The rule counted here is written out from the issue, not imported from ``core/dicom/phi.py``:
an element goes when it is private or one of Table E.1-1's attributes (the product's table,
checked against pydicom's dictionary in ``core/dicom/test_phi.py``), except the top-level
UIDs and dates the OMOP rows come from; everything nested in an element that goes goes too.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_etl_dagster.core.dicom.confidentiality_profile import in_basic_profile
from dicom_etl_dagster_tests.dicom_samples import PIXEL_TAGS, clone_instance, quiet_dcmread

CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"

#: The OMOP rows' keys and the dates and times of the date fallbacks (ARCHITECTURE section 3).
KEPT_FOR_OMOP_KEYWORDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "ContentDate",
    "ContentTime",
    "AcquisitionDateTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
)
KEPT_FOR_OMOP = frozenset(tag_for_keyword(k) for k in KEPT_FOR_OMOP_KEYWORDS)

#: Attributes the PHI file below carries that Table E.1-1 removes or replaces, by keyword
#: (the standard's own list, not the product's table): none may be left in the EAV anywhere.
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientAddress",
    "PatientComments",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "OtherPatientIDsSequence",
    "ReferencedPatientSequence",
    "OperatorsName",
    "FrameAcquisitionDateTime",
    "ImageComments",
)

PRIVATE_CREATOR = "PHI TEST CREATOR"


def goes(tag: int, top_level: bool) -> bool:
    """Does ``drop`` omit this element by itself?"""
    if tag >> 16 & 1:
        return True
    if top_level and tag in KEPT_FOR_OMOP:
        return False
    return in_basic_profile(tag)


def _count(dataset: Dataset, top_level: bool) -> tuple[int, int]:
    """(rows kept, rows dropped) of ``dataset``'s elements and everything nested in them."""
    kept = dropped = 0
    for elem in dataset:
        if elem.tag in PIXEL_TAGS:
            continue
        nested = (0, 0)
        if elem.VR == "SQ":
            nested = _sums(_count(item, False) for item in elem.value)
        if goes(int(elem.tag), top_level):
            dropped += 1 + nested[0] + nested[1]
        else:
            kept += 1 + nested[0]
            dropped += nested[1]
    return kept, dropped


def _sums(pairs) -> tuple[int, int]:
    kept = dropped = 0
    for k, d in pairs:
        kept, dropped = kept + k, dropped + d
    return kept, dropped


def rows_under_drop(path: Path) -> tuple[int, int]:
    """(EAV rows ``drop`` writes for the file, element rows it leaves out), file meta included."""
    ds = quiet_dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _sums((_count(ds.file_meta or Dataset(), True), _count(ds, True)))


def _item(**attributes) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def write_phi_instance(target: Path, patient_id: str = "PHI-PATIENT-7") -> Dataset:
    """CT_small with new UIDs and PHI at every level: names, birth date, address, institution,
    free text, a private block, sequences the profile removes (with PHI in their items) and a
    sequence it keeps whose nested items hold attributes it removes."""
    ds = clone_instance(
        CT_SMALL,
        target,
        PatientName="Doe^Jane",
        PatientID=patient_id,
        PatientBirthDate="19610412",
        PatientAddress="12 Elm Street, Springfield",
        PatientComments="allergic to iodine, lives with her daughter",
        InstitutionName="St. Example Hospital",
        InstitutionAddress="1 Hospital Road",
        ReferringPhysicianName="House^Gregory",
        OperatorsName="Smith^Anna",
        ImageComments="call Mrs Doe at 555-0199",
    )
    ds.OtherPatientIDsSequence = Sequence(
        [
            _item(PatientID="OTHER-1", IssuerOfPatientID="Clinic A", PatientName="Doe^J"),
            _item(PatientID="OTHER-2", IssuerOfPatientID="Clinic B"),
        ]
    )
    ds.ReferencedPatientSequence = Sequence(
        [_item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.1.4", ReferencedSOPInstanceUID="1.2.3")]
    )
    # Kept (not in E.1-1): Per-frame Functional Groups; its Frame Content item's
    # FrameAcquisitionDateTime is in E.1-1 (action D), and so are the nested StudyDate
    # (only the top-level one is kept) and the institution inside the item.
    frame = _item(FrameAcquisitionDateTime="20240101120000", StackID="1", InStackPositionNumber=1)
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [
            _item(
                FrameContentSequence=Sequence([frame]),
                StudyDate="20240101",
                InstitutionName="nested institution",
            )
        ]
    )
    block = ds.private_block(0x0029, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", "private copy of Doe^Jane")
    block.add_new(0x02, "SQ", Sequence([_item(PatientName="Doe^Jane")]))
    ds.save_as(target, enforce_file_format=False)
    return ds
