"""The only module that knows DeepSpeed's ZeRO internals.

Methods and the loop ask for a parameter gathered, its full fp32 master value, its full
optimizer state, a collective over data-parallel ranks; this module answers for ZeRO-0/1/2/3.
Under ZeRO-1/2 the fp32 masters live in flat partitions behind ``param._hp_mapping``; under
ZeRO-3 the parameter itself is partitioned (``param.ds_id``); under ZeRO-0 the parameter and
``optimizer.state[param]`` are the truth (DeepSpeed's ``safe_*`` helpers return None there).
Under FSDP2 a parameter is a DTensor: each helper hands it to its ``dsft.fsdp2`` counterpart.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as tdist


def close() -> None:
    """Leave the process group once every rank has got here (a barrier, then destroy), so that
    gloo's and NCCL's threads are joined before the interpreter exits: a rank exiting with them
    still running can abort at exit ("terminate called without an active exception", seen once
    in a 2-rank CPU run under load). Only where every rank ends normally."""
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def init() -> None:
    """Join (or create) the process group through DeepSpeed, with its accelerator's backend
    (gloo on CPU, nccl on CUDA).

    A plain ``python`` run gets a one-process group so the same code runs with or without a
    launcher. The shm comm op is switched off before init: it JIT-compiles for ~50 s on every
    fresh machine and only speeds up CPU all-reduce.
    """
    import deepspeed
    from deepspeed import ops
    from deepspeed.accelerator import get_accelerator

    if tdist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed's accelerator (DS_ACCELERATOR) decides, not torch.cuda: a CPU run on a machine
    # with a GPU (the test suite's) must use gloo
    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    if world_size() > 1:
        _register_process()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- a rank that is gone
#
# A rank killed (SIGKILL, the OOM killer) or crashed leaves the others in a collective. Gloo
# raises as soon as the dead process's sockets close (same host: at once); a peer that hangs
# or whose node vanished is waited for until the process-group timeout (DeepSpeed's
# DEEPSPEED_TIMEOUT, in minutes, default 10), NCCL's watchdog likewise. Either way the error
# names an address, not a rank: ``lost_ranks_reported`` asks the rendezvous store which ranks
# are still there and turns the error into one line naming the lost ones.

_ANSWER_WAIT_S = 5.0  # how long survivors wait for each other's answer after a failed collective
_store = None  # a client of the launcher's rendezvous store (MASTER_ADDR:MASTER_PORT)


def _store_key(kind: str, of_rank: int) -> str:
    # torchrun's agent keeps its store when it restarts the workers (--max-restarts)
    return f"dsft/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{kind}/{of_rank}"


def _register_process() -> None:
    """Record this rank's host and pid, so that a survivor can tell a rank whose process ended
    from one that is only slow to answer."""
    global _store
    _store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                            is_master=False, timeout=timedelta(seconds=_ANSWER_WAIT_S))
    _store.set(_store_key("process", rank()), f"{socket.gethostname()} {os.getpid()}")


def _process_ended(of_rank: int) -> bool:
    """Whether ``of_rank`` ran on this host and its process is gone (or a zombie that its
    launcher has not reaped yet). psutil comes with DeepSpeed."""
    import psutil

    key = _store_key("process", of_rank)
    if not _store.check([key]):
        return False
    host, pid = _store.get(key).decode().split()
    if host != socket.gethostname():
        return False
    try:
        return psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _lost_ranks() -> tuple[list[int], bool]:
    """After a failed collective: this rank says it is alive, then waits (at most
    ``_ANSWER_WAIT_S``) until a rank on this host is seen gone or every rank has answered.
    Returns the lost ranks and whether their processes were seen to end (else: did not answer)."""
    _store.set(_store_key("alive", rank()), "1")
    deadline = time.monotonic() + _ANSWER_WAIT_S
    while True:
        silent = [r for r in range(world_size()) if not _store.check([_store_key("alive", r)])]
        ended = [r for r in silent if _process_ended(r)]
        if ended or not silent or time.monotonic() > deadline:
            return (ended, True) if ended else (silent, False)
        time.sleep(0.1)


def _is_peer_failure(err: RuntimeError) -> bool:
    # NCCL and the store raise torch.distributed.DistError; gloo a RuntimeError from its transport
    return isinstance(err, tdist.DistError) or "/gloo/transport/" in str(err)


@contextlib.contextmanager
def lost_ranks_reported() -> Iterator[None]:
    """Around a run: a collective that fails because a rank is gone becomes a TrainingError
    naming that rank (one line, exit status 2 from the CLI) instead of a traceback per rank."""
    from dsft.errors import TrainingError

    try:
        yield
    except RuntimeError as err:
        if _store is None or not _is_peer_failure(err):
            raise
        # the launcher now SIGTERMs the survivors; this process is ending anyway, with the message
        for stop_signal in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(stop_signal, signal.SIG_IGN)
        cause = str(err).splitlines()[0][:200]
        store = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        try:
            lost, ended = _lost_ranks()
        except RuntimeError:  # the store is gone with the process that hosted it
            raise TrainingError(f"lost rank 0 or the launcher (the rendezvous store at {store} "
                                f"does not answer) while rank {rank()} was in a collective "
                                f"({cause}); every rank stops: resume with train.resume=auto"
                                ) from None
        if not lost:
            raise
        how = ("its process ended: killed, crashed or out of memory" if ended else
               f"no answer within {_ANSWER_WAIT_S:g} s: hung, or its node is unreachable")
        raise TrainingError(f"lost rank {', '.join(map(str, lost))} ({how}) while rank {rank()} "
                            f"was in a collective ({cause}); every rank stops: resume with "
                            "train.resume=auto") from None


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


def _fsdp2(param: torch.Tensor):
    """``dsft.fsdp2`` when ``param`` is an FSDP2 (DTensor) parameter, else None."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        from dsft import fsdp2

        return fsdp2
    return None


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") or _fsdp2(param) is not None


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Full parameters inside the block (ZeRO-3); with ``modifier_rank`` edits made on that rank
    are broadcast and re-partitioned on exit. Outside ZeRO-3 this is a no-op."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    if fsdp2 := _fsdp2(params[0]):
        with fsdp2.gathered(params, modifier_rank):
            yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def differentiable_full(param: torch.Tensor) -> torch.Tensor:
    """The full value of ``param`` as a tensor autograd connects to it, for a term computed
    outside the model's forward: call inside ``gathered`` (ZeRO-3's parameter is then whole,
    and is that tensor); under FSDP2 the sharded parameter's all-gather (collective), whose
    backward hands each rank the rows of the gradient it stores."""
    if _fsdp2(param) is not None:
        return param.full_tensor()
    return param


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
        if hasattr(param, "ds_tensor"):
            param.ds_tensor.data = torch.empty(0, dtype=param.ds_tensor.dtype,
                                               device=param.ds_tensor.device)


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's whole shape (a ZeRO-3 partition's own shape is its slice's)."""
    return getattr(param, "ds_shape", param.shape)


