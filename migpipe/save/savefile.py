"""save and restore: a guest's migration stream parked in a file, and brought back.

A saved file is written under a temporary name, synced, and renamed into place only when
complete, so no reader ever finds a half-written file under the name asked for; restore checks
everything before it releases the stream's end, as decode does, so a damaged file never gives
a destination QEMU a stream it could complete.

Until save() publishes it, a file's first byte is UNPUBLISHED (a libvirt image's magic says
"Part"), and restore refuses it: a save interrupted after its last byte was written (while
QEMU has yet to say it completed, or before the name is given) never restores as valid.

Two layouts: `stream` is migpipe's wire format (migpipe-wire(5)) in a file, the stream exactly
as QEMU sent it, frame by frame; `fixed` (migpipe.save.fixedfile, migpipe-file(5)) gives every RAM
page one place, so a page sent ten times is stored once.
"""

import contextlib
import fcntl
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from migpipe import chain as filters
from migpipe import wire
from migpipe.errors import MigpipeError
from migpipe.io.channel import FdChannel, Sink, Source, as_source, stream_sink
from migpipe.io.direct import Direct, DirectFile, DirectReader, DirectWriter, open_direct
from migpipe.io.files import atomic_path, read_chunks
from migpipe.keys import Secrets
from migpipe.save import DEFAULT_CACHE
from migpipe.save.fixedfile import UNPUBLISHED, PlainFile
from migpipe.stream import format as fmt
from migpipe.stream import mappedram
from migpipe.stream.writer import StreamWriter
from migpipe.tunnel.dataplane import run_interruptible
from migpipe.tunnel.inplace import encode_in_place
from migpipe.tunnel.pipeline import Encoder, Totals, decode, decode_chunks, encode, with_progress
from migpipe.tunnel.progress import Progress

if TYPE_CHECKING:
    from migpipe.save.libvirtimage import Input

LIBVIRT_MAGICS = (b"LibvirtQemudSave", b"LibvirtQemudPart")
UNSEALED_KINDS = {  # what no key seals
    "qemu": "a bare QEMU stream",
    "mapped-ram": "a QEMU mapped-ram file",
    "libvirt": "a libvirt save image",
}


def file_kind(path: Path, secrets: Secrets | None = None) -> str:
    """'stream', 'fixed', 'libvirt', 'qemu' (a raw QEMU stream) or 'mapped-ram' (QEMU's
    `file:` migration with that capability), from the first bytes."""
    try:
        with open(path, "rb") as f:
            return kind_of(f.read(mappedram.HEAD), path, secrets)
    except OSError as e:
        raise MigpipeError(f"cannot open {path}: {e.strerror}") from None


def kind_of(head: bytes, path: Path | str, secrets: Secrets | None = None) -> str:
    """The kind of file `head` starts; one that can never be sealed is refused when `secrets`
    require sealing (the kinds that can are checked when their header is read). A mapped-ram
    file is told by its configuration, in its first mappedram.HEAD bytes; fewer (a pipe's
    first bytes) tell it from a bare stream only when the parser reaches it."""
    kind = _kind_of(head, path)
    if kind == "qemu" and mappedram.is_mapped_ram(head):
        kind = "mapped-ram"
    if kind in UNSEALED_KINDS and secrets is not None:
        secrets.check_sealed(False, f"{path} ({UNSEALED_KINDS[kind]})")
    return kind


def _kind_of(head: bytes, path: Path | str) -> str:
    from migpipe.save.fixedfile import MAGIC as FIXED_MAGIC

    if head[:1] == UNPUBLISHED and head[1:8] in (wire.MAGIC[1:8], FIXED_MAGIC[1:8]):
        raise MigpipeError(
            f"{path}: an unfinished migpipe save (interrupted before it was complete and published)"
        )
    if head.startswith(wire.MAGIC):
        return "stream"
    if head.startswith(FIXED_MAGIC):
        return "fixed"
    if head.startswith(LIBVIRT_MAGICS):
        return "libvirt"
    if head.startswith(fmt.BE32.pack(fmt.MAGIC)):
        return "qemu"
    if head and head.strip(b"\0") == b"":
        raise MigpipeError(f"{path}: an unfinished migpipe save (its header was never written)")
    raise MigpipeError(f"{path}: not a file migpipe saved, nor a QEMU or libvirt save image", 0)


