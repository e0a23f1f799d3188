"""Shared test helpers, each written once, and the fixtures that clean up after them.

* Processes: every server binds port 0 and reports the port it got through
  ``--port-file``; every process and every client connection a test opens
  is registered with the ``procs`` fixture, which closes, kills and reaps
  whatever is still open when the test ends.
* In-process: :class:`JobHarness` (the ``job_server`` fixture) runs a real
  ``server.JobServer`` in a thread of the test process, with a store the
  test can hold still (:class:`GatedStore`), and :class:`WorkerThread` runs
  a real ``worker.Worker`` loop in a thread; :class:`FakeServer` is a
  scripted server for a worker to talk to.
* The one protocol client (:class:`Client`), the one oracle
  (:func:`oracle`, :func:`oracle_groups`: the csv module and a number
  cleaner of its own, no pandas), the one aggregate comparison
  (:func:`assert_aggregate`), the one fake clock (:class:`FakeClock`), one
  :func:`free_port` and one :func:`parse_final`.

Waiting is always on a condition with a deadline (:func:`wait_for`), never
a bare sleep.
"""

from __future__ import annotations

import ast
import csv
import math
import os
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import protocol

ROOT = Path(__file__).resolve().parent.parent
SHARED_CASES = ROOT.parent / "shared" / "cases"
PY = sys.executable


# --- waiting, ports, clocks ------------------------------------------------------

def wait_for(condition, timeout: float, what: str, interval: float = 0.02):
    """Poll ``condition()`` until it returns a truthy value; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A loopback port that was free a moment ago (for restarts on the same port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeClock:
    """A clock the test moves by hand (seconds); pass it as ``clock=``."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- the oracle: what the answer must be, computed without the project's code ----

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NOISE = ("USD", "EUR", "GBP", "$", "€", "£", " ", "\u00a0", "'")


def clean_number(cell: str, decimal: str = ".") -> float | None:
    """The oracle's own cleaner: the cell's value, or None if it is not a finite number.

    Drops currency signs and codes, spaces and apostrophes; removes
    thousands marks only where they group the integer part by three; then
    the text must be a plain decimal number.  Written from the result
    contract, sharing no code with ``worker.to_number``.
    """
    text = cell
    for noise in _NOISE:
        text = text.replace(noise, "")
    thousands = "," if decimal == "." else "."
    whole, mark, fraction = text.partition(decimal)
    if thousands in whole:
        groups = whole.lstrip("+-").split(thousands)
        if not (1 <= len(groups[0]) <= 3 and all(g.isdigit() for g in groups)
                and all(len(g) == 3 for g in groups[1:]) and not groups[0].startswith("0")):
            return None   # a first group of "0" groups nothing: "0,125" is never 125
        whole = whole.replace(thousands, "")
    text = whole + ("." + fraction if mark else "")
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _records(path, sep: str, encoding: str) -> tuple[list, list]:
    """(header, data records) of a CSV file, read with the csv module."""
    with open(path, encoding=encoding, newline="") as f:
        records = [r for r in csv.reader(f, delimiter=sep) if r]   # [] is a blank line
    return (records[0], records[1:]) if records else ([], [])


def _column(header: list, column) -> int:
    return column if isinstance(column, int) else header.index(column)


def _stats(pairs: list) -> dict:
    """The aggregate of ``[(price, qty) or None per record]`` (None: rejected)."""
    valid = [pair for pair in pairs if pair is not None]
    prices = [price for price, _ in valid]
    return {"total_rows": len(pairs), "rejected_rows": len(pairs) - len(valid),
            "total_sales": math.fsum(price * qty for price, qty in valid),
            "min_price": min(prices, default=None), "max_price": max(prices, default=None),
            "avg_price": math.fsum(prices) / len(prices) if prices else None}


