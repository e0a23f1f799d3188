"""tools/bench.py and the performance changes of issue 6.

What this file checks (no test measures or asserts a time: the machine is
shared, and timings belong in tools/bench.py's report, not in a test):

* ``bench.py --json`` runs every mode once on a few thousand rows, prints
  one parseable JSON document, and every mode's answer equals an
  independent pandas computation to 1e-9 relative;
* ``bench.compare`` flags a wrong answer: counts exactly, floats to 1e-9;
* ``--stream`` works with the default encoding (utf-8-sig), which it
  refused before;
* ``record_boundaries`` (which now skips counting quotes in quote-free
  blocks) still finds the same record starts as a plain scan;
* ``ChunkBook`` (whose finished check now resumes where it stopped) sets
  ``finished`` exactly when the last chunk ends, in any order;
* ``compute_metrics`` (now numpy inside) gives the pandas answer;
* a GET_JOB that arrives while the last chunk is being computed is held
  and answered NO_JOB when that chunk completes (no WAIT, no sleep);
* ``worker.py --port-file`` waits for the file and stops on SIGTERM.
"""

from __future__ import annotations

import json
import math
import random
import signal
import socket
import subprocess
import threading

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
import server as server_mod
import worker as worker_mod
from conftest import (PY, ROOT, assert_aggregate, db_rows, make_sales_csv, pandas_oracle,
                      parse_final, wait_for)
from db_utils import ResultStore
from tools import bench


# --- the benchmark itself ----------------------------------------------------------

@pytest.mark.timeout(120)
def test_bench_json_every_mode_matches_pandas(tmp_path):
    """Every mode of bench.py runs once, --json parses, and each answer is the pandas one."""
    csv = make_sales_csv(tmp_path / "sales.csv", 3000, seed=3)
    out = subprocess.run(
        [PY, str(ROOT / "tools" / "bench.py"), "--csv", str(csv), "--reps", "1", "--json",
         "--chunks", "4", "--work-dir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    expected = pandas_oracle(csv, "Unit Price", "Units Sold")
    modes = report["modes"]
    assert set(modes) == set(bench.MODES)
    for mode, summary in modes.items():
        if "skipped" in summary:
            assert mode == "duckdb", f"{mode} skipped: {summary['skipped']}"
            continue
        assert summary["exact"], f"{mode}: {summary['problems']}"
        assert_aggregate(summary["result"], expected, rel=1e-9)
        assert summary["wall_s"] > 0 and summary["cpu_s"] > 0
    for mode in bench.CLUSTER_MODES:
        # The rusage hook reported both roles, and the server counted its bytes.
        assert modes[mode]["server_rss_mib"] > 0 and modes[mode]["worker_rss_mib"] > 0
        assert modes[mode]["bytes_sent"] > 0
        assert {"inspect", "serialize", "send", "db", "wait"} <= set(modes[mode]["phases_s"])
    # --stream sends the raw text, far more than two float columns; zlib shrinks both.
    assert modes["stream"]["bytes_sent"] > modes["frame"]["bytes_sent"]
    assert modes["frame-zlib"]["bytes_sent"] < modes["frame"]["bytes_sent"]
    assert modes["stream-zlib"]["bytes_sent"] < modes["stream"]["bytes_sent"]


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
    assert_aggregate(final, pandas_oracle(csv, "Price", "Qty"))


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


def test_chunkbook_finishes_exactly_at_the_last_chunk_in_any_order():
    """finished is set by the last chunk to end (DONE or FAILED), whatever the
    order, and not before; a late result for a FAILED chunk keeps it set."""
    rng = random.Random(7)
    for _ in range(20):
        chunks = rng.randint(1, 30)
        done = set(rng.sample(range(chunks), rng.randint(0, chunks - 1)))
        book = server_mod.ChunkBook(chunks, 60.0, max_attempts=1, done=done)
        leases = [book.lease("w", conn=1) for _ in range(chunks - len(done))]
        rng.shuffle(leases)
        for lease in leases:
            assert not book.finished.is_set()
            if rng.random() < 0.3:
                assert book.fail(lease.chunk_id, lease.attempt_id, "boom")
            else:
                book.complete(lease.chunk_id, lease.attempt_id)
        assert book.finished.is_set()
        if leases:
            book.complete(leases[0].chunk_id, leases[0].attempt_id)
            assert book.finished.is_set()


# --- worker.py -------------------------------------------------------------------

_VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                    st.integers(-10**6, 10**6), st.none(),
                    st.sampled_from(["2.50", "TBD", "", "1,234.50", "inf"]))


@settings(max_examples=100, deadline=None)
@given(prices=st.lists(_VALUES, max_size=30), qtys=st.lists(_VALUES, max_size=30))
def test_compute_metrics_equals_the_pandas_computation(prices, qtys):
    """compute_metrics (numpy inside) gives what the same rule computed with
    pandas Series gives: valid rows have a finite price and quantity."""
    n = min(len(prices), len(qtys))
    df = pd.DataFrame({"Price": pd.Series(prices[:n], dtype=object),
                       "Qty": pd.Series(qtys[:n], dtype=object)})
    price = worker_mod.to_number(df["Price"])
    qty = worker_mod.to_number(df["Qty"])
    valid = price.notna() & qty.notna()
    ok = price[valid]
    with np.errstate(all="ignore"):
        overflow = not all(math.isfinite(x) for x in ((ok * qty[valid]).sum(), ok.mean())
                           if not math.isnan(x))
    if overflow:   # totals past 1.8e308 are a clear error, not an infinite result
        with pytest.raises(ValueError, match="overflows"):
            worker_mod.compute_metrics(df, "Price", "Qty")
        return
    got = worker_mod.compute_metrics(df, "Price", "Qty")
    assert got["rows_processed"] == n
    assert got["price_count"] == int(valid.sum())
    assert got["rejected_rows"] == n - int(valid.sum())
    with np.errstate(all="ignore"):   # huge values may overflow: inf (or nan) on both sides
        assert _same(got["total_sales"], float((ok * qty[valid]).sum()))
        if len(ok):
            assert (got["min_price"], got["max_price"]) == (float(ok.min()), float(ok.max()))
            assert _same(got["avg_price"], float(ok.mean()))
        else:
            assert got["min_price"] is got["max_price"] is got["avg_price"] is None


def _same(a: float, b: float) -> bool:
    """Equal to 1e-12 relative, or the same inf, or both nan."""
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12)


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
    the server writes the file, and the job's answer is the pandas one."""
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
    assert_aggregate(parse_final(out), pandas_oracle(csv, "Unit Price", "Units Sold"))


