"""The attempt history and its timeline (tools/timeline.py).

What is checked:

* every way an attempt ends leaves its outcome and end time in the
  ``attempts`` table (``ResultStore``, no processes);
* ``draw_timeline`` draws one bar per attempt, in the colour of its outcome,
  hatched when the attempt has no end (synthetic rows, no processes);
* a real job with a worker that stalls past its lease and then crashes
  produces an attempts table whose timeline PNG has exactly one bar per
  attempt row, coloured as the data says;
* the command line: defaults in ``--help``, the most recent job by default,
  one-line errors with exit code 2;
* ``tools/local_cluster.py --respawn N`` restarts crashed workers (the crash
  experiment of the README cannot finish without it).
"""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time

import pytest
from matplotlib.colors import to_rgba

from conftest import PY, ROOT, db_rows, wait_for
from db_utils import ResultStore
from tools import timeline
from tools.local_cluster import supervise

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JOB = "job-a"


def result(chunk_id: int, attempt_id: int, worker_id: str) -> dict:
    """A valid one-row RESULT for ``ResultStore.record_result``."""
    return {"worker_id": worker_id, "chunk_id": chunk_id, "attempt_id": attempt_id,
            "rows_processed": 1, "rejected_rows": 0, "total_sales": 2.0, "min_price": 2.0,
            "max_price": 2.0, "avg_price": 2.0, "price_count": 1}


def attempt_rows(store: ResultStore) -> dict[int, dict]:
    return {row["attempt_id"]: row for row in store.attempts(JOB)}


def test_every_ending_is_recorded(tmp_path):
    """Rule: each path that ends an attempt stores its outcome and an end time
    no earlier than the lease: counted, duplicate, failed, expired, dropped,
    interrupted (server restart); a late RESULT after an expiry replaces
    "expired", and so does a late FAILED (it counts toward --max-attempts).
    Server-inferred endings never overwrite an ending already recorded."""
    store = ResultStore(str(tmp_path / "r.sqlite"))
    store.open_job(JOB, "x.csv", "{}", chunks=4)
    t0 = time.time()
    for attempt_id, chunk_id in [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3), (6, 3)]:
        store.record_lease(JOB, attempt_id, chunk_id, "w1", t0)
    store.end_attempt(JOB, 1, "expired")              # stalled past its lease ...
    assert store.record_result(JOB, result(0, 2, "w2"))          # ... re-lease counts
    assert not store.record_result(JOB, result(0, 1, "w1"))      # late RESULT: duplicate
    store.end_attempt(JOB, 3, "expired")
    store.end_attempt(JOB, 3, "failed", "boom")       # late FAILED replaces "expired"
    store.end_attempt(JOB, 3, "dropped")              # the connection closing later does not
    store.end_attempt(JOB, 4, "dropped")              # a crash
    store.end_attempt(JOB, 4, "expired")              # an expiry sweep racing it changes nothing
    store.end_attempt(JOB, 5, "failed", "bad chunk")
    store.close()

    store = ResultStore(str(tmp_path / "r.sqlite"))   # the server restarts
    store.open_job(JOB, "x.csv", "{}", chunks=4)
    rows = attempt_rows(store)
    store.close()
    expected = {1: "duplicate", 2: "counted", 3: "failed", 4: "dropped", 5: "failed",
                6: "interrupted"}
    assert {a: r["outcome"] for a, r in rows.items()} == expected
    assert rows[3]["error"] == "boom" and rows[5]["error"] == "bad chunk"
    for row in rows.values():
        assert row["ended_at"] is not None and row["ended_at"] >= row["leased_at"]


# --- draw_timeline on synthetic rows -------------------------------------------

def synthetic_rows() -> list[dict]:
    """One attempt per outcome (two workers), plus one still open."""
    outcomes = ["counted", "duplicate", "failed", "expired", "dropped", "interrupted"]
    rows = [{"attempt_id": i + 1, "chunk_id": i, "worker_id": f"worker-{1 + i % 2}",
             "leased_at": 1000.0 + i, "ended_at": 1000.5 + i, "outcome": outcome,
             "error": None} for i, outcome in enumerate(outcomes)]
    rows.append({"attempt_id": 7, "chunk_id": 6, "worker_id": "worker-10",
                 "leased_at": 1003.0, "ended_at": None, "outcome": "leased", "error": None})
    return rows


