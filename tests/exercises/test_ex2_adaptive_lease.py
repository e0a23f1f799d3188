"""Exercise 2: an adaptive lease.

A fixed --lease-timeout is either too short for slow chunks or too long to
notice a hung worker.  Make ChunkBook set each new lease to three times the
median time of the chunks completed so far, never below one second and never
above the configured lease_timeout.
"""

import pytest

from conftest import FakeClock
from server import ChunkBook

pytestmark = pytest.mark.exercise


def test_lease_follows_observed_chunk_times():
    """After chunks that took 2 s each, a new lease lasts 6 s, not 60 s."""
    clock = FakeClock()
    book = ChunkBook(10, lease_timeout=60.0, max_attempts=4, clock=clock)
    for _ in range(5):
        lease = book.lease("w", conn=1)
        clock.now += 2.0
        book.complete(lease.chunk_id, lease.attempt_id)
    lease = book.lease("w", conn=1)
    assert lease.deadline - clock.now == pytest.approx(6.0)
