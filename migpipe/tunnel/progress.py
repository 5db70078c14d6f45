"""Progress on stderr while a stream crosses, as pv draws it, and the final figures.

One line, redrawn in place every INTERVAL and cut to the terminal's width: a line that wraps
can no longer be redrawn by a carriage return, and each redraw would leave a row behind.
Nothing is drawn before the stream's first byte comes out, so a passphrase prompt (decode
asks once the wire's header is in) is never drawn over, and the rates leave the time a user
took to type out. `--progress=json` writes one JSON object per line instead, for scripts.
"""

import json
import os
import sys
import time
from collections import deque
from typing import TextIO

import trio

INTERVAL = 0.5
WINDOW = 5  # samples the current rate is taken over: the last 2 to 2.5 s, as pv's
RATIO_FLOOR = 64 << 10  # wire bytes before a ratio means something (not a header's 1:10000)

_open: TextIO | None = None  # the stream a progress line is drawn on and not yet ended


def close_line() -> None:
    """End a progress line still open, so that an error or a shell prompt starts a line."""
    global _open
    if _open is not None:
        _open.write("\n")
        _open.flush()
        _open = None


def binary(size: float) -> str:
    """Bytes in pv's and zstd's units: 512 B, 1.5 KiB, 148.1 MiB, 2.00 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def clock(seconds: float) -> str:
    """H:MM:SS, as pv's elapsed time and ETA."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class Progress:
    """Redraws `label` and the figures of `totals` (read live) every INTERVAL.

    `stream_size` is what the QEMU stream will be, `size` what the wire will be, when the
    caller knows (encode's or decode's input file, restore's file): either gives a share done
    and an ETA, as does a `totals.wire_expected` the reader sets."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, size: int | None = None) -> None:
        self._label = label
        self._stream = stream
        self._started = time.monotonic()
        self._samples: deque[tuple[float, int, int]] = deque(maxlen=WINDOW + 1)
        self._flowing = self._started  # the last sample before the stream's first byte
        self.size = size
        self.stream_size: int | None = None

    def sample(self, totals) -> None:
        """Take the figures now. Until the first byte comes out, only the latest sample is
        kept: the rates count from it, not from the start (a prompt, QEMU's setup)."""
        now = time.monotonic()
        if not totals.qemu_bytes:
            self._samples.clear()
            self._flowing = now
        self._samples.append((now, totals.qemu_bytes, totals.wire_bytes))

    def fields(self, totals, final: bool = False) -> list[str]:
        """The figures, most wanted first: a narrow terminal cuts from the end."""
        now = time.monotonic()
        first, last = self._samples[0], self._samples[-1]
        span = last[0] - first[0]
        wire_rate = (last[2] - first[2]) / span if span > 0 else 0.0
        if final:  # the whole run's, from the first byte
            span, first = now - self._flowing, (self._flowing, 0, 0)
        rate = (last[1] - first[1]) / span if span > 0 else 0.0
        elapsed = clock(now - self._started)
        shown = [
            f"done in {elapsed}" if final else elapsed,
            f"{binary(rate)}/s" + (" average" if final else ""),
            f"{binary(totals.qemu_bytes)} stream",
            f"{binary(totals.wire_bytes)} wire",
        ]
        if self.stream_size:
            done, size, speed = totals.qemu_bytes, self.stream_size, rate
        else:
            done, size, speed = totals.wire_bytes, self.wire_expected(totals), wire_rate
        if size and not final:
            shown.append(f"{min(done / size, 1.0):.0%}")
            if speed > 0:
                shown.append(f"ETA {clock(max(size - done, 0) / speed)}")
        if totals.wire_bytes >= RATIO_FLOOR or (final and totals.wire_bytes):
            shown.append(f"ratio {totals.qemu_bytes / totals.wire_bytes:.2f}")
        xbzrle = totals.counters().get("xbzrle", {})
        if "hits" in xbzrle:  # encode's cache, as QEMU's `info migrate` shows its own
            shown.append(f"xbzrle hits {xbzrle['hits']:,} misses {xbzrle['misses']:,}")
        pages = " ".join(f"{kind} {count:,}" for kind, count in totals.pages.items() if count)
        if pages:
            shown.append(f"pages: {pages}")
        return shown

    def wire_expected(self, totals) -> int | None:
        """What the wire will be once done: what its reader knows (restore's, of the file it
        reads), else the size the caller gave; None when unknown."""
        return totals.wire_expected or self.size

    def line(self, totals, width: int | None, final: bool = False) -> str:
        """`label: fields`, as many whole fields as fit in `width` - 1 columns (the last
        column would make some terminals wrap); all of them when `width` is None."""
        line = f"{self._label}:"
        for field in self.fields(totals, final):
            if width is not None and len(line) + 2 + len(field) > width - 1:
                break
            line += (" " if line.endswith(":") else ", ") + field
        return line

    def _width(self) -> int | None:
        """The terminal's width now (it may have been resized); None for a file or pipe,
        where no line wraps (--progress asked for there)."""
        try:
            return os.get_terminal_size(self._stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            return None

    def _draw(self, text: str) -> None:
        global _open
        self._stream.write("\r" + text + "\x1b[K")  # erase what a longer line left
        self._stream.flush()
        _open = self._stream

    async def run(self, totals) -> None:
        """Redraw until cancelled (the pipeline's nursery cancels it when done)."""
        self._started = time.monotonic()
        self.sample(totals)
        while True:
            await trio.sleep(INTERVAL)
            self.sample(totals)
            if totals.qemu_bytes:
                self._draw(self.line(totals, self._width()))

    def finish(self, totals) -> None:
        """The final line, in place of the last redraw."""
        self.sample(totals)
        self._draw(self.line(totals, self._width(), final=True))
        close_line()


class JsonProgress(Progress):
    """One JSON object per line every INTERVAL, and a last one with "done": true."""

    def record(self, totals, final: bool = False) -> dict:
        """The figures as `migpipe(1)` lists them; `rate` is stream bytes per second over the
        last seconds, or the whole run's in the last record."""
        first, last = self._samples[0], self._samples[-1]
        span = last[0] - first[0]
        if final:
            span, first = time.monotonic() - self._flowing, (self._flowing, 0, 0)
        size = self.wire_expected(totals)
        return {
            "command": self._label,
            "done": final,
            "elapsed": round(time.monotonic() - self._started, 3),
            "qemu_bytes": totals.qemu_bytes,
            "wire_bytes": totals.wire_bytes,
            "wire_expected": size,
            "stream_expected": self.stream_size,
            "rate": round((last[1] - first[1]) / span) if span > 0 else None,
            "pages": totals.pages,
            "filters": totals.counters(),
        }

    def _write(self, record: dict) -> None:
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()

    async def run(self, totals) -> None:
        self._started = time.monotonic()
        self.sample(totals)
        while True:
            await trio.sleep(INTERVAL)
            self.sample(totals)
            self._write(self.record(totals))

    def finish(self, totals) -> None:
        self.sample(totals)
        self._write(self.record(totals, final=True))
