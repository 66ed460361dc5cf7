"""What an ingest wrote, compared without ids, and the id invariants every ingest must keep.

Shared by the writer tests and the fault-injection tests: both compare a run that was
interrupted and completed with one that ran cleanly.
"""

from __future__ import annotations

import collections

from psycopg import sql

from dicom_etl_dagster.core.analytics.rows import MEASUREMENT_ID_FIELD_CONCEPT_ID
from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster_tests.conftest import scalar


def _names(schemas: Schemas) -> dict[str, sql.Composable]:
    mi, cdm = schemas.medical_imaging, schemas.cdm
    return dict(
        io=sql.Identifier(mi, "image_occurrence"),
        po=sql.Identifier(cdm, "procedure_occurrence"),
        log=sql.Identifier(mi, "dicom_ingest_log"),
        md=sql.Identifier(mi, "dicom_file_metadata"),
        de=sql.Identifier(mi, "dicom_data_element"),
        m=sql.Identifier(cdm, "measurement"),
        f=sql.Identifier(mi, "image_feature"),
        src=sql.Identifier(mi, "dicom_etl_feature_source"),
        event=sql.Literal(MEASUREMENT_ID_FIELD_CONCEPT_ID),
    )


def table_content(conn, schemas: Schemas) -> dict[str, collections.Counter]:
    """Every row of the written tables without the ids, which legitimately differ between runs.

    A row's references are replaced by what they point at: a measurement by the series of
    its image_feature and the SR instance it came from, an image_feature's event by the
    measurement's values, its finding id by its rank among the findings of its instance."""
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
            " d.data_element_tag, d.private_creator, s.metadata_source_tag, i.image_series_uid"
            " FROM {md} m LEFT JOIN {de} d ON d.data_element_id = m.data_element_id"
            " LEFT JOIN {md} s ON s.metadata_id = m.parent_sequence_id"
            " JOIN {io} i ON i.image_occurrence_id = m.image_occurrence_id"
        ),
        "data_element": sql.SQL(
            "SELECT data_element_tag, data_element_name, data_element_keyword,"
            " value_representation, value_multiplicity, is_private, private_creator FROM {de}"
        ),
        "measurement": sql.SQL(
            "SELECT m.person_id, m.measurement_concept_id, m.measurement_date, m.measurement_datetime,"
            " m.measurement_type_concept_id, m.value_as_number, m.value_as_concept_id, m.unit_concept_id,"
            " m.visit_occurrence_id, m.measurement_source_value, m.measurement_source_concept_id,"
            " m.unit_source_value, m.value_source_value,"
            " (SELECT string_agg(i.image_series_uid, ' ' ORDER BY i.image_series_uid) FROM {f} f"
            " JOIN {io} i USING (image_occurrence_id) WHERE f.image_feature_event_field_concept_id = {event}"
            " AND f.image_feature_event_id = m.measurement_id),"
            " (SELECT string_agg(s.sop_instance_uid, ' ' ORDER BY s.sop_instance_uid) FROM {src} s"
            " WHERE s.measurement_id = m.measurement_id)"
            " FROM {m} m"
        ),
        "image_feature": sql.SQL(
            "SELECT f.person_id, i.image_series_uid, f.image_feature_event_field_concept_id,"
            " m.measurement_source_value, m.value_as_number, m.value_source_value,"
            " f.image_feature_concept_id, f.image_feature_type_concept_id, f.image_finding_concept_id,"
            " s.sop_instance_uid,"
            " CASE WHEN f.image_finding_id IS NOT NULL THEN dense_rank() OVER"
            " (PARTITION BY s.sop_instance_uid, f.image_finding_id IS NULL ORDER BY f.image_finding_id) END,"
            " f.anatomic_site_concept_id, f.alg_system, f.alg_datetime"
            " FROM {f} f LEFT JOIN {io} i USING (image_occurrence_id)"
            " LEFT JOIN {m} m ON f.image_feature_event_field_concept_id = {event}"
            " AND m.measurement_id = f.image_feature_event_id"
            " LEFT JOIN {src} s ON s.image_feature_id = f.image_feature_id"
        ),
        "feature_source": sql.SQL(
            "SELECT s.sop_instance_uid, s.measurement_id IS NULL, f.image_feature_concept_id,"
            " i.image_series_uid, m.measurement_source_value, m.value_as_number"
            " FROM {src} s LEFT JOIN {f} f USING (image_feature_id)"
            " LEFT JOIN {io} i ON i.image_occurrence_id = f.image_occurrence_id"
            " LEFT JOIN {m} m ON m.measurement_id = s.measurement_id"
        ),
    }
    names = _names(schemas)
    return {
        k: collections.Counter(conn.execute(v.format(**names)).fetchall()) for k, v in q.items()
    }


