"""Watch a job live: chunk states, workers, rows per second, read from the results database.

    python tools/watch.py --db results.sqlite                 # live view, Ctrl-C to stop
    python tools/watch.py --db results.sqlite --once          # one plain-text snapshot
    python tools/watch.py --db postgresql://sales:pw@db:5432/sales --job 3f2a9c0d1e4b5a67

Everything shown comes from the results database that ``server.py --db``
writes (``db_utils.py``), never from the server itself, so the watcher can
start before the server, survive its crash and show what a restart picks up.
Three tables are enough::

    jobs            how many chunks the job has
    attempts        every lease: who got which chunk, when, and how it ended
    chunk_results   the result that counts for each chunk: who, how many
                    rows, when it was committed (received_at)

A chunk is in one of four states on the grid:

    .  pending   no live lease and no counted result (never leased, or its
                 lease expired or was dropped and it waits to be handed out)
    l  leased    an attempt of it is still ``leased``: a worker holds it
    c  counted   it has a row in chunk_results: its result is in the answer
    f  failed    not counted, not leased, and a worker reported an error on
                 it; the database does not store ``--max-attempts``, so this
                 is "failed for now": the server retries it until the
                 chunk's reported failures reach that number

A capital letter (``L``, ``C``, ``F``, ``P``) marks a chunk that was leased
more than once (re-leased): a lease expired, a connection dropped, a worker
reported an error, or the server was restarted meanwhile.  ``p`` is a
pending chunk that was leased once already.

One line per worker counts its attempts by outcome (see ``db_utils``:
counted, duplicate, failed, expired, dropped, interrupted), the chunk it
holds now and for how long, and when the server last heard from it: the
latest lease it asked for, or result or failure it reported.  An expiry, a
dropped connection or an interruption is the server's own conclusion, not a
message from the worker, so its time does not count as "heard from".  Rows
per second are those of the chunks committed in the last ``--window``
seconds; the ETA divides the chunks left by the recent chunks per second.

The watcher never writes.  SQLite is opened read-only (a ``mode=ro`` URI):
in WAL mode (the server's) a reader neither blocks the server nor waits
for it, and each refresh reads in one short transaction, so every
snapshot is one consistent moment.  PostgreSQL is read in a read-only
REPEATABLE READ transaction for the same reason.  :func:`make_snapshot`
turns the rows of those queries into a :class:`Snapshot` without touching
the database or the clock (``now`` is a parameter), so tests can feed it
rows and check the counts; :func:`render_text` and :func:`render_rich`
only draw a snapshot.

Exit codes: 0 after ``--once`` or Ctrl-C; 2 with one line on stderr when
``--once`` finds no database, no job or no results tables (the live view
shows such a problem on screen and keeps looking, so it can be started
before the server).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from db_utils import Outcome, is_postgres_url, mask_password  # noqa: E402

EXIT_OK, EXIT_USAGE = 0, 2

PENDING, LEASED_STATE, COUNTED_STATE, FAILED_STATE = "pending", "leased", "counted", "failed"
STATES = (PENDING, LEASED_STATE, COUNTED_STATE, FAILED_STATE)
GLYPHS = {PENDING: ".", LEASED_STATE: "l", COUNTED_STATE: "c", FAILED_STATE: "f"}
OUTCOMES = (Outcome.LEASED, Outcome.COUNTED, Outcome.DUPLICATE, Outcome.FAILED, Outcome.EXPIRED,
            Outcome.DROPPED, Outcome.INTERRUPTED)
# Outcomes a worker's own message produces (a lease asked for is "leased").
HEARD = (Outcome.LEASED, Outcome.COUNTED, Outcome.DUPLICATE, Outcome.FAILED)
# When one grid cell stands for several chunks, it shows the state that most
# needs attention: a failure first, then work in progress, then waiting work.
CELL_PRIORITY = (FAILED_STATE, LEASED_STATE, PENDING, COUNTED_STATE)


class WatchError(Exception):
    """The database or the job cannot be read; the message is one line for the user."""


# --- Reading the database ------------------------------------------------------------

LATEST_JOB_SQL = ("SELECT job_id, csv_path, chunks, created_at FROM jobs "
                  "ORDER BY created_at DESC, job_id DESC LIMIT 1")
JOB_SQL = "SELECT job_id, csv_path, chunks, created_at FROM jobs WHERE job_id = ?"
ATTEMPTS_SQL = ("SELECT attempt_id, chunk_id, worker_id, leased_at, ended_at, outcome "
                "FROM attempts WHERE job_id = ? ORDER BY attempt_id")
RESULTS_SQL = ("SELECT chunk_id, worker_id, attempt_id, rows_processed, received_at "
               "FROM chunk_results WHERE job_id = ? ORDER BY chunk_id")


class SqliteReader:
    """Reads a SQLite results database without ever writing to it.

    ``mode=ro`` also means a mistyped path is an error, not a new empty
    database.  Raises :class:`WatchError` if the file is missing or is not
    a results database.
    """

    def __init__(self, path: str):
        self.label = path
        if not os.path.isfile(path):
            raise WatchError(f"{path}: no such database file")
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        try:
            # isolation_level=None: read() writes BEGIN itself, so that the
            # three SELECTs see one snapshot and no transaction stays open
            # between refreshes (an open one would hold back checkpoints).
            self._db = sqlite3.connect(uri, uri=True, timeout=5, isolation_level=None)
        except sqlite3.Error as exc:
            raise WatchError(f"{path}: cannot open: {exc}") from None

    def read(self, job_id: str | None) -> tuple[dict, list[dict], list[dict]]:
        """One consistent read: ``(job, attempts, results)``, see :func:`read_job`."""
        try:
            self._db.execute("BEGIN")
            try:
                return read_job(self._query, self.label, job_id)
            finally:
                self._db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise WatchError(f"{self.label}: not a results database ({exc})") from None

    def _query(self, sql: str, params=()) -> list[dict]:
        cur = self._db.execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def close(self) -> None:
        self._db.close()


class PostgresReader:
    """Reads a PostgreSQL results database in read-only transactions.

    Each :meth:`read` is one REPEATABLE READ transaction, so its queries
    see one snapshot; it is rolled back afterwards (there is nothing to
    commit).  A lost connection is reopened on the next read.  Messages
    carry the URL with its password masked.
    """

    CONNECT_TIMEOUT = 5   # s
    APPLICATION_NAME = "sales-watch"   # shows in pg_stat_activity

    def __init__(self, url: str):
        self.url, self.label = url, mask_password(url)
        try:
            import psycopg
        except ImportError:
            raise WatchError(f"{self.label} is a PostgreSQL URL, but psycopg is not installed "
                             "(pip install -r requirements.txt)") from None
        self._psycopg = psycopg
        self._conn = None
        self._connect()

    def _connect(self) -> None:
        psycopg = self._psycopg
        try:
            self._conn = psycopg.connect(self.url, connect_timeout=self.CONNECT_TIMEOUT,
                                         application_name=self.APPLICATION_NAME)
            self._conn.read_only = True
            self._conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        except psycopg.Error as exc:
            raise WatchError(f"cannot open {self.label}: {' '.join(str(exc).split())}") from None

    def read(self, job_id: str | None) -> tuple[dict, list[dict], list[dict]]:
        """One consistent read: ``(job, attempts, results)``, see :func:`read_job`."""
        psycopg = self._psycopg
        try:
            if self._conn is None or self._conn.closed:
                self._connect()
            try:
                return read_job(self._query, self.label, job_id)
            finally:
                if not self._conn.closed:
                    self._conn.rollback()
        except psycopg.errors.UndefinedTable as exc:
            raise WatchError(f"{self.label}: not a results database ({exc})") from None
        except psycopg.Error as exc:
            raise WatchError(f"{self.label}: {' '.join(str(exc).split())}") from None

    def _query(self, sql: str, params=()) -> list[dict]:
        # The SQL of this module has no literal "?" or "%", so this is safe.
        cur = self._conn.execute(sql.replace("?", "%s"), params)
        names = [d.name for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def open_reader(target: str):
    """A reader for ``target``: a SQLite path or a ``postgresql://`` URL."""
    return PostgresReader(target) if is_postgres_url(target) else SqliteReader(target)


