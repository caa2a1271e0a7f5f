"""Launcher entry: ``deepspeed [--num_gpus N] launch recipe.yaml [key.sub=value ...]``, or
``torchrun --nproc_per_node N launch ...``, or ``accelerate launch --config_file
accelerate_configs/multi_gpu.yaml launch ...``.

The DeepSpeed launcher runs this folder as the user script with ``--local_rank=N`` before the
recipe; torchrun, ``accelerate launch`` (torch.distributed.run underneath), srun and plain
``python launch`` pass none and the rank comes from the environment (RANK, WORLD_SIZE,
LOCAL_RANK). All of them run ``dsft train``, whichever engine the recipe names: accelerate only
starts the ranks, since dsft calls torch's ``fully_shard`` itself (dsft/fsdp2.py).
"""
import argparse
import os
import sys
from pathlib import Path

try:
    from dsft.cli import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from dsft.cli import main

parser = argparse.ArgumentParser(prog="launch", add_help=False)
parser.add_argument("--local_rank", "--local-rank", type=int, default=None)
known, rest = parser.parse_known_args()
if known.local_rank is not None:
    os.environ["LOCAL_RANK"] = str(known.local_rank)
sys.exit(main(["train", *rest]))
