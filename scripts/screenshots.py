#!/usr/bin/env python3
"""Screenshots of the Dagster UI for the README, taken from a real webserver.

Starts ``dagster-webserver -w workspace.yaml`` on a free loopback port with a throwaway
``DAGSTER_HOME``, runs ``load_vocab`` and ``ingest_metadata`` through the GraphQL API (the
``dagster-graphql`` client, as the UI's Materialize button does) on copies of pydicom's
sample files, and has headless Chromium save:

    docs/img/asset_graph.png       the global asset lineage: vocabulary -> imaging -> upload
    docs/img/materialization.png   image_occurrence's materialization: counts, modalities, links

    python scripts/screenshots.py                       # embedded PostgreSQL in a temp folder
    python scripts/screenshots.py --database-url postgresql://...   # a fresh database of yours

Needs Chromium (``apt-get install chromium``) and the DICOM2OMOP files (``DICOM_ETL_VOCAB_DIR``,
else they are downloaded into ``external/``).

The same machinery (``Webserver``, ``dump_dom``, ``screenshot``) drives the end-to-end test
``dicom_etl_dagster_tests/test_webserver.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
WEBSERVER = str(Path(sys.executable).with_name("dagster-webserver"))
ASSET_GROUPS = ("vocabulary", "imaging", "upload")

#: Runs launched from the webserver start at once, in a subprocess (DefaultRunLauncher),
#: without a dagster-daemon to dequeue them; no telemetry from throwaway instances.
INSTANCE_YAML = """\
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
telemetry:
  enabled: false
"""

WORKSPACE_QUERY = """
{ workspaceOrError { __typename
    ... on PythonError { message }
    ... on Workspace { locationEntries { name loadStatus
        locationOrLoadError { __typename ... on PythonError { message stack } } } } } }
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Webserver:
    """``dagster-webserver -w workspace.yaml`` in its own process group, stopped as a whole."""

    def __init__(self, dagster_home: Path, env: dict[str, str], log_path: Path | None = None):
        self.dagster_home = Path(dagster_home)
        self.dagster_home.mkdir(parents=True, exist_ok=True)
        (self.dagster_home / "dagster.yaml").write_text(INSTANCE_YAML)
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("DICOM_ETL_", "DAGSTER_"))
        }
        self.env.update({"DAGSTER_HOME": str(self.dagster_home), **env})
        self.log_path = Path(log_path or self.dagster_home / "webserver.log")
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def start(self, timeout: float = 180) -> Webserver:
        for attempt in range(3):
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    [
                        WEBSERVER,
                        "-w",
                        "workspace.yaml",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(self.port),
                    ],
                    cwd=REPO_ROOT,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                self.wait_until_loaded(timeout)
                return self
            except RuntimeError:
                # Another process took the free port between our probe and the bind: try another.
                if attempt == 2 or "address already in use" not in self.log_tail().lower():
                    self.stop()
                    raise
                self.stop()
                self.port = free_port()
        return self

    def wait_until_loaded(self, timeout: float) -> list[dict]:
        """Wait for every code location to finish loading; a load error raises with its message."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"dagster-webserver exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                workspace = self.graphql(WORKSPACE_QUERY, timeout=10)["workspaceOrError"]
            except (requests.ConnectionError, requests.Timeout):
                workspace = None
            if workspace is not None:
                if workspace["__typename"] != "Workspace":
                    raise RuntimeError(f"workspace failed to load: {workspace.get('message')}")
                entries = workspace["locationEntries"]
                errors = [
                    e
                    for e in entries
                    if (e["locationOrLoadError"] or {}).get("__typename") == "PythonError"
                ]
                if errors:
                    error = errors[0]["locationOrLoadError"]
                    raise RuntimeError(
                        f"code location {errors[0]['name']} failed to load: {error['message']}"
                        + "".join(error["stack"][-10:])
                    )
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    return entries
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"code location not loaded after {timeout:.0f}s:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        response = requests.post(
            f"{self.url}/graphql",
            json={"query": query, "variables": variables or {}},
            timeout=timeout,
        )
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise RuntimeError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def client(self):
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient("127.0.0.1", port_number=self.port, timeout=120)

    def run_job(self, job: str, run_config: dict, timeout: float = 600) -> tuple[str, str]:
        """Launch ``job`` through the GraphQL client and wait for it to end: (run id, status name)."""
        from dagster import DagsterRunStatus

        client = self.client()
        run_id = client.submit_job_execution(job, run_config=run_config)
        finished = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
        deadline = time.monotonic() + timeout
        while (status := client.get_run_status(run_id)) not in finished:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"run {run_id} of {job} still {status.value} after {timeout:.0f}s"
                )
            time.sleep(1)
        return run_id, status.value

    def dismiss_community_dialog(self) -> None:
        """The UI greets a new instance with a newsletter dialog; mark it seen (as its Skip button does)."""
        self.graphql("mutation { setNuxSeen }")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # The whole group: the webserver, its code server and any run worker it started.
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> Webserver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- pages ---------------------------------------------------------------------------------


def asset_graph_url(base_url: str, groups=ASSET_GROUPS) -> str:
    """The global asset lineage with every group expanded (the UI's "Expand all groups")."""
    expanded = ",".join(f"global@global:{group}" for group in groups)
    return f"{base_url}/asset-groups?expanded={quote(expanded, safe='')}"


def materialization_url(base_url: str, asset: str) -> str:
    """An asset's Events tab, which opens on its latest materialization and its metadata."""
    return f"{base_url}/assets/{quote(asset)}?view=events"


# --- headless Chromium ---------------------------------------------------------------------

#: Wide enough that the graph is drawn with full asset nodes (narrower, it is drawn zoomed
#: out with shortened names).
GRAPH_WINDOW = (3200, 1300)  # wide enough that the UI shows whole asset names
PAGE_WINDOW = (1600, 1000)


def _chromium(
    args: list[str],
    budget_ms: int,
    window: tuple[int, int],
    timeout: float = 180,
    extra: list[str] = (),
) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="dicom_etl_chromium_")
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        # Virtual time runs the React app until it is idle (its GraphQL fetches included).
        f"--virtual-time-budget={budget_ms}",
        f"--window-size={window[0]},{window[1]}",
        *extra,
        *args,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise TimeoutError(
            f"chromium did not finish in {timeout:.0f}s: {stderr.decode(errors='replace')[-2000:]}"
        ) from None
    finally:
        try:  # helpers (crashpad) that outlive the browser
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(profile, ignore_errors=True)
    return subprocess.CompletedProcess(
        command,
        process.returncode,
        stdout.decode(errors="replace"),
        stderr.decode(errors="replace"),
    )


