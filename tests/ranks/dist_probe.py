"""Run on N ranks by tests/test_dist.py: exercises dsft.dist and ZeRO-3-aware model loading
under a real DeepSpeed engine and writes what this rank saw to <out_dir>/rank<N>.json."""
import json
import sys
from pathlib import Path

import torch

from dsft import dist
from dsft.adapters import inject
from dsft.adapters.lora import LoraConfig
from dsft.model import load_config, load_model
from dsft.recipe import fill_deepspeed_config, load_recipe

out_dir, stage, base_dir = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
quant_storage = sys.argv[4]  # "none" for a float base
dist.init()
import deepspeed  # noqa: E402

recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes/tiny_lora.yaml", [
    "model.config=null", f"model.name_or_path={base_dir}",
    f"model.load_in_4bit={quant_storage != 'none'}",
    f"model.quant_storage={'uint8' if quant_storage == 'none' else quant_storage}",
    "model.compute_dtype=float32", f"deepspeed=ds_configs/zero{stage}.json",
    "train.gradient_accumulation_steps=1",
    "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"])
ds_config = fill_deepspeed_config(recipe, dist.world_size(), 10, 64)
model, keep_alive = load_model(recipe.model, load_config(recipe.model), ds_config)
local = sum(getattr(p, "ds_tensor", p).numel() for p in model.parameters())
full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=3)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=0.01)
engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                  config=ds_config)
name, param = next((n, p) for n, p in engine.module.named_parameters() if n.endswith("lora_B"))  # B: nonzero grad at init

ids = torch.arange(3, 3 + 8 * (dist.rank() + 1)).reshape(dist.rank() + 1, 8)  # ranks differ
engine.backward(engine(input_ids=ids).logits.float().pow(2).mean())
grad = dist.full_grad(param).clone()
engine.step()

report = {
    "local_numel": local, "full_numel": full,
    "partitioned": dist.is_partitioned(param),
    "fp32": dist.full_fp32_param(param).tolist(),
    "grad": grad.tolist(),
    "exp_avg": dist.full_optimizer_state(param, engine.optimizer, "exp_avg").tolist(),
    "step": dist.optimizer_step_count(engine.optimizer),
}
shape = torch.tensor(report["fp32"]).shape
target = torch.arange(shape.numel(), dtype=torch.float32).reshape(shape)
dist.set_full_fp32_param(param, target)
dist.set_full_optimizer_state(param, engine.optimizer, "exp_avg", target * 2)
with dist.gathered([param]):
    report["model_copy_after_set"] = param.detach().float().tolist()
report["fp32_after_set"] = dist.full_fp32_param(param).tolist()
report["exp_avg_after_set"] = dist.full_optimizer_state(param, engine.optimizer, "exp_avg").tolist()
report["all_reduce_sum"] = dist.all_reduce_sum(torch.tensor([float(dist.rank() + 1)])).item()
report["broadcast"] = dist.broadcast_object({"rank": dist.rank()})
(out_dir / f"rank{dist.rank()}.json").write_text(json.dumps(report))
dist.close()
