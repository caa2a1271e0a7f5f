"""Recipes: YAML files validated into typed pydantic objects before anything heavy loads.

A recipe has the sections model, adapter, data, optimizer, scheduler, train and deepspeed.
Every user mistake becomes a one-line ``ConfigError`` naming ``file:line`` and the field:
unknown keys come with the closest valid key, bad values with the expected form.

Relative paths are taken from the current directory (as axolotl and LLaMA-Factory do); the
prefix ``pkg:`` names a file shipped inside the dsft package (``pkg:assets/data/instruct.jsonl``).
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import re
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from dsft.errors import ConfigError

DTYPES = Literal["float32", "bfloat16", "float16"]
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")  # what dsft.data reads
SHIPPED_MODEL_CONFIGS = ("tiny-llama", "llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b",
                         "llava-1.5-7b")


class StrictModel(BaseModel):
    """Base for every recipe section: unknown keys are errors; numbers are finite, and a
    boolean is not taken for a number (YAML reads yes/no/on/off as booleans, and pydantic would
    turn them into 1 and 0)."""

    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        members = get_args(annotation) or (annotation,)
        if isinstance(value, bool) and bool not in members and {int, float} & set(members):
            raise ValueError("expected a number, not a boolean")
        return value


def resolve_path(path: str, field: str, kind: Literal["file", "dir"] | None = None,
                 suffixes: tuple[str, ...] = ()) -> Path:
    """Turn a recipe path (relative to cwd, or ``pkg:`` for package data) into an existing Path:
    a file or a directory as ``kind`` says, with one of ``suffixes`` when given."""
    if path.startswith("pkg:"):
        resolved = Path(str(resources.files("dsft").joinpath(path[4:])))
    else:
        resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise ConfigError(f"{field}: file not found: {resolved}")
    if kind == "dir" and not resolved.is_dir():
        raise ConfigError(f"{field}: expected a directory, not a file: {resolved}")
    if kind == "file" and not resolved.is_file():
        raise ConfigError(f"{field}: expected a file, not a directory: {resolved}")
    if suffixes and resolved.suffix.lower() not in suffixes:
        raise ConfigError(f"{field}: expected a {' or '.join(suffixes)} file: {resolved}")
    return resolved


# what a Hugging Face Hub id looks like ("org/name" or a legacy "name"); a local path that exists
# wins over the id it could also be
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve_model(name_or_path: str, field: str) -> Path:
    """A model or tokenizer directory: a local path (or ``pkg:``) when one exists, else a
    Hugging Face Hub id looked up in the local Hub cache only (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``): nothing is downloaded, so a cached id works offline and an uncached one is
    one line."""
    if name_or_path.startswith("pkg:") or Path(name_or_path).expanduser().exists() or \
            not _HUB_ID.fullmatch(name_or_path):
        return resolve_path(name_or_path, field, "dir")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        raise ConfigError(f"{field}: not found: {name_or_path!r} is no local directory, and as a "
                          "Hugging Face Hub id it is not in the local cache "
                          f"({constants.HF_HUB_CACHE}); dsft never downloads: fetch it first "
                          f"(hf download {name_or_path})") from None


class ModelConfig(StrictModel):
    """Which base model to load and how (precision, 4-bit, attention, checkpointing)."""

    # a local Hugging Face model directory, or a Hub id from the local cache (weights loaded)
    name_or_path: str | None = None
    config: str | None = None  # shipped architecture name or config.json path (random init)
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    tokenizer: str | None = None  # default: name_or_path, else the shipped Llama-2 tokenizer
    dtype: DTYPES = "bfloat16"
    load_in_4bit: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: DTYPES | None = None  # default: dtype
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    init_seed: int = 0
    # vision-language models (dsft/vlm.py): train the vision tower / the projector in full
    # (adapters wrap only the language model's linear layers)
    train_vision_tower: bool = False
    train_projector: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError("set exactly one of model.name_or_path (weights) or model.config "
                             f"(random init; shipped: {', '.join(SHIPPED_MODEL_CONFIGS)})")
        return self


class DataSource(StrictModel):
    """One dataset of ``data.train`` / ``data.eval`` (dsft/data_cache.py): a local ``path``
    (file or folder) or a Hub dataset id ``hub`` read from the local Hugging Face cache."""

    path: str | None = None
    hub: str | None = None
    config: str | None = None  # Hub config name (default: any cached one, the newest)
    split: str = "train"
    revision: str | None = None  # the cached commit hash (default: the newest cached)
    weight: float = Field(1.0, gt=0)  # examples taken round(weight * n) times (train only)

    @model_validator(mode="after")
    def _one_place(self) -> "DataSource":
        if (self.path is None) == (self.hub is None):
            raise ValueError("set exactly one of path (a local file or folder) or hub (a Hub "
                             "dataset id)")
        if self.path is not None and (self.config or self.revision or self.split != "train"):
            raise ValueError("config, split and revision apply to hub datasets only")
        return self


class DataConfig(StrictModel):
    """Dataset files and how they become token sequences."""

    # a local file or folder (json, jsonl, parquet, csv, arrow), a {path | hub, ...} source,
    # or a list of them (mixed by weight)
    train: str | DataSource | list[str | DataSource]
    eval: str | DataSource | list[str | DataSource] | None = None  # default: eval_fraction
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    format: Literal["auto", "alpaca", "chat", "sharegpt", "text"] = "auto"
    max_length: int = Field(512, ge=8)
    # an example longer than max_length: an error (a bad example), or with truncate its first
    # max_length tokens (dropped and counted when no response token is left)
    truncate: bool = False
    # bad examples (unreadable lines, missing or mistyped fields, no response token, too long
    # without truncate): stop with file:line, or skip them and report how many
    on_bad_example: Literal["error", "skip"] = "error"
    packing: bool = False
    # chatml, llama2, llama3 (shipped), tokenizer (its own), a Jinja template or a template
    # file; default: the tokenizer's, else dsft's
    chat_template: str | None = None
    train_on_inputs: bool = False  # labels on every token, prompts and other roles too
    # chat roles whose messages carry labels (system, user, assistant, tool)
    train_on_roles: list[Literal["system", "user", "assistant", "tool"]] = \
        Field(default_factory=lambda: ["assistant"], min_length=1)
    alpaca_as_chat: bool = False  # alpaca records as user/assistant turns of the chat template
    # tokenized cache (dsft/data_cache.py); default $DSFT_DATA_CACHE, else ~/.cache/dsft/data
    cache_dir: str | None = None
    num_proc: int | None = Field(None, ge=1)  # tokenizing processes; default: CPUs, up to 8
    # read and tokenize the train sources while training, never caching them (data larger than
    # the disk or memory; dsft/data_stream.py): needs train.max_steps, and data.eval or
    # eval_fraction 0. shuffle_buffer: examples the seeded shuffle (and the packing window) holds
    streaming: bool = False
    shuffle_buffer: int = Field(10000, ge=1)
    # Modality masks (partial_lora): [open, close] marker strings; text between them is flagged
    # as modality tokens and the markers are removed. modality_ranges: read each record's
    # "modality_ranges": [[start, end], ...] token positions. Either one gives every example a
    # modality_mask; without both, examples carry none.
    modality_markers: tuple[str, str] | None = None
    modality_ranges: bool = False

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _source_errors(cls, value: Any) -> Any:
        """A mapping is a DataSource: report its own error, not the union's first member's."""
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                try:
                    DataSource.model_validate(item)
                except ValidationError as err:
                    first = err.errors()[0]
                    where = ".".join(map(str, first["loc"]))
                    message = first["msg"].removeprefix("Value error, ")
                    raise PydanticCustomError("data_source", "{message}", {
                        "message": f"{where + ': ' if where else ''}{message}"}) from None
        return value

    @field_validator("modality_markers")
    @classmethod
    def _markers_distinguishable(cls, markers: tuple[str, str] | None):
        if markers is not None and (not all(markers) or markers[0] in markers[1]
                                    or markers[1] in markers[0]):
            raise ValueError("expected [open, close]: two non-empty strings, neither containing "
                             "the other")
        return markers


class FloraOptions(StrictModel):
    """``optimizer.flora``: Flora's options (dsft/optim/flora.py has the math). The step size
    is ``optimizer.lr`` (with ``relative_step``: min(optimizer.lr, 1/sqrt(t)), Adafactor's rule
    at lr 0.01), scaled by the weight's RMS when ``scale_parameter``; ``optimizer.weight_decay``
    is decoupled; ``eps``: [added to squared gradients, floor of the weight RMS]."""

    rank: int = Field(256, ge=1)
    kappa: int = Field(1000, ge=1)  # steps between momentum projection resamples
    beta1: float = Field(0.9, ge=0.0, lt=1.0)  # 0: no momentum kept
    eps: tuple[float, float] = (1e-30, 1e-3)
    clip_threshold: float = Field(1.0, gt=0)
    decay_rate: float = Field(-0.8, lt=0)  # second-moment decay 1 - t^decay_rate
    scale_parameter: bool = True
    relative_step: bool = False
    variant: Literal["paper", "pytorch"] = "paper"
    # side of each weight the projection contracts: smaller (as released; state r x larger
    # side, lower noise) or larger (state r x smaller side, (larger / smaller)x the variance)
    project: Literal["smaller", "larger"] = "smaller"
    force_compression: bool = False  # compress every 2-D weight (rank <= its smaller side)


class OptimizerConfig(StrictModel):
    name: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd",
                  "flora"] = "adamw"
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    flora: FloraOptions | None = None  # default options when name is flora

    @model_validator(mode="after")
    def _flora_options(self) -> OptimizerConfig:
        if self.flora is not None and self.name != "flora":
            raise ValueError(f"optimizer.flora is set but optimizer.name is {self.name} "
                             "(flora's options apply to name: flora)")
        if self.name == "flora" and self.flora is None:
            self.flora = FloraOptions()
        return self


class SchedulerConfig(StrictModel):
    name: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)  # wins over warmup_ratio
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)


class TrainConfig(StrictModel):
    output_dir: str
    micro_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # wins over num_epochs
    num_epochs: float = Field(1.0, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    log_every: int = Field(1, ge=1)
    eval_every: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    resume: bool | Literal["auto"] = False
    seed: int = 42
    # experiment trackers, each through its own library, on rank 0; they log the values of
    # metrics.jsonl. project: the wandb project and MLflow experiment; run_name (default: the
    # last part of output_dir) names the run in both
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    project: str = "dsft"
    run_name: str | None = None
    # stop after this many evaluations in a row that did not lower the best eval loss by at
    # least min_delta; output_dir/adapter is then the best evaluation's adapter
    early_stopping_patience: int | None = Field(None, ge=1)
    early_stopping_min_delta: float = Field(0.0, ge=0.0)
    progress_bar: bool = True
    # a micro-batch whose loss is not finite: stop before the optimizer step (the checkpoints
    # on disk stay good), or skip it (it adds no gradient) up to max_nonfinite_skips times
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = Field(10, ge=1)
    # how logits and cross-entropy are formed (dsft/loss.py): all positions at once (plain),
    # loss_chunk_tokens labelled positions at a time (chunked), Liger's fused kernel (liger:
    # CUDA or TRITON_INTERPRET=1, and dsft[liger]; checked when training starts, so plan and
    # validate run anywhere)
    loss: Literal["plain", "chunked", "liger"] = "plain"
    loss_chunk_tokens: int = Field(1024, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_moved(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "tensorboard" in raw:
            raise PydanticCustomError("key_moved", "train.tensorboard was replaced by "
                                      "train.report_to: [tensorboard]")
        return raw

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, trackers: list[str]) -> list[str]:
        for name in trackers:
            if importlib.util.find_spec(name) is None:
                raise PydanticCustomError("tracker_not_installed", f"{name} is not installed (pip install "
                                          f"{name})")
        return list(dict.fromkeys(trackers))

    @model_validator(mode="after")
    def _early_stopping_needs_evals(self) -> "TrainConfig":
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise PydanticCustomError("needs_eval_every", "train.early_stopping_patience counts "
                                      "evaluations: set train.eval_every too")
        return self


class Fsdp2Config(StrictModel):
    """``engine: fsdp2`` (dsft/fsdp2.py): fully_shard per decoder layer, then the root."""

    reshard_after_forward: bool = True  # False: keep each layer gathered until its backward
    cpu_offload: bool = False  # sharded parameters, gradients and optimizer state on the CPU
    param_dtype: DTYPES | None = None  # the all-gather dtype; default: the compute dtype
    reduce_dtype: DTYPES = "float32"  # the gradient reduce-scatter dtype


class Recipe(StrictModel):
    model: ModelConfig
    adapter: Any  # validated into the method's own config class from dsft.adapters
    data: DataConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    train: TrainConfig
    deepspeed: dict[str, Any] = Field(default_factory=lambda: {"zero_optimization": {"stage": 0}})
    engine: Literal["deepspeed", "fsdp2"] = "deepspeed"
    fsdp2: Fsdp2Config = Field(default_factory=Fsdp2Config)
    source: str | None = None  # the recipe file, for messages

    @model_validator(mode="before")
    @classmethod
    def _adapter_by_method(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and isinstance(raw.get("adapter"), dict):
            from dsft.adapters import config_class

            adapter = dict(raw["adapter"])
            method = adapter.get("method", "lora")
            optimizer = raw.get("optimizer")
            if method == "flora" and (optimizer is None or isinstance(optimizer, dict)):
                # the shortcut: full-weight training of adapter.trainable with optimizer flora
                raw = {**raw, "optimizer": {"name": "flora", **(optimizer or {})}}
            try:
                raw = {**raw, "adapter": config_class(method).model_validate(adapter)}
            except ValidationError as err:
                raise _PrefixedError("adapter", err) from None
        return raw

    @property
    def compute_dtype(self) -> str:
        return self.model.compute_dtype or self.model.dtype


class _PrefixedError(Exception):
    """Carries a nested section's ValidationError out of a pydantic validator."""

    def __init__(self, prefix: str, error: ValidationError):
        super().__init__(prefix)
        self.prefix, self.error = prefix, error


