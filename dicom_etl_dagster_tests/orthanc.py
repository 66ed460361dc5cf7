"""A real Orthanc (with its DICOMweb plugin) for the upload tests.

Each server runs from its own temporary folder (storage, index, config, log) on free
loopback ports, and is stopped at teardown. The Debian packages ``orthanc`` and
``orthanc-dicomweb`` provide it; ``.ci/run`` installs them. Tests skip only when the
Orthanc binary itself is missing (and fail instead when DICOM_ETL_REQUIRE_ORTHANC=1, as CI sets).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

INSTALL_HINT = "apt-get install orthanc orthanc-dicomweb"
REQUIRE_ENV = "DICOM_ETL_REQUIRE_ORTHANC"
_PLUGIN_PATTERNS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so*",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/lib/*/orthanc/plugins/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so*",
)


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next(
        (
            p
            for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")
            if os.access(p, os.X_OK)
        ),
        None,
    )


def dicomweb_plugin() -> str | None:
    for pattern in _PLUGIN_PATTERNS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def require_orthanc() -> tuple[str, str]:
    """(binary, DICOMweb plugin); skips the test only when the Orthanc binary is not installed."""
    binary = orthanc_binary()
    if binary is None:
        message = f"Orthanc is not installed: {INSTALL_HINT}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message} ({REQUIRE_ENV}=1: CI must run the Orthanc tests)")
        pytest.skip(message)
    plugin = dicomweb_plugin()
    if plugin is None:
        pytest.fail(f"Orthanc is installed but its DICOMweb plugin is not: {INSTALL_HINT}")
    return binary, plugin


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OrthancServer:
    """One Orthanc process; ``stop()`` / ``start()`` keep the same ports and storage."""

    def __init__(
        self,
        folder: Path,
        users: dict[str, str] | None = None,
        dicomweb: bool = True,
        extra_config: dict | None = None,
    ) -> None:
        self.binary, self.plugin = require_orthanc()
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.users = users
        self.dicomweb = dicomweb
        self.extra_config = extra_config or {}  # e.g. {"StableAge": 1} for the /changes sensor
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = folder / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str] | None:
        return next(iter(self.users.items())) if self.users else None

    def _config(self) -> dict:
        config = {
            "Name": "dicom-etl-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "SaveJobs": False,
            "StorageCompression": False,
            "AuthenticationEnabled": bool(self.users),
            "Plugins": [self.plugin] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
        }
        if self.users:
            config["RegisteredUsers"] = dict(self.users)
        return {**config, **self.extra_config}

    def start(self, timeout: float = 30.0) -> OrthancServer:
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(self._config(), indent=2))
        log = open(self.log_path, "ab")  # noqa: SIM115 (Orthanc writes to it until stopped)
        self.process = subprocess.Popen(
            [self.binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=self.folder
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with code {self.process.returncode}: {self.log_tail()}"
                )
            try:
                if requests.get(f"{self.url}/system", auth=self.auth, timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"Orthanc did not answer on {self.url} within {timeout:g} s: {self.log_tail()}"
        )

    def stop(self, graceful: bool = True) -> None:
        """SIGTERM and wait (as an admin stopping the service), or SIGKILL for a quick teardown."""
        if self.process is not None and self.process.poll() is None:
            if graceful:
                self.process.terminate()
            else:
                self.process.kill()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    # -- Orthanc's own API, to check what it holds ------------------------------------------
    def get(self, path: str, **params):
        response = requests.get(
            f"{self.url}{path}",
            params=params or None,
            auth=self.auth,
            timeout=30,
            headers={"Accept": "application/json"},
        )
        response.raise_for_status()
        return response.json()

    def instances(self) -> list[dict]:
        return self.get("/instances", expand="")

    def post_instance(self, data: bytes) -> dict:
        """Store one DICOM file through Orthanc's REST API (``POST /instances``)."""
        response = requests.post(f"{self.url}/instances", data=data, auth=self.auth, timeout=30)
        response.raise_for_status()
        return response.json()

    def sop_instance_uids(self) -> list[str]:
        """Every stored instance's SOP Instance UID (a list: duplicates would show)."""
        return [instance["MainDicomTags"]["SOPInstanceUID"] for instance in self.instances()]

    def qido(self, url: str, **params) -> list[dict]:
        response = requests.get(
            url,
            params=params or None,
            auth=self.auth,
            timeout=30,
            headers={"Accept": "application/dicom+json"},
        )
        response.raise_for_status()
        return response.json() if response.content else []


def start_orthanc(folder: Path, **kwargs) -> OrthancServer:
    """A started server; the caller stops it (the fixtures below do)."""
    last: Exception | None = None
    for _ in range(3):  # a free port may be taken between choosing it and Orthanc binding it
        server = OrthancServer(folder, **kwargs)
        try:
            return server.start()
        except RuntimeError as exc:
            last = exc
    raise last  # type: ignore[misc]


@pytest.fixture
def orthanc(tmp_path):
    """A fresh Orthanc with the DICOMweb plugin, no authentication."""
    server = start_orthanc(tmp_path / "orthanc")
    yield server
    server.stop(graceful=False)


ORTHANC_USER = "etl-uploader"
ORTHANC_PASSWORD = "pw-7Hq2-never-in-logs"


@pytest.fixture
def orthanc_with_auth(tmp_path):
    """A fresh Orthanc that requires HTTP Basic auth (RegisteredUsers + AuthenticationEnabled)."""
    server = start_orthanc(tmp_path / "orthanc-auth", users={ORTHANC_USER: ORTHANC_PASSWORD})
    yield server
    server.stop(graceful=False)


# -- DICOM files to upload ------------------------------------------------------------------
def pydicom_test_file(name: str) -> Path:
    """A file pydicom ships (never downloads)."""
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files" / name


def write_sample_folder(folder: Path, series: int = 4, per_series: int = 10) -> Path:
    """``series`` x ``per_series`` CT instances (one study, fresh UIDs) plus MR_small and rtplan
    as they ship, and one file that is not DICOM (ingest fails it; upload never sees it)."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    study = generate_uid()
    for s in range(series):
        series_uid = generate_uid()
        for i in range(per_series):
            template.StudyInstanceUID, template.SeriesInstanceUID = study, series_uid
            template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            template.InstanceNumber = i + 1
            (folder / f"series{s}").mkdir(exist_ok=True)
            template.save_as(folder / f"series{s}" / f"ct{i:03d}.dcm")
    for name in ("MR_small.dcm", "rtplan.dcm"):
        shutil.copy(pydicom_test_file(name), folder / name)
    (folder / "notes.txt").write_text("not a DICOM file\n")
    return folder
