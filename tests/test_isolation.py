"""A site killed without cleaning up leaves its socket and courier folders; the next start removes
them, and only those whose `fedseg site` is gone."""

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from client.guard_socket import GuardServer
from client.isolation import IsolationError, ensure_user, external_courier, let_courier_run_python, open_socket_to_courier, sweep_stale_folders


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


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the courier user needs root")
def test_an_external_courier_reaches_the_guard_socket_and_nothing_else(tmp_path):
    """`fedseg site --external-courier USER`: the hospital starts the courier as USER itself; the
    guard opens exactly its socket (and a folder for Flower's app installs) to USER, by ACL."""
    courier_user = ensure_user()
    let_courier_run_python()
    site, data = tmp_path / "site", tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "ct.dcm").write_bytes(b"patient data")
    courier = external_courier(site, data, courier_user.pw_name)
    socket_path = courier.socket_dir / "guard.sock"
    server = GuardServer(socket_path, lambda header, arrays: ({"status": "ok"}, {}))
    open_socket_to_courier(socket_path, courier)
    probe = """
import socket, sys
def attempt(action):
    try:
        action(); return "ok"
    except OSError as err:
        return type(err).__name__
s = socket.socket(socket.AF_UNIX)
print(attempt(lambda: s.connect(sys.argv[1])), attempt(lambda: open(sys.argv[2] + "/flwr.toml", "w").close()),
      attempt(lambda: open(sys.argv[3] + "/ct.dcm").read()), attempt(lambda: open(sys.argv[4] + "/site_policy.toml", "w").close()),
      attempt(lambda: open(sys.argv[5] + "/flwr-clientapp", "w").close()))
"""
    def as_user(uid: int, gid: int) -> list[str]:
        out = subprocess.run([sys.executable, "-c", probe, str(socket_path), str(courier.home), str(data), str(site), str(courier.socket_dir)],
                             user=uid, group=gid, extra_groups=[], capture_output=True, text=True, timeout=60, cwd="/")
        assert out.returncode == 0, out.stderr
        return out.stdout.split()
    try:
        # the courier: connects to the guard and installs apps in its home; no data, no site folder, no planting a launcher
        assert as_user(courier_user.pw_uid, courier_user.pw_gid) == ["ok", "ok", "PermissionError", "PermissionError", "PermissionError"]
        outsider = ensure_user("fedseg-outsider")  # any other local user: not even the socket
        let_courier_run_python(outsider.pw_name)
        assert as_user(outsider.pw_uid, outsider.pw_gid)[:2] == ["PermissionError", "PermissionError"]
    finally:
        server.server_close()
        shutil.rmtree(courier.socket_dir, ignore_errors=True)


def test_an_external_courier_must_be_another_existing_user(tmp_path):
    with pytest.raises(IsolationError, match="no user"):
        external_courier(tmp_path / "site", tmp_path, "no-such-user-fedseg")
    with pytest.raises(IsolationError, match="another user"):
        external_courier(tmp_path / "site", tmp_path, pwd.getpwuid(os.geteuid()).pw_name)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to the courier user needs root")
def test_an_external_courier_that_reads_the_data_through_a_group_is_refused(tmp_path):
    """`sudo -u USER` gives USER its supplementary groups: the check must see the data as USER will."""
    user = ensure_user("fedseg-grouped")
    let_courier_run_python(user.pw_name)
    subprocess.run(["groupadd", "-f", "fedseg-readers"], check=True)
    subprocess.run(["usermod", "-aG", "fedseg-readers", user.pw_name], check=True)
    base = Path(tempfile.mkdtemp())  # pytest's own folders are closed to other users: this one is passable
    try:
        base.chmod(0o711)
        data = base / "data"
        data.mkdir(mode=0o750)
        shutil.chown(data, group="fedseg-readers")
        with pytest.raises(IsolationError, match="can read"):
            external_courier(tmp_path / "site", data, user.pw_name)
    finally:
        shutil.rmtree(base)
