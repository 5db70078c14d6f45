"""migrate, incoming, save and restore: drive a running QEMU over QMP and carry its stream
through migpipe.

As libvirt does for its tunnelled migrations and its save files: make a pipe, hand QEMU one end
with `getfd`, and `migrate` (or, on a destination started with `-incoming defer`,
`migrate-incoming`) to `fd:NAME`; migpipe runs encode, decode, save or restore on the other
end. QEMU only ever sees a pipe, so whatever migpipe does on the way (filters, a connection,
ssh, a file) is invisible to it.

What makes this safe is what happens on a failure:
- on the source, the pipe's read end is closed as soon as encode (save) stops, so a QEMU
  blocked writing to it gets EPIPE instead of hanging; `migrate_cancel` ends the migration
  and the VM is left running (`cont` when QEMU, or save, had already stopped it, or QEMU
  completed, before the wire or the file failed); a save names its file only once QEMU
  completed, so a failed save never leaves a file beside a running VM;
- on the destination, a failed decode (restore) closes the pipe without the stream's EOF item
  (both hold it back until every check passed), so QEMU fails the load instead of completing
  it;
- the destination's outcome travels back as one JSON line (on the wire's connection, or a
  command's stdout), and the source calls the migration done only then, so a destination
  that fails at the very end still gets the source resumed: libvirt's Confirm phase.
"""

import base64
import contextlib
import functools
import json
import logging
import math
import os
import select
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import trio

from migpipe import chain as filters
from migpipe.errors import (
    MigpipeError,
    PeerGoneError,
    UnconfirmedError,
    printable,
)
from migpipe.io.channel import Channel, FdChannel, Sink, Source, as_sink, as_source
from migpipe.io.direct import Direct
from migpipe.io.files import enlarge_pipe
from migpipe.keys import Secrets
from migpipe.lines import LineSplitter, LineTooLong
from migpipe.qemu import qmp
from migpipe.save import savefile
from migpipe.tunnel.dataplane import run_interruptible
from migpipe.tunnel.pipeline import Totals, decode, encode
from migpipe.tunnel.progress import Progress
from migpipe.wire.header import sealer_of

if TYPE_CHECKING:
    from migpipe.io.tls import TlsChannel
    from migpipe.io.transport import Acceptor, Dialer
    from migpipe.wire import Connections

logger = logging.getLogger(__name__)  # what migpipe -v prints

FINAL = ("completed", "failed", "cancelled")
EVENTS = [{"capability": "events", "state": True}]  # MIGRATION events, as libvirt asks too
# Set on both QEMUs, as libvirt (10.0+) does: postcopy-preempt (QEMU 7.1+) sends the pages the
# destination asked for on a connection of their own, not queued behind the background pages.
POSTCOPY = [
    {"capability": "postcopy-ram", "state": True},
    {"capability": "postcopy-preempt", "state": True},
]
# The destination's count of the time its vCPUs waited for pages in postcopy (QEMU 3.0+).
BLOCKTIME = [{"capability": "postcopy-blocktime", "state": True}]
# --multifd: QEMU's channels, each a lane of the two-way tunnel; the return path makes the
# source QEMU complete only once the destination QEMU said it loaded everything (its SHUT).
MULTIFD = [{"capability": "multifd", "state": True}, {"capability": "return-path", "state": True}]
RECOVERY_TIMEOUT = 60.0  # a failsafe for QEMU ending a cancelled migration
COMMAND_EXIT_TIMEOUT = 30.0  # for a command whose wire was cut to exit before it is killed
CONFIRMATION_LIMIT = 64 << 10
CONFIRMATION_TIMEOUT = 300.0  # from the wire's end: what is still in buffers, then QEMU's load
DRAIN_TIMEOUT = 30.0  # for a source to stop sending once a failed destination answered
ACK_TIMEOUT = 10.0  # from the start, for the destination to say it opened the stream
BREAK_ANSWER_TIMEOUT = 2.0  # for a destination's last words after the wire broke
SWITCHOVER_BANDWIDTH = "avail-switchover-bandwidth"  # QEMU 8.2+
RATE_WINDOW = 1.0  # seconds QEMU's byte count is averaged over for it
RATE_UPDATE = 0.25  # seconds between two looks at that count
TCP_INFO_SIZE = 256  # struct tcp_info, enough of it
MIN_RTT_OFFSET = 148  # its tcpi_min_rtt, in microseconds
NO_RTT = 0xFFFFFFFF  # tcpi_min_rtt before the first measurement
UNTHROTTLED = 1 << 40  # max-bandwidth (bytes/s) for a stopped guest's save: no disk is as fast
ENDED = {"cancelled": "the migration was cancelled in QEMU", "exited": "the source QEMU exited"}
LOAD_ENDED = {
    "failed": "QEMU failed the load",
    "exited": "QEMU exited during the load",
    "cancelled": "the load was cancelled in QEMU",
    "completed": "QEMU completed the load regardless",  # not seen: decode holds the EOF item
    # the guest has run here, so its memory is on both hosts: QEMU waits for a recovery
    "postcopy-active": "QEMU keeps the guest in postcopy (once it is postcopy-paused, "
    "migrate --resume and incoming --resume resume it)",
    "postcopy-paused": "QEMU keeps the guest paused in postcopy (migrate --resume and "
    "incoming --resume resume it)",
}


@dataclass(frozen=True)
class Landing:
    """The destination's part of the guest's pause, which its "completed" verdict carries (as
    "pause"): seconds from the wire's end, when decode read its trailer, to the load's end (QEMU's
    MIGRATION completed, or its RESUME when the guest runs there: `end`), and from then to the
    verdict leaving, so that the source can take the destination's time out of its round trip."""

    loaded: float
    answered: float
    end: str = "completed"  # or "resumed"

    def message(self) -> dict[str, Any]:
        return {
            "loaded_ms": round(self.loaded * 1e3, 3),
            "answered_ms": round(self.answered * 1e3, 3),
            "end": self.end,
        }

    def figures(self) -> dict[str, Any]:
        """For incoming's --stats-json, in milliseconds."""
        return {"destination_ms": _ms(self.loaded), "end": self.end}

    @classmethod
    def of(cls, message: object) -> "Landing | None":
        """From a verdict's "pause"; None when it has none (an older migpipe incoming) or one
        that is not this shape: the verdict itself stands either way."""
        if not isinstance(message, dict) or message.get("end") not in ("completed", "resumed"):
            return None
        figures = [message.get(name) for name in ("loaded_ms", "answered_ms")]
        if not all(_duration(figure) for figure in figures):
            return None
        loaded, answered = (float(figure) / 1e3 for figure in figures)
        return cls(loaded, answered, message["end"])


def _duration(value: object) -> bool:
    """Whether a peer's figure is a number of milliseconds: finite, not negative, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e9


@dataclass(frozen=True)
class Confirmation:
    """One of the destination's lines back to the source: "opened" once it has read (and, with
    encrypt, authenticated) the wire's header, then "completed" (with its Landing) or "failed"
    (with why) for the load. "lost" stands for an answer that did not come, or cannot be
    trusted; None only where no peer can answer (a file).

    With encrypt each line is sealed under the stream's key (Filter.seal_reply, numbered in
    order), so only the destination that opened this stream can give it: `sealed` says so.
    `received` is when the source read it (time.monotonic), not part of the line."""

    status: str | None = None
    error: str = ""
    sealed: bool = False
    landing: Landing | None = None
    received: float = field(default=0.0, compare=False)

    def line(self, sealer: filters.Filter | None = None, index: int = 0) -> bytes:
        """The line as sent: JSON, or with a sealer JSON naming the sealed JSON."""
        message: dict[str, Any] = {"status": self.status, "error": self.error}
        if self.landing is not None:
            message["pause"] = self.landing.message()
        plain = json.dumps(message).encode()
        if sealer is None:
            return plain + b"\n"
        sealed = base64.b64encode(sealer.seal_reply(plain, index)).decode()
        return json.dumps({"sealed": sealed}).encode() + b"\n"

    @classmethod
    def parse(cls, line: bytes, sealer: filters.Filter | None, index: int) -> "Confirmation":
        """The destination's line number `index`; "lost" for one that is not an answer."""
        try:
            message = json.loads(line)
            sealed = "sealed" in message
            if sealed:
                if sealer is None:
                    raise ValueError("sealed, and this stream was not")
                plain = sealer.open_reply(base64.b64decode(message["sealed"], validate=True), index)
                message = json.loads(plain)
            if message["status"] in ("opened", "completed", "failed"):
                landing = Landing.of(message.get("pause"))
                return cls(message["status"], str(message.get("error", "")), sealed, landing)
        except (ValueError, KeyError, TypeError, RecursionError):
            pass
        except MigpipeError as e:
            return cls("lost", f"the destination's answer {e.message.partition(': ')[2]}")
        return cls("lost", f"the destination answered {printable(line[:80])}")


