"""The data plane: one producer thread, a pool of worker threads, one in-order writer thread.

Handing every 1 MiB frame to trio and back (a to_thread round trip per read, per filter job and
per write) cost encode 15-25% of its time on two cores, CPU that zstd needs. So the bytes move
between long-lived threads over one bounded queue, and trio only starts the threads, waits for
them and stops them. Each thread still runs under trio.to_thread, so a channel that waits in
trio (service.server.LoopSource) keeps working and is cancelled with the job.

Backpressure: at most `in_flight` items are between the producer and the writer; the producer
blocks when the writer falls behind. The first stage to fail stops the others (they end quietly,
so its error is the one reported); cancelling the calling task stops them too. Stopping also
calls the caller's `interrupt`, which ends a read that waits for a silent peer (see
io.channel.Source.interrupt); a write that waits for a peer which stopped reading is not
interrupted: it ends when that peer reads or goes away.
"""

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Generic, TypeVar

import trio

from migpipe.errors import Stopped

WORKERS = 2
IN_FLIGHT = 4

Item = TypeVar("Item")
Result = TypeVar("Result")


def _nothing() -> None:
    pass


class _Slot:
    __slots__ = ("done", "item", "result", "size")

    def __init__(self, item: object) -> None:
        self.item = item
        self.result: object = None
        self.done = False
        self.size = 0


class Plane(Generic[Item, Result]):
    """The queue between the stages: items in submission order, each worked on once."""

    def __init__(
        self,
        in_flight: int = IN_FLIGHT,
        interrupt: Callable[[], None] = _nothing,
        slack: tuple[int, Callable[[Item], int]] | None = None,
    ) -> None:
        """`slack` (bytes, the size of an item): beyond `in_flight` items, more may wait while
        they hold fewer bytes than that (the two-way decode's lane 0, whose QEMU may stop
        reading it until other lanes delivered: the producer must read on for them)."""
        # One lock; a condition per kind of waiter, so that each change wakes only the thread
        # that can act on it (waking all four per frame cost more futex calls than frames).
        lock = threading.Lock()
        self._room = threading.Condition(lock)  # the producer waits for the writer
        self._work_to_do = threading.Condition(lock)  # workers wait for the producer
        self._next_done = threading.Condition(lock)  # the writer waits for the oldest item
        self._order: deque[_Slot] = deque()  # submitted and not yet written, in order
        self._todo: deque[_Slot] = deque()  # submitted and not yet taken by a worker
        self._in_flight = in_flight
        self._slack, self._size = slack if slack is not None else (0, lambda item: 0)
        self._held = 0  # bytes of the items submitted and not yet written (with slack)
        self._closed = False  # the producer is done
        self._stopped = False
        self._interrupt = interrupt

    def submit(self, item: Item) -> None:
        """Queue `item`, waiting while `in_flight` items are ahead of the writer."""
        size = self._size(item)
        with self._room:
            self._wait(
                self._room,
                lambda: (
                    len(self._order) < self._in_flight
                    or (self._slack > 0 and self._held + size <= self._slack)
                ),
            )
            self._held += size
            slot = _Slot(item)
            slot.size = size
            self._order.append(slot)
            self._todo.append(slot)
            self._work_to_do.notify()

    def close(self) -> None:
        with self._room:
            self._closed = True
            self._work_to_do.notify_all()
            self._next_done.notify()

    def stop(self) -> None:
        with self._room:
            self._stopped = True
            for waiters in (self._room, self._work_to_do, self._next_done):
                waiters.notify_all()
        self._interrupt()  # for a producer that waits in a read, not in the queue

    def work(self, function: Callable[[Item], Result]) -> None:
        """Run `function` on items until the producer is done (a worker's loop)."""
        while True:
            with self._work_to_do:
                self._wait(self._work_to_do, lambda: self._todo or self._closed)
                if not self._todo:
                    return
                slot = self._todo.popleft()
            result = function(slot.item)
            with self._next_done:
                slot.result, slot.done = result, True
                if slot is self._order[0]:
                    self._next_done.notify()

    def write(self, function: Callable[[Result], None]) -> None:
        """Call `function` on each result, in submission order (the writer's loop)."""
        while True:
            with self._next_done:
                ready = lambda: self._order[0].done if self._order else self._closed  # noqa: E731
                self._wait(self._next_done, ready)
                if not self._order:
                    return
                slot = self._order.popleft()
                self._held -= slot.size
                self._room.notify()
            function(slot.result)

    def _wait(self, waiters: threading.Condition, ready: Callable[[], object]) -> None:
        waiters.wait_for(lambda: self._stopped or ready())
        if self._stopped:
            raise Stopped


def _stage(plane: Plane, function: Callable[[], None]) -> None:
    try:
        function()
    except Stopped:
        pass
    except BaseException:
        plane.stop()
        raise


async def run_ordered(
    produce: Callable[[Callable[[Item], None]], None],
    work: Callable[[Item], Result],
    write: Callable[[Result], None],
    workers: int = WORKERS,
    in_flight: int = IN_FLIGHT,
    interrupt: Callable[[], None] = _nothing,
    slack: tuple[int, Callable[[Item], int]] | None = None,
) -> None:
    """`produce(submit)` in one thread, `work` on each submitted item in `workers` threads,
    `write` on the results in submission order in one thread; returns when all is written.
    `interrupt` is called once the threads must stop, to end a wait in `produce`'s reads;
    `slack` lets more than `in_flight` items wait, within a number of bytes (see Plane).
    """
    plane: Plane = Plane(in_flight, interrupt, slack)

    def producer() -> None:
        produce(plane.submit)
        plane.close()

    stages = [producer, partial(plane.write, write)] + [partial(plane.work, work)] * workers
    await _in_threads([partial(_stage, plane, function) for function in stages], plane.stop)


async def run_interruptible(function: Callable[[], None], interrupt: Callable[[], None]) -> None:
    """`function` in a thread, as the single stage of a pipeline: cancelling the task calls
    `interrupt`, to end a wait in its reads (it then ends quietly, and the task is cancelled)."""

    def quietly() -> None:
        with contextlib.suppress(Stopped):
            function()

    await _in_threads([quietly], interrupt)


async def _in_threads(functions: list[Callable[[], None]], stop: Callable[[], None]) -> None:
    """Each function in a thread; `stop` is called if one fails or the task is cancelled.

    The calling task waits inside the nursery (not in its exit), where Ctrl-C reaches it: trio
    delivers KeyboardInterrupt to the main task, and only the scope it waits in is cancelled.
    The threads have their own limiter: they live as long as the stream, and many pipelines
    (the service's jobs) must not wait for each other's threads.
    """
    limiter = trio.CapacityLimiter(len(functions))
    running = len(functions)
    all_done = trio.Event()

    async def in_thread(function: Callable[[], None]) -> None:
        nonlocal running
        await trio.to_thread.run_sync(function, limiter=limiter)
        running -= 1
        if not running:
            all_done.set()

    async with trio.open_nursery() as nursery:
        for function in functions:
            nursery.start_soon(in_thread, function)
        try:
            await all_done.wait()
        except BaseException:  # a thread failed (the nursery cancels us), Ctrl-C, a cancel
            stop()
            raise
