"""PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): the second engine beside DeepSpeed ZeRO.

dsft calls ``fully_shard`` itself, the function accelerate's FSDP2 plugin calls, rather than
going through ``Accelerator.prepare``: it needs its own per-layer wrapping (4-bit layers' quant
state, adapters sharded with their layer) and the DTensor-level access behind the dist helpers
below. accelerate is a launcher for it (``accelerate launch ... launch recipe.yaml``).

``shard_model`` applies ``fully_shard`` to every decoder layer and to an untied output layer,
then to the root (the embeddings, the final norm and a tied output layer form the root's
group). Every parameter becomes a DTensor holding this rank's rows (``Shard(0)`` with
``torch.chunk`` sizes: ceil(rows / world) rows per rank, the last ranks fewer or none); frozen
base weights are sharded too, and adapter parameters inside a layer are sharded with that layer.
Trainable parameters are made float32 first: the sharded parameter *is* the optimizer's fp32
master, and ``MixedPrecisionPolicy`` all-gathers a ``param_dtype`` copy for each forward and
backward (``reduce_dtype`` for the gradient reduce).
A 4-bit base (FSDP-QLoRA) shards its packed ``Params4bit`` data like any parameter; that needs a
float ``quant_storage`` equal to the all-gather dtype (dsft.recipe checks it), since the packed
bytes are cast to ``param_dtype`` on the way. The quant state is not a parameter: it is attached
to the sharded parameter and a pre-forward hook hands it to the gathered copy.

``Fsdp2Engine`` is what the loop talks to, with the members of DeepSpeed's engine that
dsft.train and dsft.checkpoint use: ``module``, ``optimizer``, ``lr_scheduler``, ``device``,
calling it, ``train``/``eval``, ``get_lr``, ``backward``, ``is_gradient_accumulation_boundary``,
``step``, ``get_global_grad_norm``, ``save_checkpoint``/``load_checkpoint``; with DeepSpeed's
meaning: ``backward`` divides the loss by the accumulation steps, FSDP2 averages gradients over
ranks, ``step`` is called after every micro-batch and steps the optimizer (clip, step, LR
schedule, zero grads) at the accumulation boundary.

The dist helpers on a DTensor parameter (``dsft.dist`` dispatches here first; everything marked
collective must be called on every rank):

=========================  =====================================================================
dist helper                under FSDP2
=========================  =====================================================================
is_partitioned             True (the parameter itself is sharded)
full_shape                 ``param.shape`` (a DTensor's shape is the full one)
full_fp32_param            ``param.full_tensor()`` in float32 (collective all-gather)
set_full_fp32_param        this rank's rows of the value copied into the local shard (no
                           communication; the next forward all-gathers the new value)
full_optimizer_state       ``optimizer.state[param][key].full_tensor()`` (torch keeps Adam's
                           moments as DTensors like the parameter; collective)
set_full_optimizer_state   rows copied into the local shard of the state, or a new DTensor state
full_grad                  ``param.grad.full_tensor()`` (the reduced, rank-averaged gradient
                           between backward and step; collective)
set_full_grad              rows copied into the local shard of ``param.grad`` (or a new one)
reset_optimizer_state      the parameter's state dropped: torch's AdamW rebuilds it at the next
                           step exactly as at the first (zero moments, step 1)
optimizer_step_count,      unchanged: the step counter is a plain tensor per parameter
set_optimizer_step_count
raw_optimizer              unchanged (the engine holds a plain torch optimizer)
gathered                   ``unshard()`` of the FSDP groups holding the parameters, so the
                           module attributes are full tensors inside the block; with
                           ``modifier_rank`` that rank's values are broadcast and written into
                           every rank's shard on exit; then ``reshard()`` (collective)
local_part                 the local shard, flattened, and the flat offset of its first row
local_copy                 the local shard padded to ceil(rows / world) rows, flattened
full_from_parts            the padded parts all-gathered and the padding cut (collective)
=========================  =====================================================================

Writes go to the sharded (fp32) values; a layer whose group is gathered at that moment (inside
``gathered`` or between a forward and its backward) keeps its gathered copy until it is gathered
again. Inside ``gathered`` the attributes are ``param_dtype`` copies: an edit there is rounded to
it; exact writes go through ``set_full_fp32_param``.

Checkpoints are torch.distributed.checkpoint (DCP) directories: each rank writes its shards of
the trainable parameters, their optimizer state and the buffers, and rank 0 ``engine.json`` (LR
schedule and step counters). DCP's ``.metadata`` file is a pickle (torch's FileSystemReader):
load only a run's own checkpoints, as with DeepSpeed's files; dsft.checkpoint checks the
manifest of every checkpoint before loading.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

# on each sharded parameter: (the fully_shard module managing it, the module holding it, its name)
_OWNER = "_dsft_fsdp2_owner"

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- sharding a model

def device_mesh():
    """The 1-D data-parallel mesh over every rank of the default process group."""
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if tdist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, (tdist.get_world_size(),))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of the classes transformers names as never to be split across devices
    (``_no_split_modules`` of the model and of every transformers model inside it: the decoder
    layers; a vision-language model's encoder layers; an attached speech encoder's layers),
    innermost first, the order ``fully_shard`` wants for nested ones."""
    names = {name for module in model.modules()
             for name in getattr(module, "_no_split_modules", None) or ()}
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class "
                         "(_no_split_modules): FSDP2 cannot wrap it per layer")
    return layers[::-1]


