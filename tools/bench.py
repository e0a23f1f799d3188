"""Benchmark the distributed job against single-process baselines.

    python tools/bench.py                               # 1,000,000 generated rows, 3 repetitions
    python tools/bench.py --csv /tmp/bench/sales_5m.csv --reps 3
    python tools/bench.py --only pandas-usecols stream --reps 1 --json
    python tools/bench.py --chunk-overhead --many-workers --make-csv --no-modes
    python tools/bench.py --watch-overhead --no-modes --reps 5
    python tools/bench.py --only pandas-usecols polars frame frame-1w   # COST only
    python tools/bench.py --save bench.json

DuckDB, Polars and Dask are baselines, never dependencies of the project:
``pip install -r tools/requirements-bench.txt`` installs them.  A baseline
whose package cannot be found is not run, and its row says "not installed".
``--save FILE`` keeps the JSON document next to the table.

Every candidate runs as a whole process, exactly as a user would start it,
so interpreter start-up and ``import pandas`` are part of its time:

=============== =============================================================
mode            command
=============== =============================================================
pandas-all      one process: ``pd.read_csv(path)`` (all columns) + metrics
pandas-usecols  one process: ``pd.read_csv(path, usecols=[price, qty])``
pandas-halves   two processes at once, each the pandas-usecols script on half
                of the records (the file cut after the record that holds its
                middle byte; right for files without quoted line breaks, as
                tools/make_csv.py writes them), partial answers merged: the
                split with no coordination at all, the bound for any design
                that parses with pandas in two processes
duckdb          one process: one DuckDB SQL query (multi-threaded)
polars          one process: ``pl.scan_csv`` of the two columns, one lazy
                query (multi-threaded)
dask            Dask distributed: a ``LocalCluster`` of 2 worker processes
                (one thread each), ``dask.dataframe.read_csv(usecols=...)``
                cut into ``--dask-partitions`` partitions
frame           ``tools/local_cluster.py`` in the documented mode (the server
                parses the CSV chunk by chunk and sends pickled DataFrames),
                ``--workers`` workers
frame-zlib      the same with ``--compress``
frame-1w        the documented mode with 1 worker (for COST)
stream          ``tools/local_cluster.py --stream`` (the workers, on the
                server's machine, read their chunks' byte ranges from the
                file themselves, and parse them)
stream-bytes    the same with the workers' ``--no-local-read``: the server
                sends the header + a byte range's bytes, as to workers on
                machines without the file
stream-zlib     ``--stream --compress`` with ``--no-local-read`` (only bytes
                that are sent can be compressed)
stream-1w       ``--stream`` with 1 worker (for COST)
=============== =============================================================

The modes run back to back, in alternating order (forward, then backward,
...) so that a slow spell of a busy machine does not always hit the same
mode; the table shows medians.  Every mode's answer is compared with the
single-process pandas answer (``pandas-usecols``): row counts exactly,
floats to 1e-9 relative.  A mismatch is printed and makes the exit code 1.

COST ("Scalability! But at what COST?", McSherry, Isard and Murray, HotOS
2015) is the configuration a distributed system needs before it beats a
competent single-process implementation.  The table's ``/best`` column and
the COST lines under it divide each wall time by the fastest single-process
baseline of the same run (pandas-usecols, duckdb or polars; the output names
it), and the 1-worker and ``--workers``-worker runs of local_cluster show
whether adding a worker gets the job below 1.0.  Note that DuckDB and Polars
use every core of the machine for their one process; pandas' parser uses
one thread.

How things are measured
-----------------------
* wall: ``time.perf_counter`` around the whole command.
* CPU: user + system time of the whole process tree, from ``os.wait4``:
  the kernel adds a child's CPU time to its parent's "children" total when
  the parent reaps it, and local_cluster reaps its server and workers.
* peak RSS per process: a ``sitecustomize.py`` that this script writes to
  a temporary folder put first on ``PYTHONPATH``.  Python imports it at
  start-up in every process of the tree (local_cluster passes its
  environment on); it registers an ``atexit`` hook that writes the
  process's own ``getrusage(RUSAGE_SELF).ru_maxrss`` (the kernel's
  high-water mark, so nothing is missed between samples) and CPU time to a
  JSON file.  The kernel's per-child figure from ``wait4`` would give only
  the largest process of the tree, not the server's and the workers'
  separately.  A process killed by a signal writes nothing; its column
  then shows "-".  (A ``sitecustomize`` already on the interpreter's own
  path would be shadowed during the measurement; this venv has none.)
* bytes sent: the server's final log line (``sent N bytes``).
* phases: the server's final log line (``time per phase: ...``).

Sub-benchmarks (each prints its own numbers):

* ``--chunk-overhead``: 10,000 tiny chunks, 4 workers; chunks committed
  per second, from the ``received_at`` times in the results database.
* ``--many-workers``: 100 workers at once; the job must finish, exact,
  with no "database is locked" anywhere in the logs.
* ``--make-csv``: wall time of ``tools/make_csv.py --rows N``.
* ``--watch-overhead``: the same job (``--watch-rows`` rows,
  ``--watch-chunks`` chunks, ``--workers`` workers) ``--reps`` times without and ``--reps``
  times with a live ``tools/watch.py`` on the job's database, alternating;
  the watcher runs on a pseudo-terminal of 120x40, so it renders the full
  rich view every 0.5 s as it would for a student.  Medians, spread, and
  the watcher's own CPU time.

Big files belong outside the repository: the default ``--work-dir`` is a
folder under the system's temporary directory.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PY = sys.executable
REL_TOLERANCE = 1e-9
RESULT_KEYS = ("total_rows", "total_sales", "min_price", "max_price", "avg_price",
               "rejected_rows")

BASELINES = ("pandas-all", "pandas-usecols", "pandas-halves", "duckdb", "polars", "dask")
# The baselines that need a package the project does not depend on, and the
# modules that must import for each (tools/requirements-bench.txt installs them).
OPTIONAL_BASELINES = {
    "duckdb": ("duckdb",),
    "polars": ("polars",),
    "dask": ("dask.dataframe", "distributed", "pyarrow"),
}
# The single-process baselines that COST is measured against (dask is distributed).
SINGLE_PROCESS = ("pandas-usecols", "duckdb", "polars")
CLUSTER_MODES = {            # mode -> (extra local_cluster options, workers; None: --workers)
    "frame": ([], None),
    "frame-zlib": (["--compress"], None),
    "frame-1w": ([], 1),
    "stream": (["--stream"], None),
    "stream-bytes": (["--stream", "--worker-args=--no-local-read"], None),
    "stream-zlib": (["--stream", "--compress", "--worker-args=--no-local-read"], None),
    "stream-1w": (["--stream"], 1),
}
MODES = BASELINES + tuple(CLUSTER_MODES)
REFERENCE = "pandas-usecols"
NOT_INSTALLED = "not installed (pip install -r tools/requirements-bench.txt)"

# --- The single-process baselines ------------------------------------------------
# Each prints its answer as one JSON line.  The rule is the project's: a row
# counts when its price and its quantity are both finite numbers.

PANDAS_SCRIPT = """
import io, json, math, sys
import pandas as pd
path, price, qty, sep, decimal, encoding, columns = sys.argv[1:8]
usecols = [price, qty] if columns == "usecols" else None
source = path

