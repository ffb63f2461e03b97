"""Paths and PACS access under attack (issue 13, item 4): file names made from DICOM/DICOMweb
content never leave their output folder; `fedseg pull` copies only what it is asked to, verifies
TLS and sends credentials."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from client.predict import predict_folder
from common.config import run_config
from common.credentials import create_server_certificates
from common.dicomweb import PacsAccess, PacsAuthError, PacsTLSError, pull, session
from common.model import build_model, load_global_model
from common.safe_paths import UnsafePath, path_under, safe_name
from tests.dicom_factory import blob_volume, write_series

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom, on the attacks' UIDs
ESCAPE = "1.2/../../../../escaped"
TOKEN = "s3cret-token-for-the-test"


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# --- the name rule -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, name", [("1.2.840.1", "1.2.840.1"), (ESCAPE, "1.2_.._.._.._.._escaped-"),
                                        ("Test^P 1", "Test_P_1-"), (".hidden", "_hidden-"), ("../x", "_._x-")])
def test_safe_name_keeps_real_uids_and_flattens_everything_else_to_one_component(text, name):
    cleaned = safe_name(text)
    assert cleaned.startswith(name) and "/" not in cleaned
    assert cleaned == text or len(cleaned) == len(name) + 10  # a changed name carries a hash of the text


def test_two_texts_never_clean_to_the_same_name():
    """`P/1` and `P?1` would both be `P_1`: one patient's prediction would overwrite the other's."""
    texts = ["P/1", "P?1", "P_1", "1.2.3/4", "1.2.3?4", "éééé", "ßßßß"]
    assert len({safe_name(t) for t in texts}) == len(texts)


@pytest.mark.parametrize("text", ["", ".", "..", "...", "9" * 129])
def test_safe_name_refuses_dots_empty_and_overlong_without_quoting_the_text(text):
    with pytest.raises(UnsafePath, match="sha256:") as caught:
        safe_name(text)
    assert "9" * 20 not in str(caught.value)


def test_path_under_refuses_whatever_resolves_outside_the_root(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    assert path_under(tmp_path / "root", "a", "b.dcm") == (tmp_path / "root" / "a" / "b.dcm").resolve()
    for parts in [("..",), ("a", "../../x"), ("/etc/passwd",), ("link", "x"), ()]:
        with pytest.raises(UnsafePath, match="is not inside"):
            path_under(tmp_path / "root", *parts)


# --- predict on a hostile series -----------------------------------------------------------------

def _hostile_series(folder: Path, series_uid: str, patient: str, seed: int) -> None:
    """A real MR series whose SeriesInstanceUID and PatientID are path attacks (pydicom writes them, warning)."""
    write_series(folder, blob_volume(seed=seed)[0], seed=seed)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path, force=True)  # written without a preamble, as some tools do
        ds.SeriesInstanceUID, ds.PatientID = series_uid, patient
        ds.save_as(path, enforce_file_format=False)


def test_predict_writes_a_hostile_series_uid_under_a_sanitised_name_inside_out(tmp_path):
    torch.manual_seed(0)
    model = tmp_path / "global_model.pt"
    torch.save({"state_dict": build_model(3).state_dict(), "round": 0, "config": run_config({"image-size": 32})}, model)
    source = tmp_path / "src"
    _hostile_series(source / "a", ESCAPE, "../../../../pwned", seed=0)
    _hostile_series(source / "b", "..", "P2", seed=1)
    out = tmp_path / "x" / "y" / "z" / "out"  # the attack climbs 3 levels above OUT: still inside tmp_path, where we look
    before = _files(tmp_path)

    results, report = predict_folder(load_global_model(model), source, out, torch.device("cpu"), nifti=True)

    written = _files(tmp_path) - before
    assert written and all(p.is_relative_to(out) for p in written), sorted(map(str, written))
    stem = out / safe_name("../../../../pwned") / safe_name(ESCAPE)
    assert {p.name for p in written} == {f"{stem.name}.seg.dcm", f"{stem.name}.nii.gz", f"{stem.name}.png"}
    assert [r.seg for r in results] == [Path(f"{stem}.seg.dcm").resolve()]
    assert pydicom.dcmread(results[0].seg).ReferencedSeriesSequence[0].SeriesInstanceUID == ESCAPE
    refused = [s for s in report.skipped if "'.' or '..'" in s["reason"]]  # the series whose UID is ".."
    assert len(refused) == 1 and "sha256:" in refused[0]["reason"], report.skipped


# --- a hostile DICOMweb server -------------------------------------------------------------------

def _uid(tag: str, value: str) -> dict:
    return {tag: {"vr": "UI", "Value": [value]}}


def _series_json(study: str, series: str, count: int) -> dict:
    return {**_uid("0020000D", study), **_uid("0020000E", series), "00080060": {"vr": "CS", "Value": ["CT"]},
            "00201209": {"vr": "IS", "Value": [count]}}


def _instance(study: str, series: str, sop: str) -> bytes:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = study, series, "CT", "P1"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _multipart(parts: list[bytes]) -> tuple[str, bytes]:
    boundary = "fedsegBoundary42"
    body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), p) for p in parts)
    return f'multipart/related; type="application/dicom"; boundary={boundary}', body + b"--%s--\r\n" % boundary.encode()


def _hostile_routes() -> dict[str, tuple[str, bytes]]:
    """QIDO answers naming studies/series with '/' and '..', and a WADO series whose instances do too."""
    series = [_series_json(ESCAPE, "1.3", 1), _series_json("..", "1.4", 1), _series_json("1.5", "1.6", 4)]
    instances = [_instance("1.5", "1.6", "1.5.1"), _instance("1.5", "1.6", "../../../../escaped2"),
                 _instance("1.5", "1.6", ".."), _instance("1.5", "1.7", "1.5.2")]
    return {"/dicom-web/series": ("application/dicom+json", json.dumps(series).encode()),
            "/dicom-web/studies/1.5/series/1.6": _multipart(instances)}


@contextlib.contextmanager
def _server(routes: dict[str, tuple[str, bytes]], tls: ssl.SSLContext | None = None,
            authorization: str | None = None) -> Iterator[tuple[str, list[str]]]:
    """A DICOMweb server on loopback answering fixed routes; with `authorization`, 401 without that header.
    Yields its root URL and the paths it was asked for."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?")[0]
            asked.append(path)
            if authorization and self.headers.get("Authorization") != authorization:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Bearer realm="pacs"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            content_type, body = routes.get(path, ("text/plain", b""))
            self.send_response(200 if path in routes else 404)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address) -> None:
            pass  # a client refusing our certificate is what some tests want

    httpd = Server(("127.0.0.1", 0), Handler)
    if tls:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{httpd.server_address[1]}/dicom-web", asked
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_pull_from_a_hostile_server_keeps_everything_inside_the_folder_and_says_what_it_refused(tmp_path, caplog):
    folder = tmp_path / "a" / "b" / "c" / "pacs"
    caplog.set_level("INFO", logger="common.dicomweb")
    with _server(_hostile_routes()) as (url, asked):
        counts = pull(url, folder, None)

    assert all(p.is_relative_to(folder) for p in _files(tmp_path)), sorted(map(str, _files(tmp_path)))
    assert {p.relative_to(folder).as_posix() for p in _files(tmp_path)} == {"1.5/1.6/1.5.1.dcm", f"1.5/1.6/{safe_name('../../../../escaped2')}.dcm"}
    assert not any(".." in p for p in asked)  # the escaping study was never even asked for
    assert (counts.fetched, counts.refused) == (2, 4)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "common.dicomweb")  # pydicom's own warnings quote the UIDs
    assert "not DICOM UIDs" in text and "'.' or '..'" in text and "not in the series that was asked for" in text
    assert "escaped" not in text and "../" not in text, text  # refusals name a hash, never the server's text


