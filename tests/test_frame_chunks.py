"""The documented mode parses as it goes, in bounded memory (issue 16).

``server.FrameChunks`` cuts the input's text into byte ranges (``server.cut_text``,
the same cut as ``--stream``) and a producer thread parses them in order while the
job runs.  What this file checks:

* Identity: the same input and arguments give the same chunks on every run, in
  every form (plain, .gz, .bz2, .xz, .zip) and in both modes; together the chunks
  hold every record once (checked against Python's ``csv`` module).
* The bound: the producer never holds more than ``ahead`` parsed chunks that are
  waiting to be handed out, and it really stops there; a plain file's chunk is
  not kept once handed out (a retry reads it again), a compressed one is kept
  until DONE, so a retry never decompresses from the start.
* Resume: chunks done in an earlier run are never parsed, in-process and with
  real processes killed mid-job on a .gz.
* Failures: corrupt compressed data (one line, exit 2), a malformed chunk and
  running out of memory (one line naming the chunk, the job stops), MemoryError
  anywhere else (one line, exit 1).
* The options that shape chunks: ``--chunk-rows`` and the chunk-size cap.

The long targets (419 million rows gzipped, 5M and 20M rows, the time to the first
dispatch) are measured by hand; the README gives the commands and the numbers.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import logging
import lzma
import pickle
import socket
import threading
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
import server
import worker
from conftest import Server, db_rows, kill, make_sales_csv, oracle as csv_oracle, parse_final, wait_for
from db_utils import ResultStore

PRICE, QTY = "Price", "Qty"


def write_forms(folder: Path, text: bytes) -> dict[str, Path]:
    """``text`` as a plain file and in every compressed form the server reads."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"plain": folder / "s.csv", "gz": folder / "s.csv.gz", "bz2": folder / "s.csv.bz2",
             "xz": folder / "s.csv.xz", "zip": folder / "s.csv.zip"}
    paths["plain"].write_bytes(text)
    paths["gz"].write_bytes(gzip.compress(text))
    paths["bz2"].write_bytes(bz2.compress(text))
    paths["xz"].write_bytes(lzma.compress(text))
    with zipfile.ZipFile(paths["zip"], "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("s.csv", text)
    return paths


def frames(path: Path, chunks: int = 200, chunk_rows=None, **limits) -> server.FrameChunks:
    """A FrameChunks over ``path`` (not started: payload() parses on demand)."""
    return server.FrameChunks(server.inspect_csv(str(path)), chunks, chunk_rows, False, **limits)


def unpickle(payload: bytes) -> pd.DataFrame:
    """The DataFrame in an (uncompressed) documented-mode payload (a small
    chunk's plain columns made into the DataFrame they stand for)."""
    chunk = worker.load_chunk({"format": "frame", "data": payload})
    return chunk.to_frame() if isinstance(chunk, worker.SmallChunk) else chunk


class Spy(server.FrameChunks):
    """FrameChunks that records the pieces it parses, and how many pieces its
    producer had waiting to be handed out when it began a parse."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.parsed: list[int] = []
        self.ready_at_parse: list[int] = []     # pieces waiting, when the producer began one

    def _parse(self, piece):
        if threading.current_thread() in self._threads:
            with self._lock:
                if not self._waiting:
                    self.ready_at_parse.append(len(self._ready_in))
        self.parsed.append(piece)
        return super()._parse(piece)


def spy(path: Path, chunks: int = 20, **limits) -> Spy:
    """A Spy whose chunks are each a piece of their own, with one producer, unless
    ``limits`` says otherwise."""
    limits.setdefault("min_piece_bytes", 0)
    limits.setdefault("parsers", 1)
    return Spy(server.inspect_csv(str(path)), chunks, None, False, **limits)


def producer_is_waiting(chunks: server.FrameChunks) -> bool:
    """True while the producer thread is blocked on the cache's condition."""
    return len(chunks._space._waiters) > 0


def sales_text(rows: int, seed: int = 0) -> bytes:
    """``rows`` records of ``Price,Qty`` with varied prices (lines of 6 to 8 bytes)."""
    lines = [f"{(i * 37 + seed) % 500 / 4 + 0.25:.2f},{i % 9 + 1}" for i in range(rows)]
    return ("Price,Qty\n" + "\n".join(lines) + "\n").encode()


# --- 1. The same chunks on every run, in every form ----------------------------------

# A third column: plain values, or quoted text holding commas, newlines and quotes.
field = st.one_of(
    st.sampled_from(["1", "2.50", "", "TBD", "-3"]),
    st.text(st.sampled_from('ab ,"\n\r'), max_size=6).map(
        lambda s: '"' + s.replace('"', '""') + '"'),
)


def oracle(text: str) -> tuple[int, float]:
    """(records, total sales) of ``text`` by Python's csv module and plain floats."""
    rows = [row for row in csv.reader(io.StringIO(text, newline="")) if row][1:]
    sales = 0.0
    for row in rows:
        try:
            sales += float(row[0]) * float(row[1])
        except ValueError:
            pass
    return len(rows), sales


def totals(chunks: server.FrameChunks) -> tuple[int, float]:
    """(records, total sales) over every chunk's frame, through compute_metrics."""
    metrics = [worker.compute_metrics(unpickle(chunks.payload(i)), PRICE, QTY)
               for i in range(len(chunks))]
    return sum(m["rows_processed"] for m in metrics), sum(m["total_sales"] for m in metrics)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(st.tuples(st.sampled_from(["1", "2.5", "x", ""]),
                                  st.sampled_from(["1", "3", ""]), field), max_size=40),
       blank=st.integers(0, 40), crlf=st.booleans(), chunks=st.integers(1, 60),
       piece=st.sampled_from([0, 50, 2**20]))