class Records(io.RawIOBase):
    # pandas-halves: the header line, then bytes start..end of the file.
    def __init__(self, start, end):
        self.f = open(path, "rb")
        self.head = self.f.readline()
        self.f.seek(start)
        self.left = end - start
    def readable(self):
        return True
    def readinto(self, buffer):
        if self.head:
            data, self.head = self.head[:len(buffer)], self.head[len(buffer):]
        else:
            data = self.f.read(min(len(buffer), self.left))
            self.left -= len(data)
        buffer[:len(data)] = data
        return len(data)

if len(sys.argv) > 8:
    source = io.BufferedReader(Records(int(sys.argv[8]), int(sys.argv[9])), 1 << 20)
df = pd.read_csv(source, sep=sep, decimal=decimal, encoding=encoding, usecols=usecols)
p = pd.to_numeric(df[price], errors="coerce")
q = pd.to_numeric(df[qty], errors="coerce")
ok = p.notna() & q.notna() & (p.abs() < math.inf) & (q.abs() < math.inf)
valid = p[ok]
print(json.dumps({
    "total_rows": len(df), "total_sales": float((valid * q[ok]).sum()),
    "min_price": float(valid.min()) if len(valid) else None,
    "max_price": float(valid.max()) if len(valid) else None,
    "avg_price": float(valid.mean()) if len(valid) else None,
    "rejected_rows": int((~ok).sum())}))
