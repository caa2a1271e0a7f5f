"""Experiment trackers (``train.report_to``) and the cost figures a step logs beside its loss.

Trackers run on rank 0 only, each through its own library, and log exactly the records of
``metrics.jsonl``: every number of a record under the same name, at the record's ``step``.

* ``tensorboard``: ``output_dir/tensorboard`` through ``torch.utils.tensorboard``.
* ``wandb``: a run in project ``train.project`` named ``train.run_name`` (default: the last part
  of output_dir), the recipe as its config. Where it writes and whether it syncs are wandb's
  own settings (``WANDB_MODE=offline``, ``WANDB_DIR``; without WANDB_DIR: output_dir/wandb).
* ``mlflow``: a run in experiment ``train.project`` named as above, the recipe as the artifact
  ``recipe.json``. The tracking store is MLflow's own setting (``MLFLOW_TRACKING_URI``).

Cost figures:

* ``peak_memory_gib``: rank 0's peak so far: ``torch.cuda.max_memory_allocated`` on CUDA, else
  the process's peak resident set size (``getrusage``, which counts the whole process).
* ``mfu``: model FLOPs utilisation, logged only on a GPU whose dense bf16/fp16 peak is in
  ``DENSE_PEAK_FLOPS`` and when the model computes in bf16/fp16::

      FLOPs per token = 6 N_trained + 4 N_frozen + 12 L d S
      mfu = FLOPs per token x tokens/s (all ranks) / (ranks x device peak)

  (forward 2N and backward 4N for trained matmul weights; forward 2N and the input gradient 2N
  for frozen ones; attention scores and values 12 L d S with S the step's mean padded row
  length, without the causal half, as PaLM's appendix counts; recomputation by gradient
  checkpointing is not model FLOPs.) N counts 2-D weights by their logical shape (4-bit weights
  by their quant_state, ZeRO-3 partitions by their full size) and the output head, not the
  embedding lookup. ``bench/gpu_smoke.py`` uses the same count.
"""
from __future__ import annotations

import os
import resource
from pathlib import Path

import torch

# datasheet dense (no sparsity) bf16 tensor-core peaks, per device name substring; the first
# match wins, so the more specific names come first
DENSE_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835.5e12, "H100": 989.4e12,
                    "H200": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "L4": 121e12}


class Trackers:
    """The trackers ``train.report_to`` names, opened on construction (call on rank 0 only)."""

    def __init__(self, names: list[str], recipe, output_dir: Path):
        run_name = recipe.train.run_name or output_dir.resolve().name
        config = recipe.model_dump(mode="json")
        self.tensorboard = self.wandb = self.mlflow = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
        if "wandb" in names:
            import wandb

            directory = os.environ.get("WANDB_DIR", str(output_dir))
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(project=recipe.train.project, name=run_name, config=config,
                                    dir=directory)
        if "mlflow" in names:
            import mlflow

            mlflow.set_experiment(recipe.train.project)
            self.mlflow = mlflow.start_run(run_name=run_name)
            mlflow.log_dict(config, "recipe.json")

    def log(self, record: dict) -> None:
        step = record["step"]
        values = {key: value for key, value in record.items()
                  if key != "step" and isinstance(value, (int, float))}
        if self.tensorboard:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(values, step=step)
        if self.mlflow:
            import mlflow

            mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
        if self.mlflow:
            import mlflow

            mlflow.end_run()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


class ModelFlops:
    """Model FLOPs per token of one training step and the device's peak (see the module doc)."""

    def __init__(self, model: torch.nn.Module, compute_dtype: str, device: torch.device):
        self.peak = None
        if device.type == "cuda" and compute_dtype in ("bfloat16", "float16"):
            name = torch.cuda.get_device_name(device)
            self.peak = next((peak for key, peak in DENSE_PEAK_FLOPS.items() if key in name),
                             None)
        self.trained = self.frozen = 0
        if self.peak is None:  # no MFU to report: nothing to count
            return
        embedding = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        weights = [(p, p.requires_grad) for p in model.parameters()
                   if p is not embedding and _is_matrix(p)]
        if head is not None and head.weight is embedding:  # tied: the head is a matmul too
            weights.append((embedding, embedding.requires_grad))
        for param, trained in weights:
            if trained:
                self.trained += _logical_numel(param)
            else:
                self.frozen += _logical_numel(param)
        text = model.config.get_text_config()
        self.layers, self.hidden = text.num_hidden_layers, text.hidden_size

    def per_token(self, row_length: float) -> float:
        return (6 * self.trained + 4 * self.frozen
                + 12 * self.layers * self.hidden * row_length)

    def mfu(self, tokens_per_s: float, row_length: float, world: int) -> float | None:
        if self.peak is None:
            return None
        return self.per_token(row_length) * tokens_per_s / (world * self.peak)


def _is_matrix(param: torch.Tensor) -> bool:
    shape = getattr(param, "ds_shape", param.shape)
    return len(shape) >= 2 or getattr(param, "quant_state", None) is not None


def _logical_numel(param: torch.Tensor) -> int:
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:
        return int(torch.Size(quant_state.shape).numel())
    return int(getattr(param, "ds_numel", param.numel()))
