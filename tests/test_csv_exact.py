"""CSV input, exact or a clear error: the faults of issues 12 and 17.

What this file checks, each against an oracle of its own (Python's csv
module, plain Python arithmetic, or a hand-computed constant):

* Records: ``worker.RecordScanner`` (and ``record_ends``,
  ``server.record_boundaries``, the reader's field check) ends records and
  counts fields exactly as the csv module does, whatever the quotes, line
  ends and block sizes.  The csv module agrees with pandas' tokenizer on
  such inputs (checked here too), so this is pandas' rule.
* Surplus fields: a record with more fields than the header is an error,
  empty or not, anywhere, in UTF-8, UTF-16 and cp1252, in both modes.
* Numbers: no piece of a number column is parsed by pandas on its own, so a
  decimal-comma file never comes out 1000 times too large; the decimal
  mark comes from the data only, and a cell that needs a mark the data did
  not show stops the job asking for --decimal.
* Headers: lone quotes, quoted separators, 100,000 columns, a 3 MB name.
* Compressed input, text transforms as --encoding, a huge --chunks: one
  line and exit 2, or a capped chunk count.

Hypothesis drives the classes of inputs, in-process through the functions
the server and workers use (``test_csv_input.run_in_process``); each item
also has a regression test with the smallest input that showed it, and
the case files in ``tests/cases`` run them through real processes.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import lzma
import math
import random
import tempfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import server
import worker
from conftest import clean_number as oracle_number
from conftest import parse_final, run_job, wait_for
from test_csv_input import (assert_early_error, assert_stats, input_error, run_in_process,
                            run_modes, totals, write)

MODES = {"documented": ["--chunk-rows", "2"], "stream": ["--stream", "--chunks", "5"]}


def outcome(path: Path, options=()) -> dict | str:
    """The in-process aggregate, or the one-line message of the error the job ends with.

    InputError is the server's exit 2; a ValueError from a worker's reader
    is a failed chunk, which ends a --stream job with exit 1 and its reason.
    """
    try:
        return run_in_process(path, list(options))
    except (server.InputError, ValueError) as exc:
        return str(exc)


def csv_records(data: bytes, sep: str) -> list[tuple[int, int, list]]:
    """The csv module's records of UTF-8 ``data``: (start offset, end offset, fields).

    Offsets are in bytes, the end just past the record's line break; a
    leading BOM is skipped, as pandas skips it.  Lines come from
    ``io.StringIO(..., newline="")``, which splits after LF, CR LF and a
    lone CR; the reader takes as many as a record needs, and ``line_num``
    says how many it took.
    """
    base = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    lines = io.StringIO(data[base:].decode(), newline="").readlines()
    offsets = [base]
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode()))
    reader = csv.reader(iter(lines), delimiter=sep)
    out, start = [], base
    for fields in reader:
        out.append((start, offsets[reader.line_num], fields))
        start = offsets[reader.line_num]
    return out


# --- 1. Records: one scanner, pandas' rules -----------------------------------------

CSV_TEXT = st.text(alphabet='ab,;"\n\r ', max_size=40)


def closed_quotes(text: str, sep: str) -> bool:
    """False if ``text`` ends inside a quoted field (pandas refuses that; the csv
    module closes it quietly): a line appended after it then lands in the field."""
    rows = list(csv.reader(io.StringIO(text + "\nZ", newline=""), delimiter=sep))
    return rows[-1] == ["Z"]


@settings(max_examples=300, deadline=None)
@given(text=CSV_TEXT, sep=st.sampled_from([",", ";"]))
def test_csv_module_and_pandas_agree(text, sep):
    """The oracle is sound: on random text with quotes in every position, CR, LF and
    spaces, the csv module and pandas' C parser split the same fields."""
    assume(closed_quotes(text, sep) and text.strip("\r\n"))
    width = 45
    rows = [r + [""] * (width - len(r)) for r in
            csv.reader(io.StringIO(text, newline=""), delimiter=sep)]
    frame = pd.read_csv(io.StringIO(text), sep=sep, header=None, names=range(width), dtype=str,
                        keep_default_na=False, skip_blank_lines=False)
    assert frame.values.tolist() == rows


@settings(max_examples=400, deadline=None)
@given(text=CSV_TEXT, sep=st.sampled_from([",", ";"]), bom=st.booleans(),
       block=st.integers(1, 9))
def test_scanner_ends_records_like_the_csv_module(text, sep, bom, block):
    """record_ends (whole data) and record_boundaries (the file in blocks as small as one
    byte) put record ends exactly where the csv module does: quotes that do not start a
    field are literal, doubled quotes, quoted CR and LF, lone CR, a leading BOM."""
    assume(closed_quotes(text, sep))
    data = (codecs.BOM_UTF8 if bom else b"") + text.encode()
    # The csv module also ends the last record at the end of the data.
    expected = [end for _, end, _ in csv_records(data, sep) if data[end - 1:end] in (b"\n", b"\r")]
    assert worker.record_ends(data, sep) == expected
    # record_boundaries cuts after LF only (a lone CR holds no LF to cut at).
    starts = [end for end in expected if data[end - 1:end] == b"\n"]
    targets = list(range(len(data) + 2))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.csv"
        path.write_bytes(data)
        got = server.record_boundaries(str(path), targets, block, sep=sep)
    want, out = [], []
    for target in targets:
        want.append(out[-1] if out and target <= out[-1] else
                    min([s for s in starts if s > target] + [len(data)]))
        out = want
    assert got == want


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=CSV_TEXT, sep=st.sampled_from([",", ";"]), block=st.integers(1, 9))
def test_field_check_counts_fields_like_the_csv_module(monkeypatch_block, text, sep, block):
    """The reader's field check, fed in blocks as small as one byte, either refuses the
    data or passes it on with a marker column added to the header; then pandas' parse
    finds a non-empty surplus field in that column.  Together they refuse the data
    exactly when the csv module finds a record (after the first non-blank one, the
    header) with more fields than the header."""
    assume(closed_quotes(text, sep))
    data = text.encode()
    records = csv_records(data, sep)
    # Blank: nothing but spaces, tabs and the line break (pandas skips such lines).
    blank = [not data[start:end].strip(b" \t\r\n") for start, end, _ in records]
    header = next((i for i, b in enumerate(blank) if not b), None)
    too_many = header is not None and any(
        len(fields) > len(records[header][2]) for _, _, fields in records[header + 1:])
    # pandas drops the first separator of a record after a blank line ended by a lone
    # CR (test_regression_pandas_cr_quirk): the reader refuses such a record too.
    too_many = too_many or header is not None and any(
        blank[i - 1] and data[records[i - 1][1] - 1:records[i - 1][1]] == b"\r"
        and data[records[i][0]:records[i][0] + 1] == sep.encode()
        for i in range(header + 2, len(records)))
    monkeypatch_block(block)
    check = worker._FieldCheck(io.BytesIO(data), sep)
    buffer = bytearray(3)
    if too_many:
        with pytest.raises((worker.TooManyFields, worker.MisreadRecord)):
            # Either the check raises, or pandas finds a value in the marker column.
            marker = check.header_marker()
            frame = pd.read_csv(check, sep=sep, dtype=str, keep_default_na=False,
                                na_values={marker: [""]}, usecols=[marker])
            if frame[marker].notna().any():
                raise worker.TooManyFields("in the marker column")
    else:
        out = b""
        while n := check.readinto(buffer):
            out += bytes(buffer[:n])
        # Passed through, with the marker column named at the end of the header.
        at = len(data) if header is None else \
            records[header][0] + len(data[records[header][0]:records[header][1]].rstrip(b"\r\n"))
        head = b"" if header is None else data[records[header][0]:at]
        assert out == data[:at] + (sep + worker.surplus_marker(head, sep)).encode() + data[at:]


