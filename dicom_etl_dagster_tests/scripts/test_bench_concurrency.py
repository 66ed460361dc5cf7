"""scripts/benchmark.py --concurrent-runs: N real ingest processes over disjoint slices of one
corpus; the report counts every file once per N and its shares are fractions."""

from __future__ import annotations

import json

import pytest

from dicom_etl_dagster.core.db.connection import connect
from dicom_etl_dagster_tests.conftest import fresh_database
from dicom_etl_dagster_tests.helpers import load_script

benchmark = load_script("benchmark")
bench_concurrency = load_script("bench_concurrency")
make_corpus = load_script("make_corpus")

FILES = 14  # 7 series of 2: run slices split no series at N=2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    make_corpus.generate(out, make_corpus.CorpusSpec(FILES, 3, files_per_series=2))
    return out


@pytest.fixture(scope="module")
def report(corpus, postgres_server, tmp_path_factory, vocab_dir) -> dict:
    out = tmp_path_factory.mktemp("report")
    with fresh_database(postgres_server, prefix="bench") as url:
        argv = ["--corpus", str(corpus), "--database-url", url, "--concurrent-runs", "1,2"]
        argv += ["--workers", "1", "--batch-size", "3", "--vocab-dir", str(vocab_dir)]
        argv += ["--json", str(out / "report.json"), "--output", str(out / "report.md")]
        assert benchmark.main(argv) == 0
    return {
        "json": json.loads((out / "report.json").read_text()),
        "markdown": (out / "report.md").read_text(),
    }


def test_every_file_is_ingested_once_per_run_count(report) -> None:
    counts = report["json"]["counts"]
    assert [c["runs"] for c in counts] == [1, 2]
    for c in counts:
        assert c["files"] == c["files_ok"] == FILES
        assert len(c["per_run"]) == c["runs"]
        assert sum(r["files_ok"] for r in c["per_run"]) == FILES
        assert all(r["files_ok"] > 0 for r in c["per_run"])  # disjoint, none empty
        assert c["database_rows"]["dicom_ingest_log"] == FILES
        assert sum(r["status"].get("ingested", 0) for r in c["per_run"]) == FILES


def test_shares_are_fractions_and_sizes_positive(report) -> None:
    for c in report["json"]["counts"]:
        locks, meta = c["locks"], c["dicom_file_metadata"]
        assert locks["ticks"] > 0
        assert 0.0 <= locks["lock_wait_share"] <= 1.0
        assert 0.0 <= locks["overlapping_copy_share"] <= 1.0
        assert locks["lock_waiting_samples"] <= locks["active_backend_samples"]
        assert locks["overlapping_copy_ticks"] <= locks["copy_ticks"] <= locks["ticks"]
        assert locks["max_concurrent_copies"] <= c["runs"]
        assert meta["rows"] > 0
        assert meta["table_bytes"] > 0 and meta["index_bytes"] > 0
        assert meta["total_bytes"] >= meta["table_bytes"] + meta["index_bytes"]
        assert meta["bytes_per_file"] == pytest.approx(meta["total_bytes"] / FILES)
        assert c["files_per_second"] > 0 and c["wall_seconds"] > 0


def test_markdown_has_a_row_per_run_count(report) -> None:
    text = report["markdown"]
    assert "## Concurrent ingest runs" in text
    assert "--concurrent-runs 1,2" in text
    rows = [line for line in text.splitlines() if line.startswith(f"| 1 | {FILES} |")]
    assert len(rows) == 1
    assert sum(1 for line in text.splitlines() if line.startswith(f"| 2 | {FILES} |")) == 1


def test_what_waiting_backends_wait_for_is_counted_within_the_waits(report) -> None:
    for c in report["json"]["counts"]:
        locks = c["locks"]
        assert sum(locks["waits_for"].values()) <= locks["lock_waiting_samples"]
        assert all(isinstance(k, str) and k for k in locks["waits_for"])
    assert "What the waiting backends waited for" in report["markdown"]


def test_postgres_settings_reach_the_throwaway_server_or_are_refused(tmp_path) -> None:
    for name in ("ok", "refused"):
        (tmp_path / name).mkdir()
    db = benchmark.Database(None, tmp_path / "ok", ["max_wal_size=3GB"])
    try:
        with db.connect() as conn:
            assert conn.execute("SHOW max_wal_size").fetchone()[0] == "3GB"
    finally:
        db.close()
    with pytest.raises(SystemExit, match="needs a restart"):
        benchmark.Database(None, tmp_path / "refused", ["shared_buffers=256MB"])


def test_the_sampler_watches_the_sessions_the_job_opens(database_url) -> None:
    """The runs connect as the job does (core.db.connection.connect); a sampler looking for
    another application name saw no backend at all, and reported no waits and no COPYs."""
    with bench_concurrency.Sampler(database_url) as sampler, connect(database_url) as conn:
        conn.execute("SELECT pg_sleep(0.5)")
    assert sampler.samples.active > 0
