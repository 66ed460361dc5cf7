"""Row-at-a-time baseline: the original DICOM ETL plugin's statement pattern, for the benchmark.

The plugin this project replaces (data2evidence's Prefect "DICOM ETL plugin") wrote every
row with its own statement and its own transaction, in one process, one file after another:

per file
    SELECT person_id FROM <mapping> WHERE upper(patient) = upper(%s)
    SELECT max(procedure_occurrence_id) + 1 ...; INSERT procedure_occurrence   (one per *file*)
    SELECT concept_name ... DICOM; SELECT concept_id ... SNOMED Procedure        (modality)
    SELECT concept_id ... 'Entire <body part>'                                   (anatomic site)
    SELECT max(image_occurrence_id) + 1 ...; INSERT image_occurrence            (one per *file*)
per element (nested ones included)
    SELECT data_element_id FROM dicom_data_element WHERE data_element_tag = %s
      and, when missing: SELECT max(data_element_id) + 1; INSERT dicom_data_element
    INSERT dicom_file_metadata                                                   (one row)

Deliberately generous to the baseline: it uses psycopg (no SQLAlchemy, no table
reflection per call), one connection, the project's fast parser (read_instance) and
client-side metadata ids (the original used uuid4() there, which costs no statement).
Every statement still commits on its own (autocommit), as the original's did.
It writes into its own schema so it never touches the ETL's tables.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.dicom.reader import DicomReadError, read_instance


@dataclass
class BaselineResult:
    files: int = 0
    files_ingested: int = 0
    files_failed: int = 0
    elements: int = 0
    statements: int = 0
    rows: dict = field(
        default_factory=lambda: {
            "procedure_occurrence": 0,
            "image_occurrence": 0,
            "dicom_file_metadata": 0,
            "dicom_data_element": 0,
        }
    )
    seconds_parse: float = 0.0
    seconds_database: float = 0.0

    @property
    def seconds(self) -> float:
        return self.seconds_parse + self.seconds_database


def create_schema(conn: psycopg.Connection, schema: str, source: Schemas) -> None:
    """Fresh copies of the four target tables (columns, defaults, primary keys, tag index),
    with the PS3.6 dictionary rows copied over; no unique series index (the original wrote
    one image_occurrence per file)."""
    b = sql.Identifier(schema)
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(b))
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(b))
    tables = (
        ("procedure_occurrence", source.cdm, "procedure_occurrence_id"),
        ("image_occurrence", source.medical_imaging, "image_occurrence_id"),
        ("dicom_data_element", source.medical_imaging, "data_element_id"),
        ("dicom_file_metadata", source.medical_imaging, "metadata_id"),
    )
    for table, from_schema, key in tables:
        conn.execute(
            sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(
                sql.Identifier(schema, table), sql.Identifier(from_schema, table)
            )
        )
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                sql.Identifier(schema, table), sql.Identifier(key)
            )
        )
    conn.execute(
        sql.SQL("CREATE UNIQUE INDEX ON {} (data_element_tag)").format(
            sql.Identifier(schema, "dicom_data_element")
        )
    )
    conn.execute(
        sql.SQL("INSERT INTO {} SELECT * FROM {} WHERE NOT coalesce(is_private, false)").format(
            sql.Identifier(schema, "dicom_data_element"),
            sql.Identifier(source.medical_imaging, "dicom_data_element"),
        )
    )
    conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(schema, "dicom_data_element")))


class _Statements:
    def __init__(self, schema: str, vocab: str, mapping: tuple[str, str, str, str] | None) -> None:
        t = lambda name: sql.Identifier(schema, name)  # noqa: E731
        concept = sql.Identifier(vocab, "concept")
        self.person = None
        if mapping:
            m_schema, m_table, person_col, patient_col = mapping
            self.person = sql.SQL("SELECT {} FROM {} WHERE upper({}) = upper(%s)").format(
                sql.Identifier(person_col),
                sql.Identifier(m_schema, m_table),
                sql.Identifier(patient_col),
            )
        self.next_procedure = sql.SQL(
            "SELECT coalesce(max(procedure_occurrence_id), 0) + 1 FROM {}"
        ).format(t("procedure_occurrence"))
        self.insert_procedure = sql.SQL(
            "INSERT INTO {} (procedure_occurrence_id, person_id, procedure_concept_id, procedure_date,"
            " procedure_type_concept_id, procedure_source_value) VALUES (%s, %s, 0, %s, 32817, %s)"
        ).format(t("procedure_occurrence"))
        self.modality_name = sql.SQL(
            "SELECT DISTINCT concept_name FROM {} WHERE upper(concept_code) = upper(%s)"
            " AND vocabulary_id = 'DICOM'"
        ).format(concept)
        self.modality_id = sql.SQL(
            "SELECT concept_id FROM {} WHERE upper(concept_name) = upper(%s) AND domain_id = 'Procedure'"
            " AND standard_concept = 'S' AND vocabulary_id = 'SNOMED'"
        ).format(concept)
        self.site_id = sql.SQL(
            "SELECT concept_id FROM {} WHERE upper(concept_name) = upper(%s) AND domain_id = 'Spec Anatomic Site'"
            " AND standard_concept = 'S' AND vocabulary_id = 'SNOMED'"
        ).format(concept)
        self.next_image = sql.SQL(
            "SELECT coalesce(max(image_occurrence_id), 0) + 1 FROM {}"
        ).format(t("image_occurrence"))
        self.insert_image = sql.SQL(
            "INSERT INTO {} (image_occurrence_id, person_id, procedure_occurrence_id, anatomic_site_concept_id,"
            " image_occurrence_date, image_study_uid, image_series_uid, modality_concept_id)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(t("image_occurrence"))
        self.data_element_id = sql.SQL(
            "SELECT data_element_id FROM {} WHERE data_element_tag = %s"
        ).format(t("dicom_data_element"))
        self.next_data_element = sql.SQL(
            "SELECT coalesce(max(data_element_id), 0) + 1 FROM {}"
        ).format(t("dicom_data_element"))
        self.insert_data_element = sql.SQL(
            "INSERT INTO {} (data_element_id, data_element_tag, data_element_name, data_element_keyword,"
            " value_representation, is_private, etl_created_datetime, etl_modified_datetime)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(t("dicom_data_element"))
        self.insert_metadata = sql.SQL(
            "INSERT INTO {} (metadata_id, data_element_id, metadata_source_keyword, metadata_source_tag,"
            " metadata_source_group_number, metadata_source_value_representation,"
            " metadata_source_value_multiplicity, metadata_source_value, is_sequence, sequence_length,"
            " parent_sequence_id, parent_dataset_id, is_private, private_creator, sop_instance_id,"
            " instance_number, image_occurrence_id, etl_created_datetime, etl_modified_datetime)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(t("dicom_file_metadata"))


def run(
    conn: psycopg.Connection,
    schema: str,
    vocab_schema: str,
    paths: list[str],
    mapping: tuple[str, str, str, str] | None = None,
) -> BaselineResult:
    """Ingest ``paths`` row by row into ``schema`` (made by create_schema); conn must be autocommit."""
    assert conn.autocommit, "the original committed every statement: use an autocommit connection"
    s = _Statements(schema, vocab_schema, mapping)
    result = BaselineResult()
    next_metadata_id = 1  # client-side, like the original's uuid4()
    next_dataset_id = 1

    def one(query, params=None):
        result.statements += 1
        row = conn.execute(query, params).fetchone()
        return row[0] if row else None

    def execute(query, params):
        result.statements += 1
        conn.execute(query, params)

    for path in paths:
        result.files += 1
        started = time.perf_counter()
        try:
            inst = read_instance(path)
        except DicomReadError:
            result.files_failed += 1
            result.seconds_parse += time.perf_counter() - started
            continue
        parsed = time.perf_counter()
        result.seconds_parse += parsed - started

        person_id = 0
        if s.person is not None and inst.patient_id:
            person_id = one(s.person, [inst.patient_id]) or 0
        procedure_id = one(s.next_procedure)
        execute(
            s.insert_procedure,
            [
                procedure_id,
                person_id,
                inst.procedure_date,
                (inst.study_description or "")[:50] or None,
            ],
        )
        result.rows["procedure_occurrence"] += 1
        modality_id = 0
        if inst.modality:
            name = one(s.modality_name, [inst.modality])
            if name:
                modality_id = one(s.modality_id, [name]) or 0
        site_id = 0
        if inst.body_part_examined:
            site_id = one(s.site_id, ["Entire " + inst.body_part_examined.strip()]) or 0
        image_id = one(s.next_image)
        execute(
            s.insert_image,
            [
                image_id,
                person_id,
                procedure_id,
                site_id,
                inst.image_date,
                inst.study_instance_uid,
                inst.series_instance_uid,
                modality_id,
            ],
        )
        result.rows["image_occurrence"] += 1

        now = dt.datetime.now()
        dataset_ids: dict[int, int] = {}
        for e in inst.elements:
            data_element_id = one(s.data_element_id, [e.dictionary_tag])
            if data_element_id is None:
                data_element_id = one(s.next_data_element)
                execute(
                    s.insert_data_element,
                    [
                        data_element_id,
                        e.dictionary_tag,
                        e.name,
                        e.keyword,
                        e.vr,
                        e.is_private,
                        now,
                        now,
                    ],
                )
                result.rows["dicom_data_element"] += 1
            if e.parent_item_index is not None and e.parent_item_index not in dataset_ids:
                dataset_ids[e.parent_item_index] = next_dataset_id
                next_dataset_id += 1
            execute(
                s.insert_metadata,
                [
                    next_metadata_id + e.index,
                    data_element_id,
                    e.keyword,
                    e.tag,
                    e.group,
                    e.vr,
                    e.vm,
                    e.value_json,
                    e.is_sequence,
                    e.sequence_length,
                    None
                    if e.parent_sequence_index is None
                    else next_metadata_id + e.parent_sequence_index,
                    dataset_ids.get(e.parent_item_index),
                    e.is_private,
                    e.private_creator.replace("\x00", "")[:255] if e.private_creator else None,
                    inst.sop_instance_uid,
                    inst.instance_number,
                    image_id,
                    now,
                    now,
                ],
            )
            result.rows["dicom_file_metadata"] += 1
        next_metadata_id += len(inst.elements)
        result.elements += len(inst.elements)
        result.files_ingested += 1
        result.seconds_database += time.perf_counter() - parsed
    return result