def inner_units(model: nn.Module) -> list[nn.Module]:
    """The modules ``fully_shard`` wraps before the root: every decoder layer, then an output
    layer that shares no weight with the input embeddings. The output layer's own unit gathers
    its weight whenever it is called, as ZeRO-3's module hooks do, so a loss calling it outside
    the model's forward (train.loss chunked or liger, dsft.loss) finds it gathered, and its
    backward gathers it again. A tied output layer stays in the root unit."""
    units = decoder_layers(model)
    head = model.get_output_embeddings()
    embeddings = set(map(id, model.get_input_embeddings().parameters()))
    if head is not None and not any(id(p) in embeddings for p in head.parameters()):
        units.append(head)
    return units


def shard_model(model: nn.Module, options, compute_dtype: str,
                materialize_on: torch.device | None = None) -> nn.Module:
    """``fully_shard`` per inner unit (``inner_units``), then the root; returns ``model`` (now
    an FSDPModule).

    ``options``: the recipe's ``fsdp2`` section (``reshard_after_forward``, ``cpu_offload``,
    ``param_dtype``, ``reduce_dtype``); ``compute_dtype``: the recipe's compute dtype, the
    all-gather dtype unless ``param_dtype`` says otherwise. Call after the adapters are
    injected (their parameters must exist to be sharded with their layer). ``materialize_on``:
    a meta model's shards are allocated there (uninitialised; ``to_empty``), buffers too."""
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy,
                                        fully_shard)

    gather_dtype = TORCH_DTYPES[options.param_dtype or compute_dtype]
    policy = MixedPrecisionPolicy(
        param_dtype=None if gather_dtype == torch.float32 else gather_dtype,
        reduce_dtype=TORCH_DTYPES[options.reduce_dtype])
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if options.cpu_offload \
        else OffloadPolicy()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.is_floating_point():
                param.data = param.data.float()
    quantized = _quantized_layers(model)
    states = {layer: layer.weight.quant_state for layer in quantized}
    mesh = device_mesh()
    units = [*inner_units(model), model]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=options.reshard_after_forward,
                    mp_policy=policy, offload_policy=offload)
    if materialize_on is not None:  # before the marks below: to_empty swaps tensor attributes
        model.to_empty(device=materialize_on)
    for unit in units:  # the innermost group holding a parameter manages it
        for holder in unit.modules():
            for name, param in holder.named_parameters(recurse=False):
                if not hasattr(param, _OWNER):
                    setattr(param, _OWNER, (unit, holder, name))
    for layer, state in states.items():
        layer.weight.quant_state = state
        layer.register_forward_pre_hook(_hand_quant_state(layer.weight))
    return model


