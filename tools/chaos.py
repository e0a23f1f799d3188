"""Chaos runs: kill workers and the server at random; the answer must not change.

    python tools/chaos.py --runs 20 --rows 300000
    python tools/chaos.py --runs 3 --rows 30000 --chunks 30 --seed 7
    sudo python tools/chaos.py --partitions --runs 10      # root: network namespaces

Each run is one job on a generated sales CSV (made once in ``--data-dir``
and reused), with a short lease, in one of three modes chosen at random:
the documented mode on the CSV (``frame``) or on a gzip of it
(``frame-gz``: the server decompresses as it parses), or ``--stream``.
While it runs, this script

* keeps 2 or 3 workers alive, SIGKILLs a random one now and then and
  starts replacements; the workers also stall past their lease on their own
  (``--stall-rate``), so some chunks are re-leased and reported twice;
* SIGKILLs the server once or twice, at random points of its progress,
  checks ``PRAGMA integrity_check`` on the results database, and restarts it
  with the same arguments on the same port, so the old workers reconnect.

With ``--partitions`` (root only) every run gets a private network of its
own (``tools/netns.py``): the server in a hub namespace, each worker in one
of three leaf namespaces.  On top of the kills above, a random leaf's link
is cut now and then (``--partition-rate`` per second) for 0.2 s up to
``--max-cut`` seconds, so some cuts end within a lease and the worker never
notices, and others outlast the worker's ``--io-timeout`` and its lease; a
worker whose link is cut is sometimes SIGKILLed while cut, so it vanishes
without a FIN.  At most two leaves are cut at once, and every cut heals.

A run passes when the server ends with exit 0, its final aggregate equals a
single-process pandas computation (row counts exactly, the rest to 1e-9
relative), every chunk has exactly one counted result, and the database
passes ``integrity_check``.  One line per run, then "N passed, M failed";
the exit code is 1 if any run failed.  Every run has a deadline
(``--run-timeout``) and every child process is killed and reaped before
the next run starts, also on Ctrl-C.  The folder of a failed run (database
and logs) is kept and printed; the others are deleted.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import math
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRICE_COL, QTY_COL = "Unit Price", "Units Sold"   # the columns of make_csv's default layout
LEAVES = 3                                          # worker namespaces with --partitions
SECRET = "chaos-partitions"   # the server listens on a (private) non-loopback address


class RunFailed(Exception):
    """One run broke a rule; the message says which."""


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", type=int, default=20, help="number of runs")
    p.add_argument("--rows", type=int, default=300_000, help="rows of the generated CSV")
    p.add_argument("--chunks", type=int, default=60, help="chunks per job")
    p.add_argument("--seed", type=int, default=0, help="seed of all random choices")
    p.add_argument("--lease-timeout", type=float, default=1.0, help="server --lease-timeout, s")
    p.add_argument("--worker-kills-per-second", type=float, default=1.0,
                   help="average rate of SIGKILLs sent to workers")
    p.add_argument("--stall-rate", type=float, default=0.1,
                   help="worker --stall-rate (stalls last twice the lease)")
    p.add_argument("--run-timeout", type=float, default=240.0, help="deadline of one run, s")
    n = p.add_argument_group("network partitions (needs root and iproute2)")
    n.add_argument("--partitions", action="store_true",
                   help="run on network namespaces and cut workers' links at random")
    n.add_argument("--partition-rate", type=float, default=1.0,
                   help="average rate of link cuts, per second")
    n.add_argument("--max-cut", type=float, default=6.0, help="longest cut, s")
    n.add_argument("--vanish-rate", type=float, default=0.3,
                   help="share of cuts during which the cut-off worker is SIGKILLed")
    n.add_argument("--io-timeout", type=float, default=2.0,
                   help="worker --io-timeout with --partitions, s")
    p.add_argument("--data-dir", default=None,
                   help="where the CSV is made and reused (default: the system temp folder)")
    return p.parse_args(argv)


# --- input and the expected answer ----------------------------------------------

def sales_csv(data_dir: Path, rows: int) -> Path:
    """The CSV of ``rows`` rows in ``data_dir``, generated on first use, with a
    gzip copy beside it (the same name plus ``.gz``)."""
    path = data_dir / f"chaos_sales_{rows}.csv"
    if not path.exists():
        from tools.make_csv import write_csv
        write_csv(path, rows, seed=0)
    packed = path.with_name(path.name + ".gz")
    if not packed.exists():
        partial = Path(f"{packed}.{os.getpid()}.tmp")   # complete files only, under that name
        with open(path, "rb") as plain, gzip.open(partial, "wb", compresslevel=1) as out:
            shutil.copyfileobj(plain, out, 1 << 20)
        partial.replace(packed)
    return path


def pandas_answer(path: Path) -> dict:
    """The final aggregate computed in this one process with plain pandas.

    Independent of worker.py: a row counts when its price and quantity are
    both finite numbers under pandas' own parsing.
    """
    import numpy as np
    import pandas as pd
    df = pd.read_csv(path, usecols=[PRICE_COL, QTY_COL])
    price = pd.to_numeric(df[PRICE_COL], errors="coerce")
    qty = pd.to_numeric(df[QTY_COL], errors="coerce")
    ok = np.isfinite(price) & np.isfinite(qty)
    valid = price[ok]
    return {"total_rows": len(df), "rejected_rows": int((~ok).sum()),
            "total_sales": float((valid * qty[ok]).sum()),
            "min_price": float(valid.min()) if len(valid) else None,
            "max_price": float(valid.max()) if len(valid) else None,
            "avg_price": float(valid.mean()) if len(valid) else None}


def compare(final: dict, expected: dict) -> None:
    """Raise RunFailed unless counts are equal and the rest equal to 1e-9 relative."""
    for key, want in expected.items():
        got = final.get(key)
        if key.endswith("rows") or want is None or got is None:
            same = got == want
        else:
            same = math.isclose(got, want, rel_tol=1e-9)
        if not same:
            raise RunFailed(f"{key} is {got!r}, pandas says {want!r}")


# --- the results database, read from outside -------------------------------------

def db_query(db: Path, sql: str) -> list[tuple]:
    """A read-only query; [] while the database or its tables do not exist yet."""
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []


def integrity(db: Path) -> str:
    """``PRAGMA integrity_check`` ('ok' when the file is sound)."""
    con = sqlite3.connect(db, timeout=10)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def check_database(db: Path, chunks: int) -> dict:
    """Check the finished database; return counts of attempts by outcome."""
    if (answer := integrity(db)) != "ok":
        raise RunFailed(f"integrity_check says {answer!r}")
    results = sorted(c for (c,) in db_query(db, "SELECT chunk_id FROM chunk_results"))
    if results != list(range(chunks)):
        raise RunFailed(f"chunk_results holds chunks {results}, expected 0..{chunks - 1} once")
    counted = sorted(c for (c,) in db_query(
        db, "SELECT chunk_id FROM attempts WHERE outcome = 'counted'"))
    if counted != list(range(chunks)):
        raise RunFailed(f"counted attempts are for chunks {counted}, expected each chunk once")
    return dict(db_query(db, "SELECT outcome, COUNT(*) FROM attempts GROUP BY outcome"))


def check_no_redo(db: Path, snapshots: list) -> None:
    """Chunks done before a server kill were never handed out after it."""
    leases = db_query(db, "SELECT attempt_id, chunk_id FROM attempts")
    for done, last in snapshots:
        redone = sorted({c for a, c in leases if a > last and c in done})
        if redone:
            raise RunFailed(f"chunks {redone} were done before a server kill "
                            f"and dispatched again after it")


# --- one run ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """The processes and counters of one run."""
    folder: Path
    server_cmd: list
    worker_args: list
    rng: random.Random
    deadline: float
    server: subprocess.Popen | None = None
    workers: list = field(default_factory=list)
    started_workers: int = 0
    server_starts: int = 0
    worker_kills: int = 0
    server_kills: int = 0
    # (chunks done, last attempt id) at each server kill: checked at the end.
    snapshots: list = field(default_factory=list)
    net: object = None            # a tools.netns.VirtualNetwork with --partitions
    homes: dict = field(default_factory=dict)     # worker Popen -> its leaf
    heal_at: dict = field(default_factory=dict)   # cut leaf -> monotonic time to heal it
    cuts: int = 0
    vanished: int = 0

    def in_namespace(self, where, cmd: list) -> list:
        """``cmd``, run in namespace ``where`` when the run has a network."""
        return self.net.command(where, cmd) if self.net else cmd

    def env(self) -> dict | None:
        return dict(os.environ, SALES_SECRET=SECRET) if self.net else None

    def check_time(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise RunFailed(f"run deadline passed while {what}")

    def start_server(self) -> None:
        """Start the server and wait until it listens (its port file appears)."""
        self.server_starts += 1
        port_file = self.folder / f"server-{self.server_starts}.port"
        log = open(self.folder / f"server-{self.server_starts}.log", "w")
        out = open(self.folder / f"server-{self.server_starts}.out", "w")
        cmd = [*self.server_cmd, "--port-file", str(port_file)]
        self.server = subprocess.Popen(self.in_namespace(self.net and self.net.hub, cmd),
                                       stdout=out, stderr=log, cwd=ROOT, env=self.env())
        log.close()
        out.close()
        while not port_file.exists():
            if self.server.poll() is not None:
                raise RunFailed(f"server start {self.server_starts} exited with "
                                f"{self.server.returncode} (see {log.name})")
            self.check_time("waiting for the server to listen")
            time.sleep(0.02)

    def kill_server(self, db: Path) -> None:
        """SIGKILL the server, check the database, note what is done, start it again."""
        self.server.kill()
        self.server.wait()
        self.server_kills += 1
        if (answer := integrity(db)) != "ok":
            raise RunFailed(f"integrity_check after server kill {self.server_kills}: {answer!r}")
        done = {c for (c,) in db_query(db, "SELECT chunk_id FROM chunk_results")}
        last = db_query(db, "SELECT COALESCE(MAX(attempt_id), 0) FROM attempts")[0][0]
        self.snapshots.append((done, last))
        self.start_server()

    def start_worker(self) -> bool:
        """Start one more worker (with a network: in a leaf that has none
        running); return False if every leaf has one already."""
        leaf = None
        if self.net:
            busy = {self.homes.get(w) for w in self.workers}
            free = [leaf for leaf in self.net.leaves if leaf not in busy]
            if not free:
                return False
            leaf = self.rng.choice(free)
        n = self.started_workers
        self.started_workers += 1
        log = open(self.folder / f"worker-{n}.log", "w")
        cmd = [sys.executable, str(ROOT / "tools" / "flaky_worker.py"), "--worker-id", f"chaos-{n}",
               "--fault-seed", str(self.rng.randrange(1 << 30)), *self.worker_args]
        worker = subprocess.Popen(self.in_namespace(leaf, cmd), stdout=log,
                                  stderr=subprocess.STDOUT, cwd=ROOT, env=self.env())
        log.close()
        self.workers.append(worker)
        self.homes[worker] = leaf
        return True

    def partition(self, rate: float, longest: float, vanish: float, tick: float) -> None:
        """Heal the cuts that are due; maybe cut one more leaf (and kill its worker)."""
        now = time.monotonic()
        for leaf, when in list(self.heal_at.items()):
            if when <= now:
                self.net.heal(leaf)
                del self.heal_at[leaf]
        up = [leaf for leaf in self.net.leaves if leaf not in self.heal_at]
        if len(up) > 1 and self.rng.random() < tick * rate:
            leaf = self.rng.choice(up)
            self.net.cut(leaf)
            self.cuts += 1
            self.heal_at[leaf] = now + self.rng.uniform(0.2, longest)
            if self.rng.random() < vanish:
                for worker in self.workers:
                    if self.homes.get(worker) is leaf and worker.poll() is None:
                        worker.kill()      # cut off, then gone: no FIN will ever come
                        self.vanished += 1

    def stop_all(self) -> None:
        """Kill and reap every child still running (nothing outlives a run),
        then remove the run's network, if it has one."""
        for proc in [self.server, *self.workers]:
            if proc is not None and proc.poll() is None:
                proc.kill()
        for proc in [self.server, *self.workers]:
            if proc is not None:
                proc.wait()
        if self.net:
            self.net.close()


