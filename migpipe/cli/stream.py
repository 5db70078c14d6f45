"""inspect, extract and generate: the tools that read and write whole QEMU streams."""

import argparse
import contextlib
import json
from pathlib import Path

from migpipe.cli.command import Command
from migpipe.cli.options import reader_key_options, secrets_of, size_argument, size_text
from migpipe.errors import EXIT_KEY, MigpipeError
from migpipe.io.files import open_input, open_output, read_chunks, write_stream
from migpipe.stream import format as fmt
from migpipe.stream.parser import iter_records
from migpipe.tools.synthetic import GuestModel

PAGE_SIZE = {
    "type": int,
    "default": fmt.DEFAULT_PAGE_SIZE,
    "help": "target page size (%(default)s on x86)",
}
GUEST = GuestModel()  # generate --synthetic's defaults are the synthetic guest's


def register(command: Command) -> None:
    inspect = command("inspect", cmd_inspect, "Report what a migration stream holds.")
    inspect.add_argument("stream", nargs="?", default="-", help="stream file, or - for stdin")
    inspect.add_argument("--json", action="store_true", help="machine-readable report")
    inspect.add_argument("--page-size", **PAGE_SIZE)
    reader_key_options(inspect)

    extract = command(
        "extract",
        cmd_extract,
        "Write a stream's final RAM images, device state and manifest to DIR.",
    )
    extract.add_argument("stream", help="stream file, or - for stdin")
    extract.add_argument("directory", type=Path)
    extract.add_argument("--page-size", **PAGE_SIZE)

    generate = command(
        "generate", cmd_generate, "Write a stream from an extracted directory or a synthetic guest."
    )
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="DIR",
        help="rebuild a loadable stream from `migpipe extract` output",
    )
    source.add_argument("--synthetic", action="store_true", help="a synthetic guest")
    generate.add_argument("-o", "--output", help="output file (default: stdout)")
    generate.add_argument("--force", action="store_true", help="replace an existing output")
    generate.add_argument(
        "--size",
        type=size_argument,
        default=size_text(GUEST.ram_size),
        help="guest RAM (%(default)s)",
    )
    generate.add_argument(
        "--iterations", type=int, default=GUEST.iterations, help="precopy passes (%(default)s)"
    )
    generate.add_argument(
        "--dirty",
        type=float,
        default=GUEST.dirty_share,
        help="share of RAM re-dirtied before each later pass (%(default)s)",
    )
    generate.add_argument(
        "--rewrite",
        type=float,
        default=GUEST.rewrite_share,
        help="share of dirtied pages rewritten whole; the rest change sparsely (%(default)s)",
    )
    generate.add_argument(
        "--mix",
        type=parse_mix,
        default=None,
        help="page kinds, e.g. zero=0.6,text=0.125,structured=0.13,random=0.145",
    )
    generate.add_argument("--seed", type=int, default=GUEST.seed)


def cmd_inspect(args: argparse.Namespace) -> int:
    from migpipe.cli.save import piped, piped_chunks
    from migpipe.tools.stats import StreamStats

    stats = StreamStats(args.page_size)
    error, about = None, {}
    with contextlib.ExitStack() as stack:
        # `-`, a named FIFO, <(...): any kind but the fixed layout, told by its first bytes
        pipe = stack.enter_context(piped(args.stream))
        if pipe is not None:
            name = "standard input" if args.stream == "-" else args.stream
            chunks = piped_chunks(pipe, name, secrets_of(args), about)
        else:
            from migpipe.save.savefile import saved_stream

            chunks = saved_stream(Path(args.stream), secrets_of(args), about)
        read = False
        try:
            for record in iter_records(chunks, page_size=args.page_size):
                stats.add(record)
                read = True
        except MigpipeError as e:
            # Nothing read (no key, no file, not a stream): no empty report, only why; JSON
            # keeps its report, whose error member a script reads.
            if e.status == EXIT_KEY or not (read or args.json):
                raise
            error = e
    if args.json:
        report = stats.as_dict()
        report["file"] = about or None
        report["error"] = (
            None if error is None else {"message": error.message, "offset": error.offset}
        )
        print(json.dumps(report, indent=2))
    else:
        if about.get("layout") not in (None, "qemu"):
            print(describe_file(about))
        print(stats.render())
    if error is not None:
        raise error
    return 0


