"""The DICOM server resource and its clients, against a real Orthanc (and a tiny stub for 5xx)."""

from __future__ import annotations

import http.server
import json
import threading
import time

import dagster as dg
import pytest
import requests

from dicom_etl_dagster.core import settings
from dicom_etl_dagster.core.upload.uploader import (
    FileRejectedError,
    ServerRejectedError,
    ServerUnavailableError,
)
from dicom_etl_dagster.resources.dicom_server import (
    DicomServerConfigError,
    DicomServerResource,
    split_credentials,
)
from dicom_etl_dagster_tests.orthanc import (
    ORTHANC_PASSWORD,
    ORTHANC_USER,
    free_port,
    pydicom_test_file,
    start_orthanc,
)

CT = pydicom_test_file("CT_small.dcm")
CT_SOP = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
FAST = dict(retries=2, backoff_seconds=0.01, connect_timeout_seconds=2.0, read_timeout_seconds=10.0)


def test_orthanc_upload_returns_instance_id_and_stored_file_name(orthanc):
    with DicomServerResource(url=orthanc.url, **FAST).client() as client:
        first = client.upload(str(CT), CT_SOP)
        again = client.upload(str(CT), CT_SOP)

    assert orthanc.sop_instance_uids() == [CT_SOP]
    (instance,) = orthanc.instances()
    assert first.instance_id == again.instance_id == instance["ID"]
    info = orthanc.get(f"/instances/{instance['ID']}/attachments/dicom/info")
    assert first.uploaded_filename == again.uploaded_filename == f"{info['Uuid']}.dcm"
    assert (first.already_present, again.already_present) == (False, True)
    assert first.bytes_sent == CT.stat().st_size


def test_dicomweb_upload_is_stow_rs(orthanc):
    resource = DicomServerResource(kind="dicomweb", dicomweb_url=orthanc.dicomweb_url + "/", **FAST)
    with resource.client() as client:
        assert (
            client.server_url == orthanc.dicomweb_url
        )  # trailing slash dropped: one identity per server
        stored = client.upload(str(CT), CT_SOP)

    assert orthanc.sop_instance_uids() == [CT_SOP]
    assert stored.instance_id == CT_SOP
    assert stored.uploaded_filename.startswith(f"{orthanc.dicomweb_url}/studies/")
    assert stored.uploaded_filename.endswith(f"/instances/{CT_SOP}")
    assert requests.get(stored.uploaded_filename + "/metadata", timeout=10).status_code == 200


@pytest.mark.parametrize("kind", ["orthanc", "dicomweb"])
def test_rejected_file_is_a_clear_error_naming_the_file(kind, orthanc, tmp_path):
    bad = tmp_path / "not-really.dcm"
    bad.write_bytes(b"DICM but not really" * 10)
    resource = DicomServerResource(
        kind=kind, url=orthanc.url, dicomweb_url=orthanc.dicomweb_url, **FAST
    )
    with resource.client() as client, pytest.raises(ServerRejectedError) as raised:
        client.upload(str(bad), "1.2.3")
    message = str(raised.value)
    assert str(bad) in message and "HTTP 400" in message
    # The server's own reason, as file_upload_rejection records it.
    assert raised.value.http_status == 400
    assert (
        raised.value.reason
        == {
            "orthanc": "Bad file format: Cannot parse an invalid DICOM file (size: 190 bytes)",
            "dicomweb": "STOW-RS failed SOP instance (no reason given)",
        }[kind]
    )
    assert orthanc.instances() == []


@pytest.mark.parametrize("kind", ["orthanc", "dicomweb"])
def test_unreachable_server_fails_after_retries(kind):
    url = f"http://127.0.0.1:{free_port()}"
    resource = DicomServerResource(kind=kind, url=url, dicomweb_url=url + "/dicom-web", **FAST)
    started = time.monotonic()
    with resource.client() as client, pytest.raises(ServerUnavailableError) as raised:
        client.upload(str(CT), CT_SOP)
    message = str(raised.value)
    assert "connection refused" in message and "3 attempts" in message and str(CT) in message
    assert time.monotonic() - started >= 0.01 + 0.02  # backed off between attempts


def test_missing_file_is_a_file_error(orthanc, tmp_path):
    with (
        DicomServerResource(url=orthanc.url, **FAST).client() as client,
        pytest.raises(FileRejectedError) as raised,
    ):
        client.upload(str(tmp_path / "gone.dcm"), "1.2.3")
    assert "gone.dcm" in str(raised.value) and "cannot read file" in str(raised.value)