def test_one_bar_per_attempt_coloured_by_outcome():
    """Rule: bar i is attempt i, starts at its lease (seconds since the first
    lease), is as long as the attempt, has its outcome's colour, and lies on
    its worker's row; an open attempt runs to the last known time, hatched."""
    rows = synthetic_rows()
    fig, bars = timeline.draw_timeline(rows, "job-x", chunks=7)
    assert len(bars) == len(rows)
    ax = fig.axes[0]
    lanes = {label.get_text(): tick for label, tick in zip(ax.get_yticklabels(), ax.get_yticks())}
    assert list(lanes) == ["worker-1", "worker-2", "worker-10"]
    last = 1005.5
    for row, bar in zip(rows, bars):
        assert bar.get_facecolor() == to_rgba(timeline.OUTCOME_COLORS[row["outcome"]])
        assert bar.get_x() == pytest.approx(row["leased_at"] - 1000.0)
        assert bar.get_width() == pytest.approx((row["ended_at"] or last) - row["leased_at"])
        assert bar.get_y() + bar.get_height() / 2 == pytest.approx(lanes[row["worker_id"]])
        assert bool(bar.get_hatch()) == (row["ended_at"] is None)
    assert "job-x" in ax.get_title() and "7 chunks" in ax.get_title()
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend[0] == "counted (1)" and legend[-1] == "no end yet"


def test_re_lease_marks_where_a_chunk_was_handed_out_again():
    """Rule: a marker sits on an attempt's bar, at the time the same chunk
    was leased again while that attempt was still running (an expired
    lease); a re-lease after the attempt ended (a crash) marks nothing."""
    def attempt(attempt_id, chunk_id, worker_id, leased_at, ended_at, outcome):
        return {"attempt_id": attempt_id, "chunk_id": chunk_id, "worker_id": worker_id,
                "leased_at": leased_at, "ended_at": ended_at, "outcome": outcome, "error": None}
    rows = [attempt(1, 0, "slow", 100.0, 105.0, "duplicate"),    # stalled past its lease
            attempt(2, 1, "fast", 100.0, 100.5, "dropped"),      # crashed
            attempt(3, 1, "fast", 101.0, 101.2, "counted"),      # chunk 1 again: no mark
            attempt(4, 0, "fast", 102.0, 102.3, "counted")]      # chunk 0 again: mark on "slow"
    assert timeline.re_leases(rows, last=105.0) == [(102.0, "slow")]
    fig, bars = timeline.draw_timeline(rows, "job-z", chunks=2)
    (marks,) = fig.axes[0].lines
    assert list(marks.get_xdata()) == [2.0]


def test_empty_job_draws_an_empty_chart():
    """Rule: a job without attempts yet is a chart with no bars, not an error."""
    fig, bars = timeline.draw_timeline([], "job-y", chunks=3)
    assert bars == [] and fig.axes[0].get_title().startswith("job job-y: 3 chunks")


# --- a real job -------------------------------------------------------------------

