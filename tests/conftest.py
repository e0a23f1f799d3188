"""Shared test helpers: real server and worker processes, and a pandas oracle.

Every server binds port 0 and reports the port it got through ``--port-file``;
every process a test starts is registered with the ``procs`` fixture, which
kills and reaps whatever is still running when the test ends.  Waiting is
always on a condition with a deadline, never a bare sleep.
"""

from __future__ import annotations

import ast
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_CASES = ROOT.parent / "shared" / "cases"
PY = sys.executable


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


def pandas_oracle(path, price_col: str, qty_col: str, **read_csv) -> dict:
    """The final aggregate computed in one process with plain pandas.

    Independent of worker.py: it reads the two columns with pandas' own
    number parsing and applies the result contract directly (a row counts
    when both values are finite numbers).
    """
    df = pd.read_csv(path, usecols=[price_col, qty_col], **read_csv)
    price = pd.to_numeric(df[price_col], errors="coerce")
    qty = pd.to_numeric(df[qty_col], errors="coerce")
    ok = price.notna() & qty.notna() & price.abs().lt(math.inf) & qty.abs().lt(math.inf)
    p = price[ok]
    return {
        "total_rows": len(df),
        "total_sales": float((p * qty[ok]).sum()),
        "min_price": float(p.min()) if len(p) else None,
        "max_price": float(p.max()) if len(p) else None,
        "avg_price": float(p.mean()) if len(p) else None,
        "rejected_rows": int((~ok).sum()),
    }


def assert_aggregate(actual: dict, expected: dict, rel: float = 1e-9) -> None:
    """Every key of ``expected`` matches ``actual``: ints exactly, floats to ``rel``."""
    for key, want in expected.items():
        got = actual[key]
        if want is None or got is None or isinstance(want, int) and not isinstance(want, bool) \
                and key.endswith("rows"):
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


class Server:
    """A ``server.py`` subprocess on a free loopback port."""

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
        self.log = open(self.log_path, "w")
        self.proc = procs.popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                **popen)
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
        self.log.flush()
        return self.proc.returncode, out

    def stderr(self) -> str:
        self.log.flush()
        return self.log_path.read_text()


class Procs:
    """Starts subprocesses and guarantees they are gone when the test ends."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.started: list[subprocess.Popen] = []

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
        """Start ``worker.py`` against ``port``; its log goes to tmp_path."""
        log = open(self.tmp / f"{worker_id}-{len(self.started)}.log", "w")
        cmd = [PY, str(ROOT / "worker.py"), "--server", "127.0.0.1", "--port", str(port),
               "--worker-id", worker_id, "--give-up-after", "20", *map(str, args)]
        return self.popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
        for proc in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def procs(tmp_path):
    """Start servers and workers; all of them are killed and reaped afterwards."""
    p = Procs(tmp_path)
    yield p
    p.cleanup()


def run_job(procs, csv, workers=2, server_args=(), worker_args=(), db=None,
            timeout: float = 90) -> tuple[dict, Server]:
    """Run a whole job with ``workers`` workers; return (final aggregate, server)."""
    server = procs.server(csv, db, server_args)
    workers = [procs.worker(server.port, f"w{i}", worker_args) for i in range(workers)]
    code, out = server.finish(timeout)
    assert code == 0, f"server exit {code}:\n{server.stderr()}"
    # Not asserted here: on a loaded machine a worker may start after a small
    # job has ended and exit 1 ("unreachable"). Tests that care check codes.
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
