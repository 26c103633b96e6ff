"""Next-token losses. Landmark slots never reach these functions (the model returns token-space
outputs), so masking here is about padding and the last position of every sequence.

`blocked_cross_entropy` never materialises the [B, T, V] float32 logits: it walks over blocks of
tokens and recomputes each block's logits in the backward pass (at 64K tokens and a 50K vocabulary
the full logits alone are over 13 GB in float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def blocked_cross_entropy(hidden, embedding, targets, mask, *, block_size: int = 1024, metric_masks=None):
    """Cross-entropy of tied logits hidden @ embedding^T without materialising them all.

    hidden [B, T, d], embedding [V, d], targets/mask [B, T] -> (mean loss, total weight): `mask` weights
    each token's loss (0/1, or larger for tokens that should count more) and the mean is the weighted
    one. Each block's logits [B, block, V] live only inside a rematerialised scan step.
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

    @jax.checkpoint
    def block_loss(h, t, m, e):
        logits = jnp.einsum("bkd,vd->bkv", h, embedding.astype(h.dtype), preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        token_loss = lse - picked
        return jnp.sum(token_loss * m), jnp.sum(jax.lax.stop_gradient(token_loss) * e, axis=(1, 2))

    def step(carry, xs):
        total, sums = carry
        loss, part = block_loss(*xs)
        return (total + loss, sums + part), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros(extra.shape[1], jnp.float32))
    (total, sums), _ = jax.lax.scan(step, init, (hidden, targets, weights, extra))
    count = jnp.sum(mask)
    mean = total / jnp.maximum(count, 1.0)
    return (mean, count) if metric_masks is None else (mean, count, sums)
