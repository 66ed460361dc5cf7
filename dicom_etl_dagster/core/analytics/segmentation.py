"""The segments of a segmentation (SEG) instance, as image_feature material.

A SEG says per segment what it delineates (Segmented Property Type), where (Anatomic Region)
and who made it (the algorithm); per instance when (Content Date/Time) and over which images
(the Common Instance Reference module). Reading the pixel data is not needed for any of it,
so only the header is read, and, as everywhere in analytics, what cannot be read is skipped
rather than raised.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from dicom_etl_dagster.core.analytics.codes import (
    date_time,
    first_code,
    first_item,
    items_at,
    text_at,
    text_of,
    value_at,
)
from dicom_etl_dagster.core.analytics.findings import SegmentFinding


def segment_findings(ds: Dataset) -> tuple[SegmentFinding, ...]:
    """One SegmentFinding per Segment Sequence item that has a Segment Number.

    - ``anatomic_region``: the segment's Anatomic Region Sequence, else the instance's;
    - ``alg_system``: see ``algorithm_system``;
    - ``alg_datetime``: Content Date + Content Time of the instance;
    - ``referenced_series``: the instance's Referenced Series Sequence series, then the series
      of the Source Image Sequence instances that the Referenced Series Sequence (or the
      Studies Containing Other Referenced Instances Sequence) lists, without duplicates.
    """
    when = date_time(value_at(ds, "ContentDate"), value_at(ds, "ContentTime"))
    series = _referenced_series(ds)
    instance_region = first_code(ds, "AnatomicRegionSequence")
    segments = []
    for segment in items_at(ds, "SegmentSequence"):
        number = _int(value_at(segment, "SegmentNumber"))
        if number is None:
            continue
        segments.append(
            SegmentFinding(
                number=number,
                label=text_at(segment, "SegmentLabel"),
                property_type=first_code(segment, "SegmentedPropertyTypeCodeSequence"),
                anatomic_region=first_code(segment, "AnatomicRegionSequence") or instance_region,
                alg_system=algorithm_system(ds, segment),
                alg_datetime=when,
                referenced_series=series,
            )
        )
    return tuple(segments)


def algorithm_system(ds: Dataset, segment: Dataset) -> str | None:
    """Who made the segment, as one readable text:
    ``NAME[ / IDENTIFIED NAME][ VERSION][ (manufacturer M, software S1 / S2)]``.

    NAME is the Segment Algorithm Name, IDENTIFIED NAME and VERSION the Algorithm Name and
    Algorithm Version of the Segmentation Algorithm Identification Sequence (the identified
    name only when it differs from NAME), M the instance's Manufacturer and S its Software
    Versions. E.g. ``TotalSegmentator 2.1 (manufacturer Acme, software 1.0)``.

    A segment without an algorithm name (typically MANUAL) is named by its Segment Algorithm
    Type instead, e.g. ``MANUAL (manufacturer Acme, software 1.0)``: the software an observer
    drew it with is still worth recording. With neither an algorithm name nor manufacturer or
    software versions there is nothing to say: None.
    """
    identification = first_item(segment, "SegmentationAlgorithmIdentificationSequence")
    names: list[str] = []
    for name in (
        text_at(segment, "SegmentAlgorithmName"),
        text_at(identification, "AlgorithmName"),
    ):
        if name and name not in names:
            names.append(name)
    version = text_at(identification, "AlgorithmVersion")
    equipment = []
    manufacturer = text_at(ds, "Manufacturer")
    if manufacturer:
        equipment.append(f"manufacturer {manufacturer}")
    software = _texts(value_at(ds, "SoftwareVersions"))
    if software:
        equipment.append("software " + " / ".join(software))
    if not names and not equipment:
        return None
    head = " / ".join(names) or text_at(segment, "SegmentAlgorithmType") or "unknown algorithm"
    if names and version:
        head = f"{head} {version}"
    return f"{head} ({', '.join(equipment)})" if equipment else head


def _referenced_series(ds: Dataset) -> tuple[str, ...]:
    series: list[str] = []
    series_of: dict[str, str] = {}
    listed = [(s, False) for s in items_at(ds, "ReferencedSeriesSequence")]
    for study in items_at(ds, "StudiesContainingOtherReferencedInstancesSequence"):
        listed += [(s, True) for s in items_at(study, "ReferencedSeriesSequence")]
    for item, other_study in listed:
        uid = text_at(item, "SeriesInstanceUID")
        if not uid:
            continue
        if not other_study and uid not in series:
            series.append(uid)
        for instance in items_at(item, "ReferencedInstanceSequence"):
            sop = text_at(instance, "ReferencedSOPInstanceUID")
            if sop:
                series_of.setdefault(sop, uid)
    for source in items_at(ds, "SourceImageSequence"):
        uid = series_of.get(text_at(source, "ReferencedSOPInstanceUID") or "")
        if uid and uid not in series:
            series.append(uid)
    return tuple(series)


def _texts(value: Any) -> list[str]:
    """Every non-empty value of a possibly multi-valued element, as stripped text."""
    if value is None:
        return []
    values = [value] if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") else value
    return [text for text in map(text_of, values) if text]


def _int(value: Any) -> int | None:
    try:
        return int(str(text_of(value)))
    except (TypeError, ValueError):
        return None
