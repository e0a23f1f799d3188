"""The rules the job relies on, each proved in milliseconds.

README's table "How it stays correct" lists the rules; this file holds the
fast test of each, in the table's order, and ``tools/mutants.py`` breaks
every rule on purpose to show that its test here notices.  No process is
started.  Most tests need no socket at all: ``ChunkBook`` with a
:class:`~conftest.FakeClock`, the results store on an in-memory SQLite
database, the checks of a RESULT called directly.  Rules about a connection
run a real ``JobServer`` in a thread of this process (the ``job_server``
fixture, port 0), whose store the test can hold still in the middle of a
commit, or a real ``Worker`` loop in a thread against a scripted
:class:`~conftest.FakeServer`.  Nothing here waits for a moment: a test
waits for an event it can name (a store entered, a message received).
"""

from __future__ import annotations

import hmac
import importlib.util
import io
import itertools
import math
import os
import pickle
import random
import signal
import socket
import threading
import types
from contextlib import closing

import pytest

import protocol
import server as server_mod
import worker as worker_mod
from conftest import (ROOT, FakeClock, FakeServer, RunsCode, WorkerThread, assert_aggregate,
                      db_rows, job_message, oracle, parse_final, wait_for)
from db_utils import Outcome, ResultStore, StoreError

JOB = "job"


# --- 1. Chunk states and leases: ChunkBook with a hand-moved clock ------------------

def make_book(chunks=3, lease=10.0, max_attempts=3, **kw):
    clock = FakeClock()
    return server_mod.ChunkBook(chunks, lease, max_attempts, clock=clock, **kw), clock


def test_book_lease_expires_at_its_deadline_and_the_chunk_is_retried_first():
    """Rule: a lease ends exactly at leased_at + lease_timeout; the expired
    chunk goes back to the front of the queue with a new attempt id."""
    book, clock = make_book()
    first = book.lease("a", conn=1)
    assert (first.chunk_id, first.attempt_id, first.deadline) == (0, 1, 10.0)
    assert book.lease("a", conn=1).chunk_id == 1
    clock.now = 9.999
    assert book.expire() == []
    clock.now = 10.0
    assert [lease.chunk_id for lease in book.expire()] == [0, 1]
    assert book.counts() == {"PENDING": 3, "LEASED": 0, "DONE": 0, "FAILED": 0}
    retry = book.lease("b", conn=2)
    assert retry.chunk_id in (0, 1) and retry.attempt_id == 3
    assert book.is_attempt_of(1, 0, "a") and not book.is_attempt_of(1, 1, "a")
    assert not book.is_attempt_of(1, 0, "b")  # nobody reports another's attempt


def test_book_release_returns_only_the_dropped_connections_chunks():
    """Rule: when a connection closes, exactly its leases end and their chunks
    are pending again; other connections keep theirs."""
    book, _ = make_book()
    mine = book.lease("a", conn=1)
    other = book.lease("b", conn=2)
    assert book.release(conn=1) == [mine]
    assert book.counts()["PENDING"] == 2 and book.counts()["LEASED"] == 1
    assert book.lease("c", conn=3).chunk_id == mine.chunk_id
    assert book.release(conn=1) == []
    assert other.attempt_id in book.leases


def test_book_fails_a_chunk_after_max_attempts_reports():
    """Rule: each reported failure re-queues the chunk until the
    max_attempts-th, which makes it FAILED for good (never leased again);
    the job is then finished with that chunk listed with its last error."""
    book, _ = make_book(chunks=2, max_attempts=2)
    first = book.lease("a", conn=1)
    assert book.fail(first.chunk_id, first.attempt_id, "boom 1") is False
    second = book.lease("a", conn=1)
    assert second.chunk_id == first.chunk_id
    assert book.fail(second.chunk_id, second.attempt_id, "boom 2") is True
    assert book.failed_chunks() == {0: "boom 2 (failed 2 times)"}
    other = book.lease("a", conn=1)
    assert other.chunk_id == 1 and book.lease("a", conn=1) is None
    assert not book.finished.is_set()
    book.complete(1, other.attempt_id)
    assert book.finished.is_set()


def test_book_counts_a_failure_report_once_per_attempt():
    """Rule: a FAILED report re-sent for the same attempt (the worker lost the
    ACK and reconnected) is one failure, not two."""
    book, _ = make_book(chunks=1, max_attempts=2)
    lease = book.lease("a", conn=1)
    assert book.fail(0, lease.attempt_id, "boom") is False
    assert book.fail(0, lease.attempt_id, "boom") is False
    assert book.failures[0] == 1
    assert book.lease("a", conn=1).chunk_id == 0


def test_book_lost_attempts_do_not_count_toward_max_attempts():
    """Rule: an expired lease and a dropped connection say something about the
    worker, not the chunk: with --max-attempts 2, one expiry, one drop and
    one reported failure leave the chunk pending, not FAILED."""
    book, clock = make_book(chunks=1, max_attempts=2)
    book.lease("a", conn=1)
    clock.now = 10.0
    assert len(book.expire()) == 1
    book.lease("b", conn=2)
    assert len(book.release(conn=2)) == 1
    third = book.lease("c", conn=3)
    assert book.fail(0, third.attempt_id, "boom") is False
    assert book.failures[0] == 1 and book.counts()["PENDING"] == 1


def test_book_fails_a_chunk_lost_max_lost_times_counted_apart_from_reports():
    """Rule: lost attempts (dropped connections, expired leases, JOBs the server
    could not build) re-queue the chunk, but only max_lost times: the last one
    makes it FAILED, naming the chunk's losses and the last cause, so a chunk
    that every worker drops (say, one over their frame limit) cannot loop for
    ever.  Reported failures are a separate count with their own bound."""
    book, clock = make_book(chunks=2, lease=5.0, max_attempts=2, max_lost=3)
    dropped = book.lease("w1", conn=1)
    assert book.release(conn=1) == [dropped]
    reported = book.lease("w1", conn=2)
    assert reported.chunk_id == 0
    assert book.fail(0, reported.attempt_id, "boom") is False
    expired = book.lease("w2", conn=3)
    clock.now = 5.0
    assert book.expire() == [expired]
    assert (book.losses[0], book.failures[0]) == (2, 1)
    unbuilt = book.lease("w3", conn=4)
    assert unbuilt.chunk_id == 0
    book.lose(unbuilt.attempt_id, "the server could not build its JOB (MemoryError: )")
    assert book.counts() == {"PENDING": 1, "LEASED": 0, "DONE": 0, "FAILED": 1}
    why = book.failed_chunks()[0]
    assert why.startswith("lost 3 times") and "could not build its JOB (MemoryError" in why
    assert "frame limit" in why
    other = book.lease("w1", conn=5)
    assert other.chunk_id == 1 and book.lease("w1", conn=5) is None
    book.complete(1, other.attempt_id)
    assert book.finished.is_set()


