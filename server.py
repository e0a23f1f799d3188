"""The server: splits a sales CSV into chunks, leases them to workers, stores results.

Run it once per job::

    python server.py --csv sales_5m.csv --host 0.0.0.0 --port 5000 --chunks 200 --db results.sqlite

Data flow::

      sales.csv (.gz ...)
          │ inspect_csv()      header, separator, columns: fail early (exit 2)
          │ cut_text()         byte ranges of whole records, the same in both modes
          ▼
    FrameChunks / StreamChunks  documented mode: a producer thread parses the
          │                     ranges in order, a few chunks ahead of the leases;
          │                     --stream: the range's bytes, read when handed out,
          │                     or only the range, to a worker that has the file
          ▼
    ChunkBook ──lease()──> Handler thread ──JOB──────> worker
     PENDING                (one per TCP                  │ compute_metrics()
     LEASED   <─complete()─  connection)  <──RESULT───────┘
     DONE                        │
     FAILED                      ▼ record_result(): first result per chunk wins
                            ResultStore (db_utils.py, SQLite or PostgreSQL)
                                 │
                                 ▼ FINAL_AGGREGATE_SQL once every chunk is DONE
                          {'total_rows': ..., 'total_sales': ..., ...}

Rules the code keeps (README, "How it stays correct", says why):

* A lease lasts ``--lease-timeout`` seconds; a chunk whose lease expires, or
  whose connection drops, goes back to the queue (at-least-once delivery).
* The first committed result of a chunk is the one that counts; later ones
  are recorded as duplicates and change nothing (exactly-once effect).
* A worker asking for work while chunks are leased but not done is told to
  WAIT, never "no more work": the job can finish with a single worker left.
* A chunk whose attempts *reported* failure ``--max-attempts`` times is
  FAILED and the job exits 1 naming it.  Lost attempts (crash, expiry, a
  JOB the server could not build) say more about the worker than about the
  chunk: they are retried, up to a bound of their own, ``--max-lost``.
* No JOB is built over the workers' frame limit (see :func:`job_data_room`).
* The job is identified by the input file and the chunking, so a restart
  with the same arguments resumes and a different file never mixes in.

The module reads in that order: the chunk book (leases, attempts), the
server and one handler per message type, the main loop and the report.
Below the banner that starts ``# The armour.`` come the checks of what
workers send, the inspection of the input, the two chunk sources and the
command line: what keeps the lesson above safe from its input.
"""

from __future__ import annotations

import argparse
import bz2
import codecs
import collections
import contextlib
import csv
import gc
import gzip
import hashlib
import io
import ipaddress
import json
import logging
import lzma
import math
import os
import pickle
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

import protocol
from db_utils import AggregateOverflow, Outcome, ResultStore, StoreError
from worker import (PRICE_ALIASES, QTY_ALIASES, SECRET_ENV, ColumnError,
                    HelpFormatter, LazyModule, RecordScanner, SmallChunk, byte_transparent,
                    check_pandas, fd_fingerprint, file_fingerprint, fingerprint_text, find_columns,
                    import_pandas, inside_mask, is_blank, keep_freed_memory, normalize_name,
                    port_number, read_columns, record_ends, seconds, seconds_or_zero,
                    show_names, text_readings)

log = logging.getLogger("server")
# Imported by the first parse: the documented mode's chunks, an unusual header.
# A --stream server parses nothing and never imports pandas.
pd = LazyModule("pandas", check=check_pandas)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class InputError(Exception):
    """The input cannot be processed; the message is one line for the user."""


# --- The lesson, part 1: chunk bookkeeping (no sockets, no database) -----------

class ChunkState:
    """Where a chunk is in :class:`ChunkBook` (in memory; the database keeps
    :class:`db_utils.Outcome` per attempt instead)."""

    PENDING = "PENDING"   # waiting in the queue for a lease
    LEASED = "LEASED"     # at least one live lease, no result yet
    DONE = "DONE"         # a result is committed (final)
    FAILED = "FAILED"     # cannot succeed: --max-attempts/--max-lost reached, or unsendable


@dataclass
class Lease:
    """One attempt: ``chunk_id`` handed to ``worker_id`` on connection ``conn``
    until ``deadline`` (``time.monotonic()`` seconds)."""
    attempt_id: int
    chunk_id: int
    worker_id: str
    conn: int
    deadline: float


class ChunkBook:
    """The state of every chunk, and the leases that hand them out.

    A chunk moves PENDING -> LEASED -> DONE, back to PENDING when its last
    live lease ends without a result, and to FAILED when it cannot succeed:
    after ``max_attempts`` *reported* failures (the worker said why), after
    ``max_lost`` *lost* attempts (a lease expired, a connection dropped, the
    JOB could not be built: nobody said why), or at once when it can never
    be sent (:meth:`refuse`).  The two counts are kept apart: one crashed
    worker says little about a chunk, but a chunk that every worker drops,
    or that no worker may receive, would otherwise be handed out for ever.
    One lock guards everything, so handler threads and the main thread's
    expiry sweep see one consistent state.  ``clock`` is injectable so tests
    can move time by hand.  ``finished`` is an Event set once no chunk is
    PENDING or LEASED.  Attempt ids from ``next_attempt_id`` on are this
    run's (``first_attempt_id``); lower ones were issued by an earlier run.
    """

    def __init__(self, chunks: int, lease_timeout: float, max_attempts: int,
                 done=(), known_attempts=None, next_attempt_id: int = 1,
                 clock=time.monotonic, max_lost: int = 10):
        self.lease_timeout, self.max_attempts, self.clock = lease_timeout, max_attempts, clock
        self.max_lost = max_lost
        self.state = [ChunkState.PENDING] * chunks
        for chunk_id in done:
            self.state[chunk_id] = ChunkState.DONE
        self.queue = collections.deque(
            c for c in range(chunks) if self.state[c] == ChunkState.PENDING)
        self.leases: dict[int, Lease] = {}
        self.attempt_owner = dict(known_attempts or {})  # attempt_id -> (chunk_id, worker_id)
        self.next_attempt_id = self.first_attempt_id = next_attempt_id
        self.failures = [0] * chunks   # reported failures, toward max_attempts
        self.losses = [0] * chunks     # lost attempts, toward max_lost
        # Attempts whose failure is already counted: a worker that lost the
        # ACK re-sends its FAILED, and one attempt must count only once.
        self.failed_attempts: set[int] = set()
        self.last_error: dict[int, str] = {}
        self.why_failed: dict[int, str] = {}   # chunk_id -> why it is FAILED, for the report
        self.dispatches = 0
        self._lock = threading.Lock()
        self.finished = threading.Event()
        self._scanned = 0   # state[:_scanned] are all DONE or FAILED (see _check_finished)
        self._check_finished()

    def __len__(self) -> int:
        return len(self.state)

    def lease(self, worker_id: str, conn: int, besides: int | None = None) -> Lease | None:
        """Lease the next pending chunk, or return None if none is pending.

        Chunk ``besides`` is passed over (it stays where it is in the queue):
        a RESULT for it is about to commit in the same transaction as this
        lease (``Handler.handle_result``), so it must not be handed out again
        to the very worker that reports it, as it could be if its lease had
        expired meanwhile.
        """
        with self._lock:
            passed = []
            while self.queue:
                chunk_id = self.queue.popleft()
                if self.state[chunk_id] != ChunkState.PENDING:
                    continue
                if chunk_id != besides:
                    break
                passed.append(chunk_id)
            else:
                self.queue.extendleft(passed)
                return None
            self.queue.extendleft(passed)
            lease = Lease(self.next_attempt_id, chunk_id, worker_id, conn,
                          self.clock() + self.lease_timeout)
            self.next_attempt_id += 1
            self.state[chunk_id] = ChunkState.LEASED
            self.leases[lease.attempt_id] = lease
            self.attempt_owner[lease.attempt_id] = (chunk_id, worker_id)
            self.dispatches += 1
            return lease

    def is_attempt_of(self, attempt_id: int, chunk_id: int, worker_id: str) -> bool:
        """True if ``attempt_id`` was issued (now or in an earlier run) for
        ``chunk_id`` to ``worker_id``: nobody reports another's attempt."""
        with self._lock:
            return self.attempt_owner.get(attempt_id) == (chunk_id, worker_id)

    def held_by(self, conn: int, besides: int | None = None) -> int | None:
        """The chunk a live lease of connection ``conn`` holds, if any (not
        counting attempt ``besides``: the one a RESULT reports)."""
        with self._lock:
            return next((l.chunk_id for l in self.leases.values()
                         if l.conn == conn and l.attempt_id != besides), None)

    def complete(self, chunk_id: int, attempt_id: int) -> None:
        """A result for the chunk is committed: it is DONE (idempotent)."""
        with self._lock:
            self.leases.pop(attempt_id, None)
            self.state[chunk_id] = ChunkState.DONE
            self._check_finished()

    def fail(self, chunk_id: int, attempt_id: int, error: str) -> bool:
        """The worker reported an error; return True if the chunk is now FAILED.

        A report re-sent for an attempt already counted changes nothing.
        """
        with self._lock:
            self.leases.pop(attempt_id, None)
            self.last_error[chunk_id] = error
            if (self.state[chunk_id] in (ChunkState.DONE, ChunkState.FAILED)
                    or attempt_id in self.failed_attempts):
                return False
            self.failed_attempts.add(attempt_id)
            self.failures[chunk_id] += 1
            if self.failures[chunk_id] >= self.max_attempts:
                self._give_up(chunk_id, f"{error} (failed {self.failures[chunk_id]} times)")
                return True
            self._requeue(chunk_id)
            return False

    def refuse(self, chunk_id: int, attempt_id: int, reason: str) -> None:
        """The chunk can never be handed out (say, its JOB exceeds the
        workers' frame limit): end the attempt and FAIL the chunk at once."""
        with self._lock:
            self.leases.pop(attempt_id, None)
            if self.state[chunk_id] == ChunkState.LEASED:
                self._give_up(chunk_id, reason)

    def release(self, conn: int) -> list[Lease]:
        """The connection closed: end its leases as lost and re-queue their chunks."""
        with self._lock:
            gone = [lease for lease in self.leases.values() if lease.conn == conn]
            self._lose(gone, lambda lease: f"worker {lease.worker_id}'s connection closed "
                                           f"while it held the chunk")
            return gone

    def expire(self) -> list[Lease]:
        """End every lease past its deadline as lost and re-queue their chunks."""
        with self._lock:
            now = self.clock()
            gone = [lease for lease in self.leases.values() if lease.deadline <= now]
            self._lose(gone, lambda lease: f"its lease expired after {self.lease_timeout:g} s "
                                           f"({lease.worker_id})")
            return gone

    def lose(self, attempt_id: int, reason: str) -> None:
        """End one live attempt as lost for ``reason`` (the JOB was never sent)."""
        with self._lock:
            lease = self.leases.get(attempt_id)
            if lease is not None:
                self._lose([lease], lambda _: reason)

    def _lose(self, gone: list[Lease], reason) -> None:
        for lease in gone:
            del self.leases[lease.attempt_id]
        for lease in gone:
            chunk_id = lease.chunk_id
            if self.state[chunk_id] != ChunkState.LEASED:
                continue   # a result or a reported failure already decided it
            self.losses[chunk_id] += 1
            still_held = any(l.chunk_id == chunk_id for l in self.leases.values())
            if self.losses[chunk_id] >= self.max_lost and not still_held:
                self._give_up(chunk_id, (
                    f"lost {self.losses[chunk_id]} times without a result or an error "
                    f"report (last: {reason(lease)}); do workers crash or time out on it, "
                    f"or is it too large for their frame limit?"))
            else:
                self._requeue(chunk_id)

    def _give_up(self, chunk_id: int, why: str) -> None:
        self.state[chunk_id] = ChunkState.FAILED
        self.why_failed[chunk_id] = why
        log.error("chunk %d FAILED: %s", chunk_id, why)
        self._check_finished()

    def _requeue(self, chunk_id: int) -> None:
        # Another live lease may still hold the chunk (it was re-leased after
        # an expiry): then it stays LEASED and is not queued twice.
        if self.state[chunk_id] != ChunkState.LEASED:
            return
        if any(lease.chunk_id == chunk_id for lease in self.leases.values()):
            return
        self.state[chunk_id] = ChunkState.PENDING
        self.queue.appendleft(chunk_id)  # retry first: it is what the job waits for

    def _check_finished(self) -> None:
        # DONE and FAILED are final (a late result turns FAILED into DONE,
        # nothing leaves them), so the scan resumes where it last stopped:
        # linear over the whole job instead of per completed chunk, which
        # made a job of 10,000 chunks spend seconds here under the lock.
        while (self._scanned < len(self.state)
               and self.state[self._scanned] in (ChunkState.DONE, ChunkState.FAILED)):
            self._scanned += 1
        if self._scanned == len(self.state):
            self.finished.set()

    def counts(self) -> dict:
        """``{'PENDING': n, 'LEASED': n, 'DONE': n, 'FAILED': n}``."""
        with self._lock:
            tally = collections.Counter(self.state)
        return {s: tally.get(s, 0) for s in (ChunkState.PENDING, ChunkState.LEASED,
                                             ChunkState.DONE, ChunkState.FAILED)}

    def failed_chunks(self) -> dict[int, str]:
        """``{chunk_id: why it failed}`` of the FAILED chunks (one line each)."""
        with self._lock:
            return {c: self.why_failed.get(c, "") for c, s in enumerate(self.state)
                    if s == ChunkState.FAILED}


# --- The lesson, part 2: the TCP server and one handler per message type -------

class Timings:
    """Seconds spent per phase (read, split, serialize, db, ...), thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.seconds = collections.defaultdict(float)
        self.bytes_sent = 0   # every frame to workers, 4-byte headers included

    def add(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to ``phase``."""
        with self._lock:
            self.seconds[phase] += seconds

    def sent(self, size: int) -> None:
        """Count a frame of ``size`` bytes sent to a worker."""
        with self._lock:
            self.bytes_sent += size


