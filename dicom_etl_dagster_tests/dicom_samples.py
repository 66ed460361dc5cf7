"""Reference values computed with plain pydicom, the sample files, and ways to read them for tests."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_etl_dagster.core.dicom import reader as dicom_reader
from dicom_etl_dagster.core.dicom.fast_path import NeedsPydicom, read_fast
from dicom_etl_dagster.core.dicom.reader import (
    _INSTANCE_TAGS,
    DicomReadError,
    ElementRow,
    read_instance,
)

PYDICOM_DATA = Path(pydicom.__file__).parent / "data"
PYDICOM_TEST_FILES = PYDICOM_DATA / "test_files"
#: Every file pydicom ships, broken ones included: test_files and charset_files (text in
#: 20 character sets, ISO 2022 included).
SAMPLE_FILES = sorted(
    p
    for folder in (PYDICOM_TEST_FILES, PYDICOM_DATA / "charset_files")
    for p in folder.rglob("*")
    if p.is_file()
)


def read_rows(path: str | os.PathLike, fast_path: bool = True) -> list[ElementRow]:
    """Every row read_instance makes of the file, also when it then refuses the instance
    (no UIDs or no date: most charset_files) for a reason that is not about the elements."""
    with mock.patch.object(dicom_reader, "_instance_from", lambda rows, values, texts: rows):
        return read_instance(path, fast_path=fast_path)


def takes_fast_path(path: Path) -> bool:
    """Whether the byte-level reader reads the file itself (else it hands it to pydicom)."""
    with open(path, "rb") as fp:
        try:
            read_fast(fp, path.stat().st_size, _INSTANCE_TAGS)
        except NeedsPydicom:
            return False
    return True


def sample_files_read_by(read: Callable[[Path], object]) -> list[Path]:
    """The sample files that ``read`` reads without a DicomReadError."""
    files = []
    for path in SAMPLE_FILES:
        try:
            read(path)
        except DicomReadError:
            continue
        files.append(path)
    return files


def accepted_sample_files() -> list[Path]:
    """The sample files that read_instance accepts (the others fail with a reason)."""
    return sample_files_read_by(read_instance)


#: PixelData, FloatPixelData, DoubleFloatPixelData: the only elements the ETL leaves out.
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def quiet_dcmread(path: str | os.PathLike) -> pydicom.FileDataset:
    """pydicom's full read (force=True), without its warnings about broken files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=True)


def count_elements(dataset) -> int:
    """Every element at every level (a sequence is one row, plus its items' elements), no pixel data."""
    total = 0
    for tag in dataset.keys():
        if tag in PIXEL_TAGS:
            continue
        total += 1
        try:
            elem = dataset[tag]
        except Exception:  # a value pydicom cannot convert: one row all the same (kept verbatim)
            continue
        if elem.VR == "SQ":
            total += sum(count_elements(item) for item in elem.value)
    return total


def expected_metadata_rows(path: str | os.PathLike) -> int:
    """The number of dicom_file_metadata rows a file must produce: file meta + dataset."""
    ds = quiet_dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return count_elements(ds.file_meta or Dataset()) + count_elements(ds)


def clone_instance(
    source: str | os.PathLike, target: Path, *, new_uids: bool = True, **attributes
) -> Dataset:
    """``source`` saved to ``target`` with new Study/Series/SOP UIDs (unless ``new_uids`` is
    False) and ``attributes`` set (``None`` deletes one). Returns the dataset written."""
    ds = quiet_dcmread(source)
    if new_uids:
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
    with warnings.catch_warnings():  # invalid values are often written on purpose
        warnings.simplefilter("ignore")
        for keyword, value in attributes.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        if (
            ds.file_meta is not None
            and "MediaStorageSOPInstanceUID" in ds.file_meta
            and "SOPInstanceUID" in ds
        ):
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=False)
    return ds
