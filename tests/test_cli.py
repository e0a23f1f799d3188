"""What a user meets first: the command lines, their errors, and clean exits.

Each test starts real processes, as a user in a terminal would.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import PY, ROOT, make_sales_csv, wait_for


@pytest.mark.parametrize("program, args", [
    ("server.py", ["--csv", "x.csv", "--port", "99999"]),
    ("worker.py", ["--port", "0"]),
    ("worker.py", ["--io-timeout", "-1"]),
    # Past ~9.2e9 s settimeout() raises OverflowError on every connection.
    ("server.py", ["--csv", "x.csv", "--idle-timeout", "1e10"]),
    ("server.py", ["--csv", "x.csv", "--io-timeout", "inf"]),
    ("server.py", ["--csv", "x.csv", "--lease-timeout", "0"]),
    ("server.py", ["--csv", "x.csv", "--lease-timeout", "-5"]),
    ("server.py", ["--csv", "x.csv", "--linger", "nan"]),
    ("server.py", ["--csv", "x.csv", "--linger", "-1"]),
    ("server.py", ["--csv", "x.csv", "--db-retry-for", "1e12"]),
    # Attack run: 100 bytes was accepted, and no RESULT or FAILED report could fit.
    ("server.py", ["--csv", "x.csv", "--max-frame", "100"]),
    ("worker.py", ["--give-up-after", "1e10"]),
    ("tools/flaky_worker.py", ["--stall-seconds", "1e300"]),
    ("tools/flaky_worker.py", ["--delay", "-0.5"]),
    ("tools/flaky_worker.py", ["--crash-rate", "1.5"]),
])
def test_bad_number_is_a_usage_error(program, args):
    """An impossible port number, timeout, delay or rate is refused by the
    command line (exit 2, one error line), not by a traceback from bind() or
    settimeout() on every connection, or a minute of retrying.  Durations
    must be finite, above 0 (or 0 where that means "none") and at most a
    week."""
    done = subprocess.run([PY, str(ROOT / program), *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(f"got {args[-1]}")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("program", ["server.py", "worker.py"])
def test_help_names_each_default_once(program):
    """``--help`` shows a default where there is one, once: no option reads
    "(default: detected) (default: None)", and none shows a meaningless
    "(default: None)" or "(default: False)"."""
    done = subprocess.run([PY, str(ROOT / program), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())   # argparse wraps lines anywhere
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: detected) (default" not in text
    assert {"server.py": "(default: detected)", "worker.py": "(default: 60.0)"}[program] in text
    for option in text.split(" -")[1:]:
        assert option.count("(default") <= 1, option


def test_port_in_use_is_one_line(procs, tmp_path):
    """A second server on a busy port says which address is taken, in one line."""
    csv = make_sales_csv(tmp_path / "s.csv", 100)
    first = procs.server(csv, args=["--chunks", "1"])
    done = subprocess.run([PY, str(ROOT / "server.py"), "--csv", str(csv), "--port",
                           str(first.port), "--db", str(tmp_path / "other.sqlite")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"server.py: error: cannot listen on 127.0.0.1:{first.port}: "
                                   "Address already in use")


def test_worker_says_when_the_server_is_not_up_yet(tmp_path):
    """A worker started before its server logs, at once, that it cannot reach
    it and will keep retrying; it gives up with a clear error (exit 1)."""
    done = subprocess.run([PY, str(ROOT / "worker.py"), "--port", "9", "--worker-id", "early",
                           "--give-up-after", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert "cannot reach 127.0.0.1:9" in lines[0] and "retrying for up to 1 s" in lines[0]
    assert "unreachable for 1 s" in lines[-1]
    # A job with no rows, or one already complete, ends before its workers come:
    # the message must not leave the user guessing.
    assert "if its job is finished, the server has exited" in lines[-1]


def test_worker_says_when_the_server_answers_but_no_handshake_succeeds():
    """Attack run: a plaintext worker against a TLS server (or one with another
    secret, which the server hangs up on) retried for --give-up-after and then said
    the server was unreachable, "the server has exited". It was up: the worker now
    says that connections were accepted and asks about the secret and TLS."""
    import socket
    import threading
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)   # a close() does not wake an accept() blocked in another thread
    port = listener.getsockname()[1]
    stop = threading.Event()

    def hang_up():   # a server that takes every connection and drops it at once
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=hang_up)
    thread.start()
    try:
        done = subprocess.run([PY, str(ROOT / "worker.py"), "--port", str(port), "--worker-id",
                               "w", "--give-up-after", "1"], capture_output=True, text=True,
                              timeout=60)
    finally:
        stop.set()
        thread.join(10)
        listener.close()
    assert done.returncode == 1
    last = done.stderr.splitlines()[-1]
    assert f"127.0.0.1:{port} accepted connections, but no handshake succeeded for 1 s" in last
    assert "same secret and TLS" in last and "has exited" not in last


def test_idle_timeout_below_the_lease_timeout_is_warned(tmp_path):
    """Attack run: --idle-timeout 0.3 with chunks that take 1 s dropped every worker
    mid-chunk (17 attempts for 10 chunks) without a word; the server now warns at
    start. (A header-only file: the job ends at once, 0 rows.)"""
    path = tmp_path / "h.csv"
    path.write_text("Price,Qty\n")
    done = subprocess.run([PY, str(ROOT / "server.py"), "--csv", str(path), "--port", "0",
                           "--db", str(tmp_path / "h.db"), "--idle-timeout", "1",
                           "--lease-timeout", "5"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert ("--idle-timeout 1 s is below --lease-timeout 5 s: a worker that computes a chunk "
            "for longer is dropped") in done.stderr


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc; Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.timeout(90)
def test_sigterm_on_local_cluster_leaves_nothing_running(procs, tmp_path):
    """`kill` on tools/local_cluster.py stops its server and workers too (before
    the fix they were adopted by init and ran on)."""
    csv = make_sales_csv(tmp_path / "s.csv", 2_000)
    cluster = procs.popen([PY, str(ROOT / "tools" / "local_cluster.py"), "--csv", str(csv),
                           "--chunks", "20", "--worker-args", "--delay 1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids = wait_for(lambda: (lambda k: k if len(k) == 3 else None)(children_of(cluster.pid)),
                    30, "the server and two workers to start")
    cluster.send_signal(signal.SIGTERM)
    assert cluster.wait(timeout=30) == 128 + signal.SIGTERM
    wait_for(lambda: not any(alive(pid) for pid in kids), 15, "the children to exit")


@pytest.mark.timeout(60)
def test_worker_waiting_for_a_port_file_gives_up(tmp_path):
    """Fault (attack run): a worker told to wait for --port-file waited for ever when
    the server had refused its input and exited (it never writes the file).  It now
    gives up after --give-up-after seconds: one error line, exit 1."""
    missing = tmp_path / "never.port"
    out = subprocess.run([PY, str(ROOT / "worker.py"), "--port-file", str(missing),
                          "--worker-id", "w", "--give-up-after", "1"],
                         capture_output=True, text=True, timeout=50)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"no port in {missing} after 1 s" in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_the_same_column_for_price_and_quantity_is_refused(tmp_path):
    """Fault (attack run): --price-col Qty took the quantity column for both, and
    the job summed Qty * Qty.  Two roles, one column: a usage error."""
    import server
    path = tmp_path / "s.csv"
    path.write_text("Price,Qty\n2.5,4\n")
    with pytest.raises(server.InputError, match="both 'Qty'"):
        server.inspect_csv(str(path), price_col="Qty")


@pytest.mark.parametrize("version, ok", [("3.1.0", True), ("3.1.1", True), ("4.0.0rc1", True),
                                         ("3.0.6", False), ("2.2.3", False)])
def test_pandas_older_than_the_oldest_tested_is_refused(version, ok):
    """Under pandas 3.0.6 every job failed ('Usecols do not match columns') and
    lone-CR input was misread; under 2.2.3 numbers came back off in the last
    digit.  requirements.txt asks for 3.1 and up; an older pandas already
    installed is refused by name instead of giving a wrong answer."""
    import types

    import worker
    module = types.SimpleNamespace(__version__=version)
    if ok:
        worker.check_pandas(module)
    else:
        with pytest.raises(ImportError, match=f"pandas {version} is too old.*>= 3.1"):
            worker.check_pandas(module)


@pytest.mark.timeout(60)
def test_server_and_worker_with_too_old_a_pandas_say_so_in_one_line(tmp_path):
    """Each program, given a pandas older than it accepts (the oldest accepted
    raised past the installed one), stops with one line that names the fix:
    the server before its job starts (exit 2), the worker before it connects
    (exit 1)."""
    path = tmp_path / "s.csv"
    path.write_text("Price,Qty\n2.5,4\n")
    older = "import sys, worker; worker.PANDAS_OLDEST = (999, 0); import {0}; sys.exit({0}.main())"
    server = subprocess.run([PY, "-c", older.format("server"), "--csv", str(path), "--port", "0",
                             "--db", str(tmp_path / "s.db")], cwd=ROOT, capture_output=True,
                            text=True, timeout=50)
    assert server.returncode == 2, server.stderr
    assert server.stderr.strip().splitlines() == [
        f"server.py: error: cannot import pandas (pandas {_pandas_version()} is too old, this "
        "project needs pandas >= 999.0): pip install -r requirements.txt"]
    worker = subprocess.run([PY, "-c", older.format("worker"), "--port", "9", "--worker-id", "w",
                             "--give-up-after", "1"], cwd=ROOT, capture_output=True, text=True,
                            timeout=50)
    assert worker.returncode == 1, worker.stderr
    assert "pandas >= 999.0" in worker.stderr and "pip install -r requirements.txt" in worker.stderr
    assert "Traceback" not in worker.stderr


def _pandas_version() -> str:
    import pandas
    return pandas.__version__