def read_job(query, label: str, job_id: str | None) -> tuple[dict, list[dict], list[dict]]:
    """The rows a snapshot is made of: ``(job, attempts, results)``.

    ``query(sql, params)`` returns rows as dicts.  ``job_id`` None picks the
    most recently created job.  ``job`` has job_id, csv_path, chunks and
    created_at; ``attempts`` the columns of :data:`ATTEMPTS_SQL`;
    ``results`` those of :data:`RESULTS_SQL`.  Raises :class:`WatchError`
    for an empty database or an unknown job.
    """
    if job_id is None:
        jobs = query(LATEST_JOB_SQL)
        if not jobs:
            raise WatchError(f"{label}: the database holds no job yet")
    else:
        jobs = query(JOB_SQL, (job_id,))
        if not jobs:
            known = [row["job_id"] for row in query("SELECT job_id FROM jobs ORDER BY created_at")]
            raise WatchError(f"{label}: no job {job_id!r}; jobs in it: {known or 'none'}")
    job = jobs[0]
    return job, query(ATTEMPTS_SQL, (job["job_id"],)), query(RESULTS_SQL, (job["job_id"],))


# --- The snapshot: a pure function of those rows ---------------------------------------

@dataclass
class WorkerLine:
    """One worker's share of the job.

    ``outcomes``: attempts of this worker by outcome.  ``counted``: its
    rows in chunk_results.  ``holding``: ``[(chunk_id, leased_at)]`` of its
    attempts still leased.  ``last_heard``: Unix time of its latest lease
    request or report (None if none).
    """
    worker_id: str
    attempts: int = 0
    counted: int = 0
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    holding: list = field(default_factory=list)
    last_heard: float | None = None


