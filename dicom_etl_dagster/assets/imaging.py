"""Imaging assets: a folder of DICOM files -> procedure_occurrence, image_occurrence,
dicom_file_metadata and the ingest ledger, written together batch by batch."""

from collections import Counter
from collections.abc import Mapping

import dagster as dg

from dicom_etl_dagster.assets.common import dagster_failures, database_session, markdown_table
from dicom_etl_dagster.assets.table_schemas import column_schema
from dicom_etl_dagster.config import EtlOptions
from dicom_etl_dagster.core.cpu import available_cpus
from dicom_etl_dagster.core.db.tables import Tables
from dicom_etl_dagster.core.dicom.odd_values import tags_by_files
from dicom_etl_dagster.core.errors import DicomEtlError
from dicom_etl_dagster.core.ingest.checks import (
    IngestCheckFigures,
    TableFacts,
    TableSize,
    features_without_measurement,
    ingest_check_figures,
    table_facts,
)
from dicom_etl_dagster.core.ingest.dicomweb_pull import PullScope, ingest_dicomweb
from dicom_etl_dagster.core.ingest.parse_pool import start_forkserver
from dicom_etl_dagster.core.ingest.run import ingest_folder, prepare_run
from dicom_etl_dagster.core.ingest.status import PhiPolicy
from dicom_etl_dagster.core.ingest.writer import IngestReport, PersonMapping, RunState
from dicom_etl_dagster.core.upload.clients import split_credentials
from dicom_etl_dagster.resources.database import PostgresResource
from dicom_etl_dagster.resources.dicomweb_source import DicomWebSourceResource

GROUP = "imaging"
MAX_FAILURES_SHOWN = 20
#: Tags shown in the odd-values table of dicom_file_metadata's materialization.
MAX_ODD_VALUE_TAGS_SHOWN = 20
UNMAPPED_MODALITY_WARN_SHARE = 0.2
CONCEPT_0_WARN_SHARE = 0.2
MAX_MEASUREMENT_KINDS_SHOWN = 50

INGEST_SPECS = [
    dg.AssetSpec(
        "procedure_occurrence",
        group_name=GROUP,
        deps=["concept"],
        kinds={"postgres"},
        metadata=column_schema("procedure_occurrence"),
        description="OMOP procedure_occurrence: one row per imaging study (StudyInstanceUID) and person.",
    ),
    dg.AssetSpec(
        "image_occurrence",
        group_name=GROUP,
        kinds={"postgres"},
        deps=["procedure_occurrence", "concept", "concept_relationship"],
        metadata=column_schema("image_occurrence"),
        description="MI-CDM image_occurrence: one row per series, with modality and anatomic-site concepts.",
    ),
    dg.AssetSpec(
        "measurement",
        group_name=GROUP,
        kinds={"postgres"},
        deps=["image_occurrence", "concept", "concept_relationship"],
        metadata=column_schema("measurement"),
        description="OMOP measurement: acquisition parameters per series, SR measurements "
        "(TID 1500, dose reports).",
    ),
    dg.AssetSpec(
        "image_feature",
        group_name=GROUP,
        kinds={"postgres"},
        deps=["measurement", "image_occurrence"],
        metadata=column_schema("image_feature"),
        description="MI-CDM image_feature: links each measurement to its image occurrence; "
        "SEG segments as findings.",
    ),
    dg.AssetSpec(
        "dicom_file_metadata",
        group_name=GROUP,
        kinds={"postgres"},
        deps=["image_occurrence", "dicom_data_element"],
        metadata=column_schema("dicom_file_metadata"),
        description="Every DICOM attribute except pixel data, nested sequences included (EAV).",
    ),
    dg.AssetSpec(
        "dicom_ingest_log",
        group_name=GROUP,
        kinds={"postgres"},
        # The ledger is written with everything a batch writes: its lineage shows all of it.
        deps=["dicom_file_metadata", "measurement", "image_feature"],
        metadata=column_schema("dicom_ingest_log"),
        description="One row per file path seen: ingested, duplicate, or failed with its reason.",
    ),
]

INGEST_CHECKS = [
    dg.AssetCheckSpec(
        "every_series_has_its_procedure",
        asset="image_occurrence",
        description="Every image_occurrence the run wrote points at an existing "
        "procedure_occurrence.",
    ),
    dg.AssetCheckSpec(
        "no_sop_instance_twice",
        asset="dicom_file_metadata",
        description="No SOP instance is ingested twice (ledger and EAV rows).",
    ),
    dg.AssetCheckSpec(
        "share_of_measurements_with_concept_0",
        asset="measurement",
        description=f"Warns when more than {CONCEPT_0_WARN_SHARE:.0%} of the run's measurements "
        "have measurement_concept_id 0.",
    ),
    dg.AssetCheckSpec(
        "every_image_feature_has_its_measurement",
        asset="image_feature",
        description="Every image_feature row the run wrote for a measurement points at an "
        "existing measurement row.",
    ),
    dg.AssetCheckSpec(
        "share_of_series_without_modality_concept",
        asset="image_occurrence",
        description=f"Warns when more than {UNMAPPED_MODALITY_WARN_SHARE:.0%} of the series the "
        "run wrote have modality_concept_id 0.",
    ),
]


