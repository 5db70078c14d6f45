"""save, restore and iohelper: streams to and from files."""

import argparse
import contextlib
import functools
import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from migpipe.cli.command import Command
from migpipe.cli.options import (
    direct_option,
    filter_chain,
    filter_options,
    idle_option,
    input_fd,
    output_fd,
    progress,
    reader_key_options,
    report,
    reporting_options,
    secrets_of,
    size_argument,
    size_text,
    watch_idle,
)
from migpipe.errors import (
    MigpipeError,
    SecretError,
    UsageError,
    quoted,
)
from migpipe.io import idle
from migpipe.io.channel import stream_sink
from migpipe.io.files import atomic_fd, open_input, open_output
from migpipe.running import run_trio
from migpipe.save import DEFAULT_CACHE, LAYOUTS, LIBVIRT_FORMATS

if TYPE_CHECKING:
    from migpipe.io.channel import Sink, Source
    from migpipe.keys import Secrets
    from migpipe.tunnel.pipeline import Totals
    from migpipe.tunnel.progress import Progress

HEAD = 16  # the bytes that tell a saved file's kind (savefile.kind_of)


def register(command: Command) -> None:
    save = command("save", cmd_save, "Save a QEMU stream to a file, complete or not at all.")
    save.add_argument(
        "file", help="the file to write (appears only once complete); -: stdout, stream layout"
    )
    given = save.add_mutually_exclusive_group()
    given.add_argument("--fd", type=int, metavar="N", help="read the stream from fd N (stdin)")
    given.add_argument(
        "--qmp", metavar="SOCKET", help="save the QEMU behind this QMP socket, driving it"
    )
    save.add_argument(
        "--live", action="store_true", help="with --qmp: the guest runs on during the save"
    )
    save.add_argument(
        "--resume", action="store_true", help="with --qmp: run the guest after the save, if it ran"
    )
    save.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=LAYOUTS[0],
        help="stream: the stream as sent (default); fixed: each RAM page stored once",
    )
    save.add_argument(
        "--cache",
        type=size_argument,
        default=size_text(DEFAULT_CACHE),
        help="fixed layout: RAM extents kept in memory (%(default)s)",
    )
    save.add_argument("--force", action="store_true", help="replace an existing FILE")
    save.add_argument("--summary", action="store_true", help="print what was stored, on stderr")
    save.add_argument(
        "--libvirt-xml",
        metavar="XML",
        help="write a libvirt save image (virsh restore) of this domain",
    )
    save.add_argument(
        "--image-format",
        choices=LIBVIRT_FORMATS,
        help="with --libvirt-xml: how libvirt compresses the body (raw), or sparse: QEMU's "
        "mapped-ram file (libvirt 11.2+)",
    )
    save.add_argument(
        "--paused",
        action="store_true",
        help="with --libvirt-xml: virsh restore leaves the guest paused",
    )
    reporting_options(save)
    direct_option(save)
    filter_options(save)

    restore = command("restore", cmd_restore, "Write the QEMU stream saved in a file.")
    restore.add_argument(
        "file",
        help="a file written by migpipe save (or migpipe encode); -: stdin "
        "(or a pipe: not the fixed layout)",
    )
    taker = restore.add_mutually_exclusive_group()
    taker.add_argument("--fd", type=int, metavar="N", help="write the stream to fd N (stdout)")
    taker.add_argument(
        "--qmp", metavar="SOCKET", help="load it into the QEMU behind this QMP socket"
    )
    taker.add_argument(
        "--qemu",
        metavar="ADDR",
        help="give the stream to the QEMU listening on unix:PATH or HOST:PORT (-incoming)",
    )
    taker.add_argument(
        "--to",
        nargs=2,
        metavar=("FORMAT", "OUT"),
        help="write OUT in FORMAT instead: mapped-ram (QEMU's migrate-incoming file:OUT "
        "with the mapped-ram capability)",
    )
    restore.add_argument("--force", action="store_true", help="with --to: replace OUT")
    state = restore.add_mutually_exclusive_group()
    state.add_argument(
        "--running",
        dest="run",
        action="store_const",
        const=True,
        help="with --qmp: run the guest once loaded, as virsh restore --running "
        "(default: as it was when saved)",
    )
    state.add_argument(
        "--paused",
        dest="run",
        action="store_const",
        const=False,
        help="with --qmp: leave the guest paused once loaded, as virsh restore --paused",
    )
    reporting_options(restore)
    direct_option(restore)
    reader_key_options(restore)
    idle_option(restore)

    iohelper = command(
        "iohelper",
        cmd_iohelper,
        "Copy between FD and stdin/stdout as libvirt_iohelper does, the disk I/O overlapped.",
    )
    iohelper.add_argument("path", help="the file FD is open on (named in messages only)")
    iohelper.add_argument("fd", type=int, help="write-only: stdin to FD; read-only: FD to stdout")


