"""Exactly-once effect under failure, with real processes (issue 3).

Workers crash, stall past their lease, report errors and get SIGTERM; the
server is SIGKILLed and SIGTERMed and restarted on the same database.  In
every case the final aggregate must equal the single-process oracle
(``conftest.oracle``: the csv module, no pandas; 1e-9 relative), every
chunk must count exactly once, and the SQLite file must pass ``PRAGMA
integrity_check``.

Two kinds of tests live here:

* end-to-end runs of real ``server.py``/``worker.py`` processes, with the
  worker's fault-injection flags and with signals sent by the test;
* runs where the test itself plays a worker (``procs.client``, speaking the
  real protocol), so that "a chunk is held while everything else finishes"
  happens in a fixed order instead of by timing.

The rules themselves (ChunkBook and its leases with a hand-moved clock, the
first-wins commit, the ACK after the commit, the worker's delivery and
backoff) are proved in milliseconds in tests/test_rules.py.  The long
randomised version is ``tools/chaos.py`` (see ``test_chaos_runner``,
marked slow).
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import threading
import time

import pytest

import protocol
import server as server_mod
from conftest import (PY, ROOT, Gate, Server, assert_aggregate, db_rows, free_port, kill,
                      make_sales_csv, oracle as csv_oracle, parse_final, wait_for)

PRICE, QTY = "Price", "Qty"


# --- helpers -------------------------------------------------------------------

def small_csv(path, rows: int, seed: int = 0):
    """A generated CSV in the short layout (Order ID,Product,Region,Price,Qty)."""
    return make_sales_csv(path, rows, seed=seed, columns=f"{PRICE},{QTY}")


def oracle(csv) -> dict:
    """The expected final aggregate of ``csv`` (see conftest.oracle)."""
    return csv_oracle(csv, PRICE, QTY)


def integrity(db) -> str:
    """``PRAGMA integrity_check`` of the results database ('ok' when sound)."""
    return db_rows(str(db), "PRAGMA integrity_check")[0][0]


def done_chunks(db) -> dict:
    """``{chunk_id: (attempt_id, worker_id)}`` of the counted results."""
    rows = db_rows(str(db), "SELECT chunk_id, attempt_id, worker_id FROM chunk_results")
    return {chunk: (attempt, worker) for chunk, attempt, worker in rows}


def attempts(db, job_id=None) -> list[tuple]:
    """``(attempt_id, chunk_id, worker_id, outcome)`` of every attempt, in order."""
    sql = "SELECT attempt_id, chunk_id, worker_id, outcome FROM attempts"
    if job_id is None:
        return db_rows(str(db), sql + " ORDER BY attempt_id")
    return db_rows(str(db), sql + " WHERE job_id = ? ORDER BY attempt_id", (job_id,))


def assert_counted_once(db, chunks: int, job_id=None) -> None:
    """Every chunk has exactly one result and exactly one ``counted`` attempt."""
    where = "" if job_id is None else " WHERE job_id = ?"
    params = () if job_id is None else (job_id,)
    results = db_rows(str(db), "SELECT chunk_id FROM chunk_results" + where, params)
    assert sorted(c for (c,) in results) == list(range(chunks))
    counted = [chunk for _, chunk, _, outcome in attempts(db, job_id) if outcome == "counted"]
    assert sorted(counted) == list(range(chunks))


def job_id_of(db, csv) -> str:
    """The job id the server gave ``csv`` (the newest one if it was rewritten)."""
    rows = db_rows(str(db), "SELECT job_id FROM jobs WHERE csv_path = ? ORDER BY created_at",
                   (str(csv),))
    return rows[-1][0]


def finish_ok(server, timeout: float = 60) -> dict:
    """Wait for a server to exit 0; return its final aggregate."""
    code, out = server.finish(timeout)
    assert code == 0, f"server exit {code}:\n{server.stderr()}"
    return parse_final(out)


def keep_workers_alive(procs, server, alive: int, worker_args, deadline: float,
                       env=None) -> int:
    """Respawn workers so that ``alive`` run until the server exits; return how many started.

    ``worker_args(n)`` gives the extra arguments of the n-th worker.  This is
    the loop of the 6.5840 MapReduce crash test: crashed workers are simply
    replaced, and the job must still end with the right answer.
    """
    running, started = [], 0
    while server.proc.poll() is None:
        assert time.monotonic() < deadline, f"job not done in time:\n{server.stderr()[-3000:]}"
        running = [w for w in running if w.poll() is None]
        while len(running) < alive:
            running.append(procs.worker(server.port, f"crashy-{started}", worker_args(started),
                                        env=env))
            started += 1
        try:
            server.proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
    return started


# --- 1. crash test -----------------------------------------------------------------

@pytest.mark.timeout(90)
@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_crashing_and_stalling_workers_give_the_exact_result(procs, tmp_path, seed):
    """Rule: with workers that exit abruptly (1/3 of attempts) or stall past
    their lease (1/3), and are respawned until the server exits, the final
    aggregate is exact and every chunk counts exactly once."""
    csv = small_csv(tmp_path / "sales.csv", 20_000, seed=seed)
    server = procs.server(csv, args=("--chunks", 20, "--lease-timeout", 0.5, "--linger", 0.5))

    def crashy(n):
        return ("--crash-rate", 0.33, "--stall-rate", 0.33, "--stall-seconds", 1.0,
                "--fault-seed", seed * 1000 + n, "--log-level", "WARNING")

    started = keep_workers_alive(procs, server, 3, crashy, time.monotonic() + 75)
    assert_aggregate(finish_ok(server), oracle(csv))
    assert_counted_once(server.db, 20)
    assert len(attempts(server.db)) > 20 and started > 3, \
        "no attempt was lost: the faults never fired and the test tested nothing"
    assert integrity(server.db) == "ok"


# --- 2. no early exit ------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_nobody_stops_while_a_chunk_is_unfinished(procs, tmp_path):
    """Rule: while any chunk is leased and not done, a worker asking for work
    hears WAIT (never NO_JOB) and stays: the worker that did the other nine
    chunks leaves only once it hears NO_JOB, which comes after the held
    chunk is delivered; then everyone exits 0 with the exact result.

    Nothing is checked "at a moment": the finisher's log says which reply
    made it leave, and NO_JOB cannot exist before the held chunk is in."""
    csv = small_csv(tmp_path / "sales.csv", 2_000)
    # --linger 30 is a bound, not a wait: the server leaves as soon as every
    # worker that took part has heard NO_JOB.
    server = procs.server(csv, args=("--chunks", 10, "--lease-timeout", 60, "--linger", 30))
    holder = procs.client(server.port, "holder")
    job = holder.take()
    finisher = procs.worker(server.port, "finisher")
    wait_for(lambda: len(done_chunks(server.db)) == 9, 30, "the other 9 chunks")

    observer = procs.client(server.port, "observer")
    assert observer.get_job()["type"] == protocol.WAIT

    assert holder.send_result(job) == {"type": protocol.ACK, "chunk_id": job["chunk_id"],
                                       "counted": True}
    # Consistent with the ACK being a commit receipt (the order itself is
    # proved without timing by test_rules.py::test_ack_is_sent_only_after_the_commit).
    assert done_chunks(server.db)[job["chunk_id"]] == (job["attempt_id"], "holder")
    assert holder.get_job()["type"] == protocol.NO_JOB
    assert observer.get_job()["type"] == protocol.NO_JOB
    holder.close()
    observer.close()
    assert finisher.wait(timeout=30) == 0
    assert "finisher: job finished, 9 results delivered" in procs.worker_log("finisher")
    assert_aggregate(finish_ok(server), oracle(csv))


# --- 3. job count ----------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_slow_workers_within_the_lease_get_each_chunk_once(procs, tmp_path):
    """Rule: a worker that is slow but stays within its lease is never
    second-guessed: N chunks take exactly N dispatches, all counted."""
    csv = small_csv(tmp_path / "sales.csv", 5_000)
    server = procs.server(csv, args=("--chunks", 10, "--lease-timeout", 30))
    gate = Gate(procs, server)
    workers = [procs.worker(server.port, f"slow{i}", ("--delay", 0.1)) for i in range(2)]
    gate.open_when_connected(["slow0", "slow1"])
    assert_aggregate(finish_ok(server), oracle(csv))
    rows = attempts(server.db)
    assert len(rows) == 10
    assert {outcome for *_, outcome in rows} == {"counted"}
    assert sorted(chunk for _, chunk, _, _ in rows) == list(range(10))
    assert "10 dispatches for 10 chunks" in server.stderr()
    assert [w.wait(timeout=30) for w in workers] == [0, 0]


# --- 4. duplicate completion -----------------------------------------------------------

@pytest.mark.timeout(60)
def test_late_result_after_a_re_lease_is_a_recorded_duplicate(procs, tmp_path):
    """Rule: when a lease expires and the chunk is done by another worker, the
    first worker's late result is acknowledged but not counted: one
    ``counted`` and one ``duplicate`` attempt, and the total rows equal the
    file's rows (the chunk is not added twice)."""
    csv = small_csv(tmp_path / "sales.csv", 3_000)
    server = procs.server(csv, args=("--chunks", 6, "--lease-timeout", 1))
    staller = procs.client(server.port, "staller")
    job = staller.get_job()
    chunk = job["chunk_id"]
    helper = procs.worker(server.port, "helper")

    def helper_did_all():
        done = done_chunks(server.db)
        return len(done) == 6 and done[chunk][1] == "helper"

    wait_for(helper_did_all, 30, f"the helper to do every chunk, {chunk} after its lease expired")

    reply = staller.send_result(job)
    assert reply == {"type": protocol.ACK, "chunk_id": chunk, "counted": False}
    assert (job["attempt_id"], chunk, "staller", "duplicate") in attempts(server.db)
    assert staller.get_job()["type"] == protocol.NO_JOB
    staller.close()
    final = finish_ok(server)
    assert_aggregate(final, oracle(csv))
    outcomes = sorted((worker, outcome) for _, c, worker, outcome in attempts(server.db)
                      if c == chunk)
    assert outcomes == [("helper", "counted"), ("staller", "duplicate")]
    assert_counted_once(server.db, 6)
    assert helper.wait(timeout=30) == 0


