"""Model FLOPs, MFU and metric sinks (metrics.jsonl, TensorBoard, tqdm).

FLOPs per training sequence (forward + backward = 3x forward), counting multiply-adds as 2:
  * matmul parameters: 2 * N_matmul per slot, where N_matmul excludes the embedding table and the
    norm gains, and a DRT sequence of T tokens has T * (S+1)/S slots (landmarks); the tied output
    projection adds 2 * V * d per real token (the "6 N" rule, with N counted where it is applied);
  * self-attention: 4 * H * Dh per (query, key) pair: causal full attention has T(T+1)/2 pairs,
    the sliding window min(i, W) + 1 keys per query i; the chunk encoder (S+1)^2 per chunk;
  * GCA: 4 * H * Dh * K * S per query slot per upper layer.
MFU = achieved model FLOP/s / (peak bf16 dense FLOP/s per device x devices); n/a on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time

import jax

from drt_jax.config import ModelConfig

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device (no sparsity), by substring of jax's device_kind.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops_per_device(device=None) -> float | None:
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    for key, value in PEAK_FLOPS:
        if key.lower() in kind.lower():
            return value
    return None


def _pairs_causal_window(L: int, window: int | None) -> int:
    if window is None or window + 1 >= L:
        return L * (L + 1) // 2
    W1 = window + 1  # keys per query once the window is full
    return W1 * (W1 + 1) // 2 + (L - W1) * W1


def _matmul_params(cfg: ModelConfig) -> dict[str, int]:
    d, H, Hkv, Dh, F = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim
    attn = d * H * Dh * 2 + d * Hkv * Dh * 2
    mlp = 3 * d * F
    layer = attn + mlp
    out = {"decoder": cfg.n_layers * layer}
    if cfg.uses_retrieval:
        out["gca"] = sum(cfg.groups) * 2 * d * H * Dh
        out["encoder"] = cfg.encoder_layers * layer
        out["memory"] = 2 * d * Hkv * Dh
    return out


def train_flops_per_sequence(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training step (fwd + bwd) over one sequence of seq_len real tokens."""
    T = seq_len
    Dh, H = cfg.head_dim, cfg.n_heads
    p = _matmul_params(cfg)
    if cfg.uses_retrieval:
        S = cfg.chunk_size
        C = math.ceil(T / S)
        L = C * (S + 1)
        fwd = 2 * (p["decoder"] + p["gca"] + p["encoder"]) * L + 2 * p["memory"] * C * S
        fwd += 4 * H * Dh * cfg.n_layers * _pairs_causal_window(L, cfg.window)
        fwd += 4 * H * Dh * cfg.encoder_layers * C * (S + 1) ** 2
        fwd += 4 * H * Dh * sum(cfg.groups) * L * cfg.top_k * S
    else:
        fwd = 2 * p["decoder"] * T + 4 * H * Dh * cfg.n_layers * _pairs_causal_window(T, cfg.window)
    fwd += 2 * cfg.vocab_size * cfg.d_model * T
    return 3.0 * fwd


class MetricWriter:
    """Appends dict rows to metrics.jsonl and TensorBoard scalars (process 0 only)."""

    def __init__(self, run_dir: pathlib.Path, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._file = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            log.warning("tensorboardX is not installed; TensorBoard events are skipped")

    def write(self, step: int, row: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time(), **{f"{prefix}/{k}": _py(v) for k, v in row.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                v = _py(v)
                if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _py(v):
    try:
        return float(v) if not isinstance(v, (int, str)) and v is not None else v
    except TypeError:
        return str(v)
