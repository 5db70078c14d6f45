"""migpipe against a real libvirt (9.0, Debian 12): images `virsh save` wrote restore through
`migpipe restore` into a fresh QEMU; images `migpipe save --libvirt-xml` wrote restore with
`virsh restore`; an interrupted migpipe image is refused by both.

libvirt runs embedded in virsh (`qemu:///embed?root=DIR`): no daemon, nothing outside DIR. Each
driver load probes QEMU's capabilities, which takes seconds and may happen on every load (on the
machine this was written on, libvirt found its cached probe stale each time: "host cpuid
changed"), so the tests share one long-lived virsh shell per save format (the format is
qemu.conf's, read once when the driver loads), and the shells probe at the same time.

The domain is the qemuvm guest on the machine qemuvm's destinations have (pc, 128 MiB, ACPI, no
USB or balloon), so a stream from either side loads into the other; the guest's isa-debugcon is
a socket the test listens on, so "READY" is read as it is written, as in qemuvm.
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import quoteattr

import oracle
import pytest
import qemuvm
from support import MIGPIPE, migpipe

from migpipe.io.channel import NOT_A_STREAM

VIRSH = shutil.which("virsh")
pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        VIRSH is None,
        reason="virsh is not installed: run ./setup.sh as root (apt-get install "
        "libvirt-clients libvirt-daemon libvirt-daemon-driver-qemu)",
    ),
]

#: What `virsh save` writes here, one driver (one qemu.conf) each: a shell costs seconds, and
#: libvirt's other formats are programs migpipe runs itself (lzop) or standard containers that
#: tests/test_libvirtimage.py covers. libvirt 9.0 has no zstd.
SAVE_FORMATS = ("raw", "gzip")
COMMAND_TIMEOUT = 120.0  # a failsafe: `virsh save` of this guest takes 1.5 s raw, 4 s gzip
MARK = "<< end >>"  # what `echo "<<" end ">>"` prints; the command line itself does not hold it

QEMU_CONF = """\
user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
save_image_format = "{image_format}"
"""


class VirshError(AssertionError):
    """A virsh command failed; the message has virsh's own error lines."""


