"""inspect, extract, generate and the demo, through the API and the real CLI."""

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support import MIGPIPE, PAGE, free_port, migpipe, synthetic_stream

from migpipe import __version__
from migpipe.errors import MigpipeError
from migpipe.stream.parser import parse_bytes
from migpipe.stream.writer import write_records
from migpipe.tools.extracted import extract, image_file_name, rebuild
from migpipe.tools.stats import StreamStats
from migpipe.tools.synthetic import GuestModel, SyntheticGuest


@pytest.fixture(scope="module")
def guest() -> SyntheticGuest:
    return SyntheticGuest(GuestModel(ram_size=2 << 20, iterations=4, dirty_share=0.1, seed=5))


@pytest.fixture(scope="module")
def stream(guest: SyntheticGuest) -> bytes:
    return write_records(guest.records())


# -- inspect ---------------------------------------------------------------------------------


def test_stats_count_what_the_generator_sent(guest: SyntheticGuest, stream: bytes) -> None:
    stats = StreamStats()
    for record in parse_bytes(stream):
        stats.add(record)
    assert stats.total_bytes == len(stream)
    assert stats.passes == 4
    ram_pages = sum(size for _, size in guest.blocks) // PAGE
    dirtied = int((2 << 20) // PAGE * 0.1)
    assert stats.pages["zero"] + stats.pages["normal"] == ram_pages + 3 * dirtied
    assert stats.pages_resent > 0 and stats.max_sends >= 2
    assert stats.ram_bytes + stats.device_bytes + stats.other_bytes == len(stream)
    assert stats.blocks["pc.ram"] == 2 << 20


def test_cli_inspect_json(stream: bytes) -> None:
    result = migpipe("inspect", "--json", stdin=stream)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["error"] is None
    assert report["bytes"] == len(stream)
    assert report["passes"] == 4
    assert [s["idstr"] for s in report["sections"]][:2] == ["ram", "timer"]


def test_cli_inspect_truncated_reports_then_fails(stream: bytes) -> None:
    cut = len(stream) // 2
    result = migpipe("inspect", stdin=stream[:cut])
    assert result.returncode == 4  # EXIT_TRUNCATED
    assert b"pages:" in result.stdout  # everything up to the fault is still reported
    error = result.stderr.decode().strip()
    assert error.count("\n") == 0 and "truncated" in error and "offset" in error
    assert "Traceback" not in error


def test_cli_inspect_garbage_is_one_line() -> None:
    result = migpipe("inspect", stdin=b"not a migration stream at all")
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (
        "migpipe inspect: error: not a QEMU migration stream: bad magic 0x6e6f7420 "
        "(at byte offset 0)"
    )


def test_cli_inspect_prints_no_empty_report_when_nothing_was_read(tmp_path: Path) -> None:
    """A missing file or one that is no stream: the reason alone, no report of zeros."""
    for args in ((str(tmp_path / "nosuch.stream"),), ("-",)):
        result = migpipe("inspect", *args, stdin=b"not a migration stream at all")
        assert result.returncode == 1 and result.stdout == b"", result.stdout
        assert result.stderr.startswith(b"migpipe inspect: error: ")


# -- extract and generate ----------------------------------------------------------------------


def test_extract_holds_the_final_memory(guest: SyntheticGuest, stream: bytes, tmp_path: Path):
    manifest = extract(parse_bytes(stream), tmp_path)
    for name, image in guest.images.items():
        assert (tmp_path / image_file_name(name)).read_bytes() == image
    assert manifest["machine"] == "pc-i440fx-7.2"
    assert {b["name"] for b in manifest["blocks"]} == set(guest.images)
    device_state = (tmp_path / "device-state.bin").read_bytes()
    assert device_state.startswith(b"\x04")  # the first FULL section after RAM's END
    assert stream.endswith(device_state)


def test_generate_from_extracted_rebuilds_the_same_memory(stream: bytes, tmp_path: Path):
    extract(parse_bytes(stream), tmp_path / "a")
    rebuilt = write_records(rebuild(tmp_path / "a"))
    stats = StreamStats()
    for record in parse_bytes(rebuilt):
        stats.add(record)
    assert stats.passes == 1 and stats.pages_resent == 0  # compact: each page once
    extract(parse_bytes(rebuilt), tmp_path / "b")
    for image in (tmp_path / "a").glob("*.img"):
        assert (tmp_path / "b" / image.name).read_bytes() == image.read_bytes()
    assert (tmp_path / "b" / "device-state.bin").read_bytes() == (
        tmp_path / "a" / "device-state.bin"
    ).read_bytes()


def test_cli_extract_and_generate(stream: bytes, tmp_path: Path) -> None:
    source = tmp_path / "vm.stream"
    source.write_bytes(stream)
    result = migpipe("extract", str(source), str(tmp_path / "dir"))
    assert result.returncode == 0, result.stderr
    assert b"pc.ram.img" in result.stdout
    out = tmp_path / "again.stream"
    result = migpipe("generate", "--from", str(tmp_path / "dir"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert parse_bytes(out.read_bytes())[-1].json == parse_bytes(stream)[-1].json
    refused = migpipe("generate", "--from", str(tmp_path / "dir"), "-o", str(out))
    assert refused.returncode == 1 and b"exists" in refused.stderr


def test_cli_generate_synthetic_is_deterministic() -> None:
    args = ("generate", "--synthetic", "--size", "1M", "--iterations", "2", "--seed", "9")
    first, second = migpipe(*args), migpipe(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert migpipe(*args[:-1], "10").stdout != first.stdout
    assert write_records(parse_bytes(first.stdout)) == first.stdout


def test_cli_extract_of_a_stream_cut_before_ram_end(stream: bytes, tmp_path: Path) -> None:
    source = tmp_path / "cut.stream"
    source.write_bytes(stream[: len(stream) // 3])
    result = migpipe("extract", str(source), str(tmp_path / "dir"))
    assert result.returncode == 4  # EXIT_TRUNCATED and b"truncated" in result.stderr
    assert not (tmp_path / "dir" / "manifest.json").exists()


def test_demo_runs_and_checks() -> None:
    result = migpipe("demo", "--size", "4M")
    assert result.returncode == 0, result.stderr
    assert b"byte-identical" in result.stdout
    assert b"equals the guest's memory" in result.stdout


def test_extract_names_a_corrupt_compressed_page(tmp_path: Path) -> None:
    from test_stream_parser import ram_stream

    from migpipe.stream.records import CompressedPage

    data = write_records(ram_stream([CompressedPage("pc.ram", 2 * PAGE, b"\x78\x9c junk", True)]))
    where = r"corrupt compressed page.*0x2000 of RAM block .pc.ram."
    with pytest.raises(MigpipeError, match=where):
        extract(parse_bytes(data), tmp_path)


def test_extract_drops_return_path_commands_and_refuses_early_device_state(tmp_path: Path):
    from test_stream_parser import ram_stream

    from migpipe.stream import format as fmt
    from migpipe.stream.records import Command, OpaqueData, SectionFooter, SectionFull

    records = ram_stream([])
    records[2:2] = [Command(1, b""), Command(2, fmt.BE32.pack(1))]
    manifest = extract(parse_bytes(write_records(records)), tmp_path / "ok")
    assert manifest["dropped_commands"] == ["OPEN_RETURN_PATH", "PING"]
    assert not any(isinstance(r, Command) for r in rebuild(tmp_path / "ok"))
    early = [SectionFull(9, "virtio-mem-early", 0, 1), OpaqueData(b"\x01\x02"), SectionFooter(9)]
    records[2:2] = early
    with pytest.raises(MigpipeError, match="sent before RAM ended"):
        extract(parse_bytes(write_records(records)), tmp_path / "early")


def test_written_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """What migpipe writes may hold a guest's memory: 0600, as libvirt's save images."""
    import os

    out = tmp_path / "s.stream"
    old = os.umask(0)
    try:
        result = migpipe("generate", "--synthetic", "--size", "256K", "-o", str(out))
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".*partial"))


def test_cli_extract_of_block_names_that_once_shared_a_file(tmp_path: Path) -> None:
    """The audit's M5 case: "a/b" and "a__b" were both a__b.img; the second open truncated the
    first's map and a page of "a/b" at 8 KiB ended extract with SIGBUS."""
    from test_stream_parser import ram_stream

    from migpipe.stream.records import MemSize, NormalPage, RamBlock

    records = ram_stream([NormalPage("a/b", 2 * PAGE, b"\xaa" * PAGE, True)])
    records[3] = MemSize((1 << 20) + PAGE, (RamBlock("a/b", 1 << 20), RamBlock("a__b", PAGE)))
    result = migpipe("extract", "-", str(tmp_path / "x"), stdin=write_records(records))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "x" / "a%2Fb.img").read_bytes()[2 * PAGE : 3 * PAGE] == b"\xaa" * PAGE
    assert (tmp_path / "x" / "a__b.img").read_bytes() == bytes(PAGE)
    rebuilt = migpipe("generate", "--from", str(tmp_path / "x"))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert b"\xaa" * PAGE in rebuilt.stdout


def test_stats_json_is_checked_before_the_job_and_never_fails_a_finished_one(
    tmp_path: Path,
) -> None:
    """A --stats-json FILE that cannot be written is refused before the job reads a byte; one
    that fails only when the figures are written (a full disk) is a warning after a job that
    completed: a finished migration must never be reported as failed."""
    stream = synthetic_stream(1 << 20, 1)
    refused = migpipe("encode", "--stats-json", str(tmp_path / "no" / "x.json"), stdin=stream)
    assert refused.returncode == 2 and refused.stdout == b""
    assert (
        refused.stderr
        == (
            f"migpipe encode: error: cannot write --stats-json {tmp_path / 'no' / 'x.json'}: "
            f"no directory {tmp_path / 'no'}\n"
        ).encode()
    )
    full = migpipe("encode", "--stats-json", "/dev/full", stdin=stream)
    assert full.returncode == 0 and full.stdout.startswith(b"\x89MGP")
    assert b"warning: the job completed, but --stats-json /dev/full could not be written" in (
        full.stderr
    )


# -- what a user sees when something around migpipe is off --------------------------------------


def test_closed_stdin_and_stdout_are_one_line_that_names_them(stream: bytes) -> None:
    """`migpipe inspect <&-` and `migpipe generate >&-`: the closed stream named, no traceback."""
    import os

    inspect = migpipe("inspect", stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(0))
    assert inspect.returncode == 1
    assert inspect.stderr == b"migpipe inspect: error: standard input (fd 0) is closed\n"
    generate = subprocess.run(
        [*MIGPIPE, "generate", "--synthetic", "--size", "256K"],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.close(1),
        check=False,
    )
    assert generate.returncode == 1
    assert generate.stderr == b"migpipe generate: error: standard output (fd 1) is closed\n"


@pytest.mark.parametrize(
    "args", [("inspect", "-"), ("generate", "--synthetic", "--size", "1M")], ids=lambda a: a[0]
)
def test_a_reader_that_goes_ends_migpipe_quietly_as_cat(stream: bytes, args: tuple) -> None:
    """`migpipe inspect x | head`: the reader gone, migpipe dies of SIGPIPE as cat does, without
    a word (a shell shows 141); its output pipe's reading end is closed before it writes."""
    import os
    import signal

    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [*MIGPIPE, *args], input=stream, stdout=write, stderr=subprocess.PIPE, check=False
        )
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (-signal.SIGPIPE, b"")


def test_an_fd_option_that_names_no_open_fd_says_which() -> None:
    result = migpipe("restore", "--fd", "99", "vm.mig")
    assert result.returncode == 1
    assert result.stderr == b"migpipe restore: error: --fd 99: Bad file descriptor\n"


def test_messages_show_no_python_reprs(tmp_path: Path, stream: bytes) -> None:
    """A port in use, a bad page mix, a bad endpoint, a bad filter, size or level: said in the
    user's words, never with a tuple, a dict or repr quotes; a closed output says which."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = migpipe("decode", "--listen", f"127.0.0.1:{port}")
    assert (
        busy.stderr
        == (
            f"migpipe decode: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
        ).encode()
    )
    mix = migpipe("generate", "--synthetic", "--mix", "bogus=1", "-o", str(tmp_path / "x"))
    assert mix.stderr == (
        b"migpipe generate: error: page mix bogus=1 must weigh zero, text, structured, random\n"
    )
    endpoint = migpipe("decode", "--connect", "host:99999")
    assert endpoint.stderr == (
        b"migpipe decode: error: bad endpoint host:99999: "
        b"expected HOST:PORT, [V6]:PORT or unix:PATH\n"
    )
    for result in (busy, mix, endpoint):
        assert not set(b"'{}()<>") & set(result.stderr.split(b": error: ")[1])
    named = {
        ("--filters", "rot13"): b'unknown filter "rot13" (installed: ',
        ("--xbzrle-cache", "nanK"): b'xbzrle cache size: not a size: "nanK" (sizes are like ',
        ("--filters", "zstd:x"): b'zstd level must be a number, not "x"\n',
    }
    for args, said in named.items():
        result = migpipe("encode", *args, stdin=stream)
        assert said in result.stderr and b"'" not in result.stderr, result.stderr
    wire = migpipe("encode", stdin=stream).stdout
    for command, given in (("encode", stream), ("decode", wire)):
        reader, writer = os.pipe()
        os.close(reader)
        with os.fdopen(writer, "wb") as closed:
            gone = subprocess.run(
                [*MIGPIPE, command], input=given, stdout=closed, stderr=subprocess.PIPE
            )
        said = f"migpipe {command}: error: standard output closed by the reader (broken pipe)\n"
        assert (gone.returncode, gone.stderr) == (5, said.encode())


def test_progress_json_is_a_json_object_per_line(stream: bytes) -> None:
    wire = migpipe("encode", "--progress=json", "--xbzrle", stdin=stream)
    assert wire.returncode == 0, wire.stderr
    result = migpipe("decode", "--progress=json", stdin=wire.stdout)
    assert result.returncode == 0, result.stderr
    for run, command in ((wire, "encode"), (result, "decode")):
        records = [json.loads(line) for line in run.stderr.decode().splitlines()]
        assert all(r["done"] is False for r in records[:-1])
        assert records[-1]["done"] is True and records[-1]["command"] == command
        assert records[-1]["qemu_bytes"] == len(stream)
    assert records[-1]["wire_bytes"] == len(wire.stdout)
    assert records[-1]["pages"]["normal"] > 0


def test_quiet_leaves_warnings_and_errors_only(stream: bytes, tmp_path: Path) -> None:
    """-q before or after the command: no progress, no summary, and only the warning of a job
    that completed; an error is still said."""
    for args in (("-q", "encode"), ("encode", "-q")):
        result = migpipe(*args, "--progress", "--stats-json", "/dev/full", stdin=stream)
        assert result.returncode == 0
        assert result.stderr == (
            b"migpipe encode: warning: the job completed, but --stats-json /dev/full could not "
            b"be written (No space left on device)\n"
        )
    said = migpipe("save", str(tmp_path / "said.mig"), "--summary", stdin=stream)
    quiet = migpipe("-q", "save", str(tmp_path / "quiet.mig"), "--summary", stdin=stream)
    assert said.stderr.startswith(b"saved ") and quiet.stderr == b""
    assert quiet.returncode == 0 and (tmp_path / "quiet.mig").exists()
    failed = migpipe("-q", "inspect", stdin=b"not a migration stream at all")
    assert failed.returncode == 1 and failed.stderr.startswith(b"migpipe inspect: error: not a")


def test_verbose_says_what_it_does_at_each_step(stream: bytes) -> None:
    """-v on a decode that listens and an encode that connects: what each was asked to do,
    where it listens, what it accepted, where it connected."""
    address = free_port()
    decode = subprocess.Popen(
        [*MIGPIPE, "-v", "decode", "--listen", address],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    with ThreadPoolExecutor(1) as reader:  # decode's output read as it comes: it holds little
        decoded = reader.submit(decode.communicate, timeout=60)
        encode = migpipe("encode", "-v", "--compress", "lz4", "--connect", address, stdin=stream)
        out, err = decoded.result()
    assert (encode.returncode, decode.returncode, out) == (0, 0, stream), err
    said = encode.stderr.decode().splitlines()
    assert said[0] == f"migpipe encode: migpipe {__version__}, --in -, --connect {address}, " + (
        "--compress lz4"
    )
    assert said[1].startswith(f"migpipe encode: connecting to {address} (retried for 30 s")
    assert f"migpipe encode: connected to {address}" in said
    heard = err.decode().splitlines()
    assert heard[1] == f"migpipe decode: listening on {address} for 120 s"
    assert heard[2].startswith(f"migpipe decode: accepted a connection on {address} from ")


def test_a_qmp_monitor_that_never_greets_is_a_deadline_not_a_hang(tmp_path: Path) -> None:
    """QEMU serves one QMP client per socket: a second one (libvirt holds the first) is
    accepted by the kernel and never greeted. A socket that listens and never speaks is that."""
    import socket

    path = tmp_path / "busy.qmp"
    with socket.socket(socket.AF_UNIX) as held:
        held.bind(str(path))
        held.listen()
        result = migpipe("save", "--qmp", str(path), "--qmp-timeout", "0.5", str(tmp_path / "x"))
    assert result.returncode == 5
    assert (
        result.stderr
        == (
            f"migpipe save: error: no QMP greeting from {path} within 0.5 s (is another client, "
            "such as libvirt, connected to it? --qmp-timeout sets the wait)\n"
        ).encode()
    )
    assert not (tmp_path / "x").exists()


def test_a_listen_nobody_connects_to_ends_at_its_deadline() -> None:
    address = free_port()
    result = migpipe("decode", "--listen", address, "--accept-timeout", "0.3")
    assert result.returncode == 5
    assert (
        result.stderr
        == f"migpipe decode: error: no connection on {address} within 0.3 s\n".encode()
    )


def test_verbose_names_qemu_and_its_version(tmp_path: Path) -> None:
    """A monitor that greets as QEMU 7.2.0 does, takes qmp_capabilities, then hangs up: -v
    has said whom migpipe talks to before the error says what went wrong."""
    import socket
    import threading

    path = tmp_path / "vm.qmp"
    greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}}}

    def monitor(server: socket.socket) -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rwb") as peer:
            peer.write(json.dumps(greeting).encode() + b"\n")
            peer.flush()
            ident = json.loads(peer.readline())["id"]
            peer.write(json.dumps({"return": {}, "id": ident}).encode() + b"\n")
            peer.flush()
            peer.readline()  # the next command: answered by hanging up

    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        thread = threading.Thread(target=monitor, args=(server,))
        thread.start()
        result = migpipe("-v", "save", "--qmp", str(path), str(tmp_path / "vm.mig"))
        thread.join(30)
    said = result.stderr.decode().splitlines()
    assert f"migpipe save: QEMU 7.2.0 greeted on {path}" in said
    assert said[-1].startswith("migpipe save: error: ") and result.returncode != 0


def test_progress_knows_the_size_of_an_input_file(stream: bytes, tmp_path: Path) -> None:
    """encode --in FILE (or < FILE) knows the stream's size, decode --in FILE the wire's: the
    progress line shows the share done and an ETA, as pv does."""
    from migpipe.tunnel.pipeline import Totals
    from migpipe.tunnel.progress import Progress

    source = tmp_path / "s.stream"
    source.write_bytes(stream)
    with source.open("rb") as redirected:
        encode = migpipe("encode", "--progress=json", stdin=redirected)
    assert json.loads(encode.stderr.splitlines()[-1])["stream_expected"] == len(stream)
    (tmp_path / "s.wire").write_bytes(encode.stdout)
    decode = migpipe("decode", "--progress=json", "--in", str(tmp_path / "s.wire"))
    assert json.loads(decode.stderr.splitlines()[-1])["wire_expected"] == len(encode.stdout)

    shown, totals = Progress("encode"), Totals()
    shown.stream_size = 4 << 20
    shown.sample(totals)
    totals.qemu_bytes, totals.wire_bytes = 1 << 20, 1 << 19
    shown.sample(totals)
    line = shown.line(totals, None)
    assert ", 1.0 MiB stream, 512.0 KiB wire, 25%, ETA 0:00:0" in line
