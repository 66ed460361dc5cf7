"""DICOM files whose only private elements are the ones a test names: blocks of private
creators sharing tags, so that per-creator dictionary entries can be counted exactly."""

from __future__ import annotations

import warnings
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_etl_dagster_tests.dicom_samples import PYDICOM_TEST_FILES, quiet_dcmread

#: GE's acquisition creator: pydicom's private dictionary names its (0019,xx60) "Starting view".
GE = "GEMS_ACQU_01"
GE_STARTING_VIEW = ("SL", "1", "Starting view")
#: A creator pydicom's private dictionary does not know.
OTHER = "SONOSITE"
GROUP = 0x0019

#: (block number, private creator, {element byte: (VR, value)})
Block = tuple[int, str, dict[int, tuple[str, object]]]


def write_private_file(target: Path, *blocks: Block, group: int = GROUP) -> Dataset:
    """CT_small with new UIDs, without its own private elements, with ``blocks`` in ``group``."""
    ds = quiet_dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    ds.remove_private_tags()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for block, creator, elements in blocks:
        ds.add_new((group, block), "LO", creator)
        for byte, (vr, value) in elements.items():
            ds.add_new((group, block << 8 | byte), vr, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(target, enforce_file_format=False)
    return ds


def expected_entry_tag(tag: str) -> str:
    """The per-creator entry tag of a private element's tag, as the issue defines it: the
    creator element (gggg,00bb) -> (gggg,00xx), (gggg,bbee) -> (gggg,xxee)."""
    if tag[6:8] == "00":
        return f"{tag[:6]}00xx)"
    return f"{tag[:6]}xx{tag[8:10]})"
