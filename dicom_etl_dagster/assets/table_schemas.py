"""Column schemas (``dg.TableSchema``) of every table asset, so the UI documents the OMOP tables.

The columns are read once, at import, from the DDL the ETL runs (``dicom_etl_dagster/sql/*.sql``,
one ``-- table: <name>`` block per table), so what the UI shows never drifts from what is
created. Only the descriptions of the less obvious columns are written here.
"""

from __future__ import annotations

import re

import dagster as dg

from dicom_etl_dagster.core.db.ddl import SQL_DIR

_BLOCK_MARKER = re.compile(r"^-- table: (\w+)\s*$", re.MULTILINE)
_CREATE_TABLE = re.compile(r"CREATE TABLE \{schema\}\.(\w+) \((.*?)\n\);", re.DOTALL)
_COLUMN = re.compile(r"^\s*(\w+)\s+(\w+(?:\(\d+(?:,\s*\d+)?\))?)\s+(NOT NULL|NULL)\s*,?\s*$")
_PRIMARY_KEY = re.compile(r"CONSTRAINT \w+ PRIMARY KEY \(([^)]*)\)")
_CHECK = re.compile(r"CONSTRAINT (\w+) (CHECK \(.*\))\s*,?\s*$")
_UNIQUE_INDEX = re.compile(
    r"CREATE UNIQUE INDEX \w+ ON \{schema\}\.\w+ \(([^)]*)\)(\s+WHERE [^;]*)?;", re.DOTALL
)

#: Descriptions of the columns whose name does not say it all (the rest are standard OMOP).
COLUMN_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "vocabulary": {
        "vocabulary_version": "For DICOM: the pinned DICOM2OMOP commit the rows were loaded from.",
        "vocabulary_concept_id": "The concept describing the vocabulary itself (2128000000 for DICOM).",
    },
    "concept_class": {
        "concept_class_concept_id": "The concept describing the class (2128000001 DICOM Attributes, "
        "2128000002 DICOM Value Sets).",
    },
    "concept": {
        "standard_concept": "'S' standard, 'C' classification, NULL non-standard (all DICOM concepts are NULL).",
        "concept_code": "For DICOM: the attribute tag or the coded value (e.g. a Modality such as CT).",
        "valid_start_date": "DICOM rows: 1993-01-01.",
        "valid_end_date": "DICOM rows: 2099-12-31.",
        "invalid_reason": "NULL while valid; 'D' deleted, 'U' upgraded.",
    },
    "concept_relationship": {
        "relationship_id": "'Maps to' (value concept -> standard concept) or 'Maps to value'.",
    },
    "dicom_data_element": {
        "data_element_tag": "Tag as (gggg,eeee); repeating groups in mask form such as (60xx,3000).",
        "value_representation": "DICOM VR (PS3.5), e.g. DA, CS, SQ.",
        "value_multiplicity": "DICOM VM, e.g. 1, 1-n.",
        "is_private": "Private tag added by the ingest (keyed by tag, whatever the creator).",
        "retired_remarks": "Why / since when the tag is retired, from PS3.6.",
    },
    "procedure_occurrence": {
        "procedure_occurrence_id": "From the ETL's sequence; one row per StudyInstanceUID and person.",
        "person_id": "From the PatientID -> person mapping table; 0 under use_id_zero when unmapped.",
        "procedure_concept_id": "0 until mapped.",
        "procedure_date": "First valid of StudyDate, SeriesDate, AcquisitionDate, ContentDate.",
        "procedure_type_concept_id": "32817 (EHR).",
        "procedure_source_value": "StudyDescription, cut to 50 characters.",
    },
    "image_occurrence": {
        "image_occurrence_id": "From the ETL's sequence; one row per SeriesInstanceUID.",
        "procedure_occurrence_id": "The study's procedure_occurrence.",
        "anatomic_site_concept_id": "BodyPartExamined's standard 'Maps to' target, else the SNOMED "
        "concept named `Entire <body part>`, else 0.",
        "wadors_uri": "{DICOMweb root}/studies/{study}/series/{series}, set once the series is uploaded "
        "to a DICOMweb-capable server.",
        "local_path": "Folder of the series' first file.",
        "image_occurrence_date": "First valid of SeriesDate, AcquisitionDate, ContentDate, StudyDate.",
        "image_study_uid": "StudyInstanceUID.",
        "image_series_uid": "SeriesInstanceUID (unique).",
        "modality_concept_id": "DICOM value concept of the Modality, else the SNOMED Procedure of the same "
        "name, else 0.",
    },
    "dicom_file_metadata": {
        "metadata_id": "From the ETL's sequence; one row per data element of every dataset.",
        "data_element_id": "The tag's dicom_data_element row.",
        "metadata_source_tag": "Tag as (gggg,eeee).",
        "metadata_source_group_number": "Tag group, e.g. 0008.",
        "metadata_source_value": "The DICOM JSON model (PS3.18 F.2) Value as JSON; binary VRs as the "
        "base64 InlineBinary string. PixelData is never stored.",
        "is_sequence": "True for an SQ element; its items' elements point back to this row.",
        "sequence_length": "Number of items of a sequence.",
        "parent_sequence_id": "metadata_id of the sequence row this element is nested in (NULL at top level).",
        "parent_dataset_id": "Id of the sequence item (dataset) this element belongs to.",
        "private_creator": "Private creator string of a private element.",
        "sop_instance_id": "SOPInstanceUID of the file.",
        "instance_number": "InstanceNumber of the file.",
    },
    "dicom_ingest_log": {
        "file_path": "Every regular file seen under the folder, one row per path.",
        "file_size": "Size in bytes when processed (a change makes the next run read it again).",
        "file_mtime_ns": "Modification time (ns) when processed.",
        "status": "ingested, duplicate (same SOP Instance UID ingested from another path) or failed.",
        "error_message": "Human-readable reason of a failure (no patient data).",
        "image_occurrence_id": "Series the file was ingested into (for a duplicate: the ingested copy's).",
        "run_id": "Dagster run that processed the file.",
    },
    "file_upload_metadata": {
        "task_run_id": "Dagster run id and step.",
        "flow_run_id": "Dagster run id.",
        "instance_id": "Orthanc: its instance id; DICOMweb: the SOP Instance UID.",
        "uploaded_filename": "Orthanc: stored attachment (uuid + .dcm); DICOMweb: the instance's RetrieveURL.",
        "server_url": "DICOM server (never with credentials); unique with sop_instance_id.",
        "server_kind": "orthanc or dicomweb.",
        "file_size": "Bytes sent.",
    },
}