def saved_stream(path: Path, secrets: Secrets | None, about: dict) -> Iterator[bytes]:
    """The QEMU stream a saved file holds, checked as restore checks it, for `inspect`;
    `about` receives what the file itself says (layout, filters, sizes). A file of a kind
    `secrets` refuse is refused now, before anything is read or reported."""
    kind = file_kind(path, secrets)
    st = path.stat()
    written = datetime.fromtimestamp(st.st_mtime, UTC).isoformat(timespec="seconds")
    about.update(layout=kind, file_bytes=st.st_size, disk_bytes=st.st_blocks * 512, written=written)
    return _saved_chunks(path, kind, secrets, about)


def _saved_chunks(path: Path, kind: str, secrets: Secrets | None, about: dict) -> Iterator[bytes]:
    if kind == "stream":
        with open(path, "rb") as f:
            yield from decode_chunks(read_chunks(f), secrets, about)
    elif kind == "fixed":
        from migpipe.save.fixedfile import FixedReader

        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            reader = FixedReader(PlainFile(fd), secrets, Totals())
            about.update(reader.describe())
            writer = StreamWriter()
            for record in reader.records():
                buffer = bytearray()
                writer.write(buffer, record)
                yield bytes(buffer)
        finally:
            os.close(fd)
    elif kind == "qemu":
        with open(path, "rb") as f:
            yield from read_chunks(f)
    elif kind == "mapped-ram":
        with open(path, "rb") as f:
            reader = mappedram.MappedRamReader(f.fileno(), name=str(path))
            about.update(filters=[], mapped_ram=reader.blocks)
            yield from reader.chunks()
            about.update(device_state_offset=reader.device_state_offset)
    else:
        with open(path, "rb") as f:
            yield from libvirt_chunks(FdChannel(f.fileno()), about, f.fileno(), str(path))


def libvirt_chunks(
    source: "Input", about: dict, fd: int | None = None, name: str = "the image"
) -> Iterator[bytes]:
    """The QEMU stream inside a libvirt save image read from `source` (a file, or a pipe for
    inspect; a sparse image is read through `fd`, the file's); `about` gets what the image's
    header says, and a sparse image's mapped-ram blocks."""
    from migpipe.save.libvirtimage import LibvirtImageReader

    reader = LibvirtImageReader(source, fd, name)
    try:
        image = reader.image
        about.update(
            libvirt_format=image.image_format,
            was_running=image.was_running,
            xml=image.xml,
            filters=[],
        )
        while chunk := reader.read():
            yield chunk
        if reader.mapped_ram is not None:
            about.update(
                mapped_ram=reader.mapped_ram.blocks,
                device_state_offset=reader.mapped_ram.device_state_offset,
            )
    finally:
        reader.close()


@dataclass(frozen=True)
class Reading:
    """What LibvirtImageReader reads (its Input), made of a read function (counting what
    crosses, say); stopping the read is for the Source behind the function."""

    read: Callable[[], bytes]


@dataclass(frozen=True)
class LibvirtTarget:
    """What `save --libvirt-xml` needs to write a libvirt save image instead of a migpipe file."""

    xml: str
    image_format: str = "raw"
    was_running: bool = True


def copy_checked(read: Callable[[], bytes], sink: Sink, totals: Totals) -> None:
    """Copy a bare QEMU stream, parsed on the way; its end (from the EOF item on) is written
    only once `read` reached its end without an error, so a body whose corruption shows only
    at its end (a gzip CRC) never completes a destination."""
    splitter = Encoder([], totals=totals)
    while chunk := read():
        for frame in splitter.feed(chunk):
            sink.write(frame.qemu)
    for frame in splitter.finish():
        sink.write(frame.qemu)


async def save(
    source: int | Source,
    path: Path,
    chain: Sequence[filters.Filter],
    layout: str = "stream",
    force: bool = False,
    progress: Progress | None = None,
    cache: int = DEFAULT_CACHE,
    libvirt: LibvirtTarget | None = None,
    commit: Callable[[], Awaitable[None]] | None = None,
    direct: Direct = False,
) -> Totals:
    """Write the stream from `source` to `path` in `layout`; the file appears only complete,
    and only once `commit` returns: save --qmp waits there until QEMU says it completed.
    `direct` (True or "try") writes around the page cache (migpipe.io.direct)."""
    with (
        atomic_path(path, force=force) as temporary,
        # read and written: the fixed layout reads extents back
        open_direct(str(temporary), "r+", direct=direct) as file,
    ):
        totals = await save_into(
            source, file, chain, layout, progress, cache, libvirt, published=False
        )
        if commit is not None:
            await commit()
        await trio.to_thread.run_sync(publish, file)
    return totals