def full_fp32_param(param: torch.Tensor) -> torch.Tensor:
    """The optimizer's fp32 master value of ``param``, full shape, on every rank (collective
    under ZeRO-3: call it on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param
    if fsdp2 := _fsdp2(param):
        return fsdp2.full_fp32_param(param)

    value = safe_get_full_fp32_param(param)
    return (param.detach() if value is None else value).float().clone()


def set_full_fp32_param(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write a full-shape value into the fp32 master and the model's (lower-precision) copy."""
    if fsdp2 := _fsdp2(param):
        return fsdp2.set_full_fp32_param(param, value)
    from deepspeed.utils import safe_set_full_fp32_param

    if is_partitioned(param) or hasattr(param, "_hp_mapping"):
        safe_set_full_fp32_param(param, value.to(torch.float32))
    with gathered([param], modifier_rank=0), torch.no_grad():
        param.data.copy_(value.to(param.device, param.dtype))


def full_optimizer_state(param: torch.Tensor, optimizer, key: str) -> torch.Tensor | None:
    """A full-shape optimizer state tensor (``exp_avg``, ``exp_avg_sq``) or None if absent."""
    if fsdp2 := _fsdp2(param):
        return fsdp2.full_optimizer_state(param, raw_optimizer(optimizer), key)
    from deepspeed.utils import safe_get_full_optimizer_state

    if is_partitioned(param) or hasattr(param, "_hp_mapping"):
        if not flat_optimizer_state_ready(param, optimizer, key):
            return None
        value = safe_get_full_optimizer_state(param, key)
    else:
        value = raw_optimizer(optimizer).state.get(param, {}).get(key)
    return None if value is None else value.detach().float().clone()


