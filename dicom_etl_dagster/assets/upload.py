"""Upload asset: ingested files -> DICOM server, one file_upload_metadata row per upload.

When it uploads: ``upload_files: true`` in the options document uploads; ``false`` (the
default of the ``ingest_metadata`` job's document) reports "skipped" and writes nothing.
Left unset (a UI launch or ``dagster asset materialize`` without config), it uploads when
launched without the ingest step and skips when the ingest runs in the same run, so
"materialize all" on a machine without a DICOM server works and "materialize
file_upload_metadata" uploads.

A file the server refuses for its content does not fail the run: core.upload records it in
file_upload_rejection with the server's reason and does not send it again while it is
unchanged; the asset check ``no_file_rejected_by_the_server`` warns with this run's count.
"""

import dagster as dg

from dicom_etl_dagster.assets.common import dagster_failures, database_session, markdown_table
from dicom_etl_dagster.assets.table_schemas import column_schema
from dicom_etl_dagster.config import EtlOptions
from dicom_etl_dagster.core.errors import DicomEtlError
from dicom_etl_dagster.core.upload.records import newest_wadors_uri
from dicom_etl_dagster.core.upload.uploader import UploadReport, upload_pending
from dicom_etl_dagster.resources.database import PostgresResource
from dicom_etl_dagster.resources.dicom_server import DicomServerConfigError, DicomServerResource

GROUP = "upload"
UPLOAD_ASSET = dg.AssetKey("file_upload_metadata")
INGEST_ASSET = dg.AssetKey("dicom_file_metadata")
MAX_FAILURES_SHOWN = 20
REJECTION_CHECK = "no_file_rejected_by_the_server"
REJECTION_CHECK_KEY = dg.AssetCheckKey(UPLOAD_ASSET, REJECTION_CHECK)


class UploadOptions(EtlOptions):
    """The options document; ``upload_files`` unset means 'when launched on its own'."""

    # Narrows the inherited bool to 'maybe unset': pydantic allows it, mypy cannot see that.
    upload_files: bool | None = None  # type: ignore[assignment]


def _should_upload(context: dg.AssetExecutionContext, config: UploadOptions) -> tuple[bool, str]:
    if config.upload_files is not None:
        return config.upload_files, f"upload_files {str(config.upload_files).lower()}"
    ingest_in_run = INGEST_ASSET in context.job_def.asset_layer.executable_asset_keys
    if ingest_in_run:
        return (
            False,
            "upload_files not set and the ingest runs in this run; set upload_files: true to upload",
        )
    return True, "launched on its own"


def _metadata(report: UploadReport, server: str, links: dict | None = None) -> dict:
    return {
        "server": server,
        "server_url": dg.MetadataValue.url(report.server_url),
        "server_kind": report.kind,
        "files_uploaded": report.uploaded,
        "files_already_on_server": report.already_present,
        "files_failed": report.failed,
        "files_rejected": report.rejected,
        "files_rejected_before_not_sent": report.rejected_before,
        "files_already_recorded": report.already_recorded,
        "rows_written": report.recorded,
        "bytes_sent": report.bytes_sent,
        "files_per_second": dg.MetadataValue.float(report.files_per_second()),
        "seconds": dg.MetadataValue.float(round(report.seconds, 3)),
        "wadors_root": report.dicomweb_root
        or "none (server does not speak DICOMweb: wadors_uri not set)",
        "series_wadors_uri_set": report.series_with_wadors_uri,
        "first_failures": dg.MetadataValue.md(
            markdown_table(("file", "reason"), report.failures[:MAX_FAILURES_SHOWN])
        ),
        **(links or {}),
    }


def _rejection_check(report: UploadReport, rejections_table: str) -> dg.AssetCheckResult:
    """This run's rejections only: files refused before and held back are in the metadata."""
    if report.rejected:
        description = (
            f"{report.rejected} file(s) rejected by the DICOM server for their content, recorded "
            f"in {rejections_table} with the server's reason; they are not sent again until "
            "they change (and are ingested again) or retry_rejected_uploads: true is given"
        )
    else:
        description = "no file rejected by the DICOM server in this run"
    return dg.AssetCheckResult(
        check_name=REJECTION_CHECK,
        asset_key=UPLOAD_ASSET,
        passed=report.rejected == 0,
        severity=dg.AssetCheckSeverity.WARN,
        description=description,
        metadata={
            "files_rejected": report.rejected,
            "files_rejected_before_not_sent": report.rejected_before,
            "rejections_table": rejections_table,
            "first_rejections": dg.MetadataValue.md(
                markdown_table(("file", "reason"), report.rejections[:MAX_FAILURES_SHOWN])
            ),
        },
    )


