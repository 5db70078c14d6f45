"""The two-way tunnel: QEMU's connections on both ends, each a lane of the wire (version 2).

encode listens where the source QEMU migrates to (`--qemu ADDR`); decode connects to where the
destination QEMU listens (`-incoming unix:PATH`). QEMU's main connection is lane 0: its stream
goes through the pipeline (parsed, filtered, framed, vouched for by the trailer) as it does over
a pipe. Each further connection the source QEMU opens (postcopy-preempt's, multifd's) becomes the
next lane once it is known to be one (another migration stream is refused: SourceRelay), and
decode opens one to the destination for it, in the same order (QEMU 7.2 tells them apart by
that order). A lane's bytes cross in frames of whatever one read brought, through
the byte filters. Everything a QEMU writes back on a connection (the destination's return path:
page requests, acknowledgements, its SHUT) comes back the other way in the answer direction of
the wire, to the same connection on the source. The wire may be spread over several
connections (encode --connections; migpipe-wire(5) "Connections"), each carrying its share of the
lanes both ways, so that a lane does not wait behind another's bytes in one connection's buffers.

Threads: each connection's reading has a thread of its own, QEMU's and the wire's, so a lane
waits behind another only for the one frame being written on its wire connection: frames go out
under that connection's lock (Relay.write and _write_frame), the pipeline's lane 0 frames too.
The threads start under trio and stop together: the first that fails interrupts every read of
the others (Source.interrupt), which then end quietly.
"""

import contextlib
import logging
import math
import os
import select
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

import trio

from migpipe import chain as filters
from migpipe.chain import Buffer, FilterChain
from migpipe.errors import CorruptError, MigpipeError, Stopped
from migpipe.io import transport
from migpipe.io.channel import Channel, FdChannel
from migpipe.io.transport import Acceptor, Dialer
from migpipe.keys import Secrets
from migpipe.stream.multifd import ChannelKind, classify
from migpipe.stream.postcopy import PreemptReader, RequestTimes, ReturnPathReader
from migpipe.tunnel.lanecodec import FIRST, LaneCodec, Verbatim, codec_for
from migpipe.tunnel.multifdcodec import lane_counters
from migpipe.tunnel.pipeline import Totals, decode, encode
from migpipe.tunnel.progress import Progress
from migpipe.wire import (
    FRAME_END,
    FRAME_OPEN,
    JOIN_SIZE,
    MAX_FRAME,
    MAX_LANES,
    ONE_CONNECTION,
    SESSION_SIZE,
    Connections,
    Frame,
    Join,
    LaneTally,
    LaneWriter,
    WireReader,
    lane_connection,
    lane_position,
    parse_join,
)

logger = logging.getLogger(__name__)  # what migpipe -v prints, and its warnings always
SHORT_RETRY = 0.005  # s: how often a further connection that sent 1-3 bytes is looked at again
ANOTHER_STREAM = "it is another migration stream (QEMU's header): one QEMU migrates per encode"

# What may wait for one connection of a QEMU that is not reading it (a multifd packet is 0.5
# MiB): in its Outlet, or for lane 0 in decode's pipeline (pipeline.decode's `hold`).
OUTLET_BYTES = 16 << 20