@pytest.fixture
def monkeypatch_block(monkeypatch):
    """Set worker.READ_BLOCK and CHECK_BLOCK (the reader's own block sizes) for one test."""
    def set_block(size: int) -> None:
        monkeypatch.setattr(worker, "READ_BLOCK", size)
        monkeypatch.setattr(worker, "CHECK_BLOCK", size)
    return set_block


def test_regression_lone_quote_in_the_header(tmp_path):
    """Issue 17: header 'Price,Qty,Size (")' and 60,000 rows gave total_rows 0 in
    --stream (quote parity made the whole file the header) and a surplus-marker error in
    the documented mode.  A quote inside a name is a literal, as in pandas."""
    path = write(tmp_path, "q.csv", b'Price,Qty,Size (")\n' + b"1.50,2,x\n" * 60_000)
    for options in (["--stream", "--chunks", "7"], ["--chunks", "3"]):
        result = run_in_process(path, options)
        assert (result["total_rows"], result["rejected_rows"]) == (60_000, 0)
        assert result["total_sales"] == pytest.approx(180_000.0)


def test_regression_stray_quote_in_a_value_never_cuts_a_record(tmp_path):
    """A quote inside an unquoted value ('27" screen') is a literal: by quote parity the
    rest of the file looked quoted, and --stream cut inside a quoted value below."""
    data = (b'Item,Price,Qty\n27" screen,100.00,1\n' + b'"two\nlines",1.00,1\n' * 50
            + b"plain,2.00,3\n")
    for chunks in ("2", "7", "1000"):
        result = totals(tmp_path, data, ["--stream", "--chunks", chunks])
        assert (result["total_rows"], result["total_sales"]) == (52, pytest.approx(156.0))


@pytest.mark.parametrize("options", [["--stream", "--chunks", "5"], ["--chunk-rows", "1"]])
def test_regression_lines_of_spaces_before_the_header(tmp_path, options):
    """pandas skips lines of spaces and tabs before the header, like empty ones; --stream
    took such a line for the header, so every chunk read its first record as names."""
    data = b"\xef\xbb\xbf\r\n  \n\t\nPrice;Qty\r\n1,5;2\r\n4;1\r\n"
    result = totals(tmp_path, data, options)
    assert (result["total_rows"], result["total_sales"]) == (2, pytest.approx(7.0))


def test_regression_pandas_cr_quirk():
    """Found by the property test above: after a blank line ended by a lone CR, pandas'
    tokenizer drops the separator that starts the next record, so its fields shift left:
    under Price;Qty;Note the record ';5;2' (no price) reads as price 5, quantity 2.  The
    reader refuses it; with LF line ends, or no blank line, pandas reads it right."""
    data = b"Price;Qty;Note\r\r;5;2\r"
    shifted = pd.read_csv(io.BytesIO(data), sep=";", keep_default_na=False)
    assert shifted.iloc[0].tolist()[:2] == [5, 2]          # the pandas fault itself
    with pytest.raises(worker.MisreadRecord, match="blank line ended by CR"):
        worker.read_columns(io.BytesIO(data), ";", ".", "utf-8", ["Price", "Qty"])
    for fine in (b"Price;Qty;Note\r;5;2\r", b"Price;Qty;Note\n\n;5;2\n"):
        frame = worker.read_columns(io.BytesIO(fine), ";", ".", "utf-8", ["Price", "Qty"])
        assert frame["Price"].isna().all() and frame["Qty"].tolist() == [5.0]


# The pieces of messy input: numbers in both marks, text, empty and quoted fields, every
# line end, a BOM, non-ASCII and invalid UTF-8, spaces (blank lines).
READER_TOKENS = [b"1", b"2.5", b"3,75", b"-4", b"x", b"NA", b" ", b",", b";", b",,", b"\n",
                 b"\r\n", b"\r", b'"', b'""', b'"a,b"', b"\xc3\xa9", b"\xe9", b"\xff",
                 codecs.BOM_UTF8, b"\x00"]


def read_outcome(make_stream, sep, decimal, encoding, wanted, group):
    """read_columns' frame, or the type and message of the error it raises."""
    try:
        return worker.read_columns(make_stream(), sep, decimal, encoding, wanted, group)
    except (ValueError, UnicodeError) as exc:
        return type(exc), str(exc)


@settings(max_examples=400, deadline=None)
@given(sep=st.sampled_from([",", ";"]), bom=st.booleans(), group=st.booleans(),
       extra=st.sampled_from(["", "Note", "Note,", ' "Q"']),
       body=st.lists(st.sampled_from(READER_TOKENS), max_size=40),
       decimal=st.sampled_from([".", ",", None]),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "cp1252"]),
       skip=st.sampled_from([b"", b"junk\n"]))