class JobServer(socketserver.ThreadingTCPServer):
    """A threaded TCP server (one thread per connection) that runs one job.

    Holds the shared state the handlers use: the chunk source, the
    :class:`ChunkBook`, the :class:`~db_utils.ResultStore` and the settings.
    Refuses connections beyond ``max_connections`` at once.
    """

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, chunks, book: ChunkBook, store: ResultStore, job_id: str,
                 info: CsvInfo, secret: bytes = b"", tls: ssl.SSLContext | None = None,
                 max_frame: int = protocol.SERVER_MAX_FRAME, io_timeout: float = 10.0,
                 idle_timeout: float = 600.0, max_connections: int = 256,
                 wait_interval: float = 0.2):
        self.chunks, self.book, self.store, self.job_id, self.info = chunks, book, store, job_id, info
        self.secret, self.tls, self.max_frame = secret, tls, max_frame
        self.io_timeout, self.idle_timeout = io_timeout, idle_timeout
        self.max_connections, self.wait_interval = max_connections, wait_interval
        self.timings = Timings()
        self.progress = Progress(len(chunks), len(book) - book.counts()[ChunkState.PENDING])
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        # Notified when a connection ends or a worker hears NO_JOB: the end
        # of a job waits on it, not in a polling loop.
        self._conns_changed = threading.Condition(self._conns_lock)
        self.stop = threading.Event()     # set by a signal, or by fail_job()
        self.fatal: str | None = None     # why the job cannot go on, if it cannot
        # Workers that took part in this job (in this run or an earlier one)
        # and have not heard NO_JOB yet: the server lingers for them at the end.
        # A job that is complete already was finished by the earlier run,
        # which told its workers then: nobody is left to wait for.
        self._untold = ({worker for _, worker in book.attempt_owner.values()}
                        if not book.finished.is_set() else set())
        super().__init__(address, Handler)

    def fail_job(self, reason: str) -> None:
        """Stop the job for a reason no worker can fix (the input or the
        database broke); the first reason is the one reported."""
        with self._conns_lock:
            if self.fatal is None:
                self.fatal = reason
        self.stop.set()

    def hello(self, worker_id: str) -> None:
        """Note a worker that joined: it should hear NO_JOB before the server goes."""
        with self._conns_lock:
            self._untold.add(worker_id)

    def told_done(self, worker_id: str) -> None:
        """``worker_id`` has heard NO_JOB."""
        with self._conns_changed:
            self._untold.discard(worker_id)
            self._conns_changed.notify_all()

    def wait_for_workers(self, timeout: float) -> None:
        """Wait until no connection is open and every worker has heard NO_JOB,
        for at most ``timeout`` seconds or until :attr:`stop` is set."""
        deadline = time.monotonic() + timeout
        with self._conns_changed:
            while (self._conns or self._untold) and not self.stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                # A signal sets stop without notifying: look again 10 times a second.
                self._conns_changed.wait(min(left, 0.1))

    def verify_request(self, request, client_address) -> bool:
        """Admit a connection unless ``max_connections`` are already open."""
        with self._conns_lock:
            if len(self._conns) >= self.max_connections:
                log.warning("refusing %s:%s: %d connections already open",
                            *client_address[:2], len(self._conns))
                return False
            self._conns.add(request)
        return True

    def track(self, old: socket.socket, new: socket.socket) -> None:
        """Follow a connection whose socket was replaced (wrapped in TLS)."""
        with self._conns_lock:
            self._conns.discard(old)
            self._conns.add(new)

    def forget(self, *socks: socket.socket) -> None:
        """Drop a finished connection from the bookkeeping."""
        with self._conns_changed:
            for sock in socks:
                self._conns.discard(sock)
            self._conns_changed.notify_all()

    def close_all(self) -> None:
        """Shut every open connection down, waking handlers blocked in recv."""
        with self._conns_lock:
            socks = list(self._conns)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        log.exception("unexpected error with %s", client_address)


class Handler(socketserver.BaseRequestHandler):
    """Serves one worker connection: handshake, HELLO, then one message at a time.

    Each message type has a method named after it (``handle_get_job``...).
    Whatever a peer does wrong ends in one WARNING line with its address and
    a closed connection; the leases it held go back to the queue.
    """

    server: JobServer
    local_read = False   # the worker reads the input itself (its last GET_JOB said so)

    def setup(self):
        self.peer = "%s:%s" % self.client_address[:2]
        self.conn = id(self.request)
        self.worker_id = None
        self.sock = self.request

    def handle(self):
        srv = self.server
        try:
            self.sock.settimeout(srv.io_timeout)
            # Nagle's algorithm holds a small write back while an earlier one
            # is unacknowledged, and the worker delays its TCP ACK by up to
            # 40 ms: an ACK frame followed by NO_JOB or WAIT waited that long.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if srv.tls is not None:
                self.sock = srv.tls.wrap_socket(self.sock, server_side=True)
                srv.track(self.request, self.sock)  # wrapping detached the plain socket
            # The timeout bounds the whole handshake, not each recv: see
            # protocol._recv_handshake_frame.  (TLS bounds its own the same way.)
            protocol.server_handshake(self.sock, srv.secret, srv.io_timeout)
            hello = self.receive()
            if hello["type"] != protocol.HELLO:
                raise protocol.ProtocolError(f"expected HELLO, got {hello['type']}")
            self.handle_hello(hello)
            self.sock.settimeout(srv.idle_timeout)
            while True:
                message = self.receive()
                method = self.dispatch.get(message["type"])
                if method is None:
                    raise protocol.ProtocolError(f"unexpected {message['type']} message")
                method(self, message)
        except protocol.ConnectionClosed:
            log.debug("%s (%s) disconnected", self.peer, self.worker_id)
        except protocol.ProtocolError as exc:
            log.warning("dropping %s (%s): %s", self.peer, self.worker_id or "no HELLO", exc)
            self.try_send(protocol.make(protocol.ERROR, reason=str(exc)[:200]))
        except (InputError, StoreError) as exc:
            # Not this peer's doing: the input file or the results database
            # broke under the job.  Retrying would fail the same way, forever.
            if not srv.stop.is_set():   # said once, not by every handler that meets it
                log.error("stopping the job: %s", exc)
            srv.fail_job(str(exc))
        except (OSError, ssl.SSLError) as exc:  # includes TimeoutError
            log.warning("dropping %s (%s): %s: %s", self.peer, self.worker_id or "no HELLO",
                        type(exc).__name__, exc)
        except MemoryError:
            srv.fail_job(f"out of memory while serving {self.worker_id or self.peer}; "
                         f"try more --chunks, or --stream")
        except Exception:
            log.exception("dropping %s (%s): unexpected error", self.peer, self.worker_id)
        finally:
            for lease in srv.book.release(self.conn):
                log.info("chunk %d back in the queue: %s's connection closed (attempt %d)",
                         lease.chunk_id, lease.worker_id, lease.attempt_id)
                try:
                    srv.store.end_attempt(srv.job_id, lease.attempt_id, Outcome.DROPPED)
                except OSError as exc:  # StoreError: the history misses one line, no result is lost
                    log.warning("cannot record the end of attempt %d: %s", lease.attempt_id, exc)

    def finish(self):
        self.server.forget(self.request, self.sock)
        if self.sock is not self.request:
            self.sock.close()

    def receive(self) -> dict:
        return protocol.recv_message(self.sock, self.server.max_frame, self.server.io_timeout)

    def send(self, message: dict) -> None:
        self.send_frame(protocol.encode(message))

    def send_frame(self, payload: bytes) -> None:
        protocol.send_frame(self.sock, payload)
        self.server.timings.sent(protocol.HEADER.size + len(payload))

    def send_frames(self, *payloads: bytes) -> None:
        """Send a frame per payload, in order, with one write if they are small."""
        protocol.send_frames(self.sock, payloads)
        self.server.timings.sent(sum(protocol.HEADER.size + len(p) for p in payloads))

    def try_send(self, message: dict) -> None:
        try:
            self.send(message)
        except (OSError, ValueError):
            pass

    # --- one method per message type ----------------------------------------

    def handle_hello(self, msg: dict) -> None:
        worker_id = protocol.check(msg)["worker_id"]
        # Printable only: the id is printed in the final table and logged, and
        # a newline or an escape sequence in it could forge those lines.
        if not (0 < len(worker_id) <= 200 and worker_id.isprintable()):
            raise protocol.ProtocolError("HELLO needs a worker_id of 1-200 printable characters")
        self.worker_id = worker_id
        self.server.hello(worker_id)
        log.info("worker %s connected from %s", worker_id, self.peer)
        chunks = self.server.chunks
        local = chunks.local_source() if isinstance(chunks, StreamChunks) else {}
        self.send(protocol.make(protocol.WELCOME, job_id=self.server.job_id,
                                max_frame=self.server.max_frame, chunks=len(self.server.book),
                                lease_timeout=self.server.book.lease_timeout, **local))

    def handle_get_job(self, msg: dict) -> None:
        srv = self.server
        local = protocol.check(msg).get("local_read", False) and isinstance(srv.chunks,
                                                                           StreamChunks)
        if local != self.local_read:
            log.info("worker %s %s", self.worker_id, "reads the chunks from its own copy of the "
                     "input" if local else "gets the chunks' bytes")
            self.local_read = local
        held = srv.book.held_by(self.conn)
        if held is not None:
            # A worker computes one chunk at a time; a peer that asks again
            # before reporting would hoard chunks and starve the others.
            raise protocol.ProtocolError(f"GET_JOB while holding chunk {held}")
        lease = self.lease()
        if lease is None and not srv.book.finished.is_set():
            # Nothing pending, yet not finished: usually the last chunks are
            # being computed.  Hold the request up to wait_interval before
            # answering WAIT, so that the end of the job reaches this worker
            # at once (NO_JOB) instead of after its retry_after sleep.
            srv.book.finished.wait(srv.wait_interval)
            lease = self.lease()
        frame = None if lease is None else self.job_frame(lease)
        if frame is None:
            self.send_no_job()
            return
        started = time.perf_counter()
        srv.store.record_lease(srv.job_id, lease.attempt_id, lease.chunk_id,
                               self.worker_id, time.time())
        srv.timings.add("db", time.perf_counter() - started)
        self.send_job(lease, frame)

    def job_frame(self, lease: Lease) -> bytes | None:
        """The encoded JOB of a fresh ``lease`` of this connection.

        The caller records the lease in the store, then sends the frame
        (:meth:`send_job`).  Returns None if the JOB cannot be built: the
        attempt then ends here, lost, or the chunk refused when its frame
        would exceed the workers' limit.  Raises :class:`InputError` if the
        input changed under the job.  Used by GET_JOB and by a RESULT that
        asks for its ``next`` chunk.
        """
        srv = self.server
        srv.progress.begin()
        started = time.perf_counter()
        chunk_id, chunks = lease.chunk_id, srv.chunks
        try:
            data, span = ((chunks.header, chunks.span(chunk_id)) if self.local_read
                          else (chunks.payload(chunk_id), None))
            frame = protocol.encode(job_message(srv.info, chunks, srv.job_id, chunk_id,
                                                lease.attempt_id, data, span))
        except InputError:
            raise   # the file changed under the job: handle() stops it
        except Exception as exc:
            # Not the worker's fault (above all a MemoryError for a large
            # chunk): a lost attempt, so that --max-lost bounds the retries.
            reason = f"the server could not build its JOB ({type(exc).__name__}: {exc})"
            log.warning("chunk %d: %s", lease.chunk_id, reason)
            srv.book.lose(lease.attempt_id, reason)
            return None
        srv.timings.add("serialize", time.perf_counter() - started)
        if len(frame) > protocol.WORKER_MAX_FRAME:
            # A worker would refuse it unread and hang up, every time.
            srv.book.refuse(lease.chunk_id, lease.attempt_id, (
                f"its JOB frame is {len(frame)} bytes, over the workers' limit of "
                f"{protocol.WORKER_MAX_FRAME}; use more --chunks"))
            return None
        return frame

    def send_job(self, lease: Lease, frame: bytes, before: bytes = b"") -> None:
        """Send a JOB ``frame`` whose lease is committed, after the encoded
        message ``before`` (an ACK) if given, in one write."""
        srv = self.server
        log.debug("chunk %d leased to %s (attempt %d)", lease.chunk_id, self.worker_id, lease.attempt_id)
        started = time.perf_counter()
        if before:
            self.send_frames(before, frame)
        else:
            self.send_frame(frame)
        # Handing the frame to the kernel; a worker slow to read makes this
        # grow once the socket buffers are full.
        srv.timings.add("send", time.perf_counter() - started)

    def lease(self, besides: int | None = None):
        """:meth:`ChunkBook.lease` for this worker, or None once the job is stopping
        (a signal, or a reason no worker can fix): a chunk leased then would only
        be lost when the server goes, and counted against its --max-lost."""
        if self.server.stop.is_set():
            return None
        return self.server.book.lease(self.worker_id, self.conn, besides)

    def send_no_job(self) -> None:
        """Answer a GET_JOB that gets no chunk: NO_JOB if the job is over, else WAIT."""
        srv = self.server
        if srv.book.finished.is_set():
            self.send(protocol.make(protocol.NO_JOB))
            srv.told_done(self.worker_id)
        else:
            self.send(protocol.make(protocol.WAIT, retry_after=srv.wait_interval))

    def handle_result(self, msg: dict) -> None:
        srv = self.server
        chunk_id, attempt_id = self.check_ids(msg)
        fields = ("rows_processed", "rejected_rows", "total_sales", "min_price",
                  "max_price", "avg_price", "price_count")
        values = [msg.get(f) for f in fields]
        try:
            protocol.check(msg)
            check_stats(f"chunk {chunk_id}", *values)
            fewest, most = srv.chunks.row_bounds(chunk_id)
            if not fewest <= msg["rows_processed"] <= most:
                expected = fewest if fewest == most else f"{fewest}..{most}"
                raise protocol.ProtocolError(
                    f"chunk {chunk_id} has {expected} rows, result says {msg['rows_processed']}")
            groups = self.check_groups(msg, chunk_id)
        except protocol.ProtocolError as exc:
            # An invalid result for a real lease is a failed attempt: if the
            # worker computes it the same way every time, --max-attempts
            # ends the job with this message instead of retrying for ever.
            self.fail_attempt(chunk_id, attempt_id, f"invalid RESULT: {exc}")
            raise
        wants_next = msg.get("next", False)
        other = srv.book.held_by(self.conn, besides=attempt_id) if wants_next else None
        if other is not None:   # hoarding, as GET_JOB while holding a chunk
            raise protocol.ProtocolError(f"RESULT asks for the next chunk while holding chunk {other}")
        # The next chunk is leased now but committed with this result, in one
        # transaction, and sent only after it: the ACK never precedes its
        # commit, nor the JOB its attempt row (which a restarted server needs
        # to accept that JOB's result).  See README, "The life of one chunk".
        lease = self.lease(besides=chunk_id) if wants_next else None
        frame = None if lease is None else self.job_frame(lease)
        started = time.perf_counter()
        counted = srv.store.record_result(
            srv.job_id, dict(zip(fields, values), worker_id=self.worker_id,
                             chunk_id=chunk_id, attempt_id=attempt_id), groups,
            lease=None if frame is None else (lease.attempt_id, lease.chunk_id,
                                              self.worker_id, time.time()))
        srv.timings.add("db", time.perf_counter() - started)
        srv.book.complete(chunk_id, attempt_id)
        srv.chunks.forget(chunk_id)
        if counted:
            srv.progress.chunk_done(msg["rows_processed"], srv.book,
                                    this_run=attempt_id >= srv.book.first_attempt_id)
        else:
            log.info("duplicate result for chunk %d from %s (attempt %d): recorded, not counted",
                     chunk_id, self.worker_id, attempt_id)
        ack = protocol.encode(protocol.make(protocol.ACK, chunk_id=chunk_id, counted=counted,
                                            **({"next": True} if wants_next else {})))
        if frame is not None:
            self.send_job(lease, frame, before=ack)   # ACK, then the JOB: one write
            return
        self.send_frame(ack)
        if wants_next:
            # No chunk was pending (or its JOB could not be built): answer as
            # GET_JOB does, which may hold the answer a moment (so the ACK
            # went first) and lease a chunk that turned up meanwhile; as a
            # GET_JOB that repeats the worker's last word on local reads.
            self.handle_get_job(protocol.make(protocol.GET_JOB, local_read=self.local_read))

    def handle_failed(self, msg: dict) -> None:
        chunk_id, attempt_id = self.check_ids(msg)
        error = msg.get("error")
        error = error[:500] if isinstance(error, str) else f"(no message: {_brief(error)})"
        log.warning("chunk %d attempt %d failed on %s: %s", chunk_id, attempt_id,
                    self.worker_id, error)
        self.fail_attempt(chunk_id, attempt_id, error)
        self.send(protocol.make(protocol.ACK, chunk_id=chunk_id, counted=False))

    def fail_attempt(self, chunk_id: int, attempt_id: int, error: str) -> None:
        """Record a failed attempt; the chunk FAILS after --max-attempts of them
        (the book logs that)."""
        srv = self.server
        srv.store.end_attempt(srv.job_id, attempt_id, Outcome.FAILED, error)
        if srv.book.fail(chunk_id, attempt_id, error):
            srv.chunks.forget(chunk_id)

    dispatch = {protocol.GET_JOB: handle_get_job, protocol.RESULT: handle_result,
                protocol.FAILED: handle_failed}

    # --- validation ------------------------------------------------------------

    def check_ids(self, msg: dict) -> tuple[int, int]:
        """The message's (chunk_id, attempt_id), if they belong to this job.

        Checks only the four id fields against the schema: a FAILED report's
        ``error`` is recorded even when it is not text (see handle_failed),
        and a RESULT's other fields are checked once the attempt is known,
        so that a bad one fails that attempt.
        """
        srv = self.server
        protocol.check(msg, ("job_id", "worker_id", "chunk_id", "attempt_id"))
        chunk_id, attempt_id = msg["chunk_id"], msg["attempt_id"]
        if msg["job_id"] != srv.job_id:
            raise protocol.ProtocolError(f"result of another job ({_brief(msg['job_id'])})")
        if msg["worker_id"] != self.worker_id:
            raise protocol.ProtocolError("worker_id differs from the one in HELLO")
        if not (_is_int(chunk_id) and 0 <= chunk_id < len(srv.book)):
            raise protocol.ProtocolError(f"unknown chunk {_brief(chunk_id)}")
        if not (_is_int(attempt_id) and srv.book.is_attempt_of(attempt_id, chunk_id, self.worker_id)):
            raise protocol.ProtocolError(
                f"unknown attempt {_brief(attempt_id)} for chunk {chunk_id}")
        return chunk_id, attempt_id

    def check_groups(self, msg: dict, chunk_id: int) -> list[tuple]:
        """Validate the per-group rows of a RESULT; they must add up to its rows.

        Their shape and types were checked with the rest of the message
        (``protocol.GROUP_ROW``); what is left is what the schema cannot say.
        """
        groups = msg.get("groups", [])
        if self.server.info.group_col is None:
            if groups:
                raise protocol.ProtocolError("groups sent but no --group-by is set")
            return []
        seen = set()
        for group in groups:
            key = group[0]
            if key in seen:
                raise protocol.ProtocolError("group values must be distinct strings or None")
            seen.add(key)
            check_stats(f"chunk {chunk_id} group {key!r}", *group[1:])
            if group[1] == 0:
                raise protocol.ProtocolError(f"chunk {chunk_id}: group {key!r} has no rows")
        _check_group_totals(msg, groups, chunk_id)
        return [tuple(g) for g in groups]


