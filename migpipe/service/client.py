"""A small synchronous client for `migpipe serve` (migpipe-serve(1)), for daemons and tests.

It uses blocking sockets, because that is what daemons written in Python use. From trio, call
it through `trio.to_thread.run_sync`. A Client is not thread-safe: use one per thread.

    with migpipe.service.client.connect("/run/migpipe.sock") as service:
        service.add_fd("src", src_fd)  # sent with SCM_RIGHTS; close your copy afterwards
        service.add_fd("dst", dst_fd)
        job = service.start_job("encode", input="src", output="dst", filters=["zstd:1"])
        figures = service.wait_job(job)["figures"]

Events that arrive while a command waits for its reply are kept. wait_job and wait_event find
them later, and the latest JOB_PROGRESS of each job is in `progress`.

A command waits REPLY_TIMEOUT seconds for its reply by default, since the service answers at
once; waiting for a job's end has no bound unless one is given, since a migration may take
hours. Replies are matched to commands by id: the reply to a command whose wait was given up
(a TimeoutError) is dropped when it comes, never taken for a later command's.
"""

import itertools
import json
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from migpipe.lines import LineSplitter, LineTooLong
from migpipe.service.protocol import JOB_COMPLETED, JOB_ENDS, JOB_PROGRESS, peer_credentials

MAX_MESSAGE = 16 << 20  # the service's replies are small; this only bounds a confused peer
REPLY_TIMEOUT = 30.0  # seconds; the service replies at once, unless it is stuck


class ServiceError(Exception):
    """An error reply: QMP's error class ("GenericError", "CommandNotFound") and its text."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(error_class, desc)
        self.error_class = error_class
        self.desc = desc

    def __str__(self) -> str:
        return f"{self.desc} ({self.error_class})"


class JobError(ServiceError):
    """A job that ended in JOB_FAILED or JOB_CANCELLED; `data` is that event's data."""

    def __init__(self, event: str, data: dict[str, Any]) -> None:
        super().__init__(event, data.get("error", "cancelled"))
        self.data = data


