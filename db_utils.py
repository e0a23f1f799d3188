"""The results store: where partial results land and the final answer is computed.

The server owns one :class:`ResultStore`.  Handler threads call it for every
lease and every RESULT; the main thread calls it for the final aggregate.

Tables (all keyed by ``job_id``, so several jobs can share one database)::

    jobs            one row per job: what input and chunking it stands for
    attempts        one row per hand-out of a chunk (a lease) and how it ended
    worker_results  every RESULT received; the documented idempotent upsert,
                    keyed by (job_id, worker_id, chunk_id)
    chunk_results   the result that COUNTS for each chunk: the first one
                    committed, keyed by (job_id, chunk_id); same columns
    group_results   per-group partial aggregates of counted chunks only

Why two result tables?  ``worker_results`` keeps the design's upsert: a
worker that re-sends a result overwrites its own row, so retries are safe.
But the same chunk can be reported by two workers (a lease expired and the
chunk was handed out again), and summing ``worker_results`` would count it
twice.  ``chunk_results`` admits one row per chunk with
``INSERT ... ON CONFLICT DO NOTHING``: the first committed result wins,
later ones change nothing.  At-least-once delivery plus this first-wins
commit gives an exactly-once effect on the final aggregate.

Concurrency: SQLite allows one writer at a time.  Instead of letting handler
threads race for the file lock (and hit "database is locked"), the store
keeps a single connection and a ``threading.Lock``; each call is one short
transaction.  WAL mode lets a student read the database with ``sqlite3``
while a job runs.  ``synchronous=NORMAL`` in WAL mode survives a killed
process (the case this project tests) though not a power cut.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

log = logging.getLogger(__name__)

# The metric columns of one chunk's result, in table order.  worker_results
# and chunk_results share this list so that a row can be copied with SELECT *.
RESULT_COLUMNS = (
    ("job_id", "TEXT NOT NULL"),
    ("worker_id", "TEXT NOT NULL"),
    ("chunk_id", "INTEGER NOT NULL"),
    ("attempt_id", "INTEGER NOT NULL"),
    ("rows_processed", "INTEGER NOT NULL"),   # records read, rejected included
    ("rejected_rows", "INTEGER NOT NULL"),
    ("total_sales", "REAL NOT NULL"),
    ("min_price", "REAL"),                    # NULL when no price was valid
    ("max_price", "REAL"),
    ("avg_price", "REAL"),
    ("price_count", "INTEGER NOT NULL"),      # how many prices avg_price averages
    ("received_at", "REAL NOT NULL"),         # Unix time, seconds
)
_NAMES = [name for name, _ in RESULT_COLUMNS]
_COLUMNS_SQL = ",\n    ".join(f"{name} {kind}" for name, kind in RESULT_COLUMNS)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    job_id     TEXT PRIMARY KEY,
    csv_path   TEXT NOT NULL,
    identity   TEXT NOT NULL,
    chunks     INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    job_id     TEXT NOT NULL,
    attempt_id INTEGER NOT NULL,
    chunk_id   INTEGER NOT NULL,
    worker_id  TEXT NOT NULL,
    leased_at  REAL NOT NULL,
    ended_at   REAL,
    outcome    TEXT NOT NULL,
    error      TEXT,
    PRIMARY KEY (job_id, attempt_id)
);
CREATE TABLE IF NOT EXISTS worker_results (
    {_COLUMNS_SQL},
    PRIMARY KEY (job_id, worker_id, chunk_id)
);
CREATE TABLE IF NOT EXISTS chunk_results (
    {_COLUMNS_SQL},
    PRIMARY KEY (job_id, chunk_id)
);
CREATE TABLE IF NOT EXISTS group_results (
    job_id         TEXT NOT NULL,
    chunk_id       INTEGER NOT NULL,
    group_value    TEXT,
    rows_processed INTEGER NOT NULL,
    rejected_rows  INTEGER NOT NULL,
    total_sales    REAL NOT NULL,
    min_price      REAL,
    max_price      REAL,
    avg_price      REAL,
    price_count    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS group_results_job ON group_results (job_id, chunk_id);
"""

# Attempt outcomes, as stored in attempts.outcome.
LEASED = "leased"          # handed out, not ended yet
COUNTED = "counted"        # its RESULT was the first for the chunk
DUPLICATE = "duplicate"    # its RESULT came after another one had counted
FAILED = "failed"          # the worker reported an error (counts toward --max-attempts)
EXPIRED = "expired"        # the lease ran out before a RESULT arrived
DROPPED = "dropped"        # the connection closed while the chunk was leased
INTERRUPTED = "interrupted"  # the server stopped while the chunk was leased

