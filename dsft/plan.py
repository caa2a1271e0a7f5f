"""``dsft plan``: exact parameter counts and a per-GPU memory estimate for a recipe, no weights.

The recipe's model is built on torch's meta device (shapes and dtypes only: no weights, no
memory) and the method's adapters are injected with ``dsft.adapters.inject``, so parameter
counts are exact. Memory is then estimated per GPU, in bytes. Notation: N = data-parallel world
size (GPUs per node x nodes), n = entries of one parameter tensor, p = bytes per value of the
compute dtype (bf16/fp16: 2, fp32: 4), t = tokens per micro batch (micro_batch_size x
data.max_length, the padded or packed length).

Model states (trainable: what the adapters add, plus anything left with requires_grad):
  weights     frozen base in model.dtype; a 4-bit base (every linear but lm_head, as dsft.quant
              and transformers quantize) stores n/2 bytes plus its constants: an fp32 absmax per
              64-value block, or with double quantization one byte per block, one fp32 per 256
              blocks, an fp32 offset and the two code tables (QLoRA's 0.127 bits per weight
              instead of 0.5). Trainable tensors in 16 bits under bf16/fp16 mixed precision (else
              their dtype). Adapter buffers (masks, statistics) at their size. ZeRO-3 divides
              parameters by N (``offload_param``: they live in CPU memory instead); buffers never.
  gradients   trainable only, in the weights' dtype: whole at ZeRO-0/1, /N at ZeRO-2 (none on
              the GPU with ``offload_optimizer``: reduced straight into the CPU fp32 partition),
              at ZeRO-3 reduce-scattered layer by layer into the fp32 partition (only the
              gathered layer's, below); the largest single one for an optimizer that folds
              gradients into its state as they arrive (``OptimizerMemory.keeps_gradients``).
  optimizer   the optimizer's own state, ``OPTIMIZERS[name].state_bytes(shape, cfg)`` per
              trainable tensor, plus, under DeepSpeed's ZeRO optimizer (stage >= 1) or ZeRO-0 mixed
              precision, fp32 master weights and fp32 gradients (8 bytes per trainable value);
              /N at stage >= 1; in CPU memory with ``offload_optimizer``.
  gathered    ZeRO-3 only: the largest module's own parameters gathered whole, with 16-bit
              gradients for its trainable ones (DeepSpeed's "4 x largest layer").
For full fine-tuning with AdamW these are DeepSpeed's own estimators' terms (ZeRO-2:
2 P + 18 P / N; ZeRO-3: 4 L + 18 P / N, and their offload variants), which tests/test_plan.py
checks against ``estimate_zero2/3_model_states_mem_needs``.

Under ``engine: fsdp2`` (dsft/fsdp2.py; ``fully_shard`` per decoder layer, then the root) every
parameter is sharded /N, trainable ones in fp32 (the sharded parameter is the optimizer's
master: no separate copy); gradients are fp32 shards of the trainable ones (/N); the optimizer
state is /N; with ``fsdp2.cpu_offload`` all three live in CPU memory. Gathered: each FSDP unit
all-gathers its parameters in the all-gather dtype (``fsdp2.param_dtype``, default the compute
dtype; a 4-bit weight's packed bytes as stored, its storage being that dtype; in fp32 nothing is
cast), with unsharded gradients of its trainable ones in that dtype before the reduce-scatter.
The root's unit (embeddings, final norm, a tied output layer) stays gathered from forward to
backward, plus the largest other unit (a decoder layer, or an untied output layer) twice (the one
computing and the one prefetched), or every unit with ``fsdp2.reshard_after_forward: false``.

Activations, per token of a LLaMA decoder layer (hidden h, intermediate f, a heads, KV width
kv = KV heads x head size), counting what autograd keeps for the backward pass with a
memory-efficient attention kernel (flash-attn or SDPA's flash/efficient kernels: no a x t x t
score matrix, a logsumexp per head instead):
    2 (4 h + 4)                 the two RMSNorms: fp32 copy of the input and 1 / rms
  + 2 p h                       their normalized input, when the norm weight trains
  + p (2 h + 2 kv) + 4 a        attention: rotated q, k, v, output, logsumexp
  + 3 p f                       MLP: gate output, SiLU output, up output
  + p h                         each norm's output, when a linear it feeds saves its input
  + p f                         gate x up, when down_proj saves its input
  + sum over adapted linears    p r (the rank-r intermediate) and, with dropout > 0, the dropped
                                input and its mask ((p + 1) d_in; 1-byte CUDA mask)
(a linear saves its input only when its weight trains or an adapter reads it undropped; r is
the adapter's parameters / (d_in + d_out), lora_sp's own r: its frozen entries are buffers).
Without gradient checkpointing the model keeps t x
the sum over layers; with it, t x (L p h + the largest layer's sum) (each layer's input, plus one
layer recomputed during its backward). Outside the layers: the final norm, 4 h + 4 (+ p h
trainable), and the loss's peak by ``train.loss`` (dsft.loss):
  plain     t (2 p + 8) V: logits, their shifted copy, the fp32 copy and log-softmax that
            cross-entropy keeps;
  chunked   t p h for the labelled rows the chunks read, plus one chunk's c (2 p + 8) V
            (c = min(train.loss_chunk_tokens, t)): its logits, fp32 copy and log-softmax, and
            in backward their gradient in place of the shifted copy;
  liger     t p h for the input gradient Liger computes in the forward, plus one chunk of
            p V logits, c = 2^ceil(log2(ceil(t / ceil(V / h)))) rows, as Liger chunks them.
tests/test_plan.py compares the layer sum with the tensors autograd actually saves.

On top: a fixed ``CUDA_ALLOWANCE`` for the CUDA context, NCCL and DeepSpeed buffers and
allocator fragmentation. Estimates, not measurements: a run can still need more (padding to
other lengths, stage-3 prefetching, method state created at the first step).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dsft.errors import ConfigError
from dsft.optim.flora import flora_state_bytes
from dsft.recipe import OptimizerConfig, Recipe, fill_deepspeed_config

GIB = 2 ** 30
CUDA_ALLOWANCE = int(1.5 * GIB)
DROPOUT_MASK_BYTES = 1  # CUDA's native_dropout keeps a bool mask (CPU keeps one in the input dtype)
NF4_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes' 4-bit block and double-quant block sizes
_BNB_MIN_8BIT_SIZE, _BNB_8BIT_BLOCK = 4096, 256  # bitsandbytes 8-bit optimizer defaults


def _adam_32bit(shape: tuple[int, ...], cfg: OptimizerConfig) -> int:
    return 8 * math.prod(shape)  # first and second moment in fp32


def _adam_8bit(shape: tuple[int, ...], cfg: OptimizerConfig) -> int:
    n = math.prod(shape)
    if n < _BNB_MIN_8BIT_SIZE:  # bitsandbytes keeps small tensors' moments in 32 bits
        return 8 * n
    return 2 * n + 2 * 4 * math.ceil(n / _BNB_8BIT_BLOCK)  # uint8 moments + fp32 block absmax


@dataclass(frozen=True)
class OptimizerMemory:
    """What an optimizer keeps for each trainable tensor: ``state_bytes(shape, cfg)`` (cfg: the
    recipe's optimizer section), and whether whole gradients wait for the step
    (``keeps_gradients``); False: the optimizer folds each gradient into its state as it arrives
    (the state then includes that accumulator), so one tensor's gradient exists at a time."""

    state_bytes: Callable[[tuple[int, ...], OptimizerConfig], int]
    keeps_gradients: bool = True


# By optimizer.name. Paged optimizers may spill to CPU under memory pressure; they are counted
# on the GPU.
OPTIMIZERS: dict[str, OptimizerMemory] = {
    "adamw": OptimizerMemory(_adam_32bit),
    "adamw_8bit": OptimizerMemory(_adam_8bit),
    "paged_adamw_8bit": OptimizerMemory(_adam_8bit),
    "paged_adamw_32bit": OptimizerMemory(_adam_32bit),
    "sgd": OptimizerMemory(lambda shape, cfg: 0),  # dsft builds torch SGD without momentum
    "flora": OptimizerMemory(lambda shape, cfg: flora_state_bytes(shape, cfg.flora),
                             keeps_gradients=False),
}
# DeepSpeed config optimizer blocks (DeepSpeed builds the optimizer, e.g. DeepSpeedCPUAdam)
_DEEPSPEED_OPTIMIZERS = {"adam": "adamw", "adamw": "adamw"}


def four_bit_bytes(n: int, double_quant: bool) -> int:
    """Bytes of one n-value weight stored by bitsandbytes in 4 bits (NF4 or FP4)."""
    blocks = math.ceil(n / NF4_BLOCK)
    code = 16 * 4  # the 16-level fp32 code table
    if not double_quant:
        return math.ceil(n / 2) + 4 * blocks + code
    # absmax quantized to 8 bits, one fp32 scale per 256 blocks, fp32 offset, 256-entry fp32 code
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + 256 * 4 + code


@dataclass(frozen=True)
class ModelTensor:
    """One parameter or adapter buffer of the meta model, as the estimate needs it."""

    name: str
    module: str  # owning module (ZeRO-3 gathers a module's own parameters together)
    shape: tuple[int, ...]
    trainable: bool
    stored_bytes: int  # as kept on the GPU outside training arithmetic (4-bit: packed + constants)
    is_buffer: bool = False
    is_adapter: bool = False  # added by the method (not a base-model parameter)
    quantized: bool = False  # a 4-bit weight

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Setup:
    """How the recipe trains: ZeRO stage, world, precision, offload, optimizer."""

    zero_stage: int
    gpus_per_node: int
    nodes: int
    precision: str  # "bf16" / "fp16": DeepSpeed mixed precision (filled config); else "fp32"
    optimizer: str  # a key of OPTIMIZERS
    offload_optimizer: str | None = None  # "cpu" / "nvme" / None
    offload_param: str | None = None
    engine: str = "deepspeed"  # or "fsdp2" (zero_stage then 0)
    gather_bytes: int | None = None  # fsdp2: bytes per value of the all-gather dtype (None: fp32,
    reshard_after_forward: bool = True  # no cast); fsdp2.reshard_after_forward

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def shards_parameters(self) -> bool:
        return self.zero_stage == 3 or self.engine == "fsdp2"

    @property
    def mixed_precision(self) -> bool:
        return self.precision in ("bf16", "fp16")


def meta_model(recipe: Recipe) -> nn.Module:
    """The recipe's model with its adapters, on the meta device (no weights, no memory); a
    vision-language model with its vision tower and projector (dsft/vlm.py)."""
    from dsft import adapters, vlm
    from dsft.model import load_config
    from dsft.quant import TORCH_DTYPES

    cfg = recipe.model
    config = load_config(cfg)
    # adapters take the dtype of the layer they wrap: a 4-bit layer's compute dtype
    dtype = TORCH_DTYPES[recipe.compute_dtype if cfg.load_in_4bit else cfg.dtype]
    with torch.device("meta"):
        model = vlm.from_config(config, dtype, cfg.trust_remote_code)
        adapters.inject(model, recipe.adapter, seed=recipe.train.seed)
        vlm.set_trainable_parts(model, cfg)
    return model


def tensors(model: nn.Module, recipe: Recipe) -> list[ModelTensor]:
    """Every parameter (tied ones once) and adapter buffer with its stored size under the
    recipe's precision."""
    from dsft.adapters import AdapterLinear
    from dsft.adapters.blsp_kd import SPEECH_MODULE
    from dsft.quant import TORCH_DTYPES
    from dsft.vlm import in_language_model

    cfg = recipe.model
    base_itemsize = TORCH_DTYPES[cfg.dtype].itemsize
    # a VLM's vision tower and projector stay unquantized (dsft/vlm.py), and so does blsp_kd's
    # speech encoder, attached after quantization; it counts with the method's adapters
    speech = getattr(model, SPEECH_MODULE, None)
    quantized = {name for name, module in model.named_modules()
                 if cfg.load_in_4bit and isinstance(module, nn.Linear)
                 and name.split(".")[-1] != "lm_head" and in_language_model(name)
                 and not name.startswith(f"{SPEECH_MODULE}.")}
    adapter_params = {id(p) for m in model.modules() if isinstance(m, AdapterLinear)
                      for p in m.adapter_parameters()} | \
        {id(p) for p in (speech.parameters() if speech is not None else ())}
    found, seen = [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied (embeddings and output head): one tensor
                continue
            seen.add(id(param))
            n = param.numel()
            if param.requires_grad:
                stored = n * param.element_size()
            elif module_name in quantized and name == "weight":
                stored = four_bit_bytes(n, cfg.double_quant)
            elif module_name in quantized:  # a quantized layer's bias is kept in compute dtype
                stored = n * param.element_size()
            else:
                stored = n * base_itemsize
            found.append(ModelTensor(f"{module_name}.{name}", module_name, tuple(param.shape),
                                     param.requires_grad, stored,
                                     is_adapter=id(param) in adapter_params,
                                     quantized=module_name in quantized and name == "weight"))
        if isinstance(module, AdapterLinear):
            for name, buffer in module.adapter_buffers().items():
                found.append(ModelTensor(f"{module_name}.{name}", module_name,
                                         tuple(buffer.shape), False,
                                         buffer.numel() * buffer.element_size(), is_buffer=True))
    return found


def model_states(params: list[ModelTensor], setup: Setup,
                 optimizer_config: OptimizerConfig | None = None) -> dict[str, dict[str, float]]:
    """Per-GPU bytes of weights, gradients, optimizer state and ZeRO-3's gathered layer, and
    what is offloaded per node (module docstring). ``optimizer_config``: the recipe's optimizer
    section, for options that size the state (default: OptimizerConfig())."""
    optimizer_config = optimizer_config or OptimizerConfig()
    stage, world = setup.zero_stage, setup.world_size
    if setup.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name: dsft plan has no state size for {setup.optimizer!r} "
                          f"(known: {', '.join(OPTIMIZERS)})")
    optimizer = OPTIMIZERS[setup.optimizer]
    weight_share = 1 / world if stage == 3 else 1.0
    optimizer_share = 1 / world if stage >= 1 else 1.0
    grad_share = {0: 1.0, 1: 1.0, 2: 0.0 if setup.offload_optimizer else 1 / world, 3: 0.0}[stage]
    masters = stage >= 1 or setup.mixed_precision  # fp32 master weights + fp32 gradients

    gpu = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0, "gathered": 0.0}
    offloaded = {"weights": 0.0, "optimizer": 0.0}
    gathered_per_module: dict[str, float] = {}
    for tensor in params:
        if tensor.is_buffer:
            gpu["weights"] += tensor.stored_bytes
            continue
        weight = (2 * tensor.numel if tensor.trainable and setup.mixed_precision
                  else tensor.stored_bytes)
        grad = weight if tensor.trainable else 0
        (offloaded if setup.offload_param and stage == 3 else gpu)["weights"] += \
            weight * weight_share
        if optimizer.keeps_gradients:
            gpu["gradients"] += grad * grad_share
        else:  # folded into the state as it arrives: one tensor's gradient at a time
            gpu["gradients"] = max(gpu["gradients"], grad)
        if tensor.trainable:
            states = (optimizer.state_bytes(tensor.shape, optimizer_config)
                      + (8 * tensor.numel if masters else 0))
            (offloaded if setup.offload_optimizer else gpu)["optimizer"] += \
                states * optimizer_share
        gathered_per_module[tensor.module] = \
            gathered_per_module.get(tensor.module, 0.0) + weight + grad
    if stage == 3:
        gpu["gathered"] = max(gathered_per_module.values(), default=0.0)
    per_node = setup.gpus_per_node  # offloaded states of every rank on a node share its memory
    return {"gpu": gpu, "offloaded_per_node": {k: v * per_node for k, v in offloaded.items()}}