def set_full_optimizer_state(param: torch.Tensor, optimizer, key: str, value: torch.Tensor) -> None:
    if fsdp2 := _fsdp2(param):
        return fsdp2.set_full_optimizer_state(param, raw_optimizer(optimizer), key, value)
    from deepspeed.utils import safe_set_full_optimizer_state

    if is_partitioned(param) or hasattr(param, "_hp_mapping"):
        _create_zero_adam_state(optimizer)
        safe_set_full_optimizer_state(param, value.float(), key)
    else:  # a plain torch optimizer creates state lazily: create or replace it
        raw_optimizer(optimizer).state[param][key] = value.to(param.device, torch.float32).clone()


def _create_zero_adam_state(optimizer) -> None:
    """DeepSpeed's ZeRO optimizers leave the wrapped torch optimizer's state to its first step
    (and ZeRO-1/2 link each parameter to its fragment of that state only then), so before it (a
    resume from the portable file) there is nothing to write into: create Adam's state of every
    flat fp32 partition as torch's AdamW does at its first step (zero moments, step 0), and link."""
    inner = raw_optimizer(optimizer)
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return  # bitsandbytes and DeepSpeed's own Adams keep other state formats
    flats = getattr(optimizer, "single_partition_of_fp32_groups", None) or \
        getattr(optimizer, "fp32_partitioned_groups_flat", None) or []
    on_device = any(group.get("fused") or group.get("capturable") for group in inner.param_groups)
    for flat in flats:
        state = inner.state[flat]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32,
                                        device=flat.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._lazy_init_hp_params_optimizer_state()


def full_grad(param: torch.Tensor) -> torch.Tensor | None:
    """The full gradient between backward and step, on every rank (ZeRO-0..3)."""
    if fsdp2 := _fsdp2(param):
        return fsdp2.full_grad(param)
    from deepspeed.utils import safe_get_full_grad

    grad = safe_get_full_grad(param)
    return param.grad if grad is None else grad


def set_full_grad(param: torch.Tensor, value: torch.Tensor) -> None:
    """Replace the full gradient between backward and step (each rank writes its own part)."""
    if fsdp2 := _fsdp2(param):
        return fsdp2.set_full_grad(param, value)
    from deepspeed.utils import safe_set_full_grad

    safe_set_full_grad(param, value.to(torch.float32 if param.grad is None else param.grad.dtype))