def test_fast_path_reads_like_the_careful_path(sep, bom, group, extra, body, decimal, encoding,
                                               skip):
    """read_columns on a BytesIO (both callers pass one: the fast path, where its bulk
    checks pass) and on any other stream (the careful path, block by block) return equal
    frames, or raise the same error with the same message, on messy input: quotes,
    empty and surplus fields, CR, LF and CR LF, blank lines, BOMs, NUL, non-ASCII and
    invalid bytes, a header with a quote or a trailing separator."""
    names = ["Region", "Price", "Qty"] if group else ["Price", "Qty"]
    header = (sep.join(names) + (sep + extra if extra else "")).encode()
    data = (codecs.BOM_UTF8 if bom else b"") + header + b"\n" + b"".join(body)
    wanted = ["Price", "Qty", "Region"] if group else ["Price", "Qty"]
    region = "Region" if group else None

    def in_memory():
        stream = io.BytesIO(skip + data)
        stream.seek(len(skip))
        return stream

    def careful():
        stream = io.BufferedReader(io.BytesIO(skip + data))
        stream.seek(len(skip))
        return stream

    fast = worker._clean_in_memory(in_memory(), sep, encoding) is not None
    event("fast path" if fast else "careful path")
    got = read_outcome(in_memory, sep, decimal, encoding, wanted, region)
    want = read_outcome(careful, sep, decimal, encoding, wanted, region)
    if isinstance(want, pd.DataFrame):
        assert isinstance(got, pd.DataFrame), got
        pd.testing.assert_frame_equal(got, want)
    else:
        assert got == want


def test_clean_input_in_memory_takes_the_fast_path():
    """The clean common case (UTF-8 or ASCII in cp1252, LF or CR LF, a BOM) is read by the
    fast path, with the marker column added to the header exactly where the careful
    path's _FieldCheck adds it; an empty field, a trailing separator, a quote in the
    header, a lone CR or invalid UTF-8 sends the input to the careful path."""
    for data, encoding in [(b"Price,Qty\n1.5,2\n", "utf-8"),
                           (b"\xef\xbb\xbfPrice,Qty\r\n1.5,2\r\n2,3", "utf-8-sig"),
                           ("Région,Price,Qty\né,1,2\n".encode(), "utf-8"),
                           (b"Price,Qty\n1.5,2\n", "cp1252")]:
        head, rest, marker = worker._clean_in_memory(io.BytesIO(data), ",", encoding)
        line = data.index(b"\n") - data[:data.index(b"\n")].endswith(b"\r")
        assert marker == "surplus"
        assert head + bytes(rest) == data[:line] + b",surplus" + data[line:]
    for data, encoding in [(b"Price,Qty\n1.5,\n", "utf-8"), (b"Price,Qty\n1.5,2,", "utf-8"),
                           (b'"Price",Qty\n1.5,2\n', "utf-8"), (b"Price,Qty\r1.5,2\r", "utf-8"),
                           (b"Price,Qty\n\xe9,2\n", "utf-8"), (b"Price,Qty\n\xe9,2\n", "cp1252"),
                           (b"Price,Qty\n1,2\n", "utf-16"), (b"\nPrice,Qty\n1,2\n", "utf-8"),
                           (b"Price,Qty\n1,,2\n", "utf-8"), (b'Price,Qty\n"",2\n', "utf-8")]:
        assert worker._clean_in_memory(io.BytesIO(data), ",", encoding) is None, data
    assert worker._clean_in_memory(io.BufferedReader(io.BytesIO(b"Price,Qty\n1,2\n")), ",",
                                   "utf-8") is None


def test_fast_path_checks_utf8_across_its_blocks(monkeypatch_block):
    """The fast path validates UTF-8 a block at a time (bounded memory): a character cut
    by a block boundary is completed by the next block, and an invalid or unfinished
    one, anywhere, sends the input to the careful path, which raises its own error."""
    monkeypatch_block(3)
    good = "Price,Qty\n1,2\né,€\n".encode()
    assert worker._clean_in_memory(io.BytesIO(good), ",", "utf-8") is not None
    for bad in (good + b"\xe2\x82", good.replace("€".encode(), b"\xe2\x82x")):
        assert worker._clean_in_memory(io.BytesIO(bad), ",", "utf-8") is None
        with pytest.raises(UnicodeDecodeError):
            worker.read_columns(io.BytesIO(bad), ",", ".", "utf-8", ["Price", "Qty"])


@pytest.mark.parametrize("pattern", [b",,", b",\n", b'""', b",\r", b"\r,"])
def test_fast_path_screens_pairs_across_its_blocks(monkeypatch_block, pattern):
    """The fast path screens its blocks with one byte of overlap: a pair of bytes that
    may hide an empty surplus field sends the input to the careful path wherever it
    falls, across a block boundary too (blocks of 4 bytes here)."""
    monkeypatch_block(4)
    clean = b"Price,Qty\n" + b"1.5,2\n" * 4
    assert worker._clean_in_memory(io.BytesIO(clean), ",", "utf-8") is not None
    for at in range(len(b"Price,Qty\n"), len(clean) - 1):
        data = clean[:at] + pattern + clean[at:]
        assert worker._clean_in_memory(io.BytesIO(data), ",", "utf-8") is None, (at, data)


# --- 2. Surplus fields ------------------------------------------------------------------

def test_regression_surplus_into_an_empty_trailing_column(tmp_path):
    """Issue 12: under Product,Price,Qty,Note the record 'B,1,234.50,2,' (unquoted
    thousands mark, empty Note) was read as price 1, quantity 234.5 in both modes: the
    guard saw only a non-empty surplus in the first extra position."""
    data = b"Product,Price,Qty,Note\nA,2.00,3,x\nB,1,234.50,2,\n"
    for options in MODES.values():
        message = input_error(tmp_path, data, options)
        assert "more fields" in message and "B,1,234.50,2," in message
    # Beyond the head the documented reader and a --stream worker refuse it too.
    late = b"Product,Price,Qty,Note\n" + b"A,2.00,3,x\n" * 30_000 + b"B,1,234.50,2,\n"
    for options in ([], ["--stream", "--chunks", "9"]):
        message = outcome(write(tmp_path, "l.csv", late), options)
        assert "more fields" in message and "B,1,234.50,2," in message


@pytest.mark.parametrize("sep", [",", ";", "\t", "|", "s", "2", "_"])
@pytest.mark.parametrize("header", [b"Price,Qty", b"surplus,Price,Qty", b"Price,Qty,surplus2,surplus",
                                    b"a,surplus.1,Price", b'"sur"plus,Price', b'Price,"surplus"2',
                                    b'Price,"s"urplus,"surplu"s2'])
def test_regression_the_marker_column_is_a_name_pandas_reads_back(header, sep):
    """Every job failed under pandas 3.0 ('Usecols do not match columns ... '\\x00surplus''):
    the marker column was named with a leading NUL, which pandas 3.0's C parser reads as
    an empty name ('Unnamed: 2').  The marker is now printable, holds no separator,
    occurs nowhere in the header, and pandas reads it back as the last column."""
    header = header.replace(b",", sep.encode())
    marker = worker.surplus_marker(header, sep)
    assert marker.isprintable() and sep not in marker
    assert marker.encode() not in header.replace(b'"', b"")
    columns = pd.read_csv(io.BytesIO(header + (sep + marker + "\n").encode()), sep=sep,
                          dtype=str).columns
    assert columns[-1] == marker and marker not in columns[:-1]


