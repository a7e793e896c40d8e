"""Worker processes for the embedded runtime: one queue, N processes, each with its
own connections, so that the router's Python runs on every core.

The contract is the in-process bus's (and Pub/Sub's where it matters): delivery is
at-least-once (a delivery that raises `InfrastructureError` is queued again after a
backoff), publishing never blocks on the consumers, and every process may publish
(a worker publishes the tasks its transitions queued). Each process builds its own
router over its own engine after it starts; nothing of the parent's connections is
used in a child. The parent hears of finished batches through a second queue.

A worker never outlives its parent: it holds the read end of a pipe whose only write
end the parent keeps, so the parent's end, however it comes (an orderly stop, a crash,
SIGKILL), reaches every worker as end-of-file. A worker that sees it, or is sent
SIGTERM, finishes the message in hand and exits (what a dead parent's queue still
held is the sweeper's to publish again). Ctrl-C reaches the whole process group from a
terminal: the workers ignore SIGINT and leave the parent to stop them in order.

PostgreSQL only: SQLite has one writer, so its runtime keeps its threads.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from orchestrator import logs
from orchestrator.errors import InfrastructureError
from orchestrator.ports import OutboundMessage

MAX_REDELIVERIES = 20
# How long an idle worker waits for a message before it looks whether it should stop.
STOP_CHECK_S = 0.5

# Builds, in a worker process, the function that handles one message; given the
# publisher of that process and where to report a finished batch.
HandlerFactory = Callable[[Any, Callable[[Any], None]], Callable[[dict[str, Any]], Any]]


class _QueuePublisher:
    """The Publisher port over the shared queue (in any process)."""

    def __init__(self, q: Any, inflight: Any):
        self._q = q
        self._inflight = inflight

    def publish(self, messages: Sequence[OutboundMessage]) -> None:
        if not messages:
            return
        with self._inflight.get_lock():
            self._inflight.value += len(messages)
        for m in messages:
            # What the wire carries: JSON, as the in-process bus keeps it.
            self._q.put((json.dumps(dict(m.data)), 0))


class _StopFlag:
    """Set by SIGTERM or by the parent's end; read between messages. A plain attribute:
    a signal handler must not take a lock that the interrupted code may hold."""

    def __init__(self) -> None:
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason


def _watch_parent(alive_fd: int, stop: _StopFlag) -> None:
    """Block until the parent's write end of the pipe closes: the parent is gone."""
    try:
        while os.read(alive_fd, 1):
            pass
    except OSError:
        pass
    stop.set("its parent process ended")


def _worker(factory: HandlerFactory, q: Any, inflight: Any, finished: Any,
            redelivery_delay_s: float, busy: Any, slot: int,
            alive: tuple[int, int]) -> None:
    alive_r, alive_w = alive
    # Forked: the parent's end is open here too; closed, the pipe ends with the parent.
    os.close(alive_w)
    stop = _StopFlag()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set("SIGTERM"))
    threading.Thread(target=_watch_parent, args=(alive_r, stop), name="orchestrator-parent",
                     daemon=True).start()
    publisher = _QueuePublisher(q, inflight)
    handle = factory(publisher, finished.put)

    def requeue(item: tuple[str, int]) -> None:
        q.put(item)

    while not stop.reason:
        try:
            item = q.get(timeout=STOP_CHECK_S)
        except queue_mod.Empty:
            continue
        if item is None:
            break
        if stop.reason:
            q.put(item)  # still in flight: for another worker, if any remains
            break
        data, tries = item
        payload = json.loads(data)
        busy[slot] = 1
        try:
            handle(payload)
        except InfrastructureError as exc:
            if tries + 1 >= MAX_REDELIVERIES:
                logs.error(f"message dropped after {tries + 1} deliveries: {exc}", payload=payload)
            else:
                # Still in flight: it is queued again after the backoff.
                with inflight.get_lock():
                    inflight.value += 1
                delay = redelivery_delay_s * 2 ** min(tries, 6)
                t = threading.Timer(delay, requeue, args=((data, tries + 1),))
                t.daemon = True
                t.start()
        except Exception as exc:  # a worker must survive any message
            logs.error(f"unhandled error routing message: {type(exc).__name__}: {exc}",
                       payload=payload)
        finally:
            with inflight.get_lock():
                inflight.value -= 1
                busy[slot] = 0
    if stop.reason:
        logs.info(f"worker process {os.getpid()} stops: {stop.reason}", worker=slot)
        # Nobody may read the queues any more: exit without waiting to flush into them.
        q.cancel_join_thread()
        finished.cancel_join_thread()


