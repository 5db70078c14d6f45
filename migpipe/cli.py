"""Command-line entry point: parses arguments and calls one function per command.

Every MigpipeError becomes one line on stderr and its exit status (see migpipe.errors and
migpipe(1)); usage errors exit 2.
"""

import argparse
import contextlib
import functools
import gc
import json
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from migpipe import __version__
from migpipe.arenas import use_one_arena
from migpipe.channel import Channel, stream_sink
from migpipe.errors import EXIT_ERROR, EXIT_KEY, EXIT_PEER_GONE, EXIT_USAGE, MigpipeError, leaves
from migpipe.files import open_input, open_output, read_chunks, write_stream
from migpipe.stream.parser import iter_records
from migpipe.units import parse_size

if TYPE_CHECKING:
    from migpipe.progress import Progress  # imported when used: start-up time

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM killed


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


def size_argument(text: str) -> int:
    """parse_size for argparse, which reports ArgumentTypeError as a usage error, in one line."""
    try:
        return parse_size(text)
    except MigpipeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_mix(text: str) -> dict[str, float]:
    """'zero=0.6,text=0.2,random=0.2' -> weights by page kind."""
    try:
        pairs = (item.split("=", 1) for item in text.split(","))
        return {kind.strip(): float(weight) for kind, weight in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a page mix: {text!r}") from None


def cmd_inspect(args: argparse.Namespace) -> int:
    from migpipe.inspect import StreamStats

    stats = StreamStats(args.page_size)
    error, about = None, {}
    with contextlib.ExitStack() as stack:
        if args.stream == "-":
            chunks = read_chunks(stack.enter_context(open_input("-")))
        else:
            from migpipe.savefile import saved_stream

            chunks = saved_stream(Path(args.stream), secrets(args), about)
        try:
            for record in iter_records(chunks, page_size=args.page_size):
                stats.add(record)
        except MigpipeError as e:
            if e.status == EXIT_KEY:  # nothing was read: no report, only why
                raise
            error = e
    if args.json:
        report = stats.as_dict()
        report["file"] = about or None
        report["error"] = (
            None if error is None else {"message": error.message, "offset": error.offset}
        )
        print(json.dumps(report, indent=2))
    else:
        if about.get("layout") not in (None, "qemu"):
            print(describe_file(about))
        print(stats.render())
    if error is not None:
        raise error
    return 0


def describe_file(about: dict) -> str:
    chain = ", ".join(name for name, _ in about.get("filters", [])) or "no filters"
    if "filters" not in about:
        chain = "unreadable"
    if "libvirt_format" in about:
        after = "running" if about["was_running"] else "paused"
        chain = f"{about['libvirt_format']} body, guest {after} after virsh restore"
    kind = "libvirt save image" if about["layout"] == "libvirt" else f"{about['layout']} layout"
    line = (f"file: {kind}, {chain}; {about['file_bytes']:,} bytes "
            f"({about['disk_bytes']:,} on disk)")  # fmt: skip
    if "slots" in about:
        line += (f"; {about['slots_written']:,} of {about['slots']:,} extent slots written, "
                 f"{about['writes']:,} writes")  # fmt: skip
    elif "frames" in about:
        line += f"; {about['frames']:,} frames"
    return line + "\n"


def cmd_extract(args: argparse.Namespace) -> int:
    from migpipe.extracted import extract

    with open_input(args.stream) as f:
        manifest = extract(
            iter_records(read_chunks(f), page_size=args.page_size), args.directory, args.page_size
        )
    for block in manifest["blocks"]:
        print(
            f"{block['file']:<40} {block['used_length']:>14,} bytes "
            f"{block['pages_received']:>10,} pages received"
        )
    print(f"{'device-state.bin':<40} {manifest['device_state_bytes']:>14,} bytes")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.source is not None:
        from migpipe.extracted import rebuild

        records = rebuild(args.source)
    else:
        from migpipe.synthetic import GuestModel, SyntheticGuest

        model = GuestModel(
            ram_size=args.size,
            mix=args.mix or GuestModel().mix,
            iterations=args.iterations,
            dirty_share=args.dirty,
            rewrite_share=args.rewrite,
            seed=args.seed,
        )
        records = SyntheticGuest(model).records()
    with open_output(args.output, force=args.force) as out:
        write_stream(records, out)
    return 0


def filter_chain(args: argparse.Namespace) -> list:
    """--filters plus the convenience flags, as one chain (page filters first)."""
    from migpipe.filter import parse_chain

    items = [args.filters] if args.filters else []
    if args.xbzrle_cache is not None:
        items.insert(0, f"xbzrle:{args.xbzrle_cache}")
    elif args.xbzrle:
        items.insert(0, "xbzrle")
    if args.compress:
        items.append(args.compress)
    if args.encrypt:
        items.append("encrypt")
    return parse_chain(",".join(items), secrets(args, confirm=True))


def secrets(args: argparse.Namespace, *, confirm: bool = False):
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


def run_trio(function, *args) -> object:
    """trio.run, with an exception group from the nursery reduced to its first real error."""
    import trio

    try:
        return trio.run(function, *args, strict_exception_groups=True)
    except BaseExceptionGroup as group:
        errors = list(leaves(group))
        for leaf in errors:
            if isinstance(leaf, MigpipeError | KeyboardInterrupt):
                raise leaf from None
        raise errors[0] from None


@contextlib.contextmanager
def wire_end(args: argparse.Namespace, role: str) -> Iterator["int | Channel"]:
    """The wire side: a connection (TLS when asked) when asked for one, else --in/--out."""
    from migpipe import transport

    given = args.input != "-" if role == "input" else args.output is not None
    if (args.connect or args.listen) and given:
        option = "--in" if role == "input" else "--out"
        raise MigpipeError(f"{option} and --connect/--listen both name the wire", None, EXIT_USAGE)
    wrap, gate = tls_ends(args)  # bad credentials fail before the network is touched
    if args.connect or args.listen:
        if args.connect:
            link = transport.connect(args.connect, args.connect_timeout)
        else:
            if gate is None and role == "input":  # a stray connection shows in its first bytes
                from migpipe.wire import MAGIC

                gate = transport.first_bytes(MAGIC)
            log = functools.partial(print, f"migpipe {args.command}:", file=sys.stderr, flush=True)
            link = transport.listen(args.listen, gate, timeout=args.accept_timeout, log=log)
        with link as sock:
            if wrap is not None:
                with wrap(sock) as channel:
                    yield channel
                    channel.finish()  # close_notify, then the peer's read sees the end
                return
            yield sock.fileno()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)  # the peer's read sees the end of the wire
    elif role == "input":
        with open_input(args.input) as f:
            yield f.fileno()
    else:
        with open_output(args.output, force=args.force) as f:
            yield f.fileno()