def test_regression_a_column_named_surplus_is_read_and_checked(tmp_path):
    """A file whose own columns are named 'surplus' and 'surplus2' (the marker's first two
    choices): the marker becomes 'surplus3', the wanted 'surplus' column is read, and a
    record with one field too many is still refused."""
    frame = worker.read_columns(io.BytesIO(b"Price,surplus,surplus2\n2.5,4,x\n1,2,\n"), ",",
                                ".", "utf-8", ["Price", "surplus"])
    assert frame.to_dict("list") == {"Price": [2.5, 1.0], "surplus": [4.0, 2.0]}
    for data in (b"Price,surplus,surplus2\n2.5,4,x\n1,2,y,\n",
                 b"Price,surplus,surplus2\n2.5,4,x\n1,2,y,z\n"):
        for stream in (io.BytesIO(data), io.BufferedReader(io.BytesIO(data))):  # both paths
            with pytest.raises(worker.TooManyFields):
                worker.read_columns(stream, ",", ".", "utf-8", ["Price", "surplus"])


@pytest.mark.parametrize("stream", [False, True])
def test_regression_a_quoted_header_name_that_reads_as_the_marker(tmp_path, stream):
    """Attack run: pandas names the header cell '"sur"plus' 'surplus', which the
    marker then was, so pandas renamed the marker 'surplus.1' and the reader checked
    the file's own column: under '"sur"plus,Price,Qty,Note' a record with a fifth
    field past the head was read as price 1, quantity 234.5 (exit 0), and under
    'Price,Qty,"sur"plus' every record was refused."""
    options = ["--stream", "--chunks", "4"] if stream else ["--chunks", "4"]
    note = "x" * 100
    rows = [f",5.50,2,{note}\n"] * 3000
    rows[2900] = f",1,234.50,2,{note}\n"
    late = write(tmp_path, "late.csv", ('"sur"plus,Price,Qty,Note\n' + "".join(rows)).encode())
    message = outcome(late, options)
    assert isinstance(message, str) and "more fields" in message, message
    fine = write(tmp_path, "fine.csv", b'Price,Qty,"sur"plus\n' + b"5,2,a\n" * 20)
    assert_stats(outcome(fine, options), {"total_rows": 20, "rejected_rows": 0,
                                          "total_sales": 200.0, "min_price": 5.0,
                                          "max_price": 5.0, "avg_price": 5.0}, "fine.csv")


@pytest.mark.parametrize("surplus", [b"1.5,2,x", b"1.5,2,", b"1,234.50,2", b"1.5,2,,,"])
def test_regression_surplus_beyond_the_head_in_utf16(tmp_path, surplus):
    """Issue 12: with --encoding utf-16 (newline not one byte) the guard was off past
    the first 256 KiB.  The reader now transcodes such text to UTF-8 on the way in, so
    one byte-level check serves every encoding."""
    text = b"Price,Qty\n" + b"1.50,2\n" * 40_000 + surplus + b"\n" + b"1.50,2\n"
    data = text.decode().encode("utf-16")
    assert len(data) > 2 * 256 * 1024
    message = input_error(tmp_path, data, ["--encoding", "utf-16"])
    # A non-empty surplus shows in pandas' marker column, numbered; an empty one is
    # found by counting fields, and quoted.
    assert "more fields" in message
    assert "record 40001" in message or repr(surplus.decode()) in message
    clean = (b"Price,Qty\n" + b"1.50,2\n" * 40_000).decode().encode("utf-16")
    result = totals(tmp_path, clean, ["--encoding", "utf-16", "--chunks", "3"])
    assert (result["total_rows"], result["total_sales"]) == (40_000, pytest.approx(120_000.0))


CELL = st.text(alphabet="xy 1", max_size=3)


@st.composite
def surplus_tables(draw):
    """(header names, records as lists of cells, index of price, index of qty)."""
    width = draw(st.integers(2, 5))
    # Some names are the marker column's first choices, which it must then avoid.
    names = [draw(st.sampled_from([f"C{i}", f"surplus{i + 1 if i else ''}"]))
             for i in range(width)]
    price_at, qty_at = draw(st.permutations(range(width)))[:2]
    names[price_at], names[qty_at] = "Price", "Qty"
    records = []
    for _ in range(draw(st.integers(0, 12))):
        cells = [draw(CELL) for _ in range(width)]
        cells[price_at] = f"{draw(st.integers(0, 99999)) / 100:.2f}"
        cells[qty_at] = str(draw(st.integers(-5, 50)))
        kind = draw(st.sampled_from(["plain", "plain", "plain", "short", "extra"]))
        if kind == "short":
            cells = cells[:draw(st.integers(1, width - 1))]
        elif kind == "extra":
            for _ in range(draw(st.integers(1, 3))):     # empty or not, anywhere
                cells.insert(draw(st.integers(0, len(cells))), draw(st.sampled_from(["", "", "7"])))
        records.append(cells)
    return names, records, price_at, qty_at


def expected_totals(names, records, price_at, qty_at) -> dict:
    """The aggregate by plain Python; a short record's missing cells are missing values."""
    prices, sales = [], 0.0
    for cells in records:
        price = oracle_number(cells[price_at], ".") if price_at < len(cells) else None
        qty = oracle_number(cells[qty_at], ".") if qty_at < len(cells) else None
        if price is not None and qty is not None:
            prices.append(price)
            sales += price * qty
    return {"total_rows": len(records), "rejected_rows": len(records) - len(prices),
            "total_sales": sales, "min_price": min(prices, default=None),
            "max_price": max(prices, default=None),
            "avg_price": sum(prices) / len(prices) if prices else None}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(table=surplus_tables(), encoding=st.sampled_from(["utf-8", "utf-16", "cp1252"]),
       stream=st.booleans(), parts=st.integers(1, 6), head=st.sampled_from([40, 256 * 1024]),
       block=st.integers(1, 64), crlf=st.booleans())