def fsdp2_model_states(params: list[ModelTensor], setup: Setup, optimizer_config: OptimizerConfig,
                       unit_of: Callable[[str], str]) -> dict[str, dict[str, float]]:
    """``model_states`` under engine fsdp2 (module docstring). ``unit_of``: a module's name ->
    the FSDP unit that shards it (a decoder layer's or untied output layer's name, or "" for the
    root)."""
    if setup.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name: dsft plan has no state size for {setup.optimizer!r} "
                          f"(known: {', '.join(OPTIMIZERS)})")
    optimizer, world = OPTIMIZERS[setup.optimizer], setup.world_size
    gpu = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0, "gathered": 0.0}
    offloaded = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0}
    sharded = offloaded if setup.offload_param else gpu
    gathered_per_unit: dict[str, float] = {}
    for tensor in params:
        if tensor.is_buffer:
            gpu["weights"] += tensor.stored_bytes
            continue
        stored = 4 * tensor.numel if tensor.trainable else tensor.stored_bytes  # trainable: fp32
        sharded["weights"] += stored / world
        cast = setup.gather_bytes is not None and not tensor.quantized
        gathered = tensor.numel * setup.gather_bytes if cast else \
            4 * tensor.numel if tensor.trainable else tensor.stored_bytes
        if tensor.trainable:
            sharded["gradients"] += 4 * tensor.numel / world
            sharded["optimizer"] += optimizer.state_bytes(tensor.shape, optimizer_config) / world
            gathered *= 2  # and its unsharded gradient
        unit = unit_of(tensor.module)
        gathered_per_unit[unit] = gathered_per_unit.get(unit, 0.0) + gathered
    root = gathered_per_unit.pop("", 0.0)
    layers = gathered_per_unit.values()
    gpu["gathered"] = root + (2 * max(layers, default=0.0) if setup.reshard_after_forward
                              else sum(layers))
    per_node = setup.gpus_per_node
    return {"gpu": gpu, "offloaded_per_node": {k: v * per_node for k, v in offloaded.items()}}


