"""Run on 1 or 2 ranks by tests/adapters/test_loraprune.py: a loraprune model (GQA: 8 query
heads, 4 key/value heads; blocks 0 and 1 prunable, block 2 protected; float32, or an NF4 base
with float32 compute) under a DeepSpeed ZeRO-<stage> engine for 2 optimizer steps of one fixed
global batch of 2 sequences, split between the ranks (1 rank: both). Step 0 scores; step 1
scores and prunes. Writes to <out_dir>/rank<N>.json, per step, the loss of the global batch and
every structure's group scores and kept groups right after ``after_backward``.

``build_model`` and ``global_batch`` are imported by the test, which recomputes step 0's scores
in float64 from the same model and batch."""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

VOCAB, SEQ = 64, 10


def build_model(base: str = "float32"):
    """The probe's model and adapter config: seeded, so every rank and the test build the same.
    ``base``: "float32", or "nf4" (every block linear quantized, float32 compute)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsft import quant
    from dsft.adapters import inject
    from dsft.adapters.loraprune import LoraPruneConfig
    from dsft.recipe import ModelConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=8, num_key_value_heads=4,
                                         vocab_size=VOCAB))
    if base == "nf4":
        quant.quantize_linears(model, ModelConfig(config="tiny-llama", dtype="float32",
                                                  load_in_4bit=True))
    cfg = LoraPruneConfig(r=4, alpha=8, dropout=0.0, final_ratio=0.75, warmup_fraction=0.0,
                          cooldown_fraction=0.0, prune_every=1)
    inject(model, cfg, seed=3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # B = 0 would hide the B dA terms of G_hat
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model, cfg


def global_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))


def mean_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def main() -> None:
    from dsft import dist
    from dsft.adapters import StepContext, method

    out_dir, stage, base = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init()
    import deepspeed

    model, cfg = build_model(base)
    hooks = method("loraprune").hooks(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    world, rank = dist.world_size(), dist.rank()
    ds_config = {"train_micro_batch_size_per_gpu": 2 // world, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                 "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config,
                                      optimizer=torch.optim.AdamW(params, lr=0.01))
    ids = global_batch()[rank * 2 // world:(rank + 1) * 2 // world]
    ctx = StepContext(engine, 0, 2, stage, dist)
    report = {"steps": []}
    for step in range(2):
        ctx.step = step
        loss = mean_token_loss(engine(input_ids=ids).logits, ids)
        engine.backward(loss)  # DeepSpeed averages over ranks: the global batch's mean loss
        hooks.after_backward(ctx)
        report["steps"].append({
            "loss": float(dist.all_reduce_sum(loss.detach().double().reshape(1))) / world,
            "scores": [s.group_scores().tolist() for s in hooks.structures],
            "kept": [s.kept_groups().tolist() for s in hooks.structures]})
        engine.step()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.close()


if __name__ == "__main__":
    main()
