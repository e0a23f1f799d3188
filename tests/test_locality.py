"""Data locality in ``--stream``: a worker that has the input file reads its own chunks.

README, "Data locality".  The server names its input in WELCOME (``input_path``,
``input_fingerprint``); a worker that finds the same file there says so in GET_JOB
(``local_read``) and gets JOBs of format ``range`` (the header, and ``start``, ``end``
instead of the bytes).  Checked here, against the oracle (csv module, no pandas):

* a job read locally is exact, and the server sends next to nothing;
* a worker without the file, with another file at that path, or told
  ``--no-local-read`` gets the bytes, and the job is still exact;
* a file modified during the job is a clear failure, on the worker's reads as on
  the server's;
* a hostile server can make a worker read nothing but byte ranges inside the one
  regular file whose fingerprint it verified.
"""

from __future__ import annotations

import os
import re

import pytest

import protocol
import worker
from conftest import (FakeServer, Gate, Server, WorkerThread, assert_aggregate, db_rows,
                      make_sales_csv, parse_final, wait_for)
from conftest import oracle as csv_oracle

PRICE, QTY = "Price", "Quantity"


def small_csv(path, rows: int, seed: int = 0):
    """A generated CSV in the short layout (Order ID,Product,Region,Price,Quantity)."""
    return make_sales_csv(path, rows, seed=seed, columns=f"{PRICE},{QTY}")


def sent_bytes(stderr: str) -> int:
    """The bytes the server says it sent, from its last line."""
    return int(re.search(r"sent (\d+) bytes", stderr).group(1))


def finish_ok(server, timeout: float = 60):
    code, out = server.finish(timeout)
    assert code == 0, f"server exit {code}:\n{server.stderr()}"
    return parse_final(out)


def assert_counted_once(db, chunks: int) -> None:
    results = db_rows(str(db), "SELECT chunk_id FROM chunk_results")
    assert sorted(c for (c,) in results) == list(range(chunks))


# --- whole jobs, real processes -----------------------------------------------------

def test_local_read_gives_the_exact_answer(procs, tmp_path):
    """Rule: workers on the server's machine read their chunks' byte ranges
    themselves; the answer is the oracle's, every chunk counts once, and the
    server sends a few hundred bytes per chunk instead of the chunk."""
    csv = small_csv(tmp_path / "sales.csv", 20_000)
    server = procs.server(csv, args=("--stream", "--chunks", 40))
    # Regression (flaky): one worker could do every chunk before the other had
    # started; that one then reconnected to a server that was gone until it
    # gave up, 20 s later.  The gate (its one chunk sent as bytes) holds the job open.
    gate = Gate(procs, server)
    workers = [procs.worker(server.port, f"w{i}") for i in range(2)]
    gate.open_when_connected(["w0", "w1"])
    assert_aggregate(finish_ok(server), csv_oracle(csv, PRICE, QTY))
    assert_counted_once(server.db, 40)
    assert "reads the chunks from its own copy of the input" in server.stderr()
    # Regression: a RESULT asking for the next chunk when none was pending
    # was answered as a GET_JOB without local_read, so the worker was
    # switched to bytes (and logged so) at the end of every job.
    assert "gets the chunks' bytes" not in server.stderr()
    assert sent_bytes(server.stderr()) < csv.stat().st_size // 20
    for w in workers:
        w.wait(timeout=30)
    assert "reading the chunks from" in procs.worker_log("w0") + procs.worker_log("w1")


@pytest.mark.parametrize("case", ["missing", "different", "no-local-read"])
def test_worker_without_the_same_file_gets_the_bytes(procs, tmp_path, case):
    """Rule: a worker that cannot open the server's input (here: the file was
    renamed away after the server opened it, as on a machine without it), or
    finds another file at that path (renamed over it: another fingerprint), or
    is told ``--no-local-read``, gets the chunks' bytes from the server, and
    the job is exact for the file the server cut."""
    csv = small_csv(tmp_path / "sales.csv", 5_000)
    original = tmp_path / "original.csv"
    server = procs.server(csv, args=("--stream", "--chunks", 4))
    worker_args = ()
    if case == "missing":
        os.rename(csv, original)          # the server reads its open descriptor
    else:
        os.link(csv, original)
        if case == "different":
            other = small_csv(tmp_path / "other.csv", 5_000, seed=7)
            os.replace(other, csv)       # the same path, another file
        else:
            worker_args = ("--no-local-read",)
    w = procs.worker(server.port, "w0", worker_args)
    assert_aggregate(finish_ok(server), csv_oracle(original, PRICE, QTY))
    assert_counted_once(server.db, 4)
    assert "reads the chunks from its own copy" not in server.stderr()
    assert sent_bytes(server.stderr()) > original.stat().st_size
    w.wait(timeout=30)
    if case != "no-local-read":
        assert "not the server's file: the server sends the chunks" in procs.worker_log("w0")


