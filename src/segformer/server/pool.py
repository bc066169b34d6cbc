"""A bounded pool of worker threads for blocking work (inference, video encoding), so that the
event loop keeps answering while models run, and so that a burst of requests is refused
quickly (503) instead of piling up in memory.

A request that uploads its input first takes its slot before the upload is read
(``reserve``), so that a full pool refuses it before a byte of the body is parsed, and hands
the slot to its task on ``submit``. A task holds its slot until its thread is really done with it: a request that timed out
(504) while its task was already running keeps the slot until the model returns, so the
bound on concurrent work is a true one. A task still waiting in the queue when its request
gives up is cancelled and frees its slot at once.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class PoolFull(Exception):
    """Every worker is busy and the queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"busy; retry after {retry_after} s")
        self.retry_after = retry_after


class Slot:
    """A place in the pool taken before the work is known (its input is still arriving). It
    goes either to a task (``WorkerPool.submit(..., slot=)``) or back to the pool
    (``release``); whichever comes first, the other does nothing."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._held = True

    def take(self) -> bool:
        """Hand the place over to a task; False when it was already given back or taken."""
        with self._lock:
            held, self._held = self._held, False
        return held

    def release(self) -> None:
        """Give the place back unless a task took it."""
        if self.take():
            self._pool._release(None)


class WorkerPool:
    """``workers`` threads and room for ``queue_size`` waiting tasks."""

    def __init__(self, workers: int, queue_size: int, name: str) -> None:
        self.workers = workers
        self.capacity = workers + queue_size
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._mean_seconds = 1.0  # running mean of task durations, for Retry-After
        self._completed = 0

    @property
    def in_flight(self) -> int:
        """Tasks running or waiting."""
        with self._lock:
            return self._in_flight

    def retry_after(self) -> int:
        """Seconds after which a slot is likely free: the queue ahead, at the mean task time."""
        with self._lock:
            waves = max(self._in_flight - self.workers + 1, 1) / self.workers
            return max(1, min(120, math.ceil(waves * self._mean_seconds)))

    def reserve(self) -> Slot:
        """Take a place for a task that is not ready yet, or raise PoolFull."""
        with self._lock:
            full = self._in_flight >= self.capacity
            if not full:
                self._in_flight += 1
        if full:
            raise PoolFull(self.retry_after())
        return Slot(self)

    def submit(self, fn: Callable[..., T], *args: Any, slot: Slot | None = None) -> Future[T]:
        """Start ``fn(*args)`` on a worker in ``slot`` (one reserved earlier) or in a new place;
        raise PoolFull when there is none."""
        if slot is None or not slot.take():
            self.reserve().take()
        started = time.perf_counter()

        def timed() -> T:
            nonlocal started
            started = time.perf_counter()
            return fn(*args)

        try:
            future = self._executor.submit(timed)
        except RuntimeError:  # shutting down
            self._release(None)
            raise PoolFull(self.retry_after()) from None
        future.add_done_callback(
            lambda f: self._release(None if f.cancelled() else time.perf_counter() - started)
        )
        return future

    async def run(
        self,
        fn: Callable[..., T],
        *args: Any,
        timeout: float | None = None,
        slot: Slot | None = None,
    ) -> T:
        """``fn(*args)`` on a worker, awaited; raises PoolFull when full and TimeoutError when
        it takes longer than ``timeout`` seconds (waiting time included)."""
        future = self.submit(fn, *args, slot=slot)
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    def _release(self, seconds: float | None) -> None:
        with self._lock:
            self._in_flight -= 1
            if seconds is not None:
                self._completed += 1
                weight = 1 / min(self._completed, 20)  # a mean over about the last 20 tasks
                self._mean_seconds += weight * (seconds - self._mean_seconds)

    def shutdown(self) -> None:
        """Drop waiting tasks and return without waiting for the running ones (their threads
        finish on their own; nothing waits on their results any more)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
