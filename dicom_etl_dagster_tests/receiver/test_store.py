"""The receiver's filing rules, on a real folder without the network: where an instance goes,
that it is written whole and never over a different instance, and that no UID leads out."""

from __future__ import annotations

import hashlib
import os
import threading
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from pydicom.uid import generate_uid

from dicom_etl_dagster.receiver.store import (
    InstanceStore,
    Outcome,
    ReceiverClosing,
    RefusedInstance,
    is_safe_uid,
)
from dicom_etl_dagster_tests.dicom_samples import PYDICOM_TEST_FILES, quiet_dcmread

CT_SMALL = PYDICOM_TEST_FILES / "CT_small.dcm"
# pydicom warns when it reads the hostile values these tests write on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

HOSTILE_UIDS = [
    "../../etc",
    "..",
    ".",
    "",
    "/etc",
    "1..2",
    ".1.2",
    "1.2.",
    "1.2/3",
    "1.2\\3",
    "1.2 3",
    "1.2\n",
    "\u0661.\u0662",  # Arabic-Indic digits: digits to Unicode, not to PS3.5
    "1" * 65,
]


def encoded(ds: pydicom.Dataset) -> bytes:
    """``ds`` as a PS3.10 file in memory (preamble, file meta, data set), as the SCP gets it."""
    buffer = BytesIO()
    with pydicom_config.disable_value_validation():  # hostile values are the point here
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def instance(**attributes) -> pydicom.Dataset:
    """CT_small with fresh UIDs and ``attributes`` set."""
    ds = quiet_dcmread(CT_SMALL)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    with pydicom_config.disable_value_validation():
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
    return ds


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path) -> InstanceStore:
    return InstanceStore.open(tmp_path / "received")


# --------------------------------------------------------------------------
# UIDs as path parts
# --------------------------------------------------------------------------
@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "2.25.1234567890", "0", "1." + "2" * 62])
def test_a_uid_of_digits_and_single_dots_up_to_64_characters_is_a_safe_name(uid):
    assert is_safe_uid(uid)


@pytest.mark.parametrize("uid", HOSTILE_UIDS)
def test_anything_else_is_not(uid):
    assert not is_safe_uid(uid)


@given(st.text(alphabet="0123456789./\\\u0661 ", max_size=70))
def test_a_safe_uid_is_always_exactly_one_folder_below_the_root(text):
    root = Path("/srv/received")
    if is_safe_uid(text):
        assert Path(os.path.normpath(root / text)).parent == root


# --------------------------------------------------------------------------
# Filing
# --------------------------------------------------------------------------
def test_an_instance_is_stored_under_its_uids_exactly_as_received(store):
    ds = instance()
    data = encoded(ds)
    filed = store.store(data)
    expected = store.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert (filed.outcome, filed.path) == (Outcome.STORED, expected)
    assert expected.read_bytes() == data
    assert files_under(store.root) == [expected]  # and no part left in .receiving


def test_the_same_bytes_again_are_acknowledged_and_nothing_is_written(store):
    data = encoded(instance())
    first = store.store(data)
    before = first.path.stat()
    again = store.store(data)
    assert (again.outcome, again.path) == (Outcome.ALREADY_PRESENT, first.path)
    after = first.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert files_under(store.root) == [first.path]


def test_a_different_instance_with_the_same_sop_uid_is_kept_beside_never_over(store):
    ds = instance()
    original = encoded(ds)
    ds.StudyDescription = "corrected after the first send"
    corrected = encoded(ds)
    first = store.store(original)
    beside = store.store(corrected)
    digest = hashlib.sha256(corrected).hexdigest()[:8]
    assert beside.outcome is Outcome.STORED_BESIDE
    assert beside.path == first.path.with_name(f"{ds.SOPInstanceUID}.{digest}.dcm")
    assert beside.suffix == f".{digest}.dcm"
    assert first.path.read_bytes() == original
    assert beside.path.read_bytes() == corrected
    # Either version sent again finds itself and changes nothing.
    assert store.store(corrected).outcome is Outcome.ALREADY_PRESENT
    assert store.store(original).outcome is Outcome.ALREADY_PRESENT
    assert files_under(store.root) == sorted([first.path, beside.path])


