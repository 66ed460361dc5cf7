"""Odd values are data (issue 16): a value that violates its VR is stored verbatim, the file is
ingested, and the ledger counts it; only the keys OMOP needs still fail a file.

Each file is CT_small with raw values written byte for byte (pydicom refuses to write most of
them), ingested by the real ``ingest_metadata`` job into PostgreSQL, once through the fast path
and once with every file forced through pydicom: both must store the same.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from dicom_etl_dagster.core.analytics.acquisition import acquisition_values
from dicom_etl_dagster.core.dicom.reader import read_instance
from dicom_etl_dagster.core.ingest import parse_pool
from dicom_etl_dagster_tests.core.dicom.test_fast_path import takes_fast_path
from dicom_etl_dagster_tests.helpers import options, run_job

MI = "cdmmedicalimaging"
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
PRIVATE_CREATOR = 0x00290010
GE_CREATOR = 0x00190010
GE_CELL_SPACING = 0x00191004  # GEMS_ACQU_01 (0019,xx04) "Cell spacing": DS in pydicom's dictionary

#: file name -> (raw values {tag: (VR, bytes)}, implicit VR?, the odd tags, fast path taken?)
CASES: dict[str, tuple[dict[int, tuple[str, bytes]], bool, tuple[str, ...], bool]] = {
    "frames_1A": ({0x00280008: ("IS", b"1A")}, False, ("(0028,0008)",), True),
    "instance_number_1A": ({0x00200013: ("IS", b"1A")}, False, ("(0020,0013)",), True),
    "slice_thickness_2,5": ({0x00180050: ("DS", b"2,5 ")}, False, ("(0018,0050)",), True),
    "bad_acquisition_date": ({0x00080022: ("DA", b"20231399")}, False, ("(0008,0022)",), True),
    "uid_letters": ({0x00200052: ("UI", b"1.2.abc.4\x00")}, False, ("(0020,0052)",), True),
    "long_strings": (
        {0x00081010: ("SH", b"S" * 20), 0x0008103E: ("LO", b"L" * 80)},
        False,
        ("(0008,1010)", "(0008,103E)"),
        True,
    ),
    "private_ds_explicit": (
        {PRIVATE_CREATOR: ("LO", b"ACME 1.0"), 0x00291010: ("DS", b"1.9.10.0")},
        False,
        ("(0029,1010)",),
        True,
    ),
    "private_ds_implicit": (
        {GE_CREATOR: ("LO", b"GEMS_ACQU_01"), GE_CELL_SPACING: ("DS", b"1.9.10.0")},
        True,
        ("(0019,1004)",),
        False,  # implicit-VR private elements: pydicom's private dictionary decides the VR
    ),
}
MISSING_KEYS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def odd_file(target: Path, values: dict[int, tuple[str, bytes]], implicit: bool = False) -> Path:
    """CT_small with new UIDs and ``values`` written as raw bytes (even length, padded)."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in "abc")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for tag in [t for t in ds.keys() if t >> 16 in (0x0019, 0x0029)]:
        del ds[tag]  # CT_small's own GE private blocks: the cases bring their own
    for tag, (vr, value) in values.items():
        if len(value) % 2:
            value += b"\x00" if vr == "UI" else b" "
        ds[tag] = RawDataElement(
            Tag(tag), None if implicit else vr, len(value), value, 0, implicit, True
        )
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    target.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(target, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    return target


def corpus(folder: Path) -> dict[str, Path]:
    files = {name: odd_file(folder / f"{name}.dcm", v, i) for name, (v, i, _, _) in CASES.items()}
    for keyword in MISSING_KEYS:  # an odd value in a file that also lacks a key: still failed
        path = odd_file(folder / f"missing_{keyword}.dcm", {0x00280008: ("IS", b"1A")})
        ds = pydicom.dcmread(path)
        delattr(ds, keyword)
        ds.save_as(path)
        files[f"missing_{keyword}"] = path
    files["no_date"] = odd_file(
        folder / "no_date.dcm",
        dict.fromkeys((0x00080020, 0x00080021, 0x00080022, 0x00080023), ("DA", b"20231399"))
        | {0x00080012: ("DA", b"2023.13.01")},
    )
    return files


def ingest(url: str, folder: Path, monkeypatch, fast_path: bool):
    if not fast_path:
        monkeypatch.setattr(
            parse_pool, "read_instance", functools.partial(read_instance, fast_path=False)
        )
    return run_job(
        "ingest_metadata",
        url,
        options(dicom_files_abs_path=str(folder), parse_workers=1),  # in-process: patched
    )


def stored(conn, files: dict[str, Path]) -> dict[str, dict]:
    """Per file: its ledger row and its top-level metadata rows (tag -> vr, vm, value)."""
    out = {}
    for name, path in files.items():
        status, reason, sop, count, tags = conn.execute(
            f"SELECT status, error_message, sop_instance_uid, value_warnings, value_warning_tags"
            f" FROM {MI}.dicom_ingest_log WHERE file_path = %s",
            [str(path)],
        ).fetchone()
        rows = conn.execute(
            f"SELECT metadata_source_tag, metadata_source_value_representation, metadata_source_value"
            f" FROM {MI}.dicom_file_metadata WHERE sop_instance_id = %s"
            " AND parent_sequence_id IS NULL",
            [sop],
        ).fetchall()
        out[name] = {
            "ledger": (status, reason, count, tags),
            "rows": {tag: (vr, value) for tag, vr, value in rows},
        }
    return out


@pytest.fixture(scope="module")
def odd_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odd")
    return folder, corpus(folder)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "pydicom"])
