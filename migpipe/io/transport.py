"""Connections for encode and decode: TCP (`HOST:PORT`, `[V6]:PORT`) and UNIX (`unix:PATH`).

The pipeline works on file descriptors, so a connected socket simply replaces a pipe. Sockets
stay two-way (postcopy's page requests will ride back on the same connection). `--connect`
retries while the listener is not up yet, because the two ends of a migration are usually
started at the same time by different hosts.

`--listen` takes the first connection that its gate admits (a TLS handshake and peer check, or
the wire's first bytes), so that a port scanner or a stray client cannot end a listener that
waits for a migration. Connections are checked side by side, each for at most `patience`
seconds: one that says nothing holds only itself up, not the real peer behind it. The whole
wait has a deadline, since a destination QEMU waiting for a source that never comes would
otherwise wait for ever.
"""

import contextlib
import errno
import logging
import os
import select
import socket
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

from migpipe.errors import (
    MigpipeError,
    PeerGoneError,
    Stopped,
    printable,
)
from migpipe.io.channel import Channel, FdChannel

UNSENT = 128 << 10  # bytes a TCP socket may hold not yet sent (TCP_NOTSENT_LOWAT)
RETRY_FIRST, RETRY_MAX = 0.05, 1.0
ACCEPT_TIMEOUT = 120.0  # --accept-timeout's default: see migpipe(1)
CONNECT_TIMEOUT = 30.0  # --connect-timeout's default, and restore --qemu's
PATIENCE = 30.0  # what one connection is given to prove itself the peer
MAX_PENDING = 16  # connections being checked at once; a new one pushes out the oldest
LOG_BURST, LOG_EVERY = 10, 6.0  # refusal lines: 10 at once, then one per 6 s (10 a minute)
logger = logging.getLogger(__name__)  # what migpipe -v prints

# A gate checks one accepted connection without blocking: it yields the poll events it waits
# for, returns the socket to hand on (a TLS one, say), or raises MigpipeError saying why the
# connection is refused. A TimeoutError is thrown in when it takes longer than `patience`.
Gate = Callable[[socket.socket], Generator[int, None, socket.socket]]


def parse_endpoint(spec: str, *, listening: bool) -> tuple[int, object]:
    """(address family, address) for `unix:PATH`, `HOST:PORT`, `[V6]:PORT` or `PORT`."""
    if spec.startswith("unix:"):
        return socket.AF_UNIX, spec[5:]
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = ("" if listening else "localhost"), spec
    host = host.removeprefix("[").removesuffix("]")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise MigpipeError(f"bad endpoint {spec}: expected HOST:PORT, [V6]:PORT or unix:PATH")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


def tune(sock: socket.socket) -> None:
    """A TCP connection sends each frame at once and keeps little unsent: what the kernel
    holds for a slow link is what a stopped guest waits for (io.latency). The buffers stay
    the kernel's to size (autotuning follows the link); a UNIX socket keeps its defaults."""
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, UNSENT)


@contextlib.contextmanager
def connect(spec: str, timeout: float) -> Iterator[socket.socket]:
    """A connection to `spec`, retried for `timeout` seconds while nobody listens there yet."""
    with connect_socket(spec, timeout) as sock:
        yield sock


def connect_socket(spec: str, timeout: float) -> socket.socket:
    """connect()'s connection, the caller's to close."""
    family, address = parse_endpoint(spec, listening=False)
    logger.info("connecting to %s (retried for %g s while nobody listens)", spec, timeout)
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
                raise PeerGoneError(f"cannot connect to {spec}: {e.strerror}") from None
            time.sleep(delay)  # the listener is not up yet: back off and try again
            delay = min(delay * 2, RETRY_MAX)
        except OSError as e:
            raise PeerGoneError(f"cannot connect to {spec}: {e.strerror or e}") from None
    tune(sock)
    logger.info("connected to %s", spec)
    return sock


