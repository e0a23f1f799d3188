"""Real-world sales CSVs: exact answers or clear errors, never a silently wrong number.

What this file checks (issue 5):

* Case files: every ``NAME.csv`` (or ``.csv.gz``...) with its
  ``NAME.expected.json`` in the shared folder ``conftest.SHARED_CASES`` and in
  ``tests/cases/`` (one file per fault class).  Each runs through real
  ``server.py`` and ``worker.py`` processes, in documented mode with 1-2 rows
  per chunk and in ``--stream`` mode with one record per chunk, and in-process
  through the same functions with many more chunkings.  A new case file is
  picked up without touching this file.
* The pieces: column detection, number cleaning, decimal-mark detection,
  encodings, compressed input, the early errors (exit 2, one line on stderr
  naming the file, before listening: no port file, no database rows), and
  ``server.record_boundaries`` against record starts known by construction.
* Random CSVs (hypothesis + faker) against ``conftest.oracle``: Python's
  ``csv`` module and a small number cleaner of its own, never pandas'
  parsing or ``worker.to_number``.
* One regression test per fault fixed while writing this file, each with the
  smallest input that showed the fault.

Format of a ``NAME.expected.json``:

* a result: ``total_rows``, ``total_sales``, ``min_price``, ``max_price``,
  ``avg_price`` and maybe ``rejected_rows`` (counts exactly, the rest to
  1e-9 relative, null = None);
* or an early error: ``error`` (what must happen, in words) and, in our own
  cases, ``message``: substrings the one-line error must contain;
* optional ``args`` (extra server options, e.g. ``["--encoding", "latin-1"]``),
  ``stream_error`` (substrings: ``--stream`` must refuse this input early) and
  ``note``.  A note saying "chunk size N" adds a run with ``--chunk-rows N``.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import json
import lzma
import math
import random
import re
import sqlite3
import tempfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from faker import Faker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import server
import worker
from conftest import (SHARED_CASES, Server, assert_aggregate, clean_number, oracle, parse_final,
                      wait_for)
from db_utils import ResultStore

OWN_CASES = Path(__file__).resolve().parent / "cases"
STATS = ("total_rows", "rejected_rows", "total_sales", "min_price", "max_price", "avg_price")

# Process runs.  "rows2": documented mode with two rows per chunk; "stream":
# byte ranges, at most one record per chunk.  One row per chunk is what the
# default (200 chunks) gives a file this small, and rows1 runs in-process.
SHARED_MODES = {"default": [], "rows2": ["--chunk-rows", "2"],
                "stream": ["--stream", "--chunks", "1000"]}
# Our own cases: rows1 and the default (200 chunks = one row per chunk on a
# small file) are covered in-process, which runs the very same functions.
OWN_MODES = {"rows2": ["--chunk-rows", "2"], "stream": ["--stream", "--chunks", "1000"]}
# In-process runs: server options as on the command line.
IN_PROCESS_MODES = {
    "rows1": ["--chunk-rows", "1"], "rows2": ["--chunk-rows", "2"], "rows3": ["--chunk-rows", "3"],
    "one-chunk": ["--chunks", "1"], "stream-2": ["--stream", "--chunks", "2"],
    "stream-1000": ["--stream", "--chunks", "1000", "--compress"],
}


# --- Case files ------------------------------------------------------------------

def case_files(folder: Path) -> list[Path]:
    """The data files of a case folder: all but ``*.expected.json`` and dotfiles."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(".expected.json"))


def expected_of(data: Path) -> dict:
    """The expectation of a case: ``NAME.expected.json`` next to ``NAME.csv[.gz]``."""
    path = data.parent / (data.name.split(".")[0] + ".expected.json")
    assert path.is_file(), f"case {data.name} has no {path.name}"
    return json.loads(path.read_text(encoding="utf-8"))


def case_params(folder: Path) -> list:
    """pytest parameters, one per case file, named after it; a skip if the folder is missing."""
    if not folder.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{folder} does not exist"))]
    return [pytest.param(p, id=p.name) for p in case_files(folder)]


def modes_for(expected: dict, base: dict) -> dict:
    """``base`` plus ``--chunk-rows N`` when the case's note asks for chunk size N."""
    modes = dict(base)
    wanted = re.search(r"chunk size (\d+)", expected.get("note", ""))
    if wanted:
        modes[f"rows{wanted.group(1)}"] = ["--chunk-rows", wanted.group(1)]
    return modes


def is_error_case(expected: dict) -> bool:
    return "error" in expected


def assert_stats(actual: dict, expected: dict, label: str) -> None:
    """The result keys present in ``expected`` match (see conftest.assert_aggregate)."""
    try:
        assert_aggregate(actual, {key: expected[key] for key in STATS if key in expected})
    except AssertionError as exc:
        raise AssertionError(f"{label}: {exc}") from None


# --- Running the real processes --------------------------------------------------

def database_rows(db: Path) -> int:
    """Rows in all tables of a results database (0 if the file does not exist)."""
    if not db.exists():
        return 0
    con = sqlite3.connect(db)
    try:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return sum(con.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables)
    finally:
        con.close()


def run_modes(procs, tmp_path: Path, csv_path: Path, modes: dict, extra_args=(),
              worker_args=()) -> dict:
    """Run one job per mode, all at once, with one worker each.

    Returns ``{mode: (exit code, stdout, stderr, Server)}``.  A server that
    exits before listening gets no worker; a job with no chunks may finish
    before its worker connects, so worker exit codes are not checked here
    (the ``procs`` fixture reaps them).
    """
    servers = {}
    for name, args in modes.items():
        servers[name] = Server(procs, tmp_path, csv_path, db=tmp_path / f"{name}.sqlite",
                               args=[*args, *extra_args, "--log-level", "WARNING"])

    def listening_or_gone(srv):
        if srv.port_file.exists() and srv.port_file.read_text().strip():
            return "listening"
        return "gone" if srv.proc.poll() is not None else None

    for name, srv in servers.items():
        if wait_for(lambda: listening_or_gone(srv), 60, f"server {name}") == "listening":
            procs.worker(int(srv.port_file.read_text()), f"w-{name}",
                         ["--give-up-after", "5", "--log-level", "WARNING", *worker_args])
    outcomes = {}
    for name, srv in servers.items():
        code, out = srv.finish(timeout=90)
        outcomes[name] = (code, out, srv.stderr(), srv)
    return outcomes


