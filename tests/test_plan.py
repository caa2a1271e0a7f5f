"""`dsft plan` against independent figures: published parameter counts, PEFT's own count,
DeepSpeed's own ZeRO-2/3 model-state estimators, bitsandbytes' real 4-bit and 8-bit-optimizer
tensors, the tensors autograd really saves in a LLaMA decoder layer; and every shipped recipe
loads, resolves its model config and plans on the meta device through the CLI.

Every tiny recipe also trains a few steps in CI: tiny_lora in tests/test_train.py, the others in
tests/test_methods_sharded.py (one process and two ranks each).
"""
from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch

from dsft import plan as planning
from dsft.cli import main
from dsft.recipe import OptimizerConfig, load_recipe
from tests.helpers import REPO, TINY_BASE

LLAMA7B = REPO / "recipes/llama7b_lora.yaml"
QLORA = REPO / "recipes/qlora_llama7b_lora.yaml"
ON_LLAMA2_7B = ["model.name_or_path=null", "model.config=llama2-7b"]
# LLaMA-2-7B: published parameter count, and PEFT's printout for LoRA r=8 on q_proj, v_proj
LLAMA2_7B_PARAMS = 6_738_415_616
LORA_R8_QV_TRAINABLE = 4_194_304
# llava-hf/llava-1.5-7b-hf's parameter count (vision tower, projector, language model)
LLAVA_1_5_7B_PARAMS = 7_063_427_072
LLAMA2_7B_LARGEST_LAYER = 32_000 * 4_096  # embed_tokens and lm_head, vocabulary x hidden
GIB = 2 ** 30


def _llama7b_recipe(*overrides: str):
    return load_recipe(LLAMA7B, [*ON_LLAMA2_7B, *overrides])


def test_lora_r8_on_q_and_v_of_llama2_7b_matches_the_published_counts():
    recipe = _llama7b_recipe("adapter.r=8", "adapter.target_modules=[q_proj, v_proj]")
    result = planning.plan(recipe)
    assert result.trainable_params == LORA_R8_QV_TRAINABLE
    assert result.base_params == LLAMA2_7B_PARAMS
    assert result.total_params == 6_742_609_920  # PEFT: "all params: 6,742,609,920"
    assert result.trainable_by_module == {"q_proj": 2_097_152, "v_proj": 2_097_152}


@pytest.mark.parametrize("r, targets", [(8, ["q_proj", "v_proj"]), (16, "all-linear")])
def test_trainable_count_equals_peft_on_the_same_meta_model(r, targets):
    from peft import LoraConfig, get_peft_model

    recipe = _llama7b_recipe(f"adapter.r={r}", f"adapter.target_modules={json.dumps(targets)}")
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        from dsft.model import load_config
        base = AutoModelForCausalLM.from_config(load_config(recipe.model), dtype=torch.bfloat16)
    peft_trainable, peft_total = get_peft_model(
        base, LoraConfig(r=r, target_modules=targets)).get_nb_trainable_parameters()
    result = planning.plan(recipe)
    assert (result.trainable_params, result.total_params) == (peft_trainable, peft_total)


def _full_finetune_tensors() -> list[planning.ModelTensor]:
    """LLaMA-2-7B in bf16 with every parameter trainable (no adapter)."""
    recipe = _llama7b_recipe()
    model = planning.meta_model(recipe)
    for name, param in model.named_parameters():
        param.requires_grad_(not name.endswith(("lora_A", "lora_B")))
    tensors = [t for t in planning.tensors(model, recipe) if not t.is_adapter]
    assert sum(t.numel for t in tensors) == LLAMA2_7B_PARAMS
    return tensors


@pytest.fixture(scope="module")
def full_7b() -> list[planning.ModelTensor]:
    return _full_finetune_tensors()


def _gpu(states: dict) -> float:
    return sum(states["gpu"].values())


def _cpu(states: dict) -> float:
    return sum(states["offloaded_per_node"].values())


