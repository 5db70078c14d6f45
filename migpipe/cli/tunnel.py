"""encode, decode, migrate and incoming: a stream over migpipe's wire, and QEMU driven on both
ends of it."""

import argparse
import contextlib
import functools
import os
import stat
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from migpipe.cli.command import Command
from migpipe.cli.options import (
    filter_chain,
    filter_options,
    idle_option,
    progress,
    reader_key_options,
    report,
    secrets_of,
    wire_end,
    wire_ends,
    wire_options,
)
from migpipe.errors import (
    UsageError,
)
from migpipe.io.channel import FdChannel, stream_sink
from migpipe.io.files import open_input, open_output
from migpipe.running import run_trio

if TYPE_CHECKING:
    from migpipe.io.channel import Channel

QMP_SOCKET = {"required": True, "metavar": "SOCKET", "help": "QEMU's QMP UNIX socket"}


def register(command: Command) -> None:
    encode = command(
        "encode", cmd_encode, "Turn a QEMU migration stream into migpipe's wire format, filtered."
    )
    wire_options(encode)
    idle_option(encode)
    qemu_option(encode, "listen here for the source QEMU (migrate to unix:PATH or tcp:HOST:PORT)")
    encode.add_argument(
        "--connections",
        type=int,
        default=1,
        metavar="N",
        help="with --qemu: spread QEMU's connections over N connections of the wire, "
        "--connect or --listen (the main stream on the first, postcopy-preempt's or each "
        "multifd channel's on one of the others); decode follows",
    )
    filter_options(encode)

    decode = command(
        "decode", cmd_decode, "Turn migpipe's wire format back into the QEMU stream, byte for byte."
    )
    wire_options(decode)
    idle_option(decode)
    qemu_option(decode, "connect to the destination QEMU there (its -incoming unix:PATH or tcp:)")
    reader_key_options(decode)

    migrate = command(
        "migrate", cmd_migrate, "Migrate a running QEMU, driven over QMP, through encode."
    )
    migrate.add_argument("--qmp", **QMP_SOCKET)
    wire_options(migrate, "output")
    filter_options(migrate)
    migrate.add_argument(
        "--no-confirmation",
        action="store_true",
        help="succeed without the destination's answer (the peer is not migpipe incoming)",
    )
    migrate.add_argument(
        "--postcopy",
        action="store_true",
        help="switch to postcopy when precopy does not converge (incoming needs --postcopy "
        "too; the wire must carry both ways: --connect, --listen or COMMAND)",
    )
    migrate.add_argument(
        "--postcopy-after",
        type=int,
        metavar="N",
        help="with --postcopy: switch once N passes are done (default: see migpipe(1))",
    )
    multifd_option(migrate)
    migrate.add_argument(
        "--connections",
        type=int,
        metavar="N",
        help="with --postcopy or --multifd over --connect or --listen: spread the wire over N "
        "connections (default: 2 with --postcopy, one per multifd channel and one more with "
        "--multifd; see encode --connections)",
    )
    recover_option(migrate, "open the link again and resume QEMU's migration")
    migrate.add_argument(
        "--resume",
        action="store_true",
        help="resume QEMU's postcopy migration that a broken wire left paused, when the "
        "migrate that ran it is gone (incoming needs --postcopy)",
    )
    migrate.add_argument(
        "peer",
        nargs="*",
        metavar="-- COMMAND",
        help="send the wire to COMMAND's stdin (e.g. ssh dst migpipe incoming --qmp SOCKET)",
    )

    incoming = command(
        "incoming", cmd_incoming, "Load a migration through decode into QEMU (-incoming defer)."
    )
    incoming.add_argument("--qmp", **QMP_SOCKET)
    wire_options(incoming, "input")
    reader_key_options(incoming)
    incoming.add_argument(
        "--postcopy",
        action="store_true",
        help="let QEMU take postcopy (migrate --postcopy): its return path goes back on the "
        "connection, or on stdout when the wire is stdin",
    )
    multifd_option(incoming)
    recover_option(incoming, "take a new wire (--listen, --connect) for the source to resume on")
    incoming.add_argument(
        "--resume",
        action="store_true",
        help="only resume QEMU's postcopy migration that a broken wire left paused (migrate "
        "--resume); without it, --postcopy resumes one too",
    )


MULTIFD_MAX = 255  # QEMU's own bound on multifd-channels
RECOVER_TIMEOUT = 60.0  # seconds from a break in postcopy to resume within


