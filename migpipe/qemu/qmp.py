"""A QMP client for migpipe's own use: drive a running QEMU through its monitor socket.

QMP is one JSON object per line over a UNIX socket: a greeting, `qmp_capabilities`, then
commands answered by `return` or `error` replies that carry the command's `id`, with `event`
messages arriving at any time in between. QmpProtocol does that framing and matching without
I/O. Qmp runs it over a trio socket with one reader task, so one task can send a command
(`migrate_cancel`) while another waits for events (MIGRATION), and it can attach a file
descriptor to a command as SCM_RIGHTS (`getfd`), which is how libvirt hands QEMU its pipes.

QEMU stamps each event with the wall clock; Qmp keeps when the latest event of each name
happened on this host's monotonic clock (`happened`), for the guest's real pause: the wall
clock may step during a migration, an event's age when it arrives is a few milliseconds.
"""

import array
import contextlib
import itertools
import json
import logging
import math
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import trio

from migpipe.errors import MigpipeError, PeerGoneError, printable
from migpipe.lines import LineSplitter, LineTooLong

TIMEOUT = 30.0  # a failsafe: QEMU answers commands at once unless its main loop is stuck
# QEMU greets a client at once, unless another client holds the monitor (it serves one per
# socket: libvirt, a forgotten socat); --qmp-timeout sets it for the commands that drive QEMU.
GREETING_TIMEOUT = 10.0
logger = logging.getLogger(__name__)  # what migpipe -v prints
MAX_LINE = 16 << 20  # far above any reply migpipe asks for; a peer that never ends a line


class QmpError(MigpipeError):
    """QEMU refused a command; `desc` is QEMU's own explanation, `error_class` its class."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.error_class = str(error.get("class", ""))
        self.desc = str(error.get("desc", ""))
        super().__init__(f"QEMU refused {command}: {self.desc or self.error_class}")


class QmpProtocol:
    """QMP's framing without I/O: commands to bytes, bytes to messages (dicts)."""

    def __init__(self) -> None:
        self._lines = LineSplitter(MAX_LINE)
        self._ids = itertools.count(1)

    def command(self, name: str, arguments: dict[str, Any]) -> tuple[int, bytes]:
        """A command's id (its reply will carry it) and its line."""
        ident = next(self._ids)
        message: dict[str, Any] = {"execute": name, "id": ident}
        if arguments:
            message["arguments"] = arguments
        return ident, json.dumps(message).encode() + b"\n"

    def receive_data(self, data: bytes) -> list[dict[str, Any]]:
        """The complete messages `data` ends; a partial line waits for the next call."""
        self._lines.feed(data)
        messages = []
        try:
            while (line := self._lines.next_line()) is not None:
                if line.strip():
                    messages.append(_message(line))
        except LineTooLong:
            raise MigpipeError(f"a QMP message longer than {MAX_LINE} bytes") from None
        return messages


def _message(line: bytes) -> dict[str, Any]:
    """The QMP message on `line`: a JSON object, or an error that shows the line."""
    try:
        message = json.loads(line)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        raise MigpipeError(f"not a QMP message: {printable(line[:80])}")
    return message


def event_time(event: dict[str, Any]) -> float:
    """When `event`, arriving now, happened on this host's monotonic clock: now less its age on
    the wall clock QEMU stamped it with (no age if it has no stamp, or one from the future)."""
    stamp = event.get("timestamp", {})
    try:
        wall = float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6
    except (KeyError, TypeError, ValueError):
        wall = time.time()
    return time.monotonic() - max(0.0, time.time() - wall)


class _Reply:
    def __init__(self) -> None:
        self.arrived = trio.Event()
        self.message: dict[str, Any] | MigpipeError = {}