@dataclass(frozen=True)
class LinearSite:
    """What one linear layer of a decoder block contributes to the saved activations."""

    d_in: int
    weight_trains: bool
    adapter_rank: float = 0.0  # 0: not adapted
    adapter_dropout: bool = False


def decoder_layer_activation_bytes(h: int, f: int, heads: int, kv: int, p: int,
                                   linears: dict[str, LinearSite], norms_train: bool,
                                   mask_bytes: int = DROPOUT_MASK_BYTES) -> float:
    """Bytes per token autograd keeps for one LLaMA decoder layer (module docstring)."""
    def saves_input(site: LinearSite | None) -> bool:
        return site is not None and (site.weight_trains
                                     or (site.adapter_rank > 0 and not site.adapter_dropout))

    total = 2 * (4 * h + 4) + (2 * p * h if norms_train else 0)
    total += p * (2 * h + 2 * kv) + 4 * heads + 3 * p * f
    for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        if any(saves_input(linears.get(name)) for name in group):
            total += p * h
    if saves_input(linears.get("down_proj")):
        total += p * f
    for site in linears.values():  # o_proj's input is attention's saved output: no extra
        if site.adapter_rank > 0:
            total += p * site.adapter_rank
            if site.adapter_dropout:
                total += (p + mask_bytes) * site.d_in
    return total