class _Stub(http.server.BaseHTTPRequestHandler):
    """An Orthanc-shaped stub that answers POST /instances with a scripted list of statuses."""

    #: A status (Orthanc-shaped answer) or (status, JSON body) per request; then 200 Success.
    script: list[int | tuple[int, dict]] = []
    requests_seen: list[str] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).requests_seen.append(self.path)
        status = type(self).script.pop(0) if type(self).script else 200
        if isinstance(status, tuple):
            self._answer(*status)
        elif status == 200:
            self._answer(200, {"ID": "abc", "Status": "Success"})
        else:
            self._answer(status, {"Message": "scripted", "Details": f"status {status}"})

    def do_GET(self):
        self._answer(200, {"Uuid": "0000-uuid"})


@pytest.fixture
def stub_server():
    _Stub.script, _Stub.requests_seen = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_5xx_is_retried_with_backoff(stub_server):
    _Stub.script = [503, 502]
    with DicomServerResource(url=stub_server, **FAST).client() as client:
        stored = client.upload(str(CT), CT_SOP)
    assert _Stub.requests_seen == ["/instances"] * 3
    assert (stored.instance_id, stored.uploaded_filename) == ("abc", "0000-uuid.dcm")


def test_5xx_that_persists_is_unavailable(stub_server):
    _Stub.script = [500, 500, 500]
    with (
        DicomServerResource(url=stub_server, **FAST).client() as client,
        pytest.raises(ServerUnavailableError) as raised,
    ):
        client.upload(str(CT), CT_SOP)
    assert "HTTP 500" in str(raised.value) and str(CT) in str(raised.value)


def test_4xx_is_not_retried(stub_server):
    _Stub.script = [413]
    with (
        DicomServerResource(url=stub_server, **FAST).client() as client,
        pytest.raises(ServerRejectedError) as raised,
    ):
        client.upload(str(CT), CT_SOP)
    assert _Stub.requests_seen == ["/instances"]
    assert "HTTP 413" in str(raised.value) and str(CT) in str(raised.value)
    assert (raised.value.http_status, raised.value.reason) == (413, "scripted: status 413")


@pytest.mark.parametrize("status", [408, 429])
def test_timeout_and_rate_limit_answers_are_retried_not_recorded_as_refusals(stub_server, status):
    _Stub.script = [status]
    with DicomServerResource(url=stub_server, **FAST).client() as client:
        assert client.upload(str(CT), CT_SOP).instance_id == "abc"
    assert _Stub.requests_seen == ["/instances"] * 2
    _Stub.script = [status] * 3
    with (
        DicomServerResource(url=stub_server, **FAST).client() as client,
        pytest.raises(ServerUnavailableError) as raised,
    ):
        client.upload(str(CT), CT_SOP)
    assert f"HTTP {status}" in str(raised.value)


def test_an_orthanc_status_other_than_success_is_a_refusal(stub_server):
    _Stub.script = [(200, {"ID": "abc", "Status": "FilteredOut"})]
    with (
        DicomServerResource(url=stub_server, **FAST).client() as client,
        pytest.raises(ServerRejectedError) as raised,
    ):
        client.upload(str(CT), CT_SOP)
    assert (raised.value.http_status, raised.value.reason) == (200, "Orthanc status FilteredOut")
    _Stub.script = [(200, {"Answer": "not Orthanc"})]
    with (
        DicomServerResource(url=stub_server, **FAST).client() as client,
        pytest.raises(ServerUnavailableError, match="is it Orthanc"),
    ):
        client.upload(str(CT), CT_SOP)


def _stow_answer(reason: int) -> dict:
    failed = {
        "00081155": {"vr": "UI", "Value": [CT_SOP]},
        "00081197": {"vr": "US", "Value": [reason]},
    }
    return {"00081198": {"vr": "SQ", "Value": [failed]}}


@pytest.mark.parametrize("status", [200, 202, 409])
def test_stow_failed_sop_sequence_is_a_refusal_with_its_failure_reason(stub_server, status):
    _Stub.script = [(status, _stow_answer(0xC000))]
    resource = DicomServerResource(kind="dicomweb", dicomweb_url=stub_server, **FAST)
    with resource.client() as client, pytest.raises(ServerRejectedError) as raised:
        client.upload(str(CT), CT_SOP)
    assert raised.value.http_status == status
    assert raised.value.reason == "STOW-RS failure reason 0xC000 (cannot understand)"
    assert _Stub.requests_seen == ["/studies"]


def test_stow_out_of_resources_is_the_server_not_the_file(stub_server):
    _Stub.script = [(202, _stow_answer(0xA700))]
    resource = DicomServerResource(kind="dicomweb", dicomweb_url=stub_server, **FAST)
    with resource.client() as client, pytest.raises(ServerUnavailableError) as raised:
        client.upload(str(CT), CT_SOP)
    assert "out of resources" in str(raised.value)


