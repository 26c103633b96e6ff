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


def blocked_cross_entropy(hidden, embedding, targets, mask, *, block_size: int = 1024):
    """Cross-entropy of tied logits hidden @ embedding^T without materialising them all.

    hidden [B, T, d], embedding [V, d], targets/mask [B, T] -> (mean loss, number of scored tokens).
    Each block's logits [B, block, V] live only inside a rematerialised scan step.
    """
    B, T, d = hidden.shape
    block = min(block_size, T)
    nb = -(-T // block)
    pad = nb * block - T
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, nb, block, d).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, nb, block).swapaxes(0, 1)
    mask = jnp.pad(mask, ((0, 0), (0, pad))).reshape(B, nb, block).swapaxes(0, 1)

    @jax.checkpoint
    def block_loss(h, t, m):
        logits = jnp.einsum("bkd,vd->bkv", h, embedding.astype(h.dtype), preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - picked) * m)

    def step(total, xs):
        return total + block_loss(*xs), None

    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (hidden, targets, mask))
    count = jnp.sum(mask)
    return total / jnp.maximum(count, 1.0), count
