"""The trainer and the merge checked against computations written here, not against other dsft runs.

* What `dsft train` logs and applies equals Hugging Face + PEFT on the same global batch: the mean
  next-token cross-entropy over label tokens (the shift written below), its gradient, the
  pre-clipping global L2 norm, and plain SGD's update lr * c * g with DeepSpeed's clip factor
  c = min(1, max_norm / (norm + 1e-6)), for 1 process (ZeRO-0) and 2 ranks (ZeRO-2).
* `dsft merge` / `dsft export --prune` write W0 + s * delta with s = alpha / r (alpha != r, so a
  lost scale shows), delta written out per method.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from dsft import adapters, checkpoint
from dsft.adapters import adapter_layers, config_class
from tests.helpers import REPO, TINY_BASE, adapter_tensors, read_metrics, run_train

RECIPE = REPO / "recipes/tiny_lora.yaml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, STEPS, SEED = 0.5, 2, 42
# dsft runs in float32, the reference in float64. Measured (1 process): losses within 1.1e-7
# relative, norms within 4.3e-7, adapter entries within 3.7e-7 of values up to 0.07; the
# bounds leave room for other summation orders (2 ranks, other CPUs' kernels). A lost token, a
# missing shift, a squared norm or a skipped clip moves them by percents
LOSS_RTOL, NORM_RTOL, ADAPTER_ATOL = 1e-6, 3e-6, 3e-6


def _overrides(out: Path, max_grad_norm, **extra) -> list[str]:
    values = {"model.config": "null", "model.name_or_path": str(TINY_BASE),
              "train.output_dir": str(out), "train.progress_bar": "false",
              "data.max_length": 128, "train.micro_batch_size": 2,
              "train.gradient_accumulation_steps": 2, "adapter.dropout": 0.0,
              "adapter.target_modules": "all-linear", "train.eval_every": "null",
              "train.save_every": "null", "train.max_steps": STEPS, "train.seed": SEED,
              "optimizer.name": "sgd", "optimizer.lr": LR, "optimizer.weight_decay": 0.0,
              "scheduler.name": "constant", "scheduler.warmup_steps": 0,
              "train.max_grad_norm": "null" if max_grad_norm is None else max_grad_norm, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def _reference(max_grad_norm) -> dict:
    """The run written out in float64: per step, the global batch (which examples:
    dsft.batches), each example unpadded through HF + PEFT LoRA (r 8, alpha 16, every linear
    layer but the head) from dsft's initial adapter, the mean next-token cross-entropy over every
    label token of the batch, its gradient, and the SGD step."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dsft import data
    from dsft import model as model_loading
    from dsft.batches import StepBatches
    from dsft.recipe import load_recipe

    recipe = load_recipe(RECIPE, _overrides(Path("unused"), max_grad_norm))
    tokenizer = model_loading.load_tokenizer(recipe.model)
    train_set, _, _ = data.build_datasets(recipe.data, tokenizer, SEED)
    order = StepBatches(range(len(train_set)), micro_batch=2, accumulation=2, world_size=1,
                        seed=SEED)

    # dsft's initial adapter (seeded Kaiming A, B = 0): built by dsft's injection, read here
    dsft_model = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32)
    adapters.inject(dsft_model, recipe.adapter, seed=SEED)
    initial = {name: (layer.lora_A.detach(), layer.lora_B.detach())
               for name, layer in adapter_layers(dsft_model).items()}
    assert len(initial) == 28 and all(float(B.abs().sum()) == 0 for _, B in initial.values())

    base = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float64)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=TARGETS))
    factors = {}
    for name, (A, B) in initial.items():
        module = model.base_model.model.get_submodule(name)
        module.lora_A["default"].weight.data.copy_(A)
        module.lora_B["default"].weight.data.copy_(B)
        factors[f"base_model.model.{name}.lora_A.weight"] = module.lora_A["default"].weight
        factors[f"base_model.model.{name}.lora_B.weight"] = module.lora_B["default"].weight
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n.replace(".weight", ".default.weight") for n in factors}

    records = []
    for step in range(STEPS):
        examples = [train_set[i] for i in order.stream(step * order.global_batch,
                                                       order.global_batch)]
        loss_sum, label_tokens = torch.zeros((), dtype=torch.float64), 0
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            logits = model(input_ids=ids).logits[0]
            targets = torch.tensor(example["labels"][1:])  # token t + 1 from positions <= t
            labelled = targets != -100
            loss_sum = loss_sum + torch.nn.functional.cross_entropy(
                logits[:-1][labelled], targets[labelled], reduction="sum")
            label_tokens += int(labelled.sum())
        loss = loss_sum / label_tokens
        model.zero_grad()
        loss.backward()
        norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in factors.values()))
        clip = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (norm + 1e-6))
        with torch.no_grad():
            for p in factors.values():
                p -= LR * clip * p.grad
        records.append({"loss": float(loss.detach()), "grad_norm": norm, "clipped": clip < 1.0})
    return {"records": records, "adapter": {k: p.detach().clone() for k, p in factors.items()}}


