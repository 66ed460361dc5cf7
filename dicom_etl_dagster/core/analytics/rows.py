"""measurement and image_feature rows from findings whose context is known (pure).

The writer resolves the context (ids, persons, visits, concepts) and hands each finding
here with it; these functions only decide the columns, so every rule of the mapping is in
one readable place and tested without a database:

- acquisition attribute -> measurement (type 32817) + image_feature (type 32817), the
  feature pointing at the series;
- SR NUM item -> measurement + image_feature pointing at the series it is about, with the
  group's finding id, finding concept and finding site;
- SEG segment -> image_feature only (type 32880: an algorithm's result), the segmented
  property type as finding, with the algorithm.
"""

from __future__ import annotations

import datetime as dt
from enum import Enum
from typing import NamedTuple

from dicom_etl_dagster.core.analytics.concepts import Match

EHR_TYPE_CONCEPT_ID = 32817
ALGORITHM_TYPE_CONCEPT_ID = 32880
#: The OMOP field concept of measurement.measurement_id: image_feature_event_field_concept_id.
MEASUREMENT_ID_FIELD_CONCEPT_ID = 1147330
SOURCE_VALUE_LENGTH = 50

MEASUREMENT_COLUMNS = (
    "measurement_id",
    "person_id",
    "measurement_concept_id",
    "measurement_date",
    "measurement_datetime",
    "measurement_type_concept_id",
    "value_as_number",
    "value_as_concept_id",
    "unit_concept_id",
    "visit_occurrence_id",
    "measurement_source_value",
    "measurement_source_concept_id",
    "unit_source_value",
    "value_source_value",
)
FEATURE_COLUMNS = (
    "image_feature_id",
    "person_id",
    "image_occurrence_id",
    "image_feature_event_field_concept_id",
    "image_feature_event_id",
    "image_feature_concept_id",
    "image_feature_type_concept_id",
    "image_finding_concept_id",
    "image_finding_id",
    "anatomic_site_concept_id",
    "alg_system",
    "alg_datetime",
)


class NonStandardConcepts(str, Enum):
    """measurement_concept_id when the source concept has no standard target."""

    DICOM = "dicom"  # the MI-CDM recipe: the (non-standard) DICOM concept itself
    ZERO = "zero"  # OMOP's convention for unmapped source concepts: 0


def chosen(match: Match, policy: NonStandardConcepts) -> int:
    """The concept to use for a match: the standard one, else per ``policy``."""
    if match.standard:
        return match.standard
    return match.source if policy == NonStandardConcepts.DICOM else 0


class Context(NamedTuple):
    """Where a finding belongs: the row's person, series, visit and time."""

    person_id: int
    image_occurrence_id: int
    visit_occurrence_id: int | None
    date: dt.date
    datetime: dt.datetime | None
    site_concept_id: int  # anatomic_site_concept_id of the feature


class Measurement(NamedTuple):
    """A measurement row without its id, and what its image_feature row needs."""

    concept_id: int
    source_value: str
    source_concept_id: int
    number: float | None
    value_concept_id: int | None
    value_text: str | None
    unit_concept_id: int
    unit_source_value: str | None


def cut(text: str | None) -> str | None:
    return None if text is None else text.replace("\x00", "")[:SOURCE_VALUE_LENGTH]


def measurement_row(measurement_id: int, m: Measurement, context: Context) -> tuple:
    return (
        measurement_id,
        context.person_id,
        m.concept_id,
        context.date,
        context.datetime,
        EHR_TYPE_CONCEPT_ID,
        m.number,
        m.value_concept_id,
        m.unit_concept_id,
        context.visit_occurrence_id,
        cut(m.source_value),
        m.source_concept_id,
        cut(m.unit_source_value),
        cut(m.value_text),
    )


def measurement_feature_row(
    feature_id: int,
    measurement_id: int,
    m: Measurement,
    context: Context,
    finding: tuple[int | None, int | None] = (None, None),  # (finding concept, finding id)
) -> tuple:
    """The image_feature row linking a measurement to its image occurrence."""
    return (
        feature_id,
        context.person_id,
        context.image_occurrence_id,
        MEASUREMENT_ID_FIELD_CONCEPT_ID,
        measurement_id,
        m.concept_id,
        EHR_TYPE_CONCEPT_ID,
        finding[0],
        finding[1],
        context.site_concept_id,
        None,
        None,
    )


def segment_feature_row(
    feature_id: int,
    finding_id: int,
    property_concept_id: int,
    context: Context,
    alg_system: str | None,
    alg_datetime: dt.datetime | None,
) -> tuple:
    """A segment: a finding with no measurement (no event field), made by an algorithm."""
    return (
        feature_id,
        context.person_id,
        context.image_occurrence_id,
        None,
        None,
        property_concept_id,
        ALGORITHM_TYPE_CONCEPT_ID,
        property_concept_id,
        finding_id,
        context.site_concept_id,
        alg_system,
        alg_datetime,
    )