def _tls(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    certs = create_server_certificates(tmp_path / "certs", ["127.0.0.1"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    return context, certs.ca_cert


def _good_routes() -> dict[str, tuple[str, bytes]]:
    return {"/dicom-web/series": ("application/dicom+json", json.dumps([_series_json("1.5", "1.6", 1)]).encode()),
            "/dicom-web/studies/1.5/series/1.6": _multipart([_instance("1.5", "1.6", "1.5.1")])}


def test_pull_over_https_needs_the_ca_and_the_right_token(tmp_path, fedseg_here):
    tls, ca = _tls(tmp_path)
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "wrong").write_text("not-the-token\n")
    with _server(_good_routes(), tls, f"Bearer {TOKEN}") as (url, _):
        ok = fedseg_here("pull", url, "pacs", "--study", "1.5", "--token-file", "token", "--ca-cert", str(ca), cwd=tmp_path)
        no_ca = fedseg_here("pull", url, "no-ca", "--study", "1.5", "--token-file", "token", cwd=tmp_path)
        wrong = fedseg_here("pull", url, "wrong-pacs", "--study", "1.5", "--token-file", "wrong", "--ca-cert", str(ca), cwd=tmp_path)

    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "1 instances fetched" in ok.stdout and (tmp_path / "pacs" / "1.5" / "1.6" / "1.5.1.dcm").is_file()
    assert no_ca.returncode != 0 and "TLS certificate verification failed" in no_ca.stderr, no_ca.stderr[-3000:]
    assert wrong.returncode != 0 and "refused our credentials (HTTP 401)" in wrong.stderr, wrong.stderr[-3000:]
    assert not (tmp_path / "no-ca").exists() and not (tmp_path / "wrong-pacs").exists()
    assert TOKEN not in ok.stdout + ok.stderr + no_ca.stdout + no_ca.stderr + wrong.stdout + wrong.stderr


def test_pull_with_basic_auth_sends_user_and_password_and_reports_refusals_as_typed_errors(tmp_path):
    tls, ca = _tls(tmp_path)
    basic = "Basic " + base64.b64encode(b"radiology:pw").decode()
    with _server(_good_routes(), tls, basic) as (url, _):
        counts = pull(url, tmp_path / "ok", ["1.5"], session(PacsAccess(user="radiology", password="pw", ca_cert=ca)))
        with pytest.raises(PacsAuthError, match="HTTP 401"):
            pull(url, tmp_path / "bad", ["1.5"], session(PacsAccess(user="radiology", password="no", ca_cert=ca)))
        with pytest.raises(PacsTLSError):
            pull(url, tmp_path / "bad", ["1.5"], session(PacsAccess(user="radiology", password="pw")))
    assert counts.fetched == 1


# --- the CLI's refusals --------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["pull", "http://127.0.0.1:9/dicom-web", "pacs"], "--study UID (repeatable), or --all"),
    (["pull", "http://127.0.0.1:9/dicom-web", "pacs", "--study", "1.2", "--all"], "not allowed with argument"),
    (["pull", "http://pacs.example:8042/dicom-web", "pacs", "--study", "1.2"], "refusing plain http://"),
    (["pull", "https://127.0.0.1:9/dicom-web", "pacs", "--study", "1.2", "--user", "radiology"], "FEDSEG_PACS_PASSWORD"),
    (["predict", "model.pt", "http://127.0.0.1:9/dicom-web", "--out", "out"], "--study UID (repeatable), or --all"),
    (["site", "site", "--data", "http://pacs.example:8042/dicom-web", "--server", "127.0.0.1:9", "--insecure"], "refusing plain http://"),
    (["site", "site", "--data", "https://127.0.0.1:9/dicom-web", "--pacs-user", "fedseg", "--server", "127.0.0.1:9", "--insecure"],
     "FEDSEG_PACS_PASSWORD"),
])
def test_cli_refuses_an_unscoped_or_unsafe_pull_before_any_network_access(tmp_path, monkeypatch, fedseg_here, args, message):
    monkeypatch.delenv("FEDSEG_PACS_PASSWORD", raising=False)
    run = fedseg_here(*args, cwd=tmp_path)
    assert run.returncode != 0 and message in run.stderr, run.stderr[-3000:]
    assert not list(tmp_path.iterdir())  # nothing pulled, no folder made (the refusal comes before the model is read)