def test_chunks_are_identical_across_runs_forms_and_modes(tmp_path_factory, records, blank,
                                                          crlf, chunks, piece):
    """Property: for random records (quoted commas, newlines and doubled quotes in a
    third column, a blank line anywhere, LF or CRLF), the chunk ranges are the same on
    two runs, for the plain file and each compressed form, and equal to --stream's;
    each chunk has the same records everywhere, and together they hold every record
    once (records and sales as Python's csv module counts them); a chunk parsed on
    its own (no piece shared with others) holds exactly the records of its bytes."""
    eol = "\r\n" if crlf else "\n"
    lines = ["Price,Qty,Note"] + [",".join(r) for r in records]
    lines.insert(1 + blank % len(lines), "")
    text = eol.join(lines) + eol
    paths = write_forms(tmp_path_factory.mktemp("forms"), text.encode())
    rows, sales = oracle(text)

    plain = frames(paths["plain"], chunks, min_piece_bytes=piece)
    try:
        per_chunk = [len(unpickle(plain.payload(i))) for i in range(len(plain))]
    finally:
        plain.close()
    assert all(b > a for a, b in plain.ranges)
    assert all(b == c for (_, b), (c, _) in zip(plain.ranges, plain.ranges[1:]))
    stream = server.StreamChunks(server.inspect_csv(str(paths["plain"])), chunks, False)
    stream.close()
    assert (stream.header, stream.ranges) == (plain.header, plain.ranges)
    if piece == 0:
        data = text.encode()
        assert per_chunk == [oracle((plain.header + data[a:b]).decode())[0]
                             for a, b in plain.ranges]
    for form, path in paths.items():
        for _ in range(2):
            again = frames(path, chunks, min_piece_bytes=piece)
            try:
                assert (again.header, again.ranges) == (plain.header, plain.ranges), form
                assert [len(unpickle(again.payload(i))) for i in range(len(again))] == \
                    per_chunk, form
                got_rows, got_sales = totals(again)
            finally:
                again.close()
            assert got_rows == rows and got_sales == pytest.approx(sales, rel=1e-9), form


def test_a_compressed_input_has_the_plain_files_chunks_and_answer(tmp_path):
    """Every compressed form of one text gives its plain file's chunks, row counts
    and frames (a gzip of 3,000 records in 7 chunks, say)."""
    paths = write_forms(tmp_path, sales_text(3_000))
    plain = frames(paths["plain"], 7)
    try:
        want = [unpickle(plain.payload(i)) for i in range(len(plain))]
        assert len(want) == 7 and sum(map(len, want)) == 3_000
        for form in ("gz", "bz2", "xz", "zip"):
            other = frames(paths[form], 7)
            try:
                assert other.ranges == plain.ranges
                for i, frame in enumerate(want):
                    pd.testing.assert_frame_equal(unpickle(other.payload(i)), frame)
                    assert other.rows_of(i) == len(frame)
            finally:
                other.close()
    finally:
        plain.close()