@pytest.fixture(scope="module")
def references() -> dict:
    """Two clipping thresholds from the unclipped reference's norms: "clipped" (0.9 x step 1's
    norm) must scale step 1's gradient; "unclipped" (10 x the largest norm) enables clipping
    where it must change nothing."""
    free = _reference(None)
    norms = [r["grad_norm"] for r in free["records"]]
    thresholds = {"unclipped": 10 * max(norms), "clipped": 0.9 * norms[0]}
    return {kind: {**_reference(norm), "max_grad_norm": norm} for kind, norm in thresholds.items()}


def _assert_matches_reference(out: Path, reference: dict) -> None:
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["lr"] for r in records] == [LR] * STEPS
    expected = reference["records"]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in records], dtype=torch.float64),
                               torch.tensor([r["loss"] for r in expected], dtype=torch.float64),
                               rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(
        torch.tensor([r["grad_norm"] for r in records], dtype=torch.float64),
        torch.tensor([r["grad_norm"] for r in expected], dtype=torch.float64),
        rtol=NORM_RTOL, atol=0)
    got = adapter_tensors(out)
    assert got.keys() == reference["adapter"].keys()
    for key, want in reference["adapter"].items():
        torch.testing.assert_close(got[key].double(), want, rtol=0, atol=ADAPTER_ATOL,
                                   msg=lambda m: f"{key}: {m}")


def test_reference_steps_move_the_adapter_and_clip_where_expected(references):
    """The reference itself exercises what the runs are compared on: both steps change B (and
    A after step 1: B = 0 at the start makes A's first gradient 0), "clipped" clips step 1,
    "unclipped" clips nothing."""
    assert references["clipped"]["records"][0]["clipped"]
    assert not any(r["clipped"] for r in references["unclipped"]["records"])
    adapter = references["unclipped"]["adapter"]
    assert all(float(t.abs().sum()) > 0 for key, t in adapter.items() if "lora_B" in key)


@pytest.mark.parametrize("kind", ["unclipped", "clipped"])
def test_one_process_run_logs_and_applies_the_reference_loss_norm_and_update(
        kind, references, tmp_path):
    out = tmp_path / "run"
    run_train(RECIPE, _overrides(out, references[kind]["max_grad_norm"]), launcher="cli")
    _assert_matches_reference(out, references[kind])


@pytest.mark.slow
def test_two_rank_zero2_run_logs_and_applies_the_reference_loss_norm_and_update(references,
                                                                                tmp_path):
    """The same global batch of 4 as 2 ranks x 1 micro-batch of 2, DeepSpeed's own gradient
    norm and clipping (ZeRO-2)."""
    out = tmp_path / "run"
    run_train(RECIPE, _overrides(out, references["clipped"]["max_grad_norm"], **{
        "train.gradient_accumulation_steps": 1, "deepspeed": "ds_configs/zero2.json"}), nprocs=2)
    _assert_matches_reference(out, references["clipped"])


# ---------------------------------------------------------------- merge and export, alpha != r

R, ALPHA = 4, 12.0  # s = alpha / r = 3
MERGE_CASES = {
    "lora": {"r": R, "alpha": ALPHA},
    "lora_sp": {"r": R, "alpha": ALPHA, "p": 0.5},
    "periodic_lora": {"r": R, "alpha": ALPHA, "unload_every": 2},
    "prilora": {"r_s": 2, "r_e": 6, "alpha": ALPHA},
    "melora": {"r": 2, "alpha": 5.0, "n_mini": 4},
    "allora": {"r": R},  # no alpha: the delta is B A
    "bilora": {"r": R},  # no alpha: the delta is P diag(lambda) Q
}


