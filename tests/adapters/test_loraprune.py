"""LoRAPrune against plain PyTorch references: G_hat from autograd on the merged weight (float64),
GQA head groups and L2-normalised module sums in the moving average, the cubic schedule's
endpoints and events, protected blocks, local monotone pruning, the 4-bit weight path, masked
model = exported (physically sliced) model, and 2-rank ZeRO-2 / ZeRO-3 scores = 1-process scores."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsft import dist
from dsft.adapters import StepContext, adapter_layers, inject, loraprune, method
from dsft.adapters.loraprune import LoraPruneConfig, LoraPruneLinear
from dsft.errors import ConfigError
from tests.helpers import REPO, run_ranks

PROBE = REPO / "tests/ranks/loraprune_probe.py"


def _layer(name: str, d_in=24, d_out=16, num_layers=4, dtype=torch.float64, **cfg):
    torch.manual_seed(0)
    config = LoraPruneConfig(r=3, alpha=6, dropout=0.0, **cfg).for_module(name, num_layers)
    layer = LoraPruneLinear(nn.Linear(d_in, d_out, bias=True, dtype=dtype), config)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 would hide the B dA and dB dA terms
    return layer


def _merged_weight_gradient(layer, x, target):
    """dL/dW' for W' = W + s B A, by autograd on the merged weight itself (float64)."""
    merged = (layer.base_layer.weight + layer.scale * layer.lora_B @ layer.lora_A).detach()
    merged.requires_grad_(True)
    (F.linear(x, merged, layer.base_layer.bias) - target).pow(2).sum().backward()
    return merged.detach(), merged.grad


@pytest.mark.parametrize("name,by_rows", [("model.layers.1.self_attn.q_proj", True),
                                          ("model.layers.1.mlp.down_proj", False)])
def test_importance_is_G_hat_closed_form_from_autograd_times_merged_weight(name, by_rows,
                                                                          monkeypatch):
    monkeypatch.setattr(loraprune, "_TILE_ELEMENTS", 50)  # several row tiles of 24 columns
    layer = _layer(name)
    x, target = torch.randn(7, 24, dtype=torch.float64), torch.randn(7, 16, dtype=torch.float64)
    (layer(x) - target).pow(2).sum().backward()
    merged, grad = _merged_weight_gradient(layer, x, target)
    s, A, B = layer.scale, layer.lora_A.detach(), layer.lora_B.detach()
    # the LoRA gradients are the chain rule through W' = W + s B A ...
    dA, dB = s * B.T @ grad, s * grad @ A.T
    torch.testing.assert_close(layer.lora_A.grad, dA, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.lora_B.grad, dB, rtol=0, atol=1e-10)
    # ... and G_hat is what one unit SGD step of A and B changes the product B A by
    g_hat = B @ A - (B - dB) @ (A - dA)
    importance = (g_hat * merged).abs()
    reference = importance.sum(dim=1) if by_rows else importance.sum(dim=0)
    torch.testing.assert_close(layer.channel_importance(), reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_weight_is_dequantized_for_the_importance(quant_type):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    torch.manual_seed(1)
    linear = nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type=quant_type)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                 quant_type=quant_type)
    q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")
    cfg = LoraPruneConfig(r=4, alpha=8, dropout=0.0).for_module("model.layers.1.mlp.up_proj", 4)
    layer = LoraPruneLinear(q, cfg)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x, target = torch.randn(6, 64), torch.randn(6, 32)
    (layer(x) - target).pow(2).sum().backward()
    W = bnbF.dequantize_4bit(q.weight.data, q.weight.quant_state).double()
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    dA, dB = layer.lora_A.grad.double(), layer.lora_B.grad.double()
    g_hat = dB @ A + B @ dA - dB @ dA
    reference = (g_hat * (W + 2.0 * B @ A)).abs().sum(dim=1)
    torch.testing.assert_close(layer.channel_importance().double(), reference, rtol=1e-5,
                               atol=1e-6)


def _tiny_llama(layers=4, heads=8, kv_heads=2, hidden=32, intermediate=24, **cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         num_key_value_heads=kv_heads, vocab_size=50))
    config = LoraPruneConfig(r=2, alpha=4, dropout=0.0, **cfg)
    inject(model, config, seed=1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_(std=0.05)
    return model, config, method("loraprune").hooks(config, model)


def _reference_group_score(layers: dict, block: int, heads=8, kv_heads=2, head_dim=4):
    """One step's score per key/value group and per MLP channel of ``block``, from each module's
    LoRA gradients, grouped by explicit head membership (query head h -> group h // (H / KV))."""
    def importance(layer):
        A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        dA, dB = layer.lora_A.grad.double(), layer.lora_B.grad.double()
        merged = layer.base_layer.weight.double() + layer.scale * B @ A
        return ((dB @ A + B @ dA - dB @ dA) * merged).abs()

    def normalised(v):
        return v / v.norm()

    prefix = f"model.layers.{block}"
    q_group = torch.tensor([h // (heads // kv_heads) for h in range(heads)]).repeat_interleave(
        head_dim)
    kv_group = torch.arange(kv_heads).repeat_interleave(head_dim)
    heads_score = torch.zeros(kv_heads, dtype=torch.float64)
    for kind, group, dim in (("q", q_group, 1), ("k", kv_group, 1), ("v", kv_group, 1),
                             ("o", q_group, 0)):
        per_channel = importance(layers[f"{prefix}.self_attn.{kind}_proj"]).sum(dim=dim)
        heads_score += normalised(torch.zeros(kv_heads, dtype=torch.float64).index_add(
            0, group, per_channel))
    channel_score = sum(normalised(importance(layers[f"{prefix}.mlp.{kind}_proj"]).sum(dim=dim))
                        for kind, dim in (("gate", 1), ("up", 1), ("down", 0)))
    return heads_score, channel_score


def test_group_scores_are_gqa_grouped_l2_normalised_module_sums_in_a_0_9_ema():
    model, _, hooks = _tiny_llama()
    layers = adapter_layers(model)
    # blocks 0, 1, 2 prunable (floor(0.1 * 4) = 0 protected at the start; the last protected)
    assert [(s.label, s.n_groups) for s in hooks.structures] == [("heads", 2), ("channels", 24)] * 3
    expected = {block: [torch.zeros(2, dtype=torch.float64), torch.zeros(24, dtype=torch.float64)]
                for block in (0, 1, 2)}
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        hooks.after_backward(StepContext(None, step, 100, 0, dist))
        for block in (0, 1, 2):
            for index, fresh in enumerate(_reference_group_score(layers, block)):
                expected[block][index] = 0.9 * expected[block][index] + 0.1 * fresh
        optimizer.step()
        optimizer.zero_grad()
    got = [s.group_scores().double() for s in hooks.structures]
    want = [expected[b][i] for b in (0, 1, 2) for i in (0, 1)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_masking_a_kv_group_removes_exactly_its_query_heads_and_a_channel_its_down_column():
    from transformers import LlamaForCausalLM

    model = _tiny_llama()[0]
    for layer in adapter_layers(model).values():  # B = 0: the adapted model is the base model
        torch.nn.init.zeros_(layer.lora_B)
    reference = LlamaForCausalLM(model.config)
    base_weights = {name.replace(".base_layer", ""): value
                    for name, value in model.state_dict().items()
                    if not any(key in name for key in ("lora_", "prune_mask", "score_ema"))}
    reference.load_state_dict(base_weights)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    with torch.no_grad():
        for kind in ("q_proj", "k_proj", "v_proj"):  # key/value group 1 = query heads 4..7
            layer = getattr(attn, kind)
            layer.prune_mask.view(2, -1)[1] = 0
        for kind in ("gate_proj", "up_proj"):
            getattr(mlp, kind).prune_mask[[3, 17]] = 0
        ref_block = reference.model.layers[1]
        ref_block.self_attn.o_proj.weight[:, 4 * 4:8 * 4] = 0
        ref_block.mlp.down_proj.weight[:, [3, 17]] = 0
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=0, atol=1e-6)


def test_schedule_endpoints_are_exact_and_events_follow_prune_every():
    cfg = LoraPruneConfig()  # s_0 = 0, s_f = 0.5, warmup and cooldown 10 %, every 10 steps
    ratios = [loraprune.pruning_ratio(t, 100, cfg) for t in range(100)]
    assert all(r == 0.0 for r in ratios[:11])  # t <= t_w = 10
    assert all(r == 0.5 for r in ratios[90:])  # t >= T - t_c = 90
    assert ratios[50] == 0.5 + (0.0 - 0.5) * (1 - 40 / 80) ** 3
    assert all(a <= b for a, b in itertools.pairwise(ratios))
    assert [t for t in range(100) if loraprune.prunes_at(t, 100, cfg)] == list(range(20, 100, 10))
    assert [t for t in range(100) if loraprune.scores_needed_at(t, 100, cfg)] == list(range(91))
    # the tiny recipe's 4-step setting: warmup and cooldown 0.4 steps, every step
    short = LoraPruneConfig(prune_every=1)
    assert [t for t in range(4) if loraprune.prunes_at(t, 4, short)] == [1, 2, 3]
    assert loraprune.pruning_ratio(3, 4, short) == 0.5 - 0.5 * (1 - 2.6 / 3.2) ** 3


def test_final_event_reaches_exactly_floor_n_times_final_ratio():
    _, cfg, hooks = _tiny_llama(prune_every=7)
    generator = torch.Generator().manual_seed(2)
    for structure in hooks.structures:
        for layer in structure.members:
            layer.channel_score_ema.copy_(torch.rand(layer.channel_score_ema.shape,
                                                     generator=generator))
    total = 40
    for step in range(total):
        if loraprune.prunes_at(step, total, cfg):
            hooks.prune(loraprune.pruning_ratio(step, total, cfg))
    for structure in hooks.structures:
        assert int((~structure.kept_groups()).sum()) == math.floor(structure.n_groups * 0.5)


def test_protected_first_tenth_and_last_block_are_never_scored_or_masked():
    model, _, hooks = _tiny_llama(layers=10, heads=2, kv_heads=2, hidden=16, intermediate=8)
    layers = adapter_layers(model)
    for name, layer in layers.items():
        block = int(name.split(".")[2])
        protected = block in (0, 9)  # floor(0.1 * 10) = 1 first block, and the last
        assert (layer.kind is None) == protected, name
        assert not protected or "channel_score_ema" not in dict(layer.named_buffers())
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()
    hooks.after_backward(StepContext(None, 0, 10, 0, dist))
    hooks.prune(0.5)
    for name, layer in layers.items():
        if layer.prune_mask is not None:
            assert 0 < int((layer.prune_mask == 0).sum()) < layer.out_features
    assert {int(n.split(".")[2]) for n, layer in layers.items() if layer.prune_mask is not None} \
        == set(range(1, 9))


def test_local_pruning_drops_lowest_kept_groups_and_never_revives_a_pruned_one():
    hooks = _tiny_llama()[2]
    channels = hooks.structures[1]  # block 0's 24 MLP channels
    scores = torch.arange(24, dtype=torch.float32)  # channel j scores j (summed over 3 modules)
    for layer in channels.members:
        layer.channel_score_ema.copy_(scores / 3)
    hooks.prune(0.25)
    assert (~channels.kept_groups()).nonzero().flatten().tolist() == list(range(6))
    for layer in channels.members:  # now the pruned channels would score highest
        layer.channel_score_ema.copy_((100 - scores) / 3)
    hooks.prune(0.5)
    pruned = (~channels.kept_groups()).nonzero().flatten().tolist()
    assert pruned == list(range(6)) + list(range(18, 24))  # 6 kept + the 6 lowest of the rest
    heads = hooks.structures[0]
    assert int((~heads.kept_groups()).sum()) == 1  # floor(2 * 0.5)
    assert heads.masked[0].prune_mask.view(2, -1).sum(dim=1).tolist().count(0) == 1


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="adapter.initial_ratio"):
        LoraPruneConfig(initial_ratio=0.6, final_ratio=0.5)
    with pytest.raises(ConfigError, match="adapter.cooldown_fraction"):
        LoraPruneConfig(warmup_fraction=0.5, cooldown_fraction=0.5)
    with pytest.raises(ConfigError, match=r"adapter.target_modules: .*k_proj"):
        _tiny_llama(target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                    "down_proj"])
    _tiny_llama(target_modules=["gate_proj", "up_proj", "down_proj"], prune_heads=False)


