"""A small synchronous harness that runs real QEMU for migpipe's tests.

It starts `qemu-system-x86_64` (TCG, 128 MiB, `pc` machine) with the test guest from
tests/guest/, on Debian's QEMU 7.2 or another QemuBuild (the 10.0 that setup.sh unpacks), talks
QMP to it, and migrates it: into a file (`capture_stream`), from a file (`load_stream`), or live
from a source VM through any shell pipeline into a destination VM (`migrate_through`).

Synchronisation is by blocking on sockets and QMP events only: QMP and the guest's debug console
are socketpairs handed to QEMU as file descriptors (so there is nothing to poll for), the guest
announces "READY" on isa-debugcon, migrations end with MIGRATION events, and a source's exec:
command reports its own exit through a FIFO. Timeouts are failsafes, never waits.

Why the exit report: QEMU announces "completed" when it has written the last byte into the exec:
command's pipe, which can be before the command has written it out (`cat > file`, `tee`). The
harness only trusts the stream file once the command has exited.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import MIGPIPE

QEMU = shutil.which("qemu-system-x86_64")
CC = shutil.which("gcc")
REPO = Path(__file__).resolve().parent.parent

PAGE_SIZE = 4096
RAM_SIZE = 128 << 20
#: Guest-physical range compared between stream replays and destinations: below 1 MiB, ROM and
#: VGA windows overlay `pc.ram`; from 1 MiB to the end of RAM, addresses are `pc.ram` offsets.
IMAGE_START = 1 << 20
IMAGE_SIZE = RAM_SIZE - IMAGE_START
READY = b"READY\n"

GUEST_DIR = Path(__file__).resolve().parent / "guest"
GUEST_CFLAGS = (
    "-m32",
    "-march=i686",
    "-O2",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-nostdlib",
    "-static",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-Wl,--build-id=none",
    "-Wl,-n",
)

KINDS = ("idle", "dirty", "xbzrle")
#: Busy-wait iterations between two guest writes in the live kinds. With PACINGS below this
#: gives ~50-65 MB streams in ~0.75 s here (5000: 60-85 MB; 30000: too few XBZRLE records).
DIRTY_DELAY = 8000
#: The "busy" kind (not in KINDS: it is for convergence tests, tests/test_qemu_convergence.py):
#: single-byte writes at random offsets of a 64 MiB region (pages=16384, hot=0), the guest of
#: issue 21's measurements: every pass leaves most of it dirty again, far more than a 30 MB/s
#: link carries within a downtime limit, while XBZRLE sends each such page in a few bytes.
#: QEMU's own xbzrle over `pv -q -L 30m` converges in ~4.4 s (136 MB on the link) at 300 ms
#: and at 50 ms; without XBZRLE nothing converges.
BUSY_DELAY = 2500
BUSY_PAGES = 16384
GUEST_APPEND = {
    "idle": "mode=idle",
    "dirty": f"mode=dirty delay={DIRTY_DELAY} hot=256",
    "xbzrle": f"mode=dirty delay={DIRTY_DELAY} hot=256",
    "busy": f"mode=dirty delay={BUSY_DELAY} hot=0 pages={BUSY_PAGES}",
    # as busy, writing so that its memory proves itself (check_image): for a running destination
    "check": f"mode=check delay={BUSY_DELAY} pages={BUSY_PAGES}",
}
CHECK_TABLE = 0x04800000  # tests/guest's table of mode=check: writes, page in flight, counters

QMP_TIMEOUT = 30.0
MIGRATION_TIMEOUT = 120.0

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: a killed test run must not leave busy guests behind.

    (The signal fires when the *thread* that started QEMU exits: start VMs from the main thread.)
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class QemuError(RuntimeError):
    """QEMU misbehaved (died, timed out, refused a command); the message has its log tail."""


class MigrationFailed(QemuError):
    """A migration failed; `desc` is QEMU's own error text (query-migrate and/or stderr)."""

    def __init__(self, message: str, desc: str) -> None:
        super().__init__(message)
        self.desc = desc


class NotConverged(QemuError):
    """A live migration reached its Pacing's `give_up_pass` without completing, so the harness
    cancelled it (the source keeps running). `passes` is QEMU's dirty-sync count then, `seconds`
    the time from `migrate` to that pass, `info` query-migrate's result at that moment."""

    def __init__(self, message: str, passes: int, seconds: float, info: dict[str, Any]) -> None:
        super().__init__(message)
        self.passes = passes
        self.seconds = seconds
        self.info = info


