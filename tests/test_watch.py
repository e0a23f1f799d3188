"""The live view of a job (tools/watch.py), checked against the database it reads.

What is checked:

* :func:`watch.make_snapshot` on hand-made rows: chunk states, re-leases,
  per-worker counts, "last heard from", rows per second and the ETA
  (hand-computed constants, no processes);
* a ``--once`` snapshot of a finished faulty job (SQLite and PostgreSQL)
  counts exactly what direct SQL queries count;
* mid-job: snapshots read in the same transaction as direct SQL queries
  agree exactly, and a ``--once`` run while the job goes on lies between
  the counts read just before and just after it;
* a live watcher polling during a whole job changes nothing: the answer is
  exact and the database passes ``integrity_check``;
* the reader cannot write, ``--once`` prints no escape codes, and bad
  targets give one line and exit 2.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (PY, ROOT, assert_aggregate, db_rows, make_sales_csv, oracle,
                      parse_final, run_job, wait_for)
from db_utils import ResultStore
from pg import query_db
from tools import watch

WATCH = [PY, str(ROOT / "tools" / "watch.py")]


# --- the pure snapshot -------------------------------------------------------------------

def attempt(attempt_id, chunk_id, worker_id, leased_at, ended_at, outcome):
    return dict(attempt_id=attempt_id, chunk_id=chunk_id, worker_id=worker_id,
                leased_at=leased_at, ended_at=ended_at, outcome=outcome)


def result(chunk_id, worker_id, attempt_id, rows, received_at):
    return dict(chunk_id=chunk_id, worker_id=worker_id, attempt_id=attempt_id,
                rows_processed=rows, received_at=received_at)


JOB = {"job_id": "j1", "csv_path": "s.csv", "chunks": 6, "created_at": 90.0}
# Six chunks at t = 100..120 s:
#   0: counted by w1 at its first attempt
#   1: w2's lease expired (ended 108 by the server), w1 counted it at 109
#   2: w1 reported a failure at 111, nobody holds it now
#   3: leased to w2 at 113, still running
#   4: w2's connection dropped at 114; waiting to be handed out again
#   5: never leased
ATTEMPTS = [
    attempt(1, 0, "w1", 100.0, 101.0, "counted"),
    attempt(2, 1, "w2", 102.0, 108.0, "expired"),
    attempt(3, 1, "w1", 108.0, 109.0, "counted"),
    attempt(4, 2, "w1", 110.0, 111.0, "failed"),
    attempt(5, 3, "w2", 113.0, None, "leased"),
    attempt(6, 4, "w2", 112.0, 114.0, "dropped"),
]
RESULTS = [result(0, "w1", 1, 1000, 101.0), result(1, "w1", 3, 500, 109.0)]


def test_snapshot_states_workers_and_rates_from_rows():
    """Rule: counted beats leased beats failed beats pending; capital
    letters for chunks leased twice or more; a worker was last heard from
    at its latest lease or report, never at an expiry or drop the server
    inferred; rates count the commits of the last ``window`` seconds."""
    snap = watch.make_snapshot(JOB, ATTEMPTS, RESULTS, now=115.0, window=10.0)
    assert snap.states == ["counted", "counted", "failed", "leased", "pending", "pending"]
    assert snap.tries == [1, 2, 1, 1, 1, 0]
    assert snap.counts == {"pending": 2, "leased": 1, "counted": 2, "failed": 1}
    assert snap.re_leased == 1 and snap.attempts == 6 and not snap.finished
    assert snap.outcomes == {"counted": 2, "expired": 1, "failed": 1, "leased": 1,
                             "dropped": 1}
    w1, w2 = snap.workers
    assert (w1.worker_id, w1.attempts, w1.counted, w1.outcomes["failed"]) == ("w1", 3, 2, 1)
    assert w1.holding == [] and w1.last_heard == 111.0
    assert (w2.worker_id, w2.attempts, w2.counted) == ("w2", 3, 0)
    assert (w2.outcomes["expired"], w2.outcomes["dropped"]) == (1, 1)
    assert w2.holding == [(3, 113.0)]
    assert w2.last_heard == 113.0          # not 114 (the drop) nor 108 (the expiry)
    # Window (105, 115]: only chunk 1 (500 rows, committed at 109) is in it.
    assert snap.rows_counted == 1500
    assert snap.rows_per_second == pytest.approx(50.0)
    assert snap.chunks_per_second == pytest.approx(0.1)
    assert snap.eta == pytest.approx(40.0)                 # 4 chunks left at 0.1 chunk/s
    assert snap.started == 100.0 and snap.last_event == 114.0
    text = watch.render_text(snap)
    assert "  0  cCflp.\n" in text
    assert "chunks: 6 total, 2 counted, 1 leased, 2 pending, 1 failed; 1 re-leased" in text
    assert "ETA 40.0 s" in text


def test_snapshot_glyphs_for_re_leased_chunks():
    """Rule: capital letters mark chunks leased more than once, in every state;
    ``p`` is a pending chunk leased once before, ``.`` one never leased."""
    job = dict(JOB, chunks=5)
    rows = [attempt(1, 0, "a", 1, 2, "expired"), attempt(2, 0, "a", 3, None, "leased"),
            attempt(3, 1, "a", 1, 2, "dropped"), attempt(4, 1, "a", 3, 4, "expired"),
            attempt(5, 2, "a", 1, 2, "failed"), attempt(6, 2, "a", 3, 4, "failed"),
            attempt(7, 3, "a", 1, 2, "dropped")]
    snap = watch.make_snapshot(job, rows, [], now=5.0)
    assert "  0  LPFp.\n" in watch.render_text(snap)
    assert snap.re_leased == 3


def test_stalled_and_finished_jobs():
    """Rule: no commit in the window means no ETA (shown as such), not a
    guess; a finished job shows its average rate over the whole run."""
    stalled = watch.make_snapshot(JOB, ATTEMPTS, RESULTS, now=200.0)
    assert stalled.rows_per_second == 0 and stalled.eta is None
    assert "ETA - (nothing counted in the last 10 s)" in watch.render_text(stalled)
    job = dict(JOB, chunks=2)
    done = watch.make_snapshot(job, ATTEMPTS[:3], RESULTS, now=500.0)
    assert done.finished and done.eta == 0.0
    assert done.rows_per_second == pytest.approx(1500 / 9.0)     # first lease 100, last commit 109
    assert "ETA done" in watch.render_text(done)


def test_rows_that_do_not_fit_the_job_are_ignored():
    """Rule: a chunk id outside 0..chunks-1 is not trusted (no IndexError)."""
    rows = [attempt(1, 7, "w", 1, 2, "counted"), attempt(2, -1, "w", 1, 2, "counted")]
    snap = watch.make_snapshot(dict(JOB, chunks=1), rows, [result(9, "w", 1, 5, 2)], now=3)
    assert snap.states == ["pending"] and snap.attempts == 0 and snap.rows_counted == 0


def test_large_jobs_group_chunks_per_cell():
    """Rule: past ``max_cells`` a cell covers k chunks and shows the state
    that most needs attention (failed, leased, pending, then counted)."""
    rows = [attempt(i + 1, i, "w", 1, 2, "counted") for i in range(10)]
    rows.append(attempt(11, 10, "w", 1, None, "leased"))
    job = dict(JOB, chunks=12)
    snap = watch.make_snapshot(job, rows, [result(i, "w", i + 1, 1, 2) for i in range(10)], 3)
    per_cell, cells = watch.grid_cells(snap, max_cells=4)
    assert per_cell == 3
    assert [s for s, _ in cells] == ["counted", "counted", "counted", "leased"]
    assert "(one cell = 3 chunks)" in watch.render_text(snap, max_cells=4)


def test_rich_view_renders():
    """The live view's renderable draws (on a recording console) the same
    counts as the plain text."""
    from rich.console import Console
    snap = watch.make_snapshot(JOB, ATTEMPTS, RESULTS, now=115.0)
    console = Console(record=True, width=100, force_terminal=True)
    console.print(watch.render_rich(snap, 100, 40))
    text = console.export_text()
    assert "2 counted, 1 leased, 2 pending, 1 failed" in text
    assert "chunk 3 for 2.0 s" in text and "cCflp." in text


# --- reading a real database ---------------------------------------------------------------

def parse_once(text: str) -> dict:
    """The numbers of a ``--once`` snapshot: chunk states, attempts, rows, workers."""
    states = re.search(r"^chunks: (\d+) total, (\d+) counted, (\d+) leased, (\d+) pending, "
                       r"(\d+) failed; (\d+) re-leased$", text, re.MULTILINE)
    assert states, text
    total, counted, leased, pending, failed, re_leased = map(int, states.groups())
    attempts = int(re.search(r"^attempts: (\d+)", text, re.MULTILINE).group(1))
    rows = int(re.search(r"^rows: (\d+) counted", text, re.MULTILINE).group(1))
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("worker "))
    workers = {}
    for line in lines[header + 1:]:
        name, *numbers = line.split()[:8]
        workers[name] = dict(zip(("attempts", "counted", "duplicate", "failed", "expired",
                                  "dropped", "interrupted"), map(int, numbers)))
    return {"total": total, "counted": counted, "leased": leased, "pending": pending,
            "failed": failed, "re_leased": re_leased, "attempts": attempts, "rows": rows,
            "workers": workers}


def sql_counts(query) -> dict:
    """The same numbers as :func:`parse_once`, straight from SQL (``query(sql)`` -> rows)."""
    total = query("SELECT chunks FROM jobs")[0][0]
    counted = query("SELECT COUNT(*) FROM chunk_results")[0][0]
    leased = query("SELECT COUNT(DISTINCT chunk_id) FROM attempts WHERE outcome = 'leased' "
                   "AND chunk_id NOT IN (SELECT chunk_id FROM chunk_results)")[0][0]
    failed = query("SELECT COUNT(DISTINCT chunk_id) FROM attempts WHERE outcome = 'failed' "
                   "AND chunk_id NOT IN (SELECT chunk_id FROM chunk_results) AND chunk_id "
                   "NOT IN (SELECT chunk_id FROM attempts WHERE outcome = 'leased')")[0][0]
    re_leased = query("SELECT COUNT(*) FROM (SELECT chunk_id FROM attempts GROUP BY chunk_id "
                      "HAVING COUNT(*) >= 2) AS t")[0][0]
    workers = collections.defaultdict(lambda: dict.fromkeys(
        ("attempts", "counted", "duplicate", "failed", "expired", "dropped", "interrupted"), 0))
    for worker, outcome, n in query("SELECT worker_id, outcome, COUNT(*) FROM attempts "
                                    "GROUP BY worker_id, outcome"):
        workers[worker]["attempts"] += n
        if outcome in ("duplicate", "failed", "expired", "dropped", "interrupted"):
            workers[worker][outcome] = n
    for worker, n in query("SELECT worker_id, COUNT(*) FROM chunk_results GROUP BY worker_id"):
        workers[worker]["counted"] = n
    return {"total": total, "counted": counted, "leased": leased,
            "pending": total - counted - leased - failed, "failed": failed,
            "re_leased": re_leased,
            "attempts": query("SELECT COUNT(*) FROM attempts")[0][0],
            "rows": query("SELECT COALESCE(SUM(rows_processed), 0) FROM chunk_results")[0][0],
            "workers": dict(workers)}


# Per attempt, seed 4 draws: an error on attempt 1, a stall on attempt 3;
# seed 2: a stall and an error on attempt 2.  Different seeds, so the two
# workers do not stall at the same moment and a stalled chunk is re-leased.
FAULTS = ["--stall-rate", "0.2", "--stall-seconds", "1.5", "--error-rate", "0.15",
          "--delay", "0.05"]


@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)],
                         indirect=True)   # the PostgreSQL run: python -m pytest -m slow
@pytest.mark.timeout(120)
def test_once_counts_equal_the_database_after_a_faulty_job(procs, tmp_path, sales_100k, db_url):
    """Rule: after a job with stalls past the lease (re-leases, duplicates)
    and reported errors (failed attempts), every number of a ``--once``
    snapshot equals the one a direct SQL query gives, on SQLite and on
    PostgreSQL."""
    server = procs.server(sales_100k, db_url, ["--chunks", "24", "--lease-timeout", "1",
                                               "--max-attempts", "20"])
    workers = [procs.worker(server.port, f"w{seed}", [*FAULTS, "--fault-seed", seed])
               for seed in (4, 2)]
    code, out = server.finish()
    assert code == 0, server.stderr()
    assert [w.wait(timeout=30) for w in workers] == [0, 0]
    assert_aggregate(parse_final(out), oracle(sales_100k, "Unit Price", "Units Sold"))
    once = subprocess.run([*WATCH, "--db", db_url, "--once"], capture_output=True, text=True,
                          timeout=60)
    assert once.returncode == 0, once.stderr
    shown = parse_once(once.stdout)
    assert shown == sql_counts(lambda sql: query_db(db_url, sql))
    assert shown["counted"] == 24 and shown["rows"] == 100_000 and shown["re_leased"] > 0
    assert sum(w["failed"] for w in shown["workers"].values()) > 0
    assert "ETA done" in once.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_mid_job_snapshots_equal_the_database(procs, tmp_path, sales_100k):
    """Rule: mid-job, a snapshot read in one transaction agrees exactly with
    direct SQL queries in that same transaction; and ``--once`` run while
    the job goes on shows counts between those read just before and just
    after it (the job only adds attempts and counted chunks)."""
    server = procs.server(sales_100k, args=["--chunks", "30", "--lease-timeout", "1.5"])
    procs.worker(server.port, "w1", ["--delay", "0.1"])
    procs.worker(server.port, "w2", ["--delay", "0.1", "--stall-rate", "0.2",
                                     "--stall-seconds", "2", "--fault-seed", "1"])
    wait_for(lambda: db_rows(server.db, "SELECT COUNT(*) FROM chunk_results")[0][0] >= 3,
             60, "the first chunks")
    uri = Path(server.db).resolve().as_uri() + "?mode=ro"
    con = sqlite3.connect(uri, uri=True, isolation_level=None)
    seen_leased = 0
    try:
        for _ in range(3):
            con.execute("BEGIN")
            try:
                def query(sql, params=()):
                    cur = con.execute(sql, params)
                    names = [d[0] for d in cur.description]
                    return [dict(zip(names, r)) for r in cur.fetchall()]
                job, attempts, results = watch.read_job(query, server.db, None)
                snap = watch.make_snapshot(job, attempts, results, time.time())
                expected = sql_counts(lambda sql: con.execute(sql).fetchall())
            finally:
                con.execute("COMMIT")
            assert parse_once(watch.render_text(snap)) == expected
            seen_leased += snap.counts["leased"]

            before = sql_counts(lambda sql: db_rows(server.db, sql))
            once = subprocess.run([*WATCH, "--db", server.db, "--once"], capture_output=True,
                                  text=True, timeout=60)
            after = sql_counts(lambda sql: db_rows(server.db, sql))
            assert once.returncode == 0, once.stderr
            shown = parse_once(once.stdout)
            for key in ("counted", "attempts", "rows", "re_leased"):
                assert before[key] <= shown[key] <= after[key], (key, before, shown, after)
            assert shown["counted"] + shown["leased"] + shown["pending"] + shown["failed"] == 30
    finally:
        con.close()
    assert seen_leased > 0, "the snapshots were not taken mid-job"
    code, out = server.finish()
    assert code == 0, server.stderr()
    assert_aggregate(parse_final(out), oracle(sales_100k, "Unit Price", "Units Sold"))


@pytest.mark.timeout(120)
def test_a_live_watcher_does_not_change_the_job(procs, tmp_path):
    """Rule: a watcher polling the database during a whole job (started
    before the server, so it first waits for the database) changes
    nothing: the answer is exact, every chunk counts once, the file passes
    integrity_check; and the watcher saw the job to its end."""
    csv = make_sales_csv(tmp_path / "s.csv", 30_000, seed=3)
    db = tmp_path / "results.sqlite"
    out = open(tmp_path / "watch.out", "w")
    watcher = procs.popen([*WATCH, "--db", str(db), "--interval", "0.1"], stdout=out,
                          stderr=subprocess.STDOUT)
    final, server = run_job(procs, csv, workers=2, db=str(db),
                            server_args=["--chunks", "30"], worker_args=["--delay", "0.05"])
    wait_for(lambda: "ETA done" in (tmp_path / "watch.out").read_text(), 30,
             "the watcher to show the finished job")
    watcher.send_signal(signal.SIGTERM)
    assert watcher.wait(timeout=10) == 0
    out.close()
    assert_aggregate(final, oracle(csv, "Unit Price", "Units Sold"))
    assert sorted(c for (c,) in db_rows(str(db), "SELECT chunk_id FROM attempts "
                                                 "WHERE outcome = 'counted'")) == list(range(30))
    assert db_rows(str(db), "PRAGMA integrity_check") == [("ok",)]
    text = (tmp_path / "watch.out").read_text()
    assert text.count("\nchunks: ") >= 2, "the watcher refreshed during the job"
    assert "Traceback" not in text


# --- read-only, output, errors -----------------------------------------------------------------

def small_db(path: Path) -> str:
    """A results database with one job of 3 chunks, one counted."""
    store = ResultStore(str(path))
    store.open_job("job-1", "x.csv", "{}", chunks=3)
    store.record_lease("job-1", 1, 0, "w1", time.time())
    store.record_result("job-1", {"worker_id": "w1", "chunk_id": 0, "attempt_id": 1,
                                  "rows_processed": 4, "rejected_rows": 0, "total_sales": 8.0,
                                  "min_price": 2.0, "max_price": 2.0, "avg_price": 2.0,
                                  "price_count": 4})
    store.close()
    return str(path)


def test_the_reader_cannot_write(tmp_path):
    """Rule: the SQLite reader is read-only: a write through it fails, and
    the file is unchanged after reading."""
    db = small_db(tmp_path / "r.sqlite")
    before = Path(db).read_bytes()
    reader = watch.SqliteReader(db)
    try:
        job, attempts, results = reader.read(None)
        assert job["job_id"] == "job-1" and len(attempts) == 1 and len(results) == 1
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader._db.execute("DELETE FROM attempts")
    finally:
        reader.close()
    assert Path(db).read_bytes() == before


def test_once_prints_plain_text_even_when_colour_is_forced(tmp_path):
    """Rule: ``--once`` output has no escape codes, whatever the terminal
    settings say, and exits 0."""
    db = small_db(tmp_path / "r.sqlite")
    env = dict(os.environ, FORCE_COLOR="1", TERM="xterm-256color", COLUMNS="120")
    once = subprocess.run([*WATCH, "--db", db, "--once"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert once.returncode == 0 and once.stderr == ""
    assert "\x1b" not in once.stdout
    assert "chunks: 3 total, 1 counted, 0 leased, 2 pending, 0 failed; 0 re-leased" in once.stdout


def test_default_job_is_the_most_recently_created(tmp_path, capsys):
    """Rule: without --job the newest job (by created_at) is shown; --job picks another."""
    store = ResultStore(str(tmp_path / "two.sqlite"))
    store.open_job("old-job", "a.csv", "{}", chunks=2)
    store.open_job("new-job", "b.csv", "{}", chunks=5)
    store.close()
    assert watch.main(["--db", str(tmp_path / "two.sqlite"), "--once"]) == 0
    assert capsys.readouterr().out.startswith("job new-job  b.csv\nchunks: 5 total")
    assert watch.main(["--db", str(tmp_path / "two.sqlite"), "--once", "--job", "old-job"]) == 0
    assert capsys.readouterr().out.startswith("job old-job  a.csv\nchunks: 2 total")


@pytest.mark.parametrize("target, message", [
    ("{tmp}/missing.sqlite", "missing.sqlite: no such database file"),
    ("{tmp}/not-a-db.sqlite", "not a results database"),
    ("{tmp}/empty.sqlite", "the database holds no job yet"),
    ("{tmp}", "no such database file"),
])
def test_once_errors_are_one_line_exit_2(tmp_path, capsys, target, message):
    """Rule: a missing database, a file that is not one, a database with no
    job and a folder each give one stderr line and exit 2; a missing
    database is not created."""
    (tmp_path / "not-a-db.sqlite").write_text("Region,Price\n" * 100)
    ResultStore(str(tmp_path / "empty.sqlite")).close()
    assert watch.main(["--db", target.format(tmp=tmp_path), "--once"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("watch.py: error: ") and message in err
    assert not (tmp_path / "missing.sqlite").exists()


def test_unknown_job_is_one_line_exit_2_in_a_subprocess(tmp_path):
    """Rule: an unknown --job names the jobs there are, in one line, no traceback."""
    db = small_db(tmp_path / "r.sqlite")
    once = subprocess.run([*WATCH, "--db", db, "--once", "--job", "nope"], capture_output=True,
                          text=True, timeout=60)
    assert once.returncode == 2 and once.stdout == ""
    assert once.stderr == "watch.py: error: " + db + ": no job 'nope'; jobs in it: ['job-1']\n"


@pytest.mark.parametrize("interval", ["0", "1.5", "-1"])
def test_interval_must_keep_the_view_fresh(interval, capsys):
    """Rule: the live view refreshes at least once a second: --interval above
    1 s (or not positive) is refused."""
    with pytest.raises(SystemExit) as stop:
        watch.parse_args(["--interval", interval])
    assert stop.value.code == 2
    assert "--interval" in capsys.readouterr().err


def test_live_view_on_a_terminal_draws_and_stops_cleanly(tmp_path):
    """Rule: on a terminal (a pseudo-terminal here) the live view draws the
    rich view, with colours, refreshes, and exits 0 on SIGTERM."""
    from tools.bench import PtyWatcher
    db = small_db(tmp_path / "r.sqlite")
    watcher = PtyWatcher(Path(db))
    try:
        # A frame of this job is 800-900 bytes: past 1,500 it was drawn again.
        wait_for(lambda: watcher.bytes > 1500, 30, "the live view to draw a few frames")
    finally:
        code, cpu = watcher.stop()
    assert code == 0
