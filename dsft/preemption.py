"""Stopping a run early without losing work.

Schedulers warn before they stop a job: Slurm sends SIGTERM to every process of the job and
SIGKILL ``KillWait`` seconds later (30 s by default), and dsft's sbatch scripts ask for SIGUSR1
at the batch shell 120 s before the time limit. A request to stop reaches dsft in any of three
ways, each recorded on the rank that sees it:

* SIGTERM or SIGUSR1 delivered to a training process;
* the file ``output_dir/STOP`` (checked by rank 0 at every step): the way dsft's sbatch script
  asks, because launchers do not pass signals on (the DeepSpeed launcher answers SIGTERM by
  terminating its ranks, and SIGUSR1 kills a launcher outright).

The loop sums the requests over ranks with the step's token counts (no extra collective), so
every rank sees the same answer at the same step: it finishes that optimizer step, writes a
checkpoint, and every rank exits with ``PREEMPTED_EXIT_CODE`` (75, ``EX_TEMPFAIL``: "try
again"). ``train.resume: auto`` continues from that checkpoint, losing nothing. Rank 0 removes
the STOP file once the checkpoint is written (the request is served), so the next start trains.

A second SIGTERM is recorded like the first, not obeyed at once: Slurm signals every process
of a job step and the DeepSpeed launcher forwards its own SIGTERM to its ranks, so a rank
commonly gets two within milliseconds, and exiting on the second would lose the checkpoint the
first asked for. A rank blocked in a collective runs no Python signal handler until the
collective returns or fails; a lost peer fails it (dsft.dist.lost_ranks_reported: a one-line
error naming the rank, then exit), at once when the peer's process ended, after the process
group's timeout (DEEPSPEED_TIMEOUT, minutes) when it hangs. What is left, the launchers and
Slurm end with SIGKILL 30 s after their SIGTERM.
"""
from __future__ import annotations

import signal
from pathlib import Path

PREEMPTED_EXIT_CODE = 75
STOP_FILE = "STOP"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on request after checkpointing ``step``; the CLI exits with 75."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"stopped at step {step} ({reason}); checkpoint written, resume with "
                         "train.resume=auto")
        self.step = step


class StopRequests:
    """Records SIGTERM / SIGUSR1 while installed (a context manager, so the handlers that
    were there before come back), and the STOP file on rank 0."""

    def __init__(self, output_dir: Path, rank: int):
        self.stop_file = Path(output_dir) / STOP_FILE
        self.rank = rank
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def served(self) -> None:
        """The stop happened: a STOP file has done its job."""
        if self.rank == 0:
            self.stop_file.unlink(missing_ok=True)

    def local(self) -> str | None:
        """Why this rank wants to stop, or None."""
        if self.received:
            return self.received
        if self.rank == 0 and self.stop_file.exists():
            return f"{self.stop_file} exists"
        return None
