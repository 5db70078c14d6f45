"""The stream core against streams a real QEMU 7.2 and 10.0 wrote, loaded back into the same QEMU.

The oracle for memory is what the source sent, replayed by tests/oracle.py (code that shares
nothing with migpipe's parser), because QEMU 7.2 under TCG can miss guest writes between dirty
syncs, which makes the source's own memory no oracle after a live migration.
"""

import json
from pathlib import Path

import oracle
import pytest
import qemuvm
from support import migpipe

from migpipe.stream.parser import StreamParser
from migpipe.stream.writer import StreamWriter
from migpipe.tools.extracted import image_file_name
from migpipe.tools.stats import StreamStats

pytestmark = pytest.mark.qemu
IMAGE_START = 1 << 20  # below 1 MiB, ROM and VGA windows overlay pc.ram


@pytest.fixture(scope="module", params=qemuvm.KINDS)
def capture(
    request: pytest.FixtureRequest, build_captures: dict[str, qemuvm.Capture]
) -> qemuvm.Capture:
    return build_captures[request.param]


@pytest.fixture(scope="module")
def replayed(capture: qemuvm.Capture) -> oracle.Replay:
    return oracle.replay(capture.path)


def rewrite(source: Path, target: Path, chunk: int) -> None:
    """parse -> write in `chunk`-sized pieces, as a pipeline stage would."""
    parser, writer, out = StreamParser(), StreamWriter(), bytearray()
    with open(source, "rb") as f:
        while data := f.read(chunk):
            parser.feed(data)
            writer.write_all(out, parser.next_records())
    parser.close()
    writer.write_all(out, parser.next_records())
    target.write_bytes(out)


def test_rewrite_is_byte_identical(capture: qemuvm.Capture, tmp_path: Path) -> None:
    stream = capture.path
    for chunk in (1 << 20, 4093):
        rewrite(stream, tmp_path / "rewritten.stream", chunk)
        rewritten = (tmp_path / "rewritten.stream").read_bytes()
        assert len(rewritten) == stream.stat().st_size
        assert rewritten == stream.read_bytes(), "rewritten stream differs"


def test_captures_are_what_they_claim(capture: qemuvm.Capture, replayed: oracle.Replay):
    kind = capture.kind
    assert replayed.normal_pages > 0 and replayed.zero_pages > 0
    if kind == "idle":
        assert replayed.pages_resent == 0
    else:
        assert replayed.pages_resent > 0 and replayed.max_sends >= 2
    assert (replayed.xbzrle_pages > 0) == (kind == "xbzrle")


def test_inspect_agrees_with_the_oracle(capture: qemuvm.Capture, replayed: oracle.Replay):
    stream = capture.path
    result = migpipe("inspect", "--json", str(stream))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["bytes"] == stream.stat().st_size
    assert report["machine"] == capture.qemu.machine
    # QEMU's globalstate: what the guest was doing when it was saved (a paused one stays paused)
    assert report["runstate"] == ("paused" if capture.kind == "idle" else "running")
    # 10.0 announces the switch-over (for devices that prepare for it) before RAM's END.
    switchover = {"SWITCHOVER_START": 1} if capture.qemu.version != "7.2" else {}
    assert report["commands"] == switchover
    ram = {b["name"]: b["used_length"] for b in report["ram_blocks"]}
    assert ram == replayed.blocks
    # The oracle counts pc.ram and every other block alike; so does inspect.
    assert report["pages"]["zero"] == replayed.zero_pages
    assert report["pages"]["normal"] == replayed.normal_pages
    assert report["pages"]["xbzrle"] == replayed.xbzrle_pages
    assert report["pages_resent"] == replayed.pages_resent
    assert report["max_sends_of_a_page"] == replayed.max_sends
    assert report["passes"] >= (1 if replayed.pages_resent == 0 else 2)
    idstrs = [s["idstr"] for s in report["sections"]]
    assert idstrs[0] == "ram" and "cpu" in idstrs
    assert 0 < report["device_state_bytes"] < report["ram_bytes"]


def test_destination_loads_the_rewritten_stream(
    capture: qemuvm.Capture, replayed: oracle.Replay, tmp_path: Path
) -> None:
    rewritten = tmp_path / "rewritten.stream"
    rewrite(capture.path, rewritten, 1 << 16)
    memory = qemuvm.load_stream(rewritten, tmp_path, qemu=capture.qemu)
    assert oracle.first_difference(memory, replayed.image) is None


def test_extract_then_generate_loads_into_qemu(
    capture: qemuvm.Capture, replayed: oracle.Replay, tmp_path: Path
) -> None:
    stream = capture.path
    extracted = tmp_path / "extracted"
    result = migpipe("extract", str(stream), str(extracted))
    assert result.returncode == 0, result.stderr
    image = (extracted / image_file_name("pc.ram")).read_bytes()
    # two independent replays agree
    assert oracle.first_difference(image[IMAGE_START:], replayed.image) is None

    compact = tmp_path / "compact.stream"
    result = migpipe("generate", "--from", str(extracted), "-o", str(compact))
    assert result.returncode == 0, result.stderr
    stats = StreamStats()
    parser = StreamParser()
    parser.feed(compact.read_bytes())
    parser.close()
    for record in parser.next_records():
        stats.add(record)
    assert stats.pages_resent == 0 and stats.pages["xbzrle"] == 0  # each page once, whole
    loaded = qemuvm.load_stream(compact, tmp_path, qemu=capture.qemu)
    assert oracle.first_difference(loaded, replayed.image) is None
