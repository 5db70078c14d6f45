"""The line splitter under every JSON-lines protocol: any chunking, and a bound on each line."""

import pytest

from migpipe.lines import LineSplitter, LineTooLong


def lines_of(splitter: LineSplitter) -> list[bytes]:
    out = []
    while (line := splitter.next_line()) is not None:
        out.append(line)
    return out


def test_lines_come_out_whole_however_the_bytes_arrive() -> None:
    data = b'{"a": 1}\n\n{"b": 2}\nrest'
    for size in (1, 2, 3, len(data)):
        splitter = LineSplitter(16)
        out = []
        for at in range(0, len(data), size):
            splitter.feed(data[at : at + size])
            out += lines_of(splitter)
        assert out == [b'{"a": 1}', b"", b'{"b": 2}']


def test_a_line_over_the_limit_is_refused_ended_or_not_and_stays_refused() -> None:
    ended = LineSplitter(4)
    ended.feed(b"four\nfive!\nok\n")
    assert ended.next_line() == b"four"
    for _ in range(2):
        with pytest.raises(LineTooLong, match="longer than 4 bytes"):
            ended.next_line()
    unended = LineSplitter(4)
    unended.feed(b"four")
    assert unended.next_line() is None
    unended.feed(b"5")
    with pytest.raises(LineTooLong):
        unended.next_line()
