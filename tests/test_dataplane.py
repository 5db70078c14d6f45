"""migpipe.tunnel.dataplane: order, backpressure, the first error wins, cancellation stops the
threads, even one waiting in a read from a silent input."""

import os
import threading
from functools import partial

import pytest
import trio
from blocking import POLL, wait_until_blocked, watches_syscalls

from migpipe.errors import Stopped, leaves
from migpipe.io.channel import FdChannel
from migpipe.tunnel.dataplane import Plane, run_interruptible, run_ordered

JOIN = 60  # seconds before a thread that should have ended is called hung


def test_results_are_written_in_submission_order_whatever_order_the_workers_finish_in():
    second_done = threading.Event()
    written = []

    def produce(submit):
        for n in range(20):
            submit(n)

    def work(n):
        if n == 0:  # the first item finishes only after the second one did
            assert second_done.wait(30)
        if n == 1:
            second_done.set()
        return n * n

    trio.run(run_ordered, produce, work, written.append)
    assert written == [n * n for n in range(20)]


class Drain:
    """A worker (str.upper) and the writer, started on `plane`; result() once it closed."""

    def __init__(self, plane: Plane) -> None:
        self.written: list = []
        self.threads = [
            threading.Thread(target=plane.work, args=(str.upper,)),
            threading.Thread(target=plane.write, args=(self.written.append,)),
        ]
        for thread in self.threads:
            thread.start()

    def result(self) -> list:
        for thread in self.threads:
            thread.join(30)
        return self.written


def test_the_producer_waits_while_in_flight_items_are_ahead_of_the_writer():
    plane = Plane(in_flight=2)
    plane.submit("a")
    plane.submit("b")
    third = threading.Thread(target=plane.submit, args=("c",))
    third.start()
    third.join(0.5)
    assert third.is_alive()  # two items in flight: the third waits for the writer

    written = Drain(plane)
    third.join(30)
    assert not third.is_alive()
    plane.close()
    assert written.result() == ["A", "B", "C"]


def test_slack_lets_more_items_wait_within_its_bytes():
    """The two-way decode's lane 0: beyond `in_flight` items, more are taken while they hold
    no more than the slack's bytes, so the producer reads on for the other lanes."""
    plane = Plane(in_flight=2, slack=(10, len))
    for item in ("aaaa", "bbbb", "cc"):  # 10 bytes: the third fits the slack
        submit = threading.Thread(target=plane.submit, args=(item,))
        submit.start()
        submit.join(30)
        assert not submit.is_alive()
    fourth = threading.Thread(target=plane.submit, args=("d",))
    fourth.start()
    fourth.join(0.5)
    assert fourth.is_alive()  # 11 bytes would be over it: it waits for the writer
    written = Drain(plane)
    fourth.join(30)
    assert not fourth.is_alive()
    plane.close()
    assert written.result() == ["AAAA", "BBBB", "CC", "D"]


@pytest.mark.parametrize("stage", ["produce", "work", "write"])
def test_the_first_stage_to_fail_stops_the_others_and_its_error_is_the_one_raised(stage):
    submitted = []
    written = []

    def produce(submit):
        for n in range(10_000):
            if stage == "produce" and n == 5:
                raise ValueError("bad input at 5")
            submitted.append(n)
            submit(n)

    def work(n):
        if stage == "work" and n == 5:
            raise ValueError("bad frame 5")
        return n

    def write(n):
        if stage == "write" and n == 5:
            raise ValueError("cannot write 5")
        written.append(n)

    with pytest.raises(BaseExceptionGroup) as caught:
        trio.run(run_ordered, produce, work, write)
    assert [type(e) for e in leaves(caught.value)] == [ValueError]  # the others ended quietly
    assert len(submitted) < 10_000  # the producer was stopped, not run to the end
    assert 5 not in written and written == sorted(written)


def test_cancelling_the_task_stops_every_thread_even_one_waiting_in_trio():
    async def main():
        producer_waiting = trio.Event()

        def produce(submit):
            submit(0)
            trio.from_thread.run_sync(producer_waiting.set)
            trio.from_thread.run(trio.sleep_forever)  # as a stalled service LoopSource read

        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_ordered, produce, lambda n: n, lambda n: None)
                await producer_waiting.wait()
                scope.cancel()
        assert scope.cancelled_caught

    trio.run(main)


@pytest.fixture
def silent_pipe():
    """The read end of a pipe whose writer stays open and says nothing (QEMU paused)."""
    read_end, write_end = os.pipe()
    yield read_end
    os.close(write_end)
    os.close(read_end)


@watches_syscalls
def test_interrupt_ends_a_read_blocked_on_a_silent_pipe_and_every_later_one(silent_pipe):
    channel = FdChannel(silent_pipe)
    outcome = []

    def reader() -> None:
        try:
            channel.read()
        except Stopped:
            outcome.append("stopped")

    thread = threading.Thread(target=reader)
    thread.start()
    wait_until_blocked(os.getpid(), frozenset({POLL}), thread.native_id)
    channel.interrupt()
    thread.join(JOIN)
    assert outcome == ["stopped"]
    with pytest.raises(Stopped):
        channel.read()


def test_a_failed_writer_stops_a_producer_that_waits_for_a_silent_input(silent_pipe):
    """The writer's error is reported at once, not when the input next speaks."""
    channel = FdChannel(silent_pipe)

    def produce(submit):
        submit(0)
        while channel.read():  # blocks: nothing comes
            pass

    def write(n):
        raise ValueError("output gone")

    failure = []
    runner = threading.Thread(target=lambda: failure.append(_raised(produce, write, channel)))
    runner.start()
    runner.join(JOIN)
    assert not runner.is_alive(), "the producer's read held the pipeline"
    assert [type(e) for e in leaves(failure[0])] == [ValueError]


@watches_syscalls
def test_cancelling_run_interruptible_ends_its_wait_in_a_read(silent_pipe):
    channel = FdChannel(silent_pipe)
    reader: list[int] = []
    reader_known = threading.Event()
    returned: list[bool] = []

    def run() -> None:
        reader.append(threading.get_native_id())
        reader_known.set()
        channel.read()
        returned.append(True)

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_interruptible, run, channel.interrupt)
                await trio.to_thread.run_sync(reader_known.wait)
                await trio.to_thread.run_sync(
                    wait_until_blocked, os.getpid(), frozenset({POLL}), reader[0]
                )
                scope.cancel()
        returned.append(scope.cancelled_caught)

    runner = threading.Thread(target=trio.run, args=(main,))
    runner.start()
    runner.join(JOIN)
    assert not runner.is_alive(), "the read held the cancelled task"
    assert returned == [True]  # the read never returned; the cancel was caught


def _raised(produce, write, channel: FdChannel) -> BaseException | None:
    try:
        trio.run(partial(run_ordered, produce, lambda n: n, write, interrupt=channel.interrupt))
    except BaseException as e:  # handed to the test's thread
        return e
    return None
