"""The options document: the original plugin's run config, accepted unchanged.

``{"options": {...}}`` is mapped onto every asset of a job by a job-level ConfigMapping;
each asset also accepts the same options directly (UI launches of single assets). Every
field has a default, so a run launched with no config at all runs on the embedded defaults.

The options accept keys Dagster does not know (``PermissiveConfig``) so that the run itself
refuses them with one line that names the key first (``EtlOptions.check_for``), instead of
Dagster's traceback that names it at the end of a schema dump.
"""

import difflib
from pathlib import Path

import dagster as dg

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.core.analytics.rows import NonStandardConcepts
from dicom_etl_dagster.core.analytics.write import AnalyticsOptions
from dicom_etl_dagster.core.db.identifiers import Schemas, validate_identifier
from dicom_etl_dagster.core.errors import OptionsError
from dicom_etl_dagster.core.ingest.dicomweb_pull import PullScope, SeriesRef
from dicom_etl_dagster.core.ingest.run import IngestSetupError, missing_person_policy
from dicom_etl_dagster.core.ingest.status import MissingPersonPolicy, PhiPolicy
from dicom_etl_dagster.core.sources.dicomweb import study_date_range


class PersonToPatientMapping(dg.PermissiveConfig):
    """Where the DICOM PatientID -> OMOP person_id mapping lives."""

    schema_name: str = "cdmmedicalimaging"
    table_name: str = "mappingtable"
    person_id_column_name: str = "source_person_id"
    patient_id_column_name: str = "source_patient_id"

    def validated(self) -> "PersonToPatientMapping":
        validate_identifier(self.schema_name, "person_to_patient_mapping.schema_name")
        validate_identifier(self.table_name, "person_to_patient_mapping.table_name")
        validate_identifier(
            self.person_id_column_name, "person_to_patient_mapping.person_id_column_name"
        )
        validate_identifier(
            self.patient_id_column_name, "person_to_patient_mapping.patient_id_column_name"
        )
        return self


class EtlOptions(dg.PermissiveConfig):
    """The original DICOM ETL plugin's options (same names, same meaning)."""

    flow_action_type: str | None = None
    database_code: str | None = None
    medical_imaging_schema_name: str | None = None
    cdm_schema_name: str | None = None
    vocab_schema_name: str | None = None
    dicom_files_abs_path: str | None = None
    to_truncate: bool = False
    upload_files: bool = False
    missing_person_id_options: str = "use_id_zero"
    # None, not the defaults, so that a document giving both spellings can be told apart
    # from one giving the alias only (Dagster fills in defaults before the run sees them):
    person_to_patient_mapping: PersonToPatientMapping | None = None
    # The original README's spelling of the same key (its code reads person_to_patient_mapping):
    PersonPatientMapping: PersonToPatientMapping | None = None
    # Extensions beyond the original document (optional, so the original stays valid):
    ingest_batch_size: int = 500  # files per database transaction
    parse_workers: int | None = None  # default: the CPUs this container may use
    # Set by the new-file sensor: only files whose inode change time (ns) is in (after, until].
    changed_after_ns: int | None = None
    changed_until_ns: int | None = None
    # measurement + image_feature rows (acquisition parameters, SR measurements, segments):
    measurements: bool = True
    acquisition_attributes: list[str] | None = None  # keywords or 8-hex tags; None: default
    non_standard_measurement_concepts: str = "dicom"  # or "zero" (see README: Analytics)
    # What dicom_file_metadata copies: "keep" everything (the original) or "drop" the PS3.15
    # Basic Profile attributes and private elements (core/dicom/phi.py; README: phi_policy).
    phi_policy: str = "keep"
    # Uploads: send files the DICOM server refused for their content before (and recorded
    # in file_upload_rejection) again, although they have not changed since.
    retry_rejected_uploads: bool = False
    # A DICOMweb root (e.g. http://orthanc:8042/dicom-web) to ingest from instead of the folder
    # (core/ingest/dicomweb_pull.py), optionally only the studies of a StudyDate window.
    dicomweb_source_url: str | None = None
    dicomweb_study_date_from: str | None = None  # YYYYMMDD, inclusive
    dicomweb_study_date_until: str | None = None  # YYYYMMDD, inclusive
    # Set by the new_dicomweb_series sensor: only these series, "<StudyUID>/<SeriesUID>".
    dicomweb_series: list[str] | None = None

    def person_mapping(self) -> PersonToPatientMapping:
        """The mapping under either spelling (``check_for`` refuses both at once), else defaults."""
        return (
            self.person_to_patient_mapping or self.PersonPatientMapping or PersonToPatientMapping()
        )

    def check_for(self, job_name: str) -> None:
        """Refuse, in one line, what Dagster lets through: unknown keys, both spellings of the
        mapping key, and options whose ``flow_action_type`` names the other contract job."""
        _refuse_unknown_keys(self, "options")
        for key in _MAPPING_KEYS:
            mapping = getattr(self, key)
            if mapping is not None:
                _refuse_unknown_keys(mapping, f"options.{key}")
        if self.person_to_patient_mapping is not None and self.PersonPatientMapping is not None:
            raise OptionsError(
                "options give both person_to_patient_mapping and PersonPatientMapping (two "
                "spellings of the same key): keep one"
            )
        _refuse_other_job(self.flow_action_type, job_name)

    def missing_person_policy(self) -> MissingPersonPolicy:
        """``missing_person_id_options`` in any case; a clear error if it names no policy."""
        return missing_person_policy(self.missing_person_id_options)

    def analytics(self) -> AnalyticsOptions:
        """The measurement options; a clear error for a policy that does not exist."""
        try:
            policy = NonStandardConcepts(self.non_standard_measurement_concepts.strip().lower())
        except ValueError:
            choices = ", ".join(p.value for p in NonStandardConcepts)
            raise IngestSetupError(
                f"non_standard_measurement_concepts must be one of {choices}, "
                f"not {self.non_standard_measurement_concepts!r}"
            ) from None
        attributes = self.acquisition_attributes
        return AnalyticsOptions(
            enabled=self.measurements,
            attributes=None if attributes is None else frozenset(a.strip() for a in attributes),
            non_standard=policy,
        )

    def phi(self) -> PhiPolicy:
        """``phi_policy`` (any case); a clear one-line error for a value that is no policy."""
        try:
            return PhiPolicy.parse(self.phi_policy)
        except ValueError:
            choices = " or ".join(p.value for p in PhiPolicy)
            raise IngestSetupError(
                f"phi_policy must be {choices}, not {self.phi_policy!r}"
            ) from None

    def pull_scope(self) -> PullScope:
        """What a DICOMweb run reads; a one-line error for a bad date or series."""
        if self.dicomweb_series is not None and not self.dicomweb_source_url:
            raise OptionsError("dicomweb_series is set but dicomweb_source_url is not")
        date_range = study_date_range(self.dicomweb_study_date_from, self.dicomweb_study_date_until)
        if self.dicomweb_series is None:
            return PullScope(study_date=date_range)
        try:
            series = tuple(SeriesRef.parse(text) for text in self.dicomweb_series)
        except ValueError as exc:
            raise OptionsError(
                f"dicomweb_series entries must read <StudyInstanceUID>/<SeriesInstanceUID>, not {exc}"
            ) from None
        return PullScope(study_date=date_range, series=series)

    def dicom_folder(self) -> Path:
        """The folder to ingest: the option, else DICOM_ETL_FILES_DIR, else pydicom's samples."""
        if self.dicom_files_abs_path:
            return Path(self.dicom_files_abs_path)
        folder = settings.FILES_DIR.value()
        if folder:
            return Path(folder)
        import pydicom.data

        return Path(pydicom.data.__file__).parent / "test_files"


