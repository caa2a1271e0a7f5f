"""dsft generate (prompt format, device, sampling), dsft merge (dtype), Hub ids from the local
cache, and the demo's output.

Adapters for generate and merge are written directly (random LoRA factors on the shipped base,
saved by dsft.checkpoint.save_adapter), so these tests train nothing; one 2-step run from a
cached Hub id on chat data plays the demo's two commands.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsft.cli import main
from tests.helpers import BIN, REPO, TINY_BASE, free_port, launch_env

INSTRUCTION, INPUT = "Reverse the words.", "The king rode."
# the shipped base's chat template (its chat_template.jinja), written out for this prompt
SHIPPED_CHAT_PROMPT = f"<|bos|><|user|>\n{INSTRUCTION}\n\n{INPUT}\n<|assistant|>\n"


def _write_adapter(out: Path, base: Path, prompt: dict | None, seed: int = 0) -> dict:
    """A LoRA adapter (r 4, alpha 8, q_proj and v_proj) with random A and B on ``base``;
    returns its float32 factors by module name."""
    from transformers import AutoModelForCausalLM

    from dsft import adapters, checkpoint

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = adapters.config_class("lora").model_validate(
        {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
         "target_modules": ["q_proj", "v_proj"]})
    adapters.inject(model, cfg, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, layer in adapters.adapter_layers(model).items():
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)
        factors[name] = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
    checkpoint.save_adapter(model, cfg, out, base_model=str(base), prompt=prompt)
    return factors


def _generate(capsys, adapter: Path, *extra: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of dsft generate on the fixed instruction and input."""
    capsys.readouterr()  # only this command's output
    code = main(["generate", str(adapter), "--instruction", INSTRUCTION, "--input", INPUT,
                 "--max-new-tokens", "3", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_renders_the_chat_template_the_adapter_was_trained_with(tmp_path, capsys):
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    _write_adapter(tmp_path / "adapter", TINY_BASE, {"format": "chat", "chat_template": template})
    code, printed, _ = _generate(capsys, tmp_path / "adapter", "--system", "Be terse.")
    assert code == 0
    assert (f"prompt:\n<|bos|>[system] Be terse.\n[user] {INSTRUCTION}\n\n{INPUT}\n[assistant] \n"
            "--- base model:") in printed
    assert "--- base + adapter:" in printed


def test_generate_falls_back_to_the_tokenizers_template_and_can_be_told_the_format(tmp_path,
                                                                                  capsys):
    _write_adapter(tmp_path / "adapter", TINY_BASE, {"format": "chat"})
    assert f"prompt:\n{SHIPPED_CHAT_PROMPT}\n--- base" in _generate(capsys,
                                                                   tmp_path / "adapter")[1]
    code, printed, _ = _generate(capsys, tmp_path / "adapter", "--prompt-format", "alpaca")
    assert code == 0 and f"### Instruction:\n{INSTRUCTION}\n\n### Input:\n{INPUT}\n" in printed


def test_generate_uses_alpaca_for_adapters_without_a_recorded_chat_format(tmp_path, capsys):
    _write_adapter(tmp_path / "adapter", TINY_BASE, None)  # adapters written before the record
    code, printed, _ = _generate(capsys, tmp_path / "adapter")
    assert code == 0 and "### Input:\nThe king rode.\n\n### Response:\n" in printed


def test_sampling_is_seeded_and_its_options_need_do_sample(tmp_path, capsys):
    _write_adapter(tmp_path / "adapter", TINY_BASE, None)
    sample = ["--do-sample", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3",
              "--max-new-tokens", "8", "--device", "auto"]
    first, second = (_generate(capsys, tmp_path / "adapter", *sample) for _ in range(2))
    assert first[0] == 0 and first[1] == second[1]  # the same completions, seeded
    code, _, error = _generate(capsys, tmp_path / "adapter", "--temperature", "0.8")
    assert code == 2 and error.strip() == ("dsft: error: --temperature/--top-p: they shape "
                                           "sampling; add --do-sample")
    code, _, error = _generate(capsys, tmp_path / "adapter", "--do-sample", "--top-p", "1.5")
    assert code == 2 and "--top-p: expected a number in (0, 1]" in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_generate_on_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    _write_adapter(tmp_path / "adapter", TINY_BASE, None)
    code, _, error = _generate(capsys, tmp_path / "adapter", "--device", "cuda")
    assert code == 2
    assert error.strip() == "dsft: error: --device: cuda, but torch sees no CUDA device"


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("bf16") / "base"
    AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(TINY_BASE).save_pretrained(out)
    return out


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            tensors |= {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors


@pytest.mark.parametrize("requested", [None, "float32"])
def test_merge_writes_the_bases_dtype_unless_asked_and_adds_the_scaled_delta(requested, bf16_base,
                                                                            tmp_path, capsys):
    factors = _write_adapter(tmp_path / "adapter", bf16_base, None)
    merged_dir = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "adapter"), str(merged_dir)]
                + (["--dtype", requested] if requested else [])) == 0
    want = torch.float32 if requested else torch.bfloat16
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == str(want)[6:]
    base, merged = _tensors(bf16_base), _tensors(merged_dir)
    assert merged.keys() == base.keys()
    assert all(tensor.dtype == want for tensor in merged.values())
    for key, weight in base.items():
        module = key.removesuffix(".weight")
        if module not in factors:
            assert torch.equal(merged[key], weight.to(want)), key
            continue
        lora_a, lora_b = factors[module]
        exact = weight.double() + (8 / 4) * (lora_b.double() @ lora_a.double())
        # float32 keeps the sum to float32 rounding; bfloat16 is one rounding of it (1 ulp)
        rtol = 1e-6 if want == torch.float32 else 2 ** -7
        torch.testing.assert_close(merged[key].double(), exact.to(want).double(), rtol=rtol,
                                   atol=1e-7, msg=lambda m: f"{key}: {m}")
        assert not torch.equal(merged[key], weight.to(want)), key  # the delta is visible


