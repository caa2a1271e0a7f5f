"""SIGKILL a running dsft job at seeded moments and resume it (issue 16, items 1 and 2): the
harness of tests/test_faults.py and bench/soak_kills.py.

A kill is an event, a delay and a target. Once the event happens in the started job (``step``:
metrics.jsonl gains the record of step ``at``; ``checkpoint``: the temporary directory
``.tmp-step-<at>`` of a checkpoint being written appears), the harness waits ``delay_s`` and
sends SIGKILL to the target: the process of one data-parallel rank (``rank0``, ``rank1``: found
among the launcher's descendants by their RANK variable) or every process of the job, launcher
included (``all``). It then waits for every process of the job to end, records what it saw
(``KillRecord``) and starts the job again with ``train.resume=auto``. Steps and delays are drawn
from one seeded generator, relative to the checkpoint each start resumes from; dsft writes
nothing for the harness: it observes the files a run writes anyway.
"""
from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from tests.helpers import REPO, launch_env

TARGETS = ("rank0", "rank1", "all")
EVENTS = ("step", "checkpoint")
STEP_DELAY_S = (0.0, 0.6)  # after a step's record: the next step's forward, backward or optimizer
WRITE_DELAY_S = (0.0, 0.05)  # after a checkpoint's temporary directory appears: inside the write
STARTUP_LIMIT_S = 300  # imports, model load and the first steps on a loaded 2-core machine


@dataclass(frozen=True)
class Kill:
    event: str  # "step" or "checkpoint"
    at: int  # the step whose record or checkpoint write triggers the kill
    delay_s: float
    target: str  # "rank0", "rank1" or "all"
    sig: str = "SIGKILL"  # SIGSTOP: a rank that hangs (or whose node vanished) instead


@dataclass
class KillRecord:
    kill: Kill
    resumed_from: int  # the step of the checkpoint this start resumed from (0: a fresh start)
    fired: bool = False  # False: the job ended before the event
    killed: dict = field(default_factory=dict)  # pid -> what it was
    writing_at_kill: list = field(default_factory=list)  # .tmp-step-* directories at the kill
    exit_s: float | None = None  # from the kill until every process of the job had ended
    returncode: int | None = None  # the launcher's
    error_lines: list = field(default_factory=list)  # "dsft: error: ..." lines of the survivors
    latest_after: int | None = None  # the step of the checkpoint `latest` names afterwards

    def summary(self) -> str:
        k = self.kill
        if not self.fired:
            return f"{k.event} {k.at} +{k.delay_s:.2f}s {k.target}: the job ended first"
        writing = f", writing {','.join(self.writing_at_kill)}" if self.writing_at_kill else ""
        return (f"{k.sig} {k.target} {k.delay_s:.2f}s after {k.event} {k.at} (resumed from "
                f"{self.resumed_from}{writing}): every process ended after {self.exit_s:.1f}s, "
                f"launcher exit {self.returncode}, latest checkpoint step {self.latest_after}; "
                f"{self.error_lines[0] if self.error_lines else 'no dsft error line'}")