def _check_group_totals(msg: dict, groups: list, chunk_id: int) -> None:
    """The groups of a RESULT must add up to the chunk: rows, rejected rows and
    valid prices exactly, sales to rounding (the groups are summed in another
    order), and the chunk's min and max price are a group's.  Raises
    ProtocolError naming what does not add up."""
    counts = [("rows_processed", 1), ("rejected_rows", 2), ("price_count", 7)]
    for name, at in counts:
        if sum(g[at] for g in groups) != msg[name]:
            raise protocol.ProtocolError(f"chunk {chunk_id}: group {name} do not add up")
    sales = [g[3] for g in groups]
    slack = 1e-9 * max(math.fsum(abs(s) for s in sales), abs(msg["total_sales"]), 1.0)
    if abs(math.fsum(sales) - msg["total_sales"]) > slack:
        raise protocol.ProtocolError(f"chunk {chunk_id}: group total_sales do not add up")
    lows = [g[4] for g in groups if g[4] is not None]
    highs = [g[5] for g in groups if g[5] is not None]
    if (min(lows, default=None), max(highs, default=None)) != (msg["min_price"], msg["max_price"]):
        raise protocol.ProtocolError(f"chunk {chunk_id}: group prices do not match the chunk's")


# --- The lesson, part 3: progress, the main loop and the final report ----------

class Progress:
    """Logs done/total, rows per second and an ETA, at most once a second.

    ``total`` chunks, of which ``resumed`` were done by an earlier run.
    Rates count only chunks leased *in this run*, from this run's first
    lease (:meth:`begin`), not from start-up: a server may wait a long time
    for its first worker, and a result re-sent for an earlier run's attempt
    (which can arrive before this run leased anything) took no time here.
    Until a chunk of this run is done, no rate or ETA is shown.
    """

    def __init__(self, total: int, resumed: int = 0):
        self.total, self.resumed = total, resumed
        self.rows = self.done = 0   # rows and chunks leased and counted in this run
        self.late = 0               # counted results of an earlier run's attempts
        self.started = None
        self._last = 0.0
        self._lock = threading.Lock()

    def begin(self) -> None:
        """The first chunk of this run went out: start the clock (idempotent)."""
        with self._lock:
            if self.started is None:
                self.started = time.monotonic()

    def chunk_done(self, rows: int, book: ChunkBook, this_run: bool = True) -> None:
        """Count one newly counted chunk of ``rows`` rows, and maybe log.

        ``this_run``: its attempt was leased by this run (else it is a result
        of an earlier run's attempt, re-sent after a restart).
        """
        with self._lock:
            if this_run:
                self.rows += rows
                self.done += 1
            else:
                self.late += 1
            now = time.monotonic()
            # Counting chunk states is linear in the chunks: do it only for
            # a line that is logged, not for every result.
            if now - self._last < 1.0 and not book.finished.is_set():
                return
            left = book.counts()
            left = left[ChunkState.PENDING] + left[ChunkState.LEASED]
            self._last = now
            # Told apart: the "resuming, N of M" line counts only the first.
            earlier = (f", {self.resumed} stored before this run" if self.resumed else "") + (
                f", {self.late} re-sent from its attempts" if self.late else "")
            line = "progress: %d/%d chunks done (%.0f%%%s), %d rows in this run" % (
                self.total - left, self.total, 100.0 * (self.total - left) / max(self.total, 1),
                earlier, self.rows)
            if self.done and self.started is not None:
                elapsed = now - self.started
                if elapsed > 0:
                    line += ", %.0f rows/s, ETA %.1f s" % (self.rows / elapsed,
                                                          elapsed / self.done * left)
            log.info("%s", line)


def run(args: argparse.Namespace) -> int:
    """Run one job from the parsed command line; return the exit code.

    Raises :class:`InputError` for problems found before listening.
    """
    secret = (args.secret if args.secret is not None else os.environ.get(SECRET_ENV, "")).encode()
    tls = _tls_context(args)
    if not secret and not _is_loopback(args.host):
        log.warning("listening on %s without --secret: anyone who can reach this port can "
                    "send pickles; unauthenticated pickle is unsafe on a network", args.host)
    if args.idle_timeout < args.lease_timeout:
        # A worker is silent while it computes: the idle timeout drops it
        # first, and its lease is lost, not expired.
        log.warning("--idle-timeout %g s is below --lease-timeout %g s: a worker that computes "
                    "a chunk for longer is dropped and its attempt lost", args.idle_timeout,
                    args.lease_timeout)
    if not args.stream:
        keep_freed_memory()   # the documented mode parses piece after piece
    started = time.perf_counter()
    info = inspect_csv(args.csv, args.sep, args.decimal, args.encoding,
                       args.price_col, args.qty_col, args.group_by)
    fingerprint = file_fingerprint(info.path)
    inspected = time.perf_counter()
    # The documented mode parses: pandas' 0.3 s import runs while the scan
    # below cuts the file, which mostly waits for reads without the GIL.
    import_failed = []
    importing = None if args.stream else threading.Thread(
        target=_import_pandas, args=(import_failed,), name="import-pandas")
    if importing is not None:
        importing.start()
    chunks = store = None
    try:
        chunks = (StreamChunks(info, args.chunks, args.compress) if args.stream
                  else FrameChunks(info, args.chunks, args.chunk_rows, args.compress))
        # The identity must describe the bytes that were chunked: a file
        # replaced while it was cut would give a resumed job two contents.
        if file_fingerprint(info.path) != fingerprint:
            raise InputError(f"{info.path}: the file changed while it was read; run again")
        # "split": the scan that cuts the input into chunks (after a pass that
        # measures compressed text).  "inspect" is the head check.
        loaded = {"inspect": inspected - started, "split": time.perf_counter() - inspected}
        job_id, identity = job_identity(info, args, fingerprint)
        store = ResultStore(args.db, retry_for=args.db_retry_for)
        state = store.open_job(job_id, info.path, identity, len(chunks), fresh=args.fresh)
        if state.done:
            log.info("job %s: resuming, %d of %d chunks already done", job_id,
                     len(state.done), len(chunks))
        book = ChunkBook(len(chunks), args.lease_timeout, args.max_attempts, state.done,
                         state.attempts, state.next_attempt_id, max_lost=args.max_lost)
        try:
            server = JobServer((args.host, args.port), chunks, book, store, job_id, info,
                               secret=secret, tls=tls, max_frame=args.max_frame,
                               io_timeout=args.io_timeout, idle_timeout=args.idle_timeout,
                               max_connections=args.max_connections)
        except OSError as exc:
            raise InputError(f"cannot listen on {args.host}:{args.port}: "
                             f"{exc.strerror or exc}") from None
        for phase, spent in loaded.items():
            server.timings.add(phase, spent)
        if importing is not None:
            importing.join()   # costs nothing: the parse would wait for the import anyway
            if import_failed:
                raise import_failed[0]
        # The documented mode's producer starts parsing now ("parse" phase).
        chunks.start(state.done, server.fail_job, server.timings)
        return serve(server, args)
    finally:
        if importing is not None:
            importing.join()   # an import cut short by the exit would print a traceback
        if chunks is not None:
            chunks.close()
        if store is not None:
            store.close()


def _import_pandas(failed: list) -> None:
    try:
        import_pandas()
    except ImportError as exc:
        failed.append(exc)   # raised by run() before the parse starts


def serve(server: JobServer, args: argparse.Namespace) -> int:
    """Accept workers until the job ends or a signal arrives; report; return the exit code."""
    book, stop, signals = server.book, server.stop, []
    _announce(server, args)

    def on_signal(signum, frame):
        signals.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    # The poll interval is how long shutdown() below waits for the accept
    # loop to notice: on the critical path of every job's end.
    accept = threading.Thread(target=server.serve_forever, args=(0.01,), name="accept")
    accept.start()
    started = time.perf_counter()
    try:
        while not book.finished.is_set() and not stop.is_set():
            book.finished.wait(min(0.5, book.lease_timeout / 4))
            _expire_leases(server)
        waited = time.perf_counter()
        server.timings.add("wait", waited - started)
        # Decided now: leases dropped by the shutdown below must not turn an
        # interrupted job into a finished one.
        completed = book.finished.is_set() and server.fatal is None
        if completed:
            # Let the workers ask once more and hear NO_JOB, so they exit 0
            # instead of reconnecting to a server that is gone.  That includes
            # workers of an earlier run that are still backing off before
            # they reconnect: a resumed job may finish before they are back.
            server.wait_for_workers(args.linger)
            server.timings.add("linger", time.perf_counter() - waited)
    finally:
        server.shutdown()
        server.close_all()
        server.chunks.close()   # wakes handlers waiting for a chunk to be parsed
        accept.join()
        server.server_close()   # joins the handler threads
    if server.fatal is not None:
        done = book.counts()[ChunkState.DONE]
        print(f"server.py: error: job {server.job_id} stopped: {server.fatal}; {done} "
              f"of {len(book)} chunks are safely stored", file=sys.stderr)
        return EXIT_FAILED
    if not completed:
        log.warning("interrupted by signal %d: %d of %d chunks done; run the same command "
                    "again to resume", signals[0], book.counts()[ChunkState.DONE], len(book))
        return 128 + signals[0]
    return report(server)