def tls_ends(args: argparse.Namespace) -> tuple[Callable | None, Callable | None]:
    """What turns the connection into a TLS channel, and the gate a listener lets a TLS peer in
    by (its handshake and --tls-peer check); (None, None) without --tls-creds."""
    if args.tls_creds is None:
        if args.tls_hostname or args.tls12 or args.tls_peer:
            raise MigpipeError("--tls-hostname, --tls-peer and --tls12 need --tls-creds",
                               status=EXIT_USAGE)  # fmt: skip
        return None, None
    if not (args.connect or args.listen):
        raise MigpipeError("--tls-creds needs --connect or --listen", status=EXIT_USAGE)
    if args.listen and args.tls_hostname:  # the listener checks the client's certificate only
        raise MigpipeError("--tls-hostname names the server to check: it goes with --connect, "
                           "not --listen", status=EXIT_USAGE)  # fmt: skip
    from migpipe import tls

    if args.connect:
        context = tls.client_context(args.tls_creds, tls12=args.tls12, peers=args.tls_peer)
        host = tls.server_name(args.connect, args.tls_hostname)
        return (lambda sock: tls.wrap_client(sock, context, host)), None
    context = tls.server_context(args.tls_creds, tls12=args.tls12, peers=args.tls_peer)
    return tls.TlsChannel, lambda sock: tls.admit(sock, context)  # listen() shook hands


