"""scripts/make_corpus.py: a seeded, reproducible corpus the ETL can read, with the promised shape."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest

from dicom_etl_dagster.core.dicom.reader import read_instance
from dicom_etl_dagster.core.ingest.file_scan import iter_files
from dicom_etl_dagster_tests.helpers import load_script

make_corpus = load_script("make_corpus")

# 30 files, 4 per series -> 8 series (the last has 2 files), 2 per study -> 4 studies,
# 2 per patient -> 2 patients.
SHAPE = dict(files_per_series=4, series_per_study=2, studies_per_patient=2)
UID = re.compile(r"[12](\.(0|[1-9][0-9]*))+")


def _spec(files: int = 30, seed: int = 7, **shape) -> make_corpus.CorpusSpec:
    return make_corpus.CorpusSpec(files, seed, **{**SHAPE, **shape})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus")
    return out, make_corpus.generate(out, _spec())


def _files(out: Path) -> list[Path]:
    return sorted((out / "dicom").rglob("*.dcm"))


def _read_all(out: Path) -> dict[Path, object]:
    return {path: read_instance(path) for path in _files(out)}


def test_manifest_counts(corpus) -> None:
    out, manifest = corpus
    assert (manifest["files"], manifest["series"], manifest["studies"], manifest["patients"]) == (
        30,
        8,
        4,
        2,
    )
    assert json.loads((out / "corpus.json").read_text()) == manifest
    assert sum(manifest["files_by_template"].values()) == 30
    assert len(_files(out)) == 30
    # The ETL scans the dicom folder: nothing else is in it.
    assert len(list(iter_files(out / "dicom"))) == 30


def test_every_file_is_read_by_read_instance_with_distinct_sop_uids(corpus) -> None:
    out, _ = corpus
    instances = _read_all(out)
    sops = [inst.sop_instance_uid for inst in instances.values()]
    assert len(set(sops)) == 30
    for inst in instances.values():
        for uid in (inst.sop_instance_uid, inst.study_instance_uid, inst.series_instance_uid):
            assert UID.fullmatch(uid) and len(uid) <= 64, uid
        assert inst.patient_id.startswith("BENCH")
        assert inst.elements  # every element serialised, nothing failed


def test_patients_studies_and_series(corpus) -> None:
    out, _ = corpus
    instances = _read_all(out)
    patients = {i.patient_id for i in instances.values()}
    studies = {i.study_instance_uid for i in instances.values()}
    series = defaultdict(list)
    for path, inst in instances.items():
        series[inst.series_instance_uid].append((path, inst))
    assert (len(patients), len(studies), len(series)) == (2, 4, 8)
    assert sorted(len(files) for files in series.values()) == [2, 4, 4, 4, 4, 4, 4, 4]
    for files in series.values():
        # One folder, one study, one patient, one modality, one date per series; instance numbers 1..n.
        assert len({path.parent for path, _ in files}) == 1
        assert len({inst.study_instance_uid for _, inst in files}) == 1
        assert len({inst.patient_id for _, inst in files}) == 1
        assert len({inst.modality for _, inst in files}) == 1
        assert len({inst.procedure_date for _, inst in files}) == 1
        assert sorted(inst.instance_number for _, inst in files) == list(range(1, len(files) + 1))
    studies_per_patient = defaultdict(set)
    for inst in instances.values():
        studies_per_patient[inst.patient_id].add(inst.study_instance_uid)
    assert sorted(len(s) for s in studies_per_patient.values()) == [2, 2]


def test_file_meta_matches_the_dataset(corpus) -> None:
    out, _ = corpus
    for path in _files(out):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.PatientName == f"Bench^Patient{int(ds.PatientID[5:]):07d}"


def test_same_seed_same_bytes(tmp_path: Path, corpus) -> None:
    first, manifest = corpus
    make_corpus.generate(tmp_path / "again", _spec())
    again = _files(tmp_path / "again")
    assert [p.relative_to(tmp_path / "again") for p in again] == [
        p.relative_to(first) for p in _files(first)
    ]
    for mine, theirs in zip(again, _files(first)):
        assert mine.read_bytes() == theirs.read_bytes(), mine
    repeated = json.loads((tmp_path / "again" / "corpus.json").read_text())
    assert {k: v for k, v in repeated.items() if k != "seconds"} == {
        k: v for k, v in manifest.items() if k != "seconds"
    }


def test_another_seed_gives_other_uids(tmp_path: Path, corpus) -> None:
    first, _ = corpus
    make_corpus.generate(tmp_path / "other", _spec(seed=8))

    def uids(out):
        return {
            u
            for i in _read_all(out).values()
            for u in (i.sop_instance_uid, i.study_instance_uid, i.series_instance_uid)
        }

    assert not uids(first) & uids(tmp_path / "other")


def test_every_template_is_readable_and_keeps_its_character(tmp_path: Path) -> None:
    """One series per template: modalities as cloned, private and nested sequences present."""
    spec = _spec(files=200, seed=1, files_per_series=1, series_per_study=1, studies_per_patient=1)
    manifest = make_corpus.generate(tmp_path, spec)
    assert set(manifest["files_by_template"]) == {t.kind for t in make_corpus.TEMPLATES}
    seen = {}
    for path in _files(tmp_path):
        kind = path.parent.name.split("_", 2)[2]
        seen.setdefault(kind, read_instance(path))
    assert {k: i.modality for k, i in seen.items()} == {
        "ct": "CT",
        "ctpriv": "CT",
        "mr": "MR",
        "nm": "NM",
        "seg": "SEG",
        "rtplan": "RTPLAN",
        "rtdose": "RTDOSE",
        "sr": "SR",
    }
    rows = seen["ctpriv"].elements
    private_sequences = [r for r in rows if r.is_private and r.is_sequence]
    assert (
        len(private_sequences) == 4
    )  # one top-level private sequence, a nested one in each of its 3 items
    nested = [r for r in private_sequences if r.parent_sequence_index is not None]
    assert len(nested) == 3 and all(rows[r.parent_sequence_index].is_private for r in nested)
    assert {r.private_creator for r in rows if r.is_private and r.group == "0051"} == {
        "DICOM_ETL_BENCH"
    }
    assert sum(r.is_private for r in seen["ct"].elements) > 100  # the GE private tags of CT_small
    assert (
        max(sum(r.is_sequence for r in i.elements) for i in seen.values()) >= 30
    )  # SR content tree


def test_refuses_to_overwrite_a_corpus(corpus) -> None:
    out, _ = corpus
    with pytest.raises(FileExistsError):
        make_corpus.generate(out, _spec())


def test_uids_are_valid_and_stable() -> None:
    uid = make_corpus.uid_for(3, "sop", 12)
    assert uid == make_corpus.uid_for(3, "sop", 12) != make_corpus.uid_for(4, "sop", 12)
    assert UID.fullmatch(uid) and len(uid) == make_corpus.UID_LENGTH <= 64


def test_command_line(tmp_path: Path, capsys) -> None:
    assert (
        make_corpus.main(
            [str(tmp_path / "cli"), "--files", "5", "--seed", "3", "--files-per-series", "2"]
        )
        == 0
    )
    assert "5 files" in capsys.readouterr().out
    assert len(_files(tmp_path / "cli")) == 5


def test_the_corpus_goes_through_the_benchmark(tmp_path: Path, database_url: str) -> None:
    """Every generated file is ingested by the real ETL, and scripts/benchmark.py keeps working."""
    benchmark = load_script("benchmark")
    results = tmp_path / "results.json"
    report = tmp_path / "report.md"
    assert (
        benchmark.main(
            [
                "--files",
                "24",
                "--corpus",
                str(tmp_path / "corpus"),
                "--workers",
                "1",
                "--batch-size",
                "10",
                "--baseline-files",
                "4",
                "--skip-orthanc",
                "--database-url",
                database_url,
                "--json",
                str(results),
                "--output",
                str(report),
            ]
        )
        == 0
    )
    phases = {p["name"].split(" (")[0]: p for p in json.loads(results.read_text())["phases"]}
    parse, etl, baseline = phases["parse-only"], phases["ETL"], phases["row-at-a-time baseline"]
    assert parse["files_ok"] == etl["files_ok"] == 24
    assert etl["extra"]["status"] == {"ingested": 24}
    assert etl["elements"] == parse["elements"] > 24 * 20
    assert baseline["files_ok"] == 4 and baseline["extra"]["statements"] > baseline["elements"]
    text = report.read_text()
    assert "ETL / parse-only" in text and "--skip-orthanc" in text
    # Measurements on (the ETL phase) vs off (the same files again, into fresh schemas).
    off = phases["ETL, measurements off"]
    assert off["files_ok"] == 24 and off["extra"]["status"] == {"ingested": 24}
    assert off["elements"] == etl["elements"]
    on_rows, off_rows = etl["extra"]["rows_by_table"], off["extra"]["rows_by_table"]
    assert on_rows["measurement"] > 0 and on_rows["image_feature"] >= on_rows["measurement"]
    assert off_rows.get("measurement", 0) == off_rows.get("image_feature", 0) == 0
    comparison = json.loads(results.read_text())["measurements_comparison"]
    assert comparison["measurement_rows_on"] == on_rows["measurement"]
    assert comparison["image_feature_rows_on"] == on_rows["image_feature"]
    assert comparison["measurement_rows_off"] == comparison["image_feature_rows_off"] == 0
    assert comparison["ratio_on_off"] == pytest.approx(
        etl["files_per_second"] / off["files_per_second"]
    )
    assert "ETL measurements on / off (files/s)" in text and "Measurements on vs off" in text


def test_the_benchmark_can_skip_the_measurements_comparison(tmp_path: Path, database_url: str):
    benchmark = load_script("benchmark")
    results = tmp_path / "results.json"
    argv = ["--files", "4", "--corpus", str(tmp_path / "corpus"), "--workers", "1"]
    argv += ["--baseline-files", "0", "--skip-orthanc", "--skip-parse-only"]
    argv += ["--skip-measurements-comparison", "--database-url", database_url]
    assert benchmark.main([*argv, "--json", str(results)]) == 0
    written = json.loads(results.read_text())
    assert written["measurements_comparison"] is None
    assert [p["name"].split(" (")[0] for p in written["phases"]] == ["ETL", "ETL re-run"]
