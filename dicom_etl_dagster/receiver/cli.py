"""``dicom-etl-receiver --port P --ae-title T --folder DIR``: receive DICOM over C-STORE into
a folder, until SIGTERM or SIGINT.

Stopping is orderly, so that a Kubernetes pod stop or Ctrl-C loses nothing: stop listening,
answer further C-STOREs with "out of resources" (the sender keeps them and sends again
later), let the writes in progress finish, abort the associations still open, exit 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from pydicom import config as pydicom_config

from dicom_etl_dagster.receiver.scp import StorageScp
from dicom_etl_dagster.receiver.store import InstanceStore

LOG = logging.getLogger("dicom_etl_dagster.receiver")

DEFAULT_PORT = 11112  # the IANA port for DICOM without TLS that needs no root (104 does)
DEFAULT_AE_TITLE = "DICOM_ETL"
#: How long a stop waits for writes in progress (each takes milliseconds; Kubernetes waits
#: 30 s by default before it kills the pod).
WRITE_TIMEOUT_SECONDS = 10.0
_POLL_SECONDS = 0.2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dicom-etl-receiver",
        description=(
            "DICOM C-STORE receiver: stores every instance sent to it as "
            "FOLDER/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm, "
            "for the new_dicom_files sensor to ingest."
        ),
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="TCP port (default %(default)s)"
    )
    parser.add_argument(
        "--ae-title",
        default=DEFAULT_AE_TITLE,
        help="this receiver's AE title (default %(default)s)",
    )
    parser.add_argument("--folder", required=True, type=Path, help="where instances are stored")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="DEBUG adds UIDs and file paths, which identify studies (default %(default)s)",
    )
    return parser.parse_args(argv)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # pynetdicom logs data sets at INFO in places (C-FIND identifiers: patient names) and
    # UIDs in its warnings: below ERROR its lines only with --log-level DEBUG.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.ERROR)
    # pydicom's warnings about odd values quote the values; this program never judges them.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


class _StopSignal:
    """The signal that asked to stop. The handler only sets a number: taking a lock in a
    signal handler can deadlock against the main thread holding it."""

    def __init__(self) -> None:
        self.received: int | None = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def wait(self) -> str:
        while self.received is None:
            time.sleep(_POLL_SECONDS)
        return signal.Signals(self.received).name


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _configure_logging(args.log_level)
    stop = _StopSignal()  # before listening, so an early SIGTERM is not the default kill
    try:
        store = InstanceStore.open(args.folder)
        scp = StorageScp(store, args.ae_title)
    except ValueError as exc:  # pynetdicom's message for an AE title it cannot use
        LOG.error("invalid --ae-title: %s", exc)
        return 2
    except OSError as exc:
        LOG.error("cannot use --folder %s: %s", args.folder, exc.strerror or exc)
        return 2
    if store.removed_parts:
        LOG.info("removed %d unfinished file(s) a previous receiver left", store.removed_parts)
    try:
        host, port = scp.start(args.host, args.port)
    except OSError as exc:
        LOG.error("cannot listen on %s:%d: %s", args.host, args.port, exc.strerror or exc)
        return 1
    LOG.info("receiving as AE %r on %s:%d into %s", args.ae_title, host, port, store.root)
    name = stop.wait()
    LOG.info("%s received: stopping", name)
    if not scp.stop(WRITE_TIMEOUT_SECONDS):
        LOG.warning(
            "writes still in progress after %.0fs were abandoned; their senders were not"
            " answered and will send again",
            WRITE_TIMEOUT_SECONDS,
        )
    LOG.info("stopped")
    return 0