def assert_early_error(outcome, csv_path: Path, substrings=(), label="") -> str:
    """Exit 2, one line on stderr naming the file, no port file, no database rows."""
    code, _, stderr, srv = outcome
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, f"{label}: exit {code}, expected 2:\n{stderr}"
    assert len(lines) == 1, f"{label}: expected one line on stderr, got:\n{stderr}"
    message = lines[0]
    assert message.startswith("server.py: error: "), message
    assert str(csv_path) in message, f"{label}: the message does not name the file: {message}"
    for part in substrings:
        assert part in message, f"{label}: {part!r} missing from: {message}"
    assert not srv.port_file.exists(), f"{label}: the server listened before failing"
    assert database_rows(Path(srv.db)) == 0, f"{label}: database rows were written"
    return message


def check_outcomes(outcomes: dict, csv_path: Path, expected: dict) -> None:
    """Every mode's run meets the case's expectation."""
    for mode, outcome in outcomes.items():
        label = f"{csv_path.name} [{mode}]"
        if is_error_case(expected):
            assert_early_error(outcome, csv_path, expected.get("message", ()), label)
        elif mode.startswith("stream") and "stream_error" in expected:
            assert_early_error(outcome, csv_path, expected["stream_error"], label)
        else:
            code, out, stderr, _ = outcome
            assert code == 0, f"{label}: exit {code}:\n{stderr}"
            assert_stats(parse_final(out), expected, label)


# --- Running the same functions in this process ----------------------------------

def job_message(chunks, info: server.CsvInfo, chunk_id: int) -> dict:
    """The JOB a handler would send for ``chunk_id`` (see Handler.handle_get_job)."""
    return {"type": "JOB", "chunk_id": chunk_id, "attempt_id": chunk_id + 1,
            "format": chunks.format, "data": chunks.payload(chunk_id), "compressed": chunks.compress,
            "price_col": info.price_col, "qty_col": info.qty_col, "group_col": None,
            "sep": info.sep, "decimal": info.decimal, "encoding": info.encoding}


def run_in_process(csv_path, options=()) -> dict:
    """inspect -> chunks -> load_chunk -> compute_metrics -> the store's SQL merge.

    Exactly what the processes do, minus sockets: ``options`` are server
    command-line options.  Also checks that each chunk's metrics pass the
    server's own validation and hold every record of the chunk.  Raises
    :class:`server.InputError` where the server would exit 2.
    """
    args = server.parse_args(["--csv", str(csv_path), *options])
    info = server.inspect_csv(args.csv, args.sep, args.decimal, args.encoding,
                              args.price_col, args.qty_col, args.group_by)
    chunks = (server.StreamChunks(info, args.chunks, args.compress) if args.stream
              else server.FrameChunks(info, args.chunks, args.chunk_rows, args.compress))
    store = ResultStore(":memory:")
    try:
        chunks.start()   # the documented mode's producer: each piece parsed once, as in a job
        store.open_job("job", str(csv_path), "in-process", len(chunks))
        for chunk_id in range(len(chunks)):
            frame = worker.load_chunk(job_message(chunks, info, chunk_id))
            metrics = worker.compute_metrics(frame, info.price_col, info.qty_col, info.decimal)
            server.check_stats(f"chunk {chunk_id}", *(metrics[k] for k in (
                "rows_processed", "rejected_rows", "total_sales", "min_price", "max_price",
                "avg_price", "price_count")))
            if chunks.rows_of(chunk_id) is not None:
                assert metrics["rows_processed"] == chunks.rows_of(chunk_id)
            store.record_result("job", dict(metrics, worker_id="w", chunk_id=chunk_id,
                                            attempt_id=chunk_id + 1))
        return store.final_aggregate("job")
    finally:
        store.close()
        chunks.close()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def totals(tmp_path: Path, data: bytes, options=(), name="input.csv") -> dict:
    """The in-process aggregate of ``data`` written to a file."""
    return run_in_process(write(tmp_path, name, data), options)


def input_error(tmp_path: Path, data: bytes, options=(), name="input.csv") -> str:
    """The InputError message the server would print for ``data``."""
    with pytest.raises(server.InputError) as caught:
        totals(tmp_path, data, options, name)
    return str(caught.value)


# --- 1. The case files through the real processes --------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", case_params(SHARED_CASES))
def test_shared_case(case, procs, tmp_path):
    """Each shared case gives its expected result (or early error) in documented mode
    (default chunking, 2 rows per chunk, and a chunk size its note asks for)
    and in --stream mode with one record per chunk."""
    expected = expected_of(case)
    outcomes = run_modes(procs, tmp_path, case, modes_for(expected, SHARED_MODES),
                         expected.get("args", ()))
    check_outcomes(outcomes, case, expected)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", case_params(OWN_CASES))
def test_own_case(case, procs, tmp_path):
    """Each of our fault-class cases gives its expected result (or early error) with
    2 rows per chunk and in --stream mode with one record per chunk.  A pure error
    case runs in documented mode only: its error comes from the head check, before
    the mode matters (the in-process test covers --stream for it)."""
    expected = expected_of(case)
    modes = modes_for(expected, OWN_MODES)
    if is_error_case(expected):
        modes.pop("stream")
    outcomes = run_modes(procs, tmp_path, case, modes, expected.get("args", ()))
    check_outcomes(outcomes, case, expected)


# --- 2. The case files in-process, many chunkings --------------------------------

