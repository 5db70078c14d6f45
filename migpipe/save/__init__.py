"""Saved files: the layouts and restore (savefile), the fixed layout (fixedfile), libvirt's save
image (libvirtimage), libvirt_iohelper's twin (iohelper). Specified in migpipe-file(5).

The constants the command line shows live here, where it can read them without importing a
layout (and trio with it)."""

LAYOUTS = ("stream", "fixed")
DEFAULT_CACHE = 64 << 20  # the fixed layout's RAM extents kept in memory while saving
# libvirt's image formats, in its numbering (the codes in its header), all read and written:
# the QEMU stream as is or compressed whole, and sparse, QEMU's mapped-ram file after the header.
LIBVIRT_FORMATS = ("raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse")
