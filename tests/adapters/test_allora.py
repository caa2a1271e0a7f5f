"""ALLoRA against plain PyTorch: the layer is LoRA with scale 1 and no dropout, and through a real
one-process DeepSpeed engine (ZeRO-0, 2 and 3) the hooks give each row of A and B the step
c = 1 / sqrt(||row||^2 + 1 / eta^2) times the optimizer's, checked against float64 SGD and
AdamW references written here. The 2-rank runs are in tests/test_methods_sharded.py."""
import json

import pytest
import torch
from torch import nn

from dsft import dist
from dsft.adapters import StepContext, inject
from dsft.adapters.allora import AlloraConfig, AlloraHooks, AlloraLinear
from dsft.errors import ConfigError
from dsft.recipe import load_recipe
from tests.helpers import REPO, TINY_BASE

ETA = 2.0
D_IN, D_HIDDEN, D_OUT, RANK = 12, 10, 6, 4
BETAS, EPS = (0.9, 0.999), 1e-8


# ---------------------------------------------------------------- the layer

def test_output_is_base_plus_BA_with_scale_one_and_no_dropout():
    torch.manual_seed(0)
    base = nn.Linear(32, 24, dtype=torch.float64)
    layer = AlloraLinear(base, AlloraConfig(r=4))
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.train()  # dropout would act now: there is none
    x = torch.randn(5, 7, 32, dtype=torch.float64)
    reference = x @ base.weight.T + base.bias + (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=1e-12)
    assert torch.equal(layer(x), layer(x))
    assert not any(isinstance(m, nn.Dropout) for m in layer.modules())


def test_fresh_adapter_computes_the_base_model_exactly():
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 4096, (2, 11), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(TINY_BASE).eval()
    adapted = AutoModelForCausalLM.from_pretrained(TINY_BASE).eval()
    inject(adapted, AlloraConfig(r=4, target_modules="all-linear"), seed=1)
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, base(ids).logits)


def test_alpha_and_dropout_keys_are_refused_by_name():
    recipe = REPO / "recipes/tiny_allora.yaml"
    for key in ("alpha=16", "dropout=0.05"):
        with pytest.raises(ConfigError, match=f"adapter.{key.split('=')[0]}"):
            load_recipe(recipe, [f"adapter.{key}"])
    with pytest.raises(ConfigError, match="adapter.eta"):
        load_recipe(recipe, ["adapter.eta=0"])


def test_peft_loads_the_exported_adapter_with_the_same_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dsft.checkpoint import save_adapter

    cfg = AlloraConfig(r=4, eta=ETA, target_modules=["q_proj", "v_proj", "down_proj"])
    model = AutoModelForCausalLM.from_pretrained(TINY_BASE).eval()
    inject(model, cfg, seed=2)
    with torch.no_grad():  # a trained-looking adapter: B = 0 would hide any scale error
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.05)
    save_adapter(model, cfg, tmp_path / "adapter", base_model=str(TINY_BASE))
    peft_config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert (peft_config["r"], peft_config["lora_alpha"], peft_config["lora_dropout"]) == (4, 4, 0.0)

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_BASE),
                                           tmp_path / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(TINY_BASE).eval()
    ids = torch.randint(3, 4096, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, peft_logits, base_logits = model(ids).logits, peft_model(ids).logits, base(ids).logits
    torch.testing.assert_close(peft_logits, ours, atol=1e-5, rtol=1e-5)
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter changes the output


# ---------------------------------------------------------------- the hooks, through DeepSpeed

class TwoLayers(nn.Module):
    def __init__(self, cfg: AlloraConfig):
        super().__init__()
        self.first = AlloraLinear(nn.Linear(D_IN, D_HIDDEN), cfg)
        self.second = AlloraLinear(nn.Linear(D_HIDDEN, D_OUT), cfg)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def _row_of_norm(n: int, norm: float, seed: int) -> torch.Tensor:
    row = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return row * (norm / row.norm())


def _model(cfg: AlloraConfig) -> TwoLayers:
    """Row 0 of every A and B is zero, row 1 has norm 10 / eta, the rest as initialised (A) or
    small random (B, so A receives a gradient at the first step)."""
    torch.manual_seed(0)
    model = TwoLayers(cfg)
    with torch.no_grad():
        adapter = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        for i, (name, param) in enumerate(adapter):
            if name.endswith("lora_B"):
                param.normal_(std=0.3)
            param[0] = 0.0
            param[1] = _row_of_norm(param.shape[1], 10 / ETA, seed=i)
    return model


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, D_IN, generator=generator), torch.randn(8, D_OUT, generator=generator)


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).pow(2).mean()