def _pairs(path, price, qty, sep, decimal, encoding, group=None):
    header, records = _records(path, sep, encoding)
    p, q = _column(header, price), _column(header, qty)
    g = None if group is None else _column(header, group)
    for record in records:
        cells = record + [""] * (max(p, q, g or 0) + 1 - len(record))
        price_value, qty_value = clean_number(cells[p], decimal), clean_number(cells[q], decimal)
        pair = None if price_value is None or qty_value is None else (price_value, qty_value)
        yield (None if g is None else cells[g] or None), pair


def oracle(path, price, qty, sep: str = ",", decimal: str = ".",
           encoding: str = "utf-8-sig") -> dict:
    """The expected final aggregate of a CSV file, in one process, without pandas.

    ``price`` and ``qty`` are column names (or indexes).  Records come from
    the csv module, numbers from :func:`clean_number`; a record counts when
    both its price and its quantity are finite numbers (the result
    contract); sums are exactly rounded (``math.fsum``).
    """
    return _stats([pair for _, pair in _pairs(path, price, qty, sep, decimal, encoding)])


def oracle_groups(path, price, qty, group, sep: str = ",", decimal: str = ".",
                  encoding: str = "utf-8-sig") -> dict:
    """``{group value or None: aggregate}`` per value of column ``group`` (an
    empty cell is the None group), computed as :func:`oracle` does."""
    groups: dict = {}
    for key, pair in _pairs(path, price, qty, sep, decimal, encoding, group):
        groups.setdefault(key, []).append(pair)
    return {key: _stats(pairs) for key, pairs in groups.items()}


def assert_aggregate(actual: dict, expected: dict, rel: float = 1e-9) -> None:
    """Every key of ``expected`` matches ``actual``: counts and None exactly,
    other numbers to ``rel`` relative (1e-9, the project's standard)."""
    for key, want in expected.items():
        got = actual[key]
        if want is None or got is None or key.endswith("rows") or key == "price_count":
            assert got == want, f"{key}: got {got!r}, expected {want!r}"
        else:
            assert got == pytest.approx(want, rel=rel, abs=1e-12), \
                f"{key}: got {got!r}, expected {want!r}"


def parse_final(stdout: str) -> dict:
    """The final aggregate dict from the server's stdout."""
    for line in stdout.splitlines():
        if line.startswith("{'total_rows'"):
            return ast.literal_eval(line)
    raise AssertionError(f"no final aggregate in server output:\n{stdout}")


# --- the one protocol client ---------------------------------------------------------

