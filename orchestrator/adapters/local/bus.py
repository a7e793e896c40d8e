"""The embedded runtime's message bus: a queue and a pool of worker threads that
call the same router the Cloud Function calls.

It keeps Pub/Sub's contract where it matters: delivery is at-least-once (a
handler that raises `InfrastructureError` gets the message again after a
backoff, as a 5xx would), and publishing never blocks on the consumer.
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from orchestrator import execution, logs
from orchestrator.errors import InfrastructureError
from orchestrator.ports import OutboundMessage

MAX_REDELIVERIES = 20


class InProcessBus:
    def __init__(self, workers: int = 4, *, redelivery_delay_s: float = 0.05):
        self.workers = max(1, workers)
        self.redelivery_delay_s = redelivery_delay_s
        self._handler: Callable[[dict[str, Any]], Any] | None = None
        self._cv = threading.Condition()
        self._ready: list[tuple[float, int, dict[str, Any], int]] = []  # (due, seq, data, tries)
        self._seq = itertools.count()
        self._inflight = 0
        self._threads: list[threading.Thread] = []
        # Workers whose handler was given up (a timeout): replaced at once, and left to
        # end on their own; nothing waits for them.
        self._retired: set[int] = set()
        self._stopping = False
        self.published = 0
        execution.add_abandon_listener(self._abandoned)

    def attach(self, handler: Callable[[dict[str, Any]], Any]) -> None:
        self._handler = handler

    # Publisher port
    def publish(self, messages: Sequence[OutboundMessage]) -> None:
        now = time.monotonic()
        with self._cv:
            for m in messages:
                # A JSON round trip keeps local runs honest about what the wire carries.
                data = json.loads(json.dumps(dict(m.data)))
                heapq.heappush(self._ready, (now, next(self._seq), data, 0))
                self.published += 1
            self._cv.notify(len(messages))

    def start(self) -> None:
        if self._threads:
            return
        self._stopping = False
        for _ in range(self.workers):
            self._spawn()

    def _spawn(self) -> None:
        t = threading.Thread(target=self._work, name=f"orchestrator-worker-{next(self._seq)}",
                             daemon=True)
        t.start()
        self._threads.append(t)

    def _abandoned(self, ident: int) -> None:
        """A worker's handler was given up: its message no longer counts as in flight,
        and a new worker takes its place."""
        with self._cv:
            mine = [t for t in self._threads if t.ident == ident]
            if not mine:
                return
            self._threads.remove(mine[0])
            self._retired.add(ident)
            self._inflight -= 1
            if not self._stopping:
                self._spawn()
            self._cv.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the workers, waiting at most `timeout` in all for the messages in hand."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()

    def idle(self) -> bool:
        with self._cv:
            return not self._ready and self._inflight == 0

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until no message is queued or being handled; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._ready or self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.05))
        return True

    def _work(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._stopping:
                        return
                    if self._ready and self._ready[0][0] <= time.monotonic():
                        _, _, data, tries = heapq.heappop(self._ready)
                        self._inflight += 1
                        break
                    wait = (self._ready[0][0] - time.monotonic()) if self._ready else None
                    self._cv.wait(wait if wait is None or wait > 0 else 0.001)
            try:
                self._deliver(data, tries)
            finally:
                with self._cv:
                    retired = threading.get_ident() in self._retired
                    if retired:
                        self._retired.discard(threading.get_ident())
                    else:
                        self._inflight -= 1
                        self._cv.notify_all()
            if retired:
                return

    def _deliver(self, data: dict[str, Any], tries: int) -> None:
        assert self._handler is not None, "bus has no handler attached"
        try:
            self._handler(data)
        except InfrastructureError as exc:
            if tries + 1 >= MAX_REDELIVERIES:
                logs.error(f"message dropped after {tries + 1} deliveries: {exc}", payload=data)
                return
            due = time.monotonic() + self.redelivery_delay_s * 2 ** min(tries, 6)
            with self._cv:
                heapq.heappush(self._ready, (due, next(self._seq), data, tries + 1))
                self._cv.notify()
        except Exception as exc:  # a worker must survive any message
            logs.error(f"unhandled error routing message: {type(exc).__name__}: {exc}",
                       payload=data)
