"""A worker: pulls chunks from the server, computes partial metrics, reports them.

Run one per core, on this machine or others::

    python worker.py --server 127.0.0.1 --port 5000 --worker-id worker-1

The main loop (:meth:`Worker.run`) is the whole life of a worker::

    connect ──> HELLO ──> GET_JOB ──> reply ─┬─ JOB ────> compute ──> RESULT, next ──┐
       ^                     ^               ├─ WAIT ───> sleep retry_after ──┐      │
       │                     └───────────────┼────────────────────────────────┘      │
       │                                     └─ NO_JOB ─> exit 0                     │
       │                                ^                                            │
       │                                └─── ACK, and the next reply in the same write
       └── connection lost: back off (exponential, jittered), reconnect,
           re-send the RESULT that was not acknowledged, carry on

Delivery is at-least-once: a RESULT is kept until the server's ACK says it
is committed, and sent again after a reconnect.  The server's first-wins
commit makes the duplicates harmless (see ``db_utils.py``).

:func:`compute_metrics` is a pure function of a DataFrame, so it can be
tested without any socket.  The module reads in that order: the worker and
its loop, then the metrics; after them, under a banner, the armour: the
column and number rules, the CSV reader and the local read of the input,
all shared with the server, which checks the header before it starts.
"""

from __future__ import annotations

import argparse
import codecs
import ctypes
import functools
import gc
import hashlib
import importlib
import io
import json
import logging
import math
import os
import pickle
import random
import re
import signal
import socket
import ssl
import stat
import sys
import threading
import time
import zlib

import numpy as np

import protocol

log = logging.getLogger("worker")


class LazyModule:
    """A module imported when one of its attributes is first used.

    pandas takes 0.3-0.4 s to import.  The server imports this module for its
    column, number and record rules, and in ``--stream`` it never parses: with
    ``pd = LazyModule("pandas")`` only a process that parses pays for it.
    ``check(module)``, if given, runs once after the import and may raise
    ``ImportError``, as the import itself may.
    """

    def __init__(self, name: str, check=None):
        self._name, self._check, self._module = name, check, None

    def load(self):
        """The module, imported (and checked) on the first call."""
        if self._module is None:
            module = importlib.import_module(self._name)
            if self._check is not None:
                self._check(module)
            self._module = module
        return self._module

    def __getattr__(self, attr: str):
        # Called only for names this object lacks, so for every pandas name:
        # the module is looked up once, not on each call of a hot path.
        return getattr(self._module or self.load(), attr)


# The oldest pandas release the test suite passes on.  pandas 3.0 reads a
# header name that starts with a NUL byte as "Unnamed: N" and misreads
# lone-CR line ends fed to it in small reads; pandas 2.2 converts text to
# numbers a bit off in the last digit (1.9999999998835847 came back as
# 1.999999999883585).  Either gives wrong answers or no answer.
PANDAS_OLDEST = (3, 1)


def check_pandas(module) -> None:
    """Raise ``ImportError`` if ``module`` (pandas) is older than :data:`PANDAS_OLDEST`."""
    version = tuple(int(part) for part in re.findall(r"\d+", module.__version__)[:2])
    if version < PANDAS_OLDEST:
        raise ImportError(f"pandas {module.__version__} is too old, this project needs pandas "
                          f">= {'.'.join(map(str, PANDAS_OLDEST))}")


pd = LazyModule("pandas", check=check_pandas)
SECRET_ENV = "SALES_SECRET"


# --- The lesson, part 1: the worker and its main loop ----------------------------

class GiveUp(Exception):
    """The server stayed unreachable for longer than --give-up-after."""


class Worker:
    """One worker process's connection and main loop.

    ``secret`` (bytes) authenticates both ends; ``tls_ca`` (a PEM path)
    turns on TLS and verifies the server against that CA.  ``give_up_after``
    (s) bounds how long the worker keeps reconnecting to a server that is
    gone; ``io_timeout`` (s) bounds any one blocking read or write.
    ``local_read``: in ``--stream``, read the chunks from the server's input
    file when this machine has the same file (:class:`LocalInput`).
    """

    def __init__(self, host: str, port: int, worker_id: str, secret: bytes = b"",
                 tls_ca: str | None = None, give_up_after: float = 60.0,
                 io_timeout: float = 60.0, local_read: bool = True):
        self.host, self.port, self.worker_id = host, port, worker_id
        self.secret = secret
        self.tls = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
        self.give_up_after, self.io_timeout = give_up_after, io_timeout
        self.sock: socket.socket | None = None
        self.answered = False   # this outage: a TCP connection was made, the handshake failed
        self.server_max_frame = protocol.SERVER_MAX_FRAME  # until WELCOME says otherwise
        self.stopping = threading.Event()
        self.chunks_done = 0
        self.local_read = local_read
        self.input: LocalInput | None = None   # the input file, if this worker reads it

    def stop(self) -> None:
        """Ask the loop to end after the current attempt (signal-safe)."""
        self.stopping.set()

    def run(self) -> int:
        """The main loop; returns the process exit code (0: job done)."""
        unacked = None  # a RESULT or FAILED message the server has not acknowledged
        reply = None    # the answer to a GET_JOB that came with the last ACK, if any
        while True:
            try:
                if self.sock is None:
                    if self.stopping.is_set():
                        return 0  # never reconnect just to say goodbye
                    self.connect()
                if unacked is not None:
                    reply = self.deliver(unacked)
                    unacked = None
                if self.stopping.is_set():
                    log.info("%s: stopping after %d chunks", self.worker_id, self.chunks_done)
                    return 0
                if reply is None:
                    reads = self.input is not None and self.input.is_open()
                    reply = self.request(protocol.make(protocol.GET_JOB, local_read=reads))
                reply, job = None, reply
                if job["type"] == protocol.NO_JOB:
                    log.info("%s: job finished, %d results delivered from here",
                             self.worker_id, self.chunks_done)
                    return 0
                if job["type"] == protocol.WAIT:
                    self.stopping.wait(_retry_after(job))
                    continue
                if job["type"] != protocol.JOB:
                    raise protocol.ProtocolError(f"unexpected {job['type']} reply to GET_JOB")
                unacked = self.handle_job(job)
                reply = self.deliver(unacked)
                unacked = None
            except GiveUp as exc:
                if self.stopping.is_set():
                    # Asked to stop (SIGTERM) while the server was away: a
                    # clean stop, as when no connection is open (see above);
                    # an unacknowledged result is simply leased again.
                    log.info("%s: stopped while reconnecting", self.worker_id)
                    return 0
                log.error("%s: %s", self.worker_id, exc)
                return 1
            except (protocol.AuthenticationError, ssl.SSLCertVerificationError) as exc:
                log.error("%s: cannot authenticate the server: %s", self.worker_id, exc)
                return 1
            except protocol.ServerRefused as exc:
                # The server rejected what we sent (e.g. a result of an
                # older job); re-sending it would be refused again.
                log.error("%s: server refused: %s", self.worker_id, exc)
                unacked = None
                self.disconnect()
            except (OSError, EOFError, protocol.TruncatedFrame) as exc:
                log.warning("%s: connection lost (%s); reconnecting", self.worker_id, exc)
                self.disconnect()
            except protocol.ProtocolError as exc:
                log.error("%s: the server broke the protocol: %s", self.worker_id, exc)
                self.disconnect()
                return 1

    # --- connection ----------------------------------------------------------

    def connect(self) -> None:
        """Connect, handshake and say HELLO, retrying with backoff.

        Delays grow 0.1, 0.2, 0.4 ... s up to 5 s, each drawn uniformly
        below that bound ("full jitter", so restarted workers do not
        reconnect in lockstep).  Raises :class:`GiveUp` after
        ``give_up_after`` seconds without success.
        """
        deadline = time.monotonic() + self.give_up_after
        bound = 0.1
        self.answered = False
        while True:
            try:
                self.sock = self._open()
                try:
                    welcome = self.request(protocol.make(protocol.HELLO, worker_id=self.worker_id))
                except protocol.ServerRefused as exc:
                    # Saying HELLO again would be refused again: stop, do not spin.
                    raise GiveUp(f"server refused HELLO: {exc}") from None
                if welcome["type"] != protocol.WELCOME:
                    raise protocol.ProtocolError(f"expected WELCOME, got {welcome['type']}")
                protocol.check(welcome)
                if welcome["max_frame"] > 0:
                    self.server_max_frame = welcome["max_frame"]
                log.info("%s: connected to %s:%d, job %s (%d chunks)", self.worker_id,
                         self.host, self.port, welcome["job_id"], welcome["chunks"])
                self.open_input(welcome)
                return
            except ssl.SSLCertVerificationError:
                # An OSError, but no network hiccup: this server is not one the
                # CA vouches for, and retrying cannot change that (run() says so).
                self.disconnect()
                raise
            except (OSError, EOFError, protocol.TruncatedFrame) as exc:
                self.disconnect()
                if bound == 0.1:  # the first failure of this outage: say what goes on
                    log.warning("%s: cannot reach %s:%d (%s); retrying for up to %.0f s",
                                self.worker_id, self.host, self.port, exc, self.give_up_after)
                if time.monotonic() >= deadline:
                    where, spent = f"server {self.host}:{self.port}", f"{self.give_up_after:.0f} s"
                    raise GiveUp(
                        f"{where} accepted connections, but no handshake succeeded for {spent} "
                        f"({exc}); do the worker and the server use the same secret and TLS "
                        f"(--tls-ca against the server's --tls-cert)?" if self.answered else
                        f"{where} unreachable for {spent} ({exc}); if its job is finished, the "
                        f"server has exited and nothing is left to do") from None
                # Never past the deadline: a last draw of up to 5 s would keep
                # a worker told to give up after 3 s trying for 8.
                delay = min(random.uniform(0, bound), max(deadline - time.monotonic(), 0.0))
                if self.stopping.wait(delay):
                    raise GiveUp("stopped while reconnecting") from None
                bound = min(bound * 2, 5.0)

    def open_input(self, welcome: dict) -> None:
        """Open the input file that WELCOME names, if this worker can read it itself.

        Each connection checks again (the server may have been restarted on
        another file).  Without ``input_path`` (the documented mode), with
        ``local_read`` off, or if :meth:`LocalInput.open` finds no such file
        here, chunks come as bytes.
        """
        if self.input is not None:
            self.input.close()
            self.input = None
        path, fingerprint = welcome.get("input_path"), welcome.get("input_fingerprint")
        if not (self.local_read and path is not None and fingerprint is not None):
            return
        self.input = LocalInput.open(path, fingerprint)
        if self.input is not None:
            log.info("%s: reading the chunks from %s itself", self.worker_id, path)
        else:
            log.info("%s: %s is not here, or not the server's file: the server sends the "
                     "chunks", self.worker_id, path)

    def _open(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.io_timeout)
        self.answered = True
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self.tls:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
            protocol.client_handshake(sock, self.secret)
        except BaseException:
            sock.close()
            raise
        return sock

    def disconnect(self) -> None:
        """Close the socket and the input file, if any (idempotent)."""
        if self.input is not None:
            self.input.close()
            self.input = None
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def request(self, message: dict) -> dict:
        """Send one message, return the reply; an ERROR reply raises ServerRefused."""
        protocol.send_frame(self.sock, protocol.encode(message))
        return self.receive()

    def receive(self) -> dict:
        """The next message from the server; an ERROR raises ServerRefused."""
        reply = protocol.recv_message(self.sock, protocol.WORKER_MAX_FRAME, self.io_timeout)
        if reply["type"] == protocol.ERROR:
            raise protocol.ServerRefused(str(reply.get("reason")))
        return reply

    # --- work --------------------------------------------------------------

    def handle_job(self, job: dict) -> dict:
        """Process one JOB; return the RESULT or FAILED message to deliver.

        Any exception from parsing or computing becomes a FAILED message
        (a failure recorded as data), so one bad chunk never kills the
        worker.  A JOB that does not match the schema (``protocol.MESSAGES``)
        cannot even be reported and raises ProtocolError.
        """
        protocol.check(job)
        chunk_id, attempt_id = job["chunk_id"], job["attempt_id"]
        ids = {"job_id": job["job_id"], "worker_id": self.worker_id,
               "chunk_id": chunk_id, "attempt_id": attempt_id}
        started = time.perf_counter()
        try:
            metrics = self.compute(job)
        except Exception as exc:
            log.warning("%s: chunk %d attempt %d failed: %s: %s", self.worker_id,
                        chunk_id, attempt_id, type(exc).__name__, exc)
            return protocol.make(protocol.FAILED, **ids, error=f"{type(exc).__name__}: {exc}"[:500])
        log.debug("%s: chunk %d: %d rows in %.1f ms", self.worker_id, chunk_id,
                  metrics["rows_processed"], 1000 * (time.perf_counter() - started))
        return protocol.make(protocol.RESULT, **ids, **metrics)

    def compute(self, job: dict) -> dict:
        """The metrics of one JOB's chunk (tools/flaky_worker.py wraps this)."""
        return compute_metrics(load_chunk(job, self.input), job["price_col"], job["qty_col"],
                               job["decimal"], job["group_col"])

    def deliver(self, message: dict) -> dict | None:
        """Send a RESULT/FAILED and wait for its ACK (the commit receipt).

        A RESULT asks for the next chunk too (``next``), unless the worker
        is stopping; if the ACK says the answer follows (its own ``next``),
        that JOB, WAIT or NO_JOB is read and returned, else None (ask with
        GET_JOB).  A connection lost after the ACK loses only that answer:
        the result is delivered, and the next chunk's lease ends on the
        server as any lease of a closed connection does.

        A RESULT larger than the server accepts (``max_frame`` in WELCOME;
        say, --group-by on a column with a value per row) is sent as a
        FAILED naming the cause: sending it would only be refused, again
        and again, each time the chunk comes back.
        """
        if message["type"] == protocol.RESULT and \
                len(protocol.encode(message)) > self.server_max_frame:
            ids = {k: message[k] for k in ("job_id", "worker_id", "chunk_id", "attempt_id")}
            message = protocol.make(protocol.FAILED, **ids, error=(
                f"the result has {len(message['groups'])} groups and does not fit in the "
                f"server's {self.server_max_frame}-byte frames; --group-by a column with "
                f"fewer values, or raise the server's --max-frame"))
        if message["type"] == protocol.RESULT and not self.stopping.is_set():
            message = dict(message, next=True)
        reply = self.request(message)
        if reply["type"] == protocol.ACK:
            protocol.check(reply)
        if reply["type"] != protocol.ACK or reply["chunk_id"] != message["chunk_id"]:
            raise protocol.ProtocolError(f"expected ACK for chunk {message['chunk_id']}, "
                                         f"got {reply['type']}")
        if message["type"] == protocol.RESULT:
            self.chunks_done += 1
        if not (reply.get("next") and message.get("next")):
            return None
        return self.receive()


