"""Exercise 1: add a metric, ``total_quantity`` (sum of the valid quantities).

A solution touches compute_metrics, the RESULT validation, the result
tables and FINAL_AGGREGATE_SQL, and keeps every other test green.
"""

import pandas as pd
import pytest

from conftest import make_sales_csv, run_job

pytestmark = pytest.mark.exercise


@pytest.mark.timeout(90)
def test_final_aggregate_has_total_quantity(procs, tmp_path):
    """The final dict gains 'total_quantity', equal to pandas' sum over valid rows."""
    csv = make_sales_csv(tmp_path / "s.csv", 20_000, seed=11)
    final, _ = run_job(procs, csv, workers=2, server_args=["--chunks", "9"])
    df = pd.read_csv(csv)
    ok = df["Unit Price"].notna() & df["Units Sold"].notna()
    assert final["total_quantity"] == pytest.approx(df.loc[ok, "Units Sold"].sum(), rel=1e-12)