@pytest.mark.parametrize("case", case_params(SHARED_CASES) + case_params(OWN_CASES))
def test_case_in_process_every_chunking(case):
    """Whatever the chunking (1, 2, 3 rows per chunk, one chunk, byte ranges of
    any size, compressed payloads), every record is used or rejected once and
    the result is the expected one; error cases raise the server's InputError."""
    expected = expected_of(case)
    extra = expected.get("args", [])
    for mode, options in modes_for(expected, IN_PROCESS_MODES).items():
        label = f"{case.name} [{mode}]"
        stream_refused = mode.startswith("stream") and "stream_error" in expected
        if is_error_case(expected) or stream_refused:
            with pytest.raises(server.InputError) as caught:
                run_in_process(case, [*options, *extra])
            wanted = expected.get("stream_error" if stream_refused else "message", ())
            for part in wanted:
                assert part in str(caught.value), f"{label}: {part!r} missing: {caught.value}"
        else:
            assert_stats(run_in_process(case, [*options, *extra]), expected, label)


def test_own_cases_cover_every_fault_class():
    """tests/cases keeps one case per fault class of issues 5, 12 and 17, each with an
    expectation."""
    names = " ".join(p.name for p in case_files(OWN_CASES))
    for fault in ("bom", "header-spaces", "thousands", "currency", "semicolon", "tbd",
                  "quoted-newline", "blanks", "header-only", "empty", "latin1-with",
                  "latin1-without", "lfs", "binary", "html", "no-price", "two-price",
                  "negative", ".gz", ".zip", "crlf",
                  # issues 12 and 17
                  "surplus-empty-trailing", "header-lone-quote", "semicolon-three-decimals",
                  "semicolon-leading-zero", "encrypted-zip", "deflate64-zip", "corrupt-gzip",
                  "text-transform-encoding", "utf16-surplus"):
        assert fault in names, f"no case for {fault!r} in {OWN_CASES}"
    for path in case_files(OWN_CASES):
        expected = expected_of(path)
        assert is_error_case(expected) or set(STATS) <= set(expected), path.name


# --- 3. Column detection ---------------------------------------------------------

@pytest.mark.parametrize("header, normalized", [
    ("\ufeffPrice", "price"), (" Unit Price ", "unitprice"), ("unit_price", "unitprice"),
    ("UNIT-PRICE", "unitprice"), ("Units Sold", "unitssold"), ("Qty.", "qty"),
    ("PRICE EACH", "priceeach"), ("Quantity\t", "quantity"),
])
def test_normalize_name(header, normalized):
    """Header names are compared after dropping a BOM, spaces and punctuation, lower-cased."""
    assert worker.normalize_name(header) == normalized


def test_find_columns_is_exact_never_substring():
    """'Unit Cost', 'Total Price' or 'Quantity Returned' are never taken for a price or a
    quantity; the real columns are found whatever their spacing and case."""
    columns = ["Unit Cost", "Total Price", "Quantity Returned", " UNIT price ", "units_sold"]
    assert worker.find_columns(columns) == (" UNIT price ", "units_sold")
    with pytest.raises(worker.ColumnError) as caught:
        worker.find_columns(["Unit Cost", "Total Price", "Qty"])
    message = str(caught.value)
    assert "no price column" in message and "'Total Price'" in message and "unitprice" in message


def test_find_columns_two_matches_is_an_error_and_options_override():
    """Two price aliases are ambiguous (the message points to --price-col); --price-col
    and --qty-col choose, matching exactly or after normalisation."""
    with pytest.raises(worker.ColumnError, match="several price columns.*--price-col"):
        worker.find_columns(["Price", "Unit Price", "Qty"])
    assert worker.find_columns(["Price", "Unit Price", "Qty"], price_col="unit price") == \
        ("Unit Price", "Qty")
    assert worker.find_columns(["Cost", "Amount"], "Cost", "Amount") == ("Cost", "Amount")
    with pytest.raises(worker.ColumnError, match="--qty-col 'Pieces' is not a column"):
        worker.find_columns(["Price", "Qty"], qty_col="Pieces")


def test_missing_quantity_column_lists_columns_and_accepted_names(tmp_path):
    """No quantity column: one message with the columns found, the accepted names and
    the option to use."""
    message = input_error(tmp_path, b"Price,Amount\n2.00,3\n")
    for part in ("no quantity column", "'Price'", "'Amount'", "'unitssold'", "--qty-col"):
        assert part in message


def test_column_options_on_the_server(tmp_path):
    """--price-col/--qty-col pick columns that no alias matches, or settle two candidates."""
    data = b"Cost,Amount,Price,Unit Price\n2.00,3,9.00,1.00\n4.00,1,9.00,1.00\n"
    assert totals(tmp_path, data, ["--price-col", "Cost", "--qty-col", "Amount"])[
        "total_sales"] == pytest.approx(10.0, rel=1e-9)
    assert totals(tmp_path, data, ["--price-col", "Unit Price", "--qty-col", "Amount"])[
        "total_sales"] == pytest.approx(4.0, rel=1e-9)


# --- 4. Number cleaning ----------------------------------------------------------

@pytest.mark.parametrize("cell, decimal, value", [
    ("$1,234.50", ".", 1234.5), (" 12.50 USD ", ".", 12.5), ("€3", ".", 3.0),
    ("1'234.00", ".", 1234.0), ("1 234.5", ".", 1234.5), ("-3", ".", -3.0),
    ("1.234,50", ",", 1234.5), ("2,5", ",", 2.5), ("1.234", ",", 1234.0), ("1,234", ".", 1234.0),
    ("TBD", ".", None), ("", ".", None), ("   ", ".", None), ("1,2,3", ".", None),
    ("inf", ".", None), ("nan", ".", None), ("1e999", ".", None),
    ("1_000", ".", None), ("(12.50)", ".", None),
    ("0.125", ".", 0.125), ("0,125", ",", 0.125), ("-0.125", ".", -0.125),
    ("12", None, 12.0), ("1e3", None, 1000.0), ("TBD", None, None), ("-4", None, -4.0),
])
def test_to_number_cells(cell, decimal, value):
    """Currency, spaces, apostrophes and grouping marks are cleaned; what is still not
    a finite number becomes NaN (a rejected row), never an exception.  A leading 0
    never starts a thousands group ("0.125" is not 125 with a decimal comma)."""
    got = worker.to_number(pd.Series([cell, "1"], dtype=object), decimal).iloc[0]
    if value is None:
        assert math.isnan(got)
    else:
        assert got == pytest.approx(value, rel=1e-9)


