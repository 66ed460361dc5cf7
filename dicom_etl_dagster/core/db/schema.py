"""The ETL's tables as SQLAlchemy Core metadata: the one source of the DDL, the column
descriptions and the column schemas the UI shows.

Why one source: the tables used to be written three times (DDL files, a parser of them for the
UI, a dict of descriptions) and could drift. Here every table is a ``Table`` with its
columns, types, nullability, keys, CHECK constraints and indexes exactly as the ETL has always
created them (same constraint and index names: earlier releases are recognised by them, see
``core/db/migrations``), and each description is the column's ``comment``, so PostgreSQL gets
it as ``COMMENT ON COLUMN`` (``\\d+`` documents the tables) and the UI the same text.

Schema names are configurable per run, so the tables live in placeholder schemas (``CDM``,
``VOCAB``, ``MI``) that :func:`schema_translate_map` maps to the run's :class:`Schemas` at
execution time. The placeholders contain braces, which no validated schema name can, so a
placeholder can never be mistaken for a real schema (or reach the database untranslated).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.db.tables import ROW_TIMESTAMP_DEFAULT

CDM = "{cdm}"
VOCAB = "{vocab}"
MI = "{mi}"

#: Every table the ETL creates when missing, in creation order.
metadata = MetaData()
#: The ETL's own bookkeeping in the medical-imaging schema (not a table users query).
bookkeeping = MetaData()

#: A column type as Column takes it: an instance (String(20)) or a class (Integer).
ColumnType = sa.types.TypeEngine[Any] | type[sa.types.TypeEngine[Any]]

TIMESTAMP = DateTime(timezone=False)
TIMESTAMPTZ = DateTime(timezone=True)


def schema_translate_map(schemas: Schemas) -> dict[str | None, str | None]:
    """The execution option mapping the placeholder schemas to the run's schemas."""
    return {CDM: schemas.cdm, VOCAB: schemas.vocab, MI: schemas.medical_imaging}


def real_schema(table: Table, schemas: Schemas) -> str:
    """The run's schema of a metadata table."""
    translated = schema_translate_map(schemas)[table.schema]
    assert translated is not None
    return translated


def _id(name: str, type_: ColumnType = Integer, comment: str | None = None) -> Column:
    """A primary-key id column: NOT NULL, filled by the ETL (never SERIAL)."""
    return Column(name, type_, nullable=False, autoincrement=False, comment=comment)


def _col(name: str, type_: ColumnType, nullable: bool, comment: str | None = None) -> Column:
    return Column(name, type_, nullable=nullable, comment=comment)


# --------------------------------------------------------------------------
# Vocabulary schema: OMOP CDM v5.4 vocabulary tables the DICOM vocabulary is loaded into.
# An existing Athena vocabulary (the normal case) is never altered.
# --------------------------------------------------------------------------
vocabulary = Table(
    "vocabulary",
    metadata,
    Column("vocabulary_id", String(20), nullable=False),
    _col("vocabulary_name", String(255), False),
    _col("vocabulary_reference", String(255), True),
    _col(
        "vocabulary_version",
        String(255),
        True,
        "For DICOM: the pinned DICOM2OMOP commit the rows were loaded from.",
    ),
    _col(
        "vocabulary_concept_id",
        Integer,
        False,
        "The concept describing the vocabulary itself (2128000000 for DICOM).",
    ),
    PrimaryKeyConstraint("vocabulary_id", name="xpk_vocabulary"),
    schema=VOCAB,
    comment="OMOP CDM v5.4 vocabularies; DICOM is loaded from DICOM2OMOP.",
)

concept_class = Table(
    "concept_class",
    metadata,
    Column("concept_class_id", String(20), nullable=False),
    _col("concept_class_name", String(255), False),
    _col(
        "concept_class_concept_id",
        Integer,
        False,
        "The concept describing the class (2128000001 DICOM Attributes, "
        "2128000002 DICOM Value Sets).",
    ),
    PrimaryKeyConstraint("concept_class_id", name="xpk_concept_class"),
    schema=VOCAB,
    comment="OMOP CDM v5.4 concept classes.",
)

