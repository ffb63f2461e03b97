"""PACS in and out over DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store) with dicomweb-client.

Pulled images land in a folder at the site (its PACS cache) and go through the normal site loader;
nothing pulled ever leaves the site. Already-cached instances are not fetched again. The server is
not trusted with file names: its UIDs are cleaned (`common.safe_paths`) and anything that would
land outside the cache is refused. Requests go through one `requests.Session` that carries the
site's credentials and verifies TLS, always."""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.errors import InvalidDicomError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from common.safe_paths import UnsafePath, fingerprint, path_under, safe_name

log = logging.getLogger(__name__)


class PacsAuthError(ConnectionError):
    """The server refused our credentials (HTTP 401/403)."""


class PacsTLSError(ConnectionError):
    """The server's certificate did not verify."""


@dataclass(frozen=True)
class PacsAccess:
    """How to reach the PACS: a bearer token or a user and password (not both), and the CA that
    signed its certificate (default: certifi's public CAs)."""

    token: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_cert: Path | None = None

    def __post_init__(self) -> None:
        if self.token and self.user:
            raise ValueError("give a bearer token or a user and password, not both")
        if self.user and self.password is None:
            raise ValueError(f"no password for PACS user {self.user}")


class _Bearer(requests.auth.AuthBase):
    """`Authorization: Bearer …` as a requests auth, so requests drops it on a redirect to another host."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


def is_dicomweb(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def is_plain_http_to_another_host(url: str) -> bool:
    """True for http:// to anything but this machine: images and credentials would cross the network in clear."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


def read_token(path: Path) -> str:
    """A bearer token from a file (so it is never on a command line, in `ps` or a shell history)."""
    token = Path(path).read_text().strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"{path} must hold one bearer token on one line")
    return token


def _retries() -> Retry:
    """A busy PACS (429/503/504) or one not yet listening is tried again; a certificate that does not
    verify, or refused credentials, fail at once (dicomweb-client's own retry would wait 30 s on any error)."""
    return Retry(total=4, connect=2, read=0, other=0, status=4, status_forcelist=(429, 503, 504), backoff_factor=1,
                 allowed_methods=None, raise_on_status=False)


def session(access: PacsAccess | None = None) -> requests.Session:
    """A session that verifies TLS against `access.ca_cert` (or certifi) and sends the credentials.
    The environment is not consulted: REQUESTS_CA_BUNDLE would silently replace the CA given here,
    and ~/.netrc could add credentials nobody asked for."""
    access = access or PacsAccess()
    http = requests.Session()
    http.trust_env = False
    for scheme in ("https://", "http://"):
        http.mount(scheme, HTTPAdapter(max_retries=_retries()))
    http.verify = str(access.ca_cert) if access.ca_cert else True
    if access.token:
        http.auth = _Bearer(access.token)
    elif access.user:
        http.auth = requests.auth.HTTPBasicAuth(access.user, access.password or "")
    return http


def _client(url: str, http: requests.Session | None) -> DICOMwebClient:
    client = DICOMwebClient(url=url.rstrip("/"), session=http or session())
    client.set_http_retry_params(retry=False)  # the session retries what is worth retrying
    return client


def _without_paths(err: Exception) -> str:
    """requests' message minus the request's path and query, which hold study and series UIDs."""
    return re.sub(r"(url: )/?\S+", r"\1(path not shown)", str(err))