@pytest.mark.timeout(60)
def test_stalled_worker_loses_its_lease_but_its_late_result_still_counts(procs, tmp_path):
    """Rule: ``--stall-rate 1 --stall-seconds S`` with S past the lease makes
    the lease expire (logged, attempt marked expired); if no other worker
    took the chunk meanwhile, the late result is the first and counts."""
    csv = small_csv(tmp_path / "sales.csv", 500)
    server = procs.server(csv, args=("--chunks", 1, "--lease-timeout", 0.5))
    staller = procs.worker(server.port, "staller", ("--stall-rate", 1, "--stall-seconds", 2))
    assert_aggregate(finish_ok(server), oracle(csv))
    assert "lease of chunk 0 expired" in server.stderr()
    assert attempts(server.db) == [(1, 0, "staller", "counted")]
    assert staller.wait(timeout=30) == 0


# --- 5. server SIGKILL and restart -----------------------------------------------------

@pytest.mark.timeout(90)
def test_server_killed_and_restarted_resumes_without_redoing_chunks(procs, tmp_path):
    """Rule: after a SIGKILL the database is intact; a restart with the same
    arguments resumes: chunks finished before the kill are never dispatched
    again, the workers of the old server reconnect by themselves, and the
    final aggregate is exact."""
    csv = small_csv(tmp_path / "sales.csv", 20_000)
    args = ("--chunks", 20, "--lease-timeout", 5, "--port", free_port())
    first = procs.server(csv, args=args)
    workers = [procs.worker(first.port, f"w{i}", ("--delay", 0.1, "--give-up-after", 60))
               for i in range(2)]
    wait_for(lambda: len(done_chunks(first.db)) >= 5, 60, "5 chunks done")
    kill(first.proc)
    assert integrity(first.db) == "ok"
    before = done_chunks(first.db)
    last_attempt = max(a for a, *_ in attempts(first.db))
    assert len(before) < 20, "the job finished before the kill; nothing was tested"

    second = procs.server(csv, db=first.db, args=args)
    assert second.port == first.port
    # The old workers reconnect by themselves; the gate keeps the job open
    # until both are back (one could still be in its reconnect backoff).
    gate = Gate(procs, second)
    assert gate.job["chunk_id"] not in before
    gate.open_when_connected(["w0", "w1"])
    assert_aggregate(finish_ok(second), oracle(csv))
    assert [w.wait(timeout=30) for w in workers] == [0, 0]

    after = done_chunks(first.db)
    assert {c: after[c] for c in before} == before
    redone = [a for a in attempts(first.db) if a[0] > last_attempt and a[1] in before]
    assert redone == []
    assert {a[2] for a in attempts(first.db) if a[0] > last_attempt} <= {"w0", "w1", "gate"}
    assert_counted_once(first.db, 20)
    assert integrity(first.db) == "ok"