def cmd_save(args: argparse.Namespace) -> int:
    from migpipe.save.savefile import save

    if args.qmp is None and (args.live or args.resume):
        raise UsageError("--live and --resume drive QEMU: they need --qmp")
    if args.file == "-":
        return save_to_stdout(args)
    chain = filter_chain(args)
    libvirt = libvirt_target(args, chain)
    store = functools.partial(
        save,
        path=Path(args.file),
        chain=chain,
        layout=args.layout,
        force=args.force,
        progress=progress(args, "save"),
        cache=args.cache,
        libvirt=libvirt,
        direct=args.direct,
    )
    if args.qmp is not None:
        from migpipe.qemu import migration as drive

        outcome = run_trio(drive.save, args.qmp, store, args.live, args.resume)
        totals = outcome.totals
        report(args, totals, qemu=outcome.qemu, runstate=outcome.runstate)
        print(drive.summary("save", outcome), file=sys.stderr)
    else:
        with input_fd(args) as source:
            totals = run_trio(store, mapped_ram_input(source, args))
        report(args, totals)
    if args.summary:
        print_save_summary(Path(args.file), totals)
    return 0


def mapped_ram_input(fd: int, args: argparse.Namespace) -> "int | Source":
    """save's input: a QEMU mapped-ram file (< FILE, --fd) is read as the ordinary stream
    it holds; anything else is read as it comes."""
    from migpipe.stream.mappedram import MappedRamSource, is_mapped_ram_file

    if not is_mapped_ram_file(fd):
        return fd
    name = "standard input" if args.fd is None else f"fd {args.fd}"
    return MappedRamSource(fd, 0, name)


def save_to_stdout(args: argparse.Namespace) -> int:
    """`save -`: the stream layout is encode's wire, which can go down a pipe as it is made
    (`... | ssh host 'cat > vm.mig'`): restore refuses it unless it is complete. The other
    files cannot: they are finished in place, or named only once QEMU completed."""
    from migpipe.io.channel import FdChannel
    from migpipe.tunnel.pipeline import encode

    refused = {
        "--qmp": args.qmp is not None,  # a file it names only once QEMU completed
        "--layout fixed": args.layout == "fixed",  # each page written in its place
        "--libvirt-xml": args.libvirt_xml is not None,  # its header is finished last
        "--direct": bool(args.direct),
        "--summary": args.summary,
    }
    given = [option for option, used in refused.items() if used]
    if given:
        raise UsageError(f"{given[0]} needs a FILE to save to, not standard output (-)")
    chain = filter_chain(args)
    with input_fd(args) as source, open_output("-") as out:
        sink = FdChannel(out.fileno(), "standard output")
        totals = run_trio(
            encode, mapped_ram_input(source, args), sink, chain, progress(args, "save")
        )
    report(args, totals)
    return 0


