"""Imaging assets: a folder of DICOM files -> procedure_occurrence, image_occurrence,
dicom_file_metadata and the ingest ledger, written together batch by batch."""

from collections import Counter

import dagster as dg
from psycopg import sql

from dicom_etl_dagster.assets.common import clear_failures, database_session, markdown_table
from dicom_etl_dagster.assets.table_schemas import column_schema
from dicom_etl_dagster.config import EtlOptions
from dicom_etl_dagster.core.cpu import available_cpus
from dicom_etl_dagster.core.db.identifiers import Schemas
from dicom_etl_dagster.core.ingest.run import IngestSetupError, ingest_folder, prepare_run
from dicom_etl_dagster.core.ingest.writer import IngestReport, PersonMapping
from dicom_etl_dagster.resources.database import PostgresResource

GROUP = "imaging"
MAX_FAILURES_SHOWN = 20
UNMAPPED_MODALITY_WARN_SHARE = 0.2

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
        deps=["dicom_file_metadata"],
        metadata=column_schema("dicom_ingest_log"),
        description="One row per file path seen: ingested, duplicate, or failed with its reason.",
    ),
]

INGEST_CHECKS = [
    dg.AssetCheckSpec(
        "every_series_has_its_procedure",
        asset="image_occurrence",
        description="Every image_occurrence points at an existing procedure_occurrence.",
    ),
    dg.AssetCheckSpec(
        "no_sop_instance_twice",
        asset="dicom_file_metadata",
        description="No SOP instance is ingested twice (ledger and EAV rows).",
    ),
    dg.AssetCheckSpec(
        "share_of_series_without_modality_concept",
        asset="image_occurrence",
        description=f"Warns when more than {UNMAPPED_MODALITY_WARN_SHARE:.0%} of series have "
        "modality_concept_id 0.",
    ),
]


def _failures_by_reason(report: IngestReport) -> Counter:
    # Group by the reason's first clause so "truncated at byte 1234" and "... 99" land together.
    return Counter(reason.split(":")[0] for _, reason in report.failures)


def _table_facts(conn, schemas: Schemas) -> dict:
    # Cheap: one row per study / series (not the EAV table), and the one DICOM vocabulary row.
    count = sql.SQL("SELECT count(*) FROM {}")
    counts = {
        table: conn.execute(count.format(sql.Identifier(schema, table))).fetchone()[0]
        for schema, table in (
            (schemas.cdm, "procedure_occurrence"),
            (schemas.medical_imaging, "image_occurrence"),
        )
    }
    version = conn.execute(
        sql.SQL("SELECT vocabulary_version FROM {} WHERE vocabulary_id = 'DICOM'").format(
            sql.Identifier(schemas.vocab, "vocabulary")
        )
    ).fetchone()
    return {
        **counts,
        "vocabulary_version": version[0]
        if version
        else "DICOM vocabulary not loaded (run load_vocab)",
    }


def _checks(conn, schemas: Schemas, run_id: str) -> list[dg.AssetCheckResult]:
    # The SOP checks look at this run's instances only (through the ledger and the
    # sop_instance_id index): a full scan of a billion-row EAV table per run would not scale.
    mi, cdm = schemas.medical_imaging, schemas.cdm
    orphans = conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {io} i WHERE NOT EXISTS (SELECT 1 FROM {po} p"
            " WHERE p.procedure_occurrence_id = i.procedure_occurrence_id)"
        ).format(
            io=sql.Identifier(mi, "image_occurrence"),
            po=sql.Identifier(cdm, "procedure_occurrence"),
        )
    ).fetchone()[0]
    ledger, metadata = (
        sql.Identifier(mi, "dicom_ingest_log"),
        sql.Identifier(mi, "dicom_file_metadata"),
    )
    this_run = sql.SQL(
        "SELECT sop_instance_uid FROM {} WHERE run_id = %(run)s AND status = 'ingested'"
    ).format(ledger)
    twice_in_ledger = conn.execute(
        sql.SQL(
            "SELECT count(*) FROM (SELECT sop_instance_uid FROM {ledger} WHERE status = 'ingested'"
            " AND sop_instance_uid IN ({this_run}) GROUP BY 1 HAVING count(*) > 1) d"
        ).format(ledger=ledger, this_run=this_run),
        {"run": run_id},
    ).fetchone()[0]
    twice_in_metadata = conn.execute(
        sql.SQL(
            "SELECT count(*) FROM (SELECT sop_instance_id FROM {metadata} WHERE sop_instance_id IN ({this_run})"
            " AND metadata_source_tag = '(0008,0018)' AND parent_sequence_id IS NULL"
            " GROUP BY 1 HAVING count(*) > 1) d"
        ).format(metadata=metadata, this_run=this_run),
        {"run": run_id},
    ).fetchone()[0]
    series, unmapped = conn.execute(
        sql.SQL("SELECT count(*), count(*) FILTER (WHERE modality_concept_id = 0) FROM {}").format(
            sql.Identifier(mi, "image_occurrence")
        )
    ).fetchone()
    share = unmapped / series if series else 0.0
    return [
        dg.AssetCheckResult(
            check_name="every_series_has_its_procedure",
            asset_key="image_occurrence",
            passed=orphans == 0,
            metadata={"series_without_procedure": orphans},
        ),
        dg.AssetCheckResult(
            check_name="no_sop_instance_twice",
            asset_key="dicom_file_metadata",
            passed=twice_in_ledger == 0 and twice_in_metadata == 0,
            metadata={
                "sop_instances_twice_in_ledger": twice_in_ledger,
                "sop_instances_twice_in_metadata": twice_in_metadata,
            },
        ),
        dg.AssetCheckResult(
            check_name="share_of_series_without_modality_concept",
            asset_key="image_occurrence",
            passed=share <= UNMAPPED_MODALITY_WARN_SHARE,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "series": series,
                "series_with_modality_concept_0": unmapped,
                "share": dg.MetadataValue.float(round(share, 4)),
            },
        ),
    ]