def linear_sites(block: nn.Module) -> dict[str, LinearSite]:
    """The decoder block's linear layers by short name (q_proj, ...), adapted or not."""
    from dsft.adapters import AdapterLinear
    from dsft.adapters.lora_sp import LoraSpLinear

    adapted = {name: m for name, m in block.named_modules() if isinstance(m, AdapterLinear)}
    sites = {}
    for name, module in adapted.items():
        adapter = sum(p.numel() for p in module.adapter_parameters())
        if isinstance(module, LoraSpLinear):  # only its trainable entries are parameters
            adapter = module.r * (module.in_features + module.out_features)
        dropout = getattr(module, "dropout", None)
        sites[name.split(".")[-1]] = LinearSite(
            module.in_features, module.base_layer.weight.requires_grad,
            adapter / (module.in_features + module.out_features),
            isinstance(dropout, nn.Dropout) and dropout.p > 0)
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and name.rpartition(".")[0] not in adapted:
            sites[name.split(".")[-1]] = LinearSite(module.in_features,
                                                    module.weight.requires_grad)
    return sites


def activation_bytes(model: nn.Module, recipe: Recipe) -> dict[str, float]:
    """Activation bytes per GPU for one micro batch (module docstring); of a vision-language
    model's language model (its image tokens are among data.max_length)."""
    from dsft.vlm import language_model

    config = model.config.get_text_config()
    if config.model_type not in ("llama", "mistral", "qwen2"):
        raise ConfigError(f"model: dsft plan's activation formula is for LLaMA-style decoders, "
                          f"not {config.model_type!r}")
    h, f, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (config.num_key_value_heads or heads) * head_dim
    p = 2 if recipe.compute_dtype in ("bfloat16", "float16") else 4
    tokens = recipe.train.micro_batch_size * recipe.data.max_length
    decoder = language_model(model)
    layers = decoder.layers
    per_layer = [decoder_layer_activation_bytes(
        h, f, heads, kv, p, linear_sites(block),
        norms_train=block.input_layernorm.weight.requires_grad) for block in layers]
    if recipe.model.gradient_checkpointing:
        kept = len(layers) * p * h + max(per_layer)
    else:
        kept = sum(per_layer)
    head_norm = 4 * h + 4 + (p * h if decoder.norm.weight.requires_grad else 0)
    return {"layers": tokens * kept, "loss": tokens * head_norm + loss_bytes(
        recipe.train.loss, recipe.train.loss_chunk_tokens, tokens, vocab, h, p), "tokens": tokens}


