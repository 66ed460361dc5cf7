"""Wires assets, jobs, sensors and resources; nothing else (but see the last line)."""

from __future__ import annotations

import gc

import dagster as dg

from dicom_etl_dagster.assets.imaging import IMAGING_ASSETS
from dicom_etl_dagster.assets.upload import UPLOAD_ASSETS
from dicom_etl_dagster.assets.vocabulary import VOCABULARY_ASSETS
from dicom_etl_dagster.core import settings
from dicom_etl_dagster.dicomweb_sensor import new_dicomweb_series
from dicom_etl_dagster.executor import default_executor
from dicom_etl_dagster.jobs import JOBS
from dicom_etl_dagster.loggers import console_logger
from dicom_etl_dagster.resources.database import PostgresResource
from dicom_etl_dagster.resources.dicom_server import DicomServerResource
from dicom_etl_dagster.resources.dicomweb_source import DicomWebSourceResource
from dicom_etl_dagster.sensors import new_dicom_files


def default_database() -> PostgresResource:
    # EnvVar keeps the URL (and its password) out of run config and the UI; without the
    # variable the embedded PostgreSQL is used.
    if settings.DATABASE_URL.is_set():
        return PostgresResource(database_url=dg.EnvVar(settings.DATABASE_URL.name))
    return PostgresResource()


def build_definitions(
    database: PostgresResource,
    dicom_server: DicomServerResource | None = None,
    dicomweb_source: DicomWebSourceResource | None = None,
) -> dg.Definitions:
    # The DICOM server comes from the DICOM_ETL_DICOM_SERVER_* variables, each through
    # dg.EnvVar (so the password never appears in run config or the UI).
    return dg.Definitions(
        assets=[*VOCABULARY_ASSETS, *IMAGING_ASSETS, *UPLOAD_ASSETS],
        jobs=JOBS,
        sensors=[new_dicom_files, new_dicomweb_series],
        executor=default_executor(),
        loggers={"console": console_logger},
        resources={
            "database": database,
            "dicom_server": dicom_server or DicomServerResource.from_environment(),
            # The DICOMweb source's credentials, DICOM_ETL_SOURCE_*, also through dg.EnvVar.
            "dicomweb_source": dicomweb_source or DicomWebSourceResource.from_environment(),
        },
    )


defs = build_definitions(default_database())

# What the imports and these definitions made (~175,000 objects of Dagster, SQLAlchemy,
# pydicom and ours) lives as long as the process. Frozen, no garbage collection traverses it
# again, the interpreter's last one at exit included: ~0.35 s off every `dagster job execute`.
gc.freeze()
