"""A sensor that turns new or changed DICOM files into bounded ingest_metadata runs (the
DICOMweb source's sensor is ``dicomweb_sensor.py``)."""

import hashlib
import json
import os
import time
from pathlib import Path

import dagster as dg

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.core.ingest.new_files import plan_batches
from dicom_etl_dagster.jobs import ingest_metadata


def watched_roots() -> list[str]:
    """DICOM_ETL_FILES_DIR: one folder, or several separated by ':'."""
    value = settings.FILES_DIR.value() or ""
    return [str(Path(p).resolve()) for p in value.split(os.pathsep) if p.strip()]


def root_key(root: str) -> str:
    return hashlib.sha1(root.encode()).hexdigest()[:10]


def base_options() -> dict:
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
        key = root_key(root)
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
                **base_options(),
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