@contextlib.contextmanager
def listen(
    spec: str,
    gate: Gate | None = None,
    *,
    timeout: float = ACCEPT_TIMEOUT,
    patience: float = PATIENCE,
    log: Callable[[str], None] | None = None,
) -> Iterator[socket.socket]:
    """The first connection on `spec` that `gate` admits (without a gate: the first one),
    within `timeout` seconds (0: no limit); the listening socket is closed right after.
    Refused connections are closed and reported to `log`, at a bounded rate."""
    with listening(spec) as server:
        conn = accept(server, spec, gate, timeout=timeout, patience=patience, log=log)
    with conn:
        yield conn


def accept(
    server: socket.socket,
    spec: str,
    gate: Gate | None = None,
    *,
    timeout: float = ACCEPT_TIMEOUT,
    patience: float = PATIENCE,
    log: Callable[[str], None] | None = None,
) -> socket.socket:
    """listen()'s first admitted connection on `server`, which stays open: the caller's."""
    logger.info("listening on %s for %s", spec, f"{timeout:g} s" if timeout else "ever")
    conn = _Admission(server, spec, gate, patience, log or _stderr).run(timeout)
    tune(conn)
    return conn


@contextlib.contextmanager
def listening(spec: str) -> Iterator[socket.socket]:
    """A socket listening on `spec` (a UNIX socket only our user may use), closed and its path
    removed afterwards."""
    family, address = parse_endpoint(spec, listening=True)
    try:
        if family == socket.AF_UNIX:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(address)
            os.chmod(address, 0o600)  # only our user may feed or read a migration
            server.listen(MAX_PENDING)
        else:
            server = socket.create_server(
                address, family=family, backlog=MAX_PENDING, reuse_port=False
            )
    except OSError as e:  # strerror alone: create_server's adds the address as a tuple
        raise MigpipeError(f"cannot listen on {spec}: {os.strerror(e.errno or 0)}") from None
    try:
        with server:
            yield server
    finally:
        if family == socket.AF_UNIX:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address)


def first_bytes(expected: bytes) -> Gate:
    """A gate for a listener that reads the wire: the peer's first bytes must be `expected`
    (the wire's magic)."""

    def check(first: bytes) -> None:
        if first != expected:
            raise MigpipeError(f"not a migpipe wire (it began with {printable(first[:8])})")

    return peeking(len(expected), check)


def peeking(size: int, check: Callable[[bytes], None], local: bool = False) -> Gate:
    """A gate that admits a peer whose first `size` bytes `check` accepts (it raises
    MigpipeError saying why not). They are peeked, not read, so the wire reaches its parser
    whole, and SO_RCVLOWAT makes the poll wait for all of them, not wake on the first.
    A UNIX socket's peer is admitted unchecked (0600: only our own user can connect) unless
    `local`: the check is then not against strangers (see wire.first_connection)."""

    def gate(conn: socket.socket) -> Generator[int, None, socket.socket]:
        if conn.family == socket.AF_UNIX and not local:
            return conn
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)
        try:
            yield select.POLLIN
        except TimeoutError:
            raise MigpipeError(f"no {size} bytes of a wire in time") from None
        first = conn.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if not first:
            raise MigpipeError("closed without sending anything")
        if len(first) < size:  # the poll woke for the end, not for the bytes
            raise MigpipeError(f"closed after {len(first)} bytes")
        check(first)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return conn

    return gate


@dataclass
class _Checking:
    """An accepted connection that its gate is checking."""

    conn: socket.socket
    peer: str
    steps: Generator[int, None, socket.socket]
    until: float