def recover_option(sub: argparse.ArgumentParser, what: str) -> None:
    sub.add_argument(
        "--recover-timeout",
        type=float,
        default=RECOVER_TIMEOUT,
        metavar="SECONDS",
        help=f"with --postcopy, when the wire breaks after the switch: {what}, for up to "
        f"this long (default {RECOVER_TIMEOUT:g}; 0: never)",
    )


def multifd_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--multifd",
        type=int,
        metavar="N",
        help="QEMU's multifd with N channels, each a lane of the wire (both sides the same N; "
        "the wire must carry both ways)",
    )


def check_two_way(args: argparse.Namespace, file: str | None) -> None:
    """--postcopy and --multifd carry QEMU's return path back on the wire (a connection, or a
    command's stdin and stdout), which a file (`file`, not None) cannot. --resume is taken as
    --postcopy from here on: a resumed migration is a postcopy one."""
    if args.recover_timeout < 0:
        raise UsageError("--recover-timeout takes seconds, 0 or more")
    if args.multifd is not None and not 1 <= args.multifd <= MULTIFD_MAX:
        raise UsageError(f"--multifd takes a number of channels from 1 to {MULTIFD_MAX}")
    if args.resume:
        args.postcopy = True
    option = "--postcopy" if args.postcopy else "--multifd"
    if file is not None and (args.postcopy or args.multifd is not None):
        raise UsageError(
            f"{option} needs a wire that carries both ways, not {file} "
            "(QEMU's return path travels back on it): --connect, --listen or COMMAND"
        )


def qemu_option(sub: argparse.ArgumentParser, what: str) -> None:
    sub.add_argument(
        "--qemu",
        metavar="ADDR",
        help=f"{what}: every connection QEMU opens, both ways (return path, postcopy, multifd)",
    )


def check_connections(args: argparse.Namespace) -> None:
    """--connections spreads the two-way tunnel's lanes over connections encode opens or
    accepts itself."""
    from migpipe.wire import MAX_CONNECTIONS

    if not 1 <= args.connections <= MAX_CONNECTIONS:
        raise UsageError(f"--connections takes a number from 1 to {MAX_CONNECTIONS}")
    if args.connections > 1 and not (args.qemu and (args.connect or args.listen)):
        raise UsageError("--connections needs --qemu, and --connect or --listen")


def check_qemu_option(other: str, given: bool) -> None:
    """--qemu names QEMU's end, which `other` (--in, --out) would name too."""
    if given:
        raise UsageError(f"{other} and --qemu both name QEMU's end", None)


def cmd_encode(args: argparse.Namespace) -> int:
    from migpipe.tunnel.pipeline import encode

    chain = filter_chain(args)
    shown = progress(args, "encode")
    check_connections(args)
    if args.qemu:
        check_qemu_option("--in", args.input != "-")
        from migpipe.tunnel.twoway import encode_two_way

        with wire_ends(args, "output", spread=args.connections > 1) as (wire, further):
            run = functools.partial(encode_two_way, connections=args.connections, further=further)
            totals = run_trio(run, args.qemu, args.accept_timeout, wire, chain, shown)
        report(args, totals)
        return 0
    with open_input(args.input) as source, wire_end(args, "output") as wire:
        if shown is not None:
            shown.stream_size = file_size(source.fileno())
        if isinstance(wire, int):  # named in a broken pipe's message
            wire = FdChannel(wire, args.connect or args.listen or output_name(args.output))
        totals = run_trio(encode, source.fileno(), wire, chain, shown)
    report(args, totals)
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from migpipe.tunnel.pipeline import decode

    if args.qemu:
        check_qemu_option("--out", args.output is not None)
        from migpipe.tunnel.twoway import decode_two_way

        with wire_ends(args, "input") as (wire, further):
            shown = progress(args, "decode")
            run = functools.partial(decode_two_way, further=further)
            totals = run_trio(run, wire, args.qemu, args.connect_timeout, shown, secrets_of(args))
        report(args, totals)
        return 0

    with (
        open_output(args.output, force=args.force) as out,
        # a wire that fails to open fails QEMU's load too
        stream_sink(FdChannel(out.fileno(), output_name(args.output))) as sink,
        wire_end(args, "input") as wire,
    ):
        shown = progress(args, "decode")
        if shown is not None and isinstance(wire, int):
            shown.size = file_size(wire)
        totals = run_trio(decode, wire, sink, shown, secrets_of(args))
    report(args, totals)
    return 0


def output_name(path: str | None) -> str:
    """What messages call the output open_output(path) opened."""
    return "standard output" if path in (None, "-") else path


