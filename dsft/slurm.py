"""``dsft slurm``: an sbatch script that trains a recipe on M nodes x G GPUs and resumes on requeue.

The script it writes, in order:

1. ``#SBATCH`` lines: M nodes, one task per node (the per-node launcher), G GPUs and C CPUs per
   node, partition, time limit, job name, log file (appended to, so a requeued run adds to it),
   ``--requeue`` and ``--signal=B:USR1@120`` (the batch shell hears USR1 120 s before the limit).
2. The rendezvous, computed on the batch host: ``scontrol show hostnames "$SLURM_JOB_NODELIST"``
   lists the allocation's hosts in node-id order; the first is ``MASTER_ADDR``. (Not piped into
   ``head``: under ``pipefail`` the SIGPIPE that scontrol may get would fail the job.)
   ``MASTER_PORT = 10000 + SLURM_JOB_ID mod 20000``: every node and every requeue of the job
   agree on it without talking, two jobs sharing a first node collide only when their ids are
   equal mod 20000, and the range stays above the privileged ports (< 1024) and below Linux's
   ephemeral ports (32768+), where the kernel hands out outgoing connections.
3. One launcher per node (``srun --ntasks-per-node=1``), which starts G ranks there:
   * deepspeed: a hostfile (``host slots=G`` per host) and
     ``deepspeed --no_ssh --node_rank=$SLURM_NODEID --hostfile ... launch recipe``. ``--no_ssh``
     because DeepSpeed's default multi-node path (pdsh over passwordless ssh, or
     ``--launcher slurm``, which runs one ``python launch`` per rank with no RANK/LOCAL_RANK and
     falls into MPI discovery) needs what Slurm clusters rarely give; with ``--no_ssh`` each
     node's launcher starts its own ranks, numbered from its ``--node_rank`` and the hostfile.
   * torchrun: ``torchrun --nnodes M --nproc-per-node G --rdzv-backend c10d
     --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT launch recipe``.
   The default is deepspeed for ``engine: deepspeed`` recipes and torchrun for ``engine: fsdp2``
   ones (either launcher runs either engine: dsft reads the ranks from the environment).
   ``launch`` is the repository's ``launch/`` folder (its ``__main__.py`` runs ``dsft train``),
   so the job runs in the dsft checkout it was submitted from.
4. ``train.resume=auto`` on the command line: a run with a checkpoint in ``train.output_dir``
   continues from the latest one, a fresh run starts at step 0. The USR1 trap writes
   ``train.output_dir/STOP``: dsft finishes the step it is in, writes a checkpoint and exits
   with 75 (``dsft.preemption``; a file, because launchers do not pass USR1 on to their ranks).
   The script waits for that, then calls ``scontrol requeue``: a job that reaches its time
   limit goes back to the queue and resumes from the step it stopped at, losing nothing. (A step
   or checkpoint longer than the 120 s warning still ends with Slurm's kill; then the job
   resumes from the checkpoint before, ``train.save_every``.)

The recipe is loaded and validated when the script is rendered, not when the job starts.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from dsft.errors import ConfigError
from dsft.preemption import PREEMPTED_EXIT_CODE, STOP_FILE

LAUNCHERS = ("deepspeed", "torchrun")
REQUEUE_WARNING_S = 120
_PORT_BASE, _PORT_SPAN = 10000, 20000
# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_SLURM_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})$")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,-]+$")


def _positive(value: int, flag: str) -> int:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{flag}: expected an integer >= 1 (got {value!r})")
    return value


def _slurm_word(value: str, flag: str) -> str:
    if not _SLURM_NAME.match(value):
        raise ConfigError(f"{flag}: expected letters, digits and _ . , - only (got {value!r})")
    return value


def _one_line(value: str, what: str) -> str:
    """The script quotes every value it runs with, but a line break would still end the
    comment lines that name them, and what follows would run as a command."""
    if "".join(value.splitlines()) != value:
        raise ConfigError(f"{what.encode('unicode_escape').decode()}: a line break cannot go "
                          "into an sbatch script")
    return value


def render(recipe: str, overrides: Sequence[str] = (), *, nodes: int, gpus_per_node: int,
           launcher: str | None = None, partition: str | None = None, time: str | None = None,
           job_name: str | None = None, cpus_per_task: int | None = None,
           log: str = "%x-%j.out") -> str:
    """The sbatch script (text) for ``recipe`` with ``overrides`` on ``nodes`` x ``gpus_per_node``;
    ``launcher`` None: the recipe's engine's (module docstring).

    Raises ConfigError (one line) for a bad flag or recipe.
    """
    from dsft.recipe import load_recipe

    _positive(nodes, "--nodes")
    _positive(gpus_per_node, "--gpus-per-node")
    defaults = {"--launcher": None, "--partition": None, "--time": None,
                "--job-name": f"dsft-{Path(recipe).stem}", "--cpus-per-task": 8 * gpus_per_node,
                "--log": "%x-%j.out"}
    if cpus_per_task is None:
        cpus_per_task = defaults["--cpus-per-task"]
    _positive(cpus_per_task, "--cpus-per-task")
    if launcher is not None and launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher: expected one of {', '.join(LAUNCHERS)} (got {launcher!r})")
    if time is not None and not _SLURM_TIME.match(time):
        raise ConfigError(f"--time: expected HH:MM:SS, MM, D-HH or D-HH:MM:SS (got {time!r})")
    if partition is not None:
        _slurm_word(partition, "--partition")
    job_name = _slurm_word(job_name or defaults["--job-name"], "--job-name")
    if not log or any(c.isspace() for c in log):
        raise ConfigError(f"--log: expected a file pattern without spaces (got {log!r})")
    for override in overrides:
        if override.split("=", 1)[0].strip() == "train.resume":
            raise ConfigError(f"override '{override}': dsft slurm sets train.resume=auto (a "
                              "requeued job resumes from its latest checkpoint); drop it")
    for what, value in [("recipe", recipe), *((f"override '{o}'", o) for o in overrides)]:
        _one_line(value, what)
    launch_args = [recipe, *overrides, "train.resume=auto"]
    loaded = load_recipe(recipe, launch_args[1:])
    base = _one_line(loaded.model.name_or_path or loaded.model.config, "model.name_or_path")
    defaults["--launcher"] = "torchrun" if loaded.engine == "fsdp2" else "deepspeed"
    launcher = launcher or defaults["--launcher"]

    rendered_by = ["dsft", "slurm", recipe, *overrides, "--nodes", str(nodes),
                   "--gpus-per-node", str(gpus_per_node)]
    chosen = {"--launcher": launcher, "--partition": partition, "--time": time,
              "--job-name": job_name, "--cpus-per-task": cpus_per_task, "--log": log}
    for flag, value in chosen.items():
        if value != defaults[flag]:
            rendered_by += [flag, str(value)]

    sbatch = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1",
              f"--gpus-per-node={gpus_per_node}", f"--cpus-per-task={cpus_per_task}"]
    if partition:
        sbatch.append(f"--partition={partition}")
    if time:
        sbatch.append(f"--time={time}")
    sbatch += [f"--output={log}", "--open-mode=append", "--requeue",
               f"--signal=B:USR1@{REQUEUE_WARNING_S}"]
    fields = {"command": shlex.join(rendered_by), "method": loaded.adapter.method,
              "base": base, "nodes": nodes,
              "gpus": gpus_per_node, "launcher": launcher, "warning": REQUEUE_WARNING_S,
              "sbatch": "\n".join(f"#SBATCH {option}" for option in sbatch),
              "port_base": _PORT_BASE, "port_span": _PORT_SPAN,
              "port_last": _PORT_BASE + _PORT_SPAN - 1,
              "hostfile": shlex.quote(f"{loaded.train.output_dir}/deepspeed-hostfile"),
              "stop_file": shlex.quote(f"{loaded.train.output_dir}/{STOP_FILE}"),
              "preempted": PREEMPTED_EXIT_CODE,
              "launch_args": shlex.join(launch_args)}
    launch = _DEEPSPEED if launcher == "deepspeed" else _TORCHRUN
    return (_PREAMBLE + launch + _WAIT).format(**fields)


_PREAMBLE = """\
#!/bin/bash
# Written by: {command}
# {method} on {base}: {nodes} node(s) x {gpus} GPU(s), launched with {launcher}.
# Submit from the dsft checkout (the recipe, launch/ and ds_configs/ paths are relative
# to it) with its environment active: sbatch passes the submitting shell's PATH on.
# One task per node: that node's launcher, which starts one rank per GPU. --requeue and
# --signal: {warning} s before the time limit this shell gets USR1 (see requeue below).
{sbatch}
set -euo pipefail

