"""Stop the embedded PostgreSQL from the command line.

    python -m dicom_etl_dagster.core.db.embedded stop [--data-dir FOLDER]

Runs are left with the embedded server running (later runs reuse it), so users need a way
to stop it. ``pg_ctl`` refuses to run as root, and as root pgserver runs PostgreSQL as its
own hidden system user (``pgserver``), so a plain ``pg_ctl -D <folder> stop`` fails there.
This command runs pgserver's bundled ``pg_ctl`` as the owner of the data folder, whoever
that is. It never starts a server or creates a folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pwd
import subprocess
import sys
from pathlib import Path

from dicom_etl_dagster.core.db.connection import embedded_data_dir
from dicom_etl_dagster.core.errors import DicomEtlError


def pg_ctl_path() -> Path:
    """pgserver's bundled pg_ctl (not on PATH: it lives inside the installed package).

    Found without importing pgserver, whose import warns about XDG_RUNTIME_DIR as root.
    """
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        raise DicomEtlError("the pgserver package is not installed")
    return Path(spec.origin).parent / "pginstall" / "bin" / "pg_ctl"


def server_owner(data_dir: Path) -> str:
    """The system user PostgreSQL runs as: the owner of its data folder."""
    return pwd.getpwuid(data_dir.stat().st_uid).pw_name


def is_running(data_dir: Path) -> bool:
    """Whether postmaster.pid names a live process (a stale file after a crash does not count)."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def stop(data_dir: Path) -> str:
    """Stop the server of ``data_dir`` (fast shutdown, waits); returns what happened, one line."""
    if not (data_dir / "PG_VERSION").is_file():
        raise DicomEtlError(f"{data_dir} is not an embedded PostgreSQL data folder")
    if not is_running(data_dir):
        return f"embedded PostgreSQL in {data_dir} is not running"
    owner = server_owner(data_dir)
    me = pwd.getpwuid(os.geteuid()).pw_name
    if owner != me and os.geteuid() != 0:
        raise DicomEtlError(
            f"the embedded PostgreSQL in {data_dir} runs as {owner}: run this as {owner} or root"
        )
    completed = subprocess.run(
        [str(pg_ctl_path()), "-D", str(data_dir), "-w", "-m", "fast", "stop"],
        user=owner if owner != me else None,
        cwd="/",  # the owner may not be allowed into the caller's working folder
        capture_output=True,
        text=True,
        timeout=120,
    )
    if completed.returncode != 0:
        reason = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise DicomEtlError(f"pg_ctl could not stop the server in {data_dir}: {reason}")
    return f"stopped the embedded PostgreSQL in {data_dir} (it ran as {owner})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dicom_etl_dagster.core.db.embedded",
        description="Stop the embedded PostgreSQL that runs leave running.",
    )
    parser.add_argument("action", choices=["stop"])
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="its data folder (default: DICOM_ETL_EMBEDDED_PGDATA, else the default the log names)",
    )
    args = parser.parse_args(argv)
    data_dir = (args.data_dir or embedded_data_dir()).expanduser().absolute()
    try:
        print(stop(data_dir))
    except DicomEtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