def _retry_after(reply: dict) -> float:
    """The WAIT delay in seconds, clamped to 0.01..5 (0.5 if it is not a number)."""
    delay = reply.get("retry_after")
    if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not delay == delay:
        return 0.5
    return min(max(float(delay), 0.01), 5.0)


# --- The lesson, part 2: the metrics of one chunk (pure functions) ---------------

def load_chunk(job: dict, local: LocalInput | None = None) -> pd.DataFrame:
    """Turn a JOB message's ``data`` (bytes) into a DataFrame.

    ``format == "frame"``: a pickled DataFrame, unpickled in full: the one
    place where the worker trusts the server (see README, "Security").
    ``format == "csv"``: raw CSV bytes (header line + whole records),
    parsed here with the separator, decimal mark and encoding the server
    detected.  ``format == "range"``: ``data`` is the header line, and the
    records are bytes ``start`` to ``end`` of the input file, which this
    worker reads itself from ``local`` (:class:`LocalInput`: the one file
    it verified, never a path the JOB names).  Either may be
    zlib-compressed.  Raises ValueError for an unknown format, a range JOB
    without ``local`` or outside its file, a file modified since it was
    verified (:class:`InputChanged`), or bytes not in the encoding (the
    message suggests ``--encoding``), and pandas' parser errors on other
    bad data; the caller reports them as a failed attempt.
    """
    raw = _inflate(job["data"]) if job.get("compressed") else job["data"]
    if job["format"] == "frame":
        frame = pickle.loads(raw)
        if isinstance(frame, dict) and isinstance(frame.get("small_chunk"), dict):
            return SmallChunk(frame["small_chunk"])
        if not isinstance(frame, pd.DataFrame):
            raise ValueError("JOB data is not a DataFrame")
        return frame
    if job["format"] == "range":
        if local is None or not local.is_open():
            raise ValueError("a range JOB, but this worker did not offer to read the input")
        if type(job.get("start")) is not int or type(job.get("end")) is not int:
            raise ValueError("a range JOB needs integer start and end")
        raw = raw + local.read(job["start"], job["end"])
    elif job["format"] != "csv":
        raise ValueError(f"unknown JOB format {job['format']!r}")
    wanted = [c for c in (job["price_col"], job["qty_col"], job.get("group_col")) if c]
    try:
        return read_columns(io.BytesIO(raw), job["sep"], job["decimal"], job["encoding"],
                            wanted, job.get("group_col"))
    except UnicodeDecodeError as exc:
        # Seen only here, deep in a --stream job: the server checked the
        # head of the file, not every byte.  Say which option fixes it.
        raise ValueError(f"chunk is not valid {job['encoding']} text ({exc.reason}); "
                         f"restart the server with --encoding, e.g. --encoding cp1252") from None


def compute_metrics(df: pd.DataFrame, price_col: str | None = None,
                    qty_col: str | None = None, decimal: str = ".",
                    group_col: str | None = None) -> dict:
    """Partial metrics of one chunk: a pure function of ``df``.

    A row is *valid* when both its price and its quantity are finite
    numbers after :func:`to_number`; the other rows are *rejected*.
    Negative quantities (returns) are valid.  Returns::

        rows_processed  int    every row of df
        rejected_rows   int    rows that are not valid
        total_sales     float  sum of price * quantity over valid rows (0.0 if none)
        min_price       float  | None when no row is valid
        max_price       float  | None
        avg_price       float  | None  mean price of the valid rows
        price_count     int    number of valid rows (the weight of avg_price
                               when chunk means are merged)
        groups          list   with group_col: one tuple per group value,
                               (value or None, rows_processed, rejected_rows,
                               total_sales, min_price, max_price, avg_price,
                               price_count); else []

    Raises :class:`ColumnError` (a ``ValueError``) if a column cannot be
    found (see :func:`find_columns`), and ``ValueError`` if a total
    overflows to infinity.
    """
    if isinstance(df, SmallChunk):
        return small_chunk_metrics(df, price_col, qty_col, group_col)
    price_col, qty_col = find_columns(df.columns, price_col, qty_col)
    price = to_number(df[price_col], decimal)
    qty = to_number(df[qty_col], decimal)
    # The arithmetic runs on the numpy arrays: each pandas operation costs
    # tens of microseconds of bookkeeping, which dominated small chunks.
    # Same sums (numpy's pairwise summation, as pandas uses), same answer.
    p, q = price.to_numpy(), qty.to_numpy()
    valid = ~(np.isnan(p) | np.isnan(q))
    metrics = _array_metrics(p, q, valid)
    if group_col is not None:
        valid = pd.Series(valid, index=df.index)
        metrics["groups"] = _group_metrics(df[group_col], price, qty, valid)
    return _checked_totals(metrics)


def _array_metrics(p: np.ndarray, q: np.ndarray, valid: np.ndarray) -> dict:
    """The chunk-wide metrics of :func:`compute_metrics` from float64 arrays
    of prices and quantities and the mask of valid rows (``groups`` empty)."""
    count = int(np.count_nonzero(valid))
    price_ok = p[valid]
    with np.errstate(all="ignore"):  # an overflow gives inf quietly, as in pandas
        return {
            "rows_processed": int(len(p)),
            "rejected_rows": int(len(p) - count),
            "total_sales": float((price_ok * q[valid]).sum()),
            "min_price": float(price_ok.min()) if count else None,
            "max_price": float(price_ok.max()) if count else None,
            "avg_price": float(price_ok.mean()) if count else None,
            "price_count": count,
            "groups": [],
        }