concept = Table(
    "concept",
    metadata,
    _id("concept_id"),
    _col("concept_name", String(255), False),
    _col("domain_id", String(20), False),
    _col("vocabulary_id", String(20), False),
    _col("concept_class_id", String(20), False),
    _col(
        "standard_concept",
        String(1),
        True,
        "'S' standard, 'C' classification, NULL non-standard (all DICOM concepts are NULL).",
    ),
    _col(
        "concept_code",
        String(50),
        False,
        "For DICOM: the attribute tag or the coded value (e.g. a Modality such as CT).",
    ),
    _col("valid_start_date", Date, False, "DICOM rows: 1993-01-01."),
    _col("valid_end_date", Date, False, "DICOM rows: 2099-12-31."),
    _col("invalid_reason", String(1), True, "NULL while valid; 'D' deleted, 'U' upgraded."),
    PrimaryKeyConstraint("concept_id", name="xpk_concept"),
    schema=VOCAB,
    comment="OMOP CDM v5.4 concepts; the DICOM attributes and value sets come from DICOM2OMOP.",
)
Index("idx_concept_code", concept.c.concept_code)
Index("idx_concept_vocabluary_id", concept.c.vocabulary_id)  # OMOP's own (misspelt) name
# Concept mapping matches names case-insensitively (modality -> SNOMED procedure, "Entire <body part>").
Index("idx_concept_upper_name", sa.func.upper(concept.c.concept_name))

concept_relationship = Table(
    "concept_relationship",
    metadata,
    Column("concept_id_1", Integer, nullable=False, autoincrement=False),
    Column("concept_id_2", Integer, nullable=False, autoincrement=False),
    _col(
        "relationship_id",
        String(20),
        False,
        "'Maps to' (value concept -> standard concept) or 'Maps to value'.",
    ),
    _col("valid_start_date", Date, False),
    _col("valid_end_date", Date, False),
    _col("invalid_reason", String(1), True),
    PrimaryKeyConstraint(
        "concept_id_1", "concept_id_2", "relationship_id", name="xpk_concept_relationship"
    ),
    schema=VOCAB,
    comment="OMOP CDM v5.4 relationships between concepts ('Maps to' for DICOM values).",
)
Index("idx_concept_relationship_id_2", concept_relationship.c.concept_id_2)

# --------------------------------------------------------------------------
# CDM schema: OMOP CDM v5.4 clinical tables the imaging ETL writes to.
# --------------------------------------------------------------------------
person = Table(
    "person",
    metadata,
    _id("person_id"),
    _col("gender_concept_id", Integer, False),
    _col("year_of_birth", Integer, False),
    _col("month_of_birth", Integer, True),
    _col("day_of_birth", Integer, True),
    _col("birth_datetime", TIMESTAMP, True),
    _col("race_concept_id", Integer, False),
    _col("ethnicity_concept_id", Integer, False),
    _col("location_id", Integer, True),
    _col("provider_id", Integer, True),
    _col("care_site_id", Integer, True),
    _col("person_source_value", String(50), True),
    _col("gender_source_value", String(50), True),
    _col("gender_source_concept_id", Integer, True),
    _col("race_source_value", String(50), True),
    _col("race_source_concept_id", Integer, True),
    _col("ethnicity_source_value", String(50), True),
    _col("ethnicity_source_concept_id", Integer, True),
    PrimaryKeyConstraint("person_id", name="xpk_person"),
    schema=CDM,
    comment="OMOP CDM v5.4 persons; the imaging ETL reads person ids from the mapping table "
    "and never writes here.",
)