def loss_bytes(kind: str, chunk_tokens: int, tokens: int, vocab: int, h: int, p: int) -> float:
    """The logits' and cross-entropy's peak for one micro batch by train.loss (module
    docstring)."""
    if kind == "plain":
        return tokens * (2 * p + 8) * vocab
    if kind == "chunked":
        return tokens * p * h + min(chunk_tokens, tokens) * (2 * p + 8) * vocab
    chunk = 2 ** math.ceil(math.log2(math.ceil(tokens / math.ceil(vocab / h))))
    return tokens * p * h + chunk * p * vocab


def training_setup(recipe: Recipe, gpus_per_node: int, nodes: int, hidden_size: int) -> Setup:
    """ZeRO stage, precision, offload and optimizer as dsft train would run the recipe."""
    if recipe.engine == "fsdp2":
        gather = recipe.fsdp2.param_dtype or recipe.compute_dtype
        bytes_of = {"bfloat16": 2, "float16": 2, "float32": None}
        offload = "cpu" if recipe.fsdp2.cpu_offload else None
        return Setup(0, gpus_per_node, nodes, {"bfloat16": "bf16", "float16": "fp16"}.get(
            gather, "fp32"), recipe.optimizer.name, offload, offload, "fsdp2", bytes_of[gather],
            recipe.fsdp2.reshard_after_forward)
    ds = fill_deepspeed_config(recipe, gpus_per_node * nodes, 1, hidden_size)
    zero = ds.get("zero_optimization", {})
    block = ds.get("optimizer")
    optimizer = recipe.optimizer.name
    if isinstance(block, dict):
        kind = str(block.get("type", "")).lower()
        if kind not in _DEEPSPEED_OPTIMIZERS:
            raise ConfigError(f"deepspeed.optimizer.type: dsft plan knows "
                              f"{', '.join(_DEEPSPEED_OPTIMIZERS)}, not {block.get('type')!r}")
        optimizer = _DEEPSPEED_OPTIMIZERS[kind]

    def offload(key: str) -> str | None:
        device = (zero.get(key) or {}).get("device", "none")
        return None if device in (None, "none") else str(device)

    precision = next((k for k in ("bf16", "fp16") if ds.get(k, {}).get("enabled") is True), "fp32")
    return Setup(int(zero.get("stage", 0)), gpus_per_node, nodes, precision, optimizer,
                 offload("offload_optimizer"), offload("offload_param"))


