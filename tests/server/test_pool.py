"""The worker pool's places: reserved before the work is known, handed to a task or given
back, never counted twice."""

from __future__ import annotations

import threading

import pytest

from segformer.server.pool import PoolFull, WorkerPool
from tests.server.helpers import wait_until


def test_a_reserved_place_goes_to_its_task_or_back_to_the_pool() -> None:
    pool = WorkerPool(1, 1, "test-pool")
    try:
        first, second = pool.reserve(), pool.reserve()
        assert pool.in_flight == 2
        with pytest.raises(PoolFull):
            pool.reserve()
        with pytest.raises(PoolFull):
            pool.submit(print)
        first.release()
        first.release()  # given back once only
        assert pool.in_flight == 1

        gate = threading.Event()
        future = pool.submit(gate.wait, 10, slot=second)  # in second's place, not a new one
        assert pool.in_flight == 1
        second.release()  # the task has it: nothing to give back
        assert pool.in_flight == 1
        gate.set()
        assert future.result(timeout=10) is True
        wait_until(lambda: pool.in_flight == 0)

        # a place already given back is not reused: the task takes a fresh one
        stale = pool.reserve()
        stale.release()
        assert pool.submit(sum, [1, 2], slot=stale).result(timeout=10) == 3
        wait_until(lambda: pool.in_flight == 0)
    finally:
        pool.shutdown()
