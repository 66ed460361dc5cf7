"""Odd values: values that violate their VR, kept as data and counted, never a reason to fail.

Real archives are full of them (an IS ``1A``, a DS ``2,5``, a date ``20231399``, a UID with
letters, an over-long LO): Orthanc and DCMTK keep such files, and so does the ETL. A value
that pydicom cannot convert at all (an IS / DS that is not a number, a binary value whose
length does not fit its VR) is stored verbatim by both readers (``verbatim_value``): the text
as JSON strings, other VRs as their bytes in base64 (``InlineBinary``). Values pydicom keeps
as text anyway (dates, UIDs, long strings) are stored as they are.

Which elements are odd is decided here, once, from the rows both readers produce
(``odd_value_tags``), so the two read paths cannot disagree about it. Only tags are
reported, never values: they may be patient data.
"""

from __future__ import annotations

import base64
import datetime
import json
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

from dicom_etl_dagster.core.dicom.elements import ElementRow, number_text, public_info

#: VRs whose values are text; a value of another VR pydicom cannot convert is kept as bytes.
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})
#: DS and IS are JSON numbers: a JSON string there is a value kept verbatim.
_NUMBER_TEXT_VRS = frozenset({"DS", "IS"})
#: Binary VRs DICOM JSON holds as a Value array: InlineBinary there is a value kept as bytes.
_BINARY_VALUE_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT"})
#: Maximum length in characters (PS3.5 Table 6.2-1) of the text VRs checked for length.
_MAX_CHARS = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "UI": 64}
# The forms PS3.5 allows; the retired ACR-NEMA forms (2023.06.15, 10:20:30) are odd too.
_UID = re.compile(r"[0-9.]{1,64}").fullmatch
_UIDS_JSON = re.compile(r'\["[0-9.]{1,64}"(?:, "[0-9.]{1,64}")*\]').fullmatch
_AGE = re.compile(r"[0-9]{3}[DWMY]").fullmatch
_DATE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})").fullmatch
_TIME = re.compile(
    r"([01][0-9]|2[0-3])(?:[0-5][0-9](?:(?:[0-5][0-9]|60)(?:\.[0-9]{1,6})?)?)?"
).fullmatch
_DATETIME = re.compile(
    r"([0-9]{4})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})"
    r"(?:\.[0-9]{1,6})?)?)?)?)?)?([+-][0-9]{4})?"
).fullmatch
_CHECKED_VRS = _NUMBER_TEXT_VRS | _BINARY_VALUE_VRS | _MAX_CHARS.keys() | {"AS", "DA", "TM", "DT"}
#: How many distinct tags of a file the ledger names (the count is the whole count).
LEDGER_TAGS = 5


def verbatim_value(vr: str, raw: bytes) -> tuple[str, str | None, Any]:
    """(VM, JSON Value, Python value) of a value pydicom cannot convert, kept as the file has it.

    Text VRs: the values split at backslashes, each without its padding (whitespace and NULs
    at either end), as JSON strings (``["1A"]``). Other VRs: the bytes in base64, as DICOM
    JSON's InlineBinary. The fast path and the pydicom path both store exactly this.
    """
    if vr in _TEXT_VRS:
        items = [number_text(item) for item in raw.decode("latin_1").split("\\")]
        value: Any = items[0] if len(items) == 1 else items
        return str(len(items)), json.dumps(items, ensure_ascii=False), value
    return "1", json.dumps(base64.b64encode(raw).decode("ascii")), raw


def _valid_date(text: str) -> bool:
    match = _DATE(text)
    if match is None:
        return False
    try:
        datetime.date(*map(int, match.groups()))
    except ValueError:
        return False
    return True


def _valid_datetime(text: str) -> bool:
    match = _DATETIME(text)
    if match is None:
        return False
    year, month, day, hour, minute, second, _offset = match.groups()
    return (
        (month is None or 1 <= int(month) <= 12)
        and (day is None or _valid_date(year + month + day))
        and (hour is None or int(hour) < 24)
        and (minute is None or int(minute) < 60)
        and (second is None or int(second) <= 60)
    )


def _odd_text(vr: str, text: str) -> bool:
    """Does one (non-empty) text value violate its VR?"""
    if len(text) > _MAX_CHARS.get(vr, len(text)):
        return True
    if vr == "UI":
        return _UID(text) is None
    if vr == "DA":
        return not _valid_date(text)
    if vr == "TM":
        return _TIME(text) is None
    if vr == "DT":
        return not _valid_datetime(text)
    if vr == "AS":
        return _AGE(text) is None
    return False


def is_odd(vr: str, value_json: str) -> bool:
    """Does a row's value (its DICOM JSON Value) violate its VR?"""
    if vr in _NUMBER_TEXT_VRS:
        return '"' in value_json  # numbers only, unless kept verbatim
    if vr in _BINARY_VALUE_VRS:
        return not value_json.startswith("[")
    if vr == "UI":
        if _UIDS_JSON(value_json):
            return False  # the common case, without a JSON decode
    elif vr in _MAX_CHARS and len(value_json) <= _MAX_CHARS[vr] + 4:
        return False  # '["' + value + '"]' is no longer than the limit allows: the common case
    try:
        values = json.loads(value_json)
    except ValueError:
        return True
    if not isinstance(values, list):
        return True  # kept as bytes (InlineBinary) where text belongs
    return any(isinstance(v, str) and v and _odd_text(vr, v) for v in values)


#: ``is_odd`` of short values already checked, by VR, for the life of the process: most values
#: of a file recur in the next file of its series (the fast path even hands out the same
#: string objects, whose hashes are then computed once).
_VERDICTS: dict[str, dict[str, bool]] = {vr: {} for vr in _CHECKED_VRS}
_REMEMBERED_VALUE_CHARS = 256
_VERDICTS_PER_VR_LIMIT = 4096


def odd_value_tags(rows: Iterable[ElementRow]) -> tuple[str, ...]:
    """The tag of every element whose value violates its VR, in row order (one per element)."""
    odd = []
    for row in rows:
        value_json = row.value_json
        verdicts = _VERDICTS.get(row.vr)
        if value_json is None or verdicts is None:
            continue  # no value, or a VR without rules
        verdict: bool | None
        if len(value_json) > _REMEMBERED_VALUE_CHARS:
            verdict = is_odd(row.vr, value_json)  # rarely recurs: not worth hashing or keeping
        else:
            verdict = verdicts.get(value_json)
            if verdict is None:
                verdict = is_odd(row.vr, value_json)
                if len(verdicts) >= _VERDICTS_PER_VR_LIMIT:
                    verdicts.clear()
                verdicts[value_json] = verdict
        if verdict:
            odd.append(row.tag)
    return tuple(odd)


def ledger_tags(tags: Iterable[str]) -> str | None:
    """The first ``LEDGER_TAGS`` distinct tags, comma-separated: the ledger's summary."""
    distinct = list(dict.fromkeys(tags))[:LEDGER_TAGS]
    return ",".join(distinct) or None


def tags_by_files(files_per_tag: Counter, limit: int) -> list[tuple[str, str, int]]:
    """(tag, keyword or "private" / "unknown", files) of the tags most files have odd values in."""
    return [
        (tag, "private" if int(tag[4], 16) & 1 else public_info(_tag_int(tag))[1] or "unknown", n)
        for tag, n in sorted(files_per_tag.items(), key=lambda item: (-item[1], item[0]))[:limit]
    ]


def _tag_int(tag: str) -> int:
    return int(tag[1:5] + tag[6:10], 16)
