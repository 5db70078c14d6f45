"""Guest RAM as a stream leaves it: one image per RAM block, updated record by record.

Images are anything that supports slice assignment (a bytearray, or an mmap of a file for
`extract`), so the same replay code serves in-memory checks and multi-GiB extractions.
"""

import functools
import zlib
from collections.abc import Callable, MutableSequence

from migpipe.errors import MigpipeError, quoted
from migpipe.stream.records import (
    PAGE_KIND_NAMES,
    MemSize,
    NormalPage,
    Record,
    XbzrlePage,
    ZeroPage,
)
from migpipe.stream.xbzrle import apply_delta

Image = MutableSequence[int]


class RamImages:
    """Replays page records into block images created on MEM_SIZE by `make_image(name, size)`."""

    def __init__(self, make_image: Callable[[str, int], Image], page_size: int = 4096) -> None:
        self._make_image = make_image
        self._page_size = page_size
        self.images: dict[str, Image] = {}
        self.sizes: dict[str, int] = {}
        self.pages_received: dict[str, int] = {}

    def apply(self, record: Record) -> None:
        kind = type(record)
        if kind is MemSize:
            self._announce(record)
            return
        if kind not in PAGE_KIND_NAMES:
            return
        try:
            self._apply_page(record)
        except MigpipeError as e:
            raise MigpipeError(
                f"{e.message}, for page 0x{record.offset:x} of RAM block {quoted(record.block)}"
            ) from None

    def _apply_page(self, record: Record) -> None:
        start = record.offset
        self.pages_received[record.block] += 1
        with (
            memoryview(self.images[record.block]) as view,
            view[start : start + self._page_size] as page,  # released even if apply_page fails
        ):
            apply_page(record, page)

    def _announce(self, record: MemSize) -> None:
        for block in record.blocks:
            known = self.sizes.get(block.name)
            if known is None:
                self.images[block.name] = self._make_image(block.name, block.used_length)
                self.sizes[block.name] = block.used_length
                self.pages_received[block.name] = 0
            elif known != block.used_length:
                raise MigpipeError(f"RAM block {quoted(block.name)} changed size mid-stream")


def in_memory(name: str, size: int) -> bytearray:
    return bytearray(size)


def apply_page(record: Record, page: memoryview) -> None:
    """Bring `page` (the page's current bytes, writable) to what a page record says: the one
    way a page record is applied, by RAM images, the fixed layout and xbzrle's page cache."""
    kind = type(record)
    if kind is NormalPage:
        page[:] = record.data
    elif kind is ZeroPage:
        page[:] = filled_page(record.fill, len(page))
    elif kind is XbzrlePage:
        apply_delta(record.data, page)
    else:
        page[:] = inflate_page(record.data, len(page))


@functools.cache
def filled_page(fill: int, size: int) -> bytes:
    """A page of `fill` bytes, made once: zero pages are most of a guest's first pass."""
    return bytes([fill]) * size


def inflate_page(data: bytes, size: int) -> bytes:
    """A compressed page's `size` bytes. Never inflated past one page: a record that is not
    exactly one (QEMU's destination refuses it) could otherwise inflate ~1000 times its size."""
    inflater = zlib.decompressobj()
    try:
        page = inflater.decompress(data, size + 1)
    except zlib.error as e:
        raise MigpipeError(f"corrupt compressed page ({e})") from None
    if len(page) > size:
        raise MigpipeError(f"compressed page inflates to more than {size} bytes")
    if not inflater.eof:
        raise MigpipeError("corrupt compressed page (incomplete or truncated stream)")
    if len(page) != size:
        raise MigpipeError(f"compressed page inflates to {len(page)} bytes")
    return page
