"""Grouped Cross-Attention in plain jnp: the oracle every GCA kernel is tested against.

Shapes (B batch, C query chunks, Sq query slots per chunk, H query heads, D head dim,
M memory chunks, Sm slots per memory chunk, Hkv key/value heads with H % Hkv == 0, K top-k slots):
  q        [B, C, Sq, H, D]
  k_mem    [B, M, Sm, Hkv, D]
  v_mem    [B, M, Sm, Hkv, D]
  indices  [B, C, K] int32, -1 marks an empty slot
  weights  [B, C, K]
  out      [B, C, Sq, H, D]

For query chunk c, head h (kv head h // (H // Hkv)):
  out[c, :, h] = sum_j weights[c, j] * softmax(scale * q[c, :, h] @ k_mem[indices[c, j], :, h']^T)
                                      @ v_mem[indices[c, j], :, h']
An empty slot contributes nothing to the output and gets a zero weight gradient. With
`softmax_off_by_one` the softmax denominator gets +1 (a virtual key of logit 0 and value 0).

This version gathers the retrieved chunks into a [B, C, K, Sm, Hkv, D] tensor; the kernels must not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gca_reference(q, k_mem, v_mem, indices, weights, *, softmax_off_by_one=True, scale=None):
    B, C, Sq, H, D = q.shape
    Hkv = k_mem.shape[3]
    G = H // Hkv
    scale = D**-0.5 if scale is None else scale
    valid = indices >= 0  # [B, C, K]
    safe = jnp.where(valid, indices, 0)
    gather = jax.vmap(lambda mem, idx: mem[idx])  # over batch: [M, ...] x [C, K] -> [C, K, ...]
    k_sel = gather(k_mem, safe)  # [B, C, K, Sm, Hkv, D]
    v_sel = gather(v_mem, safe)
    acc = jnp.promote_types(q.dtype, jnp.float32)  # fp32 accumulation, fp64 when testing in x64
    qg = q.reshape(B, C, Sq, Hkv, G, D)
    logits = jnp.einsum("bcqhgd,bckshd->bckhgqs", qg, k_sel, preferred_element_type=acc) * scale
    # The max is a constant of the softmax, so stopping its gradient changes nothing but cost.
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    if softmax_off_by_one:
        m = jnp.maximum(m, 0.0)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if softmax_off_by_one:
        denom = denom + jnp.exp(-m)
    p = p / denom
    o = jnp.einsum("bckhgqs,bckshd->bckqhgd", p, v_sel.astype(acc))  # [B, C, K, Sq, Hkv, G, D]
    o = jnp.where(valid[:, :, :, None, None, None, None], o, 0.0)
    w = jnp.where(valid, weights, 0).astype(acc)
    out = jnp.einsum("bck,bckqhgd->bcqhgd", w, o)
    return out.reshape(B, C, Sq, H, D).astype(q.dtype)
