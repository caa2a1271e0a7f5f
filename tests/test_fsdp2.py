"""The FSDP2 engine (dsft/fsdp2.py) on 2 CPU ranks against plain PyTorch in one process.

One torchrun job (tests/ranks/fsdp2_probe.py) trains a tiny Llama with LoRA-like adapters,
sharded per decoder layer, for 4 AdamW steps (LR schedule, clipping, 2 micro-batches per rank),
probes dsft.dist's helpers on a DTensor parameter, checkpoints at step 2 with DCP and resumes in
a fresh engine, and trains over an NF4 base stored in float32. The references are computed here
by an unsharded loop over the same model and batches: one backward of the global batch's summed
token loss over its label count, torch's clip_grad_norm_ and AdamW.

Tolerances as tests/test_methods_sharded.py states them (float32 reductions in another order
across ranks): losses within 1e-5 relative, adapter tensors within 1e-4 at every entry and 1e-6
on average. Values the helpers copy (writes read back) must come back exactly.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import REPO, recipe_error, run_ranks
from tests.ranks import fsdp2_probe as probe

LOSS_RTOL, ADAPTER_ATOL = 1e-5, 1e-4
TINY_LORA = REPO / "recipes/tiny_lora.yaml"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(REPO / "tests/ranks/fsdp2_probe.py", [],
                     tmp_path_factory.mktemp("fsdp2") / "out", timeout=300)


def reference_run(quant_storage: str | None = None) -> dict:
    """The unsharded run, plus what the helper probe reads after it: the Adam moment of layer
    0's q_proj lora_A and its gradient on global batch 0."""
    model = probe.build_model(quant_storage)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=probe.LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, probe.lr_factor)
    losses = []
    for step in range(probe.STEPS):
        ids, labels = probe.global_batch(step)
        loss = probe.loss_sum(model, ids, labels) / probe.label_count(labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, probe.MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    lora_A = model.model.layers[0].self_attn.q_proj.lora_A
    ids, labels = probe.global_batch(0)
    (probe.loss_sum(model, ids, labels) / probe.label_count(labels)).backward()
    return {"losses": losses,
            "adapter": {name: p.detach().clone() for name, p in model.named_parameters()
                        if p.requires_grad},
            "exp_avg": optimizer.state[lora_A]["exp_avg"].clone(), "grad": lora_A.grad.clone()}


@pytest.fixture(scope="module")
def reference() -> dict:
    return reference_run()


def assert_same_training(losses, adapter: dict, want: dict) -> None:
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                               torch.tensor(want["losses"], dtype=torch.float64),
                               rtol=LOSS_RTOL, atol=0)
    assert adapter.keys() == want["adapter"].keys()
    for name, expected in want["adapter"].items():
        got = torch.tensor(adapter[name])
        torch.testing.assert_close(got, expected, atol=ADAPTER_ATOL, rtol=0,
                                   msg=lambda m: f"{name}: {m}")
        assert float((got.double() - expected.double()).abs().mean()) <= ADAPTER_ATOL / 100, name


@pytest.mark.slow
def test_two_rank_fsdp2_training_equals_the_one_process_run(ranks, reference):
    for report in ranks:
        assert_same_training(report["losses"], report["adapter"], reference)