class Client:
    """One hand-driven connection to a server: a scripted worker, or an attacker.

    Speaks the real protocol one step at a time, so a test decides exactly
    when a chunk is taken and when its result is sent, or sends raw bytes.
    ``name`` is the ``host:port`` the server sees and logs.  Close it (or
    open it with ``procs.client``/``JobHarness.client``, which do).
    """

    def __init__(self, port: int, timeout: float = 30, tls: ssl.SSLContext | None = None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.name = "%s:%s" % self.sock.getsockname()[:2]
        self.worker_id = None
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def handshake(self, secret: bytes = b"") -> "Client":
        protocol.client_handshake(self.sock, secret)
        return self

    def hello(self, worker_id: str) -> dict:
        """Say HELLO as ``worker_id``; return the WELCOME."""
        self.worker_id = worker_id
        welcome = self.ask({"type": protocol.HELLO, "worker_id": worker_id})
        assert welcome["type"] == protocol.WELCOME, welcome
        return welcome

    def send(self, message: dict) -> None:
        protocol.send_frame(self.sock, protocol.encode(message))

    def recv(self) -> dict:
        return protocol.recv_message(self.sock, protocol.WORKER_MAX_FRAME)

    def ask(self, message: dict) -> dict:
        """Send ``message``, return the reply."""
        self.send(message)
        return self.recv()

    def get_job(self) -> dict:
        return self.ask({"type": protocol.GET_JOB})

    def take(self) -> dict:
        """GET_JOB, which must be answered with a JOB."""
        job = self.get_job()
        assert job["type"] == protocol.JOB, job
        return job

    def result_for(self, job: dict, **changes) -> dict:
        """The RESULT a real worker would send for ``job`` (computed by worker.py)."""
        import worker  # here: only tests that compute pay for pandas in-process
        metrics = worker.compute_metrics(worker.load_chunk(job), job["price_col"],
                                         job["qty_col"], job["decimal"], job["group_col"])
        return {"type": protocol.RESULT, "job_id": job["job_id"], "worker_id": self.worker_id,
                "chunk_id": job["chunk_id"], "attempt_id": job["attempt_id"], **metrics,
                **changes}

    def send_result(self, job: dict) -> dict:
        """Compute the chunk of ``job``, send its RESULT; return the reply."""
        return self.ask(self.result_for(job))

    def send_failed(self, job: dict, error: str) -> dict:
        """Report the attempt of ``job`` as failed; return the reply."""
        return self.ask({"type": protocol.FAILED, "job_id": job["job_id"],
                         "worker_id": self.worker_id, "chunk_id": job["chunk_id"],
                         "attempt_id": job["attempt_id"], "error": error})

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def nothing_arrives(self, seconds: float = 0.5) -> bool:
        """True if no byte arrives within ``seconds`` (and the link is open).

        Used only where the server is provably blocked (held inside the
        store by the test), so a byte that arrived would be a broken rule,
        not a slow machine.
        """
        self.sock.settimeout(seconds)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(30)
        return False   # a byte arrived, or the server closed the connection

    def closed_by_server(self, timeout: float = 15) -> bool:
        """Read until the server closes the connection; True once it has."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


def framed(payload: bytes) -> bytes:
    """``payload`` as one frame on the wire: its 4-byte big-endian length, then it."""
    return len(payload).to_bytes(4, "big") + payload


class RunsCode:
    """Unpickling this runs a shell command (``touch marker``, through os.system):
    the classic pickle attack, made harmless to see whether it ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- in-process servers and workers -----------------------------------------------------

class GatedStore:
    """A ResultStore stand-in whose ``record_result`` the test can hold or break.

    Every call goes to the real store, except that ``record_result`` first
    sets ``entered``, then waits for ``release`` (when ``hold`` is set), and
    raises ``fail`` instead of committing (when it is set).  So a test can
    look at the connection while a commit is provably not done.
    """

    def __init__(self, store):
        self.store = store
        self.hold = False
        self.fail: Exception | None = None
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self.store, name)

    def record_result(self, *args, **kw):
        self.entered.set()
        if self.hold:
            assert self.release.wait(30), "the test never released the store"
        if self.fail is not None:
            raise self.fail
        return self.store.record_result(*args, **kw)


class JobHarness:
    """A real ``server.JobServer`` in a thread of the test process (port 0).

    ``book`` (a ChunkBook with a :class:`FakeClock`: leases expire only
    when the test calls ``book.expire()``), ``store`` (a :class:`GatedStore`
    over an in-memory SQLite ResultStore) and ``server`` are the real
    objects, so a test can look at them directly.  :meth:`client` opens
    connections that are closed at the end; :meth:`stop` shuts everything
    down and joins the threads.
    """

    JOB_ID = "job"

    def __init__(self, csv_path, chunks: int = 2, lease_timeout: float = 60.0,
                 max_attempts: int = 4, wait_interval: float = 0.05, group_col=None):
        import server
        from db_utils import ResultStore
        self.info = server.inspect_csv(str(csv_path), group_col=group_col)
        self.chunks = server.FrameChunks(self.info, chunks, None, False)
        self.clock = FakeClock()
        self.book = server.ChunkBook(len(self.chunks), lease_timeout, max_attempts,
                                     clock=self.clock)
        self.store = GatedStore(ResultStore(":memory:"))
        self.store.open_job(self.JOB_ID, str(csv_path), "identity", len(self.chunks))
        self.server = server.JobServer(("127.0.0.1", 0), self.chunks, self.book, self.store,
                                       self.JOB_ID, self.info, wait_interval=wait_interval)
        self.chunks.start((), self.server.fail_job, self.server.timings)
        self.port = self.server.server_address[1]
        self._clients: list[Client] = []
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                        name="job-server")
        self._thread.start()

    def client(self, worker_id: str | None = None) -> Client:
        """A connected client, past the handshake and HELLO when ``worker_id`` is given."""
        client = Client(self.port, timeout=30)
        self._clients.append(client)
        if worker_id is not None:
            client.handshake().hello(worker_id)
        return client

    def attempts(self) -> list[tuple]:
        """``(attempt_id, chunk_id, worker_id, outcome)`` of every attempt."""
        return [(a["attempt_id"], a["chunk_id"], a["worker_id"], a["outcome"])
                for a in self.store.attempts(self.JOB_ID)]

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self.store.release.set()
        self.server.shutdown()
        self.server.close_all()
        self._thread.join(30)
        self.server.server_close()   # joins the handler threads
        self.chunks.close()
        self.store.close()