_UPSERT_RESULT = f"""
INSERT INTO worker_results ({", ".join(_NAMES)})
VALUES ({", ".join("?" for _ in _NAMES)})
ON CONFLICT (job_id, worker_id, chunk_id) DO UPDATE SET
    {", ".join(f"{n} = excluded.{n}" for n in _NAMES[3:])}
"""

# First result wins.  SQLite needs the WHERE to parse ON CONFLICT after a
# SELECT; it is also what picks the row just upserted.
_CLAIM_CHUNK = """
INSERT INTO chunk_results
SELECT * FROM worker_results WHERE job_id = ? AND worker_id = ? AND chunk_id = ?
ON CONFLICT (job_id, chunk_id) DO NOTHING
"""

# The weighted mean of chunk means: sum(avg_i * n_i) / sum(n_i), where n_i is
# how many prices chunk i averaged.  NULLIF turns "no prices at all" into
# NULL instead of a division by zero; NULL averages (n_i = 0) drop out of SUM.
FINAL_AGGREGATE_SQL = """
SELECT COALESCE(SUM(rows_processed), 0)                       AS total_rows,
       COALESCE(SUM(total_sales), 0.0)                        AS total_sales,
       MIN(min_price)                                         AS min_price,
       MAX(max_price)                                         AS max_price,
       SUM(avg_price * price_count) / NULLIF(SUM(price_count), 0) AS avg_price,
       COALESCE(SUM(rejected_rows), 0)                        AS rejected_rows
FROM chunk_results
WHERE job_id = ?
"""

GROUP_AGGREGATE_SQL = """
SELECT group_value,
       SUM(rows_processed)                                    AS total_rows,
       SUM(total_sales)                                       AS total_sales,
       MIN(min_price)                                         AS min_price,
       MAX(max_price)                                         AS max_price,
       SUM(avg_price * price_count) / NULLIF(SUM(price_count), 0) AS avg_price,
       SUM(rejected_rows)                                     AS rejected_rows
FROM group_results
WHERE job_id = ?
GROUP BY group_value
ORDER BY total_sales DESC, group_value
"""

PER_WORKER_SQL = """
SELECT worker_id, COUNT(*) AS chunks, SUM(rows_processed) AS rows
FROM chunk_results
WHERE job_id = ?
GROUP BY worker_id
ORDER BY worker_id
"""


class JobState:
    """What the database already knows about a job when the server starts.

    ``done``: set of chunk ids with a counted result.  ``attempts``: dict
    attempt_id -> chunk_id of every earlier attempt (so a result re-sent
    after a server restart is still recognised).  ``next_attempt_id``: the
    first attempt id this run may use.
    """

    def __init__(self, done, attempts, next_attempt_id):
        self.done = done
        self.attempts = attempts
        self.next_attempt_id = next_attempt_id


