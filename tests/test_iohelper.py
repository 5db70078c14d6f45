"""`migpipe iohelper PATH FD` run as libvirt runs libvirt_iohelper: a child process handed a real
file descriptor (O_DIRECT or not), copying between it and a pipe on stdin or stdout."""

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from test_direct import payload, private_mount, resident_pages

from migpipe.errors import EXIT_PEER_GONE

IOHELPER = [sys.executable, "-m", "migpipe", "iohelper"]
MIB = 1 << 20


def open_fd(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


def save(path: Path, fd: int, data: bytes, **kwargs) -> subprocess.CompletedProcess:
    """libvirt's save: the file is the child's stdout, FD 1, and the stream comes on stdin."""
    try:
        return subprocess.run(
            [*IOHELPER, str(path), "1"],
            input=data,
            stdout=fd,
            stderr=subprocess.PIPE,
            check=False,
            **kwargs,
        )
    finally:
        os.close(fd)


def restore(path: Path, fd: int) -> subprocess.CompletedProcess:
    """libvirt's restore: the file is the child's stdin, FD 0, and the stream goes to stdout."""
    try:
        return subprocess.run(
            [*IOHELPER, str(path), "0"], stdin=fd, capture_output=True, check=False
        )
    finally:
        os.close(fd)


def failure(path: Path, message: str) -> bytes:
    return f"migpipe iohelper: failure with {path}: {message}\n".encode()


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 5 * MIB + 4097])
def test_save_and_restore_with_o_direct(tmp_path: Path, size: int) -> None:
    data, path = payload(size), tmp_path / "save.img"
    result = save(path, open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT), data)
    assert (result.returncode, result.stderr) == (0, b"")
    if size:
        assert resident_pages(path) == 0
    assert path.read_bytes() == data  # which brings the file into the cache; drop it again
    os.posix_fadvise(fd := os.open(path, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    result = restore(path, open_fd(path, os.O_RDONLY | os.O_DIRECT))
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == data
    if size:
        assert resident_pages(path) == 0


def test_the_fd_need_not_be_stdin_or_stdout(tmp_path: Path) -> None:
    """FD names the disk side whatever its number; the other side is stdin or stdout."""
    data, path = payload(3 * MIB + 1), tmp_path / "save.img"
    fd = open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    os.set_inheritable(fd, True)
    result = subprocess.run(
        [*IOHELPER, str(path), str(fd)],
        input=data,
        capture_output=True,
        pass_fds=(fd,),
        check=False,
    )
    os.close(fd)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert path.read_bytes() == data


def test_without_o_direct_the_copy_starts_at_the_file_position(tmp_path: Path) -> None:
    """libvirt writes its header itself, then hands over the fd for the stream to follow it."""
    data, path = payload(2 * MIB + 3), tmp_path / "save.img"
    fd = open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.write(fd, b"LibvirtQemudPart")
    result = save(path, fd, data)
    assert (result.returncode, result.stderr) == (0, b"")
    assert path.read_bytes() == b"LibvirtQemudPart" + data
    fd = open_fd(path, os.O_RDONLY)
    os.lseek(fd, 16, os.SEEK_SET)
    assert restore(path, fd).stdout == data


def test_refusals(tmp_path: Path) -> None:
    path = tmp_path / "save.img"
    path.write_bytes(payload(8192))
    result = save(path, open_fd(path, os.O_RDWR), b"x")
    assert (result.returncode, result.stderr) == (
        1,
        failure(path, "fd 1 is open for reading and writing; give one direction"),
    )
    result = save(path, open_fd(path, os.O_WRONLY | os.O_DIRECT), b"x")
    assert (result.returncode, result.stderr) == (
        1,
        failure(path, "O_DIRECT write needs an empty seekable file"),
    )
    fd = open_fd(path, os.O_RDONLY | os.O_DIRECT)
    os.lseek(fd, 4096, os.SEEK_SET)
    result = restore(path, fd)
    assert (result.returncode, result.stdout, result.stderr) == (
        1,
        b"",
        failure(path, "O_DIRECT read needs the entire seekable file, from offset 0"),
    )
    result = subprocess.run([*IOHELPER, str(path), "9"], capture_output=True, check=False)
    assert (result.returncode, result.stderr) == (
        1,
        failure(path, "cannot use fd 9: Bad file descriptor"),
    )


def test_a_full_file_system(tmp_path: Path) -> None:
    with private_mount(tmp_path, "tmpfs", "size=4m") as small:
        path = small / "save.img"
        result = save(path, open_fd(path, os.O_WRONLY | os.O_CREAT), payload(16 * MIB))
        assert result.returncode == 1
        prefix = failure(path, f"cannot write {path}: No space left on device (at byte offset ")
        assert result.stderr.startswith(prefix.rstrip(b"\n"))
        assert result.stderr.count(b"\n") == 1


def test_a_file_size_limit_under_o_direct(tmp_path: Path) -> None:
    path, limit = tmp_path / "save.img", 8 * MIB
    result = save(
        path,
        open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT),
        payload(20 * MIB),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert (result.returncode, result.stderr) == (
        1,
        failure(path, f"cannot write {path}: File too large (at byte offset {limit})"),
    )


def test_restore_into_a_reader_that_goes_away(tmp_path: Path) -> None:
    path = tmp_path / "save.img"
    path.write_bytes(payload(32 * MIB))
    fd = open_fd(path, os.O_RDONLY | os.O_DIRECT)
    child = subprocess.Popen(
        [*IOHELPER, str(path), "0"], stdin=fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    os.close(fd)
    assert child.stdout is not None and child.stderr is not None
    assert len(child.stdout.read(MIB)) == MIB
    child.stdout.close()
    assert child.wait(timeout=60) == EXIT_PEER_GONE
    assert child.stderr.read() == failure(
        path, "standard output closed by the reader (broken pipe)"
    )
