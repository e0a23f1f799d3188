"""Tests for tools/make_csv.py, the synthetic sales CSV generator."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "make_csv.py"
# pytest puts tests/ on sys.path, not the repo root that holds tools/.
sys.path.insert(0, str(REPO))

from tools import make_csv  # noqa: E402

SALES_HEADER = ("Region,Country,Item Type,Sales Channel,Order Priority,"
                "Order Date,Order ID,Ship Date,Units Sold,Unit Price,"
                "Unit Cost,Total Revenue,Total Cost,Total Profit")


def run_script(*args):
    """Run make_csv.py as a script; return the CompletedProcess."""
    return subprocess.run([sys.executable, str(SCRIPT), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def sales_2000(tmp_path_factory):
    """Path of a 2,000-row file in the default layout, made once."""
    path = tmp_path_factory.mktemp("sales") / "sales.csv"
    make_csv.write_csv(path, 2000, seed=7)
    return path


@pytest.mark.timeout(60)
def test_same_seed_gives_identical_bytes(tmp_path, monkeypatch):
    """Same rows and seed give the same bytes, also across several blocks."""
    monkeypatch.setattr(make_csv, "BLOCK_ROWS", 700)
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    make_csv.write_csv(first, 3000, seed=42)
    make_csv.write_csv(second, 3000, seed=42)
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("columns", [None, "Price,Qty"])
def test_different_seed_gives_different_bytes(tmp_path, columns):
    """Changing only the seed changes the file, in both layouts."""
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    make_csv.write_csv(first, 500, seed=1, columns=columns)
    make_csv.write_csv(second, 500, seed=2, columns=columns)
    assert first.read_bytes() != second.read_bytes()


@pytest.mark.timeout(60)
def test_sales_header(sales_2000):
    """The default layout starts with the 14 public column names in order."""
    with open(sales_2000, encoding="utf-8") as f:
        assert f.readline() == SALES_HEADER + "\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spec, header_end", [
    ("Price,Quantity", "Price,Quantity"),
    ("unit_price,QTY", "unit_price,QTY"),
    (("UnitPrice", "Units"), "UnitPrice,Units"),
])
def test_short_header_keeps_names_as_given(tmp_path, spec, header_end):
    """--columns writes Order ID,Product,Region,PRICE,QTY with PRICE and QTY
    spelled exactly as given."""
    path = tmp_path / "short.csv"
    make_csv.write_csv(path, 10, columns=spec)
    with open(path, encoding="utf-8") as f:
        assert f.readline() == "Order ID,Product,Region," + header_end + "\n"


@pytest.mark.timeout(60)
def test_read_csv_row_count(sales_2000):
    """pandas reads back exactly the requested number of rows and columns."""
    df = pd.read_csv(sales_2000)
    assert df.shape == (2000, 14)
    assert not df.isna().any().any()


@pytest.mark.timeout(60)
def test_totals_follow_the_rounding_rule(sales_2000):
    """Total Revenue = round(Units Sold * Unit Price, 2), Total Cost likewise
    with Unit Cost, and Total Profit = round(Revenue - Cost, 2), every row."""
    df = pd.read_csv(sales_2000)

    def same_money(a, b):
        # Parsed floats may differ in the last bit; 1e-6 is far below a cent.
        return np.allclose(a, b, rtol=0, atol=1e-6)

    units = df["Units Sold"]
    assert same_money(df["Total Revenue"], (units * df["Unit Price"]).round(2))
    assert same_money(df["Total Cost"], (units * df["Unit Cost"]).round(2))
    assert same_money(df["Total Profit"],
                      (df["Total Revenue"] - df["Total Cost"]).round(2))


@pytest.mark.timeout(60)
def test_sales_values_have_the_documented_form(sales_2000):
    """Money has exactly 2 decimals, dates look like 3/4/2015 (no zero
    padding), Order IDs have 9 digits, Units Sold is 1..10000, ships 0-50
    days after the order in 2010-2017, and each item has one price > cost."""
    df = pd.read_csv(sales_2000, dtype=str)
    money = ["Unit Price", "Unit Cost", "Total Revenue", "Total Cost",
             "Total Profit"]
    for column in money:
        assert df[column].str.fullmatch(r"\d+\.\d\d").all(), column
    for column in ["Order Date", "Ship Date"]:
        assert df[column].str.fullmatch(r"[1-9]\d?/[1-9]\d?/\d{4}").all()
    assert df["Order ID"].str.fullmatch(r"[1-9]\d{8}").all()

    units = df["Units Sold"].astype(int)
    assert units.between(1, 10_000).all()
    order = pd.to_datetime(df["Order Date"], format="%m/%d/%Y")
    ship = pd.to_datetime(df["Ship Date"], format="%m/%d/%Y")
    assert order.dt.year.between(2010, 2017).all()
    assert (ship - order).dt.days.between(0, 50).all()

    per_item = df.groupby("Item Type")[["Unit Price", "Unit Cost"]].nunique()
    assert (per_item == 1).all().all()
    assert set(df["Item Type"]) <= set(make_csv.ITEM_PRICES_CENTS)
    assert set(df["Region"]) <= set(make_csv.REGIONS)
    assert (df.groupby("Country")["Region"].nunique() == 1).all()
    price, cost = df["Unit Price"].astype(float), df["Unit Cost"].astype(float)
    assert (price > cost).all()


@pytest.mark.timeout(60)
def test_short_layout_values(tmp_path):
    """Short layout: price 0.50..500.00 with 2 decimals, quantity 1..100."""
    path = tmp_path / "short.csv"
    make_csv.write_csv(path, 2000, seed=3, columns="Price,Qty")
    df = pd.read_csv(path, dtype=str)
    assert df.shape == (2000, 5)
    assert df["Price"].str.fullmatch(r"\d+\.\d\d").all()
    assert df["Price"].astype(float).between(0.5, 500).all()
    assert df["Qty"].astype(int).between(1, 100).all()
    assert df["Product"].nunique() > 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spec", ["Cost,Qty", "Price,Amount", "Price",
                                  "Price,Qty,Units", "Pri ce,Qty"])
def test_bad_columns_exit_2(tmp_path, spec):
    """An unknown or malformed --columns value is an argparse error: exit
    status 2, one error line on stderr, and no output file."""
    out = tmp_path / "x.csv"
    result = run_script("--rows", "5", "--out", str(out), "--columns", spec)
    assert result.returncode == 2
    errors = [ln for ln in result.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "--columns" in errors[0]
    assert not out.exists()


@pytest.mark.timeout(60)
@settings(max_examples=50, deadline=None)
@given(st.sampled_from(make_csv.PRICE_NAMES),
       st.sampled_from(make_csv.QTY_NAMES),
       st.randoms(use_true_random=False))
def test_parse_columns_accepts_any_letter_case(price, qty, random):
    """Any letter case of an allowed name is accepted and returned as given."""
    def shuffle_case(name):
        return "".join(random.choice([c.lower(), c.upper()]) for c in name)

    price, qty = shuffle_case(price), shuffle_case(qty)
    assert make_csv.parse_columns(f"{price},{qty}") == (price, qty)


@pytest.mark.timeout(60)
def test_script_output_and_progress(tmp_path):
    """The script prints nothing on stdout; progress goes to stderr unless
    --quiet; the result equals write_csv's for the same arguments."""
    loud, quiet, direct = (tmp_path / n for n in ("l.csv", "q.csv", "d.csv"))
    result = run_script("--rows", "1000", "--seed", "5", "--out", str(loud))
    assert result.returncode == 0
    assert result.stdout == ""
    assert "1,000/1,000 rows" in result.stderr

    result = run_script("--rows", "1000", "--seed", "5", "--out", str(quiet),
                        "--quiet")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")

    make_csv.write_csv(direct, 1000, seed=5)
    assert loud.read_bytes() == quiet.read_bytes() == direct.read_bytes()