class _Admission:
    """The accept loop of listen(): connections are checked side by side, by poll. Run once,
    the connections still being checked are dropped when it returns; run again and again
    (Acceptor's), they stay until close(), and `wake`, an eventfd, ends a run with Stopped."""

    def __init__(
        self,
        server: socket.socket,
        spec: str,
        gate: Gate | None,
        patience: float,
        log: Callable[[str], None],
        wake: int | None = None,
    ) -> None:
        self.server, self.spec, self.gate, self.patience = server, spec, gate, patience
        self.log = _RateLimited(log)
        self.checking: dict[int, _Checking] = {}
        self.poller = select.poll()
        self.poller.register(server, select.POLLIN)
        self.wake = wake
        if wake is not None:
            self.poller.register(wake, select.POLLIN)
        self.refused = 0

    def run(self, timeout: float, again: bool = False) -> socket.socket:
        deadline = time.monotonic() + timeout if timeout else None
        try:
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    more = f" ({self.refused} refused)" if self.refused else ""
                    message = f"no connection on {self.spec} within {timeout:g} s{more}"
                    raise PeerGoneError(message)
                for fd in [fd for fd, c in self.checking.items() if c.until <= now]:
                    if admitted := self._step(fd, TimeoutError(errno.ETIMEDOUT, "timed out")):
                        return admitted
                ends = [c.until for c in self.checking.values()]
                if deadline is not None:
                    ends.append(deadline)
                wait = max(0, min(ends) - now) * 1000 if ends else None
                ready = self.poller.poll(wait)
                polled = dict(self.checking)  # an fd dropped, or reused, since has no event
                for fd, _ in ready:
                    if fd == self.wake:
                        raise Stopped
                    if fd == self.server.fileno():
                        admitted = self._accept()
                    elif fd in polled and self.checking.get(fd) is polled[fd]:
                        admitted = self._step(fd)
                    else:
                        continue
                    if admitted:
                        return admitted
        finally:
            if not again:
                self.close()

    def close(self) -> None:
        for fd in list(self.checking):
            self._drop(fd)
        self.log.flush()

    def _accept(self) -> socket.socket | None:
        try:
            conn, address = self.server.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return None  # gone before we took it
        logger.info("accepted a connection on %s from %s", self.spec, _address(address))
        if self.gate is None:
            return conn
        if len(self.checking) >= MAX_PENDING:
            oldest = min(self.checking, key=lambda fd: self.checking[fd].until)
            self._refuse(oldest, "pushed out by newer connections")
        peer = _address(address)
        fd = conn.fileno()
        self.checking[fd] = _Checking(conn, peer, self.gate(conn), time.monotonic() + self.patience)
        return self._step(fd)

    def _step(self, fd: int, error: BaseException | None = None) -> socket.socket | None:
        """Run the gate of connection `fd` on (throwing `error` into it): the socket it admits,
        or None while it waits or after it refused."""
        checking = self.checking[fd]
        try:
            events = checking.steps.throw(error) if error else next(checking.steps)
        except StopIteration as done:
            del self.checking[fd]  # the caller returns it: the others are dropped
            return done.value
        except (MigpipeError, OSError) as e:
            reason = e.message if isinstance(e, MigpipeError) else (e.strerror or str(e))
            self._refuse(fd, reason)
            return None
        self.poller.register(fd, events)  # again: modifies what it waits for
        return None

    def _refuse(self, fd: int, reason: str) -> None:
        peer = self.checking[fd].peer
        self._drop(fd)
        self.refused += 1
        self.log(f"refused a connection on {self.spec} from {peer}: {reason}")

    def _drop(self, fd: int) -> None:
        checking = self.checking.pop(fd)
        with contextlib.suppress(KeyError):
            self.poller.unregister(fd)
        checking.steps.close()  # a gate closes the socket it made (a TLS one)
        checking.conn.close()