class UploadsStopped(DicomEtlError):
    """The server became unavailable mid-run; a later run (or a retry) uploads the rest."""

    retryable = True

    def __init__(self, report: UploadReport, metadata: dict) -> None:
        super().__init__(
            f"{report.aborted}. {report.recorded} file(s) uploaded and recorded before it "
            f"stopped, {report.not_attempted} not uploaded; run again when the server is back "
            "to upload exactly those.",
            metadata=metadata,
        )


class FilesRejected(DicomEtlError):
    """Some files could not be sent (gone, unreadable, changed since ingested); the others were
    uploaded. Files the server refused for their content are not among them: they are recorded."""

    def __init__(self, report: UploadReport) -> None:
        first = "; ".join(reason for _, reason in report.failures[:3])
        super().__init__(
            f"{report.failed} file(s) could not be uploaded (the others were): {first}. "
            "Fix or remove those files and run again to upload them.",
            metadata={"files_failed": report.failed},
        )


# A multi-asset of one, because only can_subset makes the check's output optional: a run
# that skips the upload reports no check result rather than a vacuous "passed".
@dg.multi_asset(
    name="file_upload_metadata",
    specs=[
        dg.AssetSpec(
            UPLOAD_ASSET,
            group_name=GROUP,
            kinds={"postgres", "dicom"},
            skippable=True,
            metadata=column_schema("file_upload_metadata"),
            deps=["dicom_file_metadata", "dicom_ingest_log"],
            description="Ingested files uploaded to the DICOM server (Orthanc REST or DICOMweb "
            "STOW-RS): one row per upload; sets image_occurrence.wadors_uri when the server "
            "speaks DICOMweb. Files the server refuses are recorded in file_upload_rejection.",
        )
    ],
    check_specs=[
        dg.AssetCheckSpec(
            REJECTION_CHECK,
            asset=UPLOAD_ASSET,
            description="Warns with the count of files the DICOM server refused for their "
            "content in this run (recorded in file_upload_rejection, not sent again while "
            "unchanged).",
        )
    ],
    can_subset=True,
    pool="dicom_etl_dicom_server",
)
def file_upload_metadata(
    context: dg.AssetExecutionContext,
    config: UploadOptions,
    database: PostgresResource,
    dicom_server: DicomServerResource,
):
    upload, why = _should_upload(context, config)
    if not upload:
        context.log.info(f"file_upload_metadata skipped ({why}): nothing uploaded")
        yield dg.AssetObservation(
            asset_key="file_upload_metadata", metadata={"status": f"skipped ({why})"}
        )
        return
    with dagster_failures():
        try:
            server = dicom_server.describe()
            client = dicom_server.client()
        except DicomServerConfigError as exc:
            raise DicomServerConfigError(f"upload_files: {exc}") from None

        with database_session(context, config, database) as (conn, tables), client:
            context.log.info(f"Uploading ingested files to {server} ({why})")
            report = upload_pending(
                conn,
                tables.schemas,
                client,
                run_id=context.run.run_id,
                task_run_id=f"{context.run.run_id}:{context.op_execution_context.op.name}",
                concurrency=dicom_server.max_concurrent_uploads,
                log=context.log.info,
                retry_rejected=config.retry_rejected_uploads,
            )
            sample_uri = newest_wadors_uri(conn, tables)

        context.log.info(
            f"{report.uploaded} file(s) uploaded, {report.already_present} already on the server, "
            f"{report.rejected} rejected by the server, {report.failed} failed, "
            f"{report.already_recorded} recorded before; "
            f"{report.bytes_sent} bytes, {report.files_per_second()} files/s"
        )
        if report.aborted:
            raise UploadsStopped(report, _metadata(report, server))
        links = {"sample_wadors_uri": dg.MetadataValue.url(sample_uri)} if sample_uri else {}
        if UPLOAD_ASSET in context.selected_asset_keys:
            yield dg.MaterializeResult(
                asset_key=UPLOAD_ASSET, metadata=_metadata(report, server, links)
            )
        if report.rejected:
            context.log.warning(
                f"{report.rejected} file(s) rejected by the DICOM server, recorded in "
                f"{tables.qualified('file_upload_rejection')}: {report.rejections[0][1]}"
            )
        if REJECTION_CHECK_KEY in context.selected_asset_check_keys:
            yield _rejection_check(report, tables.qualified("file_upload_rejection"))
        if report.failed:
            raise FilesRejected(report)


UPLOAD_ASSETS = [file_upload_metadata]