def test_surplus_fields_anywhere_any_encoding_both_modes(monkeypatch, monkeypatch_block, table,
                                                         encoding, stream, parts, head, block,
                                                         crlf):
    """Records with extra fields (empty or not, at any position), short records and
    plain ones, in UTF-8, UTF-16 and cp1252, documented or --stream, with the head shrunk
    to 40 bytes (so the reader, not the head check, meets most records) and tiny read
    blocks: a surplus anywhere is the same clear error, otherwise the exact answer."""
    names, records, price_at, qty_at = table
    monkeypatch.setattr(server, "_HEAD_BYTES", head)
    monkeypatch_block(block)
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n" if crlf else "\n").writerows([names, *records])
    data = out.getvalue().encode(encoding)
    options = ["--decimal", ".", "--encoding", encoding,
               *(["--stream", "--chunks", str(parts)] if stream else ["--chunk-rows", str(parts)])]
    with tempfile.TemporaryDirectory() as folder:
        got = outcome(write(Path(folder), "t.csv", data), options)
    surplus = any(len(cells) > len(names) for cells in records)
    # A line of nothing but spaces is a blank line to pandas, not a record.
    records = [r for r in records if not (len(r) == 1 and r[0] and not r[0].strip(" "))]
    event("surplus" if surplus else "no surplus")
    if stream and encoding == "utf-16":     # refused, unless the head check fails first
        assert "cannot split" in got or surplus and "more fields" in got, got
    elif surplus:
        assert isinstance(got, str) and "more fields" in got, got
    else:
        assert not isinstance(got, str), got
        assert_stats(got, expected_totals(names, records, price_at, qty_at), f"{table}")


# --- 2b. Cells pandas reads as numbers on its own -------------------------------------------

@pytest.mark.parametrize("options", list(MODES.values()) + [["--stream", "--chunks", "4"]])
def test_regression_true_and_false_are_not_numbers(tmp_path, options):
    """Attack run: a chunk whose quantities were all True/False (any of pandas' spellings)
    was read as 1.0 and 0.0, exit 0 (pandas infers booleans, then casts them to the
    float64 asked for); where the chunk held another number too, the text parse rejected
    them. Rejected in every chunking, like any text."""
    allbool = totals(tmp_path, b"Price,Qty\n2.5,True\n3.0,True\n4.0,False\n", options)
    assert_stats(allbool, {"total_rows": 3, "rejected_rows": 3, "total_sales": 0.0,
                           "min_price": None, "max_price": None, "avg_price": None}, "allbool")
    mixed = totals(tmp_path, b"Price,Qty\n2.5,true\n3.0,TRUE\n4.0,2\n", options, name="m.csv")
    assert_stats(mixed, {"total_rows": 3, "rejected_rows": 2, "total_sales": 8.0,
                         "min_price": 4.0, "max_price": 4.0, "avg_price": 4.0}, "mixed")


TOKENS = ["True", "False", "true", "FALSE", "TRUE", "false", "1", "0", "1.0", "0.0", "2.5", "-0",
          "inf", "-inf", "nan", "NaN", "NA", "1e3", "+2", " 3", "007", "0x10", "1_000", "", "yes"]


@settings(max_examples=200, deadline=None)
@given(cells=st.lists(st.sampled_from(TOKENS), min_size=1, max_size=5), in_memory=st.booleans(),
       column=st.sampled_from(["Price", "Qty"]))
def test_number_cells_read_like_the_oracle(cells, in_memory, column):
    """A column made of any mix of plain numbers and what pandas might take for one (the
    bool spellings, nan and inf spellings, hex, underscores, padded numbers): each cell
    is the csv-module oracle's number, or not a finite number where the oracle has none,
    whether the chunk comes in memory (the fast path) or as a stream."""
    other = "2" if column == "Price" else "1.5"
    lines = [f"{c},{other}" if column == "Price" else f"{other},{c}" for c in cells]
    data = ("Price,Qty\n" + "\n".join(lines) + "\n").encode()
    stream = io.BytesIO(data) if in_memory else io.BufferedReader(io.BytesIO(data))
    got = worker.read_columns(stream, ",", ".", "utf-8", ["Price", "Qty"])[column].tolist()
    for cell, value in zip(cells, got):
        expected = oracle_number(cell, ".")
        if expected is None:
            assert not math.isfinite(value), (cell, value, cells)
        else:
            assert value == expected, (cell, value, cells)


# --- 3. Decimal marks ---------------------------------------------------------------------