class Relay:
    """One end's connections to its QEMU, and the wire between the ends.

    `back` is the answer direction's side (decode): it reads the lanes and writes answers;
    the source's side writes lanes and reads answers. Without `two_way` (the wire is a pipe)
    nothing can come back: a destination QEMU that answers is then an error, and a source
    QEMU that waits for answers (its return path) waits in vain (migpipe(1) says so).
    """

    def __init__(
        self, wire: Channel, two_way: bool, back: bool, further: Dialer | Acceptor | None = None
    ) -> None:
        self.wire = wire
        self.two_way = two_way
        self.back = back
        self.chain: FilterChain | None = None  # decode's comes with the wire's header
        self.connections = ONE_CONNECTION  # decode's comes with the wire's header too
        self.further = further  # where the wire's further connections come from
        self.lock = threading.Lock()
        self.wires: dict[int, Channel] = {0: wire}  # the wire's connections, as they join
        self._writing = {0: threading.Lock()}  # each held while a frame goes out on its wire
        self.frames = LaneWriter(back=back)
        self.conns: dict[int, FdChannel] = {}
        self._sockets: list[socket.socket] = []
        self._tallies: dict[int, LaneTally] = {}  # what came in for each connection
        self._stopping = False
        self._start: Callable[[Callable[[], None]], None] | None = None
        self._jobs: list[Callable[[], None]] = []  # threads for run() to start
        self._outlets: dict[int, Outlet] = {}
        self._codecs: dict[int, LaneCodec] = {}  # the lanes' whose payloads we decode
        self.encoders: list[LaneCodec] = []  # the lanes' whose QEMU bytes we encode
        self._pumps = 0  # connections still being read by a thread of their own
        self._changed = threading.Condition(self.lock)
        self._header_sent = back  # the answer direction has no header of its own

    # -- the wire ---------------------------------------------------------------------------

    def write(self, parts: Sequence[Buffer]) -> None:
        """Frames onto the wire's first connection, whole, one at a time: the lane 0
        pipeline's writer sends through this, its header first."""
        with self._writing[0]:
            self.wire.write(parts)
        with self.lock:
            self._header_sent = True
            self._changed.notify_all()

    def _write_frame(self, lane: int, make: Callable[[], bytes], *payload: Buffer) -> None:
        """A frame of `lane`, on the connection that carries it, whose header `make` numbers
        under that connection's lock, once the wire's header is out and the connection there."""
        index = lane_connection(lane, self.connections.count)
        with self.lock:
            while not ((self._header_sent and index in self.wires) or self._stopping):
                self._changed.wait()
            if self._stopping:
                raise Stopped
            wire = self.wires[index]
        with self._writing[index]:
            wire.write([make(), *payload])

    def _job(self, job: Callable[[], None]) -> None:
        """A thread for `job`, now or once run() starts."""
        if self._start is None:
            self._jobs.append(job)
        else:
            self._start(job)

    # -- the wire's further connections -----------------------------------------------------

    def spread(self) -> None:
        """The wire's further connections (migpipe-wire(5) "Connections"), a thread's job once
        their count is known: opened here, each starting with its JOIN, or accepted, each
        telling in its JOIN which it is; every one then read by a thread of its own."""
        count = self.connections.count
        with self.lock:  # encode's first connection carries the header before the others open
            while not (self._header_sent or self._stopping):
                self._changed.wait()
        for index in range(1, count):
            if isinstance(self.further, Dialer):
                channel = self.further.open()
                place = Join(self.connections.session, index, count)
                channel.write([place.encode()])
                self._attach(index, channel)
                self._job(partial(self._read, channel, WireReader(not self.back, place=place)))
            else:
                channel = self.further.open((JOIN_SIZE, self._joining))
                self._job(partial(self._read, channel, WireReader(not self.back, joined=True)))

    def _joining(self, first: bytes) -> None:
        """A further connection's JOIN, peeked before it is accepted (without TLS, whose
        handshake admits only the peer): one of another wire is refused, as a stray is."""
        self._admissible(parse_join(first))

    def _admissible(self, join: Join) -> None:
        """Raise CorruptError unless `join` is of this wire and its connection not there yet."""
        join.check(self.connections)
        with self.lock:
            if join.index in self.wires:
                raise CorruptError(f"a second connection joined as {join.index}")

    def _attach(self, index: int, channel: Channel) -> None:
        with self.lock:
            self.wires[index] = channel
            self._writing[index] = threading.Lock()
            self._changed.notify_all()

    def spread_out(self) -> None:
        """Until every further connection joined: the wire is whole only then."""
        with self.lock:
            while len(self.wires) < self.connections.count and not self._stopping:
                self._changed.wait()
        if self._stopping:
            raise Stopped

    def finish_wires(self) -> None:
        """End the writing direction of every connection of the wire."""
        for wire in list(self.wires.values()):
            wire.finish()

    def _read(self, channel: Channel, reader: WireReader) -> None:
        """A connection of the wire to its end: what the other side sends on it (answers on
        encode's side, lanes on decode's) handed on, a JOIN first where it comes."""
        while True:
            chunk = channel.read()
            if chunk:
                reader.feed(chunk)
            else:
                reader.close()
            for event in reader.next_events():
                if isinstance(event, Join):
                    self._admissible(event)
                    self._attach(event.index, channel)
                else:
                    self.take(event)
            if not chunk:
                return

    def take(self, frame: Frame) -> None:
        """A frame for one of our connections, from a reader of the wire."""
        self.deliver(frame)

    def deliver(self, frame: Frame) -> None:
        """A frame for one of our connections (a lane's, or an answer to one), from the wire's
        reader: its bytes queued for the connection's outlet, or at its END, the outlet told
        to end the connection's writing direction once it wrote the rest."""
        outlet = self._outlets.get(frame.lane)
        if outlet is None:
            message = f"frame for connection {frame.lane}, which is not open"
            raise CorruptError(message, frame.offset)
        tally = self._tallies.setdefault(frame.lane, LaneTally(frame.lane))
        if frame.kind == FRAME_END:
            tally.check(frame)
            outlet.put(None)
            return
        frame.checked_crc()
        position = lane_position(frame.lane, frame.sequence, back=not self.back)
        payload = self.chain.open(frame.payload, MAX_FRAME, position)
        codec = self._codecs.get(frame.lane)
        if codec is None:  # the lane's first payload: the forward lanes' chooses their codec
            codec = Verbatim() if not self.back else codec_for(payload[:FIRST], self.chain)
            self._codecs[frame.lane] = codec
        data = codec.decode(payload)
        tally.add(data)
        self._arrived(frame.lane, data)
        outlet.put(data)

    def _arrived(self, lane: int, data: Buffer) -> None:
        """What the wire brought for one of our connections, as it came (see PageTimer)."""

    def _answered(self, lane: int, data: Buffer) -> None:
        """What our QEMU wrote on one of its connections, as it was read (see PageTimer)."""

    # -- connections ------------------------------------------------------------------------

    def add(
        self, lane: int, sock: socket.socket, name: str, pump: bool = True, outlet: bool = True
    ) -> FdChannel:
        """A connection to our QEMU as `lane`: with `outlet`, what the wire brings for it is
        written by a thread of its own (see Outlet; else the pipeline writes it); with `pump`,
        what QEMU writes on it is read by a thread of its own (else the pipeline reads it)."""
        self._sockets.append(sock)
        conn = FdChannel(sock.fileno(), name)
        with self.lock:
            self.conns[lane] = conn
            self._changed.notify_all()
        if outlet:
            self._outlets[lane] = Outlet(conn)
            self._job(self._outlets[lane].run)
        if pump:
            self.pump(lane)
        return conn

    def pump(self, lane: int) -> None:
        """A thread of its own reads what our QEMU writes on the lane's connection."""
        with self.lock:
            self._pumps += 1
        self._job(partial(self._pump, lane))

    def _pump(self, lane: int) -> None:
        """A connection's bytes to the other end until our QEMU ends it."""
        conn = self.conns[lane]
        codec: LaneCodec | None = None
        try:
            while data := conn.read():
                if not self.two_way:
                    raise MigpipeError(
                        f"{conn.name} answers (QEMU's return path), but the wire is one way: "
                        "carry it over --listen/--connect"
                    )
                if codec is None:  # answers travel as they are; the forward lanes' may not
                    codec = codec_for(data[:FIRST], self.chain) if not self.back else Verbatim()
                    self.encoders.append(codec)
                self._answered(lane, data)
                self.frames.carried(lane, data)
                self._send(lane, codec.encode(data))
            if self.two_way:
                self._send(lane, codec.finish() if codec is not None else [])
                self._write_frame(lane, partial(self.frames.end, lane))
        finally:
            with self.lock:
                self._pumps -= 1
                self._changed.notify_all()

    def _send(self, lane: int, payloads: list[Buffer]) -> None:
        """Payloads of the lane through the byte filters, each a DATA frame; only the lane's
        own thread calls it, so its positions are its own."""
        for payload in payloads:
            sealed = self.chain.seal(payload, self.frames.position(lane))
            self._write_frame(lane, partial(self.frames.data, lane, sealed), sealed)

    def wait_pumps(self) -> None:
        """Until every pumped connection ended (our QEMU closed them all)."""
        with self.lock:
            while self._pumps and not self._stopping:
                self._changed.wait()
        if self._stopping:
            raise Stopped

    def stop(self) -> None:
        """End every wait of every thread (a failure elsewhere, a cancel)."""
        self._stopping = True
        with self.lock:
            self._changed.notify_all()
        for conn in list(self.conns.values()):
            conn.interrupt()
        for outlet in list(self._outlets.values()):
            outlet.stop()
        for wire in list(self.wires.values()):
            wire.interrupt()
        if self.further is not None:
            self.further.interrupt()

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()

    # -- threads ----------------------------------------------------------------------------

    async def run(
        self, body: Callable[[], Awaitable[Totals]], jobs: Sequence[Callable[[], None]] = ()
    ) -> Totals:
        """`body` in this task, beside a thread for each of `jobs` and each pumped connection
        (those added later too); returns body's result once every thread ended."""
        limiter = trio.CapacityLimiter(2 * MAX_LANES + 4)

        async def thread(job: Callable[[], None]) -> None:
            try:
                await trio.to_thread.run_sync(job, limiter=limiter)
            except Stopped:
                if not self._stopping:
                    raise
            except BaseException:
                self.stop()
                raise

        try:
            async with trio.open_nursery() as nursery:
                self._start = partial(trio.from_thread.run_sync, nursery.start_soon, thread)
                for job in [*jobs, *self._jobs]:
                    nursery.start_soon(thread, job)
                try:
                    return await body()
                except BaseException:
                    self.stop()
                    raise
        finally:
            self.close()

    async def until_pumped(self) -> None:
        """wait_pumps(), from trio (a cancel abandons the wait, and stop() ends it)."""
        await trio.to_thread.run_sync(self.wait_pumps, abandon_on_cancel=True)


