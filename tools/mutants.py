"""Break one rule at a time and watch its tests catch it (a mutation audit).

    python tools/mutants.py                          # every mutant, one after the other
    python tools/mutants.py --list                   # the table, without running anything
    python tools/mutants.py --only ack-before-commit --diff
    python tools/mutants.py --only ack-before-commit worker-exits-on-wait --repeat 5
    python tools/mutants.py --jobs 2                 # two mutants at a time

README's table "How it stays correct" promises that every rule has a test
that fails when the rule is broken.  This tool keeps the promise honest.
Each *mutant* below is one small edit of one file that breaks one rule (or
one check the server makes of what a peer sends), with the tests that must
notice.  For each mutant the tool

1. copies the repository (the files git knows, no virtual environment) to a
   temporary folder, so the working tree is never touched;
2. replaces the mutant's exact text in its file (it must occur exactly once);
3. runs only that mutant's tests there:
   ``python -m pytest -x -q -p no:cacheprovider -m "" TEST...``, with a
   deadline (``-m ""``: also tests marked slow, which the suite leaves out).

Outcomes: ``caught`` (a test failed, as it must), ``SURVIVED`` (every test
passed: the rule can be broken unseen), ``STALE`` (the text to replace is
not in the file exactly once: the code changed, so update the table) and
``ERROR`` (the tests could not run: an unknown test id, a deadline).  Before
any mutant, the same tests run once on the unmodified copy: a test that
fails without a mutant would "catch" every mutant and prove nothing.

The table at the end lists every mutant; the exit code is 0 only if every
mutant was caught in every repetition (``--repeat``), else 1 (2 if the
tests fail without a mutant).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RULES = "tests/test_rules.py::"
PROTO = "tests/test_protocol.py::"


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One deliberate bug: replace ``old`` (exactly once in ``file``) by ``new``.

    ``old`` and ``new`` may also be tuples of the same length, for a bug
    that takes two edits (moving a line is a deletion and an insertion);
    each ``old`` must then occur exactly once.  ``rule`` names the rule it
    breaks (README, "How it stays correct"); ``tests`` are the pytest node
    ids that must fail because of it.
    """
    name: str
    file: str
    old: str | tuple[str, ...]
    new: str | tuple[str, ...]
    rule: str
    tests: tuple[str, ...]

    def edits(self) -> list[tuple[str, str]]:
        """``[(old, new), ...]``, one pair per replacement."""
        if isinstance(self.old, str):
            return [(self.old, self.new)]
        return list(zip(self.old, self.new, strict=True))

    def counts(self, text: str) -> list[int]:
        """How often each text to replace occurs in ``text`` (each must be 1)."""
        return [text.count(old) for old, _ in self.edits()]

    def apply(self, text: str) -> str:
        for old, new in self.edits():
            text = text.replace(old, new)
        return text


# The rules: each is how a row of README's table "How it stays correct" begins.
FIRST_WINS = "A chunk counts once: the first committed result wins"
UPSERT = "Retries are safe: the same RESULT twice is an idempotent upsert"
ACK = "The ACK is a commit receipt: sent after the commit, never without it"
LEASES = "Leases and re-queueing"
DELIVERY = "At-least-once delivery: a RESULT is kept until its ACK"
NO_EARLY_EXIT = "No early exit"
MEAN = "The weighted mean of chunk means"
DECODING = "Safe decoding: no global, no bomb made of builtins"
FRAMES = "Frames: bounded from the header alone"
HANDSHAKE = "Both ends prove they know the secret"
CHECKED = "Results are checked before they are stored"
POISON = "A poison chunk ends the job"
RESUME = "A restart resumes; a different file never mixes in"
BOUNDS = "Delays and limits are bounded"
LOST = "So does a chunk that is lost over and over"
FRAME_FIT = "No JOB exceeds the workers' frame limit"
DB_RESTART = "A results database that restarts is waited for"
OVERFLOW = "Totals past the float range are the same clear error"
LOCAL = "A worker reads only the one regular file whose fingerprint it verified"
LOCALITY = "tests/test_locality.py::"
PARTITION = "A partition (silence: no FIN, no RST) is ended by the lease"
PARTS = "tests/test_partition.py::"


def M(name, file, old, new, rule, *tests):
    """A table row; test names without a file are in tests/test_rules.py."""
    return Mutant(name, file, old, new, rule,
                  tuple(t if "::" in t else RULES + t for t in tests))


