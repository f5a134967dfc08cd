"""The one thread that owns MLX: loads, unloads and generates, one job at a time.

MLX is not safe to drive from several threads (and a process whose MLX state
was touched by several threads may abort at exit), so every MLX call in stella
runs here. Jobs wait in a FIFO queue; tokens go back to the event loop with
`call_soon_threadsafe`, and a job stops at the next token once it is cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Stats:
    """Counters a test or an operator can read."""

    jobs: int = 0
    tokens: int = 0
    cancelled: int = 0
    # Tokens produced after the job was marked cancelled (stops "within one token": <= 1).
    tokens_after_cancel: int = 0
    max_tokens_after_cancel: int = 0
    # time.monotonic() of the worker's last sign of work: a job begun or ended, a prompt
    # step read, a token made (a wedged engine is one whose beat grows old).
    beat: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class GenerationJob:
    """One generation: what to run, and where its output goes."""

    run: Callable[[GenerationJob], None]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Any]
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    first_token: float = 0.0  # when the engine produced its first visible text
    # Set by the event loop once the first text has been handed to the client (see engine).
    handed: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    # Counted in the worker's waiting jobs: from admission until the worker takes it
    # (or its caller gives up), a model load included.
    counted: bool = False
    params: dict[str, Any] = field(default_factory=dict)

    def emit(self, item: Any) -> None:
        """Hand an item to the event loop without blocking this thread."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:
            self.cancelled = True  # the loop is closed: nobody is listening


class MlxWorker:
    """A daemon thread running MLX jobs in order."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.stats = Stats()
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._waiting = 0
        self._running: GenerationJob | None = None  # taken by the thread, not yet done
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="stella-mlx", daemon=True)
        self._thread.start()
        self.busy = False

    @property
    def waiting(self) -> int:
        """Generation jobs queued and not started."""
        return self._waiting

    @property
    def behind(self) -> int:
        """Generation jobs waiting behind the one running (or the one that runs next)."""
        with self._lock:
            return max(self._held() - 1, 0)

    def full(self) -> bool:
        """Whether a new generation job would wait behind max_queue others.

        The job that runs, or on an idle engine the first one queued (it runs at once),
        holds no place in the queue: with max_queue = 1, two requests that arrive together
        at an idle engine are both taken, whether or not the thread has begun the first.
        """
        with self._lock:
            return self._held() > self.max_queue

    def _held(self) -> int:
        # A running job that was cancelled (its answer is done, or its client gone) stops
        # at its next token: it no longer holds a place. Called with the lock held, so a
        # job the thread is taking is counted once, as waiting or as running.
        running = self._running
        return self._waiting + (running is not None and not running.cancelled)

    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Run `fn(*args)` on the MLX thread (after the jobs already queued)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put(("call", fn, args, future))
        return future

    def reserve(self, job: GenerationJob) -> None:
        """Count `job` as waiting from now (it may still wait for its model to load)."""
        with self._lock:
            if not job.counted:
                job.counted = True
                self._waiting += 1

    def generate(self, job: GenerationJob) -> None:
        """Queue a generation job."""
        self.reserve(job)
        self._jobs.put(("gen", job))

    def discard(self, job: GenerationJob) -> None:
        """The caller no longer waits for `job`: it stops counting, and will not run."""
        job.cancelled = True
        self._uncount(job)

    def _uncount(self, job: GenerationJob) -> None:
        with self._lock:
            if job.counted:
                job.counted = False
                self._waiting -= 1

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running job, drop the rest, end the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            self.stats.beat = time.monotonic()
            if item[0] == "call":
                _, fn, args, future = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # the caller gets it, the thread lives on
                    future.set_exception(exc)
                self.stats.beat = time.monotonic()
                continue
            job: GenerationJob = item[1]
            with self._lock:  # from waiting to running in one step (see full)
                if job.counted:
                    job.counted = False
                    self._waiting -= 1
                if job.cancelled:
                    continue
                self._running = job
            job.started = time.perf_counter()
            self.busy = True
            self.stats.jobs += 1
            try:
                job.run(job)
            except BaseException as exc:
                job.emit(exc)
            finally:
                self._running = None
                self.busy = False
                self.stats.beat = time.monotonic()
