"""Where the pipeline's bytes come from and go to: a file descriptor, or a TLS connection.

A Source is read and a Sink is written, each by one thread at a time (a pipeline stage's,
in a worker thread: reads and writes block, and release the GIL); a Channel is both ends of
one connection, used one direction at a time. A plain fd covers pipes, files and sockets and
can be either; a TLS connection needs its own object (migpipe.io.tls) because its bytes pass
through OpenSSL.
"""

import contextlib
import fcntl
import os
import select
import socket
import stat
import sys
import termios
import weakref
from collections.abc import Iterator, Sequence
from typing import Protocol

from migpipe.errors import (
    PeerGoneError,
    Stopped,
)
from migpipe.io import idle

CHUNK = 1 << 20
_INT = bytes(4)  # FIONREAD's out-parameter


class Source(Protocol):
    """Bytes read in order: the QEMU stream, a wire, a saved file.

    Threads: read() by one thread at a time, the stage that reads; interrupt() from any
    other, at any time. Memory: a buffer read() returns is the caller's alone; the source
    keeps no reference and never reuses it, so the caller may hand it to another thread,
    keep it, or change it (a bytearray) without a copy.
    """

    def read(self) -> bytes | bytearray:
        """Up to CHUNK bytes as soon as some are there (it blocks until then); b"" at the end."""
        ...

    def interrupt(self) -> None:
        """From another thread, never blocking: make the read that waits for the peer now,
        and every later one, raise Stopped (bytes already received, such as TLS records
        OpenSSL decrypted, may still come first). The pipeline calls it when it stops (a
        failed stage, Ctrl-C), so that a read from a silent peer (QEMU paused, an idle
        connection) does not hold it until the peer speaks.

        It ends waits for a peer only: not a read already copying bytes (a TLS record that
        has begun to arrive is read to its end), not a write (see Sink), and it closes
        nothing: the source's owner still does. A source whose reads never wait for a peer
        (a file, a disk) only refuses the reads after it."""
        ...


class Sink(Protocol):
    """Bytes written in order: the wire, the QEMU stream, a saved file.

    Threads: write() by one thread at a time, the stage that writes (or the trio task
    through trio.to_thread, for a wire's header and trailer, while no stage writes).
    Memory: the parts are lent for the call only; a sink copies what it keeps (DirectWriter
    into its ring), so the caller may reuse them once write() returns.

    A write is never interrupted: one that waits for a peer which stopped reading ends when
    the peer reads, or goes away (PeerGoneError). A sink whose writing direction can end
    before it is closed, as a connection's can, also has finish() (Finishable).
    """

    def write(self, parts: Sequence[bytes | memoryview]) -> None:
        """All of `parts`, in order, however the other end splits its reads."""
        ...


class Finishable(Sink, Protocol):
    """A Sink whose writing direction can end on its own (trio's HalfCloseableStream)."""

    def finish(self) -> None:
        """End the writing direction, after the last write and by the same thread (or once
        it is done): the reader sees the end of the bytes (TLS's close_notify, a socket's
        shutdown(SHUT_WR)) while an answer can still come back the other way. Errors are
        ignored, as the peer may be gone already; closing stays the owner's."""
        ...


class Channel(Source, Finishable, Protocol):
    """Both directions of one connection (a socket, TLS): the wire, when the other side
    answers on it. Never read and written at once: the destination's reading thread writes
    "opened" between two reads and the verdict after the last, and the source reads the
    answers after finish()."""


