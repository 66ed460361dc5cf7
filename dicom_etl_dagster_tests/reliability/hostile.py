"""Hostile DICOM files, generated with pydicom (and raw bytes where pydicom would refuse)
from pydicom's bundled samples into a test's tmp_path.

Every generator returns ``{path: expectation}``; an expectation is either one of the ledger
statuses (``"ingested"``, ``"duplicate"``, ``"failed"``), a tuple ``("failed", <reason kind>)``,
or ``None`` when any outcome is acceptable (a random byte flip may or may not break a file),
in which case only the invariants (exactly one ledger row, a one-line reason) are checked.
"""

from __future__ import annotations

import random
import shutil
import struct
import warnings
from pathlib import Path

import pydicom
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_etl_dagster_tests.dicom_samples import clone_instance, quiet_dcmread

TEST_FILES_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
CT_SMALL = TEST_FILES_DIR / "CT_small.dcm"
MR_SMALL = TEST_FILES_DIR / "MR_small.dcm"
RTPLAN = TEST_FILES_DIR / "rtplan.dcm"

#: What the PHI tests look for: none of these may appear in logs above DEBUG.
PHI_NAME = "Zyxwvut^Secretname"
PHI_BIRTH_DATE = "19011231"
PHI_PATIENT_ID = "PID-SECRET-42"

#: Helpers shared with the other tests, under the names this module's callers use.
quiet_read = quiet_dcmread
clone = clone_instance