class ProcessBus:
    def __init__(self, processes: int, factory: HandlerFactory, *,
                 redelivery_delay_s: float = 0.05):
        self.processes = max(1, processes)
        self.workers = self.processes
        self._factory = factory
        self.redelivery_delay_s = redelivery_delay_s
        # fork: a worker inherits the handlers and modules the parent registered.
        self._ctx = mp.get_context("fork")
        self._q: Any = self._ctx.Queue()
        self._finished: Any = self._ctx.Queue()
        self._inflight: Any = self._ctx.Value("q", 0)
        self._publisher = _QueuePublisher(self._q, self._inflight)
        self._procs: list[Any] = []
        # Per worker: handling a message right now (1) or waiting for one (0).
        self._busy: Any = self._ctx.Array("b", self.processes, lock=False)
        self._on_finished: Callable[[Any], None] | None = None
        self._listener: threading.Thread | None = None
        self._stopping = False
        # The workers' lifeline: they read, only this process holds the write end.
        self._alive: tuple[int, int] | None = None

    def attach(self, handler: Callable[[dict[str, Any]], Any]) -> None:
        """The parent's router is not used to deliver: each worker builds its own."""

    def on_finished(self, callback: Callable[[Any], None]) -> None:
        self._on_finished = callback

    @property
    def published(self) -> int:
        return 0

    def publish(self, messages: Sequence[OutboundMessage]) -> None:
        self._publisher.publish(messages)

    def start(self) -> None:
        if self._procs:
            return
        self._stopping = False
        self._alive = os.pipe()
        for i in range(self.processes):
            self._procs.append(self._spawn(i))
        self._listener = threading.Thread(target=self._listen, name="orchestrator-finished",
                                          daemon=True)
        self._listener.start()

    def _spawn(self, slot: int) -> Any:
        self._busy[slot] = 0
        p = self._ctx.Process(target=_worker, name=f"orchestrator-worker-{slot}",
                              args=(self._factory, self._q, self._inflight, self._finished,
                                    self.redelivery_delay_s, self._busy, slot, self._alive),
                              daemon=True)
        p.start()
        return p

    def _replace_dead(self) -> None:
        """A worker process that died (killed, out of memory) is replaced. The message
        it was handling is gone, as with a function instance that dies: the sweeper
        publishes its task again, or expires its lease."""
        for slot, p in enumerate(self._procs):
            if p.is_alive() or self._stopping:
                continue
            if self._busy[slot]:
                with self._inflight.get_lock():
                    self._inflight.value -= 1
            logs.warning(f"worker process {p.pid} died (exit code {p.exitcode}); replaced",
                         worker=slot)
            self._procs[slot] = self._spawn(slot)

    def _listen(self) -> None:
        while not self._stopping:
            self._replace_dead()
            try:
                item = self._finished.get(timeout=0.2)
            except queue_mod.Empty:
                continue
            except (EOFError, OSError):
                return
            if self._on_finished is not None:
                try:
                    self._on_finished(item)
                except Exception as exc:  # a listener never breaks the bus
                    logs.warning(f"batch-finished listener failed: {exc}")

    def idle(self) -> bool:
        return int(self._inflight.value) == 0

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until no message is queued or being handled; False on timeout."""
        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the workers, waiting at most `timeout` in all for the messages in hand."""
        self._stopping = True
        if self._listener is not None:
            self._listener.join(1)
            self._listener = None
        for _ in self._procs:
            self._q.put(None)
        deadline = time.monotonic() + timeout
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                # SIGTERM would only ask it to stop after its message, as it was asked.
                p.kill()
                p.join(1)
        self._procs.clear()
        if self._alive is not None:
            for fd in self._alive:
                os.close(fd)
            self._alive = None

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None and p.pid != os.getpid()]
