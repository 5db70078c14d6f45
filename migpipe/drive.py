"""migrate and incoming: drive a running QEMU over QMP and carry its stream through migpipe.

As libvirt does for its tunnelled migrations: make a pipe, hand QEMU one end with `getfd`, and
`migrate` (or, on a destination started with `-incoming defer`, `migrate-incoming`) to
`fd:NAME`; migpipe runs encode (or decode) on the other end. QEMU only ever sees a pipe, so
whatever migpipe does on the way (filters, a connection, ssh) is invisible to it.

What makes this safe is what happens on a failure:
- on the source, the pipe's read end is closed as soon as encode stops, so a QEMU blocked
  writing to it gets EPIPE instead of hanging; `migrate_cancel` ends the migration and the VM
  is left running (`cont` when QEMU had already stopped it, or completed, before the wire
  failed);
- on the destination, a failed decode closes the pipe without the stream's EOF item (decode
  holds it back until every check passed), so QEMU fails the load instead of completing it;
- the destination's outcome travels back as one JSON line (on the wire's connection, or a
  command's stdout), and the source calls the migration done only then, so a destination
  that fails at the very end still gets the source resumed: libvirt's Confirm phase.
"""

import contextlib
import json
import math
import os
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from migpipe import filter as filters
from migpipe import qmp
from migpipe.errors import MigpipeError
from migpipe.files import enlarge_pipe
from migpipe.keys import Secrets
from migpipe.pipeline import Totals, decode, encode
from migpipe.progress import Progress

FINAL = ("completed", "failed", "cancelled")
EVENTS = [{"capability": "events", "state": True}]  # MIGRATION events, as libvirt asks too
RECOVERY_TIMEOUT = 60.0  # a failsafe for QEMU ending a cancelled migration
COMMAND_EXIT_TIMEOUT = 30.0  # for a command whose wire was cut to exit before it is killed
CONFIRMATION_LIMIT = 64 << 10
ENDED = {"cancelled": "the migration was cancelled in QEMU", "exited": "the source QEMU exited"}
LOAD_ENDED = {
    "failed": "QEMU failed the load",
    "exited": "QEMU exited during the load",
    "cancelled": "the load was cancelled in QEMU",
    "completed": "QEMU completed the load regardless",  # not seen: decode holds the EOF item
}


@dataclass(frozen=True)
class Confirmation:
    """The destination's word on the load: "completed" or "failed" (with why); None when the
    peer closed without one (it is not `migpipe incoming`); "lost" when the link broke first."""

    status: str | None = None
    error: str = ""

    def line(self) -> bytes:
        return json.dumps({"status": self.status, "error": self.error}).encode() + b"\n"

    @classmethod
    def read(cls, fd: int) -> "Confirmation":
        """Read the peer's answer up to its end of file (blocking)."""
        data = b""
        try:
            while len(data) < CONFIRMATION_LIMIT and (chunk := os.read(fd, CONFIRMATION_LIMIT)):
                data += chunk
        except OSError as e:
            return cls("lost", f"the link broke before the destination answered ({e.strerror})")
        if not data.strip():
            return cls()
        try:
            message = json.loads(data.splitlines()[0])
            if message["status"] in ("completed", "failed"):
                return cls(message["status"], str(message.get("error", "")))
        except (ValueError, KeyError, TypeError):
            pass
        return cls("lost", f"the destination answered {data[:80]!r}")


class Link(Protocol):
    """The wire's way to the destination, and the way its confirmation comes back."""

    wire: int

    def confirm(self) -> Confirmation:
        """End the wire and wait for the destination's answer (blocking)."""
        ...


@dataclass
class FdLink:
    """A file, pipe or socket by descriptor (not owned). Only a socket can answer."""

    wire: int

    def confirm(self) -> Confirmation:
        if not stat.S_ISSOCK(os.fstat(self.wire).st_mode):
            return Confirmation()
        with socket.socket(fileno=os.dup(self.wire)) as sock:
            try:
                sock.shutdown(socket.SHUT_WR)  # decode on the other side sees the wire's end
            except OSError as e:
                return Confirmation("lost", f"the link broke at its end ({e.strerror})")
            return Confirmation.read(sock.fileno())