@pytest.mark.timeout(90)
def test_resumed_job_waits_for_the_workers_of_the_earlier_run(procs, tmp_path):
    """Rule: a resumed job can end before a worker of the killed server is back
    (it may be sleeping up to 5 s between reconnects).  The server lingers
    (--linger) until every worker that took part has heard NO_JOB, so that
    worker exits 0 instead of finding no server and giving up."""
    csv = small_csv(tmp_path / "sales.csv", 4_000)
    args = ("--chunks", 4, "--lease-timeout", 60, "--port", free_port())
    first = procs.server(csv, args=args)
    late = procs.client(first.port, "late")
    assert late.get_job()["type"] == protocol.JOB   # "late" takes part in the job
    kill(first.proc)
    late.close()

    second = procs.server(csv, db=first.db, args=(*args, "--linger", 30))
    assert procs.worker(second.port, "w0").wait(timeout=60) == 0   # w0 did every chunk
    assert second.proc.poll() is None, "the server left before 'late' heard NO_JOB"
    assert procs.worker(second.port, "late").wait(timeout=60) == 0
    assert_aggregate(finish_ok(second), oracle(csv))


@pytest.mark.timeout(60)
def test_rerun_of_a_complete_job_reports_at_once_without_lingering(procs, tmp_path):
    """Rule: a job that is complete when the server starts (the same command run
    again after it finished) prints its result and exits at once: the earlier
    run told its workers NO_JOB already, so there is nobody to linger for, even
    with --linger 600."""
    csv = small_csv(tmp_path / "sales.csv", 1_000)
    first = procs.server(csv, args=("--chunks", 3))
    procs.worker(first.port, "w0")
    expected = finish_ok(first)
    again = procs.server(csv, db=first.db, args=("--chunks", 3, "--linger", 600))
    assert finish_ok(again, timeout=30) == expected
    assert "0 dispatches for 3 chunks" in again.stderr()


