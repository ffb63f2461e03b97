"""File names made from DICOM and DICOMweb content (UIDs, patient IDs): such text comes from files
and servers we do not control, so it is cleaned to one harmless path component and every path
built from it is checked to stay under the folder it is meant for. Errors never quote the text
(it is patient-derived); they name it by a short hash."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 128  # DICOM UIDs and patient IDs are at most 64 characters; far below any file system's limit


class UnsafePath(ValueError):
    """A name or path derived from DICOM content that would not stay where it belongs."""


def fingerprint(text: str) -> str:
    """A short, stable stand-in for patient-derived text in messages."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def safe_name(text: str) -> str:
    """One path component, different texts never giving the same name: runs of anything but
    letters, digits, '.', '_' and '-' become '_', a leading '.' becomes '_' (no hidden files), and
    a name so changed gets '-' and a hash of the text appended (`P/1` and `P?1` stay apart). Real
    UIDs (digits and dots) come through unchanged. Refused: an empty result, one made only of dots
    ('.', '..'), and over-long text."""
    name = _UNSAFE.sub("_", text)
    if not name.strip("."):
        raise UnsafePath(f"refused a file name from DICOM content ({fingerprint(text)}): empty, '.' or '..'")
    if len(name) > MAX_NAME:
        raise UnsafePath(f"refused a file name from DICOM content ({fingerprint(text)}): longer than {MAX_NAME} characters")
    name = "_" + name[1:] if name.startswith(".") else name
    return name if name == text else f"{name}-{hashlib.sha256(text.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}"


def path_under(root: Path, *parts: str) -> Path:
    """`root`/`parts`, resolved (symbolic links followed), refused unless it lies strictly inside `root`."""
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path == base or not path.is_relative_to(base):
        raise UnsafePath(f"refused a path from DICOM content ({fingerprint('/'.join(parts))}): it is not inside {base}")
    return path
