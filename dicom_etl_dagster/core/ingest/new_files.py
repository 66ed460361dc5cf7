"""Plan ingest batches for files that appeared or changed under a folder since a watermark.

The sensor keeps one number per folder (the inode change time, in ns, up to which files
have been handed to runs) instead of a list of files: a cursor stays a few bytes whatever
the folder size. A batch is the half-open window (after, until] of change times, so a run,
or a re-run of the same batch from the UI, selects exactly its files by scanning the folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dicom_etl_dagster.core.ingest.file_scan import iter_files


@dataclass(frozen=True)
class Batch:
    after_ns: int  # exclusive
    until_ns: int  # inclusive
    files: int


@dataclass
class Plan:
    batches: list[Batch] = field(default_factory=list)
    watermark_ns: int = 0  # the next tick looks at change times after this
    files_scanned: int = 0
    files_unsettled: int = 0  # changed too recently: maybe still being written
    files_deferred: int = 0  # settled but beyond this tick's run limit


def plan_batches(
    root: str | Path,
    watermark_ns: int,
    now_ns: int,
    settle_ns: int,
    max_files_per_batch: int,
    max_batches: int,
) -> Plan:
    """Batches of at most ``max_files_per_batch`` settled files changed after ``watermark_ns``.

    A file counts as settled when it has not changed for ``settle_ns`` (a file still being
    written keeps changing). Files with the same change time never straddle two batches,
    since a batch is a window of change times. At most ``max_batches`` are planned per
    call; the watermark stops at the last planned batch, so the rest comes next time.
    """
    plan = Plan(watermark_ns=watermark_ns)
    settled_until = now_ns - settle_ns
    changes: list[int] = []
    for entry in iter_files(root):
        plan.files_scanned += 1
        if entry.ctime_ns <= watermark_ns:
            continue
        if entry.ctime_ns > settled_until:
            plan.files_unsettled += 1
        else:
            changes.append(entry.ctime_ns)
    changes.sort()

    start, after = 0, watermark_ns
    while start < len(changes) and len(plan.batches) < max_batches:
        end = min(start + max_files_per_batch, len(changes))
        while end < len(changes) and changes[end] == changes[end - 1]:
            end += 1  # keep equal change times together
        plan.batches.append(Batch(after_ns=after, until_ns=changes[end - 1], files=end - start))
        after, start = changes[end - 1], end
    plan.watermark_ns = after
    plan.files_deferred = len(changes) - start
    return plan