class Readable:
    """Waits until a descriptor is readable, unless interrupt() (from another thread) ends
    the wait, and every later one, with Stopped.

    The descriptor stays blocking (it may be shared: stdin, a terminal), so the wait is a poll
    on it and on an eventfd of our own, which interrupt() makes readable. The eventfd is made
    by the first wait or quiet() that can last (not on a file or a disk), so channels that only
    write, or read files, hold no descriptor of their own.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._ready = select.poll()
        self._ready.register(fd, select.POLLIN)
        self._wake: int | None = None
        self._may_wait: bool | None = None  # known at the first wait
        self._idle: int | None = None  # ms a wait may last, known then too; None: for ever
        self._stopping = False

    def interrupt(self) -> None:
        self._stopping = True  # before looking at _wake: see wait()
        if self._wake is not None:
            os.eventfd_write(self._wake, 1)

    def _first_wait(self) -> None:
        """What a wait needs, known only once the descriptor is in use (see the class)."""
        self._may_wait = _may_wait(self.fd)
        self._idle = idle.read_deadline(self.fd)  # a socket's --idle-timeout, set by now
        if self._may_wait:
            wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            weakref.finalize(self, os.close, wake)
            self._ready.register(wake, select.POLLIN)
            self._wake = wake  # an interrupt() from now on wakes the polls below

    def wait(self) -> None:
        if self._may_wait is None:
            self._first_wait()
        if self._stopping:  # an interrupt() that came before, or saw no eventfd yet
            raise Stopped
        if not self._may_wait:  # a file or disk: always readable, a poll would only say so
            return
        if not self._ready.poll(self._idle):
            raise idle.silent(self.fd)
        if self._stopping:
            raise Stopped

    def quiet(self, seconds: float) -> bool:
        """Whether nothing (no byte, no end) arrives within `seconds`; Stopped as wait()."""
        if self._may_wait is None:  # a quiet() before the first read: interrupt() must end it
            self._first_wait()
        if self._stopping:
            raise Stopped
        quiet = not self._ready.poll(seconds * 1000)  # an interrupt() ends it too
        if self._stopping:
            raise Stopped
        return quiet


class FdChannel:
    """A pipe, file or plain socket by its descriptor (not owned: the caller closes it): a
    Source, a Sink, or both (a Channel) when it is a socket. `name` is what messages call it
    ("standard output", a path, an address); "fd N" when not given."""

    def __init__(self, fd: int, name: str | None = None) -> None:
        self.fd = fd
        self.name = f"fd {fd}" if name is None else name
        self._readable = Readable(fd)

    def interrupt(self) -> None:
        self._readable.interrupt()

    def quiet(self, seconds: float) -> bool:
        """Whether the peer stays silent for `seconds`: a reader holding a partial frame sends
        it on then rather than wait for bytes that may not come soon (QEMU between passes)."""
        return self._readable.quiet(seconds)

    def read(self) -> bytes:
        with _reset_is_peer_gone():
            self._readable.wait()  # so that read_waiting sees what the wait brought
            return read_waiting(self.fd)

    def readinto(self, view: memoryview) -> int:
        """Read into `view` what is there, waiting for the first byte (interruptibly) as read()
        does; 0 at the end. For a consumer that owns the memory the bytes must land in."""
        with _reset_is_peer_gone():
            self._readable.wait()
            return os.readv(self.fd, [view])

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
            message = f"{self.name} closed by the reader (broken pipe)"
            raise PeerGoneError(message) from None
        except BlockingIOError:  # a socket's --idle-timeout (SO_SNDTIMEO) ran out
            raise idle.stalled(self.fd, self.name) from None

    def finish(self) -> None:
        """A socket's shutdown(SHUT_WR): its peer reads the end, and can still answer. A pipe's
        end is replaced by /dev/null, so that its reader sees the end now, not when this
        process exits (writing its figures, tearing down) while a guest waits. The descriptor
        stays the caller's to close; a file is left as it is."""
        with contextlib.suppress(OSError):  # a peer gone already
            mode = os.fstat(self.fd).st_mode
            if stat.S_ISSOCK(mode):
                sock = socket.socket(fileno=self.fd)
                try:
                    sock.shutdown(socket.SHUT_WR)
                finally:
                    sock.detach()  # the descriptor stays the caller's
            elif stat.S_ISFIFO(mode):
                null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.dup2(null, self.fd)
                finally:
                    os.close(null)


@contextlib.contextmanager
def _reset_is_peer_gone() -> Iterator[None]:
    try:
        yield
    except ConnectionResetError as e:
        message = f"input connection reset ({e.strerror})"
        raise PeerGoneError(message) from None


def _may_wait(fd: int) -> bool:
    """Whether a read of `fd` can wait for a peer: not for a regular file or a block device."""
    mode = os.fstat(fd).st_mode
    return not (stat.S_ISREG(mode) or stat.S_ISBLK(mode))


def read_waiting(fd: int) -> bytes:
    """os.read of what is waiting in `fd`, up to CHUNK, sized by FIONREAD where the fd answers
    it: a 1 MiB read that comes back short shrinks its buffer in place and leaves a hole in the
    heap, and such holes held decode's RSS at 2.5x what it used when it read faster than encode
    wrote. With nothing waiting (or no answer) it reads CHUNK: the end, or a wait."""
    try:
        waiting = int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, _INT), sys.byteorder)
    except OSError:  # not a pipe, socket, tty or regular file
        waiting = 0
    return os.read(fd, min(waiting, CHUNK) or CHUNK)


def as_source(end: int | Source) -> Source:
    """A descriptor becomes an FdChannel; a Source stays as it is."""
    return FdChannel(end) if isinstance(end, int) else end


def as_sink(end: int | Sink) -> Sink:
    """A descriptor becomes an FdChannel; a Sink stays as it is."""
    return FdChannel(end) if isinstance(end, int) else end


# What a failed QEMU stream ends as when not one byte of it went out: QEMU reads a stream's first
# four bytes as its magic ("QEVM"), so these make it fail the load at once.
NOT_A_STREAM = b"MGP!"


class _Watched:
    """A sink that remembers whether anything was (or may have been) written to it."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.touched = False

    def write(self, parts: Sequence[bytes | memoryview]) -> None:
        if any(len(p) for p in parts):
            self.touched = True  # before the write: a partial write counts
        self.sink.write(parts)


@contextlib.contextmanager
def stream_sink(end: int | Sink) -> Iterator[Sink]:
    """The sink a QEMU stream is written to, failing visibly to QEMU.

    QEMU 7.2 starts an incoming `exec:` or `fd:` migration from a watch that waits for its pipe
    to be readable; a pipe whose writer closed with nothing in it is only hung up, never
    readable, so QEMU would spin on it forever instead of failing the load. So when the stream
    fails before its first byte, NOT_A_STREAM goes out first (to a pipe or socket: QEMU never
    reads a file or a TLS channel from us), and QEMU ends the load with "Not a migration
    stream". After the first byte there is nothing to add: QEMU reads the end of its pipe
    mid-stream and fails.
    """
    watched = _Watched(as_sink(end))
    try:
        yield watched
    except BaseException:
        target = watched.sink
        if not watched.touched and isinstance(target, FdChannel) and _live(target.fd):
            with contextlib.suppress(OSError):
                os.write(target.fd, NOT_A_STREAM)  # 4 bytes into an empty pipe: never blocks
        raise


def _live(fd: int) -> bool:
    """Whether a reader may be taking the stream as it comes (a pipe or a socket), not a file
    that is discarded anyway."""
    with contextlib.suppress(OSError):
        mode = os.fstat(fd).st_mode
        return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
    return False
