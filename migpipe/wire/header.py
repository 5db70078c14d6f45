"""The header both of migpipe's own formats start with: the wire (migpipe-wire(5)) and the
fixed save layout (migpipe-file(5)).

    magic(8) version(1) flags(1) be16 n, n bytes of JSON text, [tag(32)], be32 CRC-32

The JSON names the filter chain and the geometry. When the chain ends in a sealing filter
(encrypt), flag SEALED is set and a tag computed with the stream's key covers every byte before
it: a reader that holds the key checks it before it acts on anything the header says (builds
a filter, maps a cache, sizes a page), so a forged header costs it one key derivation and
nothing else. The CRC covers everything before it, the tag included.

Sans-IO: `parse_header` looks at bytes it is given and says how many more it needs.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from isal.isal_zlib import crc32  # zlib's CRC-32, ~3x as fast (see pyproject.toml)

from migpipe import chain as filters
from migpipe.errors import (
    CorruptError,
    IncompatibleError,
    quoted,
)
from migpipe.keys import Secrets
from migpipe.stream.format import BE16, BE32
from migpipe.stream.parser import is_page_size

SEALED = 0x01  # a tag follows the text
TAG_SIZE = 32
MAX_FILTERS = 8


@dataclass(frozen=True)
class Header:
    """A header whose CRC passed; its fields are checked, its tag not yet (see open_chain)."""

    filters: tuple[tuple[str, dict[str, Any]], ...]
    page_size: int = 4096
    fields: dict[str, Any] = field(default_factory=dict, repr=False)  # the whole JSON object
    encoded: bytes = field(default=b"", compare=False, repr=False)  # as read, for Filter.bind
    signed: bytes = field(default=b"", compare=False, repr=False)  # what the tag covers
    tag: bytes | None = field(default=None, compare=False, repr=False)


def describe(chain: Sequence[filters.Filter]) -> dict[str, Any]:
    """The header fields naming `chain`: what a reader needs to rebuild each filter."""
    return {"filters": [[f.name, f.params()] for f in chain]}


def sealer_of(chain: Sequence[filters.Filter]) -> filters.Filter | None:
    """The filter that seals `chain`'s header: its last, when that one seals."""
    return chain[-1] if chain and chain[-1].seals else None


