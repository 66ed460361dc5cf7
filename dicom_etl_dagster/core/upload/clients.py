"""HTTP clients of a DICOM server: Orthanc's REST API or any DICOMweb (STOW-RS) server.

``core.upload.uploader`` drives them from its worker threads; the Dagster resource
(``resources.dicom_server``) only configures them.

HTTP library: ``requests``. It is already installed with Dagster (no new dependency), its
blocking API is what a ThreadPoolExecutor wants (httpx's extra async half would be unused
weight), and it streams a request body of known length, so a large file is never held
in memory. Each worker thread gets its own ``requests.Session``, since a Session is not
documented as thread-safe.

Secrets: credentials are sent as HTTP Basic auth only. User info found in a URL is moved
out of it before the URL is used for anything else; messages and recorded URLs never
hold a password, and every error message is scrubbed of the password once more.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import requests

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.core.errors import DicomEtlError
from dicom_etl_dagster.core.http_sessions import PerThreadSessions
from dicom_etl_dagster.core.ingest.archives import (
    ArchiveMemberError,
    open_member,
    split_member_path,
)
from dicom_etl_dagster.core.upload.uploader import (
    FileRejectedError,
    ServerRejectedError,
    ServerUnavailableError,
    StoredInstance,
)

KINDS = ("orthanc", "dicomweb")
#: Where Orthanc's DICOMweb plugin serves its root by default.
ORTHANC_DICOMWEB_PATH = "/dicom-web"
CHUNK_SIZE = 1 << 20
MAX_DETAIL_CHARS = 200

# STOW-RS Failure Reason (0008,1197) codes, PS3.18 Table I.2-1 / PS3.4 Annex GG.
_STOW_FAILURES = {
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0111: "duplicate SOP instance",
    0x0112: "no such object instance",
}
#: 4xx answers about the moment, not the file (request timeout, rate limit): retried like 5xx.
_TRANSIENT_4XX = (408, 429)
_ERRNO_REASON = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


class DicomServerConfigError(DicomEtlError):
    """The resource cannot make a client (no URL, unknown kind); the message says what to set."""


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(url without user info and trailing slash, user, password) from ``http://user:pw@host/...``."""
    parts = urlsplit(url.strip())
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc)).rstrip("/"), user, password


class _MultipartBody:
    """A one-part multipart/related body streamed from the file, with a known length."""

    def __init__(self, handle, size: int) -> None:
        self.boundary = f"dicom-etl-{uuid.uuid4().hex}"
        self._head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self._tail = f"\r\n--{self.boundary}--\r\n".encode()
        self._handle = handle
        self._size = size

    def __len__(self) -> int:
        return len(self._head) + self._size + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self._head
        while chunk := self._handle.read(CHUNK_SIZE):
            yield chunk
        yield self._tail