#: The table assets, with the DDL file each is created from.
TABLE_FILES = {
    "vocabulary": "vocabulary.sql",
    "concept_class": "vocabulary.sql",
    "concept": "vocabulary.sql",
    "concept_relationship": "vocabulary.sql",
    "procedure_occurrence": "cdm.sql",
    "dicom_data_element": "medical_imaging.sql",
    "image_occurrence": "medical_imaging.sql",
    "dicom_file_metadata": "medical_imaging.sql",
    "dicom_ingest_log": "medical_imaging.sql",
    "file_upload_metadata": "medical_imaging.sql",
}


def _blocks(sql_file: str) -> dict[str, str]:
    parts = _BLOCK_MARKER.split((SQL_DIR / sql_file).read_text())
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def parse_table(table: str, block: str) -> dg.TableSchema:
    """The TableSchema of one ``-- table:`` block of the DDL."""
    match = _CREATE_TABLE.search(block)
    if not match or match.group(1) != table:
        raise ValueError(f"no CREATE TABLE {{schema}}.{table} in its DDL block")
    columns: list[tuple[str, str, bool]] = []
    primary_key: list[str] = []
    checks: list[str] = []
    for line in match.group(2).splitlines():
        if column := _COLUMN.match(line):
            columns.append((column.group(1), column.group(2), column.group(3) == "NULL"))
        elif pk := _PRIMARY_KEY.search(line):
            primary_key = [c.strip() for c in pk.group(1).split(",")]
        elif check := _CHECK.search(line):
            checks.append(f"{check.group(1)}: {check.group(2)}")
        elif line.strip() and not line.strip().startswith("--"):
            raise ValueError(f"{table}: DDL line not understood: {line.strip()!r}")
    unique_sets = [
        ([c.strip() for c in m.group(1).split(",")], (m.group(2) or "").strip())
        for m in _UNIQUE_INDEX.finditer(block)
    ]
    descriptions = COLUMN_DESCRIPTIONS.get(table, {})
    unknown = set(descriptions) - {name for name, _, _ in columns}
    if unknown:
        raise ValueError(
            f"{table}: descriptions for columns the DDL does not have: {sorted(unknown)}"
        )

    table_columns = []
    for name, sql_type, nullable in columns:
        other = ["primary key"] if name in primary_key else []
        unique = primary_key == [name] or any(
            cols == [name] and not where for cols, where in unique_sets
        )
        other += [f"unique {where}" for cols, where in unique_sets if cols == [name] and where]
        table_columns.append(
            dg.TableColumn(
                name=name,
                type=sql_type,
                description=descriptions.get(name),
                constraints=dg.TableColumnConstraints(
                    nullable=nullable, unique=unique, other=other or None
                ),
            )
        )
    table_constraints = []
    if len(primary_key) > 1:
        table_constraints.append(f"primary key ({', '.join(primary_key)})")
    table_constraints += [
        f"unique ({', '.join(cols)}){' ' + where if where else ''}"
        for cols, where in unique_sets
        if len(cols) > 1
    ]
    table_constraints += checks
    return dg.TableSchema(
        columns=table_columns,
        constraints=dg.TableConstraints(other=table_constraints) if table_constraints else None,
    )


def _load() -> dict[str, dg.TableSchema]:
    blocks: dict[str, dict[str, str]] = {}
    schemas = {}
    for table, sql_file in TABLE_FILES.items():
        file_blocks = blocks.setdefault(sql_file, _blocks(sql_file))
        schemas[table] = parse_table(table, file_blocks[table])
    return schemas


TABLE_SCHEMAS: dict[str, dg.TableSchema] = _load()


def column_schema(table: str) -> dict[str, dg.TableSchema]:
    """Asset metadata documenting ``table``'s columns (shown in the UI's asset page)."""
    return {"dagster/column_schema": TABLE_SCHEMAS[table]}