def raw_optimizer(optimizer):
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, BF16_Optimizer)."""
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_step_count(optimizer) -> int:
    """The Adam step counter shared by every parameter (0 before the first step)."""
    for state in raw_optimizer(optimizer).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def set_optimizer_step_count(optimizer, step: int) -> None:
    """Set Adam's step counter everywhere. ZeRO optimizers create their (flat) state at init;
    a plain torch optimizer has state only for tensors given one via set_full_optimizer_state.
    The states are found in ``state``, not through ``param_groups``: ZeRO-3 empties a group's
    ``params`` between steps."""
    for param, state in raw_optimizer(optimizer).state.items():
        if not state:
            continue
        old = state.get("step")
        if isinstance(old, int):  # bitsandbytes counts with an int
            state["step"] = step
        else:  # torch: a tensor, kept where it was (fused CUDA Adam wants it on the GPU)
            like = old if isinstance(old, torch.Tensor) else torch.empty((), device=param.device)
            state["step"] = torch.full((), float(step), dtype=like.dtype, device=like.device)


@contextlib.contextmanager
def local_part(param: torch.Tensor) -> Iterator[tuple[torch.Tensor, int]]:
    """``(flat, start)``: the part of ``param`` this rank stores, flattened, and the offset of its
    first element in the flattened full tensor. Editing ``flat`` in place edits the parameter,
    with nothing gathered. Outside ZeRO-3 it is the whole tensor (start 0); under ZeRO-3 it is
    this rank's partition without its padding (empty on a rank whose partition is all padding).
    A ZeRO-3 parameter that is gathered at the moment (small "persistent" ones stay gathered)
    has its full copy rebuilt from the edited partitions on exit (collective: every rank)."""
    if fsdp2 := _fsdp2(param):
        with fsdp2.local_part(param) as part:
            yield part
        return
    if not is_partitioned(param):
        yield param.data.view(-1), 0
        return
    partition = param.ds_tensor.data.view(-1)
    start = rank() * partition.numel()
    yield partition[:max(0, min(partition.numel(), param.ds_numel - start))], start
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if param.ds_status == ZeroParamStatus.AVAILABLE:
        with torch.no_grad():
            param.data.view(-1).copy_(full_from_parts(param, partition))


def local_copy(param: torch.Tensor) -> torch.Tensor:
    """A copy of what this rank stores of ``param`` (flattened; under ZeRO-3 its partition,
    padding included), to be rebuilt whole later by ``full_from_parts``. Nothing is gathered."""
    if fsdp2 := _fsdp2(param):
        return fsdp2.local_copy(param)
    stored = param.ds_tensor.data if is_partitioned(param) else param.data
    return stored.detach().reshape(-1).clone()


def full_from_parts(param: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """The full flattened tensor whose rank-local parts (as ``local_copy(param)`` returns them)
    every rank holds in ``part``: all-gathered under ZeRO-3 (collective), else ``part`` itself."""
    if fsdp2 := _fsdp2(param):
        return fsdp2.full_from_parts(param, part)
    if not is_partitioned(param):
        return part
    full = torch.empty(world_size() * part.numel(), dtype=part.dtype, device=part.device)
    tdist.all_gather(list(full.split(part.numel())), part.contiguous())  # no concatenated copy
    return full[:param.ds_numel]


def reset_optimizer_state(param: torch.Tensor, optimizer) -> None:
    """Make the optimizer forget ``param``'s history, as if it had never been stepped.

    Where DeepSpeed keeps fp32 masters in flat partitions (ZeRO-1/2/3, bf16/fp16 at any stage)
    Adam's ``exp_avg`` and ``exp_avg_sq`` of the parameter are zeroed; its step counter belongs
    to the flat group, so restart it with ``set_optimizer_step_count`` once every parameter of
    the group is reset. A plain optimizer (ZeRO-0 in the parameter's own dtype) has its state
    for the parameter dropped: torch and bitsandbytes optimizers rebuild it at the next step
    exactly as at the first (zero moments, step 1)."""
    if fsdp2 := _fsdp2(param):
        return fsdp2.reset_optimizer_state(param, raw_optimizer(optimizer))
    from deepspeed.utils import safe_set_full_optimizer_state

    if is_partitioned(param) or hasattr(param, "_hp_mapping"):
        zeros = torch.zeros(getattr(param, "ds_numel", param.numel()), dtype=torch.float32,
                            device=param.device)
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(param, zeros, key)
    else:
        raw_optimizer(optimizer).state.pop(param, None)


def flat_optimizer_state_ready(param: torch.Tensor, optimizer, key: str) -> bool:
    """Whether DeepSpeed's flat optimizer (ZeRO-1/2/3, bf16) holds state ``key`` for ``param``;
    the same answer on every rank. An optimizer creates a group's state at its first step, so a
    group kept paused so far has none. ZeRO-1/2 and the bf16 optimizer link each parameter to its
    state once, at the first step of any group: a group that first stepped later is linked here."""
    if is_partitioned(param):
        zero3 = param._z3_optimizer
        sub_group = zero3.grad_position[zero3.get_param_id(param)][0]
        return key in zero3.optimizer.state.get(zero3.fp32_partitioned_groups_flat[sub_group], {})
    groups = getattr(optimizer, "bit16_groups", None) or optimizer.bf16_groups
    flats = (getattr(optimizer, "single_partition_of_fp32_groups", None)
             or optimizer.fp32_groups_flat_partition)
    index = next(i for i, group in enumerate(groups) if any(p is param for p in group))
    if key not in optimizer.optimizer.state.get(flats[index], {}):
        return False
    mapping = param._hp_mapping  # None on a rank whose partition holds none of the parameter
    if mapping is not None and key not in (mapping.optim_fragment or {}):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    return True