def publish(file: "DirectFile | PlainFile") -> None:
    """Give a complete, synced file its final magic (UNPUBLISHED or libvirt's "Part" until
    now), and sync that too: from here on restore takes it."""
    from migpipe.save.libvirtimage import PARTIAL_MAGIC, SAVE_MAGIC

    size = file.align if isinstance(file, DirectFile) else len(SAVE_MAGIC)  # O_DIRECT: blocks
    head = file.read_at(0, size)
    # Both layouts' magics start with 0x89 (wire.MAGIC, fixedfile.MAGIC); UNPUBLISHED replaced it.
    final = SAVE_MAGIC if head.startswith(PARTIAL_MAGIC) else wire.MAGIC[:1]
    file.write_at(0, final + head[len(final) :])
    file.sync()


class _Unpublished:
    """The stream layout's file while it is written: its first byte goes out as UNPUBLISHED."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._first = True

    def write(self, parts: Sequence[bytes | memoryview]) -> None:
        if self._first and parts and len(parts[0]):
            self._first = False
            parts = [UNPUBLISHED + bytes(parts[0][1:]), *parts[1:]]
        self._sink.write(parts)


async def save_into(
    source: int | Source,
    file: "DirectFile | PlainFile",
    chain: Sequence[filters.Filter],
    layout: str = "stream",
    progress: Progress | None = None,
    cache: int = DEFAULT_CACHE,
    libvirt: LibvirtTarget | None = None,
    published: bool = True,
) -> Totals:
    """Write the saved file into `file` (empty; opened by save, or handed to the service by a
    daemon that names it) and sync it; unless `published`, for publish() to finish."""
    if libvirt is not None:
        totals = await save_libvirt(as_source(source), file, libvirt, progress, published)
    elif layout == "fixed":
        from migpipe.save.fixedfile import save_fixed

        totals = await save_fixed(source, file, chain, progress, cache, published)
    elif isinstance(file, DirectFile):
        source = as_source(source)
        with DirectWriter(file) as writer:
            sink: Sink = writer if published else _Unpublished(writer)
            if not chain and isinstance(source, FdChannel):  # nothing to do but frame it
                totals = await encode_in_place(source, writer, sink, progress)
            else:
                totals = await encode(source, sink, chain, progress)
            await trio.to_thread.run_sync(writer.finish)
    else:
        sink = FdChannel(file.fd)
        totals = await encode(source, sink if published else _Unpublished(sink), chain, progress)
    await trio.to_thread.run_sync(file.sync)  # fdatasync may take seconds: not on the loop
    return totals


async def restore(
    path: Path,
    sink: int | Sink,
    secrets: Secrets | None = None,
    progress: Progress | None = None,
    direct: Direct = False,
) -> Totals:
    """Write the QEMU stream saved in `path` to `sink`; its end only once all of it checked."""
    with open_direct(str(path), "r", direct=direct) as file:
        return await restore_from(file, sink, secrets, progress, path)


async def restore_from(
    file: "DirectFile | PlainFile",
    sink: int | Sink,
    secrets: Secrets | None = None,
    progress: Progress | None = None,
    name: Path | str = "the file",
) -> Totals:
    """The QEMU stream saved in `file` (opened by restore, or handed over by a daemon)."""
    with stream_sink(sink) as qemu:
        return await _restore_kind(file, qemu, secrets, progress, name)


async def _restore_kind(
    file: "DirectFile | PlainFile",
    sink: Sink,
    secrets: Secrets | None,
    progress: Progress | None,
    name: Path | str,
) -> Totals:
    kind = kind_of(file.read_at(0, mappedram.HEAD), name, secrets)  # no readahead
    if kind == "fixed":
        from migpipe.save.fixedfile import restore_fixed

        return await restore_fixed(file, sink, secrets, progress)
    if kind == "mapped-ram":  # read by offset, its pages in runs: no O_DIRECT ring
        fcntl.fcntl(file.fd, fcntl.F_SETFL, fcntl.fcntl(file.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        source = mappedram.MappedRamSource(file.fd, 0, str(name))
        return await restore_libvirt(source, None, sink, progress, raw=True)
    size = os.fstat(file.fd).st_size
    with contextlib.ExitStack() as stack:
        if isinstance(file, DirectFile):
            source: Source = stack.enter_context(DirectReader(file))
        else:
            os.lseek(file.fd, 0, os.SEEK_SET)
            source = FdChannel(file.fd)
        if kind == "stream":
            if progress is not None:  # decode reads all of it, in order
                progress.size = size
            return await decode(source, sink, progress, secrets)
        return await restore_libvirt(source, size, sink, progress, kind == "qemu", file.fd, name)


async def save_libvirt(
    source: Source,
    file: "DirectFile | PlainFile",
    target: LibvirtTarget,
    progress: Progress | None,
    published: bool = True,
) -> Totals:
    """A libvirt save image: header and XML (magic "partial"), the stream compressed as the
    format says, then (if `published`) the final magic, so `virsh restore` takes it only when
    complete."""
    from migpipe.save.libvirtimage import LibvirtImageWriter

    totals = Totals()

    def run() -> None:
        with contextlib.ExitStack() as stack:
            if target.image_format == "sparse":  # written by offset, not in order
                sink: Sink | int = file.fd
            elif isinstance(file, DirectFile):
                sink = stack.enter_context(DirectWriter(file))
            else:
                sink = FdChannel(file.fd)
            writer = LibvirtImageWriter(
                sink, target.xml, was_running=target.was_running, image_format=target.image_format
            )
            try:
                copy_checked(source.read, writer, totals)
                writer.finish()
            except BaseException:
                writer.close()
                raise
            if isinstance(sink, DirectWriter):
                sink.finish()
        if published:
            publish(file)
        totals.wire_bytes = os.fstat(file.fd).st_size

    await with_progress(progress, totals, partial(run_interruptible, run, source.interrupt))
    return totals


async def restore_libvirt(
    source: Source,
    size: int | None,
    sink: Sink,
    progress: Progress | None,
    raw: bool = False,
    fd: int | None = None,
    name: Path | str = "the image",
) -> Totals:
    """The QEMU stream in a libvirt save image (or, `raw`, a bare stream in a file, or the
    ordinary stream of a mapped-ram file, a MappedRamSource) of `size` bytes (None: not
    known, a pipe's), checked as it goes; its end only once the whole body was read without
    an error. A sparse image is read through `fd`, the file's (None: a pipe, which cannot
    carry one).

    What the totals say was read (wire_bytes), and will be (wire_expected, which progress
    shows the share done of), is the file as read in order, every byte of it; of a mapped-ram
    file, alone or in a sparse image after the header, what MappedRamReader reads of it by
    offset: its data, not its holes (the stream given out is qemu_bytes)."""
    from migpipe.save.libvirtimage import LibvirtImageReader

    totals = Totals()

    def read_file() -> bytes:
        chunk = source.read()
        totals.wire_bytes += len(chunk)
        return chunk

    def run() -> None:
        reader: Reading | mappedram.MappedRamSource | LibvirtImageReader
        if isinstance(source, mappedram.MappedRamSource):
            reader, mapped, start = source, source.reader, 0
        elif raw:
            reader, mapped, start = Reading(read_file), None, 0
        else:  # the header and XML are read in order, whatever the format
            reader = LibvirtImageReader(Reading(read_file), fd, str(name))
            mapped, start = reader.mapped_ram, reader.image.stream_offset
        if mapped is None:
            totals.wire_expected = size
            read = reader.read
        else:
            totals.wire_bytes = start  # not what read_prefix read past the header

            def read() -> bytes:
                chunk = reader.read()
                if mapped.data_bytes is not None:  # known from the block list on
                    totals.wire_expected = start + mapped.data_bytes
                totals.wire_bytes = start + mapped.read_bytes
                return chunk

        try:
            copy_checked(read, sink, totals)
        finally:
            if isinstance(reader, LibvirtImageReader):
                reader.close()

    await with_progress(progress, totals, partial(run_interruptible, run, source.interrupt))
    return totals
