"""Connections for encode and decode: TCP (`HOST:PORT`, `[V6]:PORT`) and UNIX (`unix:PATH`).

The pipeline works on file descriptors, so a connected socket simply replaces a pipe. Sockets
stay two-way (postcopy's page requests will ride back on the same connection). `--connect`
retries while the listener is not up yet, because the two ends of a migration are usually
started at the same time by different hosts.
"""

import contextlib
import os
import socket
import time
from collections.abc import Iterator

from migpipe.errors import EXIT_PEER_GONE, MigpipeError

SOCKET_BUFFER = 4 << 20
RETRY_FIRST, RETRY_MAX = 0.05, 1.0


def parse_endpoint(spec: str, *, listening: bool) -> tuple[int, object]:
    """(address family, address) for `unix:PATH`, `HOST:PORT`, `[V6]:PORT` or `PORT`."""
    if spec.startswith("unix:"):
        return socket.AF_UNIX, spec[5:]
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = ("" if listening else "localhost"), spec
    host = host.removeprefix("[").removesuffix("]")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise MigpipeError(f"bad endpoint {spec!r}: expected HOST:PORT, [V6]:PORT or unix:PATH")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


def _tune(sock: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@contextlib.contextmanager
def connect(spec: str, timeout: float) -> Iterator[socket.socket]:
    """A connection to `spec`, retried for `timeout` seconds while nobody listens there yet."""
    family, address = parse_endpoint(spec, listening=False)
    deadline = time.monotonic() + timeout
    delay = RETRY_FIRST
    while True:
        try:
            if family == socket.AF_UNIX:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(address)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(address)
            break
        except (ConnectionRefusedError, FileNotFoundError) as e:
            if time.monotonic() + delay > deadline:
                raise MigpipeError(
                    f"cannot connect to {spec}: {e.strerror}", status=EXIT_PEER_GONE
                ) from None
            time.sleep(delay)  # the listener is not up yet: back off and try again
            delay = min(delay * 2, RETRY_MAX)
        except OSError as e:
            raise MigpipeError(f"cannot connect to {spec}: {e.strerror or e}",
                               status=EXIT_PEER_GONE) from None  # fmt: skip
    with sock:
        _tune(sock)
        yield sock


@contextlib.contextmanager
def listen(spec: str) -> Iterator[socket.socket]:
    """The first connection accepted on `spec`; the listening socket is closed right after."""
    family, address = parse_endpoint(spec, listening=True)
    try:
        if family == socket.AF_UNIX:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(address)
            os.chmod(address, 0o600)  # only our user may feed or read a migration
            server.listen(1)
        else:
            server = socket.create_server(address, family=family, reuse_port=False)
    except OSError as e:
        raise MigpipeError(f"cannot listen on {spec}: {e.strerror or e}") from None
    try:
        with server:
            conn, _ = server.accept()
    finally:
        if family == socket.AF_UNIX:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address)
    with conn:
        _tune(conn)
        yield conn