def file_size(fd: int) -> int | None:
    """What `fd` has left to read when it is a regular file (`--in FILE`, `< FILE`), for
    progress's share done and ETA; None for a pipe or a connection, whose end is unknown."""
    st = os.fstat(fd)
    return st.st_size - os.lseek(fd, 0, os.SEEK_CUR) if stat.S_ISREG(st.st_mode) else None


def cmd_migrate(args: argparse.Namespace) -> int:
    from migpipe.qemu.migration import PostcopySwitch, migrate, summary

    if args.peer and (args.connect or args.listen or args.output is not None):
        raise UsageError("COMMAND and --out/--connect/--listen both name the wire", None)
    if args.postcopy_after is not None and (not args.postcopy or args.postcopy_after < 1):
        raise UsageError("--postcopy-after takes a number of passes from 1, with --postcopy")
    one_way = not (args.peer or args.connect or args.listen)
    check_two_way(args, output_name(args.output) if one_way else None)
    switch = PostcopySwitch(args.postcopy_after, args.resume) if args.postcopy else None
    chain = filter_chain(args)
    connections = migrate_connections(args)
    link = functools.partial(peer_link, args, connections > 1)
    confirmed = not args.no_confirmation
    outcome = run_trio(
        migrate,
        args.qmp,
        link,
        chain,
        progress(args, "migrate"),
        confirmed,
        switch,
        args.multifd,
        args.recover_timeout,
        connections,
    )
    answer, pause = outcome.confirmation, outcome.pause
    destination = {"status": answer.status, "error": answer.error, "sealed": answer.sealed}
    real_pause = None if pause is None else pause.figures(outcome.qemu.get("downtime"))
    report(args, outcome.totals, qemu=outcome.qemu, destination=destination, real_pause=real_pause)
    print(summary("migrate", outcome), file=sys.stderr)
    return 0


def migrate_connections(args: argparse.Namespace) -> int:
    """How many connections migrate spreads the two-way tunnel's wire over: --connections, or
    as many as give postcopy-preempt's pages, or each multifd channel, one of their own, where
    migrate opens or accepts its connections (--connect, --listen); one through COMMAND."""
    from migpipe.wire import MAX_CONNECTIONS

    two_way = args.postcopy or args.multifd is not None
    connecting = bool(args.connect or args.listen)
    if args.connections is not None:
        if not 1 <= args.connections <= MAX_CONNECTIONS:
            raise UsageError(f"--connections takes a number from 1 to {MAX_CONNECTIONS}")
        if args.connections > 1 and not (two_way and connecting):
            raise UsageError(
                "--connections needs --postcopy or --multifd, and --connect or --listen"
            )
        return args.connections
    if not connecting:
        return 1
    if args.multifd is not None:
        return min(MAX_CONNECTIONS, 1 + args.multifd)
    return 2 if args.postcopy else 1


@contextlib.contextmanager
def peer_link(args: argparse.Namespace, spread: bool) -> Iterator:
    """migrate's way to the destination: COMMAND's stdin, or wire_end's connection or file,
    with the wire's further connections when `spread`."""
    from migpipe.qemu import migration as drive

    if args.peer:
        with drive.command_link(args.peer) as link:
            yield link
    else:
        with wire_ends(args, "output", spread=spread) as (wire, further):
            if isinstance(wire, int):
                yield drive.FdLink(wire, further=further)
            else:
                yield drive.ChannelLink(wire, further=further)


def cmd_incoming(args: argparse.Namespace) -> int:
    from migpipe.qemu.migration import incoming, summary

    @contextlib.contextmanager
    def wire_and_answer() -> Iterator[tuple["int | Channel", "int | Channel | None", object]]:
        """The wire, where the source hears how the load went (back on the connection, or on
        stdout when the wire is stdin, under `migrate -- ssh dst migpipe incoming`), and
        where the wire's further connections come from (the two-way tunnel's)."""
        spread = args.postcopy or args.multifd is not None
        with wire_ends(args, "input", spread=spread) as (wire, further):
            if args.connect or args.listen:
                yield wire, wire, further
            else:
                yield wire, sys.stdout.fileno() if args.input == "-" else None, None

    check_two_way(args, None if args.input == "-" or args.connect or args.listen else args.input)
    outcome = run_trio(
        incoming,
        args.qmp,
        wire_and_answer,
        secrets_of(args),
        progress(args, "incoming"),
        args.postcopy,
        args.multifd,
        bool(args.connect or args.listen),
        args.recover_timeout,
        args.resume,
    )
    landing = outcome.landing
    real_pause = None if landing is None else landing.figures()
    report(
        args, outcome.totals, qemu=outcome.qemu, runstate=outcome.runstate, real_pause=real_pause
    )
    print(summary("incoming", outcome), file=sys.stderr)
    return 0