class QmpError(QemuError):
    """A QMP command returned an error."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.error_class = str(error.get("class", ""))
        self.desc = str(error.get("desc", ""))
        super().__init__(f"QMP {command} failed: {self.error_class}: {self.desc}")


class QmpClosed(QemuError, ConnectionError):
    """QEMU closed the QMP connection (it exited)."""


@dataclass(frozen=True)
class QemuBuild:
    """One QEMU the tests run on: users run Debian's 7.2 and current releases alike.

    An unpacked build (setup.sh puts 10.0 in .qemu/10.0, beside the system's 7.2, which
    installing it would replace) needs `args` (-L for its own firmware) and `env` (its own
    module directory: the system's are 7.2's, which it would refuse or misload).
    """

    version: str  # "7.2", "10.0": names the tests and the machine type `pc` stands for
    binary: str | None  # None where it is not installed
    missing: str  # what to do when it is not
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"qemu{self.version}"

    @property
    def machine(self) -> str:
        """The machine type the `pc` alias resolves to, as the stream's configuration names it."""
        return f"pc-i440fx-{self.version}"

    def command(self) -> list[str]:
        """The binary and the arguments every VM of this build starts with."""
        if self.binary is None:
            raise QemuError(self.missing)
        return [self.binary, *self.args]

    def environ(self) -> dict[str, str]:
        return {**os.environ, **dict(self.env)}

    def reported_version(self) -> str:
        """What the binary says it is ("10.0.2"): the unpacked one comes from whatever
        bookworm-backports carries, which may move on past the version it is named after."""
        out = subprocess.run(
            [*self.command(), "--version"],
            capture_output=True,
            text=True,
            check=True,
            env=self.environ(),
        ).stdout
        return out.split()[3]  # "QEMU emulator version 10.0.2 (Debian ...)"


def unpacked_build(version: str) -> QemuBuild:
    """The QEMU that setup.sh unpacked into .qemu/VERSION (None binary until it has)."""
    root = REPO / ".qemu" / version
    binary = root / "usr" / "bin" / "qemu-system-x86_64"
    return QemuBuild(
        version=version,
        binary=str(binary) if os.access(binary, os.X_OK) else None,
        missing=f"QEMU {version} is not unpacked in {root}: run ./setup.sh",
        args=("-L", str(root / "usr" / "share" / "qemu")),
        env=(("QEMU_MODULE_DIR", str(root / "usr" / "lib" / "x86_64-linux-gnu" / "qemu")),),
    )


#: Debian 12's own QEMU, the default everywhere a build is not given.
QEMU_7_2 = QemuBuild(
    "7.2", QEMU, "qemu-system-x86_64 is not installed: run ./setup.sh as root (qemu-system-x86)"
)
QEMU_10_0 = unpacked_build("10.0")  # bookworm-backports' qemu-system-x86 1:10.0.2
BUILDS = (QEMU_7_2, QEMU_10_0)


def build_guest(out_dir: Path) -> Path:
    """Compile tests/guest into `out_dir`/guest.elf (built per session, never committed)."""
    if CC is None:
        raise RuntimeError("gcc is needed to build the test guest")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "guest.elf"
    cmd = [
        CC,
        *GUEST_CFLAGS,
        "-T",
        str(GUEST_DIR / "guest.ld"),
        "-o",
        str(out),
        str(GUEST_DIR / "guest.c"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"building the test guest failed: {shlex.join(cmd)}\n{proc.stderr}")
    return out


def _deadline(timeout: float) -> float:
    return time.monotonic() + timeout


def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"timed out waiting for {what}")
    return left


