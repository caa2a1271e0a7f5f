"""dsft.dist under real 2-rank DeepSpeed engines (ZeRO-2 and ZeRO-3, float and 4-bit bases):
every rank sees the same full values, writes land in the fp32 masters and the model's copy,
and ZeRO-3 loading leaves each rank with about half the model."""
import pytest
import torch

from dsft import dist
from tests.helpers import REPO, TINY_BASE, run_ranks

PROBE = REPO / "tests/ranks/dist_probe.py"


@pytest.fixture(scope="module")
def base_dir():
    return TINY_BASE


@pytest.mark.slow
@pytest.mark.parametrize("stage,quant_storage", [(2, "none"), (3, "none"), (3, "uint8"),
                                                (3, "bfloat16")])
def test_full_views_and_writes_agree_on_every_rank(stage, quant_storage, base_dir, tmp_path):
    first, second = run_ranks(PROBE, [str(stage), str(base_dir), quant_storage], tmp_path / "out")
    for key in ("fp32", "grad", "exp_avg", "step"):
        assert first[key] == second[key], key
    # the gradient each rank sees is the mean over both ranks' different batches
    assert torch.tensor(first["grad"]).abs().sum() > 0
    assert first["step"] == 1
    target = torch.arange(torch.tensor(first["fp32"]).numel(), dtype=torch.float32)
    for report in (first, second):
        assert torch.tensor(report["fp32_after_set"]).flatten().tolist() == target.tolist()
        assert torch.tensor(report["model_copy_after_set"]).flatten().tolist() == target.tolist()
        assert torch.tensor(report["exp_avg_after_set"]).flatten().tolist() == (2 * target).tolist()
        assert report["all_reduce_sum"] == 3.0 and report["broadcast"] == {"rank": 0}
    if stage == 3:
        assert first["partitioned"]
        for report in (first, second):  # no rank holds the whole model after loading
            assert report["local_numel"] < 0.55 * report["full_numel"]


PARTS_PROBE = REPO / "tests/ranks/dist_parts_probe.py"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_rank_local_edits_land_once_and_optimizer_state_resets(stage, tmp_path):
    reports = run_ranks(PARTS_PROBE, [str(stage)], tmp_path / "out")
    for report in reports:
        assert report["copy_rebuilt"] and report["edit_landed"] and report["overwrite_kept"]
        assert report["gathered_copy_follows"]
        assert report["moments_before_reset"] > 0
        assert report["moments_after_reset"] == 0.0 and report["step_after_reset"] == 0
    local = [report["local_numel"] for report in reports]
    if stage == 3:  # each rank holds and edits only its own partition
        assert reports[0]["partitioned"] and sum(local) == 192 * 192 and max(local) < 192 * 192
    else:
        assert local == [192 * 192] * 2


def test_outside_zero3_the_local_part_is_the_whole_tensor_and_a_plain_state_is_dropped():
    from dsft import dist

    param = torch.nn.Parameter(torch.zeros(3, 4))
    with dist.local_part(param) as (flat, start):
        assert start == 0 and flat.shape == (12,)
        flat += 1
    assert torch.equal(param.detach(), torch.ones(3, 4))
    copy = dist.local_copy(param)
    param.data.zero_()
    assert torch.equal(dist.full_from_parts(param, copy), torch.ones(12))  # a copy, not a view
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3, 4)
    optimizer.step()
    dist.reset_optimizer_state(param, optimizer)
    assert not optimizer.state[param]
    optimizer.step()  # rebuilt as at the first step
    assert int(optimizer.state[param]["step"]) == 1


def test_bf16_zero0_recipe_runs_with_masters_dist_can_write():
    """A bf16 recipe on ds_configs/zero0.json: dsft runs it as ZeRO-1 (one rank: nothing is
    sharded), because ZeRO-0's FP16_Optimizer keeps fp32 masters DeepSpeed's safe_* API cannot
    reach. A master written through dsft.dist must survive an optimizer step with a zero
    gradient and no weight decay (under FP16_Optimizer the old value came back)."""
    import deepspeed

    from dsft import dist
    from dsft.recipe import fill_deepspeed_config, load_recipe

    dist.init()
    recipe = load_recipe(REPO / "recipes/tiny_lora.yaml", ["model.dtype=bfloat16"])
    config = fill_deepspeed_config(recipe, world_size=1, steps=4, hidden_size=8)
    assert config["zero_optimization"]["stage"] == 1 and config["bf16"]["enabled"] is True
    config |= {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
               "train_batch_size": 1}
    model = torch.nn.Linear(8, 4, bias=False).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      optimizer=optimizer, config=config)
    weight = model.weight
    target = torch.full((4, 8), 0.25)
    dist.set_full_fp32_param(weight, target)
    engine.backward(engine(torch.zeros(1, 8, dtype=torch.bfloat16)).float().sum())
    engine.step()
    torch.testing.assert_close(dist.full_fp32_param(weight), target, rtol=0, atol=0)
    torch.testing.assert_close(weight.detach().float(), target, rtol=0, atol=0)


@pytest.mark.parametrize("counter", [torch.tensor(3.0, dtype=torch.float64),
                                     torch.tensor(3.0, device="meta"), 3])
def test_restarting_the_step_counter_keeps_its_type_dtype_and_device(counter):
    """Fused CUDA AdamW refuses a step counter that is not on the parameters' device (seen on an
    H200 when periodic_lora restarted Adam); bitsandbytes counts with an int."""
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param])
    optimizer.state[param].update(step=counter, exp_avg=torch.zeros(4), exp_avg_sq=torch.zeros(4))
    dist.set_optimizer_step_count(optimizer, 7)
    step = optimizer.state[param]["step"]
    if isinstance(counter, int):
        assert step == 7 and isinstance(step, int)
    else:
        assert (step.dtype, step.device) == (counter.dtype, counter.device)
        assert step.device.type == "meta" or float(step) == 7.0