class _HttpClient(PerThreadSessions):
    """Retries, timeouts, per-thread sessions and clear, credential-free errors."""

    kind = ""

    def __init__(
        self,
        server_url: str,
        auth: tuple[str, str] | None,
        connect_timeout: float,
        read_timeout: float,
        retries: int,
        backoff_seconds: float,
    ) -> None:
        super().__init__(auth)
        self.server_url = server_url
        self._timeout = (connect_timeout, read_timeout)
        self._retries = max(0, retries)
        self._backoff = max(0.0, backoff_seconds)

    # -- plumbing ---------------------------------------------------------------------------
    def _reason(self, exc: requests.RequestException) -> str:
        if isinstance(exc, requests.ConnectTimeout):
            return f"connection timed out after {self._timeout[0]:g} s"
        if isinstance(exc, requests.ReadTimeout):
            return f"no answer within {self._timeout[1]:g} s"
        found = _ERRNO_REASON.search(str(exc))
        if found:
            return found.group(1).strip().lower()
        return type(exc).__name__

    @staticmethod
    def _detail(response: requests.Response) -> str:
        """The server's own short explanation of an error (Orthanc: Message/Details)."""
        try:
            body = response.json()
        except ValueError:
            return " ".join(response.text.split())[:MAX_DETAIL_CHARS]
        if isinstance(body, dict):
            parts = [str(body[k]) for k in ("Message", "Details") if body.get(k)]
            if parts:
                return ": ".join(parts)[:MAX_DETAIL_CHARS]
            failure = _stow_failure(body)
            if failure:
                return failure
            if "00081198" in body:  # a STOW-RS answer with an empty FailedSOPSequence
                return "STOW-RS failed SOP instance (no reason given)"
        return json.dumps(body)[:MAX_DETAIL_CHARS]

    def _request(
        self, method: str, path_or_url: str, what: str, body_factory=None, **kwargs
    ) -> requests.Response:
        """One HTTP exchange with retries on connection errors and 5xx.

        ``what`` names the file (or action) for messages. 401/403/404/405 mean the
        configuration is wrong (ServerUnavailableError: the run stops); 408/429 are retried
        like 5xx; any other 4xx is the file's content (ServerRejectedError: recorded, and the
        run goes on with the other files).
        """
        url = path_or_url if "://" in path_or_url else self.server_url + path_or_url
        shown = self._scrub(url)
        last = ""
        for attempt in range(self._retries + 1):
            if attempt:
                time.sleep(min(self._backoff * 2 ** (attempt - 1), 30.0))
            handle = None
            try:
                if body_factory is not None:
                    handle, kwargs["data"], extra_headers = body_factory()
                    kwargs["headers"] = {**kwargs.get("headers", {}), **extra_headers}
                response = self._session().request(method, url, timeout=self._timeout, **kwargs)
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as exc:
                last = self._reason(exc)
                continue
            except requests.RequestException as exc:
                raise ServerUnavailableError(
                    self._scrub(f"cannot send {what} to {shown}: {self._reason(exc)}")
                ) from None
            finally:
                if handle is not None:
                    handle.close()
            status = response.status_code
            if status >= 500 or status in _TRANSIENT_4XX:
                last = f"HTTP {status} {self._detail(response)}".strip()
                continue
            if status in (401, 403):
                raise ServerUnavailableError(
                    self._scrub(
                        f"DICOM server {self.server_url} refused the credentials (HTTP {status}) while sending {what}: "
                        f"check {settings.DICOM_SERVER_USER.name} / {settings.DICOM_SERVER_PASSWORD.name}"
                    )
                )
            if status in (404, 405):
                raise ServerUnavailableError(
                    self._scrub(
                        f"{shown} answered HTTP {status} while sending {what}: is the {self.kind} server URL right "
                        f"({settings.DICOM_SERVER_URL.name}{' / ' + settings.DICOMWEB_URL.name if self.kind == 'dicomweb' else ''})?"
                    )
                )
            if status >= 400:
                detail = self._scrub(self._detail(response)) or "no reason given"
                raise ServerRejectedError(
                    self._scrub(f"{what}: rejected by {self.server_url} (HTTP {status}: {detail})"),
                    http_status=status,
                    reason=detail,
                )
            return response
        tries = f"{self._retries + 1} attempt{'s' if self._retries else ''}"
        raise ServerUnavailableError(
            self._scrub(
                f"DICOM server {self.server_url} is unavailable ({last}, {tries}) while sending {what}"
            )
        )

    def _json(self, response: requests.Response, path: str):
        try:
            return response.json()
        except ValueError:
            raise ServerUnavailableError(
                f"{self.server_url} answered {path} with something that is not JSON: is it a {self.kind} server?"
            ) from None

    @staticmethod
    def _open(path: str):
        if split_member_path(path) is not None:  # streamed from its archive, never extracted
            try:
                stream, size, _mtime_ns = open_member(path)
            except ArchiveMemberError as exc:
                raise FileRejectedError(f"{path}: {exc}") from None
            return stream, size
        try:
            handle = open(path, "rb")  # noqa: SIM115 (closed by the request that streams it)
            return handle, os.fstat(handle.fileno()).st_size
        except OSError as exc:
            raise FileRejectedError(
                f"{path}: cannot read file: {exc.strerror or type(exc).__name__}"
            ) from None


def _first(item: dict, tag: str):
    """The first value of ``tag`` in a DICOM JSON model item, or None."""
    return ((item.get(tag) or {}).get("Value") or [None])[0]


def _out_of_resources(body) -> bool:
    """Whether a STOW-RS failure is 'Refused: Out of Resources' (A7xx): the server's state,
    not the file's content."""
    failed = ((body or {}).get("00081198") or {}).get("Value") or []
    codes = [_first(item, "00081197") for item in failed]
    return any(code is not None and int(code) & 0xFF00 == 0xA700 for code in codes)


def _stow_failure(body) -> str | None:
    """The failure reason of a STOW-RS answer (dict in the DICOM JSON model), if any."""
    failed = ((body or {}).get("00081198") or {}).get("Value") or []
    for item in failed:
        code = _first(item, "00081197")  # FailureReason
        if code is not None:
            code = int(code)
            return f"STOW-RS failure reason 0x{code:04X} ({_STOW_FAILURES.get(code, 'see PS3.4 Annex GG')})"
        return "STOW-RS failed SOP instance (no reason given)"
    return None