class Client:
    """One connection to the service; its fds and jobs last as long as it does.

    `timeout` (seconds, None for none) bounds the greeting and each command's reply;
    `wait_timeout` bounds wait_job and wait_event. Either is overridden by a call's own.
    """

    def __init__(
        self,
        sock: socket.socket,
        timeout: float | None = REPLY_TIMEOUT,
        wait_timeout: float | None = None,
    ) -> None:
        self._sock = sock
        self.timeout = timeout
        self.wait_timeout = wait_timeout
        self._lines = LineSplitter(MAX_MESSAGE)
        self._ids = itertools.count(1)
        self._abandoned: set[int] = set()  # commands whose reply no one waits for any more
        self._events: deque[dict[str, Any]] = deque()
        self.progress: dict[str, dict[str, Any]] = {}  # job id -> its latest JOB_PROGRESS data
        first = self._receive(self._deadline(None, self.timeout))
        if "error" in first:  # refused (SO_PEERCRED, --max-connections)
            raise ServiceError(first["error"]["class"], first["error"]["desc"])
        self.greeting: dict[str, Any] = first["migpipe"]

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect; the service closes this connection's fds and cancels its jobs."""
        self._sock.close()

    def execute(
        self,
        command: str,
        fds: Sequence[int] = (),
        timeout: float | None = None,
        **arguments: Any,
    ) -> Any:
        """Run `command` and return its "return" value; ServiceError for an error reply,
        TimeoutError when none came within `timeout` seconds (the client's by default)."""
        id = next(self._ids)
        data = json.dumps({"execute": command, "arguments": arguments, "id": id}).encode() + b"\n"
        deadline = self._deadline(timeout, self.timeout)
        self._sock.settimeout(self._left(deadline))
        sent = socket.send_fds(self._sock, [data], list(fds)) if fds else 0
        self._sock.sendall(data[sent:])
        try:
            while "event" in (message := self._next(deadline)):
                self._keep(message)
        except BaseException:
            self._abandoned.add(id)  # its reply may still come: it must not pass for another's
            raise
        # Only a reply to what the service could not parse has no id: a flood, by this command.
        if message.get("id", id) != id:
            raise ServiceError("GenericError", f"a reply to another command: {message}")
        if "error" in message:
            raise ServiceError(message["error"]["class"], message["error"]["desc"])
        return message["return"]

    def add_fd(self, name: str, fd: int) -> dict[str, Any]:
        """Pass `fd` under `name` (the service gets its own copy: close yours when done)."""
        return self.execute("add-fd", fds=[fd], name=name)

    def remove_fd(self, name: str) -> None:
        self.execute("remove-fd", name=name)

    def start_job(self, kind: str, **arguments: Any) -> str:
        """Start a job on fds added before; returns its id. The job takes those fds."""
        return self.execute("start-job", kind=kind, **arguments)["id"]

    def cancel_job(self, id: str) -> None:
        self.execute("cancel-job", id=id)

    def query_jobs(self) -> list[dict[str, Any]]:
        return self.execute("query-jobs")

    def wait_job(self, id: str, timeout: float | None = None) -> dict[str, Any]:
        """The JOB_COMPLETED data of job `id`; JobError if it failed or was cancelled."""
        ended = self.wait_event(lambda e: e["event"] in JOB_ENDS and e["data"]["id"] == id, timeout)
        if ended["event"] != JOB_COMPLETED:
            raise JobError(ended["event"], ended["data"])
        return ended["data"]

    def wait_event(
        self, match: Callable[[dict[str, Any]], bool], timeout: float | None = None
    ) -> dict[str, Any]:
        """The first event, kept or new, for which `match` is true (TimeoutError after
        `timeout` seconds). Events that do not match stay kept, except JOB_PROGRESS, which
        only updates `progress`."""
        for kept in self._events:
            if match(kept):
                self._events.remove(kept)
                return kept
        deadline = self._deadline(timeout, self.wait_timeout)
        while True:
            message = self._next(deadline)
            if "event" not in message:
                raise ServiceError("GenericError", f"a reply to no command: {message}")
            if match(message):
                if message["event"] == JOB_PROGRESS:
                    self.progress[message["data"]["id"]] = message["data"]
                return message
            self._keep(message)

    def _keep(self, message: dict[str, Any]) -> None:
        if message["event"] == JOB_PROGRESS:
            self.progress[message["data"]["id"]] = message["data"]
        else:
            self._events.append(message)

    @staticmethod
    def _deadline(timeout: float | None, default: float | None) -> float | None:
        timeout = default if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout

    @staticmethod
    def _left(deadline: float | None) -> float | None:
        """Seconds to the deadline, for settimeout; TimeoutError once it has passed (a timeout
        of 0 would make the socket non-blocking instead)."""
        if deadline is None:
            return None
        if (left := deadline - time.monotonic()) <= 0:
            raise TimeoutError("no message from the migpipe service in time")
        return left

    def _next(self, deadline: float | None) -> dict[str, Any]:
        """The next message, but replies to abandoned commands, which are dropped."""
        while (message := self._receive(deadline)).get("id") in self._abandoned:
            self._abandoned.remove(message["id"])
        return message

    def _receive(self, deadline: float | None) -> dict[str, Any]:
        while (line := self._next_line()) is None:
            self._sock.settimeout(self._left(deadline))
            try:
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                raise TimeoutError("no message from the migpipe service in time") from None
            if not chunk:
                raise ConnectionError("the migpipe service closed the connection")
            self._lines.feed(chunk)
        return json.loads(line)

    def _next_line(self) -> bytes | None:
        try:
            return self._lines.next_line()
        except LineTooLong:
            raise ServiceError("GenericError", "the service sent an overlong line") from None


def connect(
    path: str,
    timeout: float | None = REPLY_TIMEOUT,
    wait_timeout: float | None = None,
    expected_uid: int | None = None,
) -> Client:
    """A Client connected to the service at `path`, its greeting read; `timeout` bounds the
    connection and each command's reply, `wait_timeout` each wait for an event (see Client).

    The fds a client passes (key fds among them) go to whoever listens on `path`, so that must
    be root or `expected_uid` (by default our own uid); PermissionError otherwise. Root is
    always trusted: it could take the socket's place anyway."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        _, uid, _ = peer_credentials(sock.getsockopt)
        trusted = os.geteuid() if expected_uid is None else expected_uid
        if uid not in (0, trusted):
            raise PermissionError(
                f"{path} is served by uid {uid}, not by uid {trusted} or root: not passing it fds"
            )
        return Client(sock, timeout, wait_timeout)
    except BaseException:
        sock.close()
        raise
