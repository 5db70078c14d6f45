"""The options several commands share, and what they turn into: the filter chain, the key,
the wire's end (a file, a connection, TLS), progress and --stats-json."""

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from migpipe.errors import (
    MigpipeError,
    UsageError,
    quoted,
)
from migpipe.io.files import open_input, open_output
from migpipe.stream.format import XBZRLE_CACHE_SIZE
from migpipe.units import UNITS, parse_size

if TYPE_CHECKING:
    from migpipe.io.channel import Channel
    from migpipe.io.transport import Acceptor, Dialer
    from migpipe.keys import Secrets
    from migpipe.tunnel.progress import Progress  # imported when used: start-up time


def size_argument(text: str) -> int:
    """parse_size for argparse, which reports ArgumentTypeError as a usage error, in one line."""
    try:
        return parse_size(text)
    except MigpipeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def size_text(size: int) -> str:
    """A size as a user would write it (64M), for a default that help shows and argparse parses
    with size_argument: the library's constant, not a copy of it."""
    for unit in "TGMK":
        if size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]}{unit}"
    return str(size)


def seconds(text: str) -> float:
    """A duration for argparse: a number, 0 or more (inf and nan are no durations)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{quoted(text)} is not a number of seconds")
    return value


def reporting_options(sub: argparse.ArgumentParser) -> None:
    """--stats-json and --progress."""
    sub.add_argument(
        "--stats-json", metavar="FILE", help="write the final figures here (-: stdout)"
    )
    # --progress=json is an option string of its own: a --progress that took an optional
    # value would eat the next argument (`restore --progress vm.mig`).
    sub.add_argument(
        "--progress",
        action="store_const",
        const="line",
        help="a progress line on stderr, redrawn in place (default: when stderr is a terminal)",
    )
    sub.add_argument(
        "--progress=json",
        dest="progress",
        action="store_const",
        const="json",
        help="progress as a JSON object per line on stderr, for scripts",
    )
    sub.add_argument(
        "--no-progress", dest="progress", action="store_const", const="none", help="no progress"
    )


def config_option(sub: argparse.ArgumentParser) -> None:
    """--config, once per command, whose settings fill in what the command line left out just
    before the command runs (migpipe.cli.config)."""
    from migpipe.cli import config

    try:
        sub.add_argument(
            "--config",
            metavar="FILE",
            help=f"defaults from FILE (${config.ENVIRONMENT}, else {config.SYSTEM_CONFIG})",
        )
    except argparse.ArgumentError:
        return  # added by another group of options
    config.COMMANDS.add(sub.prog.split()[-1])
    handler = sub.get_default("handler")

    def configured(args: argparse.Namespace) -> int:
        config.apply(args, sub, seconds)
        return handler(args)

    sub.set_defaults(handler=configured)


def wire_options(sub: argparse.ArgumentParser, wire: str | None = None) -> None:
    """The wire's options; `wire` ("input", "output") when the other side is QEMU's."""
    from migpipe.io.transport import ACCEPT_TIMEOUT, CONNECT_TIMEOUT

    if wire != "output":
        sub.add_argument(
            "--in",
            dest="input",
            default="-",
            metavar="FILE",
            help="read from FILE (default: stdin)",
        )
    if wire != "input":
        sub.add_argument(
            "--out",
            dest="output",
            default=None,
            metavar="FILE",
            help="write to FILE, complete or not at all (default: stdout)",
        )
        sub.add_argument("--force", action="store_true", help="replace an existing --out FILE")
    reporting_options(sub)
    config_option(sub)
    link = sub.add_mutually_exclusive_group()
    link.add_argument(
        "--connect",
        metavar="ADDR",
        help="carry the wire over a connection to HOST:PORT or unix:PATH",
    )
    link.add_argument(
        "--listen",
        metavar="ADDR",
        help="accept the wire's one connection on [HOST:]PORT or unix:PATH "
        "(PORT alone: every interface)",
    )
    sub.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="keep retrying --connect this long while nobody listens (%(default)g)",
    )
    sub.add_argument(
        "--accept-timeout",
        type=seconds,
        default=ACCEPT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up --listen when no peer came this long; 0: never ({ACCEPT_TIMEOUT:g})",
    )
    sub.add_argument(
        "--tls-creds",
        type=Path,
        metavar="DIR",
        help="TLS on --connect/--listen with the x509 files in DIR (see tls-init)",
    )
    sub.add_argument(
        "--tls-hostname",
        metavar="NAME",
        help="the name the server certificate must carry (default: the --connect host)",
    )
    sub.add_argument(
        "--tls-peer",
        action="append",
        default=[],
        metavar="NAME",
        help="the other end's certificate must carry NAME (CN, DNS or IP); repeatable",
    )
    sub.add_argument("--tls12", action="store_true", help="also accept TLS 1.2")


def idle_option(sub: argparse.ArgumentParser) -> None:
    """--idle-timeout: how long a peer on a socket may stay connected and silent (io.idle)."""
    from migpipe.io.idle import IDLE_TIMEOUT

    sub.add_argument(
        "--idle-timeout",
        type=seconds,
        default=IDLE_TIMEOUT,
        metavar="SECONDS",
        help="give up on a peer on a socket that sent (or took) nothing this long; "
        f"0: never ({IDLE_TIMEOUT:g})",
    )


def filter_options(sub: argparse.ArgumentParser) -> None:
    """The filter chain's options (encode, save, migrate), and where the key comes from."""
    sub.add_argument(
        "--filters",
        default="",
        metavar="CHAIN",
        help="comma-separated filters, e.g. xbzrle,zstd:3,encrypt or lz4",
    )
    sub.add_argument("--compress", metavar="CODEC", help="zstd[:LEVEL] or lz4[:LEVEL]")
    sub.add_argument("--xbzrle", action="store_true", help="send re-sent pages as deltas")
    sub.add_argument(
        "--xbzrle-cache",
        metavar="SIZE",
        help=f"xbzrle's page cache on each end (implies --xbzrle; default "
        f"{size_text(XBZRLE_CACHE_SIZE)})",
    )
    sub.add_argument(
        "--encrypt", action="store_true", help="encrypt and authenticate (AES-256-GCM); needs a key"
    )
    key_options(sub)


