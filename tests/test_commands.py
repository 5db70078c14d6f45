"""inspect, extract, generate and the demo, through the API and the real CLI."""

import json
from pathlib import Path

import pytest
from support import PAGE, migpipe, synthetic_stream

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