class Qmp:
    """A synchronous QMP client over a connected stream socket.

    Events that arrive while waiting for something else are queued, so `wait_event` also sees
    events that came in during an `execute`.
    """

    def __init__(self, sock: socket.socket, timeout: float = QMP_TIMEOUT) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._ids = itertools.count(1)
        self.events: deque[dict[str, Any]] = deque()
        self.timeout = timeout
        self.greeting = self._read_message(_deadline(timeout), "the QMP greeting")
        if "QMP" not in self.greeting:
            raise QemuError(f"not a QMP greeting: {self.greeting!r}")
        self.execute("qmp_capabilities")

    @classmethod
    def connect(cls, path: str | Path, timeout: float = QMP_TIMEOUT) -> Qmp:
        """Connect to a QMP UNIX socket (e.g. `-qmp unix:PATH,server=on,wait=off`)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(path))
        return cls(sock, timeout)

    def close(self) -> None:
        self._sock.close()

    def _read_message(self, deadline: float, what: str) -> dict[str, Any]:
        while (end := self._buf.find(b"\n")) < 0:
            self._sock.settimeout(_remaining(deadline, what))
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"timed out waiting for {what}") from None
            except OSError as exc:
                raise QmpClosed(f"QMP connection lost while waiting for {what}: {exc}") from exc
            if not chunk:
                raise QmpClosed(f"QEMU closed QMP while we waited for {what}")
            self._buf += chunk
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        return json.loads(line)

    def _send(self, message: dict[str, Any], fd: int | None = None) -> None:
        data = json.dumps(message).encode() + b"\n"
        try:
            if fd is None:
                self._sock.sendall(data)
            else:
                socket.send_fds(self._sock, [data], [fd])
        except OSError as exc:
            raise QmpClosed(f"QMP connection lost sending {message['execute']}: {exc}") from exc

    def _command(self, cmd: str, arguments: dict[str, Any], fd: int | None) -> Any:
        ident = next(self._ids)
        message: dict[str, Any] = {"execute": cmd, "id": ident}
        if arguments:
            message["arguments"] = arguments
        self._send(message, fd)
        deadline = _deadline(self.timeout)
        while True:
            reply = self._read_message(deadline, f"the reply to {cmd}")
            if "event" in reply:
                self.events.append(reply)
            elif reply.get("id") == ident:
                if "error" in reply:
                    raise QmpError(cmd, reply["error"])
                return reply.get("return")

    def execute(self, cmd: str, **arguments: Any) -> Any:
        """Run a command and return its `return` value; raise QmpError with QEMU's desc."""
        return self._command(cmd, arguments, None)

    def execute_with_fd(self, cmd: str, fd: int, **arguments: Any) -> Any:
        """Run a command with `fd` attached as SCM_RIGHTS (for `getfd`, `add-fd`)."""
        return self._command(cmd, arguments, fd)

    def wait_event(
        self,
        name: str | Sequence[str],
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = QMP_TIMEOUT,
    ) -> dict[str, Any]:
        """Return (and dequeue) the first event named `name` (or any of several names) that
        satisfies `predicate`, queued ones first; other events stay queued."""
        names = {name} if isinstance(name, str) else set(name)

        def wanted(event: dict[str, Any]) -> bool:
            return event["event"] in names and (predicate is None or predicate(event))

        for event in self.events:
            if wanted(event):
                self.events.remove(event)
                return event
        deadline = _deadline(timeout)
        while True:
            message = self._read_message(deadline, f"event {sorted(names)}")
            if "event" not in message:
                continue  # a late reply to a command that timed out
            if wanted(message):
                return message
            self.events.append(message)