def cmd_encode(args: argparse.Namespace) -> int:
    from migpipe.pipeline import encode

    chain = filter_chain(args)
    with open_input(args.input) as source, wire_end(args, "output") as wire:
        totals = run_trio(encode, source.fileno(), wire, chain, progress(args, "encode"))
    report(args, totals)
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from migpipe.pipeline import decode

    with (
        open_output(args.output, force=args.force) as out,
        stream_sink(out.fileno()) as sink,  # a wire that fails to open fails QEMU's load too
        wire_end(args, "input") as wire,
    ):
        totals = run_trio(decode, wire, sink, progress(args, "decode"), secrets(args))
    report(args, totals)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from migpipe.drive import migrate, summary

    if args.peer and (args.connect or args.listen or args.output is not None):
        raise MigpipeError("COMMAND and --out/--connect/--listen both name the wire", None,
                           EXIT_USAGE)  # fmt: skip
    chain = filter_chain(args)
    link = functools.partial(peer_link, args)
    outcome = run_trio(migrate, args.qmp, link, chain, progress(args, "migrate"),
                       not args.no_confirmation)  # fmt: skip
    answer = outcome.confirmation
    destination = {"status": answer.status, "error": answer.error, "sealed": answer.sealed}
    report(args, outcome.totals, qemu=outcome.qemu, destination=destination)
    print(summary("migrate", outcome), file=sys.stderr)
    return 0


@contextlib.contextmanager
def peer_link(args: argparse.Namespace) -> Iterator:
    """migrate's way to the destination: COMMAND's stdin, or wire_end's connection or file."""
    from migpipe import drive

    if args.peer:
        with drive.command_link(args.peer) as link:
            yield link
    else:
        with wire_end(args, "output") as wire:
            yield drive.FdLink(wire) if isinstance(wire, int) else drive.ChannelLink(wire)


def cmd_incoming(args: argparse.Namespace) -> int:
    from migpipe.drive import incoming, summary

    @contextlib.contextmanager
    def wire_and_answer() -> Iterator[tuple["int | Channel", "int | Channel | None"]]:
        """The wire, and where the source hears how the load went: back on the connection,
        or on stdout when the wire is stdin (under `migrate -- ssh dst migpipe incoming`)."""
        with wire_end(args, "input") as wire:
            if args.connect or args.listen:
                yield wire, wire
            else:
                yield wire, sys.stdout.fileno() if args.input == "-" else None

    outcome = run_trio(incoming, args.qmp, wire_and_answer, secrets(args),
                       progress(args, "incoming"))  # fmt: skip
    report(args, outcome.totals, qemu=outcome.qemu, runstate=outcome.runstate)
    print(summary("incoming", outcome), file=sys.stderr)
    return 0


def progress(args: argparse.Namespace, label: str):
    """A progress line on stderr: asked for, or by default when stderr is a terminal."""
    from migpipe.progress import Progress

    wanted = sys.stderr.isatty() if args.progress is None else args.progress
    return Progress(label) if wanted else None


def report(args: argparse.Namespace, totals, **more: object) -> None:
    """--stats-json: the final figures, in QEMU's query-migrate words where they exist."""
    if not args.stats_json:
        return
    figures = {**totals.figures(time.monotonic() - args.started), **more}
    Path(args.stats_json).write_text(json.dumps(figures, indent=2) + "\n")


def cmd_keygen(args: argparse.Namespace) -> int:
    from migpipe.keys import keygen

    keygen(args.file)
    print(f"wrote {args.file} (mode 0600); copy it to the other end the way you copy ssh keys")
    return 0