def test_progress_after_a_resume_rates_only_this_runs_chunks(caplog):
    """Rule: a result re-sent for an earlier run's attempt can be counted before
    this run leased anything; it is reported apart from the chunks stored before this
    run (a reader saw "resuming, 12 of 200" then "13 from an earlier run") and gives no
    rate (it used to give rows / 1e-9 s: 1000000000000 rows/s).  The rate and
    ETA come from this run's own chunks, timed from this run's first lease."""
    book = server_mod.ChunkBook(4, 60.0, 3, done={0}, known_attempts={1: (0, "w"), 2: (1, "w")},
                                next_attempt_id=3)
    progress = server_mod.Progress(4, resumed=1)
    with caplog.at_level("INFO", logger="server"):
        book.complete(1, 2)
        progress.chunk_done(1000, book, this_run=False)
        progress.begin()
        lease = book.lease("w", conn=1)
        book.complete(lease.chunk_id, lease.attempt_id)
        progress._last = 0.0          # log every line here, not once a second
        progress.chunk_done(500, book, this_run=True)
    first, second = [r.getMessage() for r in caplog.records if r.name == "server"]
    assert first == ("progress: 2/4 chunks done (50%, 1 stored before this run, 1 re-sent from "
                     "its attempts), 0 rows in this run")
    assert second.startswith("progress: 3/4 chunks done (75%, 1 stored before this run, 1 re-sent "
                             "from its attempts), "
                             "500 rows in this run, ")
    rate = float(second.split("rows in this run, ")[1].split(" rows/s")[0])
    assert rate > 0 and "ETA" in second


# --- 6. several jobs in one database ---------------------------------------------------

