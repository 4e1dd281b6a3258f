"""The worker pool behind slow verification: hard per-task timeouts, and recovery from hung or dead workers."""

import operator
import os
import time

import pytest

from rewards.workers import WorkerPool


@pytest.fixture(scope="module")
def pool():
    pool = WorkerPool(2)
    pool.start()
    yield pool
    pool.close()


def test_tasks_return_their_values_in_order(pool):
    results = pool.map(operator.add, [(i, i) for i in range(20)], timeout=5)
    assert [r.value for r in results] == [2 * i for i in range(20)]


def test_a_raising_task_reports_its_error_and_the_worker_keeps_serving(pool):
    bad, good = pool.map(operator.truediv, [(1, 0), (6, 3)], timeout=5)
    assert not bad.ok and "ZeroDivisionError" in bad.error
    assert good.ok and good.value == 2


def test_a_hung_task_is_killed_at_its_deadline_and_its_worker_replaced(pool):
    before = set(pool.pids())
    start = time.monotonic()
    hung, quick = pool.map(time.sleep, [(60,), (0,)], timeout=0.5)
    assert time.monotonic() - start < 5
    assert hung.timed_out and not hung.ok
    assert quick.ok
    after = set(pool.pids())
    gone = before - after
    assert len(gone) == 1
    (dead,) = gone
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    assert pool.map(operator.add, [(1, 2)], timeout=5)[0].value == 3


def test_a_dying_worker_is_reported_and_replaced(pool):
    (died,) = pool.map(os._exit, [(3,)], timeout=5)
    assert not died.ok and "died" in died.error
    assert pool.map(operator.mul, [(3, 4)], timeout=5)[0].value == 12


def test_only_module_level_functions_can_be_sent(pool):
    with pytest.raises(ValueError, match="not a module-level function"):
        pool.map(lambda x: x, [(1,)], timeout=1)
