"""Buffers bounded in time, not bytes: what sits between QEMU and the link when QEMU stops the
guest must all cross during the guest's pause, so it is held to BUFFER_TIME at the rate the
bytes actually move.

A pipe's kernel buffer (1 MiB once, 16 times the default) is resized as the measured rate
changes: at 30 MB/s 128 KiB, at 1 GB/s the 1 MiB that keeps wake-ups rare. A fixed size is
wrong at one end or the other: at 10 MB/s a megabyte is 100 ms of pause, and with xbzrle a
megabyte of wire can be 30 of QEMU's. The rate is measured where the bytes move (the stage
reading or writing that pipe), over windows of at least WINDOW, so it is the bottleneck's rate
whenever the pipeline is backed up, which is when buffers fill. Where the bytes read expand
(the wire: xbzrle deltas become whole pages in decode), that rate lags when pages start to
compress far better, as they do in a busy guest's last passes; so such a buffer also holds no
more than WIRE_TIME of the rate the pages go on at, at the latest frames' expansion
(PipeBuffer.expands). That is shorter than BUFFER_TIME, in a pipe as small as a page: a wire
byte there may be 300 bytes of pages for decode to rebuild and QEMU to load, and when QEMU
loads slowly every stage behind it fills, so the wire's buffers were most of what crossed in
the guest's pause (traced: 14-48 MB of pages in flight when QEMU wrote its last byte in 6 runs
of 26; 6 MB at most in 8 runs with 1 ms in a page).
"""

import contextlib
import fcntl
import os
import socket
import stat
import time
from collections import deque

from migpipe.io.channel import FdChannel, Sink, Source

BUFFER_TIME = 0.004  # seconds of the measured rate one buffer may hold
WIRE_TIME = 0.001  # seconds of what its bytes become a wire buffer may hold (expands())
WINDOW = 0.05  # a rate is measured over at least this long
MIN_PIPE = 16 << 10
MIN_WIRE_PIPE = 4 << 10  # a page, the kernel's least
MAX_PIPE = 1 << 20  # pipe-max-size on stock Linux
RECENT = 8  # frames whose expansion sizes a buffer that expands (PipeBuffer.expands)


class Rate:
    """Bytes per second over the last window of at least WINDOW seconds (None until then).

    One thread adds; any may read `per_second` (a float, replaced whole).
    """

    def __init__(self) -> None:
        self.per_second: float | None = None
        self._start = time.monotonic()
        self._bytes = 0

    def add(self, count: int) -> bool:
        """Count `count` bytes moved now; True when that closed a window (a new rate)."""
        self._bytes += count
        now = time.monotonic()
        elapsed = now - self._start
        if elapsed < WINDOW:
            return False
        self.per_second = self._bytes / elapsed
        self._start, self._bytes = now, 0
        return True

    def budget(self, low: int, high: int) -> int:
        """BUFFER_TIME's worth of bytes at this rate, within [low, high] (`low` until the rate
        is known: small first, grown once the rate shows it is fast)."""
        if self.per_second is None:
            return low
        return min(high, max(low, int(self.per_second * BUFFER_TIME)))


class PipeBuffer:
    """The kernel buffer of a pipe or UNIX socket a stage reads or writes, sized to the rate
    through it, which the stage reports (moved()) and reads back (`rate`).

    A pipe's size is set with F_SETPIPE_SZ; shrinking below what it holds fails with EBUSY,
    and the next window tries again. A UNIX stream socket's sender is held by its send buffer
    (what the peer has not read counts against it), so that is set (SO_SNDBUF; the kernel
    doubles it for its bookkeeping). Anything else is left alone: a file; a TCP socket, whose
    unsent bytes io.transport bounds with TCP_NOTSENT_LOWAT while the kernel sizes what the
    link needs in flight; a TLS channel, which rides such a socket.
    """

    def __init__(self, end: Source | Sink) -> None:
        self.rate = Rate()
        self._fd: int | None = None
        self._size = 0
        self._unix = False
        self._recent: deque[tuple[int, int]] = deque(maxlen=RECENT)  # see expands()
        self._expanded: int | None = None
        if isinstance(end, FdChannel):
            with contextlib.suppress(OSError):
                mode = os.fstat(end.fd).st_mode
                if stat.S_ISSOCK(mode):
                    with socket.socket(fileno=os.dup(end.fd)) as sock:
                        self._unix = sock.family == socket.AF_UNIX
                if stat.S_ISFIFO(mode) or self._unix:
                    self._fd = end.fd
                    self._resize(MIN_PIPE)  # until the rate is known (it may have been enlarged)

    def moved(self, count: int) -> bool:
        """Count `count` bytes read or written through it now; True when that closed a window
        of `rate`, after which the buffer holds BUFFER_TIME at the new rate."""
        if not self.rate.add(count):
            return False
        self._fit()
        return True

    def expands(self, carried: int, rebuilt: int, rate: Rate) -> None:
        """Bytes through it stand for more: `carried` of them are `rebuilt` QEMU bytes (xbzrle's
        deltas become whole pages in decode), which go on at `rate` (decode's output, or
        encode's input: the pipeline's pace when it is backed up). Then the buffer holds no
        more than WIRE_TIME of that rate in what its bytes become, at the latest frames'
        expansion, at once: its own rate (its bytes per second, measured over a window) lags
        when pages start to compress far better, and each byte held is then more of the
        pause. Both ends of the wire report it: encode's pipe out and decode's pipe in."""
        self._recent.append((carried, rebuilt))
        if rate.per_second is None or not carried:
            return
        wire = sum(c for c, _ in self._recent)
        qemu = sum(r for _, r in self._recent)
        self._expanded = int(rate.per_second * WIRE_TIME * wire / max(qemu, 1))
        self._fit()

    def _fit(self) -> None:
        if self._fd is None:
            return
        wanted = self.rate.budget(MIN_PIPE, MAX_PIPE)
        size = 1 << (wanted - 1).bit_length()  # the kernel's sizes: powers of two
        if self._expanded is not None and self._expanded < size:  # no more than that
            size = 1 << (max(self._expanded, MIN_WIRE_PIPE).bit_length() - 1)
        self._resize(size)

    def _resize(self, size: int) -> None:
        if size == self._size:
            return
        with contextlib.suppress(OSError):  # EBUSY (fuller than that), EPERM (over the max)
            if self._unix:
                with socket.socket(fileno=os.dup(self._fd)) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size // 2)
                self._size = size
            else:
                self._size = fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, size)