# --- 2. The bound -------------------------------------------------------------------

@pytest.mark.parametrize("form", ["plain", "gz"])
def test_producer_stops_at_ahead_parsed_chunks(tmp_path, form):
    """With nobody taking chunks, the producer parses exactly `ahead` (2) of them and
    waits; each chunk taken lets it parse one more; taking them all in order, it
    never starts a parse with 2 chunks waiting."""
    path = write_forms(tmp_path, sales_text(2_000))[form]
    chunks = spy(path, 20, ahead=2)
    try:
        chunks.start()
        wait_for(lambda: len(chunks._ready) == 2 and producer_is_waiting(chunks), 30,
                 "the producer to fill the cache and wait")
        assert chunks.parsed == [0, 1]
        chunks.payload(0)
        wait_for(lambda: chunks.parsed == [0, 1, 2] and producer_is_waiting(chunks), 30,
                 "one more parse")
        rows = sum(len(unpickle(chunks.payload(i))) for i in range(1, 20))
        assert rows + chunks.rows_of(0) == 2_000
        assert chunks.parsed == list(range(20))
        assert max(chunks.ready_at_parse) <= 1
    finally:
        chunks.close()


def test_producer_byte_bound_keeps_one_chunk_waiting(tmp_path):
    """A byte bound smaller than one payload leaves one parsed chunk waiting at a time."""
    path = write_forms(tmp_path, sales_text(2_000))["plain"]
    chunks = spy(path, 10, ahead=8, ahead_bytes=1)
    try:
        chunks.start()
        wait_for(lambda: len(chunks._ready) == 1 and producer_is_waiting(chunks), 30,
                 "one parsed chunk")
        assert chunks.parsed == [0]
        for i in range(10):
            chunks.payload(i)
        assert chunks.parsed == list(range(10))
        assert set(chunks.ready_at_parse) == {0}
    finally:
        chunks.close()


def test_two_producers_give_the_same_chunks_within_the_same_bound(tmp_path):
    """Two producers (the default for a plain file) parse each piece once when the
    chunks are taken in order, keep at most `ahead` pieces parsed or in progress when
    nobody takes them, and give every chunk the very bytes one producer gives."""
    path = write_forms(tmp_path, sales_text(5_000))["plain"]
    one = spy(path, 30)
    try:
        one.start()
        alone = [one.payload(i) for i in range(30)]
    finally:
        one.close()
    two = spy(path, 30, ahead=3, parsers=2)
    try:
        two.start()
        assert len(two._threads) == 2
        wait_for(lambda: len(two._ready) == 3 and len(two._space._waiters) == 2, 30,
                 "both producers to fill the cache and wait")
        assert sorted(two.parsed) == [0, 1, 2]
        assert [two.payload(i) for i in range(30)] == alone
        assert sorted(two.parsed) == list(range(30))
    finally:
        two.close()


def test_two_producers_that_both_fail_report_one_error(tmp_path, monkeypatch):
    """Both producers failing at once (here every piece after the first fails) stop
    the job once: one call of on_error, one message for every later payload()."""
    path = write_forms(tmp_path, sales_text(2_000))["plain"]
    real, started = server.read_columns, threading.Barrier(2, timeout=30)

    def read_columns(stream, *args):
        frame = real(stream, *args)
        if frame[PRICE].iloc[0] != first_price:
            started.wait()          # both producers are in a parse: fail them together
            raise MemoryError
        return frame

    probe = frames(path, 10, min_piece_bytes=0)
    first_price = unpickle(probe.payload(0))[PRICE].iloc[0]
    probe.close()
    monkeypatch.setattr(server, "read_columns", read_columns)
    errors = []
    chunks = frames(path, 10, min_piece_bytes=0, parsers=2)
    try:
        chunks.start(on_error=errors.append)
        chunks.payload(0)
        with pytest.raises(server.InputError, match="out of memory while parsing chunk") as e:
            chunks.payload(5)
        wait_for(lambda: not any(t.is_alive() for t in chunks._threads), 30,
                 "both producers to stop")
        assert errors == [str(e.value)]
    finally:
        chunks.close()