def test_exported_pruned_model_loads_in_transformers_with_the_masked_model_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from dsft import checkpoint
    from dsft.cli import main

    model, cfg, hooks = _tiny_llama(layers=4, heads=4, kv_heads=2, hidden=32, intermediate=24,
                                    prune_every=2)
    base_dir = tmp_path / "base"
    base = _tiny_llama(layers=4, heads=4, kv_heads=2, hidden=32, intermediate=24)[0]
    for name, layer in adapter_layers(base).items():  # the same seed: the same base weights
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, layer.base_layer)
    base.save_pretrained(base_dir)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(4))
    total = 8
    for step in range(total):  # a short run that prunes (steps 2, 4, 6) and trains on
        model(input_ids=ids, labels=ids).loss.backward()
        hooks.after_backward(StepContext(None, step, total, 0, dist))
        optimizer.step()
        optimizer.zero_grad()
    hooks.prune(0.5)
    checkpoint.save_adapter(model, cfg, tmp_path / "adapter", base_model=str(base_dir))
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "pruned"), "--prune"]) == 0
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)
    # blocks 0, 1, 2 keep 1 of 2 key/value groups (2 of 4 heads) and 12 of 24 channels
    config = pruned.config
    assert config.layer_num_attention_heads == [2, 2, 2, 4]
    assert config.layer_num_key_value_heads == [1, 1, 1, 2]
    assert config.layer_intermediate_sizes == [12, 12, 12, 24]
    removed_per_block = 2 * 16 * 32 + 2 * 8 * 32 + 3 * 12 * 32  # q+o: 2 heads, k+v: 1, MLP: 12
    base_params = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in pruned.parameters()) == base_params - 3 * removed_per_block
    # dsft merge would drop the masks: it refuses
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 2