def test_book_refused_chunk_fails_at_once_and_a_loss_after_a_result_is_no_loss():
    """Rule: a chunk that can never be sent (refuse) is FAILED at its first attempt;
    a connection that drops after its chunk was completed costs nothing."""
    book, _ = make_book(chunks=2, max_lost=1)
    first = book.lease("a", conn=1)
    book.refuse(first.chunk_id, first.attempt_id, "its JOB frame is too large")
    assert book.failed_chunks() == {0: "its JOB frame is too large"}
    second = book.lease("a", conn=1)
    book.complete(second.chunk_id, second.attempt_id)
    assert book.release(conn=1) == []
    assert book.losses == [0, 0] and book.finished.is_set()


def test_book_re_leased_chunk_is_never_queued_twice():
    """Rule: a chunk re-leased after an expiry stays LEASED while any live
    lease holds it, so the old attempt ending (drop, failure) does not queue
    it again; when the last lease ends it is queued exactly once."""
    book, clock = make_book(chunks=1)
    old = book.lease("a", conn=1)
    clock.now = 10.0
    assert book.expire() == [old]
    new = book.lease("b", conn=2)
    assert new.chunk_id == old.chunk_id == 0
    assert book.fail(0, old.attempt_id, "late error") is False
    assert book.release(conn=1) == []
    assert book.counts()["LEASED"] == 1 and book.lease("c", conn=3) is None
    assert book.release(conn=2) == [new]
    assert list(book.queue) == [0]
    again = book.lease("c", conn=3)
    assert again.chunk_id == 0 and book.lease("c", conn=3) is None


def test_book_late_result_of_an_expired_lease_completes_the_chunk():
    """Rule: complete() is idempotent and accepts an expired attempt; once the
    chunk is DONE, the ending of the other live lease does not re-queue it."""
    book, clock = make_book(chunks=1)
    old = book.lease("a", conn=1)
    clock.now = 10.0
    book.expire()
    new = book.lease("b", conn=2)
    book.complete(0, old.attempt_id)
    book.complete(0, old.attempt_id)
    assert book.finished.is_set()
    assert book.release(conn=2) == [new]
    assert list(book.queue) == [] and book.counts()["DONE"] == 1


def test_book_finished_only_when_no_chunk_is_pending_or_leased():
    """Rule: ``finished`` is set exactly when every chunk is DONE or FAILED:
    not while one is leased (lease() returns None then, so workers WAIT), and
    at once for a resumed job whose chunks are all done."""
    book, _ = make_book(chunks=2)
    a, b = book.lease("a", conn=1), book.lease("b", conn=2)
    assert book.lease("c", conn=3) is None and not book.finished.is_set()
    book.complete(a.chunk_id, a.attempt_id)
    assert not book.finished.is_set()
    book.complete(b.chunk_id, b.attempt_id)
    assert book.finished.is_set()

    resumed = server_mod.ChunkBook(2, 10.0, 3, done={0, 1},
                                   known_attempts={4: (0, "w"), 5: (1, "w")}, next_attempt_id=6)
    assert resumed.finished.is_set() and resumed.lease("a", conn=1) is None
    half = server_mod.ChunkBook(2, 10.0, 3, done={0}, known_attempts={4: (0, "w")}, next_attempt_id=5)
    lease = half.lease("a", conn=1)
    assert (lease.chunk_id, lease.attempt_id) == (1, 5) and half.is_attempt_of(4, 0, "w")


def test_book_finishes_exactly_at_the_last_chunk_in_any_order():
    """Rule: finished is set by the last chunk to end (DONE or FAILED),
    whatever the order, and not before; a late result for a FAILED chunk
    keeps it set."""
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


# --- 2. The results store: first wins, idempotent upsert, the weighted mean ---------

def result(chunk, worker, attempt, rows=4, rejected=0, sales=10.0, low=1.0, high=4.0,
           mean=2.5, count=None) -> dict:
    """A RESULT's metrics as the server hands them to record_result."""
    return {"worker_id": worker, "chunk_id": chunk, "attempt_id": attempt,
            "rows_processed": rows, "rejected_rows": rejected, "total_sales": sales,
            "min_price": low, "max_price": high, "avg_price": mean,
            "price_count": rows - rejected if count is None else count}


def commit(store, row: dict, groups=()) -> bool:
    """Record the lease of ``row``'s attempt, then commit ``row``; return 'counted'."""
    store.record_lease(JOB, row["attempt_id"], row["chunk_id"], row["worker_id"], 1.0)
    return store.record_result(JOB, row, groups)


@pytest.fixture
def store():
    """A ResultStore on an in-memory SQLite database, with a job of 3 chunks."""
    with closing(ResultStore(":memory:")) as results:
        results.open_job(JOB, "sales.csv", "identity", 3)
        yield results


def stored(store, table: str, columns: str) -> list[tuple]:
    rows = store._query(f"SELECT {columns} FROM {table} WHERE job_id = ? ORDER BY 1, 2", (JOB,))
    return [tuple(row.values()) for row in rows]


def test_first_committed_result_wins_and_later_ones_are_duplicates(store):
    """Rule: the first committed result of a chunk is the one that counts; a
    second worker's result for the same chunk (its lease had expired) is kept
    in worker_results, marked duplicate, and changes nothing."""
    assert commit(store, result(0, "w1", 1, sales=10.0)) is True
    assert commit(store, result(0, "w2", 2, sales=99.0)) is False
    assert stored(store, "chunk_results", "chunk_id, worker_id, total_sales") == [(0, "w1", 10.0)]
    assert stored(store, "worker_results", "worker_id, total_sales") == [("w1", 10.0), ("w2", 99.0)]
    assert {a["attempt_id"]: a["outcome"] for a in store.attempts(JOB)} == \
        {1: Outcome.COUNTED, 2: Outcome.DUPLICATE}
    assert store.final_aggregate(JOB)["total_sales"] == 10.0


def test_same_result_twice_is_an_idempotent_upsert(store):
    """Rule: a worker that re-sends its RESULT (its ACK was lost) overwrites
    its own row in worker_results, without an error and without counting
    the chunk twice."""
    first = result(1, "w1", 1, sales=10.0)
    assert commit(store, first) is True
    assert store.record_result(JOB, dict(first, attempt_id=5)) is False
    assert stored(store, "worker_results", "worker_id, attempt_id") == [("w1", 5)]
    assert stored(store, "chunk_results", "chunk_id, attempt_id") == [(1, 1)]
    assert store.final_aggregate(JOB)["total_rows"] == 4


