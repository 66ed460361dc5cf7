"""Which series became stable on an Orthanc server since a cursor: its REST ``/changes`` feed.

Why ``/changes`` rather than polling QIDO: Orthanc numbers every change (``Seq``) and reports
``StableSeries`` once no instance of a series has arrived for ``StableAge`` seconds, so a
sensor sees each finished series once, in order, whatever the archive's size (and again when
instances are added to it later: then the run fetches only those). ``StableStudy`` events are
not used: each of the study's series has its own ``StableSeries``, and a study event read in
a later tick than its series' events would request those series a second time. The feed's
``Last`` is the cursor. Orthanc names resources by its own ids; a series' DICOM UIDs are one
``GET /series/{id}`` (and its study's one ``GET /studies/{id}``) away.

A series is taken whole: the cursor never moves past a change whose series did not fit in
this tick's runs, so nothing is skipped when the sensor is capped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from dicom_etl_dagster.core.errors import DicomEtlError
from dicom_etl_dagster.core.upload.clients import split_credentials

ORTHANC_DICOMWEB_PATH = "/dicom-web"
CHANGES_PAGE = 1000  # Orthanc's own cap of one /changes answer (it answers fewer if it wants)


class OrthancFeedError(DicomEtlError):
    """The /changes feed cannot be read (server down, not Orthanc, credentials)."""

    retryable = True


def orthanc_root(dicomweb_root: str, configured: str | None = None) -> str:
    """The Orthanc REST root: configured, else the DICOMweb root without Orthanc's ``/dicom-web``."""
    if configured:
        return split_credentials(configured)[0]
    root = split_credentials(dicomweb_root)[0]
    return root.removesuffix(ORTHANC_DICOMWEB_PATH)


@dataclass
class StableSeries:
    """New stable series in feed order (DICOM UIDs), and the cursor to store after them."""

    series: list[tuple[str, str]] = field(default_factory=list)  # (StudyUID, SeriesUID)
    cursor: int = 0
    changes_read: int = 0
    more: bool = False  # the feed holds more than this tick took


class OrthancFeed:
    def __init__(self, root: str, auth: tuple[str, str] | None, timeout: float = 30.0) -> None:
        self.root = root
        self._session = requests.Session()
        self._session.auth = auth
        self._session.trust_env = False
        self._timeout = timeout
        self._study_uids: dict[str, str] = {}

    def _get(self, path: str, **params: Any) -> Any:
        try:
            response = self._session.get(
                self.root + path, params=params or None, timeout=self._timeout
            )
        except requests.RequestException as exc:
            raise OrthancFeedError(
                f"Orthanc {self.root} does not answer ({type(exc).__name__})"
            ) from None
        if response.status_code != 200:
            raise OrthancFeedError(
                f"Orthanc {self.root} answered {path} with HTTP {response.status_code}"
            )
        try:
            return response.json()
        except ValueError:
            raise OrthancFeedError(
                f"{self.root}{path} is not Orthanc's REST API (no JSON)"
            ) from None

    def _series_uids(self, series_id: str) -> tuple[str, str] | None:
        info = self._get(f"/series/{series_id}")
        study_id = str(info.get("ParentStudy") or "")
        series_uid = (info.get("MainDicomTags") or {}).get("SeriesInstanceUID")
        if study_id not in self._study_uids:
            study = self._get(f"/studies/{study_id}")
            self._study_uids[study_id] = (study.get("MainDicomTags") or {}).get(
                "StudyInstanceUID"
            ) or ""
        study_uid = self._study_uids[study_id]
        return (study_uid, series_uid) if study_uid and series_uid else None

    def is_orthanc(self) -> bool:
        """Does the root answer as Orthanc's REST API? (``/system`` names its API version.)
        A server that does not answer at all raises OrthancFeedError."""
        try:
            system = self._get("/system")
        except OrthancFeedError as exc:
            if "does not answer" in str(exc):
                raise
            return False
        return isinstance(system, dict) and "ApiVersion" in system

    def stable_series(self, since: int, max_series: int) -> StableSeries:
        """Series that became stable after change ``since``, at most ``max_series`` of them
        (a series met twice in the feed is taken once)."""
        found = StableSeries(cursor=since)
        seen: set[str] = set()
        while True:
            page = self._get("/changes", since=found.cursor, limit=CHANGES_PAGE)
            changes = page.get("Changes") or []
            for change in changes:
                series_id = str(change.get("ID") or "")
                if change.get("ChangeType") == "StableSeries" and series_id not in seen:
                    if len(found.series) >= max_series:
                        found.more = True
                        return found  # cursor stays before this change: the next tick takes it
                    seen.add(series_id)
                    uids = self._still_there(self._series_uids, series_id)
                    if uids:
                        found.series.append(uids)
                found.cursor = int(change.get("Seq", found.cursor))
                found.changes_read += 1
            if page.get("Done", True) or not changes:
                found.cursor = max(found.cursor, int(page.get("Last", found.cursor)))
                return found

    def _still_there(self, lookup: Callable[[str], Any], resource: str) -> Any:
        """``lookup(resource)``; None when the resource was deleted since its change (HTTP
        404). A server that went away fails the check of /system instead."""
        try:
            return lookup(resource)
        except OrthancFeedError:
            self._get("/system")
            return None

    def close(self) -> None:
        self._session.close()
