"""numeric_findings: the samples' reports give exactly their measurements; odd items do not
raise; groups, findings and references follow the tree."""

from __future__ import annotations

import pydicom
import pytest
from pydicom import examples
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_etl_dagster.core.analytics.findings import Code, NumericFinding
from dicom_etl_dagster.core.analytics.structured_report import MAX_DEPTH, numeric_findings
from dicom_etl_dagster_tests import analytics_samples as samples

SOURCE = examples.ct
MM = Code("UCUM", "mm", "mm")
FINDING = Code("DCM", "121071", "Finding")
FINDING_SITE = Code("SCT", "363698007", "Finding Site")
LESION, LIVER = Code("SCT", "52988006", "Lesion"), Code("SCT", "10200004", "Liver")
DIAMETER = Code("SCT", "103339001", "Long axis")
MEASUREMENT_GROUP = Code("DCM", "125007", "Measurement Group")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("analytics")


def test_the_measurement_report_gives_exactly_its_measurements(folder):
    path = samples.write_measurement_report(folder, SOURCE)
    found = numeric_findings(pydicom.dcmread(path))

    expected = [
        (concept, value, unit, group, spec.finding, spec.finding_site)
        for group, spec in enumerate(samples.MEASUREMENT_GROUPS)
        for concept, value, unit in spec.measurements
    ]
    assert [(f.concept, f.number, f.unit, f.group, f.finding, f.finding_site) for f in found] == (
        expected
    )
    assert [float(f.text or "nan") for f in found] == [e[1] for e in expected]
    assert {f.group for f in found} == {0, 1}
    for f in found:
        assert f.referenced_series == (SOURCE.SeriesInstanceUID,)
        assert f.referenced_sops == (SOURCE.SOPInstanceUID,)


def test_the_dose_report_gives_each_events_dose_and_the_total(folder):
    path = samples.write_ct_dose_report(folder, SOURCE)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == samples.X_RAY_RADIATION_DOSE_SR
    assert (ds.PatientID, ds.StudyInstanceUID) == (SOURCE.PatientID, SOURCE.StudyInstanceUID)
    assert ds.SeriesInstanceUID != SOURCE.SeriesInstanceUID

    found = numeric_findings(ds)

    def num(concept, value, unit, group):
        return NumericFinding(concept, value, f"{value:g}", unit, group, None, None, (), ())

    events = len(samples.DOSE_EVENTS)
    expected = [
        num(samples.EVENT_COUNT_CONCEPT, events, Code("UCUM", "{events}", "events"), 0),
        num(samples.DLP_TOTAL_CONCEPT, samples.DLP_TOTAL, samples.UCUM_MGYCM, 0),
    ]
    for group, event in enumerate(samples.DOSE_EVENTS, start=1):
        expected += [
            num(samples.MEAN_CTDIVOL, event.ctdi_vol, samples.UCUM_MGY, group),
            num(samples.DLP, event.dlp, samples.UCUM_MGYCM, group),
        ]
    assert list(found) == expected


def test_the_sample_files_are_valid_for_a_strict_reader(folder, monkeypatch):
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    for path in (
        samples.write_measurement_report(folder, SOURCE),
        samples.write_ct_dose_report(folder, SOURCE),
        samples.write_segmentation(folder, [SOURCE]),
    ):
        ds = pydicom.dcmread(path)
        for element in ds.iterall():
            element.value  # noqa: B018 - converting every value validates it
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_the_builders_are_deterministic(tmp_path):
    first = pydicom.dcmread(samples.write_ct_dose_report(tmp_path / "a", SOURCE))
    second = pydicom.dcmread(samples.write_ct_dose_report(tmp_path / "b", SOURCE))
    assert first.SOPInstanceUID == second.SOPInstanceUID


# In-memory content trees ------------------------------------------------------------------


def _code(code: Code) -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator, item.CodeValue = code.scheme, code.value
    if code.meaning:
        item.CodeMeaning = code.meaning
    return item