def test_groups_of_a_duplicate_are_never_stored(store):
    """Rule: group rows are stored with the result that counts, so a chunk
    reported twice adds its groups once."""
    group = [("North", 4, 0, 10.0, 1.0, 4.0, 2.5, 4)]
    assert commit(store, result(0, "w1", 1), group) is True
    assert commit(store, result(0, "w2", 2), group) is False
    assert [g["total_rows"] for g in store.group_aggregate(JOB)] == [4]


def test_final_mean_is_weighted_by_the_valid_prices_of_each_chunk(store):
    """Rule: the final avg_price is sum(avg_i * price_count_i) / sum(price_count_i).
    Chunk A: 4 rows, 1 rejected, 3 prices of 10; chunk B: 1 price of 50.
    Prices: (3*10 + 50) / 4 = 20.  The mean of the means (30) and a mean
    weighted by rows ((4*10 + 50) / 5 = 18) are both wrong."""
    commit(store, result(0, "a", 1, rows=4, rejected=1, sales=30.0, low=10.0, high=10.0,
                         mean=10.0))
    commit(store, result(1, "b", 2, rows=1, sales=50.0, low=50.0, high=50.0, mean=50.0))
    commit(store, result(2, "c", 3, rows=2, rejected=2, sales=0.0, low=None, high=None,
                         mean=None))
    assert_aggregate(store.final_aggregate(JOB), {
        "total_rows": 7, "rejected_rows": 3, "total_sales": 80.0, "min_price": 10.0,
        "max_price": 50.0, "avg_price": 20.0})


def test_group_mean_is_weighted_too(store):
    """Rule: per-group means merge with the same weights as the final one."""
    commit(store, result(0, "a", 1, rows=4, rejected=1, mean=10.0, low=10.0, high=10.0),
           [("g", 4, 1, 30.0, 10.0, 10.0, 10.0, 3)])
    commit(store, result(1, "b", 2, rows=1, mean=50.0, low=50.0, high=50.0),
           [("g", 1, 0, 50.0, 50.0, 50.0, 50.0, 1)])
    (group,) = store.group_aggregate(JOB)
    assert group["avg_price"] == pytest.approx(20.0, rel=1e-9)


def test_no_valid_price_gives_no_mean_rather_than_a_division_by_zero(store):
    """Rule: a job whose rows are all rejected has total_sales 0.0 and None
    price statistics (NULLIF turns the zero weight into NULL)."""
    commit(store, result(0, "a", 1, rows=2, rejected=2, sales=0.0, low=None, high=None,
                         mean=None))
    assert_aggregate(store.final_aggregate(JOB), {
        "total_rows": 2, "rejected_rows": 2, "total_sales": 0.0, "min_price": None,
        "max_price": None, "avg_price": None})


def test_open_job_again_resumes_what_the_database_knows(store):
    """Rule: re-opening a job returns its counted chunks and every earlier
    attempt (so a result re-sent after a restart is still recognised, and
    attempt ids are never reused); attempts left leased are interrupted."""
    commit(store, result(0, "w1", 1))
    store.record_lease(JOB, 2, 1, "w2", 1.0)      # leased when the server died
    state = store.open_job(JOB, "sales.csv", "identity", 3)
    assert state.done == {0}
    assert state.attempts == {1: (0, "w1"), 2: (1, "w2")}
    assert state.next_attempt_id == 3
    assert {a["attempt_id"]: a["outcome"] for a in store.attempts(JOB)} == \
        {1: Outcome.COUNTED, 2: "interrupted"}


# --- 3. Results are checked before they are stored ---------------------------------

GOOD = dict(rows=3, rejected=1, sales=7.5, low=1.0, high=4.0, mean=2.5, count=2)

# Each case: the change to a valid set of partial metrics, and the words of
# the refusal.  Only the one rule under test can refuse each.
BAD_STATS = {
    "float row count": (dict(rows=3.0), "64-bit integers"),
    "bool row count": (dict(rows=True, rejected=0, count=1), "64-bit integers"),
    "row count past 64 bits": (dict(rows=2 ** 63, rejected=0, count=2 ** 63), "64-bit"),
    "negative rows": (dict(rows=-1, rejected=0, count=-1), "inconsistent row counts"),
    "negative rejected": (dict(rows=2, rejected=-1, count=3), "inconsistent row counts"),
    "more rejected than rows": (dict(rows=1, rejected=2, count=-1), "inconsistent row counts"),
    "price_count is not rows - rejected": (dict(count=1), "inconsistent row counts"),
    "NaN sales": (dict(sales=math.nan), "total_sales must be a finite"),
    "infinite sales": (dict(sales=math.inf), "total_sales must be a finite"),
    "text sales": (dict(sales="7.5"), "total_sales must be a finite"),
    "prices without valid rows": (dict(rows=1, rejected=1, count=0, low=1.0, high=1.0,
                                       mean=1.0), "without valid rows"),
    "no prices for valid rows": (dict(low=None), "must be finite numbers"),
    "infinite price": (dict(high=math.inf), "must be finite numbers"),
    "mean above max": (dict(mean=4.5), "min_price <= avg_price <= max_price"),
    "mean below min": (dict(mean=0.5), "min_price <= avg_price <= max_price"),
}


def stats(**changes) -> tuple:
    values = dict(GOOD, **changes)
    return tuple(values[k] for k in ("rows", "rejected", "sales", "low", "high", "mean", "count"))


@pytest.mark.parametrize("case", sorted(BAD_STATS))
def test_check_stats_refuses(case):
    """Rule: counts are non-negative 64-bit ints with price_count = rows -
    rejected, sales is finite, and the price statistics are None without
    valid rows, else finite with min <= mean <= max."""
    changes, words = BAD_STATS[case]
    with pytest.raises(protocol.ProtocolError, match=words):
        server_mod.check_stats("chunk 0", *stats(**changes))


def test_check_stats_accepts_valid_metrics():
    """The control for the cases above: valid metrics pass, also with no valid
    row (None prices) and with a mean a rounding error past max."""
    server_mod.check_stats("chunk 0", *stats())
    server_mod.check_stats("chunk 0", *stats(rows=2, rejected=2, count=0, sales=0.0, low=None,
                                             high=None, mean=None))
    server_mod.check_stats("chunk 0", *stats(mean=4.0 * (1 + 1e-12)))


def handler(book=None, group_col=None, worker_id="w"):
    """A stand-in for a server Handler: the attributes its check methods read."""
    srv = types.SimpleNamespace(job_id=JOB, book=book,
                                info=types.SimpleNamespace(group_col=group_col))
    return types.SimpleNamespace(server=srv, worker_id=worker_id)


def ids(**changes) -> dict:
    return dict({"type": protocol.RESULT, "job_id": JOB, "worker_id": "w", "chunk_id": 1,
                 "attempt_id": 2}, **changes)