"""

# pandas-halves: this driver imports no pandas; each child runs PANDAS_SCRIPT
# (passed as the last argument) on its half, and the answers merge as the
# server merges chunk results (the mean weighted by the valid prices).
HALVES_SCRIPT = """
import json, os, subprocess, sys
path, price, qty, sep, decimal, encoding, pandas_script = sys.argv[1:8]
size = os.path.getsize(path)
with open(path, "rb") as f:
    header_end = len(f.readline())
    f.seek(max(header_end, size // 2) - 1)
    f.readline()                     # to the end of the record the middle byte is in
    middle = f.tell()
children = [subprocess.Popen([sys.executable, "-c", pandas_script, path, price, qty, sep,
                              decimal, encoding, "usecols", str(a), str(b)],
                             stdout=subprocess.PIPE)
            for a, b in ((header_end, middle), (middle, size))]
outputs = [child.communicate()[0] for child in children]
if any(child.returncode for child in children):
    sys.exit("a half failed")
parts = [json.loads(output) for output in outputs]
counts = [p["total_rows"] - p["rejected_rows"] for p in parts]
lows = [p["min_price"] for p in parts if p["min_price"] is not None]
highs = [p["max_price"] for p in parts if p["max_price"] is not None]
print(json.dumps({
    "total_rows": sum(p["total_rows"] for p in parts),
    "total_sales": sum(p["total_sales"] for p in parts),
    "min_price": min(lows) if lows else None, "max_price": max(highs) if highs else None,
    "avg_price": (sum(p["avg_price"] * n for p, n in zip(parts, counts) if n) / sum(counts)
                  if sum(counts) else None),
    "rejected_rows": sum(p["rejected_rows"] for p in parts)}))
"""

DUCKDB_SCRIPT = """
import json, sys
import duckdb
path, price, qty, sep, decimal = sys.argv[1:6]
def ident(name):
    return '"' + name.replace('"', '""') + '"'
def text(value):
    return "'" + value.replace("'", "''") + "'"
def query(columns_as_text):
    # Fast: DuckDB detects the two columns as DOUBLE from a sample and parses
    # them in the reader.  A cell that is not a number then stops the query,
    # and the slow query reads them as text and casts here.  (The trim()
    # matters: DuckDB 2.0 pushes a bare TRY_CAST of a column into the reader,
    # which then casts strictly and fails in the same way.)
    if columns_as_text:
        def number(name):
            cell = f"trim({ident(name)})"
            if decimal != ".":
                cell = f"replace({cell}, {text(decimal)}, '.')"
            return f"TRY_CAST({cell} AS DOUBLE)"
        types = "{" + ", ".join(f"{text(n)}: 'VARCHAR'" for n in (price, qty)) + "}"
        source = f"read_csv($path, delim = $sep, header = true, types = {types})"
    else:
        number = lambda name: f"TRY_CAST({ident(name)} AS DOUBLE)"
        source = f"read_csv($path, delim = $sep, decimal_separator = {text(decimal)}, header = true)"
    return f'''
WITH t AS (SELECT {number(price)} AS p, {number(qty)} AS q FROM {source}),
v AS (SELECT p, q, coalesce(isfinite(p) AND isfinite(q), false) AS ok FROM t)
SELECT count(*), coalesce(sum(p * q) FILTER (WHERE ok), 0.0),
       min(p) FILTER (WHERE ok), max(p) FILTER (WHERE ok), avg(p) FILTER (WHERE ok),
       count(*) FILTER (WHERE NOT ok)
FROM v
'''
# The progress bar would go to stdout, in front of the JSON line.
con = duckdb.connect()
con.execute("SET enable_progress_bar = false")
try:
    row = con.execute(query(False), {"path": path, "sep": sep}).fetchone()
except duckdb.ConversionException:
    row = con.execute(query(True), {"path": path, "sep": sep}).fetchone()
print(json.dumps(dict(zip(["total_rows", "total_sales", "min_price", "max_price",
                           "avg_price", "rejected_rows"], row))))
"""

# Polars reads only the two columns (projection pushdown); a cell that is not
# a number becomes null (ignore_errors with a Float64 schema), as
# pd.to_numeric(errors="coerce") makes it NaN.
POLARS_SCRIPT = """
import json, sys
import polars as pl
path, price, qty, sep, decimal, encoding = sys.argv[1:7]
if encoding.lower().replace("-", "").replace("_", "") not in ("utf8", "utf8sig"):
    sys.exit(f"polars baseline: encoding {encoding!r} is not supported (utf-8 only)")
lf = pl.scan_csv(path, separator=sep, decimal_comma=(decimal == ","),
                 schema_overrides={price: pl.Float64, qty: pl.Float64}, ignore_errors=True)
p, q = pl.col(price), pl.col(qty)
ok = (p.is_finite() & q.is_finite()).fill_null(False)
row = lf.select(pl.len().alias("n"), (p * q).filter(ok).sum().alias("sales"),
                p.filter(ok).min().alias("lo"), p.filter(ok).max().alias("hi"),
                p.filter(ok).mean().alias("mean"), (~ok).sum().alias("rejected")
                ).collect().row(0)
print(json.dumps(dict(zip(["total_rows", "total_sales", "min_price", "max_price",
                           "avg_price", "rejected_rows"], row))))
"""

# Dask's own scheduler and worker processes: two workers of one thread each,
# the shape of local_cluster's two worker processes.  The __main__ guard
# matters: the workers start by spawning, which imports the main module.
DASK_SCRIPT = """
import json, math, sys
import dask
import dask.dataframe as dd
from dask.distributed import Client, LocalCluster
def main():
    path, price, qty, sep, decimal, encoding, blocksize, workers = sys.argv[1:9]
    with LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster):
        df = dd.read_csv(path, sep=sep, decimal=decimal, encoding=encoding,
                         usecols=[price, qty], blocksize=int(blocksize))
        p = dd.to_numeric(df[price], errors="coerce")
        q = dd.to_numeric(df[qty], errors="coerce")
        # NaN < inf is False, so this also rejects what to_numeric made NaN.
        # Dask reads text columns as a pd.NA string type, so to_numeric gives
        # a nullable Float64 whose comparisons are NA, not False: fill them.
        ok = ((p.abs() < math.inf) & (q.abs() < math.inf)).fillna(False).astype(bool)
        valid = p[ok]
        n, sales, lo, hi, mean, rejected = dask.compute(
            df.shape[0], (valid * q[ok]).sum(), valid.min(), valid.max(), valid.mean(),
            (~ok).sum())
        count = int(n) - int(rejected)
        print(json.dumps({
            "total_rows": int(n), "total_sales": float(sales),
            "min_price": float(lo) if count else None,
            "max_price": float(hi) if count else None,
            "avg_price": float(mean) if count else None,
            "rejected_rows": int(rejected)}))
if __name__ == "__main__":
    main()
"""

# Written into a temporary folder that goes first on PYTHONPATH: every Python
# process of a measured command reports its own peak RSS and CPU at exit.
RUSAGE_HOOK = """\
# Written by tools/bench.py; see "How things are measured" there.
import atexit, json, os, resource, sys

def _sales_bench_report():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {"pid": os.getpid(), "argv": sys.argv, "max_rss_kb": usage.ru_maxrss,
              "cpu_s": usage.ru_utime + usage.ru_stime}
    folder = os.environ.get("SALES_BENCH_RUSAGE_DIR")
    if folder:
        # Written under another name, then renamed: a process killed while it
        # writes (a Dask worker, when its cluster goes) leaves no half report.
        path = os.path.join(folder, f"{os.getpid()}.json")
        with open(path + ".part", "w") as f:
            json.dump(record, f)
        os.replace(path + ".part", path)

atexit.register(_sales_bench_report)
"""


# --- Running one command ------------------------------------------------------------

@dataclass
class Run:
    """One measured command: times in seconds, RSS in KiB, per-process records."""
    cmd: list
    wall: float
    cpu: float
    tree_max_rss_kb: int
    returncode: int
    stdout: str
    stderr: str
    processes: list = field(default_factory=list)
    result: dict | None = None       # the answer the command printed, once parsed

    def role_rss_kb(self, role: str) -> int | None:
        """Largest peak RSS among the processes of ``role`` (None if none reported)."""
        values = [p["max_rss_kb"] for p in self.processes if role_of(p["argv"]) == role]
        return max(values) if values else None

    def role_cpu(self, role: str) -> float:
        return sum(p["cpu_s"] for p in self.processes if role_of(p["argv"]) == role)


def role_of(argv: list) -> str:
    """server / worker / launcher / baseline, from a process's ``sys.argv``."""
    script = os.path.basename(argv[0]) if argv else ""
    return {"server.py": "server", "worker.py": "worker", "flaky_worker.py": "worker",
            "local_cluster.py": "launcher"}.get(script, "baseline")


def measure(cmd: list, work_dir: Path, timeout: float, env_extra=None) -> Run:
    """Run ``cmd`` (from the repository root) and measure it; see the module docstring.

    The command runs in its own process group, which is killed if it is
    still running after ``timeout`` seconds and, in any case, once it has
    exited (so nothing it started outlives the measurement).
    """
    hook_dir = Path(tempfile.mkdtemp(prefix="hook-", dir=work_dir))
    reports = hook_dir / "reports"
    reports.mkdir()
    (hook_dir / "sitecustomize.py").write_text(RUSAGE_HOOK)
    env = dict(os.environ, SALES_BENCH_RUSAGE_DIR=str(reports), **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook_dir), env.get("PYTHONPATH")]))
    out_path, err_path = hook_dir / "stdout", hook_dir / "stderr"
    try:
        with open(out_path, "w") as out, open(err_path, "w") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            timer = threading.Timer(timeout, _kill_group, (proc.pid,))
            timer.start()
            try:
                # wait4, not Popen.wait: it also returns the tree's resource usage.
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                timer.cancel()
                _kill_group(proc.pid)
            wall = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
        processes = [json.loads(p.read_text()) for p in sorted(reports.glob("*.json"))]
        return Run(cmd, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss,
                   proc.returncode, out_path.read_text(), err_path.read_text(), processes)
    finally:
        shutil.rmtree(hook_dir, ignore_errors=True)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --- Parsing what the commands print ---------------------------------------------

