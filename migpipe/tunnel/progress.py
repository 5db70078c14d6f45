"""A one-line progress report on stderr while a stream crosses, and the final figures."""

import sys
import time
from typing import TextIO

import trio

INTERVAL = 0.5


class Progress:
    """Redraws `label: in, out, MB/s, ratio, pages` every INTERVAL; `totals` is read live."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, size: int | None = None) -> None:
        self._label = label
        self._stream = stream
        self._started = time.monotonic()
        self.size = size  # of the file being read, when known: a share done and an ETA

    def line(self, totals) -> str:
        seconds = max(time.monotonic() - self._started, 1e-9)
        ratio = totals.qemu_bytes / totals.wire_bytes if totals.wire_bytes else 0.0
        pages = ", ".join(f"{kind} {count:,}" for kind, count in totals.pages.items() if count)
        return (
            f"{self._label}: {totals.qemu_bytes / 1e6:,.1f} MB stream, "
            f"{totals.wire_bytes / 1e6:,.1f} MB wire, "
            f"{totals.qemu_bytes / seconds / 1e6:,.0f} MB/s, ratio {ratio:.2f}"
            + (f", pages: {pages}" if pages else "")
            + self._eta(totals.wire_bytes, totals.wire_expected or self.size, seconds)
        )

    @staticmethod
    def _eta(done: int, size: int | None, seconds: float) -> str:
        if not size or not done:
            return ""
        share = min(done / size, 1.0)
        return f", {share:.0%}, ETA {seconds * (1 - share) / share:,.0f} s"

    async def run(self, totals) -> None:
        """Redraw until cancelled (the pipeline's nursery cancels it when done)."""
        while True:
            await trio.sleep(INTERVAL)
            self._stream.write("\r" + self.line(totals) + "\x1b[K")
            self._stream.flush()

    def finish(self, totals) -> None:
        self._stream.write("\r" + self.line(totals) + "\x1b[K\n")
        self._stream.flush()