MUTANTS = [
    M("group-sales-need-not-add-up", "server.py",
      "    if abs(math.fsum(sales) - msg[\"total_sales\"]) > slack:",
      "    if False:",
      CHECKED, "test_check_groups_refuses"),
    M("lost-attempts-never-counted", "server.py",
      "            self.losses[chunk_id] += 1\n", "",
      LOST, "test_book_fails_a_chunk_lost_max_lost_times_counted_apart_from_reports"),
    M("frame-limit-ignored-when-cutting", "server.py",
      "    room = protocol.WORKER_MAX_FRAME - envelope\n",
      "    room = 2 ** 40\n",
      FRAME_FIT, "tests/test_failures.py::test_stream_chunks_fit_the_frame_limit_in_process"),
    M("busy-database-never-retried", "db_utils.py",
      "                if not self.transient(exc):\n                    raise\n",
      "                raise\n",
      DB_RESTART, "tests/test_postgres.py::test_busy_sqlite_file_is_retried_then_given_up"),
    M("infinite-total-printed", "db_utils.py",
      "        if not _finite_totals(final):\n            raise AggregateOverflow(f\"the total of all chunks {OVERFLOW}\")\n",
      "",
      OVERFLOW, "tests/test_overflow.py::test_store_refuses_a_final_sum_past_the_range"),
    M("worker-waits-forever-on-a-silent-link", "worker.py",
      "socket.create_connection((self.host, self.port), timeout=self.io_timeout)",
      "socket.create_connection((self.host, self.port), timeout=None)",
      PARTITION, PARTS + "test_partition_longer_than_io_timeout_worker_reconnects_after_heal"),
    # --- the survivors of the first audit (issue 15), then what it found caught -----------
    M("ack-before-commit", "server.py",
      ("        started = time.perf_counter()\n        counted = srv.store.record_result(",
       "        self.send_frame(ack)\n"),
      ("        self.send(protocol.make(protocol.ACK, chunk_id=chunk_id, counted=True))\n"
       "        started = time.perf_counter()\n        counted = srv.store.record_result(", ""),
      ACK, "test_ack_is_sent_only_after_the_commit",
      "test_ack_with_the_next_job_is_sent_only_after_one_commit_of_both"),
    M("unpickler-allows-globals", "protocol.py",
      "        raise pickle.UnpicklingError(f\"global '{module}.{name}' is forbidden\")",
      "        return super().find_class(module, name)",
      DECODING, "test_unpickler_alone_refuses_every_global"),
    M("opcode-walk-admits-globals-and-calls", "protocol.py",
      "        elif name not in (\"PROTO\", \"FRAME\", \"STOP\"):",
      "        elif name not in (\"PROTO\", \"FRAME\", \"STOP\", \"GLOBAL\", \"STACK_GLOBAL\","
      " \"REDUCE\"):",
      DECODING, "test_opcode_walk_alone_refuses_globals_and_calls"),
    M("worker-trusts-any-server", "protocol.py",
      "    if not hmac.compare_digest(reply, _WELCOME + _mac(secret, b\"server\", server_nonce,",
      "    if False and not hmac.compare_digest(reply, _WELCOME + _mac(secret, b\"server\", server_nonce,",
      HANDSHAKE, "test_worker_refuses_a_server_that_does_not_know_the_secret"),
    M("worker-exits-on-wait", "worker.py",
      "                    self.stopping.wait(_retry_after(job))\n                    continue",
      "                    return 0",
      NO_EARLY_EXIT, "test_worker_keeps_asking_after_wait",
      "tests/test_failures.py::test_nobody_stops_while_a_chunk_is_unfinished"),
    M("no-price-count-check", "server.py",
      "rejected > rows or count != rows - rejected:", "rejected > rows:",
      CHECKED, "test_check_stats_refuses"),
    M("no-mean-between-min-and-max", "server.py",
      "    if not (low <= high and low - slack <= mean <= high + slack):",
      "    if not low <= high:",
      CHECKED, "test_check_stats_refuses"),
    M("groups-need-not-add-up", "server.py",
      "        if sum(g[at] for g in groups) != msg[name]:", "        if False:",
      CHECKED, "test_check_groups_refuses"),
    M("identity-without-content-sample", "server.py",
      "        \"path\": os.path.realpath(info.path), **fingerprint,",
      "        \"path\": os.path.realpath(info.path), \"size\": fingerprint[\"size\"],\n"
      "        \"mtime_ns\": fingerprint[\"mtime_ns\"],",
      RESUME, "test_rewritten_file_is_a_new_job_not_a_resume"),
    M("worker-ignores-ack-chunk-id", "worker.py",
      "        if reply[\"type\"] != protocol.ACK or reply[\"chunk_id\"] != message[\"chunk_id\"]:",
      "        if reply[\"type\"] != protocol.ACK:",
      DELIVERY, "test_worker_refuses_an_ack_for_another_chunk"),
    M("wait-delay-without-upper-clamp", "worker.py",
      "    return min(max(float(delay), 0.01), 5.0)", "    return max(float(delay), 0.01)",
      BOUNDS, "test_wait_delay_is_clamped"),
    M("lease-timeout-zero-accepted", "server.py",
      "    g.add_argument(\"--lease-timeout\", type=seconds,",
      "    g.add_argument(\"--lease-timeout\", type=float,",
      BOUNDS, "test_server_refuses_bounds_that_break_a_rule"),
    M("first-wins-becomes-overwrite", "db_utils.py",
      "ON CONFLICT (job_id, chunk_id) DO NOTHING",
      "ON CONFLICT (job_id, chunk_id) DO UPDATE SET worker_id = excluded.worker_id,\n"
      "    attempt_id = excluded.attempt_id, total_sales = excluded.total_sales",
      FIRST_WINS, "test_first_committed_result_wins_and_later_ones_are_duplicates",
      "test_late_result_after_a_re_lease_is_acked_but_not_counted"),
    M("mean-without-weights", "db_utils.py",
      "       SUM(avg_price * price_count) / NULLIF(SUM(price_count), 0) AS avg_price,\n"
      "       COALESCE(SUM(rejected_rows), 0)",
      "       AVG(avg_price)                                         AS avg_price,\n"
      "       COALESCE(SUM(rejected_rows), 0)",
      MEAN, "test_final_mean_is_weighted_by_the_valid_prices_of_each_chunk",
      "tests/test_csv_input.py::test_case_in_process_every_chunking[25-chunk-weighted-mean.csv]"),
    M("leases-never-expire", "server.py",
      "                          self.clock() + self.lease_timeout)",
      "                          math.inf)",
      LEASES, "test_book_lease_expires_at_its_deadline_and_the_chunk_is_retried_first",
      "test_late_result_after_a_re_lease_is_acked_but_not_counted"),
    M("no-job-instead-of-wait", "server.py",
      "            self.send(protocol.make(protocol.WAIT, retry_after=srv.wait_interval))",
      "            self.send(protocol.make(protocol.NO_JOB))",
      NO_EARLY_EXIT, "test_idle_worker_hears_wait_while_a_chunk_is_leased"),

    # --- the ACK is a commit receipt ------------------------------------------------------
    M("ack-although-the-commit-failed", "server.py",
      "        counted = srv.store.record_result(\n"
      "            srv.job_id, dict(zip(fields, values), worker_id=self.worker_id,\n"
      "                             chunk_id=chunk_id, attempt_id=attempt_id), groups,\n"
      "            lease=None if frame is None else (lease.attempt_id, lease.chunk_id,\n"
      "                                              self.worker_id, time.time()))",
      "        try:\n"
      "            counted = srv.store.record_result(\n"
      "                srv.job_id, dict(zip(fields, values), worker_id=self.worker_id,\n"
      "                                 chunk_id=chunk_id, attempt_id=attempt_id), groups)\n"
      "        except StoreError:\n"
      "            counted = False",
      ACK, "test_store_failure_closes_the_connection_without_an_ack"),

    # --- first wins, idempotent upsert, groups ----------------------------------------------
    M("duplicates-counted", "db_utils.py",
      "            counted = cur.rowcount == 1", "            counted = True",
      FIRST_WINS, "test_first_committed_result_wins_and_later_ones_are_duplicates"),
    M("upsert-is-a-plain-insert", "db_utils.py",
      "ON CONFLICT (job_id, worker_id, chunk_id) DO UPDATE SET\n"
      "    {\", \".join(f\"{n} = excluded.{n}\" for n in _NAMES[3:])}",
      "",
      UPSERT, "test_same_result_twice_is_an_idempotent_upsert"),
    M("upsert-keeps-the-old-row", "db_utils.py",
      "ON CONFLICT (job_id, worker_id, chunk_id) DO UPDATE SET\n"
      "    {\", \".join(f\"{n} = excluded.{n}\" for n in _NAMES[3:])}",
      "ON CONFLICT (job_id, worker_id, chunk_id) DO NOTHING",
      UPSERT, "test_same_result_twice_is_an_idempotent_upsert"),
    M("groups-of-duplicates-stored", "db_utils.py",
      "            if counted and groups:", "            if groups:",
      FIRST_WINS, "test_groups_of_a_duplicate_are_never_stored"),

    # --- leases and re-queueing ------------------------------------------------------------
    M("lease-expires-one-tick-late", "server.py",
      "if lease.deadline <= now]", "if lease.deadline < now]",
      LEASES, "test_book_lease_expires_at_its_deadline_and_the_chunk_is_retried_first"),
    M("drop-releases-nothing", "server.py",
      "            gone = [lease for lease in self.leases.values() if lease.conn == conn]",
      "            gone = []",
      LEASES, "test_book_release_returns_only_the_dropped_connections_chunks"),
    M("handler-never-releases", "server.py",
      "            for lease in srv.book.release(self.conn):", "            for lease in []:",
      LEASES, "test_dropped_connection_puts_its_chunk_back"),
    M("server-never-sweeps-expired-leases", "server.py",
      "    for lease in server.book.expire():", "    for lease in []:",
      LEASES, "tests/test_end_to_end.py::test_same_chunk_from_two_workers_counts_once"),
    M("retry-goes-last", "server.py",
      "        self.queue.appendleft(chunk_id)", "        self.queue.append(chunk_id)",
      LEASES, "test_book_lease_expires_at_its_deadline_and_the_chunk_is_retried_first"),
    M("re-leased-chunk-queued-twice", "server.py",
      "        if any(lease.chunk_id == chunk_id for lease in self.leases.values()):\n"
      "            return\n",
      "",
      LEASES, "test_book_re_leased_chunk_is_never_queued_twice"),
    M("finished-ignores-failed-chunks", "server.py",
      "self.state[self._scanned] in (ChunkState.DONE, ChunkState.FAILED)):",
      "self.state[self._scanned] == ChunkState.DONE):",
      LEASES, "test_book_fails_a_chunk_after_max_attempts_reports"),
    M("anyone-may-report-any-attempt", "server.py",
      "            return self.attempt_owner.get(attempt_id) == (chunk_id, worker_id)",
      "            return attempt_id in self.attempt_owner",
      CHECKED, "test_book_lease_expires_at_its_deadline_and_the_chunk_is_retried_first",
      "test_check_ids_refuses"),
    M("hoarding-allowed", "server.py",
      "        if held is not None:", "        if False:",
      LEASES, "test_one_lease_per_connection"),

    # --- at-least-once delivery (the worker) ---------------------------------------------
    M("worker-forgets-unacked-result", "worker.py",
      "                log.warning(\"%s: connection lost (%s); reconnecting\", self.worker_id, exc)\n"
      "                self.disconnect()",
      "                log.warning(\"%s: connection lost (%s); reconnecting\", self.worker_id, exc)\n"
      "                unacked = None\n                self.disconnect()",
      DELIVERY, "test_worker_resends_an_unacknowledged_result_after_reconnecting"),

    # --- no early exit ---------------------------------------------------------------------
    M("get-job-not-held", "server.py",
      "            srv.book.finished.wait(srv.wait_interval)\n",
      "",
      NO_EARLY_EXIT, "test_get_job_is_held_until_the_last_chunk_completes"),

    # --- the weighted mean -----------------------------------------------------------------
    M("mean-weighted-by-rows", "db_utils.py",
      "       SUM(avg_price * price_count) / NULLIF(SUM(price_count), 0) AS avg_price,\n"
      "       COALESCE(SUM(rejected_rows), 0)",
      "       SUM(avg_price * rows_processed) / NULLIF(SUM(rows_processed), 0) AS avg_price,\n"
      "       COALESCE(SUM(rejected_rows), 0)",
      MEAN, "test_final_mean_is_weighted_by_the_valid_prices_of_each_chunk"),
    M("group-mean-without-weights", "db_utils.py",
      "       SUM(avg_price * price_count) / NULLIF(SUM(price_count), 0) AS avg_price,\n"
      "       SUM(rejected_rows)",
      "       AVG(avg_price) AS avg_price,\n       SUM(rejected_rows)",
      MEAN, "test_group_mean_is_weighted_too"),
    M("mean-divides-by-zero", "db_utils.py",
      "       SUM(avg_price * price_count) / NULLIF(SUM(price_count), 0) AS avg_price,\n"
      "       COALESCE(SUM(rejected_rows), 0)",
      "       COALESCE(SUM(avg_price * price_count) / NULLIF(SUM(price_count), 0), 0.0)"
      " AS avg_price,\n       COALESCE(SUM(rejected_rows), 0)",
      MEAN, "test_no_valid_price_gives_no_mean_rather_than_a_division_by_zero"),

    # --- safe decoding ---------------------------------------------------------------------
    M("no-depth-limit", "protocol.py",
      "        if depth > MAX_DEPTH:", "        if False:",
      DECODING, PROTO + "test_deep_nesting_is_refused"),
    M("no-dict-entry-limit", "protocol.py",
      "        if self.entries > MAX_DICT_ENTRIES:", "        if False:",
      DECODING, PROTO + "test_hash_collision_dict_is_refused_before_it_is_built"),
    M("memo-may-share-containers", "protocol.py",
      "            if not (0 <= arg < len(memo) and memo[arg] == 0):",
      "            if not (0 <= arg < len(memo)):",
      DECODING, PROTO + "test_shared_reference_bomb_is_refused"),
    M("any-message-type", "protocol.py",
      "            and message[\"type\"] in MESSAGE_TYPES):", "            ):",
      DECODING, PROTO + "test_unhashable_type_field_is_a_protocol_error"),

    # --- frames ----------------------------------------------------------------------------
    M("zero-length-frame-accepted", "protocol.py",
      "    if size == 0:\n        raise ProtocolError(\"zero-length frame\")\n", "",
      FRAMES, PROTO + "test_zero_length_is_refused"),
    M("empty-frame-sent", "protocol.py",
      "    if not 0 < size <= 0xFFFFFFFF:", "    if not 0 <= size <= 0xFFFFFFFF:",
      FRAMES, PROTO + "test_zero_length_is_refused"),
    M("frame-limit-off-by-one", "protocol.py",
      "    if size > max_size:", "    if size > max_size + 1:",
      FRAMES, PROTO + "test_frame_one_byte_over_the_limit_is_refused"),
    M("clean-close-is-truncation", "protocol.py",
      "        raise ConnectionClosed(\"peer closed the connection\")",
      "        raise TruncatedFrame(\"peer closed the connection\")",
      FRAMES, PROTO + "test_clean_close_between_frames_is_connection_closed"),
    M("truncation-is-clean-close", "protocol.py",
      "                raise TruncatedFrame(f\"peer closed after {got} of {size} bytes\")",
      "                raise ConnectionClosed(f\"peer closed after {got} of {size} bytes\")",
      FRAMES, PROTO + "test_close_inside_a_frame_is_truncated_frame"),
    M("frame-without-deadline", "protocol.py",
      "    deadline = None if frame_timeout is None else time.monotonic() + frame_timeout",
      "    deadline = None",
      FRAMES, PROTO + "test_dripping_frame_is_cut_at_its_deadline"),

    # --- the handshake ---------------------------------------------------------------------
    M("any-answer-passes", "protocol.py",
      "    if len(worker_nonce) != NONCE_SIZE or not hmac.compare_digest(answer, expected):",
      "    if False:",
      HANDSHAKE, PROTO + "test_handshake_with_a_wrong_secret_fails_on_both_sides"),
    M("refusal-not-noticed", "protocol.py",
      "        send_frame(sock, _FAILURE)\n        raise AuthenticationError(\"peer failed the challenge (wrong secret?)\")",
      "        raise AuthenticationError(\"peer failed the challenge (wrong secret?)\")",
      HANDSHAKE, PROTO + "test_handshake_with_a_wrong_secret_fails_on_both_sides"),
    M("handshake-without-deadline", "protocol.py",
      "    if deadline is None:\n        return recv_frame(sock, 256)",
      "    if True:\n        return recv_frame(sock, 256)",
      HANDSHAKE, PROTO + "test_handshake_deadline_bounds_a_dripping_peer"),

    # --- results are checked: check_stats, check_ids, check_groups, row bounds ----------------
    M("negative-rejected-accepted", "server.py",
      "    if rows < 0 or rejected < 0 or", "    if rows < 0 or",
      CHECKED, "test_check_stats_refuses"),
    M("more-rejected-than-rows-accepted", "server.py",
      "rejected < 0 or rejected > rows or count", "rejected < 0 or count",
      CHECKED, "test_check_stats_refuses"),
    M("bool-is-a-count", "server.py",
      "    return isinstance(value, int) and not isinstance(value, bool) and value in _INT_RANGE",
      "    return isinstance(value, int) and value in _INT_RANGE",
      CHECKED, "test_check_stats_refuses"),
    M("counts-past-64-bits", "server.py",
      "    return isinstance(value, int) and not isinstance(value, bool) and value in _INT_RANGE",
      "    return isinstance(value, int) and not isinstance(value, bool)",
      CHECKED, "test_check_stats_refuses"),
    M("sales-may-be-anything", "server.py",
      "    if not _is_number(sales):", "    if False:",
      CHECKED, "test_check_stats_refuses"),
    M("prices-without-valid-rows", "server.py",
      "        if any(p is not None for p in prices):", "        if False:",
      CHECKED, "test_check_stats_refuses"),
    M("prices-need-not-be-finite", "server.py",
      "    if not all(_is_number(p) for p in prices):",
      "    if any(p is None for p in prices):",
      CHECKED, "test_check_stats_refuses"),
    M("result-of-another-job", "server.py",
      "        if msg[\"job_id\"] != srv.job_id:", "        if False:",
      CHECKED, "test_check_ids_refuses"),
    M("result-under-another-name", "server.py",
      "        if msg[\"worker_id\"] != self.worker_id:", "        if False:",
      CHECKED, "test_check_ids_refuses"),
    M("negative-chunk-id", "server.py",
      "        if not (_is_int(chunk_id) and 0 <= chunk_id < len(srv.book)):",
      "        if not (_is_int(chunk_id) and chunk_id < len(srv.book)):",
      CHECKED, "test_check_ids_refuses"),
    M("chunk-id-past-the-end", "server.py",
      "        if not (_is_int(chunk_id) and 0 <= chunk_id < len(srv.book)):",
      "        if not (_is_int(chunk_id) and 0 <= chunk_id <= len(srv.book)):",
      CHECKED, "test_check_ids_refuses"),
    M("any-attempt-id", "server.py",
      "        if not (_is_int(attempt_id) and srv.book.is_attempt_of(attempt_id, chunk_id, "
      "self.worker_id)):",
      "        if not _is_int(attempt_id):",
      CHECKED, "test_check_ids_refuses"),
    M("groups-without-group-by", "server.py",
      "            if groups:\n", "            if False:\n",
      CHECKED, "test_groups_without_group_by_are_refused"),
    M("groups-not-a-list", "protocol.py",
      "\"groups\": (list,),", "\"groups\": (list, str),",
      CHECKED, "test_check_groups_refuses"),
    M("group-rows-of-any-length", "protocol.py",
      "if type(row) not in (list, tuple) or len(row) != len(GROUP_ROW):",
      "if type(row) not in (list, tuple):",
      CHECKED, "test_check_groups_refuses"),
    M("group-values-of-any-type", "protocol.py",
      "GROUP_ROW = ((str, type(None)), (int,)", "GROUP_ROW = ((str, int, type(None)), (int,)",
      CHECKED, "test_check_groups_refuses"),
    M("group-values-may-repeat", "server.py",
      "            if key in seen:", "            if False:",
      CHECKED, "test_check_groups_refuses"),
    M("group-stats-unchecked", "server.py",
      "            check_stats(f\"chunk {chunk_id} group {key!r}\", *group[1:])\n", "",
      CHECKED, "test_check_groups_refuses"),
    M("row-count-unchecked", "server.py",
      "            if not fewest <= msg[\"rows_processed\"] <= most:", "            if False:",
      CHECKED, "test_result_with_the_wrong_row_count_is_a_failed_attempt"),
    M("invalid-result-is-no-failed-attempt", "server.py",
      "            self.fail_attempt(chunk_id, attempt_id, f\"invalid RESULT: {exc}\")\n", "",
      POISON, "test_result_with_the_wrong_row_count_is_a_failed_attempt"),
    M("control-characters-in-worker-id", "server.py",
      "        if not (0 < len(worker_id) <= 200 and worker_id.isprintable()):",
      "        if not (0 < len(worker_id) <= 200):",
      CHECKED, "tests/test_hostile.py::test_worker_id_with_control_characters_is_refused"),

    # --- poison chunks and --max-attempts -----------------------------------------------------
    M("max-attempts-off-by-one", "server.py",
      "            if self.failures[chunk_id] >= self.max_attempts:",
      "            if self.failures[chunk_id] > self.max_attempts:",
      POISON, "test_book_fails_a_chunk_after_max_attempts_reports"),
    M("re-sent-failure-counted-twice", "server.py",
      "\n                    or attempt_id in self.failed_attempts):", "):",
      POISON, "test_book_counts_a_failure_report_once_per_attempt"),
    M("lost-attempts-counted", "server.py",
      "            self.losses[chunk_id] += 1\n",
      "            self.losses[chunk_id] += 1\n            self.failures[chunk_id] += 1\n",
      POISON, "test_book_lost_attempts_do_not_count_toward_max_attempts"),
    M("failed-job-still-prints-an-answer", "server.py",
      "    failed = book.failed_chunks()\n    if failed:",
      "    failed = book.failed_chunks()\n    if False:",
      POISON, "test_poison_chunk_fails_the_job_with_exit_1"),
    M("max-attempts-zero-accepted", "server.py",
      "    g.add_argument(\"--max-attempts\", type=_positive_int,",
      "    g.add_argument(\"--max-attempts\", type=int,",
      POISON, "test_server_refuses_bounds_that_break_a_rule"),

    # --- data locality ----------------------------------------------------------------------
    M("local-read-ignores-a-changed-file", "worker.py",
      "        if len(data) != end - start or (now.st_size, now.st_mtime_ns) != (self.size, self.mtime_ns):",
      "        if len(data) != end - start:",
      LOCAL, LOCALITY + "test_worker_notices_a_file_modified_after_it_verified_it"),
    M("local-read-past-the-end", "worker.py",
      "        if not 0 <= start <= end <= self.size:", "        if not 0 <= start <= end:",
      LOCAL, LOCALITY + "test_worker_reads_no_byte_outside_its_file"),
    M("local-read-opens-any-path", "worker.py",
      "            if not stat.S_ISREG(os.stat(path).st_mode):\n                return None\n",
      "",
      LOCAL, LOCALITY + "test_worker_opens_only_the_regular_file_it_can_verify"),

    # --- identity and resume ----------------------------------------------------------------
    M("fingerprint-samples-nothing", "worker.py",
      "        digest.update(os.pread(fd, block, status.st_size * i // samples))",
      "        os.pread(fd, block, status.st_size * i // samples)",
      RESUME, "test_file_fingerprint_sees_a_same_size_same_mtime_rewrite",
      "test_rewritten_file_is_a_new_job_not_a_resume"),
    M("identity-without-chunking", "server.py",
      "\"mode\": \"stream\" if args.stream else \"frame\", \"chunks\": args.chunks,",
      "\"mode\": \"stream\" if args.stream else \"frame\",",
      RESUME, "test_a_new_chunking_is_a_new_job"),
    M("resume-forgets-done-chunks", "server.py",
      "args.max_attempts, state.done,", "args.max_attempts, (),",
      RESUME, "test_restart_resumes_without_redoing_chunks"),
    M("open-job-finds-no-done-chunk", "db_utils.py",
      "\"SELECT chunk_id FROM chunk_results WHERE job_id = ?\"",
      "\"SELECT chunk_id FROM chunk_results WHERE job_id = ? AND 0\"",
      RESUME, "test_open_job_again_resumes_what_the_database_knows",
      "test_restart_resumes_without_redoing_chunks"),
    M("open-job-forgets-attempts", "db_utils.py",
      "\"SELECT attempt_id, chunk_id, worker_id FROM attempts WHERE job_id = ?\"",
      "\"SELECT attempt_id, chunk_id, worker_id FROM attempts WHERE job_id = ? AND 0\"",
      RESUME, "test_open_job_again_resumes_what_the_database_knows"),
    M("leased-attempts-stay-leased", "db_utils.py",
      "f\"WHERE job_id = ? AND {guard}\", (Outcome.INTERRUPTED, now, job_id, *states)),",
      "f\"WHERE job_id = ? AND {guard}\", (Outcome.INTERRUPTED, now, job_id, \"never\")),",
      RESUME, "test_open_job_again_resumes_what_the_database_knows"),

    # --- bounded delays and options ---------------------------------------------------------
    M("wait-delay-without-lower-clamp", "worker.py",
      "    return min(max(float(delay), 0.01), 5.0)", "    return min(float(delay), 5.0)",
      BOUNDS, "test_wait_delay_is_clamped"),
    M("backoff-without-cap", "worker.py",
      "                bound = min(bound * 2, 5.0)", "                bound = bound * 2",
      BOUNDS, "test_reconnect_backoff_doubles_up_to_5_s"),
    M("backoff-without-jitter", "worker.py",
      "                delay = min(random.uniform(0, bound), max(deadline - time.monotonic(), 0.0))",
      "                delay = min(bound, max(deadline - time.monotonic(), 0.0))",
      BOUNDS, "test_reconnect_delays_are_jittered"),
    M("backoff-sleeps-past-the-deadline", "worker.py",
      "                delay = min(random.uniform(0, bound), max(deadline - time.monotonic(), 0.0))",
      "                delay = random.uniform(0, bound)",
      BOUNDS, "test_last_reconnect_delay_ends_at_the_give_up_deadline"),
    M("worker-never-gives-up", "worker.py",
      "                if time.monotonic() >= deadline:", "                if False:",
      BOUNDS, "test_worker_gives_up_after_give_up_after"),
    M("zero-is-a-positive-number", "worker.py",
      "    low_ok = value >= 0 if zero_ok else value > 0", "    low_ok = value >= 0",
      BOUNDS, "test_server_refuses_bounds_that_break_a_rule"),
]