# ---------------------------------------------------------------- loading and error messages

def _yaml_line(node: yaml.Node | None, loc: tuple) -> int | None:
    """Line (1-based) of the deepest node that ``loc`` reaches in a composed YAML tree."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(key)]
            if not match:
                break
            node = match[0][1]
            line = match[0][0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _valid_keys(model_cls: Any, loc: tuple) -> list[str]:
    """The keys a section takes (by alias where a field has one: DeepSpeed's stage3_* keys)."""
    for key in loc[:-1]:
        fields = getattr(model_cls, "model_fields", {})
        field = fields.get(key) or next((f for f in fields.values() if f.alias == key), None)
        # an optional section (X | None) takes X's keys
        options = (field.annotation, *get_args(field.annotation)) if field is not None else ()
        model_cls = next((o for o in options if hasattr(o, "model_fields")), None)
    fields = getattr(model_cls, "model_fields", {})
    return [field.alias or name for name, field in fields.items()]


def _field_loc(model_cls: Any, loc: tuple) -> tuple:
    """``loc`` without the labels pydantic adds after a union-typed field ('list[str]' in
    adapter.target_modules.list[str].0, 'bool' in train.resume.bool): they are not keys."""
    kept, node, label_next = [], model_cls, False
    for part in loc:
        fields = getattr(node, "model_fields", None)
        if label_next:
            label_next = False
            continue
        kept.append(part)
        if fields is None:
            continue
        field = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
        members = [m for m in get_args(field.annotation) if m is not type(None)] \
            if field is not None and get_origin(field.annotation) in (Union, UnionType) else []
        label_next = len(members) > 1
        options = (field.annotation, *members) if field is not None else ()
        node = next((o for o in options if hasattr(o, "model_fields")), None)
    return tuple(kept)


def _one_line(err: ValidationError, model_cls: Any, where: str, tree: yaml.Node | None,
              prefix: tuple = ()) -> ConfigError:
    first = err.errors()[0]
    loc = prefix + _field_loc(model_cls, tuple(first["loc"]))
    field = ".".join(str(part) for part in loc) or "recipe"
    if not field.isprintable():  # a key with a newline or a control character, escaped
        field = field.encode("unicode_escape").decode()
    line = _yaml_line(tree, loc)
    place = f"{where}:{line}" if line else where
    if first["type"] == "extra_forbidden":
        valid = _valid_keys(model_cls, loc[len(prefix):])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
        return ConfigError(f"{place}: unknown key '{field}' ({hint})")
    if first["type"] == "missing":
        return ConfigError(f"{place}: missing required key '{field}'")
    got = first.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    message = " ".join(first["msg"].split())  # DeepSpeed's validators write several lines
    return ConfigError(f"{place}: {field}: {message}{got_text}")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override '{text}': expected key.sub=value")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{key}' is not a section")
            node = child
        node[keys[-1]] = value
    return raw


