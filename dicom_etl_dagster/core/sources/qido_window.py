"""What a DICOMweb server (other than Orthanc) holds in a rolling StudyDate window, as one
fingerprint: the sensor's way to notice new data where there is no change feed.

QIDO-RS has no "changed since": the only cheap question is "which studies, with how many
instances, have a StudyDate in this window". The fingerprint digests those (UID, count)
pairs; when it differs from the last tick's, something arrived and one ingest run over the
window is due. That run is incremental (``core/ingest/dicomweb_pull.py``): it lists the
window's series and instances and fetches metadata only for what the ledger lacks.

What this cannot see: instances of a study whose StudyDate is outside the window (a prior
sent years later), and a change that keeps every study's count (an instance replaced by
another). Orthanc's ``/changes`` feed (``orthanc_changes.py``) has neither limit.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

from dicom_etl_dagster.core.sources.dicomweb import DicomWebSource


def window_start(today: datetime.date, days: int) -> str:
    """The first StudyDate of a window of ``days`` days that ends today, as YYYYMMDD."""
    return (today - datetime.timedelta(days=max(0, days - 1))).strftime("%Y%m%d")


@dataclass(frozen=True)
class WindowFingerprint:
    digest: str  # changes exactly when a study or an instance count in the window changes
    studies: int
    instances: int  # 0 where the server sends no counts


def window_fingerprint(source: DicomWebSource, date_from: str) -> WindowFingerprint:
    """The fingerprint of the studies with a StudyDate from ``date_from`` on."""
    sizes = sorted(source.study_sizes(f"{date_from}-"))
    digest = hashlib.sha256(repr(sizes).encode()).hexdigest()[:16]
    return WindowFingerprint(digest, len(sizes), sum(count or 0 for _, count in sizes))