def _checked_totals(metrics: dict) -> dict:
    """``metrics``, unless a total overflowed to infinity (ValueError)."""
    totals = [metrics["total_sales"], metrics["avg_price"]]
    totals += [total for g in metrics["groups"] for total in (g[3], g[6])]
    if not all(math.isfinite(x) for x in totals if x is not None):
        # Finite prices and quantities can still multiply or add up past
        # 1.8e308.  The server would refuse an infinite total, so say why here.
        raise ValueError("a total overflows a float (prices or quantities near 1e308?)")
    return metrics


def _group_metrics(keys: pd.Series, price, qty, valid) -> list[tuple]:
    """Per-group rows of :func:`compute_metrics` (missing keys form one group)."""
    table = pd.DataFrame({
        "key": keys.astype("string"),
        "valid": valid,
        "price": price.where(valid),
        "sales": (price * qty).where(valid),
    })
    stats = table.groupby("key", dropna=False, sort=False).agg(
        rows=("valid", "size"), count=("valid", "sum"), sales=("sales", "sum"),
        low=("price", "min"), high=("price", "max"), mean=("price", "mean"))
    out = []
    for key, row in stats.iterrows():
        count = int(row["count"])
        out.append((None if pd.isna(key) else str(key), int(row["rows"]), int(row["rows"]) - count,
                    float(row["sales"]), _or_none(row["low"]), _or_none(row["high"]),
                    _or_none(row["mean"]), count))
    return out


def _or_none(value):
    return None if pd.isna(value) else float(value)


class SmallChunk:
    """A small chunk of the documented mode as plain arrays, not a DataFrame.

    Unpickling a DataFrame and running pandas on it cost about a
    millisecond of fixed overhead, which dominated chunks of a few rows
    (README, "Performance").  The server sends chunks of at most
    ``SMALL_ROWS`` records this way (``server.py:FrameChunks``) and the rest
    as DataFrames.  ``columns`` maps each column name to its values: a
    number column as float64 bytes, little-endian (the server's
    ``read_columns`` already turned every cell into a finite number or
    NaN), the group column as a list of ``str``, or ``None`` for a missing
    value.  Built from what :func:`load_chunk` unpickles.
    """

    SMALL_ROWS = 1000
    NUMBERS = "<f8"

    def __init__(self, columns: dict):
        self.columns = columns

    @classmethod
    def payload(cls, arrays: dict, start: int, stop: int, group_col: str | None) -> dict:
        """What the server pickles for rows ``start:stop`` of the columns it
        parsed (``arrays``: name -> numpy array, as ``read_columns`` made them)."""
        columns = {}
        for name, column in arrays.items():
            values = column[start:stop]
            if name == group_col:
                columns[name] = [None if v is None or v != v else str(v) for v in values.tolist()]
            else:
                columns[name] = np.asarray(values, dtype=cls.NUMBERS).tobytes()
        return {"small_chunk": columns}

    def __len__(self) -> int:
        first = next(iter(self.columns.values()), b"")
        return len(first) // 8 if isinstance(first, bytes) else len(first)

    def to_frame(self) -> pd.DataFrame:
        """The DataFrame the server would have sent instead (for tests and
        exploration; the worker computes without it)."""
        return pd.DataFrame({name: self.numbers(name) if isinstance(data, bytes)
                             else pd.Series(data, dtype="str")
                             for name, data in self.columns.items()})

    def numbers(self, name: str) -> np.ndarray:
        """Column ``name`` as float64 values (ValueError if it is not a number column)."""
        data = self.columns[name]
        if not isinstance(data, bytes) or len(data) % 8:
            raise ValueError(f"column {name!r} of the chunk is not a number column")
        return np.frombuffer(data, dtype=self.NUMBERS).astype(np.float64, copy=False)


def small_chunk_metrics(chunk: SmallChunk, price_col: str | None, qty_col: str | None,
                        group_col: str | None) -> dict:
    """:func:`compute_metrics` of a :class:`SmallChunk`, without pandas.

    The chunk-wide metrics are the same numpy operations on the same float64
    values as the DataFrame path, so the same bits.  Per group the values
    are taken in row order and summed with ``math.fsum`` (pandas' groupby
    sums with Kahan compensation instead: both are within a rounding error
    of the exact sum, far inside 1e-9); groups come in order of first
    appearance, the missing value (None) forming one group, as in
    ``groupby(sort=False, dropna=False)``.  Raises what
    :func:`compute_metrics` raises.
    """
    price_col, qty_col = find_columns(list(chunk.columns), price_col, qty_col)
    p, q = chunk.numbers(price_col), chunk.numbers(qty_col)
    if len(p) != len(q):
        raise ValueError("the columns of the chunk differ in length")
    # As to_number does: an infinity is no number.
    valid = np.isfinite(p) & np.isfinite(q)
    metrics = _array_metrics(p, q, valid)
    if group_col is not None:
        keys = chunk.columns[group_col]
        if len(keys) != len(p):
            raise ValueError("the columns of the chunk differ in length")
        metrics["groups"] = _small_groups(keys, p.tolist(), q.tolist(), valid.tolist())
    return _checked_totals(metrics)


def _small_groups(keys: list, prices: list, quantities: list, valid: list) -> list[tuple]:
    """Per-group rows of :func:`small_chunk_metrics` (see :func:`_group_metrics`)."""
    rows: dict = {}
    for key, price, qty, ok in zip(keys, prices, quantities, valid):
        group = rows.setdefault(key, [0, [], []])   # rows, valid prices, their sales
        group[0] += 1
        if ok:
            group[1].append(price)
            group[2].append(price * qty)
    out = []
    for key, (count_rows, group_prices, sales) in rows.items():
        count = len(group_prices)
        out.append((key, count_rows, count_rows - count, _fsum(sales),
                    min(group_prices) if count else None, max(group_prices) if count else None,
                    _fsum(group_prices) / count if count else None, count))
    return out


def _fsum(values: list) -> float:
    """``math.fsum``, but NaN where it raises (a sum past the float range, or
    inf - inf), so that _checked_totals says why, as for the DataFrame path."""
    try:
        return math.fsum(values)
    except (OverflowError, ValueError):
        return math.nan


# ==============================================================================
# The armour.  Everything below protects the lesson above from its input: it
# finds the price and quantity columns, reads numbers written in every way a
# spreadsheet writes them (and refuses what it cannot read exactly), parses
# CSV text exactly as pandas' tokenizer cuts it into records, reads a chunk
# from the input file itself when it can, and parses the command line.  The
# server uses much of it too, so both sides read records the same way.
# ==============================================================================
# --- Columns -------------------------------------------------------------------

# Header names are compared after normalize_name(): "Unit Price", "unit_price"
# and "\ufeffUNITPRICE" all become "unitprice".  Matching is exact on the
# normalised name, never by substring, so "Unit Cost" or "Total Revenue"
# cannot be mistaken for a price.  Sources: the design document (Price,
# UnitPrice, Unit_Price; Quantity, Qty, Units), the public "Sales Records"
# files (Unit Price, Units Sold), UCI "Online Retail" (UnitPrice, Quantity),
# and Kaggle "sales_data_sample" (PRICEEACH, QUANTITYORDERED).
PRICE_ALIASES = frozenset({
    "price", "unitprice", "priceeach", "priceperunit", "itemprice",
    "sellingprice", "unitsellingprice", "saleprice", "retailprice",
})
QTY_ALIASES = frozenset({
    "quantity", "qty", "units", "unitssold", "quantityordered", "qtyordered",
    "orderquantity", "quantitysold", "orderqty",
})


class ColumnError(ValueError):
    """The price or quantity column is missing or ambiguous."""


def normalize_name(name) -> str:
    """Lower-case ``name`` and keep only letters and digits (drops a BOM too)."""
    return "".join(ch for ch in str(name).casefold() if ch.isalnum())


def find_columns(columns, price_col: str | None = None,
                 qty_col: str | None = None) -> tuple[str, str]:
    """Return the (price, quantity) column names among ``columns``.

    ``price_col``/``qty_col`` override detection; they match a header
    exactly or after :func:`normalize_name`.  Otherwise exactly one header
    must normalise to a name in :data:`PRICE_ALIASES` (resp.
    :data:`QTY_ALIASES`).  Raises :class:`ColumnError` (a ``ValueError``)
    naming the columns found and the accepted names.
    """
    columns = list(columns)
    price = _pick(columns, price_col, PRICE_ALIASES, "price", "--price-col")
    qty = _pick(columns, qty_col, QTY_ALIASES, "quantity", "--qty-col")
    if price == qty:
        # Only an explicit option can get here; price * price is no sales figure.
        raise ColumnError(f"the price and the quantity column are both {price!r}; "
                          f"choose two different columns")
    return price, qty


def _pick(columns, wanted, aliases, what, option):
    if wanted is not None:
        hits = [c for c in columns if c == wanted] or \
               [c for c in columns if normalize_name(c) == normalize_name(wanted)]
        if not hits:
            raise ColumnError(f"{option} {wanted!r} is not a column; columns found: "
                              f"{show_names(columns)}")
        return hits[0]
    hits = [c for c in columns if normalize_name(c) in aliases]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ColumnError(
            f"no {what} column; columns found: {show_names(columns)}; accepted names "
            f"(case, spaces and punctuation ignored): {sorted(aliases)}; or pass {option}")
    raise ColumnError(f"several {what} columns match: {show_names(hits)}; "
                      f"choose one with {option}")


def show_names(names, limit: int = 12) -> str:
    """``names`` for a one-line message: all of them, or the first and last few and a count.

    A header of 100,000 columns would otherwise make a message of 380 KB.
    Each name is cut to 40 characters.
    """
    def one(name):
        text = repr(name)
        return text if len(text) <= 40 else text[:37] + "..."
    names = list(names)
    if len(names) <= limit:
        return "[" + ", ".join(map(one, names)) + "]"
    head, tail = names[:limit - 2], names[-2:]
    return ("[" + ", ".join(map(one, head)) + f", ... ({len(names) - limit} more) ..., "
            + ", ".join(map(one, tail)) + f"] ({len(names)} columns)")


# --- Numbers -------------------------------------------------------------------