@pytest.mark.parametrize("gpus, nodes", [(1, 1), (4, 1), (8, 2)])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_equal_deepspeeds_estimator(full_7b, gpus, nodes, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu, gpu = estimate_zero2_model_states_mem_needs(
        LLAMA2_7B_PARAMS, gpus, nodes, cpu_offload=offload, additional_buffer_factor=1)
    states = planning.model_states(full_7b, planning.Setup(
        2, gpus, nodes, "bf16", "adamw", offload_optimizer="cpu" if offload else None))
    assert _gpu(states) == pytest.approx(gpu, abs=2)
    if offload and nodes == 1 and gpus <= 4:
        # DeepSpeed's CPU figure is max(4 x GPUs (the fp32 model each rank loads), 16) bytes per
        # parameter: the training-time offloaded states are the 16
        assert _cpu(states) == pytest.approx(cpu, abs=2)


@pytest.mark.parametrize("gpus, nodes", [(1, 1), (8, 1), (8, 4)])
@pytest.mark.parametrize("offload_optimizer, offload_param", [(False, False), (True, False),
                                                              (True, True)])
def test_zero3_model_states_equal_deepspeeds_estimator(full_7b, gpus, nodes, offload_optimizer,
                                                       offload_param):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        LLAMA2_7B_PARAMS, LLAMA2_7B_LARGEST_LAYER, gpus, nodes, cpu_offload=offload_optimizer,
        cpu_offload_params=offload_param, zero_init=True, additional_buffer_factor=1)
    states = planning.model_states(full_7b, planning.Setup(
        3, gpus, nodes, "bf16", "adamw", offload_optimizer="cpu" if offload_optimizer else None,
        offload_param="cpu" if offload_param else None))
    assert _gpu(states) == pytest.approx(gpu, abs=2)
    if offload_optimizer:  # without offload DeepSpeed's CPU figure is what loading needs
        assert _cpu(states) == pytest.approx(cpu, abs=2)


def test_bf16_full_finetuning_of_7b_with_adamw_does_not_fit_one_80gb_gpu():
    recipe = _llama7b_recipe("deepspeed=ds_configs/zero0.json")
    model = planning.meta_model(recipe)
    for param in model.parameters():
        param.requires_grad_(True)
    result = planning.plan(recipe, 1, 1, 80.0, model=model)
    assert not result.fits
    # ZeRO paper: mixed-precision Adam keeps 16 bytes per parameter (2 + 2 + 4 + 4 + 4)
    states = sum(result.gpu_bytes[k] for k in ("weights", "gradients", "optimizer"))
    assert states >= 16 * result.total_params > 80 * GIB


def test_qlora_llama7b_fits_a_24gb_gpu(capsys):
    assert main(["plan", str(QLORA), "--model-config", "llama2-7b", "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"of 24 GiB: fits", out), out
    result = planning.plan(load_recipe(QLORA, ON_LLAMA2_7B), gpu_memory_gib=24)
    assert result.fits and result.setup.optimizer == "paged_adamw_8bit"
    # independent floor: the 6.48e9 weights of the 224 linear layers at 4 bits, plus the bf16
    # embeddings and head
    linears = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert result.gpu_bytes["weights"] > linears / 2 + 2 * 2 * LLAMA2_7B_LARGEST_LAYER
    # and the same recipe with a bf16 base and fp32 Adam is larger, yet well under 80 GiB
    bf16 = planning.plan(load_recipe(QLORA, [*ON_LLAMA2_7B, "model.load_in_4bit=false",
                                             "optimizer.name=adamw"]))
    assert bf16.gpu_bytes["weights"] > 2 * LLAMA2_7B_PARAMS > result.gpu_bytes["weights"]


@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_weight_bytes_equal_bitsandbytes_tensors(double_quant):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsft import quant
    from dsft.recipe import ModelConfig

    model = LlamaForCausalLM(LlamaConfig(hidden_size=192, intermediate_size=520,
                                         num_hidden_layers=1, num_attention_heads=6,
                                         num_key_value_heads=2, vocab_size=256))
    shapes = {name: m.weight.numel() for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}
    quant.quantize_linears(model, ModelConfig(config="tiny-llama", load_in_4bit=True,
                                              double_quant=double_quant, dtype="float32"))
    for name, numel in shapes.items():
        weight = model.get_submodule(name).weight
        state = weight.quant_state
        parts = [weight.data, state.absmax, state.code]
        if state.nested:
            parts += [state.offset, state.state2.absmax, state.state2.code]
        assert planning.four_bit_bytes(numel, double_quant) == sum(t.nbytes for t in parts), name
    # QLoRA (Dettmers et al. 2023): double quantization costs 8/64 + 32/(64 * 256) = 0.127 bits
    # per weight instead of 32/64 = 0.5
    n = 4096 * 4096
    assert planning.four_bit_bytes(n, True) * 8 / n == pytest.approx(4.127, abs=1e-3)
    assert planning.four_bit_bytes(n, False) * 8 / n == pytest.approx(4.5, abs=1e-3)


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
                                  "sgd"])