if [ ! -f launch/__main__.py ]; then
    echo "dsft: launch/__main__.py not found in $PWD: submit from the dsft checkout" >&2
    exit 2
fi

# NCCL reports only problems. NCCL_DEBUG=INFO shows which network each rank uses;
# set NCCL_SOCKET_IFNAME (e.g. ib0) when NCCL picks the wrong interface.
export NCCL_DEBUG=WARN

# Rendezvous: the first host of the allocation, and a port derived from the job id
# ({port_base}-{port_last}: above the privileged ports, below the kernel's ephemeral range),
# the same on every node and on every requeue of this job.
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")  # one per line, in node-id order
MASTER_ADDR=$(sed -n 1p <<< "$HOSTS")
MASTER_PORT=$(( {port_base} + SLURM_JOB_ID % {port_span} ))
export MASTER_ADDR MASTER_PORT

# {warning} s before the time limit Slurm sends USR1 to this shell: ask dsft to stop (it
# finishes its step, writes a checkpoint and exits with 75), then put the job back in the
# queue (below); train.resume=auto makes the next start continue from that checkpoint.
STOP_FILE={stop_file}
STOP_REQUESTED=0
# shellcheck disable=SC2329  # called by the trap
request_stop() {{
    echo "dsft: time limit near: asking the training to checkpoint and stop" >&2
    mkdir -p "$(dirname "$STOP_FILE")"
    touch "$STOP_FILE"
    STOP_REQUESTED=1
}}
trap request_stop USR1

