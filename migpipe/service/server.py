"""`migpipe serve`: encode and decode jobs on file descriptors that daemons pass over a socket.

Management daemons (libvirt, vdsm, KubeVirt) do not run shell pipelines. They open files and
sockets themselves, with their own credentials and security labels, and hand the fds to a
helper. This service takes fds over a UNIX socket with SCM_RIGHTS (`add-fd`), names them, and
runs jobs on them (`start-job`). It reports progress and outcomes as events. The protocol is
migpipe.service.protocol; this module is its I/O and the jobs.

These are the rules a daemon has to reason about:
- Only the service's own uid, root and `--allow-uid` uids may connect. SO_PEERCRED decides.
- fds and jobs belong to the connection that added or started them, as QMP's fds belong to the
  monitor connection. When that connection closes, its unused fds are closed and its jobs
  cancelled, so a daemon that dies never leaves a helper feeding a half-migrated guest.
- A job takes its fds when it starts and closes them when it ends, however it ends.
- Each job runs in its own cancel scope, in its connection's nursery. A failed job produces a
  JOB_FAILED event and nothing else: neither its connection nor the service goes down.
"""

import array
import contextlib
import errno
import fcntl
import itertools
import math
import os
import signal
import socket
import stat
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import trio

from migpipe.chain import Filter, parse_chain
from migpipe.errors import (
    EXIT_ERROR,
    MigpipeError,
    PeerGoneError,
    Stopped,
    UsageError,
    leaves,
    quoted,
)
from migpipe.io import idle
from migpipe.io.channel import FdChannel, read_waiting
from migpipe.io.files import enlarge_pipe
from migpipe.keys import Secrets
from migpipe.save import LAYOUTS
from migpipe.save.fixedfile import PlainFile, check_chain
from migpipe.save.savefile import restore_from, save_into
from migpipe.service import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_FDS, DEFAULT_MAX_JOBS
from migpipe.service.protocol import (
    BOOLEAN,
    COMMANDS,
    INPUT,
    JOB_CANCELLED,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_PROGRESS,
    MAX_FDS_PER_MESSAGE,
    MAX_LINE,
    NO_ID,
    OUTPUT,
    SAVE_FILE,
    SAVED_FILE,
    SECRET,
    STRING,
    STRINGS,
    Arg,
    Command,
    CommandError,
    FdInfo,
    Flood,
    Line,
    Reader,
    Schema,
    check_arguments,
    encode_message,
    error_reply,
    event,
    greeting,
    job_status,
    parse_command,
    peer_credentials,
    reply,
)
from migpipe.tunnel.pipeline import Totals, decode, encode
from migpipe.tunnel.progress import INTERVAL, Progress
from migpipe.units import parse_size

OUTBOX = 64  # messages queued for one client; progress events are dropped beyond it
FLUSH_SECONDS = 5.0  # how long a flooding client gets to read its error before the close
ACCEPT_BACKOFF = 0.1  # out of fds or memory: retry accept() after this long
REFUSALS_LOGGED = 10  # refused connections logged one by one per REFUSAL_INTERVAL; then counted
REFUSAL_INTERVAL = 60.0  # seconds
JOB_SCRYPT_LOG_N_MAX = 18  # 256 MiB per passphrase job at most, as age's default (CLI: 20)
BACKLOG = 64
GONE = (trio.BrokenResourceError, trio.ClosedResourceError)  # a closed socket or queue
ANCILLARY = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)
FILE_TYPES = (
    (stat.S_ISFIFO, "pipe"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISREG, "file"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISDIR, "directory"),
    (stat.S_ISLNK, "symbolic link"),
)


# -- fds -----------------------------------------------------------------------------------------


def describe_fd(fd: int) -> FdInfo:
    """What an fd refers to and how it is open (an O_PATH fd reads and writes nothing)."""
    mode = os.fstat(fd).st_mode
    kind = next((name for test, name in FILE_TYPES if test(mode)), "special file")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_PATH:
        return FdInfo(kind, readable=False, writable=False)
    access = flags & os.O_ACCMODE
    return FdInfo(kind, readable=access != os.O_WRONLY, writable=access != os.O_RDONLY)