@pytest.mark.parametrize("form, kept", [("plain", False), ("gz", True)])
def test_a_retried_chunk_comes_from_the_cache_or_the_file(tmp_path, form, kept):
    """A chunk handed out and asked for again (its lease expired): a compressed one is
    still in memory (no second parse, no decompression from the start); a plain file's
    is read and parsed again with pread.  Same bytes either way; DONE drops it."""
    path = write_forms(tmp_path, sales_text(2_000))[form]
    chunks = spy(path, 10, ahead=2)
    try:
        chunks.start()
        first = [chunks.payload(i) for i in range(4)]
        assert chunks.payload(1) == first[1]
        assert chunks.parsed.count(1) == (1 if kept else 2)
        assert (1 in chunks._kept) == kept
        chunks.forget(1)
        assert 1 not in chunks._kept
    finally:
        chunks.close()


# --- 3. Resume ----------------------------------------------------------------------

@pytest.mark.parametrize("form", ["plain", "gz"])
def test_chunks_done_earlier_or_meanwhile_are_never_parsed(tmp_path, form):
    """Chunks done in an earlier run (start(done=...)) and a chunk completed by a late
    result before the producer reached it (forget) are skipped, not parsed."""
    path = write_forms(tmp_path, sales_text(2_000))[form]
    chunks = spy(path, 12, ahead=2)
    try:
        chunks.forget(9)
        chunks.start(done={0, 3, 4, 11})
        todo = [1, 2, 5, 6, 7, 8, 10]
        for chunk_id in todo:
            chunks.payload(chunk_id)
            chunks.forget(chunk_id)
        wait_for(lambda: not any(t.is_alive() for t in chunks._threads), 30,
                 "the producer to finish")
        assert chunks.parsed == todo
    finally:
        chunks.close()


@pytest.mark.timeout(120)
def test_gzip_job_killed_and_resumed_redoes_no_chunk(procs, tmp_path):
    """A documented-mode job on a .gz, its server SIGKILLed after 5 of 20 chunks and
    started again with the same arguments: no done chunk is dispatched again, and
    the answer is the single-process one."""
    plain = make_sales_csv(tmp_path / "s.csv", 20_000, columns=f"{PRICE},{QTY}")
    path = tmp_path / "s.csv.gz"
    path.write_bytes(gzip.compress(plain.read_bytes()))
    args = ("--chunks", 20)
    first = procs.server(path, args=args)
    for i in range(2):
        procs.worker(first.port, f"a{i}", ("--delay", 0.1))
    done = lambda: {c: a for c, a in db_rows(first.db, "SELECT chunk_id, attempt_id "
                                                         "FROM chunk_results")}
    wait_for(lambda: len(done()) >= 5, 60, "5 chunks done")
    kill(first.proc)
    before = done()
    assert len(before) < 20, "the job finished before the kill; nothing was tested"
    last = db_rows(first.db, "SELECT MAX(attempt_id) FROM attempts")[0][0]

    second = procs.server(path, db=first.db, args=args)
    procs.worker(second.port, "b0")
    code, out = second.finish(90)
    assert code == 0, second.stderr()
    expected = csv_oracle(plain, PRICE, QTY)
    got = parse_final(out)
    assert (got["total_rows"], got["rejected_rows"]) == (20_000, 0)
    assert got["total_sales"] == pytest.approx(expected["total_sales"], rel=1e-9)
    redone = db_rows(first.db, "SELECT chunk_id FROM attempts WHERE attempt_id > ?", (last,))
    assert not {c for (c,) in redone} & set(before)
    assert {c: a for c, a in done().items() if c in before} == before


