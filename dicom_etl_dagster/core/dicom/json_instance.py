"""A DICOM JSON dataset (PS3.18 F.2, what WADO-RS ``/metadata`` sends) -> a DicomInstance.

Why through pydicom and the file walk: the rows of an instance read over DICOMweb must be
the rows its file gives, and the walk (``reader.read_dataset``) is what makes those rows.
``Dataset.from_json`` rebuilds the dataset pydicom would have read from the file, so VRs,
private creators, sequences and values go through the very same code. What differs is what
DICOM JSON itself lacks: the file meta group (0002) and the bytes a server sends only as a
``BulkDataURI`` link, which are stored as that URI (``elements.BulkDataReference``);
``InlineBinary`` values arrive as the bytes they encode and are stored as a file's are.
The file's own text of DS / IS numbers is gone too (JSON holds numbers), so measurements
fall back to the number's shortest text (``elements.json_number_text``).
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from dicom_etl_dagster.core.dicom.elements import BulkDataReference
from dicom_etl_dagster.core.dicom.reader import DicomInstance, DicomReadError, read_dataset


def _bulk_data(tag: str, vr: str, uri: str) -> BulkDataReference:
    """pydicom's BulkDataURI handler: never fetch the bytes (pixel data above all), keep the link."""
    return BulkDataReference(uri)


def instance_from_json(dataset: dict[str, Any]) -> DicomInstance:
    """The instance and its rows; DicomReadError with a one-line reason if it cannot be ingested."""
    if not isinstance(dataset, dict):
        raise DicomReadError(
            f"not a DICOM JSON dataset: a JSON {type(dataset).__name__}, not an object"
        )
    try:
        ds = Dataset.from_json(dataset, bulk_data_uri_handler=_bulk_data)
    except Exception as exc:  # malformed JSON model: the reason, not the values (PHI)
        raise DicomReadError(f"cannot read DICOM JSON: {type(exc).__name__}") from None
    return read_dataset(ds)
