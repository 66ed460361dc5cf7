"""Locate, download and read the DICOM2OMOP vocabulary files.

The project never ships the CSVs: it keeps their manifest (pinned upstream commit + sha256)
and fetches a missing file with pooch, which verifies the hash. A file that is present but
does not match its hash is refused rather than silently loaded.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.core.errors import DicomEtlError

UPSTREAM_REPOSITORY = "paulnagy/DICOM2OMOP"
UPSTREAM_COMMIT = "56be2b80c9ba2c9b8f19dc36a8ab5919aed6fb88"
#: What gets recorded as the vocabulary version (vocabulary.vocabulary_version, asset metadata).
SOURCE_VERSION = f"DICOM2OMOP@{UPSTREAM_COMMIT[:12]}"

#: Base URL of a mirror holding the upstream layout at the pinned commit (firewalled sites).
UPSTREAM_BASE_URL = f"https://raw.githubusercontent.com/{UPSTREAM_REPOSITORY}/{UPSTREAM_COMMIT}/"
DEFAULT_VOCAB_DIR = Path(__file__).resolve().parents[3] / "external"


@dataclass(frozen=True)
class VocabularyFile:
    name: str
    upstream_path: str
    sha256: str

    @property
    def url(self) -> str:
        base = settings.VOCAB_MIRROR_URL.value() or UPSTREAM_BASE_URL
        return base.rstrip("/") + "/" + quote(self.upstream_path)


CONCEPTS = VocabularyFile(
    "omop_table_staging_v5.csv",
    "files/OMOP CDM Staging/omop_table_staging_v5.csv",
    "8af64b77442537969012c62cb1a1499a85d4e6aa21b3edeb886d74fd8cdb1339",
)
MAPS_TO = VocabularyFile(
    "cs_values_maps_to.csv",
    "files/OMOP CDM Staging/cs_values_maps_to.csv",
    "d65049508a7e371fd49fc90fbb547620ca75275fa1b628d606b682cee9c52909",
)
MAPS_TO_VALUE = VocabularyFile(
    "cs_values_maps_to_value.csv",
    "files/OMOP CDM Staging/cs_values_maps_to_value.csv",
    "569b62fcfa74951d502f0d19c09e103e0cfffaacb45f7661ca9d08d06e63f425",
)
DATA_ELEMENTS = VocabularyFile(
    "part6_attributes.csv",
    "files/DICOM Standard/part6_attributes.csv",
    "9eeda49899b050a6e9f2ce89e7dd63414b32c4ac1024692d3ffbe0b2bcf6dbbe",
)
MANIFEST = (CONCEPTS, MAPS_TO, MAPS_TO_VALUE, DATA_ELEMENTS)

# Upstream keywords and names carry zero-width characters between words (U+200B etc.).
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))


class VocabularyFileError(DicomEtlError):
    """A vocabulary file is missing, unreachable or corrupt; the message says how to fix it."""


def vocab_dir() -> Path:
    configured = settings.VOCAB_DIR.value()
    return Path(configured).expanduser() if configured else DEFAULT_VOCAB_DIR


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_file(spec: VocabularyFile, folder: Path | None = None) -> Path:
    """Return the verified local path of ``spec``, downloading it into ``folder`` if missing."""
    folder = folder or vocab_dir()
    path = folder / spec.name
    if path.is_file():
        actual = _sha256(path)
        if actual != spec.sha256:
            raise VocabularyFileError(
                f"vocabulary file {path} has sha256 {actual}, expected {spec.sha256} "
                f"({SOURCE_VERSION}); replace it with the pinned file from {spec.url}"
            )
        return path
    try:
        import pooch

        folder.mkdir(parents=True, exist_ok=True)
        fetched = pooch.retrieve(
            spec.url,
            known_hash=f"sha256:{spec.sha256}",
            fname=spec.name,
            path=folder,
            progressbar=False,
        )
    except Exception as exc:  # network down, folder read-only, hash mismatch: all end the same way
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise missing_files_error(folder, spec, reason) from None
    return Path(fetched)


def missing_files_error(folder: Path, failed: VocabularyFile, reason: str) -> VocabularyFileError:
    """One error naming every manifest file absent from ``folder``, not only the one that failed.

    Offline, the other files would fail the same way one run later each; the download of the
    others is not tried (they come from the same place, and each try can take a timeout).
    """
    missing = [s for s in MANIFEST if s == failed or not (folder / s.name).is_file()]
    names = ", ".join(s.name for s in missing)
    where = folder.absolute()
    noun, them = ("file", "it") if len(missing) == 1 else ("files", "them")
    verb = "is" if len(missing) == 1 else "are"
    return VocabularyFileError(
        f"vocabulary {noun} {names} {verb} missing from {where} and could not be downloaded "
        f"({failed.name} from {failed.url}: {reason}). Provide {them} either by setting "
        f"{settings.VOCAB_DIR.name} to a folder that holds {them} (an absolute path), or by "
        f"copying {them} into {where}; the README lists the files and their sha256."
    )


def clean_text(value: str) -> str:
    return value.translate(_ZERO_WIDTH).strip()


def read_rows(spec: VocabularyFile, folder: Path | None = None) -> list[dict[str, str]]:
    """Rows of a verified vocabulary CSV, with zero-width characters removed from every value."""
    with ensure_file(spec, folder).open(newline="", encoding="utf-8-sig") as handle:
        return [
            {key: clean_text(value or "") for key, value in row.items()}
            for row in csv.DictReader(handle)
        ]
