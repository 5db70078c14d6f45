"""save and restore: a guest's migration stream parked in a file, and brought back.

A saved file is written under a temporary name, synced, and renamed into place only when
complete, so no reader ever finds a half-written file under the name asked for; restore checks
everything before it releases the stream's end, as decode does, so a damaged file never gives
a destination QEMU a stream it could complete.

Two layouts: `stream` is migpipe's wire format (migpipe-wire(5)) in a file, the stream exactly
as QEMU sent it, frame by frame; `fixed` (migpipe.fixedfile, migpipe-file(5)) gives every RAM
page one place, so a page sent ten times is stored once.
"""

import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from migpipe import filter as filters
from migpipe import wire
from migpipe.channel import Channel, FdChannel, as_channel
from migpipe.errors import MigpipeError
from migpipe.files import atomic_path, read_chunks
from migpipe.keys import Secrets
from migpipe.pipeline import Encoder, Totals, decode, decode_chunks, encode, with_progress
from migpipe.progress import Progress
from migpipe.stream.writer import StreamWriter

LAYOUTS = ("stream", "fixed")
QEMU_MAGIC = b"QEVM"
LIBVIRT_MAGICS = (b"LibvirtQemudSave", b"LibvirtQemudPart")


def file_kind(path: Path) -> str:
    """'stream', 'fixed', 'libvirt' or 'qemu' (a raw QEMU stream), from the first bytes."""
    from migpipe.fixedfile import MAGIC as FIXED_MAGIC

    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise MigpipeError(f"cannot open {path}: {e.strerror}") from None
    if head.startswith(wire.MAGIC):
        return "stream"
    if head.startswith(FIXED_MAGIC):
        return "fixed"
    if head.startswith(LIBVIRT_MAGICS):
        return "libvirt"
    if head.startswith(QEMU_MAGIC):
        return "qemu"
    if head.strip(b"\0") == b"" and path.stat().st_size:
        raise MigpipeError(f"{path}: an unfinished migpipe save (its header was never written)")
    raise MigpipeError(f"{path}: not a file migpipe saved, nor a QEMU or libvirt save image", 0)


def saved_stream(path: Path, secrets: Secrets | None, about: dict) -> Iterator[bytes]:
    """The QEMU stream a saved file holds, checked as restore checks it, for `inspect`;
    `about` receives what the file itself says (layout, filters, sizes)."""
    kind = file_kind(path)
    about.update(layout=kind, file_bytes=path.stat().st_size,
                 disk_bytes=path.stat().st_blocks * 512)  # fmt: skip
    if kind == "stream":
        with open(path, "rb") as f:
            yield from decode_chunks(read_chunks(f), secrets, about)
    elif kind == "fixed":
        from migpipe.fixedfile import FixedReader

        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            reader = FixedReader(fd, secrets, Totals())
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
    else:
        from migpipe.libvirtimage import LibvirtImageReader

        with open(path, "rb") as f:
            reader = LibvirtImageReader(FdChannel(f.fileno()))
            try:
                image = reader.image
                about.update(libvirt_format=image.image_format, was_running=image.was_running,
                             xml=image.xml, filters=[])  # fmt: skip
                while chunk := reader.read():
                    yield chunk
            finally:
                reader.close()


@dataclass(frozen=True)
class LibvirtTarget:
    """What `save --libvirt-xml` needs to write a libvirt save image instead of a migpipe file."""

    xml: str
    image_format: str = "raw"
    was_running: bool = True


def copy_checked(read: Callable[[], bytes], sink: Channel, totals: Totals) -> None:
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
    source: int | Channel,
    path: Path,
    chain: Sequence[filters.Filter],
    layout: str = "stream",
    force: bool = False,
    progress: Progress | None = None,
    cache: int = 64 << 20,
    libvirt: LibvirtTarget | None = None,
    commit: Callable[[], Awaitable[None]] | None = None,
) -> Totals:
    """Write the stream from `source` to `path` in `layout`; the file appears only complete,
    and only once `commit` returns: save --qmp waits there until QEMU says it completed."""
    with atomic_path(path, force=force) as temporary:
        fd = os.open(temporary, os.O_RDWR | os.O_CLOEXEC)  # fixed: extents are read back
        try:
            if libvirt is not None:
                totals = await save_libvirt(as_channel(source), fd, libvirt, progress)
            elif layout == "fixed":
                from migpipe.fixedfile import save_fixed

                totals = await save_fixed(source, fd, chain, progress, cache)
            else:
                totals = await encode(source, FdChannel(fd), chain, progress)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if commit is not None:
            await commit()
    return totals


async def restore(
    path: Path,
    sink: int | Channel,
    secrets: Secrets | None = None,
    progress: Progress | None = None,
) -> Totals:
    """Write the QEMU stream saved in `path` to `sink`; its end only once all of it checked."""
    kind = file_kind(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if kind == "stream":
            return await decode(FdChannel(fd), sink, progress, secrets)
        if kind == "fixed":
            from migpipe.fixedfile import restore_fixed

            return await restore_fixed(fd, sink, secrets, progress)
        if kind == "libvirt":
            return await restore_libvirt(fd, as_channel(sink), progress)
        return await restore_libvirt(fd, as_channel(sink), progress, raw=True)
    finally:
        os.close(fd)


async def save_libvirt(
    source: Channel, fd: int, target: LibvirtTarget, progress: Progress | None
) -> Totals:
    """A libvirt save image: header and XML (magic "partial"), the stream compressed as the
    format says, then the final magic, so `virsh restore` takes it only when complete."""
    from migpipe.libvirtimage import LibvirtImageWriter, mark_complete

    totals = Totals()

    def run() -> None:
        writer = LibvirtImageWriter(FdChannel(fd), target.xml, was_running=target.was_running,
                                    image_format=target.image_format)  # fmt: skip
        try:
            copy_checked(source.read, writer, totals)
            writer.finish()
        except BaseException:
            writer.close()
            raise
        os.fdatasync(fd)
        mark_complete(fd)
        totals.wire_bytes = os.fstat(fd).st_size

    await with_progress(progress, totals, lambda: trio.to_thread.run_sync(run))
    return totals


async def restore_libvirt(
    fd: int, sink: Channel, progress: Progress | None, raw: bool = False
) -> Totals:
    """The QEMU stream in a libvirt save image (or, `raw`, a bare stream in a file), checked
    as it goes; its end only once the whole body was read without an error."""
    from migpipe.libvirtimage import LibvirtImageReader

    totals = Totals()
    totals.wire_expected = os.fstat(fd).st_size

    def run() -> None:
        source = FdChannel(fd)
        reader = source if raw else LibvirtImageReader(source)

        def read() -> bytes:
            chunk = reader.read()
            totals.wire_bytes = os.lseek(fd, 0, os.SEEK_CUR)
            return chunk

        try:
            copy_checked(read, sink, totals)
        finally:
            if not raw:
                reader.close()

    await with_progress(progress, totals, lambda: trio.to_thread.run_sync(run))
    return totals