def libvirt_target(args: argparse.Namespace, chain: list):
    """--libvirt-xml: a save image `virsh restore` takes, whose body libvirt must understand."""
    from migpipe.save.savefile import LibvirtTarget

    if args.libvirt_xml is None:
        if args.image_format is not None or args.paused:
            raise UsageError("--image-format and --paused need --libvirt-xml")
        return None
    if chain or args.layout != "stream":
        message = (
            "a libvirt save image holds QEMU's stream, compressed by --image-format: "
            "it takes no migpipe filters and no --layout"
        )
        raise UsageError(message)
    if args.image_format == "sparse" and args.direct:  # refused before QEMU is driven
        from migpipe.save.libvirtimage import SPARSE_DIRECT

        raise UsageError(SPARSE_DIRECT)
    try:
        xml = Path(args.libvirt_xml).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MigpipeError(f"cannot read the domain XML {args.libvirt_xml}: {e}") from None
    return LibvirtTarget(xml, args.image_format or "raw", not args.paused)


def print_save_summary(path: Path, totals) -> None:
    size = path.stat().st_size
    used = path.stat().st_blocks * 512
    fixed = totals.filter_counters.get("fixed")
    lines = [
        f"saved {totals.qemu_bytes:,} stream bytes to {path}: {size:,} bytes ({used:,} on disk)"
    ]
    if fixed:
        lines.append(
            f"pages received {fixed['pages_received']:,}, stored {fixed['pages_stored']:,}, "
            f"overwritten in place {fixed['pages_overwritten']:,}; extent writes "
            f"{fixed['extent_writes']:,} (rewrites {fixed['extent_rewrites']:,}, read back "
            f"{fixed['extent_reloads']:,})"
        )
    print("\n".join(lines), file=sys.stderr)


def cmd_restore(args: argparse.Namespace) -> int:
    from migpipe.save.savefile import restore

    if args.qmp is None and args.run is not None:
        raise UsageError("--running and --paused drive QEMU: they need --qmp")
    if args.force and args.to is None:
        raise UsageError("--force replaces the file --to names: it needs --to")
    shown = progress(args, "restore")
    with piped(args.file) as pipe:
        load = None if pipe is None else piped_load(pipe, args, shown)
        if args.to is not None:
            totals = restore_to(args, shown, load)
            report(args, totals)
            return 0
        if args.qmp is not None:
            from migpipe.qemu import migration as drive

            file, secrets = Path(args.file), secrets_of(args)
            outcome = run_trio(
                drive.restore, args.qmp, file, secrets, shown, args.direct, args.run, load
            )
            report(args, outcome.totals, qemu=outcome.qemu, runstate=outcome.runstate)
            print(drive.summary("restore", outcome), file=sys.stderr)
            return 0
        with output_fd(args) as fd, stream_sink(fd) as sink:  # a missing file fails QEMU's too
            if load is None:
                file, secrets = Path(args.file), secrets_of(args)
                totals = run_trio(restore, file, sink, secrets, shown, args.direct)
            else:
                totals = run_trio(load, sink)
    report(args, totals)
    return 0


def restore_to(args: argparse.Namespace, shown: "Progress | None", load: Callable | None):
    """restore --to mapped-ram OUT: the stream written as QEMU's mapped-ram file, published
    complete (the bitmaps are its last bytes) or not at all."""
    from migpipe.save.savefile import restore
    from migpipe.stream.mappedram import MappedRamWriter

    kind, out = args.to
    if kind != "mapped-ram":
        raise UsageError(f"--to {quoted(kind)}: the one format restore writes is mapped-ram")
    with atomic_fd(Path(out), force=args.force) as fd:
        writer = MappedRamWriter(fd)
        if load is None:
            file, secrets = Path(args.file), secrets_of(args)
            totals = run_trio(restore, file, writer, secrets, shown, args.direct)
        else:
            totals = run_trio(load, writer)
        writer.finish()
        os.fdatasync(fd)
    return totals


@contextlib.contextmanager
def piped(name: str) -> Iterator[int | None]:
    """The descriptor of FILE when it can only be read in order (`-`, a pipe, a socket, as
    `ssh host cat vm.mig | migpipe restore -` or `<(...)` give), else None: restore reads a
    file by position, and opens it itself."""
    if name == "-":
        with open_input("-") as f:
            yield f.fileno()
        return
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield None  # restore says why, in its words
        return
    try:
        mode = os.fstat(fd).st_mode
        yield fd if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) else None
    finally:
        os.close(fd)