@dataclass
class Plan:
    recipe: str
    method: str
    model: str
    setup: Setup
    base_params: int  # the base model's parameters (trained in place by full-weight methods)
    adapter_params: int  # what the method's layers add
    trainable_params: int
    total_params: int
    trainable_by_module: dict[str, int]
    gpu_bytes: dict[str, float]
    offloaded_per_node_bytes: dict[str, float]
    tokens_per_micro_batch: int
    gpu_memory_gib: float
    notes: list[str] = field(default_factory=list)
    loss: str = "plain"  # train.loss

    @property
    def total_gpu_bytes(self) -> float:
        return sum(self.gpu_bytes.values())

    @property
    def fits(self) -> bool:
        return self.total_gpu_bytes <= self.gpu_memory_gib * GIB

    def as_dict(self) -> dict:
        return asdict(self) | {"total_gpu_bytes": self.total_gpu_bytes, "fits": self.fits,
                               "world_size": self.setup.world_size}

    def render(self) -> str:
        s = self.setup
        precision = f"{s.precision} mixed precision" if s.mixed_precision else "fp32"
        engine = "FSDP2" if s.engine == "fsdp2" else f"ZeRO-{s.zero_stage}"
        offload = ", ".join(f"{what} -> {device}" for what, device in
                            (("optimizer", s.offload_optimizer), ("params", s.offload_param))
                            if device) or "none"
        lines = [f"dsft plan: {self.recipe} ({self.method} on {self.model})",
                 (f"  {s.gpus_per_node} GPU(s) x {s.nodes} node(s) = {s.world_size} "
                  f"data-parallel ranks; {engine}; {precision}; optimizer "
                  f"{s.optimizer}; offload: {offload}"),
                 "", "parameters",
                 f"  {'base model':<38}{self.base_params:>16,d}",
                 f"  {'adapters':<38}{self.adapter_params:>16,d}",
                 f"  {'total':<38}{self.total_params:>16,d}",
                 (f"  {'trainable':<38}{self.trainable_params:>16,d}"
                  f"   {100 * self.trainable_params / max(self.total_params, 1):.3f} % of total")]
        lines += [f"    {name:<36}{count:>16,d}" for name, count in self.trainable_by_module.items()]
        lines += ["", f"memory per GPU{'GiB':>40}"]
        labels = {"weights": "weights (+ adapter buffers)", "gradients": "gradients",
                  "optimizer": "optimizer states (+ fp32 masters)",
                  "gathered": "FSDP2 gathered units" if s.engine == "fsdp2" else
                  "ZeRO-3 gathered layer",
                  "method": f"{self.method} state (anchors, bank)",
                  "activations": f"activations ({self.tokens_per_micro_batch:,d} tokens)",
                  "loss": "logits and loss" + ("" if self.loss == "plain" else f" ({self.loss})"),
                  "allowance": "CUDA context + fragmentation (fixed)"}
        lines += [f"  {labels[key]:<44}{value / GIB:>8.2f}" for key, value in self.gpu_bytes.items()]
        spare = self.gpu_memory_gib - self.total_gpu_bytes / GIB
        verdict = (f"fits ({spare:.2f} GiB spare)" if self.fits
                   else f"does not fit ({-spare:.2f} GiB over)")
        lines.append(f"  {'total':<44}{self.total_gpu_bytes / GIB:>8.2f}   "
                     f"of {self.gpu_memory_gib:g} GiB: {verdict}")
        offloaded = sum(self.offloaded_per_node_bytes.values())
        if offloaded:
            where = f"offloaded to {s.offload_optimizer or s.offload_param} (per node)"
            lines += ["", f"{where:<46}{'GiB':>8}"]
            lines += [f"  {key:<44}{value / GIB:>8.2f}"
                      for key, value in self.offloaded_per_node_bytes.items() if value]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def fsdp2_units(model: nn.Module) -> Callable[[str], str]:
    """A module's name -> the name of the FSDP2 unit that shards it (dsft.fsdp2.shard_model: the
    innermost decoder layer or untied output layer holding it, else "" for the root)."""
    from dsft.fsdp2 import inner_units

    layers = set(inner_units(model))
    names = sorted((name for name, module in model.named_modules() if module in layers),
                   key=len, reverse=True)
    return lambda module: next((name for name in names
                                if module == name or module.startswith(f"{name}.")), "")


