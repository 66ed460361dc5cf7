"""Every ``DICOM_ETL_*`` environment variable the product reads, declared once.

Each setting has its name, its default and what it means; the README's configuration
tables are checked against ``SETTINGS`` by a test, so a variable cannot be added without
being documented. Secrets (the database URL, the server and source passwords) are marked:
the Dagster layer hands them to resources through ``dg.EnvVar``, so their values never
appear in run config, the UI or logs; nothing here logs a value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dicom_etl_dagster.core.errors import OptionsError


@dataclass(frozen=True)
class Setting:
    name: str
    meaning: str
    default: str | None = None
    secret: bool = False

    def value(self) -> str | None:
        """The variable's value; the default when it is unset or empty."""
        return os.environ.get(self.name) or self.default

    def is_set(self) -> bool:
        return bool(os.environ.get(self.name))

    def as_int(self) -> int:
        value = self.value()
        try:
            return int(value or "")
        except ValueError:
            raise OptionsError(f"{self.name} must be a whole number, not {value!r}") from None


DATABASE_URL = Setting(
    "DICOM_ETL_DATABASE_URL",
    "target PostgreSQL, postgresql://user:password@host:port/db; unset: embedded PostgreSQL",
    secret=True,
)
EMBEDDED_PGDATA = Setting("DICOM_ETL_EMBEDDED_PGDATA", "data folder of the embedded PostgreSQL")
VOCAB_DIR = Setting(
    "DICOM_ETL_VOCAB_DIR", "folder with the DICOM2OMOP CSVs; unset: external/ in the checkout"
)
VOCAB_MIRROR_URL = Setting(
    "DICOM_ETL_VOCAB_MIRROR_URL",
    "base URL of a mirror laid out like the upstream repository at the pinned commit",
)
FILES_DIR = Setting(
    "DICOM_ETL_FILES_DIR",
    "default DICOM folder for UI launches, and the folder(s) the sensor watches (':'-separated)",
)
DICOM_SERVER_URL = Setting("DICOM_ETL_DICOM_SERVER_URL", "DICOM server for uploads")
DICOM_SERVER_KIND = Setting(
    "DICOM_ETL_DICOM_SERVER_KIND", "orthanc (REST) or dicomweb (STOW-RS)", default="orthanc"
)
DICOMWEB_URL = Setting("DICOM_ETL_DICOMWEB_URL", "DICOMweb root of the DICOM server")
DICOM_SERVER_USER = Setting("DICOM_ETL_DICOM_SERVER_USER", "HTTP Basic user of the DICOM server")
DICOM_SERVER_PASSWORD = Setting(
    "DICOM_ETL_DICOM_SERVER_PASSWORD", "HTTP Basic password of the DICOM server", secret=True
)
SENSOR_SETTLE_SECONDS = Setting(
    "DICOM_ETL_SENSOR_SETTLE_SECONDS", "seconds a file must be unchanged to be taken", default="60"
)
SENSOR_MAX_FILES_PER_RUN = Setting(
    "DICOM_ETL_SENSOR_MAX_FILES_PER_RUN", "files per requested run", default="5000"
)
SENSOR_MAX_RUNS_PER_TICK = Setting(
    "DICOM_ETL_SENSOR_MAX_RUNS_PER_TICK", "runs requested per sensor tick", default="20"
)
SENSOR_OPTIONS = Setting(
    "DICOM_ETL_SENSOR_OPTIONS", "path to an options document every sensor run starts from"
)
SOURCE_USER = Setting("DICOM_ETL_SOURCE_USER", "HTTP Basic user of the DICOMweb source")
SOURCE_PASSWORD = Setting(
    "DICOM_ETL_SOURCE_PASSWORD", "HTTP Basic password of the DICOMweb source", secret=True
)
SOURCE_URL = Setting(
    "DICOM_ETL_SOURCE_URL",
    "DICOMweb root the new_dicomweb_series sensor watches (its runs read from it)",
)
SOURCE_ORTHANC_URL = Setting(
    "DICOM_ETL_SOURCE_ORTHANC_URL",
    "Orthanc REST root whose /changes feed the sensor reads; unset: the source URL without /dicom-web",
)
SOURCE_FEED = Setting(
    "DICOM_ETL_SOURCE_FEED",
    "how the DICOMweb sensor sees new data: orthanc (/changes), qido (StudyDate window) or auto",
    default="auto",
)
SENSOR_STUDY_DATE_DAYS = Setting(
    "DICOM_ETL_SENSOR_STUDY_DATE_DAYS",
    "days of StudyDate, ending today, the qido feed watches",
    default="7",
)
SENSOR_MAX_SERIES_PER_RUN = Setting(
    "DICOM_ETL_SENSOR_MAX_SERIES_PER_RUN",
    "series per run the DICOMweb sensor requests",
    default="100",
)

SETTINGS: tuple[Setting, ...] = (
    DATABASE_URL,
    EMBEDDED_PGDATA,
    VOCAB_DIR,
    VOCAB_MIRROR_URL,
    FILES_DIR,
    DICOM_SERVER_URL,
    DICOM_SERVER_KIND,
    DICOMWEB_URL,
    DICOM_SERVER_USER,
    DICOM_SERVER_PASSWORD,
    SENSOR_SETTLE_SECONDS,
    SENSOR_MAX_FILES_PER_RUN,
    SENSOR_MAX_RUNS_PER_TICK,
    SENSOR_OPTIONS,
    SOURCE_USER,
    SOURCE_PASSWORD,
    SOURCE_URL,
    SOURCE_ORTHANC_URL,
    SOURCE_FEED,
    SENSOR_STUDY_DATE_DAYS,
    SENSOR_MAX_SERIES_PER_RUN,
)
