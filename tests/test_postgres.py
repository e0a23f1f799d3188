"""The results store on both backends: SQLite and a real PostgreSQL server.

What this file checks (``[sqlite]`` / ``[postgresql]`` in a test id is the
backend, from the ``db_url`` fixture in tests/pg.py):

* a whole job (server + 2 workers) gives the oracle's answer on each backend;
* the store is idempotent: the same RESULT twice, or the same chunk from
  two workers, counts once, also when the RESULTs race in threads;
* a worker and then the server are SIGKILLed; the restarted server resumes
  from the database, re-runs only the missing chunks, and survives its
  database connections being cut;
* the final and per-group aggregates of the same results are equal on
  SQLite and PostgreSQL (1e-9 relative, ints exact, same group order);
* PostgreSQL only: a broken connection is retried, a database that cannot
  be reached for longer than the retry window raises (so the RESULT is not
  ACKed) and the re-sent RESULT lands later; a database killed mid-job and
  started again 3 s later is ridden out, exact; the password never reaches a
  log or an error message;
* every write may run twice with one effect (what a retry after a COMMIT of
  unknown outcome does); a busy SQLite file is retried, then given up;
* a database of another program is refused before anything in it changes.

The PostgreSQL server is a throwaway one that the tests start (tests/pg.py).
"""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import pandas as pd
import pytest

import db_utils
from conftest import (PY, ROOT, assert_aggregate, kill, make_sales_csv, oracle, oracle_groups,
                      parse_final, wait_for)
from db_utils import Outcome, ResultStore, StoreError
from pg import query_db
from worker import compute_metrics

PRICE, QTY, REGION = "Unit Price", "Units Sold", "Region"
JOB = "job-1"


def is_postgres(db_url: str) -> bool:
    return db_url.startswith("postgresql://")


def a_result(chunk_id: int, worker_id: str, attempt_id: int, total_sales: float,
             rows: int = 10) -> dict:
    """A RESULT's metrics as the server hands them to record_result."""
    return {"worker_id": worker_id, "chunk_id": chunk_id, "attempt_id": attempt_id,
            "rows_processed": rows, "rejected_rows": 1, "total_sales": total_sales,
            "min_price": 1.0, "max_price": 9.0, "avg_price": 4.5, "price_count": rows - 1}


def one_group(result: dict) -> list[tuple]:
    """The RESULT as a single group "g" (the tuple layout of compute_metrics)."""
    r = result
    return [("g", r["rows_processed"], r["rejected_rows"], r["total_sales"],
             r["min_price"], r["max_price"], r["avg_price"], r["price_count"])]


def terminate_store_connections(postgres_server, db_url: str) -> int:
    """Cut every connection the results store holds to ``db_url``'s database."""
    dbname = db_url.rsplit("/", 1)[1]
    rows = postgres_server.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND application_name = %s",
        (dbname, db_utils._PostgresBackend.APPLICATION_NAME))
    return len(rows)


# --- a whole job ----------------------------------------------------------------

@pytest.mark.timeout(180)
def test_end_to_end_job_matches_the_oracle(procs, tmp_path, db_url):
    """A job with --group-by on either backend gives the oracle's totals, each chunk counted once,
    and with a PostgreSQL URL the password appears nowhere in the server's output."""
    csv = make_sales_csv(tmp_path / "sales.csv", 20_000, seed=7)
    server = procs.server(csv, db_url, ["--chunks", 12, "--group-by", REGION,
                                        "--log-level", "DEBUG"])
    for i in range(2):
        procs.worker(server.port, f"w{i}")
    code, out = server.finish(120)
    assert code == 0, server.stderr()
    # No check of the workers' exit codes: on a busy machine the second one
    # may start after the first has finished the job, find no server, and
    # exit 1; that is not what this test is about.

    assert_aggregate(parse_final(out), oracle(csv, PRICE, QTY))
    counted = query_db(db_url, "SELECT chunk_id FROM chunk_results")
    assert sorted(c for (c,) in counted) == list(range(12))
    groups = query_db(db_url, "SELECT group_value, SUM(rows_processed), SUM(total_sales) "
                              "FROM group_results GROUP BY group_value")
    expected = oracle_groups(csv, PRICE, QTY, REGION)
    assert {g for g, _, _ in groups} == set(expected)
    for group, rows, sales in groups:
        assert_aggregate({"total_rows": rows, "total_sales": sales},
                         {k: expected[group][k] for k in ("total_rows", "total_sales")})
    if is_postgres(db_url):
        password = urllib.parse.urlsplit(db_url).password
        assert password and password not in out + server.stderr()


