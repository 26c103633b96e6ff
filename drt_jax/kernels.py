"""Which attention, GCA, SwiGLU-gradient, RMSNorm and log-normaliser kernels a model config runs on this backend, and why.

The dispatchers (drt_jax.attention.choose, pallas_kernels.gca.api.choose, the KernelOps of
pallas_kernels.swiglu, pallas_kernels.rmsnorm and pallas_kernels.logsumexp) decide per call; this asks
them once for the config's shapes, so that the trainer and the evaluator can say in one line what runs,
and a config that leaves the fast path (a float32 model on a GPU takes the reference attention, several
times slower) says why instead of running slowly without a word.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from drt_jax import attention
from drt_jax.config import ModelConfig
from pallas_kernels import logsumexp, rmsnorm, swiglu
from pallas_kernels.gca import api as gca_api


def kernel_choices(cfg: ModelConfig) -> dict[str, tuple[str, list[str]]]:
    """{"attention", "gca", "mlp", "norm", "loss": (name, reasons)} for `cfg` on the default backend; the reasons
    say why faster candidates were skipped ("gca" only for DRT; "loss" is the loss head's log-normaliser)."""
    H, Hkv, Dh, S1 = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.slots_per_chunk
    dtype = jnp.dtype(cfg.dtype)
    # A length the TPU kernel's 128-slot blocks divide, as the trainer's sequences do.
    q = jax.ShapeDtypeStruct((1, 128 * S1, H, Dh), dtype)
    slopes = jax.ShapeDtypeStruct((H,), jnp.float32) if cfg.position == "alibi" else None
    name, why = attention.choose(q, slopes, cfg.attention_impl)
    out = {"attention": (name, [why] if why else [])}
    if cfg.uses_retrieval:
        gq = jax.ShapeDtypeStruct((1, 2, S1, H, Dh), dtype)
        mem = jax.ShapeDtypeStruct((1, 2, cfg.chunk_size, Hkv, Dh), dtype)
        idx = jax.ShapeDtypeStruct((1, 2, cfg.top_k), jnp.int32)
        w = jax.ShapeDtypeStruct((1, 2, cfg.top_k), jnp.float32)
        out["gca"] = gca_api.choose(gq, mem, mem, idx, w, impl=cfg.gca_impl, softmax_off_by_one=cfg.gca_off_by_one)
    gate_up = jax.ShapeDtypeStruct((1, 128 * S1, 2, cfg.mlp_dim), dtype)
    out["mlp"] = swiglu.GRADIENT.choose(cfg.mlp_impl, gate_up, jax.ShapeDtypeStruct((1, 128 * S1, cfg.mlp_dim), dtype))
    x = jax.ShapeDtypeStruct((1, 128 * S1, cfg.d_model), dtype)
    gain = jax.ShapeDtypeStruct((cfg.d_model,), jnp.dtype(cfg.param_dtype))
    out["norm"] = rmsnorm.FORWARD.choose(cfg.norm_impl, x, x, gain, eps=cfg.norm_eps, out_dtype=dtype)
    logits = jax.ShapeDtypeStruct((1, 128, cfg.vocab_size), jnp.float32)
    out["loss"] = logsumexp.LOG_NORMALISER.choose(cfg.lse_impl, logits, valid=cfg.vocab_size)
    return out


def kernel_report(cfg: ModelConfig) -> str:
    """One line: "kernels on gpu: attention cudnn, GCA pallas_gpu, SwiGLU gradient pallas_gpu, RMSNorm
    pallas_gpu, log-normaliser pallas_gpu", with the reasons for any skipped path."""
    parts, choices = [], kernel_choices(cfg)
    for op, label, field in (("attention", "attention", "model.attention_impl"), ("gca", "GCA", "model.gca_impl"),
                             ("mlp", "SwiGLU gradient", "model.mlp_impl"), ("norm", "RMSNorm", "model.norm_impl"),
                             ("loss", "log-normaliser", "model.lse_impl")):
        if op not in choices:
            continue
        name, reasons = choices[op]
        note = f" ({'; '.join(reasons)}; {field}={getattr(cfg, field.split('.')[1])})" if reasons else ""
        parts.append(f"{label} {name}{note}")
    return f"kernels on {jax.default_backend()}: " + ", ".join(parts)