@pytest.mark.parametrize("form", ["plain", "gz"])
def test_small_chunks_share_one_parse_and_the_same_records_every_time(tmp_path, form):
    """Chunks smaller than min_piece_bytes are parsed together (one read_columns call
    per piece, not per chunk); each gets the records of its share of the piece, the
    same in a fresh run, after a resume that skips some of them (the piece is parsed
    whole), and on a retry; with lines of one length, exactly the records of its bytes."""
    text = b"Price,Qty\n" + b"".join(b"%03d.5,%d\n" % (i % 1000, i % 9) for i in range(3_000))
    path = write_forms(tmp_path, text)[form]
    alone = spy(path, 30, min_piece_bytes=0)
    grouped = spy(path, 30, min_piece_bytes=8_000)
    try:
        assert len(grouped.pieces) < 30 and all(b > a for a, b in grouped.pieces)
        mine = [unpickle(alone.payload(i)) for i in range(30)]
        grouped.start()
        for i in range(30):
            pd.testing.assert_frame_equal(unpickle(grouped.payload(i)), mine[i])
        assert grouped.parsed == list(range(len(grouped.pieces)))
        pd.testing.assert_frame_equal(unpickle(grouped.payload(3)), mine[3])   # a retry
    finally:
        alone.close()
        grouped.close()
    resumed = spy(path, 30, min_piece_bytes=8_000)
    try:
        first, end = resumed.pieces[1]
        done = set(range(0, end - 1))           # all but the last chunk of piece 1 done
        resumed.start(done=done)
        for i in range(end - 1, 30):
            pd.testing.assert_frame_equal(unpickle(resumed.payload(i)), mine[i])
        assert resumed.parsed == list(range(1, len(resumed.pieces)))   # piece 0 skipped
    finally:
        resumed.close()


# --- 4. Failures --------------------------------------------------------------------

def corrupt_middle(data: bytes) -> bytes:
    """``data`` with 64 bytes in its middle overwritten."""
    middle = len(data) // 2
    return data[:middle] + bytes(64) + data[middle + 64:]


@pytest.mark.parametrize("suffix, compress", [(".csv.gz", gzip.compress),
                                              (".csv.bz2", bz2.compress),
                                              (".csv.xz", lambda d: lzma.compress(d, preset=0))])
def test_corrupt_compressed_data_in_the_middle_is_a_clear_error(tmp_path, suffix, compress):
    """Compressed data damaged past the inspected head: the pass that measures the
    text meets it before anything listens; one InputError line naming the format."""
    # 3 MB of varied numbers: the damage lands past bz2's first 900 kB block, which
    # inspect_csv decompresses whole to read its 256 KiB head.
    text = b"Price,Qty\n" + b"".join(f"{i * 7919 % 100003},{i % 97}\n".encode()
                                     for i in range(300_000))
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(corrupt_middle(compress(text)))
    info = server.inspect_csv(str(path))     # the head is intact
    with pytest.raises(server.InputError, match="cannot read") as caught:
        server.FrameChunks(info, 10, None, False)
    assert "\n" not in str(caught.value)