procedure_occurrence = Table(
    "procedure_occurrence",
    metadata,
    _id(
        "procedure_occurrence_id",
        comment="From the ETL's sequence; one row per StudyInstanceUID and person.",
    ),
    _col(
        "person_id",
        Integer,
        False,
        "From the PatientID -> person mapping table; 0 under use_id_zero when unmapped.",
    ),
    _col(
        "procedure_concept_id",
        Integer,
        False,
        "Standard concept of the Procedure Code Sequence, else the SNOMED procedure of the "
        "study's imaging modality, else 0.",
    ),
    _col(
        "procedure_date",
        Date,
        False,
        "First valid of StudyDate, SeriesDate, AcquisitionDate, ContentDate.",
    ),
    _col("procedure_datetime", TIMESTAMP, True, "procedure_date with its time (StudyTime)."),
    _col("procedure_end_date", Date, True),
    _col("procedure_end_datetime", TIMESTAMP, True),
    _col("procedure_type_concept_id", Integer, False, "32817 (EHR)."),
    _col("modifier_concept_id", Integer, True),
    _col("quantity", Integer, True),
    _col("provider_id", Integer, True),
    _col("visit_occurrence_id", Integer, True),
    _col("visit_detail_id", Integer, True),
    _col("procedure_source_value", String(50), True, "StudyDescription, cut to 50 characters."),
    _col(
        "procedure_source_concept_id",
        Integer,
        True,
        "Concept of the matched procedure code (0/NULL: none matched).",
    ),
    _col("modifier_source_value", String(50), True),
    PrimaryKeyConstraint("procedure_occurrence_id", name="xpk_procedure_occurrence"),
    schema=CDM,
    comment="OMOP CDM v5.4 procedures; the DICOM ETL writes one per imaging study and person.",
)
Index("idx_procedure_person_id", procedure_occurrence.c.person_id)

measurement = Table(
    "measurement",
    metadata,
    _id("measurement_id", comment="From the ETL's sequence."),
    _col("person_id", Integer, False),
    _col(
        "measurement_concept_id",
        Integer,
        False,
        "Standard target of the source concept; else (MI-CDM recipe) the DICOM concept itself, "
        "or 0 with non_standard_measurement_concepts: zero.",
    ),
    _col("measurement_date", Date, False, "The series' date (image_occurrence_date)."),
    _col("measurement_datetime", TIMESTAMP, True, "The series' date and time."),
    _col("measurement_time", String(10), True),
    _col("measurement_type_concept_id", Integer, False, "32817 (EHR)."),
    _col("operator_concept_id", Integer, True),
    _col("value_as_number", sa.Numeric, True, "Numeric value (acquisition attribute, SR NUM)."),
    _col(
        "value_as_concept_id",
        Integer,
        True,
        "Coded value: the DICOM value concept's standard target, else the value concept.",
    ),
    _col("unit_concept_id", Integer, True, "UCUM concept of unit_source_value; 0 if absent."),
    _col("range_low", sa.Numeric, True),
    _col("range_high", sa.Numeric, True),
    _col("provider_id", Integer, True),
    _col("visit_occurrence_id", Integer, True, "The study's visit (see procedure_occurrence)."),
    _col("visit_detail_id", Integer, True),
    _col(
        "measurement_source_value",
        String(50),
        True,
        "The attribute keyword, or SCHEME:code of an SR concept name.",
    ),
    _col(
        "measurement_source_concept_id",
        Integer,
        True,
        "The DICOM attribute concept, or the concept of the SR concept name code; 0 if none.",
    ),
    _col("unit_source_value", String(50), True, "UCUM code (PS3.3's unit, or the SR's)."),
    _col("unit_source_concept_id", Integer, True),
    _col("value_source_value", String(50), True, "The value as the file holds it, cut to 50."),
    _col("measurement_event_id", BigInteger, True),
    _col("meas_event_field_concept_id", Integer, True),
    PrimaryKeyConstraint("measurement_id", name="xpk_measurement"),
    schema=CDM,
    comment="OMOP CDM v5.4 measurements; the DICOM ETL writes acquisition parameters per "
    "series and structured-report measurements, each linked by an image_feature row.",
)
Index("idx_measurement_person_id", measurement.c.person_id)

