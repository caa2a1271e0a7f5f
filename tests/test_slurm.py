"""``dsft slurm``: the sbatch script it writes, executed with bash under a faked Slurm.

The fakes stand in for what only a cluster has: ``scontrol`` prints the allocation's hosts and
logs requeues; ``srun`` runs its command once per node with that node's ``SLURM_NODEID``, as
``srun --ntasks-per-node=1`` does. The command lines the script produces are parsed with
DeepSpeed's and torchrun's own argument parsers, and the hostfile with DeepSpeed's own reader;
the slow tests run the scripts for real on 2 CPU ranks.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

import dsft.recipe
from dsft import slurm
from dsft.errors import ConfigError
from tests.helpers import BIN, REPO, read_metrics

RECIPE = "recipes/tiny_lora.yaml"
JOB_ID = 4242
PORT = 10000 + JOB_ID % 20000  # the documented rule, computed here independently of the script
HOSTS = ["gpu001", "gpu002"]

SCONTROL = """#!/bin/bash
if [ "$1" = show ] && [ "$2" = hostnames ] && [ "$3" = "$SLURM_JOB_NODELIST" ]; then
    printf '%s\\n' $FAKE_SLURM_HOSTS
elif [ "$1" = requeue ]; then
    echo "requeue $2" >> "$FAKE_SLURM_LOG"
else
    echo "fake scontrol: unexpected arguments: $*" >&2; exit 1
fi
"""
SRUN = """#!/bin/bash
options=()
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do options+=("$1"); shift; done
echo "srun ${options[*]}" >> "$FAKE_SLURM_LOG"
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
# stands in for deepspeed / torchrun: records how it was called on which node
RECORDER = """#!{python}
import json, os, sys
from pathlib import Path
calls = Path(os.environ["FAKE_SLURM_CALLS"])
calls.mkdir(exist_ok=True)
record = {{"argv": sys.argv[1:], "node": os.environ["SLURM_NODEID"],
           "env": {{k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "HOSTFILE")}}}}
(calls / f"{{Path(sys.argv[0]).name}}-{{record['node']}}.json").write_text(json.dumps(record))
"""
# stands in for a launcher running dsft: trains until the STOP file appears, then exits as
# dsft does after its checkpoint (dsft.preemption; the real thing: tests/test_preemption.py)
STOPPABLE = """#!/bin/bash
echo $$ > "$FAKE_SLURM_CALLS.pid"
for _ in $(seq 300); do
    if [ -f "$FAKE_STOP_FILE" ]; then echo "checkpoint" >> "$FAKE_SLURM_LOG"; exit 75; fi
    sleep 0.1
done
exit 1
"""


def _fake_slurm(tmp: Path, hosts: list[str], job_id: int, launchers: str = "") -> dict:
    """A bin directory with the fakes (``launchers``: "record", "stoppable" or "" for the real
    deepspeed/torchrun) and the environment a batch job on ``hosts`` would see."""
    bin_dir = tmp / "fakebin"
    bin_dir.mkdir()
    fakes = {"scontrol": SCONTROL, "srun": SRUN}
    fake_launcher = {"record": RECORDER.format(python=sys.executable), "stoppable": STOPPABLE}
    if launchers:
        fakes.update(deepspeed=fake_launcher[launchers], torchrun=fake_launcher[launchers])
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=f"{bin_dir}:{BIN}:{env['PATH']}", SLURM_JOB_ID=str(job_id),
               SLURM_JOB_NODELIST="gpu[001-002]" if len(hosts) > 1 else hosts[0],
               SLURM_NNODES=str(len(hosts)), SLURM_CPUS_PER_TASK="32",
               FAKE_SLURM_HOSTS=" ".join(hosts), FAKE_SLURM_LOG=str(tmp / "slurm.log"),
               FAKE_SLURM_CALLS=str(tmp / "calls"), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def _write_script(tmp: Path, overrides: list[str], launcher: str, nodes: int, gpus: int) -> Path:
    script = tmp / f"{launcher}.sbatch"
    script.write_text(slurm.render(RECIPE, overrides, nodes=nodes, gpus_per_node=gpus,
                                   launcher=launcher))
    return script


def _recorded(tmp: Path, launcher: str) -> list[dict]:
    return [json.loads((tmp / "calls" / f"{launcher}-{node}.json").read_text())
            for node in range(len(HOSTS))]


