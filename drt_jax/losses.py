"""Next-token losses. Landmark slots never reach these functions (the model returns token-space
outputs), so masking here is about padding and the last position of every sequence.

`blocked_cross_entropy` never materialises the [B, T, V] float32 logits: it walks over blocks of
tokens (at 64K tokens and a 50K vocabulary the full logits alone are over 13 GB in float32), and when
differentiated takes each block's gradients in the same pass, from logits it computes once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.logsumexp import row_logsumexp, row_logsumexp_with_grad


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


def _padded_vocab(V: int) -> int:
    """The logits' width: a large vocabulary rounded up to a multiple of 128 (50,265, odd, leaves GEMMs of
    that width unaligned and XLA padding them on every call), a small one to a multiple of 8."""
    m = 128 if V >= 4096 else 8
    return -(-V // m) * m


def _compute_embedding(embedding, dtype):
    """embedding [V, d] -> (V, the table in the compute dtype with its rows padded to _padded_vocab(V))."""
    V = embedding.shape[0]
    return V, jnp.pad(embedding.astype(dtype), ((0, _padded_vocab(V) - V), (0, 0)))


LOGITS_DTYPES = ("float32", "bfloat16")


def _block_logits(h, emb, logits_dtype: str = "float32"):
    """h [B, k, d], emb [Vp, d] in h's dtype -> logits [B, k, Vp] in logits_dtype (the GEMM accumulates
    in float32 either way); the padded columns are not masked here: the log-normaliser and its gradient
    read only the first V columns and write zeros on the rest."""
    return jnp.einsum("bkd,vd->bkv", h, emb, preferred_element_type=jnp.dtype(logits_dtype))


def _block_loss(h, emb, t, V: int, logits_dtype: str = "float32", lse_impl: str = "auto", kernel_mesh=None):
    """-> per-token loss [B, k] float32.

    With logits_dtype "bfloat16" the GEMM's output is rounded to bfloat16 before it is stored and every
    later pass reads it as float32: the logits' store and its reads move half the bytes, at the price of
    rounding each logit to 8 significant bits, which moves a probability by up to |logit| x 0.2% (the
    target's logit stays float32).

    The log-normaliser reads the GEMM's output as it is stored (pallas_kernels.logsumexp, `lse_impl`,
    per shard under `kernel_mesh`), so that a kernel does not make XLA store a masked copy first."""
    raw = _block_logits(h, emb, logits_dtype)
    return row_logsumexp(raw, V, impl=lse_impl, kernel_mesh=kernel_mesh) - _target_logits(h, emb, t)


def _target_logits(h, emb, t):
    """h [B, k, d], emb [Vp, d], t [B, k] -> float32 [B, k]: each target's logit as the dot product of h
    with the target's embedding row. XLA lowers a pick from the logits to a masked sum over the
    vocabulary, one more read of the block's logits (at 16K tokens and 50K entries, 3.3 GB per step in
    float32), where the row gather reads d values."""
    return jnp.einsum("bkd,bkd->bk", h, jnp.take(emb, t, axis=0), preferred_element_type=jnp.float32)


def _sums(hidden, embedding, targets, weights, extra, logits_dtype, lse_impl, kernel_mesh):
    """hidden [nb, B, k, d], embedding [V, d], targets/weights [nb, B, k], extra [nb, n, B, k] ->
    (sum of weighted token losses, sums [n] of the token losses under each extra mask)."""
    V, emb = _compute_embedding(embedding, hidden.dtype)

    def step(carry, xs):
        total, sums = carry
        h, t, w, e = xs
        token_loss = _block_loss(h, emb, t, V, logits_dtype, lse_impl, kernel_mesh)
        return (total + jnp.sum(token_loss * w), sums + jnp.sum(token_loss * e, axis=(1, 2))), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros(extra.shape[1], jnp.float32))
    return jax.lax.scan(step, init, (hidden, targets, weights, extra))[0]


_blocked_sums = jax.custom_vjp(_sums, nondiff_argnums=(5, 6, 7))


def _sums_fwd(hidden, embedding, targets, weights, extra, logits_dtype, lse_impl, kernel_mesh):
    """The gradients are taken here, in the same pass as the loss: the loss is linear in each token's
    loss with the known weights, so d total / d logits = (softmax - one_hot) * weight is complete once
    a block's logits exist, and the backward pass only scales by the incoming cotangent. This saves the
    recomputation of every block's logits (a quarter of the head's vocabulary-wide GEMMs) and keeps
    only dh [nb, B, k, d] and d embedding [V, d]. The log-normaliser and d logits come from one pass over
    each block's logits (pallas_kernels.logsumexp.row_logsumexp_with_grad), d logits in the compute
    dtype, so no float32 (tf32) GEMM of the vocabulary's width runs."""
    V, emb = _compute_embedding(embedding, hidden.dtype)
    Vp = emb.shape[0]

    def step(carry, xs):
        total, sums, d_emb = carry
        h, t, w, e = xs
        raw = _block_logits(h, emb, logits_dtype)
        lse, d_logits = row_logsumexp_with_grad(raw, t, w, V, out_dtype=h.dtype, impl=lse_impl, kernel_mesh=kernel_mesh)
        token_loss = lse - _target_logits(h, emb, t)
        dh = jnp.einsum("bkv,vd->bkd", d_logits, emb, preferred_element_type=jnp.float32).astype(h.dtype)
        d_emb = d_emb + jnp.einsum("bkv,bkd->vd", d_logits, h, preferred_element_type=jnp.float32)
        carry = (total + jnp.sum(token_loss * w), sums + jnp.sum(token_loss * e, axis=(1, 2)), d_emb)
        return carry, (dh, token_loss)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(extra.shape[1], jnp.float32), jnp.zeros((Vp, emb.shape[1]), jnp.float32))
    (total, sums, d_emb), (dh, token_loss) = jax.lax.scan(step, init, (hidden, targets, weights, extra))
    return (total, sums), (dh, d_emb[:V], token_loss, np.zeros(targets.shape, jax.dtypes.float0))


