"""Model configuration: one frozen, validated dataclass, presets loaded from configs/.

Every size in this module is in tokens or *slots*. A DRT sequence of T real tokens is cut into
C = ceil(T / chunk_size) chunks of `chunk_size` tokens; each chunk gets one landmark slot appended,
so a chunk has `chunk_size + 1` slots and the sliding window (`window`) counts slots, landmarks
included (spec section 2.3).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
from typing import Any

ARCHS = ("drt", "swa", "full")
POSITIONS = ("rope", "alibi")
GCA_RESIDUALS = ("authors", "standard")
REMAT_POLICIES = ("none", "full", "dots", "auto")
PROMPT_ALIGNS = ("chunk", "none")
MLP_IMPLS = ("auto", "reference", "pallas_gpu")  # pallas_kernels.swiglu.GRADIENT's implementations
NORM_IMPLS = ("auto", "reference", "pallas_gpu")  # pallas_kernels.rmsnorm.FORWARD's: RMSNorm and the residual add before it
LSE_IMPLS = ("auto", "reference", "pallas_gpu")  # pallas_kernels.logsumexp: the loss head's log-normaliser and its gradient
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: CPU tests under jax.enable_x64

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration that cannot work; the message is one line naming the field and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of DRT and of the two baselines built by the same code.

    arch: "drt" (retrieval + GCA), "swa" (sliding-window LM, no retrieval, no landmarks) or
      "full" (full causal attention, no retrieval).
    decoder_layers: (n_lower, n_group_1, ..., n_group_G). For DRT each entry after the first is one
      retrieval group (one retrieval, then that many upper layers); (6, 6) is the paper's 1-hop model,
      (6, 3, 3) a 2-hop one. Baselines use sum(decoder_layers) plain layers.
    window: sliding-window size W in slots; query i sees slots i-W..i (W+1 keys, itself included).
      None means full causal attention (only for arch="full").
    chunk_size: real tokens per chunk S; a chunk occupies S+1 slots (the last is its landmark).
    top_k: retrieved past chunks per query chunk.
    gca_off_by_one: GCA softmax denominators get +1, letting a query attend to nothing in a chunk.
      Equivalent to the authors' zeroed landmark row of the chunk memory (spec 2.4), for any S.
    gca_residual: "authors" feeds the GCA output only into the MLP input (spec 2.6, the released
      code); "standard" adds it to the residual stream (textbook wiring, for ablation).
    gumbel_noise: Gumbel-top-k sampling of retrieved chunks in training (spec 3.3).
    gumbel_scale: the training noise's scale (1: the authors' standard Gumbel). Trained scores of a
      small model spread much less than the noise (std 0.6 against 1.28 for drt-20m), so training
      reads mostly random chunks while evaluation reads the clean top-k; smaller values narrow the gap.
    remat: what the backward pass recomputes, per layer. "none" keeps every activation (fastest),
      "dots" keeps the matmul outputs and recomputes the rest, "full" keeps only each layer's input.
      "auto": the trainer compiles its step with none, then dots, then full, and trains with the first
      that fits the device's free memory (train.step.resolve_remat); outside the trainer, where no
      gradient is taken, it is "none".
    position: "rope" (default: fused GPU/TPU attention supports it) or "alibi" (authors' choice).
    fuse_qkv: self-attention's q, k and v projections run as one GEMM over their kernels stacked per
      key-value head: the input is read once, and its gradient is one GEMM where three GEMMs and a sum
      take it. The parameters stay q, k and v, so a checkpoint loads either way.
    prompt_align: where inference puts a prompt's end (drt only). "chunk" (default): the engine
      left-pads every prompt it prefills with pad_id so that its last token is the first slot of a
      chunk; the chunk before, which holds the rest of the prompt, then makes the retrieval that the
      answer reads. NIAH fine-tuning data (data.niah_align="pad") is laid out by the same rule.
      "none": prompts run as given, and a question that ends mid-chunk is answered from a retrieval
      made before the question was read (issue 25: the passkey is then missed).
    """

    name: str = "custom"
    arch: str = "drt"
    vocab_size: int = 259
    pad_id: int = 256
    eos_id: int = 257
    landmark_id: int = 258
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None
    mlp_dim: int = 256
    decoder_layers: tuple[int, ...] = (2, 2)
    encoder_layers: int = 2
    chunk_size: int = 15
    window: int | None = 32
    top_k: int = 4
    position: str = "rope"
    rope_theta: float = 10000.0
    gca_off_by_one: bool = True
    gca_residual: str = "authors"
    gumbel_noise: bool = True
    gumbel_scale: float = 1.0
    dropout_rate: float = 0.0
    norm_eps: float = 1e-5
    encoder_norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "auto"
    gca_impl: str = "auto"
    mlp_impl: str = "auto"
    lse_impl: str = "auto"
    norm_impl: str = "auto"
    fuse_qkv: bool = False
    prompt_align: str = "chunk"

    def __post_init__(self):
        if isinstance(self.decoder_layers, list):
            object.__setattr__(self, "decoder_layers", tuple(self.decoder_layers))
        self._validate()

    # --- derived -------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def slots_per_chunk(self) -> int:
        return self.chunk_size + 1

    @property
    def n_lower(self) -> int:
        return self.decoder_layers[0]

    @property
    def groups(self) -> tuple[int, ...]:
        """Upper layers per retrieval group (empty for the baselines)."""
        return self.decoder_layers[1:] if self.arch == "drt" else ()

    @property
    def n_layers(self) -> int:
        return sum(self.decoder_layers)

    @property
    def uses_retrieval(self) -> bool:
        return self.arch == "drt"

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # --- presets -------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """Loads `MODEL` from configs/<name>.py (or from a path to such a file)."""
        path = pathlib.Path(name)
        if path.suffix != ".py":
            path = CONFIGS_DIR / f"{name}.py"
        if not path.is_file():
            raise ConfigError(
                f"unknown preset {name!r}: no file {path}; choose one of {', '.join(list_presets())} "
                "or pass a path to a configs/*.py file"
            )
        module = load_config_module(path)
        model = getattr(module, "MODEL", None)
        if not isinstance(model, ModelConfig):
            raise ConfigError(f"{path} defines no MODEL = ModelConfig(...); add one")
        return model.replace(**overrides) if overrides else model

    # --- validation ----------------------------------------------------------------------------
    def _validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"ModelConfig {self.name!r}: {msg}")

        if self.arch not in ARCHS:
            bad(f"arch={self.arch!r} is not one of {ARCHS}")
        if self.position not in POSITIONS:
            bad(f"position={self.position!r} is not one of {POSITIONS}")
        if self.gca_residual not in GCA_RESIDUALS:
            bad(f"gca_residual={self.gca_residual!r} is not one of {GCA_RESIDUALS}")
        if self.prompt_align not in PROMPT_ALIGNS:
            bad(f"prompt_align={self.prompt_align!r} is not one of {PROMPT_ALIGNS}")
        if self.remat not in REMAT_POLICIES:
            bad(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if self.mlp_impl not in MLP_IMPLS:
            bad(f"mlp_impl={self.mlp_impl!r} is not one of {MLP_IMPLS}")
        if self.norm_impl not in NORM_IMPLS:
            bad(f"norm_impl={self.norm_impl!r} is not one of {NORM_IMPLS}")
        if self.lse_impl not in LSE_IMPLS:
            bad(f"lse_impl={self.lse_impl!r} is not one of {LSE_IMPLS}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                bad(f"{field}={getattr(self, field)!r} is not one of {DTYPES}")
        for field in ("vocab_size", "d_model", "n_heads", "mlp_dim", "chunk_size"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                bad(f"{field} must be a positive integer, got {getattr(self, field)!r}")
        if self.d_model % self.n_heads:
            bad(f"n_heads={self.n_heads} does not divide d_model={self.d_model}; pick a divisor")
        if self.head_dim % 2 and self.position == "rope":
            bad(f"RoPE needs an even head_dim, got {self.head_dim}; change d_model or n_heads")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            bad(f"n_kv_heads={self.kv_heads} must divide n_heads={self.n_heads}")
        if not self.decoder_layers or any((not isinstance(n, int)) or n < 0 for n in self.decoder_layers):
            bad(f"decoder_layers={self.decoder_layers} must be a non-empty tuple of layer counts >= 0")
        for name in ("pad_id", "eos_id", "landmark_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                bad(f"{name}={value} is outside the vocabulary [0, {self.vocab_size}); raise vocab_size")
        if not (isinstance(self.gumbel_scale, (int, float)) and math.isfinite(self.gumbel_scale) and self.gumbel_scale >= 0):
            bad(f"gumbel_scale={self.gumbel_scale!r} must be a finite number >= 0 (1 is the authors' noise)")
        if not 0.0 <= self.dropout_rate < 1.0:
            bad(f"dropout_rate={self.dropout_rate} must be in [0, 1)")
        if self.arch == "full":
            if self.window is not None:
                bad("arch='full' attends to the whole prefix; set window=None")
        elif self.window is None or self.window < 1:
            bad(f"arch={self.arch!r} needs a sliding window >= 1 slot, got window={self.window}")
        if self.arch == "drt":
            if len(self.decoder_layers) < 2 or min(self.decoder_layers[1:]) < 1:
                bad(f"decoder_layers={self.decoder_layers}: DRT needs (n_lower, n_group_1, ...) with every group >= 1 layer")
            if self.top_k < 1:
                bad(f"top_k={self.top_k} must be >= 1")
            if self.encoder_layers < 0:
                bad(f"encoder_layers={self.encoder_layers} must be >= 0")
            if self.chunk_size < 2:
                bad(f"chunk_size={self.chunk_size} must be >= 2 tokens")
            if self.window is not None and self.window < self.slots_per_chunk:
                bad(
                    f"window={self.window} is shorter than one chunk ({self.slots_per_chunk} slots); "
                    "tokens would not see their own chunk: raise window"
                )
            if len({self.pad_id, self.eos_id, self.landmark_id}) < 2 or self.landmark_id in (self.pad_id, self.eos_id):
                bad("landmark_id must differ from pad_id and eos_id")


def load_config_module(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"drt_config_{path.stem.replace('-', '_')}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))