def _announce(server: JobServer, args: argparse.Namespace) -> None:
    """Write ``--port-file`` (atomically: a reader never sees half a number) and
    log what the job is and where it listens."""
    host, port = server.server_address[:2]
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(f"{port}\n")
        os.replace(args.port_file + ".tmp", args.port_file)
    log.info("job %s: %d chunks (%s mode, columns %r x %r), listening on %s:%d",
             server.job_id, len(server.book), server.chunks.format, server.info.price_col,
             server.info.qty_col, host, port)
    for note in server.info.notes:
        log.info("%s", note)


def _expire_leases(server: JobServer) -> None:
    """Put the chunks of expired leases back in the queue (at-least-once
    delivery) and record each attempt as expired."""
    for lease in server.book.expire():
        log.warning("lease of chunk %d expired (%s, attempt %d); back in the queue",
                    lease.chunk_id, lease.worker_id, lease.attempt_id)
        try:
            server.store.end_attempt(server.job_id, lease.attempt_id, Outcome.EXPIRED)
        except StoreError as exc:
            server.fail_job(str(exc))


def report(server: JobServer) -> int:
    """Print the final aggregate (or the failed chunks); return the exit code."""
    book, store, job_id = server.book, server.store, server.job_id
    failed = book.failed_chunks()
    if failed:
        chunk_id, why = min(failed.items())
        print(f"server.py: error: job {job_id} failed: {len(failed)} of {len(book)} chunk(s) "
              f"failed, e.g. chunk {chunk_id}: {why}", file=sys.stderr)
        return EXIT_FAILED
    started = time.perf_counter()
    workers = store.per_worker(job_id)
    stored = sum(row["chunks"] for row in workers)
    if stored != len(book):
        # The book says every chunk is done, the database does not hold them
        # all: their results were deleted under the job (a second server with
        # --fresh on it).  An aggregate of what is left would be short.
        print(f"server.py: error: job {job_id} failed: the results database holds {stored} of "
              f"{len(book)} chunks' results at the end; were they deleted under the job (another "
              f"server with --fresh)? Run the same command to compute what is missing",
              file=sys.stderr)
        return EXIT_FAILED
    try:
        final = store.final_aggregate(job_id)
        groups = store.group_aggregate(job_id) if server.info.group_col else []
    except AggregateOverflow as exc:
        # Every chunk's totals were finite, their sum is not: the same
        # error as with one chunk, whatever the chunking.
        print(f"server.py: error: job {job_id} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    keys = ("total_rows", "total_sales", "min_price", "max_price", "avg_price", "rejected_rows")
    print({key: final[key] for key in keys})
    print(f"{'worker':<24} {'chunks':>8} {'rows':>12}")
    for row in workers:
        print(f"{row['worker_id']:<24} {row['chunks']:>8} {row['rows']:>12}")
    if server.info.group_col:
        print_groups(server.info.group_col, groups)
    server.timings.add("aggregate", time.perf_counter() - started)
    sys.stdout.flush()
    phases = ", ".join(f"{name} {sec:.2f} s" for name, sec in server.timings.seconds.items())
    log.info("job %s done: %d dispatches for %d chunks; time per phase: %s; sent %d bytes",
             job_id, book.dispatches, len(book), phases, server.timings.bytes_sent)
    return EXIT_OK


def print_groups(column: str, groups: list[dict]) -> None:
    """Print the ``--group-by`` table, largest total sales first."""
    def fmt(value):
        return "-" if value is None else f"{value:.2f}"
    print(f"\n{column:<32} {'rows':>10} {'rejected':>9} {'total_sales':>18} "
          f"{'min_price':>10} {'max_price':>10} {'avg_price':>10}")
    for g in groups:
        name = "(missing)" if g["group_value"] is None else g["group_value"]
        print(f"{name[:32]:<32} {g['total_rows']:>10} {g['rejected_rows']:>9} "
              f"{g['total_sales']:>18.2f} {fmt(g['min_price']):>10} {fmt(g['max_price']):>10} "
              f"{fmt(g['avg_price']):>10}")


# ==============================================================================
# The armour.  Everything below protects the lesson above from its input and
# its users: it inspects the CSV and fails early with one line, cuts the file
# into chunks of whole records (both modes), checks what workers send, and
# parses the command line.  Read it when a test in tests/test_csv_*.py or
# tests/test_hostile.py makes you curious; the lesson does not need it.
# ==============================================================================
# --- Checking what workers send -------------------------------------------------

# A Python int is unbounded; SQLite's INTEGER is 64-bit.  A larger one would
# make the insert raise OverflowError, and math.isfinite(10**400) and
# repr(10**5000) raise too: all crashes instead of a clean refusal.
_INT_RANGE = range(-2**63, 2**63)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in _INT_RANGE


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, float) and math.isfinite(value)


def _brief(value) -> str:
    """A short rendering of an untrusted value for a log line or an ERROR reply."""
    if isinstance(value, str):
        return repr(value[:40])
    if value is None or isinstance(value, float) or _is_int(value):
        return repr(value)
    return f"a {type(value).__name__}"


def check_stats(where: str, rows, rejected, sales, low, high, mean, count) -> None:
    """Check one set of partial metrics; raise ProtocolError naming ``where``.

    Rules: counts are non-negative 64-bit ints with ``rejected <= rows`` and
    ``count == rows - rejected``; sales is a finite number; with
    ``count == 0`` the price statistics are None, otherwise finite with
    ``min <= mean <= max`` (within rounding).
    """
    if not (_is_int(rows) and _is_int(rejected) and _is_int(count)):
        raise protocol.ProtocolError(f"{where}: row counts must be 64-bit integers")
    if rows < 0 or rejected < 0 or rejected > rows or count != rows - rejected:
        raise protocol.ProtocolError(f"{where}: inconsistent row counts")
    if not _is_number(sales):
        raise protocol.ProtocolError(f"{where}: total_sales must be a finite number")
    prices = (low, high, mean)
    if count == 0:
        if any(p is not None for p in prices):
            raise protocol.ProtocolError(f"{where}: price statistics without valid rows")
        return
    if not all(_is_number(p) for p in prices):
        raise protocol.ProtocolError(f"{where}: price statistics must be finite numbers")
    slack = 1e-9 * max(abs(low), abs(high), 1.0)
    if not (low <= high and low - slack <= mean <= high + slack):
        raise protocol.ProtocolError(f"{where}: need min_price <= avg_price <= max_price")


# --- Reading the input ---------------------------------------------------------

_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zip": "zip", ".xz": "xz"}


_SEPARATORS = (",", ";", "\t", "|")


# --sep as typed in a shell: '\t' arrives as a backslash and a "t".
_SEP_NAMES = {"\\t": "\t", "tab": "\t", "TAB": "\t"}


_HEAD_BYTES = 256 * 1024


# First bytes of files that are plainly not CSV text, and what to tell the user.
_MAGIC = {
    b"\x1f\x8b": "gzip-compressed data; name the file .gz",
    b"BZh": "bzip2-compressed data; name the file .bz2",
    b"\xfd7zXZ\x00": "xz-compressed data; name the file .xz",
    b"PK\x03\x04": "a zip archive or an .xlsx workbook; export it as CSV, or name a zip .zip",
    b"\xd0\xcf\x11\xe0": "an .xls workbook; export it as CSV",
    b"%PDF-": "a PDF document",
    b"PAR1": "a Parquet file",
    b"\x89PNG": "a PNG image",
}


@dataclass
class CsvInfo:
    """What :func:`inspect_csv` learned from the head of the file.

    ``columns``: header names as pandas reads them.  ``price_col``,
    ``qty_col``, ``group_col``: the chosen names.  ``sep``, ``decimal``
    (None: no mark shown yet, see :func:`_guess_decimal`), ``encoding``:
    how to parse it.  ``compression``: None or a pandas compression name.
    ``size``: bytes on disk.  ``notes``: what the log should say about these
    choices once the server listens (an early error stays one line).
    """
    path: str
    columns: list
    price_col: str
    qty_col: str
    group_col: str | None
    sep: str
    decimal: str
    encoding: str
    compression: str | None
    size: int
    notes: list = field(default_factory=list)


# What reading a damaged or unusual compressed file raises, by module: gzip
# (BadGzipFile, an OSError; EOFError when cut short; zlib.error for corrupt
# deflate data), bz2 (OSError), lzma (LZMAError), zipfile (BadZipFile; zlib.error;
# NotImplementedError for a method it lacks, such as the Deflate64 that Windows
# writes for large files; RuntimeError, at open, for an encrypted entry).
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile,
                NotImplementedError)


def _open_decompressed(path: str, compression: str | None) -> io.BufferedReader:
    """Open ``path`` as a stream of (decompressed) bytes; its read errors are InputErrors.

    ``compression`` is None or a key of :data:`_COMPRESSION`'s values.  Any
    error of :data:`_READ_ERRORS`, here or later while reading, becomes an
    :class:`InputError` naming the file, so a damaged archive found deep in
    the file still ends with one line and exit 2 (exit 1 mid-job).
    """
    what = f"{compression} data" if compression else "the file"
    try:
        if compression == "zip":
            archive = zipfile.ZipFile(path)
            names = [n for n in archive.namelist() if not n.endswith("/")]
            if len(names) != 1:
                archive.close()
                raise InputError(f"{path}: a .zip input must hold exactly one file, "
                                 f"found {len(names)}")
            try:
                raw = archive.open(names[0])
            except NotImplementedError as exc:   # a subclass of RuntimeError: test it first
                archive.close()
                raise InputError(f"{path}: cannot read {names[0]!r}: {exc} (Deflate64, as "
                                 f"Windows writes for large files?); extract it with another "
                                 f"tool and pass the .csv") from None
            except RuntimeError as exc:       # "File ... is encrypted, password required"
                archive.close()
                raise InputError(f"{path}: cannot read {names[0]!r}: {exc}; extract it "
                                 f"with its password and pass the .csv") from None
            except BaseException:
                archive.close()
                raise
            closing = (raw, archive)
        else:
            opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}.get(compression, open)
            raw = opener(path, "rb")
            closing = (raw,)
    except _READ_ERRORS as exc:
        hint = "; extract it with another tool and pass the .csv" \
            if isinstance(exc, NotImplementedError) else ""
        raise InputError(f"{path}: cannot read {what}: {exc}{hint}") from None
    return io.BufferedReader(_Guarded(raw, closing, f"{path}: cannot read {what}"), 1 << 20)


