"""migpipe: QEMU migration streams, understood, filtered and moved.

Layers, each importing only from those listed before it (tests/test_layers.py checks):

    errors, units, running   what everything shares: errors by exit status, sizes, trio.run,
    lines                    and the JSON-lines protocols' line splitter
    stream/    QEMU's migration stream without I/O: records, parser, writer, XBZRLE, RAM images
    io/        file descriptors: channels, files, O_DIRECT, sockets, TLS
    keys       the user's secret: key files and passphrases
    chain      the filter interface and registry (the plug-ins live in migpipe_filters)
    wire/      migpipe's own wire format without I/O: header, frames, trailer
    tunnel/    encode and decode as a threaded pipeline
    tools/     inspect's statistics, extract and generate, synthetic guests, the demo
    save/      saved files: the stream and fixed layouts, libvirt's image, iohelper
    service/   migpipe serve, its protocol and its client
    qemu/      QEMU driven over QMP: migrate, incoming, save, restore
    cli/       the command line, a module per command group
"""

__version__ = "0.1.0"
