"""A bounded pool of worker threads for blocking work (inference, video encoding), so that the
event loop keeps answering while models run, and so that a burst of requests is refused
quickly (503) instead of piling up in memory.

A task holds its slot until its thread is really done with it: a request that timed out
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

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Start ``fn(*args)`` on a worker, or raise PoolFull."""
        with self._lock:
            full = self._in_flight >= self.capacity
            if not full:
                self._in_flight += 1
        if full:
            raise PoolFull(self.retry_after())
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

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """``fn(*args)`` on a worker, awaited; raises PoolFull when full and TimeoutError when
        it takes longer than ``timeout`` seconds (waiting time included)."""
        future = self.submit(fn, *args)
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
