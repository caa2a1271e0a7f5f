"""dsft.dist under real 2-rank DeepSpeed engines (ZeRO-2 and ZeRO-3, float and 4-bit bases):
every rank sees the same full values, writes land in the fp32 masters and the model's copy,
and ZeRO-3 loading leaves each rank with about half the model."""
import pytest
import torch

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
