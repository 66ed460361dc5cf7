#!/usr/bin/env python3
"""Generate a reproducible corpus of DICOM files for benchmarks and tests.

The headers of real pydicom sample files (CT with vendor private tags, MR, RT plan, RT dose,
an SR document, a segmentation, an NM image and a CT carrying nested *private* sequences)
are cloned into N files spread over patients, studies and series, each with fresh UIDs:

    OUT/corpus.json                                   what was generated (seed, counts, ...)
    OUT/dicom/<patient>/study_NNN/series_NNN_<kind>/NNNNN.dcm

Counts are fixed by the options, never by chance: ``files_per_series`` files per series
(the last series may be short), ``series_per_study`` series per study and
``studies_per_patient`` studies per patient. The seed picks each series' template, the study
dates and every UID, so the same (N, seed, options) gives byte-identical files.

It is fast because pydicom serialises each template only once: the fields that vary
(UIDs, patient, dates, instance number, ...) are written as unique fixed-width markers, and
every file is the template's bytes with those markers overwritten (same lengths, so every
length field stays valid). Writing 10,000 files takes a few seconds.

    python scripts/make_corpus.py OUT --files 10000 --seed 7
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

__all__ = ["TEMPLATES", "CorpusSpec", "generate", "main", "uid_for"]

#: pydicom's own UID root (PS3.5 B.2: an organisation root plus digits); 26 characters.
UID_ROOT = "1.2.826.0.1.3680043.8.498."
#: Every generated UID has this length: the root plus 36 digits (even, so no padding byte).
UID_LENGTH = 62
PATIENT_ID_WIDTH = 12  # "BENCH" + 7 digits
MANIFEST = "corpus.json"
DICOM_SUBDIR = "dicom"
GENERATOR_VERSION = 1
_FIRST_STUDY_DATE = date(2012, 1, 1)
_STUDY_DATE_SPAN_DAYS = 12 * 365

_SAMPLES = Path(pydicom.__file__).parent / "data" / "test_files"


@dataclass(frozen=True)
class Template:
    kind: str  # short name, part of the series folder name
    sample: str  # pydicom sample file whose header is cloned
    weight: int  # relative share of series
    body_part: str | None = None  # BodyPartExamined to set (the samples mostly lack it)
    description: str | None = None  # StudyDescription to set when the sample has none
    private_sequences: bool = (
        False  # add nested private sequences (no bundled file that read_instance accepts has them)
    )


TEMPLATES: tuple[Template, ...] = (
    Template("ct", "CT_small.dcm", 30, "CHEST"),  # GE private tags (179 of 269 elements)
    Template("mr", "MR_small.dcm", 20, "BRAIN", "MR BRAIN"),
    Template("ctpriv", "CT_small.dcm", 10, "ABDOMEN", private_sequences=True),
    Template("nm", "JPEG-lossy.dcm", 5),  # NM, private tags, public sequences
    Template("seg", "liver_1frame.dcm", 5, "LIVER", "CT LIVER SEGMENTATION"),  # 32 sequences
    Template("rtplan", "rtplan.dcm", 10, None, "RT PLANNING"),  # implicit VR, nested sequences
    Template("rtdose", "rtdose.dcm", 10, None, "RT PLANNING"),
    Template("sr", "test-SR.dcm", 10),  # SR content tree: 56 nested sequences
)

# Fields that vary, with the width of their values. UIDs are set where the template has them
# (FrameOfReferenceUID) or always (the three instance UIDs, MediaStorageSOPInstanceUID).
_DATE_KEYWORDS = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


@dataclass(frozen=True)
class CorpusSpec:
    files: int
    seed: int = 0
    files_per_series: int = 50
    series_per_study: int = 3
    studies_per_patient: int = 2

    def __post_init__(self) -> None:
        for name in ("files", "files_per_series", "series_per_study", "studies_per_patient"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    @property
    def series(self) -> int:
        return math.ceil(self.files / self.files_per_series)

    @property
    def studies(self) -> int:
        return math.ceil(self.series / self.series_per_study)

    @property
    def patients(self) -> int:
        return math.ceil(self.studies / self.studies_per_patient)

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "seed": self.seed,
            "files_per_series": self.files_per_series,
            "series_per_study": self.series_per_study,
            "studies_per_patient": self.studies_per_patient,
        }


def uid_for(seed: int, kind: str, number: int) -> str:
    """A fresh, valid UID (root + 36 digits, first digit non-zero), a pure function of its inputs."""
    digest = hashlib.blake2b(f"{seed}:{kind}:{number}".encode(), digest_size=16).digest()
    return UID_ROOT + str(10**35 + int.from_bytes(digest, "big") % (9 * 10**35))


def patient_id(number: int) -> str:
    return f"BENCH{number:07d}"


# --------------------------------------------------------------------------------------------
# Templates: the sample's bytes with markers where per-file values go
# --------------------------------------------------------------------------------------------
class _CompiledTemplate:
    """A template's file bytes cut at the markers: ``render`` fills them in."""

    def __init__(self, template: Template) -> None:
        self.template = template
        ds = _prepared_dataset(template)
        markers: dict[str, str] = {}

        def mark(field: str, width: int, kind: str) -> str:
            number = len(markers) + 1
            if kind == "uid":
                value = f"{UID_ROOT}9{number:02d}".ljust(UID_LENGTH, "7")
            elif kind == "date":
                value = f"209912{number:02d}"  # a valid date far from any sample's
            elif kind == "number":
                value = f"9{number:02d}".ljust(width, "8")
            else:
                value = f"Q{number:02d}Z".ljust(width, "Q")
            markers[field] = value
            return value

        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = mark("sop", UID_LENGTH, "uid")
        ds.StudyInstanceUID = mark("study", UID_LENGTH, "uid")
        ds.SeriesInstanceUID = mark("series", UID_LENGTH, "uid")
        if "FrameOfReferenceUID" in ds:
            ds.FrameOfReferenceUID = mark("frame", UID_LENGTH, "uid")
        ds.PatientID = mark("patient_id", PATIENT_ID_WIDTH, "text")
        ds.PatientName = mark("patient_name", 20, "text")  # "Bench^Patient0000001"
        ds.AccessionNumber = mark("accession", 12, "text")
        ds.StudyID = mark("study_id", 8, "text")
        ds.InstanceNumber = mark("instance", 8, "number")  # IS, zero-padded
        ds.SeriesNumber = mark("series_number", 6, "number")
        for keyword in _DATE_KEYWORDS:
            if keyword in ds or keyword in ("StudyDate", "SeriesDate"):
                setattr(ds, keyword, mark(keyword, 8, "date"))

        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()

        # Cut the bytes at every marker; each occurs exactly once (the SOP Instance UID
        # twice: in the file meta and in the dataset).
        spans = []
        for field, value in markers.items():
            encoded = value.encode("ascii")
            expected = 2 if field == "sop" else 1
            starts = []
            found = data.find(encoded)
            while found >= 0:
                starts.append(found)
                found = data.find(encoded, found + 1)
            if len(starts) != expected:
                raise RuntimeError(
                    f"template {template.kind}: marker for {field} found {len(starts)} times"
                )
            spans.extend((start, start + len(encoded), field) for start in starts)
        spans.sort()
        self.pieces: list[bytes] = []
        self.fields: list[str] = []
        position = 0
        for start, end, field in spans:
            self.pieces.append(data[position:start])
            self.fields.append(field)
            position = end
        self.pieces.append(data[position:])
        self.widths = {field: len(value) for field, value in markers.items()}
        self.size = len(data)

    def render(self, values: dict[str, str]) -> bytes:
        out = [self.pieces[0]]
        for field, piece in zip(self.fields, self.pieces[1:]):
            value = values[field]
            if len(value) != self.widths[field]:
                raise ValueError(f"{field}: {value!r} is not {self.widths[field]} characters")
            out.append(value.encode("ascii"))
            out.append(piece)
        return b"".join(out)


