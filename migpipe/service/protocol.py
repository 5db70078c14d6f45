"""The protocol of `migpipe serve`, without I/O: bytes and fds in, commands out; replies and
events in, bytes out. See migpipe-serve(1) for the protocol as its clients see it.

It is shaped like QMP, so a daemon that already drives QEMU (libvirt, vdsm, KubeVirt's
virt-handler) already has the client it needs: a greeting, `{"execute", "arguments", "id"}`
commands, `{"return"}` / `{"error": {"class", "desc"}}` replies, timestamped `{"event"}`s.

Framing is one JSON object per line. File descriptors come as SCM_RIGHTS data, and the kernel
hands them over with the bytes of the sendmsg that carried them: a recvmsg that returns fds
stops at the end of that message, so they belong to the line holding the last byte received
with them. Every rule about which command may carry fds, how long a line may be and what each
argument must be lives here, so all of it is tested without a socket.
"""

import json
import math
import re
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from migpipe import __version__
from migpipe.lines import LineSplitter, LineTooLong

MAX_LINE = 64 << 10  # longer lines are a flood: an error, then the connection is closed
# The kernel closes any beyond this in one message, and says so (MSG_CTRUNC); more than this
# for a line that several messages make up is a flood.
MAX_FDS_PER_MESSAGE = 16

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"

NO_ID = object()  # a command without "id": its reply has none either


class CommandError(Exception):
    """A command the service refuses, with QMP's error class and a description for people."""

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR, id: Any = NO_ID) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class
        self.id = id


class Flood(CommandError):
    """More than one line may hold: MAX_LINE bytes, or MAX_FDS_PER_MESSAGE fds, without a
    newline. The connection is closed after the reply, and what the client sent is discarded."""


# -- framing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One line as received, and the fds that came with it (the receiver must close them)."""

    text: bytes
    fds: tuple[int, ...] = ()
    fds_truncated: bool = False  # more than MAX_FDS_PER_MESSAGE were sent; the kernel closed some


class Reader:
    """Lines out of what recvmsg returns, each with the fds its sender attached to it."""

    def __init__(self) -> None:
        self._splitter = LineSplitter(MAX_LINE)
        self._partial = Line(b"")  # the fds of the unfinished line
        self._lines: deque[Line] = deque()
        self._flood: str | None = None  # why the client is disconnected, once it floods

    def feed(self, data: bytes, fds: Sequence[int] = (), fds_truncated: bool = False) -> None:
        if self._flood:  # nothing more is read after a flood; only fds to close
            self._partial = _with_fds(self._partial, fds, fds_truncated)
            return
        self._splitter.feed(data)
        try:
            while (text := self._splitter.next_line()) is not None:
                self._lines.append(replace(self._partial, text=text))
                self._partial = Line(b"")
        except LineTooLong:
            self._flood = f"a line longer than {MAX_LINE} bytes; closing the connection"
        if fds or fds_truncated:
            if data.endswith(b"\n") and not self._flood:
                self._lines[-1] = _with_fds(self._lines[-1], fds, fds_truncated)
            else:  # the unfinished line's, or the overlong line's: closed with the connection
                self._partial = _with_fds(self._partial, fds, fds_truncated)
        if not self._flood and len(self._partial.fds) > MAX_FDS_PER_MESSAGE:
            # Each sendmsg may bring fds for a line it does not end: without this bound, a
            # client that never ends its line would make the service hold fds without limit.
            self._flood = (
                f"more than {MAX_FDS_PER_MESSAGE} fds for one line; closing the connection"
            )

    def next_line(self) -> Line | None:
        """The next complete line, or None until more is fed; Flood after a flood."""
        if self._lines:
            return self._lines.popleft()
        if self._flood:
            raise Flood(self._flood)
        return None

    def close(self) -> list[int]:
        """The fds of every line not handed out (an unfinished one at EOF, a flood's)."""
        held = [fd for line in (*self._lines, self._partial) for fd in line.fds]
        self._lines.clear()
        self._partial = Line(b"")
        return held


def _with_fds(line: Line, fds: Sequence[int], truncated: bool) -> Line:
    return replace(line, fds=line.fds + tuple(fds), fds_truncated=line.fds_truncated or truncated)


# -- commands and their arguments ----------------------------------------------------------------


@dataclass(frozen=True)
class Type:
    """What a JSON value must be, said the way an error message needs it."""

    what: str
    check: Callable[[Any], bool]


STRING = Type("a string", lambda v: isinstance(v, str))
BOOLEAN = Type("a boolean", lambda v: isinstance(v, bool))
STRINGS = Type("a list of strings", lambda v: isinstance(v, list) and all(map(STRING.check, v)))
FD_NAME = Type(
    "an fd name (1 to 128 letters, digits, '.', '_' or '-')",
    lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9._-]{1,128}", v) is not None,
)