@pytest.fixture
def job_server(tmp_path):
    """A factory of :class:`JobHarness` servers on a small CSV; all stopped afterwards.

    ``job_server(rows=[(price, qty), ...], chunks=2, ...)``; the default
    rows are ``(1.0, 1), (2.0, 2), (3.0, 3), (4.0, 4)``.
    """
    started = []

    def start(rows=((1.0, 1), (2.0, 2), (3.0, 3), (4.0, 4)), **kw) -> JobHarness:
        path = tmp_path / f"job-{len(started)}.csv"
        path.write_text("Price,Qty\n" + "".join(f"{p},{q}\n" for p, q in rows))
        started.append(JobHarness(path, **kw))
        return started[-1]

    yield start
    for harness in started:
        harness.stop()


class WorkerThread(threading.Thread):
    """``worker.Worker``'s main loop in a thread; ``wait`` mirrors Popen.wait.

    The same code as a worker.py process, without paying a pandas import
    per worker.  ``port`` may be a callable, called in the thread, for a
    server whose port is not known yet.
    """

    def __init__(self, port, name: str, secret: bytes = b"", tls_ca: str | None = None,
                 give_up_after: float = 20, io_timeout: float = 30):
        import worker  # here, not at the top: pandas is imported only when needed
        super().__init__(daemon=True, name=name)
        self.port = port
        self.worker = worker.Worker("127.0.0.1", 0, name, secret, tls_ca,
                                    give_up_after=give_up_after, io_timeout=io_timeout)
        self.code = None
        self.start()

    def run(self):
        try:
            self.worker.port = self.port() if callable(self.port) else self.port
            self.code = self.worker.run()
        finally:
            self.worker.disconnect()

    def wait(self, timeout: float) -> int | None:
        self.join(timeout)
        return self.code


class FakeServer(threading.Thread):
    """A scripted server for one worker: the real handshake (no secret), then
    for each accepted connection ``script(self, conn, n)`` (n counts from 0),
    until it returns False or the listener times out.

    Everything the worker sends through :meth:`recv` is kept in
    ``received``; an exception in the script is kept in ``error`` (and the
    connection dropped) for the test to report.  :meth:`welcome` answers the
    worker's HELLO, with the fields of ``welcome`` added to its WELCOME.
    """

    def __init__(self, script, connections: int = 1, welcome: dict | None = None):
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.port = self.listener.getsockname()[1]
        self.script, self.connections = script, connections
        self.welcome_fields = welcome or {}
        self.received: list[dict] = []
        self.error = None
        self.start()

    def recv(self, conn) -> dict:
        message = protocol.recv_message(conn, 1 << 20)
        self.received.append(message)
        return message

    def welcome(self, conn) -> None:
        """Handshake, HELLO, WELCOME: the start of every connection."""
        conn.settimeout(30)
        protocol.server_handshake(conn, b"")
        assert self.recv(conn)["type"] == protocol.HELLO
        protocol.send_message(conn, protocol.WELCOME, job_id="fake", chunks=1,
                              lease_timeout=60, max_frame=1 << 20, **self.welcome_fields)

    def run(self):
        try:
            for n in range(self.connections):
                conn, _ = self.listener.accept()
                with conn:
                    self.welcome(conn)
                    self.script(self, conn, n)
                    if conn.fileno() == -1:
                        continue                 # the script dropped the connection
                    try:
                        while conn.recv(65536):  # until the worker hangs up
                            pass
                    except OSError:
                        pass
        except Exception as exc:  # reported by the test
            self.error = exc
        finally:
            self.listener.close()

    def check(self) -> None:
        """Join the thread; fail the test with the script's error, if any."""
        self.join(30)
        assert self.error is None, repr(self.error)


