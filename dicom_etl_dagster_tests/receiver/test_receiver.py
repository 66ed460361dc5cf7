"""dicom-etl-receiver as users run it: a process listening on loopback, fed by pynetdicom's SCU
over real associations, stopped with real signals, its folder then ingested by the ETL.

The receiver is started with the console script when it is installed (CI's
``pip install -e ".[dev]"``) and with ``python -m dicom_etl_dagster.receiver`` otherwise.
The SCU sends files without decoding them (pynetdicom's chunked send), so what was sent is
exactly the bytes of the source file after its file meta.
"""

from __future__ import annotations

import hashlib
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pydicom
import pytest
import yaml
from pydicom import config as pydicom_config
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_etl_dagster.receiver import cli
from dicom_etl_dagster_tests.conftest import REPO_ROOT
from dicom_etl_dagster_tests.dicom_samples import PYDICOM_TEST_FILES, clone_instance, quiet_dcmread
from dicom_etl_dagster_tests.helpers import ledger, options, run_job

SCRIPT = Path(sys.executable).with_name("dicom-etl-receiver")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "dicom_etl_dagster.receiver"]
AE_TITLE = "ETL_RECEIVER"
CALLING_AE = "TEST_SCU"
#: One instance per encoding family the receiver must take without decoding.
SENT = {
    "CT_small.dcm": "Explicit VR Little Endian",
    "rtplan.dcm": "Implicit VR Little Endian",  # its file meta names another SOP UID than its data set
    "JPEG2000.dcm": "JPEG 2000 Image Compression",
    "SC_rgb_rle.dcm": "RLE Lossless",
    "SC_rgb_dcmtk_+eb+cr.dcm": "JPEG Baseline (Process 1)",  # same series as SC_rgb_rle
    "image_dfl.dcm": "Deflated Explicit VR Little Endian",
}
SUCCESS = 0x0000


@dataclass
class Receiver:
    process: subprocess.Popen
    port: int
    folder: Path
    log: Path

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=timeout)

    def log_text(self) -> str:
        return self.log.read_text()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _scu(*sop_classes_and_syntaxes: tuple[str, str]) -> AE:
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(Verification)
    for sop_class, syntax in sop_classes_and_syntaxes:
        ae.add_requested_context(sop_class, syntax)
    return ae


def _contexts(files: list[Path]) -> list[tuple[str, str]]:
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return sorted({(h.SOPClassUID, h.file_meta.TransferSyntaxUID) for h in headers})


def send(port: int, files: list[Path]) -> list[pydicom.Dataset]:
    """C-STORE each file over one association; the response status data sets."""
    ae = _scu(*_contexts(files))
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        return [assoc.send_c_store(f) for f in files]
    finally:
        assoc.release()


def echo(port: int) -> int | None:
    assoc = _scu().associate("127.0.0.1", port, ae_title=AE_TITLE)
    if not assoc.is_established:
        return None
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


@pytest.fixture(autouse=True)
def _send_files_as_they_are(monkeypatch):
    """The SCU sends a file's bytes after its file meta instead of decoding and re-encoding."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture
def receiver(tmp_path):
    folder, log = tmp_path / "received", tmp_path / "receiver.log"
    port = _free_port()
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [*COMMAND, "--port", str(port), "--ae-title", AE_TITLE, "--folder", str(folder)]
            + ["--host", "127.0.0.1"],
            cwd=REPO_ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    running = Receiver(process, port, folder, log)
    deadline = time.monotonic() + 30
    while echo(port) != SUCCESS:
        assert process.poll() is None, f"the receiver exited: {running.log_text()}"
        assert time.monotonic() < deadline, f"the receiver did not answer: {running.log_text()}"
        time.sleep(0.2)
    yield running
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def sample(name: str) -> Path:
    return PYDICOM_TEST_FILES / name


def expected_path(folder: Path, source: Path) -> Path:
    """Where a source file must land, from the UIDs of its data set (read with pydicom)."""
    ds = quiet_dcmread(source)
    return folder / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def data_set_bytes(path: Path) -> bytes:
    """A file's bytes after its preamble and file meta: the data set as encoded."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def stored_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def hostile_copy(tmp_path: Path, keyword: str, uid: str) -> Path:
    target = tmp_path / "outgoing" / f"{keyword}.dcm"
    with pydicom_config.disable_value_validation():
        ds = clone_instance(sample("CT_small.dcm"), target, **{keyword: uid})
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = uid  # what the request carries
            ds.save_as(target, enforce_file_format=True)
    return target


# --------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------
def test_the_console_script_is_declared_for_the_cli_entry_point():
    toml = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = toml.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dicom-etl-receiver"] == "dicom_etl_dagster.receiver.cli:main"
    assert callable(cli.main)


