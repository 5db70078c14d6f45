"""Reading streams from files or pipes, and writing outputs that never appear half-written."""

import contextlib
import errno
import fcntl
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from migpipe.errors import MigpipeError
from migpipe.stream.records import Record
from migpipe.stream.writer import StreamWriter

CHUNK = 1 << 20
PIPE_SIZE = 1 << 20  # pipe-max-size on stock Linux; 16x fewer wake-ups than the 64 KiB default


def enlarge_pipe(fd: int) -> None:
    """Give a pipe a 1 MiB buffer; anything else (files, ttys, sockets) is left alone."""
    with contextlib.suppress(OSError):
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


@contextlib.contextmanager
def open_input(path: str) -> Iterator[BinaryIO]:
    """A file by name, or standard input for '-'."""
    if path == "-":
        enlarge_pipe(sys.stdin.fileno())
        yield sys.stdin.buffer
        return
    try:
        f = open(path, "rb")  # noqa: SIM115 -- closed below, after the caller is done
    except OSError as e:
        raise MigpipeError(f"cannot open {path}: {e.strerror}") from None
    with f:
        yield f


def write_stream(records: Iterable[Record], out: BinaryIO) -> None:
    """Write records as QEMU stream bytes, in 1 MiB batches."""
    writer, buffer = StreamWriter(), bytearray()
    for record in records:
        writer.write(buffer, record)
        if len(buffer) >= CHUNK:
            out.write(buffer)
            buffer.clear()
    out.write(buffer)


def read_chunks(f: BinaryIO, size: int = CHUNK) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk


@contextlib.contextmanager
def atomic_path(path: Path, *, force: bool = False) -> Iterator[Path]:
    """A temporary name beside `path`, published as `path` when the block ends without error.

    The caller writes the temporary file and syncs its data; publishing and the directory sync
    happen here. An existing file is refused unless `force`, and even then it is replaced only
    by the final rename, so a failure (or a SIGKILL) at any point leaves it untouched; what is
    left behind then is a `.NAME.*.partial` file. Without `force` the file is published by a
    hard link, which fails if anything took the name meanwhile (a save can run for minutes),
    never by a rename that would replace it. The file is 0600 whatever the umask, as libvirt's
    save images are: it holds a guest's memory.
    """
    if os.path.lexists(path) and not force:  # a dangling symlink is somebody's name too
        raise MigpipeError(f"{path} exists; use --force to replace it")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as e:
        raise MigpipeError(f"cannot create a file in {path.parent}: {e.strerror}") from None
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        if force:
            os.replace(temporary, path)
        else:
            _publish_new(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _publish_new(temporary: Path, path: Path) -> None:
    """Give `temporary` the name `path` unless something has it; then drop the temporary name."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise MigpipeError(f"{path} appeared while this file was written; left untouched, "
                           "nothing saved (use --force to replace it)") from None  # fmt: skip
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # A file system without hard links: the narrow check-then-rename is the best left.
        if os.path.lexists(path):
            raise MigpipeError(f"{path} appeared while this file was written; left "
                               "untouched, nothing saved") from None  # fmt: skip
        os.rename(temporary, path)
        return
    os.unlink(temporary)


@contextlib.contextmanager
def atomic_output(path: Path, *, force: bool = False) -> Iterator[BinaryIO]:
    """A file that appears under `path` only once complete and synced, never half-written."""
    with atomic_path(path, force=force) as temporary, open(temporary, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def open_output(path: str | None, *, force: bool = False) -> Iterator[BinaryIO]:
    """Standard output when no path is given (refusing a terminal), else an atomic file."""
    if path is None or path == "-":
        if sys.stdout.isatty():
            raise MigpipeError("refusing to write a binary stream to a terminal; use -o FILE")
        enlarge_pipe(sys.stdout.fileno())
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with atomic_output(Path(path), force=force) as f:
        yield f
