"""Run configuration: one tree of frozen dataclasses, loaded from configs/<name>.py and overridden
from the command line.

    RunConfig(name, model: ModelConfig, data: DataConfig, optim: OptimConfig, mesh: MeshConfig,
              train: TrainConfig)

A config file defines `MODEL = ModelConfig(...)` and may define `RUN = RunConfig(...)`; without RUN
the defaults below run its MODEL. Command-line overrides are `section.field=value` strings
(`train.steps=300 model.dropout_rate=0.1 optim.peak_lr=1e-3`), type-checked against the field's
annotation; a bad key or value raises `ConfigError` with a one-line message naming the key and the fix.

Conventions:
  * train.batch is the *global* number of sequences per optimizer step (all hosts, all micro-batches);
    the data pipeline's per-host batch is derived from it (data.batch_size is not set by hand).
  * data.seq_len is the number of real tokens per sequence.
  * Compute dtype and master weights are the model's: model.dtype (e.g. "bfloat16") is the compute
    dtype, model.param_dtype ("float32") the master weights the optimizer updates. Remat: model.remat.
  * The model's vocab_size / pad_id / eos_id / landmark_id are always taken from the tokenizer
    (`resolve_run_config`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import pathlib
import types
import typing
from typing import Any

from drt_jax.config import CONFIGS_DIR, ConfigError, ModelConfig, list_presets, load_config_module
from drt_jax.data.config import DataConfig, DataError
from drt_jax.losses import LOGITS_DTYPES

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters: embed (d_model) is FSDP-sharded, the "wide" axes go to the
# tensor axis; activations' batch axis over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up, cosine decay to a floor, global-norm clipping.

    peak_lr / end_lr: the schedule's peak and floor (paper: 2e-3 and 4e-4).
    warmup_fraction: share of train.steps spent warming up linearly from 0 (paper: 2%);
      warmup_steps, if set, wins over the fraction.
    weight_decay: decoupled AdamW decay; decay_norms_and_embeddings=False masks it off the RMSNorm
      gains and the (tied) embedding table.
    clip_norm: global gradient-norm clip (None or 0 turns it off).
    """

    peak_lr: float = 2e-3
    end_lr: float = 4e-4
    warmup_fraction: float = 0.02
    warmup_steps: int | None = None
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-6
    weight_decay: float = 0.1
    decay_norms_and_embeddings: bool = False
    clip_norm: float | None = 1.0

    def __post_init__(self):
        if not (self.peak_lr > 0 and 0 <= self.end_lr <= self.peak_lr):
            raise ConfigError(f"optim: need peak_lr > 0 and 0 <= end_lr <= peak_lr, got {self.peak_lr}, {self.end_lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"optim.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps > 0):
            raise ConfigError("optim: need 0 <= b1, b2 < 1 and eps > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay} must be >= 0")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, fsdp, tensor); one size may be -1 ("the rest of the devices").

    rules: the logical-axis -> mesh-axis table (flax logical axis rules).
    coordinator / num_processes / process_id: multi-host launch (jax.distributed.initialize); when
      unset, the env vars DRT_COORDINATOR, DRT_NUM_PROCESSES, DRT_PROCESS_ID are read, and a single
      process runs without the distributed runtime.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple((str(k), _tupleize(v)) for k, v in self.rules))
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"mesh: sizes (data, fsdp, tensor)={sizes} must be >= 1, with at most one -1")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        known = 1
        for s in sizes:
            if s != -1:
                known *= s
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(
                    f"mesh (data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}) does not divide "
                    f"{num_devices} devices; pick sizes whose product divides it"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if sizes[0] * sizes[1] * sizes[2] != num_devices:
            raise ConfigError(
                f"mesh (data, fsdp, tensor)={tuple(sizes)} needs {sizes[0] * sizes[1] * sizes[2]} devices "
                f"but {num_devices} are present; set one size to -1"
            )
        return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop.

    steps: optimizer steps. batch: global sequences per step; grad_accum splits it into that many
      micro-batches (a scan inside the step). eval_every: held-out loss every N steps (0: only at the
      end), over eval_steps batches. checkpoint_every: async save every N steps (and at the end);
      keep_checkpoints: keep the last K. run_dir: "runs/{name}" by default; an existing run there is
      resumed from its latest checkpoint. loss_block_size: tokens per sequence in a block of the
      blocked cross-entropy (0: the largest power of two whose float32 logits for the batch fit in
      1 GiB, losses.auto_block_size). loss_logits_dtype: "float32" (default) or "bfloat16", the dtype
      the loss head stores its vocabulary-wide logits in between its passes (the GEMM accumulates in
      float32 either way; bfloat16 halves those passes' bytes; each logit keeps 8 significant bits).
      answer_loss_weight: weight of task answer tokens (data.mixture tasks that mark
      them, e.g. NIAH) in the loss, relative to 1 for every other token; 1 is the authors' plain LM
      loss over the whole example (spec 7.4). init_from: a run folder whose latest checkpoint's
      parameters start this run when it has no checkpoint of its own (fine-tuning a pretrained model,
      spec 7.4); optimizer, step and data start afresh. time_limit_s: stop with a checkpoint once
      the run has lasted this many seconds (0: no limit), so that a run in a time-limited job (spot
      instances, a cluster's wall-time limit) ends resumable; the schedule still follows `steps`. stop_at_step: stop
      with a checkpoint at this step (none: at `steps`), the schedule still following `steps`, so
      that another run can replay a time-limited run's exact steps (e.g. a baseline on the same
      tokens). resume_step: for one launch, resume from exactly this checkpoint (0: start
      over) instead of the newest readable one; newer checkpoints are moved to checkpoints/unused-<step>.
      profile_steps: record a jax.profiler trace of this many steps (0: none), starting profile_start
      steps after the launch's first step, into <run_dir>/profile (summary: python -m
      drt_jax.train.profiling <run_dir>/profile).
    """

    steps: int = 1000
    batch: int = 8
    grad_accum: int = 1
    eval_every: int = 0
    eval_steps: int = 8
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    log_every: int = 10
    seed: int = 0
    run_dir: str = "runs/{name}"
    loss_block_size: int = 0
    loss_logits_dtype: str = "float32"
    progress_bar: bool = True
    answer_loss_weight: float = 1.0
    init_from: str = ""
    time_limit_s: float = 0.0
    stop_at_step: int | None = None
    resume_step: int | None = None
    profile_start: int = 10
    profile_steps: int = 0

    def __post_init__(self):
        for field in ("steps", "batch", "grad_accum", "eval_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"train.{field}={value!r} must be an integer >= 1")
        block = self.loss_block_size
        if not isinstance(block, int) or isinstance(block, bool) or block < 0:
            raise ConfigError(f"train.loss_block_size={block!r} must be an integer >= 0 (0: chosen from the batch and vocabulary)")
        if self.loss_logits_dtype not in LOGITS_DTYPES:
            raise ConfigError(f"train.loss_logits_dtype={self.loss_logits_dtype!r}: choose one of {', '.join(LOGITS_DTYPES)}")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every={self.eval_every} must be >= 0 (0: evaluate only at the end)")
        if not isinstance(self.time_limit_s, (int, float)) or self.time_limit_s < 0:
            raise ConfigError(f"train.time_limit_s={self.time_limit_s!r} must be >= 0 (0: no limit)")
        if not isinstance(self.answer_loss_weight, (int, float)) or not self.answer_loss_weight > 0:
            raise ConfigError(f"train.answer_loss_weight={self.answer_loss_weight!r} must be a number > 0")
        if self.stop_at_step is not None and (not isinstance(self.stop_at_step, int) or self.stop_at_step < 1):
            raise ConfigError(f"train.stop_at_step={self.stop_at_step!r} must be an integer >= 1 (none: train.steps)")
        if self.resume_step is not None and self.resume_step < 0:
            raise ConfigError(f"train.resume_step={self.resume_step} must be >= 0 (0: start over) or none (the newest readable checkpoint)")
        for field in ("profile_start", "profile_steps"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"train.{field}={value!r} must be an integer >= 0")
        if self.batch % self.grad_accum:
            raise ConfigError(f"train.batch={self.batch} is not a multiple of train.grad_accum={self.grad_accum}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.train.run_dir.format(name=self.name)).expanduser()

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return _to_jsonable(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        sections = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key not in sections:
                continue  # a newer/older field; ignore
            ftype = _SECTION_TYPES.get(key)
            if ftype is None:
                kwargs[key] = value
            else:
                names = {f.name for f in dataclasses.fields(ftype)}
                kwargs[key] = ftype(**{k: _from_json(v) for k, v in value.items() if k in names})
        return cls(**kwargs)


_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "mesh": MeshConfig, "train": TrainConfig}

# Fields of ModelConfig that do not change the parameters or the function computed by a checkpoint;
# they may differ between a checkpoint and the run that resumes or evaluates it.
RUNTIME_MODEL_FIELDS = frozenset({"name", "dtype", "remat", "attention_impl", "gca_impl", "mlp_impl", "lse_impl", "norm_impl", "dropout_rate", "gumbel_noise"})


def model_mismatch(saved: dict, current: ModelConfig) -> str | None:
    """The first structural field where a saved model config differs from `current`, as a message."""
    cur = dataclasses.asdict(current)
    # A field newer than the checkpoint was not there to set: the run had the field's default.
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
    for key in sorted(set(saved) | set(cur)):
        if key in RUNTIME_MODEL_FIELDS:
            continue
        a, b = _from_json(saved[key] if key in saved else defaults.get(key)), cur.get(key)
        if isinstance(a, list):
            a = tuple(a)
        if a != b:
            return f"model.{key}: checkpoint has {a!r}, config has {b!r}"
    return None


def _tupleize(v):
    if isinstance(v, list):
        return tuple(_tupleize(x) for x in v)
    return v


def _to_jsonable(x):
    if isinstance(x, dict):
        return {k: _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    return x


def _from_json(x):
    if isinstance(x, list):
        return tuple(_from_json(v) for v in x)
    return x


# --- loading and overrides -------------------------------------------------------------------------


def load_run_config(name: str, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """configs/<name>.py (or a path) -> RunConfig with `section.field=value` overrides applied."""
    path = pathlib.Path(name)
    if path.suffix != ".py":
        path = CONFIGS_DIR / f"{name}.py"
    if not path.is_file():
        raise ConfigError(
            f"unknown config {name!r}: no file {path}; choose one of {', '.join(list_presets())} or pass a path to a .py file"
        )
    module = load_config_module(path)
    run = getattr(module, "RUN", None)
    if run is None:
        model = getattr(module, "MODEL", None)
        if not isinstance(model, ModelConfig):
            raise ConfigError(f"{path} defines neither RUN = RunConfig(...) nor MODEL = ModelConfig(...); add one")
        run = RunConfig(name=model.name, model=model)
    if not isinstance(run, RunConfig):
        raise ConfigError(f"{path}: RUN must be a drt_jax.train.config.RunConfig, got {type(run).__name__}")
    return apply_overrides(run, overrides)


def apply_overrides(run: RunConfig, overrides: typing.Sequence[str]) -> RunConfig:
    """Applies `section.field=value` strings; each value is parsed and checked against the field's type."""
    changes: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value; write e.g. train.steps=300")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if len(parts) == 1:
            if key != "name":
                raise ConfigError(f"unknown key {key!r}; keys are name or <section>.<field> with section in {sorted(_SECTION_TYPES)}")
            top["name"] = _coerce("name", raw, str)
            continue
        if len(parts) != 2 or parts[0] not in _SECTION_TYPES:
            guess = difflib.get_close_matches(parts[0], list(_SECTION_TYPES), n=1)
            hint = f"did you mean {guess[0]}.{'.'.join(parts[1:])}?" if guess else f"sections are {sorted(_SECTION_TYPES)}"
            raise ConfigError(f"unknown key {key!r}; {hint}")
        section, field = parts
        if section == "data" and field == "batch_size":
            raise ConfigError("data.batch_size is derived from train.batch (global sequences per step); set train.batch instead")
        cls = _SECTION_TYPES[section]
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        if field not in names:
            guess = difflib.get_close_matches(field, names, n=1)
            hint = f"did you mean {section}.{guess[0]}?" if guess else f"valid: {', '.join(names)}"
            raise ConfigError(f"unknown key {key!r}; {hint}")
        changes.setdefault(section, {})[field] = _coerce(key, raw, hints[field])
    out = run.replace(**top) if top else run
    for section, fields in changes.items():
        try:
            new = dataclasses.replace(getattr(out, section), **fields)
        except (ConfigError, DataError) as err:
            raise ConfigError(f"{err} (after --set {', '.join(f'{section}.{k}' for k in fields)})") from None
        out = out.replace(**{section: new})
    return out


_NONE_WORDS = {"none", "null"}


def _coerce(key: str, raw: str, annotation) -> Any:
    raw = raw.strip()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word: a string
    if isinstance(value, str) and value.lower() in _NONE_WORDS:
        value = None
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    ok, result = _check(value, annotation)
    if not ok:
        raise ConfigError(f"bad value for {key}: {raw!r} is not {_type_name(annotation)}; write e.g. {key}={_example(annotation)}")
    return result


def _check(value, ann) -> tuple[bool, Any]:
    origin = typing.get_origin(ann)
    if ann is Any:
        return True, _tupleize(value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(ann):
            ok, v = _check(value, arg)
            if ok:
                return True, v
        return False, None
    if ann is type(None):
        return value is None, None
    if ann is bool:
        return isinstance(value, bool), value
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if ann is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if ann is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, None
        args = typing.get_args(ann)
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_check(v, args[0]) for v in value]
        elif len(args) == len(value):
            items = [_check(v, a) for v, a in zip(value, args, strict=True)]
        else:
            return False, None
        if not all(ok for ok, _ in items):
            return False, None
        return True, tuple(v for _, v in items)
    return True, value


def _type_name(ann) -> str:
    name = str(ann).replace("typing.", "")
    return {"<class 'int'>": "an int", "<class 'float'>": "a number", "<class 'str'>": "a string", "<class 'bool'>": "true/false"}.get(name, name)


def _example(ann) -> str:
    for t, ex in ((bool, "true"), (int, "300"), (float, "0.001"), (str, "value")):
        if ann is t:
            return ex
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return _example(args[0]) if args else "none"
    if typing.get_origin(ann) is tuple:
        return "'(6, 6)'"
    return "value"


def resolve_run_config(run: RunConfig, tokenizer) -> RunConfig:
    """Sets the model's vocabulary and special ids from the tokenizer."""
    model = run.model.replace(
        vocab_size=int(tokenizer.vocab_size), pad_id=int(tokenizer.pad_id), eos_id=int(tokenizer.eos_id),
        landmark_id=int(tokenizer.landmark_id),
    )
    return run.replace(model=model)
