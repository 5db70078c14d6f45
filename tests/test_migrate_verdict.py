"""migrate's protocol with incoming, without I/O: the verdict line and the figures it carries for
the guest's real pause (Landing), how the source puts the pause together from both sides'
parts (Pause), and the rate it tells QEMU as avail-switchover-bandwidth (against a monitor
that answers as QEMU would, on trio's virtual clock).

Compatibility both ways: a verdict from an older migpipe incoming has no "pause", and the
source then reports its own part alone; an older source reads only "status" and "error", which
keep their meaning, so a newer destination's verdict works there as before.
"""

from __future__ import annotations

import base64
import json
import math
from collections import deque
from typing import Any

import pytest
import trio
import trio.testing
from migpipe_filters.encrypt import Encrypt

from migpipe.qemu.migration import (
    RATE_UPDATE,
    RATE_WINDOW,
    SWITCHOVER_BANDWIDTH,
    Confirmation,
    Landing,
    Pause,
    Replies,
    SwitchoverRate,
    tunnel_rate,
)

LANDING = Landing(loaded=0.0021, answered=0.0004, end="completed")


def sealer() -> Encrypt:
    """An encrypt filter bound to a header, as both ends hold one once the header crossed."""
    stream = Encrypt("aes-256-gcm", bytes(32), {})
    stream.bind(b"a header")
    return stream


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_a_completed_verdict_carries_the_destinations_part(sealed: bool) -> None:
    key = sealer() if sealed else None
    line = Confirmation("completed", landing=LANDING).line(key, 1)
    answer = Confirmation.parse(line, key, 1)
    assert (answer.status, answer.error, answer.sealed) == ("completed", "", sealed)
    landing = answer.landing
    assert landing is not None and landing.end == "completed"
    assert (landing.loaded, landing.answered) == pytest.approx((LANDING.loaded, LANDING.answered))


def test_an_older_source_reads_the_verdict_as_before() -> None:
    """It takes message["status"] and message.get("error"): both are there, unchanged."""
    message = json.loads(Confirmation("completed", landing=LANDING).line())
    assert message == {
        "status": "completed",
        "error": "",
        "pause": {"loaded_ms": 2.1, "answered_ms": 0.4, "end": "completed"},
    }


def test_an_older_destinations_verdict_has_no_figures() -> None:
    answer = Confirmation.parse(b'{"status": "completed", "error": ""}\n', None, 1)
    assert answer == Confirmation("completed")
    pause = Pause(source=0.030, landing=answer.landing, round_trip=0.004, one_way=None)
    assert pause.parts() == (0.030, None, None) and pause.total is None
    assert pause.figures(25)["ms"] is None and pause.figures(25)["source_ms"] == 30.0
    assert "no figures from the destination" in pause.describe()


@pytest.mark.parametrize(
    "figures",
    [
        {"loaded_ms": -1, "answered_ms": 0.4, "end": "completed"},
        {"loaded_ms": "2.1", "answered_ms": 0.4, "end": "completed"},
        {"loaded_ms": True, "answered_ms": 0.4, "end": "completed"},
        {"loaded_ms": math.inf, "answered_ms": 0.4, "end": "completed"},
        {"loaded_ms": math.nan, "answered_ms": 0.4, "end": "completed"},
        {"loaded_ms": 2.1, "end": "completed"},
        {"loaded_ms": 2.1, "answered_ms": 0.4, "end": "later"},
        [2.1, 0.4],
        None,
    ],
)
def test_figures_of_another_shape_are_ignored_and_the_verdict_stands(figures: object) -> None:
    line = json.dumps({"status": "completed", "error": "", "pause": figures}).encode()
    assert Confirmation.parse(line, None, 1) == Confirmation("completed")


def test_a_sealed_stream_takes_no_unsealed_figures() -> None:
    """Figures travel inside the sealed line: an unsealed verdict stays unsealed (the source
    trusts none on an encrypted stream), an altered one fails authentication, whatever either
    carries."""
    key = sealer()
    verdict = Confirmation("completed", landing=LANDING)
    plain = verdict.line()
    assert Confirmation.parse(plain, key, 1).sealed is False
    sealed = base64.b64decode(json.loads(verdict.line(key, 1))["sealed"])
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    tampered = json.dumps({"sealed": base64.b64encode(flipped).decode()}).encode()
    assert Confirmation.parse(tampered, key, 1).status == "lost"


def test_the_source_notes_when_each_line_arrived() -> None:
    chunks = [b'{"status": "opened", "error": ""}\n', b'{"status": "completed", "error": ""}\n']
    replies = Replies(lambda: chunks.pop(0), lambda timeout: True)
    opened = replies.next(None, None)
    verdict = replies.verdict(None)
    assert opened.status == "opened" and verdict.status == "completed"
    assert 0 < opened.received <= verdict.received


