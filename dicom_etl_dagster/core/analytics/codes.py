"""Read coded concepts and date/time pairs out of pydicom datasets, tolerating odd values.

Shared by the structured-report walker, the segmentation reader and the procedure codes:
each returns None for what it cannot read instead of raising, because one malformed code
must not cost a file its other findings.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydicom.dataset import Dataset

from dicom_etl_dagster.core.analytics.findings import Code
from dicom_etl_dagster.core.analytics.row_tree import RowDataset
from dicom_etl_dagster.core.dicom.reader import parse_date, parse_time  # the reader's rules

#: What the readers below accept: a pydicom dataset, or one rebuilt from metadata rows.
DATASETS = (Dataset, RowDataset)


def text_of(value: Any) -> str | None:
    """A value as stripped text (first value of a multi-valued element); None when empty."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
        if value is None:
            return None
    text = str(value).strip(" \x00")
    return text or None


def code_of(item: Dataset | None) -> Code | None:
    """The Code of a code sequence item; None when it has no scheme or no value."""
    if item is None:
        return None
    try:
        scheme = text_of(item.get("CodingSchemeDesignator"))
        value = (
            text_of(item.get("CodeValue"))
            or text_of(item.get("LongCodeValue"))
            or text_of(item.get("URNCodeValue"))
        )
        meaning = text_of(item.get("CodeMeaning"))
    except Exception:  # a value pydicom cannot convert: no code rather than no file
        return None
    if not scheme or not value:
        return None
    return Code(scheme, value, meaning)


def first_code(ds: Dataset, keyword: str) -> Code | None:
    """The code of the first item of the code sequence ``keyword`` of ``ds``."""
    try:
        sequence = ds.get(keyword)
    except Exception:
        return None
    if not sequence:
        return None
    return code_of(sequence[0])


def date_time(date_value: Any, time_value: Any) -> dt.datetime | None:
    """A DA and a TM value as a naive datetime (midnight when the time is absent); None
    when the date is absent or invalid. OMOP datetimes are naive local times, as DICOM's."""
    date = parse_date(date_value)
    if date is None:
        return None
    return dt.datetime.combine(date, parse_time(time_value) or dt.time())


def value_at(ds: Any, keyword: str) -> Any:
    """``ds.<keyword>``; None when ``ds`` is no dataset or pydicom cannot convert the value."""
    if not isinstance(ds, DATASETS):
        return None
    try:
        return ds.get(keyword)
    except Exception:
        return None


def text_at(ds: Any, keyword: str) -> str | None:
    """``text_of(ds.<keyword>)``, None for what cannot be read."""
    try:
        return text_of(value_at(ds, keyword))
    except Exception:
        return None


def items_at(ds: Any, keyword: str) -> list[Any]:
    """The dataset items of the sequence ``keyword``; [] for an absent or unreadable one."""
    value = value_at(ds, keyword)
    if value is None or isinstance(value, (str, bytes)):
        return []
    try:
        return [item for item in value if isinstance(item, DATASETS)]
    except Exception:
        return []


def first_item(ds: Any, keyword: str) -> Any:
    """The first dataset item of the sequence ``keyword``, if any."""
    items = items_at(ds, keyword)
    return items[0] if items else None