class Qmp:
    """One QMP connection; make it with `connect`. Events queue until `next_event` takes them."""

    def __init__(self, sock: trio.socket.SocketType, where: str) -> None:
        self._sock = sock
        self._where = where
        self._protocol = QmpProtocol()
        self._sending = trio.Lock()
        self._replies: dict[int, _Reply] = {}
        self._events_in, self._events = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._greeted = trio.Event()
        self._closed: MigpipeError | None = None
        self._happened: dict[str, float] = {}
        self.greeting: dict[str, Any] = {}

    async def execute(self, command: str, **arguments: Any) -> Any:
        """Run `command` and return its `return` value; QmpError carries QEMU's refusal."""
        return await self._call(command, arguments, None)

    async def getfd(self, name: str, fd: int) -> None:
        """Give QEMU a duplicate of `fd` under `name` (QEMU's `fd:NAME`); ours stays open."""
        await self._call("getfd", {"fdname": name}, fd)

    async def next_event(self, *names: str) -> dict[str, Any]:
        """The next event called one of `names`, in arrival order; other events are dropped."""
        async for event in self._events:
            if event.get("event") in names:
                return event
        raise self._lost()

    def happened(self, name: str) -> float | None:
        """When the latest event called `name` happened (time.monotonic), None if none came
        on this connection. Kept as events arrive, whether or not next_event takes them."""
        return self._happened.get(name)

    async def _call(self, command: str, arguments: dict[str, Any], fd: int | None) -> Any:
        if self._closed is not None:
            raise self._lost()
        if not command.startswith("query-"):  # queries are polled: -v would scroll with them
            logger.info("QMP %s%s", command, f" {json.dumps(arguments)}" if arguments else "")
        ident, line = self._protocol.command(command, arguments)
        reply = self._replies[ident] = _Reply()
        try:
            with trio.fail_after(TIMEOUT):
                async with self._sending:
                    await self._send(line, fd)
                await reply.arrived.wait()
        except trio.TooSlowError:
            raise MigpipeError(f"QEMU did not answer {command} within {TIMEOUT:g} s") from None
        finally:
            del self._replies[ident]  # a late reply finds no waiter and is dropped
        message = reply.message
        if isinstance(message, MigpipeError):
            raise self._lost()
        if "error" in message:
            raise QmpError(command, message["error"])
        return message.get("return")

    async def _send(self, line: bytes, fd: int | None) -> None:
        try:
            if fd is not None:  # the descriptor rides with the line's first bytes
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
                line = line[await self._sock.sendmsg([line], rights) :]
            while line:
                line = line[await self._sock.send(line) :]
        except OSError as e:
            raise MigpipeError(f"QMP connection to {self._where} lost: {e.strerror or e}") from None

    async def _read(self) -> None:
        """Deliver replies and queue events until the connection ends; then fail the waiters."""
        try:
            while data := await self._sock.recv(65536):
                for message in self._protocol.receive_data(data):
                    self._deliver(message)
            self._closed = MigpipeError(f"QEMU closed its QMP connection ({self._where})")
        except OSError as e:
            self._closed = MigpipeError(f"QMP connection to {self._where} lost: {e.strerror}")
        except MigpipeError as e:
            self._closed = e
        for reply in self._replies.values():
            reply.message = self._closed
            reply.arrived.set()
        self._events_in.close()
        self._greeted.set()

    def _deliver(self, message: dict[str, Any]) -> None:
        if "event" in message:
            self._happened[str(message["event"])] = event_time(message)
            self._events_in.send_nowait(message)
        elif "QMP" in message:
            self.greeting = message
            self._greeted.set()
        else:
            reply = self._replies.get(message.get("id"))  # type: ignore[arg-type]
            if reply is not None:
                reply.message = message
                reply.arrived.set()

    def _lost(self) -> MigpipeError:
        closed = self._closed or MigpipeError(f"QMP connection to {self._where} closed")
        return MigpipeError(closed.message)


def qemu_version(greeting: dict[str, Any]) -> str:
    """QEMU's version as its greeting gives it: 7.2.0, or "unknown"."""
    version = greeting.get("QMP", {}).get("version", {}).get("qemu", {})
    try:
        return f"{version['major']}.{version['minor']}.{version['micro']}"
    except (KeyError, TypeError):
        return "unknown"


@contextlib.asynccontextmanager
async def connect(path: str, timeout: float | None = None) -> AsyncIterator[Qmp]:
    """A ready QMP connection to the UNIX socket `path` (greeted, capabilities negotiated);
    no greeting within `timeout` seconds (GREETING_TIMEOUT when None, 0: no limit) is an
    error that says why it may not come."""
    if timeout is None:
        timeout = GREETING_TIMEOUT
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        try:
            await sock.connect(path)
        except OSError as e:
            raise MigpipeError(f"cannot connect to QMP at {path}: {e.strerror or e}") from None
        qmp = Qmp(sock, path)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qmp._read)
            logger.info("connected to QMP at %s, waiting for its greeting", path)
            with trio.move_on_after(timeout or math.inf):
                await qmp._greeted.wait()
            if qmp._closed is not None:
                raise qmp._lost()
            if "QMP" not in qmp.greeting:
                # QEMU serves one QMP client per socket; a second one waits, ungreeted.
                raise PeerGoneError(
                    f"no QMP greeting from {path} within {timeout:g} s (is another client, "
                    "such as libvirt, connected to it? --qmp-timeout sets the wait)"
                )
            logger.info("QEMU %s greeted on %s", qemu_version(qmp.greeting), path)
            await qmp.execute("qmp_capabilities")
            try:
                yield qmp
            finally:
                nursery.cancel_scope.cancel()
