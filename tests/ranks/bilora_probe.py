"""Run on N ranks by tests/adapters/test_bilora.py: the tiny BiLoRA recipe's Trainer under
ZeRO-<stage>, four optimizer steps (lower, upper, lower, upper) through the loop's own step
code, and before/after each step the full fp32 value and Adam moments of every adapter tensor.
Writes <out_dir>/rank<N>.json: per step, which tensors changed (bit for bit), by level."""
import json
import sys
from pathlib import Path

from dsft import adapters, dist
from dsft.checkpoint import ADAM_STATES, trainable_parameters
from dsft.recipe import load_recipe
from dsft.train import Trainer

out_dir, stage = Path(sys.argv[1]), int(sys.argv[2])
repo = Path(__file__).resolve().parents[2]
recipe = load_recipe(repo / "recipes/tiny_bilora.yaml", [
    f"train.output_dir={out_dir / 'run'}", "train.progress_bar=false", "train.max_steps=4",
    "train.micro_batch_size=2", "train.gradient_accumulation_steps=1", "train.eval_every=null",
    "train.save_every=null", "data.max_length=128", "scheduler.name=constant",
    "scheduler.warmup_steps=0", "optimizer.weight_decay=0.1", "adapter.lambda_weight_decay=0.1",
    f"deepspeed=ds_configs/zero{stage}.json",
    "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"])
trainer = Trainer(recipe)
engine, hooks = trainer.engine, trainer.hooks


def snapshot() -> dict:
    """name -> {"fp32": list, "exp_avg": list | None, ...} (collective under ZeRO-3)."""
    values = {}
    for name, param in trainable_parameters(engine.module).items():
        values[name] = {"fp32": dist.full_fp32_param(param).flatten().tolist()}
        for key in ADAM_STATES:
            state = dist.full_optimizer_state(param, engine.optimizer, key)
            values[name][key] = None if state is None else state.flatten().tolist()
    return values


report = {"partitioned": any(dist.is_partitioned(p) for p in engine.module.parameters()),
          "steps": []}
ctx = adapters.StepContext(engine, 0, 4, stage, dist)
for step in range(4):
    before = snapshot()
    ctx.step = step
    hooks.before_step(ctx)
    indices = [i for micro in trainer.batches.micro_batches(step, dist.rank()) for i in micro]
    trainer._accumulate(step, ctx)
    ctx.step = step + 1
    hooks.after_step(ctx)
    after = snapshot()
    changed = {}
    for name in before:
        kind = "lambda" if name.endswith("bilora_lambda") else "factor"
        for key, value in before[name].items():
            if value is not None:  # Adam state exists once the group has stepped
                changed.setdefault(f"{kind}/{key}", []).append(value != after[name][key])
    raw = dist.raw_optimizer(engine.optimizer)
    report["steps"].append({
        "indices": indices,
        "changed": {key: sorted(set(flags)) for key, flags in changed.items()},
        # Adam's step counters after the step: one per flat group under ZeRO, per tensor at ZeRO-0
        "adam_steps": sorted({int(state["step"]) for state in raw.state.values()
                              if "step" in state})})
(out_dir / f"rank{dist.rank()}.json").write_text(json.dumps(report))
dist.close()
