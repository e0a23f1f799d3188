"""Draw a job's attempts as a Gantt chart: which worker held which chunk, when, and how it ended.

    python tools/timeline.py --db results.sqlite --out timeline.png
    python tools/timeline.py --db results.sqlite --out timeline.png --job 3f2a9c0d1e4b5a67

Every lease the server hands out is one row of the ``attempts`` table
(``db_utils.py``): ``leased_at`` and ``ended_at`` in Unix seconds, and an
``outcome``.  This tool draws one horizontal bar per attempt, from its
lease to its end, on one row per worker, coloured by outcome::

                            v
    worker-1 |[0][2][3][ 5 stalled...........][6]     5: duplicate (its result came second)
    worker-2 |[1]X      [4][ 5 ][7][8]                X: dropped (worker-2 crashed on chunk 3)
             +------------------------------------> seconds since the job's first lease

The ``v`` marks the moment a chunk was handed out again while an earlier
attempt of it was still running: worker-1's lease on chunk 5 expired, and
worker-2 got the chunk and counted it first.  An attempt with no end yet
(the job is still running, or the server was killed) is drawn up to the
last time the database knows of, hatched.  Bars shorter than 0.3 % of the
time axis are widened to that, so that a chunk done in a millisecond is
still visible; only bars wide enough for it show their chunk id.

:func:`draw_timeline` builds the figure and returns the bars it drew, in
the order of the rows it was given, so tests can check the drawing against
the data instead of against pixels.  Rendering uses matplotlib's ``Agg``
backend directly: no display, no ``pyplot`` global state.
"""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

EXIT_OK, EXIT_USAGE = 0, 2

# One colour per outcome of db_utils (the keys are its outcome strings),
# in the order the legend lists them.  "leased" means "not ended yet".
OUTCOME_COLORS = {
    "counted": "#2ca02c",      # green: this result is the one in the aggregate
    "duplicate": "#9467bd",    # purple: a result that came second, not counted
    "failed": "#d62728",       # red: the worker reported an error
    "expired": "#ff7f0e",      # orange: the lease ran out, the chunk went back
    "dropped": "#444444",      # dark grey: the connection closed (e.g. a crash)
    "interrupted": "#a0a0a0",  # light grey: the server stopped meanwhile
    "leased": "#1f77b4",       # blue: still leased when the data was read
}
OTHER_COLOR = "#e377c2"        # pink: an outcome this tool does not know
OPEN_HATCH = "///"
MIN_WIDTH = 0.003              # fraction of the time axis
LABEL_WIDTH = 0.02             # a bar this wide (fraction of the axis) shows its chunk id
RELEASE_MARKER = "v"           # where a chunk was handed out again while this attempt ran


class TimelineError(Exception):
    """The database or the job cannot be drawn; the message is one line for the user."""


# --- Reading -----------------------------------------------------------------------

def load_attempts(db_path: str, job_id: str | None = None) -> tuple[str, int, list[dict]]:
    """Read one job's attempts from a results database, without changing it.

    ``job_id`` None picks the most recent job: the one with the latest
    lease (or, for a job without attempts, the latest ``created_at``).
    Returns ``(job_id, chunk count, rows)``; each row is a dict with the
    columns of ``attempts`` (times in Unix seconds, ``ended_at`` None while
    open), in attempt order.  Raises :class:`TimelineError` for a missing
    file, a file that is not a results database, an empty one, or an
    unknown job.
    """
    if not os.path.isfile(db_path):
        raise TimelineError(f"{db_path}: no such database file")
    # Read-only by URI: a typo'd path must not create an empty database, and
    # the tool may run while a server writes the file.
    uri = Path(db_path).resolve().as_uri() + "?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise TimelineError(f"{db_path}: cannot open: {exc}") from None
    try:
        db.row_factory = sqlite3.Row
        job = _find_job(db, db_path, job_id)
        rows = db.execute("SELECT * FROM attempts WHERE job_id = ? ORDER BY attempt_id",
                          (job["job_id"],)).fetchall()
    except sqlite3.DatabaseError as exc:
        raise TimelineError(f"{db_path}: not a results database ({exc})") from None
    finally:
        db.close()
    return job["job_id"], job["chunks"], [dict(row) for row in rows]


