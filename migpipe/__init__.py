"""migpipe: QEMU migration streams, understood, filtered and moved."""

__version__ = "0.1.0"
