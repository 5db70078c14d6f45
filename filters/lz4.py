"""lz4: each frame payload as one lz4 frame (the standard frame format), blocks unlinked.

Unlinked blocks cost about 1.5% of ratio and buy 13% faster compression and 45% faster
decompression (see perf-anchors); frames are independent so two threads work at once.
"""

import lz4.frame

from migpipe.chain import ByteFilter, Position, number_argument
from migpipe.errors import (
    CorruptError,
    MigpipeError,
)
from migpipe.keys import Secrets


class Lz4(ByteFilter):
    name = "lz4"

    def __init__(self, level: int = 0) -> None:
        if not 0 <= level <= 16:
            raise MigpipeError(f"lz4 level {level} is outside 0..16")
        self.level = level

    @classmethod
    def from_argument(cls, argument: str | None, secrets: Secrets) -> "Lz4":
        return cls() if argument is None else cls(number_argument(cls.name, "level", argument))

    def params(self) -> dict[str, int]:
        return {"level": self.level}

    def encode(self, payload: bytes, position: Position) -> bytes:
        return lz4.frame.compress(
            payload, compression_level=self.level, block_linked=False, store_size=True
        )

    def decode(self, data: bytes, limit: int, position: Position) -> bytes:
        """Refuses frames without a content size: decompression must be bounded beforehand."""
        try:
            size = lz4.frame.get_frame_info(data)["content_size"]
            if not 0 < size <= limit:
                raise CorruptError(f"lz4 frame declares {size} bytes (limit {limit})")
            decompressor = lz4.frame.LZ4FrameDecompressor()
            payload = decompressor.decompress(data, max_length=size)
            complete = decompressor.eof and not decompressor.unused_data
        except RuntimeError as e:
            raise CorruptError(f"corrupt lz4 frame: {e}") from None
        if not complete or len(payload) != size:
            raise CorruptError(f"corrupt lz4 frame: {len(payload)} bytes of {size}, or extra data")
        return payload
