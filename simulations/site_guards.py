"""A simulation's sites as a deployment runs them: each site's guard in a process of its own, served
on a Unix socket (`client.guard_socket`), so the couriers Flower loads by name reach them the way a
deployed courier does, and a site's ledger is only ever written by its one guard process.

    python -m simulations.site_guards SITE_FOLDER STATE_DIR SOCKET THREADS [FAULT,...]
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.errors import FedsegError
from common.processes import FlowerProcess

START_TIMEOUT = 300.0  # a guard imports torch and opens its policy and ledger: slow on a busy machine, never minutes


class SiteGuardError(FedsegError):
    """A site's guard process did not start."""


def serve(folder: str, state_dir: str, socket_path: str, threads: int, kinds: Sequence[str] = ()) -> None:
    """The guard process: open the site's guard (faulty if `kinds`) and answer its socket until stopped."""
    import torch

    from client.guard import open_guard
    from client.guard_socket import GuardServer, Handler
    from client.site_state import SiteState
    from simulations.faults import FaultyGuard

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")  # the site's own log
    torch.set_num_threads(threads)
    name = Path(folder).name
    guard: Handler
    guard, _ = open_guard(SiteState(Path(state_dir)), name, folder)
    if kinds:
        guard = FaultyGuard(guard, name, kinds)
    with GuardServer(Path(socket_path), guard) as server:
        server.serve_forever()


@dataclass(frozen=True)
class SiteGuards:
    """The running guards: their socket paths, in site order."""

    sites: Sequence[str]
    sockets: list[str]
    processes: list[FlowerProcess]

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until every guard answers on its socket; SiteGuardError if one died or time ran out."""
        deadline = time.monotonic() + timeout
        for site, guard, path in zip(self.sites, self.processes, self.sockets, strict=True):
            while not Path(path).is_socket():
                if not guard.running() or time.monotonic() > deadline:
                    raise SiteGuardError(f"the guard of {Path(site).name} did not start (see {guard.log_file}):\n{guard.output_tail(8)}")
                time.sleep(0.2)


@contextmanager
def serve_guards(sites: Sequence[str], state_root: Path, faults: dict[int, list[str]], threads: int,
                 log_dir: Path) -> Iterator[SiteGuards]:
    """Starts one guard process per site (`faults` by site index), each with `threads` torch threads and
    its log in `log_dir`, and stops them all on leaving. They start in the background (importing torch
    takes a while): `wait_ready` before anything dials them."""
    folder = Path(tempfile.mkdtemp(prefix="fedseg-sim-"))  # short: a socket path has at most 107 bytes
    sockets = [str(folder / f"{index}.sock") for index in range(len(sites))]
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        processes = []
        for index, site in enumerate(sites):
            name = Path(site).name
            command = [sys.executable, "-m", __name__, site, str(state_root / name), sockets[index], str(threads),
                       ",".join(faults.get(index, []))]
            processes.append(FlowerProcess(command, dict(os.environ), Path.cwd(), log_dir / f"guard-{name}.log", console=False))
            stack.callback(processes[-1].stop)
        yield SiteGuards(sites, sockets, processes)


if __name__ == "__main__":
    site_folder, state, socket_file, thread_count, fault_kinds = sys.argv[1:6]
    serve(site_folder, state, socket_file, int(thread_count), [k for k in fault_kinds.split(",") if k])
