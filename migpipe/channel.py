"""Where the pipeline's bytes come from and go to: a file descriptor, or a TLS connection.

The pipeline calls these from worker threads (reads and writes block, and release the GIL), and
never reads and writes one channel at once. A plain fd covers pipes, files and sockets; a TLS
connection needs its own object (migpipe.tls) because its bytes pass through OpenSSL.
"""

import os
from collections.abc import Sequence
from typing import Protocol

from migpipe.errors import EXIT_PEER_GONE, MigpipeError

CHUNK = 1 << 20


class Channel(Protocol):
    def read(self) -> bytes | bytearray:
        """Up to CHUNK bytes as soon as some are there; b"" at the end."""
        ...

    def write(self, parts: Sequence[bytes | memoryview]) -> None:
        """All of `parts`, in order, however the other end splits its reads."""
        ...


class FdChannel:
    """A pipe, file or plain socket by its descriptor (not owned: the caller closes it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self) -> bytes:
        try:
            return os.read(self.fd, CHUNK)
        except ConnectionResetError as e:
            message = f"input connection reset ({e.strerror})"
            raise MigpipeError(message, status=EXIT_PEER_GONE) from None

    def write(self, parts: Sequence[bytes | memoryview]) -> None:
        views = [memoryview(p) for p in parts if len(p)]
        try:
            while views:
                written = os.writev(self.fd, views[:1024])
                while views and written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                if written:
                    views[0] = views[0][written:]
        except (BrokenPipeError, ConnectionResetError):
            message = "output closed by the reader (broken pipe)"
            raise MigpipeError(message, status=EXIT_PEER_GONE) from None


def as_channel(end: "int | Channel") -> Channel:
    """A descriptor becomes an FdChannel; a Channel stays as it is."""
    return FdChannel(end) if isinstance(end, int) else end
