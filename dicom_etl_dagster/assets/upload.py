"""Upload asset: ingested files -> DICOM server, one file_upload_metadata row per upload.

When it uploads: ``upload_files: true`` in the options document uploads; ``false`` (the
default of the ``ingest_metadata`` job's document) reports "skipped" and writes nothing.
Left unset (a UI launch or ``dagster asset materialize`` without config), it uploads when
launched without the ingest step and skips when the ingest runs in the same run, so
"materialize all" on a machine without a DICOM server works and "materialize
file_upload_metadata" uploads.
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
INGEST_ASSET = dg.AssetKey("dicom_file_metadata")
MAX_FAILURES_SHOWN = 20


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
    """The server refused some files; the others were uploaded."""

    def __init__(self, report: UploadReport) -> None:
        first = "; ".join(reason for _, reason in report.failures[:3])
        super().__init__(
            f"{report.failed} file(s) were rejected by the DICOM server (the others were "
            f"uploaded): {first}. Fix or remove those files and run again to upload them.",
            metadata={"files_failed": report.failed},
        )


@dg.asset(
    name="file_upload_metadata",
    group_name=GROUP,
    kinds={"postgres", "dicom"},
    output_required=False,
    metadata=column_schema("file_upload_metadata"),
    pool="dicom_etl_dicom_server",
    deps=["dicom_file_metadata", "dicom_ingest_log"],
    description="Ingested files uploaded to the DICOM server (Orthanc REST or DICOMweb STOW-RS): one row per "
    "upload; sets image_occurrence.wadors_uri when the server speaks DICOMweb.",
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
            )
            sample_uri = newest_wadors_uri(conn, tables)

        context.log.info(
            f"{report.uploaded} file(s) uploaded, {report.already_present} already on the server, "
            f"{report.failed} failed, {report.already_recorded} recorded before; "
            f"{report.bytes_sent} bytes, {report.files_per_second()} files/s"
        )
        if report.aborted:
            raise UploadsStopped(report, _metadata(report, server))
        links = {"sample_wadors_uri": dg.MetadataValue.url(sample_uri)} if sample_uri else {}
        yield dg.MaterializeResult(metadata=_metadata(report, server, links))
        if report.failed:
            raise FilesRejected(report)


UPLOAD_ASSETS = [file_upload_metadata]