class Vm:
    """One QEMU process (a context manager that always kills it and its exec: children).

    QMP and the optional debug console are socketpairs passed to QEMU as fds. QEMU's stdout and
    stderr go to WORKDIR/NAME.log, whose tail is included in raised errors. `qemu` is the build
    it runs (Debian's 7.2 by default).
    """

    def __init__(
        self,
        workdir: Path,
        name: str,
        args: Sequence[str] = (),
        *,
        console: bool = False,
        qemu: QemuBuild = QEMU_7_2,
    ) -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.args = list(args)
        self.console = console
        self.qemu = qemu
        self.log_path = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: Qmp | None = None
        self._console: socket.socket | None = None
        self._console_buf = bytearray()

    def start(self) -> Vm:
        cmd = self.qemu.command()
        self.workdir.mkdir(parents=True, exist_ok=True)
        qmp_ours, qmp_theirs = socket.socketpair()
        keep = [qmp_theirs]
        cmd += [
            "-machine",
            "pc",
            "-accel",
            "tcg,thread=single",
            "-m",
            str(RAM_SIZE >> 20),
            "-nographic",
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "none",
            "-chardev",
            f"socket,id=qmp,fd={qmp_theirs.fileno()}",
            "-mon",
            "chardev=qmp,mode=control",
        ]
        if self.console:
            con_ours, con_theirs = socket.socketpair()
            keep.append(con_theirs)
            cmd += [
                "-chardev",
                f"socket,id=dbg,fd={con_theirs.fileno()}",
                "-device",
                "isa-debugcon,chardev=dbg,iobase=0xe9",
            ]
            self._console = con_ours
        cmd += self.args
        try:
            with open(self.log_path, "wb") as log:
                log.write(f"$ {shlex.join(cmd)}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=[s.fileno() for s in keep],
                    cwd=self.workdir,
                    env=self.qemu.environ(),
                    start_new_session=True,  # its own process group: kill() reaches exec: children
                    preexec_fn=_die_with_parent,
                )
        finally:
            for s in keep:
                s.close()
        try:
            self._qmp = Qmp(qmp_ours)
        except Exception as exc:
            self.kill()
            raise self.error(f"{self.name}: no QMP: {exc}") from exc
        return self

    def __enter__(self) -> Vm:
        return self if self.proc else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    @property
    def qmp(self) -> Qmp:
        if self._qmp is None:
            raise QemuError(f"{self.name} is not running")
        return self._qmp

    def kill(self) -> None:
        """SIGKILL QEMU's process group (QEMU and its exec: commands) and reap QEMU."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for s in (self._qmp, self._console):
            if s is not None:
                s.close()

    def wait_exit(self, timeout: float) -> int | None:
        """QEMU's exit status once it exits by itself, or None if it is still running."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of QEMU's output (the log's first line is the command line)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[1:][-lines:])

    def error(self, message: str) -> QemuError:
        """A QemuError whose message carries this VM's log tail."""
        return QemuError(f"{message}\n--- {self.log_path} (tail) ---\n{self.log_tail()}")

    def failure(self, message: str, desc: str = "") -> MigrationFailed:
        """A MigrationFailed with QEMU's error text (`desc`, default: the log's last lines)."""
        text = f"{message}\n--- {self.log_path} (tail) ---\n{self.log_tail()}"
        return MigrationFailed(text, desc or self.log_tail(5))

    def wait_console(self, text: bytes = READY, timeout: float = 60.0) -> bytes:
        """Block until the guest has written `text` to isa-debugcon; return all output so far."""
        if self._console is None:
            raise QemuError(f"{self.name} has no debug console")
        deadline = _deadline(timeout)
        while text not in self._console_buf:
            try:
                self._console.settimeout(_remaining(deadline, f"{text!r} on {self.name}"))
                chunk = self._console.recv(4096)
            except (TimeoutError, OSError) as exc:
                raise self.error(f"{self.name}: guest did not print {text!r}: {exc}") from exc
            if not chunk:
                raise self.error(f"{self.name}: QEMU exited before the guest printed {text!r}")
            self._console_buf += chunk
        return bytes(self._console_buf)

    def pmemsave(self, path: Path, addr: int = IMAGE_START, size: int = IMAGE_SIZE) -> bytes:
        """Guest-physical memory [addr, addr+size) via QMP pmemsave (the file is removed)."""
        path = Path(path).resolve()
        self.qmp.execute("pmemsave", val=addr, size=size, filename=str(path))
        try:
            return path.read_bytes()
        finally:
            path.unlink()


# ------------------------------------------------------------------------------------------
# Migration


@dataclass(frozen=True)
class Pacing:
    """How the source migrates: a live stream needs several passes and must still converge.

    With a 1 ms downtime limit QEMU only switches over once a pass leaves almost nothing dirty,
    which a guest that keeps writing prevents, so it keeps iterating. At MIGRATION_PASS number
    `switchover_pass` (QEMU's dirty-bitmap sync count) the harness raises the limit to
    `final_downtime_ms` and QEMU completes within its next 100 ms bandwidth update. So the pass
    count has a floor that does not depend on how fast TCG runs the guest; measured with
    switchover_pass=3: 5 syncs (1 setup, bulk, 2 live, final), now and then 6-8 when late
    passes are very short (XBZRLE). `switchover_pass=None` leaves convergence to QEMU, e.g. for
    a rate-limited link where the test wants to see whether it converges by itself.

    `give_up_pass` bounds a migration that may never converge: when MIGRATION_PASS reaches it,
    no sooner than `give_up_seconds` after the start, and QEMU is still iterating (not already
    switching over), the harness cancels the migration and raises NotConverged. The seconds
    matter where passes are short: with XBZRLE a pass can take 100 ms, and 20 of them (2.1 s,
    seen once in a CI run) came before the 2.2 s such a migration usually takes to converge; a
    user does not cancel a migration after two seconds.
    """

    max_bandwidth: int
    downtime_ms: int = 300
    switchover_pass: int | None = None
    final_downtime_ms: int = 60_000
    xbzrle: bool = False
    stop_first: bool = False  # pause the source before migrating: one pass, memory frozen
    give_up_pass: int | None = None
    give_up_seconds: float = 0.0


PACINGS: dict[str, Pacing] = {
    "idle": Pacing(max_bandwidth=1 << 30, stop_first=True),
    "dirty": Pacing(max_bandwidth=64 << 20, downtime_ms=1, switchover_pass=3),
    "xbzrle": Pacing(max_bandwidth=64 << 20, downtime_ms=1, switchover_pass=3, xbzrle=True),
    # QEMU's parameters as a user of libvirt leaves them: no throttle (libvirt lifts
    # max-bandwidth for a migration) and the default 300 ms downtime limit from the first pass,
    # so convergence is QEMU's own call throughout. The cap (a minute: QEMU's own xbzrle takes
    # ~4.4 s) ends a migration that does not converge with NotConverged, not a timeout.
    "busy": Pacing(max_bandwidth=1 << 30, give_up_pass=1, give_up_seconds=60.0),
}
PACINGS["check"] = PACINGS["busy"]


def check_image(memory: bytes, pages: int = BUSY_PAGES) -> int:
    """The writes a mode=check guest made, from its memory (pmemsave from IMAGE_START), once
    every page's first word was found equal to its counter in the guest's table (but the page
    in flight, which may be one behind): a page lost or stale on the way breaks that."""
    table = CHECK_TABLE - IMAGE_START
    writes, in_flight = struct.unpack_from("<2I", memory, table)
    counters = struct.unpack_from(f"<{pages}I", memory, table + 8)
    region = (8 << 20) - IMAGE_START  # the guest's REGION_START
    for page, count in enumerate(counters):
        (first,) = struct.unpack_from("<I", memory, region + page * 4096)
        if first != count and not (page == in_flight and first == count + 1):
            raise AssertionError(
                f"page {page} (guest address {hex(region + IMAGE_START + page * 4096)}) "
                f"holds count {first}, its counter says {count}: it arrived stale or not at all"
            )
    assert sum(counters) in (writes, writes + 1), (sum(counters), writes)  # all writes counted
    return writes


def qmp_socket_args(path: Path) -> list[str]:
    """QEMU arguments for a second QMP monitor on the UNIX socket `path` (one client at a time,
    e.g. `migpipe migrate --qmp PATH`), beside the harness's own; both receive every event."""
    return ["-qmp", f"unix:{path},server=on,wait=off"]


def guest_args(guest_elf: Path, kind: str) -> list[str]:
    """QEMU arguments that boot the test guest in the behaviour `kind` needs."""
    return ["-kernel", str(guest_elf), "-append", GUEST_APPEND[kind]]


@contextlib.contextmanager
def source_vm(
    guest_elf: Path,
    kind: str,
    workdir: Path,
    *,
    pacing: Pacing | None = None,
    name: str = "source",
    args: Sequence[str] = (),
    qemu: QemuBuild = QEMU_7_2,
) -> Iterator[Vm]:
    """A running source VM whose guest has filled its memory, set up for `kind`'s migration.

    It starts paused (-S) so the console is connected before the guest can print READY.
    `args` are more QEMU arguments (e.g. `qmp_socket_args`, for a client other than the harness).
    """
    pacing = pacing or PACINGS[kind]
    args = [*guest_args(guest_elf, kind), "-S", *args]
    with Vm(workdir, name, args, console=True, qemu=qemu) as vm:
        vm.qmp.execute("cont")
        vm.wait_console(READY)
        caps = [{"capability": "events", "state": True}]
        if pacing.xbzrle:
            caps.append({"capability": "xbzrle", "state": True})
        vm.qmp.execute("migrate-set-capabilities", capabilities=caps)
        vm.qmp.execute(
            "migrate-set-parameters",
            **{"max-bandwidth": pacing.max_bandwidth, "downtime-limit": pacing.downtime_ms},
        )
        if pacing.stop_first:
            vm.qmp.execute("stop")
        yield vm


def _read_exit_report(fd: int, deadline: float, what: str) -> int:
    buf = b""
    while not buf.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], _remaining(deadline, what))
        if ready:
            buf += os.read(fd, 64)
    return int(buf)


