"""The NUM content items of a structured report, with what each is about.

One walker serves every SR IOD (Basic, Enhanced, Comprehensive, Comprehensive 3D, X-Ray
Radiation Dose SR): their content trees differ in templates, not in shape. Templates put the
context of a measurement in different places - TID 1500 hangs the Finding and the Finding Site
on the measurement group (or the Finding Site on the measurement itself), TID 10011 one
irradiation event per container - so each NUM item is read together with its own children,
its nearest enclosing CONTAINER (the "group") and, for image references, the containers
further up.

Files in the wild break every rule, and a measurement we cannot read must not cost the file
its other measurements: every read here is guarded and an unreadable part is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from pydicom.dataset import Dataset

from dicom_etl_dagster.core.analytics.codes import (
    first_code,
    first_item,
    items_at,
    text_at,
    value_at,
)
from dicom_etl_dagster.core.analytics.findings import Code, NumericFinding

#: Deeper content trees are not documents but accidents (or attacks); stop there.
MAX_DEPTH = 64

_FINDING = {("DCM", "121071")}
# SNOMED CT's Finding Site, and the SNOMED RT / SNOMED 3 code older reports carry.
_FINDING_SITE = {("SCT", "363698007"), ("SRT", "G-C0E3"), ("SNM3", "G-C0E3")}
_MODIFIERS = {"HAS CONCEPT MOD", "HAS PROPERTIES"}
# UIDREF items whose value is a series UID: "Source series for segmentation" (112227),
# "Series Instance UID" (112002); others are recognised by a meaning that says "series".
_SERIES_UIDREF = {("DCM", "112227"), ("DCM", "112002")}
_EVIDENCE = ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence")


class _Container(NamedTuple):
    """A CONTAINER on the path from the root to an item (the root dataset is one too)."""

    number: int  # in document order, counting every container
    children: Sequence[Dataset]
    parent: _Container | None


class _References(NamedTuple):
    series: tuple[str, ...]
    sops: tuple[str, ...]


def numeric_findings(ds: Dataset) -> tuple[NumericFinding, ...]:
    """Every NUM content item of the report that has a concept name, in document order.

    ``group`` numbers the containers that directly hold NUM items 0, 1, ... in the document
    order of the containers (a container is counted where it starts, so an outer container
    numbers before the containers nested in it): items of one container share a number, items
    of different containers never do. Items directly under the root share the root's group.
    """
    walk = _Walk(_evidence_series(ds))
    root = _Container(0, _children(ds), None)
    found = list(walk.items(root, root.children, 0))
    groups = {number: index for index, number in enumerate(sorted({f.group for f in found}))}
    return tuple(f._replace(group=groups[f.group]) for f in found)


class _Walk:
    """One depth-first walk of a content tree: numbers the containers as it meets them and
    visits each item once (a dataset met again - only possible in memory - is skipped)."""

    def __init__(self, evidence: dict[str, str]) -> None:
        self.evidence = evidence
        self.containers = 0
        self.seen: set[int] = set()

    def items(
        self, container: _Container, items: Sequence[Dataset], depth: int
    ) -> Iterator[NumericFinding]:
        if depth >= MAX_DEPTH:
            return
        for item in items:
            if id(item) in self.seen:
                continue
            self.seen.add(id(item))
            value_type = text_at(item, "ValueType")
            children = _children(item)
            if value_type == "CONTAINER":
                self.containers += 1
                inner = _Container(self.containers, children, container)
                yield from self.items(inner, children, depth + 1)
                continue
            if value_type == "NUM":
                finding = _numeric(item, children, container, self.evidence)
                if finding is not None:
                    yield finding
            yield from self.items(container, children, depth + 1)


def _numeric(
    item: Dataset, children: Sequence[Dataset], container: _Container, evidence: dict[str, str]
) -> NumericFinding | None:
    concept = first_code(item, "ConceptNameCodeSequence")
    if concept is None:
        return None
    measured = first_item(item, "MeasuredValueSequence")
    number, text = _measured_value(measured) if measured is not None else (None, None)
    if text is None:
        qualifier = first_code(item, "NumericValueQualifierCodeSequence")
        text = qualifier.meaning if qualifier is not None else None
    references = _references(children, container, evidence)
    return NumericFinding(
        concept=concept,
        number=number,
        text=text,
        unit=first_code(measured, "MeasurementUnitsCodeSequence") if measured is not None else None,
        group=container.number,
        finding=_context_code(children, container, _FINDING),
        finding_site=_context_code(children, container, _FINDING_SITE),
        referenced_series=references.series,
        referenced_sops=references.sops,
    )


def _measured_value(measured: Dataset) -> tuple[float | None, str | None]:
    """The number and the text of a Measured Value Sequence item.

    The text is the Numeric Value (DS) as written; the number is the Floating Point Value
    (FD) when present, it is the more precise one, else the DS read as a float. A DS that is
    not a number ("1,5") keeps its text and has no number.
    """
    text = text_at(measured, "NumericValue")
    number = _number(text)
    precise = value_at(measured, "FloatingPointValue")
    if isinstance(precise, (list, tuple)) or type(precise).__name__ == "MultiValue":
        precise = precise[0] if len(precise) else None
    if isinstance(precise, (int, float)) and math.isfinite(precise):
        number = float(precise)
    return number, text


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _context_code(
    children: Sequence[Dataset], container: _Container, concepts: set[tuple[str, str]]
) -> Code | None:
    """The CODE value named by one of ``concepts``: among the item's modifiers first, then
    among the direct children of its container (whatever their relationship)."""
    found = _code_value(children, concepts, _MODIFIERS)
    if found is None:
        found = _code_value(container.children, concepts, None)
    return found


def _code_value(
    items: Sequence[Dataset], concepts: set[tuple[str, str]], relationships: set[str] | None
) -> Code | None:
    for item in items:
        if text_at(item, "ValueType") != "CODE":
            continue
        if relationships is not None and text_at(item, "RelationshipType") not in relationships:
            continue
        name = first_code(item, "ConceptNameCodeSequence")
        if name is not None and (name.scheme, name.value) in concepts:
            value = first_code(item, "ConceptCodeSequence")
            if value is not None:
                return value
    return None


def _references(
    children: Sequence[Dataset], container: _Container, evidence: dict[str, str]
) -> _References:
    """The series and SOP instances the item is about: those referenced among its children,
    else among its container's children, and so on up to the root; the first level that
    references anything is the answer. A referenced SOP instance also names its series when
    the report's evidence lists it."""
    level: Sequence[Dataset] | None = children
    up: _Container | None = container
    while level is not None:
        series: list[str] = []
        sops: list[str] = []
        for item in level:
            _collect(item, series, sops, evidence)
        if series or sops:
            return _References(tuple(series), tuple(sops))
        level = up.children if up is not None else None
        up = up.parent if up is not None else None
    return _References((), ())