def _item(value_type: str, name: Code | None, relationship: str = "CONTAINS", **kw) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = relationship, value_type
    if name is not None:
        item.ConceptNameCodeSequence = [_code(name)]
    for keyword, value in kw.items():
        setattr(item, keyword, value)
    return item


def _num(value: str | None = "1", name: Code | None = DIAMETER, *children, **kw) -> Dataset:
    item = _item("NUM", name, **kw)
    if value is not None:
        measured = Dataset()
        measured.NumericValue = value
        measured.MeasurementUnitsCodeSequence = [_code(MM)]
        item.MeasuredValueSequence = [measured]
    if children:
        item.ContentSequence = list(children)
    return item


def _container(*children: Dataset, name: Code = MEASUREMENT_GROUP):
    return _item("CONTAINER", name, ContentSequence=list(children))


def _code_item(name: Code, value: Code, relationship: str = "CONTAINS") -> Dataset:
    return _item("CODE", name, relationship, ConceptCodeSequence=[_code(value)])


def _image(sop: str) -> Dataset:
    reference = Dataset()
    reference.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    reference.ReferencedSOPInstanceUID = sop
    return _item(
        "IMAGE", Code("DCM", "121112", "Source of Measurement"), ReferencedSOPSequence=[reference]
    )


def _report(*children: Dataset, evidence: dict[str, str] | None = None) -> Dataset:
    ds = _container(*children, name=Code("DCM", "126000", "Imaging Measurement Report"))
    studies = []
    for sop, series_uid in (evidence or {}).items():
        sop_item = Dataset()
        sop_item.ReferencedSOPInstanceUID = sop
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = [sop_item]
        study = Dataset()
        study.ReferencedSeriesSequence = [series]
        studies.append(study)
    if studies:
        ds.CurrentRequestedProcedureEvidenceSequence = studies
    return ds


def _raw_numeric_value(num: Dataset, text: bytes) -> Dataset:
    """Put a Numeric Value in the item as dcmread leaves it: raw, not validated."""
    tag = Tag("NumericValue")
    num.MeasuredValueSequence[0][tag] = RawDataElement(tag, "DS", len(text), text, 0, False, True)
    return num


def test_a_ds_that_is_not_a_number_keeps_its_text_and_has_no_number():
    (found,) = numeric_findings(_report(_raw_numeric_value(_num(), b"1,5 ")))
    assert (found.number, found.text, found.unit) == (None, "1,5", MM)


def test_a_multi_valued_ds_gives_its_first_value():
    (found,) = numeric_findings(_report(_raw_numeric_value(_num(), b"2.5\\3")))
    assert (found.number, found.text) == (2.5, "2.5")


def test_the_floating_point_value_is_the_more_precise_number():
    num = _num("0.3333")
    num.MeasuredValueSequence[0].FloatingPointValue = 1 / 3
    (found,) = numeric_findings(_report(num))
    assert (found.number, found.text) == (1 / 3, "0.3333")


def test_no_measured_value_gives_the_qualifier_or_nothing():
    failed = _num(None)
    failed.NumericValueQualifierCodeSequence = [_code(Code("DCM", "114006", "Measurement failure"))]
    empty = _num(None)
    empty.MeasuredValueSequence = []
    found = numeric_findings(_report(failed, empty, _num(None)))
    assert [(f.number, f.text, f.unit) for f in found] == [
        (None, "Measurement failure", None),
        (None, None, None),
        (None, None, None),
    ]


def test_items_without_a_concept_name_or_a_value_type_are_skipped_not_raised():
    no_value_type = _num("3")
    del no_value_type.ValueType
    bad_name = _num("4")
    bad_name.ConceptNameCodeSequence = [Dataset()]
    found = numeric_findings(_report(_num("1", None), no_value_type, bad_name, _num("2")))
    assert [f.number for f in found] == [2.0]


def test_a_dataset_without_content_has_no_findings():
    assert numeric_findings(Dataset()) == ()
    assert numeric_findings(SOURCE) == ()


