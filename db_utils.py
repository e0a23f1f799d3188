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

Concurrency on SQLite: it allows one writer at a time.  Instead of letting handler
threads race for the file lock (and hit "database is locked"), the store
keeps a single connection and a ``threading.Lock``; each call is one short
transaction.  WAL mode lets a student read the database with ``sqlite3``
while a job runs.  ``synchronous=NORMAL`` in WAL mode survives a killed
process (the case this project tests) though not a power cut.

Two backends, one store.  ``ResultStore(target)`` picks the database from
``target``: a path (``results.sqlite``) is SQLite, a URL
(``postgresql://user:password@host:5432/dbname``) is PostgreSQL through
psycopg 3.  The SQL below is written once, with SQLite's ``?`` placeholders
and types; the PostgreSQL backend turns ``?`` into ``%s`` and ``REAL`` into
``DOUBLE PRECISION`` (PostgreSQL's ``REAL`` is a 4-byte float, SQLite's is
8 bytes).  ``INSERT ... ON CONFLICT`` means the same on both.  The rest of
the program (server.py) never knows which backend it has.

Concurrency on PostgreSQL: no Python lock.  Handler threads borrow
connections from a ``psycopg_pool.ConnectionPool`` and every call is one
transaction at READ COMMITTED.  What keeps a chunk from counting twice is
the database itself: two transactions inserting the same (job_id, chunk_id)
into ``chunk_results`` meet on its primary key; ``ON CONFLICT`` makes the
second one wait until the first commits and then take the ``DO NOTHING``
branch (rowcount 0), so exactly one is counted and its groups are stored
once.  Two RESULTs of the same worker and chunk meet on the
``worker_results`` key, where ``DO UPDATE`` takes a row lock, so they run
one after the other.

Errors that can clear: a results database that restarts, or a SQLite file
that another process holds locked, makes a call fail with an error that
says nothing about the data.  Every call is retried then, with capped
exponential backoff, for up to ``retry_for`` seconds (``--db-retry-for``),
and only then raises :class:`StoreError`.  Running a transaction again is
safe even when the connection broke during COMMIT, so that its outcome is
unknown: every write here is idempotent (the upsert, the first-wins insert,
an attempt row inserted only if missing, updates guarded by the outcome they
replace), so a second run of a transaction that did commit changes nothing.
Errors that cannot clear by waiting (a full disk, a read-only file, bad
SQL) raise at once.  Either way the server sends its ACK only after the
call returns, so an unacknowledged RESULT is re-sent by the worker: a lost
connection can delay a result, never drop one.
"""

from __future__ import annotations

import collections
import logging
import math
import re
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


class Outcome:
    """How an attempt ended, as stored in ``attempts.outcome`` (lowercase text).

    One attempt is one lease of one chunk to one worker.  Its row starts
    ``leased`` and moves along :data:`TRANSITIONS`::

        leased --+-- RESULT, first for its chunk ------> counted      (final)
                 +-- RESULT, another one counted ------> duplicate    (final)
                 +-- the worker's FAILED report -------> failed
                 +-- the lease ran out ----------------> expired
                 +-- the connection closed ------------> dropped
                 +-- the server stopped ---------------> interrupted

        expired | dropped | interrupted  -- FAILED report -->  failed
        failed | expired | dropped | interrupted  -- RESULT -->  counted | duplicate

    The server infers ``expired``, ``dropped`` and ``interrupted``; what the
    worker says afterwards is better evidence and replaces them.  A
    ``failed`` attempt that still delivers its RESULT counts (the chunk was
    computed after all).  ``counted`` and ``duplicate`` never change again.
    """

    LEASED = "leased"            # handed out, not ended yet
    COUNTED = "counted"          # its RESULT was the first for the chunk
    DUPLICATE = "duplicate"      # its RESULT came after another one had counted
    FAILED = "failed"            # the worker reported an error (counts toward --max-attempts)
    EXPIRED = "expired"          # the lease ran out before a RESULT arrived
    DROPPED = "dropped"          # the connection closed while the chunk was leased
    INTERRUPTED = "interrupted"  # the server stopped while the chunk was leased


_O = Outcome
_NOT_FINAL = (_O.LEASED, _O.FAILED, _O.EXPIRED, _O.DROPPED, _O.INTERRUPTED)
# The diagram above as data: outcome -> the outcomes it may replace.  Every
# UPDATE of attempts.outcome builds its WHERE clause from this table
# (:func:`_replaceable`), so the guard that makes a re-run transaction
# harmless and the picture a student reads cannot drift apart.
TRANSITIONS = {
    _O.COUNTED: _NOT_FINAL,
    _O.DUPLICATE: _NOT_FINAL,
    _O.FAILED: (_O.LEASED, _O.EXPIRED, _O.DROPPED, _O.INTERRUPTED),
    _O.EXPIRED: (_O.LEASED,),
    _O.DROPPED: (_O.LEASED,),
    _O.INTERRUPTED: (_O.LEASED,),
}


def _replaceable(outcome: str) -> tuple[str, tuple]:
    """``("outcome IN (?, ...)", states)``: the WHERE guard for moving to ``outcome``.

    Raises ``KeyError`` for an outcome nothing moves to (``leased``).
    """
    states = TRANSITIONS[outcome]
    return f"outcome IN ({', '.join('?' * len(states))})", states


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
ORDER BY total_sales DESC, group_value NULLS FIRST
"""
PER_WORKER_SQL = """
SELECT worker_id, COUNT(*) AS chunks, SUM(rows_processed) AS rows
FROM chunk_results
WHERE job_id = ?
GROUP BY worker_id
ORDER BY worker_id
"""


# --- The store: first result wins, the final answer in SQL -------------------

class StoreError(OSError):
    """The results database cannot be opened, reached or written.

    An ``OSError``, because to the caller it is one: server.py reports it
    as a one-line error (exit 2) at start-up and stops the job (exit 1)
    during one.  The message never holds a password.
    """


class AggregateOverflow(ArithmeticError):
    """A total of the final or per-group aggregate passes the float range.

    Each chunk's totals were finite (workers and server check that), but
    their sum is not: SQLite's SUM then gives inf (or NaN, read back as
    NULL), PostgreSQL's raises "value out of range".  The message is one
    line for the user.
    """


OVERFLOW = "overflows a float (prices or quantities near 1e308?)"   # as worker.py says it


class JobState:
    """What the database already knows about a job when the server starts.

    ``done``: set of chunk ids with a counted result.  ``attempts``: dict
    attempt_id -> (chunk_id, worker_id) of every earlier attempt (so a
    result re-sent after a server restart is still recognised).  ``next_attempt_id``: the
    first attempt id this run may use.
    """

    def __init__(self, done, attempts, next_attempt_id):
        self.done = done
        self.attempts = attempts
        self.next_attempt_id = next_attempt_id


def _lease_statement(job_id: str, attempt_id: int, chunk_id: int, worker_id: str,
                     leased_at: float) -> tuple[str, tuple]:
    """The insert of a new attempt row (outcome ``leased``); idempotent, so a
    transaction of unknown outcome can run it again."""
    return ("INSERT INTO attempts (job_id, attempt_id, chunk_id, worker_id, leased_at, outcome) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, attempt_id) DO NOTHING",
            (job_id, attempt_id, chunk_id, worker_id, leased_at, Outcome.LEASED))


class ResultStore:
    """Thread-safe access to the results database ``path``.

    ``path`` is a SQLite file (``results.sqlite``) or a PostgreSQL URL
    (``postgresql://user:password@host:5432/dbname``); see "Two backends"
    in the module docstring.  Every public method is one transaction,
    retried for up to ``retry_for`` seconds while the database is
    unreachable or busy (see "Errors that can clear").  Raises
    :class:`StoreError` if the database cannot be opened, belongs to
    another program, stays unreachable, or a statement fails; the final
    and group aggregates raise :class:`AggregateOverflow`.  ``label`` is
    ``path`` with the password masked: log that, never ``path``.
    """

    def __init__(self, path: str, retry_for: float = 60.0):
        self.path = path
        self.label = mask_password(path)
        backend = _PostgresBackend if is_postgres_url(path) else _SqliteBackend
        self._backend = backend(path, retry_for)

    def close(self) -> None:
        """Close the connection(s) (idempotent)."""
        self._backend.close()

    def _transaction(self, statements):
        """Run [(sql, params), ...] atomically; return the last rowcount."""
        def run(cur):
            rowcount = 0
            for sql, params in statements:
                cur.execute(sql, params)
                rowcount = cur.rowcount
            return rowcount
        return self._backend.transaction(run)

    # --- job lifecycle --------------------------------------------------

    def open_job(self, job_id: str, csv_path: str, identity: str, chunks: int,
                 fresh: bool = False) -> JobState:
        """Create the job, or resume it, and return its :class:`JobState`.

        With ``fresh=True`` every row of this job is deleted first.  Attempts
        left ``leased`` by a previous server run are marked ``interrupted``;
        their results are still accepted if a worker re-sends them.
        """
        now = time.time()
        guard, states = _replaceable(Outcome.INTERRUPTED)
        statements = []
        if fresh:
            for table in ("jobs", "attempts", "worker_results", "chunk_results", "group_results"):
                statements.append((f"DELETE FROM {table} WHERE job_id = ?", (job_id,)))
        statements += [
            ("INSERT INTO jobs (job_id, csv_path, identity, chunks, created_at) "
             "VALUES (?, ?, ?, ?, ?) ON CONFLICT (job_id) DO NOTHING",
             (job_id, csv_path, identity, chunks, now)),
            ("UPDATE attempts SET outcome = ?, ended_at = ? "
             f"WHERE job_id = ? AND {guard}", (Outcome.INTERRUPTED, now, job_id, *states)),
        ]
        self._transaction(statements)
        done = {row["chunk_id"] for row in self._query(
            "SELECT chunk_id FROM chunk_results WHERE job_id = ?", (job_id,))}
        attempts = {row["attempt_id"]: (row["chunk_id"], row["worker_id"]) for row in self._query(
            "SELECT attempt_id, chunk_id, worker_id FROM attempts WHERE job_id = ?", (job_id,))}
        return JobState(done, attempts, max(attempts, default=0) + 1)

    # --- attempts ----------------------------------------------------------

    def record_lease(self, job_id: str, attempt_id: int, chunk_id: int,
                     worker_id: str, leased_at: float) -> None:
        """Insert the attempt row for a new lease (outcome ``leased``)."""
        self._transaction([_lease_statement(job_id, attempt_id, chunk_id, worker_id, leased_at)])

    def end_attempt(self, job_id: str, attempt_id: int, outcome: str,
                    error: str | None = None) -> None:
        """Record how an attempt ended without a result (failed, expired, ...).

        An attempt that already ended is left as it is (a late RESULT after
        an expiry is recorded by :meth:`record_result` instead), except that
        a worker's own FAILED report replaces an ending the server only
        inferred (expired, dropped, interrupted): the failure is counted
        toward ``--max-attempts``, so the table must show it too.
        """
        guard, states = _replaceable(outcome)
        self._transaction([(
            "UPDATE attempts SET outcome = ?, error = ?, ended_at = ? "
            f"WHERE job_id = ? AND attempt_id = ? AND {guard}",
            (outcome, error, time.time(), job_id, attempt_id, *states))])

    def record_result(self, job_id: str, result: dict, groups=(), lease=None) -> bool:
        """Commit one RESULT; return True if it is the one that counts.

        ``result`` holds the keys of :data:`RESULT_COLUMNS` except
        ``job_id`` and ``received_at``.  ``groups`` is a sequence of
        ``(group_value, rows_processed, rejected_rows, total_sales,
        min_price, max_price, avg_price, price_count)``, stored only when
        this result counts.  ``lease``, if given, is the worker's next
        attempt, ``(attempt_id, chunk_id, worker_id, leased_at)``, inserted
        as :meth:`record_lease` would: the ACK and the next JOB then wait
        for one commit instead of two (README, "The life of one chunk").
        One transaction: either all of it lands or none.
        """
        now = time.time()
        row = dict(result, job_id=job_id, received_at=now)
        key = (job_id, result["worker_id"], result["chunk_id"])
        runs = []

        def commit_result(cur) -> bool:
            runs.append(1)
            cur.execute(_UPSERT_RESULT, [row[n] for n in _NAMES])
            cur.execute(_CLAIM_CHUNK, key)
            counted = cur.rowcount == 1
            if counted and groups:
                cur.executemany(
                    "INSERT INTO group_results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(job_id, result["chunk_id"], *g) for g in groups])
            elif len(runs) > 1:
                # Run again after a failure: if the earlier run's COMMIT did
                # land (its outcome was unknown), this attempt already claimed
                # the chunk, and it still counts (its groups are stored once).
                cur.execute("SELECT attempt_id FROM chunk_results WHERE job_id = ? "
                            "AND chunk_id = ?", (job_id, result["chunk_id"]))
                claimed = cur.fetchone()
                counted = claimed is not None and claimed[0] == result["attempt_id"]
            outcome = Outcome.COUNTED if counted else Outcome.DUPLICATE
            guard, states = _replaceable(outcome)
            cur.execute(
                "UPDATE attempts SET outcome = ?, ended_at = ?, error = NULL "
                f"WHERE job_id = ? AND attempt_id = ? AND {guard}",
                (outcome, now, job_id, result["attempt_id"], *states))
            if lease is not None:
                cur.execute(*_lease_statement(job_id, *lease))
            return counted

        return self._backend.transaction(commit_result)

    # --- reading -----------------------------------------------------------

    def _query(self, sql, params):
        return self._backend.query(sql, params)

    def final_aggregate(self, job_id: str) -> dict:
        """The job's final aggregate, computed in SQL (:data:`FINAL_AGGREGATE_SQL`).

        Returns ``{'total_rows', 'total_sales', 'min_price', 'max_price',
        'avg_price', 'rejected_rows'}``; the price statistics are None when
        no row had a valid price and quantity.  Raises
        :class:`AggregateOverflow` when the sum of the chunks' sales or
        prices passes the float range.
        """
        try:
            final = self._query(FINAL_AGGREGATE_SQL, (job_id,))[0]
        except AggregateOverflow:
            raise AggregateOverflow(f"the total of all chunks {OVERFLOW}") from None
        if not _finite_totals(final):
            raise AggregateOverflow(f"the total of all chunks {OVERFLOW}")
        return final

    def group_aggregate(self, job_id: str) -> list[dict]:
        """Per-group aggregates (``--group-by``), sorted by total sales, descending.

        Raises :class:`AggregateOverflow` as :meth:`final_aggregate` does,
        for any group.
        """
        try:
            groups = self._query(GROUP_AGGREGATE_SQL, (job_id,))
        except AggregateOverflow:
            raise AggregateOverflow(f"the total of a group {OVERFLOW}") from None
        for group in groups:
            if not _finite_totals(group):
                raise AggregateOverflow(f"the total of group {group['group_value']!r} {OVERFLOW}")
        return groups

    def per_worker(self, job_id: str) -> list[dict]:
        """Counted chunks and rows per worker: ``[{'worker_id', 'chunks', 'rows'}]``."""
        return self._query(PER_WORKER_SQL, (job_id,))

    def attempts(self, job_id: str) -> list[dict]:
        """Every attempt of the job, in attempt order (for tests and the timeline)."""
        return self._query(
            "SELECT * FROM attempts WHERE job_id = ? ORDER BY attempt_id", (job_id,))


def _one_line(exc: Exception) -> str:
    """An exception's message on one line (libpq's span several)."""
    return " ".join(str(exc).split())


def _finite_totals(row: dict) -> bool:
    """The sums of an aggregate row are finite numbers.

    SQLite adds floats past the range into inf, and inf - inf into NaN,
    which it stores and returns as NULL: a NULL ``avg_price`` beside a
    ``min_price`` means the price sum broke, not that there were no prices.
    """
    sales, mean = row["total_sales"], row["avg_price"]
    if mean is None and row["min_price"] is not None:
        return False
    return sales is not None and math.isfinite(sales) and (mean is None or math.isfinite(mean))


# ==============================================================================
# The armour.  Below: the two database backends behind ResultStore, with the
# retries that ride out a database restart, the check that a database holds
# only this project's tables, and PostgreSQL's URLs and dialect.
# ==============================================================================
# --- Backends --------------------------------------------------------------
# A backend runs the SQL above on one kind of database.  Both offer the same
# three operations, which is all ResultStore uses:
#
#     transaction(body)   run body(cursor) as one transaction; commit and
#                         return its value, or roll back and re-raise
#     query(sql, params)  one read, as a list of {column: value} dicts
#     close()             release the connection(s)
#
# ``cursor`` has execute(sql, params), executemany(sql, rows) and rowcount,
# and takes "?" placeholders on both backends.

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(target: str) -> bool:
    """True if ``target`` names a PostgreSQL database rather than a SQLite file."""
    return str(target).startswith(POSTGRES_SCHEMES)


def mask_password(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and messages.

    ``postgresql://sales:s3cret@db:5432/results`` becomes
    ``postgresql://sales:***@db:5432/results``; a ``password=`` query
    parameter is masked too.  A string without a password is returned as is.
    """
    scheme, sep, rest = str(url).partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = userinfo.split(":", 1)[0] + ":***@" + hostport
    tail = re.sub(r"(?i)(\bpassword=)[^&]*", r"\1***", tail)
    return f"{scheme}://{netloc}{slash}{tail}"


def _table_columns(sqlite_db) -> dict[str, set]:
    """``{table: {column names}}`` of the tables in a SQLite connection."""
    names = [row[0] for row in sqlite_db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    return {name: {row[1] for row in sqlite_db.execute(f"PRAGMA table_info(\"{name}\")")}
            for name in names}


def _our_tables() -> dict[str, set]:
    """``{table: {column names}}`` that :data:`SCHEMA` creates."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(SCHEMA)
        return _table_columns(db)
    finally:
        db.close()


def check_is_ours(label: str, found: dict[str, set], shared: bool) -> None:
    """Refuse a database that belongs to another program, before changing it.

    ``found`` is ``{table: {columns}}`` of the tables already there.  A table
    with one of our names must have our columns (one of an older or newer
    layout would break the SQL below).  ``shared``: the database may hold
    other programs' tables as well (a PostgreSQL database); a SQLite file
    with tables must be ours, marked by our ``jobs`` table.  Raises
    :class:`StoreError` saying that nothing was changed.
    """
    ours = _our_tables()
    for table, columns in found.items():
        if table in ours and columns != ours[table]:
            raise StoreError(f"{label} is not a results database of this version: its table "
                             f"{table!r} has other columns (another program's, or an older "
                             f"layout); nothing was changed, pass another --db")
    if found and not shared and "jobs" not in found:
        shown = ", ".join(sorted(found)[:5]) + (", ..." if len(found) > 5 else "")
        raise StoreError(f"{label} is not a results database of this program (it holds the "
                         f"tables {shown}); nothing was changed, pass another --db")


class _Retrier:
    """Runs database calls again while they fail with errors that can clear.

    ``transient(exc)`` tells those errors (a lost connection, a database
    restarting, a busy SQLite file) from the rest, which are raised at once.
    Delays double from 0.1 s up to 5 s; a call gives up ``retry_for``
    seconds after it started and raises :class:`StoreError`.  One WARNING
    when an outage is first seen and one INFO when a call succeeds again,
    however many threads wait through it.
    """

    def __init__(self, label: str, retry_for: float, transient):
        self.label, self.retry_for, self.transient = label, retry_for, transient
        self._lock = threading.Lock()
        self._outage_since = None   # time.monotonic() of the first error, during an outage

    def run(self, call):
        """Return ``call(seconds_left)``, retrying as above; ``seconds_left``
        is what remains of the call's ``retry_for`` (for connection waits)."""
        deadline = time.monotonic() + self.retry_for
        delay = 0.1
        while True:
            try:
                value = call(max(deadline - time.monotonic(), 0.1))
            except Exception as exc:
                if not self.transient(exc):
                    raise
                self._outage(exc)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreError(f"results database {self.label} unavailable for "
                                     f"{self.retry_for:g} s: {_one_line(exc)}") from None
                time.sleep(min(delay, left))
                delay = min(2 * delay, 5.0)
            else:
                self._recovered()
                return value

    def _outage(self, exc: Exception) -> None:
        with self._lock:
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning("results database %s unavailable (%s); retrying for up to %g s",
                            self.label, _one_line(exc), self.retry_for)

    def _recovered(self) -> None:
        if self._outage_since is None:   # the usual case, read without the lock
            return
        with self._lock:
            if self._outage_since is not None:
                log.info("results database %s is back after %.1f s", self.label,
                         time.monotonic() - self._outage_since)
                self._outage_since = None


# SQLite's primary result codes for "another connection holds a lock": the
# errors that waiting can clear (https://www.sqlite.org/rescode.html).
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


def _sqlite_transient(exc: Exception) -> bool:
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)   # Python 3.11+
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


class _SqliteBackend:
    """SQLite: one connection shared by all threads, serialised by one lock.

    See "Concurrency" in the module docstring.  ``BEGIN IMMEDIATE`` takes
    the write lock at the start of a transaction, so a transaction never
    fails half-way because another process wrote the file meanwhile.  A
    file that is busy (another process holds its lock) is retried; a full
    disk or a read-only file raises :class:`StoreError` at once.
    """

    def __init__(self, path: str, retry_for: float = 60.0):
        self.label = path
        self._lock = threading.Lock()
        self._retry = _Retrier(path, retry_for, _sqlite_transient)
        try:
            # check_same_thread=False is safe only because of _lock.
            # isolation_level=None: transaction() writes BEGIN/COMMIT itself.
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the results database {path}: {exc}") from None
        try:
            # Read first, write after: another program's file is refused
            # before it is switched to WAL or gets a single table.
            check_is_ours(path, _table_columns(self._db), shared=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"cannot open the results database {path}: {exc}") from None
        except StoreError:
            self._db.close()
            raise

    def transaction(self, body):
        def attempt(_seconds_left):
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                value = body(cur)
                cur.execute("COMMIT")
            except BaseException:
                # After some errors (a full disk) SQLite has already rolled
                # back; a second ROLLBACK would fail and hide the cause.
                if self._db.in_transaction:
                    cur.execute("ROLLBACK")
                raise
            return value

        with self._lock:
            try:
                return self._retry.run(attempt)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write the results database {self.label}: {exc}") from exc

    def query(self, sql: str, params=()) -> list[dict]:
        def attempt(_seconds_left):
            cur = self._db.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

        with self._lock:
            try:
                return self._retry.run(attempt)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the results database {self.label}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _postgres_sql(sql: str) -> str:
    """The store's SQL with psycopg's ``%s`` placeholders instead of ``?``.

    Safe because no statement here contains a literal ``?`` or ``%``.
    """
    return sql.replace("?", "%s")


def postgres_schema() -> str:
    """:data:`SCHEMA` in PostgreSQL's types.

    REAL -> DOUBLE PRECISION (8-byte floats, as in SQLite).  INTEGER stays
    INTEGER (4 bytes): ids and per-chunk counts fit, and SUM/COUNT of an
    INTEGER column is a BIGINT, which psycopg returns as an ``int`` (the SUM
    of a BIGINT column would be NUMERIC, returned as a ``Decimal``).
    ``group_value`` gets the "C" collation, byte order as in SQLite, so
    groups with equal sales are listed in the same order on both.
    """
    schema = re.sub(r"\bREAL\b", "DOUBLE PRECISION", SCHEMA)
    return re.sub(r"\bgroup_value(\s+)TEXT\b", r'group_value\1TEXT COLLATE "C"', schema)


class _PostgresCursor:
    """A psycopg cursor that accepts the store's ``?`` placeholders."""

    def __init__(self, cursor):
        self._cursor = cursor

    def execute(self, sql: str, params=()):
        return self._cursor.execute(_postgres_sql(sql), params)

    def executemany(self, sql: str, rows):
        return self._cursor.executemany(_postgres_sql(sql), rows)

    def fetchone(self):
        return self._cursor.fetchone()

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount


# SQLSTATEs of errors that a restart or a busy server explains and waiting
# can clear (PostgreSQL manual, appendix A): class 08, connection exception;
# 57P01-57P03, admin shutdown, crash shutdown, cannot connect now (starting
# up or shutting down); 53300, too many connections.  A lost connection that
# the server never explained has no SQLSTATE at all.
_PG_TRANSIENT = ("57P01", "57P02", "57P03", "53300")


class _PostgresBackend:
    """PostgreSQL through psycopg 3, with a pool of connections.

    Handler threads each borrow a connection for one call, so writes of
    different chunks run in parallel; the database, not a Python lock,
    keeps them consistent (see the module docstring).  Pool connections are
    in autocommit mode, and every write is an explicit ``conn.transaction()``
    block.  Connection-level errors are retried (see :class:`_Retrier`);
    any other database error raises :class:`StoreError` at once.
    """

    POOL_SIZE = 8           # connections at most; a ninth thread waits for one
    CONNECT_TIMEOUT = 10    # s to open one connection
    # s a call waits for a connection before that counts as a failure (and is
    # retried, see _Retrier): a live pool hands one out in microseconds, and
    # calls hold one for about a millisecond, so a second means the database
    # is not answering, and the retry logs it.
    CONNECTION_WAIT = 1.0
    APPLICATION_NAME = "sales-results-store"   # shows in pg_stat_activity

    def __init__(self, url: str, retry_for: float = 60.0):
        self.label = mask_password(url)
        try:
            import psycopg
            import psycopg_pool
        except ImportError:
            raise StoreError(f"{self.label} is a PostgreSQL URL, but psycopg is not installed "
                             "(pip install -r requirements.txt)") from None
        self._error = psycopg.Error
        self._overflow = psycopg.errors.NumericValueOutOfRange
        self._retry = _Retrier(self.label, retry_for, self._transient)
        self._pool_timeout = psycopg_pool.PoolTimeout   # (an OperationalError too)
        self._operational = psycopg.OperationalError
        # The pool logs every borrowed connection at INFO, and every failed
        # reconnection during an outage as a WARNING of several lines; the
        # retry's own WARNING and INFO say what matters, once.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        settings = {"connect_timeout": self.CONNECT_TIMEOUT,
                    "application_name": self.APPLICATION_NAME}
        try:
            # One plain connection first: a wrong host or password is reported
            # now, in one line, rather than as a pool timeout later.
            with psycopg.connect(url, autocommit=True, **settings) as conn:
                found = collections.defaultdict(set)
                for table, column in conn.execute(
                        "SELECT table_name, column_name FROM information_schema.columns "
                        "WHERE table_schema = current_schema()"):
                    found[table].add(column)
                check_is_ours(self.label, dict(found), shared=True)
                conn.execute(postgres_schema())
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the results database {self.label}: "
                             f"{_one_line(exc)}") from None
        self._pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=self.POOL_SIZE, timeout=self.CONNECTION_WAIT,
            kwargs=dict(settings, autocommit=True),
            # Test a connection when it is borrowed: after a database restart
            # the pool holds dead ones, and this replaces them quietly.
            check=psycopg_pool.ConnectionPool.check_connection,
            name="results", open=True)

    def _transient(self, exc: Exception) -> bool:
        if isinstance(exc, self._pool_timeout):
            return True
        return isinstance(exc, self._operational) and (
            exc.sqlstate is None or exc.sqlstate.startswith("08")
            or exc.sqlstate in _PG_TRANSIENT)

    def _borrow(self, seconds_left: float):
        return self._pool.connection(timeout=min(self.CONNECTION_WAIT, seconds_left))

    def transaction(self, body):
        def attempt(seconds_left):
            with self._borrow(seconds_left) as conn:
                with conn.transaction():   # leaving the block sends COMMIT
                    return body(_PostgresCursor(conn.cursor()))

        try:
            return self._retry.run(attempt)
        except self._error as exc:
            raise StoreError(f"results database {self.label} failed: {_one_line(exc)}") from None

    def query(self, sql: str, params=()) -> list[dict]:
        def attempt(seconds_left):
            with self._borrow(seconds_left) as conn:
                cur = conn.execute(_postgres_sql(sql), params)
                names = [d.name for d in cur.description]
                return [dict(zip(names, row)) for row in cur.fetchall()]

        try:
            return self._retry.run(attempt)
        except self._overflow:
            raise AggregateOverflow(f"a sum {OVERFLOW}") from None
        except self._error as exc:
            raise StoreError(f"results database {self.label} failed: {_one_line(exc)}") from None

    def close(self) -> None:
        self._pool.close()