def dump_dom(
    url: str,
    must_contain: tuple[str, ...] = (),
    window: tuple[int, int] = PAGE_WINDOW,
    attempts: int = 3,
) -> str:
    """The page's DOM after its JavaScript ran; tried again (with more time) until it holds ``must_contain``."""
    dom = ""
    for attempt in range(attempts):
        completed = _chromium(["--dump-dom", url], budget_ms=15000 * (attempt + 1), window=window)
        dom = completed.stdout
        if all(text in dom for text in must_contain):
            return dom
    return dom


def screenshot(
    url: str, out: Path, window: tuple[int, int] = PAGE_WINDOW, scale: float = 1.0
) -> Path:
    """A PNG of the page as a ``window``-sized browser shows it, ``scale`` times the pixels."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    completed = _chromium(
        [f"--screenshot={out}", url],
        budget_ms=20000,
        window=window,
        extra=[f"--force-device-scale-factor={scale}"],
    )
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot of {url}: {completed.stderr[-2000:]}")
    return out


# --- the README's screenshots --------------------------------------------------------------


def copy_samples(folder: Path, names: list[str] | None = None) -> Path:
    """Copies of pydicom's sample files (all of them, or ``names``) in ``folder``."""
    import pydicom.data

    source = Path(pydicom.data.__file__).parent / "test_files"
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.rglob("*")):
        if path.is_file() and (names is None or path.name in names):
            target = folder / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    return folder


def original_options(dicom_folder: Path) -> dict:
    """The original plugin's options document, pointed at ``dicom_folder``."""
    return {
        "options": {
            "flow_action_type": "ingest_metadata",
            "database_code": "alpdev_pg",
            "medical_imaging_schema_name": "cdmmedicalimaging",
            "cdm_schema_name": "cdmdefault",
            "vocab_schema_name": "cdmvocab",
            "dicom_files_abs_path": str(dicom_folder),
            "to_truncate": False,
            "upload_files": False,
            "missing_person_id_options": "use_id_zero",
            "person_to_patient_mapping": {
                "schema_name": "cdmmedicalimaging",
                "table_name": "mappingtable",
                "person_id_column_name": "source_person_id",
                "patient_id_column_name": "source_patient_id",
            },
        }
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url", help="an empty PostgreSQL database (default: embedded, temporary)"
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "img")
    parser.add_argument(
        "--asset", default="image_occurrence", help="whose materialization page to capture"
    )
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        parser.error(f"{CHROMIUM} not found: apt-get install chromium")

    work = Path(tempfile.mkdtemp(prefix="dicom_etl_screenshots_"))
    server = None
    try:
        database_url = args.database_url
        if not database_url:
            import pgserver

            server = pgserver.get_server(work / "pgdata", cleanup_mode="delete")
            database_url = server.get_uri()
        dicom = copy_samples(work / "dicom")
        env = {
            "DICOM_ETL_DATABASE_URL": database_url,
            "DICOM_ETL_EMBEDDED_PGDATA": str(work / "unused-pgdata"),
        }
        if os.environ.get("DICOM_ETL_VOCAB_DIR"):
            env["DICOM_ETL_VOCAB_DIR"] = os.environ["DICOM_ETL_VOCAB_DIR"]
        with Webserver(work / "dagster_home", env) as web:
            print(f"dagster-webserver on {web.url} (DAGSTER_HOME {web.dagster_home})")
            for job in ("load_vocab", "ingest_metadata"):
                started = time.monotonic()
                run_id, status = web.run_job(job, original_options(dicom))
                print(f"{job}: run {run_id} {status} in {time.monotonic() - started:.0f}s")
                if status != "SUCCESS":
                    raise SystemExit(f"{job} did not succeed; see the run {run_id} in {web.url}")
            web.dismiss_community_dialog()
            graph = screenshot(
                asset_graph_url(web.url),
                args.out / "asset_graph.png",
                window=GRAPH_WINDOW,
                scale=0.75,
            )
            page = screenshot(
                materialization_url(web.url, args.asset),
                args.out / "materialization.png",
                window=(1600, 1100),
            )
            for png in (graph, page):
                print(f"saved {png} ({png.stat().st_size // 1024} KB)")
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
