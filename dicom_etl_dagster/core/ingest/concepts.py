"""Map Modality and BodyPartExamined to OMOP concepts, one query per batch of new values.

Rules (architecture guide, section 3):
- modality_concept_id: the DICOM value concept whose concept_code is the Modality, then the
  standard SNOMED `Procedure` concept with the same name (case-insensitive). Used only when
  exactly one such concept exists; 0 otherwise.
- anatomic_site_concept_id: the BodyPartExamined value concept's `Maps to` target when that
  target is a standard concept; else the standard SNOMED `Spec Anatomic Site` concept named
  "Entire <body part>"; else 0.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.tables import Tables

_MODALITY_SQL = """
SELECT upper(d.concept_code), min(s.concept_id), count(DISTINCT s.concept_id)
FROM {concept} d
JOIN {concept} s
  ON upper(s.concept_name) = upper(d.concept_name)
 AND s.vocabulary_id = 'SNOMED' AND s.domain_id = 'Procedure' AND s.standard_concept = 'S'
WHERE d.vocabulary_id = 'DICOM' AND d.concept_class_id = 'DICOM Value Sets'
  AND upper(d.concept_code) = ANY(%(codes)s)
GROUP BY 1
"""

_BODY_PART_MAPS_TO_SQL = """
SELECT upper(d.concept_code), min(t.concept_id), count(DISTINCT t.concept_id)
FROM {concept} d
JOIN {relationship} r ON r.concept_id_1 = d.concept_id AND r.relationship_id = 'Maps to'
                     AND r.invalid_reason IS NULL
JOIN {concept} t ON t.concept_id = r.concept_id_2 AND t.standard_concept = 'S'
WHERE d.vocabulary_id = 'DICOM' AND d.concept_class_id = 'DICOM Value Sets'
  AND upper(d.concept_code) = ANY(%(codes)s)
GROUP BY 1
"""

_BODY_PART_ENTIRE_SQL = """
SELECT upper(substr(c.concept_name, 8)), min(c.concept_id), count(DISTINCT c.concept_id)
FROM {concept} c
WHERE c.vocabulary_id = 'SNOMED' AND c.domain_id = 'Spec Anatomic Site' AND c.standard_concept = 'S'
  AND upper(c.concept_name) = ANY(%(names)s)
GROUP BY 1
"""


def _normalise(value: str | None) -> str | None:
    value = (value or "").strip().upper()
    return value or None


class ConceptResolver:
    """Caches concept ids per value for the whole run; unknown values cost one query per batch."""

    def __init__(self, conn: psycopg.Connection, schemas: Schemas) -> None:
        self._conn = conn
        tables = Tables(schemas)
        names = {"concept": tables["concept"], "relationship": tables["concept_relationship"]}
        self._modality_sql = sql.SQL(_MODALITY_SQL).format(**names)
        self._maps_to_sql = sql.SQL(_BODY_PART_MAPS_TO_SQL).format(**names)
        self._entire_sql = sql.SQL(_BODY_PART_ENTIRE_SQL).format(**names)
        self._modalities: dict[str, int] = {}
        self._body_parts: dict[str, int] = {}

    def _unique_matches(self, query: sql.Composed, params: dict) -> dict[str, int]:
        # A value that matches more than one concept is ambiguous and stays unmapped.
        return {
            key: concept_id for key, concept_id, n in self._conn.execute(query, params) if n == 1
        }

    def prepare(self, modalities: set[str | None], body_parts: set[str | None]) -> None:
        new_modalities = {m for m in map(_normalise, modalities) if m and m not in self._modalities}
        if new_modalities:
            found = self._unique_matches(self._modality_sql, {"codes": sorted(new_modalities)})
            self._modalities.update({m: found.get(m, 0) for m in new_modalities})

        new_parts = {b for b in map(_normalise, body_parts) if b and b not in self._body_parts}
        if new_parts:
            found = self._unique_matches(self._maps_to_sql, {"codes": sorted(new_parts)})
            rest = new_parts - found.keys()
            if rest:
                entire = self._unique_matches(
                    self._entire_sql, {"names": [f"ENTIRE {b}" for b in sorted(rest)]}
                )
                found.update(entire)
            self._body_parts.update({b: found.get(b, 0) for b in new_parts})

    def modality(self, value: str | None) -> int:
        key = _normalise(value)
        return self._modalities.get(key, 0) if key else 0

    def anatomic_site(self, value: str | None) -> int:
        key = _normalise(value)
        return self._body_parts.get(key, 0) if key else 0
