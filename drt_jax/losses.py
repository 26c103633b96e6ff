"""Next-token losses. Landmark slots never reach these functions (the model returns token-space
outputs), so masking here is about padding and the last position of every sequence.

`blocked_cross_entropy` never materialises the [B, T, V] float32 logits: it walks over blocks of
tokens and recomputes each block's logits in the backward pass (at 64K tokens and a 50K vocabulary
the full logits alone are over 13 GB in float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def next_token_targets(tokens, pad_id: int):
    """tokens [B, T] -> (targets [B, T], mask [B, T] float32).

    Position t predicts token t + 1; the last position and every target that is padding (or a
    negative id, e.g. -100 for an ignored tail) carry no loss.
    """
    targets = jnp.concatenate([tokens[:, 1:], jnp.full_like(tokens[:, :1], pad_id)], axis=1)
    mask = (targets != pad_id) & (targets >= 0)
    mask = mask.at[:, -1].set(False)
    return jnp.where(targets < 0, 0, targets), mask.astype(jnp.float32)


def cross_entropy(logits, targets, mask):
    """Mean token cross-entropy over masked positions. logits [B, T, V], targets/mask [B, T].

    Returns (mean loss, number of scored tokens); the loss is computed in float32.
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    count = jnp.sum(mask)
    return jnp.sum((lse - picked) * mask.astype(logits.dtype)) / jnp.maximum(count, 1.0), count


def next_token_loss(logits, tokens, pad_id: int):
    """Mean next-token cross-entropy of token-space logits [B, T, V] for tokens [B, T]."""
    targets, mask = next_token_targets(tokens, pad_id)
    return cross_entropy(logits, targets, mask)


@jax.custom_vjp
def _block_token_loss(h, embedding, t):
    """Per-token cross-entropy of one block's tied logits. h [B, k, d] (compute dtype), embedding [V, d]
    (float32 master weights), t int [B, k] -> [B, k] float32.

    The logits [B, k, V] are computed in the compute dtype with float32 accumulation, and in the
    backward pass recomputed (only h, t and the log-normaliser are kept) and differentiated with the
    compute dtype's matmuls: d logits = softmax - one_hot(t) is cast to the compute dtype before the
    two products, so no float32 (tf32) GEMM of the vocabulary's width runs.
    """
    return _block_token_loss_fwd(h, embedding, t)[0]


def _logits(h, embedding):
    return jnp.einsum("bkd,vd->bkv", h, embedding.astype(h.dtype), preferred_element_type=jnp.float32)


def _block_token_loss_fwd(h, embedding, t):
    logits = _logits(h, embedding)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    return lse - picked, (h, embedding, t, lse)


def _block_token_loss_bwd(res, g):
    h, embedding, t, lse = res
    logits = _logits(h, embedding)
    one_hot = jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype)
    d_logits = ((jnp.exp(logits - lse[..., None]) - one_hot) * g[..., None]).astype(h.dtype)
    dh = jnp.einsum("bkv,vd->bkd", d_logits, embedding.astype(h.dtype), preferred_element_type=jnp.float32)
    d_embedding = jnp.einsum("bkv,bkd->vd", d_logits, h, preferred_element_type=jnp.float32)
    zero_t = np.zeros(t.shape, jax.dtypes.float0)
    return dh.astype(h.dtype), d_embedding.astype(embedding.dtype), zero_t


_block_token_loss.defvjp(_block_token_loss_fwd, _block_token_loss_bwd)


def blocked_cross_entropy(hidden, embedding, targets, mask, *, block_size: int = 1024, metric_masks=None):
    """Cross-entropy of tied logits hidden @ embedding^T without materialising them all.

    hidden [B, T, d], embedding [V, d], targets/mask [B, T] -> (mean loss, total weight): `mask` weights
    each token's loss (0/1, or larger for tokens that should count more) and the mean is the weighted
    one. Each block's logits [B, block, V] live only inside one scan step (`_block_token_loss`).
    metric_masks [n, B, T]: also return sums [n] of the unweighted per-token loss under each mask (for
    reporting losses on subsets, e.g. corpus vs answer tokens; no gradient flows through them).
    """
    B, T, d = hidden.shape
    block = min(block_size, T)
    nb = -(-T // block)
    pad = nb * block - T
    blocked = lambda x: jnp.pad(x, ((0, 0), (0, pad))).reshape(B, nb, block).swapaxes(0, 1)
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, nb, block, d).swapaxes(0, 1)
    targets, weights = blocked(targets), blocked(mask)
    extra = jnp.zeros((0, B, T), jnp.float32) if metric_masks is None else jnp.asarray(metric_masks, jnp.float32)
    extra = jax.vmap(blocked)(extra).swapaxes(0, 1)  # [nb, n, B, block]

    def step(carry, xs):
        total, sums = carry
        h, t, m, e = xs
        token_loss = _block_token_loss(h, embedding, t)
        part = jnp.sum(jax.lax.stop_gradient(token_loss) * e, axis=(1, 2))
        return (total + jnp.sum(token_loss * m), sums + part), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros(extra.shape[1], jnp.float32))
    (total, sums), _ = jax.lax.scan(step, init, (hidden, targets, weights, extra))
    count = jnp.sum(mask)
    mean = total / jnp.maximum(count, 1.0)
    return (mean, count) if metric_masks is None else (mean, count, sums)
