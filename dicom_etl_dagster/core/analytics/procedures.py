"""procedure_occurrence.procedure_concept_id: from the study's codes, else its modality.

Rule (architecture guide, section 3): the standard concept of a code of the Procedure Code
Sequence (or the Requested Procedure Code Sequence), looked up by coding scheme like every
code (LN -> LOINC, SCT -> SNOMED, ...; ``analytics.concepts``); else the standard SNOMED
procedure concept of the study's imaging modality (the rule of modality_concept_id); else 0.

Any instance of a study may carry the code, and files arrive in any order: each batch
refines the studies its instances belong to, new or already written. The row itself says
how far it is refined, so no extra bookkeeping is needed: a matched code sets
procedure_source_concept_id (never 0 then), a modality only procedure_concept_id. A code
replaces a modality's concept; neither replaces a code's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import psycopg
from psycopg import sql

from dicom_etl_dagster.core.analytics.concepts import MeasurementConcepts
from dicom_etl_dagster.core.analytics.findings import Code
from dicom_etl_dagster.core.db.tables import Tables
from dicom_etl_dagster.core.ingest.concepts import ConceptResolver
from dicom_etl_dagster.core.ingest.plan import InstanceWrite, resolve

#: Modalities of series that are not images of the patient: they say nothing of the procedure.
NOT_IMAGING = frozenset(
    {"SR", "SEG", "PR", "KO", "DOC", "REG", "RWV", "FID", "PLAN", "RTSTRUCT", "RTPLAN", "RTRECORD"}
)

_BY_CODE_SQL = """
UPDATE {procedure} p SET procedure_concept_id = c.concept_id, procedure_source_concept_id = c.source_id
FROM unnest(%s::bigint[], %s::int[], %s::int[]) AS c(procedure_id, concept_id, source_id)
WHERE p.procedure_occurrence_id = c.procedure_id AND coalesce(p.procedure_source_concept_id, 0) = 0
"""
_BY_MODALITY_SQL = """
UPDATE {procedure} p SET procedure_concept_id = c.concept_id
FROM unnest(%s::bigint[], %s::int[]) AS c(procedure_id, concept_id)
WHERE p.procedure_occurrence_id = c.procedure_id AND p.procedure_concept_id = 0
  AND coalesce(p.procedure_source_concept_id, 0) = 0
"""


def _evidence(
    instances: Sequence[InstanceWrite], first_procedure_id: int
) -> tuple[dict[int, list[Code]], dict[int, list[str]]]:
    """Per procedure id: the codes and the imaging modalities of the batch's instances."""
    codes: dict[int, list[Code]] = {}
    modalities: dict[int, list[str]] = {}
    for w in instances:
        if w.procedure is None:
            continue
        procedure_id = resolve(w.procedure, first_procedure_id)
        codes.setdefault(procedure_id, []).extend(w.parsed.findings.procedure_codes)
        modality = (w.parsed.instance.modality or "").strip().upper()
        if modality and modality not in NOT_IMAGING:
            modalities.setdefault(procedure_id, []).append(modality)
    return codes, modalities


def refine_procedures(
    conn: psycopg.Connection,
    tables: Tables,
    concepts: MeasurementConcepts,
    modality_concepts: ConceptResolver,
    instances: Sequence[InstanceWrite],
    first_procedure_id: int,
    outcomes: Counter,
) -> None:
    """Set the procedure concepts the batch's instances tell; ``outcomes`` counts them."""
    codes, modalities = _evidence(instances, first_procedure_id)
    concepts.prepare((), (), [c for found in codes.values() for c in found])
    modality_concepts.prepare({m for found in modalities.values() for m in found}, set())
    by_code: dict[int, tuple[int, int]] = {}
    for procedure_id, study_codes in codes.items():
        match = next((m for m in map(concepts.code, study_codes) if m.standard), None)
        if match is not None:
            by_code[procedure_id] = (match.standard, match.source)
    by_modality: dict[int, int] = {}
    for procedure_id, study_modalities in modalities.items():
        concept = next((c for c in map(modality_concepts.modality, study_modalities) if c), 0)
        if concept and procedure_id not in by_code:
            by_modality[procedure_id] = concept
    table = tables["procedure_occurrence"]
    if by_code:
        ids = sorted(by_code)
        outcomes["by procedure code"] += conn.execute(
            sql.SQL(_BY_CODE_SQL).format(procedure=table),
            [ids, [by_code[i][0] for i in ids], [by_code[i][1] for i in ids]],
        ).rowcount
    if by_modality:
        ids = sorted(by_modality)
        outcomes["by modality"] += conn.execute(
            sql.SQL(_BY_MODALITY_SQL).format(procedure=table), [ids, [by_modality[i] for i in ids]]
        ).rowcount
