"""A pipe stage for tests: copy stdin to stdout, flipping one byte or stopping at an offset.

python3 mangle.py flip OFFSET      # xor the byte at OFFSET with 0x20
python3 mangle.py truncate OFFSET  # copy only the first OFFSET bytes, then exit 0
"""

import sys


def main(mode: str, offset: int) -> None:
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    position = 0
    while chunk := source.read(1 << 16):
        if mode == "truncate" and position + len(chunk) >= offset:
            sink.write(chunk[: offset - position])
            return
        if mode == "flip" and position <= offset < position + len(chunk):
            chunk = bytearray(chunk)
            chunk[offset - position] ^= 0x20
        sink.write(chunk)
        position += len(chunk)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