class _Guarded(io.RawIOBase):
    """A read-only stream over ``raw`` whose read errors become InputError(``prefix: ...``)."""

    def __init__(self, raw, closing, prefix: str):
        self.raw, self.closing, self.prefix = raw, closing, prefix

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            return self.raw.readinto(buffer)
        except _READ_ERRORS as exc:
            hint = "; extract it with another tool and pass the .csv" \
                if isinstance(exc, NotImplementedError) else ""
            raise InputError(f"{self.prefix}: {exc}{hint}") from None

    # Seeking lets read_columns read a stream twice (numbers, then text).
    def seekable(self) -> bool:
        return self.raw.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            return self.raw.seek(offset, whence)
        except _READ_ERRORS as exc:
            raise InputError(f"{self.prefix}: {exc}") from None

    def tell(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        if not self.closed:
            for item in self.closing:
                item.close()
        super().close()


def _text_encoding(path: str, encoding: str | None) -> str:
    """``encoding`` checked to be a text encoding Python knows (default: UTF-8, BOM or not).

    ``str.encode`` refuses the codecs that are not character encodings
    (rot13, base64, hex, zlib...); given to pandas, they would hand it
    bytes, or scrambled text.  Raises :class:`InputError` naming ``path``.
    """
    if encoding is None:
        return "utf-8-sig"
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise InputError(f"{path}: unknown --encoding {encoding!r}") from None
    try:
        "Price,Qty".encode(encoding)
    except (LookupError, UnicodeError):
        raise InputError(f"{path}: --encoding {encoding!r} is not a text encoding (it "
                         f"transforms bytes or text); name a character set such as utf-8, "
                         f"cp1252 or utf-16") from None
    return encoding


def inspect_csv(path: str, sep: str | None = None, decimal: str | None = None,
                encoding: str | None = None, price_col: str | None = None,
                qty_col: str | None = None, group_col: str | None = None) -> CsvInfo:
    """Check the input before anything listens, and learn how to parse it.

    Reads the head of the file (decompressed): the first 256 KiB, or more
    if need be to hold the whole header (up to :data:`_MAX_HEADER`) and at
    least 128 KiB of records, cut at the last complete record.  Detects the separator (the most frequent of
    ``, ; TAB |`` in the header line) and the decimal mark (see
    :func:`_guess_decimal`) unless given.  Raises :class:`InputError` with
    a one-line message for: a missing or empty file, a Git LFS pointer,
    binary data (naming the format when its first bytes tell), damaged or
    unreadable compressed data, an unknown or non-text ``encoding``, text
    that is not in the expected encoding, a header longer than
    :data:`_MAX_HEADER`, a record in the head with more fields than the
    header (see :func:`_read_sample`), a decimal mark that the sample
    contradicts or leaves undecided, and a missing or ambiguous price or
    quantity column (the message lists the columns found and the accepted
    names).
    """
    sep = _check_sep(sep)
    given_encoding = encoding is not None
    encoding = _text_encoding(path, encoding)
    if not os.path.isfile(path):
        raise InputError(f"{path}: " + ("a folder, not a file" if os.path.isdir(path)
                                          else "no such file"))
    size = os.path.getsize(path)
    if size == 0:
        raise InputError(f"{path}: input CSV is empty (0 bytes, no header)")
    compression = _COMPRESSION.get(os.path.splitext(path)[1].lower())
    with _open_decompressed(path, compression) as f:
        text, sep = _read_head(path, f, encoding, given_encoding, sep)
    try:
        header, records = _read_sample(text, sep)
    except _ExtraFields as exc:
        raise InputError(f"{path}: malformed CSV: {exc}") from None
    columns = _pandas_names(path, text, sep, header)
    _check_repeated_names(path, header, price_col, qty_col)
    try:
        price_col, qty_col = find_columns(columns, price_col, qty_col)
    except ColumnError as exc:
        raise InputError(f"{path}: {exc}") from None
    if group_col is not None and group_col not in columns:
        raise InputError(f"{path}: --group-by {group_col!r} is not a column; columns found: "
                         f"{show_names(columns)}")
    if group_col in (price_col, qty_col):
        # A column read as numbers and as group labels at once: the reader
        # keeps one reading of it, so one of the two roles would be lost.
        role = "price" if group_col == price_col else "quantity"
        raise InputError(f"{path}: --group-by {group_col!r} is the {role} column; "
                         f"group by another column")
    if decimal is None:
        at = [columns.index(price_col), columns.index(qty_col)]
        cells = [r[i] for i in at for r in records if i < len(r)]
        decimal, reason = _guess_decimal(path, cells)
    else:
        reason = f"{decimal!r} (--decimal)"
    return CsvInfo(path, columns, price_col, qty_col, group_col, sep, decimal,
                   encoding, compression, size, [f"decimal mark: {reason}"])


def _check_sep(sep: str | None) -> str | None:
    """``--sep`` as a one-character separator (``\\t`` spelled out is a tab), or None."""
    if sep is not None:
        sep = _SEP_NAMES.get(sep, sep)
        if len(sep) != 1 or not sep.isascii() or sep in '"\r\n':
            # pandas' fast parser, and worker.RecordScanner, take a one-byte separator.
            raise InputError(f"--sep must be one ASCII character other than a quote or a line "
                             f"end (or '\\t' for a tab), got {sep!r}")
    return sep


def _read_head(path: str, f, encoding: str, given_encoding: bool,
               sep: str | None) -> tuple[str, str]:
    """The decoded head of ``f`` (see :func:`inspect_csv`) and the separator.

    Raises :class:`InputError` for what the first bytes show is not CSV
    text, and for a header that does not end within :data:`_MAX_HEADER`.
    """
    head = f.read(_HEAD_BYTES)
    _refuse_non_text(path, head, given_encoding)
    decoder = codecs.getincrementaldecoder(encoding)()
    text = _decode(path, decoder, head, 0, encoding, final=len(head) < _HEAD_BYTES)
    # A BOM belongs to no column name, whatever --encoding says (pandas
    # drops it too); a file of only a BOM and blank lines is empty.
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise InputError(f"{path}: input CSV is empty (no header)")
    if "\x00" in text:
        raise InputError(f"{path}: binary data, not CSV text")
    if text.lstrip().lower().startswith(("<!doctype", "<html", "<?xml", "{", "[")):
        raise InputError(f"{path}: looks like HTML, XML or JSON, not CSV")
    sep = sep or _guess_sep(text)
    # Read on until the head holds the whole header and 128 KiB of records.
    read, ended = len(head), len(head) < _HEAD_BYTES
    while not ended:
        header_end, records_end = _head_bounds(text, sep)
        if header_end is not None and records_end - header_end >= _HEAD_BYTES // 2:
            break
        if read >= _MAX_HEADER:
            if header_end is None:
                raise InputError(f"{path}: no end of the header in the first "
                                 f"{_MAX_HEADER >> 20} MiB; is this a CSV file? (--sep?)")
            break
        more = f.read(read)       # doubling: the scans above stay linear overall
        ended = len(more) < read
        text += _decode(path, decoder, more, read, encoding, final=ended)
        read += len(more)
    if not ended:
        text = _complete_records(text, sep)  # the head may end inside a quoted value
    return text, sep


_MAX_HEADER = 64 * 1024 * 1024   # bytes of head read, at most, looking for the header's end


def _refuse_non_text(path: str, head: bytes, given_encoding: bool) -> None:
    """Refuse a head that is plainly not CSV text, saying what it is."""
    if not head.strip():
        raise InputError(f"{path}: input CSV is empty (no header)")
    if head.startswith(b"version https://git-lfs.github.com/spec/"):
        raise InputError(f"{path}: this is a Git LFS pointer, not the data; run 'git lfs pull'")
    if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) and not given_encoding:
        raise InputError(f"{path}: the file is UTF-16; pass --encoding utf-16")
    kind = next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)
    if kind is None and not given_encoding and b"\x00" in head:
        kind = "NUL bytes; UTF-16 text without a BOM needs --encoding utf-16-le or utf-16-be"
    if kind is not None:
        # Checked before decoding: "pass --encoding" would be the wrong advice.
        raise InputError(f"{path}: binary data, not CSV text ({kind})")


def _decode(path, decoder, data: bytes, offset: int, encoding: str, final: bool) -> str:
    """``data`` (from byte ``offset`` of the file) decoded; a bad byte is an InputError."""
    try:
        return decoder.decode(data, final=final)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid {encoding} (byte 0x{data[exc.start]:02x} at "
                         f"offset {offset + exc.start}); pass --encoding, e.g. "
                         f"--encoding cp1252") from None
    except UnicodeError as exc:     # e.g. "UTF-16 stream does not start with BOM"
        raise InputError(f"{path}: not valid {encoding} ({exc}); check --encoding") from None


class _ExtraFields(Exception):
    """A record of the sample has more fields than the header."""


def _read_sample(text: str, sep: str) -> tuple[list[str], list[list[str]]]:
    """The header as written and the records of ``text``, as lists of strings.

    Read with the csv module, whose quoting rules are pandas' (see
    :class:`worker.RecordScanner`), and fast on any width: pandas takes
    seconds to build a frame of 100,000 columns.  Blank lines are skipped,
    as pandas skips them.  A record with more fields than the header means
    a value held an unquoted separator, typically a thousands comma
    ("1,234.50,2" under "Price,Qty"), or a line ends with a separator.  The
    fast readers (``usecols``) would quietly take the first fields (pandas
    issue 40049), so the price could come from the wrong field; such a
    record raises :class:`_ExtraFields` quoting it, even when the extra
    fields are empty (``B,1,234.50,2,`` under four names shifts the price
    just the same).  A broken record further on is reported by the reader
    that meets it.
    """
    # A field may be as long as the head (a 10 MB header name); the csv
    # module refuses fields over 128 KiB by default.
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    rows = [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=sep)
            if row and (len(row) > 1 or row[0].strip(" \t"))]
    header, records = (rows[0] if rows else []), rows[1:]
    for record in records:
        if len(record) > len(header):
            raise _ExtraFields(
                f"a record has more fields ({len(record)}) than the header ({len(header)}): "
                f"{sep.join(record)[:80]!r}; a value with an unquoted separator (like "
                f"1,234.50), or a separator at the end of the line? Quote the value or drop "
                f"the separator, or check --sep")
    return header, records


def _pandas_names(path: str, text: str, sep: str, header: list[str]) -> list[str]:
    """The column names as pandas will read them from ``text``.

    They are ``header`` as written unless it has empty or repeated names,
    which pandas renames ("Unnamed: 2", "Price.1") by rules of its own;
    then pandas is asked.
    """
    if all(header) and len(set(header)) == len(header):
        return header
    try:
        return list(pd.read_csv(io.StringIO(text), sep=sep, nrows=0).columns)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise InputError(f"{path}: not CSV data ({exc})") from None


def _guess_sep(text: str) -> str:
    """The separator of ``text``: the one of ``, ; TAB |`` found most in its header.

    The header is the first record that is not blank (pandas skips blank
    lines), read with each candidate's quoting rules; separators inside
    quoted names, and a quoted name's line breaks, do not count.  Among
    candidates found at all, the one under whose rules fewest quotes of the
    header are literal (not delimiting a quoted name) comes first
    (``Price;Qty;",,"`` is ``;``-separated, though it holds as many
    commas); then the count decides, and on a tie the order above.
    """
    data = text.encode()

    def score(sep):
        start = 0
        for end in record_ends(data, sep) + [len(data)]:
            if not is_blank(data[start:end], sep):
                break
            start = end
        header = data[start:end]
        quotes = RecordScanner(sep).quotes(header)
        seps = np.frombuffer(header, np.uint8) == ord(sep)
        if quotes.size:
            seps &= ~inside_mask(len(header), quotes, False)
        literal = header.count(b'"') - quotes.size + quotes.size % 2   # an open quote too
        count = int(np.count_nonzero(seps))
        return count > 0, -literal, count

    return max(_SEPARATORS, key=score)


def _head_bounds(text: str, sep: str) -> tuple[int | None, int]:
    """Where in ``text`` the header ends (None if it does not) and the last record ends.

    The header is the first record that is not blank; records end where
    pandas ends them (:func:`worker.record_ends`).  Offsets are in
    characters, just past the line break.
    """
    data = text.encode()
    ends = record_ends(data, sep)
    start, header_end = 0, None
    for end in ends:
        if not is_blank(data[start:end], sep):
            header_end = len(data[:end].decode())
            break
        start = end
    return header_end, len(data[:ends[-1]].decode()) if ends else 0


def _complete_records(text: str, sep: str) -> str:
    """``text`` up to the end of its last complete record (or all of it, if none ends)."""
    data = text.encode()
    ends = record_ends(data, sep)
    return data[:ends[-1]].decode() if ends else text


def _check_repeated_names(path: str, header: list, price_col, qty_col) -> None:
    """Refuse a header that names the price (or quantity) column twice.

    ``header`` is the names as written.  pandas renames a repeated name
    ("Price", "Price.1"); no alias matches "price1", so detection alone
    would quietly take the first copy.  An explicit --price-col/--qty-col
    settles it (the second copy is then called "Price.1").
    """
    for wanted, aliases, what, option in ((price_col, PRICE_ALIASES, "price", "--price-col"),
                                          (qty_col, QTY_ALIASES, "quantity", "--qty-col")):
        hits = [name for name in header if normalize_name(name) in aliases]
        if wanted is None and len(hits) > 1:
            repeated = len(set(hits)) < len(hits)
            hint = " (the second copy of a repeated name is NAME.1)" if repeated else ""
            raise InputError(f"{path}: several {what} columns match: {show_names(hits)}; choose one with "
                             f"{option}{hint}")


def _guess_decimal(path: str, cells: list) -> tuple[str | None, str]:
    """The decimal mark that the sampled price and quantity ``cells`` (``str``) show, and why.

    Each cell is read both ways (:func:`worker.text_readings`, the rule of
    :func:`worker.number_readings` without pandas).  One that
    is a number only with a decimal point ("2.50", "0.125", "1,234.50")
    shows a point; only with a comma ("2,50", "0,125", "1.234,50"), a comma.
    One that is a different number each way ("1.234", "2,125": a thousands
    mark or three decimals) shows neither.  The separator plays no part.

    * Only one mark shown: that mark; the other cells follow it.
    * Both shown: :class:`InputError` (one of them would be misread).
    * Neither shown, but some cell differs by the mark: :class:`InputError`
      asking for ``--decimal``: the data cannot tell, and a guess could be
      off by a factor of 1000.
    * No cell depends on the mark (whole numbers only): None.  The reader
      then refuses, with the same advice, any later cell that does
      (:func:`worker.to_number` with ``decimal=None``).

    Returns ``(mark or None, reason)``, the reason for the log.
    """
    point, comma = text_readings(cells)
    shows_point = ~np.isnan(point) & np.isnan(comma)
    shows_comma = ~np.isnan(comma) & np.isnan(point)
    differs = ~np.isnan(point) & ~np.isnan(comma) & (point != comma)

    def first(shown):
        return int(np.argmax(shown))

    if shows_point.any() and shows_comma.any():
        raise InputError(f"{path}: the first records use both decimal marks ("
                         f"{cells[first(shows_point)]!r} and {cells[first(shows_comma)]!r}); "
                         f"pass --decimal . or --decimal , (cells that disagree are an error)")
    for mark, shown in ((".", shows_point), (",", shows_comma)):
        if shown.any():
            return mark, (f"{mark!r}, shown by {int(shown.sum())} of {len(cells)} sampled cells, "
                          f"e.g. {cells[first(shown)]!r}")
    if differs.any():
        at = first(differs)
        raise InputError(
            f"{path}: cannot tell the decimal mark: no cell of the first records shows it, and "
            f"{cells[at]!r} is {point[at]:g} with a decimal point but "
            f"{comma[at]:g} with a decimal comma; pass --decimal . or --decimal ,")
    return None, ("none shown yet (whole numbers only); a later cell that needs one "
                  "stops the job and asks for --decimal")


# --- Chunk sources -------------------------------------------------------------
# Both modes cut the input's text into the same kind of chunk: a byte range
# that holds whole records (cut_text).  They differ in who parses it: the
# server (FrameChunks, the documented mode) or the worker (StreamChunks).

_HEAD_SAMPLE = 256 * 1024   # bytes read to find the header and to estimate line lengths


# Above this many chunks, the line ends are counted first, so that the list
# of cut targets is bounded by the records, not by --chunks.
_COUNT_ABOVE = 100_000


