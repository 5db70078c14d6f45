"""Command-line entry point: parses arguments and calls one function per command.

The commands live with their options, a module per group: stream (inspect, extract, generate),
tunnel (encode, decode, migrate, incoming), save (save, restore, iohelper), admin (keygen,
tls-init, serve, demo); options holds what several share. Every MigpipeError becomes one line
on stderr and its exit status (see migpipe.errors and migpipe(1)); usage errors exit 2.
"""

import argparse
import errno
import io
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import NoReturn, TextIO

from migpipe import __version__
from migpipe.cli import admin, save, stream, tunnel
from migpipe.cli.arenas import use_one_arena
from migpipe.cli.command import Handler
from migpipe.cli.options import check_stats_path, seconds
from migpipe.errors import EXIT_ERROR, EXIT_PEER_GONE, MigpipeError

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM killed
GROUPS = (stream, tunnel, save, admin)  # in the order of the README's command table
# Commands whose standard output is a report or a stream read by whoever pipes it on: when
# that reader goes (`inspect | head`), they end quietly, by SIGPIPE, as cat does. The others'
# standard output is QEMU's or a peer's: its end there is a failure they report (status 5).
ENDS_AS_CAT = ("inspect", "extract", "generate")
STDIO = ((0, "stdin", "standard input"), (1, "stdout", "standard output"))
QMP_COMMANDS = ("save", "restore", "migrate", "incoming")  # those that take --qmp
GREETING_TIMEOUT = 10.0  # --qmp-timeout's default: qemu.qmp's, not imported for start-up time
QUIET, VERBOSE = "quiet", "verbose"
# What -v's first line names, when the command has it and it is given.
WHAT_IT_USES = (
    ("qmp", "--qmp"),
    ("file", "file"),
    ("stream", "stream"),
    ("input", "--in"),
    ("output", "--out"),
    ("connect", "--connect"),
    ("listen", "--listen"),
    ("fd", "--fd"),
    ("filters", "--filters"),
    ("xbzrle", "--xbzrle"),
    ("compress", "--compress"),
    ("encrypt", "--encrypt"),
    ("tls_creds", "--tls-creds"),
)
FD_OPTIONS = (("fd", "--fd"), ("key_fd", "--key-fd"), ("passphrase_fd", "--passphrase-fd"))


class SigtermAsInterrupt:
    """SIGTERM (libvirt aborting a helper, systemd, `timeout`) stops migpipe as Ctrl-C does:
    the pipeline's threads are stopped and a save removes its temporary file. It is passed on
    as SIGINT, which trio (inside trio.run) and Python (outside) already turn into
    KeyboardInterrupt at a safe point; a handler raising from here could land inside trio."""

    def __init__(self) -> None:
        self.received = False

    def install(self) -> None:
        """Only where SIGINT is handled: a job started with SIGINT ignored (`cmd &` in a
        script) must not ignore SIGTERM too, so there SIGTERM keeps killing at once."""
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGTERM, self)

    def __call__(self, signum: int, frame: object) -> None:
        self.received = True
        signal.raise_signal(signal.SIGINT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="migpipe", description="Understand, filter and move QEMU migration streams."
    )
    parser.add_argument("--version", action="version", version=f"migpipe {__version__}")
    verbosity_options(parser, argparse.SUPPRESS)  # before the command, or after it
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        verbosity_options(sub, argparse.SUPPRESS)
        return sub

    for group in GROUPS:
        group.register(command)
    for name in QMP_COMMANDS:
        commands.choices[name].add_argument(
            "--qmp-timeout",
            type=seconds,
            default=GREETING_TIMEOUT,
            metavar="SECONDS",
            help="give up when the QMP monitor does not greet within this long, as when "
            "another client holds it; 0: never (%(default)g)",
        )
    return parser


class ClosedStdio:
    """Stands for a standard stream that was closed when migpipe started (`migpipe inspect
    <&-`): any use of it is a one-line error that names it, not an AttributeError on None."""

    closed = True  # so that Python's flush at exit passes it by

    def __init__(self, fd: int, name: str) -> None:
        self._why = f"{name} (fd {fd}) is closed"

    def __getattr__(self, name: str) -> object:
        raise MigpipeError(self._why)


def guard_closed_stdio() -> None:
    """Give each closed standard stream a ClosedStdio, and its descriptor /dev/null opened the
    wrong way round (reads and writes fail): a socket or file opened later must not take fd 0
    or 1 and receive what was meant for them. A closed stderr becomes /dev/null: messages are
    lost, as any tool's, the exit status still tells."""
    for fd, attribute, name in STDIO:
        if getattr(sys, attribute) is None:
            take_fd(fd, os.O_WRONLY if fd == 0 else os.O_RDONLY)
            setattr(sys, attribute, ClosedStdio(fd, name))
    if sys.stderr is None:
        take_fd(2, os.O_WRONLY)
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 -- stderr, open until exit


def take_fd(fd: int, flags: int) -> None:
    """/dev/null on the closed descriptor `fd`."""
    opened = os.open(os.devnull, flags)
    if opened != fd:
        os.dup2(opened, fd)
        os.close(opened)


def check_fds(args: argparse.Namespace) -> None:
    """An fd option must name an open descriptor; said before the job starts, with the fd.
    iohelper's FD is no option: it reports it in libvirt_iohelper's words."""
    if args.command == "iohelper":
        return
    for dest, option in FD_OPTIONS:
        fd = getattr(args, dest, None)
        if fd is None:
            continue
        try:
            os.fstat(fd)
        except OSError as e:
            raise MigpipeError(f"{option} {fd}: {os.strerror(e.errno or errno.EBADF)}") from None