BAD_IDS = {
    "another job": (dict(job_id="0" * 16), "another job"),
    "another worker's name": (dict(worker_id="x"), "worker_id differs"),
    "negative chunk": (dict(chunk_id=-1), "unknown chunk"),
    "chunk past the end": (dict(chunk_id=3), "unknown chunk"),
    "chunk id as text": (dict(chunk_id="1"), "chunk_id must be int"),
    "attempt never issued": (dict(attempt_id=99), "unknown attempt"),
    "attempt of another chunk": (dict(attempt_id=1), "unknown attempt"),
    "attempt of another worker": (dict(attempt_id=3, chunk_id=2), "unknown attempt"),
}


@pytest.mark.parametrize("case", sorted(BAD_IDS))
def test_check_ids_refuses(case):
    """Rule: a RESULT or FAILED belongs to this job, to the worker that said
    HELLO on this connection, to a real chunk, and to an attempt issued for
    that chunk to that worker."""
    book, _ = make_book(chunks=3)
    book.lease("w", conn=1)            # attempt 1: chunk 0 to w
    book.lease("w", conn=1)            # attempt 2: chunk 1 to w
    book.lease("x", conn=2)            # attempt 3: chunk 2 to x
    changes, words = BAD_IDS[case]
    with pytest.raises(protocol.ProtocolError, match=words):
        server_mod.Handler.check_ids(handler(book), ids(**changes))
    assert server_mod.Handler.check_ids(handler(book), ids()) == (1, 2)


def group(key, rows=2, rejected=0, sales=5.0, low=1.0, high=4.0, mean=2.5, count=None):
    return (key, rows, rejected, sales, low, high, mean, rows - rejected if count is None else count)


BAD_GROUPS = {
    "not a list": ("North", "groups must be list"),
    "a row of 7 fields": ([group("North")[:7]], "8 fields"),
    "a number as group value": ([group(7), group("South", rows=1)], "wrong type"),
    "the same group twice": ([group("North"), group("North", rows=1)], "distinct strings"),
    "bad stats in a group": ([group("North", count=1), group("South", rows=1)],
                             "group 'North': inconsistent"),
    "group rows do not add up": ([group("North"), group("South", rows=2)], "do not add up"),
    "group rejected rows do not add up": ([group("North", rejected=1), group("South", rows=1)],
                                          "rejected_rows do not add up"),
    "group sales do not add up": ([group("North"), group("South", rows=1, sales=6.0)],
                                  "total_sales do not add up"),
    "group prices are not the chunk's": ([group("North", high=3.0),
                                          group("South", rows=1, high=3.0)], "prices do not match"),
    "a group of no rows": ([group("North"), group("South", rows=1),
                            group("East", rows=0, sales=0.0, low=None, high=None, mean=None)],
                           "has no rows"),
}


@pytest.mark.parametrize("case", sorted(BAD_GROUPS))
def test_check_groups_refuses(case):
    """Rule: with --group-by, a RESULT's groups are a list of 8-field rows with
    distinct string (or None) values, each valid metrics with at least one
    row, adding up to the chunk's rows, rejected rows, valid prices and sales,
    with the chunk's min and max price among them.  The shape is the schema's (protocol.check), the rest
    check_groups'; handle_result runs both, in this order."""
    def result(groups):
        return ids(rows_processed=3, rejected_rows=0, total_sales=10.0, min_price=1.0,
                   max_price=4.0, avg_price=2.5, price_count=3, groups=groups)

    def both(msg):
        protocol.check(msg)
        return server_mod.Handler.check_groups(handler(group_col="Region"), msg, 0)

    groups, words = BAD_GROUPS[case]
    with pytest.raises(protocol.ProtocolError, match=words):
        both(result(groups))
    good = [group("North"), group(None, rows=1)]
    assert both(result(good)) == good


def test_groups_without_group_by_are_refused():
    """Rule: a RESULT may carry groups only when the job has --group-by."""
    with pytest.raises(protocol.ProtocolError, match="no --group-by"):
        server_mod.Handler.check_groups(handler(), {"rows_processed": 2,
                                                    "groups": [group("North")]}, 0)
    assert server_mod.Handler.check_groups(handler(), {"rows_processed": 2, "groups": []}, 0) == []


# --- 4. Through an in-process server: ACK after commit, WAIT, leases per connection --

def test_ack_is_sent_only_after_the_commit(job_server):
    """Rule: the ACK is the commit receipt.  The store is held inside
    record_result: while it is held no ACK exists on the connection, and
    nothing is in the database; once released, the ACK comes and the
    result is stored."""
    job = job_server(chunks=1)
    job.store.hold = True
    client = job.client("w")
    work = client.take()
    client.send(client.result_for(work))
    assert job.store.entered.wait(10), "the RESULT never reached the store"
    assert client.nothing_arrives(0.5), "an ACK was sent before the commit"
    assert job.store.final_aggregate(JOB)["total_rows"] == 0
    job.store.release.set()
    assert client.recv() == {"type": protocol.ACK, "chunk_id": 0, "counted": True}
    assert job.store.final_aggregate(JOB)["total_rows"] == 4


def test_ack_with_the_next_job_is_sent_only_after_one_commit_of_both(job_server):
    """Rule: a RESULT that asks for the ``next`` chunk gets its ACK and the
    next JOB only after one commit that holds the result and the next lease:
    while the store is held nothing arrives and the next attempt has no row;
    then ACK(next) and JOB come, and the JOB's attempt is already recorded."""
    job = job_server(chunks=2)
    job.store.hold = True
    client = job.client("w")
    work = client.take()
    client.send(client.result_for(work, next=True))
    assert job.store.entered.wait(10), "the RESULT never reached the store"
    assert client.nothing_arrives(0.5), "an ACK or a JOB was sent before the commit"
    assert job.attempts() == [(work["attempt_id"], 0, "w", "leased")]
    job.store.release.set()
    assert client.recv() == {"type": protocol.ACK, "chunk_id": 0, "counted": True, "next": True}
    nxt = client.recv()
    assert nxt["type"] == protocol.JOB and nxt["chunk_id"] == 1
    assert job.attempts() == [(work["attempt_id"], 0, "w", "counted"),
                              (nxt["attempt_id"], 1, "w", "leased")]
    client.send(client.result_for(nxt, next=True))
    assert client.recv() == {"type": protocol.ACK, "chunk_id": 1, "counted": True, "next": True}
    assert client.recv() == {"type": protocol.NO_JOB}
    assert_aggregate(job.store.final_aggregate(JOB), oracle(job.info.path, "Price", "Qty"))