def test_many_threads_sending_the_same_instance_leave_one_file(store):
    data = encoded(instance())
    outcomes: list[Outcome] = []
    threads = [
        threading.Thread(target=lambda: outcomes.append(store.store(data).outcome))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o.value for o in outcomes) == ["already present"] * 7 + ["stored"]
    assert len(files_under(store.root)) == 1


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
@pytest.mark.parametrize("uid", ["../../escaped", "..", "1.2/../../escaped"])
def test_a_hostile_uid_is_refused_and_nothing_is_written_anywhere(tmp_path, store, keyword, uid):
    with pytest.raises(RefusedInstance, match=f"^{keyword} is not a valid UID$"):
        store.store(encoded(instance(**{keyword: uid})))
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_an_instance_without_one_of_the_uids_is_refused(store, keyword):
    ds = instance()
    delattr(ds, keyword)
    with pytest.raises(RefusedInstance, match=f"^{keyword} is missing$"):
        store.store(encoded(ds))
    assert files_under(store.root) == []


def test_bytes_that_are_no_dicom_file_are_refused(store):
    with pytest.raises(RefusedInstance, match="^the data set cannot be decoded$"):
        store.store(b"no preamble, no DICM prefix, no file meta")
    assert files_under(store.root) == []


def test_a_data_set_cut_short_before_its_uids_is_refused(store):
    data = encoded(instance())
    with pytest.raises(RefusedInstance, match="^StudyInstanceUID is missing$"):
        store.store(data[: data.index(b"DICM") + 300])  # the file meta and a few elements
    assert files_under(store.root) == []


def test_a_symlink_under_the_folder_cannot_lead_a_write_outside(tmp_path, store):
    ds = instance()
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / ds.StudyInstanceUID).symlink_to(outside, target_is_directory=True)
    with pytest.raises(RefusedInstance, match="leads outside"):
        store.store(encoded(ds))
    assert list(outside.iterdir()) == []


# --------------------------------------------------------------------------
# Parts and stopping
# --------------------------------------------------------------------------
def test_parts_a_killed_receiver_left_are_removed_when_it_starts_again(tmp_path):
    staging = tmp_path / "received" / ".receiving"
    staging.mkdir(parents=True)
    (staging / ".0123456789abcdef.part").write_bytes(b"half an instance")
    (staging / "not-a-part.txt").write_bytes(b"left alone")
    store = InstanceStore.open(tmp_path / "received")
    assert store.removed_parts == 1
    assert [p.name for p in staging.iterdir()] == ["not-a-part.txt"]


class _HeldStore(InstanceStore):
    """A store whose next write waits until the test lets it go on (real write afterwards)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writing, self.go_on = threading.Event(), threading.Event()

    def _write_part(self, encoded: bytes) -> Path:
        self.writing.set()
        assert self.go_on.wait(10)
        return super()._write_part(encoded)


def test_close_refuses_new_instances_and_waits_for_the_write_in_progress(tmp_path):
    store = _HeldStore(tmp_path / "received")
    store.staging.mkdir(parents=True)
    in_progress, later = encoded(instance()), encoded(instance())
    results: list[Outcome] = []
    writer = threading.Thread(target=lambda: results.append(store.store(in_progress).outcome))
    writer.start()
    assert store.writing.wait(10)
    assert store.close(timeout=0.2) is False  # the write is still held
    with pytest.raises(ReceiverClosing):
        store.store(later)
    store.go_on.set()
    assert store.close(timeout=10) is True
    writer.join()
    assert results == [Outcome.STORED]
    assert len(files_under(store.root)) == 1