@dataclass(frozen=True)
class FdInfo:
    """What an fd is, as the service found it when the fd arrived."""

    type: str  # "pipe", "socket", "file", "character device", "block device", "directory", ...
    readable: bool
    writable: bool

    def as_dict(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "type": self.type,
            "readable": self.readable,
            "writable": self.writable,
        }


STREAM_TYPES = frozenset({"pipe", "socket", "file", "character device", "block device"})


@dataclass(frozen=True)
class FdRole:
    """How a job uses an fd it takes, and so what the fd must be."""

    use: str  # "read from", "written to"
    types: frozenset[str]
    readable: bool = False
    writable: bool = False

    def check(self, argument: str, name: str, info: FdInfo) -> None:
        what = f"fd '{name}' (argument '{argument}', {self.use})"
        if info.type not in self.types:
            allowed = ", ".join(sorted(self.types))
            raise CommandError(f"{what} is a {info.type}; it must be one of: {allowed}")
        if self.readable and not info.readable:
            raise CommandError(f"{what} is not open for reading")
        if self.writable and not info.writable:
            raise CommandError(f"{what} is not open for writing")


INPUT = FdRole("read from", STREAM_TYPES, readable=True)
OUTPUT = FdRole("written to", STREAM_TYPES, writable=True)
# A saved file: the fixed layout writes it at offsets and reads extents back; restore seeks.
SAVE_FILE = FdRole("saved to (read back too)", frozenset({"file"}), readable=True, writable=True)
SAVED_FILE = FdRole("restored from", frozenset({"file", "block device"}), readable=True)
# A secret is read whole when the job starts (or decode meets the wire's header), in a thread
# that cannot be cancelled: a regular file never blocks that read, where a pipe whose writer is
# slow would hold that thread, and the command or job waiting for it, forever.
SECRET = FdRole("a key or passphrase read whole", frozenset({"file"}), readable=True)


@dataclass(frozen=True)
class Arg:
    """One argument of a command: its type, whether it must be given, and if it names an fd,
    the role of that fd."""

    type: Type
    required: bool = True
    fd: FdRole | None = None


Schema = dict[str, Arg]

# Every command and its arguments. start-job's are "kind" and then those of the job kind
# (migpipe.service.server.JOB_KINDS), checked once the kind is known.
COMMANDS: dict[str, Schema] = {
    "qmp_capabilities": {"enable": Arg(STRINGS, required=False)},
    "query-commands": {},
    "add-fd": {"name": Arg(FD_NAME)},
    "remove-fd": {"name": Arg(STRING)},
    "query-fds": {},
    "start-job": {"kind": Arg(STRING)},
    "query-jobs": {},
    "cancel-job": {"id": Arg(STRING)},
}
OPEN_COMMANDS = frozenset({"start-job"})
FD_COMMANDS = frozenset({"add-fd"})  # the only command that carries an fd, exactly one
ENVELOPE = frozenset({"execute", "arguments", "id"})


@dataclass(frozen=True)
class Command:
    name: str
    arguments: dict[str, Any]
    id: Any = NO_ID
    fds: tuple[int, ...] = ()