def test_next_lease_passes_over_the_chunk_being_reported(job_server):
    """Rule: a late RESULT (its lease expired, the chunk is back in the queue)
    that asks for the next chunk is not handed its own chunk again: it
    commits, and the worker hears WAIT or NO_JOB, not a JOB for a done chunk."""
    job = job_server(chunks=1)
    client = job.client("w")
    work = client.take()
    job.clock.now += 61
    assert [lease.chunk_id for lease in job.book.expire()] == [0]
    client.send(client.result_for(work, next=True))
    assert client.recv() == {"type": protocol.ACK, "chunk_id": 0, "counted": True, "next": True}
    assert client.recv() == {"type": protocol.NO_JOB}
    assert job.attempts() == [(work["attempt_id"], 0, "w", "counted")]


def test_result_asking_for_more_while_holding_a_chunk_is_hoarding(job_server):
    """Rule: one lease per connection holds for RESULT(next) as for GET_JOB:
    reporting an old attempt while holding another chunk, and asking for
    more, is refused with ERROR, and the held chunk goes back."""
    job = job_server(chunks=2)
    client = job.client("w")
    old = client.take()
    job.clock.now += 61
    job.book.expire()
    held = client.take()             # the expired chunk again, retried first
    assert held["chunk_id"] == old["chunk_id"]
    client.send(client.result_for(old, next=True))
    reply = client.recv()
    assert reply["type"] == protocol.ERROR and "while holding chunk" in reply["reason"]
    assert client.closed_by_server()
    wait_for(lambda: not job.book.leases, 10,
             "the held lease to end")


def test_worker_dying_right_after_ack_and_job_loses_only_that_lease(job_server):
    """Rule: a worker that gets ACK+JOB and then goes silent holds just that
    one lease; when it expires, another worker does the chunk and the job is
    exact, every chunk counted once."""
    job = job_server(rows=[(float(i), i % 3) for i in range(1, 9)], chunks=4)
    dying = job.client("dying")
    work = dying.take()
    dying.send(dying.result_for(work, next=True))
    assert dying.recv()["type"] == protocol.ACK
    lost = dying.recv()
    assert lost["type"] == protocol.JOB                  # ... and it dies, silent
    job.clock.now += 61
    assert [lease.attempt_id for lease in job.book.expire()] == [lost["attempt_id"]]
    helper = WorkerThread(job.port, "helper")
    assert helper.wait(60) == 0
    assert_aggregate(job.store.final_aggregate(JOB), oracle(job.info.path, "Price", "Qty"))
    counted = sorted(c for _, c, _, outcome in job.attempts() if outcome == "counted")
    assert counted == [0, 1, 2, 3]
    assert (lost["attempt_id"], lost["chunk_id"], "dying", "leased") in job.attempts()


def test_store_failure_closes_the_connection_without_an_ack(job_server):
    """Rule: when the commit fails, the worker gets no ACK (so it keeps its
    RESULT): the connection closes, the job stops with the reason, and the
    chunk is not done."""
    job = job_server(chunks=1)
    job.store.fail = StoreError("cannot write the results database: disk full")
    client = job.client("w")
    work = client.take()
    client.send(client.result_for(work))
    try:
        reply = client.recv()
    except (protocol.ConnectionClosed, ConnectionError):
        reply = None
    assert reply is None or reply["type"] == protocol.ERROR, reply
    assert "disk full" in (job.server.fatal or "")
    assert job.book.counts()["DONE"] == 0


def test_idle_worker_hears_wait_while_a_chunk_is_leased(job_server):
    """Rule: while a chunk is leased and not done, a worker asking for work
    hears WAIT, never NO_JOB; once the chunk is done, everyone hears NO_JOB."""
    job = job_server(chunks=2)
    holder, idle = job.client("holder"), job.client("idle")
    held = holder.take()
    assert idle.send_result(idle.take())["type"] == protocol.ACK
    reply = idle.get_job()
    assert reply["type"] == protocol.WAIT and reply["retry_after"] > 0
    assert holder.send_result(held)["counted"] is True
    assert idle.get_job()["type"] == protocol.NO_JOB
    assert holder.get_job()["type"] == protocol.NO_JOB


def test_get_job_is_held_until_the_last_chunk_completes(job_server):
    """Rule: while the only chunk is leased, a second worker's GET_JOB gets no
    WAIT: it is held, and answered NO_JOB as soon as the first worker's RESULT
    completes the job (wait_interval is 30 s, so a WAIT could only come first)."""
    job = job_server(chunks=1, wait_interval=30.0)
    asked = threading.Event()
    lease = job.book.lease

    def spy(worker_id, conn, besides=None):
        found = lease(worker_id, conn, besides)
        if worker_id == "b" and found is None:
            asked.set()     # b's GET_JOB reached the book and found nothing pending
        return found

    job.book.lease = spy
    a, b = job.client("a"), job.client("b")
    work = a.take()
    b.send({"type": protocol.GET_JOB})
    assert asked.wait(30)
    ack = a.send_result(work)
    assert ack["type"] == protocol.ACK and ack["counted"]
    assert b.recv()["type"] == protocol.NO_JOB


def test_late_result_after_a_re_lease_is_acked_but_not_counted(job_server):
    """Rule (first wins, through the server): a lease expires, the chunk is
    re-leased and counted by another worker; the first worker's late RESULT
    is acknowledged with counted=False, and the aggregate counts the chunk
    once."""
    job = job_server(chunks=1, lease_timeout=10.0)
    slow, fast = job.client("slow"), job.client("fast")
    late = slow.take()
    job.clock.now = 10.0
    (expired,) = job.book.expire()            # what the server's main loop does
    job.store.end_attempt(JOB, expired.attempt_id, Outcome.EXPIRED)
    again = fast.take()
    assert (again["chunk_id"], again["attempt_id"]) == (late["chunk_id"], late["attempt_id"] + 1)
    assert fast.send_result(again) == {"type": protocol.ACK, "chunk_id": 0, "counted": True}
    assert slow.send_result(late) == {"type": protocol.ACK, "chunk_id": 0, "counted": False}
    assert [a[2:] for a in job.attempts()] == [
        ("slow", Outcome.DUPLICATE), ("fast", Outcome.COUNTED)]
    assert_aggregate(job.store.final_aggregate(JOB), oracle(job.info.path, "Price", "Qty"))


def test_dropped_connection_puts_its_chunk_back(job_server):
    """Rule: when a connection closes, the chunk it held is pending again at
    once (no need to wait for the lease) and is the next one handed out."""
    job = job_server(chunks=2)
    gone = job.client("gone")
    held = gone.take()
    gone.close()
    wait_for(lambda: job.book.counts()["PENDING"] == 2, 10, "the dropped lease to end")
    assert job.client("next").take()["chunk_id"] == held["chunk_id"]
    assert job.attempts()[0][2:] == ("gone", "dropped")