def cmd_tls_init(args: argparse.Namespace) -> int:
    from migpipe.tlsinit import instructions, tls_init

    names = [name.strip() for name in args.server_name.split(",")]
    written = tls_init(args.directory, args.ca, names, args.client_name, args.days,
                       force=args.force, ca_directory=args.ca_dir)  # fmt: skip
    print(instructions(written))
    return 0


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
        help="xbzrle's page cache on each end (implies --xbzrle; default 64M)",
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
    keys = sub.add_mutually_exclusive_group()
    keys.add_argument("--key-file", metavar="FILE", help="key made by `migpipe keygen` (0600)")
    keys.add_argument("--key-fd", type=int, metavar="N", help="read the key file from fd N")
    keys.add_argument("--passphrase-file", metavar="FILE", help="passphrase: first line of FILE")
    keys.add_argument("--passphrase-fd", type=int, metavar="N", help="passphrase from fd N")
    keys.add_argument("--ask-passphrase", action="store_true", help="passphrase from the terminal")


def cmd_save(args: argparse.Namespace) -> int:
    from migpipe.savefile import save

    if args.qmp is None and (args.live or args.resume):
        raise MigpipeError("--live and --resume drive QEMU: they need --qmp", status=EXIT_USAGE)
    chain = filter_chain(args)
    libvirt = libvirt_target(args, chain)
    store = functools.partial(save, path=Path(args.file), chain=chain, layout=args.layout,
                              force=args.force, progress=progress(args, "save"),
                              cache=args.cache, libvirt=libvirt, direct=args.direct)  # fmt: skip
    if args.qmp is not None:
        from migpipe import drive

        outcome = run_trio(drive.save, args.qmp, store, args.live, args.resume)
        totals = outcome.totals
        report(args, totals, qemu=outcome.qemu, runstate=outcome.runstate)
        print(drive.summary("save", outcome), file=sys.stderr)
    else:
        with input_fd(args) as source:
            totals = run_trio(store, source)
        report(args, totals)
    if args.summary:
        print_save_summary(Path(args.file), totals)
    return 0


def direct_option(sub: argparse.ArgumentParser) -> None:
    """--direct (O_DIRECT, or an error where the file system refuses it) and --direct=try."""

    def mode(text: str) -> str:
        if text != "try":
            raise argparse.ArgumentTypeError(f"--direct takes no value or 'try', not {text!r}")
        return text

    sub.add_argument("--direct", nargs="?", const=True, default=False, type=mode,
                     help="bypass the page cache (O_DIRECT); =try: fall back to buffered I/O "
                     "that drops the cache behind it")  # fmt: skip


def libvirt_target(args: argparse.Namespace, chain: list):
    """--libvirt-xml: a save image `virsh restore` takes, whose body libvirt must understand."""
    from migpipe.savefile import LibvirtTarget

    if args.libvirt_xml is None:
        if args.image_format is not None:
            raise MigpipeError("--image-format needs --libvirt-xml", status=EXIT_USAGE)
        return None
    if chain or args.layout != "stream":
        message = ("a libvirt save image holds QEMU's stream, compressed by --image-format: "
                   "it takes no migpipe filters and no --layout")  # fmt: skip
        raise MigpipeError(message, status=EXIT_USAGE)
    try:
        xml = Path(args.libvirt_xml).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MigpipeError(f"cannot read the domain XML {args.libvirt_xml}: {e}") from None
    return LibvirtTarget(xml, args.image_format or "raw", not args.paused)


