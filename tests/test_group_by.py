"""``--group-by COLUMN``: per-group aggregates, checked against pandas ``groupby``.

What is checked, on a generated sales CSV with a few rows edited in:

* in the documented mode and in ``--stream`` mode, the merged per-group
  aggregates in ``group_results`` equal a one-process pandas ``groupby`` of
  the file, for a group that appears in one chunk only, for empty cells
  (one "(missing)" group) and for groups holding rejected rows;
* the printed table has one line per group, largest total sales first;
* exactly once: a worker that stalls past its lease and reports anyway
  sends a duplicate result, and no group is counted twice;
* a numeric-looking group column keeps its values as written ("7" and
  "007" stay apart, a gap never turns 7 into "7.0"), in both modes.
"""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import db_rows, make_sales_csv, parse_final, wait_for
from db_utils import ResultStore

PRICE, QTY = "Unit Price", "Units Sold"
ROWS, CHUNKS = 2000, 4
ONLY_IN_LAST_CHUNK = {"Region": "Antarctica", "Item Type": "Souvenirs"}


@pytest.fixture(scope="module")
def sales_csv(tmp_path_factory):
    """A 2,000-row sales CSV, plus: an empty Region and an empty Item Type,
    a rejected row (price "TBD") in the middle, and three rows at the very
    end whose Region and Item Type appear nowhere else, one of them rejected
    (no quantity)."""
    path = make_sales_csv(tmp_path_factory.mktemp("groups") / "sales.csv", ROWS, seed=3)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[100, "Region"] = ""
    df.loc[700, "Item Type"] = ""
    df.loc[1200, PRICE] = "TBD"
    tail = df.iloc[:3].copy()
    for column, value in ONLY_IN_LAST_CHUNK.items():
        tail[column] = value
    tail.iloc[2, tail.columns.get_loc(QTY)] = ""
    pd.concat([df, tail], ignore_index=True).to_csv(path, index=False)
    return path


def pandas_groups(path, column: str) -> dict:
    """The expected per-group aggregates: ``{value or None: stats}``.

    Independent of worker.py: every cell is read as text, an empty group
    cell is the None group, and a row is valid when pandas can read both
    its price and its quantity as numbers.
    """
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    price = pd.to_numeric(df[PRICE], errors="coerce")
    qty = pd.to_numeric(df[QTY], errors="coerce")
    valid = price.notna() & qty.notna()
    out = {}
    for value, rows in df.groupby(column).groups.items():
        ok = valid[rows]
        p, q = price[rows][ok], qty[rows][ok]
        out[value or None] = {
            "total_rows": len(rows), "rejected_rows": int((~ok).sum()),
            "total_sales": float((p * q).sum()),
            "min_price": float(p.min()) if len(p) else None,
            "max_price": float(p.max()) if len(p) else None,
            "avg_price": float(p.mean()) if len(p) else None,
        }
    return out


def assert_groups_match(actual: list[dict], expected: dict) -> None:
    """``actual`` (rows of ``group_aggregate``) equals ``expected``: counts exactly."""
    got = {row["group_value"]: row for row in actual}
    assert set(got) == set(expected)
    for value, want in expected.items():
        for key, number in want.items():
            have = got[value][key]
            if key.endswith("rows") or number is None:
                assert have == number, f"group {value!r} {key}: {have!r} != {number!r}"
            else:
                assert have == pytest.approx(number, rel=1e-9), f"group {value!r} {key}"


def printed_groups(stdout: str, column: str) -> list[tuple[str, float]]:
    """``(name, total_sales)`` of each line of the printed --group-by table."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{column} ")
                 and line.split()[-1] == "avg_price")
    table = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        fields = line[32:].split()
        table.append((line[:32].rstrip(), float(fields[2])))
    return table


def expected_order(expected: dict) -> list[tuple[str, float]]:
    """Largest total sales first; "(missing)" for the None group; names cut
    to the table's 32 characters."""
    rows = sorted(expected.items(), key=lambda kv: (-kv[1]["total_sales"], kv[0] or ""))
    return [("(missing)" if value is None else value[:32], stats["total_sales"])
            for value, stats in rows]


def job_id_of(db: str) -> str:
    (job_id,), = db_rows(db, "SELECT job_id FROM jobs")
    return job_id


def run_group_job(procs, csv, column, mode_args=(), workers=2):
    """Run a --group-by job to the end; return (server, job_id, stdout).

    The workers' exit codes are not checked: a job of 2,000 rows can end
    before the second worker has even connected, and that worker then
    retries until --give-up-after (the procs fixture kills it).
    """
    server = procs.server(csv, args=["--group-by", column, "--chunks", CHUNKS, *mode_args])
    for i in range(workers):
        procs.worker(server.port, f"w{i}")
    code, out = server.finish(60)
    assert code == 0, server.stderr()
    return server, job_id_of(server.db), out