class _RateLimited:
    """A log that passes LOG_BURST lines at once, then one per LOG_EVERY seconds, and counts
    the rest, so that a flood of connections cannot flood the log."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.write = log
        self.tokens = float(LOG_BURST)
        self.last = time.monotonic()
        self.dropped = 0

    def __call__(self, line: str) -> None:
        now = time.monotonic()
        self.tokens = min(LOG_BURST, self.tokens + (now - self.last) / LOG_EVERY)
        self.last = now
        if self.tokens < 1:
            self.dropped += 1
            return
        self.tokens -= 1
        self.flush()
        self.write(line)

    def flush(self) -> None:
        """Say how many lines were left out, if any."""
        if self.dropped:
            self.write(f"{self.dropped} more refused connections not logged")
            self.dropped = 0


def _address(address: object) -> str:
    """A peer address as HOST:PORT, [V6]:PORT, or "a local process" (UNIX sockets)."""
    if isinstance(address, tuple):
        host, port = address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "a local process"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Dialer:
    """The connecting side's further connections of a wire spread over several (encode
    --connections): each opened when asked, to the address the first went to, through the
    same TLS wrapping. They are closed together by close(). No --idle-timeout watches them:
    a lane may rightly be silent for long (postcopy-preempt's between requests), and the
    first connection, which encode keeps alive, is watched."""

    def __init__(
        self,
        spec: str,
        timeout: float,
        wrap: Callable[[socket.socket], Channel] | None,
    ) -> None:
        self.spec, self.timeout, self.wrap = spec, timeout, wrap
        self._owned = contextlib.ExitStack()

    def open(self) -> Channel:
        sock = self._owned.enter_context(connect_socket(self.spec, self.timeout))
        if self.wrap is None:
            return FdChannel(sock.fileno(), f"a connection to {self.spec}")
        return self._owned.enter_context(self.wrap(sock))

    def interrupt(self) -> None:
        """Nothing to end: a connect is bounded by its timeout, a handshake by its own."""

    def close(self) -> None:
        self._owned.close()


class Acceptor:
    """The listening side's connections of a wire spread over several, on one listening socket
    that stays open for them: the first (first()), then each further one when asked (open()),
    within `timeout` seconds of the ask, interruptibly, admitted by a TLS handshake (`gate`,
    with `wrap`) or else by their first bytes, so that a stray connection, or one of another
    wire, is refused and the wait goes on. Connections being checked are kept from one ask to
    the next, as several may arrive at once. They, and the socket, are closed together by
    close(); first()'s is the caller's."""

    def __init__(
        self,
        server: socket.socket,
        spec: str,
        gate: Gate | None,
        wrap: Callable[[socket.socket], Channel] | None,
        timeout: float,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.spec, self.wrap, self.timeout = spec, wrap, timeout
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._owned = contextlib.ExitStack()
        self._owned.callback(os.close, self._wake)
        self._admission = _Admission(server, spec, gate, PATIENCE, log or _stderr, self._wake)
        self._owned.callback(self._admission.close)
        self._early: list[socket.socket] = []  # further connections that came before the first

    def first(self, starts: tuple[int, Callable[[bytes], bool]] | None = None) -> socket.socket:
        """The wire's first connection. With `starts` (size, starts: a listener that reads
        the wire, not over TLS) it is the first admitted whose first `size` bytes `starts`
        says begin a wire; it raises MigpipeError for a stray's, and says False for a further
        connection's, which is kept for open(): a further connection may overtake the first
        on its way (a relay that lost the first one). Else the first admitted."""
        if starts is not None and self.wrap is None:
            size, begins = starts
            self._admission.gate = peeking(size, begins, local=True)
        while True:
            sock = self._wait("connection")
            if starts is None or self.wrap is not None:
                return sock
            if starts[1](sock.recv(starts[0], socket.MSG_PEEK)):
                return sock
            self._early.append(self._owned.enter_context(sock))

    def open(self, peek: tuple[int, Callable[[bytes], None]] | None = None) -> Channel:
        """A further connection: one that came early, or the next admitted, by `peek` (size,
        check: the JOIN, checked before it is taken, UNIX too, so that a late connection of
        an earlier try at the same wire is refused, not taken; not over TLS)."""
        sock = None
        while self._early and sock is None:  # those of another wire (an earlier try) go
            sock = self._early.pop(0)
            try:
                if peek is not None:
                    peek[1](sock.recv(peek[0], socket.MSG_PEEK))
            except MigpipeError as e:
                self._admission.log(f"refused a connection on {self.spec}: {e.message}")
                sock.close()
                sock = None
        if sock is None:
            if self.wrap is None and peek is not None:
                self._admission.gate = peeking(*peek, local=True)
            sock = self._owned.enter_context(self._wait("further connection"))
        if self.wrap is None:
            return FdChannel(sock.fileno(), f"a connection on {self.spec}")
        return self._owned.enter_context(self.wrap(sock))

    def _wait(self, what: str) -> socket.socket:
        logger.info(
            "listening on %s for %s", self.spec, f"{self.timeout:g} s" if self.timeout else "ever"
        )
        try:
            sock = self._admission.run(self.timeout, again=True)
        except PeerGoneError:
            raise PeerGoneError(f"no {what} on {self.spec} within {self.timeout:g} s") from None
        tune(sock)
        return sock

    def interrupt(self) -> None:
        os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        self._owned.close()