def _failures_by_reason(report: IngestReport) -> Counter:
    # Group by the reason's first clause so "truncated at byte 1234" and "... 99" land together
    # (": " ends it; a patient reference "sha256:..." holds a bare colon).
    return Counter(reason.split(": ")[0] for _, reason in report.failures)


def _measurement_figures(report: IngestReport) -> dict[str, int | float]:
    total = sum(report.measurements.values())
    concept_0 = sum(n for (_, concept, _), n in report.measurements.items() if concept == 0)
    with_unit = sum(n for (_, _, unit), n in report.measurements.items() if unit)
    return {
        "measurements": total,
        "measurements_with_concept_0": concept_0,
        "share_with_concept_0": round(concept_0 / total, 4) if total else 0.0,
        "share_with_unit": round(with_unit / total, 4) if total else 0.0,
    }


def _check_results(
    figures: IngestCheckFigures, report: IngestReport, orphan_features: int
) -> list[dg.AssetCheckResult]:
    share = figures.share_without_modality_concept
    measured = _measurement_figures(report)
    return [
        dg.AssetCheckResult(
            check_name="share_of_measurements_with_concept_0",
            asset_key="measurement",
            passed=measured["share_with_concept_0"] <= CONCEPT_0_WARN_SHARE,
            severity=dg.AssetCheckSeverity.WARN,
            metadata=measured,
        ),
        dg.AssetCheckResult(
            check_name="every_image_feature_has_its_measurement",
            asset_key="image_feature",
            passed=orphan_features == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"image_features_without_measurement": orphan_features},
        ),
        dg.AssetCheckResult(
            check_name="every_series_has_its_procedure",
            asset_key="image_occurrence",
            passed=figures.series_without_procedure == 0,
            metadata={"series_without_procedure": figures.series_without_procedure},
        ),
        dg.AssetCheckResult(
            check_name="no_sop_instance_twice",
            asset_key="dicom_file_metadata",
            passed=figures.sop_instances_twice_in_ledger == 0
            and figures.sop_instances_twice_in_metadata == 0,
            metadata={
                "sop_instances_twice_in_ledger": figures.sop_instances_twice_in_ledger,
                "sop_instances_twice_in_metadata": figures.sop_instances_twice_in_metadata,
            },
        ),
        dg.AssetCheckResult(
            check_name="share_of_series_without_modality_concept",
            asset_key="image_occurrence",
            passed=share <= UNMAPPED_MODALITY_WARN_SHARE,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "series": figures.series,
                "series_with_modality_concept_0": figures.series_with_modality_concept_0,
                "share": dg.MetadataValue.float(round(share, 4)),
            },
        ),
    ]


def _rows_in_table(size: TableSize) -> dict[str, int]:
    # An estimate (a large table, see core/ingest/checks.py) never poses as Dagster's row count.
    return {"dagster/row_count" if size.exact else "rows_in_table_estimate": size.rows}


def _occurrence_results(
    report: IngestReport, facts: TableFacts, tables: Tables, common: dict
) -> list[dg.MaterializeResult]:
    modality_rows = sorted(
        ((m, b, mc, sc, n) for (m, b, mc, sc), n in report.series_by_modality.items()),
        key=lambda r: -r[4],
    )
    modality_header = (
        "Modality",
        "BodyPartExamined",
        "modality_concept_id",
        "anatomic_site_concept_id",
        "series",
    )
    version = facts.dicom_vocabulary_version or "DICOM vocabulary not loaded (run load_vocab)"
    kinds = sorted(report.measurements.items(), key=lambda item: (-item[1], item[0]))
    kinds_table = markdown_table(
        ("measurement_source_value", "measurement_concept_id", "unit_source_value", "rows"),
        [(*key, n) for key, n in kinds[:MAX_MEASUREMENT_KINDS_SHOWN]],
    )
    return [
        dg.MaterializeResult(
            asset_key="procedure_occurrence",
            metadata={
                **common,
                "table": tables.qualified("procedure_occurrence"),
                "rows_written": report.rows["procedure_occurrence"],
                **_rows_in_table(facts.procedure_occurrences),
                "procedure_concepts_set": dg.MetadataValue.json(dict(report.procedure_concepts)),
                # Empty when the CDM schema has no visit_occurrence table.
                "new_studies_by_visit_linkage": dg.MetadataValue.json(dict(report.visits)),
            },
        ),
        dg.MaterializeResult(
            asset_key="image_occurrence",
            metadata={
                **common,
                "table": tables.qualified("image_occurrence"),
                "rows_written": report.rows["image_occurrence"],
                **_rows_in_table(facts.image_occurrences),
                "dicom_vocabulary_version": version,
                "new_series_by_modality": dg.MetadataValue.md(
                    markdown_table(modality_header, modality_rows)
                ),
            },
        ),
        dg.MaterializeResult(
            asset_key="measurement",
            metadata={
                **common,
                "table": tables.qualified("measurement"),
                "rows_written": report.rows["measurement"],
                **_measurement_figures(report),
                "measurements_by_attribute": dg.MetadataValue.md(kinds_table),
            },
        ),
        dg.MaterializeResult(
            asset_key="image_feature",
            metadata={
                **common,
                "table": tables.qualified("image_feature"),
                "rows_written": report.rows["image_feature"],
                "rows_replaced_for_changed_files": report.rows["image_feature_replaced"],
                **_rows_in_table(facts.image_features),
            },
        ),
    ]