# --- idempotence -------------------------------------------------------------------

def test_same_result_twice_and_same_chunk_from_two_workers(db_url):
    """The same RESULT committed twice, then the same chunk from another worker: the first
    one counts; the others are kept in worker_results (one row per worker), marked duplicate,
    and change neither the aggregate nor the group rows."""
    first, other = a_result(0, "w1", 1, 100.0), a_result(0, "w2", 2, 999.0)
    with closing(ResultStore(db_url)) as store:
        store.open_job(JOB, "sales.csv", "identity", chunks=1)
        store.record_lease(JOB, 1, 0, "w1", 1.0)
        store.record_lease(JOB, 2, 0, "w2", 2.0)
        assert store.record_result(JOB, first, one_group(first)) is True
        assert store.record_result(JOB, first, one_group(first)) is False
        assert store.record_result(JOB, other, one_group(other)) is False

        final = store.final_aggregate(JOB)
        assert_aggregate(final, {"total_rows": 10, "total_sales": 100.0, "min_price": 1.0,
                                 "max_price": 9.0, "avg_price": 4.5, "rejected_rows": 1})
        assert [g["total_sales"] for g in store.group_aggregate(JOB)] == [100.0]
        assert {a["attempt_id"]: a["outcome"] for a in store.attempts(JOB)} == \
            {1: Outcome.COUNTED, 2: Outcome.DUPLICATE}
        assert store.per_worker(JOB) == [{"worker_id": "w1", "chunks": 1, "rows": 10}]
    assert sorted(query_db(db_url, "SELECT worker_id, total_sales FROM worker_results")) == \
        [("w1", 100.0), ("w2", 999.0)]


@pytest.mark.timeout(60)
def test_racing_results_for_one_chunk_count_once(db_url):
    """Six threads commit RESULTs for the same chunk at the same moment (released together by
    a barrier), for five chunks: exactly one per chunk is counted, and chunk_results and
    group_results hold that one's values (on PostgreSQL the threads use separate pooled
    connections, so this is the database's ON CONFLICT doing the work)."""
    chunks, workers = 5, 6
    barriers = [threading.Barrier(workers, timeout=30) for _ in range(chunks)]
    results = {(c, w): a_result(c, f"w{w}", 1 + c * workers + w, 100.0 * c + w)
               for c in range(chunks) for w in range(workers)}

    with closing(ResultStore(db_url)) as store:
        store.open_job(JOB, "sales.csv", "identity", chunks=chunks)
        for (c, w), r in results.items():
            store.record_lease(JOB, r["attempt_id"], c, r["worker_id"], 1.0)

        def commit(key):
            barriers[key[0]].wait()
            r = results[key]
            return key, store.record_result(JOB, r, one_group(r))

        with ThreadPoolExecutor(workers) as pool:
            counted = dict(pool.map(commit, sorted(results)))

    for c in range(chunks):
        winners = [w for w in range(workers) if counted[(c, w)]]
        assert len(winners) == 1, f"chunk {c}: counted by {winners}"
        sales = 100.0 * c + winners[0]
        assert query_db(db_url, "SELECT worker_id, total_sales FROM chunk_results "
                                "WHERE chunk_id = ?", (c,)) == [(f"w{winners[0]}", sales)]
        assert query_db(db_url, "SELECT total_sales FROM group_results WHERE chunk_id = ?",
                        (c,)) == [(sales,)]
    outcomes = query_db(db_url, "SELECT outcome, COUNT(*) FROM attempts GROUP BY outcome")
    assert dict(outcomes) == {Outcome.COUNTED: chunks, Outcome.DUPLICATE: chunks * (workers - 1)}
    assert query_db(db_url, "SELECT COUNT(*) FROM worker_results") == [(chunks * workers,)]


# --- crash and resume ----------------------------------------------------------------

