"""Sizes as people, daemons and the service's clients write them: a size, or one clear line."""

import re
import subprocess
import sys

import pytest

from migpipe.errors import MigpipeError
from migpipe.units import MAX_SIZE, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("64M", 64 << 20),
        ("1G", 1 << 30),
        ("256KiB", 256 << 10),
        ("4096B", 4096),
        ("1.5k", 1536),
        (".5K", 512),
        (" 2m ", 2 << 20),
        ("8T", 8 << 40),
        ("0", 0),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text",
    [
        "infK",
        "nanK",
        "inf",
        "nan",
        "1e400K",
        "1e3",
        "-4M",
        "+4M",
        "",
        "K",
        "1_000",
        "0x10",
        "5KK",
        "8E",
        "\uff11\uff12",
        "9" * 5000 + "K",
    ],
)
def test_what_is_not_a_size(text: str) -> None:
    with pytest.raises(MigpipeError, match=re.escape(f'not a size: "{text}"')):
        parse_size(text)


def test_sizes_beyond_off_t() -> None:
    assert parse_size(f"{MAX_SIZE}") == MAX_SIZE
    for text in (f"{MAX_SIZE + 1}", "9999999999T"):
        with pytest.raises(MigpipeError, match=f'size "{text}" is larger than {MAX_SIZE} bytes$'):
            parse_size(text)


@pytest.mark.parametrize(
    ("args", "status", "error"),
    [
        (
            ["encode", "--filters", "xbzrle:infK"],
            1,
            'migpipe encode: error: xbzrle cache size: not a size: "infK"',
        ),
        (
            ["encode", "--xbzrle-cache", "nanK"],
            1,
            'migpipe encode: error: xbzrle cache size: not a size: "nanK"',
        ),
        (
            ["generate", "--synthetic", "--size", "infK"],
            2,
            'migpipe generate: error: argument --size: not a size: "infK"',
        ),
    ],
)
def test_cli_bad_sizes_are_one_line(args: list[str], status: int, error: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "migpipe", *args], input=b"", capture_output=True, check=False
    )
    assert result.returncode == status
    assert result.stderr.decode().splitlines()[-1].startswith(error)
    assert b"Traceback" not in result.stderr