@pytest.mark.timeout(60)
def test_main_returns_zero_and_help_shows_defaults(tmp_path, capsys):
    """main() returns 0 on success; --help lists the default row count."""
    assert make_csv.main(["--rows", "3", "--out", str(tmp_path / "m.csv"),
                          "--quiet"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        make_csv.main(["--help"])
    assert exit_info.value.code == 0
    assert "(default: 100000)" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_zero_rows_gives_header_only(tmp_path):
    """rows=0 writes just the header line."""
    path = tmp_path / "empty.csv"
    make_csv.write_csv(path, 0)
    assert path.read_text(encoding="utf-8") == SALES_HEADER + "\n"


@pytest.mark.timeout(60)
def test_bad_arguments_raise_value_error(tmp_path):
    """write_csv rejects negative rows or seed and bad column names."""
    for kwargs in [{"rows": -1}, {"rows": 5, "seed": -1},
                   {"rows": 5, "columns": ("Price", "Cost")}]:
        with pytest.raises(ValueError):
            make_csv.write_csv(tmp_path / "bad.csv", **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(60)
def test_crash_leaves_no_file(tmp_path, monkeypatch):
    """If writing fails half way, neither the final nor a temporary file
    is left behind, and an existing file under the final name survives."""
    def explode(columns):
        raise RuntimeError("disk on fire")

    path = tmp_path / "out.csv"
    path.write_text("old\n")
    monkeypatch.setattr(make_csv, "_csv_bytes", explode)
    with pytest.raises(RuntimeError):
        make_csv.write_csv(path, 10)
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
    assert path.read_text() == "old\n"