def _connection_error(url: str, doing: str, err: Exception) -> ConnectionError:
    """requests' errors as ours: refused credentials and failed TLS told apart from the rest."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return PacsAuthError(f"DICOMweb server {url} refused our credentials (HTTP {status}) to {doing}")
    if isinstance(err, requests.exceptions.SSLError):
        return PacsTLSError(f"DICOMweb server {url}: TLS certificate verification failed to {doing} "
                            f"(is the CA that signed it given, e.g. --ca-cert?): {_without_paths(err)}")
    return ConnectionError(f"DICOMweb server {url} did not {doing}: {_without_paths(err)}")


def _search(client: DICOMwebClient, url: str, studies: Sequence[str] | None) -> list[dict]:
    """QIDO-RS series of the given studies, or of the whole server when `studies` is None."""
    filters = [{"StudyInstanceUID": s} for s in studies] if studies is not None else [None]
    try:
        return [item for f in filters for item in client.search_for_series(search_filters=f)]
    except (requests.RequestException, ValueError) as err:
        raise _connection_error(url, "answer a series search", err) from err


def _series_folder(folder: Path, series: pydicom.Dataset) -> Path:
    return path_under(folder, safe_name(str(series.get("StudyInstanceUID", ""))),
                      safe_name(str(series.get("SeriesInstanceUID", ""))))


def _retrieve(client: DICOMwebClient, url: str, series: pydicom.Dataset) -> list[pydicom.Dataset]:
    """WADO-RS instances; UIDs dicomweb-client will not put in a URL refuse the series (without quoting them)."""
    study_uid, series_uid = str(series.StudyInstanceUID), str(series.SeriesInstanceUID)
    try:
        return list(client.retrieve_series(study_uid, series_uid))
    except requests.RequestException as err:
        raise _connection_error(url, "send a series", err) from err
    except (ValueError, InvalidDicomError) as err:
        raise UnsafePath(f"refused series {fingerprint(series_uid)}: the server gave UIDs that are not DICOM UIDs "
                         f"or sent instances that do not parse ({type(err).__name__})") from None


def _instance_file(target: Path, series: pydicom.Dataset, ds: pydicom.Dataset) -> Path:
    """Where an instance goes: refused if it claims another series than the one asked for."""
    sop = str(ds.get("SOPInstanceUID", ""))
    if str(ds.get("SeriesInstanceUID", "")) != str(series.SeriesInstanceUID):
        raise UnsafePath(f"refused instance {fingerprint(sop)}: not in the series that was asked for")
    return path_under(target, f"{safe_name(sop)}.dcm")


@dataclass
class PullCounts:
    fetched: int = 0
    cached: int = 0
    refused: int = 0


def _pull_series(client: DICOMwebClient, url: str, folder: Path, series: pydicom.Dataset, counts: PullCounts) -> Path:
    """The series' instances not already in its cache folder; returns that folder."""
    target = _series_folder(folder, series)
    have = {p.name for p in target.glob("*.dcm")}
    expected = int(series.get("NumberOfSeriesRelatedInstances", 0) or 0)
    if expected and len(have) >= expected:
        counts.cached += len(have)
        return target
    target.mkdir(parents=True, exist_ok=True)
    for ds in _retrieve(client, url, series):
        try:
            path = _instance_file(target, series, ds)
        except UnsafePath as err:
            counts.refused += 1
            log.warning(f"  {err}")
            continue
        if path.name not in have:
            ds.save_as(path, enforce_file_format=True)
            have.add(path.name)
            counts.fetched += 1
    return target


def pull(url: str, folder: Path, studies: Sequence[str] | None, http: requests.Session | None = None) -> PullCounts:
    """Every series of `studies` into `folder`/<study>/<series>/<sop>.dcm; `studies=None` copies the
    whole server, so callers must mean it. Series and instances whose names are unsafe are refused
    (counted, and said why), the rest still pulled."""
    client = _client(url, http)
    found = _search(client, url, studies)
    counts = PullCounts()
    for n, item in enumerate(found, start=1):
        try:
            target = _pull_series(client, url, folder, pydicom.Dataset.from_json(item), counts)
        except UnsafePath as err:
            counts.refused += 1
            log.warning(f"  [{n}/{len(found)}] {err}")
            continue
        log.info(f"  [{n}/{len(found)}] series {target.name} from {url}")
    log.info(f"{len(found)} series from {url}: {counts.fetched} instances fetched, {counts.cached} already in {folder}"
             + (f", {counts.refused} refused (unsafe names)" if counts.refused else ""))
    return counts


def push(url: str, paths: Sequence[Path], http: requests.Session | None = None) -> int:
    """Store DICOM files (e.g. the SEGs a prediction wrote) on the server; returns how many."""
    datasets = [pydicom.dcmread(p) for p in paths]
    try:
        _client(url, http).store_instances(datasets)
    except requests.RequestException as err:
        raise _connection_error(url, f"store {len(datasets)} instances", err) from err
    return len(datasets)