def test_regression_decimal_comma_pieces_1000_times_too_large(tmp_path):
    """Issue 12: 200 ';'-separated columns, 5,500 records of '0,125;2' then 500 of
    '€2,50;2' gave total_sales 1,026,851 instead of 3,875: pandas parsed the price in
    pieces, a numeric piece (0.125) went back to text as "0.125", and '.' was then
    dropped as a thousands mark.  The price is now parsed once, as float64 or as text."""
    filler = ";" + ";".join(["x"] * 198)
    header = "Price;Qty;" + ";".join(f"c{i}" for i in range(198))
    rows = ["0,125;2" + filler] * 5_500 + ["€2,50;2" + filler] * 500
    path = write(tmp_path, "p.csv", ("\n".join([header, *rows]) + "\n").encode())
    assert path.stat().st_size > 2 * 256 * 1024
    for options in ([], ["--stream", "--chunks", "3"]):
        result = run_in_process(path, options)
        assert result["total_sales"] == pytest.approx(5_500 * 0.125 * 2 + 500 * 2.5 * 2)
        assert result["rejected_rows"] == 0


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), stream=st.booleans())
def test_decimal_comma_pieces_mixing_numbers_and_text(seed, stream):
    """Wide ';' files whose price column mixes runs of plain numbers ('123,456', '0,125',
    '12,50') with runs of text ('€2,50', '1.234,567', 'TBD'), each run about as long as
    one of the pieces pandas' low-memory parser converts on its own (2**20 / columns
    rows, rounded down to a power of two; pandas' parsers.pyx): the plain Python answer,
    in both modes."""
    rng = random.Random(seed)
    width = rng.choice([150, 300])
    piece = 1
    while piece * 2 < 2**20 // width:
        piece *= 2
    filler = ";" * (width - 2)             # empty cells: one byte per column
    prices, qtys = ["2,50"], [1]           # the head shows the decimal comma
    for _ in range(rng.randrange(3, 5)):
        text_run = rng.random() < 0.5
        for _ in range(rng.randrange(piece // 2, 2 * piece)):
            whole, frac = rng.randrange(0, 10**5), rng.randrange(1000)
            # Plain numbers; "123,456" parsed by pandas (123.456) and turned back into
            # text looks like a thousands grouping: the fault of issue 12.
            cell = rng.choice([f"{whole},{frac // 10:02d}", f"{whole % 1000},{frac:03d}",
                               f"0,{frac:03d}"])
            if text_run:                     # pandas would keep these as text
                cell = rng.choice([f"€{cell}", f"{whole:,}".replace(",", ".") + f",{frac:03d}",
                                   "TBD", f"{cell} EUR"])
            prices.append(cell)
            qtys.append(rng.randrange(1, 9))
    data = ("Price;Qty" + filler + "\n" + "".join(
        f"{p};{q}{filler}\n" for p, q in zip(prices, qtys))).encode()
    expected = expected_totals(["Price", "Qty"], [[oracle_cell(p, ","), str(q)]
                                                  for p, q in zip(prices, qtys)], 0, 1)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "wide.csv"
        path.write_bytes(data)
        got = run_in_process(path, ["--stream", "--chunks", "4"] if stream else ["--chunks", "4"])
    assert_stats(got, expected, f"seed {seed}")


def oracle(path: Path, sep: str, decimal: str, encoding: str = "utf-8") -> dict:
    """The aggregate of the Price and Qty columns, read with the csv module."""
    with open(path, encoding=encoding, newline="") as f:
        rows = [r for r in csv.reader(f, delimiter=sep) if r]
    header, records = rows[0], rows[1:]
    return expected_totals(header, [[oracle_cell(c, decimal) for c in r] for r in records],
                           header.index("Price"), header.index("Qty"))


def oracle_cell(cell: str, decimal: str) -> str:
    """``cell`` rewritten with a decimal point, for expected_totals' reader."""
    value = oracle_number(cell, decimal)
    return "" if value is None else repr(value)


def test_regression_semicolon_prices_with_three_decimals(tmp_path):
    """Issue 17: Product;Unit Price;Quantity with prices 0.125, 1.459, 2.375 came out
    1000 times too large: the tie between marks went to ',' because the separator is
    ';'.  '0.125' shows a decimal point (no thousands group follows a leading 0); with
    only 1.459 and 2.375 nothing tells, which is an error asking for --decimal."""
    data = b"Product;Unit Price;Quantity\nA;0.125;2\nB;1.459;1\nC;2.375;3\n"
    result = totals(tmp_path, data)
    assert result["total_sales"] == pytest.approx(0.25 + 1.459 + 7.125)
    undecided = b"Product;Unit Price;Quantity\nB;1.459;1\nC;2.375;3\n"
    message = input_error(tmp_path, undecided)
    assert "cannot tell the decimal mark" in message and "--decimal" in message
    assert totals(tmp_path, undecided, ["--decimal", "."])["total_sales"] == \
        pytest.approx(1.459 + 7.125)
    assert totals(tmp_path, undecided, ["--decimal", ","])["total_sales"] == \
        pytest.approx(1459 + 7125)


def test_decimal_mark_is_logged(tmp_path):
    """The chosen mark and the reason are noted for the log (issue 17: "No log line says
    which mark was chosen"); the server logs the notes once it listens, so that an
    early error stays one line on stderr."""
    comma = server.inspect_csv(str(write(tmp_path, "x.csv", b"Price;Qty\n2,50;1\n"))).notes
    assert any("decimal mark: ','" in note and "'2,50'" in note for note in comma), comma
    none = server.inspect_csv(str(write(tmp_path, "y.csv", b"Price;Qty\n2;1\n"))).notes
    assert any("none shown" in note for note in none), none


@pytest.mark.parametrize("head, late", [
    (b"1;2\n", b"2.50;1\n"),      # no mark in the head: a later cell that needs one
    (b"1;2\n", b"1.234;1\n"),
    (b"2,50;2\n", b"2.50;1\n"),   # a comma in the head, a decimal point later
    (b"2.50;2\n", b"2,50;1\n"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_a_cell_against_the_mark_beyond_the_head_stops_the_job(tmp_path, head, late, stream):
    """The head is only 256 KiB: every chunk checks that no cell contradicts the mark
    chosen from it, or needs one it never showed.  Documented mode: exit 2 before
    listening; --stream: the chunk fails (exit 1 with the reason)."""
    data = b"Price;Qty\n" + head * 80_000 + late
    message = outcome(write(tmp_path, "late.csv", data),
                      ["--stream", "--chunks", "4"] if stream else [])
    assert isinstance(message, str) and "--decimal" in message and repr(late.split(b";")[0].decode()) in message


PRICE_DIGITS = st.integers(0, 6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mark=st.sampled_from([".", ","]), rows=st.lists(st.tuples(
    st.integers(0, 10**7), PRICE_DIGITS, st.booleans(), st.integers(-3, 2000)), max_size=12),
       stream=st.booleans())
def test_semicolon_files_with_any_number_of_decimals(mark, rows, stream):
    """';' files whose prices have 0 to 6 decimals, with or without thousands marks, in
    either mark: the mark the cells show is used (the oracle's answer); when the cells
    show both or none while some cell differs by the mark, the same clear error asking
    for --decimal.  Never an answer 1000 times off."""
    thousands = "," if mark == "." else "."
    cells = []
    for units, digits, grouped, _ in rows:
        whole, frac = divmod(units, 10**digits) if digits else (units, 0)
        text = f"{whole:,}".replace(",", thousands) if grouped else str(whole)
        cells.append(text + (f"{mark}{frac:0{digits}d}" if digits else ""))
    qtys = [str(q) if abs(q) < 1000 else f"{q:,}".replace(",", thousands) for *_, q in rows]
    data = ("Product;Unit Price;Quantity\n" + "".join(
        f"p{i};{c};{q}\n" for i, (c, q) in enumerate(zip(cells, qtys)))).encode()
    # An independent reading of the rule: what each cell shows, with oracle_number.
    both = [(oracle_number(c, "."), oracle_number(c, ",")) for c in cells + qtys]
    point = any(p is not None and c is None for p, c in both)
    comma = any(c is not None and p is None for p, c in both)
    differs = any(p is not None and c is not None and p != c for p, c in both)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "semi.csv"
        path.write_bytes(data)
        got = outcome(path, ["--stream", "--chunks", "3"] if stream else ["--chunks", "3"])
        if point and comma or differs and not (point or comma):
            event("refused: the mark cannot be told")
            assert isinstance(got, str) and "--decimal" in got, got
            return
        event(f"read with {'.' if point else ',' if comma else 'no'} mark shown")
        shown = "." if point else "," if comma else None
        assert not (shown and shown != mark), "the data showed the other mark"
        records = [["", c, q] for c, q in zip(cells, qtys)]
        expected = expected_totals(["Product", "Price", "Qty"],
                                   [[oracle_cell(x, mark) if x else "" for x in r] for r in records],
                                   1, 2)
        assert not isinstance(got, str), got
        assert_stats(got, expected, data.decode())


# --- 4. Headers ---------------------------------------------------------------------------

NAME = st.one_of(
    st.text(alphabet='ab "()', min_size=1, max_size=6).filter(lambda s: not s.startswith('"')),
    st.text(alphabet='ab,;"\n ', max_size=6).map(lambda s: '"' + s.replace('"', '""') + '"'),
)


@settings(max_examples=150, deadline=None)
@given(names=st.lists(NAME, min_size=0, max_size=4), price_at=st.integers(0, 4),
       sep=st.sampled_from([",", ";"]), rows=st.integers(0, 6), stream=st.booleans())
def test_headers_with_quotes_and_separators(names, price_at, sep, rows, stream):
    """Header names holding literal quotes ('Size (")'), quoted separators, doubled
    quotes and newlines, around Price and Qty: inspect_csv reads the names pandas reads,
    and both modes give the csv-module oracle's answer.  The separator is guessed right
    unless a literal quote makes the header readable both ways (then --sep says)."""
    header = names[:price_at] + ["Price", "Qty"] + names[price_at:]
    text = sep.join(header) + "\n" + "".join(
        sep.join(["2.50" if h == "Price" else "3" if h == "Qty" else "z" for h in header]) + "\n"
        for _ in range(rows))
    literal = any('"' in n and not n.startswith('"') for n in names)
    if not literal:
        assert server._guess_sep(text) == sep, text
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "h.csv"
        path.write_bytes(text.encode())
        info = server.inspect_csv(str(path), sep=sep)
        assert info.columns == list(pd.read_csv(path, sep=sep, nrows=0).columns)
        got = run_in_process(path, ["--sep", sep, *(["--stream", "--chunks", "4"] if stream
                                                     else ["--chunks", "4"])])
    assert_stats(got, {"total_rows": rows, "rejected_rows": 0, "total_sales": 7.5 * rows},
                 text)


@pytest.mark.parametrize("header", [
    "a,a,Price,Qty", "Price,,Qty,", "Unnamed: 1,,Price,Qty", "x.1,x,x,Price,Qty",
    ",Unnamed: 0,Price,Qty",
])
def test_column_names_are_pandas_names(tmp_path, header):
    """Empty and repeated names are renamed by pandas' own rules ('Unnamed: 1', 'a.1');
    inspect_csv asks pandas for them, so the names it hands the reader always match."""
    path = write(tmp_path, "n.csv", (header + "\n" + ",".join(["1"] * len(header.split(",")))
                                     + "\n").encode())
    assert server.inspect_csv(str(path)).columns == list(pd.read_csv(path, nrows=0).columns)


def test_regression_wide_header(tmp_path):
    """Issue 17: 100,000 columns with Price and Qty last gave "no price column" with a
    380 KB column list, and --price-col Price "is not a column": the head (256 KiB) held
    part of the header.  Now the head holds the whole header, and messages list a few
    names and the count."""
    names = [f"Col{i}" for i in range(99_998)]
    header = ",".join(names + ["Price", "Qty"])
    row = ",".join(["x"] * 99_998 + ["2.50", "3"])
    path = write(tmp_path, "wide.csv", (header + "\n" + (row + "\n") * 4).encode())
    for options in ([], ["--price-col", "Price"], ["--stream", "--chunks", "3"]):
        assert run_in_process(path, options)["total_sales"] == pytest.approx(30.0)
    cost = write(tmp_path, "cost.csv", (header.replace("Price", "Cost") + "\n" + row + "\n").encode())
    message = input_error(tmp_path, cost.read_bytes(), name="cost.csv")
    assert "no price column" in message and "100000 columns" in message and len(message) < 1500


def test_regression_header_longer_than_a_mebibyte(tmp_path):
    """Issue 17: a 10 MB header broke the surplus marker the reader inserted at byte
    1 MiB.  There is no marker now; a 3 MB name is read like any other."""
    path = write(tmp_path, "long.csv", b"Price,Qty," + b"N" * 3_000_000 + b"\n" + b"2.50,2,x\n" * 500)
    for options in ([], ["--stream", "--chunks", "4"]):
        assert run_in_process(path, options)["total_sales"] == pytest.approx(2_500.0)


def test_show_names_abbreviates_long_lists():
    """A message lists at most a dozen names, each at most 40 characters, and the count."""
    text = worker.show_names([f"c{i}" for i in range(1000)] + ["x" * 100])
    assert text.startswith("['c0', 'c1'") and "(1001 columns)" in text and len(text) < 300
    assert worker.show_names(["a", "b"]) == "['a', 'b']"


# --- 5. Compressed input, encodings, chunk counts ------------------------------------------

def zip_with(data: bytes, flag: int = 0, method: int | None = None) -> bytes:
    """A one-file zip of ``data``, its general-purpose flag ORed with ``flag`` and its
    compression method replaced by ``method``, in the local and central headers."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("sales.csv", data)
    raw = bytearray(buffer.getvalue())
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    raw[local + 6] |= flag
    raw[central + 8] |= flag
    if method is not None:
        raw[local + 8] = raw[central + 10] = method
    return bytes(raw)


BODY = b"Price,Qty\n" + b"1.50,2\n" * 100_000


def corrupt(data: bytes, at: int) -> bytes:
    return data[:at] + bytes(b ^ 0xFF for b in data[at:at + 4]) + data[at + 4:]


@pytest.mark.parametrize("name, data, words", [
    ("enc.csv.zip", zip_with(BODY, flag=1), ["encrypted", "password"]),
    ("d64.csv.zip", zip_with(BODY, method=9), ["compression method", "extract it"]),
    ("head.csv.gz", corrupt(gzip.compress(BODY), 20), ["cannot read gzip data"]),
    ("tail.csv.gz", corrupt(gzip.compress(BODY), len(gzip.compress(BODY)) - 400),
     ["cannot read gzip data"]),
    ("cut.csv.gz", gzip.compress(BODY)[:-300], ["cannot read gzip data"]),
    ("bad.csv.zip", corrupt(zip_with(BODY), 200), ["cannot read"]),
    ("bad.csv.bz2", corrupt(bz2.compress(BODY), 60), ["cannot read bz2 data"]),
    ("bad.csv.xz", corrupt(lzma.compress(BODY), 80), ["cannot read xz data"]),
])
def test_damaged_compressed_input_is_one_line(tmp_path, name, data, words):
    """Issue 17: a password-protected zip (RuntimeError), a Deflate64 zip
    (NotImplementedError) and corrupt deflate data in the head (zlib.error) gave
    tracebacks.  Now these and other damage, in the head or further on, are one
    InputError naming the file (exit 2 before listening)."""
    message = input_error(tmp_path, data, name=name)
    assert name in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("encoding", ["rot13", "base64", "hex", "zlib", "bz2", "quopri",
                                      "undefined"])
def test_text_transforms_as_encoding_are_refused(tmp_path, encoding):
    """Issue 17: --encoding rot13/base64/hex/zlib crashed with tracebacks.  Only text
    encodings are accepted; the rest get one line."""
    message = input_error(tmp_path, b"Price,Qty\n1,2\n", ["--encoding", encoding])
    assert "not a text encoding" in message


@pytest.mark.parametrize("encoding, transparent", [
    ("utf-8", True), ("utf-8-sig", True), ("cp1252", True), ("latin-1", True), ("ascii", True),
    ("utf-16", False), ("utf-32-le", False), ("shift_jis", False), ("gbk", False),
    ("cp500", False),
])
def test_byte_transparent_encodings(encoding, transparent):
    """Encodings whose raw bytes show the CSV structure: UTF-8 and single-byte ASCII code
    pages; not UTF-16/32, EBCDIC, or multi-byte code pages whose second bytes can be '|'."""
    assert worker.byte_transparent(encoding) is transparent


def test_shift_jis_with_a_trail_byte_separator(tmp_path):
    """Shift-JIS writes 'ー' as 81 5B and '−' as 81 7C: a '|' byte inside a character.
    Read as bytes it would split the field; the reader transcodes it first.  --stream,
    which cuts raw bytes, refuses the encoding."""
    text = "Name|Price|Qty\n−の|2.50|2\nー|1.00|3\n"
    data = text.encode("shift_jis")
    assert b"\x81\x7c" in data
    assert totals(tmp_path, data, ["--encoding", "shift_jis"])["total_sales"] == pytest.approx(8.0)
    assert "cannot split" in input_error(tmp_path, data, ["--encoding", "shift_jis", "--stream"])


def test_regression_huge_chunk_count_is_capped_by_the_records(tmp_path, monkeypatch):
    """Issue 17: --stream --chunks 1000000000 took memory in proportion to the file (a cut
    target per byte).  The count is capped by the records (line ends), with a log line;
    record_boundaries never gets more targets than that."""
    data = b"Price,Qty\n" + b"1.50,2\n" * 200_000
    path = write(tmp_path, "many.csv", data)
    seen = []
    original = server.record_boundaries

    def spy(path, targets, *args, **kwargs):
        seen.append(len(targets))
        return original(path, targets, *args, **kwargs)

    monkeypatch.setattr(server, "record_boundaries", spy)
    info = server.inspect_csv(str(path))
    chunks = server.StreamChunks(info, 10**9, False)
    assert max(seen) <= 200_001 and len(chunks) <= 200_000
    assert any("capped at 200001" in note for note in info.notes), info.notes
    assert sum(end - start for start, end in chunks.ranges) == len(data) - len(b"Price,Qty\n")


# --- 6. Through real processes ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(120)
def test_processes_large_inputs(procs, tmp_path):
    """The regressions that need more than a head's worth of data, through real server
    and worker processes: decimal-comma pieces (issue 12, item 2) and a lone quote in
    the header (issue 17, item 1) give the exact answer in both modes; a UTF-16 surplus
    past the head (issue 12, item 3) ends the job with one line and exit 1, and a wide
    header without a price column (issue 17, item 7) with one line and exit 2."""
    filler = ";" + ";".join(["x"] * 198)
    pieces = write(tmp_path, "pieces.csv", ("\n".join(
        ["Price;Qty;" + ";".join(f"c{i}" for i in range(198))]
        + ["0,125;2" + filler] * 5_500 + ["€2,50;2" + filler] * 500) + "\n").encode())
    quote = write(tmp_path, "quote.csv", b'Price,Qty,Size (")\n' + b"1.50,2,x\n" * 60_000)
    utf16 = write(tmp_path, "utf16.csv", ("Price,Qty\n" + "1.50,2\n" * 40_000 + "1.5,2,\n")
                  .encode("utf-16"))
    wide = write(tmp_path, "wide.csv", (",".join([f"Col{i}" for i in range(99_998)] + ["Cost", "Qty"])
                                        + "\n" + ",".join(["1"] * 100_000) + "\n").encode())
    modes = {"documented": [], "stream": ["--stream", "--chunks", "6"]}
    for path, sales in ((pieces, 3_875.0), (quote, 180_000.0)):
        for mode, outcome_ in run_modes(procs, Path(tempfile.mkdtemp(dir=tmp_path)), path,
                                        modes).items():
            code, out, stderr, _ = outcome_
            assert code == 0, f"{path.name} [{mode}]: {stderr}"
            assert parse_final(out)["total_sales"] == pytest.approx(sales, rel=1e-9)
    # The documented mode parses as it goes (issue 16): a fault past the head is
    # found mid-job, so the job stops with exit 1 and one line naming it.
    code, out, stderr, _ = run_modes(procs, Path(tempfile.mkdtemp(dir=tmp_path)), utf16,
                                     {"d": ["--encoding", "utf-16"]})["d"]
    last = stderr.strip().splitlines()[-1]
    assert code == 1 and "total_rows" not in out and "Traceback" not in stderr
    assert last.startswith("server.py: error: ") and str(utf16) in last
    assert "more fields" in last and "'1.5,2,'" in last
    message = assert_early_error(run_modes(procs, Path(tempfile.mkdtemp(dir=tmp_path)), wide,
                                           {"d": []})["d"], wide, ["no price column"])
    assert len(message) < 1500


@pytest.mark.timeout(120)
def test_process_logs_the_decimal_mark(procs, tmp_path):
    """A real server logs the mark it chose and the cell that showed it, once it listens
    (issue 17), and reads the file with it."""
    path = write(tmp_path, "comma.csv", b"Product;Price;Qty\nA;2,50;2\nB;1.234,50;1\n")
    result, srv = run_job(procs, path, workers=1, server_args=["--chunks", "2"])
    assert result["total_sales"] == pytest.approx(1239.5)
    assert "decimal mark: ',', shown by" in srv.stderr() and "'2,50'" in srv.stderr()


@pytest.mark.timeout(120)
def test_process_caps_a_huge_chunk_count(procs, tmp_path):
    """Issue 17: `--stream --chunks 1000000000` took memory in proportion to the file
    and died.  A real server caps the count by the records and says so once it
    listens (it is stopped there: 120,001 one-record chunks would take minutes)."""
    path = write(tmp_path, "many.csv", b"Price,Qty\n" + b"1.50,2\n" * 120_000)
    srv = procs.server(path, args=["--stream", "--chunks", "1000000000"])
    wait_for(lambda: "capped at 120001" in srv.stderr(), 30, "the cap in the server log")
    assert "Traceback" not in srv.stderr()
