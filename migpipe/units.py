"""Sizes as people write them: 64M, 1G, 4096."""

import re
from fractions import Fraction

from migpipe.errors import MigpipeError, quoted

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_SIZE = (1 << 63) - 1  # off_t's range: no file, memory or cache is larger
# A decimal number, a unit, and "B" or "iB" that change nothing; no sign, exponent, inf or nan,
# nor more digits than it takes to write MAX_SIZE and a fraction.
SIZE = re.compile(r"(\d{1,30}(?:\.\d{0,30})?|\.\d{1,30})([KMGT]?)(?:I?B)?", re.ASCII)


def parse_size(text: str) -> int:
    """'64M', '1G', '256KiB', '4096' -> bytes (binary multiples, as QEMU's -m); MigpipeError,
    one line, for anything else (a size comes from users, daemons and the service's clients)."""
    match = SIZE.fullmatch(text.strip().upper())
    if match is None:
        raise MigpipeError(f"not a size: {quoted(text)} (sizes are like 4096, 64M or 1.5G)")
    number, unit = match.groups()
    size = int(Fraction(number) * UNITS[unit])
    if size > MAX_SIZE:
        raise MigpipeError(f"size {quoted(text)} is larger than {MAX_SIZE} bytes")
    return size