class Replies:
    """The destination's lines on their way back, read by one thread at a time: encode's
    writer while the stream goes out (between frames: a TLS connection is never read and
    written at once), then the source's wait for the verdict."""

    def __init__(self, read: Callable[[], bytes], ready: Callable[[float], bool]) -> None:
        self._read = read
        self._ready = ready  # whether a read would not wait, within that many seconds
        self._lines = LineSplitter(CONFIRMATION_LIMIT)
        self._ended = False
        self._index = 0
        self._read_at = 0.0  # when the last chunk came: a line's arrival

    def next(self, sealer: filters.Filter | None, timeout: float | None) -> Confirmation | None:
        """The next line, "lost" at the end or on an error, None if none came in `timeout`
        seconds (None: wait for it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                line = self._lines.next_line()
            except LineTooLong:
                too_long = f"the destination answered a line of over {CONFIRMATION_LIMIT} bytes"
                return Confirmation("lost", too_long)
            if line is not None:
                if line.strip():
                    break
                continue  # blank: not an answer
            if self._ended:
                return Confirmation(
                    "lost", "the destination closed the connection without an answer"
                )
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left is not None and not self._ready(left):
                return None
            try:
                chunk = self._read()
            except (OSError, MigpipeError) as e:
                why = e.strerror if isinstance(e, OSError) else e.message
                return Confirmation(
                    "lost", f"the link broke before the destination answered ({why})"
                )
            self._read_at = time.monotonic()
            self._lines.feed(chunk or b"\n")  # at the end, a last line without its newline
            self._ended = not chunk
        self._index += 1
        return replace(Confirmation.parse(line, sealer, self._index - 1), received=self._read_at)

    def verdict(self, sealer: filters.Filter | None) -> Confirmation:
        """The load's outcome: the next line that is not "opened" (blocking)."""
        while (reply := self.next(sealer, None)).status == "opened":
            pass
        return reply


def _fd_replies(fd: int) -> Replies:
    def ready(timeout: float) -> bool:
        return bool(select.select([fd], [], [], timeout)[0])

    return Replies(lambda: os.read(fd, CONFIRMATION_LIMIT), ready)


class Link(Protocol):
    """The wire's way to the destination, and the way its lines come back."""

    wire: int | Sink
    replies: Replies | None  # None: no peer can answer (a file, a pipe)
    ended: float  # when the trailer went out (time.monotonic), as end() was told
    further: "Dialer | Acceptor | None"  # the wire's further connections (None: only this)

    def end(self, at: float) -> None:
        """End the wire, whose trailer went out `at`, so that decode releases the stream's end
        at once (the guest waits for it); errors show in the verdict's absence. It does not
        block: a shutdown or a close."""
        ...

    def confirm(self, sealer: filters.Filter | None) -> Confirmation:
        """The destination's verdict, once the wire has ended (blocking)."""
        ...

    def one_way(self) -> float | None:
        """The link's one-way time in seconds, where it can be measured on the wire."""
        ...

    def both_ways(self) -> "int | Channel":
        """The wire as one connection that carries answers back too, for the two-way tunnel
        (a descriptor, which the tunnel checks is a socket, or a Channel)."""
        ...


class PairChannel:
    """Two descriptors as one connection: a command's stdout to read (or our stdin) and its
    stdin to write (or our stdout), as ssh carries them; the two-way tunnel's wire when it
    runs under `migrate -- COMMAND`."""

    def __init__(self, read: int, write: int, name: str) -> None:
        self._in, self._out = FdChannel(read, name), FdChannel(write, name)

    def read(self) -> bytes:
        return self._in.read()

    def write(self, parts: Sequence[bytes | memoryview]) -> None:
        self._out.write(parts)

    def finish(self) -> None:
        self._out.finish()

    def interrupt(self) -> None:
        self._in.interrupt()
        self._out.interrupt()


@dataclass
class FdLink:
    """A file, pipe or socket by descriptor (not owned). Only a socket can answer."""

    wire: int
    ended: float = 0.0
    further: "Dialer | Acceptor | None" = None

    def __post_init__(self) -> None:
        socket_ = stat.S_ISSOCK(os.fstat(self.wire).st_mode)
        self.replies = _fd_replies(self.wire) if socket_ else None

    def end(self, at: float) -> None:
        self.ended = at
        FdChannel(self.wire).finish()  # a socket's shutdown: the answer can still come back

    def both_ways(self) -> int:
        return self.wire

    def confirm(self, sealer: filters.Filter | None) -> Confirmation:
        return Confirmation() if self.replies is None else self.replies.verdict(sealer)

    def one_way(self) -> float | None:
        if self.replies is None:
            return None
        with socket.socket(fileno=os.dup(self.wire)) as sock:
            return tcp_one_way(sock)


@dataclass
class ChannelLink:
    """A TLS connection (migpipe.io.tls.TlsChannel): the answer comes back over TLS too."""

    wire: "TlsChannel"
    ended: float = 0.0
    further: "Dialer | Acceptor | None" = None

    def __post_init__(self) -> None:
        tls = self.wire

        def ready(timeout: float) -> bool:
            return tls.socket.pending() > 0 or bool(select.select([tls.socket], [], [], timeout)[0])

        self.replies = Replies(tls.read, ready)

    def end(self, at: float) -> None:
        self.ended = at
        self.wire.finish()  # the Sink's end (close_notify, our side shut): decode sees it

    def both_ways(self) -> "TlsChannel":
        return self.wire

    def confirm(self, sealer: filters.Filter | None) -> Confirmation:
        return self.replies.verdict(sealer)

    def one_way(self) -> float | None:
        return tcp_one_way(self.wire.socket)