class Virsh:
    """A `virsh` shell on an embedded QEMU driver rooted in `root`.

    Commands go to its stdin, each followed by an `echo` of MARK; its output is read up to the
    mark (virsh runs commands in order), so a command's result is known without polling.
    Its stderr goes to ROOT/virsh.log: an "error:" line there after a command is its failure.
    stdbuf: virsh's stdout is a pipe, which it would otherwise flush only once it has read the
    next line of input.
    """

    def __init__(self, root: Path, image_format: str) -> None:
        self.root = root
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "qemu.conf").write_text(QEMU_CONF.format(image_format=image_format))
        self.log = root / "virsh.log"
        assert VIRSH is not None
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["stdbuf", "-oL", VIRSH, "-q", "-c", f"qemu:///embed?root={root}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        self._pending = b""
        self._log_seen = 0

    def send(self, command: str) -> None:
        """Start `command` (shells work in parallel); `result` waits for it."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f'{command}\necho "<<" end ">>"\n'.encode())
        self.proc.stdin.flush()

    def result(self, command: str) -> tuple[str, str]:
        """The output of the oldest command sent, and its error lines joined (or "")."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + COMMAND_TIMEOUT
        mark = MARK.encode()
        while mark not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise VirshError(
                    f"virsh {command}: no answer in {COMMAND_TIMEOUT:.0f} s:\n{self._new_log()}"
                )
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise VirshError(f"virsh exited during {command!r}:\n{self._new_log()}")
            self._pending += chunk
        out, self._pending = self._pending.split(mark, 1)
        lines = out.decode(errors="replace").splitlines()
        output = "\n".join(line for line in lines if line and not line.startswith("virsh # "))
        log = self._new_log().splitlines()
        return output, " / ".join(line for line in log if line.startswith("error:"))

    def run(self, command: str) -> str:
        """Run one command; its output lines (prompts left out). VirshError if it failed."""
        self.send(command)
        output, errors = self.result(command)
        if errors:
            raise VirshError(f"virsh {command}: {errors}")
        return output

    def errors(self, command: str) -> str:
        """Run a command that must fail; its error lines."""
        self.send(command)
        _, errors = self.result(command)
        if not errors:
            raise VirshError(f"virsh {command}: succeeded, but it must fail")
        return errors

    def state(self, domain: str) -> str:
        return self.run(f"domstate {domain}").strip()

    def monitor(self, domain: str, command: str, **arguments: object) -> dict:
        """A QMP command through libvirt's own monitor connection (a `custom-monitor` taint)."""
        message = json.dumps({"execute": command, "arguments": arguments})
        return json.loads(self.run(f"qemu-monitor-command {domain} {shlex.quote(message)}"))

    def destroy(self, domain: str) -> None:
        """Kill `domain`'s QEMU if it still runs (it outlives an embedded driver)."""
        if domain in self.run("list --name").split():
            self.run(f"destroy {domain}")

    def close(self) -> None:
        """Destroy what is still running, then quit."""
        with contextlib.suppress(VirshError, OSError):
            for domain in self.run("list --name").split():
                self.destroy(domain)
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _new_log(self) -> str:
        data = self.log.read_bytes()
        new, self._log_seen = data[self._log_seen :], len(data)
        return new.decode(errors="replace")


@pytest.fixture(scope="module")
def shells(qemu_binary: str) -> Iterator[dict[str, Virsh]]:
    """One virsh shell per save format, all loading their drivers and probing QEMU at once.

    Their roots are short directories in /tmp: libvirt puts UNIX sockets (108 bytes at most)
    a few levels under them."""
    probe = f"domcapabilities --virttype qemu --emulatorbin {qemu_binary} --machine pc"
    roots = [Path(tempfile.mkdtemp(prefix="lv", dir="/tmp")) for _ in SAVE_FORMATS]
    shells = {fmt: Virsh(root, fmt) for fmt, root in zip(SAVE_FORMATS, roots, strict=True)}
    try:
        for shell in shells.values():
            shell.send(probe)
        for shell in shells.values():
            _, errors = shell.result(probe)
            assert not errors, f"libvirt cannot run QEMU (./setup.sh as root sets it up): {errors}"
        yield shells
    finally:
        for shell in shells.values():
            shell.close()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def dirty_capture(guest_elf: Path, tmp_path_factory: pytest.TempPathFactory) -> qemuvm.Capture:
    """A multi-pass stream from a guest that kept dirtying memory, migrated by a real QEMU."""
    workdir = tmp_path_factory.mktemp("libvirt-capture")
    return qemuvm.capture_stream(guest_elf, "dirty", workdir / "dirty.stream", workdir)


def domain_xml(name: str, guest_elf: Path, kind: str, console: Path | None = None) -> str:
    """The test guest as a libvirt domain whose QEMU matches qemuvm's (`-machine pc`, 128 MiB;
    libvirt adds -no-acpi unless told otherwise). `console`: a socket for its isa-debugcon."""
    extra = ""
    if console is not None:
        args = [
            "-chardev",
            f"socket,id=dbg,path={console}",
            "-device",
            "isa-debugcon,chardev=dbg,iobase=0xe9",
        ]
        extra = "<qemu:commandline>{}</qemu:commandline>".format(
            "".join(f"<qemu:arg value={quoteattr(arg)}/>" for arg in args)
        )
    return f"""\
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{qemuvm.RAM_SIZE >> 20}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{guest_elf}</kernel>
    <cmdline>{qemuvm.GUEST_APPEND[kind]}</cmdline>
  </os>
  <features><acpi/></features>
  <devices>
    <emulator>{qemuvm.QEMU}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <seclabel type='none'/>
  {extra}
</domain>
"""


@contextlib.contextmanager
def running_domain(virsh: Virsh, name: str, guest_elf: Path, kind: str) -> Iterator[None]:
    """A transient domain whose guest has filled its memory (it printed READY); destroyed at
    the end if it still runs."""
    console = virsh.root / f"{name}.con"
    xml = virsh.root / f"{name}.xml"
    xml.write_text(domain_xml(name, guest_elf, kind, console))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(console))
        listener.listen(1)
        listener.settimeout(COMMAND_TIMEOUT)
        try:
            virsh.run(f"create {xml}")
            connection, _ = listener.accept()  # QEMU connected while it started
            with connection:
                output = b""
                while qemuvm.READY not in output:
                    chunk = connection.recv(4096)
                    assert chunk, f"{name}: the console closed before READY: {output!r}"
                    output += chunk
                yield
        finally:
            virsh.destroy(name)


def image_body(image: Path, image_format: str) -> bytes:
    """The QEMU stream in a libvirt image, read without migpipe: the body starts after the
    92-byte header and its data_len (a native-order word at offset 20) of XML and padding."""
    data = image.read_bytes()
    body = data[92 + int.from_bytes(data[20:24], sys.byteorder) :]
    if image_format == "gzip":
        return gzip.decompress(body)
    return body


