"""segment_findings: the sample SEG gives each of its segments; the fallbacks and the
algorithm text are as documented; odd headers do not raise."""

from __future__ import annotations

import pydicom
import pytest
from pydicom import examples
from pydicom.dataset import Dataset

from dicom_etl_dagster.core.analytics.findings import Code, SegmentFinding
from dicom_etl_dagster.core.analytics.segmentation import algorithm_system, segment_findings
from dicom_etl_dagster_tests import analytics_samples as samples

SOURCE = examples.ct
HEAD = Code("SCT", "69536005", "Head")


@pytest.fixture(scope="module")
def segmentation(tmp_path_factory) -> pydicom.FileDataset:
    return pydicom.dcmread(samples.write_segmentation(tmp_path_factory.mktemp("seg"), [SOURCE]))


def test_the_sample_segmentation_gives_each_segment(segmentation):
    assert segmentation.Modality == "SEG"
    assert segmentation.StudyInstanceUID == SOURCE.StudyInstanceUID
    system = (
        f"{samples.ALGORITHM_NAME} {samples.ALGORITHM_VERSION} "
        f"(manufacturer {samples.MANUFACTURER}, software {samples.SOFTWARE_VERSION})"
    )
    assert segment_findings(segmentation) == tuple(
        SegmentFinding(
            number=number,
            label=segment.label,
            property_type=segment.property_type,
            anatomic_region=segment.anatomic_region,
            alg_system=system,
            alg_datetime=samples.CONTENT_DATETIME,
            referenced_series=(SOURCE.SeriesInstanceUID,),
        )
        for number, segment in enumerate(samples.SEGMENTS, start=1)
    )


def _code(code: Code) -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning = (
        code.scheme,
        code.value,
        code.meaning,
    )
    return item


def _segment(number: object = 1, **kw) -> Dataset:
    segment = Dataset()
    if number is not None:
        segment.SegmentNumber = number
    for keyword, value in kw.items():
        setattr(segment, keyword, value)
    return segment


def _seg(*segments: Dataset, **kw) -> Dataset:
    ds = Dataset()
    ds.SegmentSequence = list(segments)
    for keyword, value in kw.items():
        setattr(ds, keyword, value)
    return ds


def test_the_instance_anatomic_region_is_the_fallback():
    liver = Code("SCT", "10200004", "Liver")
    ds = _seg(
        _segment(1, AnatomicRegionSequence=[_code(liver)]),
        _segment(2),
        AnatomicRegionSequence=[_code(HEAD)],
    )
    assert [s.anatomic_region for s in segment_findings(ds)] == [liver, HEAD]


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_segments_without_a_number_are_skipped_and_missing_values_are_none():
    ds = _seg(_segment(None, SegmentLabel="x"), _segment(3), ContentDate="20231399")
    (found,) = segment_findings(ds)
    assert found == SegmentFinding(3, None, None, None, None, None, ())


def test_a_dataset_without_segments_has_none():
    assert segment_findings(Dataset()) == ()
    assert segment_findings(SOURCE) == ()


def _algorithm(name: str | None, version: str | None) -> Dataset:
    item = Dataset()
    if name:
        item.AlgorithmName = name
    if version:
        item.AlgorithmVersion = version
    return item


@pytest.mark.parametrize(
    "segment, instance, expected",
    [
        (dict(SegmentAlgorithmName="TotalSeg"), {}, "TotalSeg"),
        (
            dict(
                SegmentAlgorithmName="TotalSeg",
                SegmentationAlgorithmIdentificationSequence=[_algorithm("TotalSeg", "2.1")],
            ),
            dict(Manufacturer="Acme", SoftwareVersions=["1.0", "1.1"]),
            "TotalSeg 2.1 (manufacturer Acme, software 1.0 / 1.1)",
        ),
        (
            dict(
                SegmentAlgorithmName="liver model",
                SegmentationAlgorithmIdentificationSequence=[_algorithm("nnU-Net", "2")],
            ),
            dict(SoftwareVersions="3"),
            "liver model / nnU-Net 2 (software 3)",
        ),
        (dict(SegmentAlgorithmType="MANUAL"), {}, None),
        (
            dict(SegmentAlgorithmType="MANUAL"),
            dict(Manufacturer="Acme"),
            "MANUAL (manufacturer Acme)",
        ),
        (
            dict(SegmentationAlgorithmIdentificationSequence=[_algorithm(None, "2")]),
            dict(Manufacturer="Acme"),
            "unknown algorithm (manufacturer Acme)",
        ),
    ],
)
def test_the_algorithm_system_text(segment, instance, expected):
    assert algorithm_system(_seg(**instance), _segment(1, **segment)) == expected


def _series(uid: str, *sops: str) -> Dataset:
    series = Dataset()
    series.SeriesInstanceUID = uid
    instances = []
    for sop in sops:
        instance = Dataset()
        instance.ReferencedSOPInstanceUID = sop
        instances.append(instance)
    series.ReferencedInstanceSequence = instances
    return series


def test_referenced_series_add_the_series_of_source_images_of_other_studies():
    other_study = Dataset()
    other_study.ReferencedSeriesSequence = [_series("1.2.20", "1.2.20.1"), _series("1.2.30")]
    sources = []
    for sop in ("1.2.20.1", "1.2.10.1", "1.2.99.1"):  # the last one is listed nowhere
        source = Dataset()
        source.ReferencedSOPInstanceUID = sop
        sources.append(source)
    ds = _seg(
        _segment(1),
        ReferencedSeriesSequence=[_series("1.2.10", "1.2.10.1"), _series("1.2.11")],
        StudiesContainingOtherReferencedInstancesSequence=[other_study],
        SourceImageSequence=sources,
    )
    (found,) = segment_findings(ds)
    assert found.referenced_series == ("1.2.10", "1.2.11", "1.2.20")