@pytest.fixture(scope="module")
def process_group():
    dist.init()  # a one-process gloo group, as a plain `python` run gets


def _train(cfg: AlloraConfig, optimizer: str, stage: int, steps: int, lr: float,
           weight_decay: float = 0.0) -> dict[str, torch.Tensor]:
    """The loop's order (dsft/train.py): backward, after_backward, step, after_step. Returns the
    adapter's full fp32 values."""
    import deepspeed

    model = _model(cfg)
    hooks = AlloraHooks(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        torch_optimizer = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=weight_decay)
    else:
        torch_optimizer = torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS,
                                            weight_decay=weight_decay)
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
              "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                      optimizer=torch_optimizer, config=config)
    ctx = StepContext(engine, 0, steps, stage, dist)
    for step in range(steps):
        x, target = _batch(step)
        engine.backward(_loss(engine(x), target))
        hooks.after_backward(ctx)
        engine.step()
        ctx.step = step + 1
        hooks.after_step(ctx)
    return {name: dist.full_fp32_param(p) for name, p in model.named_parameters() if p.requires_grad}


def _reference(cfg: AlloraConfig, rule: str, steps: int, lr: float,
               weight_decay: float = 0.0) -> dict[str, torch.Tensor]:
    """The same training in float64, the update written out:
    sgd:          theta <- theta - lr c g
    adamw_row_lr: AdamW with learning rate lr c for the row (its decay lr c wd theta too)
    adamw_grad:   AdamW with learning rate lr on the gradient c g
    adamw:        plain AdamW (c = 1)
    with c = 1 / sqrt(||theta||^2 + 1 / eta^2) of the row before the step."""
    model = _model(cfg).double()
    base = {name: layer.base_layer for name, layer in (("first", model.first), ("second", model.second))}
    theta = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    moments = {name: (torch.zeros_like(v), torch.zeros_like(v)) for name, v in theta.items()}

    def forward(values, x):
        def linear(name, h):
            layer = base[name]
            return (h @ layer.weight.T + layer.bias
                    + (h @ values[f"{name}.lora_A"].T) @ values[f"{name}.lora_B"].T)
        return linear("second", torch.tanh(linear("first", x)))

    for step in range(1, steps + 1):
        x, target = (t.double() for t in _batch(step - 1))
        leaves = {name: v.clone().requires_grad_() for name, v in theta.items()}
        grads = dict(zip(leaves, torch.autograd.grad(_loss(forward(leaves, x), target),
                                                     list(leaves.values()))))
        for name, value in theta.items():
            c = 1.0 / torch.sqrt((value ** 2).sum(dim=1, keepdim=True) + 1.0 / cfg.eta ** 2)
            if rule == "adamw":
                c = torch.ones_like(c)
            g = grads[name]
            if rule == "sgd":
                theta[name] = value - lr * c * g
                continue
            row_lr = lr * c if rule == "adamw_row_lr" else torch.full_like(c, lr)
            if rule == "adamw_grad":
                g = c * g
            m, v = moments[name]
            m = BETAS[0] * m + (1 - BETAS[0]) * g
            v = BETAS[1] * v + (1 - BETAS[1]) * g * g
            moments[name] = (m, v)
            m_hat, v_hat = m / (1 - BETAS[0] ** step), v / (1 - BETAS[1] ** step)
            theta[name] = value * (1 - row_lr * weight_decay) - row_lr * m_hat / (v_hat.sqrt() + EPS)
    return theta


def _initial(cfg: AlloraConfig) -> dict[str, torch.Tensor]:
    return {name: p.detach().double() for name, p in _model(cfg).named_parameters() if p.requires_grad}


@pytest.mark.parametrize("apply_to", ["update", "grad"])
def test_sgd_zero_row_steps_by_lr_eta_g_and_a_large_row_by_about_lr_g_over_its_norm(
        process_group, apply_to):
    cfg, lr = AlloraConfig(r=RANK, eta=ETA, apply_to=apply_to), 0.1
    before, after = _initial(cfg), _train(cfg, "sgd", stage=0, steps=1, lr=lr)
    model = _model(cfg).double()  # the gradient by plain autograd in float64
    x, target = (t.double() for t in _batch(0))
    _loss(model(x), target).backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        step = after[name].double() - before[name]
        g = param.grad
        # a zero row: c = eta exactly
        torch.testing.assert_close(step[0], -lr * ETA * g[0], rtol=1e-5, atol=1e-7)
        # ||theta|| = 10 / eta: c = eta / sqrt(101), within 0.5 % of 1 / ||theta||
        norm = before[name][1].norm()
        torch.testing.assert_close(step[1], -lr * g[1] / norm, rtol=6e-3, atol=1e-7)
        torch.testing.assert_close(step[1], -lr * g[1] / torch.sqrt(norm ** 2 + ETA ** -2),
                                   rtol=1e-4, atol=1e-6)
        assert g[0].abs().max() > 1e-3 and g[1].abs().max() > 1e-3, name  # rows that do move