def test_the_module_runs_as_a_program_and_documents_its_contract_options():
    completed = subprocess.run(
        [sys.executable, "-m", "dicom_etl_dagster.receiver", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    for option in ("--port", "--ae-title", "--folder"):
        assert option in completed.stdout


def test_an_ae_title_pynetdicom_cannot_use_is_a_one_line_error(tmp_path):
    completed = subprocess.run(
        [*COMMAND, "--ae-title", "A" * 17, "--folder", str(tmp_path / "received")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "invalid --ae-title" in completed.stderr
    assert "Traceback" not in completed.stderr


# --------------------------------------------------------------------------
# Over the network
# --------------------------------------------------------------------------
def test_c_echo_succeeds_and_the_association_is_logged(receiver):
    assert echo(receiver.port) == SUCCESS
    assert receiver.stop() == 0
    log = receiver.log_text()
    assert f"receiving as AE '{AE_TITLE}' on 127.0.0.1:{receiver.port}" in log
    assert f"association from AE '{CALLING_AE}' at 127.0.0.1:" in log
    assert "released after" in log and "1 echo(es)" in log


def test_every_encoding_is_stored_under_its_uids_as_sent(receiver):
    files = [sample(name) for name in SENT]
    statuses = send(receiver.port, files)
    assert [s.Status for s in statuses] == [SUCCESS] * len(files)

    expected = {expected_path(receiver.folder, f): f for f in files}
    assert stored_files(receiver.folder) == sorted(expected)  # nothing else, no part left
    for stored, source in expected.items():
        assert data_set_bytes(stored) == data_set_bytes(source), source.name
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID.name == SENT[source.name]
        assert meta.MediaStorageSOPClassUID == quiet_dcmread(source).SOPClassUID
        received, sent = quiet_dcmread(stored), quiet_dcmread(source)
        received.file_meta = sent.file_meta = pydicom.dataset.FileMetaDataset()
        assert received == sent, source.name


def test_the_log_counts_instances_and_holds_no_patient_data_or_uids(receiver):
    files = [sample("CT_small.dcm"), sample("JPEG2000.dcm")]
    send(receiver.port, files)
    send(receiver.port, files[:1])
    assert receiver.stop() == 0
    log = receiver.log_text()
    assert "2 stored, 0 already present" in log
    assert "0 stored, 1 already present" in log
    for source in files:
        ds = quiet_dcmread(source)
        for secret in (str(ds.PatientName), ds.PatientID, ds.StudyInstanceUID, ds.SOPInstanceUID):
            assert secret and secret not in log


def test_sending_the_same_instance_again_leaves_one_untouched_file(receiver):
    source = sample("CT_small.dcm")
    send(receiver.port, [source])
    target = expected_path(receiver.folder, source)
    before = target.stat()
    assert [s.Status for s in send(receiver.port, [source, source])] == [SUCCESS, SUCCESS]
    after = target.stat()
    assert stored_files(receiver.folder) == [target]
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_different_instance_with_the_same_sop_uid_does_not_overwrite_the_first(
    receiver, tmp_path
):
    source = sample("CT_small.dcm")
    corrected = tmp_path / "outgoing" / "corrected.dcm"
    clone_instance(source, corrected, new_uids=False, StudyDescription="corrected header")
    statuses = send(receiver.port, [source, corrected, corrected])
    assert [s.Status for s in statuses] == [SUCCESS] * 3

    first = expected_path(receiver.folder, source)
    (beside,) = [p for p in stored_files(receiver.folder) if p != first]
    assert data_set_bytes(first) == data_set_bytes(source)
    assert data_set_bytes(beside) == data_set_bytes(corrected)
    digest = hashlib.sha256(beside.read_bytes()).hexdigest()[:8]
    assert beside.name == f"{quiet_dcmread(source).SOPInstanceUID}.{digest}.dcm"
    assert receiver.stop() == 0
    assert "WARNING" in receiver.log_text()
    assert f"both kept, the new one named <SOPInstanceUID>.{digest}.dcm" in receiver.log_text()


@pytest.mark.parametrize(
    "keyword, uid",
    [
        ("StudyInstanceUID", "../../escaped"),
        ("SeriesInstanceUID", ".."),
        ("SOPInstanceUID", "../../../escaped"),
    ],
)
def test_a_hostile_uid_is_refused_and_nothing_escapes_the_folder(receiver, tmp_path, keyword, uid):
    hostile = hostile_copy(tmp_path, keyword, uid)
    before = sorted(p for p in tmp_path.parent.rglob("*") if "escaped" in p.name)
    refused, after_it = send(receiver.port, [hostile, sample("CT_small.dcm")])
    assert 0xC000 <= refused.Status <= 0xCFFF
    assert refused.ErrorComment == f"{keyword} is not a valid UID"
    assert after_it.Status == SUCCESS  # the association and the receiver carry on
    assert stored_files(receiver.folder) == [expected_path(receiver.folder, sample("CT_small.dcm"))]
    assert sorted(p for p in tmp_path.parent.rglob("*") if "escaped" in p.name) == before
    assert receiver.stop() == 0
    log = receiver.log_text()
    assert re.search(
        f"WARNING .* refused an instance from AE '{CALLING_AE}' at 127.0.0.1:[0-9]+: "
        f"{keyword} is not a valid UID",
        log,
    )
    assert "escaped" not in log  # the value itself is never echoed


def test_a_write_that_fails_answers_out_of_resources_and_the_sender_can_send_again(receiver):
    staging = receiver.folder / ".receiving"
    staging.rmdir()
    staging.write_bytes(b"")  # a file where the staging folder should be: every write fails
    source = sample("CT_small.dcm")
    (failed,) = send(receiver.port, [source])
    assert failed.Status == 0xA700
    assert failed.ErrorComment == "the instance could not be written"
    assert stored_files(receiver.folder) == [staging]
    staging.unlink()
    staging.mkdir()  # the disk is fixed: the same instance sent again is stored
    assert [s.Status for s in send(receiver.port, [source])] == [SUCCESS]
    assert stored_files(receiver.folder) == [expected_path(receiver.folder, source)]
    assert receiver.stop() == 0
    log = receiver.log_text()
    assert re.search(
        "ERROR .* could not write an instance from AE 'TEST_SCU' at .*: Not a directory", log
    )
    assert quiet_dcmread(source).SOPInstanceUID not in log  # the path is not in the message


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_with_an_association_open_exits_0_within_seconds(receiver, signum):
    assoc = _scu().associate("127.0.0.1", receiver.port, ae_title=AE_TITLE)
    assert assoc.is_established
    started = time.monotonic()
    assert receiver.stop(signum) == 0
    assert time.monotonic() - started < 5
    assert not assoc.is_established  # the receiver aborted it rather than wait for the peer
    staging = receiver.folder / ".receiving"
    assert list(staging.iterdir()) == []
    log = receiver.log_text()
    assert f"{signal.Signals(signum).name} received: stopping" in log and "stopped" in log
    assert "Traceback" not in log
    assoc.abort()


# --------------------------------------------------------------------------
# What arrives is what the ETL ingests
# --------------------------------------------------------------------------
def test_the_received_folder_is_ingested_one_ledger_row_per_stored_file(
    receiver, tmp_path, database_url
):
    files = [sample(name) for name in SENT]
    corrected = tmp_path / "outgoing" / "corrected.dcm"
    clone_instance(files[0], corrected, new_uids=False, StudyDescription="corrected header")
    send(receiver.port, [*files, corrected])
    assert receiver.stop() == 0
    stored = stored_files(receiver.folder)
    assert len(stored) == len(files) + 1

    assert run_job("load_vocab", database_url, options()).success
    result = run_job(
        "ingest_metadata",
        database_url,
        options(dicom_files_abs_path=str(receiver.folder), parse_workers=1),
    )
    assert result.success
    with psycopg.connect(database_url) as conn:
        rows = ledger(conn)
    assert sorted(rows) == [str(p) for p in stored]  # one row per stored file, no other
    first = expected_path(receiver.folder, files[0])
    same_sop = [str(p) for p in first.parent.iterdir()]
    dfl = str(expected_path(receiver.folder, sample("image_dfl.dcm")))
    # The corrected header kept beside the first shares its SOP Instance UID: one of the
    # two is ingested, the other recorded as its duplicate (the ledger shows both).
    assert sorted(rows[p][0] for p in same_sop) == ["duplicate", "ingested"]
    # pydicom's deflated sample carries no date at all: the ETL's own rule, not the receiver's.
    status, reason = rows[dfl][:2]
    assert status == "failed" and "no usable date" in reason
    valid = set(rows) - {*same_sop, dfl}
    assert len(valid) == len(files) - 2
    for path in valid:
        assert rows[path][0] == "ingested", rows[path]
        assert rows[path][2] == quiet_dcmread(path).SOPInstanceUID


# --------------------------------------------------------------------------
# The deployment guide
# --------------------------------------------------------------------------
def _guide_yaml_documents() -> list[dict]:
    text = (REPO_ROOT / "deploy" / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def test_the_guide_runs_the_receiver_on_the_share_the_sensor_watches():
    documents = _guide_yaml_documents()
    (deployment,) = [d for d in documents if d.get("kind") == "Deployment"]
    (service,) = [d for d in documents if d.get("kind") == "Service"]
    (values,) = [d for d in documents if "dagster-user-deployments" in d]
    (location,) = values["dagster-user-deployments"]["deployments"]

    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["args"][0] == "dicom-etl-receiver"
    args = cli.parse_args(container["args"][1:])  # the CLI accepts them as written
    (mount,) = container["volumeMounts"]
    (volume,) = spec["volumes"]
    assert (
        volume["persistentVolumeClaim"]["claimName"]
        == (location["volumes"][0]["persistentVolumeClaim"]["claimName"])
    )
    watched = Path(location["env"]["DICOM_ETL_FILES_DIR"])
    assert mount["mountPath"] == location["volumeMounts"][0]["mountPath"] == str(watched)
    assert watched in args.folder.parents  # what it writes is under the watched folder
    assert not mount.get("readOnly")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    (port,) = service["spec"]["ports"]
    assert port["port"] == args.port == container["ports"][0]["containerPort"]
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