def describe_file(about: dict) -> str:
    if about["layout"] == "mapped-ram":
        return describe_mapped_ram(about)
    chain = ", ".join(name for name, _ in about.get("filters", [])) or "no filters"
    if "filters" not in about:
        chain = "unreadable"
    if "libvirt_format" in about:
        after = "running" if about["was_running"] else "paused"
        chain = f"{about['libvirt_format']} body, guest {after} after virsh restore"
    kind = "libvirt save image" if about["layout"] == "libvirt" else f"{about['layout']} layout"
    line = f"file: {kind}, {chain}; {about['file_bytes']:,} bytes"
    if "disk_bytes" in about:  # not for a pipe
        line += f" ({about['disk_bytes']:,} on disk), written {about['written']}"
    if "slots" in about:
        line += (
            f"; {about['slots_written']:,} of {about['slots']:,} extent slots written, "
            f"{about['writes']:,} writes"
        )
    elif "frames" in about:
        line += f"; {about['frames']:,} frames"
    return line + "\n"


def describe_mapped_ram(about: dict) -> str:
    """A mapped-ram file's layout: each block's bitmap and page area, and the device state."""
    blocks = about.get("mapped_ram", [])
    present = sum(block["present"] for block in blocks)
    pages = sum(block["pages"] for block in blocks)
    lines = [
        f"file: QEMU mapped-ram file; {about['file_bytes']:,} bytes "
        f"({about['disk_bytes']:,} on disk); {present:,} of {pages:,} pages present"
    ]
    for block in blocks:
        lines.append(
            f"  {block['name']:<32} {block['used_length']:>14,} bytes  bitmap at "
            f"{block['bitmap_offset']:,}, pages at {block['pages_offset']:,}: "
            f"{block['present']:,} of {block['pages']:,} present"
        )
    if about.get("device_state_offset") is not None:
        after = about["device_state_offset"]
        lines.append(f"  device state and the rest of the stream from {after:,}")
    return "\n".join(lines) + "\n"


def cmd_extract(args: argparse.Namespace) -> int:
    from migpipe.stream.mappedram import MappedRamReader, is_mapped_ram_file
    from migpipe.tools.extracted import extract

    with open_input(args.stream) as f:
        if is_mapped_ram_file(f.fileno()):
            name = "standard input" if args.stream == "-" else args.stream
            records = MappedRamReader(f.fileno(), 0, name, args.page_size).records()
        else:
            records = iter_records(read_chunks(f), page_size=args.page_size)
        manifest = extract(records, args.directory, args.page_size)
    for block in manifest["blocks"]:
        print(
            f"{block['file']:<40} {block['used_length']:>14,} bytes "
            f"{block['pages_received']:>10,} pages received"
        )
    print(f"{'device-state.bin':<40} {manifest['device_state_bytes']:>14,} bytes")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.source is not None:
        from migpipe.tools.extracted import rebuild

        records = rebuild(args.source)
    else:
        from migpipe.tools.synthetic import SyntheticGuest

        model = GuestModel(
            ram_size=args.size,
            mix=args.mix or GUEST.mix,
            iterations=args.iterations,
            dirty_share=args.dirty,
            rewrite_share=args.rewrite,
            seed=args.seed,
        )
        records = SyntheticGuest(model).records()
    with open_output(args.output, force=args.force) as out:
        write_stream(records, out)
    return 0


def parse_mix(text: str) -> dict[str, float]:
    """'zero=0.6,text=0.2,random=0.2' -> weights by page kind."""
    try:
        pairs = (item.split("=", 1) for item in text.split(","))
        return {kind.strip(): float(weight) for kind, weight in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a page mix: {text}") from None
