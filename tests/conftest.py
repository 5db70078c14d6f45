"""Session fixtures for the real-QEMU tests: the test guest, built once, and streams captured
from it once per session (capturing is the slow part, so every test shares them)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import qemuvm

QEMU_FIXTURES = {"qemu_binary", "guest_elf", "qemu_captures", "qemu_streams"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "qemu: runs a real qemu-system-x86_64 (skipped only where it is not installed)"
    )
    # The signal tests stop migpipe children as a terminal or a supervisor would. Run in the
    # background of a script (`.ci/run &`), the suite starts with SIGINT ignored and would
    # pass that on: migpipe then rightly ignores SIGINT and lets SIGTERM kill it at once
    # (test_tunnel checks that case on its own), and those tests would fail for the launcher.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a QEMU fixture `qemu`, so `-m "not qemu"` leaves them out."""
    for item in items:
        if QEMU_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.qemu)


def _require_qemu() -> None:
    if qemuvm.QEMU is None:
        pytest.skip(
            "qemu-system-x86_64 is not installed: run ./setup.sh as root "
            "(apt-get install qemu-system-x86)"
        )


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    """Path of qemu-system-x86_64, for tests that start VMs without the guest."""
    _require_qemu()
    assert qemuvm.QEMU is not None
    return qemuvm.QEMU


@pytest.fixture(scope="session")
def guest_elf(qemu_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/guest built with gcc into a temporary directory (never committed)."""
    return qemuvm.build_guest(tmp_path_factory.mktemp("guest"))


@pytest.fixture(scope="session")
def qemu_captures(
    guest_elf: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, qemuvm.Capture]:
    """One stream per kind ("idle", "dirty", "xbzrle") migrated from a real source by `cat`."""
    workdir = tmp_path_factory.mktemp("captures")
    return {
        kind: qemuvm.capture_stream(guest_elf, kind, workdir / f"{kind}.stream", workdir)
        for kind in qemuvm.KINDS
    }


@pytest.fixture(scope="session")
def qemu_streams(qemu_captures: dict[str, qemuvm.Capture]) -> dict[str, Path]:
    """kind -> path of the captured stream file."""
    return {kind: capture.path for kind, capture in qemu_captures.items()}
