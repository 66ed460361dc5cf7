"""The Dagster UI end to end: the real webserver, runs launched through its GraphQL API, and the
pages a person looks at, rendered by headless Chromium.

One webserver for the module (``dagster-webserver -w workspace.yaml`` on a free loopback port,
throwaway ``DAGSTER_HOME``), writing to a fresh database on the tests' PostgreSQL. The
Chromium checks skip only when ``/usr/bin/chromium`` is missing (``apt-get install chromium``);
with ``DICOM_ETL_REQUIRE_CHROMIUM=1`` (set by ``.ci/run``) they fail instead.
"""

from __future__ import annotations

import copy
import html
import os
import re
from pathlib import Path

import psycopg
import pytest

from dicom_etl_dagster.assets.table_schemas import TABLE_SCHEMAS
from dicom_etl_dagster.core.vocabulary.files import SOURCE_VERSION
from dicom_etl_dagster_tests.conftest import fresh_database, scalar
from dicom_etl_dagster_tests.helpers import ORIGINAL_OPTIONS, load_script

screenshots = load_script("screenshots")

# The dagster-graphql client calls gql in a way gql deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Using variable_values:DeprecationWarning")

ASSET_GROUPS = {
    "vocabulary": "vocabulary",
    "concept_class": "vocabulary",
    "concept": "vocabulary",
    "concept_relationship": "vocabulary",
    "dicom_data_element": "vocabulary",
    "procedure_occurrence": "imaging",
    "image_occurrence": "imaging",
    "measurement": "imaging",
    "image_feature": "imaging",
    "dicom_file_metadata": "imaging",
    "dicom_ingest_log": "imaging",
    "file_upload_metadata": "upload",
}
SAMPLES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")

ASSET_NODES_QUERY = """
{ assetNodes { assetKey { path } groupName jobNames description
    metadataEntries { label __typename
      ... on TableSchemaMetadataEntry { schema { columns { name type description
            constraints { nullable unique other } } } } } } }
"""

REPOSITORIES_QUERY = """
{ repositoriesOrError { __typename
    ... on RepositoryConnection { nodes { name location { name }
        pipelines { name isJob } sensors { name sensorState { status } } } } } }
"""

MATERIALIZATION_QUERY = """
query ($path: [String!]!) { assetOrError(assetKey: {path: $path}) { __typename
  ... on Asset { assetMaterializations(limit: 1) { runId
      metadataEntries { label __typename
        ... on MarkdownMetadataEntry { mdStr }
        ... on PathMetadataEntry { path }
        ... on TextMetadataEntry { text }
        ... on IntMetadataEntry { intValue }
        ... on UrlMetadataEntry { url } } } } } }
"""


@pytest.fixture(scope="module")
def module_database(postgres_server):
    with fresh_database(postgres_server, "t_web") as url:
        yield url


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory) -> Path:
    folder = screenshots.copy_samples(tmp_path_factory.mktemp("web") / "dicom", list(SAMPLES))
    (folder / "notes.txt").write_text("not an image\n")  # a failure for the ledger to explain
    return folder


