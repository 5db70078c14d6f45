"""Numbers of QEMU's migration stream format (savevm.c / ram.c), named once.

Everything is big-endian. Values are those of QEMU 7.2 through 10.x; see migpipe-stream(5).
"""

import struct

MAGIC = 0x5145564D  # "QEVM"
VERSION = 3
VERSION_OBSOLETE = 2

# Top-level item types.
ITEM_EOF = 0x00
ITEM_SECTION_START = 0x01
ITEM_SECTION_PART = 0x02
ITEM_SECTION_END = 0x03
ITEM_SECTION_FULL = 0x04
ITEM_SUBSECTION = 0x05
ITEM_VMDESCRIPTION = 0x06
ITEM_CONFIGURATION = 0x07
ITEM_COMMAND = 0x08
ITEM_SECTION_FOOTER = 0x7E

# RAM record flags: the low TARGET_PAGE_BITS of each record's be64 word.
RAM_FULL = 0x001  # obsolete since 2009, always an error
RAM_ZERO = 0x002
RAM_MEM_SIZE = 0x004
RAM_PAGE = 0x008
RAM_EOS = 0x010
RAM_CONTINUE = 0x020
RAM_XBZRLE = 0x040
RAM_HOOK = 0x080
RAM_COMPRESS_PAGE = 0x100
RAM_MULTIFD_FLUSH = 0x200

XBZRLE_ENCODING_FLAG = 0x01

RAM_IDSTR = "ram"
RAM_SECTION_VERSION = 4

# QEMU_VM_COMMAND numbers -> (name, fixed payload length or None when variable).
COMMANDS: dict[int, tuple[str, int | None]] = {
    1: ("OPEN_RETURN_PATH", 0),
    2: ("PING", 4),
    3: ("POSTCOPY_ADVISE", None),  # 16 with postcopy-ram, 0 for dirty-bitmap-only postcopy
    4: ("POSTCOPY_LISTEN", 0),
    5: ("POSTCOPY_RUN", 0),
    6: ("POSTCOPY_RAM_DISCARD", None),
    7: ("PACKAGED", 4),  # followed by a be32-length blob outside the payload
    8: ("ENABLE_COLO", 0),
    9: ("POSTCOPY_RESUME", 0),
    10: ("RECV_BITMAP", None),
    11: ("SWITCHOVER_START", 0),
}
CMD_POSTCOPY_ADVISE = 3
CMD_PACKAGED = 7

# Configuration subsections and the size of their payload after the be32 version.
CONFIG_TARGET_PAGE_BITS = "configuration/target-page-bits"
CONFIG_CAPABILITIES = "configuration/capabilities"
CONFIG_UUID = "configuration/uuid"

# mapped-ram (QEMU 9.0+, ram.c): after each block of MEM_SIZE's list, a header of be32 version,
# be64 page size, be64 bitmap offset, be64 pages offset (absolute file offsets), then the
# stream goes on at pages offset + used length. See migpipe-stream(5).
CAPABILITY_MAPPED_RAM = "mapped-ram"
MAPPED_RAM_HEADER = struct.Struct(">IQQQ")
MAPPED_RAM_VERSION = 1
MAPPED_RAM_ALIGNMENT = 1 << 20  # where QEMU puts each block's pages (loaders take any page)

DEFAULT_PAGE_SIZE = 4096  # TARGET_PAGE_SIZE on x86
XBZRLE_CACHE_SIZE = 64 << 20  # QEMU's default xbzrle-cache-size; migpipe's xbzrle filter's too

BE16 = struct.Struct(">H")
BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")


def zlib_bound(size: int) -> int:
    """zlib's compressBound(): the largest a compressed page may legally be."""
    return size + (size >> 12) + (size >> 14) + (size >> 25) + 13


def mapped_ram_bitmap_size(pages: int) -> int:
    """The bytes of a block's mapped-ram bitmap: whole host longs (8 bytes on 64-bit hosts)."""
    return (pages + 63) // 64 * 8


def command_name(cmd: int) -> str:
    entry = COMMANDS.get(cmd)
    return entry[0] if entry else f"command {cmd}"
