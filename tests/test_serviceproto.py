"""migpipe serve's protocol without sockets (migpipe.service.protocol): the Reader that cuts
lines and holds their fds, the limits on a line and on its fds, command parsing with its JSON
rules, and the messages the service sends. The service and its client, over real sockets, are
tests/test_service.py.
"""

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migpipe.service.protocol import (
    COMMAND_NOT_FOUND,
    GENERIC_ERROR,
    MAX_FDS_PER_MESSAGE,
    MAX_LINE,
    NO_ID,
    CommandError,
    Flood,
    Line,
    Reader,
    encode_message,
    error_reply,
    event,
    greeting,
    parse_command,
    reply,
)


def test_fds_belong_to_the_line_their_chunk_ends_in() -> None:
    reader = Reader()
    reader.feed(b'{"a": 1}\n{"b"', fds=[10])  # a recvmsg stops after the fds' message
    assert reader.next_line() == Line(b'{"a": 1}')
    assert reader.next_line() is None
    reader.feed(b": 2}\n")
    assert reader.next_line() == Line(b'{"b": 2}', (10,))
    reader.feed(b"x\ny\n", fds=[11, 12], fds_truncated=True)
    assert reader.next_line() == Line(b"x")
    assert reader.next_line() == Line(b"y", (11, 12), True)
    reader.feed(b'{"c"', fds=[13])
    assert reader.close() == [13]  # EOF inside a line: its fds are the caller's to close


