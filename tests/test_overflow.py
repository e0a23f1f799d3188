"""Totals near the float limit: the same answer, or the same clear error, for any chunking.

A float holds at most about 1.8e308.  Each chunk's totals are checked by the
worker (a total past the range fails the attempt, and after --max-attempts
the job), but finite chunk totals can still add up past the range in the
final SQL sum: the job used to print ``total_sales inf`` with exit 0 for
``--chunks 2`` where ``--chunks 1`` failed clearly.  Now the final and
per-group sums are checked too, on both backends (SQLite's SUM gives inf or
NaN, PostgreSQL's raises), with the same wording.

The property test draws values on a grid, whole multiples of 2**1000, so
that every sum is exact in floating point (the multiples stay far below
2**53) and "past the range" is decided by exact integer arithmetic, never by
a rounding that depends on the order of the additions.
"""

from __future__ import annotations

import math
from contextlib import closing
from fractions import Fraction

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import worker
from db_utils import AggregateOverflow, ResultStore

WORDING = "overflows a float (prices or quantities near 1e308?)"
UNIT = 2 ** 1000          # one step of the grid; the float limit is just under 2**24 steps


# --- the example, with real processes --------------------------------------

@pytest.mark.timeout(90)
@pytest.mark.parametrize("chunks", [1, 2])
def test_regression_two_prices_of_1e308_fail_clearly_with_any_chunking(procs, tmp_path, chunks):
    """``Price,Qty`` / ``1e308,1`` / ``1e308,1``: with one chunk the chunk's own
    total overflows; with two, each chunk is finite and their sum is not.  Both
    exit 1 with the same wording, and no aggregate is printed."""
    csv = tmp_path / "huge.csv"
    csv.write_text("Price,Qty\n1e308,1\n1e308,1\n")
    server = procs.server(csv, args=["--chunks", chunks, "--max-attempts", 1])
    procs.worker(server.port, "w0")
    code, out = server.finish(60)
    assert code == 1, server.stderr()
    assert "total_rows" not in out
    last = server.stderr().splitlines()[-1]
    assert last.startswith("server.py: error:") and WORDING in last, last
    assert "Traceback" not in server.stderr()


# --- the store, on both backends ----------------------------------------------------

def _result(chunk_id: int, sales: float, mean: float, count: int = 1) -> dict:
    return {"worker_id": "w", "chunk_id": chunk_id, "attempt_id": chunk_id + 1,
            "rows_processed": count, "rejected_rows": 0, "total_sales": sales,
            "min_price": mean, "max_price": mean, "avg_price": mean, "price_count": count}


@pytest.mark.parametrize("results, message", [
    # sales past the range (SQLite: inf; PostgreSQL: "value out of range")
    ([_result(0, 1e308, 1.0), _result(1, 1e308, 1.0)], "the total of all chunks"),
    # the price sum behind avg_price: +inf and -inf give NaN, which SQLite
    # returns as NULL, as if there were no prices at all
    ([_result(0, 1.0, 1e308, 2), _result(1, 1.0, -1e308, 2)], "the total of all chunks"),
])
def test_store_refuses_a_final_sum_past_the_range(db_url, results, message):
    """Rule: final_aggregate raises AggregateOverflow instead of returning inf,
    NaN or a NULL mean, on SQLite and PostgreSQL alike."""
    with closing(ResultStore(db_url)) as store:
        store.open_job("job", "x.csv", "identity", len(results))
        for r in results:
            store.record_lease("job", r["attempt_id"], r["chunk_id"], "w", 1.0)
            assert store.record_result("job", r, [("g", *(r[k] for k in (
                "rows_processed", "rejected_rows", "total_sales", "min_price", "max_price",
                "avg_price", "price_count")))]) is True
        with pytest.raises(AggregateOverflow, match=message) as failure:
            store.final_aggregate("job")
        assert WORDING in str(failure.value)
        with pytest.raises(AggregateOverflow, match="the total of (group 'g'|a group)"):
            store.group_aggregate("job")


# --- any chunking, the same outcome ---------------------------------------------------