@pytest.mark.parametrize("cell, decimal", [
    ("12,5", "."), ("0,125", "."), ("1.234,50", "."), ("1.234.567", "."),
    ("2.50", ","), ("0.125", ","), ("1,234.50", ","), ("1,234,567", ","),
    ("2.50", None), ("2,50", None), ("1.234", None), ("1,234", None), ("0.125", None),
])
def test_to_number_refuses_a_cell_against_the_mark(cell, decimal):
    """A cell that is a number only under the other decimal mark, or (with no mark
    known) whose value depends on the mark, is an error that asks for --decimal: read
    either way it could be off by a factor of 1000."""
    with pytest.raises(worker.DecimalMarkError, match="--decimal") as caught:
        worker.to_number(pd.Series(["1", cell], name="Price", dtype=object), decimal)
    assert repr(cell) in str(caught.value) and "'Price'" in str(caught.value)


def test_text_prices_are_never_multiplied_as_strings():
    """A text column ('2.50' next to 'TBD') gives 7.50 for 2.50 x 3, not '2.502.502.50'."""
    frame = pd.DataFrame({"Price": ["2.50", "TBD", "4.00"], "Quantity": [3, 1, 2]})
    metrics = worker.compute_metrics(frame)
    assert metrics["total_sales"] == pytest.approx(15.5, rel=1e-9)
    assert (metrics["rows_processed"], metrics["rejected_rows"], metrics["price_count"]) == (3, 1, 2)


@pytest.mark.parametrize("data, sep, decimal", [
    (b"Price;Quantity\n2,50;4\n", ";", ","),
    (b"Price;Quantity\n2.50;4\n", ";", "."),
    (b"Price\tQuantity\n2,50\t4\n", "\t", ","),
    (b"Price|Quantity\n1,234.50|4\n", "|", "."),
    (b"Price,Quantity\n\"2,50\",4\n", ",", ","),
    (b"Price;Quantity\n0.125;4\n1.459;2\n", ";", "."),
    (b"Price;Quantity\n12;4\n", ";", None),
])
def test_separator_and_decimal_detection(tmp_path, data, sep, decimal):
    """The separator is the most frequent of , ; TAB | in the header; the decimal mark
    is what the sampled cells show, whatever the separator (None: whole numbers only)."""
    info = server.inspect_csv(str(write(tmp_path, "x.csv", data)))
    assert (info.sep, info.decimal) == (sep, decimal)


def test_separator_and_decimal_options(tmp_path):
    """--sep and --decimal override detection ('\\t' as typed in a shell means a tab)."""
    path = write(tmp_path, "x.csv", b"Price\tQuantity\n2.50\t4\n")
    assert server.inspect_csv(str(path), sep="\\t").sep == "\t"
    semi = b"Price;Quantity\n1.500;2\n"
    assert totals(tmp_path, semi, ["--decimal", "."])["total_sales"] == pytest.approx(3.0, rel=1e-9)
    assert totals(tmp_path, semi, ["--decimal", ","])["total_sales"] == pytest.approx(3000.0, rel=1e-9)
    for sep in (";;", "§", '"', "\n"):   # pandas' fast parser takes one ASCII byte
        with pytest.raises(server.InputError, match="--sep must be one ASCII character"):
            server.inspect_csv(str(path), sep=sep)


# --- 5. Encodings, compression, early errors -------------------------------------

@pytest.mark.parametrize("options", [[], ["--stream"]])
def test_explicit_utf8_with_bom(tmp_path, options):
    """A BOM is not part of the first name even with --encoding utf-8 (pandas drops it,
    so the server must too, or --stream workers look for '\\ufeffPrice')."""
    data = b"\xef\xbb\xbfPrice,Quantity\n2.00,3\n1.00,1\n"
    info = server.inspect_csv(str(write(tmp_path, "x.csv", data)), encoding="utf-8")
    assert info.price_col == "Price"
    result = totals(tmp_path, data, ["--encoding", "utf-8", "--chunks", "2", *options])
    assert result["total_sales"] == pytest.approx(7.0, rel=1e-9)


@pytest.mark.parametrize("options", [[], ["--stream"]])
def test_other_encodings_with_the_option(tmp_path, options):
    """cp1252 and UTF-16 text are read with --encoding (UTF-16 in documented mode only:
    --stream says it cannot split it)."""
    text = "Désignation,Price,Quantity\n“Crème”,2.50,2\nThé,1.75,4\n"
    assert totals(tmp_path, text.encode("cp1252"), ["--encoding", "cp1252", *options])[
        "total_sales"] == pytest.approx(12.0, rel=1e-9)
    utf16 = ["--encoding", "utf-16", *options]
    if options:
        assert "cannot split" in input_error(tmp_path, text.encode("utf-16"), utf16)
    else:
        assert totals(tmp_path, text.encode("utf-16"), utf16)["total_sales"] == \
            pytest.approx(12.0, rel=1e-9)
    assert "--encoding utf-16" in input_error(tmp_path, text.encode("utf-16"), options)


@pytest.mark.parametrize("suffix, opener", [(".csv.bz2", bz2.open), (".csv.xz", lzma.open)])
def test_bz2_and_xz_input(tmp_path, suffix, opener):
    """.bz2 and .xz files are read in documented mode; --stream refuses them clearly."""
    path = tmp_path / f"sales{suffix}"
    with opener(path, "wb") as f:
        f.write(b"Price,Quantity\n2.00,3\n4.00,1\n")
    assert run_in_process(path, ["--chunk-rows", "1"])["total_sales"] == \
        pytest.approx(10.0, rel=1e-9)
    with pytest.raises(server.InputError, match="--stream needs an uncompressed file"):
        run_in_process(path, ["--stream"])


