"""Two OS users at a site: the guard (the hospital's `fedseg site`, which owns the data, the privacy
ledger and the policy) and the courier (Flower's SuperExec and the ClientApp processes it starts, which
run whatever app bundle the coordinator ships). The courier reaches the guard only through its socket.

When `fedseg site` runs as root it sets this up itself: a dedicated unprivileged user, a socket folder
only the guard and that user can enter, and checks — made *as* the courier user — that the data
folder and the site folder are closed to it and that it can run this Python. With an external
courier (`--external-courier USER`: a hospital that does not run fedseg as root, or runs the courier
in another container) the guard opens its socket to USER by ACL and the hospital starts the
courier's SuperExec as USER itself. Otherwise the courier runs as the same user, and `fedseg site`
says loudly what that means (README: privacy model).
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

COURIER_USER = "fedseg-courier"
log = logging.getLogger(__name__)


class IsolationError(RuntimeError):
    """The courier could read what it must not, or cannot run at all."""


@dataclass(frozen=True)
class Courier:
    user: str | None  # None: same user as the guard (no isolation)
    uid: int | None
    gid: int | None
    home: Path  # its FLWR_HOME: where Flower installs the app bundle
    socket_dir: Path  # the guard's socket and the courier's launcher: only the guard's user writes here
    external: bool = False  # its SuperExec is started by the hospital as `user`, not by `fedseg site`

    @property
    def isolated(self) -> bool:
        return self.user is not None


def ensure_user(name: str = COURIER_USER) -> pwd.struct_passwd:
    """The courier's system user, created if missing (no home, no login shell)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True, capture_output=True)
        return pwd.getpwnam(name)


def closed_python_folders() -> list[Path]:
    """Folders above this Python, its packages and fedseg's code that other users cannot pass through."""
    import flwr

    wanted = [Path(os.path.realpath(sys.executable)), Path(sys.prefix), Path(flwr.__file__).parent, Path(__file__).parents[1]]
    folders = {parent for path in wanted for parent in [path, *path.parents] if parent.is_dir()}
    return sorted(f for f in folders if not os.stat(f).st_mode & 0o001)


def let_courier_run_python(user: str = COURIER_USER) -> None:
    """Give `user` pass-through (x, not read) on exactly those folders, by ACL: for a test or
    benchmark machine whose Python lives in a private home folder."""
    closed = closed_python_folders()
    if closed:
        subprocess.run(["setfacl", "-m", f"u:{user}:x", *map(str, closed)], check=True, capture_output=True)


def _as_user(uid: int, gid: int, code: str, *args: str, groups: list[int] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], user=uid, group=gid, extra_groups=groups or [], capture_output=True,
                          text=True, timeout=120, cwd="/", env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})


