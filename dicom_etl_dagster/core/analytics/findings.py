"""What an instance says for OMOP analytics, as plain picklable records.

Parse workers extract these from each file (``extract.instance_findings``) and send them back
with the instance; the writer turns them into ``measurement`` and ``image_feature`` rows once
concepts are resolved. Nothing here knows about the database.

- ``AcquisitionValue``: a top-level attribute of the acquisition profile (per series: the
  workers send them for the first file of each series in a chunk, the planner gives a new
  series those of its first file in the batch).
- ``NumericFinding``: a NUM content item of a structured report (TID 1500, TID 10011, ...).
- ``SegmentFinding``: one segment of a SEG instance.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple


class Code(NamedTuple):
    """A coded concept as DICOM writes it (a Code Sequence item)."""

    scheme: str  # Coding Scheme Designator: SCT, LN, UCUM, DCM, ...
    value: str  # Code Value (or Long Code Value / URN Code Value)
    meaning: str | None = None

    def source_value(self) -> str:
        """``SCHEME:code``, the measurement_source_value of a concept OMOP does not know."""
        return f"{self.scheme}:{self.value}"


class AcquisitionValue(NamedTuple):
    """One top-level attribute of the acquisition profile, as the file holds it."""

    tag: str  # 8 hex digits, upper case: the DICOM attribute concept's concept_code
    keyword: str
    vr: str
    text: str  # the value as in the file (DICOM JSON's value, one value)
    number: float | None  # numeric VRs; None for coded (CS) values


class NumericFinding(NamedTuple):
    """A NUM content item of a structured report."""

    concept: Code  # Concept Name Code Sequence of the item
    number: float | None  # Measured Value Sequence's Numeric Value; None when absent
    text: str | None  # the Numeric Value as in the file (or the qualifier's meaning)
    unit: Code | None  # Measurement Units Code Sequence (normally UCUM)
    group: int  # items of one container (measurement group, irradiation event) share it
    finding: Code | None  # the group's Finding (121071)
    finding_site: Code | None  # Finding Site (363698007) of the item or its group
    referenced_series: tuple[str, ...]  # series the item is about, nearest first
    referenced_sops: tuple[str, ...]  # SOP instances the item is about (IMAGE references)


class SegmentFinding(NamedTuple):
    """One segment of a segmentation instance."""

    number: int  # Segment Number
    label: str | None
    property_type: Code | None  # Segmented Property Type Code Sequence
    anatomic_region: Code | None  # Anatomic Region Sequence
    alg_system: str | None  # algorithm name and version, manufacturer and software versions
    alg_datetime: dt.datetime | None  # Content Date / Content Time
    referenced_series: tuple[str, ...]  # the source images' series


class InstanceFindings(NamedTuple):
    """Everything of one instance that becomes measurement / image_feature rows."""

    acquisition: tuple[AcquisitionValue, ...] = ()
    numeric: tuple[NumericFinding, ...] = ()
    segments: tuple[SegmentFinding, ...] = ()
    procedure_codes: tuple[Code, ...] = ()  # Procedure Code Sequence, then Requested ...
