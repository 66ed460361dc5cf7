"""Walk a folder tree lazily: every regular file, with the size and mtime the ledger compares."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple


class FileEntry(NamedTuple):
    path: str
    size: int
    mtime_ns: int
    #: Inode change time: unlike mtime it cannot be set back by a copy that preserves times
    #: (cp -p, rsync -t), so it is what "new since" is measured on.
    ctime_ns: int = 0


#: Folders whose files are not finished yet: ``dicom-etl-receiver`` writes each instance
#: under ``.receiving/`` and renames it into place when it is whole (receiver/store.py).
UNFINISHED_FOLDERS = frozenset({".receiving"})


def iter_files(root: str | os.PathLike) -> Iterator[FileEntry]:
    """Every regular file under ``root`` (any name, any suffix), in a stable order.

    A generator over os.scandir, so a folder of millions of files is never held in memory.
    Symlinked folders are not followed (no loops); symlinked files are read like files.
    Folders named in UNFINISHED_FOLDERS are passed over.
    """
    stack = [os.fspath(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        subfolders = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in UNFINISHED_FOLDERS:
                        subfolders.append(entry.path)
                elif entry.is_file():
                    stat = entry.stat()
                    yield FileEntry(
                        os.path.abspath(entry.path),
                        stat.st_size,
                        stat.st_mtime_ns,
                        stat.st_ctime_ns,
                    )
            except OSError:
                continue  # vanished between listing and stat
        stack.extend(reversed(subfolders))


def count_files(root: str | os.PathLike) -> int:
    """How many files ``iter_files`` will yield, cheaply: no stat of each file (the entry
    type comes with the listing), so a progress line can show a total before the run."""
    count, stack = 0, [os.fspath(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as scan:
                for entry in scan:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if entry.name not in UNFINISHED_FOLDERS:
                                stack.append(entry.path)
                        elif entry.is_file():
                            count += 1
                    except OSError:
                        continue
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
    return count