def parse_command(line: Line) -> Command | None:
    """The command on `line`, checked; None for a blank line. Raises CommandError, after which
    the caller closes the line's fds."""
    if not line.text.strip():
        if line.fds or line.fds_truncated:
            raise CommandError("fds arrived with an empty line; they were closed")
        return None
    try:
        message = json.loads(
            line.text.decode(), parse_constant=_refuse_constant, parse_float=_finite_float
        )
    except UnicodeDecodeError as e:
        raise CommandError(f"JSON parse error: not UTF-8 (byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise CommandError(f"JSON parse error: {e}") from None
    if not isinstance(message, dict):
        raise CommandError(f"a command is a JSON object, not {json_type(message)}")
    id = message.get("id", NO_ID)
    if unexpected := sorted(set(message) - ENVELOPE):
        raise CommandError(f"unexpected member '{unexpected[0]}' in a command", id=id)
    name = message.get("execute")
    if not isinstance(name, str):
        raise CommandError("'execute' must be given, as a string (the command's name)", id=id)
    schema = COMMANDS.get(name)
    if schema is None:
        raise CommandError(
            f"unknown command '{name}' (query-commands lists them)", COMMAND_NOT_FOUND, id
        )
    arguments = message.get("arguments", {})
    if not isinstance(arguments, dict):
        raise CommandError(f"'arguments' must be an object, not {json_type(arguments)}", id=id)
    check_fds(name, line, id)
    check_arguments(name, schema, arguments, id, open=name in OPEN_COMMANDS)
    return Command(name, arguments, id, line.fds)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    """A number that overflows a double would become Infinity, which is not JSON either, and
    which a reply that echoes it (an id) would send back."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number too large for a double")
    return value


def check_fds(name: str, line: Line, id: Any) -> None:
    count = len(line.fds)
    if line.fds_truncated:
        raise CommandError(f"more than {MAX_FDS_PER_MESSAGE} fds attached; all were closed", id=id)
    if name in FD_COMMANDS and count != 1:
        closed = "; they were closed" if count else ""
        raise CommandError(
            f"'{name}' needs exactly one fd attached (SCM_RIGHTS), got {count}{closed}", id=id
        )
    if name not in FD_COMMANDS and count:
        raise CommandError(f"'{name}' takes no fd; the {count} attached were closed", id=id)


def check_arguments(
    command: str, schema: Schema, arguments: dict[str, Any], id: Any = NO_ID, open: bool = False
) -> None:
    """Missing, unexpected and mistyped arguments, each named; `open` lets unknown ones pass
    (start-job's, checked again against the job kind's schema)."""
    for name, arg in schema.items():
        if name not in arguments:
            if arg.required:
                raise CommandError(f"'{command}' needs argument '{name}'", id=id)
        elif not arg.type.check(arguments[name]):
            value = json_type(arguments[name])
            raise CommandError(
                f"argument '{name}' of '{command}' must be {arg.type.what}, not {value}", id=id
            )
    if not open and (unexpected := sorted(set(arguments) - set(schema))):
        takes = ", ".join(schema) or "none"
        raise CommandError(
            f"'{command}' has no argument '{unexpected[0]}' (it takes: {takes})", id=id
        )


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    for kind, what in (
        (str, "a string"),
        (int, "an integer"),
        (float, "a number"),
        (list, "a list"),
        (dict, "an object"),
    ):
        if isinstance(value, kind):
            return what
    return "null"


# -- what the service sends ----------------------------------------------------------------------


def greeting() -> dict[str, Any]:
    """The first line a client reads, shaped like QMP's (under "migpipe", not "QMP"); no
    capability can be negotiated yet, so the list is empty."""
    major, minor, micro = (int(part) for part in __version__.split(".")[:3])
    version = {"major": major, "minor": minor, "micro": micro, "package": f"migpipe {__version__}"}
    return {"migpipe": {"version": version, "capabilities": []}}


def reply(id: Any, value: Any) -> dict[str, Any]:
    return _with_id({"return": value}, id)


def error_reply(id: Any, desc: str, error_class: str = GENERIC_ERROR) -> dict[str, Any]:
    return _with_id({"error": {"class": error_class, "desc": desc}}, id)


def _with_id(message: dict[str, Any], id: Any) -> dict[str, Any]:
    if id is not NO_ID:
        message["id"] = id
    return message


def event(name: str, data: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    seconds, fraction = divmod(time.time() if now is None else now, 1)
    stamp = {"seconds": int(seconds), "microseconds": int(fraction * 1e6)}
    return {"event": name, "data": data, "timestamp": stamp}


def encode_message(message: dict[str, Any]) -> bytes:
    """One line of JSON; a NaN or infinity raises ValueError rather than go out as non-JSON."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def peer_credentials(getsockopt: Callable[[int, int, int], bytes]) -> tuple[int, int, int]:
    """The pid, uid and gid of the process at the other end of a UNIX socket, as the kernel
    recorded them when it connected, or listened (SO_PEERCRED); both ends check them."""
    return struct.unpack("3i", getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


# -- jobs ----------------------------------------------------------------------------------------

JOB_PROGRESS = "JOB_PROGRESS"
JOB_COMPLETED = "JOB_COMPLETED"
JOB_FAILED = "JOB_FAILED"
JOB_CANCELLED = "JOB_CANCELLED"
JOB_ENDS = frozenset({JOB_COMPLETED, JOB_FAILED, JOB_CANCELLED})


def job_status(
    id: str, kind: str, state: str, bytes_in: int, bytes_out: int, seconds: float
) -> dict[str, Any]:
    """One job as query-jobs and JOB_PROGRESS show it."""
    return {
        "id": id,
        "kind": kind,
        "state": state,
        "bytes-in": bytes_in,
        "bytes-out": bytes_out,
        "seconds": round(seconds, 3),
        "mbytes-per-second": round(bytes_in / seconds / 1e6, 1) if seconds > 0 else 0.0,
    }
