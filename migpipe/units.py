"""Sizes as people write them: 64M, 1G, 4096."""

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'64M', '1G', '256KiB', '4096' -> bytes (binary multiples, as QEMU's -m); ValueError."""
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    if cleaned and cleaned[-1] in UNITS:
        size = int(float(cleaned[:-1]) * UNITS[cleaned[-1]])
    else:
        size = int(cleaned)
    if size < 0:
        raise ValueError(f"negative size {text!r}")
    return size
