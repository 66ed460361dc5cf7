"""Analytics test data: real DICOM files (a TID 1500 measurement report, a CT radiation dose
report, a segmentation) written into a folder, over a given source image.

They are files, not in-memory datasets, so the database integration tests can ingest the
folder exactly like a user's. Each derived object shares the source's patient and study (it
links to the same person and visit) and has a series of its own. UIDs are derived from the
source's SOP Instance UID, so a builder run twice over the same source writes the same file
and tests can assert exact references; the expected values are module constants.

highdicom takes seconds to import: the builders import it when called.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, NamedTuple

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicom_etl_dagster.core.analytics.findings import Code

X_RAY_RADIATION_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
#: Content Date/Time written into every derived object (highdicom would write "now").
CONTENT_DATE, CONTENT_TIME = "20240315", "101112.250000"
CONTENT_DATETIME = dt.datetime(2024, 3, 15, 10, 11, 12, 250000)
MANUFACTURER, SOFTWARE_VERSION = "dicom_etl_dagster tests", "1.2.3"

UCUM_MM, UCUM_MM2 = Code("UCUM", "mm", "mm"), Code("UCUM", "mm2", "mm2")
UCUM_HU = Code("UCUM", "[hnsf'U]", "Hounsfield unit")
UCUM_MGY, UCUM_MGYCM = Code("UCUM", "mGy", "mGy"), Code("UCUM", "mGy.cm", "mGy.cm")


class Group(NamedTuple):
    """A TID 1501 / 1410 measurement group of the measurement report."""

    finding: Code
    finding_site: Code
    measurements: tuple[tuple[Code, float, Code], ...]  # concept, value, unit


#: The measurement report's groups, in document order.
MEASUREMENT_GROUPS = (
    Group(
        Code("SCT", "52988006", "Lesion"),
        Code("SCT", "10200004", "Liver"),
        (
            (Code("SCT", "103339001", "Long axis"), 12.5, UCUM_MM),
            (Code("SCT", "42798000", "Area"), 98.25, UCUM_MM2),
        ),
    ),
    Group(
        Code("SCT", "4147007", "Mass"),
        Code("SCT", "64033007", "Kidney"),
        ((Code("SCT", "373098007", "Mean"), 42.0, UCUM_HU),),
    ),
)


class Event(NamedTuple):
    """One CT Acquisition (irradiation event) of the dose report."""

    target_region: Code
    ctdi_vol: float  # mGy
    dlp: float  # mGy.cm


DOSE_EVENTS = (
    Event(Code("SCT", "51185008", "Chest"), 8.25, 310.5),
    Event(Code("SCT", "818981001", "Abdomen"), 11.75, 402.25),
)
DLP_TOTAL = 712.75
MEAN_CTDIVOL = Code("DCM", "113830", "Mean CTDIvol")
DLP = Code("DCM", "113838", "DLP")
DLP_TOTAL_CONCEPT = Code("DCM", "113813", "CT Dose Length Product Total")
EVENT_COUNT_CONCEPT = Code("DCM", "113812", "Total Number of Irradiation Events")


class Segment(NamedTuple):
    label: str
    category: Code
    property_type: Code
    anatomic_region: Code | None


SEGMENTS = (
    Segment("liver", Code("SCT", "85756007", "Tissue"), Code("SCT", "10200004", "Liver"), None),
    Segment(
        "spleen",
        Code("SCT", "123037004", "Anatomical Structure"),
        Code("SCT", "78961009", "Spleen"),
        Code("SCT", "818981001", "Abdomen"),
    ),
)
ALGORITHM_NAME, ALGORITHM_VERSION = "TotalSegmentator", "2.1.0"


def derived_uid(source: Dataset, what: str) -> UID:
    """A UID of the object ``what`` derived from ``source``: the same on every run."""
    return generate_uid(entropy_srcs=[str(source.SOPInstanceUID), what])


def write_measurement_report(folder: Path, source: Dataset) -> Path:
    """A TID 1500 Comprehensive 3D SR with the ``MEASUREMENT_GROUPS`` over ``source``.

    The first group is a planar ROI group (its region is a polyline on the source image), the
    second a generic measurement group whose source image is the source.
    """
    import highdicom as hd
    import numpy as np
    from pydicom.sr.codedict import codes

    def coded(code: Code) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(code.value, code.scheme, code.meaning or code.value)

    def measurements(group: Group) -> list[hd.sr.Measurement]:
        return [
            hd.sr.Measurement(name=coded(name), value=value, unit=coded(unit))
            for name, value, unit in group.measurements
        ]

    def tracking(number: int) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(
            uid=derived_uid(source, f"tracking {number}"), identifier=f"finding {number}"
        )

    planar, generic = MEASUREMENT_GROUPS
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array([[10.0, 10.0], [40.0, 10.0], [40.0, 30.0]]),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(1),
            referenced_region=region,
            finding_type=coded(planar.finding),
            finding_sites=[hd.sr.FindingSite(coded(planar.finding_site))],
            measurements=measurements(planar),
        ),
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(2),
            finding_type=coded(generic.finding),
            finding_sites=[hd.sr.FindingSite(coded(generic.finding_site))],
            measurements=measurements(generic),
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        ),
    ]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(source, "observer device"), name="analytics test device"
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=derived_uid(source, "measurement report series"),
        series_number=901,
        sop_instance_uid=derived_uid(source, "measurement report"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
    )
    _fix_content_datetime(sr)
    return _save(sr, folder / "measurement_report.dcm")


def write_ct_dose_report(folder: Path, source: Dataset) -> Path:
    """An X-Ray Radiation Dose SR (TID 10011) with the ``DOSE_EVENTS`` and ``DLP_TOTAL``."""
    ds = _derived_header(source, X_RAY_RADIATION_DOSE_SR, "dose report", series_number=902)
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code(Code("DCM", "113701", "X-Ray Radiation Dose Report"))]
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "10011"
    ds.ContentTemplateSequence = [template]
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = []
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.CurrentRequestedProcedureEvidenceSequence = [_evidence(source)]
    accumulated = _container(
        "CONTAINS",
        Code("DCM", "113811", "CT Accumulated Dose Data"),
        [
            _num(EVENT_COUNT_CONCEPT, len(DOSE_EVENTS), Code("UCUM", "{events}", "events")),
            _num(DLP_TOTAL_CONCEPT, DLP_TOTAL, UCUM_MGYCM),
        ],
    )
    ds.ContentSequence = [
        _code_item(
            "HAS CONCEPT MOD",
            Code("DCM", "121058", "Procedure reported"),
            Code("SCT", "77477000", "Computed Tomography X-Ray"),
        ),
        accumulated,
        *(_acquisition(source, number, event) for number, event in enumerate(DOSE_EVENTS)),
    ]
    return _save(ds, folder / "ct_dose_report.dcm")


def _acquisition(source: Dataset, number: int, event: Event) -> Dataset:
    """A TID 10013 CT Irradiation Event: target region, event UID and its CT Dose."""
    uid = Dataset()
    uid.RelationshipType, uid.ValueType = "CONTAINS", "UIDREF"
    uid.ConceptNameCodeSequence = [_code(Code("DCM", "113769", "Irradiation Event UID"))]
    uid.UID = derived_uid(source, f"irradiation event {number}")
    dose = _container(
        "CONTAINS",
        Code("DCM", "113829", "CT Dose"),
        [_num(MEAN_CTDIVOL, event.ctdi_vol, UCUM_MGY), _num(DLP, event.dlp, UCUM_MGYCM)],
    )
    return _container(
        "CONTAINS",
        Code("DCM", "113819", "CT Acquisition"),
        [
            _code_item("CONTAINS", Code("DCM", "123014", "Target Region"), event.target_region),
            _code_item(
                "CONTAINS",
                Code("DCM", "113820", "CT Acquisition Type"),
                Code("DCM", "113804", "Sequenced Acquisition"),
            ),
            uid,
            dose,
        ],
    )


def write_segmentation(folder: Path, source_images: list[Dataset]) -> Path:
    """A binary SEG with the ``SEGMENTS`` over ``source_images`` (single-frame images of one
    series, e.g. pydicom's CT_small): segment 1 the upper left quarter, segment 2 the lower
    right one, both AUTOMATIC by ``ALGORITHM_NAME`` ``ALGORITHM_VERSION``."""
    import highdicom as hd
    import numpy as np
    from pydicom.sr.codedict import codes

    first = source_images[0]
    rows, columns = int(first.Rows), int(first.Columns)
    labels = np.zeros((len(source_images), rows, columns), dtype=np.uint8)
    labels[:, : rows // 2, : columns // 2] = 1
    labels[:, rows // 2 :, columns // 2 :] = 2
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, version=ALGORITHM_VERSION, family=codes.DCM.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment.label,
            segmented_property_category=_coded(hd, segment.category),
            segmented_property_type=_coded(hd, segment.property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[_coded(hd, segment.anatomic_region)]
            if segment.anatomic_region
            else None,
        )
        for number, segment in enumerate(SEGMENTS, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(first, "segmentation series"),
        series_number=903,
        sop_instance_uid=derived_uid(first, "segmentation"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="analytics samples",
        software_versions=SOFTWARE_VERSION,
        device_serial_number="1",
    )
    _fix_content_datetime(seg)
    return _save(seg, folder / "segmentation.dcm")


def _coded(hd: Any, code: Code) -> Any:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning or code.value)


def _fix_content_datetime(ds: Dataset) -> None:
    ds.ContentDate, ds.ContentTime = CONTENT_DATE, CONTENT_TIME


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _derived_header(source: Dataset, sop_class: str, what: str, series_number: int) -> Dataset:
    """File meta, SOP, patient, study, series and equipment attributes of a new instance in
    the source's study."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = derived_uid(source, what)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        setattr(ds, keyword, source.get(keyword, ""))
    ds.SeriesInstanceUID = derived_uid(source, f"{what} series")
    ds.SeriesNumber, ds.InstanceNumber = series_number, 1
    ds.SeriesDate, ds.SeriesTime = CONTENT_DATE, CONTENT_TIME
    ds.ContentDate, ds.ContentTime = CONTENT_DATE, CONTENT_TIME
    ds.Manufacturer = MANUFACTURER
    ds.SoftwareVersions = SOFTWARE_VERSION
    return ds


def _evidence(source: Dataset) -> Dataset:
    """A Hierarchical SOP Instance Reference item naming ``source``."""
    sop = Dataset()
    sop.ReferencedSOPClassUID = source.SOPClassUID
    sop.ReferencedSOPInstanceUID = source.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedSOPSequence = [sop]
    study = Dataset()
    study.StudyInstanceUID = source.StudyInstanceUID
    study.ReferencedSeriesSequence = [series]
    return study


def _code(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = code.value, code.scheme
    item.CodeMeaning = code.meaning or code.value
    return item


def _item(relationship: str, value_type: str, name: Code) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = relationship, value_type
    item.ConceptNameCodeSequence = [_code(name)]
    return item


def _container(relationship: str, name: Code, children: list[Dataset]) -> Dataset:
    item = _item(relationship, "CONTAINER", name)
    item.ContinuityOfContent = "SEPARATE"
    item.ContentSequence = Sequence(children)
    return item


def _code_item(relationship: str, name: Code, value: Code) -> Dataset:
    item = _item(relationship, "CODE", name)
    item.ConceptCodeSequence = [_code(value)]
    return item


def _num(name: Code, value: float, unit: Code) -> Dataset:
    measured = Dataset()
    measured.NumericValue = f"{value:g}"
    measured.MeasurementUnitsCodeSequence = [_code(unit)]
    item = _item("CONTAINS", "NUM", name)
    item.MeasuredValueSequence = [measured]
    return item


def read(path: Path) -> pydicom.FileDataset:
    """The file as the ETL reads it."""
    return pydicom.dcmread(path)