def _read_json(path: Path, field: str) -> dict:
    """A JSON object from a file the recipe names, or a one-line ConfigError."""
    try:
        content = json.loads(path.read_text())
    except UnicodeDecodeError as err:
        raise ConfigError(f"{field}: {path}: not UTF-8 text ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{field}: {path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{field}: {path}: expected a JSON object, got a JSON "
                          f"{type(content).__name__}")
    return content


def _load_deepspeed(raw: dict) -> None:
    """Replace a DeepSpeed config path by its JSON content so overrides can reach into it."""
    value = raw.get("deepspeed")
    if isinstance(value, str):
        path = resolve_path(value, "deepspeed", "file")
        raw["deepspeed"] = _read_json(path, "deepspeed")
        raw.setdefault("deepspeed_source", str(path))


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raise ConfigError with one line on any mistake."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        # safe_load: a tag such as !!python/object is an error, never a constructed object
        tree = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())  # one line
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (model, adapter, data, ...)")
    ds_overrides = [o for o in overrides if o.startswith("deepspeed.")]
    apply_overrides(raw, [o for o in overrides if not o.startswith("deepspeed.")])
    _load_deepspeed(raw)
    raw.pop("deepspeed_source", None)
    if ds_overrides:
        apply_overrides(raw, list(ds_overrides))
    raw["source"] = str(path)
    return recipe_from_dict(raw, where=str(path), tree=tree)


