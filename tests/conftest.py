"""Session fixtures for the real-QEMU tests: the test guest, built once, the QEMU builds to run
it on, and streams captured from it once per session and build (capturing is the slow part, so
every test shares them)."""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import qemuvm

QEMU_FIXTURES = {
    "qemu_binary",
    "qemu_build",
    "guest_elf",
    "qemu_captures",
    "qemu_streams",
    "build_captures",
    "every_build_streams",
}


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


@pytest.fixture(scope="session", params=qemuvm.BUILDS, ids=str)
def qemu_build(request: pytest.FixtureRequest, qemu_binary: str) -> qemuvm.QemuBuild:
    """Each QEMU a test that takes this runs on: Debian's 7.2, and the 10.0 setup.sh unpacks.

    Where QEMU is installed, a build that is missing or is not the version it is named after
    fails the test: only a machine without QEMU at all skips (see qemu_binary).
    """
    build: qemuvm.QemuBuild = request.param
    if build.binary is None:
        pytest.fail(build.missing)
    version = build.reported_version()
    if not version.startswith(f"{build.version}."):
        pytest.fail(f"{build.binary} is QEMU {version}, not {build.version}: see setup.sh")
    return build


@pytest.fixture(scope="session")
def guest_elf(qemu_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/guest built with gcc into a temporary directory (never committed)."""
    return qemuvm.build_guest(tmp_path_factory.mktemp("guest"))


@pytest.fixture(scope="session")
def capture_kinds(
    guest_elf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[qemuvm.QemuBuild], dict[str, qemuvm.Capture]]:
    """build -> one stream per kind ("idle", "dirty", "xbzrle") migrated from a real source of
    that build by `cat`; captured on first use, once per session whichever fixture asks."""

    @functools.cache
    def capture(build: qemuvm.QemuBuild) -> dict[str, qemuvm.Capture]:
        workdir = tmp_path_factory.mktemp(f"captures-{build}")
        return {
            kind: qemuvm.capture_stream(
                guest_elf, kind, workdir / f"{kind}.stream", workdir, qemu=build
            )
            for kind in qemuvm.KINDS
        }

    return capture


@pytest.fixture(scope="session")
def qemu_captures(
    capture_kinds: Callable[[qemuvm.QemuBuild], dict[str, qemuvm.Capture]],
) -> dict[str, qemuvm.Capture]:
    """One stream per kind from Debian's QEMU 7.2."""
    return capture_kinds(qemuvm.QEMU_7_2)


@pytest.fixture(scope="session")
def build_captures(
    qemu_build: qemuvm.QemuBuild,
    capture_kinds: Callable[[qemuvm.QemuBuild], dict[str, qemuvm.Capture]],
) -> dict[str, qemuvm.Capture]:
    """One stream per kind from each build (qemu_build's parameters)."""
    return capture_kinds(qemu_build)


@pytest.fixture(scope="session")
def qemu_streams(qemu_captures: dict[str, qemuvm.Capture]) -> dict[str, Path]:
    """kind -> path of the captured stream file."""
    return {kind: capture.path for kind, capture in qemu_captures.items()}


@pytest.fixture(scope="session")
def every_build_streams(
    capture_kinds: Callable[[qemuvm.QemuBuild], dict[str, qemuvm.Capture]],
) -> list[Path]:
    """Every build's streams in one list, for tests that draw from a corpus (fuzzing) rather
    than repeat themselves per build."""
    return [capture.path for build in qemuvm.BUILDS for capture in capture_kinds(build).values()]