class OrthancClient(_HttpClient):
    """Orthanc's REST API: ``POST /instances`` with the file as body (as the original plugin did)."""

    kind = "orthanc"

    def __init__(self, server_url: str, dicomweb_url: str | None, **kwargs) -> None:
        super().__init__(server_url, **kwargs)
        self._dicomweb_url = dicomweb_url
        self._probed: tuple[str | None] | None = None

    def dicomweb_root(self) -> str | None:
        """The configured DICOMweb root; else Orthanc's plugin root if it answers a QIDO query."""
        if self._dicomweb_url:
            return self._dicomweb_url
        if self._probed is None:
            root = self.server_url + ORTHANC_DICOMWEB_PATH
            try:
                response = self._session().get(
                    root + "/studies",
                    params={"limit": "1"},
                    timeout=self._timeout,
                    headers={"Accept": "application/dicom+json"},
                )
                self._probed = (root if response.status_code == 200 else None,)
            except requests.RequestException:
                self._probed = (None,)
        return self._probed[0]

    def upload(self, path: str, sop_instance_uid: str) -> StoredInstance:
        size = 0

        def body():
            nonlocal size
            handle, size = self._open(path)
            return handle, handle, {"Content-Type": "application/dicom"}

        answer = self._json(self._request("POST", "/instances", path, body_factory=body), path)
        if isinstance(
            answer, list
        ):  # Orthanc answers a list for archives; one file gives one entry
            answer = answer[0] if len(answer) == 1 else {}
        if not isinstance(answer, dict):
            answer = {}
        status, instance_id = answer.get("Status"), str(answer.get("ID") or "")
        stored = status in ("Success", "AlreadyStored")
        if not status or (stored and not instance_id):
            raise ServerUnavailableError(
                f"{self.server_url} answered {path} without an Orthanc status and instance id: "
                "is it Orthanc?"
            )
        if not stored:
            # e.g. "FilteredOut": a filter of the server (Lua, plugin) refused the instance.
            reason = f"Orthanc status {status}"
            raise ServerRejectedError(
                f"{path}: not stored by {self.server_url} ({reason})",
                http_status=200,
                reason=reason,
            )
        info = self._json(
            self._request(
                "GET",
                f"/instances/{quote(instance_id)}/attachments/dicom/info",
                f"{path} (stored file info)",
            ),
            path,
        )
        if not isinstance(info, dict) or not info.get("Uuid"):
            raise ServerUnavailableError(
                f"{self.server_url} gave no stored file uuid for {path}: is it Orthanc?"
            )
        return StoredInstance(
            instance_id=instance_id,
            uploaded_filename=f"{info['Uuid']}.dcm",
            already_present=status == "AlreadyStored",
            bytes_sent=size,
        )


class DicomWebClient(_HttpClient):
    """Any DICOMweb server: STOW-RS ``POST {root}/studies``, one instance per request."""

    kind = "dicomweb"

    def dicomweb_root(self) -> str | None:
        return self.server_url

    def upload(self, path: str, sop_instance_uid: str) -> StoredInstance:
        size = 0

        def body():
            nonlocal size
            handle, size = self._open(path)
            multipart = _MultipartBody(handle, size)
            return (
                handle,
                multipart,
                {
                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={multipart.boundary}',
                    "Accept": "application/dicom+json",
                },
            )

        response = self._request("POST", "/studies", path, body_factory=body)
        try:
            answer = response.json() if response.content else {}
        except ValueError:
            answer = {}
        failure = _stow_failure(answer) if isinstance(answer, dict) else None
        if failure and _out_of_resources(answer):
            raise ServerUnavailableError(
                f"DICOM server {self.server_url} is out of resources ({failure}) while sending {path}"
            )
        if failure:
            raise ServerRejectedError(
                f"{path}: rejected by {self.server_url} (HTTP {response.status_code}: {failure})",
                http_status=response.status_code,
                reason=failure,
            )
        retrieve_url = None
        referenced = (
            ((answer.get("00081199") or {}).get("Value") or []) if isinstance(answer, dict) else []
        )
        for item in referenced:
            if _first(item, "00081155") == sop_instance_uid or len(referenced) == 1:
                retrieve_url = _first(item, "00081190")  # RetrieveURL
                break
        return StoredInstance(
            instance_id=sop_instance_uid,
            uploaded_filename=retrieve_url or sop_instance_uid,
            already_present=False,
            bytes_sent=size,
        )