def run_once(number: int, args, csv: Path, expected: dict) -> tuple[bool, str, Path]:
    """Run one chaotic job; return (passed, one-line summary, its folder)."""
    rng = random.Random(args.seed * 100_003 + number)
    folder = Path(tempfile.mkdtemp(prefix=f"chaos-run{number}-"))
    db = folder / "results.sqlite"
    port = free_port()
    mode = rng.choice(("frame", "frame-gz", "stream"))
    stream = mode == "stream"
    source = csv.with_name(csv.name + ".gz") if mode == "frame-gz" else csv
    net = None
    if args.partitions:
        from tools.netns import VirtualNetwork
        net = VirtualNetwork(LEAVES)
    host = net.server_address if net else "127.0.0.1"
    server_cmd = [sys.executable, str(ROOT / "server.py"), "--csv", str(source),
                  "--host", host, "--port", str(port), "--db", str(db),
                  "--chunks", str(args.chunks), "--lease-timeout", str(args.lease_timeout),
                  "--linger", "1"] + ["--stream"] * stream
    worker_args = ["--server", host, "--port", str(port), "--give-up-after", "60",
                   "--stall-rate", str(args.stall_rate),
                   "--stall-seconds", str(2 * args.lease_timeout), "--log-level", "WARNING"]
    if net:
        worker_args += ["--io-timeout", str(args.io_timeout)]
    run = Run(folder, server_cmd, worker_args, rng, time.monotonic() + args.run_timeout, net=net)
    # Kill the server when this many chunks are done (1 or 2 times a run).
    kill_at = sorted(rng.randint(1, max(1, int(args.chunks * 0.9)))
                     for _ in range(rng.choice((1, 2))))
    started = time.monotonic()
    try:
        run.start_server()
        code = drive(run, db, kill_at, args)
        if code != 0:
            raise RunFailed(f"server exited with {code}")
        final = parse_final((folder / f"server-{run.server_starts}.out").read_text())
        compare(final, expected)
        outcomes = check_database(db, args.chunks)
        check_no_redo(db, run.snapshots)
        passed, detail = True, (f"dispatches {sum(outcomes.values())}, duplicates "
                                f"{outcomes.get('duplicate', 0)}"
                                + (f", expired {outcomes.get('expired', 0)}" if net else ""))
    except (RunFailed, OSError, sqlite3.Error) as exc:
        passed, detail = False, f"FAILED: {exc} (logs: {folder})"
    finally:
        run.stop_all()
    cuts = f"link cuts {run.cuts} (vanished {run.vanished}), " if net else ""
    summary = (f"run {number + 1}: {'PASS' if passed else 'FAIL'} {mode:8} "
               f"{time.monotonic() - started:6.1f} s, server kills {run.server_kills}, "
               f"worker kills {run.worker_kills}, {cuts}workers started {run.started_workers}, "
               f"{detail}")
    return passed, summary, folder