# --------------------------------------------------------------------------
# Medical-imaging schema: the MI-CDM tables, the DICOM data dictionary and metadata EAV table,
# the upload record and the ingest ledger. The ETL's id sequences live here too, so that the
# user's CDM schema only receives rows.
# --------------------------------------------------------------------------
image_occurrence = Table(
    "image_occurrence",
    metadata,
    _id(
        "image_occurrence_id",
        comment="From the ETL's sequence; one row per SeriesInstanceUID.",
    ),
    _col("person_id", Integer, False),
    _col("procedure_occurrence_id", Integer, False, "The study's procedure_occurrence."),
    _col("visit_occurrence_id", Integer, True),
    _col(
        "anatomic_site_concept_id",
        Integer,
        True,
        "BodyPartExamined's standard 'Maps to' target, else the SNOMED "
        "concept named `Entire <body part>`, else 0.",
    ),
    _col(
        "wadors_uri",
        Text,
        True,
        "{DICOMweb root}/studies/{study}/series/{series}, set once the series is uploaded "
        "to a DICOMweb-capable server.",
    ),
    _col("local_path", Text, True, "Folder of the series' first file."),
    _col(
        "image_occurrence_date",
        Date,
        False,
        "First valid of SeriesDate, AcquisitionDate, ContentDate, StudyDate.",
    ),
    _col("image_study_uid", String(250), False, "StudyInstanceUID."),
    _col("image_series_uid", String(250), False, "SeriesInstanceUID (unique)."),
    _col(
        "modality_concept_id",
        Integer,
        False,
        "DICOM value concept of the Modality, else the SNOMED Procedure of the same name, else 0.",
    ),
    PrimaryKeyConstraint("image_occurrence_id", name="xpk_image_occurrence"),
    schema=MI,
    comment="MI-CDM image occurrences: one row per DICOM series (SeriesInstanceUID).",
)
# One row per series, enforced by the database, not only by the ETL's lock.
Index("idx_image_occurrence_series_uid", image_occurrence.c.image_series_uid, unique=True)
Index("idx_image_occurrence_study_uid", image_occurrence.c.image_study_uid)

image_feature = Table(
    "image_feature",
    metadata,
    _id("image_feature_id"),
    _col("person_id", Integer, False),
    _col("image_occurrence_id", Integer, False),
    _col("image_feature_event_field_concept_id", Integer, True),
    _col("image_feature_event_id", Integer, True),
    _col("image_feature_concept_id", Integer, False),
    _col("image_feature_type_concept_id", Integer, False),
    _col("image_finding_concept_id", Integer, True),
    _col("image_finding_id", Integer, True),
    _col("anatomic_site_concept_id", Integer, True),
    _col("alg_system", Text, True),
    _col("alg_datetime", TIMESTAMP, True),
    PrimaryKeyConstraint("image_feature_id", name="xpk_image_feature"),
    schema=MI,
    comment="MI-CDM image features: what was measured or found in an image occurrence.",
)

feature_source = Table(
    "dicom_etl_feature_source",
    metadata,
    _id("image_feature_id", BigInteger, "The image_feature row (and its measurement, if any)."),
    _col("measurement_id", BigInteger, True, "The measurement the feature points at, if any."),
    _col(
        "sop_instance_uid",
        String(64),
        False,
        "The SR or SEG instance the row was read from: when that file changes, its rows are "
        "replaced, not duplicated.",
    ),
    PrimaryKeyConstraint("image_feature_id", name="xpk_dicom_etl_feature_source"),
    schema=MI,
    comment="Which SR / SEG instance each image_feature and measurement row came from "
    "(acquisition rows belong to their series and are not listed).",
)
Index(
    "idx_dicom_etl_feature_source_sop",
    feature_source.c.sop_instance_uid,
    postgresql_using="hash",
)

