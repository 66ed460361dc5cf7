"""The README's Quickstart, as a new user follows it: a fresh clone, the Quickstart's commands
read out of README.md, then the README's UI command; the UI must show the runs and the
materializations (not "Never materialized").

The install line is the one step not run as written: a fresh `pip install -e ".[dev]"`
downloads and builds about a hundred packages (minutes, and it needs the network). The clone
gets this test's own venv as `.venv` instead, with the clone first on PYTHONPATH (what an
editable install of the clone gives), and `.ci/run` runs that same install line on a fresh
machine before the tests (checked below), so CI covers it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import requests

from dicom_etl_dagster.core.db import embedded
from dicom_etl_dagster.core.vocabulary import files
from dicom_etl_dagster_tests.conftest import REPO_ROOT, scalar
from dicom_etl_dagster_tests.helpers import load_script

screenshots = load_script("screenshots")
INSTALL_LINE = 'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]"'

RUNS_QUERY = """
{ runsOrError { __typename ... on Runs { results { runId jobName status } } } }
"""
LATEST_MATERIALIZATIONS_QUERY = """
{ assetNodes { assetKey { path }
    assetMaterializations(limit: 1) { runId
      metadataEntries { label ... on IntMetadataEntry { intValue } } } } }
"""


def _section(heading: str) -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    start = readme.index(f"## {heading}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end]


def readme_commands() -> tuple[list[str], str]:
    """The Quickstart's set-up lines and its UI command, as the README writes them."""
    quickstart = _section("Quickstart").split("\n### ")[0]  # not the UI tour below it
    blocks = re.findall(r"```bash\n(.*?)```", quickstart, re.S)
    assert len(blocks) == 2, "Quickstart: one block of set-up commands, then the UI command"
    setup = [line for line in blocks[0].splitlines() if line.strip()]
    [ui_command] = [line for line in blocks[1].splitlines() if line.strip()]
    return setup, ui_command


def _clean_env(clone: Path, pgdata: Path, vocab_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DICOM_ETL_", "DAGSTER_"))}
    env.update(
        {
            "PYTHONPATH": str(clone),
            # Offline, as the README says: the pinned files from a folder (tests never download).
            "DICOM_ETL_VOCAB_DIR": str(vocab_dir),
            # Not the machine's default data folder: this test's own embedded PostgreSQL.
            "DICOM_ETL_EMBEDDED_PGDATA": str(pgdata),
            "COLUMNS": "200",
        }
    )
    return env


@pytest.fixture
def clone(tmp_path) -> Path:
    if not (REPO_ROOT / ".git").exists():
        pytest.fail(f"{REPO_ROOT} is not a git checkout: the Quickstart test clones it")
    target = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(target)], check=True)
    return target


@pytest.fixture
def pgdata(tmp_path):
    folder = tmp_path / "pgdata"
    yield folder
    if (folder / "PG_VERSION").exists():
        embedded.stop(folder)  # the documented stop command's code


def test_install_line_is_what_ci_runs():
    setup, _ = readme_commands()
    assert setup[0] == INSTALL_LINE
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv" in ci and 'pip install --quiet -e ".[dev]"' in ci


def test_readme_lists_exactly_the_vocabulary_files_the_loader_needs():
    rows = re.findall(
        r"^\| `([^`]+\.csv)` \| `([^`]+)` \| `([0-9a-f]{64})` \|$", _section("Quickstart"), re.M
    )
    assert rows == [(s.name, s.upstream_path, s.sha256) for s in files.MANIFEST]


