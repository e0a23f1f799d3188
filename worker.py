"""A worker: pulls chunks from the server, computes partial metrics, reports them.

Run one per core, on this machine or others::

    python worker.py --server 127.0.0.1 --port 5000 --worker-id worker-1

The main loop (:meth:`Worker.run`) is the whole life of a worker::

    connect ──> HELLO ──> GET_JOB ──┬── JOB ────> compute ──> RESULT ──> ACK ─┐
       ^                            ├── WAIT ───> sleep retry_after ─────────┤
       │                            └── NO_JOB ─> exit 0                     │
       │                                 ^                                    │
       │                                 └────────────────────────────────────┘
       └── connection lost: back off (exponential, jittered), reconnect,
           re-send the RESULT that was not acknowledged, carry on

Delivery is at-least-once: a RESULT is kept until the server's ACK says it
is committed, and sent again after a reconnect.  The server's first-wins
commit makes the duplicates harmless (see ``db_utils.py``).

:func:`compute_metrics` is a pure function of a DataFrame, so it can be
tested without any socket; the column and number rules it follows are below
it and are shared with the server, which checks the header before it starts.
"""

from __future__ import annotations

import argparse
import codecs
import io
import logging
import math
import os
import pickle
import random
import re
import signal
import socket
import ssl
import sys
import threading
import time
import warnings
import zlib

import numpy as np
import pandas as pd

import protocol

log = logging.getLogger("worker")

SECRET_ENV = "SALES_SECRET"

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
    return (_pick(columns, price_col, PRICE_ALIASES, "price", "--price-col"),
            _pick(columns, qty_col, QTY_ALIASES, "quantity", "--qty-col"))


def _pick(columns, wanted, aliases, what, option):
    if wanted is not None:
        hits = [c for c in columns if c == wanted] or \
               [c for c in columns if normalize_name(c) == normalize_name(wanted)]
        if not hits:
            raise ColumnError(f"{option} {wanted!r} is not a column; columns found: {columns}")
        return hits[0]
    hits = [c for c in columns if normalize_name(c) in aliases]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ColumnError(
            f"no {what} column; columns found: {columns}; accepted names "
            f"(case, spaces and punctuation ignored): {sorted(aliases)}; or pass {option}")
    raise ColumnError(f"several {what} columns match: {hits}; choose one with {option}")


# --- Numbers -------------------------------------------------------------------
# What may surround or sit inside a number and carries no value: white space
# (including no-break spaces), apostrophes used as thousands marks ("1'234"),
# currency signs and ISO codes.
_NOISE = re.compile(r"[\s\u00a0\u202f'\u2019$€£¥₹]|USD|EUR|GBP", re.IGNORECASE)
# A number written with thousands separators: 1,234 or 12,345,678.90.
_GROUPED = {
    ".": re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?"),
    ",": re.compile(r"[+-]?\d{1,3}(?:\.\d{3})+(?:,\d*)?"),
}


def to_number(values: pd.Series, decimal: str = ".") -> pd.Series:
    """Convert a column to float64; anything that is not a finite number -> NaN.

    Numeric columns pass through.  Text is cleaned first: currency signs and
    codes, spaces and apostrophes are dropped; thousands separators are
    removed only where they group digits by three; with ``decimal=","`` the
    decimal comma becomes a point.  What is still not a number ("TBD", "",
    "1,2,3", "inf") becomes NaN, never a string: string arithmetic
    ("2.50" * 3 == "2.502.502.50") is what this function exists to prevent.
    """
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        # astype costs ~50 us even when it changes nothing; small chunks feel it.
        numbers = values if values.dtype == "float64" else values.astype("float64")
    else:
        text = values.astype("string").str.replace(_NOISE, "", regex=True)
        grouped = text.str.fullmatch(_GROUPED[decimal]).fillna(False).astype(bool)
        thousands = "," if decimal == "." else "."
        text = text.mask(grouped, text.str.replace(thousands, "", regex=False))
        if decimal == ",":
            text = text.str.replace(",", ".", regex=False)
        numbers = pd.to_numeric(text, errors="coerce").astype("float64")
    finite = np.isfinite(numbers.to_numpy())
    # Series.where costs ~0.15 ms even when it changes nothing; a chunk
    # without infinities (the usual case) skips it.
    return numbers if finite.all() else numbers.where(finite)


