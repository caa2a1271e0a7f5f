"""Checkpoints (save, resume) and adapter files.

A checkpoint ``output_dir/checkpoints/step-NNNNNN/`` holds
* the engine's own checkpoint of the trainable state (frozen base weights excluded): DeepSpeed's
  files, or a torch.distributed.checkpoint directory under ``engine: fsdp2`` (dsft/fsdp2.py),
  used when the run resumes on the same number of ranks with the same engine;
* ``portable.safetensors``: every trainable tensor's full fp32 master value and full Adam moments,
  gathered one tensor at a time, so a run can resume on a different number of ranks or under the
  other engine (ZeRO <-> FSDP2), and the adapter layers' buffers (method state: masks,
  statistics), restored on every resume;
* ``dsft_state.json`` (step, stream position, world size, engine, LR-scheduler state) and one
  ``rng-rank<N>.pt`` per rank (torch RNG states; loaded with ``weights_only=True``).
Writes are atomic: everything goes into ``.tmp-step-NNNNNN`` and is renamed when complete; the
``latest`` file is replaced by rename. A run killed mid-write resumes from the previous one;
the next write removes the temporary directories killed writes left.

The final adapter ``output_dir/adapter/`` holds ``adapter_model.safetensors`` and
``dsft_adapter.json`` (dsft's metadata: the method whose layers load the tensors, its config).
When a method's trained adapter is an ordinary LoRA pair (lora, lora_sp, allora, ...) it is
also PEFT's: ``adapter_config.json`` is written and ``peft.PeftModel.from_pretrained`` loads
the directory unchanged. Other methods (melora, partial_lora, ...) load through dsft.
Full-weight methods (``none``, ``flora``) add no layers: ``trained_weights.safetensors`` holds
the trained parameters themselves (fp32, under the model's own names), and ``dsft merge`` writes
the base model with them in place. Parameters trained in full beside an adapter's layers (a
vision-language model's vision tower or projector, dsft/vlm.py) are written to that file too,
and loaded with the adapter.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dsft import dist
from dsft.adapters import adapter_layers, inject
from dsft.errors import CheckpointError, DsftError
from dsft.optim.flora import Flora

ADAM_STATES = ("exp_avg", "exp_avg_sq")
ADAPTER_FILE = "adapter_model.safetensors"
FULL_WEIGHTS_FILE = "trained_weights.safetensors"


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` by a rename: a kill leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save(engine, output_dir: Path, step: int, state: dict, keep: int | None,
         also_keep: int | None = None) -> Path:
    """Write checkpoint ``step`` (collective: call on every rank); prune to the newest ``keep``
    and the checkpoint of step ``also_keep`` (the best evaluation, under early stopping)."""
    root = output_dir / "checkpoints"
    tag = f"step-{step:06d}"
    tmp_tag = f".tmp-{tag}"
    if dist.rank() == 0:  # this write's directory, and any that a killed write left behind
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False, exclude_frozen_parameters=True)
    portable = _portable_state(engine)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, root / tmp_tag / f"rng-rank{dist.rank()}.pt")
    dist.barrier()
    if dist.rank() == 0:
        save_file(portable, str(root / tmp_tag / "portable.safetensors"))
        full_state = {**state, "step": step, "world_size": dist.world_size(),
                      "engine": _engine_kind(engine),
                      "optimizer_step": dist.optimizer_step_count(engine.optimizer),
                      "lr_scheduler": _scheduler_state(engine),
                      "files": _manifest(root / tmp_tag)}
        (root / tmp_tag / "dsft_state.json").write_text(json.dumps(full_state, indent=1))
        shutil.rmtree(root / tag, ignore_errors=True)
        os.replace(root / tmp_tag, root / tag)
        atomic_write_text(root / "latest", tag)
        _prune(root, keep, also_keep)
    dist.barrier()
    return root / tag


def _manifest(directory: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint (relative path -> hex digest): a resume checks them
    all before it reads anything, so a truncated, damaged or missing file is reported by name
    instead of failing inside a loader, or loading wrong values."""
    return {str(file.relative_to(directory)): _sha256(file)
            for file in sorted(directory.rglob("*")) if file.is_file()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _problem(path: Path, recipe_adapter: dict) -> str | None:
    """What makes checkpoint ``path`` unusable for a run whose adapter config is
    ``recipe_adapter``, or None."""
    state_file = path / "dsft_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as err:
        return f"{state_file}: unreadable ({type(err).__name__}: {err})"
    for name, digest in state.get("files", {}).items():  # older checkpoints have no manifest
        file = path / name
        if not file.is_file():
            return f"{file}: missing (the checkpoint lists it)"
        if _sha256(file) != digest:
            return f"{file}: damaged or changed since it was written (sha256 differs)"
    saved = state.get("adapter")
    if saved is not None and saved != recipe_adapter:
        if saved.get("method") != recipe_adapter.get("method"):
            return (f"{path} was written by adapter.method {saved.get('method')}, the recipe "
                    f"trains {recipe_adapter.get('method')}")
        changed = sorted(key for key in saved.keys() | recipe_adapter.keys()
                         if saved.get(key) != recipe_adapter.get(key))
        return (f"{path}: the recipe's adapter differs from the checkpoint's in "
                + ", ".join(f"adapter.{key} ({saved.get(key)!r} there, "
                            f"{recipe_adapter.get(key)!r} here)" for key in changed))
    return None


def verify(path: Path, recipe_adapter: dict) -> None:
    """Raise CheckpointError (one line, on every rank) if checkpoint ``path`` is damaged or was
    written for another adapter. Rank 0 reads the files; a collective shares the verdict."""
    problem = _problem(path, recipe_adapter) if dist.rank() == 0 else None
    if dist.all_reduce_sum(torch.tensor([float(problem is not None)])).item():
        raise CheckpointError(problem or f"{path}: unusable (rank 0 says why)")


def _position_attribute(scheduler) -> str:
    """torch schedulers count in ``last_epoch``, DeepSpeed's in ``last_batch_iteration``."""
    return "last_epoch" if hasattr(scheduler, "last_epoch") else "last_batch_iteration"


def _scheduler_state(engine) -> dict | None:
    scheduler = engine.lr_scheduler
    if scheduler is None:
        return None
    return {"position": getattr(scheduler, _position_attribute(scheduler))}


def _prune(root: Path, keep: int | None, also_keep: int | None = None) -> None:
    if keep is None:
        return
    tags = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in tags[:-keep]:
        if also_keep is None or old.name != f"step-{also_keep:06d}":
            shutil.rmtree(old, ignore_errors=True)


def _portable_state(engine) -> dict[str, torch.Tensor]:
    """Full fp32 values and Adam moments of every trainable tensor, one tensor at a time, and
    the adapter layers' persistent buffers (method state, the same on every rank)."""
    tensors = {f"buffer/{module}.{name}": value.detach().cpu().contiguous()
               for module, layer in adapter_layers(engine.module).items()
               for name, value in layer.adapter_buffers().items()}
    for name, param in trainable_parameters(engine.module).items():
        tensors[f"param/{name}"] = dist.full_fp32_param(param).cpu().contiguous()
        for key in ADAM_STATES:
            value = dist.full_optimizer_state(param, engine.optimizer, key)
            if value is not None:
                tensors[f"{key}/{name}"] = value.cpu().contiguous()
    return tensors


def latest(output_dir: Path) -> Path | None:
    pointer = output_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "dsft_state.json").is_file():
        raise CheckpointError(f"{pointer}: points to {path.name}, which is missing or incomplete")
    return path


