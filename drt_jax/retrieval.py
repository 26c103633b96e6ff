"""Causal chunk retrieval as pure functions (spec section 3): landmark scores and top-k selection.

Chunk indices are global: query chunk c (plus `query_offset` when the memory holds earlier
segments) may retrieve memory chunk j only if j < c + query_offset, i.e. strictly earlier chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def landmark_scores(query_lmk, memory_lmk):
    """query_lmk [B, C, d], memory_lmk [B, M, d] -> scores [B, C, M] = <q, m> / sqrt(d), in float32."""
    acc = jnp.promote_types(query_lmk.dtype, jnp.float32)
    scores = jnp.einsum("bcd,bmd->bcm", query_lmk, memory_lmk, preferred_element_type=acc)
    return scores / jnp.sqrt(jnp.asarray(query_lmk.shape[-1], acc))


def visibility(num_queries: int, num_memory: int, query_offset=0):
    """[C, M] bool: memory chunk j is visible to query chunk c iff j < c + query_offset."""
    c = jnp.arange(num_queries)[:, None] + query_offset
    j = jnp.arange(num_memory)[None, :]
    return j < c


def causal_topk(scores, k: int, *, gumbel_rng=None, gumbel_scale: float = 1.0, query_offset=0):
    """Selects the top-k visible memory chunks of every query chunk and weights them.

    scores [B, C, M] (float) -> (indices [B, C, k] int32, weights [B, C, k] in the scores' dtype).
    With `gumbel_rng`, Gumbel noise (times `gumbel_scale`) is added to the scores for the *selection*
    only (scale 1: Gumbel-top-k = sampling without replacement from softmax(scores)); the weights are always the
    softmax of the clean scores over the selected chunks. Slots left empty because fewer than k
    chunks are visible hold index -1 and weight 0; a chunk that sees nothing gets all-empty slots and
    no NaN, in the output or in gradients.
    """
    B, C, M = scores.shape
    visible = jnp.broadcast_to(visibility(C, M, query_offset), (B, C, M))
    noisy = scores
    if gumbel_rng is not None:
        noisy = scores + gumbel_scale * jax.random.gumbel(gumbel_rng, scores.shape, dtype=scores.dtype)
    noisy = jnp.where(visible, noisy, -jnp.inf)
    k_eff = min(k, M)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(noisy), k_eff)  # [B, C, k_eff]
    chosen = jnp.take_along_axis(visible, idx, axis=-1)
    picked = jnp.where(chosen, jnp.take_along_axis(scores, idx, axis=-1), 0.0)
    m = jax.lax.stop_gradient(jnp.max(jnp.where(chosen, picked, -jnp.inf), axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(chosen, jnp.exp(picked - m), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    weights = e / jnp.where(total > 0, total, 1.0)
    indices = jnp.where(chosen, idx, -1).astype(jnp.int32)
    if k_eff < k:
        indices = jnp.pad(indices, ((0, 0), (0, 0), (0, k - k_eff)), constant_values=-1)
        weights = jnp.pad(weights, ((0, 0), (0, 0), (0, k - k_eff)))
    return indices, weights


def shift_to_consumers(indices, weights):
    """Row c of a retrieval serves chunk c + 1 (spec 3.4): [B, C, K] -> [B, C, K], chunk 0 empty."""
    empty_idx = jnp.full_like(indices[:, :1], -1)
    return (
        jnp.concatenate([empty_idx, indices[:, :-1]], axis=1),
        jnp.concatenate([jnp.zeros_like(weights[:, :1]), weights[:, :-1]], axis=1),
    )