class Rejoined:
    """A pipe, with the bytes that told its kind given back first."""

    def __init__(self, head: bytes, fd: int) -> None:
        from migpipe.io.channel import FdChannel

        self.head, self.rest = head, FdChannel(fd)

    def read(self) -> bytes:
        if self.head:
            first, self.head = self.head, b""
            return first
        return self.rest.read()

    def interrupt(self) -> None:
        self.rest.interrupt()


def piped_kind(
    fd: int, name: str, secrets: "Secrets", doing: str, unknown: str | None = None
) -> tuple[str, Rejoined]:
    """The kind of saved file a pipe carries, told by its first bytes (savefile.kind_of, which
    also refuses a kind the key options refuse), and the pipe to read it all from; a
    UsageError for the fixed layout, which cannot be read in order. Bytes of no kind are
    `unknown`'s kind if given (inspect: the QEMU stream parser says what is wrong with them)."""
    from migpipe.save.savefile import kind_of

    head = b""
    try:
        while len(head) < HEAD and (more := os.read(fd, HEAD - len(head))):
            head += more
    except BlockingIOError:  # restore's socket: its --idle-timeout ran out
        raise idle.silent(fd) from None
    try:
        kind = kind_of(head, name, secrets)
    except SecretError:
        raise
    except MigpipeError:
        if unknown is None:
            raise
        kind = unknown
        secrets.check_sealed(False, f"{name} (a bare QEMU stream)")
    if kind == "fixed":
        raise UsageError(
            f"{name}: a fixed-layout save cannot be {doing} from a pipe: its pages are "
            "found through an index at its end; copy it to a file first"
        )
    return kind, Rejoined(head, fd)


def piped_load(fd: int, args: argparse.Namespace, shown: "Progress | None") -> Callable:
    """restore's reading of a pipe: the kind checked now, before QEMU is touched, then the
    rest in order."""
    from migpipe.save.savefile import restore_libvirt
    from migpipe.tunnel.pipeline import decode

    if args.direct:
        raise UsageError("--direct reads a file around the page cache: a pipe has none")
    name, secrets = "standard input" if args.file == "-" else args.file, secrets_of(args)
    watch_idle(args, fd, "input")  # a socket's sender, silent mid-stream, is given up on
    kind, pipe = piped_kind(fd, name, secrets, "restored")

    async def load(sink: "int | Sink") -> "Totals":
        with stream_sink(sink) as qemu:
            if kind == "stream":
                return await decode(pipe, qemu, shown, secrets)
            return await restore_libvirt(pipe, None, qemu, shown, kind == "qemu", name=name)

    return load


def piped_chunks(fd: int, name: str, secrets: "Secrets", about: dict) -> Iterator[bytes]:
    """inspect's reading of a pipe: the QEMU stream of any kind but the fixed layout, checked
    as savefile.saved_stream checks a file's; `about` gets what the file says, and at the end
    the bytes read (a pipe has no size beforehand)."""
    from migpipe.save.savefile import Reading, libvirt_chunks
    from migpipe.tunnel.pipeline import decode_chunks

    kind, pipe = piped_kind(fd, name, secrets, "inspected", unknown="qemu")
    about.update(layout=kind, file_bytes=0)

    def read() -> bytes:
        chunk = pipe.read()
        about["file_bytes"] += len(chunk)
        return chunk

    chunks = iter(read, b"")
    if kind == "stream":
        yield from decode_chunks(chunks, secrets, about)
    elif kind == "qemu":
        yield from chunks
    else:
        yield from libvirt_chunks(Reading(read), about, name=name)


def cmd_iohelper(args: argparse.Namespace) -> int:
    from migpipe.save.iohelper import main as iohelper

    return iohelper(args.path, args.fd)
