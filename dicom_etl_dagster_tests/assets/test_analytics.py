"""measurement, image_feature and procedure concepts, end to end: ingest_metadata against a
real PostgreSQL with the DICOM vocabulary loaded, on pydicom's CT_small and on SR / SEG files
built with highdicom and pydicom (``analytics_samples``). Expected rows are computed from the
files with plain pydicom and from the concept rows the tests insert, not from product code."""

from __future__ import annotations

import datetime as dt
import os

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_etl_dagster_tests import analytics_samples as samples
from dicom_etl_dagster_tests.assets.test_imaging import CT_SMALL, file_metadata, ingest
from dicom_etl_dagster_tests.assets.test_imaging import vocab_url as vocab_url
from dicom_etl_dagster_tests.conftest import scalar
from dicom_etl_dagster_tests.dicom_samples import clone_instance
from dicom_etl_dagster_tests.dicom_samples import quiet_dcmread as read

MI, CDM = "cdmmedicalimaging", "cdmdefault"
NUMERIC_VRS = {"DS", "IS", "FL", "FD", "SS", "US", "SL", "UL", "SV", "UV"}
COUNTERS = {"InstanceNumber", "SeriesNumber", "AcquisitionNumber"}  # not measurements
MEASUREMENT_FIELD = 1147330
UCUM = {"kV": 9100001, "mm": 9100002, "mA.s": 9100003, "mGy": 9100004, "mGy.cm": 9100005}


def concept(db, concept_id, name, vocabulary, code, domain="Measurement", standard="S"):
    db.execute(
        "INSERT INTO cdmvocab.concept VALUES (%s, %s, %s, %s, 'Test class', %s, %s,"
        " '1970-01-01', '2099-12-31', NULL)",
        [concept_id, name, domain, vocabulary, standard, code],
    )


def ucum_concepts(db) -> None:
    for code, concept_id in UCUM.items():
        concept(db, concept_id, code, "UCUM", code, domain="Unit")


def dicom_concept(db, code: str, concept_class: str = "DICOM Attributes") -> int:
    return scalar(
        db,
        "SELECT concept_id FROM cdmvocab.concept WHERE vocabulary_id = 'DICOM'"
        " AND concept_class_id = %s AND concept_code = %s",
        [concept_class, code],
    )


def series_id(db, series_uid: str) -> int:
    return scalar(
        db,
        f"SELECT image_occurrence_id FROM {MI}.image_occurrence WHERE image_series_uid = %s",
        [series_uid],
    )


def measurements_of(db, image_occurrence_id: int) -> dict[str, tuple]:
    """measurement_source_value -> the measurement's columns, for the features of a series."""
    rows = db.execute(
        "SELECT m.measurement_source_value, m.measurement_concept_id,"
        " m.measurement_source_concept_id, m.value_as_number, m.value_as_concept_id,"
        " m.value_source_value, m.unit_source_value, m.unit_concept_id, m.measurement_date,"
        " m.measurement_datetime, m.measurement_type_concept_id, m.person_id,"
        " f.image_feature_concept_id, f.image_feature_type_concept_id, f.image_finding_id,"
        " f.image_finding_concept_id, f.anatomic_site_concept_id"
        f" FROM {MI}.image_feature f JOIN {CDM}.measurement m"
        "   ON f.image_feature_event_field_concept_id = %s"
        "  AND m.measurement_id = f.image_feature_event_id"
        " WHERE f.image_occurrence_id = %s",
        [MEASUREMENT_FIELD, image_occurrence_id],
    ).fetchall()
    found: dict[str, tuple] = {}
    for row in rows:
        assert row[0] not in found, f"{row[0]} measured twice"
        found[row[0]] = row[1:]
    return found


def profile_keywords(ds: Dataset, coded: set[str]) -> set[str]:
    """What the default profile takes from a dataset, computed with pydicom: public top-level
    numeric elements with one value (counters aside), and CS elements in ``coded``."""
    found = set()
    for elem in ds:
        if elem.tag.is_private or elem.tag.group == 0x0002 or elem.tag.element == 0:
            continue
        if elem.VR in NUMERIC_VRS and elem.VM == 1 and elem.keyword not in COUNTERS:
            found.add(elem.keyword)
        if elem.VR == "CS" and elem.VM == 1 and elem.keyword in coded:
            found.add(elem.keyword)
    return found


