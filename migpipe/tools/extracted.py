"""The extracted directory: a stream's final RAM images, its device state and a manifest.

`extract` replays a stream into one raw image per RAM block (mmap'd files, so memory stays flat
however large the guest) and keeps every byte after RAM's END section (the non-RAM device
sections, EOF, the VM description) verbatim. The directory holds a guest's memory: it is the
caller's alone (0700, files 0600), and nothing in it is followed or trusted that the caller did
not write. `rebuild` turns such a directory back into a
compact single-pass stream that a QEMU of the same machine type loads.
"""

import contextlib
import json
import mmap
import os
import string
from collections.abc import Iterable, Iterator
from pathlib import Path

from migpipe.errors import MigpipeError, quoted
from migpipe.io.files import create_private, open_owned, private_directory, write_all
from migpipe.stream import format as fmt
from migpipe.stream.ramimage import RamImages
from migpipe.stream.records import RamBlock, Record
from migpipe.stream.skeleton import FORMAT, Limits, Skeleton, checked_blocks, compact_stream
from migpipe.stream.writer import StreamWriter

MANIFEST = "manifest.json"
DEVICE_STATE = "device-state.bin"
MANIFEST_LIMITS = Limits(items=1 << 16, pages=1 << 40)  # a manifest of a few MiB at most
NAME_MAX = 255
_KEPT = frozenset((string.ascii_letters + string.digits + "._-:@+,=").encode())


def image_file_name(block: str) -> str:
    """A flat file name for a block, one per name: every byte of it but letters, digits and
    `._-:@+,=` is written %XX (QEMU names contain '/', e.g. 0000:00:02.0/vga.vram; a crafted
    one may hold '%' or NUL), so two blocks never share a file; `.img` keeps them apart from
    the manifest and the device state."""
    name = "".join(chr(b) if b in _KEPT else f"%{b:02X}" for b in block.encode()) + ".img"
    if len(name) > NAME_MAX:
        raise MigpipeError(
            f"RAM block {quoted(block)}: its file name would be {len(name)} bytes long"
        )
    return name


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A failed write (ENOSPC, EIO, EFBIG) as one line naming the file."""
    try:
        yield
    except OSError as e:
        raise MigpipeError(f"cannot write {path}: {e.strerror}") from None


class _FileImages:
    """Creates each block image as a file of its size, allocated before it is mapped: a store
    through a map into a hole the disk has no room for is a SIGBUS, an allocation that finds no
    room is an error."""

    def __init__(self, dir_fd: int, directory: Path) -> None:
        self._dir_fd = dir_fd
        self._directory = directory
        self.maps: dict[Path, mmap.mmap] = {}

    def __call__(self, name: str, size: int) -> mmap.mmap | bytearray:
        path = self._directory / image_file_name(name)
        fd = create_private(self._dir_fd, path.name, self._directory, os.O_RDWR)
        try:
            if not size:
                return bytearray()
            with _writing(path):
                os.posix_fallocate(fd, 0, size)
            self.maps[path] = mapping = mmap.mmap(fd, size)
            return mapping
        finally:
            os.close(fd)

    def close(self) -> None:
        """Write every image back (errors reported), and unmap them all in any case."""
        try:
            for path, mapping in self.maps.items():
                with _writing(path):
                    mapping.flush()
        finally:
            for mapping in self.maps.values():
                mapping.close()


def extract(
    records: Iterable[Record], directory: Path, page_size: int = fmt.DEFAULT_PAGE_SIZE
) -> dict:
    """Write the directory (created 0700, or an empty one of the caller's) from a whole
    stream's records; returns the manifest."""
    dir_fd = private_directory(directory, empty=True)
    try:
        return _extract_into(dir_fd, directory, records, page_size)
    finally:
        os.close(dir_fd)


def _extract_into(dir_fd: int, directory: Path, records: Iterable[Record], page_size: int) -> dict:
    files = _FileImages(dir_fd, directory)
    ram = RamImages(files, page_size)
    writer = StreamWriter()
    skeleton = Skeleton(page_size)
    device_bytes = bytearray()
    device_state_bytes = 0
    device_state = create_private(dir_fd, DEVICE_STATE, directory)
    try:
        for record in records:
            if skeleton.add(record):
                writer.write(device_bytes, record)
                if len(device_bytes) >= 1 << 20:
                    _write_out(device_state, device_bytes, directory / DEVICE_STATE)
                    device_state_bytes += len(device_bytes)
                    device_bytes.clear()
            else:
                ram.apply(record)
        _write_out(device_state, device_bytes, directory / DEVICE_STATE)
        device_state_bytes += len(device_bytes)
    finally:
        os.close(device_state)
        files.close()
    manifest = skeleton.finish()
    manifest["device_state_bytes"] = device_state_bytes
    for block in manifest["blocks"]:
        block["file"] = image_file_name(block["name"])
        block["pages_received"] = ram.pages_received[block["name"]]
    fd = create_private(dir_fd, MANIFEST, directory)
    try:
        _write_out(fd, (json.dumps(manifest, indent=2) + "\n").encode(), directory / MANIFEST)
    finally:
        os.close(fd)
    return manifest


def _write_out(fd: int, data: bytes | bytearray, path: Path) -> None:
    with _writing(path):
        write_all(fd, data)


def load_manifest(dir_fd: int, directory: Path) -> dict:
    """The manifest of the directory open as `dir_fd`, with every file it names checked to be
    a plain name inside the directory."""
    path = directory / MANIFEST
    try:
        with open(open_owned(dir_fd, MANIFEST, str(path)), "rb") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise MigpipeError(f"{directory}: not an extracted stream directory ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MigpipeError(f"{path}: not a {FORMAT} manifest")
    try:
        checked_blocks(manifest, manifest.get("page_size"), MANIFEST_LIMITS)
    except (ValueError, KeyError, TypeError, UnicodeError) as e:
        raise MigpipeError(f"{path}: a malformed manifest ({e})") from None
    for block in manifest.get("blocks", ()):
        name = block.get("file") if isinstance(block, dict) else None
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
            raise MigpipeError(f"{path}: {quoted(name)} is not a file name inside {directory}")
    return manifest


def rebuild(directory: Path) -> Iterator[Record]:
    """A single-pass stream holding exactly the directory's images and device state.

    Every file is opened inside the directory, never through a symlink, and only if it is a
    regular file of the caller's or root's: whoever wrote the manifest cannot make us read
    another file into the stream.
    """
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise MigpipeError(
            f"{directory}: not an extracted stream directory ({e.strerror})"
        ) from None
    try:
        manifest = load_manifest(dir_fd, directory)
        page_size = manifest["page_size"]
        files = {block["name"]: block["file"] for block in manifest["blocks"]}

        def pages(block: RamBlock) -> Iterator[tuple[int, bytes]]:
            path = directory / files[block.name]
            with open(open_owned(dir_fd, path.name, str(path)), "rb") as image:
                if os.fstat(image.fileno()).st_size != block.used_length:
                    raise MigpipeError(f"{path}: size differs from the manifest")
                for offset in range(0, block.used_length, page_size):
                    yield offset, image.read(page_size)

        def device_state() -> Iterator[bytes]:
            path = directory / DEVICE_STATE
            with open(open_owned(dir_fd, DEVICE_STATE, str(path)), "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        yield from compact_stream(manifest, pages, device_state())
    finally:
        os.close(dir_fd)
