"""Run on 2 ranks by tests/test_fsdp2.py: a tiny Llama with LoRA adapters sharded by
dsft.fsdp2 and trained through Fsdp2Engine; dsft.dist's helpers on its DTensor parameters; a DCP
checkpoint and its resume; the same over an NF4 base with float32 quant storage. Writes what
this rank saw to <out_dir>/rank<N>.json.

The model, the batches and the schedule are defined here once; the test's unsharded reference
loop (plain PyTorch, one process) imports them."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
STEPS, GLOBAL_BATCH, ACCUMULATION, SEQ = 4, 8, 2, 16
LR, MAX_GRAD_NORM = 0.01, 0.3


class Lora(torch.nn.Module):
    """y = base(x) + B A x: a LoRA-like adapter beside a frozen (float or 4-bit) linear layer,
    written here so that this test depends on no method's code."""

    def __init__(self, base: torch.nn.Module, r: int, generator: torch.Generator):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Parameter(torch.randn(r, base.in_features, generator=generator)
                                         / base.in_features ** 0.5)
        self.lora_B = torch.nn.Parameter(torch.randn(base.out_features, r, generator=generator)
                                         * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + x @ self.lora_A.t() @ self.lora_B.t()


def build_model(quant_storage: str | None = None):
    """The tiny Llama (random init, seed 0), optionally NF4 (float32 compute), frozen, with
    rank-5 adapters on every linear layer of the decoder (5 rows: uneven shards on 2 ranks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsft import quant

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                         max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    if quant_storage:
        quant.quantize_linears(model, SimpleNamespace(
            compute_dtype="float32", dtype="float32", quant_storage=quant_storage,
            double_quant=True, quant_type="nf4"))
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name, child in list(block.named_children()):
                if name.endswith("_proj"):
                    setattr(block, name, Lora(child, 5, generator))
    return model


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels of global batch ``step``; a different number of leading prompt
    tokens is masked in each row, so ranks and micro-batches hold different label counts."""
    ids = torch.randint(0, 128, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(step))
    labels = ids.clone()
    for row in range(GLOBAL_BATCH):
        labels[row, :row % 5 * 2] = -100
    return ids, labels


def lr_factor(step: int) -> float:
    return 1.0 / (1.0 + step)


def loss_sum(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100, reduction="sum")


def label_count(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())


# ---------------------------------------------------------------- the 2-rank side

def _engine(quant_storage: str | None = None):
    from dsft import fsdp2
    from dsft.recipe import Fsdp2Config

    model = fsdp2.shard_model(build_model(quant_storage), Fsdp2Config(), "float32")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)  # noqa: E731
    return fsdp2.Fsdp2Engine(model, optimizer, scheduler, ACCUMULATION, MAX_GRAD_NORM)


def _my_micro_batches(step: int):
    """This rank's micro-batches of global batch ``step``, and the scale that makes the
    gradient the mean over the global batch's label tokens (as dsft.train does)."""
    from dsft import dist

    ids, labels = global_batch(step)
    size = GLOBAL_BATCH // dist.world_size() // ACCUMULATION
    scale = dist.world_size() * ACCUMULATION / label_count(labels)
    first = dist.rank() * ACCUMULATION
    return [(ids[m * size:(m + 1) * size], labels[m * size:(m + 1) * size], scale)
            for m in range(first, first + ACCUMULATION)]


def _train(engine, steps) -> list[float]:
    from dsft import dist

    losses = []
    for step in steps:
        total = torch.zeros((), dtype=torch.float64)
        for ids, labels, scale in _my_micro_batches(step):
            loss = loss_sum(engine, ids, labels)
            engine.backward(loss * scale)
            engine.step()
            total += loss.detach().double()
        losses.append(float(dist.all_reduce_sum(total)) / label_count(global_batch(step)[1]))
    return losses


def _adapter(engine) -> dict[str, list]:
    from dsft import dist

    return {name: dist.full_fp32_param(p).tolist()
            for name, p in engine.module.named_parameters() if p.requires_grad}