def test_the_pause_is_the_round_trip_less_what_the_destination_held_and_the_way_back() -> None:
    """STOP to the wire's end 30 ms; the verdict 10 ms after the wire's end, of which the
    destination held it 2.5 ms and its way back took 0.5 ms: the wire's end took 7 ms to reach
    decode (what the link still held), and the pause is 30 + 7 + 2.1 ms."""
    pause = Pause(source=0.030, landing=LANDING, round_trip=0.010, one_way=0.0005)
    assert pause.parts() == pytest.approx((0.030, 0.007, 0.0021))
    assert pause.total == pytest.approx(0.0391)
    assert pause.figures(25) == {
        "ms": 39.1,
        "qemu_downtime_ms": 25,
        "source_ms": 30.0,
        "link_ms": 7.0,
        "destination_ms": 2.1,
        "one_way_ms": 0.5,
        "end": "completed",
    }
    unmeasured = Pause(source=0.030, landing=LANDING, round_trip=0.010, one_way=None)
    assert unmeasured.total == pytest.approx(0.0396)  # counted as 0: at most 0.5 ms longer
    assert "one-way time not measured" in unmeasured.describe()


def test_a_wire_end_timed_late_is_the_sources_time_not_a_negative_link() -> None:
    """The total does not depend on when either side timed the wire's end: STOP to the
    verdict's arrival less the destination's time after its load and the way back. The source
    timed it 0.4 ms after it was: the link's part is 0, the 0.4 ms came off the source's."""
    pause = Pause(source=0.030, landing=LANDING, round_trip=0.0026, one_way=0.0005)
    assert pause.total == pytest.approx(0.0317)
    assert pause.parts() == pytest.approx((0.0296, 0.0, 0.0021))


def test_the_rate_told_is_a_seconds_average_and_never_above_qemus_own() -> None:
    samples: deque[tuple[float, int]] = deque()
    mbps = 800.0  # QEMU's own estimate over its last 100 ms: 100 MB/s
    assert tunnel_rate(samples, {"transferred": 0, "mbps": mbps}, 10.0) == 0
    assert tunnel_rate(samples, {"transferred": 20_000_000, "mbps": mbps}, 10.5) == 0
    # A second in, 30 MB crossed: 30 MB/s, where QEMU's 100 ms saw a burst of 100 MB/s.
    assert tunnel_rate(samples, {"transferred": 30_000_000, "mbps": mbps}, 10.0 + RATE_WINDOW) == (
        30_000_000
    )
    # The window moves on: the sample from 10.0 s goes once one at least a window old is left.
    rate = tunnel_rate(samples, {"transferred": 70_000_000, "mbps": mbps}, 11.5)
    assert rate == 50_000_000 and samples[0] == (10.5, 20_000_000)
    # QEMU's own estimate, lower, caps it: migpipe only ever makes QEMU more cautious.
    assert tunnel_rate(samples, {"transferred": 90_000_000, "mbps": 80.0}, 12.0) == 10_000_000


class Monitor:
    """QEMU's side of SwitchoverRate: `parameters` as query-migrate-parameters gives them,
    and a migration that has sent 10 MB more at each look (one every RATE_UPDATE) while QEMU's
    own estimate says 100 MB/s."""

    def __init__(self, parameters: dict[str, int]) -> None:
        self.parameters = parameters
        self.told: list[int] = []
        self._sent = 0

    async def execute(self, command: str, **arguments: Any) -> Any:
        if command == "query-migrate-parameters":
            return dict(self.parameters)
        if command == "query-migrate":
            self._sent += 10_000_000
            return {"status": "active", "ram": {"transferred": self._sent, "mbps": 800.0}}
        assert command == "migrate-set-parameters", command
        self.parameters.update(arguments)
        self.told.append(arguments[SWITCHOVER_BANDWIDTH])
        return {}


def follow(monitor: Monitor, seconds: float) -> None:
    """SwitchoverRate through `seconds` of a migration (then cancelled: the migration ended),
    and reset when migrate ends."""

    async def migration() -> None:
        rate = SwitchoverRate()
        with trio.move_on_after(seconds):
            await rate.follow(monitor)
        await rate.reset(monitor)

    trio.run(migration, clock=trio.testing.MockClock(autojump_threshold=0))


def test_migrate_tells_qemu_the_tunnels_rate_and_sets_0_again_at_the_end() -> None:
    qemu = Monitor({SWITCHOVER_BANDWIDTH: 0})
    follow(qemu, 3 * RATE_WINDOW)
    rate, restored = qemu.told  # once a whole window was seen; the same rate since
    assert rate == pytest.approx(10_000_000 / RATE_UPDATE, rel=1e-6) and rate < 100_000_000
    assert restored == 0 == qemu.parameters[SWITCHOVER_BANDWIDTH]


@pytest.mark.parametrize("parameters", [{}, {SWITCHOVER_BANDWIDTH: 25_000_000}], ids=["7.2", "set"])
def test_migrate_leaves_qemu_alone_without_the_parameter_or_with_the_users_figure(
    parameters: dict[str, int],
) -> None:
    qemu = Monitor(dict(parameters))
    follow(qemu, 3 * RATE_WINDOW)
    assert qemu.told == [] and qemu.parameters == parameters
