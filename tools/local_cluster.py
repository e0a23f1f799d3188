"""Run a whole job on this machine: one server and N workers as subprocesses.

    python tools/local_cluster.py                       # demo data, 2 workers
    python tools/local_cluster.py --csv sales_5m.csv --workers 2 --chunks 200

It is exactly what the README's multi-terminal instructions do by hand: the
server binds a free loopback port (``--port 0 --port-file``), the workers
are pointed at it, the server's log and final aggregate appear on this
terminal.  The exit code is the server's.  Every child is stopped when the
server ends, on Ctrl-C or SIGTERM, and on any error: nothing is left running.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--csv", default=None,
                   help="input CSV; default: generate demo_sales_<rows>.csv here (kept for reuse)")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the generated demo CSV")
    p.add_argument("--workers", type=int, default=2, help="number of worker processes")
    p.add_argument("--chunks", type=int, default=200, help="number of chunks")
    p.add_argument("--db", default=None,
                   help="results database; default: a temporary one, deleted afterwards")
    p.add_argument("--stream", action="store_true", help="pass --stream to the server")
    p.add_argument("--compress", action="store_true", help="pass --compress to the server")
    p.add_argument("--group-by", default=None, help="pass --group-by COLUMN to the server")
    p.add_argument("--server-args", default="",
                   help="more server options, e.g. '--lease-timeout 2'; a single option "
                        "needs the = form: --server-args=--fresh")
    p.add_argument("--worker-args", default="",
                   help="more options for every worker (tools/flaky_worker.py), e.g. "
                        "'--crash-rate 0.2'")
    p.add_argument("--log-level", default="INFO", help="server log level (workers: WARNING)")
    p.add_argument("--respawn", type=int, default=0, metavar="N",
                   help="restart a worker that exits with an error (e.g. --crash-rate), under "
                        "the same --worker-id, up to N times in all; 0: never")
    return p.parse_args(argv)


def demo_csv(rows: int) -> str:
    """Path of the demo CSV with ``rows`` rows, generated on first use."""
    path = Path(f"demo_sales_{rows}.csv")
    if not path.exists():
        from tools.make_csv import write_csv
        print(f"generating {path} ({rows} rows) ...", file=sys.stderr)
        write_csv(path, rows, seed=0, progress=True)
    return str(path)


def stop(children: list[subprocess.Popen], grace: float = 5.0) -> None:
    """Terminate the children still running; kill those that linger; reap all."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def start_worker(port_file: Path, slot: int, worker_args: str) -> subprocess.Popen:
    """Start ``worker-<slot>``; it reads the server's port from ``port_file``.

    Always tools/flaky_worker.py, the real worker that also takes the fault
    options (``--worker-args '--crash-rate 0.2'``); without them it is
    worker.py exactly.
    """
    return _spawn(
        [sys.executable, str(ROOT / "tools" / "flaky_worker.py"), "--server", "127.0.0.1",
         "--port-file", str(port_file), "--worker-id", f"worker-{slot}",
         "--log-level", "WARNING", "--give-up-after", "10", *shlex.split(worker_args)])


def _spawn(cmd: list) -> subprocess.Popen:
    # A session of its own: Ctrl-C in the terminal reaches this process only,
    # which then stops the children with SIGTERM, their clean-shutdown signal
    # (a SIGINT in the middle of `import pandas` would print a traceback).
    return subprocess.Popen(cmd, start_new_session=True)


def supervise(server: subprocess.Popen, workers: dict, respawns: int, restart,
              children: list) -> int:
    """Wait for the server to exit and return its code.

    Meanwhile a worker that exited with an error is started again with
    ``restart(slot)``, at most ``respawns`` times in all: crashed workers
    are otherwise gone for good, and a job whose workers all crashed would
    wait forever.  A worker that exits 0 has heard NO_JOB and stays gone.
    """
    while True:
        try:
            return server.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        for slot, worker in workers.items():
            if respawns > 0 and worker.poll() not in (None, 0):
                print(f"local_cluster: worker-{slot} exited with {worker.returncode}; "
                      f"restarting it ({respawns - 1} restarts left)", file=sys.stderr)
                workers[slot] = restart(slot)
                children.append(workers[slot])
                respawns -= 1


def main(argv=None) -> int:
    """Run the job; return the server's exit code (130 on Ctrl-C)."""
    args = parse_args(argv)
    # SIGTERM (kill, timeout, a CI cancel) must clean up like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        csv = args.csv or demo_csv(args.rows)
    except KeyboardInterrupt:
        print("local_cluster: interrupted while generating the demo CSV", file=sys.stderr)
        return 130
    children: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="local_cluster-") as tmp:
        port_file = Path(tmp) / "port"
        db = args.db or os.path.join(tmp, "results.sqlite")
        server_cmd = [sys.executable, str(ROOT / "server.py"), "--csv", csv, "--host", "127.0.0.1",
                      "--port", "0", "--port-file", str(port_file), "--chunks", str(args.chunks),
                      "--db", db, "--log-level", args.log_level]
        server_cmd += ["--stream"] * args.stream + ["--compress"] * args.compress
        server_cmd += ["--group-by", args.group_by] if args.group_by else []
        server_cmd += shlex.split(args.server_args)
        try:
            server = _spawn(server_cmd)
            children.append(server)
            # The workers start now, not once the server listens: their own
            # start-up (mostly importing pandas) then overlaps the server's
            # loading of the CSV.  Each waits for the port file by itself.
            workers = {}
            for i in range(1, args.workers + 1):
                workers[i] = start_worker(port_file, i, args.worker_args)
                children.append(workers[i])
            code = supervise(server, workers, args.respawn,
                             lambda i: start_worker(port_file, i, args.worker_args), children)
            return code
        except KeyboardInterrupt:
            return 130
        finally:
            stop(children)


if __name__ == "__main__":
    sys.exit(main())
