"""train.report_to (TensorBoard, wandb, MLflow), the cost figures of metrics.jsonl, early stopping.

Each tracker's record is read back through that library's own reader (wandb: the offline run's
transaction log decoded with wandb's protobuf schema, since wandb.Api is online only; MLflow:
MlflowClient on a file store; TensorBoard: its EventAccumulator) and compared with
metrics.jsonl, which the loop writes separately. Runs are offline: WANDB_MODE=offline, an MLflow
``file:`` store, both in tmp.
"""
import json
import math
import struct
from pathlib import Path

import pytest
import torch

from dsft.errors import ConfigError
from dsft.recipe import load_recipe
from tests.helpers import REPO, TINY_BASE, read_metrics, run_train

RECIPE = REPO / "recipes/tiny_lora.yaml"
LOGGED = ("loss", "lr", "grad_norm", "padding_fraction", "tokens_per_s", "peak_memory_gib",
          "eval_loss")


def _overrides(out: Path, **extra) -> list[str]:
    values = {"train.output_dir": str(out), "train.progress_bar": "false", "data.max_length": 256,
              "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 1,
              "train.max_steps": 3, "train.eval_every": 2, "train.save_every": "null",
              "optimizer.lr": 0.003, **extra}
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tracked") / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(out.parent / "wandb"))
        env.setenv("WANDB_SILENT", "true")
        env.setenv("MLFLOW_TRACKING_URI", (out.parent / "mlruns").as_uri())
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database otherwise
        run_train(RECIPE, _overrides(out, **{
            "train.report_to": "[tensorboard, wandb, mlflow]", "train.project": "dsft-test",
            "train.run_name": "tracked"}), launcher="cli")
    return out