class Outlet:
    """What is written to one connection, queued, and the thread that writes it: the wire's one
    reader never waits for a QEMU that reads one connection only once another has delivered
    (the destination reads each multifd channel's first packet, and peeks at each new
    connection, in its main thread). Bounded in bytes: a connection whose QEMU stops reading
    holds the wire's reader (and so every lane) once OUTLET_BYTES wait for it."""

    def __init__(self, conn: FdChannel) -> None:
        self.conn = conn
        self._queue: deque[Buffer | None] = deque()  # None: end the writing direction
        self._bytes = 0
        self._stopping = False
        self._changed = threading.Condition()

    def put(self, data: Buffer | None) -> None:
        with self._changed:
            while self._bytes >= OUTLET_BYTES and not self._stopping:
                self._changed.wait()
            if self._stopping:
                raise Stopped
            self._queue.append(data)
            self._bytes += len(data or b"")
            self._changed.notify_all()

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    def run(self) -> None:
        """Write what comes until the END (or, for a connection never ended, a stop)."""
        while True:
            with self._changed:
                while not (self._queue or self._stopping):
                    self._changed.wait()
                if self._stopping:
                    raise Stopped
                data = self._queue.popleft()
            if data is None:
                self.conn.finish()
                return
            self.conn.write([data])
            with self._changed:
                self._bytes -= len(data)
                self._changed.notify_all()