@dataclass
class Snapshot:
    """What the database says about one job at one moment (see :func:`make_snapshot`).

    ``states[i]`` is chunk i's state (one of :data:`STATES`), ``tries[i]``
    how many attempts it had.  ``counts`` maps each state to its number of
    chunks; ``re_leased`` is how many chunks had two attempts or more.
    ``outcomes`` counts all attempts by outcome.  Rates are per second over
    the last ``window`` s; ``eta`` is in seconds (None: nothing counted
    recently, so no honest estimate).  Times are Unix seconds.
    """
    job_id: str
    csv_path: str
    chunks: int
    now: float
    window: float
    states: list
    tries: list
    counts: dict
    re_leased: int
    attempts: int
    outcomes: collections.Counter
    workers: list
    rows_counted: int
    rows_per_second: float
    chunks_per_second: float
    eta: float | None
    started: float | None      # the job's first lease
    last_event: float | None   # the latest lease, end or commit of any attempt

    @property
    def finished(self) -> bool:
        """True when every chunk is counted."""
        return self.counts[COUNTED_STATE] == self.chunks


def make_snapshot(job: dict, attempts: list[dict], results: list[dict], now: float,
                  window: float = 10.0) -> Snapshot:
    """Build the :class:`Snapshot` of one job from its rows (see :func:`read_job`).

    Rules, per chunk: counted if it has a result row; else leased if an
    attempt is still ``leased``; else failed if an attempt reported
    ``failed``; else pending.  Rows and ids that do not fit the job (a chunk
    id outside ``0..chunks-1``) are ignored rather than trusted.

    Rates: rows and chunks committed in ``(now - window, now]``, divided by
    that span, shortened to the time since the first lease when the job is
    younger than ``window``.  ETA: chunks not counted / chunks per second.
    A finished job reports its average over the whole run (first lease to
    last commit) and an ETA of 0.
    """
    chunks = int(job["chunks"])
    tries = [0] * chunks
    live = [False] * chunks
    failed = [False] * chunks
    counted = [False] * chunks
    workers: dict[str, WorkerLine] = {}
    outcomes = collections.Counter()
    started = last_event = None

    def line(worker_id: str) -> WorkerLine:
        if worker_id not in workers:
            workers[worker_id] = WorkerLine(worker_id)
        return workers[worker_id]

    def later(a, b):
        return b if a is None or (b is not None and b > a) else a

    for row in attempts:
        chunk_id, outcome = row["chunk_id"], row["outcome"]
        if not 0 <= chunk_id < chunks:
            continue
        tries[chunk_id] += 1
        outcomes[outcome] += 1
        w = line(row["worker_id"])
        w.attempts += 1
        w.outcomes[outcome] += 1
        w.last_heard = later(w.last_heard, row["leased_at"])
        if outcome in HEARD:
            w.last_heard = later(w.last_heard, row["ended_at"])
        if outcome == Outcome.LEASED:
            live[chunk_id] = True
            w.holding.append((chunk_id, row["leased_at"]))
        elif outcome == Outcome.FAILED:
            failed[chunk_id] = True
        started = row["leased_at"] if started is None else min(started, row["leased_at"])
        last_event = later(later(last_event, row["leased_at"]), row["ended_at"])

    rows_counted = recent_rows = recent_chunks = 0
    last_commit = None
    for row in results:
        chunk_id = row["chunk_id"]
        if not 0 <= chunk_id < chunks or counted[chunk_id]:
            continue
        counted[chunk_id] = True
        line(row["worker_id"]).counted += 1
        rows_counted += row["rows_processed"]
        last_commit = later(last_commit, row["received_at"])
        if now - window < row["received_at"] <= now:
            recent_rows += row["rows_processed"]
            recent_chunks += 1
    last_event = later(last_event, last_commit)

    states = [COUNTED_STATE if counted[i] else LEASED_STATE if live[i]
              else FAILED_STATE if failed[i] else PENDING for i in range(chunks)]
    counts = collections.Counter(states)
    left = chunks - counts[COUNTED_STATE]
    if left == 0 and chunks and started is not None and last_commit is not None:
        span = max(last_commit - started, 1e-9)
        rows_rate, chunk_rate, eta = rows_counted / span, chunks / span, 0.0
    else:
        span = min(window, now - started) if started is not None else 0.0
        span = max(span, 1e-9)
        rows_rate, chunk_rate = recent_rows / span, recent_chunks / span
        eta = left / chunk_rate if chunk_rate > 0 else (0.0 if left == 0 else None)
    for w in workers.values():
        w.holding.sort()
    return Snapshot(
        job_id=job["job_id"], csv_path=job["csv_path"], chunks=chunks, now=now, window=window,
        states=states, tries=tries, counts={s: counts.get(s, 0) for s in STATES},
        re_leased=sum(t >= 2 for t in tries), attempts=sum(tries), outcomes=outcomes,
        workers=sorted(workers.values(), key=lambda w: _natural_key(w.worker_id)),
        rows_counted=rows_counted, rows_per_second=rows_rate, chunks_per_second=chunk_rate,
        eta=eta, started=started, last_event=last_event)