def _run(prices: list[int], qtys: list[int], cuts: list[int]):
    """The job in process: chunks cut at ``cuts`` -> compute_metrics -> the store.

    Prices are grid steps (``price * UNIT``), written as the text a CSV holds.
    Returns the final aggregate, or ``"error"`` where the job fails with the
    overflow message (a chunk's own totals, or their sum).
    """
    frame = pd.DataFrame({"Price": [repr(float(p * UNIT)) for p in prices],
                          "Qty": [str(q) for q in qtys]})
    bounds = [0, *cuts, len(prices)]
    with closing(ResultStore(":memory:")) as store:
        store.open_job("job", "x.csv", "identity", len(bounds) - 1)
        for chunk_id, (start, end) in enumerate(zip(bounds, bounds[1:])):
            try:
                metrics = worker.compute_metrics(frame.iloc[start:end], "Price", "Qty")
            except ValueError as exc:
                assert WORDING in str(exc)
                return "error"
            store.record_lease("job", chunk_id + 1, chunk_id, "w", 1.0)
            store.record_result("job", dict(metrics, worker_id="w", chunk_id=chunk_id,
                                            attempt_id=chunk_id + 1))
        try:
            return store.final_aggregate("job")
        except AggregateOverflow as exc:
            assert WORDING in str(exc)
            return "error"


def _exact(prices: list[int], qtys: list[int]):
    """The answer in exact integer arithmetic, or "error" past the float range."""
    try:
        sales = float(sum(p * q for p, q in zip(prices, qtys)) * UNIT)
        mean = float(Fraction(sum(prices) * UNIT, len(prices)))
        float(sum(prices) * UNIT)          # the price sum itself must fit, as in pandas
        for p, q in zip(prices, qtys):
            float(p * q * UNIT)            # and each price times quantity
    except OverflowError:
        return "error"
    return {"total_rows": len(prices), "total_sales": sales, "avg_price": mean,
            "min_price": float(min(prices) * UNIT), "max_price": float(max(prices) * UNIT)}


@st.composite
def grid_jobs(draw):
    """Rows whose totals land close to the float limit, on either side, and a chunking.

    A target ``T`` of about 2**24 grid steps is shared out among the rows by
    random weights, so that the sum of price * max(quantity, 1) is about T:
    the sales and the price sum (a quantity of 0 makes them differ) come out
    just below or just past the limit.
    """
    rows = draw(st.integers(1, 12))
    qtys = draw(st.lists(st.integers(0, 4), min_size=rows, max_size=rows))
    weights = draw(st.lists(st.integers(1, 1000), min_size=rows, max_size=rows))
    target = draw(st.integers(2 ** 24 - 2 ** 21, 2 ** 24 + 2 ** 21))
    share = sum(w * max(q, 1) for w, q in zip(weights, qtys))
    prices = [min(max(1, target * w // share), 2 ** 24 - 1) for w in weights]   # each a float
    cuts = sorted(draw(st.sets(st.integers(1, rows - 1), max_size=rows - 1))) if rows > 1 else []
    return prices, qtys, cuts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grid_jobs())
def test_totals_near_the_float_limit_are_exact_or_the_same_error_for_any_chunking(job):
    """Property: for totals near 1.8e308, one chunk and any other chunking give
    the same outcome: both the exact answer (1e-9 relative), or both the
    overflow error; never inf, NaN or a missing mean."""
    prices, qtys, cuts = job
    expected = _exact(prices, qtys)
    for chunking in ([], cuts):
        got = _run(prices, qtys, chunking)
        if expected == "error":
            assert got == "error", (chunking, got)
            continue
        assert got != "error", chunking
        assert got["total_rows"] == expected["total_rows"]
        for key in ("total_sales", "avg_price", "min_price", "max_price"):
            assert math.isfinite(got[key])
            assert got[key] == pytest.approx(expected[key], rel=1e-9), key


def test_the_grid_reaches_both_outcomes():
    """The property's inputs are not all on one side of the limit: three
    prices of 2**1022 fit (6.7e307 below the limit), a fourth quarter does not."""
    assert _exact([2 ** 22] * 3, [1] * 3)["total_sales"] == 3 * 2.0 ** 1022
    assert _run([2 ** 22] * 3, [1] * 3, [1, 2])["total_sales"] == 3 * 2.0 ** 1022
    assert _exact([2 ** 22] * 3, [1, 1, 2]) == "error"
    assert _run([2 ** 22] * 3, [1, 1, 2], [1, 2]) == "error"
