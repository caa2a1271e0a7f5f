"""Soak test of kill and resume (issue 16, items 1 and 2): tests/test_faults.py with N kills.

Trains the tiny LoRA recipe on 2 CPU ranks under ZeRO-3 (``--nf4``: over an NF4 base) once
without interruption, then again with ``--kills`` seeded kills (tests/faults.py: after a step's
record or inside a checkpoint write, one rank or every process, each followed by a restart
with ``train.resume=auto``), and compares the finished run with the uninterrupted one: per-step
losses and the final adapter, within the tolerances of tests/test_train.py. Prints one line per
kill and a summary; ``--json`` writes every record. ``--hang`` sends SIGSTOP instead of SIGKILL
to the rank targets (a hung rank, or one whose node vanished: no connection closes) and sets
DEEPSPEED_TIMEOUT=1 (minutes) so the survivors' collective times out.

    OMP_NUM_THREADS=1 .venv/bin/python bench/soak_kills.py --kills 30 --seed 7 [--nf4]
        [--launcher deepspeed|torchrun] [--steps 16] [--out DIR] [--json PATH] [--hang]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import faults  # noqa: E402
from tests.helpers import assert_same_run, launch_command, run_train  # noqa: E402
from tests.test_faults import LOSS_RTOL, ADAPTER_ATOL, NF4, SHORT_RUN, ZERO3  # noqa: E402

RECIPE = REPO / "recipes/tiny_lora.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nf4", action="store_true", help="an NF4 base (ZeRO-3 all the same)")
    parser.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--exit-limit", type=float, default=60.0,
                        help="seconds every process may take to end after a kill")
    parser.add_argument("--hang", action="store_true",
                        help="SIGSTOP the rank targets instead of SIGKILL (DEEPSPEED_TIMEOUT=1)")
    parser.add_argument("--out", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write every kill's record here")
    args = parser.parse_args()
    if args.hang:
        os.environ["DEEPSPEED_TIMEOUT"] = "1"
        args.exit_limit = max(args.exit_limit, 60 + 5 + 30 + 30)  # timeout, answers, SIGKILL
    work = args.out or Path(tempfile.mkdtemp(prefix="soak_kills-"))
    work.mkdir(parents=True, exist_ok=True)
    extra = {**ZERO3, **(NF4 if args.nf4 else {}), "train.save_every": 1,
             "train.max_steps": args.steps}

    def overrides(out: Path) -> list[str]:
        return [f"{key}={value}" for key, value in {**SHORT_RUN, "train.output_dir": out,
                                                   **extra}.items()]

    print(f"soak: {args.kills} kills, seed {args.seed}, {'NF4' if args.nf4 else 'float'} base, "
          f"ZeRO-3, 2 ranks, {args.launcher}, {args.steps} steps; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; in {work}", flush=True)
    began = time.monotonic()
    reference = work / "uninterrupted"
    run_train(RECIPE, overrides(reference), nprocs=2, launcher=args.launcher)
    out = work / "killed"
    records = faults.kill_and_resume(
        lambda: launch_command(args.launcher, 2, RECIPE, overrides(out)), out, args.steps,
        args.kills, args.seed, args.exit_limit, report=lambda line: print(line, flush=True),
        rank_signal="SIGSTOP" if args.hang else "SIGKILL")
    try:
        assert_same_run(out, reference, LOSS_RTOL, ADAPTER_ATOL)
        compared = "same losses and adapter as the uninterrupted run: nothing lost"
    except AssertionError as err:
        compared = f"DIFFERS from the uninterrupted run: {str(err).splitlines()[0]}"
    fired = [r for r in records if r.fired]
    exits = [r.exit_s for r in fired if r.exit_s is not None]
    rank_kills = [r for r in fired if r.kill.target != "all"]
    named = sum(any(faults.names_rank(line, int(r.kill.target[-1])) for line in r.error_lines)
                for r in rank_kills)
    interrupted = sum(r.kill.event == "checkpoint" and r.latest_after < r.kill.at for r in fired)
    print(f"summary: {len(fired)} of {args.kills} kills fired "
          f"({dict(Counter(f'{r.kill.event}/{r.kill.target}' for r in fired))}); "
          f"{interrupted} inside a checkpoint write (the previous checkpoint was used); "
          f"every process ended within {args.exit_limit:g} s after {len(exits)} of {len(fired)} "
          f"(median {statistics.median(exits) if exits else float('nan'):.1f} s, max "
          f"{max(exits, default=float('nan')):.1f} s); launcher exit non-zero after "
          f"{sum(r.returncode != 0 for r in fired)}; the lost rank named after {named} of "
          f"{len(rank_kills)} rank kills; final run: {compared}; "
          f"{time.monotonic() - began:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps(faults.as_json(records), indent=1))
    ok = (len(exits) == len(fired) and named == len(rank_kills) and compared.startswith("same")
          and all(r.returncode != 0 for r in fired))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
