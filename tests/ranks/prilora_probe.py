"""Run on 2 ranks by tests/adapters/test_prilora.py: a prilora model (mask and compound from the
command line; events after steps 3 and 6 of 8) under a DeepSpeed ZeRO-<stage> engine, each rank
fed its own tokens and padding. Writes to <out_dir>/rank<N>.json what this rank holds right
before and right after each event and at the end (masks, input statistics, A's fp32 master,
model copy and Adam moments) and, for step 1, a float64 sum of squares of the layer inputs at
this rank's non-padding positions, taken by forward pre-hooks.

    torchrun --nproc_per_node 2 tests/ranks/prilora_probe.py OUT_DIR STAGE MASK COMPOUND
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dsft import dist
from dsft.adapters import StepContext, adapter_layers, inject, method
from dsft.adapters.prilora import PriloraConfig

out_dir, stage, mask_mode, compound = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
STEPS, ACCUMULATION, VOCAB, PRUNE_EVERY = 8, 2, 64, 3
dist.init()
import deepspeed  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     vocab_size=VOCAB))
cfg = PriloraConfig(r_s=2, r_e=6, dropout=0.0, target_modules="all-linear", p=0.5,
                    prune_every=PRUNE_EVERY, mask=mask_mode, compound=compound == "true")
inject(model, cfg, seed=3)
hooks = method("prilora").hooks(cfg, model)
layers = adapter_layers(model)
params = [p for p in model.parameters() if p.requires_grad]
ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": ACCUMULATION,
             "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
             "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
engine, *_ = deepspeed.initialize(
    model=model, model_parameters=params, config=ds_config,
    optimizer=torch.optim.AdamW(params, lr=0.02, weight_decay=0.1))

step1_square_sums = {name: torch.zeros(layer.in_features, dtype=torch.float64)
                     for name, layer in layers.items()}
current = {"mask": None, "step": 0}


def record_inputs(name):
    def hook(module, args):
        if current["step"] == 0:
            rows = args[0].detach().double().reshape(-1, module.in_features)
            step1_square_sums[name] += rows[current["mask"].reshape(-1).bool()].pow(2).sum(0)
    return hook


def held(layer) -> dict:
    """A's fp32 master, model copy and Adam moments, full shape (collective under ZeRO-3)."""
    A = layer.lora_A
    with dist.gathered([A]):
        model_copy = A.detach().float().tolist()
    return {"master": dist.full_fp32_param(A).tolist(), "model_copy": model_copy,
            "exp_avg": dist.full_optimizer_state(A, engine.optimizer, "exp_avg").tolist(),
            "exp_avg_sq": dist.full_optimizer_state(A, engine.optimizer, "exp_avg_sq").tolist()}


def after_event(layer) -> dict:
    return held(layer) | {"mask": layer.prune_mask.int().tolist(),
                          "ema": layer.input_norm_ema.tolist()}


for name, layer in layers.items():
    layer.register_forward_pre_hook(record_inputs(name))

generator = torch.Generator().manual_seed(1000 + dist.rank())  # each rank its own data
ctx = StepContext(engine, 0, STEPS, stage, dist)
report = {"events": {}}
for step in range(STEPS):
    current["step"] = step
    for _ in range(ACCUMULATION):
        ids = torch.randint(0, VOCAB, (2, 9), generator=generator)
        lengths = torch.randint(4, 10, (2,), generator=generator)
        mask = (torch.arange(9)[None] < lengths[:, None]).long()
        current["mask"] = mask
        with hooks.forward_context({"input_ids": ids, "attention_mask": mask,
                                     "token_mask": mask.bool()}):
            logits = engine(input_ids=ids, attention_mask=mask).logits
            token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                         reduction="none")
            engine.backward((token_loss * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum())
        engine.step()
    ctx.step = step + 1
    event = ctx.step % PRUNE_EVERY == 0
    if event:  # module order: the collectives match on every rank
        before = {name: held(layer) for name, layer in layers.items()}
    hooks.after_step(ctx)
    if event:
        report["events"][str(ctx.step)] = {
            name: {"before": before[name], "after": after_event(layer)}
            for name, layer in layers.items()}
    if step == 0:
        report["ema_step1"] = {name: layer.input_norm_ema.tolist()
                               for name, layer in layers.items()}

report["local_square_sums_step1"] = {name: s.tolist() for name, s in step1_square_sums.items()}
report["end"] = {name: after_event(layer) for name, layer in layers.items()}
(out_dir / f"rank{dist.rank()}.json").write_text(json.dumps(report))
dist.close()