@pytest.mark.timeout(90)
def test_jobs_of_different_files_never_mix_and_fresh_starts_over(procs, tmp_path):
    """Rule: a job is its file (path, size, mtime) plus its chunking: two
    CSVs in one --db each get their own exact aggregate, re-running a finished
    job resumes it (no dispatch), a rewritten file is a new job, and --fresh
    forgets the earlier results of the job."""
    db = tmp_path / "shared.sqlite"
    csv_a = small_csv(tmp_path / "a.csv", 3_000, seed=11)
    csv_b = small_csv(tmp_path / "b.csv", 5_000, seed=12)
    chunking = ("--chunks", 5)

    for csv in (csv_a, csv_b):
        server = procs.server(csv, db=db, args=chunking)
        procs.worker(server.port, "w")
        assert_aggregate(finish_ok(server), oracle(csv))
    job_a, job_b = job_id_of(db, csv_a), job_id_of(db, csv_b)
    assert job_a != job_b
    assert_counted_once(db, 5, job_a)
    assert_counted_once(db, 5, job_b)

    resumed = procs.server(csv_a, db=db, args=chunking)
    assert_aggregate(finish_ok(resumed), oracle(csv_a))
    assert "0 dispatches for 5 chunks" in resumed.stderr()
    assert len(attempts(db, job_a)) == 5

    fresh = procs.server(csv_a, db=db, args=(*chunking, "--fresh"))
    procs.worker(fresh.port, "w")
    assert_aggregate(finish_ok(fresh), oracle(csv_a))
    assert [a for a, *_ in attempts(db, job_a)] == [1, 2, 3, 4, 5]
    assert_counted_once(db, 5, job_b)

    small_csv(csv_a, 4_000, seed=13)   # same path, new content
    rewritten = procs.server(csv_a, db=db, args=chunking)
    procs.worker(rewritten.port, "w")
    assert_aggregate(finish_ok(rewritten), oracle(csv_a))
    assert job_id_of(db, csv_a) not in (job_a, job_b)
    assert len(db_rows(str(db), "SELECT * FROM jobs")) == 3


# --- 7. poison chunks ------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_chunk_that_cannot_parse_fails_the_job_after_max_attempts(procs, tmp_path):
    """Rule: a chunk whose every attempt reports an error (here: an unclosed
    quote that pandas cannot parse, in --stream mode) is FAILED after
    --max-attempts reports; the other chunks still complete, and the server
    exits 1 naming the chunk and its last error."""
    csv = tmp_path / "poison.csv"
    small_csv(csv, 2_000)
    lines = csv.read_bytes().splitlines(keepends=True)
    lines[1500] = lines[1500].replace(b",", b',"', 1)   # an unclosed quote
    csv.write_bytes(b"".join(lines))
    args = ("--stream", "--chunks", 4, "--max-attempts", 3)
    ranges = server_mod.StreamChunks(server_mod.inspect_csv(str(csv)), 4, False).ranges
    offset = len(b"".join(lines[:1500]))
    poison = next(i for i, (start, end) in enumerate(ranges) if start <= offset < end)

    server = procs.server(csv, args=args)
    gate = Gate(procs, server)
    assert gate.job["chunk_id"] != poison
    workers = [procs.worker(server.port, f"w{i}") for i in range(2)]
    gate.open_when_connected(["w0", "w1"])
    code, out = server.finish(45)
    assert code == 1
    assert "{'total_rows'" not in out
    message = next(line for line in server.stderr().splitlines()
                   if line.startswith("server.py: error:"))
    assert f"chunk {poison}: ParserError" in message and "EOF inside string" in message
    rows = attempts(server.db)
    assert [o for _, c, _, o in rows if c == poison] == ["failed"] * 3
    assert sorted(c for _, c, _, o in rows if o == "counted") == \
        [c for c in range(len(ranges)) if c != poison]
    assert [w.wait(timeout=30) for w in workers] == [0, 0]


@pytest.mark.timeout(60)
def test_worker_reporting_errors_fails_the_job_after_max_attempts(procs, tmp_path):
    """Rule: ``--error-rate 1`` turns every attempt into a FAILED report; each
    chunk fails after exactly --max-attempts reports, and the job ends (exit
    1, naming a chunk and the injected error) instead of retrying forever."""
    csv = small_csv(tmp_path / "sales.csv", 300)
    server = procs.server(csv, args=("--chunks", 3, "--max-attempts", 2))
    bad = procs.worker(server.port, "bad", ("--error-rate", 1))
    code, out = server.finish(45)
    assert code == 1
    assert "chunk 0: RuntimeError: fault injection: error on chunk 0" in server.stderr()
    outcomes = [(c, o) for _, c, _, o in attempts(server.db)]
    assert sorted(outcomes) == [(c, "failed") for c in (0, 0, 1, 1, 2, 2)]
    assert bad.wait(timeout=30) == 0