def received_fds(ancillary: Iterable[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _LoopFd:
    """A job's pipe, socket or character device, non-blocking, waited on by the trio loop.

    A job must end on cancel-job even while its peer stalls. In a worker thread a read can be
    interrupted (io.channel.Readable), but a write to a peer that stopped reading cannot. So
    the pipeline's threads hop back into the job's task for each read and write
    (trio.from_thread.run runs it there), where the wait is cancelled with the job. The fd is
    owned by the job.
    """

    def __init__(self, fd: int, what: str, idle_timeout: float = 0) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._what = what
        self._idle = idle_timeout or math.inf  # a socket peer's silence allowed (io.idle)


class LoopSource(_LoopFd):
    """A job's input (an io.channel.Source)."""

    _stopping = False

    def read(self) -> bytes:
        return trio.from_thread.run(self._read)

    def interrupt(self) -> None:
        """Make every later read raise Stopped. A wait is cancelled with the job's task anyway,
        but a stage busy in Python between reads (a fixed-layout save parsing) whose peer
        always has bytes ready would never wait, and so never see the cancel."""
        self._stopping = True

    def quiet(self, seconds: float) -> bool:
        """Whether nothing (no byte, no end) arrives within `seconds`: encode's cue to send
        what it holds, or a keepalive (io.channel.FdChannel.quiet)."""
        return trio.from_thread.run(self._quiet, seconds)

    async def _quiet(self, seconds: float) -> bool:
        if self._stopping:
            raise Stopped
        with trio.move_on_after(seconds):
            await trio.lowlevel.wait_readable(self._fd)
            return False
        return True

    async def _read(self) -> bytes:
        if self._stopping:  # on the loop, where the job's stop has run before this read
            raise Stopped
        while True:
            try:
                return read_waiting(self._fd)
            except BlockingIOError:
                with trio.move_on_after(self._idle) as waiting:
                    await trio.lowlevel.wait_readable(self._fd)
                if waiting.cancelled_caught:
                    raise idle.silent(self._fd, self._idle, self._what) from None
            except ConnectionResetError:
                message = f"{self._what}: connection reset by the peer"
                raise PeerGoneError(message) from None


class LoopSink(_LoopFd):
    """A job's output (an io.channel.Sink); a write waiting for its reader ends with the job."""

    def write(self, parts: Sequence[bytes | memoryview]) -> None:
        trio.from_thread.run(self._write, parts)

    async def _write(self, parts: Sequence[bytes | memoryview]) -> None:
        for part in parts:
            view = memoryview(part)
            while view:
                try:
                    view = view[os.write(self._fd, view) :]
                except BlockingIOError:
                    with trio.move_on_after(self._idle) as waiting:
                        await trio.lowlevel.wait_writable(self._fd)
                    if waiting.cancelled_caught:
                        raise idle.stalled(self._fd, self._what, self._idle) from None
                except (BrokenPipeError, ConnectionResetError):
                    message = f"{self._what} was closed by its reader"
                    raise PeerGoneError(message) from None


# -- job kinds -----------------------------------------------------------------------------------


class TakenFd(NamedTuple):
    name: str
    number: int
    info: FdInfo


def release(fds: Iterable[TakenFd]) -> None:
    """Close a job's fds. Sockets are shut down for writing first, so that the peer sees the
    end of the stream even when the client kept a copy of the socket."""
    for taken in fds:
        if taken.info.type == "socket":
            with contextlib.suppress(OSError):
                sock = socket.socket(fileno=taken.number)
                try:
                    sock.shutdown(socket.SHUT_WR)
                finally:
                    sock.detach()
    close_all(taken.number for taken in fds)


@dataclass
class JobSetup:
    """What a job kind prepares a job from: its checked arguments and the fds it takes."""

    arguments: dict[str, Any]
    fds: dict[str, TakenFd]  # by argument ("input", "output", "key", ...)
    idle_timeout: float = idle.IDLE_TIMEOUT  # serve --idle-timeout, for socket fds

    def source(self, argument: str) -> FdChannel | LoopSource:
        """The fd of `argument`, read by the job's pipeline."""
        return self._end(argument, LoopSource)

    def sink(self, argument: str) -> FdChannel | LoopSink:
        """The fd of `argument`, written by the job's pipeline."""
        return self._end(argument, LoopSink)

    def _end(self, argument: str, kind: type[_LoopFd]) -> Any:
        taken = self.fds[argument]
        if taken.info.type in ("file", "block device"):
            return FdChannel(taken.number)  # never stalls for long, and epoll refuses them
        enlarge_pipe(taken.number)
        silence = self.idle_timeout if taken.info.type == "socket" else 0  # a pipe's is local
        return kind(taken.number, f"{argument} fd '{taken.name}'", silence)

    def file(self, argument: str, saving: bool = False) -> PlainFile:
        """A saved file, read (and, `saving`, written) at offsets; refused unless every byte
        lands where it is aimed, since a save that only looks complete loses the guest."""
        fd, name = self.fds[argument].number, self.fds[argument].name
        what = f"{argument} fd '{name}'"
        try:
            offset = os.lseek(fd, 0, os.SEEK_CUR)
        except OSError as e:
            raise MigpipeError(f"{what} cannot seek ({e.strerror}); a saved file must") from None
        if saving and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            raise MigpipeError(
                f"{what} is open with O_APPEND, which puts every write at the end; open it without"
            )
        if saving and offset:
            raise MigpipeError(f"{what} is at offset {offset}; a save writes from offset 0")
        return PlainFile(fd)  # the job's fds are closed by the service

    def secrets(self) -> Secrets:
        key, passphrase = self.fds.get("key"), self.fds.get("passphrase")
        if key and passphrase:
            raise MigpipeError("give 'key' or 'passphrase', not both")
        return Secrets(
            key_fd=key and key.number,
            passphrase_fd=passphrase and passphrase.number,
            allow_unencrypted=self.arguments.get("allow-unencrypted", False),
            max_scrypt_log_n=JOB_SCRYPT_LOG_N_MAX,
        )

    def filters(self) -> list[Filter]:
        items = self.arguments.get("filters", [])
        if joined := [item for item in items if "," in item]:
            raise MigpipeError(f"one filter per item of 'filters', not {quoted(joined[0])}")
        return parse_chain(",".join(items), self.secrets())


Runner = Callable[[Progress], Awaitable[Totals]]


@dataclass(frozen=True)
class JobKind:
    """One kind of job: the arguments start-job takes for it besides "kind", and `prepare`,
    which checks what can be checked before anything runs (raising MigpipeError for an error
    reply) and returns the coroutine function that runs the job."""

    arguments: Schema
    prepare: Callable[[JobSetup], Runner]
    reads_wire: bool  # bytes in are wire bytes (decode, restore), else QEMU stream bytes


def _encode(job: JobSetup) -> Runner:
    chain = job.filters()
    return lambda progress: encode(job.source("input"), job.sink("output"), chain, progress)


def _decode(job: JobSetup) -> Runner:
    secrets = job.secrets()
    return lambda progress: decode(job.source("input"), job.sink("output"), progress, secrets)


def _save(job: JobSetup) -> Runner:
    chain = job.filters()
    layout = job.arguments.get("layout", "stream")
    if layout not in LAYOUTS:
        raise MigpipeError(f"layout '{layout}' is not one of: {', '.join(LAYOUTS)}")
    cache = parse_size(job.arguments.get("cache", "64M"))
    if layout == "fixed":
        check_chain(chain)  # refused by start-job, not by a JOB_FAILED later
    if os.fstat(job.fds["output"].number).st_size:
        raise MigpipeError("the output file of a save must be empty (the daemon opened it)")
    file = job.file("output", saving=True)
    return lambda progress: save_into(job.source("input"), file, chain, layout, progress, cache)


def _restore(job: JobSetup) -> Runner:
    secrets = job.secrets()
    file = job.file("input")
    return lambda progress: restore_from(
        file, job.sink("output"), secrets, progress, f"fd '{job.fds['input'].name}'"
    )


ENDS: Schema = {"input": Arg(STRING, fd=INPUT), "output": Arg(STRING, fd=OUTPUT)}
KEYS: Schema = {
    "key": Arg(STRING, required=False, fd=SECRET),
    "passphrase": Arg(STRING, required=False, fd=SECRET),
}
# A reader given a key refuses input that is not sealed with it, unless told it may be.
READER_KEYS: Schema = {**KEYS, "allow-unencrypted": Arg(BOOLEAN, required=False)}
JOB_KINDS: dict[str, JobKind] = {
    "encode": JobKind({**ENDS, "filters": Arg(STRINGS, required=False), **KEYS}, _encode, False),
    "decode": JobKind({**ENDS, **READER_KEYS}, _decode, True),
    "save": JobKind(
        {
            "input": Arg(STRING, fd=INPUT),
            "output": Arg(STRING, fd=SAVE_FILE),
            "layout": Arg(STRING, required=False),
            "cache": Arg(STRING, required=False),
            "filters": Arg(STRINGS, required=False),
            **KEYS,
        },
        _save,
        False,
    ),
    "restore": JobKind(
        {"input": Arg(STRING, fd=SAVED_FILE), "output": Arg(STRING, fd=OUTPUT), **READER_KEYS},
        _restore,
        True,
    ),
}


# -- jobs ----------------------------------------------------------------------------------------


class JobProgress(Progress):
    """The pipeline's live figures, kept for query-jobs and sent as JOB_PROGRESS every
    INTERVAL, in place of the terminal line Progress draws."""

    def __init__(self, tick: Callable[[], None]) -> None:
        self.totals: Totals | None = None
        self._tick = tick

    async def run(self, totals: Totals) -> None:
        self.totals = totals
        while True:
            await trio.sleep(INTERVAL)
            self._tick()

    def finish(self, totals: Totals) -> None:
        self.totals = totals


@dataclass
class Job:
    id: str
    kind: str
    reads_wire: bool
    run: Runner
    fds: list[TakenFd]
    progress: JobProgress
    started: float = field(default_factory=time.monotonic)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def status(self, state: str | None = None) -> dict[str, Any]:
        totals = self.progress.totals
        qemu, wire = (totals.qemu_bytes, totals.wire_bytes) if totals else (0, 0)
        bytes_in, bytes_out = (wire, qemu) if self.reads_wire else (qemu, wire)
        state = state or ("cancelling" if self.scope.cancel_called else "running")
        seconds = time.monotonic() - self.started
        return job_status(self.id, self.kind, state, bytes_in, bytes_out, seconds)


def job_failure(exc: BaseException) -> Exception | None:
    """What to report for a job's exception: its first MigpipeError, else its first other
    error; None when it holds nothing but cancellation (which must propagate)."""
    errors = [leaf for leaf in leaves(exc) if isinstance(leaf, Exception)]
    chosen = [e for e in errors if isinstance(e, MigpipeError)] or errors
    return chosen[0] if chosen else None


# -- the service ---------------------------------------------------------------------------------


class Service:
    """Accepts connections and keeps the limits and counters shared by all of them."""

    def __init__(
        self,
        allow_uids: Iterable[int] = (),
        max_jobs: int = DEFAULT_MAX_JOBS,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_fds: int = DEFAULT_MAX_FDS,
        log: Callable[[str], None] | None = None,
        max_jobs_per_uid: int | None = None,
        max_connections_per_uid: int | None = None,
        refusal_interval: float = REFUSAL_INTERVAL,
        idle_timeout: float = idle.IDLE_TIMEOUT,
    ) -> None:
        allow_uids = set(allow_uids)
        self.idle_timeout = idle_timeout  # a job's socket peer may be silent this long
        # Root could reach the service anyway (it passes file modes, and can ptrace it), so
        # refusing it would protect nothing and only break root-run daemons like libvirtd.
        self.allowed = {0, os.geteuid(), *allow_uids}
        shared = bool(allow_uids - {0, os.geteuid()})  # by uids that need not trust each other
        # connect() needs write permission on the socket file, and one file cannot name several
        # uids without ACLs: with --allow-uid the file is 0666, and SO_PEERCRED is the gate.
        self.socket_mode = 0o666 if shared else 0o600
        self.max_jobs = max_jobs
        self.max_connections = max_connections
        # Shared, no uid may take every place: the others would be refused all service.
        self.max_jobs_per_uid = _share(max_jobs, shared, max_jobs_per_uid)
        self.max_connections_per_uid = _share(max_connections, shared, max_connections_per_uid)
        for option, value in (
            ("--max-jobs", max_jobs),
            ("--max-connections", max_connections),
            ("--max-jobs-per-uid", self.max_jobs_per_uid),
            ("--max-connections-per-uid", self.max_connections_per_uid),
        ):
            if value < 1:
                raise UsageError(f"{option} must be at least 1, not {value}")
        self.max_fds = max_fds
        self.jobs = 0  # running, and being prepared by a start-job
        self.connections = 0  # open, refused ones too until they are closed
        self.sessions = 0  # connections served, which max_connections bounds
        self.jobs_of: Counter[int] = Counter()  # by uid, as `jobs`
        self.sessions_of: Counter[int] = Counter()  # by uid, as `sessions`
        self.log = log or _log_stderr
        # Any local user may connect to a shared socket, and each refusal would be a line.
        self.refusals = RefusalLog(self.log, REFUSALS_LOGGED, refusal_interval)
        self._job_numbers = itertools.count(1)
        self._changed = trio.Event()

    async def serve(
        self,
        path: Path,
        inherited: socket.socket | None = None,
        *,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `path` until cancelled, then remove the socket (if it is still ours);
        on `inherited` instead, when systemd bound it (service.activation), left to it."""
        limiter = trio.to_thread.current_default_thread_limiter()
        # A stalled job keeps a thread of this limiter waiting for its peer (a loop source or
        # sink: the wire's header or trailer; a pipeline's own threads have a limiter of their own):
        # enough tokens that max_jobs stalled jobs never starve a running one of threads.
        limiter.total_tokens = max(limiter.total_tokens, self.max_jobs + 1)
        if inherited is None:
            sock, identity = bind_private(path, self.socket_mode)
        else:
            sock, identity = inherited, None
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.refusals.run)
                task_status.started()
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as e:
                        if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            raise
                        self.log(f"cannot accept a connection ({e.strerror}); retrying")
                        await trio.sleep(ACCEPT_BACKOFF)
                        continue
                    nursery.start_soon(self._serve_connection, stream)
        finally:
            listener.socket.close()
            if identity is not None:  # systemd's socket stays, for the service's next start
                with contextlib.suppress(OSError):
                    here = os.lstat(path)
                    if (here.st_dev, here.st_ino) == identity:
                        os.unlink(path)

    async def wait_idle(self) -> None:
        """Until no connection is open and no job runs (for tests, and embedders draining)."""
        while self.connections or self.jobs:
            await self._changed.wait()

    def log_exception(self, what: str, error: BaseException) -> None:
        self.log(f"{what}:\n" + "".join(traceback.format_exception(error)).rstrip())

    def new_job_id(self) -> str:
        return f"job-{next(self._job_numbers)}"

    def count(self, uid: int, connections: int = 0, jobs: int = 0) -> None:
        self.connections += connections
        self.jobs += jobs
        self.jobs_of[uid] += jobs
        self._changed.set()
        self._changed = trio.Event()

    def check_job_limits(self, uid: int) -> None:
        """Before a start-job takes a place: the service's limit, then the uid's share."""
        if self.jobs >= self.max_jobs:
            raise CommandError(
                f"the service runs {self.jobs} jobs, the most it may "
                "(migpipe serve --max-jobs); wait for one to end"
            )
        if (held := self.jobs_of[uid]) >= self.max_jobs_per_uid:
            raise CommandError(
                f"uid {uid} runs {held} jobs, the most one uid may (migpipe "
                "serve --max-jobs-per-uid); wait for one to end"
            )

    def connection_refusal(self, uid: int) -> str | None:
        """Why a peer of `uid` is not served, or None when it is."""
        if uid not in self.allowed:
            return f"uid {uid} may not use this migpipe service"
        # Every connection may hold fds: without a bound, clients could take them all.
        if self.sessions >= self.max_connections:
            return (
                f"the service has {self.sessions} connections, the most it may (migpipe "
                "serve --max-connections); close one"
            )
        if self.sessions_of[uid] >= self.max_connections_per_uid:
            return (
                f"uid {uid} has {self.sessions_of[uid]} connections, the most one uid may "
                "(migpipe serve --max-connections-per-uid); close one"
            )
        return None

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        pid, uid, _ = peer_credentials(stream.socket.getsockopt)
        self.count(uid, connections=1)
        try:
            if (refusal := self.connection_refusal(uid)) is not None:
                if uid not in self.allowed:
                    self.refusals.log(f"refused a connection from uid {uid} (pid {pid})")
                await _refuse(stream, refusal)
            else:
                self.sessions += 1
                self.sessions_of[uid] += 1
                try:
                    await Connection(self, stream, uid).run()
                finally:
                    self.sessions -= 1
                    self.sessions_of[uid] -= 1
        except Exception as e:  # a bug in one connection's handling must not end the service
            self.log_exception("internal error, connection closed", e)
        finally:
            stream.socket.close()
            self.count(uid, connections=-1)


def _share(limit: int, shared: bool, given: int | None) -> int:
    """A uid's share of `limit`: as `given`, else half of it (rounded up) when the service is
    shared, else all of it."""
    if given is not None:
        return given
    return -(-limit // 2) if shared else limit


class RefusalLog:
    """Refused connections, which any local user can make at will on a shared socket: at most
    `lines` logged per `interval` seconds, the rest counted and said in one line at its end."""

    def __init__(self, log: Callable[[str], None], lines: int, interval: float) -> None:
        self._log = log
        self._lines = lines
        self._interval = interval
        self._logged = self._held = 0

    def log(self, message: str) -> None:
        if self._logged < self._lines:
            self._logged += 1
            self._log(message)
        else:
            self._held += 1

    def tick(self) -> None:
        """The end of an interval: say how many were not logged, and log again."""
        if self._held:
            self._log(
                f"refused {self._held} more connections in {self._interval:g} s "
                "(not logged one by one)"
            )
        self._logged = self._held = 0

    async def run(self) -> None:
        while True:
            await trio.sleep(self._interval)
            self.tick()


async def _refuse(stream: trio.SocketStream, desc: str) -> None:
    """One error line instead of the greeting; the caller then closes the connection."""
    with trio.move_on_after(FLUSH_SECONDS):
        await stream.send_all(encode_message(error_reply(NO_ID, desc)))


def _log_stderr(message: str) -> None:
    print(f"migpipe serve: {message}", file=sys.stderr, flush=True)


class Connection:
    """One client's session: its named fds, its jobs, and one queue for all it is sent."""

    def __init__(self, service: Service, stream: trio.SocketStream, uid: int) -> None:
        self.service = service
        self.stream = stream
        self.uid = uid  # the peer's, whose share of the jobs this connection's count against
        self.fds: dict[str, tuple[int, FdInfo]] = {}
        self.jobs: dict[str, Job] = {}
        self._reader = Reader()
        self._outbox, self._outgoing = trio.open_memory_channel[dict[str, Any]](OUTBOX)
        self._job_nursery: trio.Nursery | None = None
        self._replied = trio.Event()  # set once the current command's reply is queued
        self._handlers: dict[str, Callable[[Command], Awaitable[Any]]] = {
            "qmp_capabilities": self._qmp_capabilities,
            "query-commands": self._query_commands,
            "add-fd": self._add_fd,
            "remove-fd": self._remove_fd,
            "query-fds": self._query_fds,
            "start-job": self._start_job,
            "query-jobs": self._query_jobs,
            "cancel-job": self._cancel_job,
        }

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as session:
                session.start_soon(self._write_all, session.cancel_scope)
                await self._outbox.send(greeting())
                async with trio.open_nursery() as self._job_nursery:
                    await self._read_all()
                    self._job_nursery.cancel_scope.cancel()  # the connection's jobs end with it
                # The writer sends what is queued (the replies to a client that only shut down
                # its sending side, a flood's error), then ends; a client gone is noticed then.
                self._outbox.close()
                session.cancel_scope.deadline = trio.current_time() + FLUSH_SECONDS
        finally:
            close_all(fd for fd, _ in self.fds.values())
            close_all(self._reader.close())

    async def _write_all(self, session: trio.CancelScope) -> None:
        try:
            async for message in self._outgoing:
                await self.stream.send_all(encode_message(message))
        except GONE:
            session.cancel()  # the client is gone

    async def _read_all(self) -> None:
        """Serve commands until the client stops sending, or floods the socket."""
        sock = self.stream.socket
        while True:
            try:
                data, ancillary, flags, _ = await sock.recvmsg(
                    MAX_LINE, ANCILLARY, socket.MSG_CMSG_CLOEXEC
                )
            except OSError:  # reset by the peer
                return
            fds = received_fds(ancillary)
            if not data:
                close_all(fds)
                return
            self._reader.feed(data, fds, bool(flags & socket.MSG_CTRUNC))
            try:
                while (line := self._reader.next_line()) is not None:
                    await self._handle(line)
            except Flood as e:
                close_all(self._reader.close())  # the client is cut off: nothing waits for them
                await self._outbox.send(error_reply(NO_ID, e.desc))
                return

    async def _handle(self, line: Line) -> None:
        command = None
        self._replied = trio.Event()
        try:
            command = parse_command(line)
            if command is None:
                return
            result = reply(command.id, await self._handlers[command.name](command))
        except Exception as e:
            close_all(line.fds)  # a refused command never keeps its fds
            id = command.id if command is not None else getattr(e, "id", NO_ID)
            if isinstance(e, CommandError):
                result = error_reply(id, e.desc, e.error_class)
            elif isinstance(e, MigpipeError):
                result = error_reply(id, str(e))
            elif isinstance(e, OSError):
                result = error_reply(id, e.strerror or str(e))
            else:  # a bug: this command fails, the connection and its jobs go on
                self.service.log_exception("internal error in a command", e)
                result = error_reply(id, f"internal error: {type(e).__name__}: {e}")
        try:
            await self._outbox.send(result)
        finally:
            self._replied.set()

    # -- commands ----------------------------------------------------------------------------

    async def _qmp_capabilities(self, command: Command) -> dict:
        if enable := command.arguments.get("enable"):
            raise CommandError(f"no capability '{enable[0]}' to enable: this service has none")
        return {}

    async def _query_commands(self, command: Command) -> list[dict[str, str]]:
        return [{"name": name} for name in COMMANDS]

    async def _add_fd(self, command: Command) -> dict[str, Any]:
        name = command.arguments["name"]
        if name in self.fds:
            raise CommandError(f"an fd named '{name}' is already added; remove-fd it first")
        if len(self.fds) >= self.service.max_fds:
            raise CommandError(
                f"this connection holds {len(self.fds)} fds, the most it may; "
                "remove-fd some, or start the jobs that use them"
            )
        fd = command.fds[0]
        info = describe_fd(fd)
        self.fds[name] = (fd, info)
        return info.as_dict(name)

    def _fd(self, name: str) -> tuple[int, FdInfo]:
        if name not in self.fds:
            raise CommandError(f"no fd named '{name}' (add-fd adds one, query-fds lists them)")
        return self.fds[name]

    async def _remove_fd(self, command: Command) -> dict:
        fd, _ = self._fd(command.arguments["name"])
        del self.fds[command.arguments["name"]]
        os.close(fd)
        return {}

    async def _query_fds(self, command: Command) -> list[dict[str, Any]]:
        return [info.as_dict(name) for name, (_, info) in self.fds.items()]

    async def _start_job(self, command: Command) -> dict[str, str]:
        arguments, kind = command.arguments, command.arguments["kind"]
        spec = JOB_KINDS.get(kind)
        if spec is None:
            raise CommandError(f"unknown job kind '{kind}' (kinds: {', '.join(JOB_KINDS)})")
        check_arguments("start-job", {"kind": Arg(STRING), **spec.arguments}, arguments)
        self.service.check_job_limits(self.uid)
        roles = {a: arg.fd for a, arg in spec.arguments.items() if arg.fd and a in arguments}
        names = [arguments[argument] for argument in roles]
        if twice := next((name for name in names if names.count(name) > 1), None):
            raise CommandError(f"fd '{twice}' is given twice; each argument needs its own fd")
        taken: dict[str, TakenFd] = {}
        for argument, role in roles.items():
            name = arguments[argument]
            fd, info = self._fd(name)
            role.check(argument, name, info)
            taken[argument] = TakenFd(name, fd, info)
        # The job's place is taken before preparing it, which may take long (scrypt for a
        # passphrase) and so runs in a thread, while other clients are served and start jobs.
        self.service.count(self.uid, jobs=1)
        try:
            setup = JobSetup(arguments, taken, self.service.idle_timeout)
            run = await trio.to_thread.run_sync(spec.prepare, setup)
        except BaseException:
            self.service.count(self.uid, jobs=-1)
            raise
        for t in taken.values():  # from here on the job owns them
            del self.fds[t.name]
        progress = JobProgress(lambda: self._progress(job))
        job = Job(
            self.service.new_job_id(), kind, spec.reads_wire, run, list(taken.values()), progress
        )
        self.jobs[job.id] = job
        assert self._job_nursery is not None
        self._job_nursery.start_soon(self._run_job, job, self._replied)
        return {"id": job.id}

    async def _query_jobs(self, command: Command) -> list[dict[str, Any]]:
        return [job.status() for job in self.jobs.values()]

    async def _cancel_job(self, command: Command) -> dict:
        job = self.jobs.get(command.arguments["id"])
        if job is None:
            raise CommandError(
                f"no job '{command.arguments['id']}' on this connection "
                "(query-jobs lists them; ended jobs are gone)"
            )
        job.scope.cancel()
        return {}

    # -- jobs --------------------------------------------------------------------------------

    async def _run_job(self, job: Job, replied: trio.Event) -> None:
        """Run one job; its end is an event, its fds closed whatever happened."""
        totals, failure = None, None
        try:
            with job.scope:
                await replied.wait()  # its events come after the reply that names it
                try:
                    totals = await job.run(job.progress)
                except BaseException as exc:
                    failure = job_failure(exc)
                    if failure is None:
                        raise
        finally:
            release(job.fds)
            del self.jobs[job.id]
            self.service.count(self.uid, jobs=-1)
        if job.scope.cancel_called:
            name, data = JOB_CANCELLED, job.status("cancelled")
        elif failure is not None:
            name, data = JOB_FAILED, {**job.status("failed"), **self._describe(failure)}
        else:
            assert totals is not None
            data = job.status("completed")
            name, data = JOB_COMPLETED, {**data, "figures": totals.figures(data["seconds"])}
        with contextlib.suppress(*GONE):
            await self._outbox.send(event(name, data))

    def _describe(self, error: Exception) -> dict[str, Any]:
        status, offset = EXIT_ERROR, None
        if isinstance(error, MigpipeError):
            text, status, offset = error.message, error.status, error.offset
        elif isinstance(error, OSError):
            text = error.strerror or str(error)
        else:
            self.service.log_exception("internal error in a job", error)
            text = f"internal error: {type(error).__name__}: {error}"
        return {"error": text, "exit-status": status, "offset": offset}

    def _progress(self, job: Job) -> None:
        """Progress is a sample: dropped, never waited for, when the client reads slowly."""
        with contextlib.suppress(trio.WouldBlock, *GONE):
            self._outbox.send_nowait(event(JOB_PROGRESS, job.status()))


# -- the socket ----------------------------------------------------------------------------------


def bind_private(path: Path, mode: int) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at `path` that was never reachable with a wider mode than `mode`,
    whatever the umask: it is bound in a fresh private (0700) directory, chmod-ed, listening,
    and only then renamed into place. The rename replaces a stale socket, never a live one or
    another kind of file. Returns the socket and the (device, inode) it has at `path`."""
    _check_free(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    private = inside = None
    try:
        private = tempfile.mkdtemp(prefix=".migpipe-serve.", dir=path.parent)
        inside = os.path.join(private, "socket")
        sock.bind(inside)
        os.chmod(inside, mode)
        sock.listen(BACKLOG)
        os.rename(inside, path)
        here = os.stat(path)
    except OSError as e:
        sock.close()
        raise MigpipeError(f"cannot listen on {path}: {e.strerror or e}") from None
    finally:
        if private is not None:
            with contextlib.suppress(OSError):
                os.unlink(inside)  # only there if the rename failed
            with contextlib.suppress(OSError):
                os.rmdir(private)
    return sock, (here.st_dev, here.st_ino)


def _check_free(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise MigpipeError(f"{path} exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            return  # left behind by a service that died: replaced by the rename
        except OSError as e:
            raise MigpipeError(f"cannot tell whether {path} is in use: {e.strerror}") from None
    raise MigpipeError(f"another service is listening on {path}")


async def run(
    path: Path,
    service: Service,
    on_ready: Callable[[], None],
    inherited: socket.socket | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; then cancel every job and remove the socket (bound
    here: not an `inherited` one)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.serve, path, inherited)
            on_ready()
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
