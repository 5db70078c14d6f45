"""Wait until a thread sits in a blocking system call, so that a test wakes it from there rather
than before it got there: the kernel shows each thread's current call in
/proc/<pid>/task/<tid>/syscall ("running" while it runs)."""

import platform
import time
from pathlib import Path

import pytest

# x86_64 numbers of the calls a channel's read waits in
READ, POLL, RECVFROM, PPOLL = 0, 7, 45, 271
READ_WAITS = frozenset({READ, POLL, RECVFROM, PPOLL})
PATIENCE = 60  # seconds before a thread that never blocks fails the test

watches_syscalls = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="the system call numbers it watches for are x86_64's"
)


def wait_until_blocked(pid: int, calls: frozenset[int], tid: int | None = None) -> None:
    """Return once a thread of process `pid` (thread `tid`, if given) waits in one of `calls`.
    A test that calls it is marked `watches_syscalls`."""
    tasks = Path(f"/proc/{pid}/task")
    deadline = time.monotonic() + PATIENCE
    while not any(_current_call(task) in calls for task in _tasks(tasks, tid)):
        assert time.monotonic() < deadline, f"no thread of {pid} blocked in {sorted(calls)}"
        time.sleep(0.001)  # polling the kernel's answer, not guessing a delay


def _tasks(tasks: Path, tid: int | None) -> list[Path]:
    return [tasks / str(tid)] if tid is not None else list(tasks.iterdir())


def _current_call(task: Path) -> int | None:
    try:
        first = (task / "syscall").read_text().split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):  # a thread that just ended
        return None
    return int(first) if first.lstrip("-").isdigit() else None