def _find_job(db: sqlite3.Connection, db_path: str, job_id: str | None) -> sqlite3.Row:
    if job_id is not None:
        job = db.execute("SELECT job_id, chunks FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if job is None:
            known = [r[0] for r in db.execute("SELECT job_id FROM jobs ORDER BY created_at")]
            raise TimelineError(f"{db_path}: no job {job_id!r}; jobs in it: {known or 'none'}")
        return job
    job = db.execute(
        "SELECT j.job_id, j.chunks FROM jobs AS j LEFT JOIN attempts AS a USING (job_id) "
        "GROUP BY j.job_id ORDER BY MAX(COALESCE(a.leased_at, j.created_at)) DESC "
        "LIMIT 1").fetchone()
    if job is None:
        raise TimelineError(f"{db_path}: the database holds no job yet")
    return job


# --- Drawing -----------------------------------------------------------------------

def _natural_key(name: str):
    """Sort "worker-2" before "worker-10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def draw_timeline(rows: list[dict], job_id: str = "", chunks: int | None = None
                  ) -> tuple[Figure, list]:
    """Build the Gantt chart of ``rows`` (attempt dicts as :func:`load_attempts` returns).

    Returns ``(figure, bars)``: ``bars[i]`` is the matplotlib ``Rectangle``
    drawn for ``rows[i]``; its face colour is ``OUTCOME_COLORS[outcome]``
    and it is hatched when the attempt has no end.  The x axis is seconds
    since the earliest ``leased_at``; open attempts end at the latest time
    found in ``rows``.  The figure is attached to an Agg canvas, so
    ``figure.savefig("x.png")`` works without a display.
    """
    workers = sorted({row["worker_id"] for row in rows}, key=_natural_key)
    fig = Figure(figsize=(12, max(2.8, 1.6 + 0.45 * len(workers))), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    title = f"job {job_id}: {chunks if chunks is not None else '?'} chunks, {len(rows)} attempts"
    ax.set_title(title)
    ax.set_xlabel("seconds since the job's first lease")
    ax.set_ylabel("worker")
    if not rows:
        ax.text(0.5, 0.5, "no attempts yet", ha="center", va="center", transform=ax.transAxes)
        return fig, []
    start = min(row["leased_at"] for row in rows)
    last = max(max(row["leased_at"], row["ended_at"] or 0.0) for row in rows)
    span = max(last - start, 1e-9)
    lanes = {worker: lane for lane, worker in enumerate(workers)}
    lefts = [row["leased_at"] - start for row in rows]
    widths = [max((row["ended_at"] or last) - row["leased_at"], MIN_WIDTH * span) for row in rows]
    colors = [OUTCOME_COLORS.get(row["outcome"], OTHER_COLOR) for row in rows]
    container = ax.barh([lanes[row["worker_id"]] for row in rows], widths, left=lefts,
                        height=0.6, color=colors, edgecolor="white", linewidth=0.3)
    bars = list(container.patches)
    for row, bar in zip(rows, bars):
        if row["ended_at"] is None:
            bar.set_hatch(OPEN_HATCH)
            bar.set_edgecolor("black")
    # Only bars wide enough to hold a number get one; slivers would overprint.
    ax.bar_label(container, labels=[str(row["chunk_id"]) if width >= LABEL_WIDTH * span else ""
                                    for row, width in zip(rows, widths)],
                 label_type="center", fontsize=7, color="white")
    handed_out = re_leases(rows, last)
    if handed_out:
        ax.plot([t - start for t, _ in handed_out], [lanes[w] - 0.38 for _, w in handed_out],
                RELEASE_MARKER, color="black", markersize=5, linestyle="none")
    ax.set_yticks(range(len(workers)), labels=workers)
    ax.set_ylim(-0.6, len(workers) - 0.4)
    ax.set_xlim(0, span * 1.01)
    ax.invert_yaxis()  # the first worker on top, as in a table
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=_legend_handles(rows, bool(handed_out)), loc="upper left",
              bbox_to_anchor=(1.005, 1.0), fontsize=8, title="outcome (label: chunk id)",
              title_fontsize=8)
    fig.tight_layout()
    return fig, bars


def re_leases(rows: list[dict], last: float) -> list[tuple[float, str]]:
    """``(time, worker_id)`` for each moment a chunk was leased again while
    an earlier attempt of it, on that worker, had not ended yet.

    That is what an expired lease looks like in the data: the first
    attempt's bar goes on (the worker is still busy, stalled or slow) while
    the server has already handed the chunk to someone else.  Open
    attempts count as running until ``last``.
    """
    by_chunk = {}
    for row in rows:
        by_chunk.setdefault(row["chunk_id"], []).append(row)
    marks = []
    for attempts in by_chunk.values():
        for row in attempts:
            end = row["ended_at"] if row["ended_at"] is not None else last
            marks += [(other["leased_at"], row["worker_id"]) for other in attempts
                      if row["leased_at"] < other["leased_at"] < end]
    return sorted(marks)


def _legend_handles(rows: list[dict], re_leased: bool) -> list:
    """One entry per outcome present (known ones in a fixed order), then
    "no end yet" and the re-lease marker if the chart has them."""
    present = {row["outcome"] for row in rows}
    ordered = [o for o in OUTCOME_COLORS if o in present] + sorted(present - OUTCOME_COLORS.keys())
    handles = [Patch(color=OUTCOME_COLORS.get(o, OTHER_COLOR),
                     label=f"{o} ({sum(r['outcome'] == o for r in rows)})") for o in ordered]
    if any(row["ended_at"] is None for row in rows):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch=OPEN_HATCH,
                             label="no end yet"))
    if re_leased:
        handles.append(Line2D([], [], marker=RELEASE_MARKER, color="black", linestyle="none",
                              label="chunk handed out\nagain meanwhile"))
    return handles


# --- Command line --------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--db", default="results.sqlite",
                   help="SQLite results database written by server.py (not a PostgreSQL URL)")
    p.add_argument("--out", default="timeline.png", help="PNG file to write")
    p.add_argument("--job", default=None,
                   help="job id to draw (%(default)s: the most recent job in the database)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Draw the timeline; return 0, or 2 with a one-line error."""
    args = parse_args(argv)
    try:
        job_id, chunks, rows = load_attempts(args.db, args.job)
        fig, bars = draw_timeline(rows, job_id, chunks)
        fig.savefig(args.out)
    except TimelineError as exc:
        print(f"timeline.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # e.g. the output folder does not exist
        print(f"timeline.py: error: cannot write {args.out}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    outcomes = {}
    for row in rows:
        outcomes[row["outcome"]] = outcomes.get(row["outcome"], 0) + 1
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
    print(f"wrote {args.out}: job {job_id}, {chunks} chunks, {len(bars)} attempts"
          f"{' (' + summary + ')' if summary else ''}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