def _lock_figures(report: IngestReport) -> dict[str, float]:
    """Batches that took the ingest lock, and the mean and max seconds they held it."""
    held = report.lock_held_seconds
    if not held:
        return {"batches": 0, "mean": 0.0, "max": 0.0}
    return {
        "batches": len(held),
        "mean": round(sum(held) / len(held), 4),
        "max": round(max(held), 4),
    }


def _file_results(
    report: IngestReport,
    seconds: Mapping[str, float],
    tables: Tables,
    common: dict,
    workers: int,
    phi_policy: PhiPolicy,
) -> list[dg.MaterializeResult]:
    counts = report.status_counts
    elapsed = sum(seconds.values())
    processed = sum(counts.values())
    return [
        dg.MaterializeResult(
            asset_key="dicom_file_metadata",
            metadata={
                **common,
                "table": tables.qualified("dicom_file_metadata"),
                "rows_written": report.rows["dicom_file_metadata"],
                "rows_replaced_for_changed_files": report.rows["dicom_file_metadata_replaced"],
                "phi_policy": phi_policy.value,
                # Element rows (nested ones included) of the ingested files left out under drop.
                "elements_dropped_by_phi_policy": report.rows["dicom_file_metadata_phi_dropped"],
                "files_seen": report.files_seen,
                "files_ingested": counts["ingested"],
                "files_duplicate": counts["duplicate"],
                "files_failed": counts["failed"],
                "files_already_done": report.files_already_done,
                # Zip / tar archives: read to their end (their members count as files above),
                # and unchanged ones not opened again.
                "archives_read": report.archives_read,
                "archives_skipped": report.archives_skipped,
                "files_per_second": dg.MetadataValue.float(
                    round(processed / elapsed, 1) if elapsed else 0.0
                ),
                "slowest_stage": max(seconds, key=lambda k: seconds[k]) if seconds else "none",
                "seconds_per_stage": dg.MetadataValue.json(
                    {k: round(v, 3) for k, v in seconds.items()}
                ),
                "parse_workers": workers,
                # How long each batch held the ingest lock (its EAV rows are COPYed before it),
                # and the batches another run's writes made it write wholly under the lock.
                "ingest_lock_held_seconds_per_batch": dg.MetadataValue.json(_lock_figures(report)),
                "batches_rewritten_under_lock": report.batches_rewritten_under_lock,
                # Values that violate their VR, kept verbatim (core/dicom/odd_values.py).
                "files_with_odd_values": report.odd_value_files,
                "odd_values_by_tag": dg.MetadataValue.md(
                    markdown_table(
                        ("tag", "keyword", "files"),
                        tags_by_files(report.odd_value_tags, MAX_ODD_VALUE_TAGS_SHOWN),
                    )
                ),
            },
        ),
        dg.MaterializeResult(
            asset_key="dicom_ingest_log",
            metadata={
                **common,
                "table": tables.qualified("dicom_ingest_log"),
                "rows_written": report.rows["dicom_ingest_log"],
                "files_with_odd_values": report.odd_value_files,
                "failures_by_reason": dg.MetadataValue.md(
                    markdown_table(("reason", "files"), _failures_by_reason(report).most_common())
                ),
                "first_failures": dg.MetadataValue.md(
                    markdown_table(("file", "reason"), report.failures[:MAX_FAILURES_SHOWN])
                ),
            },
        ),
    ]