# Not in the table: edits that change no behaviour, so no test can fail.  In
# check_stats, "rows < 0" is implied by "rejected < 0 or rejected > rows", and
# "low <= high" by "low - slack <= mean <= high + slack"; removing either
# clause leaves the same set of refused results.


# --- copying the repository and running one mutant ----------------------------------

SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".hypothesis", ".ci-venv", "venv", ".venv"}


def repository_files(root: Path) -> list[str]:
    """The files to copy: what git tracks or would track (no ignored ones), or,
    outside a git checkout, every file but caches and virtual environments."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=root, capture_output=True,
                             check=True).stdout
        return [name for name in out.decode().split("\0") if name and (root / name).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
            files += [os.path.relpath(os.path.join(folder, n), root) for n in names]
        return files


def copy_repository(root: Path, target: Path) -> None:
    """Copy the repository to ``target`` (and link the shared cases folder next
    to it, where tests/conftest.py looks for it)."""
    for name in repository_files(root):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target / name)
    shared = root.parent / "shared"
    if shared.exists() and not (target.parent / "shared").exists():
        (target.parent / "shared").symlink_to(shared.resolve())


def stale(root: Path, mutant: Mutant) -> str | None:
    """Why ``mutant`` cannot be applied to the files under ``root``, or None if it can."""
    path = root / mutant.file
    if not path.is_file():
        return f"{mutant.file} does not exist"
    counts = mutant.counts(path.read_text(encoding="utf-8"))
    if counts != [1] * len(counts):
        return f"{mutant.file}: the text to replace occurs {counts} times, not once"
    return None


def diff(root: Path, mutant: Mutant) -> str:
    """The mutant as a unified diff of its file."""
    text = (root / mutant.file).read_text(encoding="utf-8")
    return "".join(difflib.unified_diff(
        text.splitlines(keepends=True), mutant.apply(text).splitlines(keepends=True),
        f"a/{mutant.file}", f"b/{mutant.file}", n=2))


def run_tests(folder: Path, tests, timeout: float) -> tuple[str, str]:
    """Run ``tests`` in ``folder``; return (outcome, the end of the output).

    Outcome: ``passed``, ``failed`` or ``error`` (pytest could not run them,
    or the deadline passed; the whole process group is killed then, so
    servers a test started do not outlive it).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTHONPATH")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["COLUMNS"] = "160"   # room for the reason in pytest's "FAILED ..." summary line
    # -m "": a mutant's tests run even if marked slow (pytest.ini deselects those).
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "",
           *tests]
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return "error", f"no result within {timeout:.0f} s\n{out[-2000:]}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # whatever the tests left behind
        except ProcessLookupError:
            pass
    lines = out.strip().splitlines()
    # pytest's summary (-ra) names the failed test: "FAILED tests/x.py::test - why".
    failed = [line for line in lines if line.startswith(("FAILED tests", "ERROR tests"))]
    return ({0: "passed", 1: "failed"}.get(proc.returncode, "error"),
            "\n".join(failed if proc.returncode == 1 and failed else lines[-15:]))