def test_optimizer_state_bytes_equal_the_real_optimizers_state(name):
    from dsft.optim import build_optimizer

    shapes = [(64, 100), (10, 10), (300, 17)]  # 8-bit optimizers keep tensors < 4096 in 32 bits
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    optimizer_config = OptimizerConfig(name=name)
    optimizer = build_optimizer(optimizer_config, [{"params": params}])
    for param in params:
        param.grad = torch.randn_like(param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: paged optimizers fall back on CPU
        optimizer.step()
    real = sum(t.nbytes for p in params for key, t in optimizer.state[p].items()
               if torch.is_tensor(t) and key not in ("step", "qmap1", "qmap2"))
    assert real == sum(planning.OPTIMIZERS[name].state_bytes(shape, optimizer_config)
                       for shape in shapes)


def _saved_bytes_per_token(layer, rotary, dtype, batch=2, length=16) -> float:
    """Bytes autograd keeps for one decoder layer, per token: every saved tensor's storage,
    once, except parameters and the rotary tables (shared by all layers). The layer's input
    counts where a norm saves it (fp32: the norm's fp32 copy is the input itself)."""
    hidden = layer.input_layernorm.weight.shape[0]
    x = torch.randn(batch, length, hidden, dtype=dtype, requires_grad=True)
    positions = torch.arange(length)[None].expand(batch, length)
    cos, sin = rotary(x, positions)
    shared = {p.data_ptr() for p in layer.parameters()} | {cos.data_ptr(), sin.data_ptr()}
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in shared:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        layer(x, position_embeddings=(cos, sin), attention_mask=None)
    return sum(storages.values()) / (batch * length)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("adapter", [None, "lora_all", "lora_all_dropout", "lora_qv"])
def test_decoder_layer_activation_formula_equals_what_autograd_saves(dtype, adapter):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsft import adapters
    from dsft.adapters.lora import LoraConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(dtype).train()
    if adapter:
        adapters.inject(model, LoraConfig(
            r=8, dropout=0.1 if adapter.endswith("dropout") else 0.0,
            target_modules=["q_proj", "v_proj"] if adapter == "lora_qv" else "all-linear"))
    layer = model.model.layers[0]
    p = dtype.itemsize
    formula = planning.decoder_layer_activation_bytes(
        64, 160, 4, 2 * 16, p, planning.linear_sites(layer),
        norms_train=adapter is None, mask_bytes=p)  # CPU dropout keeps its mask in the dtype
    assert formula == _saved_bytes_per_token(layer, model.model.rotary_emb, dtype)


def _architecture(recipe_name: str) -> list[str]:
    """Recipes for LLaMA-scale weights that are not here plan from the shipped architecture."""
    if recipe_name.startswith("tiny_"):
        return []
    if recipe_name.startswith("llava7b_"):
        return ["--model-config", "llava-1.5-7b"]
    size = re.search(r"llama(\d+)b", recipe_name)
    assert size, f"{recipe_name}: say which shipped architecture plans it"
    return ["--model-config", f"llama2-{size.group(1)}b"]


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates_resolves_and_plans_on_meta(recipe, capsys, monkeypatch):
    from dsft.model import load_config

    monkeypatch.chdir(REPO)
    architecture = _architecture(recipe.stem)
    overrides = ["model.name_or_path=null", f"model.config={architecture[1]}"] \
        if architecture else []
    assert main(["validate", str(recipe), *overrides]) == 0
    assert capsys.readouterr().out.startswith(f"{recipe}: ok")
    loaded = load_recipe(recipe, overrides)
    assert load_config(loaded.model).model_type in ("llama", "llava")
    assert main(["plan", str(recipe), *architecture, "--gpus", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["total_params"] == result["base_params"] + result["adapter_params"]
    assert 0 < result["trainable_params"] <= result["total_params"]
    if architecture:
        assert result["base_params"] == (LLAVA_1_5_7B_PARAMS if "llava" in recipe.stem
                                         else LLAMA2_7B_PARAMS)
    else:  # the shipped checkpoint's own tensors
        from safetensors import safe_open

        base = REPO / "dsft/assets/vlm/tiny-vlm" if "vlm" in recipe.stem else TINY_BASE
        with safe_open(str(base / "model.safetensors"), "pt") as handle:
            names = list(handle.keys())
            stored = sum(math.prod(handle.get_slice(k).get_shape()) for k in names)
        assert result["base_params"] == stored


def test_plan_of_a_recipe_without_its_weights_says_how_to_plan_it(capsys):
    assert main(["plan", str(LLAMA7B)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--model-config llama2-7b" in err
    assert main(["plan", str(LLAMA7B), "--model-config", "llama2-7b", "--gpus", "0"]) == 2
    assert "--gpus" in capsys.readouterr().err


@pytest.mark.parametrize("bank_forward", [False, True])
def test_periodic_lora_state_counts_the_anchor_copies_and_the_bank(bank_forward):
    """Error feedback keeps a copy of every adapted bf16 weight (2 bytes per weight) and a float32
    bank of (stages r) x (d_in + d_out) per layer; bank_forward keeps the bank only. Counted
    here from the shipped base's config.json, not from dsft's model."""
    recipe = load_recipe(REPO / "recipes/tiny_periodic_lora.yaml",
                         ["model.dtype=bfloat16", "train.max_steps=10",
                          f"adapter.bank_forward={str(bank_forward).lower()}"])
    config = json.loads((REPO / "dsft/assets/base/tiny-llama-2.6m/config.json").read_text())
    h, f, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)] * layers  # (out, in)
    stages, r = (10 - 1) // recipe.adapter.unload_every, recipe.adapter.r
    bank = sum(4 * stages * r * (d_in + d_out) for d_out, d_in in shapes)
    anchors = 0 if bank_forward else sum(2 * d_out * d_in for d_out, d_in in shapes)
    assert planning.plan(recipe).gpu_bytes["method"] == anchors + bank


def test_flora_state_for_llama2_7b_next_to_adamw_for_the_same_modules():
    """recipes/llama7b_flora.yaml (float32, all linear layers, rank 256) against the counts
    written out from LLaMA-2-7B's shapes: flora keeps 2 r max(m, n) + (m + n) floats per weight
    (momentum and accumulator keep the larger side; 2 r min(m, n) with project: larger) and one
    full gradient at a time; AdamW on the same weights keeps 2 m n floats of moments and every
    m n gradient until the step."""
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    shapes *= 32
    flora = planning.plan(load_recipe(REPO / "recipes/llama7b_flora.yaml", ON_LLAMA2_7B))
    assert flora.gpu_bytes["optimizer"] == sum(4 * (2 * 256 * max(s) + sum(s)) for s in shapes)
    assert flora.gpu_bytes["gradients"] == 4 * 11008 * 4096  # the largest weight's, transiently
    larger = planning.plan(load_recipe(REPO / "recipes/llama7b_flora.yaml", ON_LLAMA2_7B + [
        "optimizer.flora.project=larger"]))
    assert larger.gpu_bytes["optimizer"] == sum(4 * (2 * 256 * min(s) + sum(s)) for s in shapes)
    adamw = planning.plan(load_recipe(REPO / "recipes/llama7b_flora.yaml", ON_LLAMA2_7B + [
        "adapter.method=none", "optimizer.name=adamw", "optimizer.flora=null"]))
    assert adamw.gpu_bytes["optimizer"] == sum(4 * 2 * m * n for m, n in shapes)
    assert adamw.gpu_bytes["gradients"] == sum(4 * m * n for m, n in shapes)


@pytest.mark.parametrize("granularity, p", [("element", 0.5), ("element", 0.3), ("rank", 0.5),
                                            ("rank", 0.3)])
def test_lora_sp_trains_and_keeps_optimizer_state_for_its_trainable_entries_only(granularity, p):
    """recipes/llama7b_lora_sp.yaml (r 16, every linear layer, bf16, ZeRO-3) on 8 GPUs against
    counts written out from LLaMA-2-7B's shapes: of each factor's n entries (element) or r rows
    of A / columns of B (rank) round-half-up(p n) train; AdamW keeps two fp32 moments and
    DeepSpeed an fp32 master and gradient per trainable value (16 bytes), / 8 ranks. The frozen
    entries are buffers: counted with the weights, never as trainable or optimizer state."""
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # (d_out, d_in)
    shapes *= 32
    r = 16

    def k(n: int) -> int:
        return max(1, math.floor(p * n + 0.5))

    if granularity == "element":
        trainable = sum(k(r * d_in) + k(d_out * r) for d_out, d_in in shapes)
    else:
        trainable = sum(k(r) * (d_in + d_out) for d_out, d_in in shapes)
    recipe = load_recipe(REPO / "recipes/llama7b_lora_sp.yaml", ON_LLAMA2_7B + [
        f"adapter.granularity={granularity}", f"adapter.p={p}"])
    result = planning.plan(recipe, gpus_per_node=8)
    assert result.trainable_params == result.adapter_params == trainable
    assert result.gpu_bytes["optimizer"] == 16 * trainable / 8
    # activations: the rank-r intermediate is whole, frozen entries or not
    sites = planning.linear_sites(planning.meta_model(recipe).model.layers[0])
    assert {site.adapter_rank for site in sites.values()} == {r}
    lora = planning.plan(_llama7b_recipe("adapter.r=16", "adapter.target_modules=all-linear"),
                         gpus_per_node=8)
    assert lora.trainable_params == sum(r * (d_in + d_out) for d_out, d_in in shapes)
    if p == 0.5:  # every n and r here is even: exactly half of LoRA's
        assert 2 * result.gpu_bytes["optimizer"] == lora.gpu_bytes["optimizer"]


def test_chunked_and_liger_losses_plan_a_chunk_of_logits_not_the_whole_sequence(capsys):
    """A 152k vocabulary (Qwen2's 152,064) on LLaMA-2-7B's shapes, 8,192 bf16 tokens per micro
    batch, written out: besides the final norm (4 h + 4 bytes per token), plain keeps
    t (2 p + 8) V; chunked the labelled rows (t p h) and one 1,024-token chunk's (2 p + 8) V per
    token; liger the input gradient (t p h) and 256 rows of p V logits (its chunk: the next
    power of two over 8192 / ceil(152064 / 4096) = 215.6)."""
    t, vocab, h, p = 8192, 152_064, 4096, 2
    overrides = [*ON_LLAMA2_7B, f"model.config_overrides.vocab_size={vocab}",
                 f"data.max_length={t}", "train.micro_batch_size=1"]
    norm = t * (4 * h + 4)
    plain = planning.plan(load_recipe(LLAMA7B, overrides))
    assert plain.gpu_bytes["loss"] == norm + t * (2 * p + 8) * vocab
    assert plain.gpu_bytes["loss"] > 13.9 * GIB
    chunked = planning.plan(load_recipe(LLAMA7B, [*overrides, "train.loss=chunked"]))
    assert chunked.gpu_bytes["loss"] == norm + t * p * h + 1024 * (2 * p + 8) * vocab
    assert chunked.gpu_bytes["loss"] < 2 * GIB
    liger = planning.plan(load_recipe(LLAMA7B, [*overrides, "train.loss=liger"]))
    assert liger.gpu_bytes["loss"] == norm + t * p * h + 256 * p * vocab
    assert main(["plan", str(LLAMA7B), *overrides, "train.loss=chunked"]) == 0
    assert re.search(r"logits and loss \(chunked\) +1\.93\n", capsys.readouterr().out)
