"""``--group-by COLUMN``: per-group aggregates, checked against an independent oracle.

What is checked, on a generated sales CSV with a few rows edited in:

* in the documented mode and in ``--stream`` mode, the merged per-group
  aggregates in ``group_results`` equal ``conftest.oracle_groups`` (the
  csv module, no pandas) on the whole file, for a group that appears in one
  chunk only, for empty cells (one "(missing)" group) and for groups
  holding rejected rows;
* the printed table has one line per group, largest total sales first;
* exactly once: a worker that holds a chunk past its lease and reports
  once the chunk is counted by another sends a duplicate result, and no
  group is counted twice;
* a numeric-looking group column keeps its values as written ("7" and
  "007" stay apart, a gap never turns 7 into "7.0"), in both modes.
"""

from __future__ import annotations

import pandas as pd
import pytest

import protocol
from conftest import assert_aggregate, db_rows, make_sales_csv, oracle_groups, parse_final, wait_for
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


def expected_groups(path, column: str) -> dict:
    """The expected per-group aggregates: ``{value or None: stats}``."""
    return oracle_groups(path, PRICE, QTY, column)


def assert_groups_match(actual: list[dict], expected: dict) -> None:
    """``actual`` (rows of ``group_aggregate``) equals ``expected``, group by group."""
    got = {row["group_value"]: row for row in actual}
    assert set(got) == set(expected)
    for value, want in expected.items():
        assert_aggregate(got[value], want)


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
def test_groups_match_the_oracle(procs, sales_csv, mode_args, column):
    """Rule: the merged group aggregates equal the oracle's groups of the whole
    file (a group seen in one chunk only, the "(missing)" group of empty
    cells, rejected rows counted in their group), group rows add up to the
    global aggregate, and the printed table lists every group once, largest
    total sales first."""
    server, job_id, out = run_group_job(procs, sales_csv, column, mode_args)
    expected = expected_groups(sales_csv, column)
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
    """Rule: a chunk reported twice (its first worker held it past the lease,
    the chunk was re-leased and counted, then the first worker reported
    anyway) adds its groups once: group_results holds one set of rows per
    chunk and the merged groups still equal the oracle.

    The late worker is the test itself: it takes a chunk and sends its
    RESULT only once the steady worker has counted that chunk, so the order
    is fixed whatever the speed of the machine.  --linger 30 is a bound:
    the server leaves as soon as both have heard NO_JOB."""
    server = procs.server(sales_csv, args=["--group-by", "Region", "--chunks", CHUNKS,
                                           "--lease-timeout", "1", "--linger", "30"])
    slow = procs.client(server.port, "slow")
    late = slow.take()
    chunk = late["chunk_id"]
    steady = procs.worker(server.port, "steady")
    wait_for(lambda: db_rows(server.db, "SELECT worker_id FROM chunk_results WHERE chunk_id = ?",
                             (chunk,)) == [("steady",)], 60,
             "the steady worker to count the chunk whose lease expired")
    assert slow.send_result(late) == {"type": protocol.ACK, "chunk_id": chunk, "counted": False}
    assert slow.get_job()["type"] == protocol.NO_JOB
    slow.close()
    code, out = server.finish(60)
    assert code == 0, server.stderr()
    assert steady.wait(timeout=30) == 0
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
                            expected_groups(sales_csv, "Region"))
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


@pytest.mark.parametrize("column, role", [("Price", "price"), ("Qty", "quantity")])
def test_grouping_by_the_price_or_quantity_column_is_refused(tmp_path, column, role):
    """Attack run: --group-by Qty made every chunk of the documented mode fail 4 times
    ('column 'Qty' of the chunk is not a number column', exit 1) and worked in
    --stream. The reader keeps one reading of a column, so a column that is both a
    number and a group label is refused before the job starts, in both modes."""
    import server
    path = tmp_path / "g.csv"
    path.write_text("Region,Price,Qty\nA,2.5,2\nB,3,1\n")
    with pytest.raises(server.InputError, match=f"--group-by '{column}' is the {role} column"):
        server.inspect_csv(str(path), group_col=column)
    assert server.inspect_csv(str(path), group_col="Region").group_col == "Region"