def resume(engine, path: Path) -> dict:
    """Restore a checkpoint into ``engine``; returns its dsft state (step, stream position).

    Same number of ranks and same engine (or Flora, whose state is replicated): the engine's
    own loader. Otherwise: the portable tensors are written into the fp32 masters and optimizer
    states through ``dsft.dist``. A checkpoint without ``engine`` predates FSDP2: DeepSpeed's."""
    state = json.loads((path / "dsft_state.json").read_text())
    same_world = state["world_size"] == dist.world_size()
    same_engine = state.get("engine", "deepspeed") == _engine_kind(engine)
    # Flora's state (seeds, compressed moments) has no portable form, but it is the same on
    # every rank under ZeRO-0 (the only stage Flora runs, never under FSDP2): DeepSpeed's file,
    # written by rank 0, restores it on any number of ranks
    if same_engine and (same_world or isinstance(dist.raw_optimizer(engine.optimizer), Flora)):
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name,
                                           load_module_strict=False,
                                           load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"{path}: the {_engine_kind(engine)} engine could not load "
                                  "this checkpoint")
    else:
        _load_portable(engine, path, state)
    if same_world:  # each rank's random state, whatever the engine
        rng_file = path / f"rng-rank{dist.rank()}.pt"
        try:
            rng = torch.load(rng_file, weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(f"{rng_file}: not a tensor file (it holds objects other "
                                  "than tensors, which dsft does not unpickle)") from None
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    _load_buffers(engine.module, path)
    return state


def _engine_kind(engine) -> str:
    """The recipe's ``engine`` value that built ``engine``."""
    from dsft.fsdp2 import Fsdp2Engine

    return "fsdp2" if isinstance(engine, Fsdp2Engine) else "deepspeed"


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing, truncated or malformed file is one line."""
    from safetensors import SafetensorError

    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def _load_buffers(model: torch.nn.Module, path: Path) -> None:
    """Method state (adapter-layer buffers) from the portable file, whatever the resume path."""
    from safetensors import safe_open

    with safe_open(str(path / "portable.safetensors"), framework="pt") as stored:
        keys = set(stored.keys())
        for module, layer in adapter_layers(model).items():
            for name, buffer in layer.adapter_buffers().items():
                key = f"buffer/{module}.{name}"
                if key not in keys:
                    raise CheckpointError(f"{path}/portable.safetensors: no tensor for {key}")
                with torch.no_grad():
                    buffer.copy_(stored.get_tensor(key).to(buffer.device, buffer.dtype))


def _load_portable(engine, path: Path, state: dict) -> None:
    tensors = read_tensors(path / "portable.safetensors")
    for name, param in trainable_parameters(engine.module).items():
        if f"param/{name}" not in tensors:
            raise CheckpointError(f"{path}/portable.safetensors: no tensor for parameter {name}")
        if tensors[f"param/{name}"].shape != dist.full_shape(param):
            raise CheckpointError(f"{path}/portable.safetensors: {name} has shape "
                                  f"{tuple(tensors[f'param/{name}'].shape)}, the model "
                                  f"{tuple(dist.full_shape(param))}")
        dist.set_full_fp32_param(param, tensors[f"param/{name}"])
        for key in ADAM_STATES:
            if f"{key}/{name}" in tensors:
                dist.set_full_optimizer_state(param, engine.optimizer, key, tensors[f"{key}/{name}"])
    dist.set_optimizer_step_count(engine.optimizer, state["optimizer_step"])
    scheduler = engine.lr_scheduler
    if scheduler is not None and state.get("lr_scheduler"):
        # one position back, then step: the scheduler writes that position's LR into the groups
        setattr(scheduler, _position_attribute(scheduler), state["lr_scheduler"]["position"] - 1)
        scheduler.step()


# ---------------------------------------------------------------- adapter files

def _peft_config(cfg, names: list[str], base_model: str | None) -> dict:
    target = cfg.target_modules if isinstance(cfg.target_modules, str) and \
        cfg.target_modules != "all-linear" else sorted({n.split(".")[-1] for n in names})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora, "target_modules": target,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {},
            "alpha_pattern": {}, "base_model_name_or_path": base_model}


def save_adapter(model: torch.nn.Module, cfg, out_dir: Path, base_model: str | None,
                 prompt: dict | None = None) -> None:
    """Write each layer's exported tensors (gathered one at a time) and the metadata (with
    ``prompt``: how training rendered prompts, for ``dsft generate``).
    Collective under ZeRO: call on every rank; rank 0 writes."""
    layers = adapter_layers(model)
    tensors = {}
    for module_name, layer in layers.items():
        for tensor_name, value in layer.exported().items():
            tensors[f"base_model.model.{module_name}.{tensor_name}.weight"] = \
                value.float().cpu().contiguous()
    in_layers = tuple(f"{module_name}." for module_name in layers)
    # a full-weight method's trained parameters are the result; beside layers, whatever else
    # trains in full (a VLM's vision tower or projector)
    full_weights = {name: dist.full_fp32_param(param).cpu().contiguous()
                    for name, param in trainable_parameters(model).items()
                    if not name.startswith(in_layers)}
    if dist.rank() != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for file_name, content in ((ADAPTER_FILE, tensors), (FULL_WEIGHTS_FILE, full_weights)):
        if content:
            tmp = out_dir / f".{file_name}.tmp"
            save_file(content, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, out_dir / file_name)
        elif (out_dir / file_name).is_file():  # an earlier run's, not part of this adapter
            (out_dir / file_name).unlink()
    if not layers:
        tensors = full_weights
    names = sorted(layers) or sorted({name.rpartition(".")[0] for name in tensors})
    export_cfg = cfg.export_config()
    per_module_rank = getattr(export_cfg, "per_module_rank", False)
    if export_cfg.method == "lora" or per_module_rank:
        peft_config = _peft_config(export_cfg, names, base_model)
        if per_module_rank:
            peft_config |= _rank_pattern({name: layers[name].r for name in names})
        atomic_write_text(out_dir / "adapter_config.json", json.dumps(peft_config, indent=2))
    atomic_write_text(out_dir / "dsft_adapter.json", json.dumps(
        {"method": export_cfg.method, "trained_with": cfg.method,
         "config": export_cfg.model_dump(), "modules": names, "base_model_name_or_path": base_model,
         "mergeable": all(layer.mergeable for layer in layers.values()),
         "prompt": prompt}, indent=2))


def adapter_description(adapter_dir: Path) -> dict:
    """``dsft_adapter.json`` of an adapter directory, checked: its method and config validate."""
    from dsft.adapters import config_class

    meta_path = adapter_dir / "dsft_adapter.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: not found (not a dsft adapter directory)")
    try:
        meta = json.loads(meta_path.read_text())
        config_class(meta["method"]).model_validate(meta["config"])
    except (ValueError, KeyError, TypeError, DsftError) as err:
        raise CheckpointError(f"{meta_path}: not a dsft adapter description "
                              f"({type(err).__name__}: {' '.join(str(err).split())})") from None
    return meta


def load_adapter(model: torch.nn.Module, adapter_dir: Path) -> None:
    """Inject the adapter described in ``adapter_dir`` into ``model`` and load its tensors."""
    from dsft.adapters import config_class

    meta = adapter_description(adapter_dir)
    cfg = config_class(meta["method"]).model_validate(meta["config"])
    inject(model, cfg)
    if (adapter_dir / FULL_WEIGHTS_FILE).is_file():
        _load_full_weights(model, adapter_dir / FULL_WEIGHTS_FILE)
        if not (adapter_dir / ADAPTER_FILE).is_file():
            return
    tensors = read_tensors(adapter_dir / ADAPTER_FILE)
    layers = adapter_layers(model)
    for key, value in tensors.items():
        module_name, _, tensor_name = key.removeprefix("base_model.model.").removesuffix(
            ".weight").rpartition(".")
        if module_name not in layers:
            raise CheckpointError(f"{adapter_dir}: tensor {key} has no module {module_name} "
                                  "in this base model")
        target = getattr(layers[module_name], tensor_name, None)
        if not isinstance(target, torch.Tensor):
            raise CheckpointError(f"{adapter_dir}: {key} is not a tensor of {meta['method']} layers")
        if target.shape != value.shape:
            raise CheckpointError(f"{adapter_dir}: {key} has shape {tuple(value.shape)}, the "
                                  f"model expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value.to(target.dtype))


def _load_full_weights(model: torch.nn.Module, path: Path) -> None:
    params = dict(model.named_parameters())
    for name, value in read_tensors(path).items():
        if name not in params:
            raise CheckpointError(f"{path}: tensor {name} is not a parameter of this base model")
        if params[name].shape != value.shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(value.shape)}, the model "
                                  f"expects {tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(value.to(params[name].dtype))


def _rank_pattern(ranks: dict[str, int]) -> dict:
    """PEFT's ``r`` and ``rank_pattern`` for LoRA pairs whose rank differs per module (prilora):
    the most common rank as ``r``, every other module by its full name (PEFT matches a pattern
    against the end of a module's name, after a dot)."""
    values = list(ranks.values())
    common = max(sorted(set(values)), key=values.count)
    return {"r": common, "rank_pattern": {name: r for name, r in ranks.items() if r != common}}