def test_zip_with_two_files_is_refused(tmp_path):
    """A .zip must hold exactly one file; otherwise which one to read is a guess."""
    path = tmp_path / "two.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.csv", "Price,Quantity\n1,1\n")
        archive.writestr("b.csv", "Price,Quantity\n2,2\n")
    with pytest.raises(server.InputError, match="exactly one file, found 2"):
        run_in_process(path)


@pytest.fixture(scope="module")
def latin1_far(tmp_path_factory) -> Path:
    """~300 KB of UTF-8-compatible rows, then one Latin-1 byte beyond the 256 KiB head."""
    path = tmp_path_factory.mktemp("far") / "latin1_far.csv"
    path.write_bytes(b"Price,Quantity\n" + b"1.50,2\n" * 45_000 + b"2.00,1\nCaf\xe9 1,1\n")
    return path


@pytest.mark.timeout(120)
def test_bad_byte_beyond_the_head(procs, tmp_path, latin1_far):
    """A non-UTF-8 byte beyond the inspected head: the documented mode's parser meets it
    and stops the job (exit 1) naming the chunk; --stream meets it in a worker, whose
    FAILED attempt ends the job with exit 1.  Either way the final line suggests
    --encoding, and it is said once.  With --encoding latin-1 the same file is read in
    both modes."""
    outcomes = run_modes(procs, tmp_path, latin1_far,
                         {"documented": [], "stream": ["--stream", "--chunks", "8"]},
                         ["--max-attempts", "1"])
    for mode, (code, out, stderr, _) in outcomes.items():
        final = [line for line in stderr.splitlines() if line.strip()][-1]
        assert code == 1, f"{mode}: {stderr}"
        assert final.startswith("server.py: error: job") and "not valid utf-8" in final, mode
        assert "--encoding" in final and "{'total_rows'" not in out, mode
    documented = outcomes["documented"][2]
    assert "not valid utf-8-sig in chunk" in documented.splitlines()[-1]
    assert documented.count("stopping the job") <= 1, documented
    for options in ([], ["--stream", "--chunks", "8"]):
        result = run_in_process(latin1_far, ["--encoding", "latin-1", *options])
        assert (result["total_rows"], result["rejected_rows"]) == (45_002, 1)