def _prepared_dataset(template: Template) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(_SAMPLES / template.sample)
    ds = copy.deepcopy(ds)
    if template.body_part:
        ds.BodyPartExamined = template.body_part
    if template.description and not str(ds.get("StudyDescription", "") or "").strip():
        ds.StudyDescription = template.description
    if template.private_sequences:
        _add_private_sequences(ds)
    return ds


def _add_private_sequences(ds: Dataset) -> None:
    """A private block (0051,00xx) whose sequence items hold private elements and a nested private sequence."""
    creator = "DICOM_ETL_BENCH"
    ds.private_block(0x0051, creator, create=True)
    items = []
    for i in range(3):
        item = Dataset()
        block = item.private_block(0x0051, creator, create=True)
        block.add_new(0x01, "LO", f"bench item {i + 1}")
        block.add_new(0x02, "DS", [f"{i}.5", f"{i + 1}.25"])
        block.add_new(0x03, "UL", 1000 + i)
        nested = []
        for j in range(2):
            inner = Dataset()
            inner_block = inner.private_block(0x0051, creator, create=True)
            inner_block.add_new(0x04, "SH", f"n{i}{j}")
            inner_block.add_new(0x05, "OB", bytes(range(j, j + 6)))
            nested.append(inner)
        block.add_new(0x11, "SQ", Sequence(nested))
        items.append(item)
    ds.private_block(0x0051, creator).add_new(0x10, "SQ", Sequence(items))


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
def _series_templates(spec: CorpusSpec) -> list[Template]:
    rng = random.Random(f"templates:{spec.seed}")
    return rng.choices(TEMPLATES, weights=[t.weight for t in TEMPLATES], k=spec.series)