@pytest.mark.timeout(240)
def test_worker_and_server_killed_then_resume(procs, tmp_path, db_url, request):
    """SIGKILL a worker mid-job, then the server: the committed chunks survive in the
    database; the same command resumes, hands out only the missing chunks, and (on
    PostgreSQL) rides out its database connections being cut; the final aggregate is
    the oracle's and every chunk is counted exactly once."""
    chunks = 30
    csv = make_sales_csv(tmp_path / "sales.csv", 6_000, seed=3)
    args = ["--chunks", chunks]

    first = procs.server(csv, db_url, args)
    slow = procs.worker(first.port, "doomed", ["--delay", "0.15"])
    counted = "SELECT COUNT(*) FROM chunk_results"
    wait_for(lambda: query_db(db_url, counted)[0][0] >= 3, 60, "3 counted chunks", interval=0.1)
    kill(slow)
    kill(first.proc)
    done_before = {c for (c,) in query_db(db_url, "SELECT chunk_id FROM chunk_results")}
    last_attempt = query_db(db_url, "SELECT MAX(attempt_id) FROM attempts")[0][0]
    assert 3 <= len(done_before) < chunks, "the killed worker should have been mid-job"

    second = procs.server(csv, db_url, args)
    assert f"resuming, {len(done_before)} of {chunks} chunks already done" in second.stderr()
    procs.worker(second.port, "w1", ["--delay", "0.02"])
    if is_postgres(db_url):
        wait_for(lambda: query_db(db_url, counted)[0][0] >= len(done_before) + 2, 60,
                 "2 more counted chunks", interval=0.1)
        assert terminate_store_connections(request.getfixturevalue("postgres_server"),
                                           db_url) >= 1
    procs.worker(second.port, "w2")
    code, out = second.finish(120)
    assert code == 0, second.stderr()

    assert_aggregate(parse_final(out), oracle(csv, PRICE, QTY))
    assert sorted(c for (c,) in query_db(db_url, "SELECT chunk_id FROM chunk_results")) == \
        list(range(chunks))
    redone = query_db(db_url, "SELECT DISTINCT chunk_id FROM attempts WHERE attempt_id > ?",
                      (last_attempt,))
    assert not done_before & {c for (c,) in redone}, "a chunk done before the crash ran again"
    outcomes = dict(query_db(db_url, "SELECT outcome, COUNT(*) FROM attempts GROUP BY outcome"))
    assert outcomes[Outcome.COUNTED] == chunks
    assert "leased" not in outcomes


@pytest.mark.timeout(240)
def test_database_restart_mid_job_is_ridden_out(procs, tmp_path, restartable_postgres):
    """PostgreSQL is killed mid-job (``pg_ctl -m immediate``) and started again 3 s later:
    the server logs one WARNING that it retries and one INFO when the database is back,
    and the job finishes by itself, exit 0, with pandas' answer and every chunk counted
    exactly once.  A commit whose outcome was unknown was simply run again: every write
    of the store is idempotent."""
    pg = restartable_postgres
    db = pg.url(pg.create_database("restart"))
    chunks = 60
    csv = make_sales_csv(tmp_path / "sales.csv", 12_000, seed=5)
    server = procs.server(csv, db, ["--chunks", chunks])
    for i in range(2):
        procs.worker(server.port, f"w{i}", ["--delay", "0.1"])
    counted = "SELECT COUNT(*) FROM chunk_results"
    wait_for(lambda: query_db(db, counted)[0][0] >= 5, 90, "5 counted chunks", interval=0.05)
    pg.kill()
    assert server.proc.poll() is None
    time.sleep(3)   # the outage itself: the database stays down this long
    pg.start_again()
    code, out = server.finish(180)
    assert code == 0, server.stderr()

    assert_aggregate(parse_final(out), oracle(csv, PRICE, QTY))
    assert sorted(c for (c,) in query_db(db, "SELECT chunk_id FROM chunk_results")) == \
        list(range(chunks))
    outcomes = dict(query_db(db, "SELECT outcome, COUNT(*) FROM attempts GROUP BY outcome"))
    assert outcomes["counted"] == chunks and "leased" not in outcomes
    log = server.stderr()
    assert log.count("retrying for up to 60 s") == 1 and "is back after" in log, log
    assert "Traceback" not in log


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_database_gone_for_good_stops_the_job_after_the_retry_window(procs, tmp_path,
                                                                      restartable_postgres):
    """A database that does not come back stops the job once --db-retry-for (here 2 s)
    is over: exit 1, one line that says so and how many chunks are safely stored,
    no traceback, no aggregate."""
    pg = restartable_postgres
    db = pg.url(pg.create_database("gone"))
    csv = make_sales_csv(tmp_path / "sales.csv", 6_000, seed=6)
    server = procs.server(csv, db, ["--chunks", 30, "--db-retry-for", 2])
    procs.worker(server.port, "w0", ["--delay", "0.1"])
    wait_for(lambda: query_db(db, "SELECT COUNT(*) FROM chunk_results")[0][0] >= 3, 90,
             "3 counted chunks", interval=0.05)
    pg.kill()
    code, out = server.finish(60)
    assert code == 1 and "total_rows" not in out
    last = server.stderr().splitlines()[-1]
    assert last.startswith("server.py: error: job ") and "unavailable for 2 s" in last, last
    assert "chunks are safely stored" in last and pg.password not in server.stderr()
    assert "Traceback" not in server.stderr()