# ---------------------------------------------------------------- Hub ids and the demo

HUB_ID = "dsft-test/tiny-llama"


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory) -> Path:
    """HF_HOME whose Hub cache holds the shipped base as HUB_ID (the cache layout:
    hub/models--org--name/snapshots/<commit>/ and refs/main naming the commit)."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(TINY_BASE, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return home


def _env(hub_home: Path, **extra) -> dict:
    return {**launch_env(), "HF_HOME": str(hub_home), "HF_HUB_OFFLINE": "1", **extra}


def _dsft(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsft.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_validate_and_plan_accept_a_cached_hub_id(hub_home):
    recipe = ["recipes/tiny_lora.yaml", f"model.name_or_path={HUB_ID}"]
    validated = _dsft(_env(hub_home), "validate", *recipe)
    assert validated.returncode == 0 and f"lora on {HUB_ID}" in validated.stdout
    planned = _dsft(_env(hub_home), "plan", *recipe, "--json")
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["base_params"] == 2_557_632  # the shipped base's


def test_an_uncached_hub_id_is_one_line_naming_the_field(hub_home):
    result = _dsft(_env(hub_home), "validate", "recipes/tiny_lora.yaml",
                   "model.name_or_path=dsft-test/not-downloaded")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("dsft: error: model.name_or_path: not found: 'dsft-test/not-downloaded'")
    assert "not in the local cache" in line and str(hub_home / "hub") in line


@pytest.fixture(scope="module")
def demo_run(hub_home, tmp_path_factory) -> dict:
    """The demo's two commands, shortened: `deepspeed launch` for 2 steps (here on the chat set,
    from the cached Hub id) and `dsft generate`, with matplotlib's cache dir fresh (as on a new
    machine, where it builds its font cache)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    env = _env(hub_home, MPLCONFIGDIR=str(out.parent / "matplotlib"))
    train = subprocess.run(
        [str(BIN / "deepspeed"), "--master_port", str(free_port()), "launch",
         "recipes/tiny_lora.yaml", f"model.name_or_path={HUB_ID}", f"train.output_dir={out}",
         "data.train=pkg:assets/data/chat.jsonl", "data.format=chat", "train.max_steps=2",
         "train.eval_every=null", "train.save_every=null", "train.micro_batch_size=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert train.returncode == 0, train.stdout[-4000:] + train.stderr[-4000:]
    generate = _dsft(env, "generate", str(out / "adapter"), "--instruction", INSTRUCTION,
                     "--input", INPUT, "--max-new-tokens", "4")
    assert generate.returncode == 0, generate.stderr[-4000:]
    return {"out": out, "output": train.stdout + train.stderr + generate.stdout + generate.stderr,
            "generated": generate.stdout}


def test_the_demo_prints_no_kernel_or_font_cache_noise(demo_run):
    output = demo_run["output"]
    assert "kernels-community" not in output and "gemm_4bit_forward" not in output
    assert "fontManager" not in output and "font cache" not in output.lower()
    assert (demo_run["out"] / "loss.png").is_file()  # matplotlib did run


def test_a_chat_trained_adapter_records_the_hub_id_and_generates_from_the_chat_template(
        demo_run):
    adapter = demo_run["out"] / "adapter"
    meta = json.loads((adapter / "dsft_adapter.json").read_text())
    assert meta["base_model_name_or_path"] == HUB_ID
    assert meta["prompt"] == {"format": "chat",
                              "chat_template": (TINY_BASE / "chat_template.jinja").read_text()}
    assert json.loads((adapter / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == HUB_ID
    assert f"prompt:\n{SHIPPED_CHAT_PROMPT}\n--- base model:" in demo_run["generated"]