def recipe_from_dict(raw: dict, where: str = "recipe", tree: yaml.Node | None = None) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except _PrefixedError as err:
        from dsft.adapters import config_class

        method_cls = config_class(raw["adapter"].get("method", "lora"))
        raise _one_line(err.error, method_cls, where, tree, (err.prefix,)) from None
    except ValidationError as err:
        raise _one_line(err, Recipe, where, tree) from None
    check_paths(recipe)
    _check_deepspeed(recipe, where, tree)
    _check_flora(recipe, where, tree)
    _check_engine(recipe, where, tree)
    return recipe


# DeepSpeed reads its top-level keys one at a time and ignores any other, so a misspelt key
# (zero_optimizaton) would silently run with defaults. No DeepSpeed model lists them: this list
# is written here, from the keys deepspeed.runtime.config.DeepSpeedConfig looks up in 0.19 minus
# those it refuses as removed (tests/test_recipe_fuzz.py compares it with the installed
# DeepSpeed), and without the old alias "bfloat16", which dsft's bf16 checks would not see.
DEEPSPEED_KEYS = (
    "activation_checkpointing", "aio", "autotuning", "bf16", "checkpoint", "comet",
    "comms_logger", "communication_data_type", "compile", "csv_monitor", "data_efficiency",
    "data_types", "dataloader_drop_last", "datastates_ckpt", "disable_allgather",
    "disable_python_gc", "dump_state", "expert_parallel", "flops_profiler", "fp16",
    "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
    "gradient_predivide_factor", "hybrid_engine", "log_level", "managed_gradient_accumulation",
    "memory_breakdown", "optimizer", "pipeline", "prescale_gradients", "scheduler",
    "seq_parallel_communication_data_type", "steps_per_print", "tensor_parallel", "tensorboard",
    "timers", "torch_autocast", "train_batch_size", "train_micro_batch_size_per_gpu",
    "use_data_before_expert_parallelism", "vocabulary_size", "wall_clock_breakdown", "wandb",
    "weight_quantization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "zero_optimization")


def _field_error(where: str, tree: yaml.Node | None, loc: tuple, message: str) -> ConfigError:
    line = _yaml_line(tree, loc)
    return ConfigError(f"{where}:{line}: {'.'.join(loc)}: {message}" if line else
                       f"{where}: {'.'.join(loc)}: {message}")


def _deepspeed_sections() -> dict:
    """DeepSpeed's own (pydantic, extra keys forbidden) models of the blocks dsft reads."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {"zero_optimization": DeepSpeedZeroConfig, "bf16": DeepSpeedBF16Config,
            "fp16": DeepSpeedFP16Config}


def _check_deepspeed(recipe: Recipe, where: str, tree: yaml.Node | None) -> None:
    """What DeepSpeed would refuse at launch, or silently ignore, as one line naming the key:
    unknown keys, the ZeRO/bf16/fp16 blocks through DeepSpeed's own models, batch sizes that
    contradict the recipe's train section, and mixed precision the model does not compute in."""
    ds, train = recipe.deepspeed, recipe.train
    for key in ds:
        if key not in DEEPSPEED_KEYS:
            close = difflib.get_close_matches(key, DEEPSPEED_KEYS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "not a DeepSpeed config key"
            line = _yaml_line(tree, ("deepspeed", key))
            raise ConfigError(f"{where}{f':{line}' if line else ''}: unknown key "
                              f"'deepspeed.{key}' ({hint})")
    for key, model_cls in _deepspeed_sections().items():
        if key not in ds:
            continue
        if not isinstance(ds[key], dict):
            raise _field_error(where, tree, ("deepspeed", key), f"expected a mapping of "
                               f"DeepSpeed's {key} options (got {ds[key]!r})")
        try:  # "auto" values are dsft's to fill in (fill_deepspeed_config)
            model_cls.model_validate({k: v for k, v in ds[key].items() if v != "auto"})
        except ValidationError as err:
            raise _one_line(err, model_cls, where, tree, ("deepspeed", key)) from None
    for key, name in (("train_micro_batch_size_per_gpu", "micro_batch_size"),
                      ("gradient_accumulation_steps", "gradient_accumulation_steps")):
        value, wanted = ds.get(key, "auto"), getattr(train, name)
        if value != "auto" and (type(value) is not int or value != wanted):
            raise _field_error(where, tree, ("deepspeed", key), f"{value!r} contradicts "
                               f"train.{name} ({wanted}); set \"auto\" (dsft fills it in)")
    per_rank = train.micro_batch_size * train.gradient_accumulation_steps
    batch = ds.get("train_batch_size", "auto")
    if batch != "auto" and (type(batch) is not int or batch < per_rank or batch % per_rank):
        raise _field_error(where, tree, ("deepspeed", "train_batch_size"), f"{batch!r} is not "
                           f"train.micro_batch_size x train.gradient_accumulation_steps "
                           f"({per_rank}) x a number of ranks; set \"auto\"")
    clipping = ds.get("gradient_clipping", "auto")
    if clipping != "auto" and (type(clipping) not in (int, float) or not clipping >= 0):
        raise _field_error(where, tree, ("deepspeed", "gradient_clipping"), f"expected a number "
                           f">= 0 or \"auto\" (got {clipping!r})")
    precision = recipe.compute_dtype if recipe.model.load_in_4bit else recipe.model.dtype
    for section, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        if ds.get(section, {}).get("enabled") is True and precision != dtype:
            raise _field_error(where, tree, ("deepspeed", section, "enabled"), f"true, but the "
                               f"model computes in {precision}: set model.dtype/compute_dtype "
                               "or leave this \"auto\"")


def _check_flora(recipe: Recipe, where: str, tree: yaml.Node | None) -> None:
    """Combinations flora cannot run, as one line naming the field (dsft/optim/flora.py)."""
    def fail(loc: tuple, message: str) -> None:
        line = _yaml_line(tree, loc)
        field = ".".join(loc)
        raise ConfigError(f"{where}:{line}: {field}: {message}" if line else
                          f"{where}: {field}: {message}")

    flora = recipe.optimizer.name == "flora"
    if recipe.adapter.method == "flora" and not flora:
        name = recipe.optimizer.name
        fail(("optimizer", "name"), f"adapter.method flora trains with optimizer flora, not "
             f"{name} (adapter.method none trains full weights with {name})")
    if not flora:
        return
    if recipe.model.load_in_4bit:
        fail(("model", "load_in_4bit"), "flora trains the weights themselves, which a frozen "
             "4-bit base cannot hold; load the base in bf16/fp32 or use a LoRA method")
    stage = zero_stage(recipe)
    if stage:
        fail(("deepspeed", "zero_optimization", "stage"), f"flora runs under ZeRO stage 0 (data "
             f"parallel), not stage {stage}: ZeRO-1/2/3 hand the optimizer flat fragments it "
             "cannot project; use ds_configs/zero0.json")
    ds = recipe.deepspeed
    for section in ("bf16", "fp16"):
        if ds.get(section, {}).get("enabled") is True:
            fail(("deepspeed", section, "enabled"), f"flora updates {section} weights itself (in "
                 "float32, Adafactor-style); set model.dtype and leave this \"auto\"")
    if "optimizer" in ds:
        fail(("deepspeed", "optimizer"), "flora is built by dsft (optimizer.name: flora); remove "
             "the DeepSpeed optimizer block")
    clipping = ds.get("gradient_clipping", "auto")
    if clipping not in ("auto", 0, 0.0):
        fail(("deepspeed", "gradient_clipping"), "flora clips by the global norm itself; set "
             "train.max_grad_norm and leave this \"auto\"")


def _check_engine(recipe: Recipe, where: str, tree: yaml.Node | None) -> None:
    """Engine choices that contradict each other, as one line naming the field. Under fsdp2 the
    deepspeed block may stay (a ZeRO-0 config says nothing FSDP2 does not do); one asking
    DeepSpeed to shard, or to build the optimizer or schedule, is refused."""
    if recipe.engine == "deepspeed":
        if "fsdp2" in recipe.model_fields_set:
            raise _field_error(where, tree, ("fsdp2",), "options of engine fsdp2, but engine is "
                               "deepspeed; set engine: fsdp2 or remove this block")
        return
    stage = zero_stage(recipe)
    if stage:
        raise _field_error(where, tree, ("deepspeed", "zero_optimization", "stage"), f"engine "
                           f"fsdp2 shards with FSDP2, not ZeRO stage {stage}; use "
                           "ds_configs/zero0.json or remove the deepspeed block")
    for block in ("optimizer", "scheduler"):
        if block in recipe.deepspeed:
            raise _field_error(where, tree, ("deepspeed", block), f"engine fsdp2 builds the "
                               f"{block} from the recipe's {block} section; remove this block")
    if recipe.optimizer.name == "flora":
        raise _field_error(where, tree, ("engine",), "optimizer flora runs on engine deepspeed "
                           "(ZeRO-0) only: it projects whole gradients, FSDP2 shards them")
    if getattr(recipe.adapter, "unroll", False):
        raise _field_error(where, tree, ("adapter", "unroll"), f"{recipe.adapter.method}'s "
                           "unrolled hypergradient needs a double backward through gathered base "
                           "weights, which engine fsdp2 keeps sharded; use unroll: false")
    if recipe.train.on_nonfinite_loss == "skip":
        raise _field_error(where, tree, ("train", "on_nonfinite_loss"), "skip backpropagates a "
                           "zero loss outside the model's forward, which engine fsdp2's per-layer "
                           "gradient reduce never sees; use stop")
    gather_dtype = recipe.fsdp2.param_dtype or recipe.compute_dtype
    if recipe.model.load_in_4bit and recipe.model.quant_storage != gather_dtype:
        raise _field_error(where, tree, ("model", "quant_storage"), f"engine fsdp2 shards the "
                           f"packed 4-bit weights and gathers them cast to {gather_dtype}: set "
                           f"model.quant_storage: {gather_dtype}")


def check_paths(recipe: Recipe) -> None:
    """Missing input files, and files of a kind training would refuse, are reported now, not
    after the model has loaded."""
    model = recipe.model
    if model.name_or_path:
        weights = resolve_model(model.name_or_path, "model.name_or_path")
        if not (weights / "config.json").is_file():
            raise ConfigError(f"model.name_or_path: {weights} has no config.json (not a Hugging "
                              "Face model directory)")
    if model.config and model.config not in SHIPPED_MODEL_CONFIGS:
        _read_json(resolve_path(model.config, "model.config", "file", (".json",)), "model.config")
    if model.tokenizer:
        resolve_model(model.tokenizer, "model.tokenizer")
    for field in ("train", "eval"):
        spec = getattr(recipe.data, field)
        for source in spec if isinstance(spec, list) else [spec] if spec else []:
            path = source if isinstance(source, str) else source.path
            if path is not None and resolve_path(path, f"data.{field}").is_file():
                resolve_path(path, f"data.{field}", "file", DATA_SUFFIXES)


# ---------------------------------------------------------------- DeepSpeed "auto" values

def total_steps(recipe: Recipe, n_train_examples: int, world_size: int) -> int:
    """train.max_steps, or the steps of train.num_epochs as the method counts them."""
    from dsft.adapters import method

    train = recipe.train
    if train.max_steps:
        return train.max_steps
    global_batch = train.micro_batch_size * train.gradient_accumulation_steps * world_size
    return method(recipe.adapter.method).hooks.steps_for_epochs(
        recipe.adapter, train.num_epochs, n_train_examples, global_batch)


def warmup_steps(recipe: Recipe, steps: int) -> int:
    sched = recipe.scheduler
    return sched.warmup_steps if sched.warmup_steps is not None else round(sched.warmup_ratio * steps)


def fill_deepspeed_config(recipe: Recipe, world_size: int, steps: int, hidden_size: int) -> dict:
    """The recipe's DeepSpeed config with every "auto" value filled in (as HF Trainer does).

    Stage-3 bucket sizes follow HF's rule (hidden^2, 0.9 hidden^2, 10 hidden). Any "auto" left
    over is an error naming its key.
    """
    train, opt, model = recipe.train, recipe.optimizer, recipe.model
    ds = json.loads(json.dumps(recipe.deepspeed))
    precision = model.compute_dtype if model.load_in_4bit else model.dtype
    warmup = warmup_steps(recipe, steps)
    # flora owns its gradients (compressed, averaged and clipped by dsft.train) and rounds its
    # fp32 update into bf16/fp16 weights itself: DeepSpeed's clipping and mixed-precision
    # wrappers stay off, so its basic ZeRO-0 path hands it the model's own parameters
    flora = opt.name == "flora"
    values = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": 0.0 if flora else train.max_grad_norm or 0.0,
        "bf16.enabled": precision == "bfloat16" and not flora,
        "fp16.enabled": precision == "float16" and not flora,
        "optimizer.params.lr": opt.lr,
        "optimizer.params.betas": list(opt.betas),
        "optimizer.params.eps": opt.eps,
        "optimizer.params.weight_decay": opt.weight_decay,
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }
    if isinstance(ds.get("scheduler"), dict):
        ds["scheduler"] = _deepspeed_scheduler(recipe, ds["scheduler"], steps, warmup)
    # a key the block leaves out is the recipe's too: DeepSpeed's defaults (no batch size at
    # all, no clipping, fp32) would contradict the train and model sections
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "train_batch_size", "gradient_clipping"):
        ds.setdefault(key, "auto")
    for section in ("bf16", "fp16"):
        ds.setdefault(section, {}).setdefault("enabled", "auto")
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = ds
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(leaf) == "auto":
            node[leaf] = value
    if ds["train_batch_size"] != values["train_batch_size"]:
        raise ConfigError(f"deepspeed.train_batch_size: {ds['train_batch_size']} is not "
                          "train.micro_batch_size x train.gradient_accumulation_steps x "
                          f"{world_size} ranks = {values['train_batch_size']}; set \"auto\"")
    for section in ("bf16", "fp16"):
        enabled = ds.get(section, {}).get("enabled", False)
        if enabled and not values[f"{section}.enabled"]:
            raise ConfigError(f"deepspeed.{section}.enabled is true but the model computes in "
                              f"{precision}: set model.dtype/compute_dtype or use \"auto\"")
    zero = ds.get("zero_optimization")
    mixed = any(ds.get(section, {}).get("enabled") is True for section in ("bf16", "fp16"))
    if mixed and isinstance(zero, dict) and zero.get("stage", 0) == 0:
        # ZeRO-0's mixed-precision wrapper (FP16_Optimizer) keeps fp32 masters that DeepSpeed's
        # safe_get/set_full_fp32_param cannot reach, so merges, masks and portable resume would
        # be lost there; ZeRO-1 keeps them where that API reaches, and on one rank shards nothing
        zero["stage"] = 1
    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(f"deepspeed.{leftover}: \"auto\" is not a value dsft can fill; set it")
    if isinstance(ds.get("optimizer"), dict) and not _has_cuda():
        # DeepSpeed's fused Adam is CUDA-only (and JIT-builds for minutes): torch's on CPU
        ds["optimizer"].setdefault("params", {}).setdefault("torch_adam", True)
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def _deepspeed_scheduler(recipe: Recipe, block: dict, steps: int, warmup: int) -> dict:
    """A DeepSpeed scheduler block for the recipe's schedule: "auto" type and parameters are
    replaced by the DeepSpeed scheduler that matches scheduler.name (its own parameter set)."""
    sched, peak = recipe.scheduler, recipe.optimizer.lr
    kind = block.get("type", "auto")
    if kind == "auto":
        kind = {"linear": "WarmupDecayLR", "cosine": "WarmupCosineLR",
                "constant": "WarmupLR"}[sched.name]
    defaults = {
        "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": peak, "warmup_num_steps": warmup,
                     "warmup_type": "linear"},
        "WarmupDecayLR": {"warmup_min_lr": 0.0, "warmup_max_lr": peak, "warmup_num_steps": warmup,
                          "total_num_steps": steps, "warmup_type": "linear"},
        "WarmupCosineLR": {"warmup_min_ratio": 0.0, "warmup_num_steps": warmup,
                           "total_num_steps": steps, "cos_min_ratio": sched.min_lr_ratio,
                           "warmup_type": "linear"},
    }.get(kind, {})
    params = {k: v for k, v in block.get("params", {}).items()
              if not (v == "auto" and k in defaults)}
    if block.get("type", "auto") == "auto":
        # a generic block (the shipped offload configs) names parameters of several DeepSpeed
        # schedulers: keep those the chosen one takes
        params = {k: v for k, v in params.items() if k in defaults}
    return {**block, "type": kind, "params": {**defaults, **params}}


def _find_auto(node: Any, path: str = "") -> str | None:
    if node == "auto":
        return path
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{path}.{key}" if path else key)
            if found:
                return found
    return None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def zero_stage(recipe: Recipe) -> int:
    return int(recipe.deepspeed.get("zero_optimization", {}).get("stage", 0))
