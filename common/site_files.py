"""The files of a site folder, however a PACS export, a viewer or a mount laid them out.

Patient folders are often linked in (PACS and XNAT mounts do), so symbolic links to folders are
followed, each real folder and file once: a link back up the tree, or a second link to a folder
already walked, would otherwise read the site twice or forever. What is not walked is named in the
caller's report. Nothing here reads a file: what the files hold is judged by the caller.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from common.errors import FedsegError



class NoSites(FedsegError):
    """A data root without any site folder."""


def site_folders(data_root: Path) -> list[str]:
    """Each non-hidden subfolder of a data root is one site, as a hospital (and `fedseg simulate
    --data-root`) lays them out."""
    try:
        sites = sorted(str(p) for p in data_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        raise NoSites(f"--data-root {data_root} cannot be read as a folder ({err.strerror})") from err
    if not sites:
        raise NoSites(f"--data-root {data_root} has no site subfolders")
    return sites


class SkipReport(Protocol):
    """Where a path that is not used is named, with why (the load report)."""

    def skip(self, what: str | Path, reason: str) -> None: ...


def site_files(folder: Path, report: SkipReport) -> list[Path]:
    """Every file under `folder` in path order, symbolic links to folders followed, each real folder
    and file once; loops, second links, broken links and unreadable folders are named in `report`."""
    site = os.path.realpath(folder)
    seen_dirs: dict[str, str] = {}
    seen_files: set[str] = set()
    files = []
    for here, dirs, names in os.walk(folder, followlinks=True, onerror=lambda err: report.skip(err.filename, _unreadable(err))):
        real = os.path.realpath(here)
        if real != site and site.startswith(real.rstrip(os.sep) + os.sep):
            report.skip(here, f"symbolic link loop: links to {real}, which holds the site folder; not followed")
            dirs.clear()
            continue
        if real in seen_dirs:
            report.skip(here, f"symbolic link loop or second link: {real} is already scanned as {seen_dirs[real]}; not scanned again")
            dirs.clear()
            continue
        seen_dirs[real] = here
        dirs.sort()
        for name in names:
            path = os.path.join(here, name)
            linked = os.path.islink(path)
            real_file = os.path.realpath(path) if linked else os.path.join(real, name)
            if linked and not os.path.exists(real_file):
                report.skip(path, "broken symbolic link")
            elif real_file in seen_files:
                report.skip(path, f"symbolic link to a file already scanned ({real_file}); not read twice")
            else:
                seen_files.add(real_file)
                files.append(Path(path))
    return sorted(files)


def _unreadable(err: OSError) -> str:
    """A folder os.walk could not list, as one report line (the path is the report's own column)."""
    return f"folder unreadable ({type(err).__name__}: {err.strerror or err})"