class CommandLink:
    """A command (`ssh dst migpipe incoming ...`) that takes the wire on stdin and answers on
    stdout; its exit status stands in for an answer it did not give. What lies beyond the
    command (ssh's connection) is not migpipe's to measure: it has no one-way time, and the
    wire is its stdin and stdout alone."""

    further = None

    def __init__(self, argv: Sequence[str]) -> None:
        try:
            self._process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError as e:
            raise MigpipeError(f"cannot run {argv[0]}: {e.strerror}") from None
        self._name = argv[0]
        self.wire = self._process.stdin.fileno()
        self.replies = _fd_replies(self._process.stdout.fileno())
        self.ended = 0.0
        enlarge_pipe(self.wire)

    def end(self, at: float) -> None:
        self.ended = at
        with contextlib.suppress(OSError):  # the command is gone: its exit status tells
            self._process.stdin.close()

    def confirm(self, sealer: filters.Filter | None) -> Confirmation:
        answer = self.replies.verdict(sealer)
        status = self._process.wait()
        if answer.status == "lost" and status != 0:
            return Confirmation("lost", f"{self._name} exited with status {status}")
        return answer

    def one_way(self) -> None:
        return None

    def both_ways(self) -> PairChannel:
        return PairChannel(self._process.stdout.fileno(), self.wire, self._name)

    def close(self) -> None:
        """Stop feeding the command and reap it (after a failure it sees a cut wire)."""
        for pipe in (self._process.stdin, self._process.stdout):
            pipe.close()
        try:
            self._process.wait(COMMAND_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def tcp_one_way(sock: socket.socket) -> float | None:
    """Half the smallest round trip the kernel measured on a TCP connection (tcpi_min_rtt, Linux
    4.6+: propagation and the network stacks, without the queues), in seconds; None for any
    other socket (UNIX), an older kernel, or before a round trip was measured."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    except OSError:
        return None
    if len(info) < MIN_RTT_OFFSET + 4:
        return None
    (microseconds,) = struct.unpack_from("=I", info, MIN_RTT_OFFSET)
    return None if microseconds == NO_RTT else microseconds / 2e6


@contextlib.contextmanager
def command_link(argv: Sequence[str]) -> Iterator[CommandLink]:
    link = CommandLink(argv)
    try:
        yield link
    finally:
        link.close()


# -- the guest's real pause ---------------------------------------------------------------------


@dataclass(frozen=True)
class Pause:
    """The guest's real pause, as the source works it out: from its QEMU's STOP to the
    destination's load end, on two clocks that are never compared. The verdict arrived
    `source + round_trip` after STOP, on the source's clock; of that, the destination's
    `landing.answered` came after its load's end, and the verdict's own way back took the
    link's one-way time. Each side's part is timed on its own clock, the link's is the rest:
    the wire's end crossing behind whatever the link and the buffers on both ends still held,
    which a one-way time alone would miss."""

    source: float  # STOP to the wire's end (the trailer sent)
    landing: Landing | None  # the destination's part; None when it reported none
    round_trip: float  # the wire's end to the verdict's arrival
    one_way: float | None  # None: not measured (not a TCP connection), counted as 0

    @property
    def total(self) -> float | None:
        if self.landing is None:
            return None
        return self.source + self.round_trip - self.landing.answered - (self.one_way or 0.0)

    def parts(self) -> tuple[float, float | None, float | None]:
        """The source's, the link's and the destination's part, adding up to the total. A
        wire's end timed late (the source's thread held up) would make the link's negative:
        that time is the source's."""
        total, landing = self.total, self.landing
        if total is None or landing is None:
            return self.source, None, None
        link = max(0.0, total - self.source - landing.loaded)
        return total - link - landing.loaded, link, landing.loaded

    def figures(self, qemu_downtime_ms: object) -> dict[str, Any]:
        """For --stats-json, in milliseconds: None where the destination reported nothing."""
        source, link, destination = self.parts()
        return {
            "ms": _ms(self.total),
            "qemu_downtime_ms": qemu_downtime_ms,
            "source_ms": _ms(source),
            "link_ms": _ms(link),
            "destination_ms": _ms(destination),
            "one_way_ms": _ms(self.one_way),
            "end": self.landing.end if self.landing else None,
        }

    def describe(self) -> str:
        """The summary's line on the parts."""
        source, link, destination = self.parts()
        said = f"source {source * 1e3:,.1f} ms (STOP to the wire's end)"
        if link is None or destination is None or self.landing is None:
            return (
                f"real pause: {said}; no figures from the destination "
                "(not migpipe incoming, or an older one)"
            )
        one_way = "not measured" if self.one_way is None else f"{self.one_way * 1e3:,.3f} ms"
        return (
            f"real pause: {said}, link {link * 1e3:,.1f} ms (the wire's end to decode, "
            f"one-way time {one_way}), destination {destination * 1e3:,.1f} ms "
            f"(the wire's end to the load {self.landing.end})"
        )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


@dataclass
class Outcome:
    """How a driven migration went: migpipe's figures, QEMU's, and the other end's word."""

    totals: Totals
    qemu: dict[str, Any] = field(default_factory=dict)  # the source's final query-migrate
    confirmation: Confirmation | None = None  # the destination's answer (source side)
    runstate: str = ""  # the VM's run state at the end (destination side)
    pause: Pause | None = None  # the guest's real pause (source side; None: it was not running)
    landing: Landing | None = None  # this destination's part of it (destination side)
    two_way: bool = False  # through the two-way tunnel: QEMU's return path was the verdict
    recoveries: int = 0  # times postcopy was resumed after the link broke


# -- one side of a migration, through a pipe ----------------------------------------------------


class Ending:
    """QEMU's final MIGRATION status, for a carry that must not finish before it is known:
    a save names its file only once QEMU completed, or a cancelled save would leave both a
    file and a running VM."""

    def __init__(self) -> None:
        self.status = ""
        self._known = trio.Event()

    def set(self, status: str) -> None:
        self.status = status
        self._known.set()

    async def completed(self) -> None:
        """Return once QEMU completed; MigpipeError if it ended any other way."""
        await self._known.wait()
        if self.status != "completed":
            raise MigpipeError(f"QEMU did not complete the migration ({self.status})")


Carry = Callable[[int, Ending], Awaitable[Totals]]


@dataclass(frozen=True)
class Finish:
    """How one side ended: migpipe's figures or its error, QEMU's final status ("exited" if it
    went away), and whether migpipe's side ended first (then its error is the cause)."""

    carried: Totals | MigpipeError
    status: str
    carried_first: bool


async def _through_pipe(
    monitor: qmp.Qmp,
    command: str,
    carry: Carry,
    beside: Callable[[qmp.Qmp], Awaitable[None]] | None = None,
) -> Finish:
    """Hand QEMU one end of a pipe for `command` ("migrate": the write end; "migrate-incoming":
    the read end) and run `carry` on ours while following QEMU's MIGRATION events to a final
    status. Our end is closed as soon as carry stops, so QEMU never waits on it: a writing QEMU
    gets EPIPE (after `migrate_cancel`, so it ends "cancelled"), a reading one the stream's end,
    without its EOF item if carry failed, so it fails the load. `beside` runs meanwhile, until
    it returns (it must not raise) or the migration ended."""
    read_end, write_end = os.pipe()
    source = command == "migrate"
    ours, qemu_end = (read_end, write_end) if source else (write_end, read_end)
    enlarge_pipe(ours)
    try:
        await _hand_over(monitor, qemu_end, command)
    except BaseException:
        os.close(ours)
        raise

    async def on_ours(ending: Ending, task_status: trio.TaskStatus[None]) -> Totals:
        task_status.started()
        return await carry(ours, ending)

    return await _following(monitor, source, on_ours, beside, release=lambda: os.close(ours))


TwoWayCarry = Callable[[str, trio.TaskStatus[None]], Awaitable[Totals]]
# incoming's wire: what it reads, where it answers (None: nowhere), its further connections
Wire = tuple["int | Source", "int | Sink | None", "Dialer | Acceptor | None"]


async def _through_socket(
    monitor: qmp.Qmp,
    command: str,
    carry: TwoWayCarry,
    beside: Callable[[qmp.Qmp], Awaitable[None]] | None = None,
    passes: "trio.MemorySendChannel[int] | None" = None,
    switched: Callable[[], bool] = lambda: False,
    **arguments: object,
) -> Finish:
    """_through_pipe's way for a migration that needs answers back (the return path,
    postcopy): `carry(spec, task_status)` runs the two-way tunnel on a UNIX socket in a private
    directory (0700), QEMU is told `command` (with `arguments`) on it once carry started
    (encode listens; decode connects only after QEMU listens), and a QEMU that ended otherwise
    than completed ends carry too, which might wait on a connection QEMU never makes."""
    source = command == "migrate"
    with tempfile.TemporaryDirectory(prefix="migpipe-") as directory:
        spec = f"unix:{directory}/qemu.sock"

        async def on_socket(ending: Ending, task_status: trio.TaskStatus[None]) -> Totals:
            if source:
                return await carry(spec, task_status)
            await monitor.execute(command, uri=spec, **arguments)
            task_status.started()
            return await carry(spec, trio.TASK_STATUS_IGNORED)

        begin = (
            functools.partial(monitor.execute, command, uri=spec, **arguments) if source else None
        )
        return await _following(
            monitor, source, on_socket, beside, begin, True, passes, switched=switched
        )


