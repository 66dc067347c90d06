from dataclasses import dataclass

from trtserve.service.engine.scheduler import Scheduler


@dataclass
class Slot:
    """A stand-in for a worker's availability: which batch rows it accepts."""

    max_rows: int = 8
    available: bool = True

    def accepts(self, shapes):
        return next(iter(shapes.values()))[0] <= self.max_rows


def shapes(rows):
    return {"x": (rows, 4)}


def test_round_robin_cycles_over_idle_workers():
    s = Scheduler([Slot(), Slot(), Slot()])
    order = []
    for _ in range(6):
        i = s.acquire(shapes(1))
        order.append(i)
        s.release(i)
    assert order == [0, 1, 2, 0, 1, 2]


def test_busy_workers_are_skipped_and_none_when_all_busy():
    s = Scheduler([Slot(), Slot(), Slot()])
    assert [s.acquire(shapes(1)) for _ in range(3)] == [0, 1, 2]
    assert s.acquire(shapes(1)) is None
    s.release(1)
    assert s.acquire(shapes(1)) == 1
    assert s.acquire(shapes(1)) is None  # all three busy again


def test_worker_whose_profile_cannot_take_the_shape_is_skipped():
    s = Scheduler([Slot(max_rows=4), Slot(max_rows=64)])
    assert s.acquire(shapes(32)) == 1
    s.release(1)
    assert s.acquire(shapes(32)) == 1  # worker 0 can never take 32 rows
    assert s.acquire(shapes(2)) == 0


def test_unavailable_workers_are_skipped():
    s = Scheduler([Slot(available=False), Slot()])
    assert s.acquire(shapes(1)) == 1
    assert s.can_ever_run(shapes(1))
    assert not s.can_ever_run(shapes(100))


def test_a_batch_ahead_goes_to_a_busy_worker_only_when_none_is_idle_and_one_each():
    s = Scheduler([Slot(), Slot()])
    assert s.acquire(shapes(8), ahead=True) == 0  # idle workers first, ahead or not
    assert s.acquire(shapes(8), ahead=True) == 1
    assert s.acquire(shapes(8)) is None  # not asked to queue: none idle
    assert [s.acquire(shapes(8), ahead=True) for _ in range(3)] == [0, 1, None]
    s.release(0)  # worker 0's first batch ended; the one behind it now runs
    assert s.acquire(shapes(8)) is None  # it is not idle
    assert s.acquire(shapes(8), ahead=True) == 0
    s.release(1)
    s.release(1)
    assert s.acquire(shapes(8)) == 1  # worker 1 finished both: idle again


def test_a_batch_ahead_skips_workers_that_cannot_take_it():
    s = Scheduler([Slot(max_rows=4), Slot(max_rows=64)])
    assert s.acquire(shapes(2)) == 0
    assert s.acquire(shapes(2)) == 1
    assert s.acquire(shapes(32), ahead=True) == 1  # worker 0 can never take 32 rows
    assert s.acquire(shapes(32), ahead=True) is None