@pytest.fixture(scope="module")
def webserver(module_database, vocab_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster_home")
    env = {
        "DICOM_ETL_DATABASE_URL": module_database,
        "DICOM_ETL_VOCAB_DIR": str(vocab_dir),
        "DICOM_ETL_EMBEDDED_PGDATA": str(home / "embedded-pgdata-unused"),
    }
    server = screenshots.Webserver(home, env)
    try:
        server.start(timeout=180)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def launched(webserver, dicom_folder) -> dict[str, tuple[str, str]]:
    """load_vocab, then ingest_metadata, each launched through GraphQL with the original options document."""
    document = copy.deepcopy(ORIGINAL_OPTIONS)
    document["options"]["dicom_files_abs_path"] = str(dicom_folder)
    runs = {}
    for job in ("load_vocab", "ingest_metadata"):
        runs[job] = webserver.run_job(job, document, timeout=600)
        assert runs[job][1] == "SUCCESS", (
            f"{job} run {runs[job][0]}: {runs[job][1]}\n{webserver.log_tail()}"
        )
    return runs


def test_code_location_lists_assets_jobs_and_sensor(webserver):
    entries = webserver.wait_until_loaded(timeout=10)
    assert [e["name"] for e in entries] == ["dicom_etl_dagster.definitions"]

    repositories = webserver.graphql(REPOSITORIES_QUERY)["repositoriesOrError"]
    assert repositories["__typename"] == "RepositoryConnection"
    [repository] = repositories["nodes"]
    assert {"load_vocab", "ingest_metadata"} <= {
        p["name"] for p in repository["pipelines"] if p["isJob"]
    }
    sensors = {s["name"]: s["sensorState"]["status"] for s in repository["sensors"]}
    # No folder and no DICOMweb source configured for the webserver: both start stopped.
    assert sensors == {"new_dicom_files": "STOPPED", "new_dicomweb_series": "STOPPED"}

    nodes = {
        "/".join(n["assetKey"]["path"]): n
        for n in webserver.graphql(ASSET_NODES_QUERY)["assetNodes"]
    }
    assert {key: node["groupName"] for key, node in nodes.items()} == ASSET_GROUPS
    columns = {}
    for key, node in nodes.items():
        assert node["description"], key
        expected_job = "load_vocab" if ASSET_GROUPS[key] == "vocabulary" else "ingest_metadata"
        assert expected_job in node["jobNames"], key
        [schema] = [
            e["schema"]
            for e in node["metadataEntries"]
            if e["__typename"] == "TableSchemaMetadataEntry"
        ]
        columns[key] = {c["name"]: c for c in schema["columns"]}
        assert list(columns[key]) == [c.name for c in TABLE_SCHEMAS[key].columns], key
    wadors = columns["image_occurrence"]["wadors_uri"]
    assert "DICOMweb" in wadors["description"] and wadors["constraints"]["nullable"]
    assert columns["image_occurrence"]["image_occurrence_id"]["constraints"]["other"] == [
        "primary key"
    ]


def _latest_materialization(webserver, asset: str) -> tuple[str, dict]:
    result = webserver.graphql(MATERIALIZATION_QUERY, {"path": [asset]})["assetOrError"]
    assert result["__typename"] == "Asset", result
    [materialization] = result["assetMaterializations"]
    entries = {}
    for entry in materialization["metadataEntries"]:
        values = [v for k, v in entry.items() if k not in ("label", "__typename")]
        entries[entry["label"]] = values[0] if values else entry["__typename"]
    return materialization["runId"], entries


def test_ingest_metadata_launched_through_graphql(
    webserver, launched, module_database, dicom_folder
):
    with psycopg.connect(module_database) as conn:
        assert (
            scalar(conn, "SELECT count(*) FROM cdmvocab.concept WHERE vocabulary_id = 'DICOM'")
            == 8811
        )
        assert scalar(conn, "SELECT count(*) FROM cdmmedicalimaging.dicom_data_element") >= 5190
        statuses = dict(
            conn.execute(
                "SELECT status, count(*) FROM cdmmedicalimaging.dicom_ingest_log GROUP BY 1"
            ).fetchall()
        )
        assert statuses == {"ingested": 3, "failed": 1}
        assert scalar(conn, "SELECT count(*) FROM cdmmedicalimaging.image_occurrence") == 3
        assert scalar(conn, "SELECT count(*) FROM cdmdefault.procedure_occurrence") == 3
        assert (
            scalar(
                conn,
                "SELECT count(DISTINCT sop_instance_id) FROM cdmmedicalimaging.dicom_file_metadata",
            )
            == 3
        )
        assert (
            scalar(conn, "SELECT count(DISTINCT run_id) FROM cdmmedicalimaging.dicom_ingest_log")
            == 1
        )
        assert (
            scalar(conn, "SELECT min(run_id) FROM cdmmedicalimaging.dicom_ingest_log")
            == launched["ingest_metadata"][0]
        )

    # What the UI shows for those runs: numbers, tables and links a person can read.
    ingest_run = launched["ingest_metadata"][0]
    run_id, image = _latest_materialization(webserver, "image_occurrence")
    assert run_id == ingest_run
    assert image["dicom_files_abs_path"] == str(dicom_folder)
    assert image["rows_written"] == 3 and image["dagster/row_count"] == 3
    assert SOURCE_VERSION in image["dicom_vocabulary_version"]
    modalities = image["new_series_by_modality"]
    assert modalities.splitlines()[0].startswith("| Modality | BodyPartExamined |")
    assert {line.split("|")[1].strip() for line in modalities.splitlines()[2:]} == {
        "CT",
        "MR",
        "RTPLAN",
    }

    _, files = _latest_materialization(webserver, "dicom_file_metadata")
    assert (files["files_seen"], files["files_ingested"], files["files_failed"]) == (4, 3, 1)
    _, ledger = _latest_materialization(webserver, "dicom_ingest_log")
    assert "| not a DICOM file | 1 |" in ledger["failures_by_reason"]
    assert str(dicom_folder / "notes.txt") in ledger["first_failures"]
    _, vocabulary = _latest_materialization(webserver, "vocabulary")
    assert vocabulary["source_version"] == SOURCE_VERSION and vocabulary["dagster/row_count"] >= 1


# --- the browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    if not Path(screenshots.CHROMIUM).exists():
        message = f"{screenshots.CHROMIUM} not found: apt-get install chromium"
        if os.environ.get("DICOM_ETL_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"DICOM_ETL_REQUIRE_CHROMIUM=1 but {message}")
        pytest.skip(message)
    return screenshots.CHROMIUM


def _text(dom: str) -> str:
    """The page's visible text, roughly: no scripts or styles, tags as spaces."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def test_asset_graph_page_renders_the_projects_assets(chromium, webserver, launched, tmp_path):
    webserver.dismiss_community_dialog()
    url = screenshots.asset_graph_url(webserver.url)
    names = tuple(f">{name}<" for name in ASSET_GROUPS)  # each asset node's title element
    dom = screenshots.dump_dom(url, must_contain=names, window=screenshots.GRAPH_WINDOW)
    missing = [name for name in names if name not in dom]
    assert not missing, (
        f"asset nodes missing from the rendered graph: {missing}\n{_text(dom)[:3000]}"
    )
    text = _text(dom)
    assert "Global asset lineage" in text
    for group in ("vocabulary", "imaging", "upload"):
        assert group in text
    assert "Never materialized" in text  # file_upload_metadata: uploads are off in this run
    assert "Materialized" in text

    png = screenshots.screenshot(
        url, tmp_path / "asset_graph.png", window=screenshots.GRAPH_WINDOW, scale=0.5
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_materialization_page_shows_counts_modalities_and_links(
    chromium, webserver, launched, dicom_folder
):
    webserver.dismiss_community_dialog()
    url = screenshots.materialization_url(webserver.url, "image_occurrence")
    expected = ("new_series_by_modality", "dicom_vocabulary_version", str(dicom_folder))
    dom = screenshots.dump_dom(url, must_contain=expected)
    text = _text(dom)
    for label in expected:
        assert label in text, f"{label!r} not on the materialization page:\n{text[:3000]}"
    assert launched["ingest_metadata"][0][:8] in text  # "Materialized in run <id>"
    assert SOURCE_VERSION in text
    # The markdown table is rendered as a table, one row per series.
    table = re.search(
        r"<table\b.*?</table>", dom[dom.index("new_series_by_modality") :], flags=re.S
    )
    assert table, "the modality table is not rendered as a table"
    for modality in ("CT", "MR", "RTPLAN", "anatomic_site_concept_id"):
        assert modality in _text(table.group(0))

    overview = _text(
        screenshots.dump_dom(
            f"{webserver.url}/assets/image_occurrence", must_contain=("wadors_uri",)
        )
    )
    assert "Columns" in overview and "wadors_uri" in overview and "image_series_uid" in overview