# ---------------------------------------------------------------- sharded == unsharded

def _probe_reference_step0():
    """Step 0's group scores of the probe, in float64, from autograd on the merged weights of
    a plain model (the ``_reference_group_score`` math, with the probe's shapes)."""
    from tests.ranks.loraprune_probe import build_model, global_batch, mean_token_loss

    model = build_model()[0]
    model.double()
    ids = global_batch()
    mean_token_loss(model(input_ids=ids).logits, ids).backward()
    return [torch.cat([t.reshape(-1) for t in _reference_group_score(
        adapter_layers(model), block, heads=8, kv_heads=4, head_dim=8)]) * 0.1 for block in (0, 1)]


@pytest.fixture(scope="module")
def one_process_probes(tmp_path_factory):
    """The probe on 1 process (ZeRO-0), per base precision, run when first asked for."""
    runs = {}

    def run(base: str) -> dict:
        if base not in runs:
            runs[base] = run_ranks(PROBE, ["0", base], tmp_path_factory.mktemp("loraprune_1proc"),
                                   nprocs=1)[0]
        return runs[base]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("stage,base", [(2, "float32"), (3, "nf4")])
def test_two_rank_zero_scores_and_masks_equal_one_process_and_float64_reference(
        stage, base, one_process_probes, tmp_path):
    ranks = run_ranks(PROBE, [str(stage), base], tmp_path / "out", nprocs=2)
    assert ranks[0] == ranks[1]  # every rank holds the same scores and masks
    sharded, single = ranks[0]["steps"], one_process_probes(base)["steps"]
    # Scores are O(0.1). AdamW's first update is about lr g / (|g| + eps), so summation-order
    # differences in near-zero gradient entries change those entries' updates visibly: step 1's
    # scores differ by up to 2.4e-6 observed (NF4 base, ZeRO-3), step 0's by under 1e-7.
    for got, want in zip(sharded, single):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["kept"] == want["kept"]
        for g, w in zip(got["scores"], want["scores"]):
            torch.testing.assert_close(torch.tensor(g), torch.tensor(w), rtol=1e-5, atol=1e-5)
    # step 1 pruned floor(4 * 0.65625) = 2 of 4 key/value groups, 31 of 48 channels per block
    assert [k.count(False) for k in sharded[1]["kept"]] == [2, 31, 2, 31]
    # Equal masks are a fair demand of runs whose scores differ by summation order (and so by
    # CPU) only when no decision is a near tie: at step 1's event every kept group must score
    # above every group it pruned by more than twice the scores' tolerance (1.4e-4 measured).
    for scores, kept_before, kept in zip(single[1]["scores"], single[0]["kept"], single[1]["kept"]):
        scores, kept_before, kept = (torch.tensor(v) for v in (scores, kept_before, kept))
        assert scores[kept].min() - scores[kept_before & ~kept].max() > 5e-5
    if base == "nf4":  # the float reference below has no quantization error
        return
    reference = _probe_reference_step0()
    step0 = sharded[0]["scores"]
    for block, want in enumerate(reference):
        got = torch.tensor(step0[2 * block] + step0[2 * block + 1], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def _reference_magnitude_scores(layers: dict, block: int, heads=8, kv_heads=2, head_dim=4):
    """Structured magnitude: per key/value group and per MLP channel of ``block``, each module's
    sum of |W + s B A| over the group's rows (q/k/v/gate/up) or columns (o/down), L2-normalised
    per module and summed over modules; group membership written out by head index."""
    def magnitude(layer):
        A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        return (layer.base_layer.weight.double() + layer.scale * B @ A).abs()

    prefix = f"model.layers.{block}"
    heads_score = torch.zeros(kv_heads, dtype=torch.float64)
    for kind, per_kv in (("q", heads // kv_heads), ("k", 1), ("v", 1), ("o", heads // kv_heads)):
        weight = magnitude(layers[f"{prefix}.self_attn.{kind}_proj"])
        weight = weight.T if kind == "o" else weight  # o's groups are its input columns
        group = torch.stack([weight[g * per_kv * head_dim:(g + 1) * per_kv * head_dim].sum()
                             for g in range(kv_heads)])
        heads_score += group / group.norm()
    channel_score = torch.zeros(24, dtype=torch.float64)
    for kind in ("gate", "up", "down"):
        weight = magnitude(layers[f"{prefix}.mlp.{kind}_proj"])
        per_channel = weight.sum(dim=0 if kind == "down" else 1)
        channel_score += per_channel / per_channel.norm()
    return heads_score, channel_score


def test_magnitude_score_prunes_the_groups_of_lowest_merged_weight_magnitude():
    model, cfg, hooks = _tiny_llama(score="magnitude", prune_every=1)
    layers = adapter_layers(model)
    # no backward: magnitude scoring needs no gradient
    total = 20
    step = 18  # the first step at the final ratio 0.5 (cooldown 10 % of 20): one event
    assert loraprune.prunes_at(step, total, cfg) and loraprune.pruning_ratio(step, total, cfg) == 0.5
    hooks.after_backward(StepContext(None, step, total, 0, dist))
    ratio = loraprune.pruning_ratio(step, total, cfg)
    for index, structure in enumerate(hooks.structures):
        block, which = (0, 1, 2)[index // 2], index % 2
        reference = _reference_magnitude_scores(layers, block)[which]
        torch.testing.assert_close(structure.group_scores().double(), 0.1 * reference,
                                   rtol=1e-5, atol=1e-7)
        n_pruned = math.floor(structure.n_groups * ratio + 1e-9)
        assert n_pruned > 0
        expected = set(torch.argsort(reference, stable=True)[:n_pruned].tolist())
        assert set((~structure.kept_groups()).nonzero().flatten().tolist()) == expected


def _random_masks(score_seed: int) -> list[list[bool]]:
    _, cfg, hooks = _tiny_llama(score="random", score_seed=score_seed)
    hooks.prune(0.25, step=20)
    hooks.prune(0.5, step=30)
    return [structure.kept_groups().tolist() for structure in hooks.structures]


def test_random_score_is_seeded_monotone_and_sized_like_the_schedule():
    first, again, other = _random_masks(0), _random_masks(0), _random_masks(1)
    assert first == again  # the same seed and steps draw the same structures (every rank too)
    assert first != other
    for kept in first:
        assert kept.count(False) == math.floor(len(kept) * 0.5)
    # at 0.25 then 0.5: the groups pruned first stay pruned, and the scores are not used
    _, cfg, hooks = _tiny_llama(score="random")
    for structure in hooks.structures:
        for layer in structure.members:
            layer.channel_score_ema.copy_(torch.arange(layer.channel_score_ema.numel()))
    hooks.prune(0.25, step=20)
    early = [structure.kept_groups().clone() for structure in hooks.structures]
    hooks.prune(0.5, step=30)
    channels_pruned = [(~s.kept_groups()).nonzero().flatten().tolist()
                       for s in hooks.structures if s.label == "channels"]
    assert any(pruned != list(range(12)) for pruned in channels_pruned)  # not the lowest scores
    for before, structure in zip(early, hooks.structures):
        assert not (structure.kept_groups() & ~before).any()


def test_random_score_computes_no_scores_and_prunes_on_schedule():
    model, cfg, hooks = _tiny_llama(score="random", prune_every=1)
    total = 20
    for step in range(total):
        hooks.after_backward(StepContext(None, step, total, 0, dist))  # no gradients exist
    for structure in hooks.structures:
        assert float(structure.group_scores().abs().sum()) == 0.0
        assert int((~structure.kept_groups()).sum()) == math.floor(structure.n_groups * 0.5)


def test_score_option_is_validated():
    with pytest.raises(ConfigError, match="adapter.score"):
        from dsft.recipe import recipe_from_dict
        recipe_from_dict({"model": {"config": "tiny-llama"}, "data": {"train": "x.jsonl"},
                          "adapter": {"method": "loraprune", "score": "gradient"}})