def method_state_bytes(model: nn.Module, recipe: Recipe, params: list[ModelTensor],
                       setup: Setup, notes: list[str]) -> float:
    """State a method keeps beside its adapters, per GPU. periodic_lora with error feedback: a
    copy of each adapted layer's stored base weight (W_0; its own partition under ZeRO-3) and
    the bank of unloaded factors, (stages r) x (d_in + d_out) float32 per layer, stages =
    (total steps - 1) // unload_every (known here only from train.max_steps)."""
    if recipe.adapter.method != "periodic_lora":
        return 0.0
    stored = {t.module: t.stored_bytes for t in params if t.name.endswith("base_layer.weight")}
    share = setup.world_size if setup.shards_parameters else 1
    anchors = sum(stored[f"{name}.base_layer"] / share for name, layer in model.named_modules()
                  if getattr(layer, "error_feedback", False))
    steps = recipe.train.max_steps
    if steps is None:
        notes.append("periodic_lora: the bank of unloaded factors (4 r (d_in + d_out) bytes "
                     "per layer and stage) is not counted: set train.max_steps to count it")
        return anchors
    stages = (steps - 1) // recipe.adapter.unload_every
    bank = sum(4 * stages * layer.r * (layer.in_features + layer.out_features)
               for _, layer in model.named_modules() if hasattr(layer, "resize_bank"))
    return anchors + bank