def coded_keywords(db, ds: Dataset) -> set[str]:
    """CS attributes of ``ds`` whose value has a DICOM value concept ('Maps to value')."""
    found = set()
    for elem in ds:
        if elem.VR != "CS" or elem.VM != 1 or not str(elem.value).strip():
            continue
        tag = f"{elem.tag.group:04X}{elem.tag.element:04X}"
        if scalar(
            db,
            "SELECT count(*) FROM cdmvocab.concept a JOIN cdmvocab.concept_relationship r"
            " ON r.concept_id_1 = a.concept_id AND r.relationship_id = 'Maps to value'"
            " JOIN cdmvocab.concept v ON v.concept_id = r.concept_id_2"
            " WHERE a.concept_code = %s AND a.vocabulary_id = 'DICOM'"
            " AND upper(v.concept_code) = upper(%s)",
            [tag, str(elem.value).strip()],
        ):
            found.add(elem.keyword)
    return found


# --------------------------------------------------------------------------
# Acquisition parameters
# --------------------------------------------------------------------------
def test_ct_small_gives_its_acquisition_parameters_with_units(vocab_url, db, tmp_path):
    ucum_concepts(db)
    folder = tmp_path / "dicom"
    first = clone_instance(
        CT_SMALL, folder / "a.dcm", KVP="120", SliceLocation="-10", SliceThickness="5.000"
    )
    # A later instance of the same series with other values: the series keeps the first's.
    clone_instance(
        CT_SMALL,
        folder / "b.dcm",
        new_uids=False,
        StudyInstanceUID=first.StudyInstanceUID,
        SeriesInstanceUID=first.SeriesInstanceUID,
        SOPInstanceUID=generate_uid(),
        KVP="140",
        SliceLocation="-15",
    )
    result = ingest(vocab_url, folder)
    io_id = series_id(db, str(first.SeriesInstanceUID))
    found = measurements_of(db, io_id)
    assert set(found) == profile_keywords(first, coded_keywords(db, first))

    kvp_concept = dicom_concept(db, "00180060")
    series_date, series_time = dt.date(1997, 4, 30), dt.datetime(1997, 4, 30, 11, 27, 49)
    assert found["KVP"] == (
        kvp_concept,  # no standard target in DICOM2OMOP: the DICOM concept (MI-CDM recipe)
        kvp_concept,
        120,
        None,
        "120",
        "kV",
        UCUM["kV"],
        series_date,
        series_time,  # SeriesDate + SeriesTime, not StudyDate
        32817,
        0,
        kvp_concept,  # image_feature_concept_id = the measurement concept
        32817,
        None,
        None,
        0,  # CT_small has no BodyPartExamined: the series' site is 0
    )
    thickness = found["SliceThickness"]
    # The value as the file writes it; the number as a number.
    assert (thickness[2], thickness[4:7]) == (5, ("5.000", "mm", UCUM["mm"]))
    assert found["Exposure"][5:7] == ("mA.s", UCUM["mA.s"])
    assert found["SliceLocation"][2] == -10  # the first instance's value
    assert found["Rows"][5:7] == (None, 0)  # a count has no unit
    # Coded: Modality CT as its DICOM value concept; no dates, times or UIDs as numbers.
    modality = found["Modality"]
    assert modality[2:5] == (None, dicom_concept(db, "CT", "DICOM Value Sets"), "CT")
    assert not {k for k in found if pydicom.datadict.dictionary_VR(k) in ("DA", "TM", "DT", "UI")}
    assert "SOPInstanceUID" not in found and "InstanceNumber" not in found

    metadata = file_metadata(result, "measurement")
    assert metadata["rows_written"] == len(found)
    assert metadata["measurements_with_concept_0"] == sum(1 for r in found.values() if r[0] == 0)
    assert file_metadata(result, "image_feature")["rows_written"] == len(found)
    # No visit_occurrence table in this CDM schema: nothing linked, nothing counted.
    assert file_metadata(result, "procedure_occurrence")["new_studies_by_visit_linkage"] == {}

    # Re-running adds nothing.
    before = scalar(db, f"SELECT count(*) FROM {CDM}.measurement")
    assert ingest(vocab_url, folder).success
    assert scalar(db, f"SELECT count(*) FROM {CDM}.measurement") == before == len(found)
    assert scalar(db, f"SELECT count(*) FROM {MI}.image_feature") == before