def _study_dates(spec: CorpusSpec) -> list[date]:
    rng = random.Random(f"dates:{spec.seed}")
    return [
        _FIRST_STUDY_DATE + timedelta(days=rng.randrange(_STUDY_DATE_SPAN_DAYS))
        for _ in range(spec.studies)
    ]


def generate(out: str | os.PathLike, spec: CorpusSpec, progress: bool = False) -> dict:
    """Write the corpus under ``out`` (which must not hold a different corpus); return the manifest."""
    out = Path(out)
    dicom_root = out / DICOM_SUBDIR
    manifest_path = out / MANIFEST
    if manifest_path.exists() or (dicom_root.exists() and any(dicom_root.iterdir())):
        raise FileExistsError(f"{out} already holds a corpus; choose an empty or new folder")
    started = time.perf_counter()
    compiled = {t.kind: _CompiledTemplate(t) for t in TEMPLATES}
    templates = _series_templates(spec)
    dates = _study_dates(spec)

    written = 0
    total_bytes = 0
    by_kind: dict[str, int] = {}
    for series in range(spec.series):
        study = series // spec.series_per_study
        patient = study // spec.studies_per_patient
        template = compiled[templates[series].kind]
        folder = (
            dicom_root
            / patient_id(patient + 1)
            / f"study_{study % spec.studies_per_patient + 1:03d}"
            / f"series_{series % spec.series_per_study + 1:03d}_{template.template.kind}"
        )
        folder.mkdir(parents=True, exist_ok=True)
        study_date = dates[study].strftime("%Y%m%d")
        values = {
            "study": uid_for(spec.seed, "study", study),
            "series": uid_for(spec.seed, "series", series),
            "frame": uid_for(spec.seed, "frame", series),
            "patient_id": patient_id(patient + 1),
            "patient_name": f"Bench^Patient{patient + 1:07d}",
            "accession": f"ACC{study + 1:09d}",
            "study_id": f"S{study + 1:07d}",
            "series_number": f"{series % spec.series_per_study + 1:06d}",
            **dict.fromkeys(_DATE_KEYWORDS, study_date),
        }
        in_series = min(spec.files_per_series, spec.files - written)
        for number in range(in_series):
            values["sop"] = uid_for(spec.seed, "sop", written)
            values["instance"] = f"{number + 1:08d}"
            data = template.render(values)
            with open(folder / f"{number + 1:05d}.dcm", "wb") as handle:
                handle.write(data)
            written += 1
            total_bytes += len(data)
        by_kind[template.template.kind] = by_kind.get(template.template.kind, 0) + in_series
        if progress and (series + 1) % 200 == 0:
            print(f"  {written:,} / {spec.files:,} files", file=sys.stderr)

    manifest = {
        "generator": "scripts/make_corpus.py",
        "generator_version": GENERATOR_VERSION,
        "pydicom_version": pydicom.__version__,
        **spec.as_dict(),
        "series": spec.series,
        "studies": spec.studies,
        "patients": spec.patients,
        "files_by_template": dict(sorted(by_kind.items())),
        "templates": {t.kind: t.sample for t in TEMPLATES},
        "bytes": total_bytes,
        "dicom_folder": DICOM_SUBDIR,
        "seconds": round(time.perf_counter() - started, 3),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(out: str | os.PathLike) -> dict | None:
    path = Path(out) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="output folder (new or empty)")
    parser.add_argument("--files", type=int, default=1000, help="number of files (default 1000)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed: same seed, same bytes (default 0)"
    )
    parser.add_argument("--files-per-series", type=int, default=CorpusSpec.files_per_series)
    parser.add_argument("--series-per-study", type=int, default=CorpusSpec.series_per_study)
    parser.add_argument("--studies-per-patient", type=int, default=CorpusSpec.studies_per_patient)
    args = parser.parse_args(argv)
    spec = CorpusSpec(
        args.files,
        args.seed,
        args.files_per_series,
        args.series_per_study,
        args.studies_per_patient,
    )
    try:
        manifest = generate(args.out, spec, progress=True)
    except FileExistsError as exc:
        parser.error(str(exc))
    print(
        f"{manifest['files']:,} files ({manifest['bytes'] / 1e6:,.1f} MB) in {manifest['series']:,} series, "
        f"{manifest['studies']:,} studies, {manifest['patients']:,} patients under {args.out / DICOM_SUBDIR} "
        f"in {manifest['seconds']:.1f} s"
    )
    print(
        "files by template: "
        + ", ".join(f"{k} {v:,}" for k, v in manifest["files_by_template"].items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
