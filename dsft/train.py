"""The training loop: one DeepSpeed engine, the method's hooks at fixed points of each step.

    hooks.plan(T)                       once, before the engine: the LR schedule's period
    for step t = start .. T-1:
        hooks.before_step(ctx)
        micro-batches <- this rank's share of global batch t          (hooks.batches)
        N <- label tokens in the whole global batch (all ranks)
        for each micro-batch m, inside hooks.forward_context(m):
            loss_m <- sum of token cross-entropies of m  (+ hooks.extra_loss)
            engine.backward(loss_m * world * accumulation / N)
            [a method's own objective (hooks.loss_terms): sum_k hooks.loss_sums(m)_k / N_k,
             N_k term k's size over the global batch (hooks.loss_sizes)]
        [flora: average compressed accumulators and dense gradients over ranks; clip]
        hooks.after_backward(ctx)       gradients complete, optimizer not yet stepped
        engine.step()                   clip, optimizer step, LR schedule
        hooks.after_step(ctx)
        log / eval / checkpoint / early stopping

Normalising by the global token count N (DeepSpeed divides by the accumulation steps and
averages over ranks) makes the gradient the mean over every label token of the global batch,
exactly, however the batch is split between ranks and micro-batches: a 2-rank run equals the
1-process run with twice the accumulation.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from dsft import adapters, checkpoint, data, data_stream, dist, formats, trackers, vlm
from dsft import model as model_loading
from dsft.batches import StepBatches
from dsft.errors import ConfigError, TrainingError
from dsft.loss import check_kind, token_loss_sum
from dsft.optim import build_optimizer, build_scheduler
from dsft.optim.flora import Flora
from dsft.preemption import Preempted, StopRequests
from dsft.recipe import (DataConfig, Recipe, fill_deepspeed_config, resolve_model, total_steps,
                         warmup_steps, zero_stage)

log = logging.getLogger("dsft")


@dataclass
class StepTotals:
    """What one optimizer step measured over the global batch (all ranks)."""
    loss_sum: float  # sum of token cross-entropies
    label_tokens: int
    tokens: int
    padding_fraction: float  # share of padded token slots
    grad_norm: float | None
    stop_requested: bool  # some rank was asked to stop (dsft.preemption)
    terms: dict[str, float] | None = None  # a method's own objective: each term's mean

    @property
    def loss(self) -> float:
        """The step's loss: the mean token cross-entropy, or the sum of the method's terms."""
        if self.terms is not None:
            return sum(self.terms.values())
        return self.loss_sum / max(self.label_tokens, 1)


@dataclass
class EarlyStopping:
    """``train.early_stopping_patience``: the run stops after ``patience`` evaluations in a row
    that did not lower the best eval loss so far by at least ``min_delta``. The best adapter is
    the one of the lowest eval loss, whatever the margin (output_dir/adapter, and its checkpoint
    is kept from pruning)."""
    patience: int
    min_delta: float
    best_loss: float = math.inf
    best_step: int | None = None
    evals_without_improvement: int = 0

    def update(self, step: int, eval_loss: float) -> bool:
        """Count one evaluation; True when it is the best so far."""
        improved = eval_loss < self.best_loss - self.min_delta
        self.evals_without_improvement = 0 if improved else self.evals_without_improvement + 1
        if eval_loss < self.best_loss:
            self.best_loss, self.best_step = eval_loss, step
            return True
        return False

    @property
    def exhausted(self) -> bool:
        return self.evals_without_improvement >= self.patience

    def state(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step,
                "evals_without_improvement": self.evals_without_improvement}


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


class Trainer:
    """Builds everything a recipe names, then runs ``fit``."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.output_dir = Path(recipe.train.output_dir)
        dist.init()
        torch.manual_seed(recipe.train.seed)
        check_kind(recipe.train.loss)  # a liger run this machine cannot do: refused before loading
        self.rank, self.world = dist.rank(), dist.world_size()
        self.tokenizer = model_loading.load_tokenizer(recipe.model)
        hf_config = model_loading.load_config(recipe.model)
        # a vision-language model's image records, pixels and image tokens (dsft/vlm.py)
        images = vlm.image_inputs(recipe.model, hf_config, self.tokenizer)
        streaming = recipe.data.streaming  # train examples read while training (data_stream)
        share = recipe.train.micro_batch_size * recipe.train.gradient_accumulation_steps
        # a method that reads data of its own (blsp_kd's speech manifests), else dsft.data
        own_data = adapters.method(recipe.adapter.method).hooks.datasets(recipe, self.tokenizer)
        self.train_set, self.eval_set, dropped = own_data if own_data is not None else \
            data_stream.build_datasets(recipe, self.tokenizer, images, keep=share) if streaming \
            else data.build_datasets(recipe.data, self.tokenizer, recipe.train.seed, images)
        if dropped and self.rank == 0:
            log.warning("dropped %d examples with no response token after truncation", dropped)
        if recipe.train.eval_every and not self.eval_set:
            raise ConfigError("train.eval_every: there are no eval examples (data.eval, or "
                              "data.eval_fraction of data.train); set train.eval_every: null")
        self.total_steps = recipe.train.max_steps if streaming else \
            total_steps(recipe, len(self.train_set), self.world)
        self.fsdp2 = recipe.engine == "fsdp2"  # dsft/fsdp2.py builds the engine, not DeepSpeed
        self.ds_config = {} if self.fsdp2 else fill_deepspeed_config(
            recipe, self.world, self.total_steps, hf_config.get_text_config().hidden_size)

        def prepare(model):
            adapters.inject(model, recipe.adapter, seed=recipe.train.seed)
            vlm.set_trainable_parts(model, recipe.model)

        self._zero3_keep_alive = None
        if self.fsdp2 and recipe.model.name_or_path:  # built on meta: no rank holds it whole
            from dsft.fsdp2 import load_sharded

            model = load_sharded(recipe.model, hf_config, prepare, recipe.fsdp2,
                                 recipe.compute_dtype)
        else:
            model, self._zero3_keep_alive = model_loading.load_model(recipe.model, hf_config,
                                                                     self.ds_config)
            prepare(model)
            if self.fsdp2:  # a config's random init: built whole, then sharded
                from dsft.fsdp2 import shard_model

                model = shard_model(model, recipe.fsdp2, recipe.compute_dtype)
        self.hooks = adapters.method(recipe.adapter.method).hooks(recipe.adapter, model)
        self.lr_period = self.hooks.plan(self.total_steps)
        if self.lr_period and "scheduler" in self.ds_config:
            raise ConfigError(f"deepspeed.scheduler: adapter {recipe.adapter.method} restarts the "
                              f"learning-rate schedule every {self.lr_period} steps, which only "
                              "dsft's own scheduler does; remove the DeepSpeed scheduler block")
        self.engine = self._engine(model)
        self.flops = trackers.ModelFlops(self.engine.module, recipe.compute_dtype,
                                         self.engine.device)
        self.early_stopping = recipe.train.early_stopping_patience and EarlyStopping(
            recipe.train.early_stopping_patience, recipe.train.early_stopping_min_delta)
        self.prompt = _prompt_format(recipe.data, self.tokenizer) if self.rank == 0 else None
        self.stops = StopRequests(self.output_dir, self.rank)
        self.nonfinite_skips = 0
        # FlashAttention separates packed examples only within a single row (dsft.data)
        self.padding_free = recipe.data.packing and \
            model.config._attn_implementation.startswith("flash_attention")
        self.batches = data_stream.StreamSteps(
            recipe.train.micro_batch_size, recipe.train.gradient_accumulation_steps,
            self.world) if streaming else self.hooks.batches(
            partial(StepBatches, micro_batch=recipe.train.micro_batch_size,
                    accumulation=recipe.train.gradient_accumulation_steps,
                    world_size=self.world, seed=recipe.train.seed), len(self.train_set))

    def _engine(self, model):
        import deepspeed

        groups = self.hooks.param_groups(model)
        optimizer = scheduler = None
        if "optimizer" not in self.ds_config:
            optimizer = build_optimizer(self.recipe.optimizer, groups, seed=self.recipe.train.seed)
        if "scheduler" not in self.ds_config:
            span = self.lr_period or self.total_steps  # one schedule per period, or per run
            scheduler = build_scheduler(self.recipe.scheduler, warmup_steps(self.recipe, span),
                                        span, periodic=self.lr_period is not None)
        if self.fsdp2:  # flora is refused there (dsft.recipe)
            from dsft.fsdp2 import Fsdp2Engine

            self.flora = None
            train = self.recipe.train
            return Fsdp2Engine(model, optimizer, scheduler, train.gradient_accumulation_steps,
                               train.max_grad_norm)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups,
                                          optimizer=optimizer, lr_scheduler=scheduler,
                                          config=self.ds_config)
        self.flora = optimizer if isinstance(optimizer, Flora) else None
        if self.flora:
            # Flora owns the step's gradients: backward hooks fold each micro-batch's gradient
            # of a compressed weight into its r-row accumulator and free it, and _accumulate
            # averages accumulators and dense gradients over ranks in one flat all-reduce. So
            # DeepSpeed's ZeRO-0 all-reduce, which would zero-fill and send every full
            # gradient, is off; its accumulation counter still marks the boundary, it divides
            # the loss by the accumulation steps, and it steps the (unwrapped) optimizer.
            # One process without accumulation has nothing to accumulate or send: Flora then
            # steps on the full gradient, as the released optimizer does.
            self.flora_compresses = (self.recipe.train.gradient_accumulation_steps > 1
                                     or self.world > 1)
            if self.flora_compresses:
                self.flora.register_accumulation_hooks()
            engine.enable_backward_allreduce = False
        return engine

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        recipe, engine = self.recipe, self.engine
        start_step = self._resume()
        metrics_file = self.output_dir / "metrics.jsonl"
        if self.rank == 0:
            _truncate_metrics(metrics_file, after_step=start_step)
        tracking = trackers.Trackers(recipe.train.report_to, recipe, self.output_dir) \
            if self.rank == 0 else None
        bar = tqdm(total=self.total_steps, initial=start_step, desc="train",
                   disable=self.rank != 0 or not recipe.train.progress_bar)
        # FSDP2 shards every parameter, as ZeRO-3 does: methods see stage 3
        ctx = adapters.StepContext(engine, start_step, self.total_steps,
                                   3 if self.fsdp2 else zero_stage(recipe), dist)
        record, last_step = {}, start_step
        try:
            with self.stops:
                for step in range(start_step, self.total_steps):
                    if self.early_stopping and self.early_stopping.exhausted:
                        break
                    record = self._step(step, ctx, metrics_file, tracking, bar)
                    last_step = step + 1
        finally:
            bar.close()
            if tracking:
                tracking.close()
        # always one at the end, to continue from; a run resumed at its end has it already,
        # and writing it again would delete the directory `latest` names before the rename
        if last_step > start_step and (not recipe.train.save_every
                                       or last_step % recipe.train.save_every != 0):
            self.save_checkpoint(last_step)
        if self.early_stopping and self.early_stopping.best_step is not None:
            self._log_early_stop(last_step)  # the adapter was written at the best evaluation
        else:
            self._save_adapter()
        if self.rank == 0:
            _plot_losses(metrics_file, self.output_dir / "loss.png")
            log.info("done: %d steps, last loss %.4f; adapter: %s; metrics: %s", last_step,
                     record.get("loss", float("nan")), self.output_dir / "adapter", metrics_file)
        dist.barrier()
        return record

    def _step(self, step: int, ctx, metrics_file: Path, tracking, bar) -> dict:
        """One optimizer step with the method's hooks around it, then log, evaluate and
        checkpoint as the recipe says; a stop request ends the run here (dsft.preemption)."""
        recipe, engine = self.recipe, self.engine
        began = time.perf_counter()
        engine.train()
        ctx.step = step
        self.hooks.before_step(ctx)
        lr = engine.get_lr()[0]
        totals = self._accumulate(step, ctx)
        ctx.step = step + 1
        self.hooks.after_step(ctx)
        tokens_per_s = totals.tokens / (time.perf_counter() - began)
        record = {"step": step + 1, "loss": totals.loss, **(totals.terms or {}), "lr": lr,
                  "grad_norm": totals.grad_norm,
                  "padding_fraction": totals.padding_fraction, "tokens_per_s": tokens_per_s,
                  "peak_memory_gib": trackers.peak_memory_gib(engine.device)}
        # the step's mean padded row length: its token slots over its rows
        row_length = totals.tokens / max(1 - totals.padding_fraction, 1e-9) / \
            self.batches.global_batch
        mfu = self.flops.mfu(tokens_per_s, row_length, self.world)
        if mfu is not None:
            record["mfu"] = mfu
        if recipe.train.eval_every and (step + 1) % recipe.train.eval_every == 0:
            record["eval_loss"] = self.evaluate()
            if self.early_stopping and self.early_stopping.update(step + 1, record["eval_loss"]):
                self._save_adapter()  # the best so far (collective; every rank agrees)
        if self.rank == 0 and ((step + 1) % recipe.train.log_every == 0 or "eval_loss" in record):
            _append_jsonl(metrics_file, record)
            if tracking:
                tracking.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        saved = recipe.train.save_every and (step + 1) % recipe.train.save_every == 0
        if saved or totals.stop_requested:
            self.save_checkpoint(step + 1)
        if totals.stop_requested:
            reason = self.stops.local() or "another rank was asked to stop"
            self.stops.served()
            log.warning("stop requested (%s): checkpoint of step %d written", reason, step + 1)
            raise Preempted(step + 1, reason)
        return record

    def _accumulate(self, step: int, ctx) -> StepTotals:
        """Forward and backward over this rank's micro-batches of global batch ``step``, then
        the optimizer step. DeepSpeed wants ``engine.step()`` after every
        micro-batch and steps the optimizer at the last one (the accumulation boundary): the
        method's ``after_backward`` runs just before that."""
        engine, train = self.engine, self.recipe.train
        chosen = self.batches.micro_batches(step, self.rank)
        micro = [data.collate([self.train_set[i] for i in indices], self.tokenizer.pad_token_id,
                              self.padding_free) for indices in chosen]
        # per micro-batch: label tokens, real tokens, token slots (real + padding); and
        # whether this rank was asked to stop, summed over ranks in the same all-reduce
        counts = torch.tensor([[float((m["labels"][:, 1:] != -100).sum()),
                                float(m["token_mask"].sum()), float(m["token_mask"].numel()),
                                0.0] for m in micro] +
                              [[0.0, 0.0, 0.0, float(self.stops.local() is not None)]])
        n_global, n_seen, n_slots, n_stop = dist.all_reduce_sum(counts).sum(0).tolist()
        scale = self.world * train.gradient_accumulation_steps / max(n_global, 1.0)
        own_loss = bool(self.hooks.loss_terms)  # the method's own objective (adapters)
        if own_loss:  # its terms' sizes over the global batch; the terms are divided by them
            term_sizes = dist.all_reduce_sum(torch.stack(
                [self.hooks.loss_sizes(m) for m in micro]).sum(0)).clamp_min(1.0)
            scale = self.world * train.gradient_accumulation_steps
            term_sums = torch.zeros(len(self.hooks.loss_terms), dtype=torch.float64)
        loss_sum = torch.zeros((), dtype=torch.float64)
        local_norm = None
        for index, batch in enumerate(micro):
            batch = _to_device(batch, engine.device)
            with self.hooks.forward_context(batch):
                if own_loss:
                    terms = self.hooks.loss_sums(engine, batch) / term_sizes.to(engine.device)
                    term_sums += terms.detach().double().cpu()
                    loss = terms.sum()
                else:
                    loss, _ = token_loss_sum(engine, batch, train.loss, train.loss_chunk_tokens)
                extra = self.hooks.extra_loss(engine.module, batch)
                objective = loss * scale + (extra if extra is not None else 0.0)
                if not torch.isfinite(objective):
                    self._nonfinite(step, index, chosen[index], float(loss), extra)
                    # every rank must still run its backward (ZeRO reduces gradients in
                    # backward hooks): a zero loss on the trainable parameters adds nothing
                    loss = objective = sum(p.sum() * 0.0 for p in engine.module.parameters()
                                           if p.requires_grad)
                engine.backward(objective)
            loss_sum += loss.detach().double().cpu()
            if engine.is_gradient_accumulation_boundary():
                if self.flora and self.flora_compresses:  # see _engine
                    self.flora.all_reduce_gradients_()
                    local_norm = self.flora.clip_grad_norm_(train.max_grad_norm or math.inf)
                elif self.flora:
                    local_norm = float(torch.nn.utils.clip_grad_norm_(
                        [p for p in engine.module.parameters() if p.requires_grad],
                        train.max_grad_norm or math.inf))
                self.hooks.after_backward(ctx)
                if ctx.zero_stage == 0 and not self.flora:
                    local_norm = _replicated_grad_norm(engine.module)
            engine.step()
        dist.all_reduce_sum(loss_sum)
        terms = None
        if own_loss:
            terms = dict(zip(self.hooks.loss_terms, dist.all_reduce_sum(term_sums).tolist()))
        norm = engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else local_norm
        return StepTotals(float(loss_sum), int(n_global), int(n_seen), 1 - n_seen / n_slots,
                          grad_norm, n_stop > 0, terms)

    def _nonfinite(self, step: int, index: int, examples: list[int], loss: float,
                   extra) -> None:
        """A micro-batch's loss is inf or NaN: stop (raise) or count a skip (on_nonfinite_loss)."""
        train = self.recipe.train
        where = (f"step {step + 1}, rank {self.rank}, micro-batch {index} (train examples "
                 f"{examples}): the loss is {loss}" +
                 ("" if extra is None else f" and the method's extra loss {float(extra)}"))
        if train.on_nonfinite_loss == "stop":
            raise TrainingError(f"{where}; stopped before the optimizer step (checkpoints up to "
                                "the last one are good; train.on_nonfinite_loss: skip skips such "
                                "micro-batches)")
        self.nonfinite_skips += 1
        if self.nonfinite_skips > train.max_nonfinite_skips:
            raise TrainingError(f"{where}; {self.nonfinite_skips} micro-batches skipped on this "
                                f"rank, more than train.max_nonfinite_skips="
                                f"{train.max_nonfinite_skips}")
        log.warning("%s; skipped (%d of at most %d)", where, self.nonfinite_skips,
                    train.max_nonfinite_skips)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the eval split. Every rank runs the same number of forwards
        (ZeRO-3 gathers are collective); surplus slots repeat an example with no labels."""
        engine, micro = self.engine, self.recipe.train.micro_batch_size
        engine.eval()
        mine = list(range(self.rank, len(self.eval_set), self.world))
        n_batches = -(-len(range(0, len(self.eval_set), self.world)) // micro)
        terms = len(self.hooks.loss_terms) or 1  # a method's own objective's terms (adapters)
        totals = torch.zeros(2, terms, dtype=torch.float64)  # sums, sizes
        for b in range(n_batches):
            chosen = mine[b * micro:(b + 1) * micro]
            examples = [self.eval_set[i] for i in chosen] or [_unlabelled(self.eval_set[0])]
            batch = _to_device(data.collate(examples, self.tokenizer.pad_token_id), engine.device)
            with self.hooks.forward_context(batch):
                if self.hooks.loss_terms:  # a surplus slot's example counts for nothing
                    weight = float(bool(chosen))
                    totals += weight * torch.stack([
                        self.hooks.loss_sums(engine, batch).double().cpu(),
                        self.hooks.loss_sizes(batch)])
                else:
                    loss, n = token_loss_sum(engine, batch, self.recipe.train.loss,
                                             self.recipe.train.loss_chunk_tokens)
                    totals += torch.tensor([[float(loss)], [n]], dtype=torch.float64)
        dist.all_reduce_sum(totals)
        engine.train()
        return float((totals[0] / totals[1].clamp_min(1.0)).sum())

    # ------------------------------------------------------------------ checkpoints
    def _adapter_state(self) -> dict:
        """The recipe's adapter as a checkpoint records it; a resume must match it."""
        return self.recipe.adapter.model_dump(mode="json")

    def save_checkpoint(self, step: int) -> None:
        state = {"stream_position": step * self.batches.global_batch,
                 "global_batch": self.batches.global_batch, "adapter": self._adapter_state()}
        best_step = None
        if self.early_stopping:
            state["early_stopping"] = self.early_stopping.state()
            best_step = self.early_stopping.best_step
        try:
            checkpoint.save(self.engine, self.output_dir, step, state,
                            keep=self.recipe.train.save_total_limit, also_keep=best_step)
        except OSError as err:  # a full disk, a lost mount: the checkpoints before stay good
            last = checkpoint.latest(self.output_dir)
            raise TrainingError(f"{self.output_dir / 'checkpoints'}: writing the checkpoint of "
                                f"step {step} failed: {err.strerror or err}; the last good "
                                f"checkpoint is {last.name if last else 'none'}") from None

    def _resume(self) -> int:
        mode = self.recipe.train.resume
        if not mode:
            return 0
        path = checkpoint.latest(self.output_dir)
        if path is None:
            if mode is True:
                raise ConfigError(f"train.resume: no checkpoint in {self.output_dir}/checkpoints")
            return 0
        checkpoint.verify(path, self._adapter_state())
        state = checkpoint.resume(self.engine, path)
        if state["global_batch"] != self.batches.global_batch:
            raise ConfigError(f"train.resume: {path} was trained with global batch "
                              f"{state['global_batch']}, this run has {self.batches.global_batch}; "
                              "change gradient_accumulation_steps so they match")
        if self.early_stopping and "early_stopping" in state:
            for key, value in state["early_stopping"].items():
                setattr(self.early_stopping, key, value)
        if self.rank == 0:
            log.info("resumed from %s at step %d", path, state["step"])
        return state["step"]

    def _save_adapter(self) -> None:
        checkpoint.save_adapter(self.engine.module, self.recipe.adapter,
                                self.output_dir / "adapter",
                                base_model=_base_model_reference(self.recipe), prompt=self.prompt)

    def _log_early_stop(self, last_step: int) -> None:
        stopping = self.early_stopping
        if self.rank != 0:
            return
        if stopping.exhausted:
            log.info("early stopping at step %d: %d evaluations in a row did not lower the eval "
                     "loss by %g", last_step, stopping.evals_without_improvement,
                     stopping.min_delta)
        log.info("best eval loss %.4f at step %d: output_dir/adapter is that step's adapter",
                 stopping.best_loss, stopping.best_step)