def _sums_bwd(logits_dtype, lse_impl, kernel_mesh, res, g):
    dh, d_emb, token_loss, zero_t = res
    g_total, g_sums = g
    d_extra = g_sums[None, :, None, None] * token_loss[:, None]
    return (g_total * dh).astype(dh.dtype), g_total * d_emb, zero_t, g_total * token_loss, d_extra


_blocked_sums.defvjp(_sums_fwd, _sums_bwd)


LOGITS_BLOCK_BYTES = 1 << 30


def auto_block_size(batch: int, num_tokens: int, vocab: int) -> int:
    """Tokens per sequence in one block of the blocked loss when none is given: the largest power of
    two (at least 128, at most the sequence) whose float32 logits for the whole batch fit in
    LOGITS_BLOCK_BYTES. Fewer, larger blocks run the head's GEMMs faster (drt-133m's head at 16K:
    9.7 ms with 4,096-token blocks, 11.1 ms with 1,024); the budget keeps a large batch's block small."""
    fit = LOGITS_BLOCK_BYTES // (4 * _padded_vocab(vocab) * max(batch, 1))
    block = 128
    while block * 2 <= fit:
        block *= 2
    return min(block, num_tokens)


def blocked_cross_entropy(hidden, embedding, targets, mask, *, block_size: int | None = None, metric_masks=None,
                          logits_dtype: str = "float32", lse_impl: str = "auto", kernel_mesh=None):
    """Cross-entropy of tied logits hidden @ embedding^T without materialising them all.

    hidden [B, T, d], embedding [V, d], targets/mask [B, T] -> (mean loss, total weight): `mask` weights
    each token's loss (0/1, or larger for tokens that should count more) and the mean is the weighted
    one. Each block's logits [B, block, V] live only inside one scan step; under differentiation the
    same step also takes the block's gradients (`_sums_fwd`). metric_masks [n, B, T]: also return sums
    [n] of the unweighted per-token loss under each mask (for reporting losses on subsets, e.g. corpus
    vs answer tokens; the training loss's gradient does not pass through them). block_size: tokens
    per sequence in a block; None or 0 picks it from the batch and vocabulary (`auto_block_size`).
    logits_dtype: "float32" (default) or "bfloat16", the dtype the logits are stored in between the
    head's passes (`_block_loss`). lse_impl: the log-normaliser's implementation
    (pallas_kernels.logsumexp, model.lse_impl); kernel_mesh: the mesh a kernel runs per shard on
    (pallas_kernels.per_shard), as the model's.
    """
    if logits_dtype not in LOGITS_DTYPES:
        raise ValueError(f"logits_dtype={logits_dtype!r}: choose one of {', '.join(LOGITS_DTYPES)}")
    B, T, d = hidden.shape
    block = min(block_size or auto_block_size(B, T, embedding.shape[0]), T)
    nb = -(-T // block)
    pad = nb * block - T
    blocked = lambda x: jnp.pad(x, ((0, 0), (0, pad))).reshape(B, nb, block).swapaxes(0, 1)
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, nb, block, d).swapaxes(0, 1)
    extra = jnp.zeros((0, B, T), jnp.float32) if metric_masks is None else jnp.asarray(metric_masks, jnp.float32)
    extra = jax.vmap(blocked)(extra).swapaxes(0, 1)  # [nb, n, B, block]
    total, sums = _blocked_sums(hidden, embedding, blocked(targets), blocked(mask), jax.lax.stop_gradient(extra),
                                 logits_dtype, lse_impl, kernel_mesh)
    count = jnp.sum(mask)
    mean = total / jnp.maximum(count, 1.0)
    return (mean, count) if metric_masks is None else (mean, count, sums)