def test_deepspeed_script_writes_the_hostfile_and_starts_one_launcher_per_node(tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile, parse_args

    out = tmp_path / "run"
    overrides = [f"train.output_dir={out}", "adapter.r=4"]
    script = _write_script(tmp_path, overrides, "deepspeed", nodes=2, gpus=4)
    subprocess.run(["bash", str(script)], cwd=REPO, check=True, timeout=60,
                   env=_fake_slurm(tmp_path, HOSTS, JOB_ID, launchers="record"))

    hostfile = out / "deepspeed-hostfile"
    assert hostfile.read_text() == "gpu001 slots=4\ngpu002 slots=4\n"
    assert fetch_hostfile(str(hostfile)) == {"gpu001": 4, "gpu002": 4}
    assert (tmp_path / "slurm.log").read_text().split() == [
        "srun", "--ntasks-per-node=1", "--cpus-per-task=32", "--kill-on-bad-exit=1"]
    for node, call in enumerate(_recorded(tmp_path, "deepspeed")):
        args = parse_args(call["argv"])
        assert args.no_ssh and args.node_rank == node
        assert (args.hostfile, args.master_addr, args.master_port) == (str(hostfile), "gpu001",
                                                                       PORT)
        assert args.user_script == "launch"
        assert args.user_args == [RECIPE, *overrides, "train.resume=auto"]


def test_torchrun_script_starts_one_rendezvousing_torchrun_per_node(tmp_path):
    from torch.distributed.run import get_args_parser

    overrides = [f"train.output_dir={tmp_path / 'run'}"]
    script = _write_script(tmp_path, overrides, "torchrun", nodes=2, gpus=8)
    subprocess.run(["bash", str(script)], cwd=REPO, check=True, timeout=60,
                   env=_fake_slurm(tmp_path, HOSTS, JOB_ID, launchers="record"))

    calls = _recorded(tmp_path, "torchrun")
    assert calls[0]["argv"] == calls[1]["argv"]  # c10d rendezvous numbers the nodes
    args = get_args_parser().parse_args(calls[0]["argv"])
    assert (args.nnodes, args.nproc_per_node) == ("2", "8")
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == ("c10d", f"gpu001:{PORT}",
                                                                     str(JOB_ID))
    assert args.training_script == "launch"
    assert args.training_script_args == [RECIPE, *overrides, "train.resume=auto"]


def test_usr1_before_the_time_limit_stops_the_training_at_a_checkpoint_then_requeues(tmp_path):
    out = tmp_path / "run"
    script = _write_script(tmp_path, [f"train.output_dir={out}"], "torchrun", nodes=1, gpus=2)
    env = _fake_slurm(tmp_path, HOSTS[:1], JOB_ID, launchers="stoppable")
    env["FAKE_STOP_FILE"] = str(out / "STOP")
    job = subprocess.Popen(["bash", str(script)], cwd=REPO, env=env, stderr=subprocess.PIPE,
                           text=True)
    pid_file = Path(env["FAKE_SLURM_CALLS"] + ".pid")
    deadline = time.monotonic() + 30
    while not pid_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (tmp_path / "slurm.log").read_text().count("requeue")
    job.send_signal(signal.SIGUSR1)
    _, stderr = job.communicate(timeout=30)
    assert job.returncode == 75, stderr
    assert (tmp_path / "slurm.log").read_text().splitlines()[-2:] == [
        "checkpoint", f"requeue {JOB_ID}"]  # the training stopped first, then the requeue


def test_a_training_that_stopped_at_a_checkpoint_is_requeued_and_a_crash_is_not(tmp_path):
    """Exit 75 without USR1 (dsft stopped on SIGTERM or a STOP file someone wrote): requeued.
    Another failure without a stop request: not requeued, its status is the job's."""
    out = tmp_path / "run"
    script = _write_script(tmp_path, [f"train.output_dir={out}"], "torchrun", nodes=1, gpus=2)
    env = _fake_slurm(tmp_path, HOSTS[:1], JOB_ID, launchers="stoppable")
    env["FAKE_STOP_FILE"] = str(tmp_path / "already-there")
    (tmp_path / "already-there").touch()  # the fake training stops at once
    result = subprocess.run(["bash", str(script)], cwd=REPO, env=env, timeout=30,
                            capture_output=True, text=True)
    assert result.returncode == 75 and f"requeue {JOB_ID}" in (tmp_path / "slurm.log").read_text()
    (tmp_path / "slurm.log").unlink()
    env["FAKE_STOP_FILE"] = "/nonexistent"
    fake = tmp_path / "fakebin" / "torchrun"
    fake.write_text("#!/bin/bash\nexit 3\n")  # a crash, no stop requested: no requeue
    result = subprocess.run(["bash", str(script)], cwd=REPO, env=env, timeout=30,
                            capture_output=True, text=True)
    assert result.returncode == 3 and "requeue" not in (tmp_path / "slurm.log").read_text()


def test_rendered_scripts_pass_shellcheck(tmp_path):
    for launcher in slurm.LAUNCHERS:
        script = _write_script(tmp_path, ["train.max_steps=2"], launcher, nodes=2, gpus=8)
        result = subprocess.run([str(BIN / "shellcheck"), str(script)], check=False,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_launch_example_is_what_dsft_slurm_writes(tmp_path, monkeypatch):
    """launch/example.sbatch cannot go stale: it is the output of the command its first line
    names. The 7B weights it names are not on this machine, so only their path check is off."""
    example = REPO / "launch/example.sbatch"
    command = example.read_text().splitlines()[1].removeprefix("# Written by: ").split()
    assert command[:2] == ["dsft", "slurm"]
    commands = argparse.ArgumentParser().add_subparsers(dest="command")
    slurm.add_parser(commands)
    out = tmp_path / "example.sbatch"
    monkeypatch.chdir(REPO)
    with mock.patch.object(dsft.recipe, "check_paths"):
        args = commands.choices["slurm"].parse_args([*command[2:], "--out", str(out)])
        assert slurm.run(args) == 0
    assert out.read_text() == example.read_text()
    assert (args.recipe, args.nodes, args.gpus_per_node) == ("recipes/llama7b_prilora.yaml", 2, 8)


@pytest.mark.parametrize("kwargs, field", [
    ({"nodes": 0}, "--nodes"), ({"gpus_per_node": -1}, "--gpus-per-node"),
    ({"launcher": "mpirun"}, "--launcher"), ({"time": "2 hours"}, "--time"),
    ({"partition": "gpu; rm -rf ~"}, "--partition"), ({"cpus_per_task": 0}, "--cpus-per-task"),
])
def test_bad_flags_are_one_line_config_errors(kwargs, field):
    with pytest.raises(ConfigError) as err:
        slurm.render(RECIPE, **{"nodes": 2, "gpus_per_node": 8, **kwargs})
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_a_bad_recipe_fails_when_the_script_is_written_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / RECIPE).read_text().replace("  r: 8", "  rank: 8"))
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: unknown key 'adapter\.rank'"):
        slurm.render(str(bad), nodes=1, gpus_per_node=1)
    with pytest.raises(ConfigError, match="train.resume=auto"):
        slurm.render(RECIPE, ["train.resume=false"], nodes=1, gpus_per_node=1)


