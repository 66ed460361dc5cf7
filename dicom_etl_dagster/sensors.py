"""Sensors that turn new DICOM data into bounded ingest_metadata runs: new or changed files
in a folder, and new stable series on an Orthanc DICOMweb source."""

import hashlib
import json
import os
import time
from pathlib import Path

import dagster as dg

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.core.ingest.new_files import plan_batches
from dicom_etl_dagster.core.sources.orthanc_changes import (
    OrthancFeed,
    OrthancFeedError,
    orthanc_root,
)
from dicom_etl_dagster.jobs import ingest_metadata


def watched_roots() -> list[str]:
    """DICOM_ETL_FILES_DIR: one folder, or several separated by ':'."""
    value = settings.FILES_DIR.value() or ""
    return [str(Path(p).resolve()) for p in value.split(os.pathsep) if p.strip()]


def _root_key(root: str) -> str:
    return hashlib.sha1(root.encode()).hexdigest()[:10]


def _base_options() -> dict:
    """The options every sensor run starts from: DICOM_ETL_SENSOR_OPTIONS (a JSON options document) or defaults."""
    path = settings.SENSOR_OPTIONS.value()
    if not path:
        return {}
    return dict(json.loads(Path(path).read_text()).get("options", {}))


@dg.sensor(
    name="new_dicom_files",
    job=ingest_metadata,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING
    if watched_roots()
    else dg.DefaultSensorStatus.STOPPED,
    description=f"Watches {settings.FILES_DIR.name} and requests one ingest_metadata run per batch of new or changed files.",
)
def new_dicom_files(context: dg.SensorEvaluationContext):
    roots = watched_roots()
    if not roots:
        return dg.SkipReason(
            f"no folder to watch: set {settings.FILES_DIR.name} (several folders separated by ':')"
        )
    cursor = json.loads(context.cursor) if context.cursor else {}
    now_ns = time.time_ns()
    settle_ns = settings.SENSOR_SETTLE_SECONDS.as_int() * 1_000_000_000
    runs_left = settings.SENSOR_MAX_RUNS_PER_TICK.as_int()
    requests, notes = [], []
    for root in roots:
        key = _root_key(root)
        started = time.perf_counter()
        plan = plan_batches(
            root,
            int(cursor.get(key, 0)),
            now_ns,
            settle_ns,
            settings.SENSOR_MAX_FILES_PER_RUN.as_int(),
            runs_left,
        )
        runs_left -= len(plan.batches)
        cursor[key] = plan.watermark_ns
        notes.append(
            f"{root}: {plan.files_scanned} files scanned in {time.perf_counter() - started:.2f}s, "
            f"{sum(b.files for b in plan.batches)} in {len(plan.batches)} new run(s), "
            f"{plan.files_unsettled} still changing, {plan.files_deferred} left for the next tick"
        )
        for batch in plan.batches:
            options = {
                **_base_options(),
                "dicom_files_abs_path": root,
                "changed_after_ns": batch.after_ns,
                "changed_until_ns": batch.until_ns,
            }
            requests.append(
                dg.RunRequest(
                    run_key=f"{key}:{batch.after_ns}-{batch.until_ns}",
                    run_config={"options": options},
                    tags={
                        "dicom_etl/folder": root,
                        "dicom_etl/batch": f"{batch.after_ns}-{batch.until_ns}",
                        "dicom_etl/files": str(batch.files),
                    },
                )
            )
    context.log.info("; ".join(notes))
    return dg.SensorResult(
        run_requests=requests,
        skip_reason=None if requests else "no new settled files: " + "; ".join(notes),
        cursor=json.dumps(cursor, sort_keys=True),
    )


def _source_auth() -> tuple[str, str] | None:
    user = settings.SOURCE_USER.value()
    return (user, settings.SOURCE_PASSWORD.value() or "") if user else None


def _series_run(
    source: str, series: list[tuple[str, str]], first: int, last: int, part: int
) -> dg.RunRequest:
    """One run for a batch of series; its key is the feed's range and the batch's place in it,
    so a tick repeated after a crash requests the same runs and Dagster launches none twice."""
    options = {
        **_base_options(),
        "dicomweb_source_url": source,
        "dicomweb_series": [f"{study}/{se}" for study, se in series],
    }
    return dg.RunRequest(
        run_key=f"dicomweb:{_root_key(source)}:{first}-{last}:{part}",
        run_config={"options": options},
        tags={
            "dicom_etl/dicomweb_source": source,
            "dicom_etl/changes": f"{first}-{last}",
            "dicom_etl/series": str(len(series)),
        },
    )


@dg.sensor(
    name="new_dicomweb_series",
    job=ingest_metadata,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING
    if settings.SOURCE_URL.is_set()
    else dg.DefaultSensorStatus.STOPPED,
    description=f"Reads the /changes feed of the Orthanc behind {settings.SOURCE_URL.name} and "
    "requests one ingest_metadata run per batch of new stable series.",
)
def new_dicomweb_series(context: dg.SensorEvaluationContext):
    source = settings.SOURCE_URL.value()
    if not source:
        return dg.SkipReason(f"no DICOMweb source to watch: set {settings.SOURCE_URL.name}")
    per_run = max(1, settings.SENSOR_MAX_SERIES_PER_RUN.as_int())
    runs = max(1, settings.SENSOR_MAX_RUNS_PER_TICK.as_int())
    since = int(context.cursor) if context.cursor else 0
    feed = OrthancFeed(orthanc_root(source, settings.SOURCE_ORTHANC_URL.value()), _source_auth())
    try:
        found = feed.stable_series(since, per_run * runs)
    except OrthancFeedError as exc:
        return dg.SkipReason(f"{exc}; the cursor stays at change {since}")  # next tick tries again
    finally:
        feed.close()
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