dicom_data_element = Table(
    "dicom_data_element",
    metadata,
    _id(
        "data_element_id",
        comment="From the ETL's sequence; dicom_file_metadata.data_element_id points here.",
    ),
    _col(
        "data_element_tag",
        String(20),
        False,
        "Tag as (gggg,eeee); repeating groups in mask form such as (60xx,3000).",
    ),
    _col("data_element_name", String(255), True, "Attribute name from PS3.6, e.g. Study Date."),
    _col(
        "data_element_keyword",
        String(255),
        True,
        "Attribute keyword from PS3.6, e.g. StudyDate (without zero-width spaces).",
    ),
    _col("value_representation", String(20), True, "DICOM VR (PS3.5), e.g. DA, CS, SQ."),
    _col("value_multiplicity", String(20), True, "DICOM VM, e.g. 1, 1-n."),
    _col(
        "is_private",
        Boolean,
        True,
        "Private entry added by the ingest: one per private creator (see private_creator).",
    ),
    _col("is_retired", Boolean, True, "True for an attribute PS3.6 lists as retired."),
    _col(
        "retired_remarks",
        String(255),
        True,
        "Why / since when the tag is retired, from PS3.6.",
    ),
    _col("etl_created_datetime", TIMESTAMP, False, "When the ETL added the row."),
    _col("etl_modified_datetime", TIMESTAMP, False, "When the ETL last changed the row."),
    # Last: revision 0004 adds it to existing tables, where ADD COLUMN puts it at the end.
    _col(
        "private_creator",
        String(255),
        True,
        "Private creator of a private entry, whose data_element_tag is then (gggg,xxee) for "
        "any block or (gggg,00xx) for the creator element, named only from pydicom's private "
        "dictionary of that creator. NULL: a public tag, a private element without a creator, "
        "or a private entry written before revision 0004 (keyed by tag alone).",
    ),
    PrimaryKeyConstraint("data_element_id", name="xpk_dicom_data_element"),
    schema=MI,
    comment="The DICOM data dictionary (PS3.6, from DICOM2OMOP) plus the unknown tags met "
    "while ingesting, once each, and the private elements, once per private creator.",
)
# Public tags (and private elements without a creator) are keyed by tag, private elements by
# their creator and (gggg,xxee): the same masked tag of two vendors is two entries.
Index(
    "idx_dicom_data_element_tag",
    dicom_data_element.c.data_element_tag,
    unique=True,
    postgresql_where=dicom_data_element.c.private_creator.is_(None),
)
Index(
    "idx_dicom_data_element_private",
    dicom_data_element.c.private_creator,
    dicom_data_element.c.data_element_tag,
    unique=True,
    postgresql_where=dicom_data_element.c.private_creator.isnot(None),
)


def _file_metadata_columns() -> list[Column]:
    """dicom_file_metadata's columns, in order (the partitioned and the plain layout share them)."""
    return [
        _id(
            "metadata_id",
            BigInteger,
            "From the ETL's sequence; one row per data element of every dataset.",
        ),
        _col("data_element_id", Integer, True, "The tag's dicom_data_element row."),
        _col(
            "metadata_source_keyword",
            String(255),
            True,
            "Attribute keyword from the DICOM dictionary, e.g. StudyDate (NULL for private tags).",
        ),
        _col("metadata_source_tag", String(20), False, "Tag as (gggg,eeee)."),
        _col("metadata_source_group_number", String(20), True, "Tag group, e.g. 0008."),
        _col(
            "metadata_source_value_representation",
            String(20),
            True,
            "VR of the element as read from the file (PS3.5).",
        ),
        _col(
            "metadata_source_value_multiplicity",
            String(20),
            True,
            "Number of values the element holds.",
        ),
        _col(
            "metadata_source_value",
            Text,
            True,
            "The DICOM JSON model (PS3.18 F.2) Value as JSON; binary VRs as the "
            "base64 InlineBinary string. PixelData is never stored.",
        ),
        _col(
            "is_sequence",
            Boolean,
            True,
            "True for an SQ element; its items' elements point back to this row.",
        ),
        _col("sequence_length", Integer, True, "Number of items of a sequence."),
        _col(
            "parent_sequence_id",
            BigInteger,
            True,
            "metadata_id of the sequence row this element is nested in (NULL at top level).",
        ),
        _col(
            "parent_dataset_id",
            BigInteger,
            True,
            "Id of the sequence item (dataset) this element belongs to.",
        ),
        _col("is_private", Boolean, True, "True for a private element (odd group number)."),
        _col("private_creator", String(255), True, "Private creator string of a private element."),
        _col("sop_instance_id", String(255), True, "SOPInstanceUID of the file."),
        _col("instance_number", Integer, True, "InstanceNumber of the file."),
        _col("image_occurrence_id", Integer, False, "Series (image_occurrence) of the file."),
        # Filled by the default: text timestamps cost PostgreSQL's COPY about a fifth of its
        # CPU per row (the writer sends them only to a table without it, a user's).
        Column(
            "etl_created_datetime",
            TIMESTAMP,
            nullable=False,
            server_default=sa.text(ROW_TIMESTAMP_DEFAULT),
            comment="When the ETL wrote the row.",
        ),
        Column(
            "etl_modified_datetime",
            TIMESTAMP,
            nullable=False,
            server_default=sa.text(ROW_TIMESTAMP_DEFAULT),
            comment="When the ETL last changed the row.",
        ),
    ]


