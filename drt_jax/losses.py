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


def _block_logits(h, emb, V: int, logits_dtype: str = "float32"):
    """h [B, k, d], emb [Vp, d] in h's dtype -> logits [B, k, Vp] in logits_dtype (the GEMM accumulates
    in float32 either way), the padded columns at -inf."""
    logits = jnp.einsum("bkd,vd->bkv", h, emb, preferred_element_type=jnp.dtype(logits_dtype))
    if emb.shape[0] != V:
        logits = jnp.where(jnp.arange(emb.shape[0]) < V, logits, -jnp.inf)
    return logits


def _online_max_sum(a, b):
    """Merges two (max, sum of exp(x - max)) pairs with one exp: the pair with the larger max keeps its
    sum and the other's is scaled by exp(-|m1 - m2|). Scaling both by exp(m_i - max) costs a second exp
    per element that is always exp(0); on an H100 the reduction over a block's logits was bound by
    them (1.2 TB/s, where the d logits pass over the same bytes runs at 2.6)."""
    (m1, s1), (m2, s2) = a, b
    first = m1 >= m2
    gap = jnp.where(m1 == m2, 0.0, -jnp.abs(m1 - m2))  # equal infinities differ by nan, not by a gap
    e = jnp.exp(gap)
    return jnp.where(first, m1, m2), jnp.where(first, s1 + s2 * e, s1 * e + s2)


def logsumexp_one_pass(x):
    """log sum exp over the last axis of float32 x [..., V] in one read of x: a running (max, sum of
    exp(x - max)) pair, rescaled as the max grows. jax.nn.logsumexp reads x twice (the max, then the
    sum), and on a block of vocabulary-wide logits each read is a pass over the block in memory.
    A row that is all -inf gives -inf."""
    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(0.0, x.dtype))
    m, s = jax.lax.reduce((x, jnp.ones_like(x)), init, _online_max_sum, (x.ndim - 1,))
    return m + jnp.log(s)


def _block_loss(h, emb, t, V: int, logits_dtype: str = "float32"):
    """-> (per-token loss [B, k] float32, float32 logits, log-normaliser).

    With logits_dtype "bfloat16" the GEMM's output is rounded to bfloat16 before it is stored and every
    later pass reads it as float32: the logits' store and its two reads move half the bytes, at the price of
    rounding each logit to 8 significant bits, which moves a probability by up to |logit| x 0.2% (the
    target's logit stays float32).

    The target's logit is the dot product of h with the target's embedding row, not a pick from the
    logits: XLA lowers the pick to a masked sum over the vocabulary, one more read of the block's float32
    logits (at 16K tokens and 50K entries, 3.3 GB per step), where the row gather reads d values."""
    logits = _block_logits(h, emb, V, logits_dtype).astype(jnp.float32)
    lse = logsumexp_one_pass(logits)
    picked = jnp.einsum("bkd,bkd->bk", h, jnp.take(emb, t, axis=0), preferred_element_type=jnp.float32)
    return lse - picked, logits, lse


def _sums(hidden, embedding, targets, weights, extra, logits_dtype):
    """hidden [nb, B, k, d], embedding [V, d], targets/weights [nb, B, k], extra [nb, n, B, k] ->
    (sum of weighted token losses, sums [n] of the token losses under each extra mask)."""
    V, emb = _compute_embedding(embedding, hidden.dtype)

    def step(carry, xs):
        total, sums = carry
        h, t, w, e = xs
        token_loss = _block_loss(h, emb, t, V, logits_dtype)[0]
        return (total + jnp.sum(token_loss * w), sums + jnp.sum(token_loss * e, axis=(1, 2))), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros(extra.shape[1], jnp.float32))
    return jax.lax.scan(step, init, (hidden, targets, weights, extra))[0]


_blocked_sums = jax.custom_vjp(_sums, nondiff_argnums=(5,))


def _sums_fwd(hidden, embedding, targets, weights, extra, logits_dtype):
    """The gradients are taken here, in the same pass as the loss: the loss is linear in each token's
    loss with the known weights, so d total / d logits = (softmax - one_hot) * weight is complete once
    a block's logits exist, and the backward pass only scales by the incoming cotangent. This saves the
    recomputation of every block's logits (a quarter of the head's vocabulary-wide GEMMs) and keeps
    only dh [nb, B, k, d] and d embedding [V, d]. d logits is cast to the compute dtype before both
    products, so no float32 (tf32) GEMM of the vocabulary's width runs."""
    V, emb = _compute_embedding(embedding, hidden.dtype)
    Vp = emb.shape[0]

    def step(carry, xs):
        total, sums, d_emb = carry
        h, t, w, e = xs
        token_loss, logits, lse = _block_loss(h, emb, t, V, logits_dtype)
        one_hot = jax.nn.one_hot(t, Vp, dtype=jnp.float32)
        d_logits = ((jnp.exp(logits - lse[..., None]) - one_hot) * w[..., None]).astype(h.dtype)
        dh = jnp.einsum("bkv,vd->bkd", d_logits, emb, preferred_element_type=jnp.float32).astype(h.dtype)
        d_emb = d_emb + jnp.einsum("bkv,bkd->vd", d_logits, h, preferred_element_type=jnp.float32)
        carry = (total + jnp.sum(token_loss * w), sums + jnp.sum(token_loss * e, axis=(1, 2)), d_emb)
        return carry, (dh, token_loss)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(extra.shape[1], jnp.float32), jnp.zeros((Vp, emb.shape[1]), jnp.float32))
    (total, sums, d_emb), (dh, token_loss) = jax.lax.scan(step, init, (hidden, targets, weights, extra))
    return (total, sums), (dh, d_emb[:V], token_loss, np.zeros(targets.shape, jax.dtypes.float0))


def _sums_bwd(logits_dtype, res, g):
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
                          logits_dtype: str = "float32"):
    """Cross-entropy of tied logits hidden @ embedding^T without materialising them all.

    hidden [B, T, d], embedding [V, d], targets/mask [B, T] -> (mean loss, total weight): `mask` weights
    each token's loss (0/1, or larger for tokens that should count more) and the mean is the weighted
    one. Each block's logits [B, block, V] live only inside one scan step; under differentiation the
    same step also takes the block's gradients (`_sums_fwd`). metric_masks [n, B, T]: also return sums
    [n] of the unweighted per-token loss under each mask (for reporting losses on subsets, e.g. corpus
    vs answer tokens; the training loss's gradient does not pass through them). block_size: tokens
    per sequence in a block; None or 0 picks it from the batch and vocabulary (`auto_block_size`).
    logits_dtype: "float32" (default) or "bfloat16", the dtype the logits are stored in between the
    head's passes (`_block_loss`).
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
                                 logits_dtype)
    count = jnp.sum(mask)
    mean = total / jnp.maximum(count, 1.0)
    return (mean, count) if metric_masks is None else (mean, count, sums)