def run_migration(
    src: Vm, command: str, pacing: Pacing, *, timeout: float = MIGRATION_TIMEOUT
) -> tuple[dict[str, Any], int]:
    """Migrate `src` with `exec:COMMAND` and wait until QEMU completed *and* COMMAND exited.

    Returns query-migrate's result and COMMAND's exit status (dash has no pipefail: that is the
    status of its last stage). Raises MigrationFailed if QEMU reports the migration failed, and
    NotConverged (after `migrate_cancel` and QEMU's "cancelled", source still running) if it
    reaches `pacing.give_up_pass` without completing; a migration that completes anyway, its
    final sync being that pass, is returned as usual.
    """
    report = src.workdir / f"{src.name}.exit"
    report.unlink(missing_ok=True)
    os.mkfifo(report)
    # O_RDWR: never blocks, and the command's `echo > FIFO` never blocks either.
    fd = os.open(report, os.O_RDWR | os.O_NONBLOCK)
    deadline = _deadline(timeout)
    try:
        start = time.monotonic()
        src.qmp.execute("migrate", uri=f"exec:( {command}\n); echo $? > {shlex.quote(str(report))}")
        switched = pacing.switchover_pass is None
        given_up: NotConverged | None = None
        passes = 0
        while True:
            event = src.qmp.wait_event(
                ("MIGRATION", "MIGRATION_PASS"), timeout=_remaining(deadline, "the migration")
            )
            if event["event"] == "MIGRATION_PASS":
                passes = event["data"]["pass"]
                if not switched and passes >= (pacing.switchover_pass or 0):
                    src.qmp.execute(
                        "migrate-set-parameters", **{"downtime-limit": pacing.final_downtime_ms}
                    )
                    switched = True
                give_up = pacing.give_up_pass
                seconds = time.monotonic() - start
                patient = seconds >= pacing.give_up_seconds
                if given_up is None and give_up is not None and passes >= give_up and patient:
                    info = src.qmp.execute("query-migrate")
                    # Not if QEMU is switching over ("device": the completion's own sync).
                    if info["status"] == "active":
                        src.qmp.execute("migrate_cancel")
                        given_up = NotConverged(
                            f"{src.name}: migration not converged after {passes} passes "
                            f"({seconds:.1f} s); cancelled",
                            passes,
                            seconds,
                            info,
                        )
                continue
            status = event["data"]["status"]
            if status == "completed":
                break
            if status == "cancelled" and given_up is not None:
                # QEMU 7.2 reaps the command before it reports "cancelled": the report is there.
                _read_exit_report(fd, deadline, f"{command!r} to exit after the cancel")
                raise given_up
            if status in ("failed", "cancelled"):
                desc = src.qmp.execute("query-migrate").get("error-desc", status)
                cancel = "; migrate_cancel was sent" if given_up is not None else ""
                raise src.failure(
                    f"{src.name}: migration {status} after {passes} passes "
                    f"({time.monotonic() - start:.1f} s{cancel}): {desc}",
                    desc,
                )
        exit_status = _read_exit_report(fd, deadline, f"{command!r} to exit")
        return src.qmp.execute("query-migrate"), exit_status
    except (TimeoutError, QmpClosed) as exc:
        raise src.error(f"{src.name}: migration did not finish: {exc}") from exc
    finally:
        os.close(fd)


