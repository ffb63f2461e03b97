"""Model arrays on the wire between a site's courier and its guard: `.npz` without pickle, and the
SHA-256 that the guard's audit log and the server's history both name the same weights by.
Needs numpy only (the courier imports neither torch nor opacus)."""

from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np

Arrays = dict[str, np.ndarray]
MAX_ARRAYS_BYTES = 512 * 1024 * 1024


class ArrayFormatError(ValueError):
    """Arrays that are not plain numeric npz (pickled objects, too large, malformed)."""


def encode(arrays: Arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode(data: bytes) -> Arrays:
    """Plain numeric arrays only: `allow_pickle=False`, bounded uncompressed size."""
    if not data:
        return {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if sum(info.file_size for info in archive.infolist()) > MAX_ARRAYS_BYTES:
                raise ArrayFormatError("arrays too large")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise ArrayFormatError("not a plain npz archive") from err
    if any(a.dtype.kind not in "fiub" for a in arrays.values()):
        raise ArrayFormatError("non-numeric array")
    return arrays


def arrays_sha256(arrays: Arrays) -> str:
    """A digest of names, dtypes, shapes and bytes, in name order: the same weights, the same hash,
    whichever side computes it."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()