def test_wrong_password_stops_with_a_message_that_hides_it(orthanc_with_auth):
    wrong = "wrong-pw-Zx81"
    resource = DicomServerResource(
        url=orthanc_with_auth.url, username=ORTHANC_USER, password=wrong, **FAST
    )
    with resource.client() as client, pytest.raises(ServerUnavailableError) as raised:
        client.upload(str(CT), CT_SOP)
    assert "refused the credentials (HTTP 401)" in str(raised.value)
    assert wrong not in str(raised.value)

    with DicomServerResource(
        url=orthanc_with_auth.url, username=ORTHANC_USER, password=ORTHANC_PASSWORD, **FAST
    ).client() as client:
        client.upload(str(CT), CT_SOP)
    assert orthanc_with_auth.sop_instance_uids() == [CT_SOP]


def test_credentials_in_the_url_are_moved_out_of_it(orthanc_with_auth):
    host = orthanc_with_auth.url.removeprefix("http://")
    resource = DicomServerResource(url=f"http://{ORTHANC_USER}:{ORTHANC_PASSWORD}@{host}/", **FAST)
    assert ORTHANC_PASSWORD not in resource.describe()
    with resource.client() as client:
        assert client.server_url == orthanc_with_auth.url
        client.upload(str(CT), CT_SOP)
    assert orthanc_with_auth.sop_instance_uids() == [CT_SOP]


def test_split_credentials():
    assert split_credentials("https://u:p%40ss@host:8042/dicom-web/") == (
        "https://host:8042/dicom-web",
        "u",
        "p@ss",
    )
    assert split_credentials("http://host") == ("http://host", None, None)


def test_dicomweb_root_is_found_on_orthanc_with_the_plugin_only(orthanc, tmp_path):
    with DicomServerResource(url=orthanc.url, **FAST).client() as client:
        assert client.dicomweb_root() == orthanc.dicomweb_url
    with DicomServerResource(
        url=orthanc.url, dicomweb_url="http://web.example/dw/", **FAST
    ).client() as client:
        assert client.dicomweb_root() == "http://web.example/dw"
    plain = start_orthanc(tmp_path / "plain", dicomweb=False)
    try:
        with DicomServerResource(url=plain.url, **FAST).client() as client:
            assert client.dicomweb_root() is None
    finally:
        plain.stop(graceful=False)


def test_from_environment_wires_every_variable_through_envvar(monkeypatch):
    for name in (
        settings.DICOM_SERVER_URL.name,
        settings.DICOM_SERVER_KIND.name,
        settings.DICOMWEB_URL.name,
        settings.DICOM_SERVER_USER.name,
        settings.DICOM_SERVER_PASSWORD.name,
    ):
        monkeypatch.delenv(name, raising=False)
    assert DicomServerResource.from_environment() == DicomServerResource()
    assert not DicomServerResource.from_environment().is_configured()

    monkeypatch.setenv(settings.DICOM_SERVER_URL.name, "http://orthanc:8042")
    monkeypatch.setenv(settings.DICOM_SERVER_PASSWORD.name, "env-secret-93")
    resource = DicomServerResource.from_environment()
    # An EnvVar holds the variable's name; Dagster resolves it only when the run starts.
    assert (
        isinstance(resource.password, dg.EnvVar)
        and resource.password == settings.DICOM_SERVER_PASSWORD.name
    )
    assert isinstance(resource.url, dg.EnvVar)
    assert resource.username is None


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({}, f"set {settings.DICOM_SERVER_URL.name}"),
        ({"kind": "dicomweb"}, f"set {settings.DICOMWEB_URL.name}"),
        ({"kind": "pacs", "url": "http://x"}, "must be one of orthanc, dicomweb"),
        ({"url": "ftp://x"}, "is not an http(s) URL"),
    ],
)
def test_configuration_errors_say_what_to_set(settings, expected):
    with pytest.raises(
        DicomServerConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")
    ):
        DicomServerResource(**settings).client()


def test_kind_is_case_insensitive(orthanc):
    with DicomServerResource(
        kind=" DICOMweb ", url=orthanc.dicomweb_url, **FAST
    ).client() as client:
        assert client.kind == "dicomweb"


def test_orthanc_tests_skip_only_without_the_binary_and_never_in_ci(monkeypatch):
    from dicom_etl_dagster_tests import orthanc as helpers

    monkeypatch.setattr(helpers, "orthanc_binary", lambda: None)
    monkeypatch.delenv(helpers.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install orthanc orthanc-dicomweb"):
        helpers.require_orthanc()
    monkeypatch.setenv(helpers.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="CI must run the Orthanc tests"):
        helpers.require_orthanc()
