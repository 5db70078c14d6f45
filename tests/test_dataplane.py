"""migpipe.dataplane: order, backpressure, the first error wins, cancellation stops the threads."""

import threading

import pytest
import trio

from migpipe.dataplane import Plane, run_ordered


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


def test_the_producer_waits_while_in_flight_items_are_ahead_of_the_writer():
    plane = Plane(in_flight=2)
    plane.submit("a")
    plane.submit("b")
    third = threading.Thread(target=plane.submit, args=("c",))
    third.start()
    third.join(0.5)
    assert third.is_alive()  # two items in flight: the third waits for the writer

    worker = threading.Thread(target=plane.work, args=(str.upper,))
    worker.start()
    written = []
    writer = threading.Thread(target=plane.write, args=(written.append,))
    writer.start()
    third.join(30)
    assert not third.is_alive()
    plane.close()
    writer.join(30)
    assert written == ["A", "B", "C"]
    worker.join(30)


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
    assert [type(e) for e in _leaves(caught.value)] == [ValueError]  # the others ended quietly
    assert len(submitted) < 10_000  # the producer was stopped, not run to the end
    assert 5 not in written and written == sorted(written)


def test_cancelling_the_task_stops_every_thread_even_one_waiting_in_trio():
    async def main():
        producer_waiting = trio.Event()

        def produce(submit):
            submit(0)
            trio.from_thread.run_sync(producer_waiting.set)
            trio.from_thread.run(trio.sleep_forever)  # as a stalled service.LoopChannel read

        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_ordered, produce, lambda n: n, lambda n: None)
                await producer_waiting.wait()
                scope.cancel()
        assert scope.cancelled_caught

    trio.run(main)


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]
