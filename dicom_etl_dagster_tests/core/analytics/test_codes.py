"""codes: code items in every spelling DICOM allows, odd dates and times, guarded reads."""

from __future__ import annotations

import datetime as dt

import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_etl_dagster.core.analytics.codes import (
    code_of,
    date_time,
    first_code,
    first_item,
    items_at,
    parse_date,
    parse_time,
    text_at,
    text_of,
    value_at,
)
from dicom_etl_dagster.core.analytics.findings import Code


def _item(**kw) -> Dataset:
    item = Dataset()
    for keyword, value in kw.items():
        setattr(item, keyword, value)
    return item


def test_code_of_reads_code_value_long_code_value_and_urn_code_value():
    assert code_of(
        _item(CodingSchemeDesignator="SCT", CodeValue="10200004", CodeMeaning="Liver ")
    ) == Code("SCT", "10200004", "Liver")
    long_value = "1" * 20  # longer than SH allows: DICOM puts it in Long Code Value
    assert code_of(_item(CodingSchemeDesignator="SCT", LongCodeValue=long_value)) == Code(
        "SCT", long_value, None
    )
    urn = "urn:oid:1.2.3"
    assert code_of(_item(CodingSchemeDesignator="URN", URNCodeValue=urn)) == Code("URN", urn)


@pytest.mark.parametrize(
    "item",
    [None, Dataset(), _item(CodeValue="1"), _item(CodingSchemeDesignator="DCM", CodeValue="")],
)
def test_code_of_is_none_without_a_scheme_or_a_value(item):
    assert code_of(item) is None


def test_first_code_reads_the_first_item_only():
    ds = _item(
        ConceptNameCodeSequence=[
            _item(CodingSchemeDesignator="DCM", CodeValue="121071"),
            _item(CodingSchemeDesignator="DCM", CodeValue="999"),
        ]
    )
    assert first_code(ds, "ConceptNameCodeSequence") == Code("DCM", "121071")
    assert first_code(ds, "ConceptCodeSequence") is None
    assert first_code(_item(ConceptCodeSequence=[]), "ConceptCodeSequence") is None


def test_source_value():
    assert Code("SCT", "10200004", "Liver").source_value() == "SCT:10200004"


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("", None),
        ("  ", None),
        (" x\x00", "x"),
        (MultiValue(str, ["a", "b"]), "a"),
        (["", "b"], None),
        ([], None),
        (3, "3"),
    ],
)
def test_text_of(value, expected):
    assert text_of(value) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        ("20240229", dt.date(2024, 2, 29)),
        (" 20240315 ", dt.date(2024, 3, 15)),
        ("20231399", None),
        ("20230229", None),
        ("2023-01-01", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_date(value, expected):
    assert parse_date(value) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        ("101112.25", dt.time(10, 11, 12, 250000)),
        ("101112.123456", dt.time(10, 11, 12, 123456)),
        ("101112", dt.time(10, 11, 12)),
        ("1011", dt.time(10, 11)),
        ("10", dt.time(10)),
        ("235960", dt.time(23, 59, 59)),  # a leap second
        ("246000", None),
        ("ab", None),
        (None, None),
    ],
)
def test_parse_time(value, expected):
    assert parse_time(value) == expected


def test_date_time():
    assert date_time("20240315", "101112.5") == dt.datetime(2024, 3, 15, 10, 11, 12, 500000)
    assert date_time("20240315", None) == dt.datetime(2024, 3, 15)
    assert date_time("20240315", "99") == dt.datetime(2024, 3, 15)
    assert date_time("20231399", "101112") is None
    assert date_time(None, "101112") is None


def test_guarded_reads():
    ds = _item(SeriesDescription=" x ", ReferencedSeriesSequence=[_item(SeriesNumber=1)])
    assert value_at(ds, "SeriesDescription") == " x "
    assert text_at(ds, "SeriesDescription") == "x"
    assert value_at("not a dataset", "SeriesDescription") is None
    assert text_at(None, "SeriesDescription") is None
    assert [i.SeriesNumber for i in items_at(ds, "ReferencedSeriesSequence")] == [1]
    assert first_item(ds, "ReferencedSeriesSequence") is not None
    assert items_at(ds, "SeriesDescription") == []  # text is no sequence
    assert items_at(ds, "ContentSequence") == []
    assert first_item(None, "ContentSequence") is None