_FILE_METADATA_COMMENT = (
    "Every data element of every ingested DICOM file except pixel data (EAV; values "
    "as in the DICOM JSON model; nested sequences and private tags included)."
)

# Created by the ETL since revision 0007: partitioned by metadata_id ranges
# (core/db/partitions.py creates the partitions ahead of the writers), so billions of rows
# stay manageable partition by partition. Per file (~193 rows) only the PK is per row:
# a changed file's rows are deleted by the id range its ledger row records, the
# twice-in-metadata check finds the one top-level SOPInstanceUID row per file through a
# partial index, and rows by series go through BRIN (rows arrive in series order).
dicom_file_metadata = Table(
    "dicom_file_metadata",
    metadata,
    *_file_metadata_columns(),
    PrimaryKeyConstraint("metadata_id", name="xpk_dicom_file_metadata"),
    schema=MI,
    comment=_FILE_METADATA_COMMENT,
    postgresql_partition_by="RANGE (metadata_id)",
)
#: Tag and nesting of the one row per file that holds its SOPInstanceUID.
FILE_SOP_TAG = "(0008,0018)"
Index(
    "idx_dicom_file_metadata_file_sop",
    dicom_file_metadata.c.sop_instance_id,
    postgresql_where=sa.text(
        f"metadata_source_tag = '{FILE_SOP_TAG}' AND parent_sequence_id IS NULL"
    ),
)
Index(
    "idx_dicom_file_metadata_image_occurrence_brin",
    dicom_file_metadata.c.image_occurrence_id,
    postgresql_using="brin",
)

# The layout releases up to revision 0006 created, which upgraded installs keep (a plain
# table: converting it is the user's choice, see the README). Not part of ``metadata``:
# revision 0002 shapes such a table's SOP index from it.
plain_layout = MetaData()
plain_file_metadata = Table(
    "dicom_file_metadata",
    plain_layout,
    *_file_metadata_columns(),
    PrimaryKeyConstraint("metadata_id", name="xpk_dicom_file_metadata"),
    schema=MI,
    comment=_FILE_METADATA_COMMENT,
)
# SOP Instance UIDs are only ever looked up by equality; with ~200 rows per instance a hash
# index costs the bulk COPY about 10% less PostgreSQL CPU than a B-tree (scripts/benchmark.py).
Index(
    "idx_dicom_file_metadata_sop_instance",
    plain_file_metadata.c.sop_instance_id,
    postgresql_using="hash",
)
Index("idx_dicom_file_metadata_image_occurrence", plain_file_metadata.c.image_occurrence_id)

# One row per SOP instance stored on a DICOM server. The original plugin's columns, plus
# server_kind (orthanc | dicomweb: what instance_id / uploaded_filename hold) and file_size
# (bytes sent). Orthanc: instance_id is Orthanc's instance id, uploaded_filename its stored
# file (attachment uuid + .dcm); DICOMweb: the SOP Instance UID and the instance's RetrieveURL.
file_upload_metadata = Table(
    "file_upload_metadata",
    metadata,
    _id("file_upload_id", BigInteger, "From the ETL's sequence."),
    _col("task_run_id", String(255), False, "Dagster run id and step."),
    _col("flow_run_id", String(255), False, "Dagster run id."),
    _col("original_filename", String(255), False, "Name of the file sent."),
    _col("original_file_path", Text, True, "Ledger path of the file sent."),
    _col(
        "instance_id",
        String(255),
        False,
        "Orthanc: its instance id; DICOMweb: the SOP Instance UID.",
    ),
    _col(
        "uploaded_filename",
        Text,
        False,
        "Orthanc: stored attachment (uuid + .dcm); DICOMweb: the instance's RetrieveURL.",
    ),
    _col("uploaded_datetime", TIMESTAMP, False, "When the server accepted the file."),
    _col("image_occurrence_id", Integer, False, "Series (image_occurrence) of the instance."),
    _col("sop_instance_id", String(255), False, "SOPInstanceUID of the instance."),
    _col(
        "server_url",
        Text,
        False,
        "DICOM server (never with credentials); unique with sop_instance_id.",
    ),
    _col("server_kind", String(20), True, "orthanc or dicomweb."),
    _col("file_size", BigInteger, True, "Bytes sent."),
    PrimaryKeyConstraint("file_upload_id", name="xpk_file_upload_metadata"),
    schema=MI,
    comment="One row per SOP instance stored on a DICOM server (Orthanc REST or DICOMweb "
    "STOW-RS), so an OMOP row leads back to the stored image.",
)
# An instance is recorded once per server, also when two runs upload it at the same time.
Index(
    "idx_file_upload_metadata_server_sop",
    file_upload_metadata.c.server_url,
    file_upload_metadata.c.sop_instance_id,
    unique=True,
)
Index("idx_file_upload_metadata_sop_instance", file_upload_metadata.c.sop_instance_id)
Index("idx_file_upload_metadata_image_occurrence", file_upload_metadata.c.image_occurrence_id)

