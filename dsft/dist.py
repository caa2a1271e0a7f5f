"""The only module that knows DeepSpeed's ZeRO internals.

Methods and the loop ask for a parameter gathered, its full fp32 master value, its full
optimizer state, a collective over data-parallel ranks; this module answers for ZeRO-0/1/2/3.
Under ZeRO-1/2 the fp32 masters live in flat partitions behind ``param._hp_mapping``; under
ZeRO-3 the parameter itself is partitioned (``param.ds_id``); under ZeRO-0 the parameter and
``optimizer.state[param]`` are the truth (DeepSpeed's ``safe_*`` helpers return None there).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator

import torch
import torch.distributed as tdist


def init() -> None:
    """Join (or create) the process group: gloo on CPU, nccl on CUDA, through DeepSpeed.

    A plain ``python`` run gets a one-process group so the same code runs with or without a
    launcher. The shm comm op is switched off before init: it JIT-compiles for ~50 s on every
    fresh machine and only speeds up CPU all-reduce.
    """
    import deepspeed
    from deepspeed import ops

    if tdist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        tdist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; every rank ends with the same values."""
    if world_size() > 1:
        tdist.all_reduce(tensor)
    return tensor


def broadcast_object(obj):
    """Rank 0's value on every rank (seeds, masks chosen on one rank)."""
    if world_size() == 1:
        return obj
    holder = [obj]
    tdist.broadcast_object_list(holder, src=0)
    return holder[0]


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Full parameters inside the block (ZeRO-3); with ``modifier_rank`` edits made on that rank
    are broadcast and re-partitioned on exit. Outside ZeRO-3 this is a no-op."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def load_own_partition(param: torch.Tensor, stored) -> None:
    """Copy this rank's ZeRO-3 partition of ``param`` out of ``stored`` (a safetensors slice
    handle of the full tensor), reading only the rows that hold it.

    ZeRO-3 flattens a parameter, pads it to a multiple of the world size and gives rank r the
    flat range [r P, (r + 1) P) with P = ds_tensor.numel()."""
    partition = param.ds_tensor
    size = partition.numel()
    start = rank() * size
    end = min(start + size, param.ds_numel)
    shape = tuple(stored.get_shape())
    row = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
    with torch.no_grad():
        partition.zero_()
        if end > start:
            first_row, last_row = start // row, -(-end // row)
            rows = stored[first_row:last_row].reshape(-1)
            offset = start - first_row * row
            partition[:end - start].copy_(rows[offset:offset + end - start])


def free_partitions(params) -> None:
    """Drop the storage of ZeRO-3 parameters that were replaced (a quantized layer's float
    weights) now rather than when the cycle collector finds them."""
    for param in params:
        if is_partitioned(param):
            param.ds_tensor.data = torch.empty(0, dtype=param.ds_tensor.dtype,
                                               device=param.ds_tensor.device)


def full_fp32_param(param: torch.Tensor) -> torch.Tensor:
    """The optimizer's fp32 master value of ``param``, full shape, on every rank (collective
    under ZeRO-3: call it on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param)
    return (param.detach() if value is None else value).float().clone()


def set_full_fp32_param(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write a full-shape value into the fp32 master and the model's (lower-precision) copy."""
    from deepspeed.utils import safe_set_full_fp32_param

    if is_partitioned(param) or hasattr(param, "_hp_mapping"):
        safe_set_full_fp32_param(param, value.to(torch.float32))
    with gathered([param], modifier_rank=0), torch.no_grad():
        param.data.copy_(value.to(param.device, param.dtype))


def full_optimizer_state(param: torch.Tensor, optimizer, key: str) -> torch.Tensor | None:
    """A full-shape optimizer state tensor (``exp_avg``, ``exp_avg_sq``) or None if absent."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if is_partitioned(param) or hasattr(param, "_hp_mapping"):
        value = safe_get_full_optimizer_state(param, key)
    else:
        value = _raw_optimizer(optimizer).state.get(param, {}).get(key)
    return None if value is None else value.detach().float().clone()


def set_full_optimizer_state(param: torch.Tensor, optimizer, key: str, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    if is_partitioned(param) or hasattr(param, "_hp_mapping"):
        safe_set_full_optimizer_state(param, value.float(), key)
    else:  # a plain torch optimizer creates state lazily: create or replace it
        _raw_optimizer(optimizer).state[param][key] = value.to(param.device, torch.float32).clone()


def full_grad(param: torch.Tensor) -> torch.Tensor | None:
    """The full gradient between backward and step, on every rank (ZeRO-0..3)."""
    from deepspeed.utils import safe_get_full_grad

    grad = safe_get_full_grad(param)
    return param.grad if grad is None else grad


def _raw_optimizer(optimizer):
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, BF16_Optimizer)."""
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_step_count(optimizer) -> int:
    """The Adam step counter shared by every parameter (0 before the first step)."""
    for state in _raw_optimizer(optimizer).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def set_optimizer_step_count(optimizer, step: int) -> None:
    """Set Adam's step counter everywhere. ZeRO optimizers create their (flat) state at init;
    a plain torch optimizer has state only for tensors given one via set_full_optimizer_state."""
    raw = _raw_optimizer(optimizer)
    for group in raw.param_groups:
        for param in group["params"]:
            state = raw.state[param]
            if state:  # keep the counter's type: torch uses a tensor, bitsandbytes an int
                kept_int = isinstance(state.get("step"), int)
                state["step"] = step if kept_int else torch.tensor(float(step))
