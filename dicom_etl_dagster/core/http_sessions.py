"""One ``requests.Session`` per thread, for the HTTP clients that fetch or send from a pool of
threads (the DICOMweb source, the upload clients).

Why a module of its own: a Session is not documented as thread-safe, so each thread gets its
own, and every Session made must be closed when the client is; both clients need exactly that.
"""

from __future__ import annotations

import threading
from typing import TypeVar

import requests

_Client = TypeVar("_Client", bound="PerThreadSessions")


class PerThreadSessions:
    """Base of a client whose threads each use their own Session with the client's credentials,
    which its messages never show."""

    def __init__(self, auth: tuple[str, str] | None) -> None:
        self._auth = auth
        self._local = threading.local()
        self._sessions_lock = threading.Lock()
        self._sessions: list[requests.Session] = []

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.auth = self._auth
            session.trust_env = False  # no ~/.netrc or proxy variables deciding where we connect
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _scrub(self, text: str) -> str:
        """``text`` without the password, for messages and logs."""
        if self._auth and self._auth[1]:
            text = text.replace(self._auth[1], "***")
        return text

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def __enter__(self: _Client) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