# A table of its own rather than a status in file_upload_metadata: that table may be the
# original plugin's (never altered), its columns are NOT NULL facts of a stored instance,
# and every row of it must lead to an image on the server. One row per (server, file path);
# the upload sends the file again once its ledger size or mtime differs from the row's.
file_upload_rejection = Table(
    "file_upload_rejection",
    metadata,
    _col("server_url", Text, False, "DICOM server that refused the file (never with credentials)."),
    _col("file_path", Text, False, "Ledger path of the file (dicom_ingest_log.file_path)."),
    _col("server_kind", String(20), False, "orthanc or dicomweb."),
    _col("sop_instance_uid", String(255), False, "SOPInstanceUID of the file, as ingested."),
    _col(
        "file_size",
        BigInteger,
        True,
        "Ledger size when it was sent; once the ledger differs, the file is sent again.",
    ),
    _col(
        "file_mtime_ns",
        BigInteger,
        True,
        "Ledger modification time (ns) when it was sent; as file_size.",
    ),
    _col("http_status", Integer, True, "HTTP status of the server's answer (e.g. 400, 409)."),
    _col(
        "reason",
        Text,
        False,
        "The server's reason, e.g. Orthanc's 'Bad file format: Cannot parse an invalid DICOM "
        "file' or a STOW-RS Failure Reason.",
    ),
    _col("times_rejected", Integer, False, "How often the file was sent and refused."),
    _col("first_rejected_at", TIMESTAMPTZ, False, "When the server first refused the file."),
    _col("rejected_at", TIMESTAMPTZ, False, "When the server last refused the file."),
    _col("run_id", String(255), False, "Dagster run that last sent the file."),
    PrimaryKeyConstraint("server_url", "file_path", name="xpk_file_upload_rejection"),
    CheckConstraint("reason <> ''", name="chk_file_upload_rejection_reason"),
    schema=MI,
    comment="Ingested files a DICOM server refused for their content (HTTP 4xx other than "
    "401/403/404/405, STOW-RS failures): not sent again until the file changes or "
    "retry_rejected_uploads is true; a file later stored loses its row.",
)