def encode_header(
    magic: bytes, version: int, fields: dict[str, Any], sealer: filters.Filter | None = None
) -> bytes:
    """A header holding `fields` (see describe), tagged by `sealer` when there is one."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    head = magic + bytes([version, SEALED if sealer else 0]) + BE16.pack(len(text)) + text
    if sealer is not None:
        head += sealer.header_tag(head)
    return head + BE32.pack(crc32(head))


def header_for(
    magic: bytes, version: int, chain: filters.FilterChain, fields: dict[str, Any]
) -> bytes:
    """The header naming `chain` besides `fields`, with `chain` bound to it."""
    head = encode_header(magic, version, describe(chain.filters) | fields, sealer_of(chain.filters))
    chain.bind(head)
    return head


# The files most often handed to decode by mistake, by their first bytes: restore reads them.
# (Literals: save/, which defines the first two, sits above this layer.)
MISTAKEN = {
    b"\x89MGF": "a migpipe save in the fixed layout: use migpipe restore",
    b"LibvirtQemud": "a libvirt save image: use migpipe restore",
    b"QEVM": "a bare QEMU stream, which needs no decoding",
}


def mistaken_for(buf: bytes | bytearray) -> str:
    """What the bytes a header was expected at start instead, when migpipe knows it."""
    head = bytes(buf[:12])
    return next(
        (f"; it is {what}" for start, what in MISTAKEN.items() if head.startswith(start)), ""
    )


def parse_header(
    buf: bytes | bytearray,
    magic: bytes,
    version: int | tuple[int, ...],
    what: str,
    base: int = 0,
) -> tuple[Header | None, int]:
    """The header at the start of `buf` and its length, or (None, bytes needed in all) when
    `buf` holds only part of it; `version` is the one (or the ones) this reader knows.
    `what` names the format in errors; `base` is the offset of `buf` in the input, for them."""
    versions = version if isinstance(version, tuple) else (version,)
    if len(buf) < 12:
        if not magic.startswith(bytes(buf[:8])):
            raise CorruptError(f"not a {what} (bad magic{mistaken_for(buf)})", base)
        return None, 12
    if buf[:8] != magic:
        raise CorruptError(f"not a {what} (bad magic{mistaken_for(buf)})", base)
    if buf[8] not in versions:
        known = " or ".join(map(str, versions))
        raise IncompatibleError(
            f"{what} version {buf[8]} is not {known}: written by a different migpipe version",
            base + 8,
        )
    flags = buf[9]
    (length,) = BE16.unpack_from(buf, 10)
    text_end = 12 + length
    tag_end = text_end + (TAG_SIZE if flags & SEALED else 0)
    end = tag_end + 4
    if len(buf) < end:
        return None, end
    if crc32(buf[:tag_end]) != BE32.unpack_from(buf, tag_end)[0]:
        raise CorruptError(f"{what} header checksum mismatch", base)
    if flags & ~SEALED:
        raise IncompatibleError(f"unknown {what} header flags 0x{flags:02x}", base + 9)
    try:
        fields = json.loads(bytes(buf[12:text_end]))
        chain, page_size = _checked(fields)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else e
        raise CorruptError(f"malformed {what} header ({reason})", base + 12) from None
    header = Header(
        chain,
        page_size,
        fields,
        bytes(buf[:end]),
        bytes(buf[:text_end]),
        bytes(buf[text_end:tag_end]) if flags & SEALED else None,
    )
    return header, end


def _checked(fields: Any) -> tuple[tuple[tuple[str, dict[str, Any]], ...], int]:
    """The chain and page size of a header's JSON, every type and size checked."""
    if type(fields) is not dict:
        raise TypeError("not a JSON object")
    entries = fields["filters"]
    if type(entries) is not list or len(entries) > MAX_FILTERS:
        raise ValueError(f"filters must be a list of at most {MAX_FILTERS}")
    chain = []
    for entry in entries:
        if type(entry) is not list or len(entry) != 2:
            raise ValueError("a filter must be [name, parameters]")
        name, params = entry
        if type(name) is not str or type(params) is not dict:
            raise ValueError("a filter must be [name, parameters]")
        chain.append((name, params))
    size = fields["page_size"]
    if not is_page_size(size):
        raise ValueError(f"page size {quoted(size)}")
    return tuple(chain), size


def open_chain(
    header: Header, secrets: Secrets | None, timer: filters.Timer | None = None
) -> filters.FilterChain:
    """The decoding chain `header` names (bound to it, timed into `timer`), once the header is
    known to be trustworthy enough to act on.

    With a key given, input not sealed with it is refused (see Secrets.sealing_required). A
    sealed header is checked first: its sealing filter is made (unwrapping the stream's key,
    the only work a forger can cause) and checks the tag before any other filter is made.
    """
    secrets = secrets or Secrets()
    classes = [filters.load(name) for name, _ in header.filters]
    sealed = bool(classes) and classes[-1].seals
    secrets.check_sealed(sealed, "the input")
    if header.tag is not None and not sealed:
        raise CorruptError("the header carries a tag but names no sealing filter")
    if sealed:
        if header.tag is None:
            raise CorruptError(
                "encrypted, but the header carries no tag (written by an earlier migpipe, or "
                "altered): refused, since its contents cannot be checked",
            )
        sealer = filters.create(*header.filters[-1], secrets)
        sealer.check_header_tag(header.signed, header.tag)
        chain = [filters.create(name, params, secrets) for name, params in header.filters[:-1]]
        chain.append(sealer)
    else:
        chain = [filters.create(name, params, secrets) for name, params in header.filters]
    filters.check_order(chain)
    opened = filters.FilterChain(chain, timer)
    opened.bind(header.encoded)
    return opened