def test_odd_values_are_stored_verbatim_and_counted(
    fast_path, odd_corpus, database_url, db, monkeypatch
):
    folder, files = odd_corpus
    for name, (_, _, _, fast) in CASES.items():
        assert takes_fast_path(files[name]) == fast, name  # the fast path really reads them
    result = ingest(database_url, folder, monkeypatch, fast_path)
    found = stored(db, files)
    for name, (values, _, odd_tags, _) in CASES.items():
        status, reason, count, tags = found[name]["ledger"]
        assert (status, reason) == ("ingested", None), name
        assert (count, tags) == (len(odd_tags), ",".join(odd_tags)), name
        for tag, (vr, raw) in values.items():
            text = raw.decode("latin_1").strip(" \x00")
            stored_vr, value = found[name]["rows"][f"({tag >> 16:04X},{tag & 0xFFFF:04X})"]
            assert json.loads(value) == [text], (name, tag)  # verbatim, as a JSON string
            assert stored_vr == vr, (name, tag)
    for keyword in MISSING_KEYS:
        status, reason, count, _ = found[f"missing_{keyword}"]["ledger"]
        assert status == "failed" and reason == f"missing required attribute(s): {keyword}"
        assert count is None  # the file was not read into an instance: nothing counted
    status, reason, *_ = found["no_date"]["ledger"]
    assert status == "failed" and reason.startswith("no usable date")
    # The summary of the materialization: files with odd values and the top tags.
    (metadata,) = [
        m
        for m in result.asset_materializations_for_node("ingest_dicom_folder")
        if m.asset_key.to_user_string() == "dicom_file_metadata"
    ]
    assert metadata.metadata["files_with_odd_values"].value == len(CASES)
    table = metadata.metadata["odd_values_by_tag"].value
    assert "| (0028,0008) | NumberOfFrames | 1 |" in table
    assert "| (0029,1010) | private | 1 |" in table
    # Both read paths store exactly the same: the other path's run gives the same rows.
    key = "fast" if fast_path else "slow"
    RESULTS[key] = {n: (f["ledger"], f["rows"]) for n, f in found.items() if "missing" not in n}
    if len(RESULTS) == 2:
        assert RESULTS["fast"] == RESULTS["slow"]


RESULTS: dict[str, dict] = {}


def test_an_odd_number_is_no_measurement_and_no_instance_number(odd_corpus):
    """Analytics: a DS / IS that is not a number never becomes one; the acquisition profile
    skips it (no measurement row) and InstanceNumber is NULL (the EAV row keeps the text)."""
    _, files = odd_corpus
    for fast_path in (True, False):
        inst = read_instance(files["slice_thickness_2,5"], fast_path=fast_path)
        profile = {v.keyword for v in acquisition_values(inst.elements, inst.number_texts)}
        assert "SliceThickness" not in profile and "KVP" in profile
        assert (
            read_instance(files["instance_number_1A"], fast_path=fast_path).instance_number is None
        )
    untouched = read_instance(files["frames_1A"])
    assert "SliceThickness" in {v.keyword for v in acquisition_values(untouched.elements)}