def _expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as (step, value) series per key."""
    series = {}
    for record in read_metrics(run):
        for key in LOGGED:
            if record.get(key) is not None:
                series.setdefault(key, []).append((record["step"], record[key]))
    return series


def _wandb_records(path: Path):
    """The protobuf records of a wandb transaction log (LevelDB log framing: 32 KiB blocks of
    chunks, each with a 7-byte header crc32c(4) length(2) type(1), after wandb's 7-byte file
    header ':W&B', magic, version)."""
    from wandb.proto import wandb_internal_pb2

    block, content = 32768, path.read_bytes()
    assert content[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(content):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", content[position:position + 7])
        if kind == 0 and length == 0:
            position += left
            continue
        pending += content[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_logs_the_metrics_jsonl_values_at_their_steps(tracked_run):
    (log_file,) = (tracked_run.parent / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    logged, run = {}, None
    for record in _wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            for key in LOGGED:
                if key in items:
                    logged.setdefault(key, []).append((items["_step"], items[key]))
    assert run.project == "dsft-test" and run.display_name == "tracked"
    assert logged == _expected(tracked_run)


def test_mlflow_logs_the_metrics_jsonl_values_at_their_steps(tracked_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tracked_run.parent / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("dsft-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked"
    logged = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id,
                                                                               key),
                                                       key=lambda m: m.step)]
              for key in LOGGED if key in run.data.metrics}
    assert logged == _expected(tracked_run)
    assert "recipe.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_tensorboard_logs_the_metrics_jsonl_values_at_their_steps(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"))
    events.Reload()
    logged = {key: [(e.step, e.value) for e in events.Scalars(key)]
              for key in LOGGED if key in events.Tags()["scalars"]}
    expected = _expected(tracked_run)
    assert logged.keys() == expected.keys()
    for key, series in expected.items():  # TensorBoard stores float32
        assert [step for step, _ in logged[key]] == [step for step, _ in series]
        torch.testing.assert_close(torch.tensor([v for _, v in logged[key]]),
                                   torch.tensor([v for _, v in series], dtype=torch.float32))


def test_every_record_has_the_peak_memory_and_cpu_runs_report_no_mfu(tracked_run):
    records = read_metrics(tracked_run)
    assert [r["step"] for r in records] == [1, 2, 3]
    peaks = [r["peak_memory_gib"] for r in records]
    assert peaks[0] > 0.05 and peaks == sorted(peaks)  # a peak never falls
    assert all("mfu" not in r for r in records)


def test_cpu_peak_memory_is_the_process_peak_resident_set():
    from dsft.trackers import peak_memory_gib

    reported = peak_memory_gib(torch.device("cpu"))
    status = Path("/proc/self/status").read_text().splitlines()
    high_water_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    assert reported == pytest.approx(high_water_kib / 2 ** 20, rel=0.02)


def _tiny_lora_model():
    from transformers import AutoModelForCausalLM

    from dsft import adapters

    model = AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32)
    cfg = adapters.config_class("lora").model_validate(
        {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    adapters.inject(model, cfg)
    return model


@pytest.mark.parametrize("device_name, peak", [("NVIDIA H100 80GB HBM3", 989.4e12),
                                               ("NVIDIA H100 PCIe", 756e12),
                                               ("NVIDIA L40S", 362.05e12), ("NVIDIA L4", 121e12)])
def test_mfu_counts_6_flops_per_trained_4_per_frozen_weight_and_attention(device_name, peak,
                                                                         monkeypatch):
    from dsft.trackers import ModelFlops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    model = _tiny_lora_model()
    config = json.loads((TINY_BASE / "config.json").read_text())
    d, ff, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]
    r = 4
    trained = layers * (r * (d + d) + r * (d + kv))  # LoRA on q (d -> d) and v (d -> kv)
    frozen = layers * (2 * d * d + 2 * d * kv + 3 * d * ff) + config["vocab_size"] * d  # + head
    row_length, tokens_per_s, world = 80.0, 5000.0, 2
    flops = ModelFlops(model, "bfloat16", torch.device("cuda"))
    expected = (6 * trained + 4 * frozen + 12 * layers * d * row_length) * tokens_per_s \
        / (world * peak)
    assert flops.mfu(tokens_per_s, row_length, world) == pytest.approx(expected, rel=1e-12)


def test_mfu_is_not_reported_without_a_known_peak(monkeypatch):
    from dsft.trackers import ModelFlops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    model = _tiny_lora_model()
    assert ModelFlops(model, "bfloat16", torch.device("cpu")).mfu(1e4, 64, 1) is None
    assert ModelFlops(model, "float32", torch.device("cuda")).mfu(1e4, 64, 1) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert ModelFlops(model, "bfloat16", torch.device("cuda")).mfu(1e4, 64, 1) is None


@pytest.mark.parametrize("override, message", [
    ("train.tensorboard=true", "train.tensorboard was replaced by train.report_to: [tensorboard]"),
    ("train.early_stopping_patience=2", "train.early_stopping_patience counts evaluations: set "
                                        "train.eval_every too"),
    ("train.report_to=[comet]", "train.report_to"),
])
def test_tracker_and_early_stopping_mistakes_are_one_line(override, message, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError) as info:
        load_recipe(RECIPE, [override, "train.eval_every=null"])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_tracker_that_is_not_installed_is_named(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=r"train\.report_to: wandb is not installed "
                                          r"\(pip install wandb\)"):
        load_recipe(RECIPE, ["train.report_to=[tensorboard, wandb]"])


def test_early_stopping_counts_evaluations_that_miss_the_margin_and_keeps_the_lowest():
    from dsft.train import EarlyStopping

    stopping = EarlyStopping(patience=2, min_delta=0.1)
    seen = [(step, loss, stopping.update(step, loss), stopping.exhausted)
            for step, loss in [(1, 5.0), (2, 4.8), (3, 4.75), (4, 4.9), (5, 4.6)]]
    # 4.8 beats 5.0 by more than 0.1; 4.75 is the lowest but only 0.05 lower; 4.9 is worse
    assert [(improved, exhausted) for *_, improved, exhausted in seen] == [
        (True, False), (True, False), (True, False), (False, True), (True, False)]
    assert (stopping.best_step, stopping.best_loss) == (5, 4.6)


def test_early_stopping_stops_keeps_the_best_checkpoint_and_writes_its_adapter(tmp_path):
    """min_delta 100 makes every evaluation after the first miss the margin: with patience 2
    the run stops after its third evaluation, though max_steps is 10. At lr 0.05 the eval loss
    does not fall monotonically, so the best evaluation (the lowest eval loss in metrics.jsonl)
    is not the last step: its checkpoint must survive save_total_limit 1, and output_dir/adapter
    must hold that checkpoint's adapter values."""
    from safetensors.torch import load_file

    out = tmp_path / "stopped"
    run_train(RECIPE, _overrides(out, **{
        "train.max_steps": 10, "train.eval_every": 1, "train.save_every": 1,
        "train.save_total_limit": 1, "train.early_stopping_patience": 2,
        "train.early_stopping_min_delta": 100, "optimizer.lr": 0.05,
        "scheduler.name": "constant"}), launcher="cli")
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    best = min(records, key=lambda r: r["eval_loss"])["step"]
    assert best != 3, [r["eval_loss"] for r in records]
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == [f"step-{best:06d}", "step-000003"]
    portable = load_file(str(out / "checkpoints" / f"step-{best:06d}" / "portable.safetensors"))
    adapter = load_file(str(out / "adapter/adapter_model.safetensors"))
    for key, value in adapter.items():
        name = key.removeprefix("base_model.model.").removesuffix(".weight")
        assert torch.equal(value, portable[f"param/{name}"].float()), key
    last = load_file(str(out / "checkpoints/step-000003/portable.safetensors"))
    assert not all(torch.equal(last[k], portable[k]) for k in portable if k.startswith("param/"))
    assert math.isfinite(records[best - 1]["eval_loss"])