def parse_json_result(stdout: str) -> dict:
    """The last JSON line a baseline printed."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON result in output:\n{stdout[-2000:]}")


def parse_cluster_result(stdout: str) -> dict:
    """The final aggregate dict the server printed (a Python literal)."""
    for line in stdout.splitlines():
        if line.startswith("{'total_rows'"):
            return ast.literal_eval(line)
    raise ValueError(f"no final aggregate in output:\n{stdout[-2000:]}")


_PHASES = re.compile(r"time per phase: ([^;\n]*)")
_PHASE = re.compile(r"([a-z][a-z ]*?) ([0-9.]+) s")
_SENT = re.compile(r"sent ([0-9]+) bytes")


def parse_server_log(stderr: str) -> tuple[dict, int | None]:
    """``({phase: seconds}, bytes sent or None)`` from the server's final log line."""
    phases, sent = {}, None
    for line in stderr.splitlines():
        match = _PHASES.search(line)
        if match:
            phases = {name.strip(): float(sec) for name, sec in _PHASE.findall(match.group(1))}
        match = _SENT.search(line)
        if match:
            sent = int(match.group(1))
    return phases, sent


def compare(result: dict, reference: dict, rel: float = REL_TOLERANCE) -> list[str]:
    """Differences between two answers: counts exactly, floats to ``rel``; [] if equal."""
    problems = []
    for key in RESULT_KEYS:
        got, want = result.get(key), reference.get(key)
        if key.endswith("rows") or want is None or got is None:
            same = got == want
        else:
            same = math.isclose(got, want, rel_tol=rel, abs_tol=1e-12)
        if not same:
            problems.append(f"{key}: {got!r} != {want!r}")
    return problems


# --- The input ------------------------------------------------------------------

@dataclass
class Input:
    """The CSV and how to read it (what server.inspect_csv detects)."""
    path: str
    size: int
    price: str
    qty: str
    sep: str
    decimal: str
    encoding: str


def describe_input(path: str) -> Input:
    """Detect columns and dialect with the server's own ``inspect_csv``."""
    from server import inspect_csv
    # Absolute: every mode runs from the repository root, not from the caller's directory.
    path = str(Path(path).resolve())
    info = inspect_csv(path)
    return Input(path, info.size, info.price_col, info.qty_col, info.sep, info.decimal,
                 info.encoding)


def generate_csv(rows: int, work_dir: Path, seed: int = 0,
                 timeout: float = 600) -> tuple[Path, Run | None]:
    """Write (or reuse) ``sales_<rows>_seed<seed>.csv`` in ``work_dir`` with make_csv.py.

    The file is a pure function of (rows, seed), so an existing one is reused.
    Returns the path and the generating run (None if reused).
    """
    path = work_dir / f"sales_{rows}_seed{seed}.csv"
    if path.exists():
        return path, None
    run = measure([PY, str(ROOT / "tools" / "make_csv.py"), "--rows", str(rows), "--seed",
                   str(seed), "--out", str(path), "--quiet"], work_dir, timeout)
    if run.returncode != 0:
        raise RuntimeError(f"make_csv.py failed:\n{run.stderr}")
    return path, run


def warm_cache(path: str) -> float:
    """Read the file once (like ``cat file > /dev/null``); return the seconds it took.

    Every mode then starts from the page cache, whatever order it runs in.
    """
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass
    return time.perf_counter() - started


# --- The modes ------------------------------------------------------------------

def importable(module: str) -> bool:
    """True if ``module`` (dotted names too) can be found by this interpreter.

    The baselines run under this same interpreter and ``PYTHONPATH``, so
    what is found here is found there.  Nothing is imported except the
    parents of a dotted name (``find_spec`` needs them).
    """
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_baselines(modes) -> dict:
    """``{mode: reason}`` for each optional baseline in ``modes`` that cannot run."""
    return {mode: NOT_INSTALLED for mode in modes
            if not all(map(importable, OPTIONAL_BASELINES.get(mode, ())))}


def mode_command(mode: str, data: Input, args) -> list:
    """The command line that runs ``mode`` on ``data``."""
    if mode in ("pandas-all", "pandas-usecols"):
        columns = "usecols" if mode == "pandas-usecols" else "all"
        return [PY, "-c", PANDAS_SCRIPT, data.path, data.price, data.qty, data.sep,
                data.decimal, data.encoding, columns]
    if mode == "pandas-halves":
        return [PY, "-c", HALVES_SCRIPT, data.path, data.price, data.qty, data.sep,
                data.decimal, data.encoding, PANDAS_SCRIPT]
    if mode == "duckdb":
        return [PY, "-c", DUCKDB_SCRIPT, data.path, data.price, data.qty, data.sep, data.decimal]
    if mode == "polars":
        return [PY, "-c", POLARS_SCRIPT, data.path, data.price, data.qty, data.sep,
                data.decimal, data.encoding]
    if mode == "dask":
        blocksize = max(1, math.ceil(data.size / args.dask_partitions))
        return [PY, "-c", DASK_SCRIPT, data.path, data.price, data.qty, data.sep,
                data.decimal, data.encoding, str(blocksize), str(args.dask_workers)]
    options, workers = CLUSTER_MODES[mode]
    return [PY, str(ROOT / "tools" / "local_cluster.py"), "--csv", data.path,
            "--workers", str(workers or args.workers), "--chunks", str(args.chunks),
            "--log-level", "INFO", *options]