# --- the same answer on both backends -------------------------------------------------

def _chunks_with_edge_cases(tmp_path) -> list[pd.DataFrame]:
    """Seven chunks of a generated CSV plus one with no valid price at all, whose groups
    (NULL, "B-tie", "b-tie", "Ä-tie") all total 0.0, so only the name order separates them."""
    csv = make_sales_csv(tmp_path / "sales.csv", 7_000, seed=11)
    df = pd.read_csv(csv, usecols=[REGION, PRICE, QTY])
    parts = [df.iloc[i * 1_000:(i + 1) * 1_000] for i in range(7)]
    parts.append(pd.DataFrame({REGION: ["b-tie", "B-tie", None, "Ä-tie"],
                               PRICE: ["n/a", "", "x", "free"], QTY: [1, 2, 3, 4]}))
    return parts


def _fill(store: ResultStore, parts: list[pd.DataFrame]) -> None:
    store.open_job(JOB, "sales.csv", "identity", chunks=len(parts))
    for chunk_id, part in enumerate(parts):
        worker_id = f"w{chunk_id % 3}"
        store.record_lease(JOB, chunk_id + 1, chunk_id, worker_id, 1.0)
        metrics = compute_metrics(part, PRICE, QTY, group_col=REGION)
        groups = metrics.pop("groups")
        store.record_result(JOB, dict(metrics, worker_id=worker_id, chunk_id=chunk_id,
                                      attempt_id=chunk_id + 1), groups)


def test_same_aggregates_on_sqlite_and_postgres(tmp_path, postgres_server):
    """The same RESULTs stored in SQLite and in PostgreSQL give the same final aggregate
    (floats to 1e-9 relative, ints exactly and as ints), the same per-group rows in the same
    order (ties broken by NULL first, then byte order, even in a database whose default
    collation is ICU en-US), the same per-worker counts, and the oracle's answer."""
    parts = _chunks_with_edge_cases(tmp_path)
    postgres_server.execute("CREATE DATABASE icu_en_us TEMPLATE template0 "
                            "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'")
    answers = {}
    for name, target in (("sqlite", str(tmp_path / "r.sqlite")),
                         ("postgresql", postgres_server.url("icu_en_us"))):
        with closing(ResultStore(target)) as store:
            _fill(store, parts)
            answers[name] = (store.final_aggregate(JOB), store.group_aggregate(JOB),
                             store.per_worker(JOB))
    (lite_final, lite_groups, lite_workers), (pg_final, pg_groups, pg_workers) = \
        answers["sqlite"], answers["postgresql"]

    assert_aggregate(pg_final, lite_final)
    assert all(type(pg_final[k]) is int for k in ("total_rows", "rejected_rows"))
    every_row = pd.concat(parts)
    every_row.to_csv(tmp_path / "all.csv", index=False)
    assert_aggregate(lite_final, oracle(tmp_path / "all.csv", PRICE, QTY))

    assert [g["group_value"] for g in pg_groups] == [g["group_value"] for g in lite_groups]
    assert [g["group_value"] for g in lite_groups][-4:] == [None, "B-tie", "b-tie", "Ä-tie"]
    for pg_row, lite_row in zip(pg_groups, lite_groups):
        numbers = [key for key in lite_row if key != "group_value"]
        assert_aggregate({k: pg_row[k] for k in numbers}, {k: lite_row[k] for k in numbers})
    assert pg_workers == lite_workers


# --- PostgreSQL: lost connections and passwords -------------------------------------------

def test_connection_broken_mid_transaction_is_retried(pg_url, postgres_server):
    """A connection that dies inside a transaction, before COMMIT, is replaced and the
    transaction runs again once: the write lands exactly once.  Pooled connections killed
    between calls are replaced when borrowed, so the next RESULT still commits."""
    with closing(ResultStore(pg_url)) as store:
        store.open_job(JOB, "sales.csv", "identity", chunks=2)
        runs = []

        def dies_the_first_time(cur):
            runs.append(1)
            if len(runs) == 1:
                cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            cur.execute("INSERT INTO attempts (job_id, attempt_id, chunk_id, worker_id, "
                        "leased_at, outcome) VALUES (?, 1, 0, 'w1', 1.0, 'leased')", (JOB,))

        store._backend.transaction(dies_the_first_time)
        assert len(runs) == 2
        assert query_db(pg_url, "SELECT COUNT(*) FROM attempts") == [(1,)]

        assert terminate_store_connections(postgres_server, pg_url) >= 1
        result = a_result(0, "w1", 1, 50.0)
        assert store.record_result(JOB, result) is True
        assert store.final_aggregate(JOB)["total_sales"] == 50.0


