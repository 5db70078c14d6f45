"""Lines out of a byte stream, without I/O: the framing of every JSON-lines protocol migpipe
speaks (QMP, migpipe serve and its client), written once.

Bytes go in as they arrive, in any chunking; complete lines come out one at a time, without
their newline. A line is bounded: a peer that never ends one would otherwise make the buffer
grow without limit. What a line means (JSON, blank lines, fds that came with it) is each
protocol's business.
"""


class LineTooLong(ValueError):
    """The next line exceeds the limit, ended or not; each protocol words its own error."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"a line longer than {limit} bytes")
        self.limit = limit


class LineSplitter:
    """Complete lines of at most `max_line` bytes (the newline not counted) out of what is fed."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._scanned = 0  # no newline before this offset of _buffer: a long line is scanned once

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_line(self) -> bytes | None:
        """The next complete line, or None until more is fed. LineTooLong when the next line is
        longer than the limit, and again at every later call: the overlong line stays put."""
        end = self._buffer.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._buffer)
            if self._scanned > self.max_line:
                raise LineTooLong(self.max_line)
            return None
        if end > self.max_line:
            self._scanned = end
            raise LineTooLong(self.max_line)
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self._scanned = 0
        return line
