"""The DICOMweb server ``ingest_metadata`` reads from when ``dicomweb_source_url`` is set.

The URL is an option of the run (so a sensor or a user can point a run at a server); what
does not belong in run config, the credentials, comes from ``DICOM_ETL_SOURCE_USER`` /
``DICOM_ETL_SOURCE_PASSWORD`` through ``dg.EnvVar``, so the UI and logs never show them.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import Field

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.core.sources.dicomweb import DicomWebSource, SourceSettings


class DicomWebSourceResource(dg.ConfigurableResource):
    """Credentials and HTTP behaviour of the DICOMweb source (its URL is the run's option)."""

    username: str | None = None
    password: str | None = None
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 120.0
    retries: int = Field(
        default=3, description="Retries of a request after a connection error or HTTP 5xx"
    )
    backoff_seconds: float = Field(
        default=1.0, description="First wait before a retry; doubles on each retry"
    )
    page_size: int = Field(default=100, description="QIDO-RS results asked per request (limit)")
    max_concurrent_requests: int = Field(
        default=4, description="WADO-RS metadata requests in flight at once"
    )

    @classmethod
    def from_environment(cls) -> DicomWebSourceResource:
        fields = {"username": settings.SOURCE_USER, "password": settings.SOURCE_PASSWORD}
        wired: dict[str, Any] = {n: dg.EnvVar(s.name) for n, s in fields.items() if s.is_set()}
        return cls(**wired)

    def auth(self) -> tuple[str, str] | None:
        """HTTP Basic (user, password), or None without a user."""
        return (self.username, self.password or "") if self.username else None

    def source(self, url: str) -> DicomWebSource:
        """A client of ``url``; user info in the URL is taken out of it (and used if no user is set)."""
        return DicomWebSource(
            url,
            self.auth(),
            SourceSettings(
                connect_timeout=self.connect_timeout_seconds,
                read_timeout=self.read_timeout_seconds,
                retries=self.retries,
                backoff_seconds=self.backoff_seconds,
                page_size=max(1, self.page_size),
                max_concurrent_requests=max(1, self.max_concurrent_requests),
            ),
        )