@pytest.mark.timeout(90)
def test_unreachable_database_raises_and_the_resent_result_lands(pg_url, postgres_server):
    """While the database refuses connections for longer than --db-retry-for (here 1 s),
    record_result raises StoreError (the server then stops the job without an ACK, so the
    worker keeps the RESULT), the message masks the password, and nothing is half-written;
    once the database is back, the re-sent RESULT commits and counts once."""
    dbname = pg_url.rsplit("/", 1)[1]
    result = a_result(0, "w1", 1, 75.0)
    with closing(ResultStore(pg_url, retry_for=1.0)) as store:
        store.open_job(JOB, "sales.csv", "identity", chunks=1)
        store.record_lease(JOB, 1, 0, "w1", 1.0)
        postgres_server.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            terminate_store_connections(postgres_server, pg_url)
            with pytest.raises(StoreError) as failure:
                store.record_result(JOB, result, one_group(result))
        finally:
            postgres_server.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        assert "***" in str(failure.value) and postgres_server.password not in str(failure.value)
        assert query_db(pg_url, "SELECT COUNT(*) FROM worker_results") == [(0,)]

        def resend():  # what the worker does until it gets its ACK
            try:
                return store.record_result(JOB, result, one_group(result))
            except StoreError:
                return None
        assert wait_for(resend, 60, "the database to accept the RESULT again") is True
        assert store.record_result(JOB, result, one_group(result)) is False
        assert query_db(pg_url, "SELECT COUNT(*) FROM group_results") == [(1,)]


class TwiceCommitted:
    """A backend that runs every transaction twice, committing both times: what
    the store does when a COMMIT landed but its connection broke before the
    reply (outcome unknown), and the retry runs it again."""

    def __init__(self, backend):
        self._backend = backend

    def transaction(self, body):
        self._backend.transaction(body)
        return self._backend.transaction(body)

    def query(self, sql, params=()):
        return self._backend.query(sql, params)

    def close(self):
        self._backend.close()


def test_every_write_is_idempotent_so_an_unknown_commit_can_run_again(db_url):
    """Rule: every transaction of the store may run twice with one effect: opening
    a job, recording a lease, ending an attempt, and a RESULT, which is still the
    one that counts (counted=True, its groups stored once), while a second
    worker's RESULT for the same chunk is still a duplicate."""
    first, other = a_result(0, "w1", 1, 100.0), a_result(0, "w2", 2, 999.0)
    with closing(ResultStore(db_url)) as store:
        store._backend = TwiceCommitted(store._backend)
        store.open_job(JOB, "sales.csv", "identity", chunks=2)
        store.record_lease(JOB, 1, 0, "w1", 1.0)
        store.record_lease(JOB, 2, 0, "w2", 2.0)
        store.record_lease(JOB, 3, 1, "w2", 3.0)
        assert store.record_result(JOB, first, one_group(first)) is True
        assert store.record_result(JOB, other, one_group(other)) is False
        store.end_attempt(JOB, 3, Outcome.DROPPED)
        store.open_job(JOB, "sales.csv", "identity", chunks=2)   # a resume, twice

        assert store.final_aggregate(JOB)["total_sales"] == 100.0
        assert {a["attempt_id"]: a["outcome"] for a in store.attempts(JOB)} == \
            {1: Outcome.COUNTED, 2: Outcome.DUPLICATE, 3: Outcome.DROPPED}
    assert query_db(db_url, "SELECT COUNT(*), SUM(total_sales) FROM group_results") == \
        [(1, 100.0)]
    assert query_db(db_url, "SELECT COUNT(*) FROM jobs") == [(1,)]