def _natural_key(name: str):
    """Sort "worker-2" before "worker-10"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", name)]


# --- Drawing ---------------------------------------------------------------------------

GRID_GROUP = 10        # cells per group, groups separated by a space
GRID_GROUPS = 5        # groups per grid line: 50 chunks a line

WORKER_COLUMNS = (     # (header, outcome counted in it)
    ("attempts", None), ("counted", Outcome.COUNTED), ("dup", Outcome.DUPLICATE),
    ("failed", Outcome.FAILED),
    ("expired", Outcome.EXPIRED), ("dropped", Outcome.DROPPED), ("interr", Outcome.INTERRUPTED))


def grid_cells(snap: Snapshot, max_cells: int) -> tuple[int, list[tuple[str, int]]]:
    """The grid as ``(chunks per cell, [(state, attempts), ...])``.

    One cell per chunk while they fit in ``max_cells``; otherwise each cell
    covers ``k`` consecutive chunks and shows the state that comes first in
    :data:`CELL_PRIORITY` among them, and the most attempts any of them had.
    """
    per_cell = max(1, -(-snap.chunks // max(1, max_cells)))
    cells = []
    for start in range(0, snap.chunks, per_cell):
        states = snap.states[start:start + per_cell]
        state = next(s for s in CELL_PRIORITY if s in states)
        cells.append((state, max(snap.tries[start:start + per_cell])))
    return per_cell, cells


def glyph(state: str, attempts: int) -> str:
    """The letter of a grid cell (see the module docstring): ``.`` for a chunk
    never leased, ``p`` for a pending one leased before, a capital letter
    for a chunk leased more than once."""
    if attempts == 0:
        return GLYPHS[PENDING]
    letter = "p" if state == PENDING else GLYPHS[state]
    return letter.upper() if attempts >= 2 else letter


def _cell_glyphs(snap: Snapshot, max_cells: int) -> tuple[int, list[tuple[str, str]]]:
    per_cell, cells = grid_cells(snap, max_cells)
    return per_cell, [(state, glyph(state, attempts)) for state, attempts in cells]


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(value), 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def summary_lines(snap: Snapshot) -> list[str]:
    """The header of a snapshot: job, chunk counts, rows and rates."""
    c = snap.counts
    eta = ("done" if snap.finished else _seconds(snap.eta) if snap.eta is not None
           else f"- (nothing counted in the last {snap.window:.0f} s)")
    rate = "average" if snap.finished else f"last {snap.window:.0f} s"
    heard = (f"; last event {_seconds(max(0.0, snap.now - snap.last_event))} ago"
             if snap.last_event is not None else "")
    by_outcome = ", ".join(f"{snap.outcomes[o]} {o}" for o in OUTCOMES if snap.outcomes[o])
    return [
        f"job {snap.job_id}  {snap.csv_path}",
        f"chunks: {snap.chunks} total, {c[COUNTED_STATE]} counted, {c[LEASED_STATE]} leased, "
        f"{c[PENDING]} pending, {c[FAILED_STATE]} failed; {snap.re_leased} re-leased",
        f"attempts: {snap.attempts}" + (f" ({by_outcome})" if by_outcome else ""),
        f"rows: {snap.rows_counted} counted; {snap.rows_per_second:.0f} rows/s, "
        f"{snap.chunks_per_second:.1f} chunks/s ({rate}); ETA {eta}{heard}",
    ]


def worker_rows(snap: Snapshot) -> tuple[list[str], list[list[str]]]:
    """The per-worker table: (headers, rows of cells as text)."""
    headers = ["worker"] + [h for h, _ in WORKER_COLUMNS] + ["holding", "last heard"]
    rows = []
    for w in snap.workers:
        cells = [w.worker_id[:24]]
        for header, outcome in WORKER_COLUMNS:
            value = w.attempts if outcome is None else w.counted if outcome == Outcome.COUNTED \
                else w.outcomes[outcome]
            cells.append(str(value))
        cells.append(", ".join(f"chunk {c} for {_seconds(max(0.0, snap.now - t))}"
                               for c, t in w.holding) or "-")
        cells.append("-" if w.last_heard is None
                     else f"{_seconds(max(0.0, snap.now - w.last_heard))} ago")
        rows.append(cells)
    return headers, rows


LEGEND = ". pending  l leased  c counted  f failed  p pending again; CAPITAL: leased more than once"


def render_text(snap: Snapshot, max_cells: int = 1000) -> str:
    """The snapshot as plain text (no escape codes): header, grid, worker table."""
    out = summary_lines(snap)
    per_cell, cells = _cell_glyphs(snap, max_cells)
    per_line = GRID_GROUP * GRID_GROUPS
    unit = "" if per_cell == 1 else f" (one cell = {per_cell} chunks)"
    out.append(f"grid{unit}: {LEGEND}")
    width = len(str(max(0, snap.chunks - 1)))
    for start in range(0, len(cells), per_line):
        line = "".join(g for _, g in cells[start:start + per_line])
        groups = " ".join(line[i:i + GRID_GROUP] for i in range(0, len(line), GRID_GROUP))
        out.append(f"  {start * per_cell:>{width}}  {groups}")
    headers, rows = worker_rows(snap)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    align = ["<"] + [">"] * len(WORKER_COLUMNS) + ["<", "<"]
    for cells_ in [headers] + rows:
        out.append("  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(cells_, align, widths))
                   .rstrip())
    if not rows:
        out.append("(no worker has taken a chunk yet)")
    return "\n".join(out) + "\n"


STYLES = {PENDING: "grey50", LEASED_STATE: "bold yellow", COUNTED_STATE: "green",
          FAILED_STATE: "bold red"}


def render_rich(snap: Snapshot, width: int = 100, height: int = 40):
    """The snapshot as a rich renderable, its grid sized to ``width`` x ``height``."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text
    header = Text("\n".join(summary_lines(snap)))
    header.stylize("bold", 0, len(summary_lines(snap)[0]))
    per_line = max(GRID_GROUP, (width - 10) // (GRID_GROUP + 1) * GRID_GROUP)
    lines_free = max(3, height - len(snap.workers) - 12)
    per_cell, cells = _cell_glyphs(snap, per_line * lines_free)
    unit = "" if per_cell == 1 else f" (one cell = {per_cell} chunks)"
    grid = Text(f"grid{unit}: ")
    for state in (PENDING, LEASED_STATE, COUNTED_STATE, FAILED_STATE):
        grid.append(f"{GLYPHS[state]} {state}  ", style=STYLES[state])
    grid.append("p pending again; CAPITAL: leased more than once\n")
    label_width = len(str(max(0, snap.chunks - 1)))
    for start in range(0, len(cells), per_line):
        grid.append(f"  {start * per_cell:>{label_width}}  ", style="dim")
        for i, (state, letter) in enumerate(cells[start:start + per_line]):
            if i and i % GRID_GROUP == 0:
                grid.append(" ")
            grid.append(letter, style=STYLES[state] + (" reverse" if letter.isupper() else ""))
        grid.append("\n")
    headers, rows = worker_rows(snap)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for i, name in enumerate(headers):
        table.add_column(name, justify="right" if 0 < i <= len(WORKER_COLUMNS) else "left")
    for w, row in zip(snap.workers, rows):
        quiet = w.last_heard is not None and not w.holding and snap.now - w.last_heard > 5
        table.add_row(*row, style="dim" if quiet else None)
    return Group(header, grid, table)


# --- Command line ----------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--db", default="results.sqlite",
                   help="results database: a SQLite file or a postgresql:// URL")
    p.add_argument("--job", default=None,
                   help="job id to watch (%(default)s: the most recently created job)")
    p.add_argument("--once", action="store_true",
                   help="print one plain-text snapshot and exit")
    p.add_argument("--interval", type=_interval, default=0.5,
                   help="seconds between refreshes of the live view (at most 1)")
    p.add_argument("--window", type=_interval_any, default=10.0,
                   help="seconds of recent commits that rows/s and the ETA are computed from")
    return p.parse_args(argv)