def load_sharded(model_cfg, hf_config, prepare, options, compute_dtype: str) -> nn.Module:
    """The base model from ``model_cfg.name_or_path``, sharded without any rank holding it whole
    (dsft.model.load_meta / fill_own_shards): built on the meta device, ``prepare(model)`` (the
    adapters' injection and trainable parts), ``shard_model`` there, each rank's shards
    allocated and read from the checkpoint.

    The parameters and buffers ``prepare`` creates (the adapters, a method's masks) get the
    values they would have in a model built whole: ``prepare`` also runs on a second meta model
    whose checkpoint parameters are replaced by zero-strided CPU tensors (no storage), where
    they are created on the CPU from the same seeded generator; each rank keeps its rows of
    them (the adapters' full size is held once, briefly). The model's own buffers (e.g. rotary
    ``inv_freq``, not in checkpoints) come from there too, built on the CPU by the config. An
    initialisation reading the base weights' values would read zeros there: every method's
    reads only their shapes and dtypes."""
    from dsft import model as model_loading

    model, sources, file_of = model_loading.load_meta(model_cfg, hf_config)
    created, buffers = _prepared_values(model_cfg, hf_config, prepare)
    prepare(model)
    model = shard_model(model, options, compute_dtype, materialize_on=model_loading.device())
    with torch.no_grad():
        for name, buffer in model.named_buffers():  # to_empty left them uninitialised
            buffer.copy_(buffers[name])
        model_loading.fill_own_shards(sources, file_of, model_cfg, _write_rows)
        for name, param in model.named_parameters():
            if name in created:
                _write_rows(param, created[name])
    return model


def _prepared_values(model_cfg, hf_config, prepare) -> tuple[dict, dict]:
    """Name -> value of every parameter ``prepare`` creates, and of every buffer, built on a
    model whose checkpoint parameters take no storage."""
    from dsft import model as model_loading

    shadow, _, _ = model_loading.load_meta(model_cfg, hf_config)
    stand_ins = {}  # by the meta parameter: a tied one stays tied
    for module in shadow.modules():
        for attribute, param in list(module.named_parameters(recurse=False)):
            if id(param) not in stand_ins:
                empty = torch.zeros((), dtype=param.dtype).expand(param.shape)
                stand_ins[id(param)] = nn.Parameter(empty, requires_grad=False) \
                    if not hasattr(param, "quant_type") else type(param)(  # stays 4-bit
                        empty, requires_grad=False, quant_type=param.quant_type,
                        quant_storage=param.quant_storage, bnb_quantized=True, module=module)
            setattr(module, attribute, stand_ins[id(param)])
    loaded = {id(stand_in) for stand_in in stand_ins.values()}
    prepare(shadow)
    created = {name: param.detach().clone() for name, param in shadow.named_parameters()
               if id(param) not in loaded}
    return created, {name: buffer.clone() for name, buffer in shadow.named_buffers()}


def _quantized_layers(model: nn.Module) -> list[nn.Module]:
    if "bitsandbytes" not in sys.modules:  # no 4-bit layer exists without it
        return []
    from dsft import quant

    return [m for m in model.modules() if quant.is_4bit(m)]


def _hand_quant_state(sharded_weight: DTensor):
    """A pre-forward hook giving the gathered copy of a 4-bit weight the quant state kept on
    its sharded parameter (``quant.requantize`` replaces that state, never edits it)."""
    def hook(layer: nn.Module, args) -> None:
        if layer.weight is not sharded_weight:
            layer.weight.quant_state = sharded_weight.quant_state
    return hook


# ---------------------------------------------------------------- where a rank's rows lie

