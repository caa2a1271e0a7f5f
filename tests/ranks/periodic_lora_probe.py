"""Run on N ranks by tests/adapters/test_periodic_lora.py: three optimizer steps of PeriodicLoRA
with an unload after the second, under a real DeepSpeed engine (ZeRO stage and float or NF4 base
from the command line). Writes what this rank saw to <out_dir>/rank<N>.json."""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dsft import dist, quant
from dsft.adapters import StepContext, adapter_layers, inject
from dsft.adapters.periodic_lora import PeriodicLoraConfig, PeriodicLoraHooks
from dsft.model import load_config, load_model
from dsft.recipe import fill_deepspeed_config, load_recipe

out_dir, stage, base_kind = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init()
import deepspeed  # noqa: E402

GLOBAL_BATCH, LR = 4, 0.01
world = dist.world_size()
recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes/tiny_periodic_lora.yaml", [
    f"model.load_in_4bit={base_kind == 'nf4'}", "model.compute_dtype=float32",
    f"deepspeed=ds_configs/zero{stage}.json", "train.gradient_accumulation_steps=1",
    f"train.micro_batch_size={GLOBAL_BATCH // world}",
    "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"])
ds_config = fill_deepspeed_config(recipe, world, 3, 192)
model, keep_alive = load_model(recipe.model, load_config(recipe.model), ds_config)
cfg = PeriodicLoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                         unload_every=2)
inject(model, cfg, seed=3)
hooks = PeriodicLoraHooks(cfg, model)
hooks.plan(total_steps=3)
params = [p for p in model.parameters() if p.requires_grad]
engine, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                  optimizer=torch.optim.AdamW(params, lr=LR), config=ds_config)
layer = adapter_layers(engine.module)["model.layers.0.self_attn.q_proj"]

ids = torch.randint(3, 4000, (GLOBAL_BATCH, 16), generator=torch.Generator().manual_seed(0))
mine = ids[dist.rank() * GLOBAL_BATCH // world:(dist.rank() + 1) * GLOBAL_BATCH // world]


def step() -> float:
    """One optimizer step on the global batch: gradient = mean over all its tokens."""
    logits = engine(input_ids=mine).logits[:, :-1].float()
    loss_sum = F.cross_entropy(logits.flatten(0, 1), mine[:, 1:].flatten(), reduction="sum")
    engine.backward(loss_sum * world / (GLOBAL_BATCH * 15))
    engine.step()
    return float(dist.all_reduce_sum(loss_sum.detach().clone())) / (GLOBAL_BATCH * 15)


@torch.no_grad()
def outputs() -> torch.Tensor:
    return engine(input_ids=ids[:2]).logits.float()


ctx = StepContext(engine, 0, 3, stage, dist)
losses = [step(), step()]
before, old_A = outputs(), dist.full_fp32_param(layer.lora_A)
ctx.step = 2
hooks.after_step(ctx)
after, new_A = outputs(), dist.full_fp32_param(layer.lora_A)
moments = dist.full_optimizer_state(layer.lora_A, engine.optimizer, "exp_avg")
report = {
    "max_output_change": float((after - before).abs().max() / before.abs().max()),
    "moments_after_unload": 0.0 if moments is None else float(moments.abs().max()),
    "step_after_unload": dist.optimizer_step_count(engine.optimizer),
    "new_A": new_A.tolist(),
    "bank_A": layer.bank_A.tolist(), "bank_B": layer.bank_B.tolist(),
}
losses.append(step())
next_A = dist.full_fp32_param(layer.lora_A)
report["next_step_from_new_A"] = float((next_A - new_A).abs().max())
report["next_step_from_old_A"] = float((next_A - old_A).abs().max())
report["losses"] = losses
weight = layer.base_layer.weight
anchor = dist.full_from_parts(weight, layer.anchor[0]) if base_kind == "nf4" else None
with dist.gathered([weight]):
    merged = quant.dequantize(layer.base_layer)
report["merged_weight"] = merged.tolist()
if base_kind == "nf4":  # against the fp32 sum W_0 + s B A, in units of the block's widest NF4 gap
    reference = quant.dequantize_stored(anchor, layer.anchor[1]) + layer.scale * (
        layer.bank_B @ layer.bank_A)
    blocks = reference.reshape(-1, 64).abs().amax(dim=1, keepdim=True) * (1.0 - 0.7229568)
    report["merge_error_in_nf4_steps"] = float(((merged - reference).reshape(-1, 64) / blocks)
                                               .abs().max())
(out_dir / f"rank{dist.rank()}.json").write_text(json.dumps(report))
dist.close()