def _uid_of(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def sweep_stale_folders(temp: Path | None = None, courier_uid: int | None = None) -> list[Path]:
    """Remove the socket and courier folders of sites that died without cleaning up (SIGKILL, power
    loss): their names carry the pid of the `fedseg site` that made them, that pid is gone, and they
    belong to this user (or, for a courier's folder, to the courier user). Never through a link."""
    removed = []
    owners = {"guard": {os.geteuid()}, "courier": {os.geteuid(), courier_uid}}
    for kind, allowed in owners.items():
        for folder in Path(temp or tempfile.gettempdir()).glob(f"fedseg-{kind}-*-*"):
            pid = folder.name.split("-")[2]
            try:
                info = folder.lstat()
            except OSError:
                continue
            if pid.isdigit() and not psutil.pid_exists(int(pid)) and stat.S_ISDIR(info.st_mode) and info.st_uid in allowed:
                shutil.rmtree(folder, ignore_errors=True)
                if not os.path.lexists(folder):
                    removed.append(folder)
    return removed


def _grant(user: str, permissions: str, path: Path) -> None:
    """An ACL entry for one more user: the owner may set it without root."""
    try:
        subprocess.run(["setfacl", "-m", f"u:{user}:{permissions}", str(path)], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise IsolationError(f"cannot open {path} to the courier user {user} by ACL ({getattr(err, 'stderr', '') or err}): "
                             "install the acl package and use a file system with ACLs (ext4, xfs, tmpfs)") from err


def external_courier(site_root: Path, data_dir: Path, user: str) -> Courier:
    """A courier the hospital starts itself as `user` (another user, or a container sharing the
    socket folder and this machine's loopback): only its socket folder is opened to it. As root,
    the same checks as for fedseg's own courier are made as `user`."""
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise IsolationError(f"no user {user} on this machine: create it (useradd --system {user}) or name another") from None
    if account.pw_uid == os.geteuid():
        raise IsolationError(f"the external courier must run as another user than this site's ({user} is this user)")
    site_root.mkdir(parents=True, exist_ok=True)
    sweep_stale_folders()
    os.chmod(site_root, 0o700)
    socket_dir = Path(tempfile.mkdtemp(prefix=f"fedseg-guard-{os.getpid()}-"))
    _grant(user, "x", socket_dir)
    home = socket_dir / "courier-home"  # where Flower installs the app bundle: the courier's to write
    home.mkdir(mode=0o700)
    _grant(user, "rwx", home)
    if os.geteuid() == 0:  # `sudo -u`/`runuser -u` give the user its groups: so does the check
        _check_closed(account, data_dir, site_root, os.getgrouplist(user, account.pw_gid))
    else:
        log.warning("cannot switch to %s to check what it can read (not root): make sure `sudo -u %s ls %s` fails",
                    user, user, data_dir)
    return Courier(user, account.pw_uid, None, home, socket_dir, external=True)


def _check_closed(account: pwd.struct_passwd, data_dir: Path, site_root: Path, groups: list[int] | None = None) -> None:
    """As the courier user (with `groups`, as it will run): it can run this Python, and cannot read
    the data or the site folder."""
    user, uid, gid = account.pw_name, account.pw_uid, account.pw_gid
    try:
        runs = _as_user(uid, gid, "import flwr.clientapp, numpy", groups=groups).returncode == 0
    except OSError:  # cannot even start the interpreter
        runs = False
    if not runs:
        closed = " ".join(str(p) for p in closed_python_folders())
        raise IsolationError(
            f"the courier user {user} cannot run this Python ({sys.executable}): install fedseg where other users can run "
            f"it (e.g. a venv under /opt), or let {user} pass through the folders above it: setfacl -m u:{user}:x {closed}")
    probe = "import os, sys\nprint(*[p for p in sys.argv[1:] if os.access(p, os.R_OK) or os.access(p, os.X_OK)])"
    readable = _as_user(uid, gid, probe, str(data_dir.resolve()), str(site_root.resolve()), groups=groups).stdout.split()
    if readable:
        raise IsolationError(
            f"the courier user {user} can read {', '.join(readable)}: the app bundle the coordinator ships would see "
            f"patient data. Close it to other users first (chmod -R o-rwx {' '.join(readable)}), then start the site again")


def prepare_courier(site_root: Path, data_dir: Path, user: str = COURIER_USER) -> Courier:
    """Folders and checks for the courier; as root, a separate user, else the same one."""
    site_root.mkdir(parents=True, exist_ok=True)
    sweep_stale_folders(courier_uid=_uid_of(user))
    socket_dir = Path(tempfile.mkdtemp(prefix=f"fedseg-guard-{os.getpid()}-"))
    home = Path(tempfile.mkdtemp(prefix=f"fedseg-courier-{os.getpid()}-"))
    if os.geteuid() != 0:
        return Courier(None, None, None, home, socket_dir)
    account = ensure_user(user)
    uid, gid = account.pw_uid, account.pw_gid
    os.chmod(site_root, 0o700)  # the site key, policy and ledger: the guard's alone
    os.chown(home, uid, gid)
    os.chown(socket_dir, 0, gid)
    os.chmod(socket_dir, 0o750)
    _check_closed(account, data_dir, site_root)
    return Courier(user, uid, gid, home, socket_dir)


def open_socket_to_courier(path: Path, courier: Courier) -> None:
    """Only the guard and the courier may connect."""
    if courier.external:
        os.chmod(path, 0o600)
        _grant(str(courier.user), "rw", path)
        return
    if courier.gid is not None:
        os.chown(path, 0, courier.gid)
    os.chmod(path, 0o660 if courier.isolated else 0o600)