@pytest.mark.parametrize("mode_args, column", [
    ([], "Region"),
    (["--stream"], "Item Type"),
], ids=["documented-Region", "stream-Item Type"])
def test_groups_match_pandas(procs, sales_csv, mode_args, column):
    """Rule: the merged group aggregates equal pandas groupby on the whole
    file (a group seen in one chunk only, the "(missing)" group of empty
    cells, rejected rows counted in their group), group rows add up to the
    global aggregate, and the printed table lists every group once, largest
    total sales first."""
    server, job_id, out = run_group_job(procs, sales_csv, column, mode_args)
    expected = pandas_groups(sales_csv, column)
    assert expected[None]["total_rows"] == 1                          # the empty cell
    assert expected[ONLY_IN_LAST_CHUNK[column]]["rejected_rows"] == 1  # the row with no quantity
    assert sum(g["rejected_rows"] for g in expected.values()) == 2

    store = ResultStore(server.db)
    try:
        actual = store.group_aggregate(job_id)
    finally:
        store.close()
    assert_groups_match(actual, expected)
    only = db_rows(server.db, "SELECT DISTINCT chunk_id FROM group_results WHERE group_value = ?",
                   (ONLY_IN_LAST_CHUNK[column],))
    assert len(only) == 1, "the edited-in group should sit in one chunk"
    final = parse_final(out)
    assert final["total_rows"] == sum(g["total_rows"] for g in actual) == ROWS + 3
    assert final["total_sales"] == pytest.approx(sum(g["total_sales"] for g in actual), rel=1e-12)

    printed = printed_groups(out, column)
    want = expected_order(expected)
    assert [name for name, _ in printed] == [name for name, _ in want]
    for (_, shown), (_, total) in zip(printed, want):
        assert shown == pytest.approx(total, abs=0.006)


@pytest.mark.timeout(90)
def test_late_duplicate_does_not_double_a_group(procs, sales_csv):
    """Rule: a chunk reported twice (its first worker stalled past the lease,
    the chunk was re-leased and counted, then the first worker reported
    anyway) adds its groups once: group_results holds one set of rows per
    chunk and the merged groups still equal pandas.

    The slow worker stalls 5 s on its first chunk (lease: 1 s); the steady
    worker, started once that lease is in the database, has all the other
    chunks done and the expired one re-done within about 2 s, long before
    the slow worker wakes.  --linger 10 keeps the server up for its late
    RESULT."""
    server = procs.server(sales_csv, args=["--group-by", "Region", "--chunks", CHUNKS,
                                           "--lease-timeout", "1", "--linger", "10"])
    slow = procs.worker(server.port, "slow", ["--stall-rate", "1", "--stall-seconds", "5"])
    leased = wait_for(lambda: db_rows(server.db, "SELECT chunk_id FROM attempts "
                                        "WHERE worker_id = 'slow'"), 30, "the slow lease")
    chunk = leased[0][0]
    steady = procs.worker(server.port, "steady")
    code, out = server.finish(60)
    assert code == 0, server.stderr()
    assert slow.wait(timeout=30) == 0 and steady.wait(timeout=30) == 0
    outcomes = db_rows(server.db, "SELECT worker_id, outcome FROM attempts WHERE chunk_id = ? "
                                  "ORDER BY attempt_id", (chunk,))
    assert outcomes == [("slow", "duplicate"), ("steady", "counted")]
    assert len(db_rows(server.db, "SELECT 1 FROM worker_results WHERE chunk_id = ?", (chunk,))) == 2

    doubled = db_rows(server.db, "SELECT chunk_id, group_value FROM group_results "
                                 "GROUP BY chunk_id, group_value HAVING COUNT(*) > 1")
    assert doubled == []
    per_chunk = db_rows(server.db,
                        "SELECT g.chunk_id, SUM(g.rows_processed), c.rows_processed "
                        "FROM group_results g JOIN chunk_results c USING (job_id, chunk_id) "
                        "GROUP BY g.chunk_id")
    assert len(per_chunk) == CHUNKS and all(groups == rows for _, groups, rows in per_chunk)
    store = ResultStore(server.db)
    try:
        assert_groups_match(store.group_aggregate(job_id_of(server.db)),
                            pandas_groups(sales_csv, "Region"))
    finally:
        store.close()
    assert parse_final(out)["total_rows"] == ROWS + 3


@pytest.mark.parametrize("mode_args", [[], ["--stream"]], ids=["documented", "stream"])
def test_numeric_looking_group_values_stay_as_written(procs, tmp_path, mode_args):
    """Rule: group values are labels, read as text: "7" and "007" are two
    groups, and a gap in the column (which makes pandas guess floats) never
    turns 7 into "7.0", whichever chunk the gap is in.  Regression: both
    modes used to print "7.0"; --stream split 7 into "7" and "7.0"."""
    csv = tmp_path / "codes.csv"
    csv.write_text("Code,Price,Qty\n7,1.0,1\n7,2.0,1\n,3.0,1\n7,4.0,2\n007,5.0,1\n")
    server = procs.server(csv, args=["--group-by", "Code", "--chunks", 3, *mode_args])
    worker = procs.worker(server.port, "w0")
    code, _ = server.finish(60)
    assert code == 0, server.stderr()
    assert worker.wait(timeout=30) == 0
    store = ResultStore(server.db)
    try:
        groups = {g["group_value"]: (g["total_rows"], g["total_sales"])
                  for g in store.group_aggregate(job_id_of(server.db))}
    finally:
        store.close()
    assert groups == {"7": (3, 1.0 + 2.0 + 8.0), "007": (1, 5.0), None: (1, 3.0)}