# --- the held GET_JOB ----------------------------------------------------------------

class _Client:
    """A bare protocol client: handshake, HELLO, then one request at a time."""

    def __init__(self, port: int, worker_id: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        protocol.client_handshake(self.sock, b"")
        self.worker_id = worker_id
        assert self.ask({"type": protocol.HELLO, "worker_id": worker_id})["type"] == protocol.WELCOME

    def send(self, message: dict) -> None:
        protocol.send_message(self.sock, message.pop("type"), **message)

    def reply(self) -> dict:
        return protocol.recv_message(self.sock, protocol.WORKER_MAX_FRAME)

    def ask(self, message: dict) -> dict:
        self.send(dict(message))
        return self.reply()


@pytest.mark.timeout(60)
def test_get_job_is_held_until_the_last_chunk_completes(tmp_path):
    """While the only chunk is leased, a second worker's GET_JOB gets no WAIT:
    it is held, and answered NO_JOB as soon as the first worker's RESULT
    completes the job (wait_interval is 30 s, so a WAIT could only come first)."""
    csv = make_sales_csv(tmp_path / "s.csv", 200, seed=8)
    info = server_mod.inspect_csv(str(csv))
    chunks = server_mod.FrameChunks(info, 1, None, False)
    book = server_mod.ChunkBook(1, 60.0, 4)
    asked = threading.Event()
    lease = book.lease

    def spy(worker_id, conn):
        result = lease(worker_id, conn)
        if worker_id == "b" and result is None:
            asked.set()     # b's GET_JOB reached the book and found nothing pending
        return result

    book.lease = spy
    store = ResultStore(str(tmp_path / "r.sqlite"))
    store.open_job("job", str(csv), "identity", 1)
    srv = server_mod.JobServer(("127.0.0.1", 0), chunks, book, store, "job", info,
                               wait_interval=30.0)
    serving = threading.Thread(target=srv.serve_forever, args=(0.05,))
    serving.start()
    try:
        port = srv.server_address[1]
        a, b = _Client(port, "a"), _Client(port, "b")
        job = a.ask({"type": protocol.GET_JOB})
        assert job["type"] == protocol.JOB
        b.send({"type": protocol.GET_JOB})
        assert asked.wait(30)
        metrics = worker_mod.compute_metrics(worker_mod.load_chunk(job), job["price_col"],
                                             job["qty_col"])
        ack = a.ask({"type": protocol.RESULT, "job_id": "job", "worker_id": "a",
                     "chunk_id": job["chunk_id"], "attempt_id": job["attempt_id"], **metrics})
        assert ack["type"] == protocol.ACK and ack["counted"]
        assert b.reply()["type"] == protocol.NO_JOB
        for client in (a, b):
            client.sock.close()
    finally:
        srv.shutdown()
        srv.close_all()
        serving.join()
        srv.server_close()
        store.close()
        chunks.close()
    expected = pandas_oracle(csv, "Unit Price", "Units Sold")
    (total,) = db_rows(str(tmp_path / "r.sqlite"), "SELECT SUM(total_sales) FROM chunk_results")
    assert math.isclose(total[0], expected["total_sales"], rel_tol=1e-9)