def test_busy_sqlite_file_is_retried_then_given_up(tmp_path, caplog):
    """Rule: a SQLite file that another process holds locked is retried with
    backoff (one WARNING, one INFO when it is free again) and the write lands;
    locked for longer than retry_for, the call raises StoreError saying so.
    (busy_timeout is set to 0 here so that the retry, not SQLite's own wait,
    is what is tested.)"""
    path = str(tmp_path / "r.sqlite")
    with closing(ResultStore(path, retry_for=30)) as store:
        store.open_job(JOB, "sales.csv", "identity", chunks=1)
        store._backend._db.execute("PRAGMA busy_timeout=0")
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN EXCLUSIVE")
        released = threading.Timer(0.5, other.execute, ("COMMIT",))   # the other process's work
        released.start()
        with caplog.at_level("INFO", logger="db_utils"):
            store.record_lease(JOB, 1, 0, "w1", 1.0)
        released.join()
        other.close()
        messages = [r.getMessage() for r in caplog.records if r.name == "db_utils"]
        assert len(messages) == 2, messages
        assert "database is locked" in messages[0] and "retrying for up to 30 s" in messages[0]
        assert "is back after" in messages[1]
        assert [a["attempt_id"] for a in store.attempts(JOB)] == [1]

    with closing(ResultStore(path, retry_for=0.3)) as store:
        store._backend._db.execute("PRAGMA busy_timeout=0")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreError, match="unavailable for 0.3 s: database is locked"):
                store.record_lease(JOB, 2, 0, "w1", 1.0)
        finally:
            other.execute("COMMIT")
            other.close()


def test_another_programs_sqlite_file_is_refused_unchanged(procs, tmp_path):
    """Rule: --db naming a SQLite file of another program (tables of its own, no
    ``jobs`` table; or a ``jobs`` table with other columns) is refused with one
    line and exit 2, and the file is left byte for byte as it was: not switched to
    WAL, no table added, no -wal or -shm file beside it."""
    csv = make_sales_csv(tmp_path / "sales.csv", 100)
    for name, ddl in (("crm", "CREATE TABLE customers (id INTEGER, name TEXT)"),
                      ("jobs", "CREATE TABLE jobs (id INTEGER, command TEXT)")):
        db = tmp_path / f"{name}.sqlite"
        con = sqlite3.connect(db)
        con.execute(ddl)
        con.commit()
        con.close()
        before = db.read_bytes()
        done = subprocess.run([PY, str(ROOT / "server.py"), "--csv", str(csv), "--port", "0",
                               "--db", str(db)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "is not a results database of this" in lines[0]
        assert "nothing was changed" in lines[0]
        assert db.read_bytes() == before
        assert sorted(p.name for p in tmp_path.glob(f"{name}.sqlite*")) == [f"{name}.sqlite"]


def test_postgres_table_of_another_program_with_our_name_is_refused(pg_url):
    """Rule: a PostgreSQL database may hold other programs' tables (it is often
    shared), but one named like ours with other columns is refused before any
    table is created."""
    with psycopg_connect(pg_url) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    with closing(ResultStore(pg_url)) as store:   # other tables are fine
        store.open_job(JOB, "sales.csv", "identity", chunks=1)
    other = pg_url.rsplit("/", 1)[0] + "/postgres"
    name = "t_other_jobs"
    with psycopg_connect(other) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = pg_url.rsplit("/", 1)[0] + "/" + name
    with psycopg_connect(url) as conn:
        conn.execute("CREATE TABLE jobs (id INTEGER, command TEXT)")
    with pytest.raises(StoreError, match=r"its table 'jobs' has other columns .*nothing was changed"):
        ResultStore(url)
    assert query_db(url, "SELECT table_name FROM information_schema.tables "
                         "WHERE table_schema = 'public'") == [("jobs",)]


def psycopg_connect(url: str):
    import psycopg
    return psycopg.connect(url, autocommit=True)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_database_that_cannot_be_opened_is_a_one_line_error(procs, tmp_path, backend, request):
    """A results database that cannot be opened (a SQLite file in a missing folder, a
    PostgreSQL URL with a wrong password) makes server.py exit 2 with one error line naming
    it, the password masked, and no traceback."""
    csv = make_sales_csv(tmp_path / "sales.csv", 100)
    if backend == "sqlite":
        db, shown = tmp_path / "missing" / "results.sqlite", "missing/results.sqlite"
    else:
        server = request.getfixturevalue("postgres_server")
        db, shown = server.url("postgres", password="wrong-Secret-42"), ":***@127.0.0.1"
    done = subprocess.run([PY, str(ROOT / "server.py"), "--csv", str(csv), "--port", "0",
                           "--db", str(db)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("server.py: error:")]
    assert len(error) == 1 and shown in error[0], done.stderr
    assert "wrong-Secret-42" not in done.stdout + done.stderr
