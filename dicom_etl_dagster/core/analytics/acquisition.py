"""The acquisition profile: which top-level attributes of a series become measurements.

Default profile (the issue's and the MI-CDM recipe's rule, without its flaws): every public,
top-level attribute with a numeric VR and exactly one value, and every single-valued CS
attribute (the writer keeps a CS value only when the vocabulary has a value concept for it).
Never dates, times or UIDs (their VRs are not in the profile), never private elements (they
have no DICOM attribute concept), never the file meta group or group lengths, and never the
counters that order instances rather than describe an acquisition (InstanceNumber, ...).

The values come from the metadata rows the reader produced (the DICOM JSON model), so the
profile costs one pass over the top-level rows of an instance and a JSON decode of the few
that qualify.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping

from dicom_etl_dagster.core.analytics.findings import AcquisitionValue
from dicom_etl_dagster.core.dicom.elements import ElementRow, json_number_text

NUMERIC_VRS = frozenset({"DS", "IS", "FL", "FD", "SS", "US", "SL", "UL", "SV", "UV"})
CODED_VRS = frozenset({"CS"})
#: Numbers that order or count instances of a series: not properties of the acquisition.
NOT_MEASUREMENTS = frozenset(
    {
        "InstanceNumber",
        "SeriesNumber",
        "AcquisitionNumber",
        "ImagesInAcquisition",
        "TemporalPositionIdentifier",
        "NumberOfTemporalPositions",
        "StackID",
        "InStackPositionNumber",
    }
)
#: value_source_value is varchar(50).
SOURCE_VALUE_LENGTH = 50


PROFILE_VRS = NUMERIC_VRS | CODED_VRS


def _single_text(value_json: str) -> str | None:
    """The one string of a JSON array of one string; None for anything else."""
    if value_json.startswith('["') and value_json.endswith('"]') and "\\" not in value_json:
        text = value_json[2:-2]  # the common case, without a JSON decode
        return None if '"' in text else text
    try:
        decoded = json.loads(value_json)
    except ValueError:
        return None
    if isinstance(decoded, list) and len(decoded) == 1 and isinstance(decoded[0], str):
        return decoded[0]
    return None


def _candidate(
    tag_text: str, keyword: str | None, vr: str, value_json: str, text: str | None
) -> AcquisitionValue | None:
    tag = tag_text[1:5] + tag_text[6:10]
    name = keyword or tag
    if vr in CODED_VRS:
        text = (_single_text(value_json) or "").strip()
        return AcquisitionValue(tag, name, vr, text[:SOURCE_VALUE_LENGTH], None) if text else None
    if not value_json.startswith("["):
        return None  # an odd value kept as bytes (InlineBinary): no number, no measurement
    try:
        number = float(value_json[1:-1])  # "[120.0]": one JSON number
    except ValueError:  # several values, or an odd value kept as text ("1A"): skipped
        return None
    if not math.isfinite(number):
        return None
    text = text or json_number_text(number)  # the file's text when the reader kept it
    return AcquisitionValue(tag, name, vr, text[:SOURCE_VALUE_LENGTH], number)


def acquisition_values(
    rows: Iterable[ElementRow], number_texts: Mapping[int, str] | None = None
) -> tuple[AcquisitionValue, ...]:
    """The instance's attributes of the default profile, in tag order; ``number_texts``
    (row index -> text, ``DicomInstance.number_texts``) gives numbers their file text."""
    texts = number_texts or {}
    found = []
    # Unpacked rather than read by attribute: this loop runs over every row of every file.
    for index, parent, _, tag, group, _, keyword, _, vr, vm, value_json, _, _, private, _ in rows:
        if (
            parent is None
            and vr in PROFILE_VRS
            and vm == "1"
            and value_json is not None
            and not private
            and group != "0002"
            and keyword not in NOT_MEASUREMENTS
            and not tag.endswith("0000)")
        ):
            value = _candidate(tag, keyword, vr, value_json, texts.get(index))
            if value is not None:
                found.append(value)
    return tuple(found)


def in_profile(value: AcquisitionValue, attributes: frozenset[str] | None) -> bool:
    """Whether a configured profile (keywords or 8-hex tags; None: the default) keeps it."""
    return attributes is None or value.keyword in attributes or value.tag in attributes