class Job:
    """One start of a launcher command, its output in ``log``."""

    def __init__(self, command: list[str], log: Path):
        self.log = log
        with log.open("w") as out:  # a file, not a pipe: nothing blocks on a full pipe buffer
            self.popen = subprocess.Popen(command, cwd=REPO, env=launch_env(), stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.launcher = psutil.Process(self.popen.pid)

    def processes(self) -> list[psutil.Process]:
        try:
            return [self.launcher, *self.launcher.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def ranks(self) -> dict[int, psutil.Process]:
        """The data-parallel ranks: launcher descendants with RANK set (DeepSpeed's per-node
        launcher process, which has none in its environment, is left out by name too)."""
        found = {}
        for process in self.processes()[1:]:
            try:
                env, command = process.environ(), " ".join(process.cmdline())
            except psutil.Error:
                continue
            if "RANK" in env and "deepspeed.launcher" not in command:
                found[int(env["RANK"])] = process
        return found

    def running(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def end(self, limit_s: float) -> float | None:
        """Wait until every process of the job has ended; seconds waited, or None if some were
        still there after ``limit_s`` (they are killed then)."""
        began = time.monotonic()
        descendants = self.processes()[1:]
        alive = []
        try:  # the launcher through Popen, which must reap it to know its exit status
            self.popen.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            alive.append(self.launcher)
        _, still = psutil.wait_procs(descendants,
                                     timeout=max(0.1, limit_s - (time.monotonic() - began)))
        alive += still
        if alive:
            for process in alive:
                _kill(process)
            self.popen.wait()
            return None
        return time.monotonic() - began


def _signal(process: psutil.Process, signum: int) -> bool:
    """Send ``signum``; False if the process has already ended."""
    try:
        process.send_signal(signum)
    except psutil.NoSuchProcess:
        return False
    return True


def _kill(process: psutil.Process) -> None:
    _signal(process, signal.SIGKILL)


def checkpoint_step(output_dir: Path) -> int:
    """The step of the checkpoint ``latest`` names (0 if none); fails if it is not whole."""
    from dsft.checkpoint import latest

    path = latest(output_dir)
    return 0 if path is None else json.loads((path / "dsft_state.json").read_text())["step"]


def _metric_lines(output_dir: Path) -> dict[int, str]:
    lines = {}
    path = output_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            lines[json.loads(line)["step"]] = line
        except (ValueError, KeyError):  # a line being written
            continue
    return lines


def _temporary_dirs(output_dir: Path) -> dict[str, tuple[int, int]]:
    root = output_dir / "checkpoints"
    found = {}
    for path in root.glob(".tmp-step-*") if root.is_dir() else []:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        found[path.name] = (stat.st_ino, stat.st_ctime_ns)
    return found


def _wait_for(kill: Kill, job: Job, output_dir: Path) -> bool:
    """Block until ``kill``'s event happens in this start of the job (True) or the job ends."""
    stale_metrics = _metric_lines(output_dir)  # a killed start's records, until truncated
    stale_dirs = _temporary_dirs(output_dir)  # a killed write's leftovers
    name = f".tmp-step-{kill.at:06d}"
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while job.running() and time.monotonic() < deadline:
        if kill.event == "step":
            line = _metric_lines(output_dir).get(kill.at)
            if line is not None and line != stale_metrics.get(kill.at):
                return True
        else:
            identity = _temporary_dirs(output_dir).get(name)
            if identity is not None and identity != stale_dirs.get(name):
                return True
        time.sleep(0.005)
    if job.running():
        raise AssertionError(f"{kill}: no event within {STARTUP_LIMIT_S} s; output:\n"
                             f"{job.output()[-4000:]}")
    return False


def kill_once(command: list[str], output_dir: Path, kill: Kill, log: Path,
              exit_limit_s: float) -> KillRecord:
    """Start ``command``, signal ``kill.target`` once its event has happened and ``delay_s``
    passed, and wait for the whole job to end."""
    record = KillRecord(kill, resumed_from=checkpoint_step(output_dir))
    job = Job(command, log)
    try:
        record.fired = _wait_for(kill, job, output_dir)
        if record.fired:
            time.sleep(kill.delay_s)
            ranks = job.ranks()
            victims = job.processes() if kill.target == "all" else [ranks[int(kill.target[-1])]]
            names = {p.pid: "launcher" for p in job.processes()}
            names |= {p.pid: f"rank {r}" for r, p in ranks.items()}
            record.writing_at_kill = sorted(_temporary_dirs(output_dir))
            # a process listed a moment ago (a short-lived child) may be gone by now
            signalled = [p for p in victims if _signal(p, getattr(signal, kill.sig))]
            record.killed = {p.pid: names.get(p.pid, "launcher") for p in signalled}
        record.exit_s = job.end(exit_limit_s)
    finally:
        if job.running():  # an error in the harness: leave no job behind
            for process in job.processes():
                _kill(process)
            job.popen.wait()
    record.returncode = job.popen.returncode
    record.error_lines = [line for line in job.output().splitlines()
                          if line.startswith("dsft: error:")]
    record.latest_after = checkpoint_step(output_dir)
    return record


def draw_kill(rng: random.Random, resumed_from: int, steps: int, event: str | None = None,
              target: str | None = None, rank_signal: str = "SIGKILL") -> Kill:
    """A kill one or two steps past the checkpoint the next start resumes from (so each start
    trains a little and the run still has steps left), at a seeded moment."""
    event = event or rng.choice(EVENTS)
    at = min(resumed_from + 1 + rng.randrange(2), steps - 1)
    low, high = STEP_DELAY_S if event == "step" else WRITE_DELAY_S
    target = target or rng.choice(TARGETS)
    return Kill(event, at, round(rng.uniform(low, high), 3), target,
                "SIGKILL" if target == "all" else rank_signal)


def kill_and_resume(command: Callable[[], list[str]], output_dir: Path, steps: int, n_kills: int,
                    seed: int, exit_limit_s: float, kinds: list[tuple[str, str]] | None = None,
                    report: Callable[[str], None] = print,
                    rank_signal: str = "SIGKILL") -> list[KillRecord]:
    """``n_kills`` seeded kills of the job ``command()`` starts (a fresh launcher command each
    time: a new port), each followed by a restart, then a last start that runs to the end
    (its output must show success). ``kinds``: the (event, target) of each kill, in order;
    None draws them too. ``rank_signal``: what one-rank targets get (SIGSTOP: they hang).
    Every kill is reported as it happens."""
    rng = random.Random(seed)
    records = []
    for index in range(n_kills):
        event, target = kinds[index] if kinds else (None, None)
        kill = draw_kill(rng, checkpoint_step(output_dir), steps, event, target, rank_signal)
        record = kill_once(command(), output_dir, kill, output_dir.parent /
                           f"{output_dir.name}-start{index}.log", exit_limit_s)
        records.append(record)
        report(f"kill {index + 1}/{n_kills}: {record.summary()}")
    job = Job(command(), output_dir.parent / f"{output_dir.name}-final.log")
    try:
        job.popen.wait(timeout=STARTUP_LIMIT_S)
    finally:
        if job.running():
            for process in job.processes():
                _kill(process)
    if job.popen.returncode != 0:
        raise AssertionError(f"the final start failed ({job.popen.returncode}):\n"
                             f"{job.output()[-6000:]}")
    return records


def names_rank(line: str, rank: int) -> bool:
    return re.search(rf"\brank {rank}\b", line) is not None


def as_json(records: list[KillRecord]) -> list[dict]:
    return [asdict(record) for record in records]
