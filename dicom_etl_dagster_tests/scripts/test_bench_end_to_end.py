"""scripts/benchmark.py --end-to-end: a pydicom parse of every file, and the user's
``dagster job execute -j ingest_metadata`` as a subprocess into fresh schemas, whose ledger
then holds exactly one row per corpus file."""

from __future__ import annotations

import json

import psycopg
import pytest
from psycopg import sql

from dicom_etl_dagster_tests.conftest import fresh_database
from dicom_etl_dagster_tests.helpers import load_script

benchmark = load_script("benchmark")
make_corpus = load_script("make_corpus")
bench_end_to_end = load_script("bench_end_to_end")

FILES = 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    make_corpus.generate(out, make_corpus.CorpusSpec(FILES, 5, files_per_series=4))
    return out


@pytest.fixture(scope="module")
def report(corpus, postgres_server, tmp_path_factory, vocab_dir) -> dict:
    out = tmp_path_factory.mktemp("report")
    with fresh_database(postgres_server, prefix="bench_e2e") as url:
        argv = ["--corpus", str(corpus), "--database-url", url, "--end-to-end"]
        argv += ["--skip-orthanc", "--skip-parse-only", "--skip-etl", "--baseline-files", "0"]
        argv += ["--workers", "1", "--batch-size", "6", "--vocab-dir", str(vocab_dir)]
        argv += ["--json", str(out / "report.json"), "--output", str(out / "report.md")]
        assert benchmark.main(argv) == 0
        mi = bench_end_to_end.SCHEMAS.medical_imaging
        with psycopg.connect(url) as conn:
            ledger = conn.execute(
                sql.SQL("SELECT status, count(*), count(DISTINCT file_path) FROM {} GROUP BY status")
                .format(sql.Identifier(mi, "dicom_ingest_log"))
            ).fetchall()  # fmt: skip
    return {
        "json": json.loads((out / "report.json").read_text()),
        "markdown": (out / "report.md").read_text(),
        "ledger": ledger,
    }


def _phases(report: dict) -> dict:
    return {p["name"].split(" (")[0]: p for p in report["json"]["phases"]}


def test_only_the_two_new_phases_run(report) -> None:
    assert list(_phases(report)) == ["pydicom parse", "end to end"]


def test_pydicom_parses_every_file(report) -> None:
    pydicom = _phases(report)["pydicom parse"]
    assert pydicom["files"] == pydicom["files_ok"] == FILES
    assert pydicom["elements"] > FILES * 20 and "failures" not in pydicom["extra"]
    assert pydicom["files_per_second"] == pytest.approx(FILES / pydicom["seconds"])


def test_the_job_ingests_every_file_once(report) -> None:
    e2e = _phases(report)["end to end"]
    extra = e2e["extra"]
    assert extra["exit_code"] == 0 and extra["succeeded"] is True
    assert extra["command"][1:] == [
        "job",
        "execute",
        "-m",
        "dicom_etl_dagster.definitions",
        "-j",
        "ingest_metadata",
        "-c",
        extra["command"][-1],
    ]
    options = extra["options"]["options"]
    assert options["upload_files"] is False and options["dicom_files_abs_path"].endswith("dicom")
    assert options["parse_workers"] == 1 and options["ingest_batch_size"] == 6
    assert e2e["files"] == e2e["files_ok"] == extra["ledger_rows"] == FILES
    assert extra["ledger_by_status"] == {"ingested": FILES}
    assert report["ledger"] == [("ingested", FILES, FILES)]  # exactly the corpus, once each
    assert extra["rows_by_table"]["image_occurrence"] > 0
    assert e2e["elements"] == extra["rows_by_table"]["dicom_file_metadata"] > FILES * 20


def test_the_report_has_the_ratios_against_the_targets(report) -> None:
    summary = report["json"]["end_to_end"]
    e2e, pydicom = _phases(report)["end to end"], _phases(report)["pydicom parse"]
    assert summary["corpus_files"] == summary["ledger_rows"] == FILES
    assert summary["end_to_end_files_per_second"] == pytest.approx(FILES / e2e["seconds"])
    ratios = summary["ratios"]
    assert ratios["end_to_end_vs_pydicom"] == pytest.approx(
        e2e["files_per_second"] / pydicom["files_per_second"]
    )
    assert ratios["end_to_end_vs_orthanc"] is None  # skipped
    assert summary["targets"] == {"end_to_end_vs_orthanc": 1.5, "end_to_end_vs_pydicom": 1.2}
    text = report["markdown"]
    assert "### End to end" in text and "--end-to-end" in text
    assert "| end to end / Orthanc REST (files/s) | – | >= 1.5x | not measured |" in text
    assert "| end to end / pydicom parse (files/s) |" in text
    assert "dagster job execute -m dicom_etl_dagster.definitions -j ingest_metadata" in text