def run_mutant(base: Path, work: Path, mutant: Mutant, number: int,
               timeout: float) -> tuple[str, float, str]:
    """Apply ``mutant`` to a fresh copy of ``base``; return (outcome, seconds, output).

    Outcome: ``caught``, ``SURVIVED``, ``STALE`` or ``ERROR``.
    """
    started = time.monotonic()
    why = stale(base, mutant)
    if why is not None:
        return "STALE", 0.0, why
    folder = work / f"{mutant.name}-{number}" / "repo"
    shutil.copytree(base, folder, symlinks=True)
    try:
        path = folder / mutant.file
        path.write_text(mutant.apply(path.read_text(encoding="utf-8")), encoding="utf-8")
        outcome, output = run_tests(folder, mutant.tests, timeout)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
    verdict = {"failed": "caught", "passed": "SURVIVED"}.get(outcome, "ERROR")
    return verdict, time.monotonic() - started, output


# --- the command line --------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the table of mutants and stop")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    p.add_argument("--diff", action="store_true", help="print each mutant's edit as a diff")
    p.add_argument("--tests", nargs="+", metavar="NODEID",
                   help="run these tests instead of each mutant's own (e.g. to show that "
                        "one slow end-to-end test catches it too)")
    p.add_argument("--repeat", type=int, default=1, help="runs per mutant (e.g. 5 for 5/5)")
    p.add_argument("--jobs", type=int, default=1, help="mutants run at the same time")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the run of the tests on the unmodified copy")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.jobs < 1:
        p.error("--repeat and --jobs must be at least 1")
    return args


