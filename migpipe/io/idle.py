"""How long a connected peer may send, or take, nothing before migpipe gives up on it.

A peer that stops mid-stream (its host hung, a firewall that drops the packets) would
otherwise hold a reader for ever: TCP notices only once its retransmissions give up, 15
minutes and more later, and a UNIX socket never does. The deadline (--idle-timeout) is kept
on the socket itself, as SO_RCVTIMEO and SO_SNDTIMEO: io.channel.Readable polls no longer
than the first before a read, and a blocking write returns EAGAIN after the second, so every
reader and writer of the socket (plain or TLS, the pipeline's threads) keeps it without
being handed it. It counts silence, not the whole transfer: each byte starts it again.

QEMU itself can be silent for long in a migration that is merely slow (between passes, or
paused before switchover), so encode sends an empty frame when its input has been quiet for
KEEPALIVE seconds: decode's deadline then counts its peer's silence, never QEMU's.
"""

import contextlib
import os
import socket
import stat
import struct

from migpipe.errors import IdleError

IDLE_TIMEOUT = 120.0  # --idle-timeout's default: a dozen keepalives missed
KEEPALIVE = 10.0  # seconds of quiet input after which encode sends an empty frame
_TIMEVAL = struct.Struct("@ll")  # struct timeval, as SO_RCVTIMEO and SO_SNDTIMEO take it


def watch(fd: int, seconds: float, *, reading: bool = False, writing: bool = False) -> None:
    """Give the socket `fd` a deadline of `seconds` (0: none) for its reads or writes; a
    pipe or a file is left alone (its peer is local: ssh keeps its own watch on a link)."""
    if not seconds or not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return
    value = _TIMEVAL.pack(int(seconds), round(seconds % 1 * 1_000_000))
    sock = socket.socket(fileno=fd)
    try:
        for wanted, option in ((reading, socket.SO_RCVTIMEO), (writing, socket.SO_SNDTIMEO)):
            if wanted:
                sock.setsockopt(socket.SOL_SOCKET, option, value)
    finally:
        sock.detach()  # the descriptor stays its owner's


def keepalive(wire: object) -> float:
    """How long encode's input may be quiet before it sends an empty frame down `wire`:
    KEEPALIVE, or a quarter of the deadline its socket has (the reader's is as a rule the
    same, from the same config file), so that a short --idle-timeout at both ends holds."""
    fd = getattr(wire, "fd", None)  # an io.channel.FdChannel
    if fd is None and hasattr(wire, "socket"):  # an io.tls.TlsChannel
        fd = wire.socket.fileno()
    seconds = None if fd is None else _deadline(fd, socket.SO_SNDTIMEO)
    return KEEPALIVE if seconds is None else min(KEEPALIVE, seconds / 4)


def read_deadline(fd: int) -> int | None:
    """How long (ms) a read of `fd` may wait for its peer, for poll(): the socket's
    SO_RCVTIMEO; None (for ever) when it has none, or is no socket."""
    return _poll_ms(_deadline(fd, socket.SO_RCVTIMEO))


def write_deadline(fd: int) -> int | None:
    """How long (ms) a write of `fd` may wait for its peer to take bytes, for poll(): the
    socket's SO_SNDTIMEO, for a non-blocking socket's writer (TLS's), whose sends ignore it;
    None (for ever) when it has none, or is no socket."""
    return _poll_ms(_deadline(fd, socket.SO_SNDTIMEO))


def _poll_ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(1, round(seconds * 1000))


def silent(fd: int, seconds: float | None = None, name: str | None = None) -> IdleError:
    """The error for a read of `fd` (`name`, else its peer's address) that waited its whole
    deadline (`seconds`, else its SO_RCVTIMEO) for one byte."""
    if seconds is None:
        seconds = _deadline(fd, socket.SO_RCVTIMEO) or 0.0
    return IdleError(
        f"{name or peer(fd)}: nothing came for {seconds:g} s; the peer is connected but silent "
        "(--idle-timeout SECONDS; 0 waits for ever)"
    )


def stalled(fd: int, name: str, seconds: float | None = None) -> IdleError:
    """The error for a write to `fd` (`name`, as messages call it) that sent nothing within
    its deadline (`seconds`, else its SO_SNDTIMEO), or found a descriptor made non-blocking
    by someone else full."""
    if seconds is None:
        seconds = _deadline(fd, socket.SO_SNDTIMEO)
    if seconds is None:
        return IdleError(f"{name} is non-blocking and full: cannot wait for its reader")
    return IdleError(
        f"{name}: the peer took nothing for {seconds:g} s; it is connected but not reading "
        "(--idle-timeout SECONDS; 0 waits for ever)"
    )


def peer(fd: int) -> str:
    """The other end of socket `fd` as messages show it: HOST:PORT, [V6]:PORT, unix:PATH
    (the path it was reached by, on either side), or the descriptor of an unnamed pair."""
    sock = socket.socket(fileno=fd)
    try:
        if sock.family == socket.AF_UNIX:
            path = sock.getpeername() or sock.getsockname()
            if path:
                return f"unix:{path}"
            return "standard input (a UNIX socket)" if fd == 0 else f"fd {fd} (a UNIX socket)"
        host, port = sock.getpeername()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    except OSError:
        return f"the peer of fd {fd}"
    finally:
        sock.detach()


def _deadline(fd: int, option: int) -> float | None:
    """The socket's timeout `option` in seconds; None when unset (0) or `fd` is no socket."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            sock = socket.socket(fileno=fd)
            try:
                raw = sock.getsockopt(socket.SOL_SOCKET, option, _TIMEVAL.size)
            finally:
                sock.detach()
            seconds, micros = _TIMEVAL.unpack(raw)
            return (seconds + micros / 1_000_000) or None
    return None