@pytest.mark.timeout(90)
def test_file_modified_during_a_locally_read_job_stops_it(procs, tmp_path):
    """Rule: a file modified in place while workers read it themselves stops the
    job with exit 1 and the reason, never an answer of two versions: the
    server checks the file before every range it hands out, the worker after
    every read (see the next test)."""
    csv = small_csv(tmp_path / "sales.csv", 20_000)
    server = procs.server(csv, args=("--stream", "--chunks", 40))
    procs.worker(server.port, "w0", ("--delay", "0.2"))
    wait_for(lambda: db_rows(server.db, "SELECT COUNT(*) FROM chunk_results")[0][0] >= 1,
             30, "a first chunk to be counted")
    csv.write_bytes(csv.read_bytes().replace(b"3", b"4"))   # same size, other numbers
    code, out = server.finish(60)
    assert code == 1 and "total_rows" not in out
    assert "modified during the job" in server.stderr().splitlines()[-1]


# --- the worker against a scripted server -------------------------------------------

def fingerprint(path) -> str:
    return worker.fingerprint_text(worker.file_fingerprint(str(path)))


def range_job(header: bytes, start: int, end: int, **changes) -> dict:
    """The fields of a ``range`` JOB, as the real server sends it."""
    return {"job_id": "fake", "chunk_id": 0, "attempt_id": 1, "rows": None, "format": "range",
            "data": header, "compressed": False, "price_col": PRICE, "qty_col": QTY,
            "group_col": None, "sep": ",", "decimal": ".", "encoding": "utf-8",
            "start": start, "end": end, **changes}


def play(welcome: dict, jobs: list[dict], before_job=lambda: None):
    """Run a real Worker against a server that sends ``welcome`` and then
    ``jobs``, one per GET_JOB (calling ``before_job()`` first), acknowledging
    each report; then NO_JOB.  Returns ``(exit code, GET_JOBs received,
    reports received)``."""
    asks, reports = [], []

    def script(fake, conn, n):
        for job in jobs:
            asks.append(fake.recv(conn))
            before_job()
            protocol.send_message(conn, protocol.JOB, **job)
            reports.append(fake.recv(conn))
            protocol.send_message(conn, protocol.ACK, chunk_id=job["chunk_id"], counted=True)
        asks.append(fake.recv(conn))
        protocol.send_message(conn, protocol.NO_JOB)

    fake = FakeServer(script, welcome=welcome)
    thread = WorkerThread(fake.port, "victim")
    code = thread.wait(60)
    fake.check()
    return code, asks, reports


def test_worker_reads_its_range_and_is_exact(tmp_path):
    """Rule: given the path and fingerprint of a file it has, the worker says
    ``local_read`` and computes a range JOB from its own reads: the oracle's
    numbers for those records."""
    csv = small_csv(tmp_path / "sales.csv", 1_000)
    data = csv.read_bytes()
    header_end = data.index(b"\n") + 1
    middle = data.index(b"\n", len(data) // 2) + 1
    part = tmp_path / "part.csv"
    part.write_bytes(data[:header_end] + data[header_end:middle])
    code, asks, reports = play(
        {"input_path": str(csv), "input_fingerprint": fingerprint(csv)},
        [range_job(data[:header_end], header_end, middle)])
    assert code == 0
    assert [a.get("local_read") for a in asks] == [True, True]
    assert reports[0]["type"] == protocol.RESULT
    want = csv_oracle(part, PRICE, QTY)
    assert reports[0]["rows_processed"] == want["total_rows"]
    assert reports[0]["total_sales"] == pytest.approx(want["total_sales"], rel=1e-9)


def test_worker_notices_a_file_modified_after_it_verified_it(tmp_path):
    """Rule: the worker checks the file's size and mtime after every read; a
    file modified since its fingerprint was checked fails the attempt with
    the reason (never a result), and the worker stops reading it: its next
    GET_JOB asks for the bytes."""
    csv = small_csv(tmp_path / "sales.csv", 1_000)
    data = csv.read_bytes()
    header_end = data.index(b"\n") + 1
    welcome = {"input_path": str(csv), "input_fingerprint": fingerprint(csv)}
    local = worker.LocalInput.open(str(csv), welcome["input_fingerprint"])
    assert local is not None and local.read(0, 10) == data[:10]
    csv.write_bytes(data.replace(b"3", b"4"))    # in place: same size, new mtime
    os.utime(csv, ns=(0, local.mtime_ns + 1))    # mtime ticks can be coarse
    with pytest.raises(worker.InputChanged, match="modified during the job"):
        local.read(0, 10)
    assert not local.is_open()

    # The same through a worker's loop: verified at WELCOME, changed before the JOB.
    csv.write_bytes(data)
    welcome["input_fingerprint"] = fingerprint(csv)
    stamp = csv.stat().st_mtime_ns

    def modify():
        csv.write_bytes(data.replace(b"3", b"4"))
        os.utime(csv, ns=(0, stamp + 1))

    code, asks, reports = play(welcome, [range_job(data[:header_end], header_end, len(data))],
                               before_job=modify)
    assert code == 0
    assert reports[0]["type"] == protocol.FAILED and "modified during the job" in reports[0]["error"]
    assert [a.get("local_read") for a in asks] == [True, False]


@pytest.mark.parametrize("where", ["missing", "other-file", "relative", "fifo", "device",
                                   "folder"])
def test_worker_opens_only_the_regular_file_it_can_verify(tmp_path, monkeypatch, where):
    """Rule: the path in WELCOME comes from a server that may be hostile.  The
    worker opens nothing but an absolute path to a regular file (never a FIFO,
    which would block it, or a device, whose open may act), and reads it only
    if its fingerprint is the server's; otherwise it asks for the bytes
    (``local_read`` False), and a range JOB then fails instead of reading."""
    csv = small_csv(tmp_path / "sales.csv", 200)
    other = small_csv(tmp_path / "other.csv", 200, seed=3)
    path = {"missing": str(tmp_path / "nothing.csv"), "other-file": str(other),
            "relative": os.path.relpath(csv), "fifo": str(tmp_path / "fifo"),
            "device": "/dev/zero", "folder": str(tmp_path)}[where]
    if where == "fifo":
        os.mkfifo(path)
    welcome = {"input_path": path, "input_fingerprint": fingerprint(csv)}
    opened, real_open = [], os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **kw: opened.append(p) or real_open(p, *a, **kw))
    assert worker.LocalInput.open(path, welcome["input_fingerprint"]) is None
    monkeypatch.undo()
    if where in ("fifo", "device", "folder"):
        assert opened == []          # not even opened
    code, asks, reports = play(welcome, [range_job(b"Price,Quantity\n", 0, 100)])
    assert code == 0
    assert [a.get("local_read") for a in asks] == [False, False]
    assert reports[0]["type"] == protocol.FAILED
    assert "did not offer to read the input" in reports[0]["error"]