def test_deep_trees_stop_at_the_depth_limit():
    shallow = _container(_num("1"))
    deep = _num("2")
    for _ in range(MAX_DEPTH + 10):
        deep = _container(deep)
    found = numeric_findings(_report(shallow, deep))
    assert [f.number for f in found] == [1.0]


def test_an_item_met_again_is_not_walked_again():
    container = _container(_num("1"))
    container.ContentSequence.append(container)  # a cycle, only possible in memory
    found = numeric_findings(_report(container, container))
    assert [f.number for f in found] == [1.0]


def test_groups_number_the_containers_holding_numbers_in_document_order():
    inner = _container(_num("2"))
    outer = _container(inner, _num("3"))  # outer starts first, its number comes after
    empty = _container(_code_item(FINDING, LESION))
    found = numeric_findings(_report(_num("0"), empty, outer, _container(_num("4"), _num("5"))))
    assert [(f.number, f.group) for f in found] == [(0, 0), (2, 2), (3, 1), (4, 3), (5, 3)]


def test_the_items_own_finding_site_comes_before_its_groups():
    kidney = Code("SCT", "64033007", "Kidney")
    legacy = Code("SRT", "G-C0E3", "Finding Site")
    own = _num("1", DIAMETER, _code_item(legacy, kidney, "HAS CONCEPT MOD"))
    contained = _num("2", DIAMETER, _code_item(FINDING_SITE, kidney, "CONTAINS"))
    group = _container(
        _code_item(FINDING, LESION),
        _code_item(FINDING_SITE, LIVER, "HAS CONCEPT MOD"),
        own,
        contained,
    )
    found = numeric_findings(_report(group, _num("3")))
    assert [(f.finding, f.finding_site) for f in found] == [
        (LESION, kidney),
        (LESION, LIVER),  # a CONTAINS child of the item is no modifier of it
        (None, None),  # the root's children say nothing about findings here
    ]


def test_references_are_the_nearest_found_and_sops_name_their_series():
    near = _num("1", DIAMETER, _image("1.2.3.2"), _image("1.2.3.1"), _image("1.2.3.2"))
    far = _num("2")
    segmentation_source = _item(
        "UIDREF", Code("DCM", "112227", "Source series for segmentation"), UID="1.2.9"
    )
    group = _container(near, far, _image("1.2.3.1"), segmentation_source)
    upper = _num("3")
    ds = _report(
        _container(_container(upper)),
        _image("1.2.3.4"),
        group,
        evidence={"1.2.3.1": "1.2.8", "1.2.3.2": "1.2.7"},
    )
    found = {f.number: (f.referenced_series, f.referenced_sops) for f in numeric_findings(ds)}
    assert found == {
        1.0: (("1.2.7", "1.2.8"), ("1.2.3.2", "1.2.3.1")),
        2.0: (("1.2.8", "1.2.9"), ("1.2.3.1",)),
        3.0: ((), ("1.2.3.4",)),  # up the tree: the root's image, not in the evidence
    }


def test_an_image_region_references_the_image_it_is_selected_from():
    region = _item("SCOORD", Code("DCM", "111030", "Image Region"), GraphicType="POINT")
    region.ContentSequence = [_image("1.2.3.1")]
    ds = _report(_container(region, _num("1")), evidence={"1.2.3.1": "1.2.8"})
    (found,) = numeric_findings(ds)
    assert (found.referenced_series, found.referenced_sops) == (("1.2.8",), ("1.2.3.1",))


def test_broken_reference_items_are_skipped():
    empty_image = _item("IMAGE", Code("DCM", "121112", "Source"))
    empty_image.ReferencedSOPSequence = [Dataset()]
    no_uid = _item("UIDREF", Code("DCM", "112002", "Series Instance UID"))
    ds = _report(_container(empty_image, no_uid, _num("1")))
    ds.PertinentOtherEvidenceSequence = [Dataset()]
    (found,) = numeric_findings(ds)
    assert (found.referenced_series, found.referenced_sops) == ((), ())
