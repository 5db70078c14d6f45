"""Command-line entry point: parses arguments and calls one function per command.

The commands live with their options, a module per group: stream (inspect, extract, generate),
tunnel (encode, decode, migrate, incoming), save (save, restore, iohelper), admin (keygen,
tls-init, serve, demo); options holds what several share. Every MigpipeError becomes one line
on stderr and its exit status (see migpipe.errors and migpipe(1)); usage errors exit 2.
"""

import argparse
import gc
import signal
import sys
import time
from collections.abc import Sequence

from migpipe import __version__
from migpipe.cli import admin, save, stream, tunnel
from migpipe.cli.arenas import use_one_arena
from migpipe.cli.command import Handler
from migpipe.cli.options import check_stats_path
from migpipe.errors import EXIT_ERROR, EXIT_PEER_GONE, MigpipeError

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM killed
GROUPS = (stream, tunnel, save, admin)  # in the order of the README's command table


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
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    for group in GROUPS:
        group.register(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    use_one_arena()
    args = build_parser().parse_args(argv)
    args.started = time.monotonic()
    termination = SigtermAsInterrupt()
    termination.install()
    try:
        check_stats_path(args)
        return args.handler(args)
    except MigpipeError as e:
        print(f"migpipe {args.command}: error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return EXIT_TERMINATED if termination.received else EXIT_INTERRUPTED
    except BrokenPipeError:
        print(f"migpipe {args.command}: error: output closed early (broken pipe)", file=sys.stderr)
        return EXIT_PEER_GONE
    except OSError as e:
        print(f"migpipe {args.command}: error: {e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        # The process exits next, and Python's last collections would walk every object the
        # imports made (trio's, the parser's tables) to free nothing: 25 ms of every save.
        gc.freeze()