def wait_incoming(dest: Vm, *, timeout: float = MIGRATION_TIMEOUT) -> dict[str, Any]:
    """Wait for the destination's load to complete and return its `completed` event (whose
    timestamp ends the guest's real pause); MigrationFailed with QEMU's text if it failed.

    QEMU 7.2 exits when a load fails ("load of migration failed: ..."), so a closed QMP
    connection means failure too, explained by its stderr.
    """
    try:
        event = dest.qmp.wait_event(
            "MIGRATION",
            lambda e: e["data"]["status"] in ("completed", "failed", "cancelled"),
            timeout=timeout,
        )
    except QmpClosed:
        dest.wait_exit(10)
        raise dest.failure(f"{dest.name}: QEMU exited during the load") from None
    except TimeoutError as exc:
        raise dest.error(f"{dest.name}: load did not finish: {exc}") from exc
    status = event["data"]["status"]
    if status == "completed":
        return event
    desc = ""
    with contextlib.suppress(QmpClosed, QmpError):
        desc = dest.qmp.execute("query-migrate").get("error-desc", "")
    dest.wait_exit(10)
    desc = "\n".join(filter(None, [desc, dest.log_tail(5)]))
    raise dest.failure(f"{dest.name}: load {status}", desc)


def _unique(workdir: Path, stem: str) -> str:
    for n in itertools.count(1):
        name = stem if n == 1 else f"{stem}{n}"
        if not (workdir / f"{name}.log").exists():
            return name
    raise AssertionError("unreachable")