class CommandLink:
    """A command (`ssh dst migpipe incoming ...`) that takes the wire on stdin and answers on
    stdout; its exit status stands in for an answer it did not give."""

    def __init__(self, argv: Sequence[str]) -> None:
        try:
            self._process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError as e:
            raise MigpipeError(f"cannot run {argv[0]}: {e.strerror}") from None
        self._name = argv[0]
        self.wire = self._process.stdin.fileno()
        enlarge_pipe(self.wire)

    def confirm(self) -> Confirmation:
        self._process.stdin.close()
        answer = Confirmation.read(self._process.stdout.fileno())
        status = self._process.wait()
        if answer.status is None and status != 0:
            return Confirmation("lost", f"{self._name} exited with status {status}")
        return answer

    def close(self) -> None:
        """Stop feeding the command and reap it (after a failure it sees a cut wire)."""
        for pipe in (self._process.stdin, self._process.stdout):
            pipe.close()
        try:
            self._process.wait(COMMAND_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


@contextlib.contextmanager
def command_link(argv: Sequence[str]) -> Iterator[CommandLink]:
    link = CommandLink(argv)
    try:
        yield link
    finally:
        link.close()


@dataclass
class Outcome:
    """How a driven migration went: migpipe's figures, QEMU's, and the other end's word."""

    totals: Totals
    qemu: dict[str, Any] = field(default_factory=dict)  # the source's final query-migrate
    confirmation: Confirmation | None = None  # the destination's answer (source side)
    runstate: str = ""  # the VM's run state at the end (destination side)


# -- the source ---------------------------------------------------------------------------------


async def migrate(
    qmp_path: str,
    open_link: Callable[[], AbstractContextManager[Link]],
    chain: Sequence[filters.Filter],
    progress: Progress | None = None,
) -> Outcome:
    """Migrate the QEMU behind `qmp_path` through encode to the link `open_link` gives, which
    is opened (a --connect connects, a command starts) only once QEMU has agreed to migrate.
    MigpipeError if it failed, saying what became of the source VM."""
    async with qmp.connect(qmp_path) as monitor:
        was_running = (await monitor.execute("query-status"))["running"]
        await monitor.execute("migrate-set-capabilities", capabilities=EVENTS)  # not if busy
        with contextlib.ExitStack() as stack:
            link = await trio.to_thread.run_sync(
                stack.enter_context, open_link(), abandon_on_cancel=True
            )
            return await _send(monitor, link, chain, progress, was_running)


async def _send(
    monitor: qmp.Qmp, link: Link, chain: Sequence[filters.Filter], progress, was_running: bool
) -> Outcome:
    """Hand QEMU a pipe's write end for `migrate`; on any failure, leave the source running."""
    source, qemu_end = os.pipe()
    enlarge_pipe(source)
    try:
        await _hand_over(monitor, qemu_end, "migrate")
    except BaseException:
        os.close(source)
        raise
    try:
        outcome = await _carry_out(monitor, source, link, chain, progress)
        answer = outcome.confirmation
        if answer.status == "failed":
            raise MigpipeError(f"the destination failed: {answer.error}")
    except BaseException as e:
        with trio.CancelScope(shield=True):
            state = await _leave_source(monitor, was_running)
        if isinstance(e, MigpipeError):
            raise MigpipeError(f"{e.message}; {state}", e.offset, e.status) from None
        raise
    if answer.status == "lost":
        raise MigpipeError(
            f"{answer.error}: QEMU completed, the source VM stays paused; check the "
            "destination, then `cont` or `quit` the source"
        )
    return outcome


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


async def _carry_out(
    monitor: qmp.Qmp, source: int, link: Link, chain: Sequence[filters.Filter], progress
) -> Outcome:
    """encode from QEMU's pipe to the link while QEMU goes to a final status; then the
    destination's answer. The first failure of either is the one reported."""

    async def pump(send: trio.MemorySendChannel) -> None:
        try:
            result: Totals | MigpipeError = await encode(source, link.wire, chain, progress)
        except* MigpipeError as group:
            result = _first(group)
            with contextlib.suppress(MigpipeError):  # if QEMU is gone, its status says so
                await monitor.execute("migrate_cancel")  # first: then it ends "cancelled"
        finally:
            os.close(source)  # from now on QEMU's writes fail (EPIPE) instead of blocking
        send.send_nowait(("wire", result))

    wire, status, first = await _follow(monitor, pump)
    if status == "completed" and isinstance(wire, Totals):
        answer = await trio.to_thread.run_sync(link.confirm)
        return Outcome(wire, await monitor.execute("query-migrate"), answer)
    if isinstance(wire, MigpipeError) and (first == "wire" or status == "completed"):
        raise wire
    if status == "failed":
        info = await monitor.execute("query-migrate")
        raise MigpipeError(f"QEMU failed the migration: {info.get('error-desc', 'no reason')}")
    raise MigpipeError(ENDED[status])


async def _follow(monitor: qmp.Qmp, pump) -> tuple[Any, str, str]:
    """Run `pump` (which reports ("wire", Totals or error)) while following QEMU's MIGRATION
    events to a final status ("exited" if QEMU exits). Returns (the wire's result, QEMU's
    status, which of the two came first)."""
    send, receive = trio.open_memory_channel[tuple[str, Any]](math.inf)

    async def watch() -> None:
        status = ""
        try:
            while status not in FINAL:
                status = (await monitor.next_event("MIGRATION"))["data"]["status"]
        except MigpipeError:
            status = "exited"
        send.send_nowait(("qemu", status))

    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, send)
        nursery.start_soon(watch)
        while len(results) < 2:
            what, value = await receive.receive()
            results[what] = value
    return results["wire"], results["qemu"], next(iter(results))


