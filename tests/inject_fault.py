"""``python tests/inject_fault.py FAULT recipe.yaml [overrides]``: ``dsft train`` with one fault
planted, for tests of what a run does when things go wrong.

    nan:STEP:MICRO[,STEP:MICRO...]   the loss of those micro-batches (1-based step) is NaN
    enospc:STEP                      writing the checkpoint of STEP fails: no space left
"""
import errno
import sys

import torch

from dsft import checkpoint, cli, loss, train


def plant_nan(spec: str) -> None:
    targets = {tuple(int(v) for v in pair.split(":")) for pair in spec.split(",")}
    where = {"step": 0, "micro": 0}
    real_accumulate, real_loss = train.Trainer._accumulate, loss.token_loss_sum

    def accumulate(self, step, ctx):
        where.update(step=step + 1, micro=0)
        return real_accumulate(self, step, ctx)

    def token_loss_sum(model, batch, *options):
        value, n = real_loss(model, batch, *options)
        if model.training:
            if (where["step"], where["micro"]) in targets:
                value = value * torch.tensor(float("nan"))
            where["micro"] += 1
        return value, n

    train.Trainer._accumulate = accumulate
    train.token_loss_sum = token_loss_sum


def plant_enospc(step: int) -> None:
    real = checkpoint.save_file

    def save_file(tensors, path, *args, **kwargs):
        if f"step-{step:06d}" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *args, **kwargs)

    checkpoint.save_file = save_file


if __name__ == "__main__":
    kind, _, spec = sys.argv[1].partition(":")
    {"nan": plant_nan, "enospc": lambda s: plant_enospc(int(s))}[kind](spec)
    sys.exit(cli.main(["train", *sys.argv[2:]]))