def _unlabelled(example: dict) -> dict:
    return {**example, "labels": [-100] * len(example["labels"])}


def _replicated_grad_norm(model) -> float:
    """Global gradient norm when gradients are whole on every rank (ZeRO-0, where DeepSpeed
    only reports a norm for mixed precision)."""
    squares = [p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def _base_model_reference(recipe: Recipe) -> str | None:
    """Where PEFT finds the base: a Hub id as the recipe names it; a directory relative to the
    current directory when it lies under it (a repository checkout, so the adapter stays loadable
    from any clone), else absolute."""
    name = recipe.model.name_or_path
    if not name:
        return None
    path = resolve_model(name, "model.name_or_path")
    if not name.startswith("pkg:") and not Path(name).expanduser().exists():
        return name  # a Hub id, found in the local cache
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _prompt_format(cfg: DataConfig, tokenizer) -> dict:
    """How training rendered prompts, recorded in the adapter for ``dsft generate``: ``chat``
    (chat and sharegpt records, alpaca ones with alpaca_as_chat), ``alpaca``, ``text``, or
    ``auto`` (each record by its keys), with the chat template's text."""
    chat = cfg.format in ("chat", "sharegpt") or cfg.alpaca_as_chat and cfg.format != "text"
    kind = "chat" if chat else cfg.format
    return {"format": kind, "chat_template": formats.resolve_template(tokenizer,
                                                                      cfg.chat_template)[0]}


def _truncate_metrics(path: Path, after_step: int) -> None:
    """Drop records a killed run logged after the checkpoint it resumes from (all of them on a
    fresh start), so metrics.jsonl describes exactly one run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line and json.loads(line)["step"] <= after_step]
    checkpoint.atomic_write_text(path, "".join(line + "\n" for line in kept))


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _plot_losses(metrics_file: Path, out: Path) -> None:
    # matplotlib's first use on a machine builds its font cache and says so at INFO level, which
    # the run's INFO logging would print
    logging.getLogger("matplotlib.font_manager").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_file.is_file():
        return
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def train(recipe: Recipe) -> dict:
    logging.basicConfig(level=logging.INFO if dist.rank() == 0 else logging.WARNING,
                        format="[dsft] %(message)s")
    with dist.lost_ranks_reported():
        return Trainer(recipe).fit()