async def _leave_source(monitor: qmp.Qmp, was_running: bool) -> str:
    """After a failure: no migration left going, and the VM running if it was. Says which."""
    try:
        with trio.fail_after(RECOVERY_TIMEOUT):
            await monitor.execute("migrate_cancel")
            while (await monitor.execute("query-migrate")).get("status", "none") not in (
                *FINAL, "none"
            ):  # fmt: skip
                await monitor.next_event("MIGRATION")
            state = await monitor.execute("query-status")
            if was_running and not state["running"]:
                await monitor.execute("cont")  # QEMU had stopped it to switch over
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
    open_wire: Callable[[], AbstractContextManager[tuple[int, int | None]]],
    secrets: Secrets | None = None,
    progress: Progress | None = None,
) -> Outcome:
    """Load a migration into the QEMU behind `qmp_path` (started with `-incoming defer`).

    `open_wire` gives the wire's fd and the fd to answer the source on (or None); it is opened
    (a --listen accepts) only once QEMU is known to be waiting. MigpipeError unless QEMU
    completed the load.
    """
    async with qmp.connect(qmp_path) as monitor:
        state = (await monitor.execute("query-status"))["status"]
        if state != "inmigrate":
            raise MigpipeError(f"QEMU is {state}, not inmigrate: start it with -incoming defer")
        await monitor.execute("migrate-set-capabilities", capabilities=EVENTS)
        with contextlib.ExitStack() as stack:
            wire, answer = await trio.to_thread.run_sync(
                stack.enter_context, open_wire(), abandon_on_cancel=True
            )
            try:
                outcome = await _load(monitor, wire, secrets, progress)
            except MigpipeError as e:
                _answer(answer, Confirmation("failed", str(e)))
                raise
            _answer(answer, Confirmation("completed"))
        return outcome


async def _load(monitor: qmp.Qmp, wire: int, secrets, progress) -> Outcome:
    """Hand QEMU a pipe's read end for `migrate-incoming`, and decode the wire into it."""
    qemu_end, sink = os.pipe()
    enlarge_pipe(sink)
    try:
        await _hand_over(monitor, qemu_end, "migrate-incoming")
    except BaseException:
        os.close(sink)
        raise
    return await _carry_in(monitor, wire, sink, secrets, progress)


async def _carry_in(monitor: qmp.Qmp, wire: int, sink: int, secrets, progress) -> Outcome:
    async def pump(send: trio.MemorySendChannel) -> None:
        try:
            result: Totals | MigpipeError = await decode(wire, sink, progress, secrets)
        except* MigpipeError as group:
            result = _first(group)
        finally:
            os.close(sink)  # the stream's end: without its EOF item, QEMU fails the load
        send.send_nowait(("wire", result))

    wire_result, status, first = await _follow(monitor, pump)
    if status == "completed" and isinstance(wire_result, Totals):
        runstate = (await monitor.execute("query-status"))["status"]
        return Outcome(wire_result, {"status": status}, runstate=runstate)
    if isinstance(wire_result, MigpipeError) and first == "wire":
        e = wire_result
        raise MigpipeError(f"{e.message}; {LOAD_ENDED[status]}", e.offset, e.status)
    desc = "see its log"
    if status == "failed":
        with contextlib.suppress(MigpipeError):  # QEMU 7.2 exits right after a failed load
            desc = (await monitor.execute("query-migrate")).get("error-desc", desc)
    raise MigpipeError(f"{LOAD_ENDED[status]} ({desc})")


def _answer(fd: int | None, confirmation: Confirmation) -> None:
    """Tell the source; if it is gone, it has its own error to report."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, confirmation.line())


def _first(group: BaseExceptionGroup) -> BaseException:
    """The first error of a (nested) exception group: the pipeline's own failure."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


# -- the report ---------------------------------------------------------------------------------


def summary(command: str, outcome: Outcome) -> str:
    """QEMU's figures (its query-migrate words) and migpipe's, for stderr."""
    t = outcome.totals
    ratio = t.qemu_bytes / t.wire_bytes if t.wire_bytes else 0.0
    pages = ", ".join(f"{kind} {count:,}" for kind, count in t.pages.items() if count)
    ours = (f"migpipe: {t.qemu_bytes:,} stream bytes, {t.wire_bytes:,} wire bytes "
            f"(ratio {ratio:.2f})" + (f"; pages: {pages}" if pages else ""))  # fmt: skip
    if command == "incoming":
        return f"migpipe incoming: completed, the VM is {outcome.runstate}\n  {ours}"
    q, ram = outcome.qemu, outcome.qemu.get("ram", {})
    lines = [
        f"migpipe migrate: {q.get('status')} in {q.get('total-time', 0):,} ms, downtime "
        f"{q.get('downtime', 0):,} ms, setup {q.get('setup-time', 0):,} ms",
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
    lines.append("  " + ours)
    answer = outcome.confirmation
    confirmed = answer.status if answer and answer.status else "unconfirmed (no answer)"
    lines.append(f"  destination: {confirmed}")
    return "\n".join(lines)