class ResultStore:
    """Thread-safe access to the SQLite results database at ``path``.

    Every public method is one transaction under one lock.  Raises
    ``sqlite3.Error`` if the database cannot be opened or written.
    """

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        # One connection shared by all handler threads, serialised by _lock
        # (check_same_thread=False is safe only because of that lock).
        # isolation_level=None: we write BEGIN/COMMIT ourselves.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._db.close()

    def _transaction(self, statements):
        """Run [(sql, params), ...] atomically; return the last rowcount."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                rowcount = 0
                for sql, params in statements:
                    cur.execute(sql, params)
                    rowcount = cur.rowcount
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            return rowcount

    # --- job lifecycle --------------------------------------------------

    def open_job(self, job_id: str, csv_path: str, identity: str, chunks: int,
                 fresh: bool = False) -> JobState:
        """Create the job, or resume it, and return its :class:`JobState`.

        With ``fresh=True`` every row of this job is deleted first.  Attempts
        left ``leased`` by a previous server run are marked ``interrupted``;
        their results are still accepted if a worker re-sends them.
        """
        now = time.time()
        statements = []
        if fresh:
            for table in ("jobs", "attempts", "worker_results", "chunk_results", "group_results"):
                statements.append((f"DELETE FROM {table} WHERE job_id = ?", (job_id,)))
        statements += [
            ("INSERT INTO jobs (job_id, csv_path, identity, chunks, created_at) "
             "VALUES (?, ?, ?, ?, ?) ON CONFLICT (job_id) DO NOTHING",
             (job_id, csv_path, identity, chunks, now)),
            ("UPDATE attempts SET outcome = ?, ended_at = ? "
             "WHERE job_id = ? AND outcome = ?", (INTERRUPTED, now, job_id, LEASED)),
        ]
        self._transaction(statements)
        with self._lock:
            done = {row[0] for row in self._db.execute(
                "SELECT chunk_id FROM chunk_results WHERE job_id = ?", (job_id,))}
            attempts = dict(self._db.execute(
                "SELECT attempt_id, chunk_id FROM attempts WHERE job_id = ?", (job_id,)))
        return JobState(done, attempts, max(attempts, default=0) + 1)

    # --- attempts ----------------------------------------------------------

    def record_lease(self, job_id: str, attempt_id: int, chunk_id: int,
                     worker_id: str, leased_at: float) -> None:
        """Insert the attempt row for a new lease (outcome ``leased``)."""
        self._transaction([(
            "INSERT INTO attempts (job_id, attempt_id, chunk_id, worker_id, leased_at, outcome) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, attempt_id, chunk_id, worker_id, leased_at, LEASED))])

    def end_attempt(self, job_id: str, attempt_id: int, outcome: str,
                    error: str | None = None) -> None:
        """Record how an attempt ended without a result (failed, expired, ...).

        An attempt that already ended is left as it is: a late RESULT after
        an expiry is recorded by :meth:`record_result` instead.
        """
        self._transaction([(
            "UPDATE attempts SET outcome = ?, error = ?, ended_at = ? "
            "WHERE job_id = ? AND attempt_id = ? AND outcome = ?",
            (outcome, error, time.time(), job_id, attempt_id, LEASED))])

    def record_result(self, job_id: str, result: dict, groups=()) -> bool:
        """Commit one RESULT; return True if it is the one that counts.

        ``result`` holds the keys of :data:`RESULT_COLUMNS` except
        ``job_id`` and ``received_at``.  ``groups`` is a sequence of
        ``(group_value, rows_processed, rejected_rows, total_sales,
        min_price, max_price, avg_price, price_count)``, stored only when
        this result counts.  One transaction: either all of it lands or none.
        """
        now = time.time()
        row = dict(result, job_id=job_id, received_at=now)
        key = (job_id, result["worker_id"], result["chunk_id"])
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.execute(_UPSERT_RESULT, [row[n] for n in _NAMES])
                cur.execute(_CLAIM_CHUNK, key)
                counted = cur.rowcount == 1
                if counted and groups:
                    cur.executemany(
                        "INSERT INTO group_results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [(job_id, result["chunk_id"], *g) for g in groups])
                cur.execute(
                    "UPDATE attempts SET outcome = ?, ended_at = ?, error = NULL "
                    "WHERE job_id = ? AND attempt_id = ? AND outcome NOT IN (?, ?)",
                    (COUNTED if counted else DUPLICATE, now, job_id,
                     result["attempt_id"], COUNTED, DUPLICATE))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return counted

    # --- reading -----------------------------------------------------------

    def _query(self, sql, params):
        with self._lock:
            cur = self._db.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def final_aggregate(self, job_id: str) -> dict:
        """The job's final aggregate, computed in SQL (:data:`FINAL_AGGREGATE_SQL`).

        Returns ``{'total_rows', 'total_sales', 'min_price', 'max_price',
        'avg_price', 'rejected_rows'}``; the price statistics are None when
        no row had a valid price and quantity.
        """
        return self._query(FINAL_AGGREGATE_SQL, (job_id,))[0]

    def group_aggregate(self, job_id: str) -> list[dict]:
        """Per-group aggregates (``--group-by``), sorted by total sales, descending."""
        return self._query(GROUP_AGGREGATE_SQL, (job_id,))

    def per_worker(self, job_id: str) -> list[dict]:
        """Counted chunks and rows per worker: ``[{'worker_id', 'chunks', 'rows'}]``."""
        return self._query(PER_WORKER_SQL, (job_id,))

    def attempts(self, job_id: str) -> list[dict]:
        """Every attempt of the job, in attempt order (for tests and the timeline)."""
        return self._query(
            "SELECT * FROM attempts WHERE job_id = ? ORDER BY attempt_id", (job_id,))
