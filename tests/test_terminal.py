"""Progress as a user sees it: migpipe run in a real terminal (tmux), the screen captured.

A narrow pane shows what a line too long for it does (each redraw leaves a wrapped row
behind), what a passphrase prompt under a progress line looks like, and where an error lands.
Each test waits for its command's end with `tmux wait-for`, never for a guessed time; the
input is fed slowly on purpose (a `sleep` in the feeding pipeline) so that progress redraws.
"""

import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import MIGPIPE_SHELL, synthetic_stream

WIDTH, HEIGHT = 72, 20  # narrower than the whole line
DEADLINE = 60.0  # seconds a command in the pane may take before the test fails

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


class Pane:
    """One tmux server of the test's own (its socket in tmp_path), one pane of WIDTH x HEIGHT."""

    def __init__(self, directory: Path) -> None:
        self.socket = str(directory / "tmux.sock")
        self.directory = directory

    def tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-S", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=True,
        )
        return result.stdout

    def run(self, command: str) -> None:
        """Start `command` in a new pane; `finished` waits for its end (the pane stays)."""
        script = f"cd {shlex.quote(str(self.directory))}; {command}; echo rc=$?; "
        script += f"tmux -S {shlex.quote(self.socket)} wait-for -S done; exec sleep 600"
        self.tmux("new-session", "-d", "-x", str(WIDTH), "-y", str(HEIGHT), "sh", "-c", script)

    def finished(self) -> list[str]:
        self.tmux("wait-for", "done")
        return self.screen()

    def screen(self) -> list[str]:
        """The pane's rows as shown, trailing blank rows left out."""
        rows = self.tmux("capture-pane", "-p").rstrip("\n").split("\n")
        return [row.rstrip() for row in rows]

    def wait_for(self, text: str) -> list[str]:
        """The screen once `text` shows on it (polled: the pane gives no event for it)."""
        deadline = time.monotonic() + DEADLINE
        while text not in "\n".join(screen := self.screen()):
            assert time.monotonic() < deadline, f"{text!r} never showed: {screen}"
            time.sleep(0.05)
        return screen

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, check=False)


@pytest.fixture
def pane(tmp_path: Path) -> Iterator[Pane]:
    pane = Pane(tmp_path)
    yield pane
    pane.close()


@pytest.fixture(scope="module")
def stream() -> bytes:
    return synthetic_stream(16 << 20, 3, dirty_share=0.2)


def slowly(path: str, head: int) -> str:
    """A shell pipeline's start that gives `head` bytes of `path`, waits 1.2 s (two or three
    progress redraws), then the rest, so that progress is seen mid-stream."""
    return f"(head -c {head} {path}; sleep 1.2; tail -c +{head + 1} {path})"


def test_progress_fits_a_narrow_terminal_and_leaves_one_final_line(
    pane: Pane, stream: bytes, tmp_path: Path
) -> None:
    (tmp_path / "s.stream").write_bytes(stream)
    encode = f"{MIGPIPE_SHELL} encode --compress zstd:1 --progress > /dev/null"
    pane.run(f"{slowly('s.stream', len(stream) // 2)} | {encode}")
    screen = [row for row in pane.finished() if row]
    assert all(len(row) < WIDTH for row in screen), screen  # no row was wrapped into
    assert screen[-1] == "rc=0"
    progress = [row for row in screen if row != "rc=0"]
    assert len(progress) == 1, screen  # each redraw replaced the last: no debris
    assert progress[0].startswith("encode: done in 0:00:0")
    assert "/s average, " in progress[0] and " MiB stream" in progress[0]
    assert "pages:" not in progress[0]  # the fields that did not fit are left out whole


def test_a_passphrase_prompt_is_never_drawn_over(pane: Pane, tmp_path: Path) -> None:
    """decode asks once the wire's header is in: the prompt must show, and stay shown, while
    it waits; progress starts below it once the stream flows."""
    secret = tmp_path / "pass"
    secret.write_text("correct horse\n")
    secret.chmod(0o600)
    stream = synthetic_stream(4 << 20, 2)
    wire = subprocess.run(
        [*shlex.split(MIGPIPE_SHELL), "encode", "--encrypt", "--passphrase-file", str(secret)],
        input=stream,
        capture_output=True,
        check=True,
    ).stdout
    (tmp_path / "pp.wire").write_bytes(wire)
    pane.run(f"{MIGPIPE_SHELL} decode --ask-passphrase --in pp.wire --progress > out.stream")
    waiting = pane.wait_for("migpipe passphrase:")
    assert not any(row.startswith("decode:") for row in waiting), waiting
    pane.tmux("send-keys", "correct horse", "Enter")
    screen = [row for row in pane.finished() if row]
    assert screen[0] == "migpipe passphrase:"
    assert screen[1].startswith("decode: done in"), screen
    assert screen[2] == "rc=0"
    assert (tmp_path / "out.stream").read_bytes() == stream


def test_an_error_starts_on_a_line_of_its_own(pane: Pane, stream: bytes, tmp_path: Path) -> None:
    wire = subprocess.run(
        [*shlex.split(MIGPIPE_SHELL), "encode"], input=stream, capture_output=True, check=True
    ).stdout
    (tmp_path / "cut.wire").write_bytes(wire[: len(wire) - 100])
    decode = f"{MIGPIPE_SHELL} decode --progress > /dev/null"
    pane.run(f"{slowly('cut.wire', len(wire) // 2)} | {decode}")
    screen = [row for row in pane.finished() if row]
    assert screen[0].startswith("decode: 0:00:0"), screen  # the last redraw, left as it was
    assert screen[1].startswith("migpipe decode: error: wire stream truncated"), screen
    assert screen[-1] == "rc=4"


@pytest.mark.parametrize("command", ["encode", "decode", "generate --synthetic"])
def test_binary_to_a_terminal_is_refused_with_a_hint_that_fits_the_command(
    pane: Pane, command: str
) -> None:
    """encode and decode name a file with --out, generate with -o: the hint names neither."""
    pane.run(f"{MIGPIPE_SHELL} {command} < /dev/null")
    screen = " ".join(row for row in pane.finished() if row)  # the message may wrap
    name = command.split()[0]
    assert screen.replace(" ", "") == (
        f"migpipe {name}: error: refusing to write a binary stream to standard output, a "
        "terminal; redirect it, or name a file rc=1"
    ).replace(" ", "")