def _pull(
    context: dg.AssetExecutionContext,
    config: EtlOptions,
    conn,
    state: RunState,
    resource: DicomWebSourceResource,
    scope: PullScope,
) -> tuple[IngestReport, dict[str, float], dict[str, int]]:
    """Ingest from the DICOMweb source instead of the folder (``core/ingest/dicomweb_pull``)."""
    with resource.source(config.dicomweb_source_url or "") as source:
        state.dicomweb_source = source.root
        what = f"{len(scope.series)} series of" if scope.series is not None else "every study of"
        window = f" (StudyDate {scope.study_date})" if scope.study_date else ""
        context.log.info(
            f"Ingesting {what} DICOMweb source {source.root}{window}, "
            f"{resource.max_concurrent_requests} requests in flight, "
            f"{config.ingest_batch_size} instances per batch"
        )
        report, seconds = ingest_dicomweb(
            conn,
            state,
            source,
            scope,
            config.ingest_batch_size,
            resource.max_concurrent_requests,
            config.phi(),
            context.log.info,
        )
        # QIDO-RS listings and WADO-RS metadata requests: what an incremental run saved shows here.
        requests = dict(source.requests_made)
        context.log.info(f"DICOMweb requests by kind: {requests}")
    return report, seconds, requests


def _source_metadata(config: EtlOptions, root, requests: dict[str, int]) -> dict:
    """What every materialization names as the run's source: the folder or the DICOMweb root
    (with its requests by kind: what an incremental run did not fetch shows there)."""
    if config.dicomweb_source_url:
        url = split_credentials(config.dicomweb_source_url)[0]  # never user info in the UI
        return {
            "dicomweb_source_url": dg.MetadataValue.url(url),
            "dicomweb_requests": dg.MetadataValue.json(requests),
        }
    return {"dicom_files_abs_path": dg.MetadataValue.path(str(root))}


class FilesWithoutPerson(DicomEtlError):
    """Files not ingested under missing_person_id_options: skip; the rest was ingested."""


def _person_misses(report: IngestReport) -> FilesWithoutPerson:
    reasons = dict.fromkeys(r for _, r in report.failures if r.startswith("no person: "))
    return FilesWithoutPerson(
        f"{report.person_misses} file(s) were not ingested for want of a person: "
        f"{'; '.join(list(reasons)[:3])}. Fix the mapping table (or the files) and re-run: "
        "those files will be ingested then."
    )


@dg.multi_asset(
    specs=INGEST_SPECS,
    check_specs=INGEST_CHECKS,
    name="ingest_dicom_folder",
    pool="dicom_etl_database",
    description="Ingest every file under dicom_files_abs_path into the OMOP imaging tables.",
)
def ingest_dicom_folder(
    context: dg.AssetExecutionContext,
    config: EtlOptions,
    database: PostgresResource,
    dicomweb_source: DicomWebSourceResource,
):
    with dagster_failures():
        policy = config.missing_person_policy()
        scope = config.pull_scope()  # checked before anything is read
        root = config.dicom_folder()
        workers = config.parse_workers or available_cpus()
        phi_policy = config.phi()
        m = config.person_mapping().validated()
        mapping = PersonMapping(
            m.schema_name, m.table_name, m.person_id_column_name, m.patient_id_column_name
        )
        if workers > 1 and not config.dicomweb_source_url:
            start_forkserver()  # its imports overlap the database set-up below
        with database_session(context, config, database) as (conn, tables):
            state = prepare_run(
                conn,
                tables.schemas,
                context.run.run_id,
                policy,
                mapping,
                context.log.warning,
                config.analytics(),
            )
            requests: dict[str, int] = {}  # DICOMweb requests by kind (none for a folder)
            if config.dicomweb_source_url:
                report, seconds, requests = _pull(
                    context, config, conn, state, dicomweb_source, scope
                )
            else:
                context.log.info(
                    f"Ingesting {root} with {workers} parse workers, "
                    f"{config.ingest_batch_size} files per batch"
                )
                report, seconds = ingest_folder(
                    conn,
                    state,
                    root,
                    config.ingest_batch_size,
                    workers,
                    log_progress=context.log.info,
                    changed_window=(config.changed_after_ns, config.changed_until_ns),
                    phi_policy=phi_policy,
                )
            figures = ingest_check_figures(conn, tables, context.run.run_id, report.series_ids)
            orphans = features_without_measurement(conn, tables, report.feature_ids)
            facts = table_facts(conn, tables)

        counts = report.status_counts
        context.log.info(
            f"{report.files_seen} files seen: {counts['ingested']} ingested, "
            f"{counts['duplicate']} duplicate, {counts['failed']} failed, "
            f"{report.files_already_done} already done; archives: {report.archives_read} read,"
            f" {report.archives_skipped} unchanged"
        )
        common = _source_metadata(config, root, requests)
        yield from _occurrence_results(report, facts, tables, common)
        yield from _file_results(report, seconds, tables, common, workers, phi_policy)
        yield from _check_results(figures, report, orphans)
        if report.person_misses:
            raise _person_misses(report)


IMAGING_ASSETS = [ingest_dicom_folder]