# What may surround or sit inside a number and carries no value: white space
# (including no-break spaces), apostrophes used as thousands marks ("1'234"),
# currency signs and ISO codes.
_NOISE = re.compile(r"[\s\u00a0\u202f'\u2019$€£¥₹]|USD|EUR|GBP", re.IGNORECASE)
# A number written with thousands marks, per decimal mark: 1,234 or
# 12,345,678.90 (decimal point); 1.234 or 12.345.678,90 (decimal comma).  The
# first group has no leading zero: "0.125" or "0,125" groups nothing.
_GROUPED = {
    ".": re.compile(r"[+-]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d*)?"),
    ",": re.compile(r"[+-]?[1-9]\d{0,2}(?:\.\d{3})+(?:,\d*)?"),
}


class DecimalMarkError(ValueError):
    """A cell whose value depends on a decimal mark that the data contradicts or never showed."""


def number_readings(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """``values`` (text) read as numbers with a decimal point, and with a decimal comma.

    Returns two float64 Series (NaN where a reading finds no number).  Per
    reading, currency signs and codes, spaces and apostrophes are dropped;
    the other mark is a thousands mark and is removed only where it groups
    digits by three (``_GROUPED``), and any other use of it makes the cell
    not a number.  So "2,50" is NaN read with a point and 2.5 with a comma;
    "1.234" is 1.234 and 1234; "12" is 12 both ways.  This is the one
    cleaning rule: :func:`to_number` converts with it and the server's
    decimal-mark detection compares the two readings.
    """
    text = values.astype("string").str.replace(_NOISE, "", regex=True)
    readings = []
    for decimal, thousands in ((".", ","), (",", ".")):
        grouped = text.str.fullmatch(_GROUPED[decimal]).fillna(False).astype(bool)
        cleaned = text.mask(grouped, text.str.replace(thousands, "", regex=False))
        stray = cleaned.str.contains(thousands, regex=False).fillna(False).astype(bool)
        cleaned = cleaned.mask(stray, "")
        if decimal == ",":
            cleaned = cleaned.str.replace(",", ".", regex=False)
        readings.append(pd.to_numeric(cleaned, errors="coerce").astype("float64"))
    return readings[0], readings[1]


# What float() reads that pandas' to_numeric reads too: ASCII digits only (float()
# also takes "١٢" and "1_000"), and the words for infinity and "not a number".
_PLAIN_NUMBER = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                           r"|inf|infinity|nan)", re.IGNORECASE)


def text_readings(cells: list) -> tuple[np.ndarray, np.ndarray]:
    """:func:`number_readings` of a few cells (``str``), in plain Python, without pandas.

    The same rule, step by step, for the server's head sample (a few thousand
    cells, :func:`server._guess_decimal`), so that a ``--stream`` server never
    imports pandas.  Returns two float64 arrays, NaN where a reading finds no
    number.  pandas' own float parser may differ in the last bit of a number
    with a large exponent; the decimal-mark guess only asks whether a reading
    is a number and whether the two readings differ, which a last-bit
    difference does not decide (tests/test_locality.py compares the two
    functions on 20,000 random cells).
    """
    point, comma = np.full(len(cells), np.nan), np.full(len(cells), np.nan)
    for i, cell in enumerate(cells):
        text = _NOISE.sub("", cell)
        for decimal, thousands, out in ((".", ",", point), (",", ".", comma)):
            cleaned = text.replace(thousands, "") if _GROUPED[decimal].fullmatch(text) else text
            if thousands in cleaned:
                continue                       # a stray thousands mark: no number
            if decimal == ",":
                cleaned = cleaned.replace(",", ".")
            if _PLAIN_NUMBER.fullmatch(cleaned):
                out[i] = float(cleaned)
    return point, comma


def to_number(values: pd.Series, decimal: str | None = ".") -> pd.Series:
    """Convert a column to float64; anything that is not a finite number -> NaN.

    Numeric columns pass through (the reader parsed them already).  Text is
    read with :func:`number_readings` under ``decimal`` ("." or ","), or,
    with ``decimal=None`` (the data has not shown its mark), under both.
    What is not a number either way ("TBD", "", "1,2,3", "inf") becomes NaN,
    never a string: string arithmetic ("2.50" * 3 == "2.502.502.50") is
    what this function exists to prevent.

    Raises :class:`DecimalMarkError` (a ``ValueError``) naming the first
    cell that is a number only under the other mark ("2,50" with
    ``decimal="."``), or, with ``decimal=None``, whose value depends on the
    mark ("2.50", "1.234"): such a cell says the mark in use is wrong or
    unknown, and reading it either way could be off by a factor of 1000.
    """
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        # astype costs ~50 us even when it changes nothing; small chunks feel it.
        numbers = values if values.dtype == "float64" else values.astype("float64")
    else:
        point, comma = number_readings(values)
        if decimal == ".":
            numbers, wrong = point, point.isna() & comma.notna()
        elif decimal == ",":
            numbers, wrong = comma, comma.isna() & point.notna()
        else:
            numbers, wrong = point, ~((point == comma) | (point.isna() & comma.isna()))
        if wrong.any():
            _refuse_cell(values, wrong, decimal, point, comma)
    finite = np.isfinite(numbers.to_numpy())
    # Series.where costs ~0.15 ms even when it changes nothing; a chunk
    # without infinities (the usual case) skips it.
    return numbers if finite.all() else numbers.where(finite)


def _refuse_cell(values, wrong, decimal, point, comma):
    at = int(wrong.to_numpy().argmax())
    cell = values.iloc[at]
    column = "a column" if values.name is None else f"column {values.name!r}"
    if decimal is None:
        def shown(x):
            return "no number" if math.isnan(x) else f"{x:g}"
        raise DecimalMarkError(
            f"{column} holds {cell!r}: {shown(point.iloc[at])} with a decimal point, "
            f"{shown(comma.iloc[at])} with a decimal comma, and the start of the file showed "
            f"neither mark; pass --decimal . or --decimal ,")
    other = "," if decimal == "." else "."
    raise DecimalMarkError(
        f"{column} holds {cell!r}, a number only with {other!r} as the decimal mark, but the "
        f"mark in use is {decimal!r}; fix that cell, or pass --decimal {other} if the whole "
        f"file uses it")


# --- Reading the input where it is (--stream) ---------------------------------
# "Move the computation to the data": a worker that can open the server's
# input file (the same machine, or a shared file system) reads its chunks'
# byte ranges itself, and the server sends 100 bytes per JOB instead of the
# chunk.  Same file means the same fingerprint, the one the job's identity
# uses; anything else, and the server sends the bytes as before.

def file_fingerprint(path: str, samples: int = 64, block: int = 4096) -> dict:
    """What identifies the file's content cheaply: ``{'size', 'mtime_ns', 'sample'}``.

    Opens ``path`` and returns :func:`fd_fingerprint` of it.  Raises ``OSError``.
    """
    with open(path, "rb") as f:
        return fd_fingerprint(f.fileno(), samples, block)


