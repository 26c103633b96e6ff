"""Retrieval diagnostics of task examples (pure functions): does the answer's retrieval fetch the needle?

A task example (drt_jax.tasks.niah) marks its answer tokens and the needle tokens the answer is copied
from. Token t lives in chunk t // S; the first answer token is predicted at position t0 - 1, in chunk
a = (t0 - 1) // S, whose tokens read the retrieval made by chunk a - 1's landmark (row a - 1 of
`retrieval_indices_g*`, spec 3.4). Needle-chunk recall@k is the fraction of the chunks holding needle
tokens that this retrieval selected; it is defined only for examples that mark an answer and a needle
and whose answer chunk a is at least 1 (chunk 0 reads no retrieval).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def answer_retrieval_row(answer, chunk_size: int):
    """answer [B, T] (1 on answer tokens) -> [B] int32: the retrieval row the first answer token's
    chunk consumes, or -1 where there is no answer (or it sits in chunk 0, which retrieves nothing)."""
    has = jnp.any(answer > 0, axis=1)
    t0 = jnp.argmax(answer > 0, axis=1)
    row = (t0 - 1) // chunk_size - 1
    return jnp.where(has & (t0 >= 1) & (row >= 0), row, -1).astype(jnp.int32)


def needle_stats(indices, weights, answer, needle, chunk_size: int):
    """Needle-chunk recall@k and needle weight of a batch, from one gather of the answer's retrieval row.

    indices [B, C, K] (a group's retrieval; -1 = empty slot), weights [B, C, K] (its GCA weights, a
    softmax over the filled slots) or None, answer / needle [B, T] (0/1) -> (recall [B] float32, weight
    [B] float32 or None, valid [B] bool). Recall is the fraction of the chunks holding needle tokens
    that the answer's retrieval selected; weight the share of its GCA weight that went to them: near 1
    where the retrieval picks the needle's chunk out of the needle-like ones (a keyed question's), near
    1 / (needle-like chunks fetched) where it cannot tell them apart. Rows without an answer, a needle
    or a retrieval are invalid (recall and weight 0).
    """
    B, C, _ = indices.shape
    row = answer_retrieval_row(answer, chunk_size)
    at = jnp.clip(row, 0, C - 1)[:, None, None]
    got = jnp.take_along_axis(indices, at, axis=1)[:, 0]  # [B, K]
    padded = jnp.pad(needle > 0, ((0, 0), (0, C * chunk_size - needle.shape[1])))  # C = ceil(T / S) chunks
    needle_chunks = jnp.any(padded.reshape(B, C, chunk_size), axis=-1)  # [B, C]
    retrieved = jnp.any(got[:, :, None] == jnp.arange(C)[None, None, :], axis=1)  # [B, C]
    total = jnp.sum(needle_chunks, axis=1)
    valid = (row >= 0) & (total > 0)
    recall = jnp.where(valid, jnp.sum(needle_chunks & retrieved, axis=1) / jnp.maximum(total, 1), 0.0)
    if weights is None:
        return recall.astype(jnp.float32), None, valid
    w = jnp.take_along_axis(weights, at, axis=1)[:, 0].astype(jnp.float32)
    hit = (got >= 0) & jnp.take_along_axis(needle_chunks, jnp.clip(got, 0, C - 1), axis=1)  # [B, K]
    weight = jnp.where(valid, jnp.sum(jnp.where(hit, w, 0.0), axis=1), 0.0)
    return recall.astype(jnp.float32), weight.astype(jnp.float32), valid


def chunk_recall(retrieved, needle_chunks) -> float:
    """Fraction of `needle_chunks` (chunk ids) found among `retrieved` (chunk ids, -1 = empty)."""
    needle_chunks = np.asarray(needle_chunks)
    if needle_chunks.size == 0:
        return float("nan")
    return float(np.isin(needle_chunks, np.asarray(retrieved)).mean())


def chunk_weight(retrieved, weights, chunks) -> float:
    """Retrieval weight (retrieved [K] chunk ids, -1 = empty; weights [K], summing to 1 over the filled
    slots) that falls on the slots holding one of `chunks`, rounded to 4 decimals; NaN where there are no
    such chunks, as chunk_recall gives, so that means over records cover the same ones."""
    chunks = np.asarray(chunks)
    if chunks.size == 0:
        return float("nan")
    hit = np.isin(np.asarray(retrieved), chunks)
    return round(float(np.sum(np.asarray(weights, np.float64)[hit])), 4)


def trailing_share(retrieved, chunks, span: int) -> float:
    """Share of the filled slots of `retrieved` ([K] chunk ids, -1 = empty) that hold one of the `span`
    chunks right after one of `chunks` without being one of them, rounded to 4 decimals. Those are the
    chunks whose landmark still reads a needle through the lower layers' window, so a retriever that
    looks for needles fetches them too, and each needle can take several slots. NaN where there are no
    `chunks` or no filled slot."""
    chunks, got = np.asarray(chunks), np.asarray(retrieved)
    got = got[got >= 0]
    if chunks.size == 0 or got.size == 0:
        return float("nan")
    behind = got[:, None] - chunks[None, :]
    after = np.any((behind >= 1) & (behind <= span), axis=1) & ~np.isin(got, chunks)
    return round(float(after.mean()), 4)