def test_empty_and_not_csv_inputs(tmp_path):
    """Empty files (also a BOM alone, or blank lines) and input that is plainly not CSV
    (compressed data under a .csv name, JSON, NUL bytes) are refused with a message
    that says what the file is, never 'pass --encoding' for binary data."""
    for data in (b"", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n\n", b" \n\r\n"):
        assert "empty" in input_error(tmp_path, data)
    gz = input_error(tmp_path, gzip.compress(b"Price,Quantity\n1,2\n"))
    assert "binary data" in gz and "name the file .gz" in gz and "--encoding" not in gz
    assert ".xlsx" in input_error(tmp_path, b"PK\x03\x04" + b"\x14\x00" * 20)
    assert "JSON" in input_error(tmp_path, b'[{"Price": 1, "Quantity": 2}]\n')
    assert "NUL" in input_error(tmp_path, b"Price,Quantity\n1,2\x00\n")


def test_broken_quote_beyond_the_sample_is_left_to_the_readers(tmp_path):
    """An unclosed quote after the first 200 records does not fail the head check (in
    --stream mode the worker that meets it reports a failed chunk); documented mode,
    which parses the whole file before listening, stops with one 'malformed CSV' line."""
    data = b"Price,Quantity\n" + b"1.00,2\n" * 300 + b'2.00,"3\n' + b"1.00,2\n" * 5
    info = server.inspect_csv(str(write(tmp_path, "q.csv", data)))
    assert (info.price_col, info.qty_col) == ("Price", "Quantity")
    assert "malformed CSV" in input_error(tmp_path, data)


# --- 6. Records, not lines: record_boundaries ------------------------------------

def reference_boundaries(starts: list[int], size: int, targets: list[int]) -> list[int]:
    """record_boundaries' documented rule, from record starts known by construction.

    For target t: the first record start after t (the end of the file if
    none), except that a target not past the previous answer gets that same
    answer (a record longer than a chunk becomes one large chunk).
    """
    out = []
    for t in targets:
        if out and t <= out[-1]:
            out.append(out[-1])
        else:
            out.append(min([s for s in starts if s > t] + [size]))
    return out


def test_record_boundaries_examples(tmp_path):
    """Quoted newlines, doubled quotes and CRLF never make a boundary inside a record;
    the last record may lack a line end; [0] gives the end of the header."""
    records = [b'h1,h2\r\n', b'"a\r\nb",1\r\n', b'"say ""hi""\n",2\r\n', b"plain,3"]
    data = b"".join(records)
    path = write(tmp_path, "b.csv", data)
    starts = [len(b"".join(records[:i])) for i in range(1, len(records))]
    assert server.record_boundaries(str(path), [0]) == [len(records[0])]
    for block in (1, 2, 3, 5, 64):
        targets = list(range(len(data) + 2))
        assert server.record_boundaries(str(path), targets, block) == \
            reference_boundaries(starts, len(data), targets), f"block {block}"


FIELD = st.one_of(
    st.text(alphabet="ab1 .", max_size=4),
    st.text(alphabet='ab,"\n\r ', max_size=6).map(lambda s: '"' + s.replace('"', '""') + '"'),
)


@settings(max_examples=150, deadline=None)
@given(records=st.lists(st.tuples(st.lists(FIELD, min_size=1, max_size=3),
                                  st.sampled_from(["\n", "\r\n", "\n\n"])), min_size=1, max_size=8),
       last_newline=st.booleans(), block=st.integers(1, 17), data=st.data())
def test_record_boundaries_property(records, last_newline, block, data):
    """For random records (quoted fields with commas, doubled quotes, LF and CRLF inside),
    LF or CRLF endings, blank lines, with or without a final line end, and blocks as
    small as one byte, every boundary is a true record start (or the end of the file)."""
    body, starts = b"", []
    for fields, ending in records:
        body += ",".join(fields).encode() + ending.encode()
        starts.append(len(body) - (1 if ending == "\n\n" else 0))  # a blank line is a record too
        if ending == "\n\n":
            starts.append(len(body))
    if not last_newline:
        body = body.rstrip(b"\r\n")
        starts = [s for s in starts if s < len(body)]
    targets = sorted(data.draw(st.lists(st.integers(0, len(body) + 3), max_size=12)))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.csv"
        path.write_bytes(body)
        assert server.record_boundaries(str(path), targets, block) == \
            reference_boundaries(starts, len(body), targets)


# --- 7. Random CSVs against an independent oracle --------------------------------

PRICE_WORDS = [["price"], ["unit", "price"], ["price", "each"], ["price", "per", "unit"],
               ["item", "price"], ["selling", "price"], ["sale", "price"], ["retail", "price"]]
QTY_WORDS = [["quantity"], ["qty"], ["units"], ["units", "sold"], ["quantity", "ordered"],
             ["qty", "ordered"], ["order", "quantity"], ["quantity", "sold"], ["order", "qty"]]
DECOYS = ["Unit Cost", "Total Price", "Price Change", "Quantity Returned", "Qty On Hand",
          "Order ID"]
JUNK = ["TBD", "", "  ", "N/A", "n/a", "-", "?", "call us", "1,2,3", "12..5", "inf", "NaN",
        "None", "#N/A", "1e999"]
FAKE = Faker("en_US")
def spell(words: list[str], rng: random.Random) -> str:
    """One way people write a header: any case, any joiner, stray spaces."""
    joiner = rng.choice([" ", "_", "", "-", "."])
    name = joiner.join(rng.choice([w.lower(), w.upper(), w.title()]) for w in words)
    return rng.choice(["", " "]) + name + rng.choice(["", " ", "  "])


def render_number(cents: int, decimal: str, rng: random.Random) -> str:
    """A price as a spreadsheet might write it: grouping, currency, spaces."""
    whole, frac = divmod(abs(cents), 100)
    thousands = "," if decimal == "." else "."
    digits = f"{whole:,}".replace(",", thousands) if rng.random() < 0.5 else str(whole)
    text = ("-" if cents < 0 else "") + digits + decimal + f"{frac:02d}"
    style = rng.randrange(5)
    if style == 1:
        text = rng.choice(["$", "€", "£", "$ "]) + text
    elif style == 2:
        text = text + rng.choice([" USD", " EUR", "€"])
    elif style == 3:
        text = f" {text} "
    return text


def render_quantity(qty: int, decimal: str, rng: random.Random) -> str:
    if abs(qty) >= 1000 and rng.random() < 0.5:
        return f"{qty:,}".replace(",", "," if decimal == "." else ".")
    return rng.choice(["{}", " {} ", "{}"]).format(qty)


def description(rng: random.Random) -> str:
    """Free text with the hard parts: commas, quotes, newlines."""
    FAKE.seed_instance(rng.randrange(2**32))
    return rng.choice([FAKE.catch_phrase(), FAKE.address(), f'{FAKE.word()} "{FAKE.word()}", '
                       f"{FAKE.word()}", FAKE.sentence(), ""])


def random_csv(seed: int, rows: int) -> tuple[bytes, str, str, int, int]:
    """A messy sales CSV; returns (bytes, sep, decimal, price index, quantity index)."""
    rng = random.Random(seed)
    sep, decimal = rng.choice([(",", "."), (",", "."), (";", ","), ("\t", "."), ("|", ".")])
    header = [spell(rng.choice(PRICE_WORDS), rng), spell(rng.choice(QTY_WORDS), rng),
              "Description", *rng.sample(DECOYS, rng.randrange(3))]
    order = list(range(len(header)))
    rng.shuffle(order)
    header = [header[i] for i in order]
    price_at, qty_at = order.index(0), order.index(1)
    out = io.StringIO()
    writer = csv.writer(out, delimiter=sep, lineterminator=rng.choice(["\n", "\r\n"]),
                        quoting=rng.choice([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
    writer.writerow(header)
    for _ in range(rows):
        cells = [str(rng.randrange(100000)) for _ in header]
        cells[header.index("Description")] = description(rng)
        cells[price_at] = (rng.choice(JUNK) if rng.random() < 0.15
                           else render_number(rng.randrange(1, 500_000), decimal, rng))
        cells[qty_at] = (rng.choice(JUNK) if rng.random() < 0.15
                         else render_quantity(rng.choice([rng.randrange(-5, 50),
                                                          rng.randrange(-2000, 3000)]), decimal, rng))
        writer.writerow(cells)
        if rng.random() < 0.1:
            out.write(writer.dialect.lineterminator)   # a blank line
    text = out.getvalue()
    if rng.random() < 0.3:
        text = text.rstrip("\r\n")                      # no line end after the last record
    data = text.encode()
    return (codecs.BOM_UTF8 + data if rng.random() < 0.3 else data), sep, decimal, price_at, qty_at


def test_oracle_cleaner_agrees_with_the_rendering():
    """The oracle reads back what the generator writes (else the property test proves nothing)."""
    rng = random.Random(5)
    for decimal in (".", ","):
        for cents in [1, 99, 100, 123456, 99999999, -250] + [rng.randrange(1, 10**8) for _ in range(200)]:
            assert clean_number(render_number(cents, decimal, rng), decimal) == \
                pytest.approx(cents / 100, rel=1e-9)
        for junk in JUNK:
            assert clean_number(junk, decimal) is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(0, 25), stream=st.booleans(),
       parts=st.integers(1, 40))
def test_random_csv_in_process(seed, rows, stream, parts):
    """Random messy CSVs (alias spellings, decoys, junk cells, blanks, quoted commas and
    newlines, negative quantities, CRLF, BOM, ; and decimal commas) give the oracle's
    answer through inspect, either chunker with a random chunk count, the workers'
    parsing and cleaning, and the store's merge."""
    data, sep, decimal, price_at, qty_at = random_csv(seed, rows)
    options = (["--stream", "--chunks", str(parts)] if stream
               else ["--chunk-rows", str(parts)] if parts % 2 else ["--chunks", str(parts)])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.csv"
        path.write_bytes(data)
        expected = oracle(path, price_at, qty_at, sep=sep, decimal=decimal)
        try:
            got = run_in_process(path, options)
        except server.InputError as exc:
            # A file whose sampled cells read either way ('1.621') must be this
            # error, never a guess; given the mark, the job is exact.
            assert "cannot tell the decimal mark" in str(exc), exc
            cell = str(exc).split("and '", 1)[1].split("'", 1)[0]
            assert cell.encode() in data, f"seed {seed}: {exc}"
            got = run_in_process(path, options + ["--decimal", decimal])
        assert_stats(got, expected, f"seed {seed} {options}")


@pytest.mark.slow
@pytest.mark.timeout(180)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(5, 30), chunk_rows=st.integers(1, 3))
def test_random_csv_through_processes(procs, tmp_path, seed, rows, chunk_rows):
    """A few random messy CSVs through real server and worker processes, documented mode
    with 1-3 rows per chunk and --stream with one record per chunk: the oracle's answer."""
    data, sep, decimal, price_at, qty_at = random_csv(seed, rows)
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    path = folder / "random.csv"
    path.write_bytes(data)
    expected = oracle(path, price_at, qty_at, sep=sep, decimal=decimal)
    # The mark is given: detection is the in-process test's; here, the processes.
    mark = ["--decimal", decimal]
    outcomes = run_modes(procs, folder, path, {"rows": ["--chunk-rows", str(chunk_rows)] + mark,
                                               "stream": ["--stream", "--chunks", "1000"] + mark})
    check_outcomes(outcomes, path, expected)


# --- 8. Regressions: one per fault fixed, smallest input -------------------------

def test_regression_stream_refuses_cr_only_line_ends(tmp_path):
    """Fault: --stream on a file whose lines end with a lone CR found no LF, took the
    whole file for its header and reported 0 rows.  Now it refuses; documented mode
    reads the file."""
    data = b"Price,Quantity\r2.50,4\r"
    assert "CR alone" in input_error(tmp_path, data, ["--stream"])
    assert totals(tmp_path, data)["total_sales"] == pytest.approx(10.0, rel=1e-9)


def test_regression_stream_large_chunks_gives_one_record_per_chunk(tmp_path):
    """Fault: --stream kept every chunk above ~64 bytes, so a small file was one chunk
    whatever --chunks said and chunk boundaries were never exercised.  Now a large
    --chunks cuts at every record (and never makes an empty chunk)."""
    path = write(tmp_path, "x.csv", b'Price,Quantity\n1,2\n"3",4\n5,6\n')
    chunks = server.StreamChunks(server.inspect_csv(str(path)), 1000, False)
    assert len(chunks) == 3
    assert totals(tmp_path, path.read_bytes(), ["--stream", "--chunks", "1000"])[
        "total_sales"] == pytest.approx(44.0, rel=1e-9)


@pytest.mark.parametrize("data, mark, sales", [
    (b"Price;Quantity\n2,125;1\n", ",", 2.125),   # was 2125: three decimals read as grouping
    (b"Price;Quantity\n1.234;1\n", ",", 1234.0),  # was 1.234: a European thousands mark
])
def test_regression_decimal_mark_guess(tmp_path, data, mark, sales):
    """Fault: the decimal guess counted only '2,50'-like cells, so a ';' file whose cells
    were all ambiguous ('2,125', '1.234') fell back to '.', off by 1000.  Then the
    separator decided (issue 17 found the same fault the other way round).  Now cells
    that could be read either way and nothing else are an error asking for --decimal,
    and --decimal reads them."""
    assert "pass --decimal" in input_error(tmp_path, data)
    assert totals(tmp_path, data, ["--decimal", mark])["total_sales"] == pytest.approx(sales, rel=1e-9)


def test_regression_trailing_separator_is_a_surplus_field(tmp_path):
    """Fault: a trailing ';' shifted the sample (pandas took the first field for an
    index).  Then it was read as an empty extra field and dropped, which let
    'B,1,234.50,2,' under four names through (issue 12).  Now any extra field is an
    error, empty or not."""
    message = input_error(tmp_path, b"Price;Qty\n2,50;3;\n4,00;1;\n")
    assert "more fields" in message and "2,50;3;" in message


def test_regression_repeated_price_name(tmp_path):
    """Fault: 'Price,Quantity,Price' silently used the first Price (pandas renames the
    second 'Price.1', which no alias matches).  Now it is ambiguous; --price-col chooses."""
    data = b"Price,Quantity,Price\n2.00,3,9.99\n"
    assert "several price columns" in input_error(tmp_path, data)
    assert totals(tmp_path, data, ["--price-col", "Price.1"])["total_sales"] == \
        pytest.approx(29.97, rel=1e-9)


def test_regression_bom_only_file_is_empty(tmp_path):
    """Fault: a file holding only a BOM got pandas' raw 'No columns to parse from file'."""
    assert "input CSV is empty" in input_error(tmp_path, codecs.BOM_UTF8)


def test_regression_binary_input_is_not_an_encoding_problem(tmp_path):
    """Fault: a PNG or gzip data named .csv was reported as 'not valid utf-8-sig; pass
    --encoding', which sends the user the wrong way."""
    message = input_error(tmp_path, b"\x89PNG\r\n\x1a\n")
    assert "binary data" in message and "--encoding" not in message


def test_regression_head_ending_inside_a_quoted_value(tmp_path):
    """Fault: a valid file whose inspected 256 KiB head ended inside a quoted value (long
    records with newlines) was refused as 'not CSV data (EOF inside string)'."""
    record = b'"' + b"x" * 3000 + b'\nmore",2.50,3\n'
    data = b"Description,Price,Quantity\n" + record * 150
    result = totals(tmp_path, data, ["--chunks", "4"])
    assert (result["total_rows"], result["total_sales"]) == (150, pytest.approx(1125.0, rel=1e-9))


def test_regression_truncated_gzip_is_a_clear_error(tmp_path):
    """Fault: a .gz cut short after its first 256 KiB crashed the server with a
    traceback (EOFError).  Now: one line, 'cannot read gzip data'."""
    whole = gzip.compress(b"Price,Quantity\n" + b"1.50,2\n" * 200_000)
    message = input_error(tmp_path, whole[: len(whole) // 2], name="cut.csv.gz")
    assert "cannot read gzip data" in message


def test_regression_unquoted_thousands_separator(tmp_path):
    """Fault: '1,234.50,2' under 'Price,Quantity' has an extra field; pandas' column
    selection quietly read Price=1, Quantity=234.50.  Now the file is refused, quoting
    the record; an empty extra field (a trailing separator) is refused just the same."""
    message = input_error(tmp_path, b"Price,Quantity\n1,234.50,2\n")
    assert "more fields" in message and "1,234.50,2" in message
    assert "more fields" in input_error(tmp_path, b"Price,Quantity\n2.50,4,\n1.00,3,\n")


@pytest.mark.parametrize("options", [["--chunk-rows", "1"], ["--stream", "--chunks", "100"]])
def test_regression_blank_lines_before_the_header(tmp_path, options):
    """Fault: with blank lines before the header (pandas skips them), the separator was
    guessed from the empty first line (',' instead of ';'), and --stream took the blank
    line for the header, so every chunk read its first record as column names and failed."""
    data = b"\xef\xbb\xbf\r\n\r\nPrice;Qty\r\n1,5;2\r\n4;1\r\n"
    result = totals(tmp_path, data, options)
    assert (result["total_rows"], result["total_sales"]) == (2, pytest.approx(7.0, rel=1e-9))


def test_regression_sep_typed_as_backslash_t(tmp_path):
    """Fault: --sep '\\t' (two characters from a shell) became a regex separator and the
    load failed with a message about the python engine.  Now it means a tab."""
    data = b"Price\tQuantity\n1.50\t2\n"
    assert totals(tmp_path, data, ["--sep", "\\t"])["total_sales"] == pytest.approx(3.0, rel=1e-9)


def test_regression_surplus_fields_are_an_error_in_both_readers():
    """A record with more fields than the header is an error, not a row read by
    position: pandas' usecols alone would read the unquoted `1,234.50,2` as price 1,
    quantity 234.5.  An empty extra field (a trailing separator) is one too; a
    record with fewer fields is not (its missing cells are missing values)."""
    for data in (b"Price,Quantity\n1,234.50,2\n", b"Price,Quantity\n2.5,4,\n"):
        with pytest.raises(ValueError, match="record.* has more fields than the header"):
            worker.read_columns(io.BytesIO(data), ",", ".", "utf-8-sig", ["Price", "Quantity"])
    short = worker.read_columns(io.BytesIO(b"Price,Quantity\n2.5,4\n3\n"), ",", ".",
                                "utf-8-sig", ["Price", "Quantity"])
    assert short["Price"].tolist() == [2.5, 3.0] and short["Quantity"].isna().tolist() == \
        [False, True]


def test_regression_surplus_fields_beyond_the_head(tmp_path):
    """The same record after the 256 KiB head the server inspects: documented
    mode stops the job when its parser reaches the chunk (an InputError naming
    the chunk and where it starts), --stream fails that chunk's attempt."""
    path = tmp_path / "late.csv"
    path.write_bytes(b"Price,Quantity\n" + b"1.00,1\n" * 40_000 + b"1,234.50,2\n")
    info = server.inspect_csv(str(path))
    frames = server.FrameChunks(info, 4, None, False, min_piece_bytes=0)  # parsed one by one
    try:
        for chunk_id in range(3):
            frames.payload(chunk_id)
        with pytest.raises(server.InputError, match="malformed CSV in chunk 3") as caught:
            frames.payload(3)
    finally:
        frames.close()
    first, record = map(int, re.search(r"from data record (\d+)\): data record (\d+) has more "
                                       r"fields", str(caught.value)).groups())
    assert first + record - 1 == 40_001     # the record's number in the whole file
    chunks = server.StreamChunks(info, 4, False)
    job = {"format": "csv", "data": chunks.payload(len(chunks) - 1), "price_col": "Price",
           "qty_col": "Quantity", "sep": ",", "decimal": ".", "encoding": info.encoding}
    with pytest.raises(ValueError, match="more fields than the header"):
        worker.load_chunk(job)


def test_regression_group_value_na_is_a_value():
    """Only an empty cell is a missing group: 'NA' (North America, in
    Kaggle's sales_data_sample) is a group of its own."""
    data = b"Territory,Price,Qty\nNA,1,1\n,2,1\nEMEA,3,1\n"
    frame = worker.read_columns(io.BytesIO(data), ",", ".", "utf-8-sig",
                                ["Price", "Qty", "Territory"], "Territory")
    groups = worker.compute_metrics(frame, "Price", "Qty", group_col="Territory")["groups"]
    assert sorted((g[0] or "", g[1]) for g in groups) == [("", 1), ("EMEA", 1), ("NA", 1)]


def test_regression_overflowing_total_is_a_clear_failure():
    """Finite prices and quantities can multiply past 1.8e308.  The worker says
    so (a failed attempt with the reason) instead of sending an infinite total
    that the server can only refuse."""
    frame = pd.DataFrame({"Price": [1e300, 2.0], "Qty": [1e10, 1]})
    with pytest.raises(ValueError, match="overflows"):
        worker.compute_metrics(frame, "Price", "Qty")