def print_save_summary(path: Path, totals) -> None:
    size = path.stat().st_size
    used = path.stat().st_blocks * 512
    fixed = totals.filter_counters.get("fixed")
    lines = [f"saved {totals.qemu_bytes:,} stream bytes to {path}: {size:,} bytes "
             f"({used:,} on disk)"]  # fmt: skip
    if fixed:
        lines.append(
            f"pages received {fixed['pages_received']:,}, stored {fixed['pages_stored']:,}, "
            f"overwritten in place {fixed['pages_overwritten']:,}; extent writes "
            f"{fixed['extent_writes']:,} (rewrites {fixed['extent_rewrites']:,}, read back "
            f"{fixed['extent_reloads']:,})"
        )
    print("\n".join(lines), file=sys.stderr)


def cmd_restore(args: argparse.Namespace) -> int:
    from migpipe.savefile import restore

    shown = progress(args, "restore")
    if args.qmp is not None:
        from migpipe import drive

        sized(shown, args.file)
        outcome = run_trio(drive.restore, args.qmp, Path(args.file), secrets(args), shown,
                           args.direct)  # fmt: skip
        report(args, outcome.totals, qemu=outcome.qemu, runstate=outcome.runstate)
        print(drive.summary("restore", outcome), file=sys.stderr)
        return 0
    with output_fd(args) as fd, stream_sink(fd) as sink:  # a missing file fails QEMU's load too
        sized(shown, args.file)
        totals = run_trio(restore, Path(args.file), sink, secrets(args), shown, args.direct)
    report(args, totals)
    return 0


def sized(shown: "Progress | None", path: str) -> None:
    """Give restore's progress the file's size: its share read so far makes an ETA."""
    if shown is not None:
        shown.size = Path(path).stat().st_size


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
    if args.fd is not None:
        yield args.fd
    else:
        with open_output(None) as f:
            yield f.fileno()


def cmd_iohelper(args: argparse.Namespace) -> int:
    from migpipe.iohelper import main as iohelper

    return iohelper(args.path, args.fd)