def cut_text(open_text, size: int, chunks: int, chunk_rows: int | None = None,
             max_bytes: int | None = None, *, sep: str = ",",
             notes: list | None = None) -> tuple[bytes, list[tuple[int, int]]]:
    """Cut a CSV text of ``size`` bytes into chunks of whole records.

    ``open_text()`` returns a new binary stream at the start of the text;
    the text is read once to the end, plus its head a few times.  Returns
    ``(header, ranges)``: ``header`` is every byte before the first data
    record (a BOM, blank lines, the header record), sent with every chunk;
    ``ranges[i]`` is ``(start, end)``, the byte offsets of chunk ``i``, in
    order, together the rest of the text, none empty.

    The targets split the text after the header into ``chunks`` equal
    parts (at most one per byte).  With ``chunk_rows`` instead, they fall
    every ``chunk_rows`` lines of the mean length of the first 256 KiB
    after the header: exactly that many records per chunk where all lines
    are alike, about that many otherwise.  With ``max_bytes``, more equal
    parts if need be, so that no chunk is longer than that unless one
    record is.  Each target moves to the start of the next record
    (:func:`record_boundaries`) and equal cuts merge.  So the same text and
    arguments always give the same chunks: that is what lets a chunk id
    name the same records on every run of a job.
    """
    head, header_end, eol = _find_header(open_text, size, sep)
    header = head[:header_end]
    body = size - header_end
    # Targets every num / den bytes after the header (integers: exact on every
    # run).  At most one target per byte, and equal cuts merge below, so a
    # large --chunks gives one record per chunk, never an empty chunk.
    num, den, back = body, max(1, min(chunks, body)), 0
    if den > _COUNT_ABOVE and not chunk_rows:
        # A target list as long as --chunks 10**9 would not fit in memory:
        # no more chunks than line ends (each chunk holds a whole record).
        records = _line_ends(open_text(), header_end, eol) + 1
        if records < den:
            note = (f"--chunks {chunks}: capped at {records}, the line ends of the file "
                    f"(a chunk holds at least one record)")
            notes.append(note) if notes is not None else log.info("%s", note)
            den = records
    if chunk_rows:
        sample = head[header_end:]
        sample = sample[:sample.rfind(eol) + 1]
        if sample:
            # chunk_rows lines of the sample's mean length, one byte back: on
            # the newline that ends the last of them, not on the next line.
            num, den, back = chunk_rows * len(sample), sample.count(eol), 1
        else:   # no whole line in the head to measure: one chunk (max_bytes may split it)
            den = 1
    parts = -(-body * den // num) if body > 0 else 1
    if max_bytes and num > max_bytes * den:
        num, den, back = body, -(-body // max_bytes), 0
        log.info("%d chunks instead of %d: a chunk holds at most %d bytes of text", den,
                 parts, max_bytes)
        parts = den
    targets = [header_end + i * num // den - back for i in range(1, parts)]
    cuts = [header_end] + record_boundaries(open_text(), targets, sep=sep, eol=eol) + [size]
    cuts = sorted(set(cuts))
    return header, [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _find_header(open_text, size: int, sep: str) -> tuple[bytes, int, bytes]:
    """``(head, header_end, eol)`` of the text :func:`cut_text` cuts: its
    first bytes (at least the header), the offset where the first data
    record starts, and its line end (``b"\\n"``, ``b"\\r\\n"`` or ``b"\\r"``)."""
    with open_text() as f:
        head = f.read(_HEAD_SAMPLE)
    blank = len(head) - len(head.removeprefix(codecs.BOM_UTF8).lstrip(b"\r\n"))
    eol = _line_end(head[blank:])
    # pandas skips blank lines (also of spaces) before the header, after a BOM
    # if any; so must the cut, or a lone "\n" becomes every chunk's header and
    # each chunk's first record its column names.
    header_end = 0
    while header_end < size:
        start = header_end
        header_end = record_boundaries(open_text(), [start], sep=sep, eol=eol)[0]
        if header_end > len(head):   # a header longer than the sample
            with open_text() as f:
                head = f.read(header_end)
        if not is_blank(head[start:header_end], sep, at_start=start == 0):
            break
    return head, header_end, eol


def _line_end(text: bytes) -> bytes:
    """The byte that ends records in ``text``: CR if its first line ends with
    a lone CR (old Mac files hold no LF at all), else LF (LF or CRLF files)."""
    cr, lf = text.find(b"\r"), text.find(b"\n")
    return b"\r" if cr != -1 and (lf == -1 or cr + 1 < lf) else b"\n"


class StreamChunks:
    """The ``--stream`` mode: byte ranges of the file, parsed by the workers.

    The server never loads the file; it scans it once, block by block, to
    place chunk boundaries on record boundaries (:func:`cut_text`), found
    with the rules of pandas' tokenizer (:func:`record_boundaries`).
    ``ranges[i]`` is ``(start, end)`` in bytes; every JOB carries the header
    too, and either the range's bytes (:meth:`payload`) or, for a worker that
    reads the file itself, the range (:meth:`span`; see :meth:`local_source`).
    Raises :class:`InputError` for compressed input, an encoding whose
    quotes, separators or line breaks are not plain bytes (UTF-16, Shift-JIS:
    see :func:`worker.byte_transparent`), and lines ended by CR alone.
    """

    format = "csv"
    BLOCK = 16 * 1024 * 1024

    def __init__(self, info: CsvInfo, chunks: int, compress: bool):
        if info.compression:
            raise InputError(f"{info.path}: --stream needs an uncompressed file")
        if not byte_transparent(info.encoding):
            raise InputError(f"{info.path}: --stream cannot split {info.encoding} text (its "
                             f"quotes, separators or line ends are not single bytes); run "
                             f"without --stream")
        self.path, self.compress = info.path, compress
        # Chunks are read from this descriptor, opened once: a file replaced
        # (renamed over) during the job is not seen, and one rewritten in
        # place is noticed by payload() instead of mixing two contents.
        self.fd = os.open(info.path, os.O_RDONLY)
        stat = os.fstat(self.fd)
        self.stamp = (stat.st_size, stat.st_mtime_ns)
        try:
            # What a worker's own copy must match to read its ranges itself.
            self.fingerprint = fd_fingerprint(self.fd)
            self.header, self.ranges = cut_text(lambda: open(info.path, "rb"), stat.st_size,
                                                chunks, sep=info.sep, notes=info.notes)
        except BaseException:
            self.close()
            raise
        if b"\r" in self.header.replace(b"\r\n", b""):
            # Lines ended by a lone CR (old Mac): still refused in this mode, as
            # when the cut could only find LF; cut_text now cuts them at their
            # CRs, and the documented mode reads them.
            self.close()
            raise InputError(f"{info.path}: --stream needs LF or CRLF line ends, this file "
                             f"ends lines with CR alone; run without --stream")
        # No JOB may exceed the workers' frame limit: they would refuse it
        # unread, every time.  Targets at most half the room apart leave the
        # other half for the record each cut moves forward to.
        room = job_data_room(info, self) - len(self.header)
        if room < 2:
            self.close()
            raise InputError(f"{info.path}: the header line alone is longer than the "
                             f"workers' frame limit ({protocol.WORKER_MAX_FRAME} bytes)")
        if any(end - start > room // 2 for start, end in self.ranges):
            self.ranges = cut_text(lambda: open(info.path, "rb"), stat.st_size, chunks,
                                   max_bytes=room // 2, sep=info.sep)[1]
            log.info("--stream: %d chunks instead of %d, so that each fits the workers' "
                     "%d-byte frames", len(self.ranges), chunks, protocol.WORKER_MAX_FRAME)
        for start, end in self.ranges:
            if end - start > room:
                self.close()
                raise InputError(
                    f"{info.path}: a chunk of {end - start} bytes at byte {start} cannot fit the "
                    f"workers' {protocol.WORKER_MAX_FRAME}-byte frames: the file holds records "
                    f"of over {room // 2} bytes")
        if len(self.ranges) < chunks:
            info.notes.append(f"--chunks {chunks}: {len(self.ranges)} chunks, each holding "
                              f"whole records")
        self.rows = None

    def __len__(self) -> int:
        return len(self.ranges)

    def start(self, done=(), on_error=None, timings=None) -> None:
        """Nothing to prepare: a chunk is read when it is handed out."""

    def forget(self, chunk_id: int) -> None:
        """Nothing is kept per chunk."""

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def rows_of(self, chunk_id: int) -> None:
        """Unknown until a worker parses the chunk."""
        return None

    def row_bounds(self, chunk_id: int) -> tuple[int, int]:
        """(fewest, most) records a RESULT may report: a record takes at least
        one byte (its newline), so no more than the chunk's length."""
        start, end = self.ranges[chunk_id]
        return 0, end - start

    def payload(self, chunk_id: int) -> bytes:
        """Header + the chunk's bytes, read with ``os.pread`` (maybe zlib'd).

        Raises :class:`InputError` if the file was modified since the
        chunks were cut: its byte ranges no longer hold whole records of
        one version of the file.
        """
        start, end = self.ranges[chunk_id]
        data = self.header + os.pread(self.fd, end - start, start)
        self._check_unchanged()   # after the read: a write during it is seen too
        return zlib.compress(data, 1) if self.compress else data

    def span(self, chunk_id: int) -> tuple[int, int]:
        """``(start, end)`` of the chunk in the file, for a worker that reads it itself.

        Raises :class:`InputError`, as :meth:`payload` does, if the file was
        modified (the worker checks its own reads too).
        """
        self._check_unchanged()
        return self.ranges[chunk_id]

    def local_source(self) -> dict:
        """The WELCOME fields that let a worker read its chunks itself.

        ``input_path``: the file's absolute path, as named on the command
        line (a shared file system may be mounted there on other machines);
        ``input_fingerprint``: :func:`worker.fingerprint_text` of the file
        this server reads.  A worker that finds that file at that path says
        so in GET_JOB (``local_read``) and gets ranges (:meth:`span`).
        """
        return {"input_path": os.path.abspath(self.path),
                "input_fingerprint": fingerprint_text(self.fingerprint)}

    def _check_unchanged(self) -> None:
        stat = os.fstat(self.fd)
        if (stat.st_size, stat.st_mtime_ns) != self.stamp:
            raise InputError(f"{self.path}: the file was modified during the job; "
                             f"run again with --fresh")


class InputText:
    """The input's text as bytes, as chunk byte ranges count them.

    A plain file is its own text: ``size`` is its length and :meth:`read`
    uses ``os.pread``.  Compressed input (.gz, .bz2, .xz, a .zip of one
    file) is decompressed as it is read, and text whose newline is not the
    byte 0x0A (UTF-16, UTF-32) is re-encoded as UTF-8 as it is read (then
    ``encoding`` is ``"utf-8"``): such a text has no byte offsets on disk,
    so ``size`` costs one pass over the input (logged), and :meth:`read`
    moves forward through it; a read further back starts over from the
    beginning, a whole pass.  Everything is read from one descriptor opened
    here: a file renamed over the input is never seen, and one rewritten
    in place is noticed.  Raises :class:`InputError` (one line) for data
    that cannot be decompressed or decoded, or a file modified meanwhile.
    """

    def __init__(self, info: CsvInfo):
        self.path, self.compression = info.path, info.compression
        self.recode = "\n".encode(info.encoding).removeprefix(codecs.BOM_UTF8) != b"\n"
        self.source_encoding = info.encoding
        self.encoding = "utf-8" if self.recode else info.encoding
        self.sequential = bool(self.compression or self.recode)
        self.fd = os.open(info.path, os.O_RDONLY)
        stat = os.fstat(self.fd)
        self.stamp = (stat.st_size, stat.st_mtime_ns)
        self._lock = threading.Lock()   # one reader at a time: they share the descriptor
        self._stream, self._pos = None, 0
        try:
            self.size = self._measure() if self.sequential else stat.st_size
        except BaseException:
            self.close()
            raise

    def open(self):
        """A new binary stream at the start of the text (close it before the next:
        all share the descriptor's file offset)."""
        raw = os.fdopen(os.dup(self.fd), "rb")
        raw.seek(0)
        if not self.sequential:
            return raw
        layers = [raw]
        if self.compression == "zip":
            archive = zipfile.ZipFile(raw)
            layers.append(archive)
            names = [n for n in archive.namelist() if not n.endswith("/")]
            stream = archive.open(names[0])  # inspect_csv made sure there is exactly one
        elif self.compression == "gzip":
            stream = gzip.GzipFile(fileobj=raw)
        elif self.compression == "bz2":
            stream = bz2.BZ2File(raw)
        elif self.compression == "xz":
            stream = lzma.LZMAFile(raw)
        else:
            stream = raw
        if self.recode:
            stream = _Recoded(stream, self.source_encoding)
        return io.BufferedReader(_Layered(stream, *reversed(layers)), 1 << 20)

    @contextlib.contextmanager
    def reading(self, what: str = ""):
        """A context that turns decompression and decoding errors into one-line
        :class:`InputError` messages; ``what`` says where (" in chunk 3 ...")."""
        try:
            yield
        except UnicodeDecodeError as exc:
            raise InputError(f"{self.path}: not valid {self.source_encoding}{what} "
                             f"({exc.reason}); pass --encoding, e.g. --encoding cp1252") from None
        except (OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile) as exc:
            # e.g. a .gz cut short or corrupt in the middle: its head was fine.
            raise InputError(f"{self.path}: cannot read {self.compression or 'the'} "
                             f"data{what}: {exc}") from None

    def _measure(self) -> int:
        started = time.perf_counter()
        size = 0
        with self.reading(), self.open() as f:
            while block := f.read(StreamChunks.BLOCK):
                size += len(block)
        log.info("%s: %d bytes of text, measured in %.1f s (a pass over %s input, needed to "
                 "cut it into chunks)", self.path, size, time.perf_counter() - started,
                 self.compression or self.source_encoding)
        return size

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` of the text."""
        with self._lock, self.reading():
            if self.sequential:
                if self._stream is None or start < self._pos:
                    if self._stream is not None:
                        self._stream.close()
                    self._stream, self._pos = self.open(), 0
                while self._pos < start:   # e.g. past chunks done in an earlier run
                    skipped = len(self._stream.read(min(start - self._pos, StreamChunks.BLOCK)))
                    if not skipped:
                        break
                    self._pos += skipped
                data = self._stream.read(end - start)
                self._pos += len(data)
            else:
                data = os.pread(self.fd, end - start, start)
            stat = os.fstat(self.fd)
        if len(data) != end - start or (stat.st_size, stat.st_mtime_ns) != self.stamp:
            raise InputError(f"{self.path}: the file was modified during the job; "
                             f"run again with --fresh")
        return data

    def close(self) -> None:
        """Close the descriptor and any open reader (idempotent)."""
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


class _Layered(io.RawIOBase):
    """A read-only stream that reads ``top`` and closes it and every layer under it."""

    def __init__(self, top, *layers):
        self.top, self.layers = top, layers

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self.top.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            for layer in (self.top, *self.layers):
                layer.close()
        super().close()


class _Recoded(io.RawIOBase):
    """A binary stream of text in ``encoding``, read as UTF-8 bytes (no BOM)."""

    def __init__(self, stream, encoding: str):
        self.text = io.TextIOWrapper(stream, encoding=encoding, newline="")
        self.pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self.pending:
            self.pending = memoryview(self.text.read(1 << 20).encode("utf-8"))
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        self.text.close()
        super().close()


class FrameChunks:
    """The documented mode: the server parses chunk after chunk while the job runs.

    The chunks are byte ranges of the text (:class:`InputText`), cut by
    :func:`cut_text` as in ``--stream`` (on a plain file, the very same
    ranges), at most :data:`MAX_CHUNK_BYTES` of text each.  Producer
    threads (:meth:`start`: two for a plain file, one for a compressed one)
    claim them in order, parse them with ``read_columns`` (the header, then
    the bytes: what a ``--stream`` worker would parse) and pickle a
    DataFrame of the wanted columns per chunk (plain arrays for a small
    one: ``worker.py:SmallChunk``), so a chunk
    moves as soon as it is parsed, not once the whole file is.

    One ``read_columns`` call costs about a millisecond whatever its size,
    so consecutive chunks are parsed together in *pieces* of at least
    ``min_piece_bytes`` (1 MiB); a chunk as large as that is a piece of its
    own.  The records of a piece of several chunks are shared among them in
    order, in proportion to their bytes (exactly their own records where all
    lines are alike); the rule depends on the text and the cut alone, so a
    chunk id names the same records on every run.  Memory is bounded
    whatever the input's size:

    * at most ``ahead`` pieces, and ``ahead_bytes`` of parsed chunks, wait
      to be handed out; then the producer waits for room (one piece is
      always allowed, and so is the chunk a handler is waiting for);
    * a chunk of a plain file is dropped once handed out: a retry reads its
      piece again with ``os.pread``.  One of a compressed (sequential) text
      stays until it is DONE or FAILED (:meth:`forget`), as reading it again
      would decompress everything before it; so at most one per lease more.

    A piece whose chunks were all done in an earlier run (``done`` in
    :meth:`start`) is skipped, never parsed.  A piece the input cannot give
    (malformed CSV, bytes not in the encoding, corrupt compressed data, the
    file changed) stops the job: the error goes to ``on_error`` and to every
    later :meth:`payload` call, as an :class:`InputError` naming the chunks.
    Raises :class:`InputError` before the job for input that cannot be cut.
    """

    format = "frame"
    # pandas' tokenizer and number parser let go of the GIL, so a second
    # producer parses on the other core (1.3x the rate of one, measured);
    # a compressed text can only be read in order, by one.
    PARSERS = 2
    AHEAD = 4
    AHEAD_BYTES = 64 * 2**20
    MIN_PIECE_BYTES = 2**20
    # A chunk of text parses to a DataFrame up to ~8 times its size ("1,1"
    # becomes two int64), and a few of those wait in memory: 16 MiB keeps
    # that well inside 512 MiB.  More chunks are made where --chunks N
    # would give larger ones (logged).
    MAX_CHUNK_BYTES = 16 * 2**20

    def __init__(self, info: CsvInfo, chunks: int, chunk_rows: int | None, compress: bool,
                 ahead: int = AHEAD, ahead_bytes: int = AHEAD_BYTES,
                 max_chunk_bytes: int = MAX_CHUNK_BYTES,
                 min_piece_bytes: int = MIN_PIECE_BYTES, parsers: int = PARSERS):
        self.info, self.compress = info, compress
        self.ahead, self.ahead_bytes, self.parsers = ahead, ahead_bytes, parsers
        self.wanted = [c for c in (info.price_col, info.qty_col, info.group_col) if c]
        self.text = InputText(info)
        try:
            with self.text.reading():
                self.header, self.ranges = cut_text(self.text.open, self.text.size, chunks,
                                                    chunk_rows, max_chunk_bytes,
                                                    sep=info.sep, notes=info.notes)
        except BaseException:
            self.text.close()
            raise
        # pieces[p] = (first chunk, chunk after the last); piece_of[chunk] = p.
        self.pieces, first = [], 0
        for chunk_id, (_, end) in enumerate(self.ranges):
            if end - self.ranges[first][0] >= min_piece_bytes or chunk_id == len(self.ranges) - 1:
                self.pieces.append((first, chunk_id + 1))
                first = chunk_id + 1
        self.piece_of = [p for p, (a, b) in enumerate(self.pieces) for _ in range(a, b)]
        self.rows: dict[int, int] = {}   # records per chunk parsed in this run
        self.parse_seconds = 0.0
        self._lock = threading.Lock()
        self._parsed = threading.Condition(self._lock)   # handlers wait here for a chunk
        self._space = threading.Condition(self._lock)    # the producer waits here for room
        self._ready: dict[int, bytes] = {}    # parsed, not handed out yet
        self._ready_bytes = 0
        self._ready_in: dict[int, int] = {}   # piece -> how many of its chunks are ready
        self._kept: dict[int, bytes] = {}     # handed out, kept for a retry (sequential text)
        self._finished: set[int] = set()      # DONE or FAILED: never parsed again
        self._claimed = 0       # the pieces before it are taken by a producer
        self._parsing: set[int] = set()   # ... and these are still being parsed
        self._waiting = 0       # handlers in payload() waiting for a producer
        self._error: str | None = None
        self._failing = False
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._producing = 0     # producers still running
        self._idle = 0          # ... and waiting for room
        self._on_error, self._timings = None, None

    def __len__(self) -> int:
        return len(self.ranges)

    def start(self, done=(), on_error=None, timings: Timings | None = None) -> None:
        """Start the producer; chunks in ``done`` are never handed out, and a piece
        of only such chunks is not parsed.  ``on_error(message)`` is called once
        if the input fails; ``timings`` gets the ``parse`` seconds."""
        self._finished.update(done)
        self._on_error, self._timings = on_error, timings
        self._producing = 1 if self.text.sequential else self.parsers
        for i in range(self._producing):
            self._threads.append(threading.Thread(target=self._produce, name=f"parse-{i}",
                                                  daemon=True))
            self._threads[-1].start()

    def forget(self, chunk_id: int) -> None:
        """Chunk ``chunk_id`` is DONE or FAILED: drop its payload, never parse it again."""
        with self._lock:
            self._finished.add(chunk_id)
            if chunk_id in self._ready:
                self._unready(chunk_id)
            self._kept.pop(chunk_id, None)
            self._make_room()

    def close(self) -> None:
        """Stop the producer and close the input (idempotent); waiting handlers
        get ``ConnectionAbortedError``."""
        with self._lock:
            self._closed = True
            self._space.notify_all()
            self._parsed.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        self.text.close()

    def rows_of(self, chunk_id: int) -> int | None:
        """How many records chunk ``chunk_id`` holds, once parsed in this run."""
        return self.rows.get(chunk_id)

    def row_bounds(self, chunk_id: int) -> tuple[int, int]:
        """(fewest, most) records a RESULT for the chunk may report: exact once it
        is parsed in this run; else at most one per byte of its piece."""
        if chunk_id in self.rows:
            return self.rows[chunk_id], self.rows[chunk_id]
        first, end = self.pieces[self.piece_of[chunk_id]]
        return 0, self.ranges[end - 1][1] - self.ranges[first][0]

    def payload(self, chunk_id: int) -> bytes:
        """The pickled (and maybe zlib'd) DataFrame of chunk ``chunk_id``.

        Waits for the producer if it has not reached the chunk yet; parses
        the chunk's piece here if the producer is past it (a retry of a
        dropped payload) or was never started (tests).  Raises
        :class:`InputError` if the input failed, ``ConnectionAbortedError``
        once closed.
        """
        data = self._take(chunk_id)
        if data is None:
            parts = self._parse(self.piece_of[chunk_id])
            with self._lock:
                for part_id, part, rows in parts:
                    self.rows[part_id] = rows
                    if part_id == chunk_id:
                        data = part
                if self.text.sequential and chunk_id not in self._finished:
                    self._kept[chunk_id] = data
        # Here, not in the producer: zlib lets go of the GIL, so handlers
        # compress on the other core while the producer parses.
        return zlib.compress(data, 1) if self.compress else data

    def _take(self, chunk_id: int) -> bytes | None:
        """The chunk's pickle from the cache, waiting for the producer if it has
        not reached the chunk yet; None if the producer is past it or absent."""
        with self._lock:
            while True:
                if chunk_id in self._ready:
                    data = self._unready(chunk_id)
                    if self.text.sequential:
                        self._kept[chunk_id] = data
                    self._make_room()
                    return data
                if chunk_id in self._kept:
                    return self._kept[chunk_id]
                if self._error is not None:
                    raise InputError(self._error)
                if self._closed:
                    raise ConnectionAbortedError("the server is stopping")
                piece = self.piece_of[chunk_id]
                if not self._threads or piece < self._claimed and piece not in self._parsing:
                    return None
                self._waiting += 1
                self._space.notify()       # a waiting handler lets the producer past the bound
                try:
                    self._parsed.wait()
                finally:
                    self._waiting -= 1

    def _unready(self, chunk_id: int) -> bytes:
        """Take ``chunk_id`` out of the ready cache (lock held)."""
        data = self._ready.pop(chunk_id)
        self._ready_bytes -= len(data)
        piece = self.piece_of[chunk_id]
        self._ready_in[piece] -= 1
        if not self._ready_in[piece]:
            del self._ready_in[piece]
        return data

    def _make_room(self) -> None:
        """Wake a waiting producer if it may claim a piece now (lock held).  Not on
        every chunk taken: a wake-up that finds no room costs two thread switches,
        a tenth of what the server spends on a chunk."""
        if self._idle and self._may_claim():
            self._space.notify()

    def _may_claim(self) -> bool:
        """True if a producer may claim the next piece now: there is room, every piece
        is claimed (it then stops), or the next one is all done (it skips it)."""
        return (self._room() or self._claimed >= len(self.pieces)
                or self._all_finished(self._claimed))

    def _room(self) -> bool:
        # A handler waiting means its chunk was leased, and leases go in
        # chunk order: the chunks ready before it are leased too and leave
        # soon, so going past the bound cannot grow without end.  Without
        # this, a full cache of chunks still to be handed out could stall a
        # handler whose chunk comes next.
        # Pieces being parsed count as ready: the bound holds for any number
        # of producers.
        return (not self._ready and not self._parsing or self._waiting > 0
                or len(self._ready_in) + len(self._parsing) < self.ahead
                and self._ready_bytes < self.ahead_bytes)

    def _produce(self) -> None:
        piece = 0
        try:
            while True:
                with self._lock:
                    while not (self._closed or self._error or self._may_claim()):
                        self._idle += 1
                        try:
                            self._space.wait()
                        finally:
                            self._idle -= 1
                    piece, self._claimed = self._claimed, self._claimed + 1
                    if self._closed or self._error or piece >= len(self.pieces):
                        return
                    if self._all_finished(piece):
                        self._parsed.notify_all()   # a handler waiting there parses it itself
                        continue
                    self._parsing.add(piece)
                started = time.perf_counter()
                parts = self._parse(piece)
                with self._lock:
                    self.parse_seconds += time.perf_counter() - started
                    self._parsing.discard(piece)
                    for chunk_id, data, rows in parts:
                        self.rows[chunk_id] = rows
                        if chunk_id not in self._finished:
                            self._ready[chunk_id] = data
                            self._ready_bytes += len(data)
                            self._ready_in[piece] = self._ready_in.get(piece, 0) + 1
                    self._parsed.notify_all()
                    self._make_room()     # this piece's chunks may all be done already
        except InputError as exc:
            self._fail(str(exc))
        except MemoryError:
            self._fail(f"out of memory while parsing {self._where(piece, False)}; "
                       f"try more --chunks, or --stream")
        except Exception as exc:   # a bug: stop the job with its name, not a silent hang
            log.exception("unexpected error while parsing %s", self._where(piece, False))
            self._fail(f"unexpected error while parsing {self._where(piece, False)}: "
                       f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._parsing.discard(piece)
                self._producing -= 1
                last = not self._producing
            if last and self._timings is not None:
                self._timings.add("parse", self.parse_seconds)

    def _all_finished(self, piece: int) -> bool:
        first, end = self.pieces[piece]
        return all(c in self._finished for c in range(first, end))

    def _fail(self, message: str) -> None:
        with self._lock:
            first, self._failing = not self._failing, True
        if not first:
            return                    # both producers failed: the first error stands
        log.error("stopping the job: %s", message)
        if self._on_error is not None:
            self._on_error(message)   # first, so that a handler woken below finds the job stopped
        with self._lock:
            self._error = message
            self._parsed.notify_all()
            self._space.notify_all()

    def _where(self, piece: int, first_record: bool = True) -> str:
        """Piece ``piece`` for a message: its chunks, bytes, size and (when every
        chunk before it was parsed in this run) the number of its first record."""
        first, end = self.pieces[piece]
        start, stop = self.ranges[first][0], self.ranges[end - 1][1]
        chunks = f"chunk {first}" if end - first == 1 else f"chunks {first}-{end - 1}"
        where = f"{chunks} (bytes {start}-{stop} of the text, {(stop - start) / 2**20:.1f} MiB"
        if first_record and all(c in self.rows for c in range(first)):
            where += f", from data record {sum(self.rows[c] for c in range(first)) + 1}"
        return where + ")"

    def _parse(self, piece: int) -> list[tuple[int, bytes, int]]:
        """Read, parse and pickle one piece: ``[(chunk id, pickle, records), ...]``."""
        first, end = self.pieces[piece]
        start, stop = self.ranges[first][0], self.ranges[end - 1][1]
        info = self.info
        data = self.header + self.text.read(start, stop)
        try:
            frame = read_columns(io.BytesIO(data), info.sep, info.decimal, self.text.encoding,
                                 self.wanted, info.group_col)
        except UnicodeDecodeError as exc:
            raise InputError(f"{info.path}: not valid {self.text.encoding} in "
                             f"{self._where(piece)} ({exc.reason}); pass --encoding, "
                             f"e.g. --encoding cp1252") from None
        except (pd.errors.ParserError, ValueError) as exc:
            raise InputError(f"{info.path}: malformed CSV in {self._where(piece)}: "
                             f"{str(exc).strip()}") from None
        del data
        arrays = {name: frame[name].to_numpy() for name in frame.columns}  # once per piece
        if end - first == 1:
            return [(first, self._pickle(frame, arrays, 0, len(frame)), len(frame))]
        # Chunk c of the piece gets the records from its share of the bytes on.
        records, length = len(frame), stop - start
        bounds = [records * (self.ranges[c][0] - start) // length for c in range(first, end)]
        bounds.append(records)
        return [(c, self._pickle(frame, arrays, a, b), b - a)
                for c, a, b in zip(range(first, end), bounds, bounds[1:])]

    def _pickle(self, frame: pd.DataFrame, arrays: dict, start: int, stop: int) -> bytes:
        """The payload of rows ``start:stop`` of a parsed piece (``arrays``: its
        columns as numpy arrays): a DataFrame, or for a chunk of at most
        ``SmallChunk.SMALL_ROWS`` records its columns as plain values, which
        cost a fraction of a DataFrame to pickle, unpickle and compute
        (``worker.py:SmallChunk``)."""
        if stop - start <= SmallChunk.SMALL_ROWS:
            return pickle.dumps(SmallChunk.payload(arrays, start, stop, self.info.group_col),
                                protocol=5)
        if start == 0 and stop == len(frame):
            return pickle.dumps(frame, protocol=5)
        # A fresh index: the same frame as if the chunk had been parsed alone.
        return pickle.dumps(frame.iloc[start:stop].reset_index(drop=True), protocol=5)


# Bytes the cut scans at a time: a buffer that stays in the CPU's cache, so the
# quote search reads what the read just wrote there (16 MiB took a quarter longer).
SCAN_BLOCK = 1 << 20


def record_boundaries(source, targets: list[int], block: int = SCAN_BLOCK, *,
                      sep: str = ",", eol: bytes = b"\n") -> list[int]:
    """For each offset in sorted ``targets``, the start of the next record.

    ``source`` is a path, or a binary stream positioned at the start of the
    text (a decompressing reader, say; it is closed afterwards).  The next
    record after offset ``t`` starts right after the first newline (``eol``:
    ``b"\\r"`` for a file whose lines end with CR alone) at or after ``t``
    that is outside quoted fields, or at the end of the text.  Quoted fields
    are the ones pandas' tokenizer sees (:class:`worker.RecordScanner`, for
    fields separated by ``sep``): a quote inside an unquoted value, as in
    ``27" screen``, is a literal and opens nothing.  A target that falls
    before the boundary found for the previous one gets that same boundary,
    so a record longer than a chunk makes one large chunk, never a cut
    record.  Reads the text once,
    ``block`` bytes at a time.  Returns a list as long as ``targets``.
    """
    out = []
    pending = collections.deque(targets)
    scanner = RecordScanner(sep)
    offset = 0          # file offset of data[0]
    # One buffer, refilled: a fresh bytes object per block costs more than
    # the scan (its pages are zero-filled by the kernel, then copied into).
    buffer = bytearray(block)
    with (open(source, "rb") if isinstance(source, (str, os.PathLike)) else source) as f:
        while pending:
            size = f.readinto(buffer)
            if not size:
                break
            data = buffer if size == block else buffer[:size]
            inside = scanner.inside
            quotes = scanner.quotes(data)
            while pending:
                if out and pending[0] <= out[-1]:
                    out.append(out[-1])
                    pending.popleft()
                    continue
                end = _next_record(data, max(pending[0] - offset, 0), quotes, inside, eol)
                if end is None:
                    break          # the record goes on in the next block
                out.append(offset + end)
                pending.popleft()
            offset += len(data)
    out.extend(offset for _ in pending)   # no boundary left: the end of the file
    return out


def _next_record(data: bytes, pos: int, quotes, inside: bool, eol: bytes = b"\n") -> int | None:
    """The offset just past the first ``eol`` at or after ``pos`` outside quoted fields, or None.

    ``quotes`` are the block's delimiting quotes and ``inside`` the state
    at its start (:meth:`worker.RecordScanner.quotes`).  An LF inside a
    quoted field sends the search on past the quote that ends the field.
    """
    while True:
        newline = data.find(eol, pos)
        if newline == -1:
            return None
        before = int(quotes.searchsorted(newline))   # delimiting quotes before the LF
        if (before + inside) % 2 == 0:
            return newline + 1
        if before == len(quotes):
            return None                 # the quoted field goes on past this block
        pos = int(quotes[before]) + 1


def _line_ends(stream, start: int, eol: bytes = b"\n") -> int:
    """The ``eol`` bytes of a binary ``stream`` (closed afterwards) from offset
    ``start`` on: at least its records there."""
    count = 0
    with stream as f:
        f.read(start)
        while block := f.read(StreamChunks.BLOCK):
            count += block.count(eol)
    return count


def job_message(info: CsvInfo, chunks, job_id: str, chunk_id: int, attempt_id: int,
                data: bytes, span: tuple[int, int] | None = None) -> dict:
    """The JOB message of one attempt (its fields are listed in protocol.py).

    ``chunks`` is the chunk source (:class:`FrameChunks` or
    :class:`StreamChunks`); ``data`` its payload for ``chunk_id``.  With
    ``span`` (a worker that reads the input itself, ``--stream`` only), the
    format is ``"range"``: ``data`` is then the header, uncompressed, and
    ``start``, ``end`` are the chunk's bytes in the file.
    """
    carries = dict(format=chunks.format, data=data, compressed=chunks.compress)
    if span is not None:
        carries = dict(format="range", data=data, compressed=False, start=span[0], end=span[1])
    return protocol.make(
        protocol.JOB, job_id=job_id, chunk_id=chunk_id, attempt_id=attempt_id,
        rows=chunks.rows_of(chunk_id), **carries, price_col=info.price_col,
        qty_col=info.qty_col, group_col=info.group_col, sep=info.sep, decimal=info.decimal,
        encoding=info.encoding)


def job_data_room(info: CsvInfo, chunks) -> int:
    """How many bytes of data a JOB may carry and still fit a worker's frame.

    The worker refuses frames over ``protocol.WORKER_MAX_FRAME`` before it
    reads them.  Subtracted: the rest of the message, measured by encoding
    one with empty data and the largest ids and row count, plus 64 bytes for
    the data's length opcode; with compression, zlib's worst case, which is
    the input plus 0.1 % plus a few bytes (deflateBound in zlib's deflate.c).
    """
    big = 2 ** 63 - 1
    envelope = len(protocol.encode(dict(
        job_message(info, chunks, "f" * 64, big, big, b""), rows=big))) + 64
    room = protocol.WORKER_MAX_FRAME - envelope
    return room - room // 1000 - 64 if chunks.compress else room


# --- Job identity, TLS and the command line --------------------------------------

def job_identity(info: CsvInfo, args: argparse.Namespace, fingerprint: dict) -> tuple[str, str]:
    """Return ``(job_id, identity)`` for this input and chunking.

    The identity is the file's real path and :func:`worker.file_fingerprint` plus
    every option that changes how it is chunked or parsed, as JSON;
    ``job_id`` is the first 16 hex digits of its SHA-256.  A rewritten file
    is a new job, so its results never mix with the old file's.
    """
    identity = json.dumps({
        "path": os.path.realpath(info.path), **fingerprint,
        "mode": "stream" if args.stream else "frame", "chunks": args.chunks,
        "chunk_rows": args.chunk_rows, "sep": info.sep, "decimal": info.decimal,
        "encoding": info.encoding, "price_col": info.price_col, "qty_col": info.qty_col,
        "group_col": info.group_col}, sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:16], identity


def _tls_context(args) -> ssl.SSLContext | None:
    if not (args.tls_cert or args.tls_key):
        return None
    if not (args.tls_cert and args.tls_key):
        raise InputError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise InputError(f"cannot load the TLS certificate or key: {exc}") from None
    return context


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv=None) -> argparse.Namespace:
    """The server's command line (see ``--help``); exits 2 on a usage error."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.chunk_rows and args.stream:
        p.error("--chunk-rows works in documented mode only")
    return args


def build_parser() -> argparse.ArgumentParser:
    """The server's options: the job's own first, then one group per concern."""
    p = argparse.ArgumentParser(
        description="Split a sales CSV into chunks, hand them to workers, aggregate in SQL.",
        formatter_class=HelpFormatter)
    p.add_argument("--csv", required=True, help="input CSV (.gz/.bz2/.zip/.xz too)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=port_number(0), default=5000, help="TCP port (0: any free port)")
    p.add_argument("--chunks", type=_positive_int, default=200, help="number of chunks")
    p.add_argument("--chunk-rows", type=_positive_int, default=None,
                   help="about this many records per chunk instead of --chunks (documented "
                        "mode only; exact where all lines have the same length)")
    p.add_argument("--db", default="results.sqlite",
                   help="results database: a SQLite file, or a PostgreSQL URL "
                        "postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME")
    p.add_argument("--db-retry-for", type=seconds_or_zero, default=60.0,
                   help="seconds to keep retrying a results database that is unreachable or "
                        "busy (a restart) before the job stops")
    p.add_argument("--fresh", action="store_true",
                   help="forget earlier results of this job instead of resuming")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="how much to log; DEBUG shows every lease")
    p.add_argument("--port-file", default=None, help="write the bound port to this file")
    _add_scheduling_and_input_options(p)
    _add_security_options(p)
    return p


def _add_scheduling_and_input_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scheduling")
    g.add_argument("--lease-timeout", type=seconds, default=60.0,
                   help="seconds a worker may hold a chunk before it is handed out again")
    g.add_argument("--max-attempts", type=_positive_int, default=4,
                   help="reported failures after which a chunk fails the job")
    g.add_argument("--max-lost", type=_positive_int, default=10,
                   help="lost attempts (lease expired, connection dropped, JOB not built) "
                        "after which a chunk fails the job")
    g.add_argument("--linger", type=seconds_or_zero, default=5.0,
                   help="seconds to wait at the end for every worker that took part "
                        "(also in an earlier run) to hear NO_JOB")
    c = p.add_argument_group("input")
    c.add_argument("--price-col", default=None, help="price column (default: detected)")
    c.add_argument("--qty-col", default=None, help="quantity column (default: detected)")
    c.add_argument("--group-by", default=None, help="also aggregate per value of this column")
    c.add_argument("--sep", default=None, help="field separator (default: detected)")
    c.add_argument("--decimal", default=None, choices=[".", ","],
                   help="decimal mark (default: detected)")
    c.add_argument("--encoding", default=None, help="text encoding (default: UTF-8, BOM or not)")
    m = p.add_argument_group("transfer")
    m.add_argument("--stream", action="store_true",
                   help="send the chunks' CSV bytes for the workers to parse (the server "
                        "parses nothing)")
    m.add_argument("--compress", action="store_true", help="zlib-compress chunk payloads")


def _add_security_options(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("security and limits")
    s.add_argument("--secret", default=None,
                   help=f"shared secret for the handshake (prefer the {SECRET_ENV} "
                        "environment variable: arguments are visible in the process list)")
    s.add_argument("--tls-cert", default=None, help="TLS certificate chain (PEM)")
    s.add_argument("--tls-key", default=None, help="TLS private key (PEM)")
    s.add_argument("--max-frame", type=_frame_limit, default=protocol.SERVER_MAX_FRAME,
                   help=f"largest frame accepted from a peer, bytes (at least {MIN_MAX_FRAME})")
    s.add_argument("--io-timeout", type=seconds, default=10.0,
                   help="seconds a started frame or the handshake may take")
    s.add_argument("--idle-timeout", type=seconds, default=600.0,
                   help="seconds a connection may stay silent between frames")
    s.add_argument("--max-connections", type=_positive_int, default=256,
                   help="connections open at once")


# A RESULT without groups takes about 300 bytes and a FAILED report at most
# about 1 KB: below this, no worker could report anything.
MIN_MAX_FRAME = 4096


def _frame_limit(text: str) -> int:
    value = int(text)
    if value < MIN_MAX_FRAME:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_MAX_FRAME} bytes (a worker's smallest RESULT or FAILED "
            f"report must fit), got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def main(argv=None) -> int:
    """Entry point; returns the exit code (0 done, 1 chunks failed, 2 bad input)."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gc.freeze()   # the modules: see worker.import_pandas
    signals = []

    def interrupt(signum, frame):
        # Before serve() installs its own handlers (while the CSV loads), a
        # signal ends the program; pandas may report the interrupted read as
        # a parse error, so the signal is remembered and checked below.
        signals.append(signum)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        return run(args)
    except KeyboardInterrupt:
        pass
    except MemoryError:
        # The documented mode's parser and the handlers say what they were
        # doing (a failed job, exit 1); this is the main thread's version.
        print("server.py: error: out of memory; try more --chunks, or --stream "
              "(README, Troubleshooting)", file=sys.stderr)
        return EXIT_FAILED
    except ImportError as exc:   # pandas missing or too old (worker.check_pandas)
        print(f"server.py: error: cannot import pandas ({exc}): pip install -r requirements.txt",
              file=sys.stderr)
        return EXIT_USAGE
    except (InputError, OSError) as exc:  # OSError: e.g. the db folder is missing
        if not signals:
            print(f"server.py: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    print("server.py: interrupted before the job started", file=sys.stderr)
    return 128 + (signals[0] if signals else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