@contextlib.contextmanager
def destination_vm(
    workdir: Path, uri: str, *, name: str = "dest", qemu: QemuBuild = QEMU_7_2
) -> Iterator[Vm]:
    """A paused destination (-S -incoming defer) already listening on `uri` (migrate-incoming)."""
    args = ["-S", "-incoming", "defer"]
    with Vm(workdir, _unique(Path(workdir), name), args, qemu=qemu) as vm:
        vm.qmp.execute(
            "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}]
        )
        vm.qmp.execute("migrate-incoming", uri=uri)
        yield vm


def load_stream(
    stream_path: Path,
    workdir: Path,
    *,
    timeout: float = MIGRATION_TIMEOUT,
    qemu: QemuBuild = QEMU_7_2,
) -> bytes:
    """Load a stream file into a fresh paused destination and return its RAM from 1 MiB.

    Raises MigrationFailed (with QEMU's error text) if QEMU rejects the stream.
    """
    workdir = Path(workdir)
    uri = f"exec:cat {shlex.quote(str(Path(stream_path).resolve()))}"
    with destination_vm(workdir, uri, name="load", qemu=qemu) as dest:
        wait_incoming(dest, timeout=timeout)
        return dest.pmemsave(workdir / f"{dest.name}.mem")


@dataclass
class Capture:
    """A stream captured from a real source, and how it went."""

    kind: str
    path: Path
    qemu: QemuBuild  # the build that wrote it
    seconds: float  # from `migrate` to the stream file being complete
    size: int
    dirty_syncs: int  # QEMU's dirty-bitmap sync count (MIGRATION_PASS events)
    info: dict[str, Any] = field(repr=False)  # query-migrate on the source afterwards
    source_memory: bytes | None = field(default=None, repr=False)  # paused sources only


def capture_stream(
    guest_elf: Path,
    kind: str,
    out_path: Path,
    workdir: Path,
    *,
    pacing: Pacing | None = None,
    qemu: QemuBuild = QEMU_7_2,
) -> Capture:
    """Migrate a fresh source running the guest in `kind` mode into `out_path` (exec:cat).

    idle: the source is paused first, so the stream is a single pass and the source's memory
    (returned too) is an oracle. dirty / xbzrle: the guest dirties memory during the migration,
    which has several passes (see Pacing); xbzrle turns on QEMU's xbzrle capability.
    """
    pacing = pacing or PACINGS[kind]
    out_path = Path(out_path).resolve()
    workdir = Path(workdir)
    name = _unique(workdir, kind)
    with source_vm(guest_elf, kind, workdir, pacing=pacing, name=name, qemu=qemu) as src:
        start = time.monotonic()
        info, status = run_migration(src, f"cat > {shlex.quote(str(out_path))}", pacing)
        seconds = time.monotonic() - start
        if status != 0:
            raise src.error(f"`cat > {out_path}` exited with status {status}")
        memory = src.pmemsave(workdir / f"{src.name}.mem") if pacing.stop_first else None
    return Capture(
        kind=kind,
        path=out_path,
        qemu=qemu,
        seconds=seconds,
        size=out_path.stat().st_size,
        dirty_syncs=int(info.get("ram", {}).get("dirty-sync-count", 0)),
        info=info,
        source_memory=memory,
    )