def fd_fingerprint(fd: int, samples: int = 64, block: int = 4096) -> dict:
    """:func:`file_fingerprint` of the file open as descriptor ``fd``.

    ``sample`` is a BLAKE2b digest of ``samples`` blocks of ``block`` bytes
    spread evenly over the file (256 KiB read, whatever its size).  A full
    digest of a 600 MB file would cost a second on every start; size and
    mtime alone miss a file rewritten in place with its mtime restored
    (``cp -p``, ``rsync -a``), which the sample catches unless every change
    falls between the sampled blocks.  The server's job identity and the
    workers' check of their own copy (:class:`LocalInput`) both use it.
    Raises ``OSError``.
    """
    digest = hashlib.blake2b(digest_size=16)
    status = os.fstat(fd)
    for i in range(samples):
        digest.update(os.pread(fd, block, status.st_size * i // samples))
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "sample": digest.hexdigest()}


def fingerprint_text(fingerprint: dict) -> str:
    """A fingerprint as WELCOME's ``input_fingerprint``: JSON, keys sorted."""
    return json.dumps(fingerprint, sort_keys=True)


class InputChanged(ValueError):
    """The input file was modified after this worker verified it."""


class LocalInput:
    """The server's input file, as this worker reads it itself (``--stream``).

    Made by :meth:`open` from WELCOME's ``input_path`` and
    ``input_fingerprint``; :meth:`read` returns one byte range of it.  The
    file is opened once and every range is read from that descriptor, with
    ``os.pread``: a file renamed over the path later is never seen, and one
    modified in place is noticed (:class:`InputChanged`) instead of giving an
    answer made of two versions.
    """

    def __init__(self, fd: int, path: str, size: int, mtime_ns: int):
        self.fd, self.path, self.size, self.mtime_ns = fd, path, size, mtime_ns

    @classmethod
    def open(cls, path: str, fingerprint: str) -> LocalInput | None:
        """The file at ``path`` if it is the server's, else None.

        ``path`` comes from the server, which may be hostile: it must be
        absolute and name a regular file (checked before it is opened, so a
        device or a FIFO is never opened, and again on the descriptor), opened
        read-only and non-blocking, and its :func:`fd_fingerprint` must be
        ``fingerprint``.  Whatever fails, the answer is None: the server then
        sends the bytes, as to a worker on another machine.
        """
        if not os.path.isabs(path) or "\0" in path:
            return None
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                return None
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            return None
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                mine = fd_fingerprint(fd)
                if fingerprint_text(mine) == fingerprint:
                    return cls(fd, path, mine["size"], mine["mtime_ns"])
        except OSError:
            pass
        os.close(fd)
        return None

    def is_open(self) -> bool:
        """False once closed, or once a change was noticed."""
        return self.fd is not None

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` of the file.

        Raises ``ValueError`` for a range outside the file or longer than a
        JOB frame may be (what the server would have sent instead), and
        :class:`InputChanged` (closing the file: later chunks come as bytes)
        if the file's size or mtime is no longer the one verified.  The
        check follows the read, so a write during the read is seen too.
        """
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"range {start}-{end} is outside {self.path} ({self.size} bytes)")
        if end - start > protocol.WORKER_MAX_FRAME:
            raise ValueError(f"range {start}-{end} is longer than a JOB frame "
                             f"({protocol.WORKER_MAX_FRAME} bytes)")
        data = os.pread(self.fd, end - start, start)
        now = os.fstat(self.fd)
        if len(data) != end - start or (now.st_size, now.st_mtime_ns) != (self.size, self.mtime_ns):
            self.close()
            raise InputChanged(f"{self.path} was modified during the job; the server must "
                               f"be run again with --fresh")
        return data

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --- Reading CSV text ----------------------------------------------------------

def _inflate(data: bytes, limit: int = protocol.WORKER_MAX_FRAME) -> bytes:
    """zlib-decompress ``data``, refusing to grow past ``limit`` bytes.

    2 MB of zeros compress to 2 KB: without the bound, a broken server's
    small frame could inflate to more memory than the machine has.
    """
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, limit)
    if inflater.unconsumed_tail:
        raise ValueError(f"compressed chunk inflates past {limit} bytes")
    return out


def read_columns(stream, sep: str, decimal: str | None, encoding: str, wanted: list,
                 group_col: str | None = None) -> pd.DataFrame:
    """Parse CSV text from a binary ``stream``, keeping the ``wanted`` columns.

    Used by the server (documented mode) and by workers (``--stream``), so
    both read records the same way.  ``stream`` holds a header and any
    number of records; ``decimal`` is "." or ",", or None when the data
    has not shown its decimal mark (see :func:`to_number`).

    * Every wanted column but ``group_col`` is a number column, returned as
      float64 through :func:`to_number`.  pandas never converts a piece of
      it to numbers on its own: either the whole column parses as float64
      (the fast path, taken when the stream can be read twice and the mark
      is known; exact, since pandas then accepts only plain numbers in that
      mark), or it is read again as text and converted once.  A column
      that comes out of the float64 parse with nothing but 0 and 1 is read
      as text too: pandas reads a column of nothing but ``True`` and
      ``False`` as booleans and then casts them to 1.0 and 0.0.  Letting
      pandas guess would convert the file in pieces (2**20 / columns rows
      each), some numeric and some text, and a numeric "0.125" turned back
      into text is read as 125 under a decimal comma.
    * Only empty cells are missing values (pandas' default list would make
      the group "NA", North America, a missing group).  The group column is
      read as text: "007" stays "007".
    * A record with more fields than the header is an error
      (:class:`TooManyFields`), even if the extra fields are empty, so a
      trailing separator is one too: with ``usecols`` pandas would read it
      by position (pandas issue 40049; see :class:`_FieldCheck`).
    * Text in an encoding whose quotes, separators or line breaks are not
      plain ASCII bytes (:func:`byte_transparent`) is transcoded to UTF-8.
    * A ``BytesIO`` of the clean common case is checked in bulk and handed
      to pandas whole, with the very bytes the careful path would give it
      (:func:`_clean_in_memory`); the rest goes block by block.

    Returns a DataFrame with the ``wanted`` columns.  Raises ``ValueError``
    for malformed data (pandas' ``ParserError``, :class:`TooManyFields`,
    :class:`MisreadRecord`, :class:`DecimalMarkError`) and
    ``UnicodeDecodeError`` for bytes not in ``encoding``.
    """
    numbers = [c for c in wanted if c != group_col]
    text = _clean_in_memory(stream, sep, encoding)
    start = stream.tell() if text is None and stream.seekable() else None

    def parse(number_type):
        if text is not None:   # the fast path: checked in bulk, handed to pandas' C parser
            head, rest, marker = text
            return _read(_Spliced(head, rest), marker, sep, decimal, "utf-8", wanted, numbers,
                         number_type)
        return _parse(stream, sep, decimal, encoding, wanted, numbers, number_type)
    frame = None
    if decimal is not None and (text is not None or start is not None):
        try:
            frame = parse("float64")
        except (TooManyFields, MisreadRecord, UnicodeError, pd.errors.ParserError):
            raise            # the same again as text
        except ValueError:   # a number column holds text ("$2.50", "TBD"): read it as text
            pass
        if frame is not None and any(_zeros_and_ones(frame[column]) for column in numbers):
            frame = None     # maybe True and False: the text parse tells (to_number rejects them)
        if frame is None and start is not None:
            stream.seek(start)
    if frame is None:
        frame = parse(str)
    for column in numbers:
        frame[column] = to_number(frame[column], decimal)
    return frame


def _zeros_and_ones(column: pd.Series) -> bool:
    """True if float64 ``column`` has a value and every value is 0, 1 or missing."""
    values = column.to_numpy()
    missing = np.isnan(values)
    return not missing.all() and bool(((values == 0) | (values == 1) | missing).all())


def _parse(stream, sep, decimal, encoding, wanted, numbers, number_type) -> pd.DataFrame:
    """The careful path of :func:`read_columns`: any stream, checked block by block."""
    if codecs.lookup(encoding).name in ("utf-8", "utf-8-sig"):
        # pandas reads UTF-8 bytes as they are (and drops a BOM), which is
        # faster than the decoding it does for any other name, but then checks
        # only the columns it keeps: _ValidUtf8 checks every byte.
        stream, encoding = _ValidUtf8(stream), "utf-8"
    elif not byte_transparent(encoding):
        stream, encoding = _Utf8(stream, encoding), "utf-8"
    check = _FieldCheck(stream, sep)
    return _read(check, check.header_marker(), sep, decimal, encoding, wanted, numbers,
                 number_type)


def _read(source, marker, sep, decimal, encoding, wanted, numbers, number_type) -> pd.DataFrame:
    """pandas' parse of ``source``, whose header names ``marker`` last; raises
    :class:`TooManyFields` if a record put a value in that marker column."""
    columns = wanted + [marker]
    types = {column: number_type if column in numbers else str for column in wanted}
    # Almost always empty, the marker column costs next to nothing as a
    # category, where the default type inference would cost as much as a
    # number column.
    types[marker] = "category"
    # One list for every column: the same as one list per column (only these
    # columns are read), and pandas builds its lookup table once, not per column.
    frame = pd.read_csv(source, sep=sep, decimal=decimal or ".", encoding=encoding,
                        usecols=columns, dtype=types, keep_default_na=False, na_values=[""])
    surplus = frame.pop(marker).notna().to_numpy()
    if surplus.any():
        raise TooManyFields(f"data record {int(surplus.argmax()) + 1} has more fields than the "
                            f"header; quote values that contain the separator {sep!r}, and end "
                            f"lines without a separator")
    return frame


def _clean_in_memory(stream, sep: str, encoding: str) -> tuple[bytes, memoryview, str] | None:
    """The text :func:`read_columns`' careful path would hand pandas, as its header
    line and the rest (for :class:`_Spliced`), and the marker column's name; or
    None to take that path.

    Taken when ``stream`` is a ``BytesIO`` (both callers hold the input in
    memory) that is, checked in C or numpy, the clean common case:

    * valid UTF-8 (``encoding`` a UTF-8 name), or ASCII in an encoding that
      reads ASCII bytes as ASCII (:func:`_reads_ascii_as_ascii`);
    * its first line is the header: not blank, no quote, ended by LF or CR LF;
    * nowhere a pattern an empty surplus field needs (:func:`_may_hide_empty_field`,
      or a separator at the very end), which also rules out pandas' lone-CR
      quirk (:meth:`_FieldCheck._refuse_pandas_cr_quirk`).

    Then :class:`_FieldCheck` would count no record and pass every byte on,
    with the marker column added to the header: the two pieces returned are
    those same bytes, so both paths give pandas the same text and return the
    same frame or raise the same error.  Anything else, including bytes that
    are not valid text (so the careful path raises its own error at the same
    place), returns None and leaves ``stream`` where it was.  The pair
    screens run :data:`CHECK_BLOCK` bytes at a time, in place: each block is
    checked whole while it is in the CPU's cache, where screening the chunk
    whole would read it from memory once per pair.
    """
    if type(stream) is not io.BytesIO:
        return None
    at = stream.tell()
    data = stream.getvalue()        # no copy: the BytesIO shares the caller's bytes
    if at:
        data = data[at:]
    utf8 = codecs.lookup(encoding).name in ("utf-8", "utf-8-sig")
    if not utf8 and not _reads_ascii_as_ascii(encoding):
        return None
    end = data.find(b"\n")
    line = end - 1 if end > 0 and data[end - 1] == _CR else end
    if end == -1 or data.find(b'"', 0, line) != -1 or data.find(b"\r", 0, line) != -1 or \
            is_blank(data[:end + 1], sep, at_start=True) or data.endswith(sep.encode()):
        return None
    view = memoryview(data)
    if not data.isascii():
        if not utf8:
            return None
        # An incremental decoder completes a character cut by a block boundary.
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            for start in range(0, len(data), CHECK_BLOCK):
                decoder.decode(view[start:start + CHECK_BLOCK])
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return None
    for start in range(0, len(data), CHECK_BLOCK):
        # One byte more than the block: the pair across its edge.
        if _may_hide_empty_field(data, sep, start, start + CHECK_BLOCK + 1):
            return None
    marker = surplus_marker(data[:line], sep)
    return data[:line] + (sep + marker).encode(), view[line:], marker


CHECK_BLOCK = 1 << 18   # bytes checked at a time by the fast path: a block stays in the CPU cache


class _Spliced(io.RawIOBase):
    """A read-only stream of ``head`` (bytes), then ``rest`` (a memoryview).

    The fast path's text for pandas: its header with the marker column,
    then the chunk's records where they already are.  Joining the two would
    copy the whole chunk once more; pandas reads a quarter MiB at a time, so
    each read copies only what it returns.
    """

    def __init__(self, head: bytes, rest: memoryview):
        self.head, self.rest, self.at = head, rest, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all that are left if negative); b"" at the end."""
        if self.head:
            chunk, self.head = self.head, b""
            return chunk
        stop = len(self.rest) if size < 0 else min(self.at + size, len(self.rest))
        chunk, self.at = bytes(self.rest[self.at:stop]), stop
        return chunk

    def readinto(self, buffer) -> int:
        chunk = self.read(len(buffer))
        buffer[:len(chunk)] = chunk
        return len(chunk)


@functools.lru_cache(maxsize=None)
def _reads_ascii_as_ascii(encoding: str) -> bool:
    """True if ``encoding`` decodes any ASCII bytes (0x00-0x7F) as the same ASCII text:
    then ASCII input reads the same as UTF-8.  False for UTF-16/32, UTF-7 and stateful
    or multi-byte encodings (:func:`byte_transparent` tells those)."""
    ascii_bytes = bytes(range(128))
    try:
        same = ascii_bytes.decode(encoding) == ascii_bytes.decode("ascii")
    except (UnicodeDecodeError, LookupError):
        return False
    return same and byte_transparent(encoding)


@functools.lru_cache(maxsize=None)
def byte_transparent(encoding: str) -> bool:
    """True if CSV structure can be found in the raw bytes of ``encoding`` text.

    That holds for UTF-8 (its multi-byte characters use only bytes >= 0x80)
    and for single-byte code pages such as cp1252 or latin-1 that write
    quotes, separators and line breaks as their ASCII bytes.  It fails for
    UTF-16/32 (two or four bytes per character) and for multi-byte code
    pages whose second bytes can be 0x7C, a '|' (Shift-JIS, GBK, Big5):
    an incremental decoder that waits for more after a single byte shows
    such a code page.  Raises LookupError for an unknown encoding.
    """
    if codecs.lookup(encoding).name in ("utf-8", "utf-8-sig"):
        return True
    if any(ch.encode(encoding) != ch.encode("ascii") for ch in '"\r\n,;\t|'):
        return False
    for byte in range(256):
        try:
            if codecs.getincrementaldecoder(encoding)().decode(bytes([byte])) == "":
                return False      # the first byte of a multi-byte character
        except UnicodeDecodeError:
            pass                  # a byte the code page leaves undefined
    return True


READ_BLOCK = 1 << 20   # bytes read at a time by the reader's own streams


class _ValidUtf8(io.RawIOBase):
    """A read-only stream: ``raw`` unchanged, each block checked to be valid UTF-8.

    An ASCII block (most of them) costs one ``bytes.isascii``; others go
    through an incremental decoder, which also completes a character cut by
    a block boundary.  A byte that is not valid UTF-8 raises
    ``UnicodeDecodeError`` from :meth:`read`.
    """

    def __init__(self, raw):
        self.raw = raw
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.pending = False     # the decoder holds the start of a character

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        block = self.raw.read(size)
        if block or self.pending:
            if self.pending or not block.isascii():
                self.decoder.decode(block, final=not block)
                self.pending = self.decoder.getstate()[0] != b""
        return block

    def readinto(self, buffer) -> int:
        block = self.read(len(buffer))
        buffer[:len(block)] = block
        return len(block)


class _Utf8(io.RawIOBase):
    """A read-only stream: the text of ``raw`` (bytes in ``encoding``) as UTF-8 bytes.

    Decodes :data:`READ_BLOCK` bytes at a time with an incremental decoder, so a character cut
    by a block boundary is completed by the next block.  A byte that is not
    valid ``encoding`` raises ``UnicodeDecodeError`` from ``readinto``.
    """

    def __init__(self, raw, encoding: str):
        self.raw = raw
        self.decoder = codecs.getincrementaldecoder(encoding)()
        self.pending, self.at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.at == len(self.pending):
            block = self.raw.read(READ_BLOCK)
            self.pending, self.at = self.decoder.decode(block, final=not block).encode(), 0
            if not block:
                break
        n = min(len(buffer), len(self.pending) - self.at)
        buffer[:n] = memoryview(self.pending)[self.at:self.at + n]
        self.at += n
        return n


# --- Records: where they end, how many fields they have ------------------------

_QUOTE, _CR, _LF = 0x22, 0x0D, 0x0A
_NO_QUOTES = np.empty(0, np.intp)


class RecordScanner:
    """Follows pandas' C tokenizer through CSV bytes: which quotes delimit quoted fields.

    The one rule for where records end, shared by the server (inspecting the
    head, cutting ``--stream`` chunks) and :func:`read_columns` (counting
    fields), so both agree with pandas, which parses the records.  The
    rules of pandas' tokenizer (``tokenizer.c``; the csv module's are the
    same):

    * A quote opens a quoted field only where a field starts: at the start
      of the data (after a UTF-8 BOM, which pandas skips), or right after a
      separator, LF or CR.  Anywhere else it is an ordinary character:
      ``Size (")`` and ``27" screen`` hold a literal quote.
    * In a quoted field, separators and line breaks are data, and a quote
      ends the field, unless the next byte is a quote too: a doubled quote
      is one literal quote and the field goes on.  Bytes after the closing
      quote, up to the next separator, belong to the field, and a quote
      among them is literal (it is not at the start of a field).
    * Outside quoted fields, LF, CR LF and a lone CR end a record.

    Feed the bytes in order, in blocks of any size, to :meth:`quotes`: it
    returns the offsets (within the block) of the quotes that open or close
    a quoted field, a doubled quote counting as a close and a re-open.  A
    byte is then inside a quoted field exactly when an odd number of those
    quotes precede it, plus one if :attr:`inside` was True before the block
    (see :func:`inside_mask`).  With every quote where RFC 4180 puts them,
    that is plain quote parity.

    Cost: a block without a quote costs one ``bytes.find``.  Otherwise numpy
    checks at once that every quote met outside a quoted field follows a
    separator, a line break or a closing quote; in well-formed files all
    do, and then every quote counts.  Only a block holding a literal quote
    is walked quote by quote in Python.
    """

    def __init__(self, sep: str, at_start: bool = True):
        """``at_start``: the data is the start of the file (where a BOM is skipped);
        otherwise it starts at a record start further on."""
        self.sep = ord(sep)
        self.inside = False   # the bytes seen so far end inside a quoted field
        self.prev = _LF       # the last byte seen: data starts as if after a line break
        self.closed = False   # ... and it is a quote that ended a quoted field
        self.offset = 0 if at_start else 3   # bytes seen (past a BOM's place if not at start)
        self.first = b""      # the first 3 bytes: a UTF-8 BOM there is skipped

    def quotes(self, data: bytes) -> np.ndarray:
        """The offsets in ``data`` of the quotes that open or close a quoted field."""
        bom_end = None        # the offset in data right after a BOM that starts the stream
        if self.offset < 3:
            self.first += data[:3 - self.offset]
            if self.first == codecs.BOM_UTF8 and self.offset + len(data) >= 3:
                bom_end = 3 - self.offset
        found = _NO_QUOTES if data.find(b'"') == -1 else self._structural(data, bom_end)
        if found.size:
            self.inside ^= bool(found.size % 2)
            self.closed = int(found[-1]) == len(data) - 1 and not self.inside
        elif data:
            self.closed = False
        if data:
            self.prev = _LF if bom_end == len(data) else data[-1]
        self.offset += len(data)
        return found

    def _structural(self, data: bytes, bom_end) -> np.ndarray:
        a = np.frombuffer(data, np.uint8)
        q = np.flatnonzero(a == _QUOTE)
        left = a[q - 1]
        if q[0] == 0:   # the byte before is the last one of the previous block
            left[0] = self.prev if self.prev != _QUOTE or self.closed else 0
        if bom_end is not None:
            left[q == bom_end] = _LF
        met_outside = (np.arange(q.size) & 1) == self.inside
        at_start = (left == self.sep) | (left == _LF) | (left == _CR) | (left == _QUOTE)
        if at_start[met_outside].all():
            # Every quote delimits: parity is exact.  (A quote after a quote
            # met outside is the second of a doubled quote, since the quote
            # before it was met inside and closed the field.)
            return q
        # A literal quote somewhere: follow the tokenizer quote by quote.
        found, inside, closed_at = [], self.inside, -1 if self.closed else -2
        for p in q.tolist():
            if inside:
                found.append(p)           # closes the field, or starts a doubled quote
                inside, closed_at = False, p
                continue
            before = self.prev if p == 0 else data[p - 1]
            if before in (self.sep, _LF, _CR) or p == bom_end or \
                    (before == _QUOTE and closed_at == p - 1):
                found.append(p)           # opens a field (or ends a doubled quote)
                inside = True
        return np.array(found, np.intp)


def inside_mask(size: int, quotes: np.ndarray, inside: bool) -> np.ndarray:
    """Per byte of a block of ``size`` bytes: True inside a quoted field.

    ``quotes`` and ``inside`` are :meth:`RecordScanner.quotes`' answer for
    the block and :attr:`RecordScanner.inside` before it.
    """
    flips = np.zeros(size, np.uint8)
    flips[quotes] = 1
    if size:
        flips[0] ^= inside
    return np.bitwise_xor.accumulate(flips).view(bool)


def record_ends(data: bytes, sep: str) -> list[int]:
    """The offsets just past every record end in ``data``, CSV text held in memory.

    A record ends at LF, CR LF or a lone CR outside quoted fields (see
    :class:`RecordScanner`); ``data`` starts at the start of a record.
    """
    quotes = RecordScanner(sep).quotes(data)
    a = np.frombuffer(data, np.uint8)
    lf, cr = a == _LF, a == _CR
    cr[:-1] &= ~lf[1:]          # in CR LF the LF ends the record
    breaks = lf | cr
    if quotes.size:
        breaks &= ~inside_mask(len(a), quotes, False)
    return (np.flatnonzero(breaks) + 1).tolist()


def count_before(mask: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, int]:
    """How many True values of ``mask`` come before each of ``positions``, and in all.

    The same as ``np.cumsum(mask)[positions - 1]``, four times faster: the
    mask is packed into 64-bit words, a prefix sum runs over the words'
    bit counts, and a bit count within its word adds the rest.  (numpy's
    ``reduceat`` pays for every record; this pays for every 64 bytes.)
    ``positions`` must be below ``len(mask)``.
    """
    bits = np.packbits(mask, bitorder="little")
    words = np.pad(bits, (0, -len(bits) % 8 + 8)).view(np.uint64)   # one spare word
    per_word = np.cumsum(np.bitwise_count(words), dtype=np.int64)
    word, bit = positions >> 6, (positions & 63).astype(np.uint64)
    below = (np.uint64(1) << bit) - np.uint64(1)     # the bits before the position
    before = np.bitwise_count(words[word] & below) + np.concatenate(([0], per_word))[word]
    return before, int(per_word[-1])


def is_blank(record: bytes, sep: str, at_start: bool = False) -> bool:
    """True if pandas skips ``record`` (bytes, with its line end) as a blank line.

    That is a line of nothing but spaces and tabs, a tab counting only when
    it is not the separator; ``at_start``: the record opens the data, so a
    UTF-8 BOM before it is skipped too.
    """
    if at_start:
        record = record.removeprefix(codecs.BOM_UTF8)
    return not record.strip(b" \t\r\n".replace(sep.encode(), b""))


class TooManyFields(ValueError):
    """A record has more fields than the header."""


def surplus_marker(header: bytes, sep: str) -> str:
    """The name of the marker column added to ``header`` (its bytes as pandas gets them).

    ``surplus``, else ``surplus2``, ``surplus3`` and so on: the first that
    occurs nowhere in ``header`` once its quotes are taken out (so no
    column of the file has it: pandas would rename the second of two equal
    names, and read a real column as the marker) and holds no ``sep``
    (removed from it where it would).  The quotes go because pandas names
    ``"sur"plus`` ``surplus``: a name without a quote is a run of the
    header's bytes without theirs.  A fixed name with a NUL byte, which no
    header holds, was read as ``Unnamed: 2`` by pandas 3.0, whose C parser
    ends a name at a NUL.
    """
    unquoted = header.replace(b'"', b"")
    n = 1
    while True:
        name = ("surplus" + (str(n) if n > 1 else "")).replace(sep, "")
        if name and name.encode() not in unquoted:
            return name
        n += 1


class _FieldCheck(io.RawIOBase):
    """A read-only stream: ``raw`` with a marker column added to its header, checked for
    records with more fields than the header.

    Two checks share the work, because pandas, told to read some columns
    (``usecols``), drops a record's surplus fields without a word:

    * The header gets one more name (:func:`surplus_marker`), which
      :func:`read_columns` reads like a wanted column.  A record with more
      fields than the header puts its first surplus field there, so a
      non-empty one shows in the parsed frame.  It costs pandas next to
      nothing.
    * An *empty* first surplus field shows nothing: pandas pads short
      records with empty fields, so empty and missing look alike.  But
      such a field needs two separators in a row, a separator right before
      a line end or the end of the data, or a quoted empty field ``""``.
      A block of the input with none of these cannot hide one; the other
      blocks have the fields of each of their records counted, with
      :class:`RecordScanner`'s rules, and the first record with more
      separators than the header raises :class:`TooManyFields` from
      :meth:`readinto`, which stops the parse there.  The screen costs a
      tenth of pandas' parse; the count, where needed, about half.
    """

    def __init__(self, raw, sep: str):
        self.raw, self.sep = raw, sep
        self.scanner = RecordScanner(sep)   # the quote state at the end of the data read
        self.limit = None       # the separators of the header: no record may hold more
        self.open = b""         # the data read from the start of the record still open
        self.doubt = False      # ... and it may hide an empty surplus field: count it
        self.blank_cr = False   # the data read ends with a blank line ended by a lone CR
        self.ready, self.at = b"", 0   # checked bytes, not yet handed to pandas
        self.later = b""        # more of them, to hand over after ``ready``
        self.ended = False
        self.marker = None      # the marker column's name, once the header has been read

    def header_marker(self) -> str:
        """The marker column's name (:func:`surplus_marker`): reads up to the end of the header.

        Raises what :meth:`read` raises for the data read on the way.
        """
        while self.marker is None:
            self.ready, self.at = self._take(self.raw.read(READ_BLOCK) or b""), 0
        return self.marker

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` checked bytes (all that are ready if negative); b"" at the end.

        pandas calls this directly: a slice of the checked block is one copy,
        where RawIOBase's own read (a buffer, readinto, bytes) would make three.
        """
        while self.at == len(self.ready) and (self.later or not self.ended):
            if self.later:
                self.ready, self.later = self.later, b""
            else:
                block = self.raw.read(max(size, READ_BLOCK)) or b""
                self.ready = self._take(block)
            self.at = 0
        if self.at == 0 and (size < 0 or size >= len(self.ready)):
            chunk = self.ready
        else:
            chunk = self.ready[self.at:self.at + size if size >= 0 else None]
        self.at += len(chunk)
        return chunk

    def readinto(self, buffer) -> int:
        chunk = self.read(len(buffer))
        buffer[:len(chunk)] = chunk
        return len(chunk)

    def _take(self, block: bytes) -> bytes:
        """Check the next ``block`` of the stream (``b""``: its end); return what pandas gets."""
        self.ended = not block
        if self.limit is not None:
            self._check(block)
            return block
        self.open += block
        header = self._find_header(final=self.ended)
        if header is None:
            return b""                   # the header goes on: read more before pandas does
        start, end = header
        text, self.open = self.open, b""
        self.scanner = RecordScanner(self.sep, at_start=False)   # the header ended
        line = start + len(text[start:end].rstrip(b"\r\n"))
        self.marker = surplus_marker(text[start:line], self.sep)
        self._check(text[end:])
        self.later = text[line:]        # served after the header, without one more copy
        return text[:line] + (self.sep + self.marker).encode()

    def _find_header(self, final: bool) -> tuple[int, int] | None:
        """The (start, end) of the header in ``self.open``, or None if it has not ended.

        The header is the first record that is not blank (pandas skips blank
        lines before it); a prefix is scanned first, since it is usually a
        short first line.  Sets :attr:`limit`.
        """
        size = 1 << 12
        while True:
            prefix = self.open[:size]
            whole = len(prefix) == len(self.open)
            start = 0
            for end in record_ends(prefix, self.sep) + ([len(prefix)] if whole and final else []):
                record = prefix[start:end]
                if is_blank(record, self.sep, at_start=start == 0):
                    start = end
                    continue
                self.limit = separators(record, self.sep, at_start=start == 0)
                return start, end
            if whole:
                if not final:
                    return None
                self.limit = 0           # nothing but blank lines: no record to check
                return start, len(self.open)
            size *= 4

    def _check(self, block: bytes) -> None:
        """Check ``block``, which follows ``self.open``; keep the record it leaves open."""
        inside = self.scanner.inside
        quotes = self.scanner.quotes(block)
        sep = self.sep.encode()
        # ``doubt``: the open record, or this block, may hide an empty
        # surplus field; the pair of bytes across the boundary counts too.
        doubt = self.doubt or _may_hide_empty_field(block, self.sep) or \
            _may_hide_empty_field(self.open[-1:] + block[:1], self.sep) or \
            self.ended and self.open.endswith(sep)
        if self.blank_cr and block.startswith(sep):
            self._refuse_misread(block)
        if doubt:
            self._count(self.open + block)
        end = _last_record_end(block, quotes, inside)
        self.blank_cr = self._ends_with_blank_cr_line(block, end)
        if end is None:
            self.open += block       # a record longer than a block
            self.doubt = doubt
        else:
            self.open = block[end:]
            self.doubt = _may_hide_empty_field(self.open, self.sep)

    def _count(self, data: bytes) -> None:
        """Count the fields of each record of ``data`` (from a record's start) that has
        ended, and of the last one at the end of the stream."""
        quotes = RecordScanner(self.sep, at_start=False).quotes(data)
        a = np.frombuffer(data, np.uint8)
        breaks = (a == _LF) | (a == _CR)        # CR LF also ends an empty record: harmless
        seps = a == ord(self.sep)
        if quotes.size:
            outside = ~inside_mask(len(a), quotes, False)
            breaks &= outside
            seps &= outside
        ends = np.flatnonzero(breaks)
        self._refuse_pandas_cr_quirk(data, ends)
        if self.ended and (not ends.size or ends[-1] + 1 < len(a)):
            ends = np.append(ends, len(a))      # the last record, without a line end
        before, _ = count_before(np.append(seps, False), ends)
        over = np.flatnonzero(np.diff(before, prepend=0) > self.limit)
        if over.size:
            k = int(over[0])
            start = int(ends[k - 1]) + 1 if k else 0
            fields = int(before[k] - (before[k - 1] if k else 0)) + 1
            raise TooManyFields(
                f"a record has more fields than the header ({fields}, not {self.limit + 1}): "
                f"{data[start:int(ends[k])][:80].decode('utf-8', 'replace')!r}; quote values "
                f"that contain the separator {self.sep!r}, and end lines without a separator")


    def _refuse_pandas_cr_quirk(self, data: bytes, ends: np.ndarray) -> None:
        """Refuse a record that starts with the separator right after a blank line ended
        by a lone CR: pandas' tokenizer (its EAT_CRNL_NOP state) drops that separator,
        so the record's fields shift one column to the left ("Price;Qty;Note", a blank
        line, ";5;2" reads as price 5, quantity 2).  Found by hypothesis."""
        sep = ord(self.sep)
        for p in ends.tolist():
            if data[p] != _CR or data[p + 1:p + 2] != bytes([sep]):
                continue
            line_start = data.rfind(b"\n", 0, p) + 1, data.rfind(b"\r", 0, p) + 1
            if is_blank(data[max(line_start):p], self.sep):
                self._refuse_misread(data[p + 1:])

    def _ends_with_blank_cr_line(self, block: bytes, end: int | None) -> bool:
        """True if ``block`` ends with a CR, outside quotes, that ends a blank line: the
        quirk of :meth:`_refuse_pandas_cr_quirk`, should the next block start with the
        separator."""
        if end != len(block) or not block.endswith(b"\r"):
            return False
        start = max(block.rfind(b"\n", 0, end - 1), block.rfind(b"\r", 0, end - 1)) + 1
        return is_blank(block[start:-1] if start else self.open + block[:-1], self.sep)

    def _refuse_misread(self, record: bytes) -> None:
        record = record.split(b"\r")[0].split(b"\n")[0][:60]
        raise MisreadRecord(
            f"a blank line ended by CR alone comes before a record that starts with the "
            f"separator {self.sep!r} ({record.decode('utf-8', 'replace')!r}): pandas would "
            f"drop that first field and shift the others; remove the blank lines, or end "
            f"lines with LF")


class MisreadRecord(ValueError):
    """A record that pandas' parser would read wrongly."""


def separators(record: bytes, sep: str, at_start: bool = True) -> int:
    """The separators of one whole ``record`` outside quoted fields: its fields, less one.

    ``at_start``: the record opens the file (see :class:`RecordScanner`)."""
    quotes = RecordScanner(sep, at_start).quotes(record)
    seps = np.frombuffer(record, np.uint8) == ord(sep)
    if quotes.size:
        seps &= ~inside_mask(len(record), quotes, False)
    return int(np.count_nonzero(seps))


def _may_hide_empty_field(data: bytes, sep: str, start: int = 0, stop: int | None = None) -> bool:
    """True if ``data[start:stop]`` holds a separator followed by a separator, CR or LF,
    or a ``""``: what an empty field needs, except at the very end of the data (or a CR
    followed by a separator).  Reads the bytes where they are, without a copy."""
    stop = len(data) if stop is None else min(stop, len(data))
    if data.find(b'"', start, stop) != -1 and data.find(b'""', start, stop) != -1:
        return True                                         # the first is a fast memchr
    # The byte pairs as 16-bit little-endian words (first byte low), compared
    # at even and at odd offsets: a third of the work of comparing bytes.
    pairs = [ord(sep) | ord(ch) << 8 for ch in ("\n", sep)]
    if data.find(b"\r", start, stop) != -1:
        # A CR after a separator; and a separator after a CR, which pandas can
        # misread (see _FieldCheck._refuse_pandas_cr_quirk): count those blocks too.
        pairs += [ord(sep) | _CR << 8, _CR | ord(sep) << 8]
    for offset in (0, 1)[:max(stop - start, 0)]:
        words = np.frombuffer(data, "<u2", count=(stop - start - offset) // 2,
                              offset=start + offset)
        if any((words == pair).any() for pair in pairs):
            return True
    return False


def _last_record_end(block: bytes, quotes: np.ndarray, inside: bool) -> int | None:
    """The offset just past the last line end in ``block`` outside quoted fields, or None.

    ``quotes`` and ``inside``: :meth:`RecordScanner.quotes` for the block.
    """
    end = len(block)
    while True:
        pos = max(block.rfind(b"\n", 0, end), block.rfind(b"\r", 0, end))
        if pos == -1:
            return None
        before = int(quotes.searchsorted(pos))      # delimiting quotes before the break
        if (before + inside) % 2 == 0:
            return pos + 1
        if before == 0:
            return None                 # in a quoted field opened before this block
        end = int(quotes[before - 1])   # look before the quote that opened the field


# --- Memory -------------------------------------------------------------------

# glibc's malloc options (malloc.h): bytes of free memory at the top of the
# heap kept for reuse, and the size from which a block gets its own mmap.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(trim: int = 128 << 20, mmap: int = 32 << 20) -> bool:
    """Ask glibc's malloc to keep up to ``trim`` bytes of freed memory for reuse.

    A process that parses chunk after chunk allocates and frees the same
    dozen MiB of buffers (the chunk's bytes, pandas' tokens and columns) for
    every chunk.  By default glibc hands freed memory at the top of the heap
    back to the kernel past a few MiB, so every chunk faults its pages in
    again, zero-filled: measured on the 5M-row job, 3,200 page faults per
    chunk and a third of a worker's CPU in the kernel.  Setting the trim
    threshold turns off glibc's dynamic thresholds, so the mmap threshold is
    set too, to ``mmap`` bytes (at most 32 MiB on 64-bit glibc, see
    mallopt(3)).  Returns False where there is no glibc (macOS, musl): the
    defaults then stay, which costs time, not correctness.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap)) and bool(mallopt(_M_TRIM_THRESHOLD, trim))


# --- Command line --------------------------------------------------------------

# Every duration option becomes a socket timeout or a sleep.  Python refuses
# a timeout past about 9.2e9 s (OverflowError in settimeout, raised anew on
# every connection), and no job needs one past a week: refuse it here, once.
MAX_SECONDS = 7 * 24 * 3600.0


def import_pandas() -> None:
    """Import pandas now (0.3-0.4 s of CPU), then freeze what the import left.

    The garbage collector's full passes, and the interpreter's last one at
    exit, walk every object alive; pandas leaves about 200,000 of them, which
    live until exit anyway.  Frozen (:func:`gc.freeze`), they are never
    walked again: ``python -c "import pandas"`` takes 0.40 s, 0.28 s with
    the freeze.  Raises ``ImportError`` if pandas is not installed or too old
    (:func:`check_pandas`).
    """
    pd.load()
    gc.freeze()


def _duration(text: str, zero_ok: bool) -> float:
    value = float(text)
    low_ok = value >= 0 if zero_ok else value > 0
    if not (low_ok and value <= MAX_SECONDS):   # NaN fails both comparisons
        least = "0" if zero_ok else "above 0"
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds, {least} and at most {MAX_SECONDS:.0f} (a week), "
            f"got {text}")
    return value


def seconds(text: str) -> float:
    """An argparse type: a duration above 0 and at most :data:`MAX_SECONDS` s."""
    return _duration(text, zero_ok=False)


def seconds_or_zero(text: str) -> float:
    """An argparse type: a duration from 0 to :data:`MAX_SECONDS` s (0: none)."""
    return _duration(text, zero_ok=True)


def probability(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except where there is none to
    show (None, a flag that is off) or the help text already names it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in action.help:
            return action.help
        return super()._get_help_string(action)


def port_number(lowest: int):
    """An argparse type: a TCP port number from ``lowest`` to 65535."""
    def port(text: str) -> int:
        value = int(text)
        if not lowest <= value <= 65535:
            raise argparse.ArgumentTypeError(f"must be {lowest}..65535, got {value}")
        return value
    return port


def build_parser() -> argparse.ArgumentParser:
    """The worker's command line (see ``--help``); tools/flaky_worker.py adds to it."""
    p = argparse.ArgumentParser(
        description="Pull chunks from a sales-analysis server and report partial metrics.",
        formatter_class=HelpFormatter)
    p.add_argument("--server", default="127.0.0.1", help="server host name or address")
    p.add_argument("--port", type=port_number(1), default=5000, help="server TCP port")
    p.add_argument("--port-file", default=None,
                   help="read the port from this file (server.py --port-file), waiting "
                        "until it appears; overrides --port")
    p.add_argument("--worker-id", default=f"{socket.gethostname()}-{os.getpid()}",
                   help="name of this worker in results and logs")
    p.add_argument("--secret", default=None,
                   help=f"shared secret for the handshake (prefer the {SECRET_ENV} "
                        "environment variable: arguments are visible in the process list)")
    p.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to verify a TLS server")
    p.add_argument("--give-up-after", type=seconds, default=60.0,
                   help="seconds to keep reconnecting to an unreachable server")
    p.add_argument("--io-timeout", type=seconds, default=60.0,
                   help="seconds one read or write may block")
    p.add_argument("--no-local-read", dest="local_read", action="store_false",
                   help="in --stream, always have the server send the chunks, even where "
                        "this machine has the input file (default: read it here if it is "
                        "the same file)")
    p.add_argument("--log-level", default="INFO", help="how much to log",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The worker's parsed command line."""
    return build_parser().parse_args(argv)


def wait_for_port_file(path: str, stopping: threading.Event,
                       give_up_after: float = 60.0) -> int | None:
    """The port that ``server.py --port-file`` wrote to ``path``, once it is there.

    Lets a launcher (tools/local_cluster.py) start workers while the server
    is still loading its input, so that their own start-up, mostly
    ``import pandas``, overlaps the server's.  The server writes the file
    atomically, so a file that exists is complete.  Returns None if
    ``stopping`` is set (a signal) or if the process that started this
    worker exits (it is then re-parented) before the file appears.  Raises
    :class:`GiveUp` after ``give_up_after`` seconds without the file: a
    server that refused its input (exit 2) never writes it.
    """
    launcher = os.getppid()
    deadline = time.monotonic() + give_up_after
    while not stopping.wait(0.005):
        try:
            with open(path) as f:
                return int(f.read())
        except FileNotFoundError:
            if os.getppid() != launcher:
                return None
            if time.monotonic() > deadline:
                raise GiveUp(f"no port in {path} after {give_up_after:g} s: the server "
                             f"did not start, or refused its input (see its message)") from None
    return None


def main(argv=None) -> int:
    """Entry point: run one worker until the job is done; return the exit code."""
    return run_worker(parse_args(argv), Worker)


def run_worker(args: argparse.Namespace, make_worker) -> int:
    """Run ``make_worker(host, port, worker_id, secret, tls_ca, give_up_after,
    io_timeout, local_read=...)`` (a :class:`Worker`) as this process; return its exit code."""
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    secret = args.secret if args.secret is not None else os.environ.get(SECRET_ENV, "")
    worker = make_worker(args.server, args.port, args.worker_id, secret.encode(), args.tls_ca,
                         args.give_up_after, args.io_timeout, local_read=args.local_read)

    def on_signal(signum, frame):
        if worker.stopping.is_set():
            # A second Ctrl-C means "now": no exception, which could surface
            # as a traceback from wherever the interpreter happens to be.
            log.warning("%s: signal %d again: stopping now", args.worker_id, signum)
            logging.shutdown()
            os._exit(128 + signum)
        log.info("%s: signal %d: finishing the current attempt", args.worker_id, signum)
        worker.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # A worker parses, so it imports pandas now, before it waits for the
    # server: a launcher that starts both at once overlaps this 0.3 s with
    # the server's own start-up (the LazyModule is for the server's sake).
    try:
        import_pandas()
    except ImportError as exc:
        log.error("%s: cannot import pandas (%s): pip install -r requirements.txt",
                  args.worker_id, exc)
        return 1
    keep_freed_memory()
    try:
        if args.port_file:
            log.info("%s: waiting for the port file %s", args.worker_id, args.port_file)
            try:
                worker.port = wait_for_port_file(args.port_file, worker.stopping,
                                                 args.give_up_after)
            except GiveUp as exc:
                log.error("%s: %s", args.worker_id, exc)
                return 1
            if worker.port is None:
                return 0  # stopped, or the launcher is gone, before the server listened
        return worker.run()
    except KeyboardInterrupt:
        return 130
    finally:
        worker.disconnect()


if __name__ == "__main__":
    sys.exit(main())