@dg.multi_asset(
    specs=INGEST_SPECS,
    check_specs=INGEST_CHECKS,
    name="ingest_dicom_folder",
    pool="dicom_etl_database",
    description="Ingest every file under dicom_files_abs_path into the OMOP imaging tables.",
)
def ingest_dicom_folder(
    context: dg.AssetExecutionContext, config: EtlOptions, database: PostgresResource
):
    policy = config.missing_person_policy()
    root = config.dicom_folder()
    workers = config.parse_workers or available_cpus()
    with clear_failures():
        m = config.person_to_patient_mapping.validated()
        mapping = PersonMapping(
            m.schema_name, m.table_name, m.person_id_column_name, m.patient_id_column_name
        )

    with database_session(context, config, database) as (conn, schemas):
        try:
            state = prepare_run(
                conn, schemas, context.run.run_id, policy, mapping, context.log.warning
            )
            context.log.info(
                f"Ingesting {root} with {workers} parse workers, {config.ingest_batch_size} files per batch"
            )
            report, seconds = ingest_folder(
                conn,
                state,
                root,
                config.ingest_batch_size,
                workers,
                progress=lambda r: context.log.debug(
                    f"{sum(r.status_counts.values())} files written so far"
                ),
                changed_window=(config.changed_after_ns, config.changed_until_ns),
            )
        except IngestSetupError as exc:
            raise dg.Failure(description=str(exc), allow_retries=False) from None
        checks = _checks(conn, schemas, context.run.run_id)
        facts = _table_facts(conn, schemas)

    counts = report.status_counts
    elapsed = sum(seconds.values())
    processed = sum(counts.values())
    context.log.info(
        f"{report.files_seen} files seen: {counts['ingested']} ingested, {counts['duplicate']} duplicate, "
        f"{counts['failed']} failed, {report.files_already_done} already done"
    )
    common = {"dicom_files_abs_path": dg.MetadataValue.path(str(root))}
    modality_rows = sorted(
        ((m, b, mc, sc, n) for (m, b, mc, sc), n in report.series_by_modality.items()),
        key=lambda r: -r[4],
    )
    yield dg.MaterializeResult(
        asset_key="procedure_occurrence",
        metadata={
            **common,
            "table": f"{schemas.cdm}.procedure_occurrence",
            "rows_written": report.rows["procedure_occurrence"],
            "dagster/row_count": facts["procedure_occurrence"],
        },
    )
    yield dg.MaterializeResult(
        asset_key="image_occurrence",
        metadata={
            **common,
            "table": f"{schemas.medical_imaging}.image_occurrence",
            "rows_written": report.rows["image_occurrence"],
            "dagster/row_count": facts["image_occurrence"],
            "dicom_vocabulary_version": facts["vocabulary_version"],
            "new_series_by_modality": dg.MetadataValue.md(
                markdown_table(
                    (
                        "Modality",
                        "BodyPartExamined",
                        "modality_concept_id",
                        "anatomic_site_concept_id",
                        "series",
                    ),
                    modality_rows,
                )
            ),
        },
    )
    yield dg.MaterializeResult(
        asset_key="dicom_file_metadata",
        metadata={
            **common,
            "table": f"{schemas.medical_imaging}.dicom_file_metadata",
            "rows_written": report.rows["dicom_file_metadata"],
            "rows_replaced_for_changed_files": report.rows["dicom_file_metadata_replaced"],
            "files_seen": report.files_seen,
            "files_ingested": counts["ingested"],
            "files_duplicate": counts["duplicate"],
            "files_failed": counts["failed"],
            "files_already_done": report.files_already_done,
            "files_per_second": dg.MetadataValue.float(
                round(processed / elapsed, 1) if elapsed else 0.0
            ),
            "slowest_stage": max(seconds, key=seconds.get) if seconds else "none",
            "seconds_per_stage": dg.MetadataValue.json(
                {k: round(v, 3) for k, v in seconds.items()}
            ),
            "parse_workers": workers,
        },
    )
    yield dg.MaterializeResult(
        asset_key="dicom_ingest_log",
        metadata={
            **common,
            "table": f"{schemas.medical_imaging}.dicom_ingest_log",
            "rows_written": report.rows["dicom_ingest_log"],
            "failures_by_reason": dg.MetadataValue.md(
                markdown_table(("reason", "files"), _failures_by_reason(report).most_common())
            ),
            "first_failures": dg.MetadataValue.md(
                markdown_table(("file", "reason"), report.failures[:MAX_FAILURES_SHOWN])
            ),
        },
    )
    yield from checks

    if report.person_misses:
        reasons = [reason for _, reason in report.failures if "missing_person_id_options" in reason]
        raise dg.Failure(
            description=f"{report.person_misses} file(s) were not ingested because no person matched their patient "
            f"(missing_person_id_options: skip); first reasons: {'; '.join(reasons[:3])}. "
            "Fix the mapping table and re-run: those files will be ingested then.",
            allow_retries=False,
        )


IMAGING_ASSETS = [ingest_dicom_folder]