def plan(recipe: Recipe, gpus_per_node: int = 1, nodes: int = 1,
         gpu_memory_gib: float = 80.0, model: nn.Module | None = None) -> Plan:
    """Counts and memory for ``recipe`` on ``gpus_per_node`` x ``nodes`` GPUs. ``model``: an
    already built meta model (default: ``meta_model(recipe)``)."""
    if gpus_per_node < 1 or nodes < 1:
        raise ConfigError("--gpus/--nodes: expected at least 1")
    model = model if model is not None else meta_model(recipe)
    setup = training_setup(recipe, gpus_per_node, nodes, model.config.get_text_config().hidden_size)
    params = tensors(model, recipe)
    if setup.engine == "fsdp2":
        states = fsdp2_model_states(params, setup, recipe.optimizer, fsdp2_units(model))
    else:
        states = model_states(params, setup, recipe.optimizer)
    activations = activation_bytes(model, recipe)
    trainable_by_module: dict[str, int] = {}
    for tensor in params:
        if tensor.trainable:
            suffix = tensor.module.split(".")[-1]
            trainable_by_module[suffix] = trainable_by_module.get(suffix, 0) + tensor.numel
    real = [t for t in params if not t.is_buffer]
    trainable = sum(t.numel for t in real if t.trainable)
    notes = []
    if setup.optimizer.startswith("paged_"):
        notes.append("paged optimizer state is counted on the GPU; under memory pressure "
                     "bitsandbytes pages it out to CPU memory")
    if recipe.adapter.method == "blsp_kd":
        notes.append("blsp_kd: the speech encoder and the CIF are counted with the adapters "
                     "(weights, gradients, optimizer states); activations only for the language "
                     "model's tokens, and one set of logits (the teacher's no-grad forward adds "
                     "another)")
    if hasattr(model.config, "vision_config"):
        notes.append("vision tower and projector: weights, gradients and optimizer states "
                     "counted; activations only for the language model's tokens (image tokens "
                     "included)")
    gpu = {**states["gpu"], "method": method_state_bytes(model, recipe, params, setup, notes),
           "activations": activations["layers"], "loss": activations["loss"],
           "allowance": float(CUDA_ALLOWANCE)}
    if not gpu["method"]:
        del gpu["method"]
    if not setup.shards_parameters:
        del gpu["gathered"]
    return Plan(recipe=recipe.source or "recipe", method=recipe.adapter.method,
                model=recipe.model.name_or_path or recipe.model.config, setup=setup,
                base_params=sum(t.numel for t in real if not t.is_adapter),
                adapter_params=sum(t.numel for t in real if t.is_adapter),
                trainable_params=trainable,
                total_params=sum(t.numel for t in real), trainable_by_module=trainable_by_module,
                gpu_bytes=gpu, offloaded_per_node_bytes=states["offloaded_per_node"],
                tokens_per_micro_batch=activations["tokens"], gpu_memory_gib=gpu_memory_gib,
                notes=notes, loss=recipe.train.loss)