# With this seed, the first fault draw of the faulty worker is a stall and
# the one for its second chunk is a crash (random.Random(2): 0.96, _, 0.06).
FAULTY = ["--crash-rate", "0.5", "--stall-rate", "0.5", "--stall-seconds", "2",
          "--fault-seed", "2"]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_timeline_of_a_faulty_job(procs, tmp_path, sales_100k):
    """Rule: the PNG of a real job with a stall past the lease and a crash has
    one bar per attempts row, each in the colour of that row's outcome, and
    the data shows the faults: a dropped attempt and chunks leased again.

    The faulty worker takes the first chunk and stalls 2 s (lease: 1 s); the
    steady worker, started once that lease is in the database, needs at
    least 3 s (0.3 s per chunk), so the faulty one wakes while work is
    left, takes a second chunk and crashes on it."""
    server = procs.server(sales_100k, args=["--chunks", "10", "--lease-timeout", "1",
                                            "--linger", "6"])
    faulty = procs.worker(server.port, "faulty", FAULTY)
    wait_for(lambda: db_rows(server.db, "SELECT 1 FROM attempts WHERE worker_id = 'faulty'"),
             30, "the faulty worker's first lease")
    steady = procs.worker(server.port, "steady", ["--delay", "0.3"])
    code, out = server.finish(60)
    assert code == 0, server.stderr()
    assert faulty.wait(timeout=10) == 3          # the injected crash
    assert steady.wait(timeout=10) == 0

    con = sqlite3.connect(server.db)
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM attempts ORDER BY attempt_id")]
    con.close()
    counted = sorted(r["chunk_id"] for r in rows if r["outcome"] == "counted")
    assert counted == list(range(10)), "every chunk counts exactly once"
    assert any(r["outcome"] == "dropped" and r["worker_id"] == "faulty" for r in rows)
    assert len(rows) > 10, "some chunk was leased again"
    assert all(r["ended_at"] is not None for r in rows), "the job is over: every attempt ended"

    png = tmp_path / "timeline.png"
    cli = subprocess.run([PY, str(ROOT / "tools" / "timeline.py"), "--db", server.db,
                          "--out", str(png)], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert f"{len(rows)} attempts" in cli.stdout

    job_id, chunks, loaded = timeline.load_attempts(server.db)
    assert (chunks, loaded) == (10, rows)
    fig, bars = timeline.draw_timeline(loaded, job_id, chunks)
    assert len(bars) == len(rows)
    for row, bar in zip(rows, bars):
        assert bar.get_facecolor() == to_rgba(timeline.OUTCOME_COLORS[row["outcome"]])
    drawn = {}
    for bar in bars:
        drawn[bar.get_facecolor()] = drawn.get(bar.get_facecolor(), 0) + 1
    in_data = {}
    for row in rows:
        colour = to_rgba(timeline.OUTCOME_COLORS[row["outcome"]])
        in_data[colour] = in_data.get(colour, 0) + 1
    assert drawn == in_data


# --- command line -------------------------------------------------------------------

def two_job_db(path) -> str:
    """A database with an older job (2 attempts) and a newer one (1 attempt)."""
    store = ResultStore(str(path))
    store.open_job("old-job", "a.csv", "{}", chunks=2)
    store.record_lease("old-job", 1, 0, "w1", 100.0)
    store.record_lease("old-job", 2, 1, "w1", 101.0)
    store.open_job("new-job", "b.csv", "{}", chunks=5)
    store.record_lease("new-job", 1, 0, "w1", time.time())
    store.close()
    return str(path)


def test_cli_draws_the_most_recent_job_by_default(tmp_path, capsys):
    """Rule: without --job the most recent job is drawn; --job picks another."""
    db = two_job_db(tmp_path / "two.sqlite")
    out = tmp_path / "t.png"
    assert timeline.main(["--db", db, "--out", str(out)]) == 0
    assert "job new-job, 5 chunks, 1 attempts" in capsys.readouterr().out
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert timeline.main(["--db", db, "--out", str(out), "--job", "old-job"]) == 0
    assert "job old-job, 2 chunks, 2 attempts" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--db", "{tmp}/missing.sqlite"], "missing.sqlite: no such database file"),
    (["--db", "{db}", "--job", "nope"], "no job 'nope'; jobs in it: "),
    (["--db", "{tmp}/not-a-db.sqlite"], "not a results database"),
    (["--db", "{db}", "--out", "{tmp}/no/such/dir/t.png"], "cannot write"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
    """Rule: a missing database, an unknown job, a file that is not a results
    database and an unwritable output each give one stderr line and exit 2,
    and a missing database is not created."""
    db = two_job_db(tmp_path / "two.sqlite")
    (tmp_path / "not-a-db.sqlite").write_text("Region,Price\n")
    argv = [a.format(tmp=tmp_path, db=db) for a in args]
    assert timeline.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("timeline.py: error: ") and message in err
    assert not (tmp_path / "missing.sqlite").exists()


def test_cli_help_shows_the_defaults(capsys):
    """Rule: --help names every option with its default."""
    with pytest.raises(SystemExit) as stop:
        timeline.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for expected in ("--db", "default: results.sqlite", "--out", "default: timeline.png",
                     "--job", "most recent job"):
        assert expected in text


# --- the crash experiment needs --respawn -------------------------------------------

def test_local_cluster_respawns_crashed_workers_up_to_n_times(procs):
    """Rule (tools/local_cluster.py --respawn N): a worker that exits with an
    error is started again in its slot, at most N times in all; a worker
    that exits 0 is not; the server's exit code is returned.  Without it a
    job whose workers all crashed would wait for ever."""
    def exits_with(code):
        return procs.popen([PY, "-c", f"import sys; sys.exit({code})"])

    server = procs.popen([PY, "-c", "import sys; sys.stdin.read(); sys.exit(7)"],
                         stdin=subprocess.PIPE)
    workers = {1: exits_with(3), 2: exits_with(0)}
    restarted = []

    def restart(slot):
        restarted.append(slot)
        return exits_with(3)          # crashes again at once

    children = [server, *workers.values()]
    result = {}
    loop = threading.Thread(target=lambda: result.update(
        code=supervise(server, workers, 2, restart, children)))
    loop.start()
    try:
        wait_for(lambda: len(restarted) == 2 and workers[1].poll() is not None, 30,
                 "two restarts of the crashing worker")
    finally:
        server.stdin.close()          # the "job" ends
        loop.join(timeout=30)
    assert result == {"code": 7}
    assert restarted == [1, 1]
    assert len(children) == 5 and children[-1] is workers[1]