def drive(run: Run, db: Path, kill_at: list, args) -> int:
    """Keep workers alive, kill things (and cut links) at random; return the
    server's final exit code."""
    tick = 0.1
    target = run.rng.choice((2, 3))
    while run.server.poll() is None:
        run.check_time("the job was running")
        run.workers = [w for w in run.workers if w.poll() is None]
        if run.rng.random() < tick / 5:           # now and then, change the crowd size
            target = run.rng.choice((2, 3))
        while len(run.workers) < target and run.start_worker():
            pass
        if run.net:
            run.partition(args.partition_rate, args.max_cut, args.vanish_rate, tick)
        if run.workers and run.rng.random() < tick * args.worker_kills_per_second:
            victim = run.rng.choice(run.workers)
            victim.kill()
            run.worker_kills += 1
        done = db_query(db, "SELECT COUNT(*) FROM chunk_results")
        if kill_at and done and done[0][0] >= kill_at[0]:
            kill_at.pop(0)
            run.kill_server(db)
            continue
        time.sleep(tick)
    return run.server.returncode


def parse_final(stdout: str) -> dict:
    """The final aggregate dict the server printed."""
    for line in stdout.splitlines():
        if line.startswith("{'total_rows'"):
            return ast.literal_eval(line)
    raise RunFailed("the server printed no final aggregate")


