"""The guard's local wire: a Unix-domain socket, one request per connection, no pickle anywhere.

A frame is b"FSG1", the JSON header's length (4 bytes) and the arrays' length (8 bytes), then the
header (UTF-8 JSON) and the arrays (`.npz`, read with `allow_pickle=False`). Sizes are bounded
before anything is read into memory. The client side needs no torch: the courier uses it.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from common.array_codec import MAX_ARRAYS_BYTES, ArrayFormatError, Arrays, decode, encode

MAGIC = b"FSG1"
PREFIX = struct.Struct(">4sIQ")
MAX_HEADER_BYTES = 64 * 1024
log = logging.getLogger(__name__)


class GuardProtocolError(ConnectionError):
    """A frame that is not ours, too large, or cut short."""


class Handler(Protocol):
    def handle(self, header: Mapping[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]: ...


def _read_exactly(sock: socket.socket, count: int, deadline: float | None) -> bytes:
    chunks, left = [], count
    while left:
        if deadline is not None:  # the whole frame has a deadline, not each recv: no slow-drip reads
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuardProtocolError("frame not complete in time")
            sock.settimeout(remaining)
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise GuardProtocolError("connection closed mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def send_frame(sock: socket.socket, header: Mapping[str, Any], arrays: Arrays) -> None:
    head, body = json.dumps(header).encode(), encode(arrays) if arrays else b""
    sock.sendall(PREFIX.pack(MAGIC, len(head), len(body)) + head + body)


def read_frame(sock: socket.socket, timeout: float | None = None) -> tuple[dict[str, Any], Arrays]:
    deadline = None if timeout is None else time.monotonic() + timeout
    magic, head_len, body_len = PREFIX.unpack(_read_exactly(sock, PREFIX.size, deadline))
    if magic != MAGIC or head_len > MAX_HEADER_BYTES or body_len > MAX_ARRAYS_BYTES:
        raise GuardProtocolError("not a guard frame, or too large")
    try:
        header = json.loads(_read_exactly(sock, head_len, deadline))
        arrays = decode(_read_exactly(sock, body_len, deadline)) if body_len else {}
    except (ValueError, ArrayFormatError) as err:
        raise GuardProtocolError("malformed frame") from err
    if not isinstance(header, dict):
        raise GuardProtocolError("the header is not an object")
    return header, arrays


class GuardClient:
    """The courier's view of the guard: the same `handle` as the guard itself."""

    def __init__(self, path: str | Path, timeout: float = 3600.0) -> None:
        self.path, self.timeout = str(path), timeout

    def handle(self, header: Mapping[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            send_frame(sock, header, arrays)
            return read_frame(sock)


class GuardServer(socketserver.UnixStreamServer):
    """Serves one request at a time (a site trains one round at a time)."""

    def __init__(self, path: Path, guard: Handler, timeout: float = 60.0) -> None:
        self.guard, self.timeout = guard, timeout
        if path.is_socket():
            path.unlink()  # a stale socket left by a guard that was killed
        super().__init__(str(path), _Connection)


class _Connection(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: GuardServer = self.server  # type: ignore[assignment]
        try:
            header, arrays = read_frame(self.request, server.timeout)
        except (GuardProtocolError, OSError, struct.error) as err:
            log.warning("guard: dropped a malformed request (%s)", type(err).__name__)
            return
        reply, out = server.guard.handle(header, arrays)
        self.request.settimeout(server.timeout)  # a courier that never reads its reply does not hold the guard
        try:
            send_frame(self.request, reply, out)
        except OSError:
            log.warning("guard: the courier went away before the reply was sent")
