"""`migpipe iohelper PATH FD`: libvirt_iohelper's command-line contract, disk I/O overlapped.

libvirt puts its iohelper between a pipe and a save image that the caller opened (with O_DIRECT
for --bypass-cache): FD is the image, PATH only names it in messages. FD's access mode gives the
direction: write-only copies standard input to FD, read-only copies FD to standard output, and
read-write is refused. Under O_DIRECT a regular file must be empty to be written and is read from
offset 0, whole; the copy ends with fdatasync of its output and a close of FD whose error is a
failure. A failure is one line on stderr, "PROG: failure with PATH: MESSAGE", and a non-zero
exit status. Unlike libvirt's loop, which reads 1 MiB and then writes it, the disk side here runs
in a thread of its own (DirectWriter, DirectReader), so the pipe and the disk work at once.
"""

import fcntl
import os
import stat
import sys

from migpipe.errors import MigpipeError
from migpipe.io.direct import DirectFile, DirectReader, DirectWriter, datasync
from migpipe.io.files import enlarge_pipe

PROG = "migpipe iohelper"
STDIN, STDOUT = 0, 1


def copy(path: str, fd: int) -> int:
    """Copy between `fd` and standard input or output, as its access mode says; the byte count."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError as e:
        raise MigpipeError(f"cannot use fd {fd}: {e.strerror}") from None
    access = flags & os.O_ACCMODE
    if access == os.O_RDWR:
        raise MigpipeError(f"fd {fd} is open for reading and writing; give one direction")
    checked = regular and flags & os.O_DIRECT  # O_DIRECT copies of a file are all or nothing
    with DirectFile(fd, path) as file:
        if access == os.O_WRONLY:
            if checked and os.lseek(fd, 0, os.SEEK_END):
                raise MigpipeError("O_DIRECT write needs an empty seekable file")
            enlarge_pipe(STDIN)
            with DirectWriter(file) as writer:
                writer.pump(STDIN)
                return writer.finish()
        if checked and os.lseek(fd, 0, os.SEEK_CUR):
            raise MigpipeError("O_DIRECT read needs the entire seekable file, from offset 0")
        enlarge_pipe(STDOUT)
        with DirectReader(file) as reader:
            count = reader.pump(STDOUT, "standard output")
        datasync(STDOUT, "standard output")
        return count


def main(path: str, fd: int) -> int:
    """Run copy() with libvirt's error contract: the exit status, the error line on stderr."""
    try:
        copy(path, fd)
    except MigpipeError as e:
        print(f"{PROG}: failure with {path}: {e}", file=sys.stderr)
        return e.status
    return 0