async def _following(
    monitor: qmp.Qmp,
    source: bool,
    carry: Callable[[Ending, trio.TaskStatus[None]], Awaitable[Totals]],
    beside: Callable[[qmp.Qmp], Awaitable[None]] | None,
    begin: Callable[[], Awaitable[object]] | None = None,
    two_way: bool = False,
    passes: "trio.MemorySendChannel[int] | None" = None,
    release: Callable[[], None] | None = None,
    switched: Callable[[], bool] = lambda: False,
) -> Finish:
    """carry beside QEMU's MIGRATION events to a final status (`begin` once carry started),
    telling `passes` each MIGRATION_PASS's number; on the source, a carry that failed cancels
    QEMU's migration, and only then is `release` called (our end of a pipe closed: before the
    cancel, QEMU would fail on it instead). With `two_way` a QEMU that failed or was cancelled
    ends carry at once (its own error is the outcome's), and a carry that failed once postcopy
    began (a postcopy status, or `switched`) leaves QEMU as it is, unwatched: a cancel would
    lose the guest, whose newest memory is on both hosts, and QEMU waits in postcopy-paused
    (for a recovery), never reaching a final status."""
    ending = Ending()
    order: list[str] = []
    carried: Totals | MigpipeError | None = None
    carrying, watching = trio.CancelScope(), trio.CancelScope()
    status = ""

    async def run_carry(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal carried
        with carrying:
            try:
                carried = await carry(ending, task_status)
            except* (MigpipeError, OSError) as group:
                carried = _as_error(_first(group))
                if two_way and (status.startswith("postcopy") or switched()):
                    watching.cancel()
                elif source:
                    with contextlib.suppress(MigpipeError):  # if QEMU is gone, its status says
                        await monitor.execute("migrate_cancel")
            finally:
                if release is not None:
                    release()
        if carried is None:  # cancelled: QEMU had ended, and said why
            carried = MigpipeError(f"QEMU ended the migration ({ending.status})")
        order.append("carry")

    async def watch() -> None:
        nonlocal status
        with watching:
            try:
                while status not in FINAL:
                    event = await monitor.next_event("MIGRATION", "MIGRATION_PASS")
                    if event["event"] == "MIGRATION_PASS":
                        if passes is not None:
                            passes.send_nowait(event["data"]["pass"])
                    else:
                        status = event["data"]["status"]
            except MigpipeError:
                status = "exited"
        ending.set(status)
        order.append("qemu")
        if two_way and status != "completed":
            carrying.cancel()

    async with trio.open_nursery() as nursery:
        if beside is not None:
            aside = trio.CancelScope()

            async def run_beside() -> None:
                with aside:
                    await beside(monitor)

            nursery.start_soon(run_beside)
        await nursery.start(run_carry)
        if begin is not None:
            await begin()
        await watch()
        if beside is not None:
            aside.cancel()
    assert carried is not None
    return Finish(carried, ending.status, order[0] == "carry")


async def _hand_over(monitor: qmp.Qmp, fd: int, command: str) -> None:
    """Give QEMU `fd` (closing ours) and start `command` (migrate, migrate-incoming) on it."""
    name = f"migpipe-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        await monitor.getfd(name, fd)
    finally:
        os.close(fd)
    try:
        await monitor.execute(command, uri=f"fd:{name}")
    except BaseException:
        with trio.CancelScope(shield=True), contextlib.suppress(MigpipeError):
            await monitor.execute("closefd", fdname=name)  # unless QEMU took it already
        raise


def _first(group: BaseExceptionGroup) -> BaseException:
    """The first error of a (nested) exception group: the pipeline's own failure."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _as_error(error: BaseException) -> MigpipeError:
    """An OS error of the carry's file or link (a full disk, EFBIG) becomes one line too."""
    if isinstance(error, MigpipeError):
        return error
    return MigpipeError(getattr(error, "strerror", None) or str(error))


# -- the source ---------------------------------------------------------------------------------


def tunnel_rate(samples: deque[tuple[float, int]], ram: dict[str, Any], now: float) -> int:
    """QEMU bytes per second over the last RATE_WINDOW, at most QEMU's own last estimate (its
    query-migrate `ram` at `now`, added to `samples`); 0 until a whole window was seen."""
    transferred = ram.get("transferred", 0)
    samples.append((now, transferred))
    while len(samples) > 1 and samples[1][0] <= now - RATE_WINDOW:
        samples.popleft()
    since, sent = samples[0]
    if now - since < RATE_WINDOW:
        return 0
    averaged = (transferred - sent) / (now - since)
    return int(min(averaged, ram.get("mbps", 0) * 1e6 / 8))


@dataclass
class SwitchoverRate:
    """While a live migration runs, tell QEMU the rate the tunnel takes its bytes at, as its
    avail-switchover-bandwidth (QEMU 8.2+), which QEMU then uses instead of its own estimate to
    decide when the rest fits its downtime limit; 0 (QEMU's own estimate) again afterwards.

    QEMU's estimate is its bytes into the pipe over its last 100 ms: after a pass, when the
    buffers behind the pipe have drained, that is the speed of the buffers, not the link's, and
    a rate too high is a switch-over with more left than the link carries within the limit.
    Averaged over RATE_WINDOW the same count is the tunnel's rate (its buffers hold far less
    than a second of it), and migpipe never tells more than QEMU's own estimate of the moment,
    so it makes QEMU's decision more cautious, not bolder. Nothing is told where QEMU lacks the
    parameter or the user set it (not 0); if migpipe is killed, its last figure stays set
    (see migpipe(1))."""

    told: int = 0  # what QEMU was last told, 0 for nothing

    async def follow(self, monitor: qmp.Qmp) -> None:
        """Tell QEMU the rate every RATE_UPDATE until cancelled (the migration ended)."""
        parameters = await monitor.execute("query-migrate-parameters")
        if parameters.get(SWITCHOVER_BANDWIDTH) != 0:
            return
        samples: deque[tuple[float, int]] = deque()  # (when, QEMU's transferred bytes)
        with contextlib.suppress(MigpipeError):  # QEMU went away or refused: its outcome tells
            while True:
                ram = (await monitor.execute("query-migrate")).get("ram")
                rate = 0 if ram is None else tunnel_rate(samples, ram, trio.current_time())
                if rate > 0 and rate != self.told:
                    arguments = {SWITCHOVER_BANDWIDTH: rate}
                    self.told = rate  # before QEMU has it: if this is cancelled, reset anyway
                    await monitor.execute("migrate-set-parameters", **arguments)
                await trio.sleep(RATE_UPDATE)

    async def reset(self, monitor: qmp.Qmp) -> None:
        """0 again, however migrate ends: called after the verdict, not when QEMU completed,
        so that no QMP round trip delays the source's reading of it (its arrival is timed)."""
        if self.told:
            with trio.CancelScope(shield=True), contextlib.suppress(MigpipeError):
                await monitor.execute("migrate-set-parameters", **{SWITCHOVER_BANDWIDTH: 0})
            self.told = 0


AUTO_FIRST_PASS = 3  # the first pass automatic postcopy compares with the one before
AUTO_LAST_PASS = 4  # the pass automatic postcopy starts at, at the latest
AUTO_SHRINK = 0.75  # what left of the pass before, at most, still counts as converging
QEMU_CONNECT_TIMEOUT = 30.0  # for QEMU to connect to migrate's socket once told to migrate
PAUSE_TIMEOUT = 10.0  # for QEMU to pause a postcopy migration whose connection broke


class PostcopySwitch:
    """migrate --postcopy: precopy first, then migrate-start-postcopy when a pass begins.

    With `after` N, when pass N + 1 begins. Without, when precopy is not converging: when a
    pass from the third on begins with more than AUTO_SHRINK of what the pass before it began
    with left to send (query-migrate's ram remaining; the first pass sends all memory, so the
    second is never compared with it), and at the latest when pass AUTO_LAST_PASS begins."""

    def __init__(self, after: int | None, switched: bool = False) -> None:
        self.after = after
        self.switched = switched  # True: already in postcopy (migrate --resume)
        self.passes, self._passed = trio.open_memory_channel[int](math.inf)

    def _due(self, number: int, left: int, left_before: int | None) -> bool:
        if self.after is not None:
            return number > self.after
        not_shrinking = left_before is not None and left > AUTO_SHRINK * left_before
        return number >= AUTO_LAST_PASS or (number >= AUTO_FIRST_PASS and not_shrinking)

    async def follow(self, monitor: qmp.Qmp) -> None:
        """Switch at the pass due (a QEMU that completed first needs no switch)."""
        left_before = None
        async for number in self._passed:
            ram = (await monitor.execute("query-migrate")).get("ram", {})
            left = ram.get("remaining", 0)
            logger.info("pass %d began with %s bytes left to send", number, f"{left:,}")
            if self._due(number, left, left_before):
                self.switched = True  # before QEMU has it: a failure from now keeps it paused
                with contextlib.suppress(MigpipeError):  # completed meanwhile
                    await monitor.execute("migrate-start-postcopy")
                return
            left_before = left


async def migrate(
    qmp_path: str,
    open_link: Callable[[], AbstractContextManager[Link]],
    chain: Sequence[filters.Filter],
    progress: Progress | None = None,
    confirmed: bool = True,
    postcopy: PostcopySwitch | None = None,
    multifd: int | None = None,
    recover_timeout: float = 0.0,
    connections: int = 1,
) -> Outcome:
    """Migrate the QEMU behind `qmp_path` through encode to the link `open_link` gives, which
    is opened (a --connect connects, a command starts) only once QEMU has agreed to migrate.
    MigpipeError if it failed, saying what became of the source VM.

    Unless `confirmed` is False (the user said no migpipe incoming is there to answer), the
    stream's end goes out only to a destination that said it opened the stream (sealed, with
    encrypt: it holds the key), and success needs its word that the load completed (sealed
    too). A destination that answers before the end stops the stream there, so it cannot have
    completed, and the source runs on; without a trustworthy verdict after the end, the
    outcome is unknown: the source stays paused and the error has status EXIT_UNCONFIRMED.

    With `postcopy` the migration runs in postcopy (see PostcopySwitch), and with `multifd`
    over that many multifd channels, through the two-way tunnel: the link's connection carries
    QEMU's return path back, and QEMU's own completion, which waits for the destination QEMU's
    word (its SHUT) on that path, is the verdict; the tunnel's wire is spread over
    `connections` where the link has further ones. A `postcopy` that has switched already
    (migrate --resume) resumes the migration QEMU holds paused after its connection broke (a
    migrate whose process is gone: its recovery could not run)."""
    sealer = sealer_of(chain)
    rate = SwitchoverRate()
    resume = postcopy is not None and postcopy.switched
    async with qmp.connect(qmp_path) as monitor:
        was_running = (await monitor.execute("query-status"))["running"]
        if resume:
            status = (await monitor.execute("query-migrate")).get("status", "none")
            if status != "postcopy-paused":
                raise MigpipeError(
                    f"QEMU's migration is {status}, not postcopy-paused: nothing to resume"
                )
        else:
            await _two_way_capabilities(monitor, postcopy is not None, multifd)
        try:
            with contextlib.ExitStack() as stack:
                if postcopy is not None or multifd is not None:
                    links = Reopener(open_link, stack)
                    return await _migrate_two_way(
                        monitor,
                        was_running,
                        links,
                        chain,
                        progress,
                        postcopy,
                        recover_timeout,
                        connections,
                    )
                link = await trio.to_thread.run_sync(
                    stack.enter_context, open_link(), abandon_on_cancel=True
                )
                gate = EndGate(link.replies if confirmed else None, sealer)
                async with _keeping_source(monitor, was_running):
                    finish = await _through_pipe(
                        monitor,
                        "migrate",
                        lambda fd, _: _send(fd, link, chain, progress, gate),
                        rate.follow,
                    )
                    if isinstance(finish.carried, MigpipeError) and finish.carried_first:
                        # the wire broke first: a destination that failed said why on its way out
                        await trio.to_thread.run_sync(gate.after_break, BREAK_ANSWER_TIMEOUT)
                    if gate.early is not None:  # the stream stopped short of its end: no one has it
                        raise gate.early_error()
                    totals = await _source_result(monitor, finish)
                    answer = await _confirmation(link, sealer)
                    if answer.status == "failed" and (answer.sealed or sealer is None):
                        raise MigpipeError(f"the destination failed: {answer.error}")
                answer = _trusted(answer, sealer, confirmed)
                if answer.status == "lost":
                    raise UnconfirmedError(
                        f"{answer.error}: QEMU completed, the source VM stays paused and the "
                        "destination's state is unknown; check the destination, then `cont` or "
                        "`quit` the source",
                    )
                stop = monitor.happened("STOP") if was_running else None
                pause = None
                if stop is not None:
                    round_trip = answer.received - link.ended
                    pause = Pause(link.ended - stop, answer.landing, round_trip, link.one_way())
                return Outcome(totals, await monitor.execute("query-migrate"), answer, pause=pause)
        finally:
            await rate.reset(monitor)  # after the verdict: see SwitchoverRate.reset


async def _two_way_capabilities(
    monitor: qmp.Qmp, postcopy: bool, multifd: int | None, destination: bool = False
) -> None:
    """Events, and what postcopy and multifd need, on one side's QEMU (both sides the same);
    on the destination, postcopy-blocktime too: how long its vCPUs waited for pages."""
    capabilities = EVENTS + (POSTCOPY if postcopy else []) + (MULTIFD if multifd else [])
    if postcopy and destination:
        capabilities += BLOCKTIME
    await monitor.execute("migrate-set-capabilities", capabilities=capabilities)
    if multifd is not None:
        await monitor.execute("migrate-set-parameters", **{"multifd-channels": multifd})


async def _migrate_two_way(
    monitor: qmp.Qmp,
    was_running: bool,
    links: "Reopener[Link]",
    chain: Sequence[filters.Filter],
    progress: Progress | None,
    switch: PostcopySwitch | None,
    recover_timeout: float,
    connections: int,
) -> Outcome:
    """migrate's postcopy or multifd: QEMU migrates to encode_two_way's socket, which carries
    its connections over the link's, both ways (over `connections` of them where the link
    opens further ones). A link that breaks once postcopy began is
    opened anew and QEMU resumes the migration through it (`migrate` with resume), for as
    long as QEMU holds it paused, within `recover_timeout` seconds of the first break; from
    the start when `switch` has switched already (migrate --resume: QEMU holds it paused)."""
    from migpipe.tunnel.twoway import encode_two_way

    def carry_over(link: Link, resumed: bool) -> TwoWayCarry:
        wire, spread = link.both_ways(), connections if link.further is not None else 1

        async def carry(spec: str, task_status: trio.TaskStatus[None]) -> Totals:
            return await encode_two_way(
                spec,
                QEMU_CONNECT_TIMEOUT,
                wire,
                chain,
                progress,
                task_status,
                resumed,
                connections=spread,
                further=link.further,
            )

        return carry

    async def resuming(link: Link) -> Finish:
        carry = carry_over(link, True)
        return await _through_socket(monitor, "migrate", carry, switched=lambda: True, resume=True)

    recoveries, recovering = 0, Recovery(recover_timeout)
    async with _keeping_source(monitor, was_running, switch):
        link = await links.open()
        carry = carry_over(link, False)
        if switch is None:
            finish = await _through_socket(monitor, "migrate", carry)
        elif switch.switched:  # migrate --resume
            finish = await resuming(link)
        else:
            finish = await _through_socket(
                monitor, "migrate", carry, switch.follow, switch.passes, lambda: switch.switched
            )
        while (
            switch is not None
            and switch.switched
            and await _postcopy_paused(monitor, finish)
            and recovering.allows()
        ):
            recoveries += 1
            logger.warning("%s; QEMU paused the migration: resuming it", finish.carried)
            reopened = await recovering.within(links.open())
            if reopened is None:
                break
            finish = await resuming(reopened)
        totals = await _source_result(monitor, finish)
    info = await monitor.execute("query-migrate")
    return Outcome(totals, info, Confirmation(), two_way=True, recoveries=recoveries)


Opened = TypeVar("Opened")


class Reopener(Generic[Opened]):
    """A link or wire that is opened again after it broke (postcopy recovery): each open()
    closes the one before it, the last is closed with `stack`."""

    def __init__(
        self, opener: Callable[[], AbstractContextManager[Opened]], stack: contextlib.ExitStack
    ) -> None:
        self._opener, self._stack = opener, stack
        self._current: contextlib.ExitStack | None = None

    async def open(self) -> Opened:
        if self._current is not None:
            self._current.close()
        self._current = self._stack.enter_context(contextlib.ExitStack())
        return await trio.to_thread.run_sync(
            self._current.enter_context, self._opener(), abandon_on_cancel=True
        )


async def _postcopy_paused(monitor: qmp.Qmp, finish: Finish) -> bool:
    """Whether QEMU paused a migration whose tunnel failed (postcopy-paused: QEMU 8.0 and later,
    in postcopy, where the connection broke) rather than failing it: it can be resumed."""
    if not isinstance(finish.carried, MigpipeError) or finish.status in FINAL:
        return False
    with trio.move_on_after(PAUSE_TIMEOUT):
        while True:
            status = (await monitor.execute("query-migrate")).get("status", "")
            if status == "postcopy-paused":
                return True
            if status in FINAL:
                return False
            await monitor.next_event("MIGRATION")
    return False


class Recovery:
    """How long to try to resume a paused postcopy migration: `timeout` seconds from the first
    break (0: never)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._deadline: float | None = None

    def allows(self) -> bool:
        """Whether to try (again) now; the first call starts the clock."""
        if not self.timeout:
            return False
        if self._deadline is None:
            self._deadline = trio.current_time() + self.timeout
        return trio.current_time() < self._deadline

    async def within(self, opening: Awaitable[Opened]) -> Opened | None:
        """`opening` (a link or wire opened anew), None if the time ran out first."""
        assert self._deadline is not None
        with trio.move_on_at(self._deadline):
            return await opening
        return None


async def _send(
    fd: int,
    link: Link,
    chain: Sequence[filters.Filter],
    progress: Progress | None,
    gate: "EndGate",
) -> Totals:
    """encode from QEMU's pipe to the link, whose end goes out with the trailer: the sooner
    decode has it, the sooner the destination can complete."""
    totals = await encode(fd, link.wire, chain, progress, gate.before_frame)
    link.end(totals.trailer_sent)  # encode itself ended a socket's or a pipe's
    return totals


def _trusted(answer: Confirmation, sealer: filters.Filter | None, confirmed: bool) -> Confirmation:
    """The verdict the source may act on once QEMU completed: "lost" unless it can be trusted
    (sealed for this stream, with encrypt), or no verdict when none was expected."""
    if not confirmed and answer.status == "lost":
        return Confirmation(error=answer.error)  # as the user said: no answer comes
    if sealer is not None and answer.status is not None and not answer.sealed:
        return Confirmation(
            "lost",
            f"the destination's answer ({answer.status}) was not sealed "
            "with the stream's key, so anyone could have sent it",
        )
    return answer


class EndGate:
    """What encode's writer asks before each frame it sends: has the destination spoken?

    Between frames it reads what the destination said, without waiting; before the FINAL frame
    it waits (within ACK_TIMEOUT of the start) for the destination's "opened", sealed when the
    stream is. A verdict that comes first, or no "opened", stops the stream before its end:
    without the FINAL frame and the trailer no decoder gives QEMU a complete stream, so the
    source may run on whatever was said (even a forgery: nothing completed)."""

    def __init__(self, replies: Replies | None, sealer: filters.Filter | None) -> None:
        self._replies = replies  # None: nothing to wait for (a file, or --no-confirmation)
        self._sealer = sealer
        self._deadline = time.monotonic() + ACK_TIMEOUT
        self._opened = False
        self.early: Confirmation | None = None  # a verdict that came before the end

    def before_frame(self, final: bool) -> None:
        if self._replies is None:
            return
        waiting = final and not self._opened
        self._heed(max(0.0, self._deadline - time.monotonic()) if waiting else 0.0)
        if final and not self._opened:
            self.early = Confirmation(
                "lost",
                f"the destination did not say it opened the stream "
                f"within {ACK_TIMEOUT:g} s (is it `migpipe incoming`? "
                "if not, use --no-confirmation)",
            )
            raise MigpipeError(self.early.error)

    def _heed(self, timeout: float) -> None:
        """Take what the destination said (waiting up to `timeout` for its first line)."""
        while (reply := self._replies.next(self._sealer, timeout)) is not None:
            timeout = 0.0
            trusted = reply.sealed or self._sealer is None
            if reply.status == "opened" and trusted and not self._opened:
                self._opened = True
                continue
            self.early = reply
            raise MigpipeError("the destination answered before the stream's end")

    def after_break(self, timeout: float) -> None:
        """The wire broke before its end (a write met a closed pipe or a reset): take what the
        destination said on its way out, so its reason is reported rather than the break."""
        if self._replies is not None and self.early is None:
            with contextlib.suppress(MigpipeError):
                self._heed(timeout)

    def early_error(self) -> MigpipeError:
        """The error a migration stopped by the destination ends with (the source runs on)."""
        answer = self.early
        if answer.status == "failed":
            return MigpipeError(f"the destination failed: {answer.error}")
        if answer.status == "opened":  # again, or unsealed: not from the holder of the key
            return MigpipeError(
                "the destination's word that it opened the stream cannot be trusted"
            )
        return PeerGoneError(f"the destination went away before the stream's end ({answer.error})")


async def _confirmation(link: Link, sealer: filters.Filter | None) -> Confirmation:
    """The destination's answer, or "lost" if none comes within CONFIRMATION_TIMEOUT: the
    source, paused by QEMU, must not wait for ever on a destination that hangs (and an
    interrupt must reach us meanwhile: the blocked reader is abandoned)."""
    with trio.move_on_after(CONFIRMATION_TIMEOUT):
        return await trio.to_thread.run_sync(link.confirm, sealer, abandon_on_cancel=True)
    return Confirmation("lost", f"the destination did not answer within {CONFIRMATION_TIMEOUT:g} s")


async def save(
    qmp_path: str,
    store: Callable[..., Awaitable[Totals]],
    live: bool = False,
    resume: bool = False,
) -> Outcome:
    """Save the QEMU behind `qmp_path` through `store(fd, commit=...)`: savefile.save with its
    file bound, which names the file only once QEMU completed.

    Unless `live`, the guest is stopped first and the migration unthrottled, as virsh save does
    (every second is downtime); a live save leaves the guest running and max-bandwidth as it is,
    and QEMU sends what the guest dirties again. Afterwards the VM stays stopped (postmigrate),
    the file holding its state, or with `resume` runs again if it ran before. MigpipeError if
    the save failed, saying what became of the VM; then no file is left under its name.
    """
    async with qmp.connect(qmp_path) as monitor:
        was_running = (await monitor.execute("query-status"))["running"]
        await monitor.execute("migrate-set-capabilities", capabilities=EVENTS)
        async with _keeping_source(monitor, was_running), _bandwidth(monitor, live):
            if was_running and not live:
                await monitor.execute("stop")
            finish = await _through_pipe(
                monitor, "migrate", lambda fd, ending: store(fd, commit=ending.completed)
            )
            totals = await _source_result(monitor, finish)
        info = await monitor.execute("query-migrate")
        if resume and was_running:
            try:
                await monitor.execute("cont")
            except MigpipeError as e:
                raise MigpipeError(f"saved, but the VM stays stopped: {e.message}") from None
        return Outcome(totals, info, runstate=(await monitor.execute("query-status"))["status"])


@contextlib.asynccontextmanager
async def _keeping_source(
    monitor: qmp.Qmp, was_running: bool, switch: "PostcopySwitch | None" = None
) -> AsyncIterator[None]:
    """On any failure inside: no migration left going and the VM running if it was, unless
    `switch` went to postcopy (the guest has run on the destination since: its memory is split
    between the hosts and the source's is stale); a MigpipeError gets what became of the VM
    added to its line."""
    try:
        yield
    except BaseException as e:
        with trio.CancelScope(shield=True):
            if switch is not None and switch.switched:
                state = "postcopy had begun: the source VM stays paused"
            else:
                state = await _leave_source(monitor, was_running)
        if isinstance(e, MigpipeError):
            raise MigpipeError(f"{e.message}; {state}", e.offset, e.status) from None
        raise


@contextlib.asynccontextmanager
async def _bandwidth(monitor: qmp.Qmp, live: bool) -> AsyncIterator[None]:
    """A stopped guest's save as fast as migpipe takes it; the VM's own limit back afterwards."""
    if live:
        yield
        return
    before = (await monitor.execute("query-migrate-parameters"))["max-bandwidth"]
    await monitor.execute("migrate-set-parameters", **{"max-bandwidth": UNTHROTTLED})
    try:
        yield
    finally:
        with trio.CancelScope(shield=True), contextlib.suppress(MigpipeError):
            await monitor.execute("migrate-set-parameters", **{"max-bandwidth": before})


async def _source_result(monitor: qmp.Qmp, finish: Finish) -> Totals:
    """migpipe's figures when both sides completed; else the failure that came first (QEMU's
    own explanation when QEMU failed first)."""
    carried, status = finish.carried, finish.status
    if status == "completed" and isinstance(carried, Totals):
        return carried
    if isinstance(carried, MigpipeError) and (finish.carried_first or status == "completed"):
        raise carried
    if status == "failed":
        info = await monitor.execute("query-migrate")
        raise MigpipeError(f"QEMU failed the migration: {info.get('error-desc', 'no reason')}")
    raise MigpipeError(ENDED[status])


async def _leave_source(monitor: qmp.Qmp, was_running: bool) -> str:
    """After a failure: no migration left going, and the VM running if it was. Says which."""
    try:
        with trio.fail_after(RECOVERY_TIMEOUT):
            await monitor.execute("migrate_cancel")
            while (await monitor.execute("query-migrate")).get("status", "none") not in (
                *FINAL,
                "none",
            ):
                await monitor.next_event("MIGRATION")
            state = await monitor.execute("query-status")
            if was_running and not state["running"]:
                await monitor.execute("cont")  # QEMU (or save) had stopped it
                state = await monitor.execute("query-status")
    except trio.TooSlowError:
        return f"QEMU did not end the migration within {RECOVERY_TIMEOUT:g} s"
    except MigpipeError as e:
        return f"the source VM's state is unknown ({e.message})"
    if state["running"]:
        return "the source VM is running"
    return f"the source VM is {state['status']}"


# -- the destination ----------------------------------------------------------------------------


async def incoming(
    qmp_path: str,
    open_wire: Callable[[], AbstractContextManager[Wire]],
    secrets: Secrets | None = None,
    progress: Progress | None = None,
    postcopy: bool = False,
    multifd: int | None = None,
    reopenable: bool = False,
    recover_timeout: float = 0.0,
    resume: bool = False,
) -> Outcome:
    """Load a migration into the QEMU behind `qmp_path` (started with `-incoming defer`).

    `open_wire` gives the wire's fd, the fd to answer the source on (or None), and where the
    wire's further connections come from (or None); it is opened (a --listen accepts) only
    once QEMU is known to be waiting. MigpipeError unless QEMU
    completed the load.

    With `postcopy` QEMU may take postcopy (its postcopy-ram capability set), and with
    `multifd` it takes that many multifd channels; either way it loads through decode_two_way
    from its own socket: the wire's connection carries its return path back, so no answer
    line goes there (the source QEMU's completion is the verdict). In postcopy the guest runs
    here before the load completes (RESUME, then MIGRATION completed). A wire that breaks in
    postcopy, with the guest running here, leaves QEMU postcopy-paused: a `reopenable` wire
    (--listen, --connect) is opened again for the source's `migrate` to resume it through
    (QEMU's migrate-recover), within `recover_timeout` seconds of the break, and an incoming
    --postcopy started on a QEMU that is postcopy-paused does that from its start (under
    `migrate -- ssh ...`, a new command); with `resume`, only that.
    """
    async with _waiting(qmp_path, postcopy) as (monitor, paused):
        if resume and not paused:
            raise MigpipeError("QEMU waits for a migration from its start: nothing to resume")
        if not paused and (postcopy or multifd is not None):
            await _two_way_capabilities(monitor, postcopy, multifd, destination=True)
        with contextlib.ExitStack() as stack:
            if postcopy or multifd is not None:
                wires = Reopener(open_wire, stack)
                recovering = Recovery(recover_timeout if reopenable else 0)
                return await _incoming_two_way(
                    monitor, wires, secrets, progress, paused, recovering
                )
            wire, answer, _ = await trio.to_thread.run_sync(
                stack.enter_context, open_wire(), abandon_on_cancel=True
            )
            source = Answerer(answer)
            timed = timed_end(wire)

            def carry(fd: int, _: Ending) -> Awaitable[Totals]:
                return decode(timed, fd, progress, secrets, source.opened)

            try:
                finish = await _through_pipe(monitor, "migrate-incoming", carry)
                outcome = await _loaded(monitor, finish)
            except MigpipeError as e:
                source.tell(Confirmation("failed", str(e)))
                if answer is wire:  # let the answer leave before the connection closes
                    await _drain(wire)
                raise
            resumed = outcome.runstate == "running" and monitor.happened("RESUME") is not None
            ended = monitor.happened("RESUME" if resumed else "MIGRATION")
            assert ended is not None  # the completed event _through_pipe waited for
            outcome.landing = Landing(
                ended - timed.ended, time.monotonic() - ended, "resumed" if resumed else "completed"
            )
            source.tell(Confirmation("completed", landing=outcome.landing))
        return outcome


async def _incoming_two_way(
    monitor: qmp.Qmp,
    wires: "Reopener[Wire]",
    secrets: Secrets | None,
    progress: Progress | None,
    resumed: bool,
    recovering: Recovery,
) -> Outcome:
    """incoming's postcopy or multifd: decode_two_way into QEMU's migrate-incoming socket, or,
    `resumed`, into its migrate-recover socket; again for as long as QEMU holds the migration
    postcopy-paused after the wire broke, when the wire can be opened again."""
    from migpipe.tunnel.twoway import decode_two_way

    def carry_over(
        wire: "int | Channel", resumed: bool, further: "Dialer | Acceptor | None"
    ) -> TwoWayCarry:
        async def carry(spec: str, _: trio.TaskStatus[None]) -> Totals:
            return await decode_two_way(
                wire,
                spec,
                QEMU_CONNECT_TIMEOUT,
                progress,
                secrets,
                resumed=resumed,
                further=further,
            )

        return carry

    recoveries, opening = 0, wires.open()
    while True:
        if (opened := await opening) is None:
            raise MigpipeError(
                "the source did not resume the migration in time; QEMU holds it postcopy-paused"
            )
        wire, answer, further = opened
        if isinstance(wire, int) and isinstance(answer, int) and answer != wire:
            wire = PairChannel(wire, answer, "standard input and output")
        command = "migrate-recover" if resumed else "migrate-incoming"
        finish = await _through_socket(monitor, command, carry_over(wire, resumed, further))
        if not await _postcopy_paused(monitor, finish):
            outcome = await _loaded(monitor, finish)
            outcome.recoveries = recoveries
            outcome.qemu = await monitor.execute("query-migrate")  # postcopy-blocktime
            return outcome
        if not recovering.allows():
            raise MigpipeError(
                f"{finish.carried}; QEMU holds the migration postcopy-paused, the guest running "
                "here: run migpipe incoming --postcopy again for the source to resume it"
            )
        logger.warning(
            "%s; QEMU paused the migration: waiting for the source to resume it", finish.carried
        )
        resumed, recoveries, opening = True, recoveries + 1, recovering.within(wires.open())


class TimedFd(FdChannel):
    """The wire as a descriptor, noting when decode read its last bytes (an FdChannel still,
    so that the pipeline treats it as any other descriptor)."""

    ended = 0.0

    def read(self) -> bytes:
        data = super().read()
        if data:
            self.ended = time.monotonic()
        return data


class TimedSource:
    """Any other wire (TLS), noting when decode read its last bytes."""

    def __init__(self, source: Source) -> None:
        self._source = source
        self.ended = 0.0

    def read(self) -> bytes | bytearray:
        data = self._source.read()
        if data:
            self.ended = time.monotonic()
        return data

    def interrupt(self) -> None:
        self._source.interrupt()


def timed_end(wire: int | Source) -> TimedFd | TimedSource:
    """The wire, noting when decode read its last bytes, the trailer: where the destination's
    part of the pause starts. Not its end of file, which may come after QEMU loaded the stream
    (decode releases the stream's end at the trailer)."""
    return TimedFd(wire) if isinstance(wire, int) else TimedSource(wire)


async def restore(
    qmp_path: str,
    path: Path,
    secrets: Secrets | None = None,
    progress: Progress | None = None,
    direct: Direct = False,
    running: bool | None = None,
    load: Callable[[int], Awaitable[Totals]] | None = None,
) -> Outcome:
    """Load the file `path` (savefile.restore, which withholds the stream's end until all of it
    checked) into the QEMU behind `qmp_path` (started with `-incoming defer`). A file that is
    not one restore reads is refused before QEMU is touched; MigpipeError unless QEMU completed
    the load.

    `running` is virsh restore's --running/--paused: None leaves the guest as the saved stream
    says (QEMU runs it if it ran when saved), True runs it (`cont`), False keeps it paused: a
    `stop` while QEMU is inmigrate only clears its autostart, so the guest never runs a cycle.

    `load`, given, writes the stream into QEMU's pipe instead of reading `path`: a pipe's,
    whose kind the caller checked."""
    if load is None:
        savefile.file_kind(path, secrets)
    async with _waiting(qmp_path) as (monitor, _):
        if running is False:
            await monitor.execute("stop")
        finish = await _through_pipe(
            monitor,
            "migrate-incoming",
            lambda fd, _: (
                savefile.restore(path, fd, secrets, progress, direct) if load is None else load(fd)
            ),
        )
        outcome = await _loaded(monitor, finish)
        if running and outcome.runstate != "running":
            await monitor.execute("cont")
            outcome.runstate = (await monitor.execute("query-status"))["status"]
        return outcome


@contextlib.asynccontextmanager
async def _waiting(qmp_path: str, postcopy: bool = False) -> AsyncIterator[tuple[qmp.Qmp, bool]]:
    """The QEMU behind `qmp_path`, checked to be waiting for a migration, with events on, and
    whether it waits for one to resume: with `postcopy`, a QEMU that holds a broken postcopy
    migration paused (postcopy-paused) waits for migrate-recover."""
    async with qmp.connect(qmp_path) as monitor:
        state = (await monitor.execute("query-status"))["status"]
        if state == "inmigrate":
            await monitor.execute("migrate-set-capabilities", capabilities=EVENTS)
            yield monitor, False
            return
        migration = (await monitor.execute("query-migrate")).get("status")
        if not (postcopy and migration == "postcopy-paused"):
            raise MigpipeError(f"QEMU is {state}, not inmigrate: start it with -incoming defer")
        yield monitor, True


async def _loaded(monitor: qmp.Qmp, finish: Finish) -> Outcome:
    """migpipe's figures and the VM's run state if QEMU completed the load; else the failure,
    migpipe's own when it came first (QEMU then failed for want of the stream's end)."""
    carried, status = finish.carried, finish.status
    if status == "completed" and isinstance(carried, Totals):
        runstate = (await monitor.execute("query-status"))["status"]
        return Outcome(carried, {"status": status}, runstate=runstate)
    if isinstance(carried, MigpipeError) and finish.carried_first:
        message = f"{carried.message}; {LOAD_ENDED[status]}"
        raise MigpipeError(message, carried.offset, carried.status)
    desc = "see its log"
    logger.info("QEMU %s; migpipe's side then: %s", status, carried)
    if status == "failed":
        with contextlib.suppress(MigpipeError):  # QEMU 7.2 exits right after a failed load
            desc = (await monitor.execute("query-migrate")).get("error-desc", desc)
    raise MigpipeError(f"{LOAD_ENDED[status]} ({desc})")


class Answerer:
    """The destination's lines to the source (on a descriptor, or a TLS channel): "opened" as
    soon as decode has read and authenticated the header, then the verdict; sealed and numbered
    when the stream is. If the source is gone, it has its own error to report."""

    def __init__(self, to: int | Sink | None) -> None:
        self._to = None if to is None else as_sink(to)
        self._sealer: filters.Filter | None = None
        self._index = 0

    def opened(self, chain: Sequence[filters.Filter], _: "Connections") -> None:
        """decode's callback, in its reading thread: the only one using the connection then
        (a one-way wire: one connection)."""
        self._sealer = sealer_of(chain)
        self.tell(Confirmation("opened"))

    def tell(self, line: Confirmation) -> None:
        with contextlib.suppress(OSError, MigpipeError):
            if self._to is not None:
                self._to.write([line.line(self._sealer, self._index)])
        self._index += 1


async def _drain(wire: int | Source) -> None:
    """Read the rest of the wire (bounded by DRAIN_TIMEOUT) after answering on its connection:
    closing a socket with unread bytes resets it, and the reset can discard the answer before
    the source reads it. The source stops sending once it sees the answer."""
    channel = as_source(wire)

    def discard() -> None:
        while channel.read():
            pass

    with trio.move_on_after(DRAIN_TIMEOUT), contextlib.suppress(OSError, MigpipeError):
        await run_interruptible(discard, channel.interrupt)


# -- the report ---------------------------------------------------------------------------------


def summary(command: str, outcome: Outcome) -> str:
    """QEMU's figures (its query-migrate words) and migpipe's, for stderr; `command` is
    migrate or save (a source), incoming or restore (a destination)."""
    t = outcome.totals
    ratio = t.qemu_bytes / t.wire_bytes if t.wire_bytes else 0.0
    pages = ", ".join(f"{kind} {count:,}" for kind, count in t.pages.items() if count)
    medium = "file" if command in ("save", "restore") else "wire"
    ours = (
        f"migpipe: {t.qemu_bytes:,} stream bytes, {t.wire_bytes:,} {medium} bytes "
        f"(ratio {ratio:.2f})" + (f"; pages: {pages}" if pages else "")
    )
    if outcome.recoveries:  # the broken wires' figures went with their errors
        ours += f" (the last wire's: resumed after the wire broke, {outcome.recoveries}x)"
    if command in ("incoming", "restore"):
        lines = [f"migpipe {command}: completed, the VM is {outcome.runstate}"]
        if (blocked := outcome.qemu.get("postcopy-blocktime")) is not None:
            lines.append(f"  postcopy: the guest's vCPUs waited {blocked:,} ms for pages")
        if (asked := t.postcopy) is not None and asked["median_ms"] is not None:
            lines.append(
                f"  postcopy: {asked['requests']:,} page requests, each page back in "
                f"{asked['median_ms']:,.1f} ms (median; 90% within {asked['p90_ms']:,.1f} ms) "
                "through the tunnel and the source"
            )
        if outcome.landing is not None:
            landing = outcome.landing
            lines.append(
                f"  real pause: destination {landing.loaded * 1e3:,.1f} ms (the wire's end to "
                f"the load {landing.end}; migrate reports the whole pause)"
            )
        return "\n".join([*lines, f"  {ours}"])
    q, ram = outcome.qemu, outcome.qemu.get("ram", {})
    pause = outcome.pause
    total = None if pause is None else pause.total
    if pause is None:
        real = ""
    elif total is None:
        real = f", real pause at least {pause.source * 1e3:,.1f} ms"
    else:
        real = f", real pause {total * 1e3:,.1f} ms"
    lines = [
        f"migpipe {command}: {q.get('status')} in {q.get('total-time', 0):,} ms, downtime "
        f"{q.get('downtime', 0):,} ms{real}, setup {q.get('setup-time', 0):,} ms",
        f"  QEMU: transferred {ram.get('transferred', 0):,} bytes, normal {ram.get('normal', 0):,}"
        f" pages, duplicate {ram.get('duplicate', 0):,}, dirty-sync-count "
        f"{ram.get('dirty-sync-count', 0)}, {ram.get('mbps', 0):,.0f} mbps",
    ]
    if "xbzrle-cache" in q:
        x = q["xbzrle-cache"]
        lines.append(
            f"  QEMU xbzrle: {x.get('pages', 0):,} pages, {x.get('bytes', 0):,} bytes, "
            f"cache-miss {x.get('cache-miss', 0):,}, overflow {x.get('overflow', 0):,}"
        )
    if pause is not None:
        lines.append("  " + pause.describe())
    lines.append("  " + ours)
    if command == "save":
        lines.append(f"  the VM is {outcome.runstate}")
    else:
        answer = outcome.confirmation
        if outcome.two_way:
            confirmed = "loaded, as its QEMU said on the return path"
            if requests := ram.get("postcopy-requests", 0):
                confirmed += f"; {requests:,} pages it requested in postcopy"
        elif answer is None or answer.status is None:
            confirmed = "no answer (none expected)"
        else:
            confirmed = answer.status + (" (sealed)" if answer.sealed else "")
        lines.append(f"  destination: {confirmed}")
    return "\n".join(lines)