@pytest.mark.timeout(60)
def test_failure_report_resent_after_a_lost_ack_counts_once(procs, tmp_path):
    """Rule: --max-attempts counts failed attempts, not FAILED messages: a
    worker that re-sends its report after a reconnect (its ACK was lost)
    does not use up a second attempt of the chunk."""
    csv = small_csv(tmp_path / "sales.csv", 100)
    server = procs.server(csv, args=("--chunks", 1, "--max-attempts", 2))
    first = procs.client(server.port, "unlucky")
    job = first.get_job()
    assert first.send_failed(job, "boom")["type"] == protocol.ACK
    first.close()
    again = procs.client(server.port, "unlucky")     # reconnected, re-sends
    assert again.send_failed(job, "boom")["type"] == protocol.ACK
    retry = again.get_job()
    assert retry["type"] == protocol.JOB and retry["chunk_id"] == job["chunk_id"]
    assert again.send_result(retry)["counted"] is True
    again.close()
    assert_aggregate(finish_ok(server), oracle(csv))


# --- 7b. chunks that can never arrive -------------------------------------------------

def limited_env(frame_limit: int) -> dict:
    """This environment with the workers' frame limit lowered (protocol.py reads it)."""
    return dict(os.environ, SALES_TEST_WORKER_MAX_FRAME=str(frame_limit))


@pytest.mark.timeout(90)
def test_chunk_every_worker_drops_fails_the_job_after_max_lost(procs, tmp_path):
    """Rule: lost attempts have a bound of their own.  Workers whose frame limit
    (lowered to 4 KiB) is below the chunk's JOB refuse it unread and exit 1, as
    with a 2 GB chunk and the real 1 GiB limit; they never report a failure.
    They are respawned until the server exits, which it does after --max-lost
    lost attempts: exit 1 naming the chunk, how often it was lost and why,
    instead of waiting for ever."""
    csv = small_csv(tmp_path / "sales.csv", 2_000)
    server = procs.server(csv, args=("--chunks", 1, "--max-lost", 3))
    started = keep_workers_alive(procs, server, 1, lambda n: (), time.monotonic() + 75,
                                 env=limited_env(4096))
    code, out = server.finish(30)
    assert code == 1 and "total_rows" not in out
    last = server.stderr().splitlines()[-1]
    assert "chunk 0: lost 3 times without a result or an error report" in last, last
    assert "connection closed" in last and "frame limit" in last
    assert [o for *_, o in attempts(server.db)] == ["dropped"] * 3
    assert started >= 3


@pytest.mark.timeout(90)
def test_stream_chunks_are_cut_to_fit_the_workers_frame_limit(procs, tmp_path):
    """Rule: in --stream mode a chunk is a byte range, which --chunks 1 makes as
    large as the file.  The server cuts the file into as many chunks as the
    workers' frame limit needs (here 64 KiB for a 250 KB file), says so, and the
    job is exact with every attempt counted: no JOB is refused."""
    csv = small_csv(tmp_path / "sales.csv", 10_000)
    assert csv.stat().st_size > 4 * 65536
    env = limited_env(65536)
    server = Server(procs, tmp_path, csv, args=("--stream", "--chunks", 1), env=env)
    server.wait_port()
    worker = procs.worker(server.port, "w0", env=env)
    assert_aggregate(finish_ok(server), oracle(csv))
    line = next(l for l in server.stderr().splitlines() if "--stream: " in l and "instead of 1" in l)
    chunks = int(line.split("--stream: ")[1].split()[0])
    assert chunks >= 8 and "65536-byte frames" in line
    assert {o for *_, o in attempts(server.db)} == {"counted"}
    assert_counted_once(server.db, chunks)
    assert worker.wait(timeout=30) == 0


def test_stream_chunks_fit_the_frame_limit_in_process(tmp_path, monkeypatch):
    """Rule: every --stream JOB, encoded as the server sends it, fits the limit
    (with --compress too), the ranges cover the body without gap or overlap, and
    a record too long to fit any chunk is refused before the job starts."""
    csv = small_csv(tmp_path / "sales.csv", 3_000)
    monkeypatch.setattr(protocol, "WORKER_MAX_FRAME", 8192)
    info = server_mod.inspect_csv(str(csv))
    for compress in (False, True):
        chunks = server_mod.StreamChunks(info, 1, compress)
        assert len(chunks) > 10
        ends = [chunks.ranges[0][0]] + [end for _, end in chunks.ranges]
        assert [start for start, _ in chunks.ranges] == ends[:-1]
        assert ends[-1] == csv.stat().st_size
        for chunk_id in range(len(chunks)):
            frame = protocol.encode(server_mod.job_message(
                info, chunks, "f" * 16, chunk_id, 2 ** 40, chunks.payload(chunk_id)))
            assert len(frame) <= protocol.WORKER_MAX_FRAME
    long = tmp_path / "long.csv"
    long.write_text("Price,Qty,Note\n1,2,short\n3,4,\"" + "x" * 20_000 + "\"\n5,6,end\n")
    with pytest.raises(server_mod.InputError, match="cannot fit the workers' 8192-byte frames"):
        server_mod.StreamChunks(server_mod.inspect_csv(str(long)), 1, False)