@pytest.mark.timeout(60)
def test_corrupt_gzip_gives_one_line_and_exit_2(procs, tmp_path):
    """The same with a real server process: exit 2, one line on stderr, no port file."""
    text = b"".join(f"{i * 7919 % 100003}.5,{i % 97}\n".encode() for i in range(200_000))
    path = tmp_path / "bad.csv.gz"
    path.write_bytes(corrupt_middle(gzip.compress(b"Price,Qty\n" + text)))
    srv = Server(procs, tmp_path, path)
    code, _ = srv.finish(60)
    lines = [line for line in srv.stderr().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, srv.stderr()
    assert lines[0].startswith("server.py: error: ") and "cannot read gzip data" in lines[0]
    assert not srv.port_file.exists()


def test_out_of_memory_while_parsing_stops_the_job_with_one_line(tmp_path, monkeypatch):
    """A MemoryError in the producer becomes one message naming the chunk and what to
    do; it goes to on_error (the server's fail_job) and to every later payload()."""
    path = write_forms(tmp_path, sales_text(2_000))["plain"]
    real = server.read_columns

    def read_columns(stream, *args):
        frame = real(stream, *args)
        if frame[PRICE].iloc[0] == chunks_first_price[2]:
            raise MemoryError
        return frame

    probe = frames(path, 5, min_piece_bytes=0)
    chunks_first_price = [unpickle(probe.payload(i))[PRICE].iloc[0] for i in range(5)]
    probe.close()
    monkeypatch.setattr(server, "read_columns", read_columns)
    errors = []
    chunks = frames(path, 5, min_piece_bytes=0, parsers=1)   # never past the failed piece
    try:
        chunks.start(on_error=errors.append)
        chunks.payload(0), chunks.payload(1)
        with pytest.raises(server.InputError, match="out of memory while parsing chunk 2 ") as e:
            chunks.payload(2)
        assert errors == [str(e.value)] and "try more --chunks, or --stream" in errors[0]
        with pytest.raises(server.InputError):
            chunks.payload(3)
    finally:
        chunks.close()


def test_out_of_memory_in_the_main_thread_is_one_line_and_exit_1(monkeypatch, capsys):
    """MemoryError outside the parser and the handlers: one line, exit 1, no traceback."""
    def run(args):
        raise MemoryError

    monkeypatch.setattr(server, "run", run)
    assert server.main(["--csv", "x.csv"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("server.py: error: out of memory")


class _NoMemory:
    """A chunk source whose payload() runs out of memory."""
    format, compress = "frame", False

    def __len__(self):
        return 1

    def payload(self, chunk_id):
        raise MemoryError

    def forget(self, chunk_id):
        pass

    def close(self):
        pass


@pytest.mark.timeout(60)
def test_out_of_memory_in_a_handler_is_a_lost_attempt_with_a_bound(tmp_path):
    """A MemoryError while a handler builds a JOB is not the worker's fault: the
    attempt counts as lost (no traceback), and once --max-lost is reached the
    chunk fails naming the MemoryError; the worker then hears NO_JOB."""
    csv_path = write_forms(tmp_path, sales_text(10))["plain"]
    info = server.inspect_csv(str(csv_path))
    store = ResultStore(str(tmp_path / "r.sqlite"))
    store.open_job("job", str(csv_path), "identity", 1)
    book = server.ChunkBook(1, 60.0, 4, max_lost=1)
    srv = server.JobServer(("127.0.0.1", 0), _NoMemory(), book, store, "job", info)
    serving = threading.Thread(target=srv.serve_forever, args=(0.05,))
    serving.start()
    try:
        sock = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=30)
        protocol.client_handshake(sock, b"")
        protocol.send_message(sock, protocol.HELLO, worker_id="w")
        assert protocol.recv_message(sock, protocol.WORKER_MAX_FRAME)["type"] == protocol.WELCOME
        protocol.send_message(sock, protocol.GET_JOB)
        assert protocol.recv_message(sock, protocol.WORKER_MAX_FRAME)["type"] == protocol.NO_JOB
        sock.close()
    finally:
        srv.shutdown()
        srv.close_all()
        serving.join()
        srv.server_close()
        store.close()
    assert book.finished.is_set()
    assert "could not build its JOB (MemoryError" in book.failed_chunks()[0]


def test_file_rewritten_during_the_job_stops_it(tmp_path):
    """A chunk read after the file was rewritten in place is refused, not parsed from
    the new content next to chunks of the old one."""
    path = write_forms(tmp_path, sales_text(2_000))["plain"]
    chunks = frames(path, 4)
    try:
        chunks.payload(0)
        path.write_bytes(path.read_bytes().replace(b"1", b"2"))
        with pytest.raises(server.InputError, match="modified during the job"):
            chunks.payload(1)
    finally:
        chunks.close()


# --- 5. What shapes the chunks --------------------------------------------------------

@pytest.mark.parametrize("piece", [0, 2**20])
def test_chunk_rows_gives_that_many_records_per_chunk_on_even_lines(tmp_path, piece):
    """--chunk-rows R cuts the text every R mean lines: with lines of one length,
    exactly R records per chunk (100 records, R = 7: 14 chunks of 7 and one of 2),
    whether each chunk is parsed alone or all in one piece."""
    path = tmp_path / "even.csv"
    path.write_bytes(b"Price,Qty\n" + b"1.00,2\n" * 100)
    chunks = frames(path, chunk_rows=7, min_piece_bytes=piece)
    try:
        rows = [len(unpickle(chunks.payload(i))) for i in range(len(chunks))]
    finally:
        chunks.close()
    assert rows == [7] * 14 + [2]


def test_chunk_size_cap_makes_more_chunks(tmp_path, caplog):
    """A chunk holds at most max_chunk_bytes of text (here 1,000 bytes of a 20 kB
    file asked for in 2 chunks): more chunks, logged, the same records."""
    path = write_forms(tmp_path, sales_text(2_000))["plain"]
    with caplog.at_level(logging.INFO, logger="server"):
        chunks = frames(path, 2, max_chunk_bytes=1_000)
    try:
        assert len(chunks) >= path.stat().st_size // 1_000
        assert all(end - start <= 1_000 for start, end in chunks.ranges)
        assert sum(len(unpickle(chunks.payload(i))) for i in range(len(chunks))) == 2_000
    finally:
        chunks.close()
    assert any("instead of 2" in r.getMessage() for r in caplog.records)


def test_utf16_and_cr_only_text_are_cut_too(tmp_path):
    """UTF-16 text is re-encoded as UTF-8 and cut like any other; a file whose lines
    end with CR alone is cut at its CRs.  Both give every record, in several chunks."""
    text = "Price,Qty\n" + "".join(f"{i % 7}.5,{i % 3}\n" for i in range(500))
    utf16 = tmp_path / "u.csv"
    utf16.write_bytes(text.encode("utf-16"))
    cr = tmp_path / "cr.csv"
    cr.write_bytes(text.replace("\n", "\r").encode())
    for path, options in ((utf16, {"encoding": "utf-16"}), (cr, {})):
        chunks = server.FrameChunks(server.inspect_csv(str(path), **options), 5, None, False)
        try:
            assert len(chunks) == 5
            got = pd.concat([unpickle(chunks.payload(i)) for i in range(5)])
        finally:
            chunks.close()
        assert len(got) == 500 and got[PRICE].sum() == pytest.approx(
            sum(i % 7 + 0.5 for i in range(500)))


def _same_metrics(small: dict, pandas_: dict) -> None:
    """Two metric dicts agree: counts exactly, floats to 1e-9, groups by value."""
    def close(a, b):
        return (a is None and b is None) or (
            a is not None and b is not None and abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0))

    for name in ("rows_processed", "rejected_rows", "price_count"):
        assert small[name] == pandas_[name], name
    for name in ("total_sales", "min_price", "max_price", "avg_price"):
        assert close(small[name], pandas_[name]), (name, small[name], pandas_[name])
    mine = {g[0]: g for g in small["groups"]}
    theirs = {g[0]: g for g in pandas_["groups"]}
    assert mine.keys() == theirs.keys() and len(mine) == len(small["groups"])
    for key, group in mine.items():
        assert group[1:3] == theirs[key][1:3] and group[7] == theirs[key][7], key
        assert all(close(a, b) for a, b in zip(group[3:7], theirs[key][3:7])), (group, theirs[key])


_CELL = st.one_of(st.floats(-1e6, 1e6), st.just(float("nan")), st.just(float("inf")),
                  st.just(float("-inf")), st.integers(-50, 50).map(float))


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.tuples(_CELL, _CELL, st.sampled_from(["EU", "NA", "", None, "007"])),
                     max_size=40),
       grouped=st.booleans())