def _free_job_id() -> int:
    """A job id whose port (the script's rule) is free here."""
    for job_id in range(os.getpid() % 20000, 20000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", 10000 + job_id))
            except OSError:
                continue
            return job_id
    raise RuntimeError("no free port in 10000-29999")


def _run_job(tmp: Path, launcher: str, overrides: list[str]) -> subprocess.CompletedProcess:
    """The rendered script, run by bash on one fake node with 2 CPU "GPUs" and the real
    launcher: what a requeued or fresh Slurm job runs."""
    job_dir = tmp / launcher
    job_dir.mkdir()
    script = _write_script(job_dir, overrides, launcher, nodes=1, gpus=2)
    result = subprocess.run(["bash", str(script)], check=False, cwd=REPO, capture_output=True,
                            text=True, timeout=400, env=_fake_slurm(job_dir, ["localhost"], _free_job_id()))
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.mark.slow
def test_rendered_jobs_train_and_a_rerun_resumes_from_the_checkpoint(tmp_path):
    """torchrun job: 2 steps, checkpoint at step 2. The deepspeed job on the same output
    directory, as a requeued job would, continues to step 4 from that checkpoint."""
    out = tmp_path / "run"
    common = [f"train.output_dir={out}",
              "train.progress_bar=false", "data.max_length=128", "train.micro_batch_size=2",
              "train.eval_every=null", "train.save_every=2"]
    _run_job(tmp_path, "torchrun", [*common, "train.max_steps=2"])
    first = read_metrics(out)
    assert [r["step"] for r in first] == [1, 2]
    assert {k: _checkpoint_state(out)[k] for k in ("step", "world_size")} == {
        "step": 2, "world_size": 2}
    # a fresh start would truncate metrics.jsonl; a resume from step 2 keeps records 1-2
    marked = [{**record, "written_by": "first job"} for record in first]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in marked))

    result = _run_job(tmp_path, "deepspeed", [*common, "train.max_steps=4"])
    assert "resumed from" in result.stdout + result.stderr
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[:2] == marked
    assert {k: _checkpoint_state(out)[k] for k in ("step", "world_size")} == {
        "step": 4, "world_size": 2}
    assert (out / "adapter/adapter_model.safetensors").is_file()


def _checkpoint_state(output_dir: Path) -> dict:
    latest = (output_dir / "checkpoints/latest").read_text().strip()
    return json.loads((output_dir / "checkpoints" / latest / "dsft_state.json").read_text())
