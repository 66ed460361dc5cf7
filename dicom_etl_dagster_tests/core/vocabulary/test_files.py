"""Locating, downloading (from a local mirror) and verifying the DICOM2OMOP files."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading

import pytest

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.core.vocabulary import files


@pytest.fixture
def mirror(tmp_path, vocab_dir):
    """A loopback HTTP server laid out like the upstream repository at the pinned commit."""
    root = tmp_path / "mirror"
    for spec in files.MANIFEST:
        target = root / spec.upstream_path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(vocab_dir / spec.name, target)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_missing_file_is_downloaded_and_verified(tmp_path, monkeypatch, mirror):
    _, url = mirror
    monkeypatch.setenv(settings.VOCAB_MIRROR_URL.name, url)
    target = tmp_path / "vocab"
    rows = files.read_rows(files.DATA_ELEMENTS, target)
    assert len(rows) == 5190
    assert (target / files.DATA_ELEMENTS.name).is_file()
    assert all("\u200b" not in r["Keyword"] for r in rows)
    assert rows[0]["Keyword"] == "LengthToEnd"


def test_download_with_wrong_content_is_refused(tmp_path, monkeypatch, mirror):
    root, url = mirror
    (root / files.MAPS_TO.upstream_path).write_text(
        "concept_id_1,concept_id_2,relationship_id\n1,2,Maps to\n"
    )
    monkeypatch.setenv(settings.VOCAB_MIRROR_URL.name, url)
    target = tmp_path / "vocab"
    with pytest.raises(files.VocabularyFileError) as error:
        files.ensure_file(files.MAPS_TO, target)
    assert not (target / files.MAPS_TO.name).exists()
    assert files.MAPS_TO.name in str(error.value)


def test_offline_error_names_the_file_and_both_remedies(tmp_path, monkeypatch, vocab_dir):
    monkeypatch.setenv(
        settings.VOCAB_MIRROR_URL.name, "http://127.0.0.1:9/"
    )  # discard port: refused at once
    for spec in (files.MAPS_TO, files.MAPS_TO_VALUE, files.DATA_ELEMENTS):
        shutil.copy(vocab_dir / spec.name, tmp_path / spec.name)
    with pytest.raises(files.VocabularyFileError) as error:
        files.ensure_file(files.CONCEPTS, tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert "vocabulary file omop_table_staging_v5.csv is missing from" in message
    assert settings.VOCAB_DIR.name in message and f"copying it into {tmp_path}" in message


def test_offline_error_names_every_missing_file_at_once(tmp_path, monkeypatch, vocab_dir):
    """Offline, one failed run names all the files to provide, not one file per run."""
    monkeypatch.setenv(settings.VOCAB_MIRROR_URL.name, "http://127.0.0.1:9/")
    shutil.copy(vocab_dir / files.CONCEPTS.name, tmp_path / files.CONCEPTS.name)
    with pytest.raises(files.VocabularyFileError) as error:
        files.read_rows(files.MAPS_TO, tmp_path)
    message = str(error.value)
    assert "\n" not in message
    missing = [files.MAPS_TO, files.MAPS_TO_VALUE, files.DATA_ELEMENTS]
    names = ", ".join(spec.name for spec in missing)
    assert f"vocabulary files {names} are missing from {tmp_path}" in message
    assert files.CONCEPTS.name not in message  # present: not asked for
    assert f"copying them into {tmp_path}" in message
    # Nothing half-downloaded is left behind that a later run could mistake for a file.
    assert sorted(p.name for p in tmp_path.iterdir()) == [files.CONCEPTS.name]


def test_offline_error_shows_a_relative_folder_as_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv(settings.VOCAB_MIRROR_URL.name, "http://127.0.0.1:9/")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(settings.VOCAB_DIR.name, "relative/vocab")
    with pytest.raises(files.VocabularyFileError) as error:
        files.read_rows(files.CONCEPTS)
    assert f"missing from {tmp_path / 'relative' / 'vocab'} " in str(error.value)


def test_present_but_modified_file_is_refused(tmp_path, vocab_dir):
    shutil.copy(vocab_dir / files.CONCEPTS.name, tmp_path / files.CONCEPTS.name)
    with (tmp_path / files.CONCEPTS.name).open("a") as handle:
        handle.write("2128999999,extra,Measurement,DICOM,DICOM Value Sets,,X,19930101,20991231,\n")
    with pytest.raises(files.VocabularyFileError, match="expected 8af64b77"):
        files.read_rows(files.CONCEPTS, tmp_path)