@pytest.mark.timeout(60)
def test_documented_mode_chunk_over_the_frame_limit_fails_at_once(procs, tmp_path):
    """Rule: a documented-mode chunk whose JOB frame is over the workers' limit
    is never sent (a worker would refuse it unread): the chunk fails at its first
    attempt, the job exits 1 saying to use more --chunks, and the worker that
    asked hears there is no work and exits 0."""
    csv = small_csv(tmp_path / "sales.csv", 2_000)
    server = Server(procs, tmp_path, csv, args=("--chunks", 1), env=limited_env(4096))
    server.wait_port()
    worker = procs.worker(server.port, "w0")
    code, out = server.finish(45)
    assert code == 1 and "total_rows" not in out
    last = server.stderr().splitlines()[-1]
    assert "chunk 0: its JOB frame is" in last and "over the workers' limit of 4096" in last
    assert "use more --chunks" in last
    assert worker.wait(timeout=30) == 0


def test_job_the_server_cannot_build_is_a_lost_attempt_with_a_bound():
    """Rule: an exception while the server builds a JOB (a MemoryError for a huge
    chunk) is not the worker's fault: the worker hears WAIT, the attempt counts
    as lost, and after --max-lost of them the chunk fails naming the error,
    instead of being retried for ever; the other chunk still goes out."""
    from types import SimpleNamespace

    class Chunks:
        format, compress = "frame", False

        def rows_of(self, chunk_id):
            return 1

        def payload(self, chunk_id):
            if chunk_id == 0:
                raise MemoryError("cannot allocate 1073741824 bytes")
            return b"fine"

    book = server_mod.ChunkBook(2, 60.0, 4, max_lost=3)
    info = SimpleNamespace(price_col=PRICE, qty_col=QTY, group_col=None, sep=",",
                           decimal=".", encoding="utf-8")
    leases = []
    srv = SimpleNamespace(book=book, chunks=Chunks(), info=info, job_id="job",
                          store=SimpleNamespace(record_lease=lambda *a: leases.append(a)),
                          progress=server_mod.Progress(2), timings=server_mod.Timings(),
                          wait_interval=0.0, told_done=lambda worker_id: None,
                          stop=threading.Event())
    handler = server_mod.Handler.__new__(server_mod.Handler)
    handler.server, handler.conn, handler.worker_id = srv, 1, "w"
    replies = []
    handler.send_frame = lambda payload: replies.append(protocol.decode_safe(payload))

    for _ in range(4):
        handler.handle_get_job({"type": protocol.GET_JOB})
    assert [r["type"] for r in replies] == [protocol.WAIT] * 3 + [protocol.JOB]
    assert replies[-1]["chunk_id"] == 1 and [a[2] for a in leases] == [1]
    why = book.failed_chunks()[0]
    assert why.startswith("lost 3 times") and "could not build its JOB (MemoryError" in why
    book.complete(1, replies[-1]["attempt_id"])
    handler.handle_get_job({"type": protocol.GET_JOB})
    assert replies[-1]["type"] == protocol.NO_JOB


# --- 8. clean shutdown -----------------------------------------------------------------

@pytest.mark.timeout(90)
def test_sigterm_stops_the_server_cleanly_and_a_restart_resumes(procs, tmp_path):
    """Rule: SIGTERM mid-job makes the server exit 128+15, with a sound
    database and no attempt left 'leased'; the same command resumes the job
    to the exact result without redoing the chunks already done."""
    csv = small_csv(tmp_path / "sales.csv", 10_000)
    args = ("--chunks", 20, "--lease-timeout", 30)
    first = procs.server(csv, args=args)
    procs.worker(first.port, "w0", ("--delay", 0.1))
    wait_for(lambda: len(done_chunks(first.db)) >= 3, 60, "3 chunks done")
    first.proc.send_signal(signal.SIGTERM)
    code, out = first.finish(30)
    assert code == 128 + signal.SIGTERM
    assert "{'total_rows'" not in out
    assert integrity(first.db) == "ok"
    assert "leased" not in {o for *_, o in attempts(first.db)}
    before = done_chunks(first.db)
    assert len(before) < 20, "the job finished before the signal; nothing was tested"

    second = procs.server(csv, db=first.db, args=args)
    procs.worker(second.port, "w1")
    assert_aggregate(finish_ok(second), oracle(csv))
    after = done_chunks(first.db)
    assert {c: after[c] for c in before} == before
    assert_counted_once(first.db, 20)