@given(
    st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=12),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1),
)
def test_lines_come_out_whole_however_the_bytes_are_cut(
    lines: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(line + b"\n" for line in lines)
    reader, out, at = Reader(), [], 0
    for size in itertools.cycle(cuts):
        if at >= len(data):
            break
        reader.feed(data[at : at + size])
        at += size
        while (line := reader.next_line()) is not None:
            out.append(line.text)
    assert out == lines


def test_a_line_longer_than_the_limit_is_a_flood() -> None:
    reader = Reader()
    reader.feed(b"ok\n" + b"x" * MAX_LINE, fds=[5])
    assert reader.next_line() == Line(b"ok")
    reader.feed(b"x")
    with pytest.raises(Flood, match=f"longer than {MAX_LINE} bytes"):
        reader.next_line()
    reader.feed(b"more\n", fds=[6])  # after a flood nothing is read; fds are only held
    assert reader.close() == [5, 6]
    whole = Reader()
    whole.feed(b"y" * (MAX_LINE + 1) + b"\n")
    with pytest.raises(Flood):
        whole.next_line()


def test_fds_for_a_line_never_ended_are_a_flood() -> None:
    reader = Reader()
    held = list(range(10, 10 + MAX_FDS_PER_MESSAGE))
    reader.feed(b'{"execute"', fds=held)  # as many as one message may bring: still a line's
    assert reader.next_line() is None
    reader.feed(b":", fds=[99])
    with pytest.raises(Flood, match=f"more than {MAX_FDS_PER_MESSAGE} fds for one line"):
        reader.next_line()
    assert reader.close() == [*held, 99]


@pytest.mark.parametrize(
    ("text", "fds", "error_class", "desc", "id"),
    [
        (b"{", (), GENERIC_ERROR, "JSON parse error", NO_ID),
        (b"\xff{}", (), GENERIC_ERROR, "not UTF-8 (byte 0)", NO_ID),
        (b"[" * 60000, (), GENERIC_ERROR, "JSON parse error", NO_ID),
        (b"[1, 2]", (), GENERIC_ERROR, "a JSON object, not a list", NO_ID),
        (b'{"execute": "query-fds", "arguments": {"a": NaN}}', (), GENERIC_ERROR, "NaN", NO_ID),
        (
            b'{"execute": "query-fds", "id": 1e999999}',
            (),
            GENERIC_ERROR,
            "JSON parse error: a number too large for a double",
            NO_ID,
        ),
        (
            b'{"execute": "query-fds", "arguments": {"a": -1' + b"0" * 400 + b".5}}",
            (),
            GENERIC_ERROR,
            "a number too large for a double",
            NO_ID,
        ),
        (b'{"execute": 5, "id": "x"}', (), GENERIC_ERROR, "'execute' must be given", "x"),
        (b'{"execute": "eject", "id": 7}', (), COMMAND_NOT_FOUND, "unknown command 'eject'", 7),
        (b'{"execute": "query-fds", "exec-oob": 1}', (), GENERIC_ERROR, "member 'exec-oob'", NO_ID),
        (b'{"execute": "query-fds", "arguments": []}', (), GENERIC_ERROR, "not a list", NO_ID),
        (
            b'{"execute": "query-fds", "arguments": {"x": 1}}',
            (),
            GENERIC_ERROR,
            "'query-fds' has no argument 'x' (it takes: none)",
            NO_ID,
        ),
        (
            b'{"execute": "add-fd", "arguments": {}}',
            (3,),
            GENERIC_ERROR,
            "'add-fd' needs argument 'name'",
            NO_ID,
        ),
        (
            b'{"execute": "add-fd", "arguments": {"name": 5}}',
            (3,),
            GENERIC_ERROR,
            "argument 'name' of 'add-fd' must be an fd name",
            NO_ID,
        ),
        (
            b'{"execute": "add-fd", "arguments": {"name": "a b"}}',
            (3,),
            GENERIC_ERROR,
            "must be an fd name",
            NO_ID,
        ),
        (
            b'{"execute": "add-fd", "arguments": {"name": "a"}}',
            (),
            GENERIC_ERROR,
            "exactly one fd attached (SCM_RIGHTS), got 0",
            NO_ID,
        ),
        (
            b'{"execute": "add-fd", "arguments": {"name": "a"}}',
            (3, 4),
            GENERIC_ERROR,
            "got 2; they were closed",
            NO_ID,
        ),
        (b'{"execute": "query-fds"}', (3,), GENERIC_ERROR, "takes no fd; the 1 attached", NO_ID),
        (b"  ", (3,), GENERIC_ERROR, "fds arrived with an empty line", NO_ID),
        (
            b'{"execute": "start-job", "arguments": {"kind": 1}}',
            (),
            GENERIC_ERROR,
            "argument 'kind' of 'start-job' must be a string, not an integer",
            NO_ID,
        ),
    ],
)
def test_bad_commands(
    text: bytes, fds: tuple[int, ...], error_class: str, desc: str, id: object
) -> None:
    with pytest.raises(CommandError) as raised:
        parse_command(Line(text, fds))
    assert raised.value.error_class == error_class
    assert desc in raised.value.desc
    assert raised.value.id == id


def test_good_commands() -> None:
    assert parse_command(Line(b"   ")) is None
    add = parse_command(Line(b'{"execute": "add-fd", "arguments": {"name": "src"}, "id": 1}', (9,)))
    assert (add.name, add.arguments, add.id, add.fds) == ("add-fd", {"name": "src"}, 1, (9,))
    job = parse_command(Line(b'{"execute": "start-job", "arguments": {"kind": "x", "input": 1}}'))
    assert job.arguments == {"kind": "x", "input": 1}  # the job kind checks the rest
    with pytest.raises(CommandError, match=f"more than {MAX_FDS_PER_MESSAGE} fds"):
        parse_command(Line(b'{"execute": "add-fd", "arguments": {"name": "a"}}', (3,), True))


def test_messages() -> None:
    hello = greeting()["migpipe"]
    assert set(hello) == {"version", "capabilities"} and hello["capabilities"] == []
    assert set(hello["version"]) == {"major", "minor", "micro", "package"}
    assert reply(NO_ID, {}) == {"return": {}}
    assert reply("a", [1]) == {"return": [1], "id": "a"}
    assert error_reply(3, "no") == {"error": {"class": GENERIC_ERROR, "desc": "no"}, "id": 3}
    stamped = event("JOB_PROGRESS", {"id": "job-1"}, now=12.25)
    assert stamped["timestamp"] == {"seconds": 12, "microseconds": 250000}
    line = encode_message(stamped)
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and json.loads(line) == stamped
    for number in (float("inf"), float("nan")):  # an error, never a line that is not JSON
        with pytest.raises(ValueError, match="not JSON compliant"):
            encode_message(reply(1, number))