def test_a_profile_and_the_zero_policy_are_options(vocab_url, db, tmp_path):
    folder = tmp_path / "dicom"
    ds = clone_instance(CT_SMALL, folder / "a.dcm")
    ingest(
        vocab_url,
        folder,
        acquisition_attributes=["KVP", "00180050", "Modality"],
        non_standard_measurement_concepts="zero",
    )
    found = measurements_of(db, series_id(db, str(ds.SeriesInstanceUID)))
    assert set(found) == {"KVP", "SliceThickness", "Modality"}
    # No standard concept for DICOM attributes: 0, the source concept kept.
    assert [found["KVP"][0], found["KVP"][1]] == [0, dicom_concept(db, "00180060")]


def test_measurements_off_writes_none(vocab_url, db, tmp_path):
    folder = tmp_path / "dicom"
    clone_instance(CT_SMALL, folder / "a.dcm")
    assert ingest(vocab_url, folder, measurements=False).success
    assert scalar(db, f"SELECT count(*) FROM {CDM}.measurement") == 0
    assert scalar(db, f"SELECT count(*) FROM {MI}.image_feature") == 0


def test_an_unknown_concept_policy_fails_with_one_line(vocab_url, tmp_path):
    folder = tmp_path / "dicom"
    clone_instance(CT_SMALL, folder / "a.dcm")
    result = ingest(
        vocab_url, folder, raise_on_error=False, non_standard_measurement_concepts="maybe"
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "non_standard_measurement_concepts must be one of dicom, zero" in str(
        failure.event_specific_data
    )


# --------------------------------------------------------------------------
# Structured reports
# --------------------------------------------------------------------------
def sr_rows(db, sop_instance_uid: str) -> list[tuple]:
    """The measurements read from one SR, with their features, in measurement id order."""
    return db.execute(
        "SELECT m.measurement_source_value, m.measurement_concept_id,"
        " m.measurement_source_concept_id, m.value_as_number, m.unit_source_value,"
        " m.unit_concept_id, f.image_occurrence_id, f.image_finding_id,"
        " f.image_finding_concept_id, f.anatomic_site_concept_id, m.measurement_date"
        f" FROM {MI}.dicom_etl_feature_source s"
        f" JOIN {CDM}.measurement m ON m.measurement_id = s.measurement_id"
        f" JOIN {MI}.image_feature f ON f.image_feature_id = s.image_feature_id"
        " WHERE s.sop_instance_uid = %s ORDER BY m.measurement_id",
        [sop_instance_uid],
    ).fetchall()


def test_a_tid_1500_report_gives_its_measurements_by_group(vocab_url, db, tmp_path):
    ucum_concepts(db)
    next_id = iter(range(9200001, 9200100))
    snomed = {}
    for group in samples.MEASUREMENT_GROUPS:
        for code in (group.finding, group.finding_site, *(m[0] for m in group.measurements)):
            if code.value not in snomed:
                snomed[code.value] = next(next_id)
                concept(db, snomed[code.value], code.meaning, "SNOMED", code.value)
    folder = tmp_path / "dicom"
    image = clone_instance(CT_SMALL, folder / "ct.dcm")
    report = read(samples.write_measurement_report(folder, image))
    ingest(vocab_url, folder)

    image_series = series_id(db, str(image.SeriesInstanceUID))
    rows = sr_rows(db, str(report.SOPInstanceUID))
    expected = [
        (f"SCT:{code.value}", snomed[code.value], snomed[code.value], value, unit.value)
        for group in samples.MEASUREMENT_GROUPS
        for code, value, unit in group.measurements
    ]
    assert [(r[0], r[1], r[2], float(r[3]), r[4]) for r in rows] == expected
    assert rows[0][5] == UCUM["mm"] and rows[2][5] == 0  # [hnsf'U] has no concept here
    assert {r[6] for r in rows} == {image_series}  # about the referenced image's series
    first, second = samples.MEASUREMENT_GROUPS
    findings = [(r[7], r[8], r[9]) for r in rows]
    n = len(first.measurements)
    assert len({f[0] for f in findings[:n]}) == 1 and findings[0][0] != findings[n][0]
    assert findings[0][1:] == (snomed[first.finding.value], snomed[first.finding_site.value])
    assert findings[n][1:] == (snomed[second.finding.value], snomed[second.finding_site.value])


def test_a_ct_dose_report_gives_ctdivol_and_dlp(vocab_url, db, tmp_path):
    ucum_concepts(db)
    folder = tmp_path / "dicom"
    image = clone_instance(CT_SMALL, folder / "ct.dcm")
    report_path = samples.write_ct_dose_report(folder, image)
    report = read(report_path)
    ingest(vocab_url, folder)
    rows = sr_rows(db, str(report.SOPInstanceUID))
    by_concept: dict[str, list] = {}
    for r in rows:
        by_concept.setdefault(r[0], []).append(r)
    ctdi = by_concept["DCM:113830"]
    assert [float(r[3]) for r in ctdi] == [e.ctdi_vol for e in samples.DOSE_EVENTS]
    assert {(r[4], r[5]) for r in ctdi} == {("mGy", UCUM["mGy"])}
    mean_ctdivol = dicom_concept(db, "113830", "DICOM Value Sets")
    assert mean_ctdivol == 2128007409
    assert {(r[1], r[2]) for r in ctdi} == {(mean_ctdivol, mean_ctdivol)}
    dlp = by_concept["DCM:113838"]
    assert [float(r[3]) for r in dlp] == [e.dlp for e in samples.DOSE_EVENTS]
    assert [float(r[3]) for r in by_concept["DCM:113813"]] == [samples.DLP_TOTAL]
    # One finding per irradiation event: its CTDIvol and DLP share it, events differ.
    assert [r[7] for r in ctdi] == [r[7] for r in dlp] and ctdi[0][7] != ctdi[1][7]
    assert by_concept["DCM:113813"][0][7] not in {r[7] for r in ctdi}
    # The dose values point at the report's own series (TID 10011 references no image).
    own = series_id(db, str(report.SeriesInstanceUID))
    assert {r[6] for r in rows} == {own}

    # The file changes (same SOP instance): its rows are replaced, not added to.
    count = len(rows)
    report.ContentSequence[1].ContentSequence[0].MeasuredValueSequence[0].NumericValue = "800"
    report.save_as(report_path, enforce_file_format=True)
    os.utime(report_path, ns=(1, 1))
    again = ingest(vocab_url, folder)
    rows = sr_rows(db, str(report.SOPInstanceUID))
    assert len(rows) == count
    assert scalar(db, f"SELECT count(*) FROM {MI}.dicom_etl_feature_source") == count
    assert file_metadata(again, "image_feature")["rows_replaced_for_changed_files"] == count


def test_a_segmentation_gives_its_segments_with_the_algorithm(vocab_url, db, tmp_path):
    spleen = samples.SEGMENTS[1]
    concept(
        db, 9300001, "Spleen", "SNOMED", spleen.property_type.value, domain="Spec Anatomic Site"
    )
    concept(
        db, 9300002, "Abdomen", "SNOMED", spleen.anatomic_region.value, domain="Spec Anatomic Site"
    )
    folder = tmp_path / "dicom"
    image = clone_instance(CT_SMALL, folder / "ct.dcm")
    seg = read(samples.write_segmentation(folder, [image]))
    ingest(vocab_url, folder)
    rows = db.execute(
        "SELECT f.image_occurrence_id, f.image_feature_event_field_concept_id,"
        " f.image_feature_concept_id, f.image_feature_type_concept_id,"
        " f.image_finding_concept_id, f.anatomic_site_concept_id, f.alg_system, f.alg_datetime,"
        " f.image_finding_id"
        f" FROM {MI}.dicom_etl_feature_source s"
        f" JOIN {MI}.image_feature f ON f.image_feature_id = s.image_feature_id"
        " WHERE s.sop_instance_uid = %s ORDER BY f.image_feature_id",
        [str(seg.SOPInstanceUID)],
    ).fetchall()
    assert len(rows) == len(samples.SEGMENTS)
    image_series = series_id(db, str(image.SeriesInstanceUID))
    liver, spleen_row = rows
    assert liver[:6] == (image_series, None, 0, 32880, 0, 0)  # Liver: no concept inserted
    assert spleen_row[:6] == (image_series, None, 9300001, 32880, 9300001, 9300002)
    for row in rows:
        assert samples.ALGORITHM_NAME in row[6] and samples.ALGORITHM_VERSION in row[6]
        assert row[7] == samples.CONTENT_DATETIME
    assert liver[8] != spleen_row[8]  # a finding per segment
    assert (
        scalar(
            db,
            f"SELECT count(*) FROM {CDM}.measurement WHERE measurement_source_value LIKE 'SCT:%%'",
        )
        == 0
    )


# --------------------------------------------------------------------------
# Procedure concepts and datetimes
# --------------------------------------------------------------------------
def procedure_of(db, series_uid: str) -> tuple:
    return db.execute(
        "SELECT p.procedure_concept_id, p.procedure_source_concept_id, p.procedure_datetime,"
        " p.visit_occurrence_id"
        f" FROM {CDM}.procedure_occurrence p JOIN {MI}.image_occurrence i"
        "   ON i.procedure_occurrence_id = p.procedure_occurrence_id"
        " WHERE i.image_series_uid = %s",
        [series_uid],
    ).fetchone()


def procedure_code(scheme: str, value: str) -> list[Dataset]:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, "CT chest"
    return [item]


def test_procedure_concepts_by_code_by_modality_and_none(vocab_url, db, tmp_path):
    concept(db, 9400001, "Computed tomography", "SNOMED", "77477000", domain="Procedure")
    concept(db, 9400002, "CT Chest", "LOINC", "24627-2", domain="Procedure")
    concept(db, 9400003, "CT chest (old)", "LOINC", "99999-9", domain="Procedure", standard=None)
    db.execute(
        "INSERT INTO cdmvocab.concept_relationship VALUES (9400003, 9400002, 'Maps to',"
        " '1970-01-01', '2099-12-31', NULL)"
    )
    folder = tmp_path / "first"
    by_modality = clone_instance(CT_SMALL, folder / "ct.dcm")
    by_code = clone_instance(
        CT_SMALL, folder / "coded.dcm", ProcedureCodeSequence=procedure_code("LN", "99999-9")
    )
    sr_only = clone_instance(CT_SMALL, folder / "sr.dcm", Modality="SR")
    ingest(vocab_url, folder)
    study_time = dt.datetime(2004, 1, 19, 7, 27, 30)  # StudyDate + StudyTime of CT_small
    assert procedure_of(db, str(by_modality.SeriesInstanceUID)) == (9400001, None, study_time, None)
    # A non-standard code follows 'Maps to'; the matched code is the source concept.
    assert procedure_of(db, str(by_code.SeriesInstanceUID))[:2] == (9400002, 9400003)
    assert procedure_of(db, str(sr_only.SeriesInstanceUID))[:2] == (0, None)

    # Later files of the same studies: a code fills in what the modality gave, an imaging
    # series gives the SR-only study its modality's concept.
    later = tmp_path / "later"
    clone_instance(
        CT_SMALL,
        later / "ct_coded.dcm",
        new_uids=False,
        StudyInstanceUID=by_modality.StudyInstanceUID,
        SeriesInstanceUID=generate_uid(),
        SOPInstanceUID=generate_uid(),
        RequestedProcedureCodeSequence=procedure_code("LN", "24627-2"),
    )
    clone_instance(
        CT_SMALL,
        later / "ct_for_sr.dcm",
        new_uids=False,
        StudyInstanceUID=sr_only.StudyInstanceUID,
        SeriesInstanceUID=generate_uid(),
        SOPInstanceUID=generate_uid(),
    )
    result = ingest(vocab_url, later)
    assert procedure_of(db, str(by_modality.SeriesInstanceUID))[:2] == (9400002, 9400002)
    assert procedure_of(db, str(sr_only.SeriesInstanceUID))[:2] == (9400001, None)
    assert scalar(db, f"SELECT count(*) FROM {CDM}.procedure_occurrence") == 3
    assert file_metadata(result, "procedure_occurrence")["procedure_concepts_set"] == {
        "by procedure code": 1,
        "by modality": 1,
    }


# --------------------------------------------------------------------------
# Visits
# --------------------------------------------------------------------------
def test_visits_are_linked_when_exactly_one_contains_the_study_date(vocab_url, db, tmp_path):
    db.execute(
        f"CREATE TABLE {CDM}.visit_occurrence (visit_occurrence_id integer, person_id integer,"
        " visit_start_date date, visit_end_date date)"
    )
    db.execute(f"CREATE TABLE {MI}.mappingtable (source_person_id integer, source_patient_id text)")
    study_date = dt.date(2004, 1, 19)  # CT_small's StudyDate
    patients = {"ONE": 11, "NONE": 12, "TWO": 13}
    for patient, person in patients.items():
        db.execute(f"INSERT INTO {MI}.mappingtable VALUES (%s, %s)", [person, patient])
    day = dt.timedelta(days=1)
    visits = [
        (501, 11, study_date - day, study_date + day),  # contains the date
        (502, 11, study_date + 10 * day, None),  # another visit of the same person, later
        (503, 12, study_date - 30 * day, study_date - 20 * day),  # before: none contains it
        (504, 13, study_date, study_date),  # two visits contain it: ambiguous
        (505, 13, study_date - day, None if False else study_date + 2 * day),
    ]
    for visit in visits:
        db.execute(f"INSERT INTO {CDM}.visit_occurrence VALUES (%s, %s, %s, %s)", visit)
    folder = tmp_path / "dicom"
    files = {p: clone_instance(CT_SMALL, folder / f"{p}.dcm", PatientID=p) for p in patients}
    result = ingest(vocab_url, folder)

    def visit_ids(ds) -> set:
        uid = str(ds.SeriesInstanceUID)
        io = db.execute(
            f"SELECT image_occurrence_id, visit_occurrence_id FROM {MI}.image_occurrence"
            " WHERE image_series_uid = %s",
            [uid],
        ).fetchone()
        measured = db.execute(
            f"SELECT DISTINCT m.visit_occurrence_id FROM {CDM}.measurement m"
            f" JOIN {MI}.image_feature f ON m.measurement_id = f.image_feature_event_id"
            " WHERE f.image_occurrence_id = %s",
            [io[0]],
        ).fetchall()
        return {procedure_of(db, uid)[3], io[1], *(v for (v,) in measured)}

    assert visit_ids(files["ONE"]) == {501}
    assert visit_ids(files["NONE"]) == {None}
    assert visit_ids(files["TWO"]) == {None}
    assert file_metadata(result, "procedure_occurrence")["new_studies_by_visit_linkage"] == {
        "linked": 1,
        "none": 1,
        "ambiguous": 1,
    }
    assert scalar(db, f"SELECT count(*) FROM {CDM}.visit_occurrence") == len(visits)


def test_no_date_as_a_number_anywhere(vocab_url, db, tmp_path):
    folder = tmp_path / "dicom"
    for name in ("a", "b"):
        clone_instance(CT_SMALL, folder / f"{name}.dcm")
    ingest(vocab_url, folder)
    keywords = {
        r[0] for r in db.execute(f"SELECT DISTINCT measurement_source_value FROM {CDM}.measurement")
    }
    dictionary = pydicom.datadict.keyword_dict
    vrs = {pydicom.datadict.dictionary_VR(dictionary[k]) for k in keywords if k in dictionary}
    assert vrs and not vrs & {"DA", "TM", "DT", "UI"}