JOB_FIELDS = {"job_id": "fake", "chunk_id": 0, "attempt_id": 1, "rows": None,
              "format": "frame", "compressed": False, "price_col": "Price", "qty_col": "Qty",
              "group_col": None, "sep": ",", "decimal": ".", "encoding": "utf-8"}


def job_message(rows=((2.5, 2), (4.0, 3)), **changes) -> dict:
    """The fields of a JOB as the real server sends it (a pickled DataFrame
    of ``rows`` as (Price, Qty)), with ``changes``; a change to ``...``
    drops the field."""
    import pickle

    import pandas as pd
    frame = pd.DataFrame(list(rows), columns=["Price", "Qty"])
    fields = {**JOB_FIELDS, "data": pickle.dumps(frame), **changes}
    return {k: v for k, v in fields.items() if v is not ...}


# --- real processes ------------------------------------------------------------------

class Server:
    """A ``server.py`` subprocess on a free loopback port; its stderr goes to a file."""

    def __init__(self, procs, tmp_path: Path, csv, db=None, args=(), env=None, **popen):
        self.tmp = tmp_path
        self.db = str(db or tmp_path / "results.sqlite")
        self.port_file = tmp_path / f"server-{len(procs.started)}.port"
        self.log_path = tmp_path / f"server-{len(procs.started)}.log"
        if self.port_file.exists():
            self.port_file.unlink()
        cmd = [PY, str(ROOT / "server.py"), "--csv", str(csv), "--host", "127.0.0.1",
               "--port", "0", "--port-file", str(self.port_file), "--db", self.db,
               "--linger", "0.5", *map(str, args)]
        with open(self.log_path, "w") as log:   # the child keeps its own descriptor
            self.proc = procs.popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                    env=env, **popen)
        self.port = None

    def wait_port(self, timeout: float = 60) -> int:
        """Wait until the server listens; return its port (fail if it exited)."""
        def ready():
            if self.port_file.exists():
                text = self.port_file.read_text().strip()
                return int(text) if text else None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.stderr()}")
            return None
        self.port = wait_for(ready, timeout, "the server to listen")
        return self.port

    def finish(self, timeout: float = 90) -> tuple[int, str]:
        """Wait for the server to exit; return (exit code, stdout)."""
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out

    def stderr(self) -> str:
        return self.log_path.read_text()