def save(ds: Dataset, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(target, enforce_file_format=False)
    return target


def fresh_uids(ds: Dataset, study: str | None = None, series: str | None = None) -> Dataset:
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    if getattr(ds, "file_meta", None) is not None and "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def sample_files() -> list[Path]:
    return sorted(p for p in TEST_FILES_DIR.rglob("*") if p.is_file())


# --------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------
def copy_samples(root: Path) -> dict[Path, object]:
    """Every pydicom sample file (test files and character-set files), unchanged."""
    out: dict[Path, object] = {}
    for source in sample_files():
        target = root / "a_samples" / source.relative_to(TEST_FILES_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        out[target] = None
    for source in sorted(map(Path, get_charset_files())):
        target = root / "a_charsets" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        out[target] = None
    return out


def truncations(
    root: Path, sources=(CT_SMALL, RTPLAN, MR_SMALL), cuts_per_file: int = 25, seed: int = 7
) -> dict[Path, object]:
    """Fresh-UID copies cut at many offsets: inside the preamble, the meta header, the dataset
    and the pixel data. A cut exactly at an element boundary is a valid shorter file (a documented
    limitation), so the outcome is only constrained to 'failed' when the cut is inside pixel data."""
    rng = random.Random(seed)
    out: dict[Path, object] = {}
    for source in sources:
        ds = fresh_uids(quiet_read(source))
        whole = save(ds, root / "tmp" / f"whole_{source.stem}.dcm").read_bytes()
        pixel_start = None
        if "PixelData" in ds:
            # the value of PixelData starts after its 12-byte explicit VR header
            pixel_start = whole.rfind(b"\xe0\x7f\x10\x00")
        offsets = sorted(
            {1, 64, 127, 128, 131, 132, 140, 200, len(whole) - 1, len(whole) - 2}
            | {rng.randrange(1, len(whole)) for _ in range(cuts_per_file)}
        )
        for cut in offsets:
            target = root / "b_truncated" / f"{source.stem}_cut{cut:07d}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(whole[:cut])
            inside_pixels = pixel_start is not None and pixel_start + 16 < cut < len(whole)
            out[target] = ("failed", "truncated") if inside_pixels else None
    shutil.rmtree(root / "tmp")
    return out


def byte_flips(
    root: Path, sources=(CT_SMALL, MR_SMALL, RTPLAN), per_file: int = 20, seed: int = 11
) -> dict[Path, object]:
    """Fresh-UID copies with 1-16 random bytes overwritten (any outcome, but a reasoned one)."""
    rng = random.Random(seed)
    out: dict[Path, object] = {}
    for source in sources:
        data = save(fresh_uids(quiet_read(source)), root / "tmp" / "x.dcm").read_bytes()
        for i in range(per_file):
            mutated = bytearray(data)
            # bias the flips towards the header, where they do the most damage
            span = min(len(mutated), 2048) if i % 2 else len(mutated)
            for _ in range(rng.randint(1, 16)):
                mutated[rng.randrange(span)] = rng.randrange(256)
            target = root / "c_flipped" / f"{source.stem}_flip{i:02d}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(bytes(mutated))
            out[target] = None
    shutil.rmtree(root / "tmp")
    return out


def junk(root: Path) -> dict[Path, object]:
    folder = root / "d_junk"
    folder.mkdir(parents=True)
    files = {
        "zero_length.dcm": (b"", ("failed", "empty file")),
        "text.dcm": (b"this is not a DICOM file\n" * 20, ("failed", "not a DICOM file")),
        "random.bin": (random.Random(3).randbytes(4096), ("failed", "not a DICOM file")),
        "zeros.dcm": (b"\x00" * 2048, ("failed", "not a DICOM file")),
        "preamble_only.dcm": (b"\x00" * 128 + b"DICM", ("failed", None)),
        "png_header.dcm": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 500, ("failed", "not a DICOM file")),
    }
    out: dict[Path, object] = {}
    for name, (data, expected) in files.items():
        (folder / name).write_bytes(data)
        out[folder / name] = expected
    return out


def _minimal(sop: str | None = None) -> Dataset:
    """A small valid instance without pixel data (all top-level tags below (0040,xxxx))."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyDate = "20230102"
    ds.Modality = "OT"
    ds.PatientID = "HOSTILE-1"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    return ds


def _nested_raw(depth: int) -> bytes:
    """(0040,A730) ContentSequence nested ``depth`` times, undefined lengths throughout."""
    head = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\x00\x00" + b"\xff\xff\xff\xff"
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    leaf = struct.pack("<HH", 0x0040, 0xA160) + b"UT" + b"\x00\x00" + struct.pack("<L", 4) + b"leaf"
    return (head + item) * depth + leaf + (item_end + seq_end) * depth


def structures(root: Path) -> dict[Path, object]:
    """Huge and deeply nested sequences, undefined-length items."""
    folder = root / "e_structures"
    out: dict[Path, object] = {}

    ds = _minimal()
    ds.ReferencedImageSequence = Sequence([Dataset() for _ in range(3000)])
    for i, item in enumerate(ds.ReferencedImageSequence):
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = f"1.2.3.{i}"
    out[save(ds, folder / "huge_sequence_3000_items.dcm")] = "ingested"

    ds = clone(RTPLAN, folder / "undefined_length_items.dcm")
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
    save(ds, folder / "undefined_length_items.dcm")
    out[folder / "undefined_length_items.dcm"] = "ingested"

    for depth, expected in ((40, "ingested"), (400, None), (5000, None)):
        target = folder / f"nested_depth_{depth}.dcm"
        save(_minimal(), target)
        with target.open("ab") as fh:  # appended raw: pydicom itself cannot write this deep
            fh.write(_nested_raw(depth))
        out[target] = expected

    # an undefined-length sequence whose delimiter never comes
    target = folder / "unterminated_sequence.dcm"
    save(_minimal(), target)
    with target.open("ab") as fh:
        fh.write(_nested_raw(3)[:-16])
    out[target] = ("failed", None)
    return out


def values(root: Path, duplicate_of: Path) -> dict[Path, object]:
    """Odd character sets, invalid dates, values longer than the columns, missing / padded UIDs,
    duplicated SOP Instance UIDs."""
    folder = root / "f_values"
    out: dict[Path, object] = {}
    out[folder / "bad_date_all.dcm"] = ("failed", "no usable date")
    clone(
        CT_SMALL,
        folder / "bad_date_all.dcm",
        StudyDate="20231399",
        SeriesDate="20231399",
        AcquisitionDate="00000000",
        ContentDate="2023-1-1",
        InstanceCreationDate="2023",
    )
    # Real files exist whose only valid date is InstanceCreationDate: ingested on it.
    out[folder / "only_instance_creation_date.dcm"] = "ingested"
    clone(
        CT_SMALL,
        folder / "only_instance_creation_date.dcm",
        StudyDate="",
        SeriesDate=None,
        AcquisitionDate=None,
        ContentDate=None,
    )
    out[folder / "bad_date_study_only.dcm"] = "ingested"
    clone(CT_SMALL, folder / "bad_date_study_only.dcm", StudyDate="20231399", SeriesDate="20230615")
    out[folder / "long_values.dcm"] = "ingested"
    clone(
        CT_SMALL,
        folder / "long_values.dcm",
        StudyDescription="S" * 5000,
        BodyPartExamined="B" * 300,
        Modality="M" * 200,
        PatientID="P" * 1000,
        InstanceNumber="99999999999",
    )
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        out[folder / f"missing_{keyword}.dcm"] = ("failed", "missing required attribute")
        clone(CT_SMALL, folder / f"missing_{keyword}.dcm", **{keyword: None})
    out[folder / "blank_sop_uid.dcm"] = ("failed", "missing required attribute")
    clone(CT_SMALL, folder / "blank_sop_uid.dcm", SOPInstanceUID="")
    out[folder / "overlong_uid.dcm"] = ("failed", "invalid UID")
    clone(CT_SMALL, folder / "overlong_uid.dcm", SeriesInstanceUID="1.2." + "9" * 100)

    # Padded UIDs: stored stripped, so a padded copy of an ingested instance is a duplicate.
    sop = str(quiet_read(duplicate_of).SOPInstanceUID)
    for name, padded in (("uid_trailing_nul", sop + "\x00"), ("uid_trailing_spaces", sop + "  ")):
        ds = quiet_read(duplicate_of)
        ds.SOPInstanceUID = padded
        out[save(ds, folder / f"{name}.dcm")] = "duplicate"
    # plain byte-identical duplicates at other paths, and a same-SOP copy with other content
    for i in range(3):
        target = folder / f"dup_copy_{i}.dcm"
        shutil.copy(duplicate_of, target)
        out[target] = "duplicate"
    ds = quiet_read(duplicate_of)
    ds.StudyDescription = "same SOP instance, different content"
    out[save(ds, folder / "dup_other_content.dcm")] = "duplicate"

    # odd character sets
    out[folder / "charset_utf8.dcm"] = "ingested"
    clone(
        CT_SMALL,
        folder / "charset_utf8.dcm",
        SpecificCharacterSet="ISO_IR 192",
        PatientName="Ꮳꮃ^日本語=山田^太郎",
        StudyDescription="Ünïcødé ☢ 検査",
    )
    out[folder / "charset_unknown.dcm"] = None
    ds = clone(CT_SMALL, folder / "charset_unknown.dcm", SpecificCharacterSet="ISO_IR 999")
    ds.StudyDescription = "caf\xe9"  # latin-1 bytes under an unknown charset
    save(ds, folder / "charset_unknown.dcm")
    out[folder / "charset_latin1_declared_ascii.dcm"] = None
    ds = clone(CT_SMALL, folder / "charset_latin1_declared_ascii.dcm")
    ds.SpecificCharacterSet = "ISO_IR 6"
    save(ds, folder / "charset_latin1_declared_ascii.dcm")
    raw = (folder / "charset_latin1_declared_ascii.dcm").read_bytes()
    # overwrite the name's bytes with high latin-1 bytes under a declared ASCII charset
    name = str(ds.PatientName).encode()
    at = raw.find(name)
    if at > 0 and name:
        raw = raw[:at] + bytes([0xE9]) * len(name) + raw[at + len(name) :]
        (folder / "charset_latin1_declared_ascii.dcm").write_bytes(raw)
    return out


def hostile_corpus(root: Path) -> dict[Path, object]:
    corpus: dict[Path, object] = {}
    corpus.update(copy_samples(root))
    corpus.update(truncations(root))
    corpus.update(byte_flips(root))
    corpus.update(junk(root))
    corpus.update(structures(root))
    # duplicates of a file ingested in this run: a fresh clone placed before them in scan order
    original = root / "a_aaa_original" / "ct_original.dcm"
    clone(CT_SMALL, original)
    corpus[original] = "ingested"
    corpus.update(values(root, original))
    return corpus


# --------------------------------------------------------------------------
# A large clean folder (fault tests)
# --------------------------------------------------------------------------
def clean_folder(
    root: Path, files: int, files_per_series: int = 10, series_per_study: int = 3
) -> list[Path]:
    """``files`` instances cloned from CT_small / MR_small with fresh, consistent UIDs."""
    sources = [quiet_read(CT_SMALL), quiet_read(MR_SMALL)]
    paths = []
    study = series = None
    for i in range(files):
        if i % (files_per_series * series_per_study) == 0:
            study = generate_uid()
        if i % files_per_series == 0:
            series = generate_uid()
        ds = sources[(i // files_per_series) % 2]
        fresh_uids(ds, study, series)
        ds.InstanceNumber = i
        paths.append(save(ds, root / f"s{i // files_per_series:04d}" / f"f{i:05d}.dcm"))
    return paths


def phi_files(root: Path) -> dict[str, Path]:
    """Files carrying distinctive patient data, intact and broken."""
    attrs = dict(PatientName=PHI_NAME, PatientBirthDate=PHI_BIRTH_DATE, PatientID=PHI_PATIENT_ID)
    files = {}
    files["intact"] = root / "phi_intact.dcm"
    clone(CT_SMALL, files["intact"], **attrs)
    files["bad_date"] = root / "phi_no_date.dcm"
    clone(
        CT_SMALL,
        files["bad_date"],
        StudyDate="20231399",
        SeriesDate=None,
        AcquisitionDate=None,
        ContentDate=None,
        **attrs,
    )
    files["missing_uid"] = root / "phi_missing_uid.dcm"
    clone(CT_SMALL, files["missing_uid"], SOPInstanceUID=None, **attrs)
    # the name element with a corrupt value length (runs past the end of the name)
    files["bad_name_length"] = root / "phi_bad_name_length.dcm"
    clone(CT_SMALL, files["bad_name_length"], **attrs)
    raw = files["bad_name_length"].read_bytes()
    at = raw.find(PHI_NAME.encode())
    assert at > 0
    raw = raw[: at - 2] + struct.pack("<H", 0xFFF0) + raw[at:]
    files["bad_name_length"].write_bytes(raw)
    # a truncated copy, cut right after the patient id
    files["truncated"] = root / "phi_truncated.dcm"
    clone(CT_SMALL, files["truncated"], **attrs)
    raw = files["truncated"].read_bytes()
    files["truncated"].write_bytes(
        raw[: raw.find(PHI_PATIENT_ID.encode()) + len(PHI_PATIENT_ID) + 40]
    )
    # bad VR value: a DS value that is not a number in the patient group
    files["bad_weight"] = root / "phi_bad_weight.dcm"
    ds = clone(CT_SMALL, files["bad_weight"], **attrs)
    ds.add_new(0x00101030, "DS", "0")
    save(ds, files["bad_weight"])
    raw = files["bad_weight"].read_bytes()
    marker = struct.pack("<HH", 0x0010, 0x1030) + b"DS" + struct.pack("<H", 2) + b"0 "
    if marker in raw:
        raw = raw.replace(
            marker,
            struct.pack("<HH", 0x0010, 0x1030)
            + b"DS"
            + struct.pack("<H", 14)
            + (PHI_PATIENT_ID + "x").encode(),
        )
        files["bad_weight"].write_bytes(raw)
    return files