@pytest.mark.timeout(60)
def test_sigterm_lets_a_worker_finish_its_attempt_and_exit_0(procs, tmp_path):
    """Rule: a worker that gets SIGTERM while computing a chunk still delivers
    that chunk's result (it counts), takes no further chunk, and exits 0."""
    csv = small_csv(tmp_path / "sales.csv", 2_000)
    server = procs.server(csv, args=("--chunks", 10, "--lease-timeout", 30))
    slow = procs.worker(server.port, "slow", ("--delay", 1))
    leased = wait_for(lambda: [a for a in attempts(server.db) if a[3] == "leased"], 30,
                      "the slow worker to take a chunk")
    slow.send_signal(signal.SIGTERM)
    assert slow.wait(timeout=30) == 0
    mine = [a for a in attempts(server.db) if a[2] == "slow"]
    assert mine == [(leased[0][0], leased[0][1], "slow", "counted")]

    procs.worker(server.port, "rest")
    assert_aggregate(finish_ok(server), oracle(csv))
    assert_counted_once(server.db, 10)


@pytest.mark.timeout(60)
def test_sigterm_while_reconnecting_is_a_clean_stop(procs):
    """Rule: a worker told to stop while its server is away (it is in the
    reconnect backoff) exits 0 at once instead of reporting an error."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(30)
        worker = procs.worker(listener.getsockname()[1], "patient", ("--give-up-after", 600))
        conn, _ = listener.accept()   # the worker is in its connect loop now
        conn.close()                  # no handshake: it backs off and retries
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0


# --- the long chaos run (opt-in) -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_chaos_runner(tmp_path):
    """Rule: tools/chaos.py (random worker and server kills, stalls, restarts)
    passes every run: exact aggregate and a sound database each time."""
    result = subprocess.run(
        [PY, str(ROOT / "tools" / "chaos.py"), "--runs", "3", "--rows", "30000",
         "--chunks", "30", "--data-dir", str(tmp_path), "--seed", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=580)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed, 0 failed" in result.stdout


# --- the input or the database breaks under a running job ------------------------------

@pytest.mark.timeout(60)
def test_stream_file_modified_during_the_job_stops_it(procs, tmp_path):
    """Rule: in --stream mode chunks are byte ranges of one version of the
    file; a file modified in place during the job stops it with exit 1 and
    the reason, instead of mixing two versions (the old answer for some
    chunks, the new one for others)."""
    csv = small_csv(tmp_path / "sales.csv", 2_000)
    server = procs.server(csv, args=("--stream", "--chunks", 4))
    early = procs.client(server.port, "early")
    assert early.get_job()["type"] == protocol.JOB
    data = csv.read_bytes()
    csv.write_bytes(data.replace(b"3", b"4"))     # same size, other numbers
    late = procs.client(server.port, "late")
    with pytest.raises((EOFError, OSError, protocol.ProtocolError)):
        late.get_job()                            # the server stops instead of answering
    code, out = server.finish(30)
    assert code == 1 and "total_rows" not in out
    assert "modified during the job" in server.stderr().splitlines()[-1]


@pytest.mark.timeout(60)
def test_results_database_that_cannot_be_written_stops_the_job(procs, tmp_path):
    """Rule: when the results database cannot be written (here: a file size
    limit, as on a full disk), the job stops with exit 1 and the reason,
    instead of taking each result, failing to store it, and retrying for
    ever.  What was committed stays intact."""
    csv = small_csv(tmp_path / "sales.csv", 3_000)
    limit = 200_000   # bytes: room for the schema and a few results, then EFBIG

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    server = Server(procs, tmp_path, csv, args=("--chunk-rows", 1), preexec_fn=small_files)
    server.wait_port()
    procs.worker(server.port, "w0")
    code, out = server.finish(45)
    assert code == 1 and "total_rows" not in out
    assert "cannot write the results database" in server.stderr().splitlines()[-1]
    assert integrity(server.db) == "ok"