_MAPPING_KEYS = ("person_to_patient_mapping", "PersonPatientMapping")


def _refuse_unknown_keys(config: dg.PermissiveConfig, where: str) -> None:
    unknown = sorted(config.model_extra or {})
    if not unknown:
        return
    known = sorted(type(config).model_fields)
    key = unknown[0]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"the keys are: {', '.join(known)}"
    more = f" (and {len(unknown) - 1} more: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
    raise OptionsError(f"unknown key {key!r} in {where}{more}: {hint}")


def _refuse_other_job(flow_action_type: str | None, job_name: str) -> None:
    """A load_vocab document sent to ingest_metadata would silently ingest the default folder.

    The other way round is accepted: the README (and the original's prerequisite "load DICOM
    vocab") runs load_vocab with the ingest document, and loading the vocabulary is harmless.
    Single-asset launches from the UI are not a contract job and pass.
    """
    action = (flow_action_type or "").strip().lower()
    if job_name == "ingest_metadata" and action == "load_vocab":
        raise OptionsError(
            "flow_action_type is 'load_vocab' but this is the ingest_metadata job: run the "
            "load_vocab job with this document (dagster job execute -m "
            "dicom_etl_dagster.definitions -j load_vocab -c <options file>)"
        )


def run_schemas(options: EtlOptions, database) -> Schemas:
    """Schema names for this run: the options document's, else the database resource's."""
    return database.schemas(
        cdm=options.cdm_schema_name,
        vocab=options.vocab_schema_name,
        medical_imaging=options.medical_imaging_schema_name,
    )


class OptionsDocument(dg.Config):
    options: EtlOptions = EtlOptions()


def options_mapping(op_names: list[str]) -> dg.ConfigMapping:
    """A job ConfigMapping that hands the ``options`` document to each of ``op_names``.

    It also selects the job's ``console`` logger (``loggers.py``): Dagster uses a job's own
    loggers only when the run config names them.
    """

    @dg.config_mapping
    def to_run_config(document: OptionsDocument) -> dict:
        options = document.options.model_dump(exclude_none=True)
        return {
            "ops": {name: {"config": options} for name in op_names},
            "loggers": {"console": {}},
        }

    return to_run_config