dicom_ingest_log = Table(
    "dicom_ingest_log",
    metadata,
    _id("ingest_log_id", BigInteger, "From the ETL's sequence."),
    _col("file_path", Text, False, "Every regular file seen under the folder, one row per path."),
    _col(
        "file_size",
        BigInteger,
        True,
        "Size in bytes when processed (a change makes the next run read it again).",
    ),
    _col("file_mtime_ns", BigInteger, True, "Modification time (ns) when processed."),
    _col(
        "status",
        String(20),
        False,
        "ingested, duplicate (same SOP Instance UID ingested from another path) or failed.",
    ),
    _col("error_message", Text, True, "Human-readable reason of a failure (no patient data)."),
    _col(
        "sop_instance_uid",
        String(255),
        True,
        "SOPInstanceUID of the file (NULL when it could not be read).",
    ),
    _col(
        "image_occurrence_id",
        Integer,
        True,
        "Series the file was ingested into (for a duplicate: the ingested copy's).",
    ),
    _col("run_id", String(255), True, "Dagster run that processed the file."),
    _col("processed_at", TIMESTAMPTZ, False, "When the file was last processed."),
    # Revision 0005: odd values (a value that violates its VR is kept, not a failure).
    _col(
        "value_warnings",
        Integer,
        True,
        "Elements whose value violates its VR (an IS '1A', a date '20231399'), stored "
        "verbatim in dicom_file_metadata; NULL when the file could not be read.",
    ),
    _col(
        "value_warning_tags",
        Text,
        True,
        "The first five distinct tags of those elements, comma-separated (tags only: the "
        "values may be patient data).",
    ),
    # Revision 0007: where the file's rows are (contiguous ids), so a changed file's rows
    # are deleted through the primary key, not an index on sop_instance_id.
    _col(
        "metadata_id_first",
        BigInteger,
        True,
        "First dicom_file_metadata.metadata_id of the ingested file's rows (NULL: not "
        "ingested, or ingested before revision 0007).",
    ),
    _col(
        "metadata_row_count",
        Integer,
        True,
        "How many dicom_file_metadata rows the ingested file has, from metadata_id_first on.",
    ),
    PrimaryKeyConstraint("ingest_log_id", name="xpk_dicom_ingest_log"),
    CheckConstraint(
        "status IN ('ingested', 'failed', 'duplicate')", name="chk_dicom_ingest_log_status"
    ),
    CheckConstraint(
        "status <> 'failed' OR coalesce(error_message, '') <> ''",
        name="chk_dicom_ingest_log_reason",
    ),
    schema=MI,
    comment="The ingest ledger: one row per file path seen, ingested, duplicate or failed "
    "(a failure always with its reason).",
)
# One ledger row per path, and a SOP instance is ingested from one path only.
Index("idx_dicom_ingest_log_path", dicom_ingest_log.c.file_path, unique=True)
Index(
    "idx_dicom_ingest_log_ingested_sop",
    dicom_ingest_log.c.sop_instance_uid,
    unique=True,
    postgresql_where=sa.text("status = 'ingested'"),
)
# The asset checks read the files of one run (revision 0007): without it, a scan of the whole
# ledger after every run, a hundred million rows at a large archive.
Index("idx_dicom_ingest_log_run", dicom_ingest_log.c.run_id)

#: Columns without a comment: standard OMOP CDM v5.4 / MI-CDM columns whose meaning is the
#: standard's (https://ohdsi.github.io/CommonDataModel/cdm54.html). Every other column of
#: every table has a comment (tested).
STANDARD_COLUMNS: dict[str, frozenset[str]] = {
    "vocabulary": frozenset({"vocabulary_id", "vocabulary_name", "vocabulary_reference"}),
    "concept_class": frozenset({"concept_class_id", "concept_class_name"}),
    "concept": frozenset(
        {"concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id"}
    ),
    "concept_relationship": frozenset(
        {"concept_id_1", "concept_id_2", "valid_start_date", "valid_end_date", "invalid_reason"}
    ),
    "person": frozenset(c.name for c in person.columns),
    "procedure_occurrence": frozenset(
        {
            "procedure_end_date",
            "procedure_end_datetime",
            "modifier_concept_id",
            "quantity",
            "provider_id",
            "visit_occurrence_id",
            "visit_detail_id",
            "modifier_source_value",
        }
    ),
    "image_occurrence": frozenset({"person_id", "visit_occurrence_id"}),
    "image_feature": frozenset(c.name for c in image_feature.columns),
    "measurement": frozenset(
        {
            "person_id",
            "measurement_time",
            "operator_concept_id",
            "range_low",
            "range_high",
            "provider_id",
            "visit_detail_id",
            "unit_source_concept_id",
            "measurement_event_id",
            "meas_event_field_concept_id",
        }
    ),
}

# --------------------------------------------------------------------------
# Bookkeeping (medical-imaging schema). The version table (tables.VERSION_TABLE) is Alembic's.
# --------------------------------------------------------------------------

owned_table = Table(
    "dicom_etl_owned_table",
    bookkeeping,
    Column("table_schema", Text, nullable=False),
    Column("table_name", Text, nullable=False),
    Column("owned_since_revision", String(32), nullable=False),
    Column("recorded_at", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    PrimaryKeyConstraint("table_schema", "table_name", name="xpk_dicom_etl_owned_table"),
    schema=MI,
    comment="Tables of this schema the DICOM ETL created and may upgrade; every other table "
    "is the user's and is never altered (see dicom_etl_dagster/core/db/migrations).",
)