class Procs:
    """Starts subprocesses and client connections; all are gone when the test ends."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.started: list[subprocess.Popen] = []
        self.clients: list = []   # Client objects and raw sockets: anything with close()

    def popen(self, cmd, **kw) -> subprocess.Popen:
        kw.setdefault("cwd", ROOT)
        proc = subprocess.Popen(cmd, **kw)
        self.started.append(proc)
        return proc

    def server(self, csv, db=None, args=(), env=None) -> Server:
        """Start ``server.py`` on ``csv`` and wait until it listens."""
        server = Server(self, self.tmp, csv, db, args, env)
        server.wait_port()
        return server

    def worker(self, port: int, worker_id: str, args=(), env=None) -> subprocess.Popen:
        """Start ``worker.py`` against ``port``; its log goes to tmp_path.

        With a fault option in ``args`` (``--delay``, ``--crash-rate``...)
        the process is tools/flaky_worker.py: the same worker, faults around it.
        """
        program = "worker.py"
        if args:
            from tools.flaky_worker import FAULT_OPTIONS   # imports pandas: only when needed
            if any(str(a) in FAULT_OPTIONS for a in args):
                program = "tools/flaky_worker.py"
        cmd = [PY, str(ROOT / program), "--server", "127.0.0.1", "--port", str(port),
               "--worker-id", worker_id, "--give-up-after", "20", *map(str, args)]
        with open(self.tmp / f"{worker_id}-{len(self.started)}.log", "w") as log:
            return self.popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def worker_log(self, name: str) -> str:
        """The output of the worker.py process(es) started as ``name``."""
        return "".join(path.read_text() for path in sorted(self.tmp.glob(f"{name}-*.log")))

    def client(self, port: int, worker_id: str | None = None, secret: bytes = b"",
               **kw) -> Client:
        """A :class:`Client` closed at the end of the test; past the handshake and
        HELLO when ``worker_id`` is given."""
        client = Client(port, **kw)
        self.clients.append(client)
        if worker_id is not None:
            client.handshake(secret).hello(worker_id)
        return client

    def cleanup(self) -> None:
        for client in self.clients:
            client.close()
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
        for proc in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def procs(tmp_path):
    """Start servers, workers and clients; all of them are gone afterwards."""
    p = Procs(tmp_path)
    yield p
    p.cleanup()


class Gate:
    """Keeps a job open until the named workers have connected.

    A small job can end in a fraction of a second, before a worker started
    a moment later has connected; that worker then retries a server that is
    gone and exits 1.  The gate takes one chunk first and finishes it only
    once every named worker is in the server's log, so they all take part.
    """

    def __init__(self, procs, server):
        self.server = server
        self.client = procs.client(server.port, "gate")
        self.job = self.client.take()

    def open_when_connected(self, names, timeout: float = 45) -> None:
        wait_for(lambda: all(f"worker {n} connected" in self.server.stderr() for n in names),
                 timeout, f"workers {names} to connect")
        assert self.client.send_result(self.job)["type"] == protocol.ACK
        self.client.close()


def run_job(procs, csv, workers=2, server_args=(), worker_args=(), db=None,
            timeout: float = 90) -> tuple[dict, Server]:
    """Run a whole job with ``workers`` workers; return (final aggregate, server)."""
    server = procs.server(csv, db, server_args)
    workers = [procs.worker(server.port, f"w{i}", worker_args) for i in range(workers)]
    code, out = server.finish(timeout)
    assert code == 0, f"server exit {code}:\n{server.stderr()}"
    # Not asserted here: on a loaded machine a worker may start after a small
    # job has ended and exit 1 ("unreachable"). Tests that care use a Gate.
    server.worker_codes = [wait_or_kill(w, 10) for w in workers]
    server.stdout = out
    return parse_final(out), server


def wait_or_kill(proc: subprocess.Popen, timeout: float) -> int | None:
    """The process's exit code, or None if it had to be killed after ``timeout`` s."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return None


def db_rows(db: str, sql: str, params=()) -> list[tuple]:
    """Run a read-only query against a results database."""
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def make_sales_csv(path: Path, rows: int, seed: int = 0, columns=None) -> Path:
    """A generated sales CSV (see tools/make_csv.py)."""
    from tools.make_csv import write_csv
    write_csv(path, rows, seed=seed, columns=columns)
    return path


@pytest.fixture(scope="session")
def sales_100k(tmp_path_factory) -> Path:
    """A 100,000-row CSV in the public 14-column layout, made once per session."""
    return make_sales_csv(tmp_path_factory.mktemp("data") / "sales_100k.csv", 100_000, seed=1)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a process and reap it."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


# PostgreSQL: a throwaway server for the session, a fresh database per test,
# and ``db_url`` (a SQLite path, then a PostgreSQL URL) for tests that must
# hold on both backends.  See tests/pg.py.
from pg import db_url, pg_url, postgres_server, restartable_postgres  # noqa: E402,F401