def _collect(item: Dataset, series: list[str], sops: list[str], evidence: dict[str, str]) -> None:
    """Add what one content item references: an IMAGE (or COMPOSITE) item its SOP instance;
    a SCOORD item the images it is selected from; a series UIDREF its series."""
    value_type = text_at(item, "ValueType")
    if value_type in ("IMAGE", "COMPOSITE"):
        for reference in items_at(item, "ReferencedSOPSequence"):
            sop = text_at(reference, "ReferencedSOPInstanceUID")
            if sop:
                _add(sops, sop)
                if sop in evidence:
                    _add(series, evidence[sop])
    elif value_type == "SCOORD":
        for child in _children(item):
            if text_at(child, "ValueType") == "IMAGE":
                _collect(child, series, sops, evidence)
    elif value_type == "UIDREF" and _names_a_series(item):
        uid = text_at(item, "UID")
        if uid:
            _add(series, uid)


def _names_a_series(item: Dataset) -> bool:
    name = first_code(item, "ConceptNameCodeSequence")
    if name is None:
        return False
    return (name.scheme, name.value) in _SERIES_UIDREF or "series" in (name.meaning or "").lower()


def _evidence_series(ds: Dataset) -> dict[str, str]:
    """SOP Instance UID -> Series Instance UID, from the report's evidence sequences."""
    series_of: dict[str, str] = {}
    for keyword in _EVIDENCE:
        for study in items_at(ds, keyword):
            for series in items_at(study, "ReferencedSeriesSequence"):
                uid = text_at(series, "SeriesInstanceUID")
                if not uid:
                    continue
                for sop in items_at(series, "ReferencedSOPSequence"):
                    sop_uid = text_at(sop, "ReferencedSOPInstanceUID")
                    if sop_uid:
                        series_of.setdefault(sop_uid, uid)
    return series_of


def _add(values: list[str], value: str) -> None:
    if value not in values:
        values.append(value)


def _children(ds: Any) -> list[Dataset]:
    return items_at(ds, "ContentSequence")