def test_small_chunk_path_agrees_with_the_dataframe_path(rows, grouped):
    """Rule: a small chunk sent as plain arrays (worker.SmallChunk) gives the
    metrics the DataFrame path gives for the same rows, to 1e-9: rejected
    rows (NaN, infinities), --group-by with a missing group, and no rows."""
    group = "Region" if grouped else None
    frame = pd.DataFrame({PRICE: pd.Series([r[0] for r in rows], dtype="float64"),
                          QTY: pd.Series([r[1] for r in rows], dtype="float64")})
    if grouped:
        frame[group] = pd.Series([r[2] for r in rows], dtype="str")
    arrays = {name: frame[name].to_numpy() for name in frame.columns}
    payload = pickle.dumps(worker.SmallChunk.payload(arrays, 0, len(frame), group), protocol=5)
    chunk = worker.load_chunk({"format": "frame", "data": payload})
    assert isinstance(chunk, worker.SmallChunk) and len(chunk) == len(rows)
    try:
        expected = worker.compute_metrics(frame, PRICE, QTY, ".", group)
    except ValueError as exc:   # a total past the float range: the same refusal
        with pytest.raises(ValueError, match="overflows"):
            worker.compute_metrics(chunk, PRICE, QTY, ".", group)
        assert "overflows" in str(exc)
        return
    _same_metrics(worker.compute_metrics(chunk, PRICE, QTY, ".", group), expected)
    pd.testing.assert_frame_equal(chunk.to_frame(), frame)
