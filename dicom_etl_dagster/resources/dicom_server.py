"""The DICOM server files are uploaded to, as a Dagster resource.

Configured from the ``DICOM_ETL_DICOM_SERVER_*`` and ``DICOM_ETL_DICOMWEB_URL`` variables,
secrets through ``dg.EnvVar``; ``client()`` returns a plain HTTP client
(``core.upload.clients``) that ``core.upload.uploader`` drives.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import dagster as dg
from pydantic import Field

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.core.upload.clients import (
    KINDS,
    DicomServerConfigError,
    DicomWebClient,
    OrthancClient,
    split_credentials,
)


class DicomServerResource(dg.ConfigurableResource):
    """The DICOM server files are uploaded to.

    ``kind`` ``orthanc``: Orthanc's REST API at ``url`` (``POST /instances``); ``wadors_uri``
    uses ``dicomweb_url``, else Orthanc's DICOMweb plugin at ``<url>/dicom-web`` when it
    answers. ``kind`` ``dicomweb``: STOW-RS to ``dicomweb_url`` (or ``url``, taken as the
    DICOMweb root). Wire the password with ``dg.EnvVar`` (``from_environment`` does).
    """

    kind: str = Field(
        default="orthanc", description="orthanc (REST POST /instances) or dicomweb (STOW-RS)"
    )
    url: str | None = Field(default=None, description="Server root, e.g. http://orthanc:8042")
    dicomweb_url: str | None = Field(
        default=None, description="DICOMweb root, e.g. http://orthanc:8042/dicom-web"
    )
    username: str | None = None
    password: str | None = None
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 300.0
    retries: int = Field(
        default=3, description="Retries of a request after a connection error or HTTP 5xx"
    )
    backoff_seconds: float = Field(
        default=1.0, description="First wait before a retry; doubles on each retry"
    )
    max_concurrent_uploads: int = Field(default=4, description="Uploads in flight at once")

    @classmethod
    def from_environment(cls) -> DicomServerResource:
        """The server named by the environment; each set variable wired through dg.EnvVar."""
        fields = {
            "url": settings.DICOM_SERVER_URL,
            "kind": settings.DICOM_SERVER_KIND,
            "dicomweb_url": settings.DICOMWEB_URL,
            "username": settings.DICOM_SERVER_USER,
            "password": settings.DICOM_SERVER_PASSWORD,
        }
        wired: dict[str, Any] = {n: dg.EnvVar(s.name) for n, s in fields.items() if s.is_set()}
        return cls(**wired)

    def _kind(self) -> str:
        kind = (self.kind or "orthanc").strip().lower()
        if kind not in KINDS:
            raise DicomServerConfigError(
                f"{settings.DICOM_SERVER_KIND.name} (kind) must be one of {', '.join(KINDS)}, not {self.kind!r}"
            )
        return kind

    def is_configured(self) -> bool:
        return bool(
            self.url or (self.dicomweb_url and (self.kind or "").strip().lower() == "dicomweb")
        )

    def _target(self) -> tuple[str, str, str | None, str | None, str | None]:
        """(kind, target URL, DICOMweb root, user, password); URLs without user info."""
        kind = self._kind()
        raw = (self.dicomweb_url or self.url) if kind == "dicomweb" else self.url
        if not raw:
            needed = (
                f"{settings.DICOMWEB_URL.name} (the DICOMweb root)"
                if kind == "dicomweb"
                else f"{settings.DICOM_SERVER_URL.name} (for example http://orthanc:8042)"
            )
            raise DicomServerConfigError(f"no DICOM server configured for uploads: set {needed}")
        url, user, password = split_credentials(raw)
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise DicomServerConfigError(f"the DICOM server URL {url!r} is not an http(s) URL")
        root = split_credentials(self.dicomweb_url)[0] if self.dicomweb_url else None
        return (
            kind,
            url,
            root,
            self.username or user,
            self.password if self.password is not None else password,
        )

    def describe(self) -> str:
        """Kind and URL, safe to log (no credentials)."""
        kind, url, root, user, _ = self._target()
        extra = f", DICOMweb root {root}" if root and kind == "orthanc" else ""
        return f"{kind} server {url}{extra}{' with HTTP Basic auth' if user else ''}"

    def client(self) -> OrthancClient | DicomWebClient:
        kind, url, root, user, password = self._target()
        common: dict[str, Any] = dict(
            auth=(user, password or "") if user else None,
            connect_timeout=self.connect_timeout_seconds,
            read_timeout=self.read_timeout_seconds,
            retries=self.retries,
            backoff_seconds=self.backoff_seconds,
        )
        if kind == "orthanc":
            return OrthancClient(url, root, **common)
        return DicomWebClient(url, **common)