@dataclass
class ModeRuns:
    """Every repetition of one mode and what was checked about it."""
    mode: str
    runs: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    def median(self, get):
        values = [v for v in (get(r) for r in self.runs) if v is not None]
        return statistics.median(values) if values else None

    def summary(self) -> dict:
        """Medians over the repetitions (RSS in MiB, bytes as an int)."""
        phases = {}
        for run in self.runs:
            for name, sec in parse_server_log(run.stderr)[0].items():
                phases.setdefault(name, []).append(sec)
        mib = lambda kb: None if kb is None else kb / 1024  # noqa: E731
        last = self.runs[-1] if self.runs else None
        return {
            "walls": [round(r.wall, 4) for r in self.runs],
            "wall_s": self.median(lambda r: r.wall),
            "cpu_s": self.median(lambda r: r.cpu),
            "server_cpu_s": self.median(lambda r: r.role_cpu("server") or None),
            "workers_cpu_s": self.median(lambda r: r.role_cpu("worker") or None),
            "server_rss_mib": self.median(lambda r: mib(r.role_rss_kb("server"))),
            "worker_rss_mib": self.median(lambda r: mib(r.role_rss_kb("worker"))),
            "process_rss_mib": self.median(
                lambda r: mib(r.role_rss_kb("baseline") or r.tree_max_rss_kb)),
            "bytes_sent": self.median(lambda r: parse_server_log(r.stderr)[1]),
            "phases_s": {name: statistics.median(v) for name, v in phases.items()},
            "result": getattr(last, "result", None),
            "exact": not self.problems,
            "problems": self.problems,
        }


def run_modes(modes: list, data: Input, args, log) -> tuple[dict, dict]:
    """Run ``modes`` ``args.reps`` times in alternating order; return (by mode, reference)."""
    by_mode = {mode: ModeRuns(mode) for mode in modes}
    reference = None
    reference_runs = by_mode.get(REFERENCE) or ModeRuns(REFERENCE)
    if REFERENCE not in modes:
        log(f"reference answer: {REFERENCE} (not timed)")
        reference = _run_one(REFERENCE, data, args, reference_runs).result
    for rep in range(args.reps):
        order = modes if rep % 2 == 0 else modes[::-1]
        for mode in order:
            run = _run_one(mode, data, args, by_mode[mode])
            log(f"rep {rep + 1}/{args.reps} {mode:<15} {run.wall:7.2f} s wall "
                f"{run.cpu:7.2f} s CPU")
            if mode == REFERENCE and reference is None:
                reference = run.result
    if reference is None:
        raise RuntimeError(f"the reference mode {REFERENCE} produced no answer: "
                           + "; ".join(reference_runs.problems[:1]))
    for mode_runs in by_mode.values():
        for run in mode_runs.runs:
            if run.result is not None:
                diff = compare(run.result, reference)
                if diff:
                    mode_runs.problems.append("; ".join(diff))
    return {m: r.summary() for m, r in by_mode.items()}, reference


def _run_one(mode: str, data: Input, args, mode_runs: ModeRuns) -> Run:
    """Run ``mode`` once, parse its answer, append the run to ``mode_runs``."""
    run = measure(mode_command(mode, data, args), args.work_dir, args.timeout)
    try:
        if run.returncode != 0:
            raise ValueError(f"exit code {run.returncode}: {run.stderr.strip()[-500:]}")
        parse = parse_json_result if mode in BASELINES else parse_cluster_result
        run.result = parse(run.stdout)
    except ValueError as exc:
        mode_runs.problems.append(f"failed: {exc}")
    mode_runs.runs.append(run)
    return run


# --- Sub-benchmarks -------------------------------------------------------------

def _cluster_job(args, rows: int, seed: int, name: str, workers: int, chunks: int,
                 extra=()) -> tuple[dict, Run, Path]:
    """Generate ``rows`` rows, compute the single-process reference, and run
    local_cluster on them; return (reference, the measured run, its db)."""
    path, _ = generate_csv(rows, args.work_dir, seed=seed)
    data = describe_input(str(path))
    reference = parse_json_result(measure(mode_command(REFERENCE, data, args),
                                          args.work_dir, args.timeout).stdout)
    db = args.work_dir / f"{name}.sqlite"
    _remove_db(db)
    run = measure([PY, str(ROOT / "tools" / "local_cluster.py"), "--csv", str(path),
                   "--workers", str(workers), "--chunks", str(chunks), "--db", str(db),
                   "--log-level", "INFO", *extra], args.work_dir, args.timeout)
    return reference, run, db


def chunk_overhead(args, log) -> dict:
    """Goal 5: 10,000 tiny chunks with 4 workers; chunks committed per second."""
    reference, run, db = _cluster_job(args, args.overhead_chunks * 10, 5, "chunk_overhead",
                                      args.overhead_workers, args.overhead_chunks)
    out = {"chunks": args.overhead_chunks, "workers": args.overhead_workers,
           "rows": reference["total_rows"], "wall_s": run.wall, "cpu_s": run.cpu,
           "server_cpu_s": run.role_cpu("server"), "workers_cpu_s": run.role_cpu("worker"),
           "exit_code": run.returncode, "phases_s": parse_server_log(run.stderr)[0]}
    try:
        out["problems"] = compare(parse_cluster_result(run.stdout), reference)
        times = [t for (t,) in _query(db, "SELECT received_at FROM chunk_results ORDER BY 1")]
        span = times[-1] - times[0] if len(times) > 1 else 0.0
        out["committed"] = len(times)
        out["commit_span_s"] = span
        out["chunks_per_s"] = (len(times) - 1) / span if span > 0 else None
    except (ValueError, sqlite3.Error) as exc:
        out["problems"] = [f"failed: {exc}: {run.stderr[-500:]}"]
    finally:
        _remove_db(db)
    log(f"chunk overhead: {out.get('committed')} chunks committed in "
        f"{out.get('commit_span_s', 0):.2f} s = {out.get('chunks_per_s') or 0:,.0f} chunks/s "
        f"({args.overhead_workers} workers; whole command {run.wall:.2f} s; CPU: server "
        f"{out['server_cpu_s']:.1f} s, workers {out['workers_cpu_s']:.1f} s)")
    return out


