"""What the parse worker extracts for analytics, read from real files (no database)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicom_etl_dagster.core.analytics import extract
from dicom_etl_dagster.core.analytics.findings import Code
from dicom_etl_dagster.core.dicom.reader import read_instance
from dicom_etl_dagster_tests import analytics_samples as samples
from dicom_etl_dagster_tests.dicom_samples import clone_instance

CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def test_procedure_codes_come_performed_first_then_requested(tmp_path):
    path = tmp_path / "ct.dcm"
    clone_instance(
        CT_SMALL,
        path,
        ProcedureCodeSequence=[code_item("24627-2", "LN", "CT Chest")],
        RequestedProcedureCodeSequence=[
            code_item("RPID16", "RADLEX", "CT Chest wo"),
            code_item("24627-2", "LN", "CT Chest"),  # the same code again: listed once
        ],
    )
    findings = extract.instance_findings(read_instance(path))
    assert findings.procedure_codes == (
        Code("LN", "24627-2", "CT Chest"),
        Code("RADLEX", "RPID16", "CT Chest wo"),
    )
    assert findings.numeric == () and findings.segments == ()
    assert {v.keyword for v in findings.acquisition} >= {"KVP", "SliceThickness"}


def test_without_measurements_only_the_procedure_codes_are_read(tmp_path):
    path = tmp_path / "ct.dcm"
    clone_instance(CT_SMALL, path, ProcedureCodeSequence=[code_item("1", "LN", "x")])
    findings = extract.instance_findings(read_instance(path), measurements=False)
    assert findings.procedure_codes == (Code("LN", "1", "x"),)
    assert findings.acquisition == () and findings.numeric == ()


def test_reports_are_recognised_by_their_content_not_their_modality(tmp_path):
    image = clone_instance(CT_SMALL, tmp_path / "ct.dcm")
    path = samples.write_ct_dose_report(tmp_path, image)
    ds = pydicom.dcmread(path)
    ds.Modality = "OT"  # some dose reports say OT
    ds.save_as(path)
    findings = extract.instance_findings(read_instance(path))
    assert {f.concept.value for f in findings.numeric} >= {"113830", "113838"}


def test_a_tree_pydicom_cannot_walk_costs_the_findings_not_the_file(tmp_path, monkeypatch):
    image = clone_instance(CT_SMALL, tmp_path / "ct.dcm")
    path = samples.write_ct_dose_report(tmp_path, image)
    instance = read_instance(path)

    def broken(ds):
        raise ValueError("a content item pydicom cannot convert")

    monkeypatch.setattr(
        "dicom_etl_dagster.core.analytics.structured_report.numeric_findings", broken
    )  # as if the rebuilt tree held something the walker cannot read
    findings = extract.instance_findings(instance)
    assert findings.numeric == ()
    assert findings.acquisition  # the rest of the file's findings are kept


def _without_text(findings):
    return [f._replace(text=None) if hasattr(f, "text") else f for f in findings]


def test_the_tree_rebuilt_from_rows_gives_what_pydicom_gives(tmp_path):
    """The workers walk the tree rebuilt from the reader's rows; pydicom's dataset of the same
    file is the reference (the value text aside: DICOM JSON holds DS as numbers)."""
    from dicom_etl_dagster.core.analytics.row_tree import row_tree
    from dicom_etl_dagster.core.analytics.segmentation import segment_findings
    from dicom_etl_dagster.core.analytics.structured_report import numeric_findings

    image = clone_instance(CT_SMALL, tmp_path / "ct.dcm")
    test_files = CT_SMALL.parent
    reports = [
        samples.write_measurement_report(tmp_path, image),
        samples.write_ct_dose_report(tmp_path, image),
        test_files / "test-SR.dcm",
    ]
    segmentations = [samples.write_segmentation(tmp_path, [image]), test_files / "liver_1frame.dcm"]
    for paths, walk in ((reports, numeric_findings), (segmentations, segment_findings)):
        for path in paths:
            reference = walk(pydicom.dcmread(path, stop_before_pixels=True))
            rebuilt = walk(row_tree(read_instance(path).elements))
            assert reference, path
            assert _without_text(rebuilt) == _without_text(reference), path
            found = extract.instance_findings(read_instance(path))
            assert _without_text(found.numeric or found.segments) == _without_text(reference)