class DevServer:
    """The README's UI command in its own process group, on a free loopback port."""

    def __init__(self, command: str, setup: list[str], cwd: Path, env: dict[str, str]):
        self.port = screenshots.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cwd.parent / "dev.log"
        # A new shell, as the README says: the Quickstart's export line first, then the command.
        exports = "\n".join(line for line in setup if line.startswith("export "))
        script = f"{exports}\nexec {command} --host 127.0.0.1 --port {self.port}\n"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                ["bash", "-euc", script],
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def graphql(self, query: str) -> dict:
        response = requests.post(f"{self.url}/graphql", json={"query": query}, timeout=60)
        response.raise_for_status()
        body = response.json()
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def wait_until_loaded(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"UI command exited:\n{self.log_tail()}"
            try:
                workspace = self.graphql(screenshots.WORKSPACE_QUERY)["workspaceOrError"]
                entries = workspace.get("locationEntries") or []
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    return
            except (requests.ConnectionError, requests.Timeout, requests.HTTPError):
                pass
            time.sleep(1)
        raise TimeoutError(f"UI not loaded after {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _run_setup(setup: list[str], clone: Path, env: dict[str, str]) -> str:
    assert setup[0] == INSTALL_LINE
    (clone / ".venv").symlink_to(Path(sys.prefix))  # see the module docstring
    script = "\n".join(setup[1:]) + "\n"
    completed = subprocess.run(
        ["bash", "-euc", script],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    return output


def test_quickstart_in_a_fresh_clone_then_the_ui_shows_runs_and_materializations(
    clone, pgdata, vocab_dir
):
    setup, ui_command = readme_commands()
    env = _clean_env(clone, pgdata, vocab_dir)
    output = _run_setup(setup, clone, env)
    assert f"data folder {pgdata}" in output  # the embedded database this test chose
    assert output.count("RUN_SUCCESS") == 2
    assert "superseded" not in output.lower()
    # Everything the Quickstart creates is gitignored: the clone stays clean.
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True, check=True
    )
    # (.venv is this test's symlink, which `.venv/` in .gitignore, a directory pattern, does not match.)
    assert [line for line in status.stdout.splitlines() if line != "?? .venv"] == []

    server = DevServer(ui_command, setup, clone, env)
    try:
        server.wait_until_loaded()
        runs = server.graphql(RUNS_QUERY)["runsOrError"]["results"]
        by_job = {run["jobName"]: run for run in runs}
        assert sorted(by_job) == ["ingest_metadata", "load_vocab"], runs
        assert {run["status"] for run in runs} == {"SUCCESS"}

        nodes = server.graphql(LATEST_MATERIALIZATIONS_QUERY)["assetNodes"]
        latest = {"/".join(n["assetKey"]["path"]): n["assetMaterializations"] for n in nodes}
    finally:
        server.stop()

    never_materialized = sorted(key for key, found in latest.items() if not found)
    # Every asset but the upload, which materializes only when a run uploads (the README says so).
    assert never_materialized == ["file_upload_metadata"], server.log_tail()
    vocabulary_run, ingest_run = by_job["load_vocab"]["runId"], by_job["ingest_metadata"]["runId"]
    assert latest["concept"][0]["runId"] == vocabulary_run
    assert latest["image_occurrence"][0]["runId"] == ingest_run
    metadata = {
        e["label"]: e.get("intValue") for e in latest["dicom_file_metadata"][0]["metadataEntries"]
    }

    # The numbers the UI shows are the database's, for every one of pydicom's sample files.
    import pydicom.data

    samples = Path(pydicom.data.__file__).parent / "test_files"
    sample_count = sum(1 for path in samples.rglob("*") if path.is_file())
    assert metadata["files_seen"] == sample_count
    import pgserver

    with psycopg.connect(pgserver.get_server(pgdata, cleanup_mode=None).get_uri()) as conn:
        assert (
            scalar(conn, "SELECT count(*) FROM cdmvocab.concept WHERE vocabulary_id = 'DICOM'")
            == 8811
        )
        assert scalar(conn, "SELECT count(*) FROM cdmmedicalimaging.dicom_ingest_log") == (
            sample_count
        )
        assert (
            scalar(
                conn,
                "SELECT count(*) FROM cdmmedicalimaging.dicom_ingest_log WHERE status = 'ingested'",
            )
            == metadata["files_ingested"]
            > 100
        )