# --- Metrics -------------------------------------------------------------------

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
    price_col, qty_col = find_columns(df.columns, price_col, qty_col)
    price = to_number(df[price_col], decimal)
    qty = to_number(df[qty_col], decimal)
    # The arithmetic runs on the numpy arrays: each pandas operation costs
    # tens of microseconds of bookkeeping, which dominated small chunks.
    # Same sums (numpy's pairwise summation, as pandas uses), same answer.
    p, q = price.to_numpy(), qty.to_numpy()
    valid = ~(np.isnan(p) | np.isnan(q))
    count = int(np.count_nonzero(valid))
    price_ok = p[valid]
    with np.errstate(all="ignore"):  # an overflow gives inf quietly, as in pandas
        metrics = {
            "rows_processed": int(len(df)),
            "rejected_rows": int(len(df) - count),
            "total_sales": float((price_ok * q[valid]).sum()),
            "min_price": float(price_ok.min()) if count else None,
            "max_price": float(price_ok.max()) if count else None,
            "avg_price": float(price_ok.mean()) if count else None,
            "price_count": count,
            "groups": [],
        }
    if group_col is not None:
        valid = pd.Series(valid, index=df.index)
        metrics["groups"] = _group_metrics(df[group_col], price, qty, valid)
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


def load_chunk(job: dict) -> pd.DataFrame:
    """Turn a JOB message's ``data`` (bytes) into a DataFrame.

    ``format == "frame"``: a pickled DataFrame, unpickled in full: the one
    place where the worker trusts the server (see README, "Security").
    ``format == "csv"``: raw CSV bytes (header line + whole records),
    parsed here with the separator, decimal mark and encoding the server
    detected.  Either may be zlib-compressed.  Raises ValueError for an
    unknown format or bytes not in the encoding (the message suggests
    ``--encoding``), and pandas' parser errors on other bad data; the
    caller reports them as a failed attempt.
    """
    raw = _inflate(job["data"]) if job.get("compressed") else job["data"]
    if job["format"] == "frame":
        frame = pickle.loads(raw)
        if not isinstance(frame, pd.DataFrame):
            raise ValueError("JOB data is not a DataFrame")
        return frame
    if job["format"] != "csv":
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


# A column name no real header can hold (the server refuses NUL bytes).
SURPLUS = "\x00surplus"


def read_columns(stream, sep: str, decimal: str, encoding: str, wanted: list,
                 group_col: str | None = None) -> pd.DataFrame:
    """Parse CSV text from a binary ``stream``, keeping the ``wanted`` columns.

    Used by the server (documented mode) and by workers (``--stream``), so
    both read records the same way:

    * Only empty cells are missing values.  pandas' default list would turn
      the group "NA" (North America) into a missing group; a price "NA" is
      rejected either way, because it is not a number.
    * The group column is read as text: "007" stays "007", and a chunk with
      gaps never turns 7 into "7.0".
    * A record with more non-empty fields than the header is an error.
      With ``usecols``, pandas silently reads such a record by position
      (pandas issue 40049): the unquoted ``1,234.50,2`` under
      ``Price,Quantity`` would become price 1, quantity 234.5.  So the
      header is extended by one :data:`SURPLUS` column, where the surplus
      lands, and any value there raises ``ValueError`` naming the record.

    Returns a DataFrame with the ``wanted`` columns.  Raises ``ValueError``
    (and pandas' ``ParserError``, a subclass) for malformed data and
    ``UnicodeDecodeError`` for bytes not in ``encoding``.
    """
    columns = wanted
    if "\n".encode(encoding).removeprefix(codecs.BOM_UTF8) == b"\n":
        stream = _with_surplus_column(stream, (sep + SURPLUS).encode(encoding)
                                      .removeprefix(codecs.BOM_UTF8))
        columns = wanted + [SURPLUS]
    # The surplus column is read as "category": almost always empty, it then
    # costs next to nothing, where the default type inference of an all-empty
    # column costs as much as the price column itself.
    types = {SURPLUS: "category"} if SURPLUS in columns else {}
    if group_col:
        types[group_col] = str
    with warnings.catch_warnings():
        # pandas parses large inputs in pieces; a price column that is text in
        # one piece and numbers in another comes out mixed, which it warns
        # about.  to_number() reads both kinds alike, so the warning is noise.
        warnings.simplefilter("ignore", pd.errors.DtypeWarning)
        frame = pd.read_csv(stream, sep=sep, decimal=decimal, encoding=encoding,
                            usecols=columns, dtype=types, keep_default_na=False,
                            na_values={c: [""] for c in columns})
    if SURPLUS in frame:
        surplus = frame.pop(SURPLUS).notna().to_numpy()
        if surplus.any():
            record = int(surplus.argmax()) + 1
            raise ValueError(f"data record {record} has more fields than the header; "
                             f"quote values that contain the separator {sep!r}")
    return frame