def assert_ids_consistent(conn, schemas: Schemas) -> None:
    names = _names(schemas)
    checks = {
        "duplicate metadata_id": "SELECT count(*) - count(DISTINCT metadata_id) FROM {md}",
        "duplicate ingest_log_id": "SELECT count(*) - count(DISTINCT ingest_log_id) FROM {log}",
        "duplicate image_occurrence_id": "SELECT count(*) - count(DISTINCT image_occurrence_id) FROM {io}",
        "duplicate procedure_occurrence_id": "SELECT count(*) - count(DISTINCT procedure_occurrence_id) FROM {po}",
        "duplicate data_element_id": "SELECT count(*) - count(DISTINCT data_element_id) FROM {de}",
        "duplicate data_element_tag": "SELECT count(*) - count(DISTINCT (data_element_tag,"
        " private_creator)) FROM {de}",
        # Entries written before revision 0004 have no creator; a per-creator one is the row's own.
        "private row with another creator's entry": "SELECT count(*) FROM {md} m JOIN {de} d"
        " USING (data_element_id) WHERE d.private_creator IS DISTINCT FROM m.private_creator"
        " AND d.private_creator IS NOT NULL",
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
        # measurement, image_feature, dicom_etl_feature_source
        "duplicate measurement_id": "SELECT count(*) - count(DISTINCT measurement_id) FROM {m}",
        "duplicate image_feature_id": "SELECT count(*) - count(DISTINCT image_feature_id) FROM {f}",
        "duplicate feature_source image_feature_id": "SELECT count(*) - count(DISTINCT image_feature_id)"
        " FROM {src}",
        "dangling image_feature_event_id": "SELECT count(*) FROM {f} f WHERE"
        " f.image_feature_event_field_concept_id = {event} AND NOT EXISTS"
        " (SELECT 1 FROM {m} m WHERE m.measurement_id = f.image_feature_event_id)",
        "event id without its event field": "SELECT count(*) FROM {f} WHERE"
        " (image_feature_event_id IS NULL) <> (image_feature_event_field_concept_id IS NULL)",
        "measurement of no image_feature, or of several": "SELECT count(*) FROM {m} m WHERE"
        " (SELECT count(*) FROM {f} f WHERE f.image_feature_event_field_concept_id = {event}"
        " AND f.image_feature_event_id = m.measurement_id) <> 1",
        "image_feature of another person than its measurement": "SELECT count(*) FROM {f} f"
        " JOIN {m} m ON f.image_feature_event_field_concept_id = {event}"
        " AND m.measurement_id = f.image_feature_event_id WHERE m.person_id <> f.person_id",
        "dangling image_feature image_occurrence_id": "SELECT count(*) FROM {f} f WHERE NOT EXISTS"
        " (SELECT 1 FROM {io} i WHERE i.image_occurrence_id = f.image_occurrence_id)",
        "dangling feature_source image_feature_id": "SELECT count(*) FROM {src} s WHERE NOT EXISTS"
        " (SELECT 1 FROM {f} f WHERE f.image_feature_id = s.image_feature_id)",
        "feature_source measurement_id is not its feature's event": "SELECT count(*) FROM {src} s"
        " JOIN {f} f USING (image_feature_id)"
        " WHERE s.measurement_id IS DISTINCT FROM f.image_feature_event_id",
        "feature_source of an instance not ingested": "SELECT count(*) FROM {src} s WHERE NOT EXISTS"
        " (SELECT 1 FROM {log} l WHERE l.status = 'ingested' AND l.sop_instance_uid = s.sop_instance_uid)",
        "image_finding_id shared by two instances": "SELECT count(*) FROM (SELECT f.image_finding_id"
        " FROM {f} f LEFT JOIN {src} s USING (image_feature_id) WHERE f.image_finding_id IS NOT NULL"
        " GROUP BY 1 HAVING count(DISTINCT coalesce(s.sop_instance_uid, '')) > 1"
        " OR bool_or(s.sop_instance_uid IS NULL)) d",
    }
    problems = {
        name: n for name, q in checks.items() if (n := scalar(conn, sql.SQL(q).format(**names)))
    }
    assert not problems, problems