@pytest.mark.parametrize("image_format", SAVE_FORMATS)
def test_virsh_save_restores_through_migpipe(
    shells: dict[str, Virsh], guest_elf: Path, tmp_path: Path, image_format: str
) -> None:
    virsh = shells[image_format]
    name = f"save-{image_format}"
    image = tmp_path / "vm.img"
    with running_domain(virsh, name, guest_elf, "dirty"):
        assert virsh.state(name) == "running"
        virsh.run(f"save {name} {image}")
    assert name not in virsh.run("list --all --name").split()  # saved: the guest is gone

    inspected = migpipe("inspect", "--json", str(image))
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["error"] is None  # the whole stream, to its EOF item
    assert f"<name>{name}</name>" in report["file"]["xml"]
    assert report["file"]["libvirt_format"] == image_format
    assert report["file"]["was_running"] is True
    assert report["machine"] == "pc-i440fx-7.2"

    stream = image_body(image, image_format)
    restored = migpipe("restore", str(image))
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout == stream
    replay = oracle.replay(stream)
    assert replay.pages_resent == 0  # libvirt pauses the guest before it saves
    assert replay.normal_pages > 4096  # 3 in 4 of the region's 8192 pages: saved after READY
    uri = f"exec:{shlex.join([*MIGPIPE, 'restore', str(image)])}"
    with qemuvm.destination_vm(tmp_path, uri) as dest:
        qemuvm.wait_incoming(dest)
        memory = dest.pmemsave(tmp_path / "dest.mem")
    assert oracle.first_difference(memory, replay.image) is None


def test_migpipe_image_restores_with_virsh(
    shells: dict[str, Virsh], guest_elf: Path, tmp_path: Path, dirty_capture: qemuvm.Capture
) -> None:
    virsh, name = shells["raw"], "restored"
    replay = oracle.replay(dirty_capture.path)
    assert replay.pages_resent > 0  # a live stream: pages sent in several passes
    xml = tmp_path / "dom.xml"
    xml.write_text(domain_xml(name, guest_elf, "dirty"))
    image = tmp_path / "vm.img"
    with open(dirty_capture.path, "rb") as stream:
        saved = migpipe(
            "save",
            str(image),
            "--libvirt-xml",
            str(xml),
            "--image-format",
            "gzip",
            "--paused",
            stdin=stream,
        )
    assert saved.returncode == 0, saved.stderr

    virsh.run(f"restore {image}")
    try:
        assert virsh.state(name) == "paused"  # as the image's header asked (--paused)
        dump = virsh.root / "restored.mem"
        virsh.monitor(
            name, "pmemsave", val=qemuvm.IMAGE_START, size=qemuvm.IMAGE_SIZE, filename=str(dump)
        )
        memory = dump.read_bytes()
        dump.unlink()
        assert oracle.first_difference(memory, replay.image) is None
        virsh.run(f"resume {name}")
        assert virsh.state(name) == "running"
        status = virsh.monitor(name, "query-status")["return"]
        assert status["status"] == "running"
    finally:
        virsh.destroy(name)


_IN_MODIFY = 0x2
_LIBC = ctypes.CDLL(None, use_errno=True)


def wait_for_bytes(directory: Path, pattern: str, size: int, timeout: float = 60.0) -> Path:
    """Block (on inotify) until a file in `directory` matching `pattern` holds `size` bytes."""
    fd = _LIBC.inotify_init1(os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        watch = _LIBC.inotify_add_watch(fd, str(directory).encode(), _IN_MODIFY)
        assert watch >= 0, os.strerror(ctypes.get_errno())
        deadline = time.monotonic() + timeout
        while True:  # checked after the watch exists, so no write goes unnoticed
            for path in directory.glob(pattern):
                if path.stat().st_size >= size:
                    return path
            left = deadline - time.monotonic()
            assert left > 0 and select.select([fd], [], [], left)[0], f"no {pattern} of {size}"
            os.read(fd, 65536)
    finally:
        os.close(fd)


def test_interrupted_migpipe_image_is_refused(
    shells: dict[str, Virsh], guest_elf: Path, tmp_path: Path, dirty_capture: qemuvm.Capture
) -> None:
    virsh, name = shells["raw"], "partial"
    xml = tmp_path / "dom.xml"
    xml.write_text(domain_xml(name, guest_elf, "dirty"))
    out = tmp_path / "out"
    out.mkdir()
    image = out / "vm.img"
    stream = dirty_capture.path.read_bytes()
    with open(tmp_path / "save.err", "w+b") as err:
        saver = subprocess.Popen(
            [*MIGPIPE, "save", str(image), "--libvirt-xml", str(xml)],
            stdin=subprocess.PIPE,
            stderr=err,
        )
        try:
            assert saver.stdin is not None
            saver.stdin.write(stream[: len(stream) // 2])  # the rest never comes
            saver.stdin.flush()
            partial = wait_for_bytes(out, ".vm.img.*.partial", 2 << 20)  # XML, padding, a body
        except OSError as e:
            err.seek(0)
            raise AssertionError(
                f"migpipe save ended early ({saver.wait()}): {err.read()!r}"
            ) from e
        finally:
            saver.send_signal(signal.SIGKILL)
            saver.wait()
    assert not image.exists()
    assert partial.read_bytes()[:16] == b"LibvirtQemudPart"

    assert "incomplete" in virsh.errors(f"restore {partial}")
    assert name not in virsh.run("list --all --name").split()
    result = migpipe("restore", str(partial))
    assert result.returncode == 4, result.stderr  # EXIT_TRUNCATED
    assert b"incomplete" in result.stderr and result.stdout == NOT_A_STREAM