def test_update_and_grad_modes_agree_under_sgd(process_group):
    results = {mode: _train(AlloraConfig(r=RANK, eta=ETA, apply_to=mode), "sgd", stage=0, steps=3,
                            lr=0.1) for mode in ("update", "grad")}
    reference = _reference(AlloraConfig(r=RANK, eta=ETA), "sgd", steps=3, lr=0.1)
    for name, value in reference.items():
        torch.testing.assert_close(results["update"][name], results["grad"][name],
                                   rtol=0, atol=2e-6)
        torch.testing.assert_close(results["update"][name].double(), value, rtol=0, atol=5e-6)


ADAM_STEPS, ADAM_LR, ADAM_DECAY = 4, 0.02, 0.1
# float32 engine vs float64 reference. Adam moves each entry by ~lr c per step, >= 4e-3 here
# (c >= eta / sqrt(101)), so a wrong c or a wrong mode is off by far more.
ADAM_ATOL = 2e-6


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_update_mode_is_adamw_with_per_row_learning_rate_lr_c(process_group, stage):
    cfg = AlloraConfig(r=RANK, eta=ETA, apply_to="update")
    got = _train(cfg, "adamw", stage, ADAM_STEPS, ADAM_LR, ADAM_DECAY)
    want = _reference(cfg, "adamw_row_lr", ADAM_STEPS, ADAM_LR, ADAM_DECAY)
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=0, atol=ADAM_ATOL)


@pytest.mark.parametrize("stage", [0, 3])
def test_grad_mode_is_adamw_on_the_scaled_gradient(process_group, stage):
    cfg = AlloraConfig(r=RANK, eta=ETA, apply_to="grad")
    got = _train(cfg, "adamw", stage, ADAM_STEPS, ADAM_LR, ADAM_DECAY)
    want = _reference(cfg, "adamw_grad", ADAM_STEPS, ADAM_LR, ADAM_DECAY)
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=0, atol=ADAM_ATOL)


def test_under_adamw_grad_scaling_is_largely_cancelled_and_update_scaling_is_not(process_group):
    """Why ``update`` is the default: dsft's layers and hooks, stepped by torch's AdamW through a
    DeepSpeed engine, against plain AdamW (c = 1) written out in float64. Adam divides a per-row
    gradient scale back out, so grad mode stays close to plain AdamW's trajectory, while update
    mode really changes each row's step (on the first step exactly: a zero row moves eta times
    as far as under plain AdamW)."""
    plain_first = _reference(AlloraConfig(r=RANK, eta=ETA), "adamw", 1, ADAM_LR, ADAM_DECAY)
    plain = _reference(AlloraConfig(r=RANK, eta=ETA), "adamw", ADAM_STEPS, ADAM_LR, ADAM_DECAY)
    before = _initial(AlloraConfig(r=RANK, eta=ETA))
    for mode in ("grad", "update"):
        cfg = AlloraConfig(r=RANK, eta=ETA, apply_to=mode)
        first = _train(cfg, "adamw", 0, 1, ADAM_LR, ADAM_DECAY)
        for name in plain_first:
            step, plain_step = first[name].double() - before[name], plain_first[name] - before[name]
            torch.testing.assert_close(step[0], plain_step[0] * (ETA if mode == "update" else 1),
                                       rtol=1e-5, atol=ADAM_ATOL)
        got = _train(cfg, "adamw", 0, ADAM_STEPS, ADAM_LR, ADAM_DECAY)
        for name in plain:
            travel = (plain[name] - before[name]).norm()
            off_plain = (got[name].double() - plain[name]).norm() / travel
            # measured, as a fraction of plain AdamW's own travel: grad 0.003 to 0.008, update
            # 0.53 to 0.63
            assert off_plain < 0.05 if mode == "grad" else off_plain > 0.3, (mode, name, off_plain)