def selected(names) -> list[Mutant]:
    """The mutants named (all of them without names); exits 2 naming an unknown one."""
    if not names:
        return list(MUTANTS)
    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        sys.exit(f"mutants.py: error: unknown mutant(s) {unknown}; see --list")
    return [by_name[n] for n in names]


def print_list(mutants: list[Mutant]) -> int:
    broken = 0
    for m in mutants:
        why = stale(ROOT, m)
        broken += why is not None
        print(f"{m.name:<38} {m.file:<12} {m.rule}" + ("" if why is None else f"  STALE: {why}"))
        for test in m.tests:
            print(f"{'':<38} {'':<12}   {test}")
    print(f"{len(mutants)} mutants, {len({m.rule for m in mutants})} rules, {broken} stale")
    return 1 if broken else 0


def main(argv=None) -> int:
    """Run the mutants; return 0 if every one was caught every time."""
    args = parse_args(argv)
    mutants = selected(args.only)
    if args.tests:
        mutants = [dataclasses.replace(m, tests=tuple(args.tests)) for m in mutants]
    if len({m.name for m in MUTANTS}) != len(MUTANTS):
        sys.exit("mutants.py: error: two mutants share a name")
    if args.list:
        return print_list(mutants)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        work = Path(tmp)
        base = work / "base" / "repo"
        copy_repository(ROOT, base)
        if args.diff:
            for m in mutants:
                print(diff(base, m) if stale(base, m) is None else f"{m.name}: STALE\n")
        if not args.no_baseline:
            tests = sorted({t for m in mutants for t in m.tests})
            print(f"baseline: {len(tests)} tests on the unmodified copy ...", flush=True)
            outcome, output = run_tests(base, tests, args.timeout * 2)
            if outcome != "passed":
                print(f"the tests do not pass without a mutant, so they prove nothing:\n{output}")
                return 2
        runs = [(m, n) for m in mutants for n in range(args.repeat)]
        results: dict[str, list] = {m.name: [] for m in mutants}

        def one(run):
            mutant, number = run
            verdict, seconds, output = run_mutant(base, work, mutant, number, args.timeout)
            results[mutant.name].append((verdict, seconds))
            done = sum(len(r) for r in results.values())
            print(f"[{done}/{len(runs)}] {mutant.name}: {verdict} ({seconds:.1f} s)", flush=True)
            print("    " + output.replace("\n", "\n    "), flush=True)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, runs))
    return report(mutants, results, time.monotonic() - started)


def report(mutants: list[Mutant], results: dict, seconds: float) -> int:
    """Print the table of outcomes; return the exit code."""
    print(f"\n{'mutant':<38} {'file':<12} {'result':<14} {'time':>7}  rule")
    bad = 0
    for m in mutants:
        verdicts = [v for v, _ in results[m.name]]
        caught = verdicts.count("caught")
        worst = next((v for v in ("STALE", "ERROR", "SURVIVED") if v in verdicts), "caught")
        bad += worst != "caught"
        mean = sum(s for _, s in results[m.name]) / len(verdicts)
        print(f"{m.name:<38} {m.file:<12} {f'{worst} {caught}/{len(verdicts)}':<14} "
              f"{mean:>6.1f}s  {m.rule}")
    print(f"\n{len(mutants)} mutants, {len(mutants) - bad} caught every time, {bad} not, "
          f"in {seconds:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
