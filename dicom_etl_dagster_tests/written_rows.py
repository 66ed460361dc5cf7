"""What an ingest wrote, compared without ids, and the id invariants every ingest must keep.

Shared by the writer tests and the fault-injection tests: both compare a run that was
interrupted and completed with one that ran cleanly.
"""

from __future__ import annotations

import collections

from psycopg import sql

from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster_tests.conftest import scalar


def table_content(conn, schemas: Schemas) -> dict[str, collections.Counter]:
    """Every row of the written tables without the ids, which legitimately differ between runs."""
    mi, cdm = schemas.medical_imaging, schemas.cdm
    q = {
        "ledger": sql.SQL(
            "SELECT file_path, status, error_message, sop_instance_uid, file_size, file_mtime_ns,"
            " (SELECT image_series_uid FROM {io} i WHERE i.image_occurrence_id = l.image_occurrence_id)"
            " FROM {log} l"
        ),
        "image_occurrence": sql.SQL(
            "SELECT i.image_series_uid, i.image_study_uid, i.person_id, i.image_occurrence_date,"
            " i.modality_concept_id, i.anatomic_site_concept_id, i.local_path,"
            " p.procedure_source_value FROM {io} i"
            " JOIN {po} p USING (procedure_occurrence_id)"
        ),
        "procedure_occurrence": sql.SQL(
            "SELECT person_id, procedure_date, procedure_source_value,"
            " procedure_type_concept_id, procedure_concept_id FROM {po}"
        ),
        # The EAV rows with their tree shape expressed through the parent's tag instead of ids.
        "metadata": sql.SQL(
            "SELECT m.sop_instance_id, m.metadata_source_tag, m.metadata_source_keyword,"
            " m.metadata_source_value_representation, m.metadata_source_value_multiplicity, m.metadata_source_value,"
            " m.is_sequence, m.sequence_length, m.is_private, m.private_creator, m.instance_number,"
            " d.data_element_tag, s.metadata_source_tag, i.image_series_uid"
            " FROM {md} m LEFT JOIN {de} d ON d.data_element_id = m.data_element_id"
            " LEFT JOIN {md} s ON s.metadata_id = m.parent_sequence_id"
            " JOIN {io} i ON i.image_occurrence_id = m.image_occurrence_id"
        ),
        "data_element": sql.SQL(
            "SELECT data_element_tag, data_element_name, data_element_keyword,"
            " value_representation, is_private FROM {de}"
        ),
    }
    names = dict(
        io=sql.Identifier(mi, "image_occurrence"),
        po=sql.Identifier(cdm, "procedure_occurrence"),
        log=sql.Identifier(mi, "dicom_ingest_log"),
        md=sql.Identifier(mi, "dicom_file_metadata"),
        de=sql.Identifier(mi, "dicom_data_element"),
    )
    return {
        k: collections.Counter(conn.execute(v.format(**names)).fetchall()) for k, v in q.items()
    }


def assert_ids_consistent(conn, schemas: Schemas) -> None:
    mi, cdm = schemas.medical_imaging, schemas.cdm
    names = dict(
        io=sql.Identifier(mi, "image_occurrence"),
        po=sql.Identifier(cdm, "procedure_occurrence"),
        log=sql.Identifier(mi, "dicom_ingest_log"),
        md=sql.Identifier(mi, "dicom_file_metadata"),
        de=sql.Identifier(mi, "dicom_data_element"),
    )
    checks = {
        "duplicate metadata_id": "SELECT count(*) - count(DISTINCT metadata_id) FROM {md}",
        "duplicate ingest_log_id": "SELECT count(*) - count(DISTINCT ingest_log_id) FROM {log}",
        "duplicate image_occurrence_id": "SELECT count(*) - count(DISTINCT image_occurrence_id) FROM {io}",
        "duplicate procedure_occurrence_id": "SELECT count(*) - count(DISTINCT procedure_occurrence_id) FROM {po}",
        "duplicate data_element_id": "SELECT count(*) - count(DISTINCT data_element_id) FROM {de}",
        "duplicate data_element_tag": "SELECT count(*) - count(DISTINCT data_element_tag) FROM {de}",
        "dataset id shared by two instances": "SELECT count(*) FROM (SELECT parent_dataset_id FROM {md}"
        " WHERE parent_dataset_id IS NOT NULL GROUP BY 1 HAVING count(DISTINCT sop_instance_id) > 1) d",
        "dataset id under two sequences": "SELECT count(*) FROM (SELECT parent_dataset_id FROM {md}"
        " WHERE parent_dataset_id IS NOT NULL GROUP BY 1 HAVING count(DISTINCT parent_sequence_id) > 1) d",
        "dangling parent_sequence_id": "SELECT count(*) FROM {md} m WHERE parent_sequence_id IS NOT NULL AND NOT"
        " EXISTS (SELECT 1 FROM {md} s WHERE s.metadata_id = m.parent_sequence_id AND s.is_sequence"
        " AND s.sop_instance_id = m.sop_instance_id)",
        "dangling data_element_id": "SELECT count(*) FROM {md} m WHERE NOT EXISTS"
        " (SELECT 1 FROM {de} d WHERE d.data_element_id = m.data_element_id)",
        "dangling image_occurrence_id": "SELECT count(*) FROM {md} m WHERE NOT EXISTS"
        " (SELECT 1 FROM {io} i WHERE i.image_occurrence_id = m.image_occurrence_id)",
        "dangling procedure_occurrence_id": "SELECT count(*) FROM {io} i WHERE NOT EXISTS"
        " (SELECT 1 FROM {po} p WHERE p.procedure_occurrence_id = i.procedure_occurrence_id)",
        "SOP ingested twice": "SELECT count(*) FROM (SELECT sop_instance_uid FROM {log} WHERE status = 'ingested'"
        " GROUP BY 1 HAVING count(*) > 1) d",
    }
    problems = {
        name: n for name, q in checks.items() if (n := scalar(conn, sql.SQL(q).format(**names)))
    }
    assert not problems, problems