@pytest.mark.parametrize("start,end", [(-1, 10), (10, 5), (0, 10 ** 9), (2 ** 62, 2 ** 62 + 1)])
def test_worker_reads_no_byte_outside_its_file(tmp_path, start, end):
    """Rule: a range JOB can only name bytes inside the verified file: a range
    before its start, reversed or past its end fails the attempt (FAILED,
    naming the range) and reads nothing."""
    csv = small_csv(tmp_path / "sales.csv", 200)
    welcome = {"input_path": str(csv), "input_fingerprint": fingerprint(csv)}
    code, asks, reports = play(welcome, [range_job(b"Price,Quantity\n", start, end)])
    assert code == 0
    assert reports[0]["type"] == protocol.FAILED
    assert f"range {start}-{end} is outside" in reports[0]["error"]


# --- the --stream server imports no pandas ------------------------------------------

# Put first on a process's PYTHONPATH, Python imports it at start-up (as
# tools/bench.py's rusage hook); at exit it says whether pandas was imported.
PANDAS_PROBE = """
import atexit, sys
atexit.register(lambda: print("pandas imported:", "pandas" in sys.modules, file=sys.stderr))
"""


@pytest.mark.parametrize("mode", ["stream", "frame"])
def test_only_a_server_that_parses_imports_pandas(procs, tmp_path, mode):
    """Rule: a --stream server parses nothing, so it never imports pandas (0.3-0.4 s
    of its start); the documented mode's server parses the chunks and does
    (which shows that the probe sees an import).  Whole jobs, exact."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(PANDAS_PROBE)
    env = dict(os.environ, PYTHONPATH=str(probe))
    csv = small_csv(tmp_path / "sales.csv", 2_000)
    args = ("--stream",) if mode == "stream" else ()
    server = Server(procs, tmp_path, csv, args=("--chunks", 4, *args), env=env)
    server.wait_port()
    procs.worker(server.port, "w0")
    assert_aggregate(finish_ok(server), csv_oracle(csv, PRICE, QTY))
    assert f"pandas imported: {mode == 'frame'}" in server.stderr()


def test_text_readings_are_number_readings():
    """Rule: the server's pandas-free reading of its head sample
    (worker.text_readings) is worker.number_readings, the one cleaning rule:
    the same cells are numbers under each mark, with the same values (to the
    last bits pandas' parser may lose in a large exponent), so the
    decimal-mark guess is the same."""
    import random

    import numpy as np
    import pandas as pd
    rng = random.Random(5)
    alphabet = "0123456789.,eE+- $'"
    cells = ["inf", "-Infinity", "nan", "1_000", "\u0661\u0662", "0x10", "1.", ".", ",", ".5",
             "1,234.50", "1.234,50", "0,125", "0.125", "1.234", "2,125", "", "USD 12", "1'234",
             "1,2,3", "12,000", "0.125,5", "€ 2,50"]
    cells += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9)))
              for _ in range(20_000)]
    mine = worker.text_readings(cells)
    theirs = [r.to_numpy() for r in worker.number_readings(pd.Series(cells, dtype=object))]
    for a, b in zip(mine, theirs):
        assert (np.isnan(a) == np.isnan(b)).all()
        assert np.allclose(a, b, rtol=1e-15, atol=0, equal_nan=True)
    differs = [~np.isnan(p) & ~np.isnan(c) & (p != c) for p, c in (mine, theirs)]
    assert (differs[0] == differs[1]).all()
