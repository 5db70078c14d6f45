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
from migpipe.io.channel import CHUNK
from migpipe.stream.records import Record
from migpipe.stream.writer import StreamWriter

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


PRIVATE_MODE = 0o600


def foreign_owner(st: os.stat_result, *, root_ok: bool = True) -> str | None:
    """Why the file's owner is not to be trusted (neither us nor, when `root_ok`, root)."""
    if st.st_uid == os.geteuid() or (root_ok and st.st_uid == 0):
        return None
    return f"it is owned by uid {st.st_uid}, not by uid {os.geteuid()}" + (
        " or root" if root_ok else ""
    )


def distrust(st: os.stat_result, *, root_ok: bool = True) -> str | None:
    """Why another user could change this file or directory, or None when nobody can.

    Its owner must be us (or root, when `root_ok`), and its group and others must not write it;
    a directory of root's with the sticky bit (/tmp) is the exception when `root_ok`: there
    nobody can rename or remove what is ours.
    """
    sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and st.st_uid == 0
    if st.st_mode & 0o022 and not (root_ok and sticky):
        return f"its group or others can write it (mode {stat.S_IMODE(st.st_mode):04o})"
    return foreign_owner(st, root_ok=root_ok)


def private_directory(path: Path, *, empty: bool) -> int:
    """A descriptor on the directory `path`, created 0700 (and its parents) when absent.

    An existing one must be ours and closed to group and others (and empty, when `empty`):
    whoever else can write in it can plant a name where we are about to write, or swap what we
    wrote; checked on the descriptor, so the directory checked is the one written.
    """
    created = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass
    except OSError as e:
        raise MigpipeError(f"cannot create {path}: {e.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise MigpipeError(f"cannot open {path}: {e.strerror}") from None
    try:
        if created:
            os.fchmod(fd, 0o700)  # whatever the umask
        why = distrust(os.fstat(fd), root_ok=False)
        if why is None and empty and os.listdir(fd):
            why = "it is not empty"
        if why is not None:
            raise MigpipeError(f"refusing directory {path}: {why}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_directories_up(dir_fd: int, shown: str) -> None:
    """Refuse `shown` unless every directory from `dir_fd` up to / is ours or root's and closed
    to other writers (root's sticky ones, as /tmp, excepted), as ssh's StrictModes: whoever can
    write one of them can put another file in place of ours. Walked by "..", so the directories
    checked are the ones that hold the file, whatever symlinks led there."""
    fd = os.dup(dir_fd)
    try:
        while True:
            st = os.fstat(fd)
            why = distrust(st)
            if why is not None:
                where = os.readlink(f"/proc/self/fd/{fd}")
                raise MigpipeError(f"refusing {shown}: directory {where}: {why}")
            try:  # O_PATH: a directory we may only cross (mode 0711) is still checked
                parent = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                raise MigpipeError(
                    f"cannot check the directories above {shown}: {e.strerror}"
                ) from None
            os.close(fd)
            fd = parent
            above = os.fstat(fd)
            if (above.st_dev, above.st_ino) == (st.st_dev, st.st_ino):  # / is its own parent
                return
    finally:
        os.close(fd)


def create_private(dir_fd: int, name: str, directory: Path, flags: int = os.O_WRONLY) -> int:
    """A new file `name` (mode 0600, whatever the umask) in the directory open as `dir_fd`.

    O_EXCL|O_NOFOLLOW: a name someone planted there (a symlink, a hard link to another file) is
    refused, never followed, truncated or written.
    """
    creating = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags | creating, PRIVATE_MODE, dir_fd=dir_fd)
    except OSError as e:
        raise MigpipeError(f"cannot create {directory / name}: {e.strerror}") from None
    os.fchmod(fd, PRIVATE_MODE)
    return fd


def open_owned(dir_fd: int, name: str, shown: str) -> int:
    """`name` in the directory open as `dir_fd`, for reading, if it is a regular file of ours
    or root's: never a symlink followed to a file its author cannot read (a confused deputy),
    nor a FIFO that would hang the open (O_NONBLOCK)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        why = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise MigpipeError(f"cannot open {shown}: {why}") from None
    st = os.fstat(fd)
    why = "it is not a regular file" if not stat.S_ISREG(st.st_mode) else foreign_owner(st)
    if why is not None:
        os.close(fd)
        raise MigpipeError(f"refusing {shown}: {why}")
    return fd


def write_all(fd: int, data: bytes | bytearray) -> None:
    """All of `data` through unbuffered writes (a write may take only part of it): an error is
    raised here, once, not again by a buffer flushed when the file is closed."""
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


class NameTaken(MigpipeError):
    """The name an atomic file was to take exists, or appeared while the file was written."""


@contextlib.contextmanager
def _atomic(
    path: Path, force: bool, dir_fd: int | None = None, link_only: bool = False
) -> Iterator[tuple[int, Path]]:
    """A temporary file beside `path` (its descriptor and name), published as `path` when the
    block ends without error; see atomic_path and atomic_fd."""
    if os.path.lexists(path) and not force:  # a dangling symlink is somebody's name too
        raise NameTaken(f"{path} exists; use --force to replace it")
    if dir_fd is None:
        try:
            directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise MigpipeError(f"cannot create a file in {path.parent}: {e.strerror}") from None
    else:
        directory = os.dup(dir_fd)
    try:
        try:  # made in the directory open as `directory`, whatever its name means meanwhile
            fd, name = tempfile.mkstemp(
                prefix=f".{path.name}.", suffix=".partial", dir=f"/proc/self/fd/{directory}"
            )
        except OSError as e:
            raise MigpipeError(f"cannot create a file in {path.parent}: {e.strerror}") from None
        os.fchmod(fd, PRIVATE_MODE)  # whatever the umask
        temporary = os.path.basename(name)
        try:
            yield fd, path.parent / temporary
            if force:
                os.replace(temporary, path.name, src_dir_fd=directory, dst_dir_fd=directory)
            else:
                _publish_new(directory, temporary, path, link_only)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=directory)
            raise
        os.fsync(directory)
    finally:
        os.close(directory)


@contextlib.contextmanager
def atomic_path(path: Path, *, force: bool = False) -> Iterator[Path]:
    """A temporary name beside `path`, published as `path` when the block ends without error.

    The caller writes the temporary file and syncs its data; publishing and the directory sync
    happen here. An existing file is refused unless `force`, and even then it is replaced only
    by the final rename, so a failure (or a SIGKILL) at any point leaves it untouched; what is
    left behind then is a `.NAME.*.partial` file. Without `force` the file is published by a
    hard link, which fails if anything took the name meanwhile (a save can run for minutes),
    never by a rename that would replace it. The file is 0600 whatever the umask, as libvirt's
    save images are: it holds a guest's memory. Prefer atomic_fd where the caller can write
    through a descriptor: a name reopened can be swapped by whoever can write the directory.
    """
    with _atomic(path, force) as (fd, temporary):
        os.close(fd)
        yield temporary


@contextlib.contextmanager
def atomic_fd(
    path: Path, *, force: bool = False, dir_fd: int | None = None, link_only: bool = False
) -> Iterator[int]:
    """As atomic_path, but the caller writes (and syncs) through the descriptor that created
    the temporary file, never reopening it by name.

    `dir_fd`, a descriptor on `path`'s directory that the caller has checked, is the one
    created in, published in and synced, whatever its name comes to mean meanwhile.
    `link_only` refuses a file system without hard links rather than fall back to a
    check-then-rename: for a file whose loss is not to be risked at all (a key).
    """
    with _atomic(path, force, dir_fd, link_only) as (fd, _):
        try:
            yield fd
        finally:
            os.close(fd)


def _publish_new(dir_fd: int, temporary: str, path: Path, link_only: bool) -> None:
    """Give `temporary` the name `path` unless something has it; then drop the temporary name."""
    try:
        os.link(temporary, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except FileExistsError:
        raise NameTaken(
            f"{path} appeared while this file was written; left untouched, "
            "nothing saved (use --force to replace it)"
        ) from None
    except OSError as e:
        if link_only or e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # A file system without hard links: the narrow check-then-rename is the best left.
        try:
            os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(temporary, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        raise NameTaken(
            f"{path} appeared while this file was written; left untouched, nothing saved"
        ) from None
    os.unlink(temporary, dir_fd=dir_fd)


@contextlib.contextmanager
def atomic_output(path: Path, *, force: bool = False) -> Iterator[BinaryIO]:
    """A file that appears under `path` only once complete and synced, never half-written."""
    with atomic_fd(path, force=force) as fd, open(fd, "wb", closefd=False) as f:
        yield f
        f.flush()
        os.fsync(fd)


@contextlib.contextmanager
def open_output(path: str | None, *, force: bool = False) -> Iterator[BinaryIO]:
    """Standard output when no path is given (refusing a terminal), else an atomic file."""
    if path is None or path == "-":
        if sys.stdout.isatty():
            raise MigpipeError(  # the option differs: -o (generate), --out (encode, decode)
                "refusing to write a binary stream to standard output, a terminal; "
                "redirect it, or name a file"
            )
        enlarge_pipe(sys.stdout.fileno())
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with atomic_output(Path(path), force=force) as f:
        yield f


# -- secrets on disk: a key, a passphrase, a TLS private key ----------------------------------

MAX_SECRET_FILE = 64 << 10


def _check_private(st: os.stat_result, what: str) -> None:
    """Refuse a secret on disk that another user could read, or replace (its owner)."""
    if not stat.S_ISREG(st.st_mode):
        return
    why = foreign_owner(st)
    if why is not None:
        raise MigpipeError(f"refusing {what}: {why}")
    if st.st_mode & 0o077:
        raise MigpipeError(
            f"{what} can be read by its group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "chmod 600 it"
        )


def read_private_file(path: str, what: str) -> bytes:
    """A secret file's bytes, refused when others could read it or put another in its place:
    as ssh's StrictModes, the file must be a regular file (not a symlink) of ours or root's,
    and every directory above it ours or root's and not writable by others (see
    check_directories_up)."""
    shown = f"{what} {path}"
    parent, name = os.path.split(path)
    try:
        dir_fd = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise MigpipeError(f"cannot open {shown}: {e.strerror}") from None
    try:
        check_directories_up(dir_fd, shown)
        fd = open_owned(dir_fd, name, shown)
    finally:
        os.close(dir_fd)
    try:
        _check_private(os.fstat(fd), shown)
        return _read_bounded(fd, shown)
    finally:
        os.close(fd)


def read_private_fd(fd: int, what: str) -> bytes:
    """A secret handed over as a descriptor (by a daemon, or a shell's `3<file`); a file on
    disk behind it must be private and ours or root's, a memfd (never on disk) need not."""
    try:
        in_memory = os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
        if not in_memory:
            _check_private(os.fstat(fd), f"the file behind {what} {fd}")
    except OSError as e:
        raise MigpipeError(f"{what} {fd}: {e.strerror}") from None
    return _read_bounded(fd, f"{what} {fd}")


def _read_bounded(fd: int, what: str) -> bytes:
    data = bytearray()
    while chunk := os.read(fd, MAX_SECRET_FILE + 1 - len(data)):
        data += chunk
        if len(data) > MAX_SECRET_FILE:
            raise MigpipeError(f"{what} is larger than {MAX_SECRET_FILE} bytes: not a secret")
    return bytes(data)
