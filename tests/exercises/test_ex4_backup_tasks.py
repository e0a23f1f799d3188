"""Exercise 4: backup tasks (speculative execution, as in the MapReduce paper).

When the queue is empty but chunks are still leased, the server answers WAIT
and the job waits for the slowest worker, up to a whole lease.  Instead, hand
an idle worker a second attempt of the oldest leased chunk; the first result
still wins.
"""

import pytest

from conftest import (assert_aggregate, db_rows, make_sales_csv, oracle, parse_final,
                      wait_for)

pytestmark = pytest.mark.exercise


@pytest.mark.timeout(60)
def test_job_does_not_wait_for_a_hung_worker(procs, tmp_path):
    """A worker hangs on its chunk for 10 minutes with a 10-minute lease; the
    job still finishes (within this test's timeout), exact."""
    csv = make_sales_csv(tmp_path / "s.csv", 5_000, seed=13)
    server = procs.server(csv, args=["--chunks", "4", "--lease-timeout", "600"])
    procs.worker(server.port, "hung", ["--stall-rate", "1", "--stall-seconds", "600"])
    wait_for(lambda: db_rows(server.db, "SELECT 1 FROM attempts WHERE worker_id = 'hung'"),
             30, "the hung worker to take a chunk")
    procs.worker(server.port, "healthy")
    code, out = server.finish(50)
    assert code == 0
    assert_aggregate(parse_final(out), oracle(csv, "Unit Price", "Units Sold"))
