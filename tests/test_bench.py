"""tools/bench.py and the performance changes of issue 6.

What this file checks (no test measures or asserts a time: the machine is
shared, and timings belong in tools/bench.py's report, not in a test):

* ``bench.py --json`` runs every mode once on a few thousand rows, prints
  one parseable JSON document, and every mode's answer equals the
  independent oracle (conftest.oracle: csv module, no pandas) to 1e-9;
* ``bench.compare`` flags a wrong answer: counts exactly, floats to 1e-9;
* ``--stream`` works with the default encoding (utf-8-sig), which it
  refused before;
* ``record_boundaries`` (which now skips counting quotes in quote-free
  blocks) still finds the same record starts as a plain scan;
* ``compute_metrics`` (now numpy inside) gives the answer plain Python
  computes from the result contract;
* ``worker.py --port-file`` waits for the file and stops on SIGTERM.
"""

from __future__ import annotations

import json
import math
import random
import re
import signal
import subprocess
import sys

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import server as server_mod
import worker as worker_mod
from conftest import PY, ROOT, assert_aggregate, make_sales_csv, oracle, parse_final, wait_for
from tools import bench


# --- the benchmark itself ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_json_every_mode_matches_the_oracle(tmp_path):
    """Every mode of bench.py runs once, --json parses, and each answer is the oracle's."""
    csv = make_sales_csv(tmp_path / "sales.csv", 3000, seed=3)
    out = subprocess.run(
        [PY, str(ROOT / "tools" / "bench.py"), "--csv", str(csv), "--reps", "1", "--json",
         "--chunks", "4", "--work-dir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    expected = oracle(csv, "Unit Price", "Units Sold")
    modes = report["modes"]
    assert set(modes) == set(bench.MODES)
    for mode, summary in modes.items():
        if "skipped" in summary:
            # Only a baseline whose package is absent may be left out.
            assert mode in bench.OPTIONAL_BASELINES, f"{mode} skipped: {summary['skipped']}"
            assert summary["skipped"] == bench.NOT_INSTALLED
            continue
        assert summary["exact"], f"{mode}: {summary['problems']}"
        assert_aggregate(summary["result"], expected, rel=1e-9)
        assert summary["wall_s"] > 0 and summary["cpu_s"] > 0
    for mode in bench.CLUSTER_MODES:
        # The rusage hook reported both roles, and the server counted its bytes.
        assert modes[mode]["server_rss_mib"] > 0 and modes[mode]["worker_rss_mib"] > 0
        assert modes[mode]["bytes_sent"] > 0
        assert {"inspect", "serialize", "send", "db", "wait"} <= set(modes[mode]["phases_s"])
    # --stream with the bytes sent sends the raw text, far more than two float
    # columns; zlib shrinks both; with local reads only the headers and ranges go.
    assert modes["stream-bytes"]["bytes_sent"] > modes["frame"]["bytes_sent"]
    assert modes["frame-zlib"]["bytes_sent"] < modes["frame"]["bytes_sent"]
    assert modes["stream-zlib"]["bytes_sent"] < modes["stream-bytes"]["bytes_sent"]
    assert modes["stream"]["bytes_sent"] < csv.stat().st_size / 20 < modes["stream-bytes"]["bytes_sent"]


# The optional baselines, each with the modules that stand for its package.
_OPTIONAL = {"duckdb": ("duckdb",), "polars": ("polars",),
             "dask": ("dask", "distributed", "pyarrow")}


def test_absent_baseline_packages_give_not_installed_rows(monkeypatch, tmp_path, capsys):
    """With duckdb, polars, dask, distributed and pyarrow made unimportable
    (None in sys.modules is what makes ``import x`` fail), bench.main still
    runs, exits 0, reports each optional baseline as "not installed" in the
    JSON and in the table, and the remaining mode is exact."""
    for modules in _OPTIONAL.values():
        for module in modules:
            monkeypatch.setitem(sys.modules, module, None)
    assert set(_OPTIONAL) == set(bench.OPTIONAL_BASELINES)
    assert bench.missing_baselines(list(bench.MODES)) == {
        mode: bench.NOT_INSTALLED for mode in _OPTIONAL}
    csv = tmp_path / "two.csv"
    csv.write_text("Price,Qty\n2.50,4\n1.25,2\n")
    argv = ["--csv", str(csv), "--reps", "1", "--work-dir", str(tmp_path / "work"),
            "--only", "pandas-usecols", *_OPTIONAL]
    assert bench.main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for mode in _OPTIONAL:
        assert report["modes"][mode] == {"skipped": bench.NOT_INSTALLED}
    assert report["modes"]["pandas-usecols"]["exact"]
    assert_aggregate(report["modes"]["pandas-usecols"]["result"], {
        "total_rows": 2, "total_sales": 12.5, "min_price": 1.25, "max_price": 2.5,
        "avg_price": 1.875, "rejected_rows": 0})
    assert bench.main(argv) == 0
    table = capsys.readouterr().out
    for mode in _OPTIONAL:
        assert re.search(rf"^{mode} +not installed \(pip install -r "
                         r"tools/requirements-bench\.txt\)$", table, re.MULTILINE), table


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", sorted(_OPTIONAL))
def test_installed_baseline_equals_the_oracle(mode, tmp_path):
    """Each optional baseline that is installed gives the oracle's answer on a
    generated file and on a hand-made one with a text cell, an empty cell and
    an infinite quantity (all rejected: 5 rows, 3 rejected, 12.5 of sales)."""
    if bench.missing_baselines([mode]):
        pytest.skip(f"{mode}: {bench.NOT_INSTALLED}")
    generated = make_sales_csv(tmp_path / "sales.csv", 500, seed=8)
    dirty = tmp_path / "dirty.csv"
    dirty.write_text("Price,Qty\n2.5,4\nTBD,1\n3,inf\n1.25,2\n,3\n")
    args = bench.parse_args(["--dask-partitions", "3"])
    for path, price, qty in ((generated, "Unit Price", "Units Sold"), (dirty, "Price", "Qty")):
        data = bench.describe_input(str(path))
        out = subprocess.run(bench.mode_command(mode, data, args), cwd=ROOT,
                             capture_output=True, text=True, timeout=100)
        assert out.returncode == 0, out.stderr
        expected = oracle(path, price, qty)
        assert_aggregate(bench.parse_json_result(out.stdout), expected, rel=1e-9)
    assert expected["rejected_rows"] == 3 and expected["total_sales"] == 12.5


@pytest.mark.timeout(120)
def test_pandas_halves_bound_equals_the_oracle(tmp_path):
    """The two halves of ``pandas-halves`` hold every record once: the oracle's
    answer on a file with rejected rows (the middle byte inside a record),
    and on one with a single record (one half empty)."""
    dirty, single = tmp_path / "dirty.csv", tmp_path / "single.csv"
    dirty.write_text("Price,Qty\n2.5,4\nTBD,1\n3,inf\n1.25,2\n,3\n")
    single.write_text("Price,Qty\n2.5,4\n")
    args = bench.parse_args([])
    for path in (dirty, single):
        out = subprocess.run(bench.mode_command("pandas-halves", bench.describe_input(str(path)),
                                                args), cwd=ROOT, capture_output=True,
                             text=True, timeout=100)
        assert out.returncode == 0, out.stderr
        assert_aggregate(bench.parse_json_result(out.stdout), oracle(path, "Price", "Qty"),
                         rel=1e-9)


@pytest.mark.timeout(60)
def test_a_relative_csv_path_is_found_from_the_repository_root(tmp_path, monkeypatch):
    """``--csv sales.csv`` given from the file's own directory: every mode runs
    from the repository root, so the path they get must be absolute (a
    relative one made every mode fail and the bench end in "no answer")."""
    path = tmp_path / "dirty.csv"
    path.write_text("Price,Qty\n2.5,4\nTBD,1\n1.25,2\n")
    monkeypatch.chdir(tmp_path)
    data = bench.describe_input("dirty.csv")
    assert data.path == str(path.resolve())
    out = subprocess.run(bench.mode_command("pandas-usecols", data, bench.parse_args([])),
                         cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert bench.parse_json_result(out.stdout) == {
        "total_rows": 3, "total_sales": 12.5, "min_price": 1.25, "max_price": 2.5,
        "avg_price": 1.875, "rejected_rows": 1}


def test_cost_lines_name_the_fastest_single_process_baseline():
    """COST divides by the fastest exact single-process baseline (dask, being
    distributed, and an inexact one never count) and says whether 1 or 2
    workers get below 1.0."""
    def m(wall, exact=True):
        return {"wall_s": wall, "exact": exact}
    summary = {"workers": 2, "modes": {
        "pandas-usecols": m(2.0), "duckdb": m(1.0, exact=False), "polars": m(1.6),
        "dask": m(0.5), "frame-1w": m(4.0), "frame": m(3.2),
        "stream-1w": m(2.4), "stream": m(1.2)}}
    assert bench.cost_reference(summary["modes"]) == "polars"
    lines = [line.strip() for line in bench.cost_lines(summary)]
    assert lines[0].startswith("COST reference: polars (1.60 s)")
    assert lines[1] == ("COST frame: 1 worker 2.50x polars (2.00x pandas-usecols); 2 workers "
                        "2.00x polars (1.60x pandas-usecols) -> COST unbounded here: not below "
                        "1.0 with up to 2 worker(s)")
    assert lines[2].endswith("2 workers 0.75x polars (0.60x pandas-usecols) -> "
                             "COST = 2 worker(s)")


def test_compare_counts_exactly_and_floats_to_1e9():
    """bench.compare accepts a 1e-12 relative float difference, flags 1e-8, and any row."""
    reference = {"total_rows": 10, "total_sales": 1234.5, "min_price": 1.0, "max_price": 9.0,
                 "avg_price": 5.0, "rejected_rows": 0}
    assert bench.compare(dict(reference, total_sales=1234.5 * (1 + 1e-12)), reference) == []
    assert bench.compare(dict(reference, total_sales=1234.5 * (1 + 1e-8)), reference)
    assert bench.compare(dict(reference, total_rows=11), reference)
    assert bench.compare(dict(reference, min_price=None), reference)


def test_parse_server_log_reads_phases_and_bytes():
    """The final log line's phases and byte count are read back as numbers."""
    line = ("2026-01-01 INFO server: job abc done: 4 dispatches for 4 chunks; time per phase: "
            "inspect 0.01 s, split 0.20 s, wait 1.50 s; sent 12345 bytes")
    assert bench.parse_server_log(line) == (
        {"inspect": 0.01, "split": 0.20, "wait": 1.50}, 12345)


# --- server.py -------------------------------------------------------------------

def test_stream_mode_accepts_default_utf8_sig_encoding(procs, tmp_path):
    """--stream with no --encoding works: the default utf-8-sig encodes a newline
    as BOM + 0x0A, and the check for a one-byte newline used to refuse it."""
    csv = tmp_path / "one.csv"
    csv.write_text("Price,Qty\n2.50,4\n")
    final, _ = _run(procs, csv, ["--stream", "--chunks", "1"])
    assert_aggregate(final, oracle(csv, "Price", "Qty"))


def _run(procs, csv, server_args):
    server = procs.server(csv, args=server_args)
    worker = procs.worker(server.port, "w1")
    code, out = server.finish(60)
    assert code == 0, server.stderr()
    assert worker.wait(timeout=30) == 0
    return parse_final(out), server


def _naive_record_starts(data: bytes) -> list[int]:
    """Every offset right after a newline with an even number of quotes before it."""
    starts, quotes = [], 0
    for i, byte in enumerate(data):
        if byte == ord('"'):
            quotes += 1
        elif byte == ord("\n") and quotes % 2 == 0:
            starts.append(i + 1)
    return starts


_FIELD = st.one_of(st.sampled_from(["", "1", "2.50", "abc"]),
                   st.text(alphabet='a,"\n', max_size=6).map(
                       lambda s: '"' + s.replace('"', '""') + '"'))


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.lists(_FIELD, min_size=1, max_size=3), min_size=1, max_size=8),
       block=st.integers(1, 17), seed=st.integers(0, 1000))
def test_record_boundaries_match_a_plain_scan(tmp_path_factory, rows, block, seed):
    """With quoted newlines, doubled quotes and tiny blocks, every target maps to
    the first record start after it (or the file's end, and never before the
    previous target's), as a byte-by-byte scan says; skipping quote-free
    stretches must not change that."""
    data = "".join(",".join(row) + "\n" for row in rows).encode()
    path = tmp_path_factory.mktemp("rb") / "data.csv"
    path.write_bytes(data)
    starts = _naive_record_starts(data)
    rng = random.Random(seed)
    targets = sorted(rng.randrange(len(data) + 1) for _ in range(4))
    got = server_mod.record_boundaries(str(path), targets, block=block)
    expected = []
    for target in targets:
        if expected and target <= expected[-1]:
            expected.append(expected[-1])   # never a chunk that ends before it starts
        else:
            expected.append(next((s for s in starts if s > target), len(data)))
    assert got == expected


# --- worker.py -------------------------------------------------------------------

# Finite values are bounded so that no total can overflow (an overflow is a
# clear error, tested in test_csv_input.py); the text cells are ones whose
# value the test states itself, in _TEXT.
_TEXT = {"2.50": 2.5, "TBD": None, "": None, "1,234.50": 1234.5, "inf": None}
_VALUES = st.one_of(st.floats(min_value=-1e6, max_value=1e6),
                    st.sampled_from([math.nan, math.inf, -math.inf]),
                    st.integers(-10**6, 10**6), st.none(), st.sampled_from(sorted(_TEXT)))


def _expected_number(value) -> float | None:
    """The value a cell stands for, by the result contract: a finite number or None."""
    if value is None:
        return None
    if isinstance(value, str):
        return _TEXT[value]
    return float(value) if math.isfinite(value) else None


@settings(max_examples=100, deadline=None)
@given(prices=st.lists(_VALUES, max_size=30), qtys=st.lists(_VALUES, max_size=30))
def test_compute_metrics_equals_an_independent_computation(prices, qtys):
    """compute_metrics (numpy inside) gives what plain Python computes from
    the result contract (valid rows have a finite price and quantity), with
    no code of worker.py: counts and extremes exactly, sums to 1e-9 of the
    sum of magnitudes (summation order may differ: numpy sums pairwise,
    math.fsum exactly; Higham, "Accuracy and Stability of Numerical
    Algorithms", 2nd ed., section 4.2, bounds that difference so)."""
    n = min(len(prices), len(qtys))
    df = pd.DataFrame({"Price": pd.Series(prices[:n], dtype=object),
                       "Qty": pd.Series(qtys[:n], dtype=object)})
    pairs = [(_expected_number(p), _expected_number(q)) for p, q in zip(prices, qtys)]
    valid = [(p, q) for p, q in pairs if p is not None and q is not None]
    got = worker_mod.compute_metrics(df, "Price", "Qty")
    assert (got["rows_processed"], got["rejected_rows"], got["price_count"]) == \
        (n, n - len(valid), len(valid))
    sales = [p * q for p, q in valid]
    assert abs(got["total_sales"] - math.fsum(sales)) <= 1e-9 * math.fsum(map(abs, sales))
    if valid:
        prices_ok = [p for p, _ in valid]
        assert (got["min_price"], got["max_price"]) == (min(prices_ok), max(prices_ok))
        mean = math.fsum(prices_ok) / len(prices_ok)
        assert abs(got["avg_price"] - mean) <= 1e-9 * math.fsum(map(abs, prices_ok)) / len(valid)
    else:
        assert got["min_price"] is got["max_price"] is got["avg_price"] is None


def test_worker_waits_for_port_file_and_stops_on_sigterm(procs, tmp_path):
    """A worker given --port-file waits while the file is missing, and a SIGTERM
    then ends it at once with exit code 0 (it never connected anywhere)."""
    log_path = tmp_path / "w.log"
    with open(log_path, "w") as log:
        proc = procs.popen([PY, str(ROOT / "worker.py"), "--port-file",
                            str(tmp_path / "none.port"), "--worker-id", "w1", "--log-level", "INFO"],
                           stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: "waiting for the port file" in log_path.read_text(), 30,
             "the worker to wait for its port file")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_worker_with_port_file_finishes_the_job(procs, tmp_path):
    """A worker started with --port-file before the server exists connects once
    the server writes the file, and the job's answer is the oracle's."""
    csv = make_sales_csv(tmp_path / "s.csv", 500, seed=4)
    port_file = tmp_path / "late.port"
    with open(tmp_path / "w.log", "w") as log:
        worker = procs.popen([PY, str(ROOT / "worker.py"), "--port-file", str(port_file),
                              "--worker-id", "early", "--log-level", "WARNING"],
                             stdout=log, stderr=subprocess.STDOUT)
    server = procs.popen([PY, str(ROOT / "server.py"), "--csv", str(csv), "--port", "0",
                          "--port-file", str(port_file), "--db", str(tmp_path / "r.sqlite"),
                          "--chunks", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert worker.wait(timeout=30) == 0
    assert_aggregate(parse_final(out), oracle(csv, "Unit Price", "Units Sold"))