def test_one_lease_per_connection(job_server):
    """Rule: a worker computes one chunk at a time; a second GET_JOB before
    reporting (hoarding chunks) is refused and drops the connection."""
    job = job_server(chunks=2)
    client = job.client("hoarder")
    client.take()
    reply = client.get_job()
    assert reply["type"] == protocol.ERROR and "while holding chunk" in reply["reason"]


def test_result_with_the_wrong_row_count_is_a_failed_attempt(job_server):
    """Rule: a RESULT must report the chunk's row count; an invalid RESULT for
    a real lease is refused (ERROR) and counts as a failed attempt, so a
    worker that computes it the same way every time ends the job instead of
    looping.  Nothing is stored."""
    job = job_server(chunks=2)
    client = job.client("w")
    work = client.take()
    bad = client.result_for(work)
    bad.update(rows_processed=bad["rows_processed"] + 1, price_count=bad["price_count"] + 1)
    reply = client.ask(bad)
    assert reply["type"] == protocol.ERROR and "result says" in reply["reason"]
    assert job.attempts()[0][3] == Outcome.FAILED and job.book.failures[work["chunk_id"]] == 1
    assert job.store.final_aggregate(JOB)["total_rows"] == 0


def test_poison_chunk_fails_the_job_with_exit_1(job_server, capsys):
    """Rule: a chunk whose attempts report failure --max-attempts times is
    FAILED; the job then ends with exit 1 naming the chunk and its error,
    never with an aggregate that lacks the chunk."""
    job = job_server(chunks=1, max_attempts=2)
    client = job.client("w")
    for n in range(2):
        assert client.send_failed(client.take(), f"boom {n}")["type"] == protocol.ACK
    assert job.book.finished.is_set()
    assert server_mod.report(job.server) == 1
    out, err = capsys.readouterr()
    assert "total_rows" not in out and "chunk 0: boom 1" in err


# --- 5. The worker: at-least-once delivery, WAIT, clamps -----------------------------

def test_worker_keeps_asking_after_wait():
    """Rule: a worker told WAIT sleeps retry_after and asks again; it exits
    only on NO_JOB (an idle worker that left on WAIT could leave the job
    with nobody to finish a chunk whose holder dies)."""
    def script(fake, conn, n):
        assert fake.recv(conn)["type"] == protocol.GET_JOB
        protocol.send_message(conn, protocol.WAIT, retry_after=0.01)
        assert fake.recv(conn)["type"] == protocol.GET_JOB   # still there
        protocol.send_message(conn, protocol.NO_JOB)

    fake = FakeServer(script)
    worker = WorkerThread(fake.port, "patient")
    fake.check()
    assert worker.wait(30) == 0
    assert [m["type"] for m in fake.received] == [protocol.HELLO, protocol.GET_JOB,
                                                  protocol.GET_JOB]


def test_worker_resends_an_unacknowledged_result_after_reconnecting():
    """Rule: a RESULT is kept until its ACK arrives; if the connection drops
    first, the worker reconnects (with backoff) and sends the same RESULT
    again before asking for more work."""
    def script(fake, conn, n):
        if n == 0:
            assert fake.recv(conn)["type"] == protocol.GET_JOB
            protocol.send_message(conn, protocol.JOB, **job_message(attempt_id=7))
            fake.recv(conn)
            conn.close()                                   # the ACK is lost
            return
        assert fake.recv(conn)["type"] == protocol.RESULT  # before any GET_JOB
        protocol.send_message(conn, protocol.ACK, chunk_id=0, counted=True)
        assert fake.recv(conn)["type"] == protocol.GET_JOB
        protocol.send_message(conn, protocol.NO_JOB)

    fake = FakeServer(script, connections=2)
    worker = WorkerThread(fake.port, "resender")
    fake.check()
    assert worker.wait(30) == 0
    first, again = [m for m in fake.received if m["type"] == protocol.RESULT]
    assert again == first and first["attempt_id"] == 7 and first["total_sales"] == 17.0


def test_worker_refuses_an_ack_for_another_chunk():
    """Rule: only an ACK naming the chunk just reported is its commit receipt;
    an ACK for another chunk is a broken server (exit 1), not a delivery."""
    def script(fake, conn, n):
        assert fake.recv(conn)["type"] == protocol.GET_JOB
        protocol.send_message(conn, protocol.JOB, **job_message())
        assert fake.recv(conn)["type"] == protocol.RESULT
        protocol.send_message(conn, protocol.ACK, chunk_id=1, counted=True)
        try:
            asked = fake.recv(conn)
        except protocol.ConnectionClosed:
            return                                         # the worker hung up: right
        if asked["type"] == protocol.GET_JOB:
            protocol.send_message(conn, protocol.NO_JOB)

    fake = FakeServer(script)
    worker = WorkerThread(fake.port, "careful")
    fake.check()
    assert worker.wait(30) == 1
    assert [m["type"] for m in fake.received][-1] == protocol.RESULT


@pytest.mark.parametrize("retry_after, delay", [
    (0.2, 0.2), (0, 0.01), (-1e300, 0.01), (6, 5.0), (1e300, 5.0), (math.inf, 5.0),
    (math.nan, 0.5), ("soon", 0.5), (True, 0.5), (None, 0.5)])
def test_wait_delay_is_clamped(retry_after, delay):
    """Rule: a WAIT's retry_after is clamped to 0.01..5 s (0.5 s if it is not
    a number): a broken server can make a worker neither spin nor sleep for
    ever."""
    assert worker_mod._retry_after({"type": protocol.WAIT, "retry_after": retry_after}) == delay


class RecordingStop:
    """Stands in for Worker.stopping: records each backoff delay, never sleeps,
    and reports "stop" after ``limit`` delays."""

    def __init__(self, limit: int):
        self.delays, self.limit = [], limit

    def is_set(self) -> bool:
        return False

    def wait(self, seconds: float) -> bool:
        self.delays.append(seconds)
        return len(self.delays) >= self.limit


def refusing_worker(monkeypatch, limit: int = 9, give_up_after: float = 3600):
    """A Worker whose every connection attempt is refused, and that never sleeps."""
    def refuse():
        raise ConnectionRefusedError("nobody listens")

    worker = worker_mod.Worker("127.0.0.1", 1, "w", give_up_after=give_up_after)
    worker.stopping = RecordingStop(limit)
    monkeypatch.setattr(worker, "_open", refuse)
    return worker


BOUNDS = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]


def test_reconnect_backoff_doubles_up_to_5_s(monkeypatch):
    """Rule: the bound of the reconnect delay starts at 0.1 s and doubles up to
    5 s, never more (here each delay is drawn at its bound)."""
    monkeypatch.setattr(worker_mod.random, "uniform", lambda low, high: high)
    worker = refusing_worker(monkeypatch)
    with pytest.raises(worker_mod.GiveUp):
        worker.connect()
    assert worker.stopping.delays == BOUNDS