@dataclass
class Migration:
    """The outcome of `migrate_through`."""

    source_stream: Path  # what the source sent (see migrate_through): the oracle's input
    dest_memory: bytes = field(repr=False)  # the paused destination's RAM from 1 MiB
    source_info: dict[str, Any] = field(repr=False)  # query-migrate on the source afterwards
    sender_status: int  # exit status of the sender (last stage of the source pipeline)
    seconds: float  # from `migrate` to the destination having loaded everything
    real_pause: float  # seconds the guest ran nowhere: the source's STOP to the load's end


def event_time(event: dict[str, Any]) -> float:
    """A QMP event's host-clock timestamp in seconds (both VMs here share the host's clock)."""
    stamp = event["timestamp"]
    return stamp["seconds"] + stamp["microseconds"] / 1e6


def migrate_through(
    guest_elf: Path,
    kind: str,
    workdir: Path,
    *,
    sender: str = "cat > {fifo}",
    incoming: str = "exec:cat {fifo}",
    pacing: Pacing | None = None,
    timeout: float = MIGRATION_TIMEOUT,
    qemu: QemuBuild = QEMU_7_2,
) -> Migration:
    """Live-migrate a source VM running the guest into a destination VM through a pipeline.

    The source runs `exec:tee WORKDIR/source.stream | SENDER` (source2.stream... when workdir is
    reused); the destination is started with
    `-S -incoming defer` and `migrate-incoming INCOMING` before the source starts. In both,
    `{fifo}` is replaced by the path of a FIFO created in workdir and `{workdir}` by workdir, so
    the default is a plain `cat` link; a tunnel test passes e.g.
    `sender="migpipe encode | migpipe decode > {fifo}"`, or a sender that connects to a port the
    destination's `incoming` (`tcp:127.0.0.1:PORT`, `exec:migpipe receive ...`) listens on.
    A sender that names `{wire}` keeps migpipe's wire there itself (`encode | tee {wire} | ...`)
    and the source runs it without the tee: source.stream is then that wire decoded afterwards,
    which a test of the guest's pause uses so that copying every QEMU byte once more does not
    compete with the tunnel for the CPU (decode checks it against encode's digest of its input).
    A failure on either side raises MigrationFailed with the destination's and source's errors.
    Both VMs run `qemu`.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    pacing = pacing or PACINGS[kind]
    fifo = workdir / "link.fifo"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)

    def fill(template: str) -> str:
        return template.replace("{fifo}", shlex.quote(str(fifo))).replace(
            "{workdir}", shlex.quote(str(workdir))
        )

    name = _unique(workdir, "source")
    source_stream = workdir / f"{name}.stream"
    wire = workdir / f"{name}.wire"
    if "{wire}" in sender:
        command = fill(sender.replace("{wire}", shlex.quote(str(wire))))
    else:
        command = f"tee {shlex.quote(str(source_stream))} | {fill(sender)}"
    with (
        destination_vm(workdir, fill(incoming), qemu=qemu) as dest,
        source_vm(guest_elf, kind, workdir, pacing=pacing, name=name, qemu=qemu) as src,
    ):
        start = time.monotonic()
        try:
            info, status = run_migration(src, command, pacing, timeout=timeout)
        except NotConverged:
            raise  # the destination's complaint about the cut stream is expected, not news
        except QemuError as exc:
            # The destination's complaint usually explains the source's failure.
            if dest.wait_exit(5) is not None or isinstance(exc, MigrationFailed):
                desc = "\n".join([dest.log_tail(5), getattr(exc, "desc", "")]).strip()
                raise dest.failure(f"{exc}\n(destination follows)", desc) from exc
            raise
        loaded = wait_incoming(dest, timeout=_remaining(start + timeout, "the destination"))
        seconds = time.monotonic() - start
        stop = src.qmp.wait_event("STOP", timeout=5)  # queued while the migration ran
        memory = dest.pmemsave(workdir / "dest.mem")
    if "{wire}" in sender:
        decode = [*MIGPIPE, "decode", "--in", str(wire), "--out", str(source_stream)]
        subprocess.run(decode, check=True)
    return Migration(
        source_stream=source_stream,
        dest_memory=memory,
        source_info=info,
        sender_status=status,
        seconds=seconds,
        real_pause=event_time(loaded) - event_time(stop),
    )