def many_workers(args, log) -> dict:
    """Goal 6: ``--many`` workers at once; exact, and no "database is locked"."""
    # Each worker sleeps --delay s per chunk (simulated work), so the chunks
    # outlast the start-up of the last worker and all of them take part.
    reference, run, db = _cluster_job(args, args.many_rows, 6, "many_workers", args.many,
                                      args.many_chunks,
                                      ("--worker-args", f"--delay {args.many_delay}"))
    logs = run.stdout + run.stderr
    out = {"workers": args.many, "chunks": args.many_chunks, "rows": reference["total_rows"],
           "wall_s": run.wall, "cpu_s": run.cpu, "exit_code": run.returncode,
           "database_locked": logs.lower().count("database is locked"),
           "tracebacks": logs.count("Traceback")}
    try:
        out["problems"] = compare(parse_cluster_result(run.stdout), reference)
        rows = _query(db, "SELECT worker_id, COUNT(*) FROM chunk_results GROUP BY worker_id")
        out["workers_with_results"] = len(rows)
    except (ValueError, sqlite3.Error) as exc:
        out["problems"] = [f"failed: {exc}: {run.stderr[-500:]}"]
    finally:
        _remove_db(db)
    ok = run.returncode == 0 and not out["problems"] and not out["database_locked"]
    log(f"many workers: {args.many} workers, {args.many_chunks} chunks: exit {run.returncode}, "
        f"{'exact' if not out['problems'] else out['problems']}, "
        f"{out.get('workers_with_results')} workers committed results, "
        f"'database is locked' x{out['database_locked']}, {run.wall:.1f} s -> "
        f"{'OK' if ok else 'FAILED'}")
    return out


def make_csv_timing(args, log) -> dict:
    """Goal 7: wall time of ``tools/make_csv.py --rows N`` (the file is deleted after)."""
    path = args.work_dir / f"make_csv_timing_{os.getpid()}.csv"
    try:
        run = measure([PY, str(ROOT / "tools" / "make_csv.py"), "--rows", str(args.make_csv_rows),
                       "--out", str(path), "--quiet"], args.work_dir, args.timeout)
        size = path.stat().st_size if path.exists() else 0
    finally:
        path.unlink(missing_ok=True)
    out = {"rows": args.make_csv_rows, "wall_s": run.wall, "cpu_s": run.cpu,
           "bytes": size, "exit_code": run.returncode,
           "peak_rss_mib": run.tree_max_rss_kb / 1024}
    log(f"make_csv: {args.make_csv_rows:,} rows, {size / 1e6:.0f} MB in {run.wall:.1f} s "
        f"({size / 1e6 / max(run.wall, 1e-9):.0f} MB/s, peak RSS {out['peak_rss_mib']:.0f} MiB)")
    return out


class PtyWatcher:
    """``tools/watch.py --db DB`` on a pseudo-terminal, its output read and dropped.

    A pty, not a pipe: on a pipe the watcher prints plain text, and the
    measurement must include the rich rendering a student's terminal gets.
    """

    def __init__(self, db: Path, columns: int = 120, lines: int = 40):
        import fcntl
        import pty
        import struct
        import termios
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        env["TERM"] = "xterm-256color"
        self.proc = subprocess.Popen([PY, str(ROOT / "tools" / "watch.py"), "--db", str(db)],
                                     stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.bytes = 0
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:   # EIO: the watcher closed the terminal
                return
            if not data:
                return
            self.bytes += len(data)

    def stop(self, timeout: float = 10) -> tuple[int, float]:
        """SIGTERM the watcher; return (its exit code, its CPU seconds)."""
        self.proc.send_signal(signal.SIGTERM)
        timer = threading.Timer(timeout, _kill_group, (self.proc.pid,))
        timer.start()
        try:
            _, status, usage = os.wait4(self.proc.pid, 0)
        finally:
            timer.cancel()
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._reader.join(timeout)
        os.close(self.master)
        return self.proc.returncode, usage.ru_utime + usage.ru_stime


def watch_overhead(args, log) -> dict:
    """Issue 14: the job's wall time with and without a live tools/watch.py."""
    path, _ = generate_csv(args.watch_rows, args.work_dir, seed=7)
    data = describe_input(str(path))
    reference = parse_json_result(measure(mode_command(REFERENCE, data, args),
                                          args.work_dir, args.timeout).stdout)
    db = args.work_dir / "watch_overhead.sqlite"
    walls = {"without": [], "with": []}
    out = {"rows": args.watch_rows, "chunks": args.watch_chunks, "workers": args.workers,
           "reps": args.reps, "watcher_cpu_s": [], "watcher_bytes": [], "problems": []}
    try:
        for rep in range(args.reps):
            for kind in ("without", "with") if rep % 2 == 0 else ("with", "without"):
                _remove_db(db)
                watcher = PtyWatcher(db) if kind == "with" else None
                try:
                    run = measure([PY, str(ROOT / "tools" / "local_cluster.py"), "--csv",
                                   str(path), "--workers", str(args.workers), "--chunks",
                                   str(args.watch_chunks), "--db", str(db),
                                   "--log-level", "WARNING"],
                                  args.work_dir, args.timeout)
                finally:
                    if watcher is not None:
                        code, cpu = watcher.stop()
                        out["watcher_cpu_s"].append(cpu)
                        out["watcher_bytes"].append(watcher.bytes)
                        if code != 0:
                            out["problems"].append(f"the watcher exited with {code}")
                walls[kind].append(run.wall)
                try:
                    out["problems"] += compare(parse_cluster_result(run.stdout), reference)
                except ValueError as exc:
                    out["problems"].append(f"{kind} watcher: {exc}: {run.stderr[-300:]}")
                log(f"watch overhead: rep {rep + 1}/{args.reps} {kind:7} watcher "
                    f"{run.wall:6.2f} s wall")
    finally:
        _remove_db(db)
    for kind, values in walls.items():
        out[f"{kind}_walls_s"] = values
        out[f"{kind}_median_s"] = statistics.median(values)
    out["ratio"] = out["with_median_s"] / out["without_median_s"]
    log(f"watch overhead: {args.watch_rows:,} rows, {args.watch_chunks} chunks, "
        f"{args.workers} workers, "
        f"{args.reps} reps: median {out['without_median_s']:.2f} s without a watcher "
        f"(range {min(walls['without']):.2f}-{max(walls['without']):.2f}), "
        f"{out['with_median_s']:.2f} s with one "
        f"(range {min(walls['with']):.2f}-{max(walls['with']):.2f}), ratio {out['ratio']:.3f}; "
        f"watcher CPU {statistics.median(out['watcher_cpu_s']):.2f} s per job; "
        f"{'exact' if not out['problems'] else out['problems']}")
    return out


def _query(db: Path, sql: str) -> list:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _remove_db(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)


# --- Report -----------------------------------------------------------------------

def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def print_table(summary: dict, out=None) -> None:
    """The human-readable table of medians, ratios and checks (to ``out``, default stdout)."""
    out = out or sys.stdout     # looked up now: a test may have replaced sys.stdout
    modes = summary["modes"]
    usecols = modes.get("pandas-usecols", {}).get("wall_s")
    all_cols = modes.get("pandas-all", {}).get("wall_s")
    best = cost_reference(modes)
    best_wall = modes[best]["wall_s"] if best else None
    print(f"\n{summary['csv']}: {summary['size_bytes'] / 1e6:.0f} MB, "
          f"{summary['reference']['total_rows']:,} rows; {summary['reps']} repetition(s), "
          f"medians; {summary['workers']} workers, {summary['chunks']} chunks; "
          f"load average {summary['load_before'][0]:.2f} -> {summary['load_after'][0]:.2f}; "
          f"cat: {summary['cat_s']:.2f} s", file=out)
    columns = (("mode", 15), ("wall s", 7), ("/usecols", 8), ("/all", 6), ("/best", 6),
               ("CPU s", 7),
               ("srv CPU", 7), ("wrk CPU", 7), ("srv MiB", 7), ("wrk MiB", 7),
               ("proc MiB", 8), ("sent MB", 8))
    print(" ".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}"
                   for i, (name, w) in enumerate(columns)) + "  result", file=out)
    print("-" * (sum(w + 1 for _, w in columns) + 7), file=out)
    for mode, m in modes.items():
        if m.get("skipped"):
            print(f"{mode:<15} {m['skipped']}", file=out)
            continue
        ratio = lambda base: None if not (base and m["wall_s"]) else m["wall_s"] / base  # noqa: E731
        sent = None if m["bytes_sent"] is None else m["bytes_sent"] / 1e6
        cells = [_fmt(m["wall_s"], ".2f"), _fmt(ratio(usecols), ".2f"), _fmt(ratio(all_cols), ".2f"),
                 _fmt(ratio(best_wall), ".2f"), _fmt(m["cpu_s"], ".2f"), _fmt(m["server_cpu_s"], ".2f"),
                 _fmt(m["workers_cpu_s"], ".2f"), _fmt(m["server_rss_mib"], ".0f"),
                 _fmt(m["worker_rss_mib"], ".0f"), _fmt(m["process_rss_mib"], ".0f"),
                 _fmt(sent, ".1f")]
        check = "exact" if m["exact"] else "MISMATCH: " + " | ".join(m["problems"])[:200]
        print(f"{mode:<15} " + " ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, columns[1:]))
              + f"  {check}", file=out)
    print(f"  (/usecols, /all, /best: wall time over that baseline's, best = {best or '-'}, "
          "the fastest single-process baseline of this run; CPU: user+sys of every process; "
          "MiB: peak RSS of the server, of the largest worker, of a baseline's one process or "
          "else the largest process of the tree)", file=out)
    phased = {mode: m["phases_s"] for mode, m in modes.items() if m.get("phases_s")}
    if phased:
        print("\nserver phases (median seconds; serialize, send and db are summed over "
              "handler threads):", file=out)
        for mode, phases in phased.items():
            print(f"  {mode:<13} " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()),
                  file=out)
    for line in target_lines(summary) + cost_lines(summary):
        print(line, file=out)