def _interrupt(signum, frame):
    """SIGTERM acts like Ctrl-C, so the finally blocks kill the children."""
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """Run the chaos runs; return 0 if all passed, 1 otherwise (130 on Ctrl-C)."""
    args = parse_args(argv)
    if args.partitions:
        from tools import netns
        reason = netns.unavailable()
        if reason:
            print(f"chaos.py: error: --partitions: {reason}", file=sys.stderr)
            return 2
        netns.remove_stale()
    signal.signal(signal.SIGTERM, _interrupt)
    data_dir = Path(args.data_dir or tempfile.gettempdir())
    data_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    csv = sales_csv(data_dir, args.rows)
    expected = pandas_answer(csv)
    network = (f"; partitions: {args.partition_rate}/s up to {args.max_cut} s, worker "
               f"--io-timeout {args.io_timeout} s" if args.partitions else "")
    print(f"chaos: {args.runs} runs on {csv} ({args.rows} rows, {args.chunks} chunks, "
          f"lease {args.lease_timeout} s{network}); pandas says {expected}", flush=True)
    passed = failed = 0
    try:
        for number in range(args.runs):
            ok, summary, folder = run_once(number, args, csv, expected)
            print(summary, flush=True)
            if ok:
                passed += 1
                shutil.rmtree(folder, ignore_errors=True)
            else:
                failed += 1
    except KeyboardInterrupt:
        print(f"interrupted; {passed} passed, {failed} failed so far", flush=True)
        return 130
    print(f"{passed} passed, {failed} failed in {time.monotonic() - started:.1f} s", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