def end_as_cat() -> None:
    """Die of SIGPIPE, as cat does when its reader goes: no message, and a shell sees 141."""
    sys.stdout = None  # type: ignore[assignment] -- nothing left to flush at exit
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)


def os_error_text(e: OSError) -> str:
    """An OSError as `PATH: reason`, in the C library's words (not Python's added text)."""
    reason = os.strerror(e.errno) if e.errno else str(e)
    return f"{e.filename}: {reason}" if e.filename is not None else reason


def verbosity_options(parser: argparse.ArgumentParser, default: object) -> None:
    """-q and -v, taken before the command or after it: the latter's default is SUPPRESS, so
    that a -q given before the command is not reset by the command's own default."""
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=QUIET,
        default=default,
        help="no progress and no summary on stderr; warnings and errors only",
    )
    loud.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="store_const",
        const=VERBOSE,
        default=default,
        help="say on stderr what migpipe does at each step",
    )


class QuietStderr(io.TextIOBase):
    """stderr under -q: the lines that say `warning:` or `error:` pass, the rest (summaries,
    refused connections) is dropped. The summaries are printed by each command: this is the
    one place every line to stderr passes."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._line = ""

    def write(self, text: str) -> int:
        self._line += text
        *lines, self._line = self._line.split("\n")
        for line in lines:
            if "warning:" in line or "error:" in line:
                self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


class LogLine(logging.Formatter):
    """migpipe's log as its other lines: the command first, a warning said to be one."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command

    def format(self, record: logging.LogRecord) -> str:
        warning = "warning: " if record.levelno >= logging.WARNING else ""
        return f"migpipe {self.command}: {warning}{record.getMessage()}"


def set_verbosity(args: argparse.Namespace) -> None:
    """-q: no progress, stderr filtered; -v: migpipe's log (its `migpipe` logger) on stderr,
    whose warnings are there without it."""
    verbosity = getattr(args, "verbosity", None)
    if verbosity == QUIET:
        if hasattr(args, "progress"):
            args.progress = "none"
        sys.stderr = QuietStderr(sys.stderr)
    log = logging.getLogger("migpipe")
    for handler in list(log.handlers):  # one, whichever command ran before in this process
        if isinstance(handler.formatter, LogLine):
            log.removeHandler(handler)
    handler = logging.StreamHandler()  # sys.stderr as it is when a line is written
    handler.setFormatter(LogLine(args.command))
    log.addHandler(handler)
    log.setLevel(logging.INFO if verbosity == VERBOSE else logging.WARNING)
    if verbosity == VERBOSE:  # describe() is work every command would pay for nothing
        log.info("%s", describe(args))


def describe(args: argparse.Namespace) -> str:
    """What the command line asks for, the first line -v prints."""
    told = [f"migpipe {__version__}"]
    for dest, option in WHAT_IT_USES:
        value = getattr(args, dest, None)
        if value not in (None, False, "", []):
            told.append(f"{option} {value}" if value is not True else option)
    return ", ".join(told)


def main(argv: Sequence[str] | None = None) -> int:
    use_one_arena()
    guard_closed_stdio()
    args = build_parser().parse_args(argv)
    args.started = time.monotonic()
    termination = SigtermAsInterrupt()
    termination.install()
    stderr = sys.stderr
    try:
        set_verbosity(args)
        if getattr(args, "qmp", None) is not None:
            from migpipe.qemu import qmp

            qmp.GREETING_TIMEOUT = args.qmp_timeout
        check_fds(args)
        check_stats_path(args)
        return args.handler(args)
    except MigpipeError as e:
        return fail(args, str(e), e.status)
    except KeyboardInterrupt:
        close_progress_line()
        return EXIT_TERMINATED if termination.received else EXIT_INTERRUPTED
    except BrokenPipeError:
        if args.command in ENDS_AS_CAT:
            end_as_cat()
        return fail(args, "standard output closed by its reader (broken pipe)", EXIT_PEER_GONE)
    except OSError as e:
        return fail(args, os_error_text(e), EXIT_ERROR)
    finally:
        sys.stderr = stderr


def run() -> NoReturn:
    """The `migpipe` command (and `python -m migpipe`): main(), its standard streams flushed,
    then out without Python's finalization, which frees only what the kernel frees anyway: its
    collections walk every object the imports made (25 ms of a save once), and even with those
    frozen it is ~4 ms of CPU when an encode or decode ends, while the destination QEMU loads
    the guest's last pages: on the same cores, that is the guest's pause. A stream that cannot
    be flushed is left to Python's own exit, which reports it as it always did."""
    status = main()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None and not stream.closed:
                stream.flush()
    except (OSError, ValueError):
        sys.exit(status)
    os._exit(status)


def fail(args: argparse.Namespace, message: str, status: int) -> int:
    """One line on stderr, on a line of its own, and the status to exit with."""
    close_progress_line()
    print(f"migpipe {args.command}: error: {message}", file=sys.stderr)
    return status


def close_progress_line() -> None:
    """End a progress line left open (a failure or Ctrl-C mid-job), so what follows starts on a
    line of its own; progress is imported only by the commands that draw it."""
    progress = sys.modules.get("migpipe.tunnel.progress")
    if progress is not None:
        progress.close_line()
