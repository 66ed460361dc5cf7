"""The DICOMweb source's sensor: new data on the server becomes bounded ingest_metadata runs.

Two feeds (``DICOM_ETL_SOURCE_FEED``; ``auto`` picks the first the server supports):
- ``orthanc``: Orthanc's ``/changes`` (``core/sources/orthanc_changes.py``). One run per
  ``DICOM_ETL_SENSOR_MAX_SERIES_PER_RUN`` new stable series, named in ``dicomweb_series``;
  the cursor is the feed's change number.
- ``qido``: any DICOMweb server (``core/sources/qido_window.py``). When what QIDO-RS lists
  in the last ``DICOM_ETL_SENSOR_STUDY_DATE_DAYS`` days of StudyDate differs from the last
  tick's, one run over that window; the run fetches only what the ledger lacks.
A server that does not answer skips the tick with the reason; the cursor stays.
"""

from __future__ import annotations

import datetime

import dagster as dg

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.core.errors import DicomEtlError
from dicom_etl_dagster.core.sources.orthanc_changes import OrthancFeed, orthanc_root
from dicom_etl_dagster.core.sources.qido_window import window_fingerprint, window_start
from dicom_etl_dagster.jobs import ingest_metadata
from dicom_etl_dagster.resources.dicomweb_source import DicomWebSourceResource
from dicom_etl_dagster.sensors import base_options, root_key

FEEDS = ("auto", "orthanc", "qido")


def _series_run(
    source: str, series: list[tuple[str, str]], first: int, last: int, part: int
) -> dg.RunRequest:
    """One run for a batch of series; its key is the feed's range and the batch's place in it,
    so a tick repeated after a crash requests the same runs and Dagster launches none twice."""
    options = {
        **base_options(),
        "dicomweb_source_url": source,
        "dicomweb_series": [f"{study}/{se}" for study, se in series],
    }
    return dg.RunRequest(
        run_key=f"dicomweb:{root_key(source)}:{first}-{last}:{part}",
        run_config={"options": options},
        tags={
            "dicom_etl/dicomweb_source": source,
            "dicom_etl/changes": f"{first}-{last}",
            "dicom_etl/series": str(len(series)),
        },
    )


def _orthanc_tick(context: dg.SensorEvaluationContext, source: str, feed: OrthancFeed):
    per_run = max(1, settings.SENSOR_MAX_SERIES_PER_RUN.as_int())
    runs = max(1, settings.SENSOR_MAX_RUNS_PER_TICK.as_int())
    since = int(context.cursor) if context.cursor and context.cursor.isdigit() else 0
    found = feed.stable_series(since, per_run * runs)
    batches = [found.series[i : i + per_run] for i in range(0, len(found.series), per_run)]
    requests = [
        _series_run(source, batch, since, found.cursor, part) for part, batch in enumerate(batches)
    ]
    note = (
        f"{feed.root}/changes {since}..{found.cursor}: {found.changes_read} changes, "
        f"{len(found.series)} new stable series in {len(requests)} run(s)"
        f"{', more left for the next tick' if found.more else ''}"
    )
    context.log.info(note)
    return dg.SensorResult(
        run_requests=requests,
        skip_reason=None if requests else f"no new stable series: {note}",
        cursor=str(found.cursor),
    )


def _qido_tick(context: dg.SensorEvaluationContext, source: str, resource: DicomWebSourceResource):
    days = settings.SENSOR_STUDY_DATE_DAYS.as_int()
    date_from = window_start(datetime.date.today(), days)
    with resource.source(source) as client:
        found = window_fingerprint(client, date_from)
    cursor = f"qido:{date_from}:{found.digest}"
    note = (
        f"{client.root}: {found.studies} studies, {found.instances} instances "
        f"with StudyDate from {date_from}"
    )
    context.log.info(note)
    if cursor == context.cursor:
        return dg.SkipReason(f"nothing new: {note}, as at the last tick")
    options = {**base_options(), "dicomweb_source_url": source}
    options["dicomweb_study_date_from"] = date_from
    request = dg.RunRequest(
        run_key=f"dicomweb:{root_key(source)}:{cursor}",
        run_config={"options": options},
        tags={"dicom_etl/dicomweb_source": source, "dicom_etl/study_date_from": date_from},
    )
    return dg.SensorResult(run_requests=[request], cursor=cursor)


@dg.sensor(
    name="new_dicomweb_series",
    job=ingest_metadata,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING
    if settings.SOURCE_URL.is_set()
    else dg.DefaultSensorStatus.STOPPED,
    description=f"Watches the DICOMweb source {settings.SOURCE_URL.name} (Orthanc's /changes "
    "feed, else a StudyDate window) and requests ingest_metadata runs for what is new.",
)
def new_dicomweb_series(
    context: dg.SensorEvaluationContext, dicomweb_source: DicomWebSourceResource
):
    # The credentials come from the resource (DICOM_ETL_SOURCE_* through dg.EnvVar), as a run's.
    source = settings.SOURCE_URL.value()
    if not source:
        return dg.SkipReason(f"no DICOMweb source to watch: set {settings.SOURCE_URL.name}")
    kind = settings.SOURCE_FEED.value() or "auto"
    if kind not in FEEDS:
        return dg.SkipReason(f"{settings.SOURCE_FEED.name} must be one of {FEEDS}, not {kind!r}")
    root = orthanc_root(source, settings.SOURCE_ORTHANC_URL.value())
    feed = OrthancFeed(root, dicomweb_source.auth(), dicomweb_source.read_timeout_seconds)
    try:
        if kind == "orthanc" or (kind == "auto" and feed.is_orthanc()):
            return _orthanc_tick(context, source, feed)
        return _qido_tick(context, source, dicomweb_source)
    except DicomEtlError as exc:  # the server is down or refuses: the next tick tries again
        return dg.SkipReason(f"{exc}; the cursor stays at {context.cursor or 'the start'}")
    finally:
        feed.close()