@dataclass(eq=False)
class Arrival:
    """A further connection of the source QEMU, accepted but not yet known to be a lane's
    (`lane` None), or taken for postcopy-preempt's lane before it said anything."""

    sock: socket.socket
    lane: int | None = None
    again: float = math.inf  # s until it must be looked at again if nothing new comes
    watched: bool = False  # polled for its first bytes

    def __post_init__(self) -> None:
        self.fd = self.sock.fileno()  # kept: the socket may be closed before it is unpolled


class SourceRelay(Relay):
    """encode's side: the source QEMU's connections in, its answers out.

    A further connection becomes the next lane only once it is known to be this migration's.
    A multifd channel says so in its first 4 bytes. Postcopy-preempt's says nothing until the
    destination asks for a page, yet the destination waits for it before it runs the guest:
    once the main stream advised postcopy, the first connection that says nothing is taken
    for it at once, its lane opened, and what it says is read only once its first bytes
    showed it is no other migration stream. Another migration stream (a second QEMU, or this
    one migrating again, to the same address) starts with QEMU's header: it is refused in one
    line, as a connection that is neither is, and the migration goes on; if it was taken for
    preempt's, the lane waits for the next connection that says nothing (see _refill).
    """

    def __init__(
        self,
        wire: Channel,
        two_way: bool,
        server: socket.socket,
        spec: str,
        further: Dialer | Acceptor | None = None,
        resumed: bool = False,
    ) -> None:
        super().__init__(wire, two_way, back=False, further=further)
        self._server = server
        self._spec = spec
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # see advised(), stop()
        self._accepting = True
        self._postcopy: bool | None = True if resumed else None  # see advised()
        self._poller = select.poll()
        self._waiting: list[Arrival] = []  # in the order they came
        self._preempt: int | None = None  # the lane taken for postcopy-preempt's connection
        self._vacant: Arrival | None = None  # that lane, its connection refused

    def advised(self, postcopy: bool) -> None:
        """What the main stream told: whether QEMU may switch to postcopy (from its reader)."""
        self._postcopy = postcopy
        os.eventfd_write(self._wake, 1)

    def accept(self) -> None:
        """The source QEMU's further connections, each the next lane once it is known to be
        one (see the class), until stop_accepting(); then those still waiting are sorted as
        they stand: QEMU opens no more."""
        server = self._server.fileno()
        self._poller.register(server, select.POLLIN)
        self._poller.register(self._wake, select.POLLIN)
        timeout: int | None = None  # ms until one of them must be looked at again
        with self.lock:  # wait_pumps() waits for the lanes this may still open
            self._pumps += 1
        try:
            while True:
                last = not self._accepting
                for fd, _ in self._poller.poll(0 if last else timeout):
                    if fd == self._wake:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wake)
                    elif fd == server:
                        with contextlib.suppress(BlockingIOError, ConnectionAbortedError):
                            self._wait_for(self._server.accept()[0])
                if self._stopping:
                    raise Stopped
                timeout = self._sort_all(last)
                if last:
                    if self._vacant is not None:  # its END: QEMU left it without a connection
                        self.pump(self._vacant.lane)
                    return
        finally:
            for arrival in self._waiting:
                if arrival.lane is None:
                    arrival.sock.close()
            with self.lock:
                self._pumps -= 1
                self._changed.notify_all()

    def _wait_for(self, sock: socket.socket) -> None:
        """A new connection waits to be sorted, unless too many already do (a flood)."""
        if len(self._waiting) >= MAX_LANES:
            self._refuse(sock, f"{MAX_LANES} connections already wait to say what they are")
        else:
            self._waiting.append(Arrival(sock))

    def _sort_all(self, last: bool) -> int | None:
        """Sort each connection that waits (see _sort); the ms until one of them must be looked
        at again if nothing happens (None: not before something does)."""
        for arrival in list(self._waiting):
            head, ended = _first_bytes(arrival.sock)
            self._keep(arrival, self._sort(arrival, head, ended, last), bool(head) or ended)
        soonest = min((arrival.again for arrival in self._waiting), default=math.inf)
        return None if soonest == math.inf else max(1, math.ceil(soonest * 1000))

    def _keep(self, arrival: Arrival, again: float | None, spoke: bool) -> None:
        """`arrival` out of the waiting list (`again` None), or in it; polled while it says
        nothing (one with a few bytes would wake every poll: it is looked at again in time)."""
        watch = again == math.inf and not spoke
        if watch != arrival.watched:
            if watch:
                self._poller.register(arrival.fd, select.POLLIN)
            else:
                self._poller.unregister(arrival.fd)
            arrival.watched = watch
        if again is None:
            if arrival in self._waiting:
                self._waiting.remove(arrival)
        else:
            arrival.again = again
            if arrival not in self._waiting:
                self._waiting.append(arrival)

    def _sort(self, arrival: Arrival, head: bytes, ended: bool, last: bool) -> float | None:
        """Open a lane for a further connection, or refuse it, once its first bytes (`head`, at
        most 4; `ended`: it closed before any) or the main stream tell which it is (see the
        class), or the main stream ended (`last`); None then, else how long until it must be
        looked at again if nothing new comes (math.inf: not before something does)."""
        kind = classify(head) if len(head) == 4 else None
        if arrival.lane is not None:  # taken for preempt's: its lane is open
            if kind is ChannelKind.MAIN:
                self._refuse(arrival.sock, ANOTHER_STREAM, keep=True)
                self._vacant = arrival
            elif kind is None and not (ended or last):
                return SHORT_RETRY if head else math.inf
            else:
                if kind is ChannelKind.MULTIFD:
                    self._preempt = None  # a channel of 10.1's multifd with postcopy: not it
                self.pump(arrival.lane)
            return None
        preempt = self._postcopy is True and (self._preempt is None or self._vacant is not None)
        if kind is ChannelKind.MULTIFD:
            self._open(arrival.sock, "a multifd channel")
        elif kind is ChannelKind.MAIN:
            self._refuse(arrival.sock, ANOTHER_STREAM)
        elif head and kind is None and not last:
            return SHORT_RETRY  # 1-3 bytes: more will tell
        elif not (head or ended or preempt or last):
            return math.inf  # a multifd channel's magic will tell, or the main stream
        elif preempt and self._vacant is not None:
            self._refill(arrival, head, ended, last)
        elif preempt:
            spoke = kind is not None or ended or last
            self._preempt = self._open(arrival.sock, "postcopy-preempt's", pump=spoke)
            if not spoke:
                arrival.lane = self._preempt
                return math.inf
        elif self._postcopy is None and not last:
            return math.inf  # a page, or silence, means something once the main stream told
        else:
            what = f"its first bytes are {head.hex()}" if head else "it said nothing"
            self._refuse(arrival.sock, f"it is no connection of this migration ({what})")
        return None

    def _refill(self, arrival: Arrival, head: bytes, ended: bool, last: bool) -> None:
        """The preempt lane whose connection was refused takes `arrival`'s: onto the refused
        one's descriptor, which the lane's channels (its outlet, its pump to come) hold."""
        vacant, self._vacant = self._vacant, None
        logger.info("postcopy-preempt's lane %d takes the next connection", vacant.lane)
        self._keep(arrival, None, True)  # not polled: its descriptor is closed next
        os.dup2(arrival.sock.fileno(), vacant.sock.fileno())
        arrival.sock.close()
        self._keep(vacant, self._sort(vacant, head, ended, last), bool(head) or ended)

    def _open(self, sock: socket.socket, what: str, pump: bool = True) -> int:
        """The connection as the next lane: its OPEN on the wire, before any of its DATA."""
        lane = len(self.conns)
        if lane >= MAX_LANES:
            sock.close()
            raise MigpipeError(f"QEMU opened more than {MAX_LANES} connections on {self._spec}")
        logger.info("the source QEMU's connection %d on %s: %s", lane, self._spec, what)
        transport.tune(sock)
        self._write_frame(lane, partial(self.frames.open, lane))
        self.add(lane, sock, f"the source QEMU's connection {lane} on {self._spec}", pump=pump)
        return lane

    def _refuse(self, sock: socket.socket, why: str, keep: bool = False) -> None:
        """A connection that is not this migration's, ended: QEMU on the other end fails its
        migration and keeps its guest; ours goes on. With `keep`, its descriptor stays open
        (a lane holds it: see _refill)."""
        logger.warning("refused a connection on %s: %s", self._spec, why)
        if keep:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        else:
            sock.close()

    def stop_accepting(self) -> None:
        """The main stream ended: QEMU opens no more connections."""
        self._accepting = False
        os.eventfd_write(self._wake, 1)

    def stop(self) -> None:
        """The accepting thread's wait ends too: a failure (the wire broken) before the main
        stream ended would otherwise leave run() waiting for it, and encode for ever."""
        super().stop()
        os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        super().close()
        os.close(self._wake)

    def answers(self) -> None:
        """The answer direction of the wire's first connection, to the source QEMU's."""
        self._read(self.wire, WireReader(back=True))