def _with_surplus_column(stream, suffix: bytes):
    """``stream`` with ``suffix`` added at the end of its header record.

    The header is the first record after any blank lines; its end is the
    first newline preceded by an even number of quotes (RFC 4180).
    """
    head = stream.read(1 << 20)
    start = len(head) - len(head.removeprefix(codecs.BOM_UTF8).lstrip(b"\r\n"))
    eol = b"\n" if b"\n" in head else b"\r"   # old Mac files end lines with CR alone
    end, quotes = start, 0
    while True:
        newline = head.find(eol, end)
        if newline == -1:
            end = len(head)    # the header is the last line, or longer than the head
            break
        quotes += head.count(b'"', end, newline)
        end = newline + 1
        if quotes % 2 == 0:
            break
    line_end = len(head[:end]) - len(head[:end].rstrip(b"\r\n"))
    head = head[:end - line_end] + suffix + head[end - line_end:]
    return io.BufferedReader(_Prefixed(head, stream), buffer_size=1 << 20)


class _Prefixed(io.RawIOBase):
    """A read-only stream: ``prefix`` bytes, then whatever ``rest`` holds."""

    def __init__(self, prefix: bytes, rest):
        self.prefix, self.rest = memoryview(prefix), rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.prefix:
            n = min(len(buffer), len(self.prefix))
            buffer[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            return n
        return self.rest.readinto(buffer)


# --- The worker ----------------------------------------------------------------

class GiveUp(Exception):
    """The server stayed unreachable for longer than --give-up-after."""


class Worker:
    """One worker process's connection and main loop.

    ``secret`` (bytes) authenticates both ends; ``tls_ca`` (a PEM path)
    turns on TLS and verifies the server against that CA.  ``give_up_after``
    (s) bounds how long the worker keeps reconnecting to a server that is
    gone; ``io_timeout`` (s) bounds any one blocking read or write.
    """

    def __init__(self, host: str, port: int, worker_id: str, secret: bytes = b"",
                 tls_ca: str | None = None, give_up_after: float = 60.0,
                 io_timeout: float = 60.0):
        self.host, self.port, self.worker_id = host, port, worker_id
        self.secret = secret
        self.tls = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
        self.give_up_after, self.io_timeout = give_up_after, io_timeout
        self.sock: socket.socket | None = None
        self.server_max_frame = protocol.SERVER_MAX_FRAME  # until WELCOME says otherwise
        self.stopping = threading.Event()
        self.chunks_done = 0

    def stop(self) -> None:
        """Ask the loop to end after the current attempt (signal-safe)."""
        self.stopping.set()

    def run(self) -> int:
        """The main loop; returns the process exit code (0: job done)."""
        unacked = None  # a RESULT or FAILED message the server has not acknowledged
        while True:
            try:
                if self.sock is None:
                    if self.stopping.is_set():
                        return 0  # never reconnect just to say goodbye
                    self.connect()
                if unacked is not None:
                    self.deliver(unacked)
                    unacked = None
                if self.stopping.is_set():
                    log.info("%s: stopping after %d chunks", self.worker_id, self.chunks_done)
                    return 0
                reply = self.request(protocol.make(protocol.GET_JOB))
                if reply["type"] == protocol.NO_JOB:
                    log.info("%s: job finished, %d results delivered from here",
                             self.worker_id, self.chunks_done)
                    return 0
                if reply["type"] == protocol.WAIT:
                    self.stopping.wait(_retry_after(reply))
                    continue
                if reply["type"] != protocol.JOB:
                    raise protocol.ProtocolError(f"unexpected {reply['type']} reply to GET_JOB")
                unacked = self.handle_job(reply)
                self.deliver(unacked)
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
                    raise GiveUp(f"server {self.host}:{self.port} unreachable for "
                                 f"{self.give_up_after:.0f} s ({exc}); if its job is "
                                 f"finished, the server has exited and nothing is left "
                                 f"to do") from None
                if self.stopping.wait(random.uniform(0, bound)):
                    raise GiveUp("stopped while reconnecting") from None
                bound = min(bound * 2, 5.0)

    def _open(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.io_timeout)
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
        """Close the socket, if any (idempotent)."""
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def request(self, message: dict) -> dict:
        """Send one message, return the reply; an ERROR reply raises ServerRefused."""
        protocol.send_frame(self.sock, protocol.encode(message))
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
        return compute_metrics(load_chunk(job), job["price_col"], job["qty_col"],
                               job["decimal"], job["group_col"])

    def deliver(self, message: dict) -> None:
        """Send a RESULT/FAILED and wait for its ACK (the commit receipt).

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
        reply = self.request(message)
        if reply["type"] == protocol.ACK:
            protocol.check(reply)
        if reply["type"] != protocol.ACK or reply["chunk_id"] != message["chunk_id"]:
            raise protocol.ProtocolError(f"expected ACK for chunk {message['chunk_id']}, "
                                         f"got {reply['type']}")
        if message["type"] == protocol.RESULT:
            self.chunks_done += 1


def _retry_after(reply: dict) -> float:
    """The WAIT delay in seconds, clamped to 0.01..5 (0.5 if it is not a number)."""
    delay = reply.get("retry_after")
    if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not delay == delay:
        return 0.5
    return min(max(float(delay), 0.01), 5.0)


# --- Command line --------------------------------------------------------------

# Every duration option becomes a socket timeout or a sleep.  Python refuses
# a timeout past about 9.2e9 s (OverflowError in settimeout, raised anew on
# every connection), and no job needs one past a week: refuse it here, once.
MAX_SECONDS = 7 * 24 * 3600.0


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
    p.add_argument("--log-level", default="INFO", help="how much to log",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The worker's parsed command line."""
    return build_parser().parse_args(argv)


def wait_for_port_file(path: str, stopping: threading.Event) -> int | None:
    """The port that ``server.py --port-file`` wrote to ``path``, once it is there.

    Lets a launcher (tools/local_cluster.py) start workers while the server
    is still loading its input, so that their own start-up, mostly
    ``import pandas``, overlaps the server's.  The server writes the file
    atomically, so a file that exists is complete.  Returns None if
    ``stopping`` is set (a signal) or if the process that started this
    worker exits (it is then re-parented) before the file appears.
    """
    launcher = os.getppid()
    while not stopping.wait(0.005):
        try:
            with open(path) as f:
                return int(f.read())
        except FileNotFoundError:
            if os.getppid() != launcher:
                return None
    return None


def main(argv=None) -> int:
    """Entry point: run one worker until the job is done; return the exit code."""
    return run_worker(parse_args(argv), Worker)


def run_worker(args: argparse.Namespace, make_worker) -> int:
    """Run ``make_worker(host, port, worker_id, secret, tls_ca, give_up_after,
    io_timeout)`` (a :class:`Worker`) as this process; return its exit code."""
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    secret = args.secret if args.secret is not None else os.environ.get(SECRET_ENV, "")
    worker = make_worker(args.server, args.port, args.worker_id, secret.encode(), args.tls_ca,
                         args.give_up_after, args.io_timeout)

    def on_signal(signum, frame):
        if worker.stopping.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        log.info("%s: signal %d: finishing the current attempt", args.worker_id, signum)
        worker.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if args.port_file:
            log.info("%s: waiting for the port file %s", args.worker_id, args.port_file)
            worker.port = wait_for_port_file(args.port_file, worker.stopping)
            if worker.port is None:
                return 0  # stopped, or the launcher is gone, before the server listened
        return worker.run()
    except KeyboardInterrupt:
        return 130
    finally:
        worker.disconnect()


if __name__ == "__main__":
    sys.exit(main())
