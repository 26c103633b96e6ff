"""Causal self-attention over a sliding window (or the full prefix), with backend dispatch.

q [B, T, H, D], k/v [B, T, Hkv, D] (H % Hkv == 0) -> [B, T, H, D]. Query i attends to keys
max(0, i - window) .. i, i.e. window + 1 keys including itself; window=None is full causal attention.
Optional ALiBi adds -slope_h * (i - j) to each logit.

Implementations:
  "reference": plain jnp, blocked over the window so memory grows as T * W, not T^2.
  "cudnn":     jax.nn.dot_product_attention on GPU (bf16/fp16, no ALiBi), always with is_causal=True
               because cuDNN with a left window and is_causal=False silently attends to the future.
  "auto":      cudnn where it applies, else the reference.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

IMPLS = ("auto", "reference", "cudnn")


def alibi_slopes(num_heads: int):
    """mu_h = 2^(-8 (h + 1) / H) (spec 2.3)."""
    return 2.0 ** (-8.0 * (jnp.arange(num_heads, dtype=jnp.float32) + 1.0) / num_heads)


def _attend(q, k, v, mask, bias, scale):
    """q [B, N, Q, Hkv, G, D], k/v [B, N, K, Hkv, D], mask [N, Q, K], bias [H?, N, Q, K] or None."""
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bnqhgd,bnkhd->bnhgqk", q, k, preferred_element_type=acc) * scale
    if bias is not None:
        logits = logits + bias
    logits = jnp.where(mask[None, :, None, None], logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bnhgqk,bnkhd->bnqhgd", p.astype(v.dtype), v, preferred_element_type=acc)


def attention_reference(q, k, v, *, window: int | None, slopes=None, scale: float | None = None):
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    scale = D**-0.5 if scale is None else scale
    if window is None or window >= T - 1:
        blk, nb = T, 1
    else:
        blk = window
        nb = -(-T // blk)
    Tp = nb * blk
    pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
    qb = jnp.pad(q, pad).reshape(B, nb, blk, Hkv, G, D)
    kb = jnp.pad(k, pad).reshape(B, nb, blk, Hkv, D)
    vb = jnp.pad(v, pad).reshape(B, nb, blk, Hkv, D)
    q_pos = jnp.arange(nb)[:, None] * blk + jnp.arange(blk)[None, :]  # [N, Q]
    if nb == 1:
        keys, values, k_pos = kb, vb, q_pos
    else:
        # Each query block sees its own block and the previous one: blk == window covers i - W .. i.
        prev = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
        keys = jnp.concatenate([prev(kb), kb], axis=2)
        values = jnp.concatenate([prev(vb), vb], axis=2)
        k_pos = jnp.concatenate([q_pos - blk, q_pos], axis=1)
    dist = q_pos[:, :, None] - k_pos[:, None, :]  # [N, Q, K]
    mask = (dist >= 0) & (k_pos[:, None, :] >= 0)
    if window is not None:
        mask = mask & (dist <= window)
    bias = None
    if slopes is not None:
        bias = -slopes.reshape(Hkv, G)[:, :, None, None, None] * dist[None, None]
        bias = bias[None].transpose(0, 3, 1, 2, 4, 5)  # [1, N, Hkv, G, Q, K]
    out = _attend(qb, keys, values, mask, bias, scale)
    return out.reshape(B, Tp, H, D)[:, :T].astype(q.dtype)


def _cudnn(q, k, v, *, window, scale):
    local = None if window is None else (window, 0)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, local_window_size=local, implementation="cudnn"
    )


def _cudnn_unsupported(q, slopes) -> str | None:
    if jax.default_backend() != "gpu":
        return "cuDNN needs a GPU"
    if slopes is not None:
        return "cuDNN has no exact ALiBi without a materialised T x T bias"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention takes bf16/fp16, not {q.dtype}"
    if q.shape[-1] > 256 or q.shape[-1] % 8:
        return f"cuDNN needs head_dim <= 256 and a multiple of 8, got {q.shape[-1]}"
    return None


def causal_attention(q, k, v, *, window: int | None, slopes=None, scale: float | None = None, impl: str = "auto"):
    """Sliding-window (or full) causal self-attention; see the module docstring."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    if impl in ("auto", "cudnn"):
        why = _cudnn_unsupported(q, slopes)
        if why is None:
            return _cudnn(q, k, v, window=window, scale=scale)
        if impl == "cudnn":
            log.warning("attention impl 'cudnn' skipped: %s; using the reference", why)
    return attention_reference(q, k, v, window=window, slopes=slopes, scale=scale)


def bidirectional_attention(q, k, v, *, scale: float | None = None):
    """Full attention without a mask (the chunk encoder, within one chunk): [N, S, H, D] -> same."""
    N, S, H, D = q.shape
    Hkv = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    qg = q.reshape(N, S, Hkv, H // Hkv, D)
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("nqhgd,nkhd->nhgqk", qg, k, preferred_element_type=acc) * scale
    p = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("nhgqk,nkhd->nqhgd", p.astype(v.dtype), v, preferred_element_type=acc)
    return out.reshape(N, S, H, D).astype(q.dtype)