def _helpers(engine) -> dict:
    """dsft.dist on the DTensor lora_A of layer 0's q_proj (5 x 64: 3 rows on rank 0, 2 on
    rank 1), after training."""
    from dsft import dist

    layer = engine.module.model.layers[0].self_attn.q_proj
    param, optimizer = layer.lora_A, engine.optimizer
    report = {"partitioned": dist.is_partitioned(param), "full_shape": list(dist.full_shape(param)),
              "local_rows": param.to_local().shape[0],
              "exp_avg": dist.full_optimizer_state(param, optimizer, "exp_avg").tolist(),
              "step_count": dist.optimizer_step_count(optimizer)}
    for ids, labels, scale in _my_micro_batches(0):  # a gradient, no optimizer step
        engine.backward(loss_sum(engine, ids, labels) * scale)
        engine.micro_steps += 1  # as engine.step() counts micro-batches
    report["grad"] = dist.full_grad(param).tolist()
    target = torch.arange(param.numel(), dtype=torch.float32).view(param.shape) / 100
    dist.set_full_grad(param, -target)
    report["grad_after_set"] = dist.full_grad(param).tolist()
    engine.optimizer.zero_grad(set_to_none=True)

    dist.set_full_fp32_param(param, target)
    report["fp32_after_set"] = dist.full_fp32_param(param).tolist()
    with dist.local_part(param) as (flat, start):
        mine = target.view(-1)[start:start + flat.numel()]
        report["local_part_matches"] = torch.equal(flat, mine)
        flat.mul_(2)  # an in-place edit of this rank's part
    report["after_local_edit"] = dist.full_fp32_param(param).tolist()
    report["parts_rebuilt"] = dist.full_from_parts(param, dist.local_copy(param)).tolist()
    with dist.gathered([param]):  # the module attribute is the whole tensor inside
        report["gathered_shape"] = list(layer.lora_A.shape)
        report["gathered_value"] = layer.lora_A.detach().tolist()
    with dist.gathered([param], modifier_rank=0):
        if dist.rank() == 0:
            layer.lora_A.data.copy_(-target)
    report["after_modifier_edit"] = dist.full_fp32_param(param).tolist()

    dist.set_full_optimizer_state(param, optimizer, "exp_avg", 3 * target)
    report["exp_avg_after_set"] = dist.full_optimizer_state(param, optimizer, "exp_avg").tolist()
    dist.set_optimizer_step_count(optimizer, 7)
    report["step_count_after_set"] = dist.optimizer_step_count(optimizer)
    dist.reset_optimizer_state(param, optimizer)
    report["exp_avg_after_reset"] = dist.full_optimizer_state(param, optimizer, "exp_avg")
    return report


def _nf4_merge(engine) -> dict:
    """A merge into a sharded 4-bit weight as methods write it: inside ``dist.gathered`` with a
    modifier rank, dequantize, add, requantize (every rank computes the same); then the weight
    read back, and the loss of global batch 0 through the merged model."""
    from dsft import dist, quant

    layer = engine.module.model.layers[0].self_attn.q_proj.base_layer
    with dist.gathered([layer.weight]):
        before = quant.dequantize(layer)
    with dist.gathered([layer.weight], modifier_rank=0):
        quant.requantize(layer, quant.dequantize(layer) + 0.5)
    with dist.gathered([layer.weight]):
        after = quant.dequantize(layer)
    ids, labels = global_batch(0)
    with torch.no_grad():
        loss = loss_sum(engine, ids, labels) / label_count(labels)
    return {"before": before.tolist(), "after": after.tolist(), "loss": float(loss)}


def main(out_dir: Path) -> None:
    from dsft import dist

    torch.set_num_threads(1)
    dist.init()
    engine = _engine()
    report = {"losses": _train(engine, range(STEPS)), "adapter": _adapter(engine)}
    report["helpers"] = _helpers(engine)

    first = _engine()  # steps 1-2, checkpoint; a fresh engine resumes and runs steps 3-4
    _train(first, range(2))
    first.save_checkpoint(str(out_dir / "checkpoints"), "step-2")
    resumed = _engine()
    path, _ = resumed.load_checkpoint(str(out_dir / "checkpoints"), "step-2")
    report["resume_loaded"] = path is not None
    report["resume_lr"] = resumed.get_lr()
    report["resume_losses"] = _train(resumed, range(2, STEPS))
    report["resume_adapter"] = _adapter(resumed)

    nf4 = _engine("float32")
    weight = nf4.module.model.layers[0].self_attn.q_proj.base_layer.weight
    report["nf4_weight_sharded"] = [dist.is_partitioned(weight), weight.to_local().numel(),
                                    weight.numel()]
    report["nf4_losses"] = _train(nf4, range(STEPS))
    report["nf4_adapter"] = _adapter(nf4)
    report["nf4_merge"] = _nf4_merge(_engine("float32"))
    (out_dir / f"rank{dist.rank()}.json").write_text(json.dumps(report))
    dist.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