def _interval(text: str) -> float:
    value = float(text)
    if not 0.05 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0.05 and 1 second, got {text}")
    return value


def _interval_any(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def snapshot_of(reader, job_id: str | None, window: float) -> Snapshot:
    """Read once and build the snapshot (raises :class:`WatchError`)."""
    job, attempts, results = reader.read(job_id)
    return make_snapshot(job, attempts, results, time.time(), window)


def once(args) -> int:
    """``--once``: print one snapshot, or one error line; return the exit code."""
    try:
        reader = open_reader(args.db)
        try:
            snap = snapshot_of(reader, args.job, args.window)
        finally:
            reader.close()
    except WatchError as exc:
        print(f"watch.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(render_text(snap))
    return EXIT_OK


def live(args) -> int:
    """The live view until Ctrl-C or SIGTERM; problems are shown and retried."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text
    console = Console()
    reader = None

    def frame():
        nonlocal reader
        try:
            if reader is None:
                reader = open_reader(args.db)
            snap = snapshot_of(reader, args.job, args.window)
        except WatchError as exc:
            if reader is not None:
                reader.close()
                reader = None
            return None, Text(f"waiting: {exc}\n(refreshing every {args.interval} s; "
                              "Ctrl-C to stop)")
        width, height = console.size
        return snap, render_rich(snap, width, height)

    try:
        if not console.is_terminal:
            # Piped into a file or another program: a plain snapshot per
            # refresh, separated by blank lines, instead of screen updates.
            while True:
                snap, view = frame()
                sys.stdout.write((render_text(snap) if snap else f"{view.plain}\n") + "\n")
                sys.stdout.flush()
                time.sleep(args.interval)
        with Live(frame()[1], console=console, auto_refresh=False,
                  vertical_overflow="crop") as view:
            while True:
                time.sleep(args.interval)
                view.update(frame()[1], refresh=True)
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # `watch.py | head`: the reader went away, a normal end.  Point
        # stdout at /dev/null so that Python's own flush at exit is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        if reader is not None:
            reader.close()


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """Entry point; returns the exit code (0, or 2 for an unreadable database or job)."""
    args = parse_args(argv)
    if args.once:
        return once(args)
    signal.signal(signal.SIGTERM, _stop)
    return live(args)


if __name__ == "__main__":
    sys.exit(main())