def reader_key_options(sub: argparse.ArgumentParser) -> None:
    """The key options of a command that hands what it reads to QEMU: a key given means the
    input must be sealed with it, unless the user says otherwise."""
    key_options(sub)
    sub.add_argument(
        "--allow-unencrypted",
        action="store_true",
        help="with a key: also accept input that is not encrypted (mixed fleets)",
    )


def key_options(sub: argparse.ArgumentParser) -> None:
    """Where the encrypt filter's key comes from; one of them, never the secret itself."""
    config_option(sub)
    keys = sub.add_mutually_exclusive_group()
    keys.add_argument("--key-file", metavar="FILE", help="key made by `migpipe keygen` (0600)")
    keys.add_argument("--key-fd", type=int, metavar="N", help="read the key file from fd N")
    keys.add_argument("--passphrase-file", metavar="FILE", help="passphrase: first line of FILE")
    keys.add_argument("--passphrase-fd", type=int, metavar="N", help="passphrase from fd N")
    keys.add_argument("--ask-passphrase", action="store_true", help="passphrase from the terminal")


def direct_option(sub: argparse.ArgumentParser) -> None:
    """--direct (O_DIRECT, or an error where the file system refuses it) and --direct=try."""

    def mode(text: str) -> str:
        if text != "try":
            raise argparse.ArgumentTypeError(
                f'--direct takes no value or "try", not {quoted(text)}'
            )
        return text

    sub.add_argument(
        "--direct",
        nargs="?",
        const=True,
        default=False,
        type=mode,
        help="bypass the page cache (O_DIRECT); =try: fall back to buffered I/O "
        "that drops the cache behind it",
    )


def filter_chain(args: argparse.Namespace) -> list:
    """--filters plus the convenience flags, as one chain (page filters first)."""
    from migpipe.chain import parse_chain

    items = [args.filters] if args.filters else []
    if args.xbzrle_cache is not None:
        items.insert(0, f"xbzrle:{args.xbzrle_cache}")
    elif args.xbzrle:
        items.insert(0, "xbzrle")
    if args.compress:
        items.append(args.compress)
    if args.encrypt:
        items.append("encrypt")
    origin = getattr(args, "filters_from", None)  # FILE:LINE of a chain the config file gave
    try:
        return parse_chain(",".join(items), secrets_of(args, confirm=True))
    except MigpipeError as e:
        if origin is not None:
            e.message = f"{e.message} (the filters of {origin})"
        raise