def _first_bytes(sock: socket.socket) -> tuple[bytes, bool]:
    """Up to a connection's first 4 bytes, left to be read, and whether it ended there."""
    try:
        head = sock.recv(4, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b"", False
    except OSError:
        return b"", True
    return head, not head


class PageTimer:
    """Postcopy's page requests timed where decode sees them: from the destination QEMU's
    request on its return path (lane 0's answers) to the page's arrival from the wire on the
    postcopy-preempt lane (one whose bytes are not multifd's): the tunnel's and the source's
    part of what a guest's vCPU waits for a page, without the destination QEMU's own. Without
    preempt the pages come in lane 0's stream and are not timed; a reader that cannot follow
    its bytes stops timing them, never the migration. Threads: lane 0's pump calls
    requested(), the wire's readers arrived()."""

    def __init__(self) -> None:
        self.times = RequestTimes()
        self._requests: ReturnPathReader | None = ReturnPathReader()
        self._pages: dict[int, PreemptReader | None] = {}
        self._lock = threading.Lock()

    def requested(self, data: Buffer) -> None:
        if self._requests is None:
            return
        now = time.monotonic()
        try:
            asked = self._requests.feed(data)
        except CorruptError:
            self._requests = None
            return
        with self._lock:
            for request in asked:
                self.times.requested(request, now)

    def arrived(self, lane: int, data: Buffer) -> None:
        if lane not in self._pages:  # the lane's first bytes: a multifd channel's are not timed
            multifd = len(data) >= 4 and classify(bytes(data[:4])) == ChannelKind.MULTIFD
            self._pages[lane] = None if multifd else PreemptReader()
        reader = self._pages[lane]
        if reader is None:
            return
        now = time.monotonic()
        try:
            pages = reader.feed(data)
        except CorruptError:
            self._pages[lane] = None
            return
        with self._lock:
            for block, offset in pages:
                self.times.arrived(block, offset, now)


class DestinationRelay(Relay):
    """decode's side: lanes out to the destination QEMU's connections, its answers back."""

    def __init__(
        self,
        wire: Channel,
        two_way: bool,
        spec: str,
        timeout: float,
        further: Dialer | Acceptor | None = None,
    ) -> None:
        super().__init__(wire, two_way, back=True, further=further)
        self._spec = spec
        self._timeout = timeout
        self.pages = PageTimer()

    def _answered(self, lane: int, data: Buffer) -> None:
        if lane == 0:
            self.pages.requested(data)

    def _arrived(self, lane: int, data: Buffer) -> None:
        if lane:
            self.pages.arrived(lane, data)

    def connect(self, lane: int) -> FdChannel:
        """A connection to the destination QEMU for `lane`, once every lane before it has
        one (so in lane order, though lanes may come on different connections of the wire);
        lane 0's stream is the pipeline's to write."""
        with self.lock:
            while lane and lane - 1 not in self.conns and not self._stopping:
                self._changed.wait()
        if self._stopping:
            raise Stopped
        sock = transport.connect_socket(self._spec, self._timeout)
        name = f"the destination QEMU's connection {lane} on {self._spec}"
        return self.add(lane, sock, name, outlet=lane != 0)

    def take(self, frame: Frame) -> None:
        """A frame of a lane above 0, from a reader of the wire."""
        if frame.kind == FRAME_OPEN:
            self.connect(frame.lane)
        else:
            self.deliver(frame)

    def opened(self, chain: Sequence[filters.Filter], connections: Connections) -> None:
        """The wire's header came (decode's reading thread): its chain opens the lanes'
        payloads, and its further connections, if any, are taken."""
        with self.lock:
            self.chain, self.connections = FilterChain(chain), connections
        if connections.count > 1:
            if self.further is None:
                raise MigpipeError(
                    f"the wire is spread over {connections.count} connections: decode takes "
                    "them with --listen or --connect"
                )
            self._job(self.spread)


def _channel(wire: int | Channel) -> tuple[Channel, bool]:
    """The wire end as a Channel, and whether answers can come back on it (a connection)."""
    if not isinstance(wire, int):
        return wire, True  # TLS
    return FdChannel(wire, "the wire"), stat.S_ISSOCK(os.fstat(wire).st_mode)


async def encode_two_way(
    spec: str,
    accept_timeout: float,
    wire: int | Channel,
    chain: Sequence[filters.Filter],
    progress: Progress | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    resumed: bool = False,
    connections: int = 1,
    further: Dialer | Acceptor | None = None,
) -> Totals:
    """encode --qemu: the source QEMU's connections on `spec` through the wire, both ways.
    Started by nursery.start(), it returns to its starter once it listens: QEMU may migrate.
    `resumed`: QEMU resumes a broken postcopy migration (`migrate` with resume), whose main
    stream cannot be parsed, so it crosses through the byte filters only (pipeline's
    ResumedStream); postcopy sends no page that the page filters could have shortened.
    `connections`: the wire is spread over that many, the first `wire`, the others from
    `further` (migpipe-wire(5) "Connections")."""
    channel, two_way = _channel(wire)
    spread = Connections(connections, os.urandom(SESSION_SIZE)) if connections > 1 else None
    if resumed:
        chain = [f for f in chain if not isinstance(f, filters.PageFilter)]
    with transport.listening(spec) as server:
        task_status.started()
        main = await trio.to_thread.run_sync(
            partial(transport.accept, server, spec, timeout=accept_timeout)
        )
        relay = SourceRelay(channel, two_way, server, spec, further, resumed)
        relay.chain = FilterChain(chain)  # bound to the wire's header once encode wrote it
        relay.connections = spread or ONE_CONNECTION
        source = relay.add(0, main, f"the source QEMU's connection on {spec}", pump=False)

        async def body() -> Totals:
            totals = await encode(
                source,
                channel,
                chain,
                progress,
                send=relay.write,
                resumed=resumed,
                connections=relay.connections,
                advised=relay.advised,
            )
            relay.stop_accepting()
            await relay.until_pumped()
            await trio.to_thread.run_sync(relay.spread_out)
            await trio.to_thread.run_sync(relay.finish_wires)
            totals.filter_counters.update(lane_counters(relay.encoders))
            return totals

        jobs = [relay.accept, *([relay.answers] if two_way else [])]
        if spread is not None:
            jobs.append(relay.spread)
        return await relay.run(body, jobs)


async def decode_two_way(
    wire: int | Channel,
    spec: str,
    connect_timeout: float,
    progress: Progress | None = None,
    secrets: Secrets | None = None,
    resumed: bool = False,
    further: Dialer | Acceptor | None = None,
) -> Totals:
    """decode --qemu: the wire into the destination QEMU's connections on `spec`, both ways;
    with `resumed`, a resumed postcopy migration's (see encode_two_way), as QEMU's
    migrate-recover waits for it there, and nothing else. A wire spread over several
    connections has the others from `further`."""
    channel, two_way = _channel(wire)
    relay = DestinationRelay(channel, two_way, spec, connect_timeout, further)
    sink = relay.connect(0)

    async def body() -> Totals:
        totals = await decode(
            channel,
            sink,
            progress,
            secrets,
            relay.opened,
            take=relay.take,
            resumed=resumed,
            hold=OUTLET_BYTES,
        )
        await relay.until_pumped()
        await trio.to_thread.run_sync(relay.spread_out)
        if two_way:
            await trio.to_thread.run_sync(relay.finish_wires)
        totals.postcopy = relay.pages.times.figures()
        return totals

    return await relay.run(body)
