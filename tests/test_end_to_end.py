"""The main job end to end: real server and worker processes on a generated CSV.

Also the two rules that make retries safe (idempotent upsert, first result
wins), driven by a hand-held protocol client (``procs.client``), and the
recovery of a chunk whose worker is SIGKILLed while holding it.  Every
expected answer comes from ``conftest.oracle`` (the csv module, no pandas).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import protocol
from conftest import (Gate, assert_aggregate, db_rows, kill, make_sales_csv, oracle,
                      parse_final, run_job, wait_for)

PRICE, QTY = "Unit Price", "Units Sold"


@pytest.mark.timeout(120)
def test_job_matches_the_single_process_oracle(procs, sales_100k):
    """Three workers on 100,000 rows give the single-process answer (1e-9
    relative); with no failures every chunk is dispatched exactly once, and
    every worker takes part and exits 0 after hearing NO_JOB.

    A gate holds one chunk until all three workers are connected, so a
    worker slow to start (importing pandas on a busy machine) still finds
    the job open.  The three workers are connected and asking when the last
    chunk is counted, so they hear NO_JOB at once; the server then lingers
    its --linger of 3 s only for the gate, which has left without asking."""
    server = procs.server(sales_100k, args=["--chunks", "40", "--linger", "3"])
    names = ["w0", "w1", "w2"]
    gate = Gate(procs, server)
    workers = [procs.worker(server.port, name, ["--delay", "0.05"]) for name in names]
    gate.open_when_connected(names)
    code, out = server.finish(90)
    assert code == 0, server.stderr()
    assert_aggregate(parse_final(out), oracle(sales_100k, PRICE, QTY))
    assert [w.wait(timeout=30) for w in workers] == [0, 0, 0]   # each heard NO_JOB
    attempts = db_rows(server.db, "SELECT chunk_id, outcome FROM attempts")
    assert sorted(c for c, _ in attempts) == list(range(40))
    assert {o for _, o in attempts} == {"counted"}
    table = [line.split() for line in out.splitlines()[2:] if line.split()[:1] in
             (["gate"], ["w0"], ["w1"], ["w2"])]
    assert sum(int(chunks) for _, chunks, _ in table) == 40      # the per-worker table
    assert sum(int(rows) for _, _, rows in table) == 100_000


@pytest.mark.timeout(60)
def test_alternative_column_names(procs, tmp_path):
    """The design's alternative names (here UnitPrice and Qty) are found and
    give the oracle's answer."""
    csv = make_sales_csv(tmp_path / "alt.csv", 5_000, seed=3, columns="UnitPrice,Qty")
    final, _ = run_job(procs, csv, workers=1, server_args=["--chunks", "7"])
    assert_aggregate(final, oracle(csv, "UnitPrice", "Qty"))


@pytest.mark.timeout(60)
def test_same_result_twice_counts_once(procs, tmp_path):
    """Idempotence: a RESULT delivered twice (an ACK lost, say) is acknowledged
    twice but counted once; the final aggregate is unchanged."""
    csv = make_sales_csv(tmp_path / "s.csv", 3_000, seed=5)
    server = procs.server(csv, args=["--chunks", "3"])
    client = procs.client(server.port, "hand")
    result = client.result_for(client.take())
    first, second = client.ask(result), client.ask(result)
    assert (first["counted"], second["counted"]) == (True, False)
    client.close()
    procs.worker(server.port, "w0")
    code, out = server.finish(60)
    assert code == 0, server.stderr()
    assert_aggregate(parse_final(out), oracle(csv, PRICE, QTY))
    assert db_rows(server.db, "SELECT COUNT(*) FROM worker_results") == [(3,)]


@pytest.mark.timeout(60)
def test_same_chunk_from_two_workers_counts_once(procs, tmp_path):
    """First result wins: when a lease expires and the chunk is handed to a
    second worker, both results are recorded in worker_results, but only the
    first changes the final aggregate."""
    csv = make_sales_csv(tmp_path / "s.csv", 2_000, seed=6)
    server = procs.server(csv, args=["--chunks", "1", "--lease-timeout", "0.5"])
    slow, fast = procs.client(server.port, "slow"), procs.client(server.port, "fast")
    job_a = slow.take()
    # After the lease expires the same chunk must come back to the queue.
    def released_chunk():
        reply = fast.get_job()
        return reply if reply["type"] == protocol.JOB else None  # WAIT until it expires

    job_b = wait_for(released_chunk, 10, "the expired chunk to be re-leased", interval=0.1)
    assert job_b["chunk_id"] == job_a["chunk_id"]
    assert job_b["attempt_id"] != job_a["attempt_id"]
    assert fast.send_result(job_b)["counted"] is True
    assert slow.send_result(job_a)["counted"] is False
    slow.close()
    fast.close()
    code, out = server.finish(60)
    assert code == 0, server.stderr()
    assert_aggregate(parse_final(out), oracle(csv, PRICE, QTY))
    rows = db_rows(server.db, "SELECT COUNT(*) FROM worker_results WHERE chunk_id = ?",
                   (job_a["chunk_id"],))
    assert rows == [(2,)]


@pytest.mark.timeout(90)
def test_killed_worker_chunk_is_requeued(procs, tmp_path):
    """A worker SIGKILLed while it holds a chunk: its connection drops, the
    chunk goes back to the queue at once (no need to wait for the lease),
    and the job still finishes exact."""
    csv = make_sales_csv(tmp_path / "s.csv", 10_000, seed=7)
    server = procs.server(csv, args=["--chunks", "5", "--lease-timeout", "600"])
    stuck = procs.worker(server.port, "stuck", ["--stall-rate", "1", "--stall-seconds", "600"])
    wait_for(lambda: db_rows(server.db, "SELECT 1 FROM attempts WHERE worker_id = 'stuck'"),
             30, "the stuck worker to lease a chunk")
    kill(stuck)
    procs.worker(server.port, "w0")
    code, out = server.finish(60)
    assert code == 0, server.stderr()
    assert_aggregate(parse_final(out), oracle(csv, PRICE, QTY))
    outcomes = db_rows(server.db, "SELECT outcome FROM attempts WHERE worker_id = 'stuck'")
    assert outcomes == [("dropped",)]


@pytest.mark.timeout(60)
def test_missing_price_column_fails_before_listening(procs, tmp_path):
    """A CSV without a price column is refused before the server listens:
    one line naming the columns found and the accepted names, exit code 2."""
    csv = tmp_path / "bad.csv"
    csv.write_text("Region,Units Sold,Unit Cost\nEurope,3,1.5\n")
    server_proc = procs.popen(
        [sys.executable, "server.py", "--csv", str(csv), "--port", "0",
         "--db", str(tmp_path / "r.sqlite")], stderr=subprocess.PIPE, text=True)
    _, err = server_proc.communicate(timeout=30)
    assert server_proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert "no price column" in lines[0] and "'Unit Cost'" in lines[0] and "unitprice" in lines[0]
