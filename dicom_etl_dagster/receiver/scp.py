"""The storage SCP: pynetdicom accepting every storage SOP class and Verification, handing
each C-STORE's data set, as received, to the InstanceStore, and one log line per association.

The data set is never decoded and re-encoded: ``event.encoded_dataset()`` is the peer's
bytes behind a preamble and the file meta pynetdicom builds from the request (SOP class and
instance, the transfer syntax of the presentation context), so a compressed instance stays
compressed and a stored file holds exactly what the sender sent.

Logs carry no PHI: the calling AE title, the peer's address, counts and reasons at INFO and
WARNING; UIDs and file paths (which are UIDs) at DEBUG only, since a UID identifies a
patient's study to anyone holding the images.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_etl_dagster.receiver.store import (
    InstanceStore,
    Outcome,
    ReceiverClosing,
    RefusedInstance,
)

LOG = logging.getLogger("dicom_etl_dagster.receiver")

SUCCESS = 0x0000
#: PS3.4 B.2.3 Storage Service statuses the receiver answers with.
OUT_OF_RESOURCES = 0xA700  # a write failed or the receiver is stopping: the sender may retry
CANNOT_UNDERSTAND = 0xC000  # the instance can never be filed as sent (a UID unfit for a path)
_ERROR_COMMENT_LENGTH = 64  # (0000,0902) is LO


def application_entity(ae_title: str) -> ApplicationEntity:
    """An AE accepting every storage SOP class with every transfer syntax pynetdicom knows
    (compressed ones included: the data set is stored, not decoded), and Verification."""
    ae = ApplicationEntity(ae_title=ae_title)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None  # every storage context names its SOP class
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    return ae


@dataclass
class Tally:
    """What happened on one association, for its log line."""

    peer: str
    started: float
    stored: int = 0
    already_present: int = 0
    stored_beside: int = 0
    refused: int = 0
    failed: int = 0
    echoes: int = 0

    def count(self, outcome: Outcome) -> None:
        if outcome is Outcome.STORED:
            self.stored += 1
        elif outcome is Outcome.ALREADY_PRESENT:
            self.already_present += 1
        else:
            self.stored_beside += 1

    def summary(self, ended: str) -> str:
        return (
            f"association from {self.peer} {ended} after {time.monotonic() - self.started:.1f}s: "
            f"{self.stored} stored, {self.already_present} already present, "
            f"{self.stored_beside} stored beside a different instance, {self.refused} refused, "
            f"{self.failed} failed, {self.echoes} echo(es)"
        )


def _peer(assoc: Association) -> str:
    requestor = assoc.requestor
    return f"AE {requestor.ae_title!r} at {requestor.address}:{requestor.port}"


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:_ERROR_COMMENT_LENGTH]
    return status


class StorageScp:
    """The receiver's network side: start, then stop (which finishes writes in progress)."""

    def __init__(self, store: InstanceStore, ae_title: str) -> None:
        self.store = store
        self.ae = application_entity(ae_title)
        self._tallies: dict[Association, Tally] = {}
        self._tallies_lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` in background threads; returns the address bound."""
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        server = self.ae.start_server((host, port), block=False, evt_handlers=handlers)
        assert server is not None  # block=False always returns the server
        self._server = server
        address = server.server_address
        return str(address[0]), int(address[1])

    def stop(self, write_timeout: float) -> bool:
        """Stop listening, refuse further C-STOREs, wait up to ``write_timeout`` s for the
        writes in progress, then abort the associations still open. True if every write
        in progress finished (a part left otherwise is removed at the next start)."""
        if self._server is not None:
            self._server.shutdown()
        finished = self.store.close(write_timeout)
        open_associations = self.ae.active_associations
        self.ae.shutdown()  # A-ABORT to each open association: senders retry what is unanswered
        for assoc in open_associations:
            assoc.join(timeout=2)  # their threads log their lines before the process ends
        return finished

    def _tally(self, assoc: Association) -> Tally:
        with self._tallies_lock:
            tally = self._tallies.get(assoc)
            if tally is None:
                tally = self._tallies[assoc] = Tally(_peer(assoc), time.monotonic())
            return tally

    def _end(self, assoc: Association, ended: str) -> None:
        with self._tallies_lock:
            tally = self._tallies.pop(assoc, None)
        if tally is not None:
            LOG.info(tally.summary(ended))

    def _on_established(self, event: evt.Event) -> None:
        LOG.debug("association from %s established", self._tally(event.assoc).peer)

    def _on_released(self, event: evt.Event) -> None:
        self._end(event.assoc, "released")

    def _on_aborted(self, event: evt.Event) -> None:
        self._end(event.assoc, "aborted")

    def _on_rejected(self, event: evt.Event) -> None:
        LOG.info("rejected an association from %s", _peer(event.assoc))

    def _on_echo(self, event: evt.Event) -> int:
        self._tally(event.assoc).echoes += 1
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        tally = self._tally(event.assoc)
        try:
            filed = self.store.store(event.encoded_dataset())
        except RefusedInstance as exc:
            tally.refused += 1
            LOG.warning("refused an instance from %s: %s", tally.peer, exc)
            return _status(CANNOT_UNDERSTAND, str(exc))
        except ReceiverClosing:
            tally.failed += 1
            return _status(OUT_OF_RESOURCES, "the receiver is shutting down")
        except OSError as exc:
            tally.failed += 1
            # strerror only: the exception's text holds the path, which holds UIDs.
            LOG.error("could not write an instance from %s: %s", tally.peer, exc.strerror)
            LOG.debug("write failure", exc_info=True)
            return _status(OUT_OF_RESOURCES, "the instance could not be written")
        tally.count(filed.outcome)
        if filed.outcome is Outcome.STORED_BESIDE:
            LOG.warning(
                "an instance from %s differs from the one already stored under its SOP "
                "Instance UID: both kept, the new one named <SOPInstanceUID>%s",
                tally.peer,
                filed.suffix,
            )
        LOG.debug("%s: %s", filed.outcome.value, filed.path.relative_to(self.store.root))
        return SUCCESS