def test_reconnect_delays_are_jittered(monkeypatch):
    """Rule: each delay is drawn uniformly below its bound ("full jitter"), so
    workers restarted together do not reconnect in lockstep."""
    delays = []
    for _ in range(2):
        worker = refusing_worker(monkeypatch)
        with pytest.raises(worker_mod.GiveUp):
            worker.connect()
        delays.append(worker.stopping.delays)
    for run in delays:
        assert all(0 <= d <= b for d, b in zip(run, BOUNDS, strict=True))
    assert delays[0] != delays[1] and delays[0] != BOUNDS


def test_last_reconnect_delay_ends_at_the_give_up_deadline(monkeypatch):
    """Rule: no reconnect delay runs past the --give-up-after deadline; the
    worker tries once more there and gives up.  Regression: with 3 s and each
    delay drawn at its bound, it slept 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s and gave
    up at 3.1 s; with jitter, a last draw of up to 5 s made 3 s into 8."""
    clock = FakeClock()
    monkeypatch.setattr(worker_mod.time, "monotonic", clock)
    monkeypatch.setattr(worker_mod.random, "uniform", lambda low, high: high)
    worker = refusing_worker(monkeypatch, give_up_after=3)
    record = worker.stopping.wait

    def wait(seconds):
        clock.now += seconds
        return record(seconds)

    worker.stopping.wait = wait
    with pytest.raises(worker_mod.GiveUp, match="unreachable"):
        worker.connect()
    assert worker.stopping.delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.5])
    assert clock.now == pytest.approx(3.0)


def test_worker_gives_up_after_give_up_after(monkeypatch):
    """Rule: a server unreachable for --give-up-after seconds ends the worker
    (GiveUp, exit 1) instead of a reconnect loop for ever."""
    worker = refusing_worker(monkeypatch, give_up_after=1e-6)
    with pytest.raises(worker_mod.GiveUp, match="unreachable"):
        worker.connect()


# --- 6. Safe decoding: each layer of the defence alone -------------------------------

def test_unpickler_alone_refuses_every_global(tmp_path):
    """Rule: the unpickler itself resolves no global, whatever the opcode walk
    lets through: os.system is never called, and even a harmless global
    (collections.OrderedDict) is refused."""
    marker = tmp_path / "pwned"
    for payload in (pickle.dumps({"type": protocol.HELLO, "x": RunsCode(marker)}, protocol=5),
                    pickle.dumps(RunsCode(marker), protocol=2),
                    pickle.dumps(__import__("collections").OrderedDict(), protocol=5)):
        with pytest.raises(pickle.UnpicklingError, match="forbidden"):
            protocol._NoGlobalsUnpickler(io.BytesIO(payload)).load()
    assert not marker.exists()


@pytest.mark.parametrize("pickle_protocol", [0, 2, 5])
def test_opcode_walk_alone_refuses_globals_and_calls(pickle_protocol, tmp_path):
    """Rule: the opcode walk refuses a global (GLOBAL, STACK_GLOBAL) and a call
    (REDUCE) before any object is built, whatever the unpickler would do."""
    payload = pickle.dumps({"type": protocol.HELLO, "x": RunsCode(tmp_path / "pwned")},
                           protocol=pickle_protocol)
    with pytest.raises(protocol.ProtocolError, match="is not allowed"):
        protocol._check_shape(payload)
    protocol._check_shape(protocol.encode({"type": protocol.HELLO, "worker_id": "w"}))


# --- 7. The handshake: a server that does not know the secret ------------------------

def impostor_protocol():
    """A second copy of protocol.py whose HMAC checks always pass.

    It speaks the handshake exactly as the real server does, but it does not
    know the secret and accepts whatever the worker answers ("welcomes" it).
    Only this copy is changed: the real module, used by the worker side of
    the test, still checks every answer.
    """
    spec = importlib.util.spec_from_file_location("impostor_protocol", ROOT / "protocol.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trusting = types.SimpleNamespace(**{n: getattr(hmac, n) for n in dir(hmac)
                                        if not n.startswith("__")})
    trusting.compare_digest = lambda a, b: True
    module.hmac = trusting
    if hasattr(module, "compare_digest"):
        module.compare_digest = trusting.compare_digest
    return module


def test_worker_refuses_a_server_that_does_not_know_the_secret():
    """Rule: authentication is mutual: a server that welcomes the worker
    without knowing the secret, then answers the worker's challenge with
    the wrong key, is refused by client_handshake (no chunk is ever taken
    from an impostor)."""
    impostor = impostor_protocol()
    theirs, ours = socket.socketpair()
    theirs.settimeout(10)
    ours.settimeout(10)

    def serve():
        try:
            impostor.server_handshake(theirs, b"not the secret")
        except Exception:  # the worker hung up on it: that is the point
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(protocol.ProtocolError):
            protocol.client_handshake(ours, b"the secret")
    finally:
        ours.close()
        thread.join(10)
        theirs.close()


# --- 8. Identity and resume: server.run in this process ------------------------------

_runs = itertools.count()


def run_server(tmp_path, csv, db, *options, worker: bool = True) -> int:
    """``server.run`` in this process with one WorkerThread; return the exit code.

    ``worker=False`` starts none: a job complete at start reports at once.
    The server's signal handlers are put back afterwards.  --linger is long:
    the server leaves as soon as every worker that took part heard NO_JOB.
    """
    port_file = tmp_path / f"port-{next(_runs)}"
    args = server_mod.parse_args(["--csv", str(csv), "--db", str(db), "--port", "0",
                                  "--port-file", str(port_file), "--linger", "30", *options])

    def port():
        return wait_for(lambda: port_file.exists() and int(port_file.read_text()), 30,
                        "the port file")

    thread = WorkerThread(port, "w") if worker else None
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = server_mod.run(args)
    finally:
        for sig, handler_ in saved.items():
            signal.signal(sig, handler_)
    assert thread is None or thread.wait(30) == 0
    return code