"""
_DEEPSPEED = """\
# DeepSpeed hostfile, one 'host slots=GPUs' line per node, rewritten at every start
# (a requeued job may get other nodes). Every node reads it: the output directory is
# on the shared filesystem, as checkpoints and resume need anyway.
HOSTFILE={hostfile}
mkdir -p "$(dirname "$HOSTFILE")"
while read -r host; do echo "$host slots={gpus}"; done <<< "$HOSTS" > "$HOSTFILE"
export HOSTFILE

# One DeepSpeed launcher per node, without ssh/pdsh: each starts its node's ranks,
# numbered from its node id ($SLURM_NODEID, expanded on that node) and the hostfile.
# srun passes --cpus-per-task on explicitly: since Slurm 22.05 tasks do not inherit it.
# shellcheck disable=SC2016  # the single quotes defer expansion to each node
srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 bash -c \\
    'exec deepspeed --no_ssh --node_rank="$SLURM_NODEID" --hostfile="$HOSTFILE" \\
        --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" launch "$@"' \\
    deepspeed {launch_args} &
"""
_TORCHRUN = """\
# One torchrun per node: c10d rendezvous at MASTER_ADDR:MASTER_PORT numbers the nodes,
# and each torchrun starts its node's ranks.
# srun passes --cpus-per-task on explicitly: since Slurm 22.05 tasks do not inherit it.
srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 \\
    torchrun --nnodes={nodes} --nproc-per-node={gpus} --rdzv-backend=c10d \\
        --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \\
    launch {launch_args} &
"""
_WAIT = """\
TRAINING=$!
status=0
wait "$TRAINING" || status=$?
while kill -0 "$TRAINING" 2>/dev/null; do  # USR1 ended the wait: the training is stopping
    status=0
    wait "$TRAINING" || status=$?
done
# 75: dsft stopped at a checkpoint on request; resume it. The job's exit status is the training's.
if [ "$status" -eq {preempted} ] || {{ [ "$STOP_REQUESTED" = 1 ] && [ "$status" -ne 0 ]; }}; then
    echo "dsft: the training stopped at a checkpoint: requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""


def add_parser(commands) -> None:
    """Register ``dsft slurm`` on the CLI's subparsers."""
    slurm = commands.add_parser("slurm", help="write an sbatch script that trains a recipe on "
                                "Slurm nodes (deepspeed or srun torchrun), resuming on requeue")
    slurm.add_argument("recipe")
    slurm.add_argument("overrides", nargs="*", help="key.sub=value")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, required=True)
    slurm.add_argument("--launcher", choices=LAUNCHERS,
                       help="default: deepspeed, or torchrun for an engine: fsdp2 recipe")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", help="time limit, HH:MM:SS or D-HH:MM:SS")
    slurm.add_argument("--job-name", help="default: dsft-<recipe name>")
    slurm.add_argument("--cpus-per-task", type=int,
                       help="CPUs per node for its launcher and ranks (default: 8 per GPU)")
    slurm.add_argument("--log", default="%x-%j.out", help="Slurm output file pattern")
    slurm.add_argument("--out", help="write the script here (default: standard output)")


def run(args: argparse.Namespace) -> int:
    """``dsft slurm``: render the script, write it to --out or standard output."""
    script = render(args.recipe, args.overrides, nodes=args.nodes,
                    gpus_per_node=args.gpus_per_node, launcher=args.launcher,
                    partition=args.partition, time=args.time, job_name=args.job_name,
                    cpus_per_task=args.cpus_per_task, log=args.log)
    from dsft.recipe import load_recipe

    if load_recipe(args.recipe, args.overrides).train.save_every is None:
        print("dsft: warning: train.save_every is not set: a requeued job starts again from "
              "step 0", file=sys.stderr)
    if args.out is None:
        sys.stdout.write(script)
        return 0
    Path(args.out).write_text(script)
    print(f"wrote {args.out}; submit with: sbatch {args.out}", file=sys.stderr)
    return 0