def _rows_per_rank(param: DTensor) -> int:
    if tuple(param.placements) != (Shard(0),) or param.device_mesh.ndim != 1:
        raise ValueError(f"dsft handles FSDP2 parameters sharded by rows on one mesh dimension, "
                         f"not {param.placements}")
    return -(-param.shape[0] // param.device_mesh.size())


def _row_numel(param: DTensor) -> int:
    return math.prod(param.shape[1:])


def _local_rows(like: DTensor, value: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the full-shape ``value``, sharded as ``like`` (no communication)."""
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements,
                             src_data_rank=None).to_local()


def _write_rows(target: DTensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        local = target.to_local()
        local.copy_(_local_rows(target, value.reshape(target.shape)).to(local.dtype))


# ---------------------------------------------------------------- the dist helpers

def full_fp32_param(param: DTensor) -> torch.Tensor:
    return param.detach().full_tensor().float().clone()


def set_full_fp32_param(param: DTensor, value: torch.Tensor) -> None:
    _write_rows(param, value)


def full_optimizer_state(param: DTensor, optimizer, key: str) -> torch.Tensor | None:
    value = optimizer.state.get(param, {}).get(key)
    if value is None:
        return None
    value = value.full_tensor() if isinstance(value, DTensor) else value
    return value.detach().float().clone()


def set_full_optimizer_state(param: DTensor, optimizer, key: str, value: torch.Tensor) -> None:
    """Replace ``key``'s values, or create the state as torch's AdamW would (a DTensor)."""
    state = optimizer.state[param]
    if isinstance(state.get(key), DTensor):
        _write_rows(state[key], value.float())
    else:
        state[key] = distribute_tensor(value.to(param.device, torch.float32).reshape(param.shape),
                                       param.device_mesh, param.placements, src_data_rank=None)


def full_grad(param: DTensor) -> torch.Tensor | None:
    return None if param.grad is None else param.grad.full_tensor()


def set_full_grad(param: DTensor, value: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = distribute_tensor(value.to(param.device, param.dtype).reshape(param.shape),
                                       param.device_mesh, param.placements, src_data_rank=None)
    else:
        _write_rows(param.grad, value)


def reset_optimizer_state(param: DTensor, optimizer) -> None:
    optimizer.state.pop(param, None)


@contextlib.contextmanager
def local_part(param: DTensor) -> Iterator[tuple[torch.Tensor, int]]:
    rank = param.device_mesh.get_local_rank()
    start_row = min(rank * _rows_per_rank(param), param.shape[0])
    with torch.no_grad():
        yield param.to_local().view(-1), start_row * _row_numel(param)


def local_copy(param: DTensor) -> torch.Tensor:
    local = param.to_local().detach().reshape(-1)
    padded = _rows_per_rank(param) * _row_numel(param)
    return torch.nn.functional.pad(local, (0, padded - local.numel())) if local.numel() < padded \
        else local.clone()


def full_from_parts(param: DTensor, part: torch.Tensor) -> torch.Tensor:
    group = param.device_mesh.get_group()
    full = torch.empty(tdist.get_world_size(group) * part.numel(), dtype=part.dtype,
                       device=part.device)
    tdist.all_gather(list(full.split(part.numel())), part.contiguous(), group=group)
    return full[:param.numel()]


@contextlib.contextmanager
def gathered(params: Iterable[DTensor], modifier_rank: int | None = None) -> Iterator[None]:
    params = list(params)
    if not all(hasattr(p, _OWNER) for p in params):
        raise ValueError("a DTensor parameter that dsft.fsdp2.shard_model did not shard")
    units = list({id(getattr(p, _OWNER)[0]): getattr(p, _OWNER)[0] for p in params}.values())
    for unit in units:
        unit.unshard()
    for param in params:  # a 4-bit weight's gathered copy needs its quant state
        _, holder, name = getattr(param, _OWNER)
        if hasattr(param, "quant_state"):
            getattr(holder, name).quant_state = param.quant_state
    yield
    if modifier_rank is not None:
        for param in params:
            _, holder, name = getattr(param, _OWNER)
            gathered_param = getattr(holder, name)
            full = gathered_param.detach()  # the gathered storage: the broadcast lands in it
            tdist.broadcast(full, src=modifier_rank, group=param.device_mesh.get_group())
            _write_rows(param, full)
            if hasattr(param, "quant_state"):  # requantized: the modifier's state, everywhere
                state = [gathered_param.quant_state]
                tdist.broadcast_object_list(state, src=modifier_rank)
                param.quant_state = state[0]
    for unit in units:
        unit.reshard()


# ---------------------------------------------------------------- the engine

class Fsdp2Engine:
    """The loop's engine over a ``shard_model`` model: DeepSpeed's engine interface as dsft
    uses it (module docstring). ``lr_scheduler``: a torch scheduler, or a callable building one
    from the optimizer (what dsft.optim.build_scheduler returns); ``max_grad_norm`` None: no
    clipping (the norm is still measured)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler=None,
                 accumulation_steps: int = 1, max_grad_norm: float | None = None):
        self.module, self.optimizer = model, optimizer
        self.lr_scheduler = lr_scheduler(optimizer) if callable(lr_scheduler) and \
            not isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler) else lr_scheduler
        self.accumulation_steps, self.max_grad_norm = accumulation_steps, max_grad_norm
        self.micro_steps = 0
        self.global_steps = 0
        self._grad_norm: float | None = None

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.accumulation_steps == 0

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss / accumulation_steps``; gradients are reduced across ranks only in
        the boundary micro-batch's backward (earlier ones accumulate unreduced)."""
        self.module.set_requires_gradient_sync(self.is_gradient_accumulation_boundary())
        (loss / self.accumulation_steps).backward()

    def step(self) -> None:
        """After every micro-batch; at the boundary: clip, optimizer step, LR schedule, zero
        the gradients."""
        if self.is_gradient_accumulation_boundary():
            trainable = [p for p in self.module.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(trainable, self.max_grad_norm or math.inf)
            self._grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
            self.optimizer.step()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_steps += 1
        self.micro_steps += 1

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """What a checkpoint holds, as sharded tensors (DTensors; DCP writes each rank's shards):
        ``model``: the trainable parameters and the persistent buffers by name (frozen
        parameters are never written; torch's ``get_model_state_dict`` is not used because it
        walks every ``state_dict`` key as an attribute path, which a 4-bit layer's quant-state
        keys are not); ``optimizer``: torch's sharded optimizer state dict. Collective."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)

        model = {name: param for name, param in self.module.named_parameters()
                 if param.requires_grad}
        for module_name, module in self.module.named_modules():
            for name, buffer in module.named_buffers(recurse=False):
                if name not in module._non_persistent_buffers_set:
                    model[f"{module_name}.{name}" if module_name else name] = buffer
        return {"model": model, "optimizer": get_optimizer_state_dict(
            self.module, self.optimizer, options=StateDictOptions(ignore_frozen_params=True))}

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False,
                        exclude_frozen_parameters: bool = True) -> bool:
        """DCP directory ``save_dir/tag`` (DeepSpeed's signature; frozen parameters are never
        written, ``save_latest`` is not supported). Collective."""
        import torch.distributed.checkpoint as dcp

        if save_latest or not exclude_frozen_parameters:
            raise ValueError("Fsdp2Engine.save_checkpoint writes trainable state only, no latest")
        path = Path(save_dir) / tag
        dcp.save(self.state_dict(), checkpoint_id=str(path))
        if tdist.get_rank() == 0:
            engine_state = {"micro_steps": self.micro_steps, "global_steps": self.global_steps,
                            "lr_scheduler": None if self.lr_scheduler is None else
                            _json_scheduler_state(self.lr_scheduler)}
            (path / "engine.json").write_text(json.dumps(engine_state))
        tdist.barrier()
        return True

    def load_checkpoint(self, load_dir: str, tag: str, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True
                        ) -> tuple[str | None, dict | None]:
        """Restore a ``save_checkpoint`` directory; (path, {}) or (None, None) when there is no
        such checkpoint (DeepSpeed's convention; ``load_module_strict`` has no use: the trainable
        state is always loaded whole). Collective."""
        import torch.distributed.checkpoint as dcp

        path = Path(load_dir) / tag
        if not (path / ".metadata").is_file() or not (path / "engine.json").is_file():
            return None, None
        state = self.state_dict()
        if not load_optimizer_states:
            state.pop("optimizer")
        dcp.load(state, checkpoint_id=str(path))  # the model's tensors are filled in place
        if load_optimizer_states:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 set_optimizer_state_dict)

            set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(ignore_frozen_params=True))
        engine_state = json.loads((path / "engine.json").read_text())
        self.micro_steps, self.global_steps = engine_state["micro_steps"], \
            engine_state["global_steps"]
        if load_lr_scheduler_states and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(engine_state["lr_scheduler"])
        return str(path), {}


def _json_scheduler_state(scheduler) -> dict:
    """A torch scheduler's state without its lambdas (functions: rebuilt from the recipe)."""
    state = scheduler.state_dict()
    if "lr_lambdas" in state:
        state["lr_lambdas"] = [None] * len(state["lr_lambdas"])
    return state
