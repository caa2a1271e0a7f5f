"""Run on N ranks by tests/test_dist.py: dsft.dist's rank-local access to ZeRO-3 parameters
(local_part, local_copy, full_from_parts) and the optimizer-state reset, under a real DeepSpeed
engine. Writes what this rank saw to <out_dir>/rank<N>.json."""
import json
import sys
from pathlib import Path

import torch

from dsft import dist
from dsft.adapters import inject
from dsft.adapters.lora import LoraConfig
from dsft.model import load_config, load_model
from dsft.recipe import fill_deepspeed_config, load_recipe

out_dir, stage = Path(sys.argv[1]), int(sys.argv[2])
dist.init()
import deepspeed  # noqa: E402

recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes/tiny_lora.yaml", [
    f"deepspeed=ds_configs/zero{stage}.json", "train.gradient_accumulation_steps=1",
    "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"])
ds_config = fill_deepspeed_config(recipe, dist.world_size(), 10, 192)
model, keep_alive = load_model(recipe.model, load_config(recipe.model), ds_config)
inject(model, LoraConfig(r=4, target_modules=["q_proj"]), seed=3)
params = [p for p in model.parameters() if p.requires_grad]
engine, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                  optimizer=torch.optim.AdamW(params, lr=0.01), config=ds_config)
layer = engine.module.model.layers[0].self_attn.q_proj
weight, lora_B = layer.base_layer.weight, layer.lora_B


def full(param) -> torch.Tensor:
    with dist.gathered([param]):
        return param.detach().clone()


report = {"partitioned": dist.is_partitioned(weight)}
original = full(weight)
report["copy_rebuilt"] = torch.equal(dist.full_from_parts(weight, dist.local_copy(weight)),
                                     original.reshape(-1))
with dist.local_part(weight) as (flat, start):  # every element edited by exactly one rank
    report["local_numel"] = flat.numel()
    flat += torch.arange(start, start + flat.numel(), dtype=flat.dtype)
expected = original.reshape(-1) + torch.arange(original.numel(), dtype=original.dtype)
report["edit_landed"] = torch.equal(full(weight).reshape(-1), expected)
overwritten = -torch.arange(original.numel(), dtype=original.dtype)
with dist.gathered([weight]):  # gathered at the moment: the full copy must follow the edit
    with dist.local_part(weight) as (flat, start):
        flat.copy_(overwritten[start:start + flat.numel()])
    report["gathered_copy_follows"] = torch.equal(weight.detach().reshape(-1), overwritten)
report["overwrite_kept"] = torch.equal(full(weight).reshape(-1), overwritten)

engine.backward(engine(input_ids=torch.arange(3, 11).reshape(1, 8)).logits.float().pow(2).mean())
engine.step()
before = dist.full_optimizer_state(lora_B, engine.optimizer, "exp_avg")
report["moments_before_reset"] = float(before.abs().max())
dist.reset_optimizer_state(lora_B, engine.optimizer)
dist.set_optimizer_step_count(engine.optimizer, 0)
after = dist.full_optimizer_state(lora_B, engine.optimizer, "exp_avg_sq")
report["moments_after_reset"] = 0.0 if after is None else float(after.abs().max())
report["step_after_reset"] = dist.optimizer_step_count(engine.optimizer)
(out_dir / f"rank{dist.rank()}.json").write_text(json.dumps(report))
dist.close()