def secrets_of(args: argparse.Namespace, *, confirm: bool = False) -> "Secrets":
    """Where the key comes from (read only if a filter needs it; never from argv)."""
    from migpipe.keys import Secrets

    return Secrets(
        key_file=args.key_file,
        key_fd=args.key_fd,
        passphrase_file=args.passphrase_file,
        passphrase_fd=args.passphrase_fd,
        ask_passphrase=args.ask_passphrase,
        confirm=confirm,
        allow_unencrypted=getattr(args, "allow_unencrypted", False),
    )


def progress(args: argparse.Namespace, label: str) -> "Progress | None":
    """Progress on stderr: asked for, or a line by default when stderr is a terminal."""
    from migpipe.tunnel.progress import JsonProgress, Progress

    wanted = args.progress or ("line" if sys.stderr.isatty() else "none")
    return {"line": Progress, "json": JsonProgress}[wanted](label) if wanted != "none" else None


def check_stats_path(args: argparse.Namespace) -> None:
    """Refuse a --stats-json FILE that could not be written, before the job starts: the job's
    figures are written after it finished, when a failure could only mislabel a finished job
    (a migration reported failed whose guest runs on the destination)."""
    path = getattr(args, "stats_json", None)
    if not path:
        return
    if path == "-":
        if stdout_carries_data(args):
            raise UsageError(
                "--stats-json -: standard output carries the stream here; "
                "name a file (or /dev/stderr)"
            )
        return
    target = Path(path)
    if target.is_dir():
        why = "it is a directory"
    elif not target.parent.is_dir():
        why = f"no directory {target.parent}"
    elif not os.access(target if target.exists() else target.parent, os.W_OK):
        why = "permission denied"
    else:
        return
    raise UsageError(f"cannot write --stats-json {path}: {why}")


def stdout_carries_data(args: argparse.Namespace) -> bool:
    """Whether the command writes its stream (or, incoming, its answer to migrate) on
    standard output, where --stats-json - would corrupt it."""
    if args.command == "save":
        return args.file == "-"
    if args.command == "restore":
        return args.qmp is None and args.fd is None
    linked = bool(args.connect or args.listen)
    if args.command == "incoming":
        return args.input == "-" and not linked  # the answer goes back on stdout
    if args.command == "decode":
        return args.output in (None, "-")
    return args.output in (None, "-") and not linked and not getattr(args, "peer", None)


def report(args: argparse.Namespace, totals, **more: object) -> None:
    """--stats-json: the final figures, in QEMU's query-migrate words where they exist. The
    job has finished: failing to write them is a warning, never the job's failure."""
    if not args.stats_json:
        return
    figures = {**totals.figures(time.monotonic() - args.started), **more}
    text = json.dumps(figures, indent=2) + "\n"
    try:
        if args.stats_json == "-":
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            Path(args.stats_json).write_text(text)
    except OSError as e:
        print(
            f"migpipe {args.command}: warning: the job completed, but --stats-json "
            f"{args.stats_json} could not be written ({e.strerror})",
            file=sys.stderr,
        )


@contextlib.contextmanager
def wire_end(args: argparse.Namespace, role: str) -> Iterator["int | Channel"]:
    """The wire side: a connection (TLS when asked) when asked for one, else --in/--out.

    A plain connection is yielded as its descriptor, as a file is (migrate answers it as an
    FdLink); after the caller is done, the connection's writing direction ends through its
    Sink, TLS or not, so that the peer's read sees the end of the wire."""
    with wire_ends(args, role, spread=False) as (end, _):
        yield end


