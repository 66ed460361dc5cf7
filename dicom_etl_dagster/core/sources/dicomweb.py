"""A DICOMweb server as a source: QIDO-RS to list studies, series and instances, WADO-RS
``/metadata`` to read a whole series' DICOM JSON in one request (no pixel data).

HTTP library: ``requests``, as the upload clients (``core/upload/clients.py``): already
installed with Dagster, blocking (what the fetch threads want), one Session per thread
since a Session is not documented as thread-safe.

Retries: connection errors, timeouts, 5xx, 408 and 429 are retried with exponential backoff;
after the last try the run stops with ``SourceUnavailableError``, one line naming the server
and what was being read. Batches written before stay committed and the ledger knows them,
so a re-run goes on where this one stopped. Credentials travel only as HTTP Basic auth;
no message holds them (the password is scrubbed once more from every message).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.core.errors import DicomEtlError
from dicom_etl_dagster.core.http_sessions import PerThreadSessions
from dicom_etl_dagster.core.upload.clients import split_credentials

_DICOM_JSON = "application/dicom+json"
_TRANSIENT = (408, 429)
_MAX_BACKOFF_SECONDS = 30.0
_ERRNO_REASON = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")
_DATE = re.compile(r"[0-9]{8}")

_STUDY_UID = "0020000D"
_SERIES_UID = "0020000E"
_SOP_UID = "00080018"
_STUDY_INSTANCES = "00201208"  # NumberOfStudyRelatedInstances


class SourceConfigError(DicomEtlError):
    """The DICOMweb source cannot be used as configured (URL, dates); the message says what to fix."""


class SourceUnavailableError(DicomEtlError):
    """The DICOMweb source stopped answering (or refused): the run stops, a re-run goes on."""

    retryable = True


@dataclass(frozen=True)
class SourceSettings:
    """How to talk to the server: timeouts, retries, page size, requests in flight."""

    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    retries: int = 3
    backoff_seconds: float = 1.0
    page_size: int = 100  # QIDO limit per request; a server may cap it lower (we page on)
    max_concurrent_requests: int = 4


def study_date_range(date_from: str | None, date_until: str | None) -> str | None:
    """The QIDO StudyDate matching value of the window (``from-until``, either end open)."""
    for name, value in (
        ("dicomweb_study_date_from", date_from),
        ("dicomweb_study_date_until", date_until),
    ):
        if value is not None and not _DATE.fullmatch(value):
            raise SourceConfigError(f"{name} must be a date as YYYYMMDD, not {value!r}")
    if date_from is None and date_until is None:
        return None
    return f"{date_from or ''}-{date_until or ''}"


def first_value(item: dict[str, Any], tag: str) -> Any:
    """The first value of ``tag`` in a DICOM JSON dataset, or None."""
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


class DicomWebSource(PerThreadSessions):
    """One DICOMweb root; ``requests_made`` counts the requests by kind (for reports and tests)."""

    def __init__(
        self,
        root: str,
        auth: tuple[str, str] | None = None,
        config: SourceSettings = SourceSettings(),
    ) -> None:
        url, user, password = split_credentials(root)
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise SourceConfigError(f"dicomweb_source_url {url!r} is not an http(s) URL")
        self.root = url
        super().__init__(auth or ((user, password or "") if user else None))
        self._config = config
        self._lock = threading.Lock()  # requests_made is counted from the fetch threads
        self.requests_made: Counter = Counter()

    # -- URLs the ledger and image_occurrence hold --------------------------------------------
    def series_url(self, study: str, series: str) -> str:
        return f"{self.root}/studies/{quote(study)}/series/{quote(series)}"

    def instance_url(self, study: str, series: str, sop: str) -> str:
        return f"{self.series_url(study, series)}/instances/{quote(sop)}"

    # -- QIDO-RS / WADO-RS ---------------------------------------------------------------------
    def studies(self, study_date: str | None = None) -> Iterator[str]:
        """Every StudyInstanceUID the server holds (in the StudyDate range, if any), paged."""
        params = {"includefield": _STUDY_UID}
        if study_date:
            params["StudyDate"] = study_date
        for item in self._paged("/studies", "studies", params):
            uid = first_value(item, _STUDY_UID)
            if uid:
                yield str(uid)

    def study_sizes(self, study_date: str | None = None) -> Iterator[tuple[str, int | None]]:
        """(StudyInstanceUID, NumberOfStudyRelatedInstances) of each study, as ``studies``;
        the count is None where the server does not send it (it is optional in QIDO-RS)."""
        params = {"includefield": f"{_STUDY_UID},{_STUDY_INSTANCES}"}
        if study_date:
            params["StudyDate"] = study_date
        for item in self._paged("/studies", "studies", params):
            uid, count = first_value(item, _STUDY_UID), first_value(item, _STUDY_INSTANCES)
            if uid:
                yield str(uid), int(count) if count is not None else None

    def series(self, study: str) -> list[str]:
        path = f"/studies/{quote(study)}/series"
        items = self._paged(path, "series", {"includefield": _SERIES_UID})
        return [str(uid) for item in items if (uid := first_value(item, _SERIES_UID))]

    def instances(self, study: str, series: str) -> list[str]:
        path = f"/studies/{quote(study)}/series/{quote(series)}/instances"
        items = self._paged(path, "instances", {"includefield": _SOP_UID})
        return [str(uid) for item in items if (uid := first_value(item, _SOP_UID))]

    def series_metadata(self, study: str, series: str) -> list[dict[str, Any]]:
        """Every instance of the series as DICOM JSON, bulk data as BulkDataURI links."""
        path = f"/studies/{quote(study)}/series/{quote(series)}/metadata"
        answer = self._get_json(path, "metadata", {}, f"the metadata of series {series}")
        return [item for item in answer if isinstance(item, dict)]

    def _paged(self, path: str, kind: str, params: dict[str, str]) -> Iterator[dict[str, Any]]:
        """All results of a QIDO query, ``limit`` / ``offset`` page by page.

        A full page asks for the next one. A short page is the end, unless the server said it
        cut the answer (PS3.18 8.3.4.6: ``Warning: 299`` when it caps results below our
        limit): then paging goes on until an empty page, whatever the server's cap is.
        """
        offset, limit = 0, self._config.page_size
        while True:
            page_params = {**params, "limit": str(limit), "offset": str(offset)}
            response = self._get(path, kind, page_params, f"the {kind} list")
            items = [
                item for item in self._json(response, f"the {kind} list") if isinstance(item, dict)
            ]
            yield from items
            offset += len(items)
            capped = "299" in response.headers.get("Warning", "")
            if not items or (len(items) < limit and not capped):
                return

    # -- plumbing --------------------------------------------------------------------------------
    def _get_json(self, path: str, kind: str, params: dict[str, str], what: str) -> list:
        return self._json(self._get(path, kind, params, what), what)

    def _json(self, response: requests.Response, what: str) -> list:
        if response.status_code == 204 or not response.content:
            return []  # QIDO: no match
        try:
            answer = response.json()
        except ValueError:
            raise SourceUnavailableError(
                f"{self.root} answered {what} with something that is not JSON: is it a DICOMweb root?"
            ) from None
        return answer if isinstance(answer, list) else []

    def _get(self, path: str, kind: str, params: dict[str, str], what: str) -> requests.Response:
        """One GET with retries and backoff; a clear, credential-free error when it fails."""
        config, last = self._config, ""
        for attempt in range(max(0, config.retries) + 1):
            if attempt:
                time.sleep(min(config.backoff_seconds * 2 ** (attempt - 1), _MAX_BACKOFF_SECONDS))
            with self._lock:
                self.requests_made[kind] += 1
            try:
                response = self._session().get(
                    self.root + path,
                    params=params,
                    headers={"Accept": _DICOM_JSON},
                    timeout=(config.connect_timeout, config.read_timeout),
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = self._reason(exc)
                continue
            status = response.status_code
            if status >= 500 or status in _TRANSIENT:
                last = f"HTTP {status}"
                continue
            if status in (401, 403):
                raise SourceUnavailableError(
                    f"DICOMweb source {self.root} refused the credentials (HTTP {status}) while "
                    f"reading {what}: check {settings.SOURCE_USER.name} / {settings.SOURCE_PASSWORD.name}"
                )
            if status >= 400:
                raise SourceUnavailableError(
                    self._scrub(
                        f"DICOMweb source {self.root} answered HTTP {status} while reading {what}: "
                        "is dicomweb_source_url the DICOMweb root?"
                    )
                )
            return response
        tries = config.retries + 1
        raise SourceUnavailableError(
            self._scrub(
                f"DICOMweb source {self.root} is unavailable ({last}, {tries} attempt"
                f"{'s' if tries > 1 else ''}) while reading {what}: run again to go on "
                "where this run stopped"
            )
        )

    def _reason(self, exc: requests.RequestException) -> str:
        if isinstance(exc, requests.ConnectTimeout):
            return f"connection timed out after {self._config.connect_timeout:g} s"
        if isinstance(exc, requests.ReadTimeout):
            return f"no answer within {self._config.read_timeout:g} s"
        found = _ERRNO_REASON.search(str(exc))
        return found.group(1).strip().lower() if found else type(exc).__name__
