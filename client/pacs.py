"""How a site command reaches the hospital's PACS: a DICOMweb session with the credentials and CA the
operator gave (never plain http:// to another machine unless allowed), and a source that is a folder
as given or a DICOMweb URL pulled into a local folder first. Used by `fedseg site`, `predict`, `pull`."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from common.errors import FedsegError

PACS_PASSWORD_ENV = "FEDSEG_PACS_PASSWORD"

log = logging.getLogger(__name__)


class PacsError(FedsegError):
    """The PACS cannot be reached as asked: refused options, unreadable credentials, a failed pull."""


def pacs_session(urls: Sequence[str], token_file: str | None = None, user: str | None = None, ca_cert: str | None = None,
                 allow_http: bool = False):
    """A requests session with the credentials and CA given; plain http:// to another machine refused
    unless `allow_http` (then a warning), since it would carry images and credentials in clear."""
    from common.dicomweb import PacsAccess, is_plain_http_to_another_host, read_token, session

    for url in filter(is_plain_http_to_another_host, urls):
        if not allow_http:
            raise PacsError(f"refusing plain http:// to {url}: use https:// (--ca-cert for the hospital's CA), "
                            "or --allow-http on a network you trust")
        log.warning(f"WARNING: plain http:// to {url}: images{' and credentials' if token_file or user else ''} "
                    "cross the network unencrypted")
    if token_file and user:
        raise PacsError("give a token file or a user, not both")
    if user and PACS_PASSWORD_ENV not in os.environ:
        raise PacsError(f"PACS user {user}: put the password in the environment variable {PACS_PASSWORD_ENV}")
    if ca_cert and not Path(ca_cert).is_file():
        raise PacsError(f"PACS CA certificate {ca_cert}: no such file")
    try:
        token = read_token(Path(token_file)) if token_file else None
    except (OSError, ValueError) as err:
        raise PacsError(f"PACS token file: {err}") from err
    return session(PacsAccess(token=token, user=user, password=os.environ.get(PACS_PASSWORD_ENV) if user else None,
                              ca_cert=Path(ca_cert) if ca_cert else None))


def local_data(source: str, cache: Path, studies: list[str] | None = None, http=None) -> Path:
    """A folder as given, or a DICOMweb URL pulled into the site's `cache` folder first
    (`studies` None: every study, which `fedseg site --data URL` trains on)."""
    from common.dicomweb import is_dicomweb, pull

    if not is_dicomweb(source):
        return Path(source)
    try:
        pull(source, cache, studies, http)
    except ConnectionError as err:
        raise PacsError(str(err)) from err
    return cache
