"""The real worker with faults wrapped around its compute step (for experiments and tests).

    python tools/flaky_worker.py --port 5000 --worker-id slow --delay 0.2
    python tools/flaky_worker.py --port 5000 --crash-rate 0.1 --stall-rate 0.1 --stall-seconds 4

Runs ``worker.py``'s own :class:`worker.Worker` with every one of its
options, and adds six.  The faults live here and not in the worker, as the
crash plugin of MIT 6.5840's MapReduce lab does: the worker a student reads
has no "misbehave" branch, and the worker the experiments run is still the
real one.  Per JOB, before the chunk is computed, one draw decides:

* ``--crash-rate``: exit at once with status 3 (``os._exit``: no goodbye,
  no flushing, no ACK, as a SIGKILL would);
* ``--stall-rate``: sleep ``--stall-seconds`` first (past the lease, the
  server leases the chunk again);

then ``--delay`` seconds of extra work (a slow worker), and a second draw
against ``--error-rate`` raises, so the attempt is reported as FAILED.  All
draws come from one ``random.Random(--fault-seed)``, so a run can be
repeated.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import worker  # noqa: E402

log = logging.getLogger("flaky_worker")
FAULT_OPTIONS = ("--crash-rate", "--stall-rate", "--stall-seconds", "--error-rate", "--delay",
                 "--fault-seed")


class FlakyWorker(worker.Worker):
    """A :class:`worker.Worker` whose :meth:`compute` crashes, stalls, slows
    down or fails on purpose, with the probabilities above."""

    def __init__(self, *args, crash_rate=0.0, stall_rate=0.0, stall_seconds=5.0,
                 error_rate=0.0, delay=0.0, seed=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_rate, self.stall_rate, self.error_rate = crash_rate, stall_rate, error_rate
        self.stall_seconds, self.delay = stall_seconds, delay
        self.rng = random.Random(seed)

    def compute(self, job: dict) -> dict:
        """Maybe crash, stall or slow down, maybe raise; then compute for real."""
        chunk_id = job["chunk_id"]
        draw = self.rng.random()
        if draw < self.crash_rate:
            log.warning("fault injection: crashing on chunk %d", chunk_id)
            logging.shutdown()
            os._exit(3)
        if draw < self.crash_rate + self.stall_rate:
            log.warning("fault injection: stalling %.1f s on chunk %d", self.stall_seconds, chunk_id)
            time.sleep(self.stall_seconds)
        if self.delay:
            time.sleep(self.delay)
        if self.rng.random() < self.error_rate:
            raise RuntimeError(f"fault injection: error on chunk {chunk_id}")
        return super().compute(job)


def parse_args(argv=None):
    """worker.py's command line plus the six fault options."""
    p = worker.build_parser()
    f = p.add_argument_group("fault injection (off by default)")
    f.add_argument("--crash-rate", type=worker.probability, default=0.0,
                   help="probability of exiting abruptly after taking a chunk")
    f.add_argument("--stall-rate", type=worker.probability, default=0.0,
                   help="probability of stalling --stall-seconds on a chunk")
    f.add_argument("--stall-seconds", type=worker.seconds_or_zero, default=5.0,
                   help="length of a stall")
    f.add_argument("--error-rate", type=worker.probability, default=0.0,
                   help="probability of reporting a failure instead of a result")
    f.add_argument("--delay", type=worker.seconds_or_zero, default=0.0,
                   help="extra seconds of work per chunk")
    f.add_argument("--fault-seed", type=int, default=None, help="seed for the fault draws")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run one flaky worker until the job is done; return its exit code."""
    args = parse_args(argv)
    faults = dict(crash_rate=args.crash_rate, stall_rate=args.stall_rate,
                  stall_seconds=args.stall_seconds, error_rate=args.error_rate,
                  delay=args.delay, seed=args.fault_seed)
    return worker.run_worker(args, lambda *a, **kw: FlakyWorker(*a, **kw, **faults))


if __name__ == "__main__":
    sys.exit(main())