def cmd_serve(args: argparse.Namespace) -> int:
    from migpipe.service import Service, run

    def ready() -> None:  # after the socket is in place: a supervisor may connect now
        print(f"migpipe serve: listening on {args.socket}", flush=True)

    limits = ("max_jobs", "max_connections", "max_jobs_per_uid", "max_connections_per_uid")
    given = {name: getattr(args, name) for name in limits if getattr(args, name) is not None}
    service = Service(allow_uids=args.allow_uid, **given)
    run_trio(run, Path(args.socket), service, ready)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from migpipe.demo import run_demo

    return run_demo(args.size, args.iterations, args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="migpipe", description="Understand, filter and move QEMU migration streams."
    )
    parser.add_argument("--version", action="version", version=f"migpipe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], text: str):
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    page_size = {"type": int, "default": 4096, "help": "target page size (4096 on x86)"}

    inspect = command("inspect", cmd_inspect, "Report what a migration stream holds.")
    inspect.add_argument("stream", nargs="?", default="-", help="stream file, or - for stdin")
    inspect.add_argument("--json", action="store_true", help="machine-readable report")
    inspect.add_argument("--page-size", **page_size)
    reader_key_options(inspect)

    extract = command(
        "extract",
        cmd_extract,
        "Write a stream's final RAM images, device state and manifest to DIR.",
    )
    extract.add_argument("stream", help="stream file, or - for stdin")
    extract.add_argument("directory", type=Path)
    extract.add_argument("--page-size", **page_size)

    generate = command(
        "generate", cmd_generate, "Write a stream from an extracted directory or a synthetic guest."
    )
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="DIR",
        help="rebuild a loadable stream from `migpipe extract` output",
    )
    source.add_argument("--synthetic", action="store_true", help="a synthetic guest")
    generate.add_argument("-o", "--output", help="output file (default: stdout)")
    generate.add_argument("--force", action="store_true", help="replace an existing output")
    generate.add_argument("--size", type=size_argument, default=64 << 20, help="guest RAM (64M)")
    generate.add_argument("--iterations", type=int, default=3, help="precopy passes (3)")
    generate.add_argument(
        "--dirty",
        type=float,
        default=0.05,
        help="share of RAM re-dirtied before each later pass (0.05)",
    )
    generate.add_argument(
        "--rewrite",
        type=float,
        default=0.2,
        help="share of dirtied pages rewritten whole; the rest change sparsely (0.2)",
    )
    generate.add_argument(
        "--mix",
        type=parse_mix,
        default=None,
        help="page kinds, e.g. zero=0.6,text=0.125,structured=0.13,random=0.145",
    )
    generate.add_argument("--seed", type=int, default=1)

    def reporting(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--stats-json", metavar="FILE", help="write the final figures here")
        sub.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="progress on stderr (default: when stderr is a terminal)",
        )

    def transport(sub: argparse.ArgumentParser, wire: str | None = None) -> None:
        """The wire's options; `wire` ("input", "output") when the other side is QEMU's."""
        from migpipe.transport import ACCEPT_TIMEOUT

        def seconds(text: str) -> float:
            """A duration for argparse: a number, 0 or more (inf and nan are no durations)."""
            try:
                value = float(text)
            except ValueError:
                value = -1.0
            if not 0 <= value < float("inf"):
                raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
            return value

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
        reporting(sub)
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
            default=30.0,
            metavar="SECONDS",
            help="keep retrying --connect this long while nobody listens (30)",
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

    encode = command(
        "encode", cmd_encode, "Turn a QEMU migration stream into migpipe's wire format, filtered."
    )
    transport(encode)
    filter_options(encode)

    decode = command(
        "decode", cmd_decode, "Turn migpipe's wire format back into the QEMU stream, byte for byte."
    )
    transport(decode)
    reader_key_options(decode)

    qmp_socket = {"required": True, "metavar": "SOCKET", "help": "QEMU's QMP UNIX socket"}
    migrate = command(
        "migrate", cmd_migrate, "Migrate a running QEMU, driven over QMP, through encode."
    )
    migrate.add_argument("--qmp", **qmp_socket)
    transport(migrate, "output")
    filter_options(migrate)
    migrate.add_argument(
        "--no-confirmation",
        action="store_true",
        help="succeed without the destination's answer (the peer is not migpipe incoming)",
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
    incoming.add_argument("--qmp", **qmp_socket)
    transport(incoming, "input")
    reader_key_options(incoming)

    save = command("save", cmd_save, "Save a QEMU stream to a file, complete or not at all.")
    save.add_argument("file", help="the file to write (appears only once complete)")
    given = save.add_mutually_exclusive_group()
    given.add_argument("--fd", type=int, metavar="N", help="read the stream from fd N (stdin)")
    given.add_argument("--qmp", metavar="SOCKET",
                       help="save the QEMU behind this QMP socket, driving it")  # fmt: skip
    save.add_argument("--live", action="store_true",
                      help="with --qmp: the guest runs on during the save")  # fmt: skip
    save.add_argument("--resume", action="store_true",
                      help="with --qmp: run the guest after the save, if it ran")  # fmt: skip
    save.add_argument(
        "--layout",
        choices=("stream", "fixed"),
        default="stream",
        help="stream: the stream as sent (default); fixed: each RAM page stored once",
    )
    save.add_argument("--cache", type=size_argument, default=64 << 20,
                      help="fixed layout: RAM extents kept in memory (64M)")  # fmt: skip
    save.add_argument("--force", action="store_true", help="replace an existing FILE")
    save.add_argument("--summary", action="store_true", help="print what was stored, on stderr")
    save.add_argument("--libvirt-xml", metavar="XML",
                      help="write a libvirt save image (virsh restore) of this domain")  # fmt: skip
    save.add_argument("--image-format", choices=("raw", "gzip", "bzip2", "xz", "lzop", "zstd"),
                      help="with --libvirt-xml: how libvirt compresses the body (raw)")  # fmt: skip
    save.add_argument("--paused", action="store_true",
                      help="with --libvirt-xml: virsh restore leaves the guest paused")  # fmt: skip
    reporting(save)
    direct_option(save)
    filter_options(save)

    restore = command("restore", cmd_restore, "Write the QEMU stream saved in a file.")
    restore.add_argument("file", help="a file written by migpipe save (or migpipe encode)")
    taker = restore.add_mutually_exclusive_group()
    taker.add_argument("--fd", type=int, metavar="N", help="write the stream to fd N (stdout)")
    taker.add_argument("--qmp", metavar="SOCKET",
                       help="load it into the QEMU behind this QMP socket")  # fmt: skip
    reporting(restore)
    direct_option(restore)
    reader_key_options(restore)

    keygen = command("keygen", cmd_keygen, "Write a new random key file (mode 0600) for encrypt.")
    keygen.add_argument("file", type=Path, help="where to write it; never replaces a file")

    tls_init = command(
        "tls-init", cmd_tls_init, "Make a CA and the server and client certificates for TLS."
    )
    tls_init.add_argument("directory", type=Path, help="where to write them (created 0700)")
    tls_init.add_argument("--ca", required=True, metavar="NAME", help="the CA's common name")
    tls_init.add_argument("--server-name", required=True, metavar="NAME[,NAME...]",
                          help="the listening host's DNS names and IP addresses")  # fmt: skip
    tls_init.add_argument("--client-name", required=True, metavar="NAME",
                          help="the connecting host's name")  # fmt: skip
    tls_init.add_argument("--days", type=int, default=1095, help="validity in days (1095)")
    tls_init.add_argument("--force", action="store_true", help="replace existing credentials")
    tls_init.add_argument("--ca-dir", type=Path, metavar="DIR",
                          help="put ca-key.pem (and ca-cert.pem) here, off the hosts")  # fmt: skip

    iohelper = command(
        "iohelper",
        cmd_iohelper,
        "Copy between FD and stdin/stdout as libvirt_iohelper does, the disk I/O overlapped.",
    )
    iohelper.add_argument("path", help="the file FD is open on (named in messages only)")
    iohelper.add_argument("fd", type=int, help="write-only: stdin to FD; read-only: FD to stdout")

    demo = command(
        "demo", cmd_demo, "Run the built-in example: a synthetic guest through migpipe, checked."
    )
    demo.add_argument("--size", type=size_argument, default=256 << 20, help="guest RAM (256M)")
    demo.add_argument("--iterations", type=int, default=4)
    demo.add_argument("--seed", type=int, default=1)

    serve = command(
        "serve", cmd_serve, "Run encode and decode jobs on fds that daemons pass over a socket."
    )
    serve.add_argument("--socket", required=True, metavar="PATH",
                       help="the UNIX socket to listen on (mode 0600)")  # fmt: skip
    serve.add_argument("--allow-uid", type=int, action="append", default=[], metavar="UID",
                       help="also serve this uid (repeatable; the socket becomes 0666 and "
                       "SO_PEERCRED decides)")  # fmt: skip
    # The defaults are the service's (not imported here: it would slow every command's start).
    serve.add_argument("--max-jobs", type=int, metavar="N",
                       help="jobs running at once, over all connections (64)")  # fmt: skip
    serve.add_argument("--max-connections", type=int, metavar="N",
                       help="clients served at once; more are refused (128)")  # fmt: skip
    serve.add_argument("--max-jobs-per-uid", type=int, metavar="N",
                       help="jobs one uid may run at once (half of --max-jobs with "
                       "--allow-uid, else all)")  # fmt: skip
    serve.add_argument("--max-connections-per-uid", type=int, metavar="N",
                       help="clients of one uid served at once (half of --max-connections "
                       "with --allow-uid, else all)")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    use_one_arena()
    args = build_parser().parse_args(argv)
    args.started = time.monotonic()
    termination = SigtermAsInterrupt()
    termination.install()
    try:
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