def cost_reference(modes: dict) -> str | None:
    """The fastest single-process baseline that ran and was exact (None if none)."""
    timed = [m for m in SINGLE_PROCESS
             if modes.get(m, {}).get("wall_s") and modes[m].get("exact")]
    return min(timed, key=lambda m: modes[m]["wall_s"]) if timed else None


def cost_lines(summary: dict) -> list:
    """COST (McSherry et al., HotOS 2015): each local_cluster mode with 1 worker
    and with ``--workers`` workers, as a ratio of the fastest single-process
    baseline's wall time; a ratio at or below 1.0 means that configuration
    beats the single process."""
    modes = summary["modes"]
    best = cost_reference(modes)
    if best is None or not any(modes.get(m, {}).get("wall_s") for m in CLUSTER_MODES):
        return []
    best_wall = modes[best]["wall_s"]
    usecols = modes.get("pandas-usecols", {}).get("wall_s")
    lines = [f"\nCOST reference: {best} ({best_wall:.2f} s), the fastest single-process "
             f"baseline of this run (of: "
             f"{', '.join(m for m in SINGLE_PROCESS if modes.get(m, {}).get('wall_s'))})"]
    for family in ("frame", "stream"):
        configs = [(1, f"{family}-1w"), (summary["workers"], family)]
        ratios = [(w, modes[m]["wall_s"] / best_wall, m) for w, m in configs
                  if modes.get(m, {}).get("wall_s")]
        if not ratios:
            continue
        parts = []
        for workers, ratio, mode in ratios:
            extra = (f" ({modes[mode]['wall_s'] / usecols:.2f}x pandas-usecols)"
                     if usecols and best != "pandas-usecols" else "")
            parts.append(f"{workers} worker{'s' if workers > 1 else ''} {ratio:.2f}x {best}"
                         + extra)
        beaten = [w for w, ratio, _ in ratios if ratio <= 1.0]
        verdict = (f"COST = {min(beaten)} worker(s)" if beaten else
                   f"COST unbounded here: not below 1.0 with up to {max(w for w, _, _ in ratios)}"
                   f" worker(s)")
        lines.append(f"COST {family}: " + "; ".join(parts) + f" -> {verdict}")
    return lines


