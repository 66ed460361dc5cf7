"""Injection, secrets and PHI.

* Schema names from the options document that are not plain identifiers are refused before
  any SQL runs (the mapping-table names are covered by
  assets/test_imaging.py::test_identifier_injection_in_mapping_is_refused; this adds the three
  schema names, both jobs, and proves "before any SQL": the database URL points at a database
  that does not exist, so any connection attempt would change the error).
* DICOM values with quotes, backslashes, NUL bytes and SQL fragments are stored verbatim in
  dicom_file_metadata (as their DICOM JSON model value; NUL is kept, JSON-escaped as \\u0000).
  In the OMOP text columns (procedure_source_value) NUL is removed on purpose: PostgreSQL text
  cannot hold it. A PatientID that is an SQL fragment matches no one.
* The database password and the DICOM server credentials never appear in events, logs,
  errors, materialization metadata or the run config (the failing-connection case is covered
  by test_definitions.py::test_database_password_never_reaches_config_logs_or_errors and
  test_cli.py; here a *successful* run and an upload failure).
* PHI: patient name, birth date and id never appear in logs above DEBUG nor in metadata, also
  for broken files and `skip` misses.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import urlsplit, urlunsplit

import dagster as dg
import pytest

from dicom_etl_dagster.core.db.identifiers import (
    InvalidIdentifierError,
    Schemas,
    validate_identifier,
)
from dicom_etl_dagster.definitions import build_definitions
from dicom_etl_dagster.resources.database import PostgresResource
from dicom_etl_dagster.resources.dicom_server import DicomServerResource
from dicom_etl_dagster_tests.conftest import _with_database, scalar
from dicom_etl_dagster_tests.helpers import options, run_job
from dicom_etl_dagster_tests.reliability import hostile
from dicom_etl_dagster_tests.reliability.figures import FIGURES

MI = "cdmmedicalimaging"
HOSTILE_NAMES = [
    'x"; DROP SCHEMA public CASCADE; --',
    "cdm default",
    "cdm-default",
    "public.person",
    'a"b',
    "1starts_with_digit",
    "ünïcode",
    "x" * 64,
    "tab\there",
    "nul\x00byte",
    "semi;colon",
]
SCHEMA_FIELDS = ["cdm_schema_name", "vocab_schema_name", "medical_imaging_schema_name"]


def _step_failure_message(result) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures, "the run was expected to fail with a step failure"
    return failures[0].step_failure_data.error.message


# --------------------------------------------------------------------------
# Identifiers
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_core_refuses_every_non_plain_identifier(name):
    with pytest.raises(InvalidIdentifierError, match="not a plain SQL identifier"):
        validate_identifier(name, "x")
    with pytest.raises(InvalidIdentifierError):
        Schemas(cdm=name)
    FIGURES["identifiers_refused"] += 1


@pytest.mark.parametrize("job", ["ingest_metadata", "load_vocab"])
@pytest.mark.parametrize("field", SCHEMA_FIELDS)
def test_schema_name_injection_is_refused_before_any_sql(job, field, postgres_server, tmp_path):
    folder = tmp_path / "dicom"
    hostile.clone(hostile.CT_SMALL, folder / "ct.dcm")
    # A database that does not exist: had anything connected, the error would say so.
    missing_db = _with_database(postgres_server.get_uri(), "no_such_database_reliability")
    value = 'x"; DROP SCHEMA public CASCADE; --'
    result = run_job(
        job,
        missing_db,
        options(dicom_files_abs_path=str(folder), **{field: value}),
        raise_on_error=False,
    )
    assert not result.success
    message = _step_failure_message(result)
    assert "is not a plain SQL identifier" in message and field in message, message
    assert "cannot connect" not in message and "does not exist" not in message, message
    FIGURES["identifiers_refused"] += 1


# --------------------------------------------------------------------------
# Values stored verbatim
# --------------------------------------------------------------------------
NASTY = {
    # keyword: (VR, value written, JSON value expected in dicom_file_metadata)
    "StudyDescription": (
        "LO",
        "Robert'); DROP TABLE cdmdefault.person;--",
        ["Robert'); DROP TABLE cdmdefault.person;--"],
    ),
    "PatientComments": (
        "LT",
        "it's \"quoted\" \\ back\\slash $$ dollar $$ E'\\x00' \x00 after NUL; COPY x FROM STDIN",
        ["it's \"quoted\" \\ back\\slash $$ dollar $$ E'\\x00' \x00 after NUL; COPY x FROM STDIN"],
    ),
    "ImageComments": (
        "LT",
        "tab\tnew\nline\r\\N \\. end-of-copy marker",
        ["tab\tnew\nline\r\\N \\. end-of-copy marker"],
    ),
    "SeriesDescription": ("LO", "a\\b", ["a", "b"]),  # backslash is the DICOM value separator
    "InstitutionName": ("LO", "' OR '1'='1", ["' OR '1'='1"]),
}


def test_hostile_values_are_stored_verbatim(database_url, db, tmp_path):
    folder = tmp_path / "dicom"
    attrs = {keyword: value for keyword, (_vr, value, _json) in NASTY.items()}
    ds = hostile.clone(hostile.CT_SMALL, folder / "nasty.dcm", PatientID="' OR '1'='1", **attrs)
    # a mapping table with one real person: the SQL-fragment PatientID must not match it
    db.execute(f"CREATE SCHEMA {MI}")
    db.execute(f"CREATE TABLE {MI}.mappingtable (source_person_id int, source_patient_id text)")
    db.execute(f"INSERT INTO {MI}.mappingtable VALUES (7, 'REAL-PATIENT')")
    result = run_job(
        "ingest_metadata", database_url, options(dicom_files_abs_path=str(folder), parse_workers=1)
    )
    assert result.success
    sop = str(ds.SOPInstanceUID)
    assert scalar(db, f"SELECT status FROM {MI}.dicom_ingest_log") == "ingested"
    for keyword, (_vr, _value, expected) in NASTY.items():
        stored = scalar(
            db,
            f"SELECT metadata_source_value FROM {MI}.dicom_file_metadata WHERE sop_instance_id = %s"
            " AND metadata_source_keyword = %s AND parent_sequence_id IS NULL",
            [sop, keyword],
        )
        assert json.loads(stored) == expected, keyword
        FIGURES["verbatim_values_checked"] += 1
    assert json.loads(
        scalar(
            db,
            f"SELECT metadata_source_value FROM {MI}.dicom_file_metadata"
            " WHERE sop_instance_id = %s AND metadata_source_keyword = 'PatientID'"
            " AND parent_sequence_id IS NULL",  # not the one in OtherPatientIDsSequence
            [sop],
        )
    ) == ["' OR '1'='1"]
    # OMOP columns: the study description as is (cut to 50), the person not matched.
    assert (
        scalar(db, "SELECT procedure_source_value FROM cdmdefault.procedure_occurrence")
        == NASTY["StudyDescription"][1][:50]
    )
    assert scalar(db, f"SELECT person_id FROM {MI}.image_occurrence") == 0
    assert scalar(db, "SELECT to_regclass('cdmdefault.person')") is not None  # not dropped
    assert scalar(db, f"SELECT count(*) FROM {MI}.mappingtable") == 1


def test_nul_in_omop_text_column_is_removed_deliberately(database_url, db, tmp_path):
    """PostgreSQL text cannot hold NUL: procedure_source_value drops it, the EAV row keeps it (JSON-escaped)."""
    folder = tmp_path / "dicom"
    ds = hostile.clone(hostile.CT_SMALL, folder / "nul.dcm", StudyDescription="be\x00fore")
    assert run_job(
        "ingest_metadata", database_url, options(dicom_files_abs_path=str(folder), parse_workers=1)
    ).success
    assert (
        scalar(db, "SELECT procedure_source_value FROM cdmdefault.procedure_occurrence") == "before"
    )
    stored = scalar(
        db,
        f"SELECT metadata_source_value FROM {MI}.dicom_file_metadata WHERE sop_instance_id = %s"
        " AND metadata_source_keyword = 'StudyDescription'",
        [str(ds.SOPInstanceUID)],
    )
    assert "\\u0000" in stored and json.loads(stored) == ["be\x00fore"]
    FIGURES["verbatim_values_checked"] += 1


# --------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------
DB_PASSWORD = "Db-s3cret-Pw-8812"
SERVER_PASSWORD = "Srv-s3cret-Pw-4471"
SERVER_URL_PASSWORD = "Url-s3cret-Pw-9090"


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.netloc.split("@")[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def _everything_said(result, instance: dg.DagsterInstance) -> str:
    """Every event, log line, error and metadata value of the run, as text."""
    texts = [repr(result.dagster_run.run_config), repr(result.dagster_run)]
    for entry in instance.all_logs(result.run_id):
        texts.append(entry.user_message or "")
        texts.append(repr(entry.dagster_event))
    for event in result.all_events:
        texts.append(repr(event))
    return "\n".join(texts)


def test_secrets_never_appear_in_events_logs_metadata_or_run_config(
    database_url, tmp_path, monkeypatch, caplog, capfd
):
    folder = tmp_path / "dicom"
    hostile.clone(hostile.CT_SMALL, folder / "ok.dcm")
    (folder / "broken.dcm").write_bytes(b"not dicom")
    url = _with_password(database_url, DB_PASSWORD)  # the test server trusts: any password connects
    monkeypatch.setenv("DICOM_ETL_DATABASE_URL", url)
    monkeypatch.setenv(
        "DICOM_ETL_DICOM_SERVER_URL", f"http://uploader:{SERVER_URL_PASSWORD}@127.0.0.1:9"
    )
    monkeypatch.setenv("DICOM_ETL_DICOM_SERVER_USER", "uploader")
    monkeypatch.setenv("DICOM_ETL_DICOM_SERVER_PASSWORD", SERVER_PASSWORD)
    server = DicomServerResource(
        url=dg.EnvVar("DICOM_ETL_DICOM_SERVER_URL"),
        username=dg.EnvVar("DICOM_ETL_DICOM_SERVER_USER"),
        password=dg.EnvVar("DICOM_ETL_DICOM_SERVER_PASSWORD"),
        retries=0,
        connect_timeout_seconds=2.0,
        backoff_seconds=0.1,
    )
    defs = build_definitions(
        PostgresResource(database_url=dg.EnvVar("DICOM_ETL_DATABASE_URL")), server
    )
    caplog.set_level(logging.DEBUG)
    said = []
    for upload in (False, True):
        instance = dg.DagsterInstance.ephemeral()
        result = defs.resolve_job_def("ingest_metadata").execute_in_process(
            run_config=options(
                dicom_files_abs_path=str(folder), parse_workers=1, upload_files=upload
            ),
            instance=instance,
            raise_on_error=False,
        )
        if not upload:
            assert result.success
        said.append(_everything_said(result, instance))
    said.append("\n".join(r.getMessage() for r in caplog.records))
    out, err = capfd.readouterr()
    said += [out, err]
    text = "\n".join(said)
    # the upload was attempted with the credentials and reported (user info stripped from the URL)
    assert "DICOM server http://127.0.0.1:9 is unavailable" in text
    leaks = [s for s in (DB_PASSWORD, SERVER_PASSWORD, SERVER_URL_PASSWORD) if s in text]
    FIGURES["secret_leaks_found"] += len(leaks)
    assert not leaks


# --------------------------------------------------------------------------
# PHI
# --------------------------------------------------------------------------
PHI = (
    hostile.PHI_NAME,
    hostile.PHI_NAME.replace("^", " "),
    hostile.PHI_BIRTH_DATE,
    hostile.PHI_PATIENT_ID,
)


def test_phi_never_logged_above_debug(database_url, db, tmp_path, caplog):
    folder = tmp_path / "dicom"
    files = hostile.phi_files(folder)
    db.execute(f"CREATE SCHEMA {MI}")
    db.execute(f"CREATE TABLE {MI}.mappingtable (source_person_id int, source_patient_id text)")
    db.execute(f"INSERT INTO {MI}.mappingtable VALUES (7, 'SOMEONE-ELSE')")
    caplog.set_level(logging.DEBUG)
    instance = dg.DagsterInstance.ephemeral()
    job = build_definitions(PostgresResource(database_url=database_url)).resolve_job_def(
        "ingest_metadata"
    )
    result = job.execute_in_process(
        run_config=options(
            dicom_files_abs_path=str(folder), parse_workers=1, missing_person_id_options="skip"
        ),
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success  # the skip miss makes the run red, by design
    statuses = dict(db.execute(f"SELECT file_path, status FROM {MI}.dicom_ingest_log").fetchall())
    assert set(statuses) == {str(p) for p in files.values()}
    assert statuses[str(files["intact"])] == "failed"  # no person under skip
    # The PHI is in the database (that is the point of the EAV table) ...
    assert (
        scalar(
            db,
            f"SELECT count(*) FROM {MI}.dicom_file_metadata WHERE metadata_source_value LIKE %s",
            [f"%{hostile.PHI_PATIENT_ID}%"],
        )
        == 0
    )  # ... except that a skipped file writes no rows
    above_debug = []
    for entry in instance.all_logs(result.run_id):
        if entry.level >= logging.INFO:
            above_debug += [entry.user_message or "", repr(entry.dagster_event)]
    # Materialization metadata and step failures are shown in the UI whatever their level.
    for event in result.all_events:
        if (
            event.is_step_materialization
            or event.is_failure
            or event.event_type_value == "ASSET_CHECK_EVALUATION"
        ):
            above_debug.append(repr(event))
    above_debug.append(
        repr(
            [
                [r[0], r[1]]
                for r in db.execute(
                    f"SELECT status, error_message FROM {MI}.dicom_ingest_log"
                ).fetchall()
            ]
        )
    )
    above_debug += [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    text = "\n".join(above_debug)
    assert "sha256:" in text  # the skip miss is reported, by reference
    leaks = [s for s in PHI if s in text]
    FIGURES["phi_leaks_found"] += len(leaks)
    assert not leaks, leaks
