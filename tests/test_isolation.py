"""A site killed without cleaning up leaves its socket and courier folders; the next start removes
them, and only those whose `fedseg site` is gone."""

import os
import subprocess
import sys

from client.isolation import sweep_stale_folders


def test_stale_folders_of_dead_sites_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = [tmp_path / f"fedseg-guard-{dead}-abc", tmp_path / f"fedseg-courier-{dead}-def"]
    alive = [tmp_path / f"fedseg-guard-{os.getpid()}-ghi", tmp_path / f"fedseg-courier-{os.getpid()}-jkl"]
    others = [tmp_path / "fedseg-edge-abc", tmp_path / f"fedseg-other-{dead}-x"]
    for folder in stale + alive + others:
        (folder / "apps").mkdir(parents=True)
    (tmp_path / f"fedseg-guard-{dead}-link").symlink_to(alive[0])  # a link is never followed into
    if os.geteuid() == 0:  # another user's folder with a matching name is not ours to remove
        others.append(tmp_path / f"fedseg-guard-{dead}-theirs")
        others[-1].mkdir()
        os.chown(others[-1], 65534, 65534)
    assert sorted(sweep_stale_folders(tmp_path)) == sorted(stale)
    assert not any(f.exists() for f in stale) and all(f.is_dir() for f in alive + others)