def _reference_delta(method: str, cfg: dict, tensors: dict, module: str) -> torch.Tensor:
    """The merged update of one linear layer from the exported tensors, per the method's math."""
    def get(name):
        return tensors[f"base_model.model.{module}.{name}.weight"].double()

    if method == "melora":  # s B_i A_i on the diagonal blocks, s = alpha / (mini rank)
        A, B = get("melora_A"), get("melora_B")
        return torch.block_diag(*[cfg["alpha"] / cfg["r"] * B[i] @ A[i]
                                  for i in range(cfg["n_mini"])])
    if method == "bilora":
        return get("bilora_P") * get("bilora_lambda") @ get("bilora_Q")
    A, B = get("lora_A"), get("lora_B")
    scale = cfg.get("alpha", A.shape[0]) / A.shape[0]  # allora: 1; prilora: this layer's rank
    return scale * B @ A


def _adapter_with_random_values(method: str, cfg: dict, out: Path):
    """The tiny base with ``method`` injected on q_proj and down_proj, every adapter tensor
    random (seeded), saved as dsft saves a trained adapter; returns the adapted model."""
    from transformers import AutoModelForCausalLM

    config = config_class(method).model_validate(
        {"method": method, "target_modules": ["q_proj", "down_proj"],
         **({} if method in ("allora", "bilora") else {"dropout": 0.0}), **cfg})
    model = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32).eval()
    adapters.inject(model, config, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for param in layer.adapter_parameters():
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    checkpoint.save_adapter(model, config, out, base_model=str(TINY_BASE))
    return model


def _reference_model(method: str, cfg: dict, tensors: dict, modules: list[str]):
    """The base with each adapted weight replaced by W0 + delta (float64 sum)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32).eval()
    with torch.no_grad():
        for module in modules:
            weight = model.get_submodule(module).weight
            weight.copy_(weight.double() + _reference_delta(method, cfg, tensors, module))
    return model


IDS = torch.randint(3, 4096, (2, 19), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", sorted(MERGE_CASES))
def test_merge_writes_base_plus_scaled_delta_and_computes_the_adapted_model(method, tmp_path):
    from transformers import AutoModelForCausalLM

    from dsft.cli import main

    cfg = MERGE_CASES[method]
    adapted = _adapter_with_random_values(method, cfg, tmp_path / "adapter")
    tensors = adapter_tensors(tmp_path)
    modules = sorted(adapter_layers(adapted))
    assert len(modules) == 8
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reference = _reference_model(method, cfg, tensors, modules)
    for module in modules:
        torch.testing.assert_close(merged.get_submodule(module).weight,
                                   reference.get_submodule(module).weight, rtol=0, atol=1e-6,
                                   msg=lambda m: f"{module}: {m}")
    with torch.no_grad():
        merged_logits, adapted_logits = merged(IDS).logits, adapted(IDS).logits
        reference_logits = reference(IDS).logits
        base_logits = AutoModelForCausalLM.from_pretrained(TINY_BASE).eval()(IDS).logits
    torch.testing.assert_close(merged_logits, reference_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(adapted_logits, reference_logits, rtol=0, atol=1e-4)
    # the adapter matters: at least 100x the tolerance (a lost scale of 3 moves 2 / 3 of it)
    assert (reference_logits - base_logits).abs().max() > 0.01


def test_peft_merges_the_lora_export_with_alpha_over_r(tmp_path):
    """PEFT's merge of dsft's LoRA export (its adapter_config: lora_alpha 12, r 4) equals the
    base with W0 + 3 B A."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _adapter_with_random_values("lora", MERGE_CASES["lora"], tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (R, ALPHA)
    tensors = adapter_tensors(tmp_path)
    peft_merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(TINY_BASE), tmp_path / "adapter").merge_and_unload()
    modules = sorted({k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in tensors})
    reference = _reference_model("lora", MERGE_CASES["lora"], tensors, modules)
    with torch.no_grad():
        torch.testing.assert_close(peft_merged.eval()(IDS).logits, reference(IDS).logits,
                                   rtol=0, atol=1e-4)


def test_pruned_export_without_pruning_is_base_plus_scaled_delta(tmp_path):
    """`dsft export --prune` of a LoRAPrune adapter that pruned nothing: the same model as
    W0 + (alpha / r) B A, with alpha != r."""
    from transformers import AutoModelForCausalLM

    from dsft.cli import main

    cfg = {"r": R, "alpha": ALPHA, "target_modules": TARGETS}
    model = _adapter_with_random_values("loraprune", cfg, tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "pruned"), "--prune"]) == 0
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned",
                                                  trust_remote_code=True).eval()
    reference = _reference_model("loraprune", cfg, adapter_tensors(tmp_path),
                                 sorted(adapter_layers(model)))
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, reference(IDS).logits, rtol=0, atol=1e-4)