def target_lines(summary: dict) -> list:
    """One line per target that this run measured, with its ratio and verdict."""
    modes, lines = summary["modes"], []
    wall = lambda mode: modes.get(mode, {}).get("wall_s")  # noqa: E731

    def verdict(ok):
        return "met" if ok else "NOT met"

    if wall("pandas-usecols"):
        for mode in ("frame", "stream"):
            if wall(mode):
                ratio = wall(mode) / wall("pandas-usecols")
                lines.append(f"goal 1 ({mode}): {ratio:.2f}x pandas usecols (aim <= 1.0): "
                             f"{verdict(ratio <= 1.0)}")
                if wall("duckdb"):
                    lines.append(f"  stretch ({mode}): {wall(mode) / wall('duckdb'):.2f}x DuckDB")
    if wall("pandas-all") and wall("frame"):
        ratio = wall("frame") / wall("pandas-all")
        lines.append(f"goal 2 (frame): {ratio:.2f}x pandas all columns (aim <= 2.0): "
                     f"{verdict(ratio <= 2.0)}")
    if modes.get("stream", {}).get("server_rss_mib"):
        rss = modes["stream"]["server_rss_mib"]
        lines.append(f"goal 3 (stream): server peak RSS {rss:.0f} MiB (aim <= 256): "
                     f"{verdict(rss <= 256)}")
    for plain, zipped in (("frame", "frame-zlib"), ("stream", "stream-zlib")):
        if wall(plain) and wall(zipped) and modes[plain]["bytes_sent"]:
            lines.append(f"goal 4 ({zipped}): {modes[zipped]['bytes_sent'] / 1e6:.1f} MB sent "
                         f"vs {modes[plain]['bytes_sent'] / 1e6:.1f} MB, "
                         f"{wall(zipped):.2f} s vs {wall(plain):.2f} s")
    return ["\n" + lines[0], *lines[1:]] if lines else []


# --- Command line -----------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--csv", default=None,
                   help="input CSV; default: generate one with tools/make_csv.py in --work-dir")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the generated CSV")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every mode")
    p.add_argument("--only", nargs="+", choices=MODES, metavar="MODE",
                   help=f"run only these modes, of: {' '.join(MODES)}")
    p.add_argument("--no-modes", action="store_true",
                   help="run only the sub-benchmarks that are asked for")
    p.add_argument("--workers", type=int, default=2,
                   help="workers of frame, frame-zlib, stream and stream-zlib (the -1w modes "
                        "always run 1, for COST)")
    p.add_argument("--chunks", type=int, default=200, help="chunks of the distributed modes")
    p.add_argument("--dask-partitions", type=int, default=20,
                   help="partitions of the dask baseline (its blocksize is the file size "
                        "over this)")
    p.add_argument("--dask-workers", type=int, default=2,
                   help="worker processes of the dask baseline's LocalCluster")
    p.add_argument("--json", action="store_true", help="print one JSON document, not a table")
    p.add_argument("--save", type=Path, default=None,
                   help="also write the JSON document to this file")
    p.add_argument("--work-dir", type=Path,
                   default=Path(tempfile.gettempdir()) / "sales_bench",
                   help="where generated CSVs and temporary files go (never the repository)")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per command")
    s = p.add_argument_group("sub-benchmarks")
    s.add_argument("--chunk-overhead", action="store_true",
                   help="goal 5: chunks committed per second with tiny chunks")
    s.add_argument("--overhead-chunks", type=int, default=10_000, help="chunks (10 rows each)")
    s.add_argument("--overhead-workers", type=int, default=4, help="workers")
    s.add_argument("--many-workers", action="store_true",
                   help="goal 6: a job with --many workers at once")
    s.add_argument("--many", type=int, default=100, help="workers")
    s.add_argument("--many-chunks", type=int, default=2000, help="chunks")
    s.add_argument("--many-rows", type=int, default=200_000, help="rows of its CSV")
    s.add_argument("--many-delay", type=float, default=0.5,
                   help="seconds each worker sleeps per chunk (simulated work)")
    s.add_argument("--make-csv", action="store_true",
                   help="goal 7: time tools/make_csv.py --rows --make-csv-rows")
    s.add_argument("--make-csv-rows", type=int, default=5_000_000, help="rows to generate")
    s.add_argument("--watch-overhead", action="store_true",
                   help="the job's wall time with and without a live tools/watch.py")
    s.add_argument("--watch-rows", type=int, default=2_000_000,
                   help="rows of the --watch-overhead job")
    s.add_argument("--watch-chunks", type=int, default=2000,
                   help="chunks of the --watch-overhead job (many: the watcher reads and "
                        "draws one row and one cell per chunk)")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    if args.dask_partitions < 1 or args.dask_workers < 1 or args.workers < 1:
        p.error("--workers, --dask-partitions and --dask-workers must be at least 1")
    return args


def main(argv=None) -> int:
    """Run what the command line asks for; return 0, or 1 if any answer was wrong."""
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    summary = {"python": sys.version.split()[0], "cpus": os.cpu_count(),
               "load_before": os.getloadavg(), "reps": args.reps, "workers": args.workers,
               "chunks": args.chunks}
    failed = False
    if not args.no_modes:
        if args.csv:
            path, gen = args.csv, None
        else:
            path, gen = generate_csv(args.rows, args.work_dir)
            path = str(path)
        if gen is not None:
            log(f"generated {path} in {gen.wall:.1f} s")
            summary["make_csv_s"] = gen.wall
        data = describe_input(path)
        modes = [m for m in (args.only or MODES)]
        skipped = missing_baselines(modes)
        for mode, why in skipped.items():
            modes.remove(mode)
            log(f"{mode}: {why}")
        summary.update(csv=path, size_bytes=data.size, cat_s=warm_cache(path))
        results, reference = run_modes(modes, data, args, log)
        results.update({m: {"skipped": why} for m, why in skipped.items()})
        summary.update(modes=results, reference=reference)
        failed = any(not m.get("exact", True) for m in results.values())
    if args.chunk_overhead:
        summary["chunk_overhead"] = chunk_overhead(args, log)
        failed |= bool(summary["chunk_overhead"]["problems"])
    if args.many_workers:
        summary["many_workers"] = many_workers(args, log)
        m = summary["many_workers"]
        failed |= bool(m["problems"] or m["database_locked"] or m["exit_code"])
    if args.make_csv:
        summary["make_csv"] = make_csv_timing(args, log)
    if args.watch_overhead:
        summary["watch_overhead"] = watch_overhead(args, log)
        failed |= bool(summary["watch_overhead"]["problems"])
    summary["load_after"] = os.getloadavg()
    document = json.dumps(summary, indent=2, default=str)
    if args.save:
        args.save.write_text(document + "\n")
    if args.json:
        print(document)
    elif "modes" in summary:
        print_table(summary)
    if failed:
        log("bench.py: some answer differs from the single-process pandas answer (see above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