@pytest.mark.slow
def test_dist_helpers_on_a_dtensor_parameter_give_the_plain_tensor_values(ranks, reference):
    target = torch.arange(5 * 64, dtype=torch.float32).view(5, 64) / 100
    for rank, report in enumerate(ranks):
        helpers = report["helpers"]
        assert helpers["partitioned"] and helpers["full_shape"] == [5, 64]
        assert helpers["local_rows"] == (3, 2)[rank]  # torch.chunk sizes: ceil(5 / 2), then 2
        assert helpers["step_count"] == probe.STEPS
        torch.testing.assert_close(torch.tensor(helpers["exp_avg"]), reference["exp_avg"],
                                   rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(torch.tensor(helpers["grad"]), reference["grad"],
                                   rtol=1e-4, atol=1e-9)
        assert torch.equal(torch.tensor(helpers["grad_after_set"]), -target)
        assert torch.equal(torch.tensor(helpers["fp32_after_set"]), target)
        assert helpers["local_part_matches"]
        # each rank doubled only its own rows: together, the whole tensor once
        assert torch.equal(torch.tensor(helpers["after_local_edit"]), 2 * target)
        assert torch.equal(torch.tensor(helpers["parts_rebuilt"]), 2 * target.view(-1))
        assert helpers["gathered_shape"] == [5, 64]
        assert torch.equal(torch.tensor(helpers["gathered_value"]), 2 * target)
        assert torch.equal(torch.tensor(helpers["after_modifier_edit"]), -target)  # rank 0's
        assert torch.equal(torch.tensor(helpers["exp_avg_after_set"]), 3 * target)
        assert helpers["step_count_after_set"] == 7
        assert helpers["exp_avg_after_reset"] is None


@pytest.mark.slow
def test_dcp_checkpoint_at_step_2_resumes_into_the_uninterrupted_run(ranks):
    for report in ranks:
        assert report["resume_loaded"]
        assert report["resume_lr"] == [pytest.approx(probe.LR * probe.lr_factor(2))]
        want = {"losses": report["losses"][2:],
                "adapter": {k: torch.tensor(v) for k, v in report["adapter"].items()}}
        assert_same_training(report["resume_losses"], report["resume_adapter"], want)


@pytest.mark.slow
def test_nf4_base_with_float32_storage_is_sharded_and_trains_as_in_one_process(ranks):
    sharded, local, full = ranks[0]["nf4_weight_sharded"]
    assert sharded and local == full // 2  # packed 4-bit weight: half of it on each rank
    reference = reference_run(quant_storage="float32")
    for report in ranks:
        assert_same_training(report["nf4_losses"], report["nf4_adapter"], reference)


@pytest.mark.slow
def test_a_merge_into_a_sharded_nf4_weight_lands_as_in_one_process(ranks):
    from dsft import quant

    model = probe.build_model(quant_storage="float32")
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    before = quant.dequantize(layer)
    quant.requantize(layer, before + 0.5)
    after = quant.dequantize(layer)
    ids, labels = probe.global_batch(0)
    with torch.no_grad():
        loss = float(probe.loss_sum(model, ids, labels) / probe.label_count(labels))
    for report in ranks:
        merge = report["nf4_merge"]
        torch.testing.assert_close(torch.tensor(merge["before"]), before, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.tensor(merge["after"]), after, rtol=0, atol=1e-6)
        assert merge["loss"] == pytest.approx(loss, rel=LOSS_RTOL)


def test_engine_fsdp2_refuses_a_zero_stage_that_asks_deepspeed_to_shard():
    message = recipe_error(["engine=fsdp2", "deepspeed=ds_configs/zero3.json"], TINY_LORA)
    assert "deepspeed.zero_optimization.stage" in message and "fsdp2" in message


def test_fsdp2_options_without_engine_fsdp2_are_refused():
    message = recipe_error(["fsdp2.cpu_offload=true"], TINY_LORA)
    assert message.split(": ")[1] == "fsdp2" and "engine: fsdp2" in message


def test_engine_fsdp2_over_4bit_needs_storage_in_the_gather_dtype():
    message = recipe_error(["engine=fsdp2", "model.load_in_4bit=true",
                            "model.quant_storage=uint8"], TINY_LORA)
    assert "model.quant_storage" in message and "float32" in message


def test_engine_fsdp2_accepts_a_zero0_recipe():
    from dsft.recipe import load_recipe

    recipe = load_recipe(TINY_LORA, ["engine=fsdp2", "fsdp2.reshard_after_forward=false"])
    assert recipe.engine == "fsdp2" and recipe.fsdp2.reshard_after_forward is False


@pytest.fixture(scope="module")
def meta_loaded(tmp_path_factory) -> tuple[list[dict], object]:
    out = tmp_path_factory.mktemp("fsdp2_meta") / "out"
    return run_ranks(REPO / "tests/ranks/fsdp2_meta_load.py", [], out, timeout=300), out


def _whole_model_with_adapters(kind: str) -> dict:
    """Reference: the model as the 1-process run builds it (transformers' from_pretrained, its
    bitsandbytes quantization for NF4), then the adapters injected."""
    from dsft import adapters
    from dsft import model as model_loading
    from dsft.recipe import load_recipe
    from tests.ranks.fsdp2_meta_load import KINDS

    recipe = load_recipe(TINY_LORA, KINDS[kind])
    model, _ = model_loading.load_model(recipe.model, model_loading.load_config(recipe.model), {})
    adapters.inject(model, recipe.adapter, seed=recipe.train.seed)
    return dict(model.named_parameters())


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """Packed 4-bit data viewed as float32 holds NaN patterns: compare the bits."""
    flat = tensor.detach().contiguous().view(-1)
    return flat.view(torch.int32) if flat.dtype == torch.float32 else flat


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["float", "nf4"])
def test_a_base_loaded_sharded_from_the_meta_device_equals_the_model_built_whole(kind,
                                                                                  meta_loaded):
    """Every parameter (base and adapters) and every 4-bit quant state, gathered, is the one
    the 1-process loader gives, bit for bit (copies and the same quantization kernel)."""
    reports, out = meta_loaded
    saved = torch.load(out / f"{kind}.pt")
    want = _whole_model_with_adapters(kind)
    assert saved["params"].keys() == want.keys()
    for name, expected in want.items():
        assert torch.equal(_bits(saved["params"][name].to(expected.dtype)), _bits(expected)), name
    states = {name.removesuffix(".weight"): p.quant_state for name, p in want.items()
              if hasattr(p, "quant_state")}
    assert states.keys() == saved["states"].keys() and len(states) == (28 if kind == "nf4" else 0)
    for name, (absmax, code) in saved["states"].items():
        assert torch.equal(absmax, states[name].absmax) and torch.equal(code, states[name].code)
    assert all(report[kind]["prepare_devices"][-1] == "meta" for report in reports)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["float", "nf4"])
def test_no_rank_reads_or_holds_the_whole_model_when_loading_sharded(kind, meta_loaded):
    """Float: each rank reads only its rows (the ranks' reads add up to the checkpoint once, no
    tensor read whole). NF4: only the 4-bit linears' float weights are read whole, one at a
    time, each once. Either way each rank ends up holding about half the model."""
    reports, _ = meta_loaded
    want = _whole_model_with_adapters(kind)
    model_bytes = sum(p.numel() * p.element_size() for p in want.values())
    quantized = {name for name, p in want.items() if hasattr(p, "quant_state")}
    for report in reports:
        load = report[kind]
        assert load["held_bytes"] <= 0.6 * model_bytes
        whole_keys = [key for key, _ in load["whole_reads"]]
        assert len(whole_keys) == len(set(whole_keys)) == len(quantized)
        assert {key.replace(".weight", ".base_layer.weight") for key in whole_keys} == quantized
    if kind == "float":
        checkpoint_bytes = sum(p.numel() * p.element_size() for name, p in want.items()
                               if not p.requires_grad)
        assert sum(report[kind]["slice_bytes"] for report in reports) == checkpoint_bytes