@contextlib.contextmanager
def wire_ends(
    args: argparse.Namespace, role: str, spread: bool = True
) -> Iterator[tuple["int | Channel", "Dialer | Acceptor | None"]]:
    """wire_end's, and where the wire's further connections come from when it is spread over
    several (encode --connections): opened to --connect's address, or accepted on --listen's
    socket, which then stays open (`spread`); None for a file or a pipe."""
    from migpipe.io import transport
    from migpipe.io.channel import FdChannel

    given = args.input != "-" if role == "input" else args.output is not None
    if (args.connect or args.listen) and given:
        option = "--in" if role == "input" else "--out"
        raise UsageError(f"{option} and --connect/--listen both name the wire", None)
    wrap, gate = tls_ends(args)  # bad credentials fail before the network is touched
    if not (args.connect or args.listen):
        if role == "input":
            file = open_input(args.input)
        else:
            file = open_output(args.output, force=args.force)
        with file as f:
            watch_idle(args, f.fileno(), role)  # stdin may be a socket (inetd, systemd)
            yield f.fileno(), None
        return
    watch = functools.partial(watch_idle, args, role=role)
    with contextlib.ExitStack() as stack:
        further: Dialer | Acceptor | None = None
        if args.connect:
            sock = stack.enter_context(transport.connect(args.connect, args.connect_timeout))
            if spread:
                further = transport.Dialer(args.connect, args.connect_timeout, wrap)
        else:
            log = functools.partial(print, f"migpipe {args.command}:", file=sys.stderr, flush=True)
            timeout = args.accept_timeout
            if spread:  # the first connection, told from the others (which may overtake it)
                from migpipe import wire

                server = stack.enter_context(transport.listening(args.listen))
                further = transport.Acceptor(server, args.listen, gate, wrap, timeout, log)
                stack.callback(further.close)
                starts = (wire.FIRST_SIZE, wire.starts_wire) if role == "input" else None
                sock = stack.enter_context(further.first(starts))
            else:
                if gate is None and role == "input":  # a stray shows in its first bytes
                    from migpipe.wire import MAGIC

                    gate = transport.first_bytes(MAGIC)
                sock = stack.enter_context(
                    transport.listen(args.listen, gate, timeout=timeout, log=log)
                )
        if isinstance(further, transport.Dialer):
            stack.callback(further.close)
        fd = sock.fileno()  # TLS's wrap takes the socket over, on the same descriptor
        if wrap is None:
            connection: Channel = FdChannel(sock.fileno())
            end: int | Channel = sock.fileno()
        else:
            connection = end = stack.enter_context(wrap(sock))
        watch(fd)  # after the handshake, which has its own deadline
        yield end, further
        connection.finish()  # close_notify or shutdown(SHUT_WR), before either is closed


def watch_idle(args: argparse.Namespace, fd: int, role: str) -> None:
    """--idle-timeout on the wire's socket, for what this end waits on: the reader's reads,
    the writer's writes (never its reads of answers, which may rightly take long)."""
    from migpipe.io import idle

    reading = role == "input"
    idle.watch(fd, getattr(args, "idle_timeout", 0), reading=reading, writing=not reading)


def tls_ends(args: argparse.Namespace) -> tuple[Callable | None, Callable | None]:
    """What turns the connection into a TLS channel, and the gate a listener lets a TLS peer in
    by (its handshake and --tls-peer check); (None, None) without --tls-creds."""
    if args.tls_creds is None:
        if args.tls_hostname or args.tls12 or args.tls_peer:
            raise UsageError("--tls-hostname, --tls-peer and --tls12 need --tls-creds")
        return None, None
    if not (args.connect or args.listen):
        raise UsageError("--tls-creds needs --connect or --listen")
    if args.listen and args.tls_hostname:  # the listener checks the client's certificate only
        raise UsageError(
            "--tls-hostname names the server to check: it goes with --connect, not --listen"
        )
    from migpipe.io import tls

    if args.connect:
        context = tls.client_context(args.tls_creds, tls12=args.tls12, peers=args.tls_peer)
        host = tls.server_name(args.connect, args.tls_hostname)
        return (lambda sock: tls.wrap_client(sock, context, host)), None
    context = tls.server_context(args.tls_creds, tls12=args.tls12, peers=args.tls_peer)
    return tls.TlsChannel, lambda sock: tls.admit(sock, context)  # listen() shook hands


@contextlib.contextmanager
def input_fd(args: argparse.Namespace) -> Iterator[int]:
    """--fd N (handed over by a daemon or QEMU's exec:), or standard input."""
    if args.fd is not None:
        yield args.fd
    else:
        with open_input("-") as f:
            yield f.fileno()


@contextlib.contextmanager
def output_fd(args: argparse.Namespace) -> Iterator[int]:
    """Where restore writes the stream: --fd, a connection to --qemu's QEMU, or stdout."""
    if args.fd is not None:
        yield args.fd
    elif getattr(args, "qemu", None):
        from migpipe.io import transport

        with transport.connect(args.qemu, transport.CONNECT_TIMEOUT) as sock:
            yield sock.fileno()
    else:
        with open_output(None) as f:
            yield f.fileno()