def test_rewritten_file_is_a_new_job_not_a_resume(tmp_path, capsys):
    """Rule: the job identity covers the content, not only size and mtime: a
    file rewritten at the same size with its mtime restored (cp -p, rsync
    -a) is a new job, and its answer is the new content's."""
    csv, db = tmp_path / "s.csv", tmp_path / "r.sqlite"
    csv.write_bytes(b"Price,Quantity\n" + b"3.00,1\n" * 1000)
    stat = csv.stat()
    assert run_server(tmp_path, csv, db) == 0
    assert parse_final(capsys.readouterr().out)["total_sales"] == 3000.0
    csv.write_bytes(b"Price,Quantity\n" + b"4.00,1\n" * 1000)
    os.utime(csv, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (csv.stat().st_size, csv.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert run_server(tmp_path, csv, db) == 0
    assert parse_final(capsys.readouterr().out)["total_sales"] == 4000.0
    assert len(db_rows(str(db), "SELECT job_id FROM jobs")) == 2


def test_a_new_chunking_is_a_new_job(tmp_path, capsys):
    """Rule: the identity covers the chunking: the same file cut into 3
    chunks after a run with 2 is a new job (chunk 0 of one is not chunk 0
    of the other), and both answers are exact."""
    csv, db = tmp_path / "s.csv", tmp_path / "r.sqlite"
    csv.write_text("Price,Qty\n1.5,1\n2.5,2\n3.5,3\n4.5,4\n5.5,5\n")
    for chunks in ("2", "3"):
        assert run_server(tmp_path, csv, db, "--chunks", chunks) == 0
        assert_aggregate(parse_final(capsys.readouterr().out), oracle(csv, "Price", "Qty"))
    assert len(db_rows(str(db), "SELECT job_id FROM jobs")) == 2


def test_restart_resumes_without_redoing_chunks(tmp_path, capsys):
    """Rule: the same command again resumes: every chunk already counted stays
    counted and is never handed out again."""
    csv, db = tmp_path / "s.csv", tmp_path / "r.sqlite"
    csv.write_text("Price,Qty\n1.5,1\n2.5,2\n3.5,3\n4.5,4\n")
    assert run_server(tmp_path, csv, db, "--chunks", "2") == 0
    first = parse_final(capsys.readouterr().out)
    attempts = db_rows(str(db), "SELECT attempt_id, chunk_id, outcome FROM attempts")
    assert run_server(tmp_path, csv, db, "--chunks", "2", worker=False) == 0
    assert parse_final(capsys.readouterr().out) == first
    assert db_rows(str(db), "SELECT attempt_id, chunk_id, outcome FROM attempts") == attempts


def test_file_fingerprint_sees_a_same_size_same_mtime_rewrite(tmp_path):
    """Rule: the fingerprint samples the content, so a rewrite that keeps the
    size and the mtime still changes it."""
    path = tmp_path / "s.csv"
    path.write_bytes(b"Price,Quantity\n" + b"3.00,1\n" * 1000)
    before = server_mod.file_fingerprint(str(path))
    stat = path.stat()
    path.write_bytes(b"Price,Quantity\n" + b"4.00,1\n" * 1000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = server_mod.file_fingerprint(str(path))
    assert (after["size"], after["mtime_ns"]) == (before["size"], before["mtime_ns"])
    assert after["sample"] != before["sample"]


# --- 9. The command line refuses what would break a rule -----------------------------

@pytest.mark.parametrize("option, value", [
    ("--lease-timeout", "0"), ("--lease-timeout", "-5"), ("--lease-timeout", "nan"),
    ("--lease-timeout", "inf"), ("--max-attempts", "0"), ("--max-attempts", "-1"),
    ("--chunks", "0")])
def test_server_refuses_bounds_that_break_a_rule(option, value, capsys):
    """Rule: a lease of 0 s (or less) would expire every lease at once, an
    infinite one never; --max-attempts 0 would fail every chunk untried:
    each is a usage error (exit 2), not a job."""
    with pytest.raises(SystemExit) as stop:
        server_mod.parse_args(["--csv", "x.csv", option, value])
    assert stop.value.code == 2
    assert option in capsys.readouterr().err


def test_server_writes_small_frames_at_once(job_server):
    """Rule: the server's sockets have Nagle's algorithm off (TCP_NODELAY): an ACK
    followed by a separate NO_JOB or WAIT otherwise waited for the worker's delayed
    TCP acknowledgement, 40 ms on Linux, at the end of every job."""
    job = job_server(chunks=1)
    client = job.client("w")
    assert client.send_result(client.take())["counted"] is True
    assert client.get_job()["type"] == protocol.NO_JOB
    conns = list(job.server._conns)
    assert conns
    for sock in conns:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_results_deleted_under_the_job_fail_it_instead_of_a_short_total(job_server, capsys):
    """Rule: the final aggregate needs every chunk's result in the database. Attack
    run: a second server started with --fresh on the same job and database deleted
    the results the first had counted, and the first printed 18,995 of 100,000 rows
    with exit 0. Now it says what is missing and exits 1 (the same command resumes)."""
    job = job_server(chunks=3)
    client = job.client("w")
    for _ in range(2):
        assert client.send_result(client.take())["counted"] is True
    job.store.open_job(JOB, "x.csv", "identity", 3, fresh=True)   # the other server's --fresh
    assert client.send_result(client.take())["counted"] is True
    assert job.book.finished.is_set()
    assert server_mod.report(job.server) == server_mod.EXIT_FAILED
    out, err = capsys.readouterr()
    assert "total_rows" not in out
    assert "holds 1 of 3 chunks' results at the end; were they deleted under the job" in err


def test_a_stopping_job_leases_no_more_chunks(job_server):
    """Rule: once the job is stopping (a signal, or fail_job for a reason no worker can
    fix) a GET_JOB is answered WAIT and a RESULT's ACK brings no JOB; a result still
    commits. Attack run: a --stream job stopped for a modified file went on leasing
    for 0.3 s (93 attempts), then logged 'chunk N FAILED: lost 10 times' for chunks
    that were lost only because the server was going."""
    job = job_server(chunks=3)
    client = job.client("w")
    held = client.take()
    job.server.fail_job("the input broke")
    ack = client.ask({**client.result_for(held), "next": True})
    assert (ack["type"], ack["counted"]) == (protocol.ACK, True)
    assert client.recv()["type"] == protocol.WAIT
    assert client.get_job()["type"] == protocol.WAIT
    assert [a[1] for a in job.attempts()] == [held["chunk_id"]]


def test_end_of_job_waits_until_every_worker_heard_no_job_and_hung_up(job_server):
    """Rule: at the end of a job the server waits (up to --linger) while a worker of
    the job has not heard NO_JOB or is still connected, and no longer: the waiting
    call returns once the last one hangs up, or at once when the job is stopped."""
    job = job_server(chunks=1)
    client = job.client("w")
    assert client.send_result(client.take())["counted"] is True
    waiter = threading.Thread(target=job.server.wait_for_workers, args=(60.0,))
    waiter.start()
    assert client.get_job()["type"] == protocol.NO_JOB
    client.close()
    waiter.join(30)
    assert not waiter.is_alive(), "still waiting after the worker heard NO_JOB and left"

    other = job.client("late")      # connected, never told: only a stop ends the wait
    waiter = threading.Thread(target=job.server.wait_for_workers, args=(60.0,))
    waiter.start()
    job.server.stop.set()
    waiter.join(30)
    assert not waiter.is_alive(), "a stopped job still waits for its workers"
    other.close()
