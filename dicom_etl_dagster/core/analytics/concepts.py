"""OMOP concepts for measurements: DICOM attributes, their coded values, SR codes and units.

Each look-up is one query per batch for the keys the run has not seen, cached for the run
(an archive has a few hundred distinct attributes and codes). Rules:

- A DICOM attribute: the DICOM vocabulary's ``DICOM Attributes`` concept whose concept_code
  is the 8-hex tag; its standard ``Maps to`` target when one exists.
- A coded (CS) value: among the attribute concept's ``Maps to value`` targets, the concept
  whose concept_code is the value; its standard ``Maps to`` target when one exists.
- A code of an SR or a code sequence: coding scheme -> OMOP vocabulary (``VOCABULARY_OF``),
  the concept with that vocabulary and code (for DCM: the DICOM vocabulary's value-set
  concepts); the concept itself when standard, else its standard ``Maps to`` target.

Each yields a ``Match``: the source concept (0: none) and the standard concept (0: none).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import psycopg
from psycopg import sql

from dicom_etl_dagster.core.analytics.findings import Code
from dicom_etl_dagster.core.db.tables import Tables

#: DICOM Coding Scheme Designator (PS3.16 Table 8-1) -> OMOP vocabulary_id. SRT and SNM3
#: codes are SNOMED RT identifiers that SNOMED CT concept codes do not match: they look up
#: nothing (0) rather than something wrong.
VOCABULARY_OF = {
    "SCT": "SNOMED",
    "LN": "LOINC",
    "UCUM": "UCUM",
    "DCM": "DICOM",
    "NCIt": "NCIt",
    "RXNORM": "RxNorm",
    "ICD10": "ICD10",
}


class Match(NamedTuple):
    source: int  # the concept found for the key; 0 when none
    standard: int  # that concept if standard, else its standard 'Maps to' target; 0 when none


NO_MATCH = Match(0, 0)

_STANDARD_OF = """
LEFT JOIN LATERAL (
  SELECT min(t.concept_id) AS concept_id FROM {relationship} r
  JOIN {concept} t ON t.concept_id = r.concept_id_2 AND t.standard_concept = 'S'
  WHERE r.concept_id_1 = c.concept_id AND r.relationship_id = 'Maps to'
    AND r.invalid_reason IS NULL
) s ON true
"""

_ATTRIBUTE_SQL = (
    """
SELECT c.concept_code, min(c.concept_id),
       min(CASE WHEN c.standard_concept = 'S' THEN c.concept_id ELSE s.concept_id END)
FROM {concept} c"""
    + _STANDARD_OF
    + """
WHERE c.vocabulary_id = 'DICOM' AND c.concept_class_id = 'DICOM Attributes'
  AND c.concept_code = ANY(%(keys)s)
GROUP BY 1
"""
)

# Keys arrive as two arrays joined on their columns (not as concatenated text), so that the
# look-ups use the concept table's index on concept_code: an Athena vocabulary has millions
# of concepts.
_VALUE_SQL = (
    """
SELECT k.a || '=' || k.v, min(c.concept_id), min(s.concept_id)
FROM unnest(%(first)s::text[], %(second)s::text[]) AS k(a, v)
JOIN {concept} a ON a.concept_code = k.a AND a.vocabulary_id = 'DICOM'
                AND a.concept_class_id = 'DICOM Attributes'
JOIN {relationship} r ON r.concept_id_1 = a.concept_id AND r.relationship_id = 'Maps to value'
                     AND r.invalid_reason IS NULL
JOIN {concept} c ON c.concept_id = r.concept_id_2 AND upper(c.concept_code) = k.v"""
    + _STANDARD_OF
    + """
GROUP BY 1
"""
)

_CODE_SQL = (
    """
SELECT k.a || ':' || k.v, min(c.concept_id),
       min(CASE WHEN c.standard_concept = 'S' THEN c.concept_id ELSE s.concept_id END)
FROM unnest(%(first)s::text[], %(second)s::text[]) AS k(a, v)
JOIN {concept} c ON c.concept_code = k.v AND c.vocabulary_id = k.a
                AND (c.vocabulary_id <> 'DICOM' OR c.concept_class_id = 'DICOM Value Sets')"""
    + _STANDARD_OF
    + """
GROUP BY 1
"""
)


def code_key(code: Code) -> str | None:
    """``VOCABULARY:code`` of a DICOM code, or None when its scheme has no OMOP vocabulary."""
    vocabulary = VOCABULARY_OF.get(code.scheme)
    return None if vocabulary is None else f"{vocabulary}:{code.value}"


class MeasurementConcepts:
    """Concept look-ups of one run, cached; ``prepare_*`` queries what is new for a batch."""

    def __init__(self, conn: psycopg.Connection, tables: Tables) -> None:
        self._conn = conn
        names = {"concept": tables["concept"], "relationship": tables["concept_relationship"]}
        self._queries = {
            kind: sql.SQL(text).format(**names)
            for kind, text in (
                ("attribute", _ATTRIBUTE_SQL),
                ("value", _VALUE_SQL),
                ("code", _CODE_SQL),
            )
        }
        self._cache: dict[str, dict[str, Match]] = {"attribute": {}, "value": {}, "code": {}}

    def _prepare(self, kind: str, keys: Iterable[str | None]) -> None:
        cache = self._cache[kind]
        new = sorted({k for k in keys if k is not None and k not in cache})
        if not new:
            return
        if kind == "attribute":
            params: dict = {"keys": new}
        else:  # "first=second" or "first:second", split where the key was joined
            separator = "=" if kind == "value" else ":"
            pairs = [key.split(separator, 1) for key in new]
            params = {"first": [p[0] for p in pairs], "second": [p[1] for p in pairs]}
        found = {
            key: Match(source or 0, standard or 0)
            for key, source, standard in self._conn.execute(self._queries[kind], params)
        }
        cache.update({key: found.get(key, NO_MATCH) for key in new})

    def prepare(
        self, tags: Iterable[str], values: Iterable[tuple[str, str]], codes: Iterable[Code]
    ) -> None:
        """Look up what the batch needs: attribute tags, (tag, CS value) pairs, codes."""
        self._prepare("attribute", tags)
        self._prepare("value", (f"{tag}={value.upper()}" for tag, value in values))
        self._prepare("code", map(code_key, codes))

    def attribute(self, tag: str) -> Match:
        return self._cache["attribute"].get(tag, NO_MATCH)

    def value(self, tag: str, value: str) -> Match:
        return self._cache["value"].get(f"{tag}={value.upper()}", NO_MATCH)

    def code(self, code: Code | None) -> Match:
        key = None if code is None else code_key(code)
        return NO_MATCH if key is None else self._cache["code"].get(key, NO_MATCH)

    def unit(self, ucum_code: str | None) -> int:
        """The UCUM concept of a unit code (prepared as ``Code('UCUM', code)``); 0 if none."""
        return self.code(Code("UCUM", ucum_code)).source if ucum_code else 0
